//! The agent's own small HTTP API: logs of the tasks on this node, for the API server to merge.
//! Plain hyper (the agent links no web framework); the route comes from `dozen_api::paths`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dozen_api::tls::ConnectionInfo;
use dozen_api::{bearer_token, paths, token_matches, LogLine, LogQuery, AUTHORIZATION};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use crate::{local_tasks, logs, shim, Shared};

type Body = BoxBody<Bytes, Infallible>;

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let service = move |connection: ConnectionInfo| {
        let shared = shared.clone();
        hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let (shared, connection) = (shared.clone(), connection.clone());
            async move { Ok::<_, Infallible>(route(&shared, &connection, request)) }
        })
    };
    if let Err(e) = dozen_api::tls::serve(listener, service, tls).await {
        tracing::error!(error = %e, "agent API stopped");
    }
}

fn route(
    shared: &Arc<Shared>,
    connection: &ConnectionInfo,
    request: Request<hyper::body::Incoming>,
) -> Response<Body> {
    if request.method() != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match request.uri().path() {
        paths::HEALTHZ => plain(StatusCode::OK, "ok\n"),
        paths::AGENT_LOGS => {
            let query = request.uri().query().unwrap_or("");
            match serde_urlencoded::from_str::<LogQuery>(query) {
                Ok(q) => agent_logs(shared.clone(), &request, connection, q),
                Err(_) => plain(StatusCode::BAD_REQUEST, "bad log query\n"),
            }
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A server's certificate (over TLS), or the token the agent was started with.
fn authorised(
    shared: &Shared,
    request: &Request<hyper::body::Incoming>,
    connection: &ConnectionInfo,
) -> bool {
    if connection
        .identity
        .as_ref()
        .is_some_and(|id| id.name == dozen_api::tls::SERVER_CN)
    {
        return true;
    }
    if shared.config.token.is_empty() {
        return false;
    }
    let given = bearer_token(request.headers().get(AUTHORIZATION).map(|v| v.as_bytes()));
    token_matches(given.as_bytes(), shared.config.token.as_bytes())
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

fn agent_logs(
    shared: Arc<Shared>,
    request: &Request<hyper::body::Incoming>,
    connection: &ConnectionInfo,
    q: LogQuery,
) -> Response<Body> {
    if !authorised(&shared, request, connection) {
        tracing::warn!(
            peer = %connection.peer,
            client = ?connection.identity.as_ref().map(|i| &i.name),
            "refused a log request: neither a server's certificate nor the token"
        );
        return plain(StatusCode::UNAUTHORIZED, "missing or wrong token\n");
    }
    let since = q.since_ms.unwrap_or(0);
    let mut offsets: HashMap<PathBuf, u64> = HashMap::new();
    let mut first: Vec<LogLine> = Vec::new();
    for (dir, service, task) in matching(&shared, &q) {
        let path = dir.join(shim::LOG);
        let read = match q.tail {
            // Only the last lines: read from the end, never the whole file.
            Some(n) if q.since_ms.is_none() => logs::read_tail(&path, n, &service, &task),
            _ => logs::read_all(&path, &service, &task),
        };
        if let Ok((lines, off)) = read {
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
        return ndjson(
            Full::new(encode(&first))
                .map_err(|never| match never {})
                .boxed(),
        );
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
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    ndjson(StreamBody::new(stream).boxed())
}

fn ndjson(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}
