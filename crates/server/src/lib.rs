//! The API server: stateless over the store. Each handler parses its input, authorises the
//! caller (in [`auth`]) and calls one function of `dozen-control`; this crate holds no
//! decision of its own beyond HTTP. Every route path comes from `dozen_api::paths`.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::handler::Handler;
use axum::{middleware, Router};
use dozen_api::{
    paths, ApplyOutcome, ApplyRequest, ClusterInfo, EventQuery, HeartbeatRequest, JoinRequest,
    JoinResponse, JoinTokenRequest, JoinTokenResponse, LogLine, LogQuery, NodeInfo, ProxyHeartbeat,
    ProxyInfo, ProxyRegisterRequest, RegisterRequest, RegisterResponse, RevokeResponse,
    RollbackRequest, RouteQuery, RunRequest, ScaleRequest, ServiceSummary, StatusReport, TaskInfo,
    TaskQuery, TaskUsage, WatchQuery,
};
use dozen_model::{Assignment, Release, RouteTable, StackRecord};
use dozen_store::blob::BlobStore;
use dozen_store::Store;

mod auth;
pub mod blobs;
mod error;
mod events;
mod logs;
mod nodes;
mod openapi;
mod params;
mod peers;
mod pki;
pub mod registry;
mod routes;
mod stacks;
mod stats;
mod tasks;
mod watch;

use openapi::{bytes, json, list, ndjson, no_content, Routes};

pub use auth::Caller;
pub use dozen_api::tls::ConnectionInfo;
pub use error::ApiFailure;

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
    pub ca: Option<Arc<dozen_api::tls::Ca>>,
    /// How this server reaches `https://` agents: trusting the CA, presenting its own
    /// certificate (agents serve logs only to servers).
    pub agent_tls: Option<rustls::ClientConfig>,
    /// How this server reaches `https://` peers (fetching blobs): trusting the CA, requiring a
    /// server certificate, presenting its own.
    pub peer_client: Option<reqwest::Client>,
    /// How many releases of each service are kept.
    pub retention: dozen_control::desired::Retention,
    /// One pull from a peer per blob at a time: the others wait for it and read the copy.
    pub(crate) pulls:
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The registry's blob uploads in progress on this server.
    pub(crate) uploads: registry::Uploads,
    /// The parameter store, with its keys open (None: its routes answer 503).
    pub params: Option<Arc<dozen_control::params::ParamStore>>,
    /// This server's audit trail (None: the parameter store's routes answer 503).
    pub audit: Option<Arc<dozen_control::audit::AuditLog>>,
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
            pulls: Default::default(),
            uploads: Default::default(),
            retention: Default::default(),
            params: None,
            audit: None,
        }
    }
}

impl AppState {
    /// The answer to a registration under `lease`: how long it lives without a heartbeat.
    pub(crate) fn registered(&self, lease: u64) -> dozen_api::RegisterResponse {
        dozen_api::RegisterResponse {
            lease,
            ttl_ms: self.node_ttl.as_millis() as u64,
        }
    }
}

/// Keeps this server's record (the URL peers reach it at) in the store while it runs.
pub async fn register_with_peers(store: Arc<dyn Store>, id: String, url: String) {
    dozen_control::servers::register(store.as_ref(), id, url).await
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) -> std::io::Result<()> {
    serve_with(listener, state, None).await
}

/// Serves the API over TLS (see [`dozen_api::tls::serve`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    config: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    serve_with(listener, state, Some(config)).await
}

async fn serve_with(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let app = router(state);
    let service = move |connection| connection_service(&app, connection);
    dozen_api::tls::serve(listener, service, tls).await
}

/// The router for one connection, knowing who is on the other end.
fn connection_service(
    app: &Router,
    connection: ConnectionInfo,
) -> hyper_util::service::TowerToHyperService<Router> {
    let app = app.clone().layer(axum::Extension(connection));
    hyper_util::service::TowerToHyperService::new(app)
}

pub fn router(state: Arc<AppState>) -> Router {
    let authenticated = operator_and_node_routes().layer_so_far(|r| {
        r.layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
    });
    public_routes()
        .merge(authenticated)
        .into_router()
        .merge(registry::router(state.clone()))
        .with_state(state)
}

/// The OpenAPI 3 document of every route [`router`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    all_routes().document()
}

/// `(method, path)` of every route [`router`] serves.
pub fn served_routes() -> Vec<(&'static str, &'static str)> {
    all_routes().served().to_vec()
}

fn all_routes() -> Routes {
    public_routes().merge(operator_and_node_routes())
}

/// No credential: health, the CA certificate (public), and a join (its token in the body is
/// the credential).
fn public_routes() -> Routes {
    Routes::new()
        .add(
            "get",
            paths::HEALTHZ,
            bytes("the server is up", "200", "text/plain").public(),
            || async { "ok\n" },
        )
        .add(
            "get",
            paths::CA,
            bytes(
                "the cluster CA certificate (PEM)",
                "200",
                "application/x-pem-file",
            )
            .public(),
            pki::ca_certificate,
        )
        .add(
            "post",
            paths::JOIN,
            json::<JoinResponse>(
                "join with a one-time token: the node's certificate request signed",
            )
            .body::<JoinRequest>()
            .public(),
            pki::join,
        )
}

/// An operator token, or a node certificate for the routes a node may use.
fn operator_and_node_routes() -> Routes {
    Routes::new()
        .add(
            "get",
            paths::OPENAPI,
            json::<serde_json::Value>("this document"),
            openapi_document,
        )
        .add(
            "post",
            paths::PLAN,
            json::<dozen_spec::Plan>("what applying a stack would change").body::<ApplyRequest>(),
            stacks::plan,
        )
        .add(
            "post",
            paths::APPLY,
            json::<ApplyOutcome>("apply a stack: new releases, scale, removals")
                .body::<ApplyRequest>(),
            stacks::apply,
        )
        .add(
            "get",
            paths::STACKS,
            json::<Vec<StackRecord>>("every stack"),
            stacks::list_stacks,
        )
        .add(
            "delete",
            paths::STACK,
            json::<Vec<String>>("remove a stack; answers the services removed"),
            stacks::down,
        )
        .add(
            "get",
            paths::SERVICES,
            json::<Vec<ServiceSummary>>("every service, with its counts and problems"),
            stacks::list_services,
        )
        .add(
            "get",
            paths::SERVICE_RELEASES,
            json::<Vec<Release>>("a service's releases"),
            stacks::list_releases,
        )
        .add(
            "post",
            paths::SERVICE_SCALE,
            no_content("set a service's desired count").body::<ScaleRequest>(),
            stacks::scale,
        )
        .add(
            "post",
            paths::SERVICE_RESTART,
            no_content("replace every task of a service, new before old"),
            stacks::restart,
        )
        .add(
            "post",
            paths::SERVICE_STOP,
            no_content("stop every task of a service, keeping its count"),
            stacks::stop,
        )
        .add(
            "post",
            paths::SERVICE_ROLLBACK,
            json::<Release>("make an earlier release current again").body::<RollbackRequest>(),
            stacks::rollback,
        )
        .add(
            "post",
            paths::SERVICE_RUN,
            json::<TaskInfo>("start a one-off task of the current release").body::<RunRequest>(),
            stacks::run,
        )
        .add(
            "get",
            paths::TASKS,
            json::<Vec<TaskInfo>>("every task, or one service's").query::<TaskQuery>(),
            tasks::list_tasks,
        )
        .add(
            "get",
            paths::TASK,
            json::<TaskInfo>("one task"),
            tasks::get_task,
        )
        .add(
            "delete",
            paths::TASK,
            no_content("remove a finished one-off task"),
            tasks::remove_task,
        )
        .add(
            "get",
            paths::STATS,
            json::<Vec<TaskUsage>>("what each task uses: memory now, CPU time so far")
                .query::<dozen_api::StatsQuery>(),
            stats::stats,
        )
        .add(
            "post",
            paths::TASK_EXEC,
            ndjson::<dozen_api::ExecOutput>(
                "run a command inside a running task: its output as it comes, then its exit code",
            )
            .body::<dozen_api::ExecRequest>(),
            tasks::exec,
        )
        .add(
            "get",
            paths::LOGS,
            ndjson::<LogLine>("log lines of every node, merged; with follow, a stream")
                .query::<LogQuery>(),
            logs::logs,
        )
        .add(
            "get",
            paths::EVENTS,
            ndjson::<dozen_model::Event>(
                "what happened to services, tasks and nodes, oldest first; with follow, a stream",
            )
            .query::<EventQuery>(),
            events::events,
        )
        .add(
            "get",
            paths::BLOB,
            bytes(
                "a blob (artifact bundle) by digest",
                "200",
                "application/octet-stream",
            ),
            blobs::get_blob,
        )
        .add(
            "head",
            paths::BLOB,
            no_content("whether the server has a blob (200 or 404)"),
            blobs::has_blob,
        )
        .add(
            "put",
            paths::BLOB,
            bytes(
                "store a blob under its digest (checked)",
                "201",
                "text/plain",
            )
            .bytes_body(),
            blobs::put_blob.layer(axum::extract::DefaultBodyLimit::max(blobs::MAX_BLOB_BYTES)),
        )
        .add(
            "get",
            paths::ROUTES,
            json::<RouteTable>("the route table; with after, once it changed")
                .query::<RouteQuery>(),
            routes::routes,
        )
        .add(
            "get",
            paths::PROXIES,
            list::<ProxyInfo>("every live proxy and whether its table is current"),
            routes::list_proxies,
        )
        .add(
            "post",
            paths::PROXY_REGISTER,
            json::<RegisterResponse>("register a proxy under a lease")
                .body::<ProxyRegisterRequest>(),
            routes::register_proxy,
        )
        .add(
            "post",
            paths::PROXY_HEARTBEAT,
            no_content("keep a proxy's lease, with the route revision it applied")
                .body::<ProxyHeartbeat>(),
            routes::proxy_heartbeat,
        )
        .add(
            "get",
            paths::CLUSTER,
            json::<ClusterInfo>("which server answered and which one leads"),
            nodes::cluster,
        )
        .add(
            "get",
            paths::NODES,
            json::<Vec<NodeInfo>>("every node that registered, up or down"),
            nodes::list_nodes,
        )
        .add(
            "post",
            paths::NODE_REGISTER,
            json::<RegisterResponse>("register a node under a lease").body::<RegisterRequest>(),
            nodes::register,
        )
        .add(
            "post",
            paths::NODE_HEARTBEAT,
            no_content("keep a node's lease (404: register again)").body::<HeartbeatRequest>(),
            nodes::heartbeat,
        )
        .add(
            "get",
            paths::NODE_ASSIGNMENTS,
            list::<Assignment>("a node's assignments; with watch, a stream of WatchEvent lines")
                .query::<WatchQuery>(),
            nodes::assignments,
        )
        .add(
            "put",
            paths::NODE_STATUS,
            no_content("report the status of a node's tasks").body::<StatusReport>(),
            nodes::report_status,
        )
        .add(
            "post",
            paths::NODE_REVOKE,
            json::<RevokeResponse>("revoke every certificate issued to a node"),
            pki::revoke_node,
        )
        .add(
            "post",
            paths::JOIN_TOKENS,
            json::<JoinTokenResponse>("a one-time token for a node to join")
                .body::<JoinTokenRequest>(),
            pki::create_join_token,
        )
        .merge(params::routes())
}

async fn openapi_document() -> axum::Json<serde_json::Value> {
    static DOCUMENT: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    axum::Json(
        DOCUMENT
            .get_or_init(|| serde_json::to_value(openapi()).unwrap_or_default())
            .clone(),
    )
}
