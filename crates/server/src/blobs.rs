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
