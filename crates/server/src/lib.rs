//! The API server: stateless over the store. Each handler parses its input, authorises the
//! caller (in [`auth`]) and calls one function of `dozen-control`; this crate holds no
//! decision of its own beyond HTTP. Every route path comes from `dozen_api::paths`.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{delete, get, post, put};
use axum::{middleware, Router};
use dozen_api::paths;
use dozen_store::blob::BlobStore;
use dozen_store::Store;

mod auth;
mod blobs;
mod error;
mod logs;
mod nodes;
mod peers;
mod pki;
mod routes;
mod stacks;
mod tasks;
mod watch;

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

/// Keeps this server's record (the URL peers reach it at) in the store while it runs.
pub async fn register_with_peers(store: Arc<dyn Store>, id: String, url: String) {
    dozen_control::servers::register(store.as_ref(), id, url).await
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) -> std::io::Result<()> {
    let app = router(state);
    dozen_api::tls::serve_plain(listener, move |connection| {
        connection_service(&app, connection)
    })
    .await
}

/// Serves the API over TLS (see [`dozen_api::tls::serve`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    config: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    let app = router(state);
    dozen_api::tls::serve(
        listener,
        move |connection| connection_service(&app, connection),
        config,
    )
    .await
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
    let v1 = Router::new()
        .route(paths::PLAN, post(stacks::plan))
        .route(paths::APPLY, post(stacks::apply))
        .route(paths::STACKS, get(stacks::list_stacks))
        .route(paths::STACK, delete(stacks::down))
        .route(paths::SERVICES, get(stacks::list_services))
        .route(paths::SERVICE_RELEASES, get(stacks::list_releases))
        .route(paths::SERVICE_SCALE, post(stacks::scale))
        .route(paths::SERVICE_RESTART, post(stacks::restart))
        .route(paths::SERVICE_STOP, post(stacks::stop))
        .route(paths::SERVICE_ROLLBACK, post(stacks::rollback))
        .route(paths::SERVICE_RUN, post(stacks::run))
        .route(paths::TASKS, get(tasks::list_tasks))
        .route(paths::TASK, get(tasks::get_task).delete(tasks::remove_task))
        .route(paths::LOGS, get(logs::logs))
        .route(
            paths::BLOB,
            get(blobs::get_blob)
                .head(blobs::has_blob)
                .put(blobs::put_blob)
                .layer(axum::extract::DefaultBodyLimit::max(blobs::MAX_BLOB_BYTES)),
        )
        .route(paths::ROUTES, get(routes::routes))
        .route(paths::PROXIES, get(routes::list_proxies))
        .route(paths::PROXY_REGISTER, post(routes::register_proxy))
        .route(paths::PROXY_HEARTBEAT, post(routes::proxy_heartbeat))
        .route(paths::CLUSTER, get(nodes::cluster))
        .route(paths::NODES, get(nodes::list_nodes))
        .route(paths::NODE_REGISTER, post(nodes::register))
        .route(paths::NODE_HEARTBEAT, post(nodes::heartbeat))
        .route(paths::NODE_ASSIGNMENTS, get(nodes::assignments))
        .route(paths::NODE_STATUS, put(nodes::report_status))
        .route(paths::JOIN_TOKENS, post(pki::create_join_token))
        .route(paths::NODE_REVOKE, post(pki::revoke_node))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .route(paths::HEALTHZ, get(|| async { "ok\n" }))
        // No token: the CA certificate is public, and a join carries its own credential.
        .route(paths::CA, get(pki::ca_certificate))
        .route(paths::JOIN, post(pki::join))
        .merge(v1)
        .with_state(state)
}
