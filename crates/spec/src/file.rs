//! The FILE format (what users write), as serde/schemars types.
//!
//! These types document the format and produce [`crate::json_schema`]. Parsing itself goes
//! through a position-keeping document tree (see the crate docs) so that every error can be
//! reported with its file, line and column; the test suite checks that both agree (every
//! valid example document deserialises into [`StackFile`], and the allowed key lists match).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A stack file: a named set of services, plus optional environment overlays.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "dozen stack file")]
pub struct StackFile {
    /// Stack name: lowercase letters, digits and '-', at most 63 characters.
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub name: String,
    /// Services keyed by name (same syntax as the stack name). At least one is required.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceFile>,
    /// Environment overlays: `[env.prod]` content is deep-merged over the document when the
    /// stack is loaded with environment `prod` (tables merge, other values replace). A sibling
    /// file `<stem>.prod.<ext>` is merged after it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, OverlayFile>,
}

/// An environment overlay: a partial stack document.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OverlayFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, ServiceFile>,
}

/// One service. Exactly one of `command` or `image` is required (in the merged document).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// Process to run: a string runs via `/bin/sh -c`, an array is exec'd directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandFile>,
    /// Container image reference `[host[:port]/]name[:tag][@sha256:<hex>]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Directory to ship with the service, relative to the stack file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    /// Process type (default "web").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_type: Option<String>,
    /// Desired number of tasks (0..=1000). Unset: keep the current count (1 on creation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<u32>,
    /// Environment variables. Numbers and booleans are turned into strings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValueFile>,
    /// Allocate a port and pass it as $PORT (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesFile>,
    /// Signal sent to stop a task: HUP, INT, QUIT, KILL, USR1, USR2 or TERM, with or
    /// without the SIG prefix (default SIGTERM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Time between the stop signal and SIGKILL (default "10s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(0|(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$"))]
    pub stop_timeout: Option<String>,
    /// User to run as: name, uid or uid:gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// What to do with tasks on a disconnected node: "keep" (default) or
    /// `{ stop_after = "30s" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_disconnect: Option<OnDisconnectFile>,
    /// Shorthand for `on_disconnect = { stop_after = ... }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(0|(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$"))]
    pub stop_after: Option<String>,
    /// How long a task leaving service is kept out of routing, finishing in-flight requests,
    /// before its stop signal (default "1s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(0|(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$"))]
    pub deregistration_delay: Option<String>,
    /// Services this one calls; each is passed as `<NAME>_URL` pointing through the proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uses: Vec<String>,
    /// Image services: storage kept across replacements, `SOURCE:TARGET[:ro]` with a volume
    /// name or an absolute host path, e.g. `["data:/var/lib/data", "/srv/up:/up:ro"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Only this node runs the service's tasks (a database beside its data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only nodes whose agents have all these labels (`dozen agent --label disk=ssd`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,
    /// Build `image` (a name in dozen's registry) from a directory through the Docker Engine
    /// at `apply` (or `dozen build`), push it, and run what was pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildFile>,
}

/// Where an image is built from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildFile {
    /// The directory sent to the engine, relative to the stack file.
    pub context: String,
    /// The Dockerfile, relative to the context (default "Dockerfile").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
}

/// A command line.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(untagged)]
pub enum CommandFile {
    /// Run through `/bin/sh -c`.
    Shell(String),
    /// Program and arguments.
    Exec(Vec<String>),
}

/// An environment variable value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(untagged)]
pub enum EnvValueFile {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

/// A health check: exactly one of `http`, `tcp` or `command`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// HTTP GET path on $PORT (must start with '/'); 2xx/3xx is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// TCP connect to $PORT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<bool>,
    /// Command whose exit status 0 is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandFile>,
    /// Default "5s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Default "2s", or half the `interval` when that is 2 s or less; must be shorter than
    /// `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub healthy_threshold: Option<u32>,
    /// Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub unhealthy_threshold: Option<u32>,
    /// Default "0s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<String>,
}

/// An HTTP route. (host, path) pairs must be unique in the stack.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// Lowercase host name (any host when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix, starting with '/' (default "/").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Only reachable from inside the cluster (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal: Option<bool>,
}

/// Resources reserved per task.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourcesFile {
    /// Cores (0.5) or millicores ("500m"). Default 0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuFile>,
    /// Bytes, or a size like "256MiB", "1GiB", "512M", "100k". Default "128MiB".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryFile>,
    /// Most processes and threads the task may run at once. Default 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub pids: Option<u32>,
    /// Disk the task's output may take, a size like "20MiB" (at least "1MiB"); past it the
    /// oldest half is dropped. Default "100MiB".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<MemoryFile>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(untagged)]
pub enum CpuFile {
    Cores(f64),
    Text(String),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(untagged)]
pub enum MemoryFile {
    Bytes(u64),
    Text(String),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(untagged)]
pub enum OnDisconnectFile {
    /// Keep the tasks running.
    Mode(KeepMode),
    /// Stop the tasks after the node has been disconnected this long.
    StopAfter(StopAfterFile),
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeepMode {
    Keep,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopAfterFile {
    pub stop_after: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{
        HEALTH_KEYS, ON_DISCONNECT_KEYS, OVERLAY_KEYS, RESOURCES_KEYS, ROUTE_KEYS, SERVICE_KEYS,
        TOP_KEYS,
    };

    fn props(schema: &serde_json::Value, def: Option<&str>) -> Vec<String> {
        let obj = match def {
            Some(d) => &schema["definitions"][d]["properties"],
            None => &schema["properties"],
        };
        let mut keys: Vec<String> = obj
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    fn sorted(k: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = k.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn schema_and_validator_allow_the_same_keys() {
        let s = crate::json_schema();
        assert_eq!(props(&s, None), sorted(TOP_KEYS));
        assert_eq!(props(&s, Some("OverlayFile")), sorted(OVERLAY_KEYS));
        assert_eq!(props(&s, Some("ServiceFile")), sorted(SERVICE_KEYS));
        assert_eq!(props(&s, Some("HealthFile")), sorted(HEALTH_KEYS));
        assert_eq!(props(&s, Some("RouteFile")), sorted(ROUTE_KEYS));
        assert_eq!(props(&s, Some("ResourcesFile")), sorted(RESOURCES_KEYS));
        assert_eq!(props(&s, Some("StopAfterFile")), sorted(ON_DISCONNECT_KEYS));
    }

    #[test]
    fn valid_documents_fit_the_file_types() {
        let docs = [r#"name = "demo"
[services.web]
command = "./web --flag"
artifact = "./web-dist"
process_type = "web"
replicas = 2
port = true
stop_signal = "SIGTERM"
stop_timeout = "10s"
user = "nobody"
on_disconnect = "keep"
[services.web.env]
LOG_LEVEL = "info"
N = 3
F = 1.5
B = true
[services.web.health]
http = "/healthz"
interval = "5s"
timeout = "2s"
healthy_threshold = 1
unhealthy_threshold = 3
grace_period = "10s"
[services.web.resources]
cpu = 0.5
memory = "256MiB"
[[services.web.routes]]
host = "shop.local"
path = "/"
internal = false
[services.worker]
image = "ghcr.io/a/b:1"
on_disconnect = { stop_after = "30s" }
resources = { cpu = "500m", memory = 1024, pids = 64, logs = "20MiB" }
health = { command = ["./check"] }
[services.cron]
command = ["./cron"]
stop_after = "1m"
health = { tcp = true }
[env.prod.services.web]
replicas = 6
"#];
        for doc in docs {
            assert!(crate::parse_str(doc, "f", crate::Format::Toml, Some("prod")).is_ok());
            let node = crate::node::parse_toml(doc, 0).ok().unwrap();
            let json = node.to_json();
            let parsed: StackFile = serde_json::from_value(json).unwrap();
            assert_eq!(parsed.services.len(), 3);
        }
    }
}
