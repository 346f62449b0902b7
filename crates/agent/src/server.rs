//! The agent's own small HTTP API: logs of the tasks on this node, for the API server to merge.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use dozen_api::{LogLine, LogQuery};
use tokio::sync::mpsc;

use crate::{local_tasks, logs, shim, Shared};

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/agent/logs", get(agent_logs))
        .with_state(shared);
    let served = match tls {
        Some(config) => dozen_api::tls::serve(listener, app, config).await,
        None => axum::serve(listener, app).await,
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "agent API stopped");
    }
}

/// A server's certificate (over TLS), or the token the agent was started with.
fn authorised(
    shared: &Shared,
    headers: &HeaderMap,
    connection: Option<&dozen_api::tls::ConnectionInfo>,
) -> bool {
    if connection
        .and_then(|c| c.identity.as_ref())
        .is_some_and(|id| id.name == dozen_api::tls::SERVER_CN)
    {
        return true;
    }
    if shared.config.token.is_empty() {
        return false;
    }
    let given = headers
        .get(dozen_api::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = shared.config.token.as_bytes();
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn matching(shared: &Shared, q: &LogQuery) -> Vec<(PathBuf, String, String)> {
    local_tasks(&shared.tasks_dir())
        .into_iter()
        .filter(|(_, service, task)| {
            q.service.as_ref().is_none_or(|s| s == service)
                && q.task.as_ref().is_none_or(|t| t == task)
        })
        .collect()
}

fn encode(lines: &[LogLine]) -> Bytes {
    let mut out = Vec::new();
    for l in lines {
        out.extend(serde_json::to_vec(l).unwrap_or_default());
        out.push(b'\n');
    }
    Bytes::from(out)
}

async fn agent_logs(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    connection: Option<axum::Extension<dozen_api::tls::ConnectionInfo>>,
    Query(q): Query<LogQuery>,
) -> Response {
    if !authorised(&shared, &headers, connection.as_ref().map(|c| &c.0)) {
        tracing::warn!(
            peer = ?connection.as_ref().map(|c| c.peer),
            client = ?connection.as_ref().and_then(|c| c.identity.as_ref()).map(|i| &i.name),
            "refused a log request: neither a server's certificate nor the token"
        );
        return (StatusCode::UNAUTHORIZED, "missing or wrong token\n").into_response();
    }
    let since = q.since_ms.unwrap_or(0);
    let mut offsets: HashMap<PathBuf, u64> = HashMap::new();
    let mut first: Vec<LogLine> = Vec::new();
    for (dir, service, task) in matching(&shared, &q) {
        let path = dir.join(shim::LOG);
        if let Ok((lines, off)) = logs::read_from(&path, 0, &service, &task) {
            first.extend(lines.into_iter().filter(|l| l.ts_ms >= since));
            offsets.insert(path, off);
        }
    }
    first.sort_by_key(|l| l.ts_ms);
    if let Some(tail) = q.tail {
        let skip = first.len().saturating_sub(tail);
        first.drain(..skip);
    }
    if !q.follow {
        return Response::builder()
            .header("content-type", "application/x-ndjson")
            .body(Body::from(encode(&first)))
            .unwrap_or_default();
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        if tx.send(encode(&first)).await.is_err() {
            return;
        }
        let mut rescan = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = tx.closed() => return,
            }
            // New tasks of the service (scale-out, restarts) join the stream.
            if rescan.elapsed() > Duration::from_secs(1) {
                rescan = tokio::time::Instant::now();
                for (dir, _, _) in matching(&shared, &q) {
                    offsets.entry(dir.join(shim::LOG)).or_insert(0);
                }
            }
            let tasks: HashMap<PathBuf, (String, String)> = matching(&shared, &q)
                .into_iter()
                .map(|(dir, s, t)| (dir.join(shim::LOG), (s, t)))
                .collect();
            let mut batch = Vec::new();
            for (path, off) in offsets.iter_mut() {
                let Some((service, task)) = tasks.get(path) else {
                    continue;
                };
                if let Ok((lines, next)) = logs::read_from(path, *off, service, task) {
                    *off = next;
                    batch.extend(lines);
                }
            }
            if !batch.is_empty() {
                batch.sort_by_key(|l| l.ts_ms);
                if tx.send(encode(&batch)).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}
