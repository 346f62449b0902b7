//! `dozen server` and `dozen agent`: the long-running modes.

pub use crate::proxy_flags::ProxyListenArgs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use dozen_agent::AgentConfig;
use dozen_control::controller::Controller;
use dozen_store::embedded::EmbeddedStore;
use dozen_store::Store;

use crate::Global;

#[derive(Args, Debug)]
pub struct ServerArgs {
    #[command(flatten)]
    pub root_key: crate::master_key::RootKeyArgs,
    /// Address the API listens on. Plain HTTP: keep it on loopback.
    #[arg(long, env = "DOZEN_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Where control records live: `embedded` (in <data-dir>/store; one server) or an etcd
    /// cluster, `etcd://h1:2379,h2:2379,h3:2379` (`etcds://` for TLS). Give every server
    /// of a cluster the same --store, token (--token-file) and root key.
    #[arg(long, env = "DOZEN_STORE", default_value = "embedded")]
    pub store: String,
    /// CA certificate (PEM) that signed the etcd members' certificates (etcds://).
    #[arg(long, env = "DOZEN_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd members that require one (with --etcd-key).
    #[arg(long, env = "DOZEN_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Key (PEM) of --etcd-cert.
    #[arg(long, env = "DOZEN_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user name, when etcd authentication is on (password: --etcd-password-file).
    #[arg(long, env = "DOZEN_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, env = "DOZEN_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// Read the operator token from this file (the same on every server of a cluster)
    /// instead of <data-dir>/token.
    #[arg(long, env = "DOZEN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Lease of the controller leader: when the leader dies, another server takes over
    /// within this time (etcd rounds up to whole seconds and enforces its own minimum).
    #[arg(long, env = "DOZEN_LEADER_TTL", default_value = "2s", value_parser = parse_duration)]
    pub leader_ttl: Duration,
    /// Directory of the cluster CA (`ca.crt`, `ca.key`; made by `dozen ca init`). With it the
    /// API is served over TLS with a certificate issued at start, nodes present
    /// certificates, and `dozen node join` works. Required unless --listen is loopback.
    #[arg(long, env = "DOZEN_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Another name or address clients use to reach this server (for its certificate);
    /// repeat as needed. The host name, localhost and 127.0.0.1 are always in it.
    #[arg(long = "tls-san", env = "DOZEN_TLS_SAN", value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// The URL the other servers use to reach this one (to fetch a blob a client uploaded
    /// here). Default: the listen address if it is a specific one, else the first --tls-san,
    /// else the host name; with the listen port.
    #[arg(long, env = "DOZEN_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Do not run a node agent in this process (run `dozen agent` separately).
    #[arg(long, env = "DOZEN_NO_AGENT")]
    pub no_agent: bool,
    /// How long a node stays alive without heartbeats.
    #[arg(long, env = "DOZEN_NODE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub node_ttl: Duration,
    /// Releases kept per service (older ones are deleted as new ones are made; the current
    /// release and any a task still runs are always kept).
    #[arg(long, env = "DOZEN_KEEP_RELEASES", default_value_t = dozen_control::desired::DEFAULT_KEEP_RELEASES as u64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub keep_releases: u64,
    /// Revisions of store history kept for watchers: the leader compacts the store's history
    /// behind them every 5 minutes. 0 never compacts (for an etcd shared with others that
    /// compacts itself, e.g. with --auto-compaction-retention).
    #[arg(long, env = "DOZEN_HISTORY_WINDOW", default_value_t = dozen_control::controller::HISTORY_WINDOW)]
    pub history_window: u64,
    /// Do not run a proxy in this process.
    #[arg(long, env = "DOZEN_NO_PROXY")]
    pub no_proxy: bool,
    #[command(flatten)]
    pub proxy: ProxyListenArgs,
    #[command(flatten)]
    pub agent: NodeArgs,
}

#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// Name of this proxy. Default: the host name.
    #[arg(long, env = "DOZEN_PROXY_ID")]
    pub id: Option<String>,
    /// Read the API token from this file instead of --token.
    #[arg(long, env = "DOZEN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub listen: ProxyListenArgs,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Read the API token from this file instead of --token.
    #[arg(long, env = "DOZEN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Also run this node's proxy in the same process (its internal listener becomes the
    /// tasks' `<SERVICE>_URL`).
    #[arg(long, env = "DOZEN_WITH_PROXY")]
    pub with_proxy: bool,
    #[command(flatten)]
    pub proxy: ProxyListenArgs,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// Name of this node. Default: the host name.
    #[arg(long, env = "DOZEN_NODE_NAME")]
    pub node_name: Option<String>,
    /// Where the agent serves task logs to the API server.
    #[arg(long, env = "DOZEN_AGENT_LISTEN", default_value = "127.0.0.1:0")]
    pub agent_listen: SocketAddr,
    /// Host ports handed to tasks as $PORT, e.g. 20000-29999.
    #[arg(long, env = "DOZEN_PORT_RANGE", default_value = "20000-29999", value_parser = parse_range)]
    pub port_range: (u16, u16),
    /// CPU this node offers to tasks, in millicores. Default: every core.
    #[arg(long, env = "DOZEN_NODE_CPU")]
    pub cpu_millis: Option<u64>,
    /// Memory this node offers to tasks, in MiB. Default: all of it.
    #[arg(long, env = "DOZEN_NODE_MEMORY_MIB")]
    pub memory_mib: Option<u64>,
    /// Root of the cgroup file system (limits are set there when writable).
    #[arg(long, env = "DOZEN_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// The address proxies use to reach this node's tasks.
    #[arg(long, env = "DOZEN_ADVERTISE_HOST", default_value = "127.0.0.1")]
    pub advertise_host: String,
    /// The node's proxy, internal listener: tasks get `<SERVICE>_URL` pointing there.
    #[arg(
        long,
        env = "DOZEN_PROXY_INTERNAL_URL",
        default_value = "http://127.0.0.1:7781"
    )]
    pub proxy_internal_url: String,
    /// Who runs tasks whose service sets no `user`. Default: `nobody` when dozen runs as
    /// root (a task must not read dozen's keys and token), else dozen's own user. A user name,
    /// uid or uid:gid; `root` keeps tasks as root.
    #[arg(long, env = "DOZEN_TASK_USER")]
    pub task_user: Option<String>,
    /// A label of this node, KEY=VALUE (repeat for more): services that ask for it with
    /// `node_labels` run only on nodes that have it.
    #[arg(long = "label", value_parser = crate::node_flags::parse_label)]
    pub labels: Vec<(String, String)>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::commands::parse_duration(s)
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("`{s}` is not a port range; write it like 20000-29999"))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("`{a}` is not a port"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("`{b}` is not a port"))?;
    if a == 0 || a > b {
        return Err(format!("`{s}`: the range must be low-high with low >= 1"));
    }
    Ok((a, b))
}

/// A random hex string from the kernel's generator.
fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads `path`, or creates it (mode 0600) with a fresh random value.
fn read_or_create_secret(path: &Path, bytes: usize) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let value = random_hex(bytes)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(value.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(value)
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn agent_config(
    node: &NodeArgs,
    server: String,
    token: String,
    data_dir: PathBuf,
) -> anyhow::Result<AgentConfig> {
    let exe = std::env::current_exe().context("cannot find the dozen binary for the shim")?;
    Ok(AgentConfig {
        server,
        token,
        tls: None,
        identity: None,
        data_dir,
        node_name: node
            .node_name
            .clone()
            .unwrap_or_else(dozen_agent::os::hostname),
        listen: node.agent_listen,
        port_range: node.port_range.0..=node.port_range.1,
        cpu_millis: node.cpu_millis.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u64 * 1000)
                .unwrap_or(1000)
        }),
        memory_bytes: node
            .memory_mib
            .map(|m| m * 1024 * 1024)
            .unwrap_or_else(dozen_agent::os::total_memory_bytes),
        exe,
        cgroup_root: node.cgroup_root.clone(),
        host: node.advertise_host.clone(),
        proxy_internal_url: node.proxy_internal_url.clone(),
        task_user: crate::node_flags::task_user(node.task_user.as_deref())?,
        labels: node.labels.iter().cloned().collect(),
    })
}

/// Binds the proxy's public and internal listeners, naming the flags when that fails.
/// `optional`: the command can also run without its proxy (`--no-proxy`), and says so.
async fn bind_proxy(
    listen: &ProxyListenArgs,
    optional: bool,
) -> anyhow::Result<dozen_proxy::Listeners> {
    let or_none = if optional {
        ", or run without a proxy (--no-proxy)"
    } else {
        ""
    };
    // One listener at a time, so the sentence names the one that failed and its flag.
    let bind = |address: std::net::SocketAddr, flag: &'static str| async move {
        tokio::net::TcpListener::bind(address).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {address} for the proxy ({e}): free that port or choose \
                 another with {flag}{or_none}"
            )
        })
    };
    let secure = match (listen.proxy_tls_listen, &listen.proxy_certs) {
        (Some(address), Some(dir)) => {
            // Bad certificates stop the start, saying which file and why.
            dozen_proxy::tls::load(dir).map_err(|e| anyhow::anyhow!("--proxy-certs: {e}"))?;
            Some(bind(address, "--proxy-tls-listen").await?)
        }
        _ => None,
    };
    Ok(dozen_proxy::Listeners {
        public: bind(listen.proxy_listen, "--proxy-listen").await?,
        internal: bind(listen.proxy_internal_listen, "--proxy-internal-listen").await?,
        secure,
    })
}

/// Where this process reaches a listener of its own: loopback when it listens everywhere.
/// The URL the other servers use to reach this one: --advertise-url, else the listen address
/// when it is a specific one, else the first --tls-san, else the host name.
fn advertised_url(args: &ServerArgs, address: SocketAddr, tls: bool) -> String {
    if let Some(url) = &args.advertise_url {
        return url.trim_end_matches('/').to_string();
    }
    let scheme = if tls { "https" } else { "http" };
    if !address.ip().is_unspecified() {
        return format!("{scheme}://{address}");
    }
    let host = args
        .tls_san
        .first()
        .cloned()
        .unwrap_or_else(dozen_agent::os::hostname);
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => format!("{scheme}://{}", SocketAddr::new(ip, address.port())),
        Err(_) => format!("{scheme}://{host}:{}", address.port()),
    }
}

fn reachable(address: SocketAddr) -> SocketAddr {
    if address.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], address.port()))
    } else {
        address
    }
}

/// Opens the store `--store` names.
async fn open_store(data: &Path, args: &ServerArgs) -> anyhow::Result<Arc<dyn Store>> {
    let spec = args.store.trim();
    if spec == "embedded" {
        let dir = data.join("store");
        let store = EmbeddedStore::open(&dir)
            .with_context(|| format!("cannot open the store in {}", dir.display()))?;
        return Ok(Arc::new(store));
    }
    let (scheme, hosts) = spec.split_once("://").with_context(|| {
        format!("--store `{spec}`: write `embedded` or `etcd://host:2379,host:2379`")
    })?;
    let tls = match scheme {
        "etcd" => false,
        "etcds" => true,
        other => bail!(
            "--store `{spec}`: unknown store `{other}`; write `embedded`, `etcd://...` or `etcds://...`"
        ),
    };
    let endpoints: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("{}://{h}", if tls { "https" } else { "http" }))
        .collect();
    if endpoints.is_empty() {
        bail!("--store `{spec}` names no etcd member; write `etcd://host:2379,host:2379`");
    }
    connect_etcd(endpoints, tls, args).await
}

#[cfg(feature = "etcd")]
async fn connect_etcd(
    endpoints: Vec<String>,
    tls: bool,
    args: &ServerArgs,
) -> anyhow::Result<Arc<dyn Store>> {
    use dozen_store::etcd::{EtcdOptions, EtcdStore, EtcdTls};
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
    };
    let tls = if tls {
        Some(EtcdTls {
            ca_pem: args
                .etcd_ca
                .as_ref()
                .map(|p| read(p, "etcd CA (--etcd-ca)"))
                .transpose()?,
            identity_pem: match (&args.etcd_cert, &args.etcd_key) {
                (Some(cert), Some(key)) => Some((
                    read(cert, "etcd client certificate (--etcd-cert)")?,
                    read(key, "etcd client key (--etcd-key)")?,
                )),
                _ => None,
            },
        })
    } else {
        if args.etcd_ca.is_some() || args.etcd_cert.is_some() {
            bail!("--etcd-ca/--etcd-cert need TLS: write the store as etcds://...");
        }
        None
    };
    let user = match (&args.etcd_user, &args.etcd_password_file) {
        (Some(user), Some(file)) => {
            let password = std::fs::read_to_string(file).with_context(|| {
                format!("cannot read the etcd password file {}", file.display())
            })?;
            Some((user.clone(), password.trim().to_string()))
        }
        _ => None,
    };
    let options = EtcdOptions {
        endpoints,
        tls,
        user,
    };
    let store = EtcdStore::connect_with(&options)
        .await
        .with_context(|| format!("cannot connect to etcd at {}", options.endpoints.join(",")))?;
    // Fail now, naming the cluster, rather than at the first request.
    store
        .revision()
        .await
        .with_context(|| format!("etcd at {} does not answer", options.endpoints.join(",")))?;
    tracing::info!(endpoints = %options.endpoints.join(","), "store: etcd");
    Ok(Arc::new(store))
}

#[cfg(not(feature = "etcd"))]
async fn connect_etcd(
    _endpoints: Vec<String>,
    _tls: bool,
    _args: &ServerArgs,
) -> anyhow::Result<Arc<dyn Store>> {
    bail!(
        "this dozen was built without etcd support; build it with \
         `cargo build --release --features etcd` (needs protoc: apt-get install protobuf-compiler)"
    )
}

/// A running control plane (and agent) inside this process.
pub struct Running {
    /// Where this process reaches its own API (`http://` or `https://`, on loopback when the
    /// server listens on every interface).
    pub url: String,
    /// Trust for `https://` (the cluster CA).
    pub tls: Option<dozen_api::tls::ClientConfig>,
    pub token: String,
    /// The in-process proxy's public URL.
    pub proxy_url: Option<String>,
    api: tokio::task::JoinHandle<std::io::Result<()>>,
    store: Arc<dyn Store>,
    server_id: String,
}

/// The server's side of TLS: the CA it signs with, and its own serving configuration.
struct ServerTls {
    ca: Arc<dozen_api::tls::Ca>,
    config: Arc<rustls::ServerConfig>,
    /// Trust in the CA plus this server's certificate, for reaching agents.
    agent_client: dozen_api::tls::ClientConfig,
    /// The same, requiring a server certificate on the other end, for reaching peers.
    peer_client: dozen_api::tls::ClientConfig,
}

fn server_tls(args: &ServerArgs) -> anyhow::Result<Option<ServerTls>> {
    let Some(dir) = &args.ca_dir else {
        if !args.listen.ip().is_loopback() {
            bail!(
                "--listen {}: plain HTTP is only for loopback. For other machines give the \
                 cluster CA with --ca-dir (make one with `dozen ca init`), so the API is served \
                 over TLS",
                args.listen
            );
        }
        return Ok(None);
    };
    let ca = dozen_api::tls::Ca::load(dir)
        .with_context(|| format!("cannot load the cluster CA from {}", dir.display()))?;
    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        dozen_agent::os::hostname(),
    ];
    if !args.listen.ip().is_unspecified() {
        hosts.push(args.listen.ip().to_string());
    }
    hosts.extend(args.tls_san.iter().cloned());
    hosts.sort();
    hosts.dedup();
    let issued = ca
        .issue_server(&hosts)
        .context("cannot issue this server's certificate")?;
    let config = dozen_api::tls::server_config(&issued.cert_pem, &issued.key_pem, &ca.cert_pem)?;
    let agent_client =
        dozen_api::tls::agent_client_config(&ca.cert_pem, (&issued.cert_pem, &issued.key_pem))?;
    let peer_client =
        dozen_api::tls::client_config(&ca.cert_pem, Some((&issued.cert_pem, &issued.key_pem)))?;
    tracing::info!(names = %hosts.join(","), serial = %issued.serial, "serving the API over TLS");
    Ok(Some(ServerTls {
        ca: Arc::new(ca),
        config,
        agent_client,
        peer_client,
    }))
}

/// Opens the store, starts the controller, the API and (unless `no_agent`) an agent.
pub async fn start_server(global: &Global, args: &ServerArgs) -> anyhow::Result<Running> {
    let data = &global.data_dir;
    dozen_agent::os::private_dir(data)
        .with_context(|| format!("cannot create data dir {}", data.display()))?;
    let token = match (&global.token, &args.token_file) {
        (None, None) => read_or_create_secret(&data.join("token"), 32)?,
        _ => token_for(global, &args.token_file, "server")?,
    };
    if token.len() < 16 {
        bail!(
            "the API token is too short ({} characters); use at least 16 random characters",
            token.len()
        );
    }
    let tls = server_tls(args)?;
    let server_id = read_or_create_secret(&data.join("server-id"), 8)?;
    let store = open_store(data, args).await?;
    // The parameter store's keys open with the root key, or nothing starts (and nothing is
    // written).
    let (params, audit) = crate::master_key::open_param_store(
        data,
        args.ca_dir.as_deref(),
        &args.root_key,
        &store,
        &server_id,
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}: is another dozen server running? (--listen / DOZEN_LISTEN)",
                args.listen
            )
        })?;
    let address = listener.local_addr()?;
    let controller = Controller {
        store: store.clone(),
        server_id: server_id.clone(),
        leader_ttl: args.leader_ttl,
        node_ttl: args.node_ttl,
        history_window: args.history_window,
    };
    tokio::spawn(controller.run());
    let blobs = dozen_store::blob::FsBlobStore::new(data.join("blobs")).with_context(|| {
        format!(
            "cannot open the blob store in {}",
            data.join("blobs").display()
        )
    })?;
    let mut state =
        dozen_server::AppState::new(store.clone(), Arc::new(blobs), token.clone(), args.node_ttl);
    state.server_id = server_id.clone();
    state.retention = dozen_control::desired::Retention {
        keep_releases: args.keep_releases as usize,
    };
    state.store_kind = if args.store.trim() == "embedded" {
        "embedded"
    } else {
        "etcd"
    }
    .into();
    state.ca = tls.as_ref().map(|t| t.ca.clone());
    state.agent_tls = tls.as_ref().map(|t| t.agent_client.clone());
    state.peer_client = match &tls {
        Some(t) => Some(
            reqwest::Client::builder()
                .use_preconfigured_tls(t.peer_client.clone())
                .connect_timeout(Duration::from_secs(3))
                .build()
                .context("cannot set up the client for peer servers")?,
        ),
        None => None,
    };
    state.params = Some(params.clone());
    state.audit = Some(audit);
    let state = Arc::new(state);
    tokio::spawn(crate::master_key::params_loop(
        params,
        store.clone(),
        state.retention,
        args.root_key.param_check_every,
        server_id.clone(),
    ));
    tokio::spawn(dozen_server::blobs::collect_loop(state.clone()));
    let advertised = advertised_url(args, address, tls.is_some());
    tokio::spawn(dozen_server::register_with_peers(
        store.clone(),
        server_id.clone(),
        advertised.clone(),
    ));
    let local = reachable(address);
    let (url, client_tls, api) = match &tls {
        Some(t) => (
            format!("https://{local}"),
            Some(dozen_api::tls::client_config(&t.ca.cert_pem, None)?),
            tokio::spawn(dozen_server::serve_tls(listener, state, t.config.clone())),
        ),
        None => (
            format!("http://{local}"),
            None,
            tokio::spawn(dozen_server::serve(listener, state)),
        ),
    };
    tracing::info!(%address, %url, %advertised, data_dir = %data.display(), "dozen server listening");
    let mut node = args.agent.clone();
    let mut proxy_url = None;
    if !args.no_proxy {
        let listeners = bind_proxy(&args.proxy, true).await?;
        let public = listeners.public.local_addr()?;
        let internal = listeners.internal.local_addr()?;
        proxy_url = Some(format!("http://{public}"));
        // Tasks on this node reach other services through this proxy.
        node.proxy_internal_url = format!("http://{}", reachable(internal));
        let config = dozen_proxy::ProxyConfig {
            id: node
                .node_name
                .clone()
                .unwrap_or_else(dozen_agent::os::hostname),
            server: url.clone(),
            token: token.clone(),
            tls: client_tls.clone(),
            upstream_timeout: args.proxy.proxy_timeout,
            edge: args.proxy.edge(),
            access_log_every: args.proxy.proxy_access_log_every,
            access_log_json: matches!(global.log_format, crate::LogFormat::Json),
            certs: args.proxy.proxy_certs.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = dozen_proxy::run(config, listeners).await {
                tracing::error!(error = %e, "proxy failed");
            }
        });
    }
    if !args.no_agent {
        let mut config = agent_config(&node, url.clone(), token.clone(), data.join("agent"))?;
        config.tls = client_tls.clone();
        tokio::spawn(async move {
            if let Err(e) = dozen_agent::run(config, std::future::pending()).await {
                tracing::error!(error = %e, "agent failed");
            }
        });
    }
    Ok(Running {
        url,
        tls: client_tls,
        token,
        api,
        proxy_url,
        store,
        server_id,
    })
}

pub async fn server(global: &Global, args: ServerArgs) -> anyhow::Result<()> {
    let running = start_server(global, &args).await?;
    tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down; tasks keep running (use `dozen down` to stop them)");
            dozen_control::leader::resign_if_leading(running.store.as_ref(), &running.server_id)
                .await;
        }
        r = running.api => {
            if let Ok(Err(e)) = r {
                bail!("API server failed: {e}");
            }
        }
    }
    Ok(())
}

fn token_for(global: &Global, token_file: &Option<PathBuf>, what: &str) -> anyhow::Result<String> {
    Ok(match (&global.token, token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("cannot read token file {}", file.display()))?
            .trim()
            .to_string(),
        (None, None) => bail!(
            "the {what} needs the server's API token: pass --token (DOZEN_TOKEN) or --token-file"
        ),
    })
}

/// The credentials of an agent or proxy: a node certificate from `dozen node join` (then no
/// token is needed, and the node is named as the certificate says), else the token.
struct NodeCredentials {
    token: String,
    tls: Option<dozen_api::tls::ClientConfig>,
    identity: Option<dozen_api::tls::NodeIdentity>,
    certified_name: Option<String>,
}

fn node_credentials(
    global: &Global,
    token_file: &Option<PathBuf>,
    what: &str,
) -> anyhow::Result<NodeCredentials> {
    let (tls, identity) = crate::identity::node_tls(global)?;
    let certified_name = identity
        .as_ref()
        .and_then(|id| dozen_api::tls::peer_identity_pem(&id.cert_pem))
        .map(|id| id.name);
    let token = match (&certified_name, token_for(global, token_file, what)) {
        (_, Ok(token)) => token,
        (Some(_), Err(_)) => String::new(),
        (None, Err(e)) => {
            if global.server().contains("https://") {
                return Err(e.context(format!(
                    "or join this machine first: `dozen node join --token ... --ca-hash ...` \
                     (with the same --data-dir, {})",
                    global.data_dir.display()
                )));
            }
            return Err(e);
        }
    };
    Ok(NodeCredentials {
        token,
        tls,
        identity,
        certified_name,
    })
}

fn node_name(given: &Option<String>, credentials: &NodeCredentials) -> anyhow::Result<String> {
    match (given, &credentials.certified_name) {
        (Some(given), Some(cert)) if given != cert => bail!(
            "--node-name {given}: this node's certificate names it `{cert}`; drop --node-name \
             or join again under the new name"
        ),
        (Some(given), _) => Ok(given.clone()),
        (None, Some(cert)) => Ok(cert.clone()),
        (None, None) => Ok(dozen_agent::os::hostname()),
    }
}

pub async fn proxy(global: &Global, args: ProxyArgs) -> anyhow::Result<()> {
    let credentials = node_credentials(global, &args.token_file, "proxy")?;
    let id = node_name(&args.id, &credentials)?;
    let listeners = bind_proxy(&args.listen, false).await?;
    let config = dozen_proxy::ProxyConfig {
        id,
        server: global.server().to_string(),
        token: credentials.token,
        tls: credentials.tls,
        upstream_timeout: args.listen.proxy_timeout,
        edge: args.listen.edge(),
        access_log_every: args.listen.proxy_access_log_every,
        access_log_json: matches!(global.log_format, crate::LogFormat::Json),
        certs: args.listen.proxy_certs.clone(),
    };
    // On SIGTERM or Ctrl-C: no new connections, the requests in flight finished.
    dozen_proxy::run_until(config, listeners, shutdown_signal()).await
}

pub async fn agent(global: &Global, args: AgentArgs) -> anyhow::Result<()> {
    let credentials = node_credentials(global, &args.token_file, "agent")?;
    if credentials.identity.is_none() && !args.node.agent_listen.ip().is_loopback() {
        bail!(
            "--agent-listen {}: without a node certificate the agent's log API is plain HTTP, \
             which is only for loopback; join the cluster first (`dozen node join`)",
            args.node.agent_listen
        );
    }
    let mut node = args.node.clone();
    node.node_name = Some(node_name(&node.node_name, &credentials)?);
    if args.with_proxy {
        let listeners = bind_proxy(&args.proxy, false).await?;
        node.proxy_internal_url = format!("http://{}", reachable(listeners.internal.local_addr()?));
        let config = dozen_proxy::ProxyConfig {
            id: node.node_name.clone().unwrap_or_default(),
            server: global.server().to_string(),
            token: credentials.token.clone(),
            tls: credentials.tls.clone(),
            upstream_timeout: args.proxy.proxy_timeout,
            edge: args.proxy.edge(),
            access_log_every: args.proxy.proxy_access_log_every,
            access_log_json: matches!(global.log_format, crate::LogFormat::Json),
            certs: args.proxy.proxy_certs.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = dozen_proxy::run(config, listeners).await {
                tracing::error!(error = %e, "proxy failed");
            }
        });
    }
    let mut config = agent_config(
        &node,
        global.server().to_string(),
        credentials.token,
        global.data_dir.join("agent"),
    )?;
    config.tls = credentials.tls;
    config.identity = credentials.identity;
    dozen_agent::run(config, shutdown_signal()).await
}
