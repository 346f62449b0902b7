//! Stacks, services and releases: plan, apply, down, scale, restart, stop, rollback, run.

use std::sync::Arc;

use dozen_model::{Event, EventKind};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use dozen_api::{
    ApplyRequest, RollbackRequest, RunRequest, ScaleRequest, ServiceSummary, TaskInfo,
};
use dozen_control::snapshot::Snapshot;
use dozen_control::{controller, desired, ControlError};

use crate::error::ApiResult;
use crate::AppState;

pub(crate) async fn plan(
    State(s): State<Arc<AppState>>,
    Json(req): Json<ApplyRequest>,
) -> ApiResult<Json<dozen_spec::Plan>> {
    Ok(Json(
        desired::plan(s.store.as_ref(), &req.stack, &req.artifacts).await?,
    ))
}
pub(crate) async fn apply(
    State(s): State<Arc<AppState>>,
    Json(req): Json<ApplyRequest>,
) -> ApiResult<Json<desired::ApplyOutcome>> {
    // Taken before the change, so its event comes before what the controllers do about it.
    let at = dozen_control::wall_ms();
    let outcome = desired::apply_built(
        s.store.as_ref(),
        &req.stack,
        &req.artifacts,
        &req.images,
        &s.retention,
    )
    .await?;
    tracing::info!(stack = %req.stack.name, releases = outcome.releases.len(), "applied stack");
    note(
        &s,
        outcome
            .releases
            .iter()
            .map(|r| {
                Event::new(
                    at,
                    "operator",
                    EventKind::ReleaseCreated { release: r.release },
                )
                .service(&r.service)
            })
            .collect(),
    )
    .await;
    Ok(Json(outcome))
}
pub(crate) async fn list_stacks(
    State(s): State<Arc<AppState>>,
) -> ApiResult<Json<Vec<dozen_model::StackRecord>>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    Ok(Json(snap.stacks.into_values().map(|v| v.record).collect()))
}
pub(crate) async fn down(
    State(s): State<Arc<AppState>>,
    Path(stack): Path<String>,
) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(desired::down(s.store.as_ref(), &stack).await?))
}
pub(crate) async fn list_services(
    State(s): State<Arc<AppState>>,
) -> ApiResult<Json<Vec<ServiceSummary>>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    let problems = controller::read_problems(s.store.as_ref()).await?;
    let mut out = Vec::new();
    for (name, svc) in &snap.services {
        let release = snap.current_release(name);
        let tasks: Vec<TaskInfo> = snap
            .assignments
            .values()
            .filter(|a| {
                &a.record.service == name
                    && !matches!(a.record.kind, dozen_model::TaskKind::OneOff { .. })
            })
            .map(|a| {
                TaskInfo::from_records(
                    &a.record,
                    snap.statuses.get(&a.record.task).map(|s| &s.record),
                )
            })
            .collect();
        let running = tasks
            .iter()
            .filter(|t| t.state() == Some(dozen_model::TaskState::Running))
            .count() as u32;
        let healthy = tasks
            .iter()
            .filter(|t| {
                t.state() == Some(dozen_model::TaskState::Running)
                    && t.status.as_ref().is_some_and(|s| s.healthy)
            })
            .count() as u32;
        out.push(ServiceSummary {
            name: name.clone(),
            stack: svc.record.stack.clone(),
            process_type: release
                .map(|r| r.spec.process_type.clone())
                .unwrap_or_default(),
            current_release: svc.record.current_release,
            runs_like_current: snap.runs_like_current(name),
            latest_release: svc.record.latest_release,
            desired: snap.desired_replicas(name),
            running,
            healthy,
            stopped: svc.record.stopped,
            reproducible: release.is_some_and(|r| r.reproducible),
            problems: problems
                .get(name)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .chain(task_problems(&s, name, &tasks).await)
                .collect(),
        });
    }
    Ok(Json(out))
}
pub(crate) async fn list_releases(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
) -> ApiResult<Json<Vec<dozen_model::Release>>> {
    let mut snap = Snapshot::read(s.store.as_ref()).await?;
    if !snap.services.contains_key(&service) {
        return Err(ControlError::NotFound {
            kind: "service",
            name: service,
        }
        .into());
    }
    Ok(Json(
        snap.releases
            .remove(&service)
            .unwrap_or_default()
            .into_values()
            .collect(),
    ))
}
pub(crate) async fn scale(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
    Json(req): Json<ScaleRequest>,
) -> ApiResult<StatusCode> {
    let at = dozen_control::wall_ms();
    let before = desired::scale(s.store.as_ref(), &service, req.replicas).await?;
    tracing::info!(service, replicas = req.replicas, "scaled");
    if before != req.replicas {
        let scaled = EventKind::Scaled {
            from: before,
            to: req.replicas,
        };
        note(
            &s,
            vec![Event::new(at, "operator", scaled).service(&service)],
        )
        .await;
    }
    Ok(StatusCode::NO_CONTENT)
}
pub(crate) async fn restart(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
) -> ApiResult<StatusCode> {
    desired::restart(s.store.as_ref(), &service).await?;
    Ok(StatusCode::NO_CONTENT)
}
pub(crate) async fn stop(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
) -> ApiResult<StatusCode> {
    desired::stop(s.store.as_ref(), &service).await?;
    Ok(StatusCode::NO_CONTENT)
}
pub(crate) async fn rollback(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
    Json(req): Json<RollbackRequest>,
) -> ApiResult<Json<dozen_model::Release>> {
    let at = dozen_control::wall_ms();
    let release = desired::rollback(s.store.as_ref(), &service, req.to, &s.retention).await?;
    let created = EventKind::ReleaseCreated {
        release: release.number,
    };
    note(
        &s,
        vec![Event::new(at, "operator", created).service(&service)],
    )
    .await;
    Ok(Json(release))
}
pub(crate) async fn run(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
    Json(req): Json<RunRequest>,
) -> ApiResult<Json<TaskInfo>> {
    let a = desired::run_oneoff(s.store.as_ref(), &service, req.argv).await?;
    Ok(Json(TaskInfo::from_records(&a, None)))
}

/// Records what an operator did; the change itself is made already, so a failure to record
/// it is logged, not returned.
async fn note(s: &AppState, events: Vec<Event>) {
    if events.is_empty() {
        return;
    }
    if let Err(e) = dozen_control::events::record(s.store.as_ref(), &events).await {
        tracing::warn!(error = %e, "cannot record events");
    }
}

/// Why the tasks of `service` that are not running and healthy are not: each one's newest
/// reason from its events, as `task: reason`.
async fn task_problems(s: &AppState, service: &str, tasks: &[TaskInfo]) -> Vec<String> {
    let stuck: Vec<String> = tasks
        .iter()
        .filter(|t| {
            t.desired == dozen_model::DesiredState::Run
                && !(t.state() == Some(dozen_model::TaskState::Running)
                    && t.status.as_ref().is_some_and(|st| st.healthy))
        })
        .map(|t| t.task.clone())
        .collect();
    if stuck.is_empty() {
        return Vec::new();
    }
    match dozen_control::events::task_reasons(s.store.as_ref(), service, &stuck).await {
        Ok(reasons) => reasons
            .into_iter()
            .map(|(task, event)| format!("{task}: {}", event.describe()))
            .collect(),
        Err(e) => {
            tracing::warn!(service, error = %e, "cannot read events for problems");
            Vec::new()
        }
    }
}
