//! Tasks: list, one task, removal of a finished one-off.

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
pub(crate) async fn get_task(
    State(s): State<Arc<AppState>>,
    Path(task): Path<String>,
) -> ApiResult<Json<TaskInfo>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    let a = snap
        .assignments
        .get(&task)
        .ok_or_else(|| ControlError::NotFound {
            kind: "task",
            name: task.clone(),
        })?;
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
