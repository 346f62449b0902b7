//! `GET /v1/events`: what happened, oldest first; with `follow`, then each new event as it
//! is recorded (a watch on the events' own prefix, from the revision of the list).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::Response;
use bytes::Bytes;
use dozen_api::ndjson::push_line;
use dozen_api::EventQuery;
use dozen_control::events::{self, Filter};
use dozen_model::{decode, Event};
use dozen_store::WatchMessage;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::error::ApiResult;
use crate::AppState;

pub(crate) async fn events(
    State(s): State<Arc<AppState>>,
    Query(q): Query<EventQuery>,
) -> ApiResult<Response> {
    let filter = Filter {
        service: q.service.clone(),
        task: q.task.clone(),
        since_ms: q.since_ms,
    };
    let (listed, revision) = events::list(s.store.as_ref(), &filter).await?;
    let mut first = Vec::new();
    for event in &listed {
        push_line(&mut first, event);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let _ = tx.try_send(Bytes::from(first));
    if q.follow {
        // Opened before answering, so nothing recorded after the list is missed.
        let mut watch = s.store.watch(&filter.prefix(), revision + 1).await?;
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = watch.next() => message,
                    _ = tx.closed() => return,
                };
                let batch = match message {
                    Some(WatchMessage::Events { events, .. }) => events,
                    Some(WatchMessage::Progress { .. }) => continue,
                    // Fell behind or the store went: end; the reader lists again.
                    Some(WatchMessage::Compacted { .. } | WatchMessage::CutOff) | None => return,
                };
                let mut out = Vec::new();
                for e in batch {
                    if e.kind != dozen_store::EventKind::Put {
                        continue;
                    }
                    if let Ok(event) = decode::<Event>(&e.kv.key, &e.kv.value) {
                        if filter.matches(&event) {
                            push_line(&mut out, &event);
                        }
                    }
                }
                if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                    return;
                }
            }
        });
    } else {
        drop(tx);
    }
    let stream = crate::watch::stream_from(rx).map(Ok::<_, Infallible>);
    Ok(Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}
