//! Logs stay on the node that produced them: the server asks every agent and merges. An agent
//! that registered at a loopback address through another server is asked through that server.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::Response;
use bytes::Bytes;
use dozen_api::agent::AgentClient;
use dozen_api::paths;
use dozen_api::{LogLine, LogQuery};
use dozen_control::servers;
use dozen_control::snapshot::Snapshot;
use dozen_control::ControlError;
use dozen_model::NodeRecord;
use dozen_model::ServerRecord;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::error::ApiResult;
use crate::AppState;

/// Logs stay on the node that produced them: ask every agent and merge.
pub(crate) async fn logs(
    State(s): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
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
    let local_only = headers.contains_key(dozen_api::LOCAL_ONLY);
    // A tail is held whole before it is sent: it has a bound.
    let mut q = q;
    q.tail = q.tail.map(|n| n.min(dozen_api::MAX_LOG_TAIL));
    let sources = sources(&s, &snap, local_only).await;
    if !q.follow {
        // Merged oldest first as the agents' answers stream in: one line per agent waits
        // here, never a whole answer.
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        tokio::spawn(async move { merge(&s, &sources, &q, &tx).await });
        let stream = crate::watch::stream_from(rx).map(Ok::<_, Infallible>);
        return Ok(Response::builder()
            .header("content-type", "application/x-ndjson")
            .body(Body::from_stream(stream))
            .unwrap_or_default());
    }
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    for source in sources {
        let tx = tx.clone();
        let s = s.clone();
        let q = q.clone();
        tokio::spawn(async move {
            let resp = match open(&s, &source, &q, None).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::warn!(source = %source.name(), error = %e, "cannot follow logs");
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

/// Where a server gets log lines (and task stats) from.
pub(crate) enum Source {
    /// An agent this server may call itself.
    Agent(NodeRecord),
    /// Another API server, for the agents only it can reach: those that registered through it
    /// at a loopback address (a server's own agent). It answers from those alone.
    Peer(ServerRecord),
}

impl Source {
    pub(crate) fn name(&self) -> String {
        match self {
            Source::Agent(node) => format!("agent {}", node.name),
            Source::Peer(server) => format!("server {}", server.id),
        }
    }
}

/// The agents of every up node, each through the one server that may call it. A loopback
/// address means "on the host of the server it registered through": another server calling it
/// would reach whatever listens on that port of its own host, and hand it the token.
pub(crate) async fn sources(s: &AppState, snap: &Snapshot, local_only: bool) -> Vec<Source> {
    let mut sources = Vec::new();
    let mut via_peers = std::collections::BTreeSet::new();
    // A down node's agent does not answer: asking it would only hold the answer up.
    for node in snap
        .nodes
        .values()
        .map(|n| &n.record)
        .filter(|n| snap.alive_nodes.contains(&n.name))
    {
        let elsewhere = dozen_api::agent::reachable_only_through(node)
            .filter(|via| *via != s.server_id.as_str());
        match (elsewhere, local_only) {
            (None, false) => sources.push(Source::Agent(node.clone())),
            // A peer asks for what only this server reaches.
            (None, true) if dozen_api::agent::reachable_only_through(node).is_some() => {
                sources.push(Source::Agent(node.clone()))
            }
            (None, true) => {}
            (Some(via), false) => {
                via_peers.insert(via.to_string());
            }
            (Some(_), true) => {}
        }
    }
    if !via_peers.is_empty() {
        match servers::peers(s.store.as_ref(), &s.server_id).await {
            Ok(peers) => sources.extend(
                peers
                    .into_iter()
                    .filter(|p| via_peers.contains(&p.id))
                    .map(Source::Peer),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot list peers for their agents' logs"),
        }
    }
    sources
}

async fn open(
    s: &AppState,
    source: &Source,
    q: &LogQuery,
    timeout: Option<Duration>,
) -> Result<reqwest::Response, String> {
    match source {
        Source::Agent(node) => agent(s).logs(node, q, timeout).await,
        Source::Peer(peer) => {
            let url = format!("{}{}", peer.url.trim_end_matches('/'), paths::LOGS);
            let mut request = crate::peers::request(s, peer, &url)
                .ok_or_else(|| {
                    format!(
                        "server {} is not reachable the way this one speaks",
                        peer.id
                    )
                })?
                .query(q)
                .header(dozen_api::LOCAL_ONLY, "1");
            if let Some(timeout) = timeout {
                request = request.timeout(timeout);
            }
            request.send().await.map_err(|e| e.to_string())
        }
    }
}

/// How long an agent may take to start answering, and to send each next piece.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// Longest line an agent may send: a stored line is at most 64 KiB and its prefix.
const MAX_LINE: usize = 1024 * 1024;

/// One source's answer, read a line at a time.
struct Feed {
    name: String,
    body: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    pending: Vec<u8>,
    /// Where the unread part of `pending` starts.
    read: usize,
}

impl Feed {
    async fn next(&mut self) -> Option<LogLine> {
        loop {
            let unread = &self.pending[self.read..];
            if let Some(end) = unread.iter().position(|b| *b == b'\n') {
                let line = &unread[..end];
                self.read += end + 1;
                match serde_json::from_slice(line) {
                    Ok(parsed) => return Some(parsed),
                    Err(_) => continue,
                }
            }
            // Only the partial line is kept before reading more.
            self.pending.drain(..self.read);
            self.read = 0;
            if self.pending.len() > MAX_LINE {
                tracing::warn!(source = %self.name, "a log line over 1 MiB: its answer is cut there");
                return None;
            }
            match tokio::time::timeout(ANSWER_WAIT, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.pending.extend_from_slice(&chunk),
                Ok(None) => return None,
                Ok(Some(Err(e))) => {
                    tracing::warn!(source = %self.name, error = %e, "a log answer broke off");
                    return None;
                }
                Err(_) => {
                    tracing::warn!(source = %self.name, "a log answer stalled; the rest of it is left out");
                    return None;
                }
            }
        }
    }
}

/// Sends every source's lines, merged oldest first (each answer is in time order), or with a
/// tail only the last lines of them all.
async fn merge(s: &AppState, sources: &[Source], q: &LogQuery, tx: &mpsc::Sender<Bytes>) {
    let mut feeds = Vec::new();
    for source in sources {
        let answer = tokio::time::timeout(ANSWER_WAIT, open(s, source, q, None)).await;
        match answer.map(|r| r.and_then(|r| r.error_for_status().map_err(|e| e.to_string()))) {
            Ok(Ok(resp)) => feeds.push(Feed {
                name: source.name(),
                body: resp.bytes_stream().boxed(),
                pending: Vec::new(),
                read: 0,
            }),
            Ok(Err(e)) => {
                tracing::warn!(source = %source.name(), error = %e, "could not read logs")
            }
            Err(_) => tracing::warn!(source = %source.name(), "no answer for logs in time"),
        }
    }
    let mut heads = Vec::with_capacity(feeds.len());
    for feed in &mut feeds {
        heads.push(feed.next().await);
    }
    let mut out = dozen_api::ndjson::Lines::new(q.tail);
    loop {
        let oldest = heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|l: &LogLine| (l.ts_ms, i)))
            .min()
            .map(|(_, i)| i);
        let Some(i) = oldest else { break };
        let line = heads[i].take();
        heads[i] = feeds[i].next().await;
        let Some(line) = line else { continue };
        if let Some(chunk) = out.push(line) {
            if tx.send(chunk.into()).await.is_err() {
                return;
            }
        }
    }
    if let Some(rest) = out.finish() {
        let _ = tx.send(rest.into()).await;
    }
}

/// How this server calls agents: with its certificate over TLS, or the token over plain HTTP.
pub(crate) fn agent(s: &AppState) -> AgentClient<'_> {
    AgentClient {
        http: &s.http,
        tls: s.agent_tls.as_ref(),
        token: &s.token,
        server_id: &s.server_id,
    }
}
