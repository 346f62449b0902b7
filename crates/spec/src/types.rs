//! The validated, storage/wire model of a stack.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::routing::*;

/// A validated stack: a name and its services, keyed by service name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
pub struct Stack {
    pub name: String,
    pub services: BTreeMap<String, Service>,
}

/// A validated service definition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
pub struct Service {
    pub command: Option<Command>,
    pub image: Option<String>,
    /// Build `image` from a directory (through the Docker Engine), push it to dozen's
    /// registry and run what was pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
    /// Directory path as written in the file (relative to the stack file's directory).
    pub artifact: Option<String>,
    pub process_type: String,
    /// `None` = not set in the file.
    pub replicas: Option<u32>,
    pub env: BTreeMap<String, String>,
    /// Allocate `$PORT` for the task.
    pub port: bool,
    pub health: Option<HealthCheck>,
    pub routes: Vec<Route>,
    /// How its targets share the requests its routes send it.
    #[serde(default, skip_serializing_if = "is_default_balance")]
    pub balance: Balance,
    pub resources: Resources,
    /// Normalised signal name, e.g. `"SIGTERM"`.
    pub stop_signal: String,
    pub stop_timeout_ms: u64,
    pub user: Option<String>,
    pub on_disconnect: OnDisconnect,
    /// How long a task leaving service stays out of routing, with its in-flight requests
    /// finishing, before it is sent the stop signal.
    #[serde(default = "default_deregistration_delay")]
    pub deregistration_delay_ms: u64,
    /// Services this one calls: each becomes `<NAME>_URL`, through the proxy.
    #[serde(default)]
    pub uses: Vec<String>,
    /// Storage a container keeps across its replacements (image services only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Only this node may run its tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only nodes with all these labels may run its tasks.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,
    /// Name (the variable or file it becomes) → parameter reference (`/a/b`, `/a/b@label`,
    /// `/a/b:3`), pinned to a version when a release is made.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub secrets_as: SecretsAs,
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_change: OnChange,
    /// What its tasks' identity may read or write in the parameter store besides its own
    /// secrets (`read:/shop/prod/orders/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<String>,
}

/// How a service's secrets reach its tasks.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SecretsAs {
    /// Files named after each secret in `$DOZEN_SECRETS_DIR`, on a memory file system,
    /// readable by the task's user alone (`/run/secrets` in a container).
    #[default]
    File,
    /// Environment variables.
    Env,
}

/// What a new version of a parameter the service reads does.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnChange {
    /// Tasks keep the versions their release pinned until the next apply.
    #[default]
    Keep,
    /// A new release (and deploy) with the new versions.
    Redeploy,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// Where an image is built from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
pub struct Build {
    /// The directory sent to the engine, relative to the stack file.
    pub context: String,
    /// The Dockerfile, relative to the context.
    pub dockerfile: String,
}

/// A volume of a container: a named volume of the node's engine (kept per stack) or a host
/// directory, at `target` in the container.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
pub struct Volume {
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

impl Volume {
    /// A host directory (an absolute path), not a named volume.
    pub fn is_host_path(&self) -> bool {
        self.source.starts_with('/')
    }
}

/// The driver that runs host commands (under a shim).
pub const PROCESS_DRIVER: &str = "process";
/// The driver that runs container images.
pub const DOCKER_DRIVER: &str = "docker";

impl Service {
    /// The driver a task of this service needs: `docker` for an image, `process` for a host
    /// command. The scheduler places a task only on a node that reports this driver.
    pub fn driver(&self) -> &'static str {
        if self.image.is_some() {
            DOCKER_DRIVER
        } else {
            PROCESS_DRIVER
        }
    }
}

fn is_default_balance(b: &Balance) -> bool {
    *b == Balance::default()
}

fn default_deregistration_delay() -> u64 {
    DEFAULT_DEREGISTRATION_DELAY_MS
}

impl Default for Service {
    fn default() -> Self {
        Service {
            command: None,
            image: None,
            build: None,
            artifact: None,
            process_type: DEFAULT_PROCESS_TYPE.to_string(),
            replicas: None,
            env: BTreeMap::new(),
            port: true,
            health: None,
            routes: Vec::new(),
            balance: Balance::default(),
            resources: Resources::default(),
            stop_signal: DEFAULT_STOP_SIGNAL.to_string(),
            stop_timeout_ms: DEFAULT_STOP_TIMEOUT_MS,
            user: None,
            on_disconnect: OnDisconnect::Keep,
            deregistration_delay_ms: DEFAULT_DEREGISTRATION_DELAY_MS,
            uses: Vec::new(),
            volumes: Vec::new(),
            node: None,
            node_labels: BTreeMap::new(),
            secrets: BTreeMap::new(),
            secrets_as: SecretsAs::File,
            on_change: OnChange::Keep,
            access: Vec::new(),
        }
    }
}

pub const DEFAULT_PROCESS_TYPE: &str = "web";
pub const DEFAULT_STOP_SIGNAL: &str = "SIGTERM";
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_CPU_MILLIS: u32 = 100;
pub const DEFAULT_MEMORY_BYTES: u64 = 128 * 1024 * 1024;
pub const DEFAULT_PIDS: u32 = 4096;
pub const DEFAULT_LOG_BYTES: u64 = 100 * 1024 * 1024;
/// A task's logs are two files of half the cap each, and a line is cut at 64 KiB.
pub const MIN_LOG_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 5_000;
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 2_000;
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 1;
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
pub const MAX_REPLICAS: u32 = 1000;
pub const DEFAULT_DEREGISTRATION_DELAY_MS: u64 = 1_000;

/// How a service's process is started.
///
/// Serialised untagged: a string is `Shell`, an array is `Exec`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Command {
    /// Run through `/bin/sh -c`.
    Shell(String),
    /// Exec the argv directly.
    Exec(Vec<String>),
}

impl Command {
    /// The argv to execute: `Shell(s)` -> `["/bin/sh", "-c", s]`, `Exec(v)` -> `v`.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Shell(s) => vec!["/bin/sh".to_string(), "-c".to_string(), s.clone()],
            Command::Exec(v) => v.clone(),
        }
    }
}

/// A health check.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
pub struct HealthCheck {
    pub kind: HealthKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub grace_period_ms: u64,
}

/// What a health check probes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HealthKind {
    Http { path: String },
    Tcp,
    Command { argv: Vec<String> },
}

/// Resource reservation of one task.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema,
)]
pub struct Resources {
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    /// Most processes and threads the task may have at once (its cgroup's `pids.max`): a
    /// fork bomb in one task cannot take the node's process table.
    #[serde(default = "default_pids")]
    pub pids: u32,
    /// Disk the task's output may take; the oldest half goes first.
    #[serde(default = "default_log_bytes")]
    pub log_bytes: u64,
}

fn default_pids() -> u32 {
    DEFAULT_PIDS
}

fn default_log_bytes() -> u64 {
    DEFAULT_LOG_BYTES
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_millis: DEFAULT_CPU_MILLIS,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            pids: DEFAULT_PIDS,
            log_bytes: DEFAULT_LOG_BYTES,
        }
    }
}

/// What to do with a service's tasks when their node disconnects.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema, utoipa::ToSchema,
)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum OnDisconnect {
    #[default]
    Keep,
    StopAfter {
        after_ms: u64,
    },
}

/// Input format of a stack file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Yaml,
}

impl Format {
    /// `.yaml` / `.yml` -> Yaml, anything else -> Toml.
    pub fn from_path(path: &std::path::Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml") => {
                Format::Yaml
            }
            _ => Format::Toml,
        }
    }
}
