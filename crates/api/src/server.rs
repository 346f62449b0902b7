//! The API server: stateless over the store. Validates, authorises, writes desired state, and
//! serves list-then-watch to agents.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use dozen_control::snapshot::Snapshot;
use dozen_control::{desired, ControlError};
use dozen_model::{decode, encode, keys, Assignment, NodeRecord, TaskStatus, SCHEMA};
use dozen_store::blob::{BlobError, BlobStore};
use dozen_store::{Compare, Op, Store, StoreError, Txn, WatchMessage};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{
    ApplyRequest, ErrorBody, HeartbeatRequest, ListResponse, LogLine, LogQuery, NodeInfo,
    RegisterRequest, RegisterResponse, RollbackRequest, RunRequest, ScaleRequest, ServiceSummary,
    StatusReport, TaskInfo, WatchEvent, WatchEventType,
};

pub struct AppState {
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    pub token: String,
    /// How long a node stays alive without a heartbeat.
    pub node_ttl: Duration,
    pub bookmark_every: Duration,
    pub http: reqwest::Client,
    /// This server's id (the value the leader key holds when it leads).
    pub server_id: String,
    /// What `GET /v1/cluster` says the store is: `embedded` or `etcd`.
    pub store_kind: String,
    /// The cluster CA, when this server signs the certificates of joining nodes.
    pub ca: Option<Arc<crate::tls::Ca>>,
    /// How this server reaches `https://` agents: trusting the CA, presenting its own
    /// certificate (agents serve logs only to servers).
    pub agent_tls: Option<rustls::ClientConfig>,
    /// How this server reaches `https://` peers (fetching blobs): trusting the CA, requiring a
    /// server certificate, presenting its own.
    pub peer_client: Option<reqwest::Client>,
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        blobs: Arc<dyn BlobStore>,
        token: String,
        node_ttl: Duration,
    ) -> Self {
        AppState {
            store,
            blobs,
            token,
            node_ttl,
            bookmark_every: Duration::from_secs(5),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .build()
                .unwrap_or_default(),
            server_id: String::new(),
            store_kind: "embedded".into(),
            ca: None,
            agent_tls: None,
            peer_client: None,
        }
    }
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

pub use crate::tls::ConnectionInfo;

/// Serves the API over TLS (see [`crate::tls::serve`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    config: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    crate::tls::serve(listener, router(state), config).await
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/plan", post(plan))
        .route("/v1/apply", post(apply))
        .route("/v1/stacks", get(list_stacks))
        .route("/v1/stacks/{stack}", delete(down))
        .route("/v1/services", get(list_services))
        .route("/v1/services/{service}/releases", get(list_releases))
        .route("/v1/services/{service}/scale", post(scale))
        .route("/v1/services/{service}/restart", post(restart))
        .route("/v1/services/{service}/stop", post(stop))
        .route("/v1/services/{service}/rollback", post(rollback))
        .route("/v1/services/{service}/run", post(run))
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/{task}", get(get_task).delete(remove_task))
        .route("/v1/logs", get(logs))
        .route(
            "/v1/blobs/{digest}",
            get(get_blob)
                .head(has_blob)
                .put(put_blob)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BLOB_BYTES)),
        )
        .route("/v1/routes", get(routes))
        .route("/v1/proxies", get(list_proxies))
        .route("/v1/proxies/{id}/register", post(register_proxy))
        .route("/v1/proxies/{id}/heartbeat", post(proxy_heartbeat))
        .route("/v1/cluster", get(cluster))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}/register", post(register))
        .route("/v1/nodes/{node}/heartbeat", post(heartbeat))
        .route("/v1/nodes/{node}/assignments", get(assignments))
        .route("/v1/nodes/{node}/status", put(report_status))
        .route("/v1/join-tokens", post(create_join_token))
        .route("/v1/nodes/{node}/revoke", post(revoke_node))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        // No token: the CA certificate is public, and a join carries its own credential.
        .route("/v1/ca", get(ca_certificate))
        .route("/v1/join", post(join))
        .merge(v1)
        .with_state(state)
}

/// Compares in constant time so the token cannot be guessed byte by byte.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn authenticate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(crate::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let mut request = request;
    if token_matches(given.as_bytes(), state.token.as_bytes()) {
        request.extensions_mut().insert(Caller::Operator);
        return next.run(request).await;
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

/// Who a request comes from, as [`authenticate`] established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Showed the API token.
    Operator,
    /// Showed a node certificate (and no token) naming this node.
    Node(String),
}

/// What a node's certificate allows: acting as that node (and its proxy), reading routes,
/// blobs and cluster facts; never as another node or as an operator. A revoked certificate
/// allows nothing, and neither does one whose revocation cannot be checked.
async fn node_may(
    state: &AppState,
    node: &crate::tls::PeerIdentity,
    method: &axum::http::Method,
    path: &str,
) -> Result<(), String> {
    match state.store.get(&keys::revoked(&node.serial)).await {
        Ok(None) => {}
        Ok(Some(_)) => {
            return Err(format!(
                "the certificate of node `{}` (serial {}) is revoked; join again with a new token",
                node.name, node.serial
            ))
        }
        Err(e) => return Err(format!("cannot check revocation now: {e}")),
    }
    if node_route_allowed(&node.name, method, path) {
        Ok(())
    } else {
        Err(format!(
            "a node certificate (`{}`) may act only as that node; {method} {path} needs an \
             operator token",
            node.name
        ))
    }
}

/// The routes a node certificate opens, each named with its method: a list, not a prefix, so
/// a route added later is closed to nodes until it is added here.
fn node_route_allowed(node: &str, method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    let segments: Vec<&str> = match path.strip_prefix('/') {
        Some(rest) => rest.split('/').collect(),
        None => return false,
    };
    // Raw segments: a name that only matches once percent-decoded does not match, which
    // refuses rather than allows (node names never contain '%').
    match (method, segments.as_slice()) {
        (&Method::POST, ["v1", "nodes", name, "register" | "heartbeat"])
        | (&Method::GET, ["v1", "nodes", name, "assignments"])
        | (&Method::PUT, ["v1", "nodes", name, "status"])
        | (&Method::POST, ["v1", "proxies", name, "register" | "heartbeat"]) => *name == node,
        (&Method::GET, ["v1", "routes" | "cluster"]) => true,
        (&Method::GET | &Method::HEAD, ["v1", "blobs", digest]) => !digest.is_empty(),
        _ => false,
    }
}

fn error(status: StatusCode, message: String, hint: Option<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message,
            hint,
        }),
    )
        .into_response()
}

pub struct ApiFailure(Box<Response>);

impl ApiFailure {
    fn from_response(response: Response) -> Self {
        ApiFailure(Box::new(response))
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl From<ControlError> for ApiFailure {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::NotFound { .. } => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::LostLeadership => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Store(StoreError::Compacted { .. }) => StatusCode::GONE,
            ControlError::Store(_) | ControlError::Model(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "request failed");
        }
        ApiFailure::from_response(error(status, e.to_string(), None))
    }
}

impl From<StoreError> for ApiFailure {
    fn from(e: StoreError) -> Self {
        ControlError::Store(e).into()
    }
}

impl From<dozen_model::ModelError> for ApiFailure {
    fn from(e: dozen_model::ModelError) -> Self {
        ControlError::Model(e).into()
    }
}

type ApiResult<T> = Result<T, ApiFailure>;

fn bad_request(message: String) -> ApiFailure {
    ApiFailure::from_response(error(StatusCode::BAD_REQUEST, message, None))
}

/// Re-checks a stack that arrived over the wire: the CLI validated the file, but the API is
/// also for scripts.
fn check_stack(stack: &dozen_spec::Stack) -> ApiResult<()> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.len() <= 63
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !n.starts_with('-')
            && !n.ends_with('-')
    };
    if !valid_name(&stack.name) {
        return Err(bad_request(format!(
            "stack name `{}` is not valid: use lowercase letters, digits and '-'",
            stack.name
        )));
    }
    for (name, svc) in &stack.services {
        if !valid_name(name) {
            return Err(bad_request(format!(
                "service name `{name}` is not valid: use lowercase letters, digits and '-'"
            )));
        }
        if svc.command.is_none() && svc.image.is_none() {
            return Err(bad_request(format!(
                "service `{name}` has neither command nor image"
            )));
        }
        if svc.replicas.is_some_and(|r| r > dozen_spec::MAX_REPLICAS) {
            return Err(bad_request(format!(
                "service `{name}`: replicas out of range 0..={}",
                dozen_spec::MAX_REPLICAS
            )));
        }
    }
    Ok(())
}

async fn plan(
    State(s): State<Arc<AppState>>,
    Json(req): Json<ApplyRequest>,
) -> ApiResult<Json<dozen_spec::Plan>> {
    check_stack(&req.stack)?;
    Ok(Json(
        desired::plan(s.store.as_ref(), &req.stack, &req.artifacts).await?,
    ))
}

async fn apply(
    State(s): State<Arc<AppState>>,
    Json(req): Json<ApplyRequest>,
) -> ApiResult<Json<desired::ApplyOutcome>> {
    check_stack(&req.stack)?;
    let outcome = desired::apply(s.store.as_ref(), &req.stack, &req.artifacts).await?;
    tracing::info!(stack = %req.stack.name, releases = outcome.releases.len(), "applied stack");
    Ok(Json(outcome))
}

async fn list_stacks(
    State(s): State<Arc<AppState>>,
) -> ApiResult<Json<Vec<dozen_model::StackRecord>>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    Ok(Json(snap.stacks.into_values().map(|v| v.record).collect()))
}

async fn down(
    State(s): State<Arc<AppState>>,
    Path(stack): Path<String>,
) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(desired::down(s.store.as_ref(), &stack).await?))
}

async fn list_services(State(s): State<Arc<AppState>>) -> ApiResult<Json<Vec<ServiceSummary>>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    let problems = dozen_control::controller::read_problems(s.store.as_ref()).await?;
    let mut out = Vec::new();
    for (name, svc) in &snap.services {
        let release = snap.current_release(name);
        let tasks: Vec<TaskInfo> = snap
            .assignments
            .values()
            .filter(|a| {
                &a.record.service == name
                    && !matches!(a.record.kind, dozen_model::TaskKind::OneOff { .. })
            })
            .map(|a| {
                TaskInfo::from_records(
                    &a.record,
                    snap.statuses.get(&a.record.task).map(|s| &s.record),
                )
            })
            .collect();
        let running = tasks
            .iter()
            .filter(|t| t.state() == Some(dozen_model::TaskState::Running))
            .count() as u32;
        let healthy = tasks
            .iter()
            .filter(|t| {
                t.state() == Some(dozen_model::TaskState::Running)
                    && t.status.as_ref().is_some_and(|s| s.healthy)
            })
            .count() as u32;
        out.push(ServiceSummary {
            name: name.clone(),
            stack: svc.record.stack.clone(),
            process_type: release
                .map(|r| r.spec.process_type.clone())
                .unwrap_or_default(),
            current_release: svc.record.current_release,
            latest_release: svc.record.latest_release,
            desired: snap.desired_replicas(name),
            running,
            healthy,
            stopped: svc.record.stopped,
            reproducible: release.is_some_and(|r| r.reproducible),
            problems: problems.get(name).cloned().unwrap_or_default(),
        });
    }
    Ok(Json(out))
}

async fn list_releases(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
) -> ApiResult<Json<Vec<dozen_model::Release>>> {
    let mut snap = Snapshot::read(s.store.as_ref()).await?;
    if !snap.services.contains_key(&service) {
        return Err(ControlError::NotFound {
            kind: "service",
            name: service,
        }
        .into());
    }
    Ok(Json(
        snap.releases
            .remove(&service)
            .unwrap_or_default()
            .into_values()
            .collect(),
    ))
}

async fn scale(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
    Json(req): Json<ScaleRequest>,
) -> ApiResult<StatusCode> {
    desired::scale(s.store.as_ref(), &service, req.replicas).await?;
    tracing::info!(service, replicas = req.replicas, "scaled");
    Ok(StatusCode::NO_CONTENT)
}

async fn restart(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
) -> ApiResult<StatusCode> {
    desired::restart(s.store.as_ref(), &service).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stop(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
) -> ApiResult<StatusCode> {
    desired::stop(s.store.as_ref(), &service).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rollback(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
    Json(req): Json<RollbackRequest>,
) -> ApiResult<Json<dozen_model::Release>> {
    Ok(Json(
        desired::rollback(s.store.as_ref(), &service, req.to).await?,
    ))
}

async fn run(
    State(s): State<Arc<AppState>>,
    Path(service): Path<String>,
    Json(req): Json<RunRequest>,
) -> ApiResult<Json<TaskInfo>> {
    let a = desired::run_oneoff(s.store.as_ref(), &service, req.argv).await?;
    Ok(Json(TaskInfo::from_records(&a, None)))
}

#[derive(Deserialize)]
struct TaskQuery {
    service: Option<String>,
}

async fn list_tasks(
    State(s): State<Arc<AppState>>,
    Query(q): Query<TaskQuery>,
) -> ApiResult<Json<Vec<TaskInfo>>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    Ok(Json(
        snap.assignments
            .values()
            .filter(|a| {
                q.service
                    .as_ref()
                    .is_none_or(|svc| &a.record.service == svc)
            })
            .map(|a| {
                TaskInfo::from_records(
                    &a.record,
                    snap.statuses.get(&a.record.task).map(|s| &s.record),
                )
            })
            .collect(),
    ))
}

async fn get_task(
    State(s): State<Arc<AppState>>,
    Path(task): Path<String>,
) -> ApiResult<Json<TaskInfo>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    let a = snap
        .assignments
        .get(&task)
        .ok_or_else(|| ControlError::NotFound {
            kind: "task",
            name: task.clone(),
        })?;
    Ok(Json(TaskInfo::from_records(
        &a.record,
        snap.statuses.get(&task).map(|s| &s.record),
    )))
}

async fn remove_task(
    State(s): State<Arc<AppState>>,
    Path(task): Path<String>,
) -> ApiResult<StatusCode> {
    desired::remove_oneoff(s.store.as_ref(), &task).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn cluster(State(s): State<Arc<AppState>>) -> ApiResult<Json<crate::ClusterInfo>> {
    let leader = s
        .store
        .get(&dozen_control::leader::leader_key())
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
    Ok(Json(crate::ClusterInfo {
        server: s.server_id.clone(),
        leader,
        store: s.store_kind.clone(),
    }))
}

async fn list_nodes(State(s): State<Arc<AppState>>) -> ApiResult<Json<Vec<NodeInfo>>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    Ok(Json(
        snap.nodes
            .values()
            .map(|n| NodeInfo {
                tasks: snap
                    .assignments
                    .values()
                    .filter(|a| a.record.node == n.record.name)
                    .count() as u32,
                node: n.record.clone(),
            })
            .collect(),
    ))
}

fn check_node_name(node: &str) -> ApiResult<()> {
    if node.is_empty()
        || node.len() > 63
        || !node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || node.contains("..")
        || node.starts_with(['.', '-'])
        || node.ends_with(['.', '-'])
    {
        return Err(bad_request(format!(
            "node name `{node}` is not valid: use letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

async fn register(
    State(s): State<Arc<AppState>>,
    Path(node): Path<String>,
    caller: Option<axum::Extension<Caller>>,
    Json(req): Json<RegisterRequest>,
) -> ApiResult<Json<RegisterResponse>> {
    check_node_name(&node)?;
    if req.node.name != node {
        return Err(bad_request(format!(
            "node record names `{}` but was sent for `{node}`",
            req.node.name
        )));
    }
    // Servers call this address with their own certificate; only an operator (who holds the
    // token anyway) may name a plain-HTTP one, which servers call with the token.
    let by_certificate = matches!(caller.as_deref(), Some(Caller::Node(_)));
    if by_certificate && !req.node.address.starts_with("https://") {
        return Err(bad_request(format!(
            "node `{node}` registered the address `{}`: a node with a certificate serves its \
             agent API over https://",
            req.node.address
        )));
    }
    let lease = s.store.grant_lease(s.node_ttl).await?;
    let record = NodeRecord {
        schema: SCHEMA,
        ..req.node
    };
    s.store
        .txn(Txn::new().then(Op::Put {
            key: keys::node(&node),
            value: encode(&record),
            lease: Some(lease),
        }))
        .await?;
    tracing::info!(node, instance = %record.agent_instance, address = %record.address, "node registered");
    Ok(Json(RegisterResponse {
        lease,
        ttl_ms: s.node_ttl.as_millis() as u64,
    }))
}

async fn heartbeat(
    State(s): State<Arc<AppState>>,
    Path(node): Path<String>,
    Json(req): Json<HeartbeatRequest>,
) -> ApiResult<StatusCode> {
    let kv = s.store.get(&keys::node(&node)).await?;
    if kv.and_then(|kv| kv.lease) != Some(req.lease) {
        return Err(ApiFailure::from_response(error(
            StatusCode::NOT_FOUND,
            format!("node `{node}` holds no lease {}; register again", req.lease),
            None,
        )));
    }
    match s.store.keep_alive(req.lease).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::LeaseNotFound(_)) => Err(ApiFailure::from_response(error(
            StatusCode::NOT_FOUND,
            format!("lease of node `{node}` expired; register again"),
            None,
        ))),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
struct WatchQuery {
    #[serde(default)]
    watch: bool,
    revision: Option<u64>,
}

async fn assignments(
    State(s): State<Arc<AppState>>,
    Path(node): Path<String>,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Response> {
    check_node_name(&node)?;
    list_or_watch::<Assignment>(s, keys::assignments(&node), q).await
}

/// The list-then-watch protocol over one key prefix, for any record type.
async fn list_or_watch<T>(s: Arc<AppState>, prefix: String, q: WatchQuery) -> ApiResult<Response>
where
    T: dozen_model::Record + Send + 'static,
{
    if !q.watch {
        let range = s.store.range(&prefix).await?;
        let mut items = Vec::with_capacity(range.kvs.len());
        for kv in range.kvs {
            items.push(decode::<T>(&kv.key, &kv.value)?);
        }
        return Ok(Json(ListResponse {
            items,
            revision: range.revision,
        })
        .into_response());
    }
    let from = q.revision.unwrap_or(0).saturating_add(1);
    let mut store_watch = match s.store.watch(&prefix, from).await {
        Ok(w) => w,
        Err(StoreError::Compacted {
            compact_revision, ..
        }) => {
            return Ok(error(
                StatusCode::GONE,
                format!(
                    "revision {} is compacted (oldest kept {compact_revision}); list again",
                    from - 1
                ),
                None,
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let store = s.store.clone();
    let bookmark_every = s.bookmark_every;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        loop {
            let lines: Vec<WatchEvent<T>> = tokio::select! {
                msg = store_watch.next() => match msg {
                    Some(WatchMessage::Events { revision, events }) => events
                        .into_iter()
                        .map(|e| event_line::<T>(revision, e))
                        .collect(),
                    // Fell behind: end the stream; the client resumes and gets 410.
                    Some(WatchMessage::Compacted { .. }) | None => return,
                },
                _ = tick.tick() => {
                    // Read the revision first, then send every event already queued: a bookmark
                    // must never get ahead of an event the client has not seen.
                    let Ok(revision) = store.revision().await else { return };
                    let mut lines = Vec::new();
                    while let Ok(msg) = store_watch.receiver.try_recv() {
                        match msg {
                            WatchMessage::Events { revision, events } => {
                                lines.extend(events.into_iter().map(|e| event_line::<T>(revision, e)));
                            }
                            WatchMessage::Compacted { .. } => return,
                        }
                    }
                    lines.push(WatchEvent { kind: WatchEventType::Bookmark, revision, key: String::new(), object: None });
                    lines
                }
                _ = tx.closed() => return,
            };
            for line in lines {
                let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
                bytes.push(b'\n');
                if tx.send(Bytes::from(bytes)).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = tokio_stream_from(rx).map(Ok::<_, Infallible>);
    Ok(Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}

fn event_line<T: dozen_model::Record>(revision: u64, e: dozen_store::Event) -> WatchEvent<T> {
    match e.kind {
        dozen_store::EventKind::Put => WatchEvent {
            kind: WatchEventType::Put,
            revision,
            object: decode::<T>(&e.kv.key, &e.kv.value).ok(),
            key: e.kv.key,
        },
        dozen_store::EventKind::Delete => WatchEvent {
            kind: WatchEventType::Delete,
            revision,
            key: e.kv.key,
            object: None,
        },
    }
}

fn tokio_stream_from<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

async fn report_status(
    State(s): State<Arc<AppState>>,
    Path(node): Path<String>,
    Json(report): Json<StatusReport>,
) -> ApiResult<StatusCode> {
    check_node_name(&node)?;
    for status in &report.statuses {
        if status.node != node {
            return Err(bad_request(format!(
                "status of task `{}` names node `{}`, sent by `{node}`",
                status.task, status.node
            )));
        }
    }
    // Only tasks still assigned to this node: a late report about a removed task is dropped.
    // The write is guarded by those assignments existing; if one vanishes meanwhile, the
    // batch is filtered again so the other statuses are never lost with it.
    for _ in 0..5 {
        let mut txn = Txn::new();
        let mut any = false;
        for status in &report.statuses {
            let akey = keys::assignment(&node, &status.task);
            if s.store.get(&akey).await?.is_none() {
                continue;
            }
            let record = TaskStatus {
                schema: SCHEMA,
                ..status.clone()
            };
            txn = txn
                .when(Compare::exists(&akey))
                .then(Op::put(keys::status(&node, &record.task), encode(&record)));
            any = true;
        }
        if !any || s.store.txn(txn).await?.succeeded {
            return Ok(StatusCode::NO_CONTENT);
        }
    }
    Err(ControlError::Conflict(format!(
        "assignments of node `{node}` kept changing while recording status; report again"
    ))
    .into())
}

/// Logs stay on the node that produced them: ask every agent and merge.
async fn logs(State(s): State<Arc<AppState>>, Query(q): Query<LogQuery>) -> ApiResult<Response> {
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
    let stream = tokio_stream_from(rx).map(Ok::<_, Infallible>);
    Ok(Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}

async fn fetch_agent_logs(
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
/// those (see [`register`]).
async fn agent_logs_request(
    s: &AppState,
    node: &NodeRecord,
) -> Result<reqwest::RequestBuilder, String> {
    let Some(authority) = node.address.strip_prefix("https://") else {
        return Ok(s
            .http
            .get(format!("{}/v1/agent/logs", node.address))
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
    let name = crate::tls::node_dns_name(&node.name);
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .connect_timeout(Duration::from_secs(3))
        .resolve(&name, addr)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(client.get(format!("https://{name}:{}/v1/agent/logs", addr.port())))
}

/// The route table, long-polled by proxies: with `after`, the answer waits until something that
/// routes depend on changed after that revision.
async fn routes(
    State(s): State<Arc<AppState>>,
    Query(q): Query<crate::RouteQuery>,
) -> ApiResult<Json<dozen_model::RouteTable>> {
    if let Some(after) = q.after {
        let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000).min(120_000));
        if let Ok(mut watch) = s.store.watch(keys::ROOT, after.saturating_add(1)).await {
            let _ = tokio::time::timeout(wait, async {
                while let Some(msg) = watch.next().await {
                    match msg {
                        WatchMessage::Events { events, .. } => {
                            if events
                                .iter()
                                .any(|e| dozen_control::routes::affects_routes(&e.kv.key))
                            {
                                return;
                            }
                        }
                        WatchMessage::Compacted { .. } => return,
                    }
                }
            })
            .await;
        }
    }
    let snap = Snapshot::read(s.store.as_ref()).await?;
    Ok(Json(dozen_model::RouteTable {
        revision: snap.revision,
        routes: dozen_control::routes::table(&snap),
    }))
}

async fn list_proxies(
    State(s): State<Arc<AppState>>,
) -> ApiResult<Json<ListResponse<crate::ProxyInfo>>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    let head = snap.revision;
    let checks = snap.proxies.into_values().map(|proxy| {
        let store = s.store.clone();
        async move {
            let current =
                routes_unchanged(store.as_ref(), proxy.record.applied_revision, head).await;
            crate::ProxyInfo {
                record: proxy.record,
                current,
            }
        }
    });
    Ok(Json(ListResponse {
        items: futures_util::future::join_all(checks).await,
        revision: head,
    }))
}

/// Whether nothing that routes depend on changed after revision `applied`, up to `head`: read
/// from the store's history (false when that history is compacted away). A watch from a past
/// revision replays what it has at once, so once it falls quiet there is no more (on an etcd
/// shared with others, revision `head` itself may hold no dozen key).
async fn routes_unchanged(store: &dyn Store, applied: u64, head: u64) -> bool {
    if applied >= head {
        return true;
    }
    let Ok(mut watch) = store.watch(keys::ROOT, applied + 1).await else {
        return false;
    };
    loop {
        match tokio::time::timeout(Duration::from_millis(300), watch.next()).await {
            Err(_) => return true,
            Ok(None) | Ok(Some(WatchMessage::Compacted { .. })) => return false,
            Ok(Some(WatchMessage::Events { revision, .. })) if revision > head => return true,
            Ok(Some(WatchMessage::Events { revision, events })) => {
                if events
                    .iter()
                    .any(|e| dozen_control::routes::affects_routes(&e.kv.key))
                {
                    return false;
                }
                if revision == head {
                    return true;
                }
            }
        }
    }
}

async fn register_proxy(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(req): Json<crate::ProxyRegisterRequest>,
) -> ApiResult<Json<RegisterResponse>> {
    check_node_name(&id)?;
    let lease = s.store.grant_lease(s.node_ttl).await?;
    let record = dozen_model::ProxyRecord {
        schema: SCHEMA,
        id: id.clone(),
        applied_revision: 0,
        public_address: req.public_address,
        internal_address: req.internal_address,
    };
    s.store
        .txn(Txn::new().then(Op::Put {
            key: keys::proxy(&id),
            value: encode(&record),
            lease: Some(lease),
        }))
        .await?;
    tracing::info!(proxy = id, public = %record.public_address, "proxy registered");
    Ok(Json(RegisterResponse {
        lease,
        ttl_ms: s.node_ttl.as_millis() as u64,
    }))
}

async fn proxy_heartbeat(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(hb): Json<crate::ProxyHeartbeat>,
) -> ApiResult<StatusCode> {
    let key = keys::proxy(&id);
    let gone = || {
        ApiFailure::from_response(error(
            StatusCode::NOT_FOUND,
            format!("proxy `{id}` holds no lease {}; register again", hb.lease),
            None,
        ))
    };
    let Some(kv) = s.store.get(&key).await? else {
        return Err(gone());
    };
    if kv.lease != Some(hb.lease) {
        return Err(gone());
    }
    match s.store.keep_alive(hb.lease).await {
        Ok(()) => {}
        Err(StoreError::LeaseNotFound(_)) => return Err(gone()),
        Err(e) => return Err(e.into()),
    }
    let mut record: dozen_model::ProxyRecord = decode(&key, &kv.value)?;
    if record.applied_revision != hb.applied_revision {
        record.applied_revision = hb.applied_revision;
        s.store
            .txn(
                Txn::new()
                    .when(Compare::mod_revision(&key, kv.mod_revision))
                    .then(Op::Put {
                        key: key.clone(),
                        value: encode(&record),
                        lease: Some(hb.lease),
                    }),
            )
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Largest artifact bundle accepted.
const MAX_BLOB_BYTES: usize = 512 * 1024 * 1024;

impl From<BlobError> for ApiFailure {
    fn from(e: BlobError) -> Self {
        let status = match e {
            BlobError::BadDigest(_) | BlobError::Mismatch { .. } => StatusCode::BAD_REQUEST,
            BlobError::Io { .. } => {
                tracing::error!(error = %e, "blob store failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiFailure::from_response(error(status, e.to_string(), None))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ApiFailure::from_response(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "blob task failed".into(),
            None,
        ))),
    }
}

async fn has_blob(
    State(s): State<Arc<AppState>>,
    Path(digest): Path<String>,
) -> ApiResult<StatusCode> {
    let blobs = s.blobs.clone();
    let found = blocking(move || blobs.contains(&digest)).await?;
    Ok(if found {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    })
}

async fn get_blob(
    State(s): State<Arc<AppState>>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let blobs = s.blobs.clone();
    let name = digest.clone();
    let local_only = headers.contains_key(crate::peers::LOCAL_ONLY);
    let bytes = match blocking(move || blobs.get(&name)).await? {
        Some(bytes) => Some(bytes),
        None if local_only => None,
        // Uploaded to another server: fetch it from there, check it, keep it.
        None => match crate::peers::fetch_blob(&s, &digest).await {
            Some(bytes) => {
                let (blobs, name, copy) = (s.blobs.clone(), digest.clone(), bytes.clone());
                match tokio::task::spawn_blocking(move || blobs.put(&name, &copy)).await {
                    Ok(Ok(())) => Some(bytes),
                    Ok(Err(BlobError::Mismatch { .. })) => {
                        tracing::warn!(digest, "a peer's copy of a blob does not match its digest");
                        None
                    }
                    Ok(Err(e)) => {
                        // Checked, just not kept: serve it anyway.
                        tracing::warn!(digest, error = %e, "cannot keep a blob fetched from a peer");
                        Some(bytes)
                    }
                    Err(_) => None,
                }
            }
            None => None,
        },
    };
    match bytes {
        Some(bytes) => Ok(Response::builder()
            .header("content-type", "application/octet-stream")
            .body(Body::from(bytes))
            .unwrap_or_default()),
        None => Err(ControlError::NotFound {
            kind: "blob",
            name: digest,
        }
        .into()),
    }
}

async fn put_blob(
    State(s): State<Arc<AppState>>,
    Path(digest): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let blobs = s.blobs.clone();
    blocking(move || blobs.put(&digest, &body)).await?;
    Ok(StatusCode::CREATED)
}

fn unauthorized(message: String) -> ApiFailure {
    ApiFailure::from_response(error(StatusCode::UNAUTHORIZED, message, None))
}

fn no_ca() -> ApiFailure {
    ApiFailure::from_response(error(
        StatusCode::NOT_FOUND,
        "this server has no cluster CA, so nodes cannot join through it".into(),
        Some("start the servers with --ca-dir (made by `dozen ca init`)".into()),
    ))
}

async fn ca_certificate(State(s): State<Arc<AppState>>) -> ApiResult<String> {
    let ca = s.ca.as_ref().ok_or_else(no_ca)?;
    Ok(ca.cert_pem.clone())
}

const JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);
const JOIN_TOKEN_MAX_TTL: Duration = Duration::from_secs(24 * 3600);

async fn create_join_token(
    State(s): State<Arc<AppState>>,
    Json(req): Json<crate::JoinTokenRequest>,
) -> ApiResult<Json<crate::JoinTokenResponse>> {
    let ca = s.ca.as_ref().ok_or_else(no_ca)?;
    let ttl = req
        .ttl_ms
        .map(Duration::from_millis)
        .unwrap_or(JOIN_TOKEN_TTL);
    if ttl.is_zero() || ttl > JOIN_TOKEN_MAX_TTL {
        return Err(bad_request(format!(
            "a join token lives between 1 ms and 24 h, not {} ms",
            ttl.as_millis()
        )));
    }
    let random = |n| {
        crate::tls::random_hex(n).map_err(|e| {
            ApiFailure::from_response(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("no randomness: {e}"),
                None,
            ))
        })
    };
    let (id, secret) = (random(6)?, random(24)?);
    let lease = s.store.grant_lease(ttl).await?;
    s.store
        .txn(Txn::new().then(Op::Put {
            key: keys::join_token(&id),
            value: crate::tls::sha256_hex(secret.as_bytes()).into_bytes(),
            lease: Some(lease),
        }))
        .await?;
    tracing::info!(
        token_id = id,
        ttl_ms = ttl.as_millis() as u64,
        "join token created"
    );
    Ok(Json(crate::JoinTokenResponse {
        token: format!("{id}.{secret}"),
        ttl_ms: ttl.as_millis() as u64,
        ca_hash: ca.fingerprint().map_err(|e| bad_request(e.to_string()))?,
    }))
}

async fn join(
    State(s): State<Arc<AppState>>,
    Json(req): Json<crate::JoinRequest>,
) -> ApiResult<Json<crate::JoinResponse>> {
    let ca = s.ca.as_ref().ok_or_else(no_ca)?;
    check_node_name(&req.node)?;
    let refuse = |why: &str| {
        tracing::warn!(node = %req.node, reason = why, "refused a join");
        unauthorized(format!(
            "join refused: {why}; ask an operator for a new token (`dozen node token`)"
        ))
    };
    let Some((id, secret)) = req.token.split_once('.') else {
        return Err(refuse("the token is not of the form <id>.<secret>"));
    };
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(refuse("the token id is not hex"));
    }
    let key = keys::join_token(id);
    let Some(kv) = s.store.get(&key).await? else {
        return Err(refuse("the token is unknown, used or expired"));
    };
    let presented = crate::tls::sha256_hex(secret.as_bytes());
    if !token_matches(presented.as_bytes(), &kv.value) {
        return Err(refuse("the token's secret does not match"));
    }
    // Sign before spending the token, so a bad request does not use it up.
    let issued = ca
        .sign_node(&req.csr_pem, &req.node)
        .map_err(|e| bad_request(e.to_string()))?;
    let spent = s
        .store
        .txn(
            Txn::new()
                .when(Compare::mod_revision(&key, kv.mod_revision))
                .then(Op::delete(&key))
                .then(Op::put(
                    keys::node_cert(&req.node, &issued.serial),
                    serde_json::to_vec(&serde_json::json!({
                        "serial": issued.serial,
                        "issued_at_ms": dozen_control::wall_ms(),
                    }))
                    .unwrap_or_default(),
                )),
        )
        .await?;
    if !spent.succeeded {
        return Err(refuse("the token was used by another join just now"));
    }
    tracing::info!(node = %req.node, serial = %issued.serial, "node joined; certificate issued");
    Ok(Json(crate::JoinResponse {
        cert_pem: issued.cert_pem,
        ca_pem: ca.cert_pem.clone(),
        serial: issued.serial,
    }))
}

async fn revoke_node(
    State(s): State<Arc<AppState>>,
    Path(node): Path<String>,
) -> ApiResult<Json<crate::RevokeResponse>> {
    check_node_name(&node)?;
    let issued = s.store.range(&keys::node_certs(&node)).await?;
    if issued.kvs.is_empty() {
        return Err(ApiFailure::from_response(error(
            StatusCode::NOT_FOUND,
            format!("no certificate was issued to node `{node}`"),
            Some("`dozen nodes` lists the nodes; only nodes that joined with a token hold certificates".into()),
        )));
    }
    let prefix = keys::node_certs(&node);
    let serials: Vec<String> = issued
        .kvs
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_string))
        .collect();
    let mut txn = Txn::new();
    for serial in &serials {
        txn = txn.then(Op::put(keys::revoked(serial), node.as_bytes().to_vec()));
    }
    s.store.txn(txn).await?;
    tracing::warn!(node, serials = %serials.join(","), "node certificates revoked");
    Ok(Json(crate::RevokeResponse { node, serials }))
}

#[cfg(test)]
mod tests {
    use super::node_route_allowed;
    use axum::http::Method;

    #[test]
    fn a_node_certificate_opens_only_the_listed_routes_and_only_as_itself() {
        let allowed = [
            (Method::POST, "/v1/nodes/n1/register"),
            (Method::POST, "/v1/nodes/n1/heartbeat"),
            (Method::GET, "/v1/nodes/n1/assignments"),
            (Method::PUT, "/v1/nodes/n1/status"),
            (Method::POST, "/v1/proxies/n1/register"),
            (Method::POST, "/v1/proxies/n1/heartbeat"),
            (Method::GET, "/v1/routes"),
            (Method::GET, "/v1/cluster"),
            (Method::GET, "/v1/blobs/sha256:ab"),
            (Method::HEAD, "/v1/blobs/sha256:ab"),
        ];
        for (method, path) in &allowed {
            assert!(node_route_allowed("n1", method, path), "{method} {path}");
        }
        let refused = [
            // Its own revocation, or anything else an operator does under its name.
            (Method::POST, "/v1/nodes/n1/revoke"),
            (Method::DELETE, "/v1/nodes/n1"),
            (Method::GET, "/v1/nodes/n1"),
            (Method::GET, "/v1/nodes/n1/assignments/extra"),
            (Method::PUT, "/v1/nodes/n1/register"),
            // Another node.
            (Method::POST, "/v1/nodes/n2/register"),
            (Method::GET, "/v1/nodes/n2/assignments"),
            (Method::POST, "/v1/proxies/n2/heartbeat"),
            (Method::POST, "/v1/nodes/n1%2f../n2/register"),
            // Operator routes.
            (Method::GET, "/v1/nodes"),
            (Method::POST, "/v1/apply"),
            (Method::POST, "/v1/join-tokens"),
            (Method::GET, "/v1/logs"),
            (Method::GET, "/v1/tasks"),
            (Method::PUT, "/v1/blobs/sha256:ab"),
            (Method::GET, "/v1/blobs/"),
            (Method::GET, "/v1/routes/x"),
            (Method::GET, "v1/routes"),
        ];
        for (method, path) in &refused {
            assert!(!node_route_allowed("n1", method, path), "{method} {path}");
        }
    }
}
