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
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;

mod access;
mod answer;
pub mod balance;
pub mod edge;
mod forward;
mod framing;
pub mod table;
pub mod tls;

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
    /// Log one request in this many (1: every one; 0: none).
    pub access_log_every: u64,
    /// Access lines in JSON (as the rest of the log, `--log-format json`).
    pub access_log_json: bool,
    /// The certificate directory of the TLS listener (when there is one).
    pub certs: Option<std::path::PathBuf>,
}

struct Shared {
    table: RwLock<Arc<Table>>,
    client: hyper_util::client::legacy::Client<HttpConnector, UpBody>,
    timeout: Duration,
    edge: Edge,
    access: access::AccessLog,
}

/// Binds both listeners now (so callers learn their addresses), serves once `run` is polled.
pub struct Listeners {
    pub public: TcpListener,
    pub internal: TcpListener,
    /// Public too, with TLS terminated (HTTP/2 and HTTP/1.1).
    pub secure: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(public: SocketAddr, internal: SocketAddr) -> std::io::Result<Listeners> {
        Ok(Listeners {
            public: TcpListener::bind(public).await?,
            internal: TcpListener::bind(internal).await?,
            secure: None,
        })
    }

    /// Adds the TLS listener.
    pub async fn with_secure(mut self, secure: SocketAddr) -> std::io::Result<Listeners> {
        self.secure = Some(TcpListener::bind(secure).await?);
        Ok(self)
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
    let terminator = match (&listeners.secure, &config.certs) {
        (Some(_), Some(dir)) => Some(Arc::new(
            tls::Terminator::new(dir).map_err(|e| anyhow::anyhow!(e))?,
        )),
        (Some(_), None) => anyhow::bail!("a TLS listener needs a certificate directory"),
        _ => None,
    };
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
        access: access::AccessLog::new(config.access_log_every, config.access_log_json),
    });
    tracing::info!(%public_address, %internal_address, "proxy listening");
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let flushing = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(access::FLUSH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                shared.access.flush();
            }
        })
    };
    let plain = |internal| Listener {
        internal,
        tls: None,
    };
    let public = tokio::spawn(serve(
        listeners.public,
        shared.clone(),
        plain(false),
        stopped.clone(),
    ));
    let secure = match (listeners.secure, terminator) {
        (Some(listener), Some(terminator)) => {
            tracing::info!(secure_address = %listener.local_addr()?, "TLS listener ready");
            let reloading = tokio::spawn(terminator.clone().reload_forever());
            let kind = Listener {
                internal: false,
                tls: Some(terminator),
            };
            Some((
                tokio::spawn(serve(listener, shared.clone(), kind, stopped.clone())),
                reloading,
            ))
        }
        _ => None,
    };
    let internal = tokio::spawn(serve(
        listeners.internal,
        shared.clone(),
        plain(true),
        stopped,
    ));
    let routes = follow_routes(
        config,
        shared.clone(),
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
        if let Some((secure, reloading)) = secure {
            let _ = secure.await;
            reloading.abort();
        }
    })
    .await;
    flushing.abort();
    shared.access.flush();
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
                    let revision = t.revision;
                    let table = Arc::new(Table::after(previous.as_deref(), t));
                    if let Ok(mut slot) = shared.table.write() {
                        *slot = table;
                    }
                    tracing::debug!(revision, routes, "route table applied");
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
/// What a listener serves.
#[derive(Clone)]
struct Listener {
    /// Every rule, internal ones too (service-to-service).
    internal: bool,
    /// TLS terminated here.
    tls: Option<Arc<tls::Terminator>>,
}

/// Accepts and serves until `stopped` turns true; then stops accepting and returns once every
/// connection has finished what it was serving.
async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    kind: Listener,
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
        let stopped = stopped.clone();
        let kind = kind.clone();
        tokio::spawn(async move {
            let caller = Caller {
                peer,
                internal: kind.internal,
                tls: kind.tls.is_some(),
                framing: None,
                // Held by the connection, and by what it is upgraded into.
                permit: Arc::new(permit),
            };
            let limit = shared.edge.header_read_timeout;
            match &kind.tls {
                None => {
                    // HTTP/2 without TLS (h2c) starts with its preface; anything else is
                    // HTTP/1. A client that sends nothing is cut off like a slow one.
                    let Ok(Some((stream, h2))) =
                        tokio::time::timeout(limit, edge::sniff_h2(stream)).await
                    else {
                        return;
                    };
                    connection(stream, h2, shared, caller, stopped).await
                }
                Some(t) => {
                    let Ok(Ok(tls)) = tokio::time::timeout(limit, t.acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    connection(tls, h2, shared, caller, stopped).await
                }
            }
        });
    }
    drop(listener);
    // Every permit back: every connection (and upgraded one) has ended.
    let _ = permits.acquire_many(cap as u32).await;
}

/// Serves one client connection, HTTP/1.1 or HTTP/2, until it ends or the proxy stops (then
/// the request in flight is finished first).
async fn connection<S>(
    stream: S,
    h2: bool,
    shared: Arc<Shared>,
    mut caller: Caller,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let stream = if h2 {
        framing::Watched::unwatched(stream)
    } else {
        let (stream, verdicts) = framing::Watched::new(stream);
        caller.framing = Some(verdicts);
        stream
    };
    let io = TokioIo::new(stream);
    // When the connection last started a request, and how many it has in flight: an HTTP/2
    // connection that stays without any for the header timeout is closed, as an idle HTTP/1
    // one is.
    let activity = Arc::new(Activity {
        last_ms: std::sync::atomic::AtomicU64::new(balance::now_ms()),
        in_flight: std::sync::atomic::AtomicUsize::new(0),
    });
    let service = hyper::service::service_fn({
        let shared = shared.clone();
        let activity = activity.clone();
        move |req| {
            let shared = shared.clone();
            let caller = caller.clone();
            let activity = activity.clone();
            async move {
                let _busy = activity.start();
                Ok::<_, Infallible>(handle(&shared, req, caller).await)
            }
        }
    });
    if h2 {
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .max_header_list_size(edge::MAX_HEADER_BYTES as u32)
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20))
            .serve_connection(io, service);
        tokio::pin!(connection);
        let idle = shared.edge.header_read_timeout;
        let stopping = loop {
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = until_stopped(&mut stopped) => break true,
                _ = tokio::time::sleep(idle / 4) => {
                    if activity.idle_for(idle) {
                        tracing::debug!("closing an idle HTTP/2 connection");
                        break false;
                    }
                }
            }
        };
        // GOAWAY: streams in flight finish, no new ones start. An idle peer gets as long
        // again to take it (hyper waits for its ping's answer), then is dropped.
        connection.as_mut().graceful_shutdown();
        if stopping {
            let _ = connection.await;
        } else {
            let _ = tokio::time::timeout(idle, connection).await;
        }
        return;
    }
    // A client that is slow to send its headers (or to start its next request) is cut off,
    // as is one whose headers are too big (431).
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(shared.edge.header_read_timeout)
        .max_buf_size(edge::MAX_HEADER_BYTES)
        .serve_connection(io, service)
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
    // Once: getpid is a system call each time it is asked.
    static PROCESS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let process = *PROCESS.get_or_init(|| u64::from(std::process::id()) << 40);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{:016x}{:08x}", t ^ process, n as u32)
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

/// A connection's requests: when the last one started, and how many are being handled.
struct Activity {
    last_ms: std::sync::atomic::AtomicU64,
    in_flight: std::sync::atomic::AtomicUsize,
}

/// Counts a request as being handled until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn start(self: &Arc<Self>) -> Busy {
        use std::sync::atomic::Ordering::Relaxed;
        self.last_ms.store(balance::now_ms(), Relaxed);
        self.in_flight.fetch_add(1, Relaxed);
        Busy(self.clone())
    }

    /// Nothing in flight, and nothing started for `limit`.
    fn idle_for(&self, limit: Duration) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.in_flight.load(Relaxed) == 0
            && balance::now_ms().saturating_sub(self.last_ms.load(Relaxed))
                >= limit.as_millis() as u64
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.0.last_ms.store(balance::now_ms(), Relaxed);
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Who a request came from, and the connection permit it holds.
#[derive(Clone)]
struct Caller {
    peer: SocketAddr,
    /// Came in on the internal listener.
    internal: bool,
    /// Came in over TLS.
    tls: bool,
    /// HTTP/1: which requests had both Content-Length and Transfer-Encoding.
    framing: Option<framing::Verdicts>,
    permit: Arc<tokio::sync::OwnedSemaphorePermit>,
}

async fn handle(shared: &Shared, req: Request<Incoming>, caller: Caller) -> Response<Body> {
    let id = request_id(&req);
    if let Some(verdicts) = &caller.framing {
        let refused = match framing::next(verdicts) {
            framing::Verdict::Clean => None,
            framing::Verdict::Ambiguous => Some(
                "the request has both Content-Length and Transfer-Encoding, so its length is ambiguous; send one of them",
            ),
            framing::Verdict::Unfollowed => Some(
                "the proxy could not follow this connection's framing (a line too long, a chunk not ended by CRLF, or too many requests sent ahead); open a new connection",
            ),
        };
        if let Some(why) = refused {
            let mut answer = problem(StatusCode::BAD_REQUEST, why.into(), &id);
            answer
                .headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            return answer;
        }
    }
    if req.method() == hyper::Method::CONNECT {
        return problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT: the proxy routes requests to services, it does not open tunnels".into(),
            &id,
        );
    }
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
    if req.uri().path_and_query().map_or(0, |p| p.as_str().len()) > edge::MAX_URI_BYTES {
        return problem(
            StatusCode::URI_TOO_LONG,
            format!(
                "the request's path and query are over {} KiB",
                edge::MAX_URI_BYTES >> 10
            ),
            &id,
        );
    }
    if !edge::host_is_valid(&host) {
        return problem(
            StatusCode::BAD_REQUEST,
            "the Host header is not a host name with an optional port".into(),
            &id,
        );
    }
    let table = match shared.table.read() {
        Ok(t) => t.clone(),
        Err(_) => return problem(StatusCode::SERVICE_UNAVAILABLE, "no routes yet".into(), &id),
    };
    // What a client says it forwarded is believed only from a trusted proxy; anyone else's
    // X-Forwarded-For and -Proto are replaced, so a backend never reads a forged address.
    let forwarded = shared
        .edge
        .forwarded(caller.peer.ip(), req.headers(), caller.tls);
    let path = req.uri().path();
    let view = table::Request {
        scheme: forwarded.proto,
        host: &host,
        path,
        query: req.uri().query(),
        method: req.method().as_str(),
        headers: req.headers(),
        client: forwarded.client,
        internal: caller.internal,
    };
    let found = table.find(&view);
    // A discovery URL (`/_/<service>`) reaches that service or nothing: a mistyped name must
    // not fall through to whatever serves `/`.
    if let Some(name) = path.strip_prefix("/_/").filter(|_| caller.internal) {
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
    let Some(rule) = found else {
        return problem(
            StatusCode::NOT_FOUND,
            format!("no route for host `{host}` and path `{path}`"),
            &id,
        );
    };
    match &rule.action {
        table::Action::Redirect(r) => {
            let location = answer::location(r, forwarded.proto, &host, req.uri());
            shared.access.log(access::Line {
                service: &rule.service,
                method: req.method(),
                uri: req.uri(),
                host: &host,
                target: "-",
                status: r.status,
                elapsed_ms: 0,
                id: &id,
            });
            return answer::redirect(r.status, &location, &id);
        }
        table::Action::Respond(f) => {
            shared.access.log(access::Line {
                service: &rule.service,
                method: req.method(),
                uri: req.uri(),
                host: &host,
                target: "-",
                status: f.status,
                elapsed_ms: 0,
                id: &id,
            });
            return answer::fixed(f, &id);
        }
        table::Action::Forward { .. } => {}
    }
    let Some((group, pick)) = rule.pick(req.headers()) else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no healthy target for service `{}`", rule.service),
            &id,
        );
    };
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let how = forward::Forward {
        rule,
        group,
        pick,
        host,
        path_and_query,
        forwarded_for: forwarded.forwarded_for,
        proto: forwarded.proto,
        id,
    };
    forward::forward(shared, req, caller, how).await
}
