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
    /// How the service's targets share the requests its routes send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<BalanceFile>,
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
    /// Values from the parameter store: `{ DB_PASSWORD = "/shop/prod/db/password@prod" }`
    /// (a name, `name@label` or `name:version`), pinned to versions when the release is made.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    /// "file" (default: files in $DOZEN_SECRETS_DIR on a memory file system, readable by the
    /// task's user alone) or "env" (environment variables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_as: Option<String>,
    /// "keep" (default) or "redeploy": a new version of a secret starts a new release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_change: Option<String>,
    /// What the tasks' identity may do in the parameter store besides reading its secrets:
    /// `["read:/shop/prod/orders/*", "write:/shop/prod/orders/cache"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<String>,
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

/// An HTTP routing rule: a request meeting every condition given gets the action (forward to
/// this service by default). Rules with a `priority` are tried first, lowest first; the others
/// most specific first. Two rules with the same conditions may not both exist.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// Lowercase host name, or `*.example.com` (any host when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// "http" or "https": how the request reached the proxy (any when unset); `scheme =
    /// "http"` with `redirect = { scheme = "https" }` sends plain requests to TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Path starting with '/' (default "/"), compared as `path_match` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// "prefix" (default: the path and below it, on a segment boundary), "exact", or "glob"
    /// (`*` any characters, `?` one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_match: Option<PathMatchFile>,
    /// HTTP methods, e.g. ["GET", "HEAD"].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<OneOrMany>,
    /// Headers that must be present with one of the values (case-insensitive, `*` and `?`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, OneOrMany>,
    /// Query parameters that must be present with one of the values (`*` and `?`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, OneOrMany>,
    /// Client address blocks, e.g. ["10.0.0.0/8"].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<OneOrMany>,
    /// 1 to 50000; lower is tried first. Unique in the stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 50000))]
    pub priority: Option<u32>,
    /// Only reachable from inside the cluster (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal: Option<bool>,
    /// Split requests between services of the stack by weight, e.g. `{ web = 90, web-next = 10 }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub forward: BTreeMap<String, u32>,
    /// Answer with a redirect instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectFile>,
    /// Answer with a fixed response instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respond: Option<RespondFile>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PathMatchFile {
    Prefix,
    Exact,
    Glob,
}

/// A string or a list of strings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Parts not given keep the request's; host, path and query may use `#{host}`, `#{path}`,
/// `#{port}` and `#{query}`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedirectFile {
    /// "http" or "https".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// 301 (default), 302, 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RespondFile {
    /// 200 to 599 (default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 200, max = 599))]
    pub status: Option<u16>,
    /// At most 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Default "text/plain; charset=utf-8".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// The service's target group settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BalanceFile {
    /// "round_robin" (default) or "least_outstanding".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// Ramp a new target's share up over this long, e.g. "30s" (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(0|(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$"))]
    pub slow_start: Option<String>,
    /// Keep a client on one target with a cookie: true, a duration ("1h"), or
    /// `{ cookie = "name", duration = "1h" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<serde_json::Value>,
    /// Eject a target after failures in a row: `{ errors = 5, ejection = "30s" }` (the
    /// default), or false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<serde_json::Value>,
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
        BALANCE_KEYS, HEALTH_KEYS, ON_DISCONNECT_KEYS, OVERLAY_KEYS, RESOURCES_KEYS, ROUTE_KEYS,
        SERVICE_KEYS, TOP_KEYS,
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
        assert_eq!(props(&s, Some("BalanceFile")), sorted(BALANCE_KEYS));
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
