//! Who is calling: the operator token, or a node certificate that may act only as its node.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use dozen_api::tls::PeerIdentity;
use dozen_api::{bearer_token, token_matches, AUTHORIZATION};
use dozen_control::pki;
use dozen_params::policy::Policy;

use crate::error::error;
use crate::{AppState, ConnectionInfo};

pub(crate) async fn authenticate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let given = bearer_token(headers.get(AUTHORIZATION).map(|v| v.as_bytes()));
    let mut request = request;
    if token_matches(given.as_bytes(), state.token.as_bytes()) {
        request.extensions_mut().insert(Caller::Operator);
        return next.run(request).await;
    }
    if given.starts_with(dozen_params::identity::PREFIX) {
        let Some(params) = state.params.as_ref() else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this server runs without a parameter store".into(),
                None,
            );
        };
        return match params.task_caller(given).await {
            Ok(Some(identity)) => {
                let caller = Caller::Task {
                    task: identity.claims.task,
                    service: format!("{}/{}", identity.claims.stack, identity.claims.service),
                    policy: Arc::new(identity.access),
                    pinned: Arc::new(identity.pinned),
                };
                admit(&state, caller, request, next).await
            }
            Ok(None) => {
                refuse(
                    &state,
                    RequestLine::of(&request),
                    "a task token".into(),
                    StatusCode::UNAUTHORIZED,
                    "the task token is not valid: expired, or its task no longer runs".into(),
                    None,
                )
                .await
            }
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot check the task token now: {e}"),
                None,
            ),
        };
    }
    if dozen_control::params::tokens::claimed_name(given).is_some() {
        let Some(params) = &state.params else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this server runs without a parameter store, so it cannot check this token".into(),
                None,
            );
        };
        return match params.authenticate(given).await {
            Ok(Some((name, policy))) => {
                let caller = Caller::Token { name, policy };
                admit(&state, caller, request, next).await
            }
            Ok(None) => {
                let claimed = dozen_control::params::tokens::claimed_name(given)
                    .map(|(name, _)| format!("token {name} (not valid)"))
                    .unwrap_or_default();
                refuse(
                    &state,
                    RequestLine::of(&request),
                    claimed,
                    StatusCode::UNAUTHORIZED,
                    "the token is not valid: revoked, expired or mistyped".into(),
                    Some("`dozen token ls` lists the tokens that exist".into()),
                )
                .await
            }
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot check the token now: {e}"),
                None,
            ),
        };
    }
    let connection = request.extensions().get::<ConnectionInfo>().cloned();
    if let Some(ConnectionInfo {
        peer,
        identity: Some(node),
    }) = connection.as_ref()
    {
        let path = request.uri().path().to_string();
        return match node_may(&state, node, request.method(), &path).await {
            Ok(()) => {
                request
                    .extensions_mut()
                    .insert(Caller::Node(node.name.clone()));
                next.run(request).await
            }
            Err(reason) => {
                tracing::warn!(
                    node = %node.name,
                    serial = %node.serial,
                    %peer,
                    path,
                    reason,
                    "refused a node certificate"
                );
                error(StatusCode::FORBIDDEN, reason, None)
            }
        };
    }
    tracing::warn!(
        path = %request.uri().path(),
        peer = %connection.map(|c| c.peer.to_string()).unwrap_or_else(|| "local".into()),
        presented = !given.is_empty(),
        "refused request without a valid token"
    );
    error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong API token".into(),
        Some("the CLI reads the token from --token / DOZEN_TOKEN or <data-dir>/token".into()),
    )
}
/// Runs the request as `caller` (a token of the parameter store's kinds) when its policy
/// opens the route, else refuses it on the record.
async fn admit(state: &AppState, caller: Caller, mut request: Request, next: Next) -> Response {
    if let Err(reason) = token_may(&caller, request.method(), request.uri().path()) {
        let line = RequestLine::of(&request);
        return refuse(
            state,
            line,
            caller.who(),
            StatusCode::FORBIDDEN,
            reason,
            None,
        )
        .await;
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Where a request came from and what it asked, for the audit record of a refusal.
struct RequestLine {
    from: String,
    target: String,
}

impl RequestLine {
    fn of(request: &Request) -> RequestLine {
        RequestLine {
            from: request
                .extensions()
                .get::<ConnectionInfo>()
                .map(|c| c.peer.to_string())
                .unwrap_or_else(|| "local".into()),
            target: format!("{} {}", request.method(), request.uri().path()),
        }
    }
}

/// Refuses a request that showed a token of the parameter store's kinds, with the refusal on
/// the audit trail first (a denial is audited like any other).
async fn refuse(
    state: &AppState,
    request: RequestLine,
    who: String,
    status: StatusCode,
    reason: String,
    hint: Option<String>,
) -> Response {
    if let Some(audit) = state.audit.clone() {
        let event = dozen_params::audit::Event {
            at_ms: dozen_control::wall_ms(),
            who: crate::params::clip(&who),
            from: request.from,
            action: "auth".into(),
            target: crate::params::clip(&request.target),
            outcome: dozen_params::audit::Outcome::Denied,
            detail: Some(crate::params::clip(&reason)),
        };
        if audit.record(event).await.is_err() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the refusal cannot be audited; the request is refused".into(),
                None,
            );
        }
    }
    error(status, reason, hint)
}

/// Who a request comes from, as [`authenticate`] established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Showed the cluster's first token (the data dir's `token` file): an admin.
    Operator,
    /// Showed a token made with `dozen token create`, which carries a policy.
    Token { name: String, policy: Arc<Policy> },
    /// Showed a task's identity token: the task, its `stack/service`, and what it may read.
    Task {
        task: String,
        service: String,
        /// What its service's `access` grants.
        policy: Arc<Policy>,
        /// The secret versions its release pinned (readable besides `policy`).
        pinned: Arc<Vec<(String, u64)>>,
    },
    /// Showed a node certificate (and no token) naming this node.
    Node(String),
}

impl Caller {
    /// How the audit trail and denials name the caller.
    pub fn who(&self) -> String {
        match self {
            Caller::Operator => "root token".into(),
            Caller::Token { name, .. } => format!("token {name}"),
            Caller::Task { task, service, .. } => format!("task {task} ({service})"),
            Caller::Node(node) => format!("node {node}"),
        }
    }

    /// A task reading one of the exact versions its release pinned.
    pub fn pinned(&self, name: &str, version: Option<u64>) -> bool {
        match self {
            Caller::Task { pinned, .. } => {
                version.is_some_and(|v| pinned.iter().any(|(n, pv)| n == name && *pv == v))
            }
            _ => false,
        }
    }

    pub fn policy(&self) -> std::borrow::Cow<'_, Policy> {
        match self {
            Caller::Operator => std::borrow::Cow::Owned(Policy::admin()),
            Caller::Token { policy, .. } | Caller::Task { policy, .. } => {
                std::borrow::Cow::Borrowed(policy)
            }
            Caller::Node(_) => std::borrow::Cow::Owned(Policy::default()),
        }
    }
}

/// The routes of the parameter store check their caller's policy themselves, per parameter.
fn is_param_route(path: &str) -> bool {
    use dozen_api::paths;
    [
        paths::PARAM,
        paths::PARAMS,
        paths::PARAM_HISTORY,
        paths::PARAM_LABELS,
        paths::KEYS,
        paths::KEYS_ROTATE,
        paths::KEYS_REWRAP,
        paths::TOKENS,
        paths::TOKEN,
        paths::AUDIT,
        paths::AUDIT_VERIFY,
    ]
    .iter()
    .any(|route| dozen_api::paths::parameters(route, path).is_some())
}

/// What a token's policy opens outside the parameter store: everything for `admin`, reads
/// for `read-only`, nothing for path permissions alone.
fn token_may(caller: &Caller, method: &axum::http::Method, path: &str) -> Result<(), String> {
    let policy = caller.policy();
    if let Caller::Task { .. } = caller {
        // A task's identity reads and writes parameters, nothing else.
        let params_only = [dozen_api::paths::PARAM, dozen_api::paths::PARAMS]
            .iter()
            .any(|route| dozen_api::paths::parameters(route, path).is_some());
        return if params_only {
            Ok(())
        } else {
            Err(format!(
                "{} may use the parameter store only, not {method} {path}",
                caller.who()
            ))
        };
    }
    if policy.is_admin() || is_param_route(path) {
        return Ok(());
    }
    let read = method == axum::http::Method::GET || method == axum::http::Method::HEAD;
    if read && policy.may_read_state() {
        return Ok(());
    }
    Err(format!(
        "{} may not {method} {path}: that needs the permission `{}` (it has {})",
        caller.who(),
        if read { "read-only" } else { "admin" },
        policy.describe()
    ))
}
/// What a node's certificate allows: acting as that node (and its proxy), reading routes,
/// blobs and cluster facts; never as another node or as an operator. A revoked certificate
/// allows nothing, and neither does one whose revocation cannot be checked.
async fn node_may(
    state: &AppState,
    node: &PeerIdentity,
    method: &axum::http::Method,
    path: &str,
) -> Result<(), String> {
    match pki::is_revoked(state.store.as_ref(), &node.serial).await {
        Ok(false) => {}
        Ok(true) => {
            return Err(format!(
                "the certificate of node `{}` (serial {}) is revoked; join again with a new token",
                node.name, node.serial
            ))
        }
        Err(e) => return Err(format!("cannot check revocation now: {e}")),
    }
    if node_route_allowed(&node.name, method, path)
        || server_route_allowed(&node.name, method, path)
    {
        Ok(())
    } else {
        Err(format!(
            "a node certificate (`{}`) may act only as that node; {method} {path} needs an \
             operator token",
            node.name
        ))
    }
}
/// What another API server's certificate (common name [`dozen_api::tls::SERVER_CN`], which no
/// node may take) opens besides what a node's does: the logs of the agents only it can reach,
/// and commands run in their tasks.
fn server_route_allowed(name: &str, method: &axum::http::Method, path: &str) -> bool {
    name == dozen_api::tls::SERVER_CN
        && ((method == axum::http::Method::GET
            && (dozen_api::paths::parameters(dozen_api::paths::LOGS, path).is_some()
                || dozen_api::paths::parameters(dozen_api::paths::STATS, path).is_some()))
            || (method == axum::http::Method::POST
                && dozen_api::paths::parameters(dozen_api::paths::TASK_EXEC, path).is_some()))
}

/// The routes a node certificate opens, each named with its method: a list, not a prefix, so
/// a route added later is closed to nodes until it is added here.
fn node_route_allowed(node: &str, method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    use dozen_api::paths;
    // (method, route, whether its one parameter must name the calling node)
    const OPEN_TO_NODES: &[(Method, &str, bool)] = &[
        (Method::POST, paths::NODE_REGISTER, true),
        (Method::POST, paths::NODE_HEARTBEAT, true),
        (Method::GET, paths::NODE_ASSIGNMENTS, true),
        (Method::PUT, paths::NODE_STATUS, true),
        (Method::POST, paths::PROXY_REGISTER, true),
        (Method::POST, paths::PROXY_HEARTBEAT, true),
        (Method::GET, paths::ROUTES, false),
        // Its own tasks' identities: the handler checks the task is assigned to this node.
        (Method::POST, paths::TASK_TOKEN, false),
        (Method::GET, paths::CLUSTER, false),
        (Method::GET, paths::BLOB, false),
        (Method::HEAD, paths::BLOB, false),
    ];
    // Raw segments: a name that only matches once percent-decoded does not match, which
    // refuses rather than allows (node names never contain '%').
    OPEN_TO_NODES.iter().any(|(m, route, own)| {
        m == method
            && paths::parameters(route, path).is_some_and(|values| {
                values.iter().all(|v| !v.is_empty()) && (!own || values == [node])
            })
    })
}
#[cfg(test)]
mod tests {
    use super::node_route_allowed;
    use axum::http::Method;
    use dozen_api::paths::{self, fill};

    #[test]
    fn a_node_certificate_opens_only_the_listed_routes_and_only_as_itself() {
        let allowed = [
            (Method::POST, fill(paths::NODE_REGISTER, &["n1"])),
            (Method::POST, fill(paths::NODE_HEARTBEAT, &["n1"])),
            (Method::GET, fill(paths::NODE_ASSIGNMENTS, &["n1"])),
            (Method::PUT, fill(paths::NODE_STATUS, &["n1"])),
            (Method::POST, fill(paths::PROXY_REGISTER, &["n1"])),
            (Method::POST, fill(paths::PROXY_HEARTBEAT, &["n1"])),
            (Method::GET, String::from(paths::ROUTES)),
            (Method::GET, String::from(paths::CLUSTER)),
            (Method::POST, fill(paths::TASK_TOKEN, &["web-1"])),
            (Method::GET, fill(paths::BLOB, &["sha256:ab"])),
            (Method::HEAD, fill(paths::BLOB, &["sha256:ab"])),
        ];
        for (method, path) in &allowed {
            let path: &str = path;
            assert!(node_route_allowed("n1", method, path), "{method} {path}");
        }
        let refused = [
            // Its own revocation, or anything else an operator does under its name.
            (Method::POST, fill(paths::NODE_REVOKE, &["n1"])),
            (Method::DELETE, format!("{}/n1", paths::NODES)),
            (Method::GET, format!("{}/n1", paths::NODES)),
            (
                Method::GET,
                format!("{}/extra", fill(paths::NODE_ASSIGNMENTS, &["n1"])),
            ),
            (Method::PUT, fill(paths::NODE_REGISTER, &["n1"])),
            // Another node.
            (Method::POST, fill(paths::NODE_REGISTER, &["n2"])),
            (Method::GET, fill(paths::NODE_ASSIGNMENTS, &["n2"])),
            (Method::POST, fill(paths::PROXY_HEARTBEAT, &["n2"])),
            (Method::POST, fill(paths::NODE_REGISTER, &["n1/../n2"])),
            // Operator routes.
            (Method::GET, String::from(paths::NODES)),
            (Method::POST, String::from(paths::APPLY)),
            (Method::POST, String::from(paths::JOIN_TOKENS)),
            (Method::GET, String::from(paths::LOGS)),
            (Method::GET, String::from(paths::TASKS)),
            (Method::PUT, fill(paths::BLOB, &["sha256:ab"])),
            (Method::GET, fill(paths::BLOB, &[""])),
            (Method::GET, format!("{}/x", paths::ROUTES)),
            (
                Method::GET,
                String::from(paths::ROUTES.trim_start_matches('/')),
            ),
        ];
        for (method, path) in &refused {
            let path: &str = path;
            assert!(!node_route_allowed("n1", method, path), "{method} {path}");
        }
    }
}
