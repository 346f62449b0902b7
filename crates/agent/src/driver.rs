//! Task drivers. A driver starts, waits for, stops, measures and re-adopts tasks of one kind;
//! the agent holds a registry of them and never looks inside one. `process` runs host
//! commands under a shim ([`process`]); a second driver (containers) is one more module and
//! one more line in [`Drivers::for_node`].
//!
//! What a driver gets is driver-neutral ([`TaskConfig`]: a command or an image, environment,
//! port, resources, user, stop signal and timeout, mounts, where its output goes). What it
//! gives back is opaque to the agent ([`TaskHandle`]): the agent persists it with the driver's
//! name beside the task, so after a restart each task is recovered through its own driver.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod docker;
pub mod process;

pub use docker::DockerDriver;
pub use process::ProcessDriver;

/// A driver's fingerprint: whether it can run tasks on this node, and what it found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DriverInfo {
    pub name: String,
    pub available: bool,
    pub detail: String,
}

/// What a task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// A host command, argv form.
    Command(Vec<String>),
    /// A container image; `args` replaces its command when set.
    Image {
        image: String,
        args: Option<Vec<String>>,
        /// Set when `image` is the built-in registry's: the exact manifest the release runs,
        /// pulled through the node's loopback mirror.
        pin: Option<dozen_model::registry::ImagePin>,
    },
}

/// Storage made visible to the task at `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: MountSource,
    pub target: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSource {
    /// A directory of the node.
    HostPath(PathBuf),
    /// A volume the driver's engine keeps, by name.
    Volume(String),
}

/// What a driver needs to run one task generation, whatever the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskConfig {
    pub task: String,
    /// The node it runs on (for messages).
    pub node: String,
    /// The task's own directory: the driver keeps its state here.
    pub dir: PathBuf,
    pub workload: Workload,
    /// The whole environment the task sees (see [`crate::env::task_env`]).
    pub env: BTreeMap<String, String>,
    /// The host port the task serves on (`PORT`), when it has one.
    pub port: Option<u16>,
    pub resources: dozen_spec::Resources,
    /// Run as this user; `None`: as the agent's user.
    pub user: Option<String>,
    /// Normalised signal name, e.g. `SIGTERM`.
    pub stop_signal: String,
    pub stop_timeout: Duration,
    /// The working directory (an unpacked artifact bundle).
    pub cwd: Option<PathBuf>,
    pub mounts: Vec<Mount>,
    /// Where the task's stdout and stderr go (`MILLIS o|e TEXT` lines, read by `dozen logs`).
    pub log: PathBuf,
    /// Its secrets and identity, on a memory file system (see [`crate::secrets`]).
    pub secrets: Option<Secrets>,
}

/// Where a task's secrets were delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secrets {
    /// One file per secret (`secrets_as = "file"`), and the identity token.
    pub dir: PathBuf,
    pub token_file: PathBuf,
    /// `secrets_as = "env"`: the values, for the driver to put in the environment.
    pub env_file: Option<PathBuf>,
    pub expires_at_ms: u64,
}

/// Where a container sees its secrets directory.
pub const CONTAINER_SECRETS_DIR: &str = "/run/secrets";

/// A running (or adopted) task as its driver knows it. `state` is the driver's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskHandle {
    pub driver: String,
    /// The task's main process, when the driver has one to show (status, `ps`).
    pub pid: Option<u32>,
    /// When the task started (ms since the epoch), when known.
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    pub state: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: u64,
    pub error: Option<String>,
    /// The kernel killed a process of the task for want of memory while this generation ran.
    pub oom_killed: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskStats {
    /// The task's main process.
    pub rss_kib: Option<u64>,
    /// What supervising the task costs beside it (the process driver's shim).
    pub overhead_rss_kib: Option<u64>,
    /// Memory the whole task uses now (its group, or its container), as its limit counts it.
    pub memory_bytes: Option<u64>,
    /// CPU time the whole task has used so far: two readings give its rate.
    pub cpu_nanos: Option<u64>,
}

/// What a task directory holds after an agent restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    Running(TaskHandle),
    Exited(ExitInfo),
    /// Never started, or its files are gone.
    Nothing,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("task directory {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
    #[error("{0}")]
    Start(String),
    #[error("the `{driver}` driver cannot run this task: {why}")]
    Unsupported { driver: &'static str, why: String },
}

#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// The name tasks ask for (`process`, `docker`) and nodes report.
    fn name(&self) -> &'static str;
    fn fingerprint(&self) -> DriverInfo;
    async fn start(&self, config: &TaskConfig) -> Result<TaskHandle, DriverError>;
    /// Resolves when the task has ended.
    async fn wait(&self, handle: &TaskHandle) -> ExitInfo;
    /// `signal` (a name such as `SIGTERM`), then a kill after `timeout`; resolves when the
    /// task has ended.
    async fn stop(&self, handle: &TaskHandle, signal: &str, timeout: Duration) -> ExitInfo;
    /// What the task uses now (memory) and so far (CPU time).
    async fn stats(&self, handle: &TaskHandle) -> TaskStats;
    /// What became of the task in `dir` (last seen as `handle`, when the agent kept one)
    /// while no agent watched it. Async: a driver may have to ask its engine.
    async fn recover(&self, dir: &Path, handle: Option<&TaskHandle>) -> Recovered;
    /// The task is gone for good: free what the driver keeps for it (limits, groups).
    fn release(&self, _task: &str) {}
    /// Runs a `command` health check its own way (inside the container, say): None when the
    /// driver has none and the check runs on the host, as the task's user.
    async fn check(
        &self,
        _handle: &TaskHandle,
        _argv: &[String],
        _timeout: Duration,
    ) -> Option<Result<(), String>> {
        None
    }
    /// Runs `argv` inside the running task (`dozen exec`): its output as it comes, then how
    /// it ended. By default on the host as the task runs (`context`: its environment,
    /// directory and user), which is the `process` driver's way; `tty` needs a driver that
    /// gives one.
    async fn exec(
        &self,
        _handle: &TaskHandle,
        context: &crate::health::CommandContext,
        argv: &[String],
        tty: bool,
    ) -> Result<tokio::sync::mpsc::Receiver<crate::exec::ExecChunk>, DriverError> {
        if tty {
            return Err(DriverError::Unsupported {
                driver: self.name(),
                why: "a terminal (-t) is for container tasks; run the command without it".into(),
            });
        }
        crate::exec::on_host(context, argv).map_err(DriverError::Start)
    }
    /// Looks again whether the driver can run tasks here (an engine that answers, say), for
    /// [`Driver::fingerprint`].
    async fn refresh(&self) {}
    /// After re-adoption: ends and removes what this driver made for `node` that no task
    /// kept (`kept`: the handles of the tasks recovered running); returns how many.
    async fn forget_strays(&self, _node: &str, _kept: &[TaskHandle]) -> usize {
        0
    }
}

/// The drivers of this agent, by name.
#[derive(Clone, Default)]
pub struct Drivers {
    by_name: BTreeMap<&'static str, Arc<dyn Driver>>,
}

impl Drivers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, driver: impl Driver) -> Self {
        self.by_name.insert(driver.name(), Arc::new(driver));
        self
    }

    /// Every driver this node can have: one line per driver.
    /// `home`: the id of the agent's data directory (see [`docker::HOME_LABEL`]).
    /// `mirror`: the node's loopback registry mirror (`127.0.0.1:PORT`), which the engine
    /// pulls the built-in registry's images through.
    pub fn for_node(
        exe: &Path,
        cgroups: Box<dyn crate::cgroups::Cgroups>,
        home: String,
        mirror: Option<String>,
    ) -> Self {
        Drivers::new()
            .with(ProcessDriver::new(exe.to_path_buf(), cgroups))
            .with(DockerDriver::from_env(home, mirror))
    }

    /// Every driver removes what it made for `node` that no recovered task kept.
    pub async fn forget_strays(&self, node: &str, kept: &[TaskHandle]) -> usize {
        let mut removed = 0;
        for driver in self.by_name.values() {
            removed += driver.forget_strays(node, kept).await;
        }
        removed
    }

    /// Every driver looks again whether it can run tasks here.
    pub async fn refresh(&self) {
        for driver in self.by_name.values() {
            driver.refresh().await;
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Driver>> {
        self.by_name.get(name).cloned()
    }

    pub fn fingerprints(&self) -> Vec<DriverInfo> {
        self.by_name.values().map(|d| d.fingerprint()).collect()
    }

    /// The names of the drivers that can run tasks here now (what the node reports).
    pub fn available(&self) -> Vec<String> {
        self.fingerprints()
            .into_iter()
            .filter(|f| f.available)
            .map(|f| f.name)
            .collect()
    }

    /// Frees what every driver keeps for `task`.
    pub fn release(&self, task: &str) {
        for driver in self.by_name.values() {
            driver.release(task);
        }
    }
}
