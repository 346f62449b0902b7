//! The agent's own small HTTP API: logs of the tasks on this node, for the API server to merge.
//! Plain hyper (the agent links no web framework); the route comes from `dozen_api::paths`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dozen_api::tls::ConnectionInfo;
use dozen_api::{bearer_token, ndjson, paths, token_matches, LogLine, LogQuery, AUTHORIZATION};
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
            async move {
                let exec = (request.method() == Method::POST)
                    .then(|| paths::parameters(paths::AGENT_EXEC, request.uri().path()))
                    .flatten()
                    .and_then(|values| values.into_iter().next().map(String::from));
                let stats =
                    request.method() == Method::GET && request.uri().path() == paths::AGENT_STATS;
                let response = match exec {
                    Some(task) if authorised(&shared, &request, &connection) => {
                        crate::exec::serve(shared, task, request).await
                    }
                    None if stats && authorised(&shared, &request, &connection) => {
                        crate::stats::serve(shared, request.uri().query()).await
                    }
                    Some(_) => plain(StatusCode::UNAUTHORIZED, "missing or wrong token\n"),
                    None if stats => plain(StatusCode::UNAUTHORIZED, "missing or wrong token\n"),
                    None => route(&shared, &connection, request),
                };
                Ok::<_, Infallible>(response)
            }
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
        ndjson::push_line(&mut out, l);
    }
    Bytes::from(out)
}

fn agent_logs(
    shared: Arc<Shared>,
    request: &Request<hyper::body::Incoming>,
    connection: &ConnectionInfo,
    mut q: LogQuery,
) -> Response<Body> {
    q.tail = q.tail.map(|n| n.min(dozen_api::MAX_LOG_TAIL));
    if !authorised(&shared, request, connection) {
        tracing::warn!(
            peer = %connection.peer,
            client = ?connection.identity.as_ref().map(|i| &i.name),
            "refused a log request: neither a server's certificate nor the token"
        );
        return plain(StatusCode::UNAUTHORIZED, "missing or wrong token\n");
    }
    // What is there already, then (with `follow`) what comes: lines go out as they are read,
    // through a small channel, so the answer is never whole in memory.
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        let first = {
            let (tx, shared, q) = (tx.clone(), shared.clone(), q.clone());
            tokio::task::spawn_blocking(move || send_existing(&shared, &q, &tx)).await
        };
        let Ok(Some(offsets)) = first else {
            return;
        };
        if q.follow {
            follow(&shared, &q, offsets, &tx).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    ndjson(StreamBody::new(stream).boxed())
}

/// Sends the lines the query asks for that are written already, oldest first; returns where
/// each log ends (for a follower), or None when the reader has gone.
fn send_existing(
    shared: &Shared,
    q: &LogQuery,
    tx: &mpsc::Sender<Bytes>,
) -> Option<HashMap<PathBuf, logs::Position>> {
    let since = q.since_ms.unwrap_or(0);
    let tasks = matching(shared, q);
    let paths: Vec<PathBuf> = tasks
        .iter()
        .map(|(dir, _, _)| dir.join(shim::LOG))
        .collect();
    if let (Some(n), None) = (q.tail, q.since_ms) {
        // Only the last lines: read from the end, never the whole file.
        let mut last: Vec<LogLine> = Vec::new();
        let mut offsets = HashMap::new();
        for ((_, service, task), path) in tasks.iter().zip(&paths) {
            if let Ok((lines, end)) = logs::read_tail(path, n, service, task) {
                last.extend(lines);
                offsets.insert(path.clone(), end);
            }
        }
        last.sort_by_key(|l| l.ts_ms);
        last.drain(..last.len().saturating_sub(n));
        return tx.blocking_send(encode(&last)).ok().map(|()| offsets);
    }
    let readers = tasks
        .iter()
        .zip(&paths)
        .map(|((_, service, task), path)| logs::LineReader::new(path, service, task))
        .collect();
    let mut merge = logs::merged(readers);
    // With a tail as well as `since`, only the last lines matching are kept: at most `n`.
    let mut out = ndjson::Lines::new(q.tail);
    for line in merge.by_ref().filter(|l| l.ts_ms >= since) {
        if let Some(chunk) = out.push(line) {
            tx.blocking_send(Bytes::from(chunk)).ok()?;
        }
    }
    if let Some(rest) = out.finish() {
        tx.blocking_send(Bytes::from(rest)).ok()?;
    }
    Some(paths.into_iter().zip(merge.ends()).collect())
}

/// Sends lines as the tasks write them, new tasks of the service (scale-out, restarts)
/// joining, until the reader goes.
async fn follow(
    shared: &Shared,
    q: &LogQuery,
    mut offsets: HashMap<PathBuf, logs::Position>,
    tx: &mpsc::Sender<Bytes>,
) {
    let mut rescan = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tx.closed() => return,
        }
        if rescan.elapsed() > Duration::from_secs(1) {
            rescan = tokio::time::Instant::now();
            for (dir, _, _) in matching(shared, q) {
                offsets.entry(dir.join(shim::LOG)).or_default();
            }
        }
        let tasks: HashMap<PathBuf, (String, String)> = matching(shared, q)
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
