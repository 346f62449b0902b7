//! Records kept in the store, the keyspace they live under, and their encoding.
//!
//! Every record carries a `schema` number. Decoding refuses a record newer than this build
//! understands (so an old binary never rewrites what it cannot read) and migrates older ones.
//! Each record has exactly one writer: controllers write assignments, agents write task status.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use dozen_spec::Service as ServiceSpec;

mod event;
pub use event::{Event, EventKind};

/// The schema version this build writes.
pub const SCHEMA: u32 = 1;

/// How long a certificate the cluster CA issues (to a server or a node) is valid, in days.
/// Records of a node certificate (and of its revocation) are forgotten once it has expired.
pub const CERT_VALIDITY_DAYS: u32 = 365;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("record at {key} is not valid JSON for {kind}: {source}")]
    Decode {
        key: String,
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("record at {key} has schema {found}, newer than this build understands ({SCHEMA}); upgrade dozen")]
    TooNew { key: String, found: u32 },
}

/// A record type stored under one kind of key.
pub trait Record: Serialize + DeserializeOwned {
    const KIND: &'static str;
    fn schema(&self) -> u32;
}

pub fn encode<T: Record>(record: &T) -> Vec<u8> {
    // Serialising plain data structs to JSON cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

pub fn decode<T: Record>(key: &str, bytes: &[u8]) -> Result<T, ModelError> {
    #[derive(Deserialize, utoipa::ToSchema)]
    struct Header {
        #[serde(default)]
        schema: u32,
    }
    let header: Header = serde_json::from_slice(bytes).map_err(|source| ModelError::Decode {
        key: key.to_string(),
        kind: T::KIND,
        source,
    })?;
    if header.schema > SCHEMA {
        return Err(ModelError::TooNew {
            key: key.to_string(),
            found: header.schema,
        });
    }
    // Schema 1 is the first: there is nothing to migrate yet. A later schema adds its
    // migration here, from the raw JSON value, before the typed decode.
    serde_json::from_slice(bytes).map_err(|source| ModelError::Decode {
        key: key.to_string(),
        kind: T::KIND,
        source,
    })
}

/// The keyspace. Everything dozen stores lives under [`keys::ROOT`].
pub mod keys {
    pub const ROOT: &str = "/dozen/v1/";
    /// Events live beside the records, not under [`ROOT`]: controllers neither read nor wait
    /// on them.
    pub const EVENTS: &str = "/dozen/events/v1/";

    /// `<subject>/`: a service's events, or `_nodes`, `_cluster`.
    pub fn events(subject: &str) -> String {
        format!("{EVENTS}{subject}/")
    }

    /// One event: ordered by time within its subject; `id` keeps same-millisecond events apart.
    pub fn event(subject: &str, at_ms: u64, id: &str) -> String {
        format!("{EVENTS}{subject}/{at_ms:013}-{id}")
    }

    pub fn stacks() -> String {
        format!("{ROOT}stacks/")
    }
    pub fn stack(name: &str) -> String {
        format!("{ROOT}stacks/{name}")
    }
    pub fn services() -> String {
        format!("{ROOT}services/")
    }
    pub fn service(name: &str) -> String {
        format!("{ROOT}services/{name}")
    }
    /// The live desired count: its own record, written by apply, scale and (later) the autoscaler.
    pub fn scales() -> String {
        format!("{ROOT}scale/")
    }
    pub fn scale(service: &str) -> String {
        format!("{ROOT}scale/{service}")
    }
    pub fn releases(service: &str) -> String {
        format!("{ROOT}releases/{service}/")
    }
    pub fn all_releases() -> String {
        format!("{ROOT}releases/")
    }
    /// Zero-padded so that a range read returns releases in order.
    pub fn release(service: &str, number: u64) -> String {
        format!("{ROOT}releases/{service}/{number:010}")
    }
    pub fn nodes() -> String {
        format!("{ROOT}nodes/")
    }
    /// The node as it registered last. Not leased: a node whose lease lapsed is `down`, not
    /// gone, and its tasks stay assigned to it.
    pub fn node(node: &str) -> String {
        format!("{ROOT}nodes/{node}/node")
    }
    /// Leased: present while the node's heartbeats arrive.
    pub fn node_alive(node: &str) -> String {
        format!("{ROOT}nodes/{node}/alive")
    }
    /// An agent watches exactly this prefix.
    pub fn assignments(node: &str) -> String {
        format!("{ROOT}nodes/{node}/assignments/")
    }
    pub fn assignment(node: &str, task: &str) -> String {
        format!("{ROOT}nodes/{node}/assignments/{task}")
    }
    pub fn statuses(node: &str) -> String {
        format!("{ROOT}nodes/{node}/status/")
    }
    pub fn status(node: &str, task: &str) -> String {
        format!("{ROOT}nodes/{node}/status/{task}")
    }
    pub fn proxies() -> String {
        format!("{ROOT}proxies/")
    }
    pub fn proxy(id: &str) -> String {
        format!("{ROOT}proxies/{id}")
    }
    /// One-time join tokens: the value is the SHA-256 of the secret; a lease ends them.
    pub fn join_token(id: &str) -> String {
        format!("{ROOT}pki/join/{id}")
    }
    /// Certificates issued to a node, one key per serial.
    pub fn node_certs(node: &str) -> String {
        format!("{ROOT}pki/certs/{node}/")
    }
    pub fn node_cert(node: &str, serial: &str) -> String {
        format!("{ROOT}pki/certs/{node}/{serial}")
    }
    /// API servers, leased: how the others reach each one (a server fetches from its peers a
    /// blob a client uploaded elsewhere).
    pub fn servers() -> String {
        format!("{ROOT}servers/")
    }
    pub fn server(id: &str) -> String {
        format!("{ROOT}servers/{id}")
    }
    /// A revoked certificate serial; the value names the node it was issued to.
    pub fn revoked(serial: &str) -> String {
        format!("{ROOT}pki/revoked/{serial}")
    }
    /// Controller bookkeeping the controllers alone write (e.g. the task id counter).
    pub fn controller(name: &str) -> String {
        format!("{ROOT}controller/{name}")
    }

    /// Splits a key under `nodes/` into (node, kind, rest).
    pub fn parse_node_key(key: &str) -> Option<(&str, &str, &str)> {
        let rest = key.strip_prefix(ROOT)?.strip_prefix("nodes/")?;
        let (node, rest) = rest.split_once('/')?;
        match rest.split_once('/') {
            Some((kind, item)) => Some((node, kind, item)),
            None => Some((node, rest, "")),
        }
    }
}

#[macro_export]
#[doc(hidden)]
macro_rules! record {
    ($ty:ty, $kind:literal) => {
        impl $crate::Record for $ty {
            const KIND: &'static str = $kind;
            fn schema(&self) -> u32 {
                self.schema
            }
        }
    };
}

pub mod params;

/// `2026-12-04T17:08:00.123Z` for a wall time in milliseconds.
pub fn utc_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        (rest / 60) % 60,
        rest % 60,
        ms % 1000
    )
}

pub mod registry;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct StackRecord {
    pub schema: u32,
    pub name: String,
    pub services: Vec<String>,
    pub updated_at_ms: u64,
}
record!(StackRecord, "stack");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ServiceRecord {
    pub schema: u32,
    pub name: String,
    pub stack: String,
    /// The release new tasks run. Apply and rollback move it.
    pub current_release: u64,
    pub latest_release: u64,
    /// Bumped by `dozen restart`: tasks started under an older one are replaced.
    pub restart_generation: u64,
    /// Set by `dozen stop`: no task runs, the desired count is kept.
    #[serde(default)]
    pub stopped: bool,
    pub updated_at_ms: u64,
}
record!(ServiceRecord, "service");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ScaleRecord {
    pub schema: u32,
    pub replicas: u32,
    /// Who set it last: "apply", "scale", later "autoscaler".
    pub set_by: String,
}
record!(ScaleRecord, "scale");

/// An immutable, numbered release: everything a task needs, resolved at creation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Release {
    pub schema: u32,
    pub service: String,
    pub stack: String,
    pub number: u64,
    pub spec: ServiceSpec,
    /// Content address of the artifact bundle in the blob store, when the service has one.
    pub artifact_digest: Option<String>,
    /// The image of the built-in registry it runs, pinned by digest when the release was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pin: Option<registry::ImagePin>,
    /// False for a plain host command: what it runs can change under the release.
    pub reproducible: bool,
    /// Each of `spec.secrets` pinned to the version it named when the release was made, so a
    /// rollback restores the old configuration too.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, params::PinnedSecret>,
    pub created_at_ms: u64,
    /// Why it exists: "apply", "rollback to 3".
    pub cause: String,
}
record!(Release, "release");

impl Release {
    /// Whether a task of `other` runs exactly as one of this release would: they differ at
    /// most in how requests reach the service (its routes and target group), which the
    /// proxies apply live. Such a change replaces no task.
    pub fn runs_like(&self, other: &Release) -> bool {
        let running = |r: &Release| {
            let mut spec = r.spec.clone();
            spec.routes.clear();
            spec.balance = Default::default();
            (
                spec,
                r.artifact_digest.clone(),
                r.image_pin.clone(),
                r.secrets.clone(),
            )
        };
        self.service == other.service && running(self) == running(other)
    }
}

/// A release an `apply` created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ReleaseChange {
    pub service: String,
    pub release: u64,
}

/// What an `apply` did: not a stored record, the answer the API returns as the control plane
/// gave it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApplyOutcome {
    pub plan: dozen_spec::Plan,
    /// Releases this apply created.
    pub releases: Vec<ReleaseChange>,
    pub revision: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct NodeResources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct NodeRecord {
    pub schema: u32,
    pub name: String,
    /// Where the agent serves logs, e.g. http://127.0.0.1:41234
    pub address: String,
    /// The address other nodes' proxies reach this node's tasks at.
    #[serde(default = "loopback")]
    pub host: String,
    pub resources: NodeResources,
    pub labels: BTreeMap<String, String>,
    pub drivers: Vec<String>,
    /// Changes every time the agent process starts; status records name the one that wrote them.
    pub agent_instance: String,
    pub registered_at_ms: u64,
    /// The API server the node registered through (set by that server, whatever the node
    /// sent). An agent at a loopback address is reachable from that server's host alone.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub registered_via: String,
}
record!(NodeRecord, "node");

fn loopback() -> String {
    "127.0.0.1".into()
}

/// A proxy instance, leased: it exists while the proxy heartbeats.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ProxyRecord {
    pub schema: u32,
    pub id: String,
    /// The route table revision this proxy serves.
    pub applied_revision: u64,
    pub public_address: String,
    pub internal_address: String,
}
record!(ProxyRecord, "proxy");

/// An API server, leased: it exists while the server runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ServerRecord {
    pub schema: u32,
    pub id: String,
    /// Where the other servers reach its API (`https://` in a cluster).
    pub url: String,
}
record!(ServerRecord, "server");

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    Run,
    /// Leaving service: out of routing, still running while in-flight requests finish.
    Drain,
    Stop,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum TaskKind {
    /// A replica of the service, kept running.
    Service,
    /// `dozen run`: runs once with this command on the service's release; never restarted.
    OneOff { argv: Vec<String> },
}

/// Written by controllers only. Keyed under its node so an agent watches one prefix.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Assignment {
    pub schema: u32,
    pub task: String,
    pub service: String,
    pub stack: String,
    pub node: String,
    pub release: u64,
    /// Bumped on every restart of the task; an agent acts only on the newest it has seen.
    pub generation: u64,
    pub desired: DesiredState,
    pub kind: TaskKind,
    /// The agent waits this long before starting this generation (crash backoff).
    pub start_delay_ms: u64,
    /// Consecutive crash restarts; reset once a run lasts long enough.
    pub restarts: u32,
    /// The service's restart generation when this task was made.
    pub restart_generation: u64,
    pub spec: ServiceSpec,
    pub artifact_digest: Option<String>,
    /// The image of the built-in registry it runs, pinned by digest when the release was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pin: Option<registry::ImagePin>,
    /// Its release's secrets, pinned to versions (the agent fetches exactly these).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, params::PinnedSecret>,
    pub created_at_ms: u64,
    /// Wall time the task was taken out of routing (set with `desired = Drain`).
    #[serde(default)]
    pub drain_since_ms: Option<u64>,
}
record!(Assignment, "assignment");

#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Accepted by the agent, waiting for its start delay.
    Pending,
    /// Process started, not yet healthy.
    Starting,
    Running,
    /// Stop signal sent.
    Stopping,
    /// Ended on its own (crash or one-off finished).
    Exited,
    /// Ended because it was told to stop.
    Stopped,
    /// Could not be started at all (bad command, port, user).
    Failed,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Exited | TaskState::Stopped | TaskState::Failed
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Stopping => "stopping",
            TaskState::Exited => "exited",
            TaskState::Stopped => "stopped",
            TaskState::Failed => "failed",
        }
    }
}

/// Written by the agent only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct TaskStatus {
    pub schema: u32,
    pub task: String,
    pub node: String,
    /// The assignment generation this status describes.
    pub generation: u64,
    pub state: TaskState,
    pub healthy: bool,
    pub pid: Option<u32>,
    pub host_port: Option<u16>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub message: Option<String>,
    /// The agent process that wrote this status (see [`NodeRecord::agent_instance`]).
    pub agent_instance: String,
    /// True when this agent found the task already running and re-attached to its shim.
    pub adopted: bool,
    /// When a task that was healthy failed its checks (wall ms): it is out of routing but
    /// still running, until a replacement is healthy or it recovers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_since_ms: Option<u64>,
    /// Lines of the task's output its node could not write (a full disk): dropped, never
    /// blocking the task.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub log_lines_dropped: u64,
}
record!(TaskStatus, "task status");

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One routing rule as proxies serve it, computed from the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct RouteEntry {
    /// The service whose stack declares the rule (its target group unless the rule forwards
    /// by weight).
    pub service: String,
    /// The stack the service belongs to.
    #[serde(default)]
    pub stack: String,
    pub rule: dozen_spec::Route,
    /// Remove the rule's path before forwarding (the implicit `/_/<service>` routes).
    pub strip_prefix: bool,
}

impl RouteEntry {
    /// The target groups the rule forwards to and their weights (none for a redirect or a
    /// fixed response).
    pub fn groups(&self) -> Vec<(&str, u32)> {
        match &self.rule.action {
            dozen_spec::RouteAction::Forward { weights } if weights.is_empty() => {
                vec![(self.service.as_str(), 1)]
            }
            dozen_spec::RouteAction::Forward { weights } => weights
                .iter()
                .map(|w| (w.service.as_str(), w.weight))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// A service's targets and how they share its requests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct TargetGroup {
    /// The service.
    pub name: String,
    pub balance: dozen_spec::Balance,
    pub targets: Vec<Target>,
}

#[derive(
    Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, utoipa::ToSchema,
)]
pub struct Target {
    pub task: String,
    /// host:port
    pub addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct RouteTable {
    /// Store revision the table was computed at; a proxy reports it once applied.
    pub revision: u64,
    pub routes: Vec<RouteEntry>,
    #[serde(default)]
    pub groups: Vec<TargetGroup>,
}

/// The prefix under which every service with a port is reachable on the internal listener.
pub fn discovery_prefix(service: &str) -> String {
    format!("/_/{service}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_read_as_calendar_dates() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_time(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc_time(1_796_400_480_007), "2026-12-04T16:08:00.007Z");
    }

    #[test]
    fn node_keys_parse_back() {
        assert_eq!(
            keys::parse_node_key(&keys::assignment("n1", "web-1")),
            Some(("n1", "assignments", "web-1"))
        );
        assert_eq!(
            keys::parse_node_key(&keys::node("n1")),
            Some(("n1", "node", ""))
        );
        assert_eq!(keys::parse_node_key("/dozen/v1/services/x"), None);
    }

    #[test]
    fn releases_sort_numerically_as_keys() {
        assert!(keys::release("web", 9) < keys::release("web", 10));
    }

    #[test]
    fn newer_schema_is_refused_with_the_key() {
        let bytes = br#"{"schema":99,"replicas":1,"set_by":"x"}"#;
        let err = decode::<ScaleRecord>("/dozen/v1/scale/web", bytes).unwrap_err();
        assert!(err.to_string().contains("/dozen/v1/scale/web"));
        assert!(err.to_string().contains("99"));
    }

    #[test]
    fn records_round_trip() {
        let rec = ScaleRecord {
            schema: SCHEMA,
            replicas: 3,
            set_by: "scale".into(),
        };
        let back: ScaleRecord = decode("k", &encode(&rec)).unwrap();
        assert_eq!(back, rec);
    }
}
