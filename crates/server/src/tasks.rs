//! Tasks: list, one task, removal of a finished one-off, a command run inside one (`exec`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use dozen_api::{TaskInfo, TaskQuery};
use dozen_control::snapshot::Snapshot;
use dozen_control::{desired, ControlError};

use crate::error::ApiResult;
use crate::AppState;

pub(crate) async fn list_tasks(
    State(s): State<Arc<AppState>>,
    Query(q): Query<TaskQuery>,
) -> ApiResult<Json<Vec<TaskInfo>>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    Ok(Json(
        snap.assignments
            .values()
            .filter(|a| {
                q.service
                    .as_ref()
                    .is_none_or(|svc| &a.record.service == svc)
            })
            .map(|a| {
                TaskInfo::from_records(
                    &a.record,
                    snap.statuses.get(&a.record.task).map(|s| &s.record),
                )
            })
            .collect(),
    ))
}
fn assignment_or_404<'a>(
    snap: &'a Snapshot,
    task: &str,
) -> Result<&'a dozen_control::snapshot::Versioned<dozen_model::Assignment>, ControlError> {
    snap.assignments
        .get(task)
        .ok_or_else(|| ControlError::NotFound {
            kind: "task",
            name: task.to_string(),
        })
}

pub(crate) async fn get_task(
    State(s): State<Arc<AppState>>,
    Path(task): Path<String>,
) -> ApiResult<Json<TaskInfo>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    let a = assignment_or_404(&snap, &task)?;
    Ok(Json(TaskInfo::from_records(
        &a.record,
        snap.statuses.get(&task).map(|s| &s.record),
    )))
}
pub(crate) async fn remove_task(
    State(s): State<Arc<AppState>>,
    Path(task): Path<String>,
) -> ApiResult<StatusCode> {
    desired::remove_oneoff(s.store.as_ref(), &task).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a command inside a running task, through the agent of its node (or the server that
/// alone reaches that agent); the agent's answer (JSON lines of output, then the exit code)
/// streams back as it comes.
pub(crate) async fn exec(
    State(s): State<Arc<AppState>>,
    Path(task): Path<String>,
    Json(request): Json<dozen_api::ExecRequest>,
) -> ApiResult<axum::response::Response> {
    let bytes: usize = request.argv.iter().map(String::len).sum();
    if request.argv.is_empty() || request.argv[0].is_empty() {
        return Err(crate::error::bad_request(
            "exec needs a command: dozen exec SERVICE -- CMD [ARGS...]".into(),
        ));
    }
    if request.argv.len() > dozen_api::MAX_EXEC_ARGS || bytes > dozen_api::MAX_EXEC_ARG_BYTES {
        return Err(crate::error::bad_request(format!(
            "the command is too long: at most {} arguments and {} bytes",
            dozen_api::MAX_EXEC_ARGS,
            dozen_api::MAX_EXEC_ARG_BYTES
        )));
    }
    let snap = Snapshot::read(s.store.as_ref()).await?;
    let a = assignment_or_404(&snap, &task)?;
    let running = snap
        .statuses
        .get(&task)
        .is_some_and(|st| st.record.state == dozen_model::TaskState::Running);
    if !running {
        return Err(ControlError::Conflict(format!(
            "task `{task}` is not running (`dozen ps {}` says what it is doing)",
            a.record.service
        ))
        .into());
    }
    let node = snap
        .nodes
        .get(&a.record.node)
        .filter(|_| snap.alive_nodes.contains(&a.record.node))
        .map(|n| n.record.clone())
        .ok_or_else(|| {
            ControlError::Conflict(format!(
                "node `{}` of task `{task}` is down; its agent cannot run the command",
                a.record.node
            ))
        })?;
    let via = dozen_api::agent::reachable_only_through(&node)
        .filter(|via| *via != s.server_id.as_str())
        .map(String::from);
    let answer = match via {
        None => crate::logs::agent(&s).exec(&node, &task, &request).await,
        Some(via) => {
            let peers = dozen_control::servers::peers(s.store.as_ref(), &s.server_id).await?;
            let peer = peers.into_iter().find(|p| p.id == via);
            match peer {
                Some(peer) => {
                    let url = format!(
                        "{}{}",
                        peer.url.trim_end_matches('/'),
                        dozen_api::paths::fill(dozen_api::paths::TASK_EXEC, &[&task])
                    );
                    match crate::peers::request_with(&s, &peer, reqwest::Method::POST, &url) {
                        Some(r) => r.json(&request).send().await.map_err(|e| e.to_string()),
                        None => Err(format!(
                            "server {via} is not reachable the way this one speaks"
                        )),
                    }
                }
                None => Err(format!(
                    "server {via}, which alone reaches node `{}`, is not up",
                    node.name
                )),
            }
        }
    };
    let answer = answer.map_err(|e| {
        ControlError::Conflict(format!(
            "cannot reach the agent of node `{}`: {e}",
            node.name
        ))
    })?;
    let status = axum::http::StatusCode::from_u16(answer.status().as_u16())
        .unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
    if !status.is_success() {
        // The agent's refusal (one JSON line saying why), as this API says errors.
        let body = answer.bytes().await.unwrap_or_default();
        let message = match serde_json::from_slice::<dozen_api::ExecOutput>(&body) {
            Ok(dozen_api::ExecOutput::Error { message }) => message,
            _ => String::from_utf8_lossy(&body).trim().to_string(),
        };
        return Err(crate::error::ApiFailure::from_response(
            crate::error::error(status, message, None),
        ));
    }
    Ok(axum::response::Response::builder()
        .status(status)
        .header("content-type", "application/x-ndjson")
        .body(axum::body::Body::from_stream(answer.bytes_stream()))
        .unwrap_or_default())
}
