//! Logs stay on the node that produced them: the server asks every agent and merges.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::Response;
use bytes::Bytes;
use dozen_api::agent::AgentClient;
use dozen_api::{LogLine, LogQuery};
use dozen_control::snapshot::Snapshot;
use dozen_control::ControlError;
use dozen_model::NodeRecord;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::error::ApiResult;
use crate::AppState;

/// Logs stay on the node that produced them: ask every agent and merge.
pub(crate) async fn logs(
    State(s): State<Arc<AppState>>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Response> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    if let Some(service) = &q.service {
        if !snap.services.contains_key(service)
            && !snap
                .assignments
                .values()
                .any(|a| &a.record.service == service)
        {
            return Err(ControlError::NotFound {
                kind: "service",
                name: service.clone(),
            }
            .into());
        }
    }
    // A down node's agent does not answer: asking it would only hold the answer up.
    let agents: Vec<NodeRecord> = snap
        .nodes
        .into_values()
        .map(|n| n.record)
        .filter(|n| snap.alive_nodes.contains(&n.name))
        .collect();
    if !q.follow {
        let mut all: Vec<LogLine> = Vec::new();
        for node in &agents {
            match fetch_agent_logs(&s, node, &q).await {
                Ok(lines) => all.extend(lines),
                Err(e) => {
                    tracing::warn!(node = %node.name, error = %e, "could not read logs from agent")
                }
            }
        }
        all.sort_by_key(|l| l.ts_ms);
        if let Some(tail) = q.tail {
            let skip = all.len().saturating_sub(tail);
            all.drain(..skip);
        }
        let mut body = Vec::new();
        for line in all {
            body.extend(serde_json::to_vec(&line).unwrap_or_default());
            body.push(b'\n');
        }
        return Ok(Response::builder()
            .header("content-type", "application/x-ndjson")
            .body(Body::from(body))
            .unwrap_or_default());
    }
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    for node in agents {
        let tx = tx.clone();
        let s = s.clone();
        let q = q.clone();
        tokio::spawn(async move {
            let resp = match agent(&s).logs(&node, &q, None).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::warn!(node = %node.name, error = %e, "cannot follow logs of agent");
                    return;
                }
            };
            let Ok(resp) = resp.error_for_status() else {
                return;
            };
            let mut stream = resp.bytes_stream();
            // Forward whole lines only, so lines from different agents never interleave.
            let mut pending: Vec<u8> = Vec::new();
            loop {
                tokio::select! {
                    chunk = stream.next() => match chunk {
                        Some(Ok(chunk)) => {
                            pending.extend_from_slice(&chunk);
                            if let Some(end) = pending.iter().rposition(|b| *b == b'\n') {
                                let lines: Vec<u8> = pending.drain(..=end).collect();
                                if tx.send(Bytes::from(lines)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        _ => return,
                    },
                    _ = tx.closed() => return,
                }
            }
        });
    }
    drop(tx);
    let stream = crate::watch::stream_from(rx).map(Ok::<_, Infallible>);
    Ok(Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}
pub(crate) async fn fetch_agent_logs(
    s: &AppState,
    node: &NodeRecord,
    q: &LogQuery,
) -> Result<Vec<LogLine>, String> {
    let body = agent(s)
        .logs(node, q, Some(Duration::from_secs(10)))
        .await?
        .error_for_status()
        .map_err(|e| e.to_string())?
        .bytes()
        .await
        .map_err(|e| e.to_string())?;
    Ok(body
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect())
}

/// How this server calls agents: with its certificate over TLS, or the token over plain HTTP.
fn agent(s: &AppState) -> AgentClient<'_> {
    AgentClient {
        http: &s.http,
        tls: s.agent_tls.as_ref(),
        token: &s.token,
    }
}
