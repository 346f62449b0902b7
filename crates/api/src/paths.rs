//! Every route of the API, once: the server's router and the client build from these, and no
//! other crate writes an API path (CI checks it). A `{name}` segment is a parameter, in the
//! router's syntax; [`fill`] puts values in for the client.

pub const HEALTHZ: &str = "/healthz";
/// The built-in image registry (OCI Distribution): every path under it is the registry's.
pub const REGISTRY: &str = "/v2/";
/// The cluster CA certificate (no credential: it is public).
pub const CA: &str = "/v1/ca";
/// A node joins with a one-time token (the token in the body is the credential).
pub const JOIN: &str = "/v1/join";
pub const OPENAPI: &str = "/v1/openapi.json";

pub const PLAN: &str = "/v1/plan";
pub const APPLY: &str = "/v1/apply";
pub const STACKS: &str = "/v1/stacks";
pub const STACK: &str = "/v1/stacks/{stack}";
pub const SERVICES: &str = "/v1/services";
pub const SERVICE_RELEASES: &str = "/v1/services/{service}/releases";
pub const SERVICE_SCALE: &str = "/v1/services/{service}/scale";
pub const SERVICE_RESTART: &str = "/v1/services/{service}/restart";
pub const SERVICE_STOP: &str = "/v1/services/{service}/stop";
pub const SERVICE_ROLLBACK: &str = "/v1/services/{service}/rollback";
pub const SERVICE_RUN: &str = "/v1/services/{service}/run";
pub const TASKS: &str = "/v1/tasks";
pub const TASK: &str = "/v1/tasks/{task}";
pub const TASK_EXEC: &str = "/v1/tasks/{task}/exec";
/// A task's identity (a short-lived token), for its node's agent.
pub const TASK_TOKEN: &str = "/v1/tasks/{task}/token";
pub const LOGS: &str = "/v1/logs";
pub const STATS: &str = "/v1/stats";
pub const EVENTS: &str = "/v1/events";
pub const BLOB: &str = "/v1/blobs/{digest}";
pub const ROUTES: &str = "/v1/routes";
pub const PROXIES: &str = "/v1/proxies";
pub const PROXY_REGISTER: &str = "/v1/proxies/{id}/register";
pub const PROXY_HEARTBEAT: &str = "/v1/proxies/{id}/heartbeat";
pub const CLUSTER: &str = "/v1/cluster";
pub const NODES: &str = "/v1/nodes";
pub const NODE_REGISTER: &str = "/v1/nodes/{node}/register";
pub const NODE_HEARTBEAT: &str = "/v1/nodes/{node}/heartbeat";
pub const NODE_ASSIGNMENTS: &str = "/v1/nodes/{node}/assignments";
pub const NODE_STATUS: &str = "/v1/nodes/{node}/status";
pub const NODE_REVOKE: &str = "/v1/nodes/{node}/revoke";
pub const JOIN_TOKENS: &str = "/v1/join-tokens";
/// The parameter store: one parameter (`?name=`), a listing by path, history, labels.
pub const PARAM: &str = "/v1/param";
pub const PARAMS: &str = "/v1/params";
pub const PARAM_HISTORY: &str = "/v1/param/history";
pub const PARAM_LABELS: &str = "/v1/param/labels";
/// Key-encryption keys: list, rotate (or import), rewrap.
pub const KEYS: &str = "/v1/keys";
pub const KEYS_ROTATE: &str = "/v1/keys/rotate";
pub const KEYS_REWRAP: &str = "/v1/keys/rewrap";
/// Operator tokens with policies.
pub const TOKENS: &str = "/v1/tokens";
pub const TOKEN: &str = "/v1/tokens/{name}";
/// This server's audit trail, and the check of its hash chain.
pub const AUDIT: &str = "/v1/audit";
pub const AUDIT_VERIFY: &str = "/v1/audit/verify";

/// An agent's own API (served by each agent, called by servers): its tasks' logs.
pub const AGENT_LOGS: &str = "/v1/agent/logs";
/// A command run inside one of an agent's tasks (`dozen exec`).
pub const AGENT_EXEC: &str = "/v1/agent/tasks/{task}/exec";
/// What the agent's tasks use now (memory) and so far (CPU time).
pub const AGENT_STATS: &str = "/v1/agent/stats";

/// Every route the API server serves, with its methods: the OpenAPI document and the router
/// are both checked against this list.
pub const SERVER_ROUTES: &[(&str, &[&str])] = &[
    (HEALTHZ, &["get"]),
    (CA, &["get"]),
    (JOIN, &["post"]),
    (OPENAPI, &["get"]),
    (PLAN, &["post"]),
    (APPLY, &["post"]),
    (STACKS, &["get"]),
    (STACK, &["delete"]),
    (SERVICES, &["get"]),
    (SERVICE_RELEASES, &["get"]),
    (SERVICE_SCALE, &["post"]),
    (SERVICE_RESTART, &["post"]),
    (SERVICE_STOP, &["post"]),
    (SERVICE_ROLLBACK, &["post"]),
    (SERVICE_RUN, &["post"]),
    (TASKS, &["get"]),
    (TASK, &["get", "delete"]),
    (TASK_EXEC, &["post"]),
    (TASK_TOKEN, &["post"]),
    (LOGS, &["get"]),
    (STATS, &["get"]),
    (EVENTS, &["get"]),
    (BLOB, &["get", "head", "put"]),
    (ROUTES, &["get"]),
    (PROXIES, &["get"]),
    (PROXY_REGISTER, &["post"]),
    (PROXY_HEARTBEAT, &["post"]),
    (CLUSTER, &["get"]),
    (NODES, &["get"]),
    (NODE_REGISTER, &["post"]),
    (NODE_HEARTBEAT, &["post"]),
    (NODE_ASSIGNMENTS, &["get"]),
    (NODE_STATUS, &["put"]),
    (NODE_REVOKE, &["post"]),
    (JOIN_TOKENS, &["post"]),
    (PARAM, &["get", "put", "delete"]),
    (PARAMS, &["get"]),
    (PARAM_HISTORY, &["get"]),
    (PARAM_LABELS, &["post"]),
    (KEYS, &["get"]),
    (KEYS_ROTATE, &["post"]),
    (KEYS_REWRAP, &["post"]),
    (TOKENS, &["get", "post"]),
    (TOKEN, &["delete"]),
    (AUDIT, &["get"]),
    (AUDIT_VERIFY, &["get"]),
];

/// `template` with each `{name}` segment replaced, in order, by `values` (percent-encoded, so
/// a value can never add a segment).
pub fn fill(template: &str, values: &[&str]) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut values = values.iter();
    for (i, segment) in template.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if segment.starts_with('{') && segment.ends_with('}') {
            encode_segment(values.next().copied().unwrap_or(""), &mut out);
        } else {
            out.push_str(segment);
        }
    }
    debug_assert!(values.next().is_none(), "{template}: too many values");
    out
}

/// The raw (still percent-encoded) values of `template`'s parameters when `path` is that
/// route, else `None`.
pub fn parameters<'a>(template: &str, path: &'a str) -> Option<Vec<&'a str>> {
    let mut values = Vec::new();
    let mut given = path.split('/');
    for segment in template.split('/') {
        let value = given.next()?;
        if segment.starts_with('{') && segment.ends_with('}') {
            values.push(value);
        } else if segment != value {
            return None;
        }
    }
    given.next().is_none().then_some(values)
}

fn encode_segment(value: &str, out: &mut String) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fill_their_segments_and_cannot_add_one() {
        assert_eq!(fill(SERVICE_SCALE, &["web"]), "/v1/services/web/scale");
        assert_eq!(fill(BLOB, &["sha256:ab12"]), "/v1/blobs/sha256:ab12");
        assert_eq!(fill(NODE_STATUS, &["../n2"]), "/v1/nodes/..%2Fn2/status");
        assert_eq!(fill(STACKS, &[]), "/v1/stacks");
    }

    #[test]
    fn a_path_gives_back_the_values_it_was_filled_with() {
        let path = fill(NODE_STATUS, &["n1"]);
        assert_eq!(parameters(NODE_STATUS, &path), Some(vec!["n1"]));
        assert_eq!(parameters(NODE_STATUS, "/v1/nodes/n1/status/x"), None);
        assert_eq!(parameters(NODE_STATUS, "/v1/nodes/n1"), None);
        assert_eq!(parameters(ROUTES, ROUTES), Some(vec![]));
        assert_eq!(parameters(ROUTES, "v1/routes"), None);
    }

    #[test]
    fn every_route_is_listed_once() {
        let mut seen = std::collections::BTreeSet::new();
        for (path, methods) in SERVER_ROUTES {
            assert!(seen.insert(*path), "{path} listed twice");
            assert!(!methods.is_empty(), "{path} has no method");
        }
    }
}
