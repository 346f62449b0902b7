//! The node agent: makes its node match its assignments and reports what it sees.
//!
//! It talks to the control plane only through the API: register (a leased node record),
//! heartbeat, list-then-watch its assignments, report task status. Each task has a runner (a
//! tokio task) that starts it under a shim through the driver, health-checks it, and stops it
//! with the stop protocol. On start the agent first re-adopts the shims it finds on disk, so a
//! restarted agent never starts a task twice.

#![deny(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use dozen_api::Client;
use dozen_model::{Assignment, TaskStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

mod artifacts;
pub mod bundle;
pub mod cgroups;
pub mod driver;
pub mod env;
pub mod exec;
pub mod health;
pub mod logs;
mod mirror;
pub mod os;
pub mod ports;
pub(crate) mod runner;
pub mod secrets;
mod server;
pub mod shim;
mod stats;
mod sync;
#[cfg(test)]
mod testing;

pub use env::discovery_var;

use driver::{Drivers, TaskHandle};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub server: String,
    pub token: String,
    /// For `https://` servers: the cluster CA and the node's certificate.
    pub tls: Option<dozen_api::tls::ClientConfig>,
    /// The node's certificate (from `dozen node join`): with it, the agent serves its logs
    /// over TLS, to servers only.
    pub identity: Option<dozen_api::tls::NodeIdentity>,
    pub data_dir: PathBuf,
    pub node_name: String,
    /// Where the agent serves logs to the API server.
    pub listen: SocketAddr,
    pub port_range: RangeInclusive<u16>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// The dozen binary (for `dozen shim`).
    pub exe: PathBuf,
    /// The address proxies reach this node's tasks at.
    pub host: String,
    /// The node-local proxy's internal listener: `<NAME>_URL` of the services a task uses
    /// point there (`{url}/_/{name}`).
    pub proxy_internal_url: String,
    pub cgroup_root: PathBuf,
    /// Who runs the tasks whose service names no `user`: None, the agent's own user. An agent
    /// running as root gives them an unprivileged user, so a task cannot read dozen's keys.
    pub task_user: Option<String>,
    /// The node's labels (`--label`), for services' `node_labels`.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// What the agent keeps on disk beside a task's shim files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TaskRecord {
    pub(crate) assignment: Assignment,
    pub(crate) port: Option<u16>,
    /// The running generation's handle, as its driver gave it (with the driver's name).
    #[serde(default)]
    pub(crate) handle: Option<TaskHandle>,
}

impl TaskRecord {
    /// The driver that runs (or will run) this task.
    pub(crate) fn driver(&self) -> &str {
        match &self.handle {
            Some(handle) => &handle.driver,
            None => self.assignment.spec.driver(),
        }
    }
}

pub(crate) const TASK_RECORD: &str = "task.json";
pub(crate) const REMOVED_MARKER: &str = "removed";
/// How long the files (logs) of a removed task are kept.
pub(crate) const KEEP_REMOVED: Duration = Duration::from_secs(3600);

pub(crate) struct Shared {
    pub(crate) config: AgentConfig,
    pub(crate) client: Client,
    pub(crate) drivers: Drivers,
    pub(crate) prober: Arc<dyn health::Prober>,
    pub(crate) ports: ports::PortAllocator,
    pub(crate) instance: String,
    pub(crate) runners: Mutex<HashMap<String, watch::Sender<Option<Assignment>>>>,
    pub(crate) reports: mpsc::UnboundedSender<TaskStatus>,
    /// What runners saw happen, for the next status report; bounded: when the server is
    /// away long enough to fill it, newer events are dropped (and the agent's log says so).
    pub(crate) events: mpsc::Sender<dozen_model::Event>,
}

/// Events an agent holds for the server at most.
pub(crate) const EVENTS_BUFFERED: usize = 256;

impl Shared {
    pub(crate) fn tasks_dir(&self) -> PathBuf {
        self.config.data_dir.join("tasks")
    }
}

/// The id of this agent's data directory, made on first use: what the agent made elsewhere
/// (containers) carries it, so a restarted agent knows its own from another's.
fn home_id(data_dir: &std::path::Path) -> String {
    let path = data_dir.join("home-id");
    if let Some(id) = std::fs::read_to_string(&path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
    {
        return id;
    }
    let id = random_id();
    if let Err(e) = os::write_atomic(&path, id.as_bytes()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the agent's home id");
    }
    id
}

pub(crate) fn random_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 6];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs the agent until `shutdown` resolves. Tasks keep running after it returns.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let tasks_dir = config.data_dir.join("tasks");
    os::private_dir(&config.data_dir)
        .and_then(|_| std::fs::create_dir_all(&tasks_dir))
        .with_context(|| format!("cannot create agent data dir {}", tasks_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} for the agent API", config.listen))?;
    // Listening on every interface: the server reaches the agent at its advertised host.
    let local = listener.local_addr()?;
    let scheme = if config.identity.is_some() {
        "https"
    } else {
        "http"
    };
    let address = if local.ip().is_unspecified() {
        format!("{scheme}://{}:{}", config.host, local.port())
    } else {
        format!("{scheme}://{local}")
    };
    let serving_tls = match &config.identity {
        Some(id) => Some(
            dozen_api::tls::server_config(&id.cert_pem, &id.key_pem, &id.ca_pem)
                .context("cannot serve the agent API with the node certificate")?,
        ),
        None => None,
    };
    let mirror = mirror::bind(&config.data_dir)
        .await
        .context("cannot listen on loopback for the node's registry mirror")?;
    let mirror_address = mirror.local_addr()?.to_string();
    let drivers = Drivers::for_node(
        &config.exe,
        cgroups::detect(&config.cgroup_root),
        home_id(&config.data_dir),
        Some(mirror_address.clone()),
    );
    // Before registering: the node reports the drivers it has (an engine that answers).
    drivers.refresh().await;
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::channel(EVENTS_BUFFERED);
    let shared = Arc::new(Shared {
        client: Client::with_tls(&config.server, &config.token, config.tls.clone()),
        drivers,
        prober: Arc::new(health::HostProber {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap_or_default(),
        }),
        ports: ports::PortAllocator::new(config.port_range.clone()),
        instance: random_id(),
        runners: Mutex::new(HashMap::new()),
        reports: reports_tx,
        events: events_tx,
        config,
    });
    tracing::info!(
        node = %shared.config.node_name,
        instance = %shared.instance,
        drivers = ?shared.drivers.fingerprints(),
        "agent starting"
    );
    tokio::spawn(server::serve(listener, shared.clone(), serving_tls));
    tracing::info!(address = %mirror_address, "registry mirror listening");
    tokio::spawn(mirror::serve(mirror, shared.client.clone()));
    // Re-adopt before anything else, so nothing already running is started again.
    sync::adopt_existing(&shared).await;
    let held = sync::registration(&shared, &address).register().await;
    tokio::spawn(sync::report_loop(shared.clone(), reports_rx, events_rx));
    tokio::spawn(sync::heartbeat_loop(shared.clone(), address, held));
    tokio::spawn(sync::gc_loop(shared.clone()));
    tokio::select! {
        _ = sync::follow_assignments(shared.clone()) => {}
        _ = shutdown => {}
    }
    tracing::info!("agent stopped; its tasks keep running under their shims");
    Ok(())
}

/// Reads the task records under an agent data dir (for `dozen logs` on this node).
pub(crate) fn local_tasks(tasks_dir: &Path) -> Vec<(PathBuf, String, String)> {
    let Ok(entries) = std::fs::read_dir(tasks_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let record: TaskRecord =
                serde_json::from_slice(&std::fs::read(dir.join(TASK_RECORD)).ok()?).ok()?;
            Some((dir, record.assignment.service, record.assignment.task))
        })
        .collect()
}
