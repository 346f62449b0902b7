//! Task drivers. A driver starts, waits for, stops, measures and re-adopts tasks of one kind.
//! The `process` driver runs each task under a shim (see [`crate::shim`]); a `docker` driver
//! comes with container support.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::os;
use crate::shim::{self, ExitRecord, Launch};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriverInfo {
    pub name: String,
    pub available: bool,
    pub detail: String,
}

/// What the agent needs to run one task generation.
#[derive(Debug, Clone)]
pub struct TaskConfig {
    pub dir: PathBuf,
    pub launch: Launch,
}

/// A running (or adopted) task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskHandle {
    pub dir: PathBuf,
    pub shim_pid: u32,
    pub shim_start: u64,
    pub task_pid: Option<u32>,
    /// The task's start time (with the pid, it names the process for good).
    pub task_start: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskStats {
    pub rss_kib: Option<u64>,
    pub shim_rss_kib: Option<u64>,
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
}

#[async_trait]
pub trait Driver: Send + Sync + 'static {
    fn fingerprint(&self) -> DriverInfo;
    async fn start(&self, config: &TaskConfig) -> Result<TaskHandle, DriverError>;
    /// Resolves when the task has ended.
    async fn wait(&self, handle: &TaskHandle) -> ExitInfo;
    /// `signal`, then SIGKILL after `timeout`; resolves when the task has ended.
    async fn stop(&self, handle: &TaskHandle, signal: i32, timeout: Duration) -> ExitInfo;
    fn stats(&self, handle: &TaskHandle) -> TaskStats;
    fn recover(&self, dir: &Path) -> Recovered;
}

pub struct ProcessDriver {
    /// The dozen binary, run as `EXE shim DIR`.
    pub exe: PathBuf,
}

fn io_err(dir: &Path) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |source| DriverError::Io {
        dir: dir.display().to_string(),
        source,
    }
}

impl ProcessDriver {
    fn read_exit(dir: &Path) -> Option<ExitInfo> {
        let bytes = std::fs::read(dir.join(shim::EXIT)).ok()?;
        let r: ExitRecord = serde_json::from_slice(&bytes).ok()?;
        Some(ExitInfo {
            code: r.code,
            signal: r.signal,
            started_at_ms: r.started_at_ms,
            finished_at_ms: r.finished_at_ms,
            error: r.error,
        })
    }

    fn exit_of_dead_shim(handle: &TaskHandle) -> ExitInfo {
        Self::read_exit(&handle.dir).unwrap_or_else(|| {
            // The shim died without recording an exit (killed): make sure its task is gone too.
            // Only if that pid still names our task: after a reboot it may be anything.
            if let (Some(pid), Some(start)) = (handle.task_pid, handle.task_start) {
                if os::process_is(pid, start) {
                    let _ = os::kill_group(pid, libc::SIGKILL);
                }
            }
            ExitInfo {
                code: None,
                signal: None,
                started_at_ms: None,
                finished_at_ms: shim::wall_ms(),
                error: Some("the task's shim was killed; exit status unknown".into()),
            }
        })
    }
}

/// Waits until process `pid` (which started at `start`) has exited.
async fn wait_for_exit(pid: u32, start: u64) {
    if let Ok(fd) = os::pidfd_open(pid) {
        // pidfd_open succeeded, but the pid may have been reused between our check and now.
        if os::process_is(pid, start) {
            if os::pidfd_wait(fd).await.is_ok() {
                return;
            }
        } else {
            return;
        }
    }
    // No pidfd (old kernel): poll.
    while os::process_is(pid, start) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    fn fingerprint(&self) -> DriverInfo {
        DriverInfo {
            name: "process".into(),
            available: self.exe.exists(),
            detail: format!("shim: {} shim DIR", self.exe.display()),
        }
    }

    async fn start(&self, config: &TaskConfig) -> Result<TaskHandle, DriverError> {
        let dir = &config.dir;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        for stale in [shim::EXIT, shim::TASK_PID, shim::SHIM_PID, shim::STOPPING] {
            match std::fs::remove_file(dir.join(stale)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(dir)(e)),
            }
        }
        let launch = serde_json::to_vec(&config.launch).unwrap_or_default();
        os::write_atomic(&dir.join(shim::LAUNCH), &launch).map_err(io_err(dir))?;
        let mut child = tokio::process::Command::new(&self.exe)
            .arg("shim")
            .arg(dir)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| {
                DriverError::Start(format!("cannot start shim {}: {e}", self.exe.display()))
            })?;
        let shim_pid = child.id().unwrap_or(0);
        // Reap the shim when it exits (it is our child while we live).
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        // The shim records the task's pid (or an exit record if it could not start it).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((pid, task_start)) = shim::read_pid_file(&dir.join(shim::TASK_PID)) {
                let shim_start = shim::read_pid_file(&dir.join(shim::SHIM_PID))
                    .map(|(_, s)| s)
                    .or_else(|| os::process_start_time(shim_pid))
                    .unwrap_or(0);
                return Ok(TaskHandle {
                    dir: dir.clone(),
                    shim_pid,
                    shim_start,
                    task_pid: Some(pid),
                    task_start: Some(task_start),
                });
            }
            if let Some(exit) = Self::read_exit(dir) {
                return Err(DriverError::Start(
                    exit.error
                        .unwrap_or_else(|| "the task ended before it started".into()),
                ));
            }
            if tokio::time::Instant::now() > deadline {
                let _ = os::kill_pid(shim_pid, libc::SIGKILL);
                return Err(DriverError::Start(
                    "the shim did not start the task within 10s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait(&self, handle: &TaskHandle) -> ExitInfo {
        wait_for_exit(handle.shim_pid, handle.shim_start).await;
        Self::exit_of_dead_shim(handle)
    }

    async fn stop(&self, handle: &TaskHandle, signal: i32, timeout: Duration) -> ExitInfo {
        // Tells the shim this signal came from us: it must not send the group another.
        let _ = std::fs::write(handle.dir.join(shim::STOPPING), b"");
        if let Some(pid) = handle.task_pid {
            let _ = os::kill_group(pid, signal);
        }
        if tokio::time::timeout(timeout, self.wait(handle))
            .await
            .is_err()
        {
            tracing::warn!(dir = %handle.dir.display(), "task ignored its stop signal; killing it");
            if let Some(pid) = handle.task_pid {
                let _ = os::kill_group(pid, libc::SIGKILL);
            }
        }
        self.wait(handle).await
    }

    fn stats(&self, handle: &TaskHandle) -> TaskStats {
        TaskStats {
            rss_kib: handle.task_pid.and_then(os::rss_kib),
            shim_rss_kib: os::rss_kib(handle.shim_pid),
        }
    }

    fn recover(&self, dir: &Path) -> Recovered {
        let Some((shim_pid, shim_start)) = shim::read_pid_file(&dir.join(shim::SHIM_PID)) else {
            return Recovered::Nothing;
        };
        let task = shim::read_pid_file(&dir.join(shim::TASK_PID));
        let handle = TaskHandle {
            dir: dir.to_path_buf(),
            shim_pid,
            shim_start,
            task_pid: task.map(|(p, _)| p),
            task_start: task.map(|(_, s)| s),
        };
        if os::process_is(shim_pid, shim_start) {
            return Recovered::Running(handle);
        }
        Recovered::Exited(Self::exit_of_dead_shim(&handle))
    }
}
