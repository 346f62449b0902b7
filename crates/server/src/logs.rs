//! Logs stay on the node that produced them: the server asks every agent and merges.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::Response;
use bytes::Bytes;
use dozen_api::{paths, LogLine, LogQuery};
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
    let agents: Vec<NodeRecord> = snap.nodes.into_values().map(|n| n.record).collect();
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
            let resp = match agent_logs_request(&s, &node).await {
                Ok(request) => request.query(&q).send().await,
                Err(e) => {
                    tracing::warn!(node = %node.name, error = %e, "cannot follow logs of agent");
                    return;
                }
            };
            let Ok(resp) = resp.and_then(|r| r.error_for_status()) else {
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
    let body = agent_logs_request(s, node)
        .await?
        .query(q)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| e.to_string())?
        .bytes()
        .await
        .map_err(|e| e.to_string())?;
    Ok(body
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect())
}
/// A request to an agent's log endpoint. An `https://` agent is reached with this server's
/// certificate and must show the certificate of the node it registered as; it never gets the
/// token. A plain-HTTP agent gets the token, and only an operator can have registered one of
/// those (see `dozen_control::nodes::register`).
pub(crate) async fn agent_logs_request(
    s: &AppState,
    node: &NodeRecord,
) -> Result<reqwest::RequestBuilder, String> {
    let Some(authority) = node.address.strip_prefix("https://") else {
        return Ok(s
            .http
            .get(format!("{}{}", node.address, paths::AGENT_LOGS))
            .bearer_auth(&s.token));
    };
    let Some(tls) = &s.agent_tls else {
        return Err(format!(
            "agent address {} is https but this server has no CA (--ca-dir)",
            node.address
        ));
    };
    let authority = authority.trim_end_matches('/');
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
    {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    let addr = tokio::net::lookup_host(&with_port)
        .await
        .map_err(|e| format!("cannot resolve agent address {}: {e}", node.address))?
        .next()
        .ok_or_else(|| format!("agent address {} resolves to nothing", node.address))?;
    let name = dozen_api::tls::node_dns_name(&node.name);
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .connect_timeout(Duration::from_secs(3))
        .resolve(&name, addr)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(client.get(format!(
        "https://{name}:{}{}",
        addr.port(),
        paths::AGENT_LOGS
    )))
}
