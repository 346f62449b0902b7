//! The HTTP/JSON API as its callers see it: wire types, every route path, the typed client and
//! the TLS identity they present. The server lives in `dozen-server`; this crate links no
//! store, no controller and no web framework, so agents and proxies stay small.
//!
//! Everything outside the control plane (CLI, agents, proxies and later the console) talks to
//! it only through this API. Lists return items with the store revision; a watch from that revision
//! streams newline-delimited JSON events with periodic bookmarks; a compacted revision answers
//! 410 Gone and the client lists again.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use dozen_model::{DesiredState, NodeRecord, TaskKind, TaskState, TaskStatus};
use serde::{Deserialize, Serialize};

pub mod agent;
pub mod client;
pub mod lease;
pub mod ndjson;
pub mod params;
pub mod paths;
pub mod serving;
pub mod tls;

pub use client::{ApiError, Client};
pub use dozen_model::{ApplyOutcome, ReleaseChange};

/// Sent by a server asking a peer for a blob: answer from what you hold, do not ask your own
/// peers (else two servers that both lack a blob would ask each other forever).
pub const LOCAL_ONLY: &str = "x-dozen-local-only";

/// Header carrying the operator or node token.
pub const AUTHORIZATION: &str = "authorization";

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApplyRequest {
    pub stack: dozen_spec::Stack,
    /// service -> artifact bundle digest (already uploaded).
    #[serde(default)]
    pub artifacts: BTreeMap<String, String>,
    /// service -> manifest digest of the image just built and pushed for it (its `build`):
    /// the release pins exactly that, not whatever the tag names by then.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScaleRequest {
    pub replicas: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct RollbackRequest {
    pub to: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunRequest {
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceSummary {
    pub name: String,
    pub stack: String,
    pub process_type: String,
    pub current_release: u64,
    /// Earlier releases that run exactly as the current one (a change of routing only):
    /// their tasks are current.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs_like_current: Vec<u64>,
    pub latest_release: u64,
    pub desired: u32,
    pub running: u32,
    pub healthy: u32,
    pub stopped: bool,
    pub reproducible: bool,
    pub problems: Vec<String>,
}

/// `POST /v1/join-tokens` (operator).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinTokenRequest {
    /// How long the token may be used; default one hour, at most a day.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// The one node name the token joins (required).
    #[serde(default)]
    pub node: Option<String>,
    /// The addresses the node may register as its `host` (where proxies send its tasks'
    /// traffic). Empty: what the joining node names, else the address it joins from.
    #[serde(default)]
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinTokenResponse {
    /// `<id>.<secret>`: good for one `dozen node join`.
    pub token: String,
    pub ttl_ms: u64,
    /// `sha256:<hex>` of the cluster CA certificate, for the joining node to pin.
    pub ca_hash: String,
    /// The node name the token is for.
    #[serde(default)]
    pub node: String,
}

/// `POST /v1/join` (no token: the join token in the body is the credential).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinRequest {
    pub token: String,
    pub node: String,
    /// The node's certificate request (PEM); its key stays on the node.
    pub csr_pem: String,
    /// The addresses this node will register as its `host`, when the token names none.
    /// Empty: the address it joins from.
    #[serde(default)]
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinResponse {
    pub cert_pem: String,
    pub ca_pem: String,
    pub serial: String,
}

/// `POST /v1/nodes/{node}/revoke` (operator).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RevokeResponse {
    pub node: String,
    /// Serials of the certificates revoked now.
    pub serials: Vec<String>,
}

/// `GET /v1/cluster`: which server answered, and which one leads the controllers.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterInfo {
    /// Id of the server that answered.
    pub server: String,
    /// Id of the controller leader; none while an election is under way.
    pub leader: Option<String>,
    /// `embedded` or `etcd`.
    pub store: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskInfo {
    pub task: String,
    pub service: String,
    pub stack: String,
    pub node: String,
    pub release: u64,
    pub generation: u64,
    pub desired: DesiredState,
    pub oneoff: bool,
    pub restarts: u32,
    pub start_delay_ms: u64,
    pub status: Option<TaskStatus>,
}

impl TaskInfo {
    pub fn state(&self) -> Option<TaskState> {
        self.status
            .as_ref()
            .filter(|s| s.generation == self.generation)
            .map(|s| s.state)
    }
    pub fn from_records(a: &dozen_model::Assignment, status: Option<&TaskStatus>) -> Self {
        TaskInfo {
            task: a.task.clone(),
            service: a.service.clone(),
            stack: a.stack.clone(),
            node: a.node.clone(),
            release: a.release,
            generation: a.generation,
            desired: a.desired,
            oneoff: matches!(a.kind, TaskKind::OneOff { .. }),
            restarts: a.restarts,
            start_delay_ms: a.start_delay_ms,
            status: status.cloned(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeInfo {
    pub node: NodeRecord,
    pub tasks: u32,
    pub state: NodeState,
}

/// Whether a node's heartbeats arrive. A `down` node keeps its tasks assigned: they are
/// replaced where other nodes have room, and re-claimed (same processes) if it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Up,
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListResponse<T> {
    pub items: Vec<T>,
    pub revision: u64,
}

/// A proxy as `GET /v1/proxies` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ProxyInfo {
    #[serde(flatten)]
    pub record: dozen_model::ProxyRecord,
    /// Nothing that routes depend on changed since the table it applied (its own heartbeat
    /// and other writes that do not touch routes leave it current).
    pub current: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WatchEventType {
    Put,
    Delete,
    /// Nothing changed up to `revision`: resume from here after a reconnect.
    Bookmark,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WatchEvent<T> {
    #[serde(rename = "type")]
    pub kind: WatchEventType,
    pub revision: u64,
    #[serde(default)]
    pub key: String,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub object: Option<T>,
}

fn none<T>() -> Option<T> {
    None
}

/// Query of a list-then-watch route: without `watch`, a list with the store revision; with
/// it, newline-delimited events after `revision` (410 Gone when it is compacted: list again).
#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema, utoipa::IntoParams)]
pub struct WatchQuery {
    #[serde(default)]
    pub watch: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

/// Query of `GET /v1/tasks`: the tasks of one service, or all.
#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema, utoipa::IntoParams)]
pub struct TaskQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterRequest {
    pub node: NodeRecord,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterResponse {
    pub lease: u64,
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatRequest {
    pub lease: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusReport {
    pub statuses: Vec<TaskStatus>,
    /// What the agent saw happen to its tasks since its last report (at most 256); each is
    /// recorded as about this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<dozen_model::Event>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// Most lines a `tail` answer holds (a larger `tail` gets this many).
pub const MAX_LOG_TAIL: usize = 100_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct LogLine {
    pub ts_ms: u64,
    pub service: String,
    pub task: String,
    pub stream: LogStream,
    pub line: String,
}

/// Query of `GET /v1/stats` and the agents' `GET /v1/agent/stats`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema, utoipa::IntoParams)]
pub struct StatsQuery {
    /// Only this service's tasks.
    pub service: Option<String>,
}

/// What one task uses, as its node's agent read it through the task's driver.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq, utoipa::ToSchema)]
pub struct TaskUsage {
    pub task: String,
    pub service: String,
    pub node: String,
    pub driver: String,
    /// Memory the whole task uses now (its group or container).
    pub memory_bytes: Option<u64>,
    /// CPU time the task has used so far; two readings give its rate.
    pub cpu_nanos: Option<u64>,
    /// Resident memory of the task's main process.
    pub rss_kib: Option<u64>,
    /// What supervising it costs beside it (the process driver's shim).
    pub overhead_rss_kib: Option<u64>,
    /// When it was read (ms since the epoch).
    pub at_ms: u64,
}

/// `dozen exec`: a command to run inside a running task.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecRequest {
    /// Program and arguments (no shell unless the command names one).
    pub argv: Vec<String>,
    /// Give the command a terminal (in a container: the engine's TTY; its output then comes
    /// as one stream).
    #[serde(default)]
    pub tty: bool,
}

/// Most arguments, and most bytes of them together, an exec request may carry.
pub const MAX_EXEC_ARGS: usize = 1024;
pub const MAX_EXEC_ARG_BYTES: usize = 128 * 1024;

/// One line of an exec's answer (JSON lines): output as it comes, then how it ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExecOutput {
    /// Output (invalid UTF-8 replaced).
    Stdout {
        text: String,
    },
    Stderr {
        text: String,
    },
    /// The command ended: its exit code (None: killed by a signal, or unknown).
    Exit {
        code: Option<i32>,
    },
    /// The command could not run, or its output was cut off.
    Error {
        message: String,
    },
}

/// Query of `GET /v1/logs` and the agents' `GET /v1/agent/logs`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema, utoipa::IntoParams)]
pub struct LogQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<usize>,
    #[serde(default)]
    pub follow: bool,
}

/// Which events `GET /v1/events` answers with (`follow`: then the new ones as they come).
#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema, utoipa::IntoParams)]
pub struct EventQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    #[serde(default)]
    pub follow: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProxyRegisterRequest {
    pub public_address: String,
    pub internal_address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProxyHeartbeat {
    pub lease: u64,
    /// The route table revision the proxy serves now.
    pub applied_revision: u64,
}

/// `GET /v1/routes?after=R&wait_ms=T`: answers at once without `after`; with it, once the
/// routes may have changed after revision R (or after `wait_ms`, default 30 s).
#[derive(Debug, Clone, Serialize, Deserialize, Default, utoipa::ToSchema, utoipa::IntoParams)]
pub struct RouteQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// Compares in constant time, so a token cannot be guessed byte by byte. The one comparison
/// of secrets in dozen: the server's, the agent's and the join's.
pub fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The token of an `authorization: Bearer <token>` header value ("" when there is none).
pub fn bearer_token(header: Option<&[u8]>) -> &str {
    header
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}
