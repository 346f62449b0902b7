//! List-then-watch over one key prefix: a list answers with the store revision, a watch from
//! that revision streams newline-delimited events with periodic bookmarks, and a compacted
//! revision answers 410 Gone (list again).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use dozen_api::{ListResponse, WatchEvent, WatchEventType, WatchQuery};
use dozen_model::{decode, keys};
use dozen_store::{StoreError, WatchMessage};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::error::ApiResult;
use crate::AppState;

/// The list-then-watch protocol over one key prefix, for any record type.
/// With `revocable` (a node certificate's serial), the watch ends the moment that certificate
/// is revoked: the node's next request is refused.
pub(crate) async fn list_or_watch<T>(
    s: Arc<AppState>,
    prefix: String,
    q: WatchQuery,
    revocable: Option<String>,
) -> ApiResult<Response>
where
    T: dozen_model::Record + Send + 'static,
{
    if !q.watch {
        let range = s.store.range(&prefix).await?;
        let mut items = Vec::with_capacity(range.kvs.len());
        for kv in range.kvs {
            items.push(decode::<T>(&kv.key, &kv.value)?);
        }
        return Ok(Json(ListResponse {
            items,
            revision: range.revision,
        })
        .into_response());
    }
    let from = q.revision.unwrap_or(0).saturating_add(1);
    let mut store_watch = match s.store.watch(&prefix, from).await {
        Ok(w) => w,
        Err(StoreError::Compacted {
            compact_revision, ..
        }) => {
            return Ok(crate::error::error(
                StatusCode::GONE,
                format!(
                    "revision {} is compacted (oldest kept {compact_revision}); list again",
                    from - 1
                ),
                None,
            ))
        }
        Err(e) => return Err(e.into()),
    };
    // Opened before checking, so a revocation between the check and the watch is seen too.
    let mut revocation = match &revocable {
        Some(serial) => {
            let watch = s.store.watch(&keys::revoked(serial), from).await?;
            if s.store.get(&keys::revoked(serial)).await?.is_some() {
                return Err(crate::error::ApiFailure::from_response(
                    crate::error::error(
                        StatusCode::FORBIDDEN,
                        format!("the certificate (serial {serial}) is revoked"),
                        None,
                    ),
                ));
            }
            Some(watch)
        }
        None => None,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let bookmark_every = s.bookmark_every;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        loop {
            let lines: Vec<WatchEvent<T>> = tokio::select! {
                _ = revoked(&mut revocation) => {
                    tracing::warn!(serial = ?revocable, prefix, "closed the watch of a revoked node certificate");
                    return;
                }
                msg = store_watch.next() => match msg {
                    Some(WatchMessage::Events { revision, events }) => events
                        .into_iter()
                        .map(|e| event_line::<T>(revision, e))
                        .collect(),
                    // The store's word that every event up to `revision` is already out: a
                    // bookmark never gets ahead of an event the client has not seen.
                    Some(WatchMessage::Progress { revision }) => vec![WatchEvent {
                        kind: WatchEventType::Bookmark,
                        revision,
                        key: String::new(),
                        object: None,
                    }],
                    // Fell behind (history compacted, or this stream too slow to keep up):
                    // end the stream; the client resumes, or gets 410 and lists again.
                    Some(WatchMessage::Compacted { .. }) | Some(WatchMessage::CutOff) | None => return,
                },
                _ = tick.tick() => {
                    store_watch.request_progress();
                    continue;
                }
                _ = tx.closed() => return,
            };
            for line in lines {
                let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
                bytes.push(b'\n');
                if tx.send(Bytes::from(bytes)).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = stream_from(rx).map(Ok::<_, Infallible>);
    Ok(Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}
/// Resolves once the revocation watch sees a write (or ends); never without one.
async fn revoked(watch: &mut Option<dozen_store::Watch>) {
    match watch {
        Some(w) => {
            while let Some(msg) = w.next().await {
                if matches!(msg, WatchMessage::Events { .. }) {
                    return;
                }
            }
        }
        None => std::future::pending::<()>().await,
    }
}

fn event_line<T: dozen_model::Record>(revision: u64, e: dozen_store::Event) -> WatchEvent<T> {
    match e.kind {
        dozen_store::EventKind::Put => WatchEvent {
            kind: WatchEventType::Put,
            revision,
            object: decode::<T>(&e.kv.key, &e.kv.value).ok(),
            key: e.kv.key,
        },
        dozen_store::EventKind::Delete => WatchEvent {
            kind: WatchEventType::Delete,
            revision,
            key: e.kv.key,
            object: None,
        },
    }
}
pub(crate) fn stream_from<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}
