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
    let found = if headers.contains_key(dozen_api::LOCAL_ONLY) {
        open(&s, &digest).await?
    } else {
        open_or_fetch(&s, &digest).await?
    };
    match found {
        Some(file) => Ok(file_response(file)),
        None => Err(ControlError::NotFound {
            kind: "blob",
            name: digest,
        }
        .into()),
    }
}

/// The blob from this server's store or, uploaded to another server, fetched from there
/// (streamed to disk and checked), one pull per blob at a time; who asks meanwhile waits and
/// reads the copy.
pub(crate) async fn open_or_fetch(s: &AppState, digest: &str) -> ApiResult<Option<std::fs::File>> {
    if let Some(file) = open(s, digest).await? {
        return Ok(Some(file));
    }
    let lock = {
        let mut pulls = s.pulls.lock().unwrap_or_else(|p| p.into_inner());
        pulls.entry(digest.to_string()).or_default().clone()
    };
    let held = lock.lock().await;
    let mut found = open(s, digest).await?;
    if found.is_none() && crate::peers::fetch_blob(s, digest).await {
        found = open(s, digest).await?;
    }
    drop(held);
    {
        let mut pulls = s.pulls.lock().unwrap_or_else(|p| p.into_inner());
        if pulls.get(digest).is_some_and(|l| Arc::strong_count(l) <= 2) {
            pulls.remove(digest);
        }
    }
    Ok(found)
}

async fn open(s: &AppState, digest: &str) -> ApiResult<Option<std::fs::File>> {
    let (blobs, name) = (s.blobs.clone(), digest.to_string());
    blocking(move || blobs.open(&name)).await
}

/// The blob's bytes, read from disk as the client takes them (64 KiB at a time).
pub(crate) fn file_response(file: std::fs::File) -> Response {
    let length = file.metadata().map(|m| m.len()).ok();
    let file = tokio::fs::File::from_std(file);
    let chunks = futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let mut response = Response::builder().header("content-type", "application/octet-stream");
    if let Some(length) = length {
        response = response.header("content-length", length);
    }
    response.body(Body::from_stream(chunks)).unwrap_or_default()
}

pub(crate) async fn put_blob(
    State(s): State<Arc<AppState>>,
    Path(digest): Path<String>,
    body: Body,
) -> ApiResult<StatusCode> {
    let (blobs, name) = (s.blobs.clone(), digest.clone());
    if blocking(move || blobs.contains(&name)).await? {
        return Ok(StatusCode::CREATED);
    }
    let (blobs, name) = (s.blobs.clone(), digest.clone());
    let mut writer = blocking(move || blobs.writer(&name, MAX_BLOB_BYTES as u64)).await?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| {
            ApiFailure::from_response(crate::error::error(
                StatusCode::BAD_REQUEST,
                format!("the upload of {digest} broke off: {e}"),
                None,
            ))
        })?;
        writer.write(&chunk).await?;
    }
    writer.commit().await?;
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
    let store = state.store.as_ref();
    let cutoff = dozen_control::wall_ms().saturating_sub(grace.as_millis() as u64);
    let (registry, needed) = dozen_control::registry::kept_blobs(store, cutoff)
        .await
        .map_err(|e| e.to_string())?;
    keep.extend(registry);
    let blobs = state.blobs.clone();
    let removed = tokio::task::spawn_blocking(move || blobs.collect(&keep, grace))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    dozen_control::registry::forget_blobs(store, &needed, cutoff)
        .await
        .map_err(|e| e.to_string())?;
    state.uploads.sweep();
    Ok(removed)
}
