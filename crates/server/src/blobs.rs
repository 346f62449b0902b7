//! Content-addressed blobs (artifact bundles): has, get, put. A server asked for a blob it
//! lacks fetches it from a peer, checks it and keeps it, so agents may talk to any server.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use dozen_control::ControlError;
use dozen_store::blob::BlobError;

use crate::error::{ApiFailure, ApiResult};
use crate::AppState;

/// Largest artifact bundle accepted.
pub(crate) const MAX_BLOB_BYTES: usize = 512 * 1024 * 1024;
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ApiFailure::from_response(crate::error::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "blob task failed".into(),
            None,
        ))),
    }
}
pub(crate) async fn has_blob(
    State(s): State<Arc<AppState>>,
    Path(digest): Path<String>,
) -> ApiResult<StatusCode> {
    let blobs = s.blobs.clone();
    let found = blocking(move || blobs.contains(&digest)).await?;
    Ok(if found {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    })
}
pub(crate) async fn get_blob(
    State(s): State<Arc<AppState>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let blobs = s.blobs.clone();
    let name = digest.clone();
    let local_only = headers.contains_key(dozen_api::LOCAL_ONLY);
    let bytes = match blocking(move || blobs.get(&name)).await? {
        Some(bytes) => Some(bytes),
        None if local_only => None,
        // Uploaded to another server: fetch it from there, check it, keep it.
        None => match crate::peers::fetch_blob(&s, &digest).await {
            Some(bytes) => {
                let (blobs, name, copy) = (s.blobs.clone(), digest.clone(), bytes.clone());
                match tokio::task::spawn_blocking(move || blobs.put(&name, &copy)).await {
                    Ok(Ok(())) => Some(bytes),
                    Ok(Err(BlobError::Mismatch { .. })) => {
                        tracing::warn!(digest, "a peer's copy of a blob does not match its digest");
                        None
                    }
                    Ok(Err(e)) => {
                        // Checked, just not kept: serve it anyway.
                        tracing::warn!(digest, error = %e, "cannot keep a blob fetched from a peer");
                        Some(bytes)
                    }
                    Err(_) => None,
                }
            }
            None => None,
        },
    };
    match bytes {
        Some(bytes) => Ok(Response::builder()
            .header("content-type", "application/octet-stream")
            .body(Body::from(bytes))
            .unwrap_or_default()),
        None => Err(ControlError::NotFound {
            kind: "blob",
            name: digest,
        }
        .into()),
    }
}
pub(crate) async fn put_blob(
    State(s): State<Arc<AppState>>,
    Path(digest): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let blobs = s.blobs.clone();
    blocking(move || blobs.put(&digest, &body)).await?;
    Ok(StatusCode::CREATED)
}

/// How often each server collects the blobs no release names any more.
pub const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// How long an upload may wait for the release that names it before it is collected.
pub const UPLOAD_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Collects, on this server, the blobs that no release names (releases are pruned to the
/// newest N per service, and go with their service): every [`COLLECT_EVERY`], keeping uploads
/// younger than [`UPLOAD_GRACE`]. Each server holds its own copies, so each collects its own.
pub async fn collect_loop(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(COLLECT_EVERY).await;
        match collect_once(&state, UPLOAD_GRACE).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(count = removed.len(), "collected blobs no release names");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot collect blobs this time"),
        }
    }
}

/// One collection: the digests removed.
pub async fn collect_once(
    state: &AppState,
    grace: std::time::Duration,
) -> Result<Vec<String>, String> {
    let releases = state
        .store
        .range(&dozen_model::keys::all_releases())
        .await
        .map_err(|e| e.to_string())?;
    let mut keep = std::collections::BTreeSet::new();
    for kv in &releases.kvs {
        // A release that cannot be read keeps every blob: better late than wrong.
        let release: dozen_model::Release =
            dozen_model::decode(&kv.key, &kv.value).map_err(|e| e.to_string())?;
        keep.extend(release.artifact_digest);
    }
    let blobs = state.blobs.clone();
    tokio::task::spawn_blocking(move || blobs.collect(&keep, grace))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}
