//! The L7 load balancer (HTTP/1.1).
//!
//! Routes come from the API (`/v1/routes`, long-polled); each applied table's revision is
//! reported in the proxy's leased heartbeat, which is what lets the controller stop a task only
//! once every live proxy has stopped sending it traffic. Two listeners: the public one serves
//! public routes, the internal one every route, including `/_/<service>` for discovery.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use dozen_api::lease::Registration;
use dozen_api::{Client, ProxyHeartbeat, ProxyRegisterRequest, RouteQuery};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub mod edge;
pub mod table;

pub use edge::{Cidr, Edge};
use table::Table;

type Body = BoxBody<Bytes, hyper::Error>;
/// A request body on its way to a target: held whole when small, else streamed.
type UpBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Largest request body the proxy passes on (streamed, never held whole).
const MAX_BODY: u64 = 1024 * 1024 * 1024;
/// A body up to this size (with its length known) is held, so a failed connect can be retried
/// on another target; a bigger one streams through and is not retried.
const RETRY_BODY: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub id: String,
    pub server: String,
    pub token: String,
    /// For `https://` servers: the cluster CA and the node's certificate.
    pub tls: Option<dozen_api::tls::ClientConfig>,
    pub upstream_timeout: Duration,
    /// What the proxy takes from clients: timeouts, connections, whose forwarded headers.
    pub edge: Edge,
}

struct Shared {
    table: RwLock<Arc<Table>>,
    client: hyper_util::client::legacy::Client<HttpConnector, UpBody>,
    timeout: Duration,
    edge: Edge,
}

/// Binds both listeners now (so callers learn their addresses), serves once `run` is polled.
pub struct Listeners {
    pub public: TcpListener,
    pub internal: TcpListener,
}

impl Listeners {
    pub async fn bind(public: SocketAddr, internal: SocketAddr) -> std::io::Result<Listeners> {
        Ok(Listeners {
            public: TcpListener::bind(public).await?,
            internal: TcpListener::bind(internal).await?,
        })
    }
}

/// Runs the proxy until the process ends.
pub async fn run(config: ProxyConfig, listeners: Listeners) -> anyhow::Result<()> {
    run_until(config, listeners, std::future::pending()).await
}

/// How long a stopping proxy waits for the requests in flight.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Runs the proxy until `stop` resolves, then stops accepting, lets every connection finish
/// the request it is serving (and closes it after that), and returns once they are done or
/// [`DRAIN_LIMIT`] has passed.
pub async fn run_until(
    config: ProxyConfig,
    listeners: Listeners,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let public_address = listeners.public.local_addr()?;
    let internal_address = listeners.internal.local_addr()?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(connector);
    let shared = Arc::new(Shared {
        table: RwLock::new(Arc::new(Table::default())),
        client,
        timeout: config.upstream_timeout,
        edge: config.edge.clone(),
    });
    tracing::info!(%public_address, %internal_address, "proxy listening");
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let public = tokio::spawn(serve(
        listeners.public,
        shared.clone(),
        false,
        stopped.clone(),
    ));
    let internal = tokio::spawn(serve(listeners.internal, shared.clone(), true, stopped));
    let routes = follow_routes(
        config,
        shared,
        ProxyRegisterRequest {
            public_address: format!("http://{public_address}"),
            internal_address: format!("http://{internal_address}"),
        },
    );
    tokio::select! {
        _ = routes => {}
        _ = stop => {}
    }
    tracing::info!("proxy stopping: no new connections; finishing the requests in flight");
    let _ = stopping.send(true);
    let drained = tokio::time::timeout(DRAIN_LIMIT, async {
        let _ = public.await;
        let _ = internal.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "proxy stopped with requests still in flight after {} s",
            DRAIN_LIMIT.as_secs()
        );
    }
    Ok(())
}

/// Long-polls the route table and heartbeats the applied revision.
async fn follow_routes(config: ProxyConfig, shared: Arc<Shared>, me: ProxyRegisterRequest) {
    let api = Client::with_tls(&config.server, &config.token, config.tls.clone());
    let registration = {
        let (api, api2, shared) = (api.clone(), api.clone(), shared.clone());
        let (id, id2) = (config.id.clone(), config.id.clone());
        Registration {
            what: "proxy",
            register: Box::new(move || {
                let (api, id, me) = (api.clone(), id.clone(), me.clone());
                Box::pin(async move { api.register_proxy(&id, &me).await })
            }),
            heartbeat: Box::new(move |lease| {
                let (api, id) = (api2.clone(), id2.clone());
                let applied_revision = shared.table.read().map(|t| t.revision).unwrap_or(0);
                Box::pin(async move {
                    api.proxy_heartbeat(
                        &id,
                        &ProxyHeartbeat {
                            lease,
                            applied_revision,
                        },
                    )
                    .await
                })
            }),
        }
    };
    let mut held = registration.register().await;
    let applied = Arc::new(Notify::new());
    {
        let applied = applied.clone();
        tokio::spawn(async move {
            loop {
                // Heartbeat on a timer, and at once when a new table is applied: the
                // controller is waiting for that acknowledgement to stop draining tasks.
                let _ = tokio::time::timeout(Duration::from_secs(2), applied.notified()).await;
                if registration.heartbeat(&mut held).await {
                    applied.notify_one();
                }
            }
        });
    }
    let mut after: Option<u64> = None;
    loop {
        let query = RouteQuery {
            after,
            wait_ms: Some(25_000),
        };
        match api.routes(&query).await {
            Ok(t) => {
                let changed = after != Some(t.revision);
                after = Some(t.revision);
                if changed {
                    let routes = t.routes.len();
                    let previous = shared.table.read().ok().map(|t| t.clone());
                    let table = Arc::new(Table::after(previous.as_deref(), t.revision, t.routes));
                    if let Ok(mut slot) = shared.table.write() {
                        *slot = table;
                    }
                    tracing::debug!(revision = t.revision, routes, "route table applied");
                    applied.notify_one();
                }
            }
            Err(e) => {
                // Keep serving the routes we have while the control plane is away.
                tracing::warn!(error = %e, "cannot fetch routes; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Resolves once the proxy is stopping (or whoever stops it is gone).
async fn until_stopped(stopped: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// Accepts and serves until `stopped` turns true; then stops accepting and returns once every
/// connection has finished what it was serving.
async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    internal: bool,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    // One permit per open client connection: past the cap a client gets a 503 at once, and
    // the proxy's descriptors and memory stay bounded.
    let cap = shared.edge.max_connections;
    let permits = Arc::new(tokio::sync::Semaphore::new(cap));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = until_stopped(&mut stopped) => break,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(edge::turn_away(stream, cap));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            // Held by the connection, and by what it is upgraded into.
            let permit = Arc::new(permit);
            let service = hyper::service::service_fn({
                let shared = shared.clone();
                let permit = permit.clone();
                move |req| {
                    let shared = shared.clone();
                    let permit = permit.clone();
                    async move {
                        let client = Caller {
                            peer,
                            internal,
                            permit,
                        };
                        Ok::<_, Infallible>(handle(&shared, req, client).await)
                    }
                }
            });
            // A client that is slow to send its headers (or to start its next request) is
            // cut off, as is one whose headers are too big (431).
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(shared.edge.header_read_timeout)
                .max_buf_size(edge::MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = until_stopped(&mut stopped) => {
                    // Finishes the request in flight, answers it with `Connection: close`.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    // Every permit back: every connection (and upgraded one) has ended.
    let _ = permits.acquire_many(cap as u32).await;
}

fn request_id(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{:016x}{:08x}",
        t ^ (u64::from(std::process::id()) << 40),
        n as u32
    )
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An error answer: a clear cause, the request id, nothing internal.
fn problem(status: StatusCode, message: String, id: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message, "request_id": id }).to_string() + "\n";
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("x-request-id", v);
    }
    resp
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Methods that may be sent twice (RFC 9110 §9.2.2): only these are retried once the request
/// went out.
fn is_idempotent(method: &hyper::Method) -> bool {
    matches!(
        *method,
        hyper::Method::GET
            | hyper::Method::HEAD
            | hyper::Method::OPTIONS
            | hyper::Method::PUT
            | hyper::Method::DELETE
    )
}

/// The target closed the connection before any answer: it was leaving (a stopping task may
/// drop the connections it still accepts) or it died. Whether it acted on the request is not
/// known, so only a method that may be sent twice goes to another target.
fn closed_without_answer(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            return h.is_incomplete_message();
        }
        source = err.source();
    }
    false
}

/// Whether `Connection` asks for an upgrade.
fn wants_upgrade(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Joins an upgraded client connection to the target's, bytes both ways until either ends.
async fn join_upgraded(
    client: hyper::upgrade::OnUpgrade,
    target: hyper::upgrade::OnUpgrade,
    _permit: Arc<tokio::sync::OwnedSemaphorePermit>,
) {
    let (Ok(client), Ok(target)) = (client.await, target.await) else {
        return;
    };
    let mut client = TokioIo::new(client);
    let mut target = TokioIo::new(target);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut target).await;
}

fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

/// Who a request came from, and the connection permit it holds.
struct Caller {
    peer: SocketAddr,
    /// Came in on the internal listener.
    internal: bool,
    permit: Arc<tokio::sync::OwnedSemaphorePermit>,
}

async fn handle(shared: &Shared, req: Request<Incoming>, client: Caller) -> Response<Body> {
    let Caller {
        peer,
        internal,
        permit,
    } = client;
    let id = request_id(&req);
    // hyper bounds the whole head by its buffer; the headers get a tighter bound of their own.
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > edge::MAX_HEADER_BYTES {
        return problem(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "request headers of {header_bytes} bytes; the proxy takes at most {} KiB",
                edge::MAX_HEADER_BYTES >> 10
            ),
            &id,
        );
    }
    let Some(host) = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            "the request has no Host header".into(),
            &id,
        );
    };
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let table = match shared.table.read() {
        Ok(t) => t.clone(),
        Err(_) => return problem(StatusCode::SERVICE_UNAVAILABLE, "no routes yet".into(), &id),
    };
    let path = req.uri().path();
    let found = table.find(&host, path, internal);
    // A discovery URL (`/_/<service>`) reaches that service or nothing: a mistyped name must
    // not fall through to whatever serves `/`.
    if let Some(name) = path.strip_prefix("/_/").filter(|_| internal) {
        if !found.is_some_and(|r| r.strip_prefix) {
            let name = name.split('/').next().unwrap_or(name);
            return problem(
                StatusCode::NOT_FOUND,
                format!(
                    "no service `{name}`: `/_/<service>` reaches a service by name (`dozen ps` lists them)"
                ),
                &id,
            );
        }
    }
    let Some(route) = found else {
        return problem(
            StatusCode::NOT_FOUND,
            format!("no route for host `{host}` and path `{}`", req.uri().path()),
            &id,
        );
    };
    let Some((target, retry)) = route.pick() else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no healthy target for service `{}`", route.service),
            &id,
        );
    };
    // An upgrade (WebSocket and the like): both sides' connections are joined once the target
    // agrees (101), and bytes flow both ways until either side closes.
    let upgrade = req
        .headers()
        .get(hyper::header::UPGRADE)
        .filter(|_| wants_upgrade(req.headers()))
        .cloned();
    let mut req = req;
    let client_side = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let length = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = parts.headers.contains_key(hyper::header::TRANSFER_ENCODING);
    if length.is_some_and(|n| n > MAX_BODY) {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {} MiB", MAX_BODY >> 20),
            &id,
        );
    }
    // Small and known: held for a retry. Anything else streams through as it comes.
    let (held, mut streamed) = if !chunked && length.unwrap_or(0) <= RETRY_BODY {
        match Limited::new(body, RETRY_BODY as usize).collect().await {
            Ok(b) => (Some(b.to_bytes()), None),
            Err(_) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "the request body was cut short or longer than its Content-Length".into(),
                    &id,
                )
            }
        }
    } else {
        let limited: UpBody = Limited::new(body, MAX_BODY as usize).boxed();
        (None, Some(limited))
    };
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = &upgrade {
        parts
            .headers
            .insert(hyper::header::UPGRADE, protocol.clone());
        parts.headers.insert(
            hyper::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
    // What a client says it forwarded is believed only from a trusted proxy; anyone else's
    // X-Forwarded-For and -Proto are replaced, so a backend never reads a forged address.
    let trusted = shared.edge.trusts(peer.ip());
    let given = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let forwarded_for = match given("x-forwarded-for").filter(|_| trusted) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    let proto = given("x-forwarded-proto")
        .filter(|p| trusted && (p == "http" || p == "https"))
        .unwrap_or_else(|| "http".into());
    let h = &mut parts.headers;
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        h.insert("x-forwarded-for", v);
    }
    if let Ok(v) = HeaderValue::from_str(&proto) {
        h.insert("x-forwarded-proto", v);
    }
    if let Ok(v) = HeaderValue::from_str(&host) {
        h.insert("x-forwarded-host", v);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-request-id", v);
    }
    let upstream_path = route.upstream_path(&path_and_query).into_owned();
    let mut attempt_target = target;
    let mut retried = false;
    loop {
        let uri = match format!("http://{attempt_target}{upstream_path}").parse::<hyper::Uri>() {
            Ok(u) => u,
            Err(_) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "malformed request path".into(),
                    &id,
                )
            }
        };
        let body: UpBody = match (&held, streamed.take()) {
            (Some(bytes), _) => Full::new(bytes.clone())
                .map_err(|never: Infallible| match never {})
                .boxed(),
            (None, Some(stream)) => stream,
            (None, None) => {
                // A streamed body goes once: it cannot be sent again.
                return problem(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "could not connect to a target of service `{}`",
                        route.service
                    ),
                    &id,
                );
            }
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = uri;
        // Kept for a second attempt only when one can happen.
        *upstream.headers_mut() = if !retried && retry.is_some() && held.is_some() {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let sent = tokio::time::timeout(shared.timeout, shared.client.request(upstream)).await;
        match sent {
            Ok(Ok(mut resp)) => {
                if let (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) =
                    (client_side, resp.status())
                {
                    let target_side = hyper::upgrade::on(&mut resp);
                    tokio::spawn(join_upgraded(client_side, target_side, permit));
                    let mut answer = Response::new(full(Bytes::new()));
                    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    for name in [hyper::header::UPGRADE, hyper::header::CONNECTION] {
                        if let Some(v) = resp.headers().get(&name) {
                            answer.headers_mut().insert(name, v.clone());
                        }
                    }
                    for (name, value) in resp.headers() {
                        if name.as_str().starts_with("sec-websocket-") {
                            answer.headers_mut().insert(name.clone(), value.clone());
                        }
                    }
                    return answer;
                }
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                if let Ok(v) = HeaderValue::from_str(&id) {
                    rparts.headers.insert("x-request-id", v);
                }
                return Response::from_parts(rparts, rbody.boxed());
            }
            Ok(Err(e))
                if !retried
                    && retry.is_some()
                    && held.is_some()
                    && (e.is_connect()
                        || (is_idempotent(&parts.method) && closed_without_answer(&e))) =>
            {
                tracing::info!(service = %route.service, target = attempt_target, request_id = %id, error = %e, "target failed before answering; retrying on another target");
                attempt_target = retry.unwrap_or(target);
                retried = true;
            }
            Ok(Err(e)) => {
                tracing::warn!(service = %route.service, target = attempt_target, request_id = %id, error = %e, "upstream failed");
                let what = if e.is_connect() {
                    "could not connect to"
                } else {
                    "lost the connection to"
                };
                return problem(
                    StatusCode::BAD_GATEWAY,
                    format!("{what} a target of service `{}`", route.service),
                    &id,
                );
            }
            Err(_) => {
                tracing::warn!(service = %route.service, target = attempt_target, request_id = %id, "upstream timed out");
                return problem(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "a target of service `{}` did not answer within {} s",
                        route.service,
                        shared.timeout.as_secs()
                    ),
                    &id,
                );
            }
        }
    }
}
