//! The `process` driver: each task runs under a shim (see [`crate::shim`]) as a host process
//! group, in its cgroups when the node has them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    Driver, DriverError, DriverInfo, ExitInfo, Recovered, TaskConfig, TaskHandle, TaskStats,
    Workload,
};
use crate::cgroups::Cgroups;
use crate::os;
use crate::shim::{self, ExitRecord, Launch};

pub const NAME: &str = "process";

/// A task dir's record of its cgroup's OOM kill count when the generation started.
const OOM_KILLS_BEFORE: &str = "oom_kills_before";

/// The process driver's part of a [`TaskHandle`]: the shim and the task, each named by pid and
/// start time so a reused pid is never taken for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Shimmed {
    dir: PathBuf,
    shim_pid: u32,
    shim_start: u64,
    task_pid: Option<u32>,
    task_start: Option<u64>,
}

impl Shimmed {
    fn of(handle: &TaskHandle) -> Option<Shimmed> {
        serde_json::from_value(handle.state.clone()).ok()
    }

    fn handle(&self) -> TaskHandle {
        TaskHandle {
            driver: NAME.into(),
            pid: self.task_pid,
            started_at_ms: std::fs::metadata(self.dir.join(shim::TASK_PID))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64),
            state: serde_json::to_value(self).unwrap_or_default(),
        }
    }
}

/// The PATH a task gets when its environment names none.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct ProcessDriver {
    /// The dozen binary, run as `EXE shim DIR`.
    exe: PathBuf,
    cgroups: Box<dyn Cgroups>,
}

fn io_err(dir: &Path) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |source| DriverError::Io {
        dir: dir.display().to_string(),
        source,
    }
}

impl ProcessDriver {
    pub fn new(exe: PathBuf, cgroups: Box<dyn Cgroups>) -> Self {
        ProcessDriver { exe, cgroups }
    }

    /// What the shim is told to run: the neutral config made concrete for a host process.
    fn launch(&self, config: &TaskConfig) -> Result<Launch, DriverError> {
        let argv = match &config.workload {
            Workload::Command(argv) => argv.clone(),
            Workload::Image { image, .. } => {
                return Err(DriverError::Unsupported {
                    driver: NAME,
                    why: format!("`{image}` is an image; this node runs host commands only"),
                })
            }
        };
        let mut env = config.env.clone();
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        if let Some(secrets) = &config.secrets {
            env.insert(
                "DOZEN_SECRETS_DIR".into(),
                secrets.dir.display().to_string(),
            );
            env.insert(
                "DOZEN_TOKEN_FILE".into(),
                secrets.token_file.display().to_string(),
            );
        }
        let (mut uid, mut gid) = (None, None);
        if let Some(user) = &config.user {
            let (u, g, home) = os::lookup_user(user).ok_or_else(|| {
                DriverError::Start(format!(
                    "user `{user}` does not exist on node `{}`",
                    config.node
                ))
            })?;
            // Switching to the agent's own user is no switch (and a user without the right to
            // drop supplementary groups would fail it).
            if u != os::effective_uid() {
                uid = Some(u);
                gid = Some(g);
            }
            // The user's defaults; a HOME or USER the service sets itself wins.
            env.entry("HOME".into()).or_insert(home);
            env.entry("USER".into()).or_insert_with(|| user.clone());
        }
        // Whatever an earlier generation left in the task's groups (a daemonised child) goes
        // before the new one joins them.
        self.cgroups.signal_all(&config.task, libc::SIGKILL, None);
        let cgroup_procs = match self.cgroups.prepare(&config.task, &config.resources) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(task = %config.task, error = %e, "cannot set resource limits; running without");
                Vec::new()
            }
        };
        Ok(Launch {
            argv,
            env,
            cwd: config.cwd.clone(),
            uid,
            gid,
            cgroup_procs,
            linger_ms: Some(config.stop_timeout.as_millis() as u64),
            stop_signal: os::signal_number(&config.stop_signal),
            umask: os::task_umask(),
            log_max_bytes: Some(config.resources.log_bytes),
            secret_env: config.secrets.as_ref().and_then(|s| s.env_file.clone()),
        })
    }

    fn read_exit(dir: &Path) -> Option<ExitInfo> {
        let bytes = std::fs::read(dir.join(shim::EXIT)).ok()?;
        let r: ExitRecord = serde_json::from_slice(&bytes).ok()?;
        Some(ExitInfo {
            code: r.code,
            signal: r.signal,
            started_at_ms: r.started_at_ms,
            finished_at_ms: r.finished_at_ms,
            error: r.error,
            oom_killed: false,
        })
    }

    fn exit_of_dead_shim(handle: &Shimmed) -> ExitInfo {
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
                oom_killed: false,
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
    fn name(&self) -> &'static str {
        NAME
    }

    fn fingerprint(&self) -> DriverInfo {
        DriverInfo {
            name: NAME.into(),
            available: self.exe.exists(),
            detail: format!(
                "shim: {} shim DIR; limits: {}",
                self.exe.display(),
                self.cgroups.describe()
            ),
        }
    }

    async fn start(&self, config: &TaskConfig) -> Result<TaskHandle, DriverError> {
        let launch = self.launch(config)?;
        let dir = &config.dir;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        for stale in [shim::EXIT, shim::TASK_PID, shim::SHIM_PID, shim::STOPPING] {
            match std::fs::remove_file(dir.join(stale)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(dir)(e)),
            }
        }
        let launch = serde_json::to_vec(&launch).unwrap_or_default();
        os::write_atomic(&dir.join(shim::LAUNCH), &launch).map_err(io_err(dir))?;
        // The group's count of kills for want of memory so far: more at exit means this
        // generation ran out of memory.
        let oom_kills = self.cgroups.oom_kills(&config.task).to_string();
        os::write_atomic(&dir.join(OOM_KILLS_BEFORE), oom_kills.as_bytes()).map_err(io_err(dir))?;
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
                return Ok(Shimmed {
                    dir: dir.clone(),
                    shim_pid,
                    shim_start,
                    task_pid: Some(pid),
                    task_start: Some(task_start),
                }
                .handle());
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
        let Some(shimmed) = Shimmed::of(handle) else {
            return not_ours(handle);
        };
        wait_for_exit(shimmed.shim_pid, shimmed.shim_start).await;
        let mut exit = Self::exit_of_dead_shim(&shimmed);
        let task = shimmed
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let before: u64 = std::fs::read_to_string(shimmed.dir.join(OOM_KILLS_BEFORE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(u64::MAX);
        exit.oom_killed = self.cgroups.oom_kills(&task) > before;
        exit
    }

    async fn stop(&self, handle: &TaskHandle, signal: &str, timeout: Duration) -> ExitInfo {
        let Some(shimmed) = Shimmed::of(handle) else {
            return not_ours(handle);
        };
        let signal = os::signal_number(signal).unwrap_or(libc::SIGTERM);
        // Tells the shim this signal came from us: it must not send the group another.
        let _ = std::fs::write(shimmed.dir.join(shim::STOPPING), b"");
        let task = shimmed
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The task's process group, if its leader is still the process we started (a pid is
        // checked before every signal: it may have been reused), and everything in its
        // cgroups: a `setsid` or double-forked child leaves the group, never the cgroup.
        let group = shimmed
            .task_pid
            .zip(shimmed.task_start)
            .filter(|(pid, start)| os::process_is(*pid, *start))
            .map(|(pid, _)| pid);
        if let Some(pid) = group {
            let _ = os::kill_group(pid, signal);
        }
        self.cgroups.signal_all(&task, signal, group);
        if tokio::time::timeout(timeout, self.wait(handle))
            .await
            .is_err()
        {
            tracing::warn!(dir = %shimmed.dir.display(), "task ignored its stop signal; killing it");
            if let Some(pid) = group {
                let _ = os::kill_group(pid, libc::SIGKILL);
            }
        }
        let exit = self.wait(handle).await;
        // What outlived the task in its cgroups (daemonised children) goes with it.
        self.cgroups.signal_all(&task, libc::SIGKILL, None);
        exit
    }

    async fn stats(&self, handle: &TaskHandle) -> TaskStats {
        let Some(shimmed) = Shimmed::of(handle) else {
            return TaskStats::default();
        };
        let task = shimmed
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        let usage = task
            .map(|task| self.cgroups.usage(&task))
            .unwrap_or_default();
        TaskStats {
            rss_kib: shimmed.task_pid.and_then(os::rss_kib),
            overhead_rss_kib: os::rss_kib(shimmed.shim_pid),
            memory_bytes: usage.memory_bytes,
            cpu_nanos: usage.cpu_nanos,
        }
    }

    /// The shim's pid files are the truth (the shim writes them; the agent may have died
    /// before it saved a handle), so the saved handle is not needed.
    async fn recover(&self, dir: &Path, _handle: Option<&TaskHandle>) -> Recovered {
        let Some((shim_pid, shim_start)) = shim::read_pid_file(&dir.join(shim::SHIM_PID)) else {
            return Recovered::Nothing;
        };
        let task = shim::read_pid_file(&dir.join(shim::TASK_PID));
        let shimmed = Shimmed {
            dir: dir.to_path_buf(),
            shim_pid,
            shim_start,
            task_pid: task.map(|(p, _)| p),
            task_start: task.map(|(_, s)| s),
        };
        if os::process_is(shim_pid, shim_start) {
            return Recovered::Running(shimmed.handle());
        }
        Recovered::Exited(Self::exit_of_dead_shim(&shimmed))
    }

    fn release(&self, task: &str) {
        self.cgroups.signal_all(task, libc::SIGKILL, None);
        self.cgroups.remove(task);
    }
}

/// A handle another driver made, given to this one: nothing to wait for.
fn not_ours(handle: &TaskHandle) -> ExitInfo {
    ExitInfo {
        code: None,
        signal: None,
        started_at_ms: None,
        finished_at_ms: shim::wall_ms(),
        error: Some(format!(
            "the process driver was given a `{}` task handle",
            handle.driver
        )),
        oom_killed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(user: Option<&str>) -> TaskConfig {
        TaskConfig {
            task: "web-1".into(),
            node: "node-7".into(),
            dir: PathBuf::from("/nonexistent/web-1"),
            workload: Workload::Command(vec!["./web".into()]),
            env: [("HOME".to_string(), "/srv/web".to_string())].into(),
            port: None,
            resources: dozen_spec::Resources::default(),
            user: user.map(String::from),
            stop_signal: "SIGINT".into(),
            stop_timeout: Duration::from_secs(7),
            cwd: None,
            mounts: Vec::new(),
            log: PathBuf::from("/nonexistent/web-1/output.log"),
            secrets: None,
        }
    }

    fn driver() -> ProcessDriver {
        ProcessDriver::new(
            PathBuf::from("/nonexistent/dozen"),
            crate::cgroups::detect(Path::new("/nonexistent")),
        )
    }

    #[test]
    fn the_shim_gets_the_tasks_environment_with_the_users_defaults_under_it() {
        let launch = driver().launch(&config(Some("root"))).unwrap();
        assert_eq!(
            launch.env["HOME"], "/srv/web",
            "the service's own HOME wins"
        );
        assert_eq!(launch.env["USER"], "root");
        assert!(launch.env["PATH"].contains("/usr/bin"));
        // Root's ids, unless the agent is root already: then there is nothing to switch.
        let expected = (os::effective_uid() != 0).then_some(0);
        assert_eq!((launch.uid, launch.gid), (expected, expected));
        assert_eq!(launch.stop_signal, Some(libc::SIGINT));
        assert_eq!(launch.linger_ms, Some(7_000));
    }

    #[test]
    fn a_missing_user_or_an_image_is_refused_with_the_reason() {
        let e = driver()
            .launch(&config(Some("no-such-user-here")))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "user `no-such-user-here` does not exist on node `node-7`"
        );
        let mut image = config(None);
        image.workload = Workload::Image {
            image: "shop/web:1".into(),
            args: None,
            pin: None,
        };
        let e = driver().launch(&image).unwrap_err().to_string();
        assert!(
            e.contains("the `process` driver cannot run this task"),
            "{e}"
        );
    }
}
