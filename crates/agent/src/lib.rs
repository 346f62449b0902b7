//! The node agent: makes its node match its assignments and reports what it sees.
//!
//! It talks to the control plane only through the API: register (a leased node record),
//! heartbeat, list-then-watch its assignments, report task status. Each task has a runner (a
//! tokio task) that starts it under a shim through the driver, health-checks it, and stops it
//! with the stop protocol. On start the agent first re-adopts the shims it finds on disk, so a
//! restarted agent never starts a task twice.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use dozen_api::{
    Client, HeartbeatRequest, ListResponse, RegisterRequest, RegisterResponse, StatusReport,
    WatchEvent, WatchEventType,
};
use dozen_model::{
    Assignment, DesiredState, NodeRecord, NodeResources, TaskKind, TaskState, TaskStatus, SCHEMA,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

pub mod bundle;
pub mod cgroups;
pub mod driver;
pub mod health;
pub mod logs;
pub mod os;
pub mod ports;
mod server;
pub mod shim;

use driver::{Driver, ExitInfo, ProcessDriver, Recovered, TaskConfig, TaskHandle};

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
}

/// What the agent keeps on disk beside a task's shim files.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskRecord {
    assignment: Assignment,
    port: Option<u16>,
}

const TASK_RECORD: &str = "task.json";
const REMOVED_MARKER: &str = "removed";
/// How long the files (logs) of a removed task are kept.
const KEEP_REMOVED: Duration = Duration::from_secs(3600);

struct Shared {
    config: AgentConfig,
    client: Client,
    driver: Arc<dyn Driver>,
    ports: ports::PortAllocator,
    cgroups: Box<dyn cgroups::Cgroups>,
    instance: String,
    runners: Mutex<HashMap<String, watch::Sender<Option<Assignment>>>>,
    reports: mpsc::UnboundedSender<TaskStatus>,
    http: reqwest::Client,
}

impl Shared {
    fn tasks_dir(&self) -> PathBuf {
        self.config.data_dir.join("tasks")
    }

    /// The unpacked artifact bundle `digest`, fetched from the server the first time.
    async fn artifact_dir(&self, digest: &str) -> Result<PathBuf, String> {
        let hex = dozen_store_digest_hex(digest)?;
        let root = self.config.data_dir.join("artifacts");
        let dir = root.join(hex);
        if dir.is_dir() {
            return Ok(dir);
        }
        let bytes = self
            .client
            .download_blob(digest)
            .await
            .map_err(|e| format!("cannot fetch artifact {digest}: {e}"))?;
        let tmp = root.join(format!(".partial-{hex}-{}", random_id()));
        let unpacked = bundle::unpack(&bytes, &tmp).and_then(|_| {
            std::fs::rename(&tmp, &dir).map_err(|source| bundle::BundleError::Io {
                path: dir.display().to_string(),
                source,
            })
        });
        if let Err(e) = unpacked {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another runner may have unpacked the same bundle first.
            if !dir.is_dir() {
                return Err(format!("cannot unpack artifact {digest}: {e}"));
            }
        }
        Ok(dir)
    }
}

fn dozen_store_digest_hex(digest: &str) -> Result<&str, String> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("`{digest}` is not an artifact digest"))
}

fn random_id() -> String {
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
    std::fs::create_dir_all(&tasks_dir)
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
    let cgroups = cgroups::detect(&config.cgroup_root);
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        client: Client::with_tls(&config.server, &config.token, config.tls.clone()),
        driver: Arc::new(ProcessDriver {
            exe: config.exe.clone(),
        }),
        ports: ports::PortAllocator::new(config.port_range.clone()),
        instance: random_id(),
        runners: Mutex::new(HashMap::new()),
        reports: reports_tx,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap_or_default(),
        cgroups,
        config,
    });
    tracing::info!(
        node = %shared.config.node_name,
        instance = %shared.instance,
        limits = %shared.cgroups.describe(),
        "agent starting"
    );
    tokio::spawn(server::serve(listener, shared.clone(), serving_tls));
    // Re-adopt before anything else, so nothing already running is started again.
    adopt_existing(&shared);
    let registration = register(&shared, &address).await;
    tokio::spawn(report_loop(shared.clone(), reports_rx));
    tokio::spawn(heartbeat_loop(shared.clone(), address, registration));
    tokio::spawn(gc_loop(shared.clone()));
    tokio::select! {
        _ = follow_assignments(shared.clone()) => {}
        _ = shutdown => {}
    }
    tracing::info!("agent stopped; its tasks keep running under their shims");
    Ok(())
}

fn adopt_existing(shared: &Arc<Shared>) {
    let Ok(entries) = std::fs::read_dir(shared.tasks_dir()) else {
        return;
    };
    let mut adopted = 0;
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir.join(REMOVED_MARKER).exists() {
            continue;
        }
        let Some(record) = std::fs::read(dir.join(TASK_RECORD))
            .ok()
            .and_then(|b| serde_json::from_slice::<TaskRecord>(&b).ok())
        else {
            continue;
        };
        if let Some(port) = record.port {
            shared.ports.reserve(port);
        }
        let recovered = shared.driver.recover(&dir);
        if matches!(recovered, Recovered::Running(_)) {
            adopted += 1;
        }
        spawn_runner(shared, record, recovered);
    }
    if adopted > 0 {
        tracing::info!(adopted, "re-attached to running shims");
    }
}

async fn register(shared: &Arc<Shared>, address: &str) -> RegisterResponse {
    let node = NodeRecord {
        schema: SCHEMA,
        name: shared.config.node_name.clone(),
        address: address.to_string(),
        host: shared.config.host.clone(),
        resources: NodeResources {
            cpu_millis: shared.config.cpu_millis,
            memory_bytes: shared.config.memory_bytes,
        },
        labels: BTreeMap::new(),
        drivers: vec![shared.driver.fingerprint().name],
        agent_instance: shared.instance.clone(),
        registered_at_ms: shim::wall_ms(),
    };
    let path = format!("/v1/nodes/{}/register", shared.config.node_name);
    let mut delay = Duration::from_millis(100);
    loop {
        match shared
            .client
            .post::<RegisterResponse, _>(&path, &RegisterRequest { node: node.clone() })
            .await
        {
            Ok(r) => {
                tracing::info!(node = %node.name, lease = r.lease, "registered with the control plane");
                return r;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot register yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, address: String, mut reg: RegisterResponse) {
    let path = format!("/v1/nodes/{}/heartbeat", shared.config.node_name);
    loop {
        tokio::time::sleep(Duration::from_millis(reg.ttl_ms / 4).max(Duration::from_millis(100)))
            .await;
        match shared
            .client
            .call(
                reqwest::Method::POST,
                &path,
                Some(&HeartbeatRequest { lease: reg.lease }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if e.status() == Some(404) => {
                tracing::warn!("node lease lost; registering again");
                reg = register(&shared, &address).await;
            }
            // The control plane is away: keep the tasks running (on_disconnect = keep).
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// Sends status changes in batches; keeps the newest per task until the server has it.
async fn report_loop(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<TaskStatus>) {
    let path = format!("/v1/nodes/{}/status", shared.config.node_name);
    let mut pending: BTreeMap<String, TaskStatus> = BTreeMap::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(s) => {
                    pending.insert(s.task.clone(), s);
                }
                None => return,
            }
        }
        // Gather what arrives together into one request.
        tokio::time::sleep(Duration::from_millis(5)).await;
        while let Ok(s) = rx.try_recv() {
            pending.insert(s.task.clone(), s);
        }
        let report = StatusReport {
            statuses: pending.values().cloned().collect(),
        };
        match shared
            .client
            .call(reqwest::Method::PUT, &path, Some(&report))
            .await
        {
            Ok(()) => pending.clear(),
            Err(e) => {
                tracing::warn!(error = %e, pending = pending.len(), "status report failed; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

/// List, then watch from the list's revision; on 410 list again. Runs forever.
async fn follow_assignments(shared: Arc<Shared>) {
    let path = format!("/v1/nodes/{}/assignments", shared.config.node_name);
    let mut revision: Option<u64> = None;
    loop {
        let rev = match revision {
            Some(r) => r,
            None => match shared.client.get::<ListResponse<Assignment>>(&path).await {
                Ok(list) => {
                    sync_all(&shared, list.items);
                    list.revision
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list assignments; retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            },
        };
        revision = Some(rev);
        let stream = shared.client.watch::<Assignment>(&path, rev).await;
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) if e.status() == Some(410) => {
                revision = None;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "assignment watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        // Bookmarks come every few seconds: silence longer than this is a dead connection.
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_secs(20), stream.next()).await
        {
            let event: WatchEvent<Assignment> = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "assignment watch broke; resuming");
                    break;
                }
            };
            revision = Some(event.revision);
            match event.kind {
                WatchEventType::Put => {
                    if let Some(a) = event.object {
                        update_runner(&shared, a);
                    }
                }
                WatchEventType::Delete => {
                    if let Some(task) = event.key.rsplit('/').next() {
                        remove_runner(&shared, task);
                    }
                }
                WatchEventType::Bookmark => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sync_all(shared: &Arc<Shared>, items: Vec<Assignment>) {
    let wanted: std::collections::HashSet<String> = items.iter().map(|a| a.task.clone()).collect();
    let existing: Vec<String> = shared
        .runners
        .lock()
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default();
    for task in existing.iter().filter(|t| !wanted.contains(*t)) {
        remove_runner(shared, task);
    }
    for a in items {
        update_runner(shared, a);
    }
}

fn update_runner(shared: &Arc<Shared>, assignment: Assignment) {
    if assignment.node != shared.config.node_name {
        return;
    }
    {
        let runners = shared.runners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = runners.get(&assignment.task) {
            tx.send_if_modified(|cur| {
                // Never go back to an older generation (a stale event after a resync).
                let newer = cur.as_ref().is_none_or(|c| {
                    c.generation < assignment.generation
                        || (c.generation == assignment.generation && *c != assignment)
                });
                if newer {
                    *cur = Some(assignment.clone());
                }
                newer
            });
            return;
        }
    }
    let record = TaskRecord {
        assignment,
        port: None,
    };
    spawn_runner(shared, record, Recovered::Nothing);
}

fn remove_runner(shared: &Arc<Shared>, task: &str) {
    let runners = shared.runners.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(tx) = runners.get(task) {
        let _ = tx.send(None);
    }
}

fn spawn_runner(shared: &Arc<Shared>, record: TaskRecord, recovered: Recovered) {
    let (tx, rx) = watch::channel(Some(record.assignment.clone()));
    shared
        .runners
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(record.assignment.task.clone(), tx);
    let runner = Runner::new(shared.clone(), record, recovered, rx);
    tokio::spawn(runner.run());
}

async fn gc_loop(shared: Arc<Shared>) {
    loop {
        if let Ok(entries) = std::fs::read_dir(shared.tasks_dir()) {
            for entry in entries.flatten() {
                let marker = entry.path().join(REMOVED_MARKER);
                let old = std::fs::metadata(&marker)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > KEEP_REMOVED);
                if old {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
}

/// Health bookkeeping of one running generation.
struct HealthState {
    successes: u32,
    failures: u32,
    started: tokio::time::Instant,
    /// Fast probes while starting must not use up the failure budget faster than the
    /// configured interval would: at most one failure counts per interval.
    last_counted_failure: Option<tokio::time::Instant>,
}

struct Runner {
    shared: Arc<Shared>,
    task: String,
    dir: PathBuf,
    rx: watch::Receiver<Option<Assignment>>,
    record: TaskRecord,
    handle: Option<TaskHandle>,
    /// The generation `handle` runs, or the last one that ended.
    generation: Option<u64>,
    status: TaskStatus,
}

impl Runner {
    fn new(
        shared: Arc<Shared>,
        record: TaskRecord,
        recovered: Recovered,
        rx: watch::Receiver<Option<Assignment>>,
    ) -> Self {
        let task = record.assignment.task.clone();
        let dir = shared.tasks_dir().join(&task);
        let status = TaskStatus {
            schema: SCHEMA,
            task: task.clone(),
            node: shared.config.node_name.clone(),
            generation: record.assignment.generation,
            state: TaskState::Pending,
            healthy: false,
            pid: None,
            host_port: record.port,
            exit_code: None,
            signal: None,
            started_at_ms: None,
            finished_at_ms: None,
            message: None,
            agent_instance: shared.instance.clone(),
            adopted: false,
        };
        let mut runner = Runner {
            shared,
            task,
            dir,
            rx,
            generation: None,
            handle: None,
            record,
            status,
        };
        match recovered {
            Recovered::Running(handle) => {
                runner.generation = Some(runner.record.assignment.generation);
                runner.status.pid = handle.task_pid;
                runner.status.adopted = true;
                runner.status.started_at_ms = std::fs::metadata(handle.dir.join(shim::TASK_PID))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64);
                // It was running before the restart: keep serving it as it was.
                runner.set(TaskState::Running, true, None);
                runner.handle = Some(handle);
            }
            Recovered::Exited(exit) => {
                runner.generation = Some(runner.record.assignment.generation);
                runner.finish(TaskState::Exited, &exit);
            }
            Recovered::Nothing => {}
        }
        runner
    }

    fn set(&mut self, state: TaskState, healthy: bool, message: Option<String>) {
        self.status.state = state;
        self.status.healthy = healthy;
        self.status.message = message;
        self.status.generation = self.generation.unwrap_or(self.record.assignment.generation);
        let _ = self.shared.reports.send(self.status.clone());
    }

    fn finish(&mut self, state: TaskState, exit: &ExitInfo) {
        self.status.exit_code = exit.code;
        self.status.signal = exit.signal;
        self.status.finished_at_ms = Some(exit.finished_at_ms);
        if exit.started_at_ms.is_some() {
            self.status.started_at_ms = exit.started_at_ms;
        }
        let state = if exit.error.is_some() && exit.started_at_ms.is_none() {
            TaskState::Failed
        } else {
            state
        };
        self.set(state, false, exit.error.clone());
    }

    fn save_record(&self) {
        let bytes = serde_json::to_vec(&self.record).unwrap_or_default();
        if let Err(e) = std::fs::create_dir_all(&self.dir)
            .and_then(|_| os::write_atomic(&self.dir.join(TASK_RECORD), &bytes))
        {
            tracing::error!(task = %self.task, error = %e, "cannot record task on disk");
        }
    }

    async fn run(mut self) {
        loop {
            let desired = self.rx.borrow_and_update().clone();
            match desired {
                None => {
                    self.stop_now("assignment removed").await;
                    self.cleanup();
                    return;
                }
                Some(a) if a.desired == DesiredState::Stop => {
                    let generation = a.generation;
                    self.record.assignment = a;
                    self.stop_now("told to stop").await;
                    // A generation that never started here (say, assigned while this agent
                    // was down) is reported stopped in its own name, or the controller would
                    // wait for it forever.
                    if self.status.generation != generation {
                        if self.generation != Some(generation) {
                            self.generation = None;
                        }
                        self.set(TaskState::Stopped, false, None);
                    } else if !self.status.state.is_terminal() {
                        self.set(TaskState::Stopped, false, None);
                    }
                    if self.rx.changed().await.is_err() {
                        return;
                    }
                }
                Some(a) => {
                    let generation = a.generation;
                    self.record.assignment = a;
                    if self.handle.is_some() && self.generation != Some(generation) {
                        // A newer generation replaces whatever still runs.
                        self.stop_now("replaced by a newer generation").await;
                    }
                    if self.handle.is_some() {
                        if !self.supervise().await {
                            return;
                        }
                    } else if self.generation == Some(generation)
                        || self.record.assignment.desired == DesiredState::Drain
                    {
                        // This generation ran and ended, or it is leaving service before it
                        // started (drained during its crash backoff): the controller decides
                        // what is next.
                        if self.rx.changed().await.is_err() {
                            return;
                        }
                    } else if !self.start_generation().await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits the start delay (unless the assignment changes), then starts the generation.
    /// Returns false when the runner should end.
    async fn start_generation(&mut self) -> bool {
        let a = self.record.assignment.clone();
        if a.start_delay_ms > 0 {
            self.generation = None;
            self.status.generation = a.generation;
            self.set(
                TaskState::Pending,
                false,
                Some(format!(
                    "restarting in {} ms (crash backoff)",
                    a.start_delay_ms
                )),
            );
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(a.start_delay_ms)) => {}
                changed = self.rx.changed() => {
                    return changed.is_ok();
                }
            }
        }
        self.generation = Some(a.generation);
        self.status.exit_code = None;
        self.status.signal = None;
        self.status.finished_at_ms = None;
        self.status.adopted = false;
        match self.launch().await {
            Ok(handle) => {
                self.status.pid = handle.task_pid;
                self.status.started_at_ms = Some(shim::wall_ms());
                let healthy = a.spec.health.is_none();
                let state = if healthy {
                    TaskState::Running
                } else {
                    TaskState::Starting
                };
                tracing::info!(task = %self.task, generation = a.generation, pid = ?handle.task_pid, port = ?self.record.port, "task started");
                self.handle = Some(handle);
                self.set(state, healthy, None);
            }
            Err(message) => {
                tracing::warn!(task = %self.task, error = %message, "task failed to start");
                self.status.pid = None;
                let now = shim::wall_ms();
                self.status.started_at_ms = Some(now);
                self.status.finished_at_ms = Some(now);
                self.set(TaskState::Failed, false, Some(message));
            }
        }
        true
    }

    async fn launch(&mut self) -> Result<TaskHandle, String> {
        let a = &self.record.assignment;
        let spec = &a.spec;
        let (argv, wants_port) = match &a.kind {
            TaskKind::OneOff { argv } => (argv.clone(), false),
            TaskKind::Service => (
                spec.command.as_ref().map(|c| c.argv()).ok_or(
                    "this agent runs commands only: the docker driver is not available yet",
                )?,
                spec.port,
            ),
        };
        if wants_port && self.record.port.is_none() {
            self.record.port = Some(
                self.shared
                    .ports
                    .allocate()
                    .ok_or("no free host port in the agent's port range")?,
            );
        }
        self.status.host_port = self.record.port;
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
        let (mut uid, mut gid) = (None, None);
        if let Some(user) = &spec.user {
            let (u, g, home) = os::lookup_user(user).ok_or_else(|| {
                format!(
                    "user `{user}` does not exist on node `{}`",
                    self.shared.config.node_name
                )
            })?;
            uid = Some(u);
            gid = Some(g);
            env.insert("HOME".into(), home);
            env.insert("USER".into(), user.clone());
        }
        env.extend(spec.env.clone());
        if let Some(port) = self.record.port {
            env.insert("PORT".into(), port.to_string());
        }
        // Service discovery: the services this one names, reached through the local proxy.
        for other in &spec.uses {
            env.insert(
                discovery_var(other),
                format!(
                    "{}/_/{other}",
                    self.shared.config.proxy_internal_url.trim_end_matches('/')
                ),
            );
        }
        env.insert("DOZEN_SERVICE".into(), a.service.clone());
        env.insert("DOZEN_TASK".into(), a.task.clone());
        env.insert("DOZEN_RELEASE".into(), a.release.to_string());
        let cgroup_procs = match self.shared.cgroups.prepare(&self.task, &spec.resources) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(task = %self.task, error = %e, "cannot set resource limits; running without");
                Vec::new()
            }
        };
        let cwd = match &a.artifact_digest {
            Some(digest) => Some(self.shared.artifact_dir(digest).await?),
            None => None,
        };
        self.save_record();
        let config = TaskConfig {
            dir: self.dir.clone(),
            launch: shim::Launch {
                argv,
                env,
                cwd,
                uid,
                gid,
                cgroup_procs,
                linger_ms: Some(a.spec.stop_timeout_ms),
                stop_signal: os::signal_number(&a.spec.stop_signal),
            },
        };
        self.shared
            .driver
            .start(&config)
            .await
            .map_err(|e| e.to_string())
    }

    /// Watches the running generation: its exit, health, and changes to the assignment.
    /// Returns false when the runner should end.
    async fn supervise(&mut self) -> bool {
        let Some(handle) = self.handle.clone() else {
            return true;
        };
        let driver = self.shared.driver.clone();
        let check = self.record.assignment.spec.health.clone();
        let mut health = HealthState {
            successes: 0,
            failures: 0,
            started: tokio::time::Instant::now(),
            last_counted_failure: None,
        };
        let wait = driver.wait(&handle);
        tokio::pin!(wait);
        let mut probes: u32 = 0;
        loop {
            // Before the first pass, probe often so a new task takes traffic as soon as it can
            // (most services listen within milliseconds of starting).
            let interval = match &check {
                Some(c) if self.status.state == TaskState::Starting && probes < 5 => {
                    c.interval_ms.min(20 << probes)
                }
                Some(c) if self.status.state == TaskState::Starting => c.interval_ms.min(200),
                Some(c) => c.interval_ms,
                None => 3_600_000,
            };
            tokio::select! {
                exit = &mut wait => {
                    self.handle = None;
                    tracing::info!(task = %self.task, code = ?exit.code, signal = ?exit.signal, "task exited");
                    self.finish(TaskState::Exited, &exit);
                    return true;
                }
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                    return true;
                }
                _ = tokio::time::sleep(Duration::from_millis(interval.max(10))) => {
                    let Some(c) = &check else { continue };
                    probes += 1;
                    let result = health::probe(&self.shared.http, c, self.record.port, &BTreeMap::new()).await;
                    match result {
                        Ok(()) => {
                            health.successes += 1;
                            health.failures = 0;
                            if !self.status.healthy && health.successes >= c.healthy_threshold {
                                self.set(TaskState::Running, true, None);
                            }
                        }
                        Err(why) => {
                            health.successes = 0;
                            let in_grace = health.started.elapsed() < Duration::from_millis(c.grace_period_ms);
                            if in_grace {
                                continue;
                            }
                            let since_start_or_last = health.last_counted_failure.unwrap_or(health.started).elapsed();
                            if since_start_or_last < Duration::from_millis(c.interval_ms) {
                                continue;
                            }
                            health.last_counted_failure = Some(tokio::time::Instant::now());
                            health.failures += 1;
                            if health.failures >= c.unhealthy_threshold && (self.status.healthy || self.status.state == TaskState::Starting) {
                                tracing::warn!(task = %self.task, reason = %why, "task is unhealthy; stopping it so it is replaced");
                                self.status.message = Some(format!("unhealthy: {why}"));
                                // The stop protocol's signal, then SIGKILL after the timeout:
                                // a hung task that ignores the signal still goes.
                                self.stop_now("failed health checks").await;
                                self.set(TaskState::Exited, false, Some(format!("stopped: unhealthy: {why}")));
                                return true;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Stops the running generation, if any, with the service's signal and timeout.
    async fn stop_now(&mut self, why: &str) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let spec = &self.record.assignment.spec;
        let signal = os::signal_number(&spec.stop_signal).unwrap_or(libc::SIGTERM);
        let timeout = Duration::from_millis(spec.stop_timeout_ms);
        tracing::info!(task = %self.task, reason = why, "stopping task");
        self.set(TaskState::Stopping, false, None);
        let exit = self.shared.driver.stop(&handle, signal, timeout).await;
        self.finish(TaskState::Stopped, &exit);
    }

    fn cleanup(&mut self) {
        if let Some(port) = self.record.port.take() {
            self.shared.ports.release(port);
        }
        self.shared.cgroups.remove(&self.task);
        let _ = std::fs::write(self.dir.join(REMOVED_MARKER), shim::wall_ms().to_string());
        let mut runners = self
            .shared
            .runners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Only remove our own entry: a new runner for the same task name may exist.
        if runners
            .get(&self.task)
            .is_some_and(|tx| tx.borrow().is_none())
        {
            runners.remove(&self.task);
        }
    }
}

/// `orders` -> `ORDERS_URL`, `order-api` -> `ORDER_API_URL`.
pub fn discovery_var(service: &str) -> String {
    format!("{}_URL", service.to_ascii_uppercase().replace('-', "_"))
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
