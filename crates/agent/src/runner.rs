//! One runner per task: starts each generation through the driver (after its crash backoff),
//! health-checks it, stops it with the stop protocol, and reports every change of state.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dozen_model::{Assignment, DesiredState, TaskKind, TaskState, TaskStatus, SCHEMA};
use tokio::sync::watch;

use crate::driver::{
    Driver, ExitInfo, Mount, MountSource, Recovered, TaskConfig, TaskHandle, Workload,
};
use crate::health::CommandContext;
use crate::logs;
use crate::{artifacts, env, os, shim, Shared, TaskRecord, REMOVED_MARKER, TASK_RECORD};
use dozen_model::{Event, EventKind};

/// A user's and group's numeric ids.
type UidGid = (u32, u32);

/// Why a task stops when its assignment says so (the controller records its own reason).
const TOLD_TO_STOP: &str = "told to stop";

/// How often a running task's count of dropped log lines is looked at.
const LOG_DROPS_EVERY: Duration = Duration::from_secs(2);

/// Health bookkeeping of one running generation.
struct HealthState {
    successes: u32,
    failures: u32,
    started: tokio::time::Instant,
    /// Fast probes while starting must not use up the failure budget faster than the
    /// configured interval would: at most one failure counts per interval.
    last_counted_failure: Option<tokio::time::Instant>,
}

pub(crate) struct Runner {
    shared: Arc<Shared>,
    task: String,
    dir: PathBuf,
    rx: watch::Receiver<Option<Assignment>>,
    record: TaskRecord,
    handle: Option<TaskHandle>,
    /// The generation `handle` runs, or the last one that ended.
    generation: Option<u64>,
    status: TaskStatus,
    /// Why the last generation ended badly, for the message of the next one's backoff.
    last_failure: Option<String>,
    /// Keeps the task's identity token fresh while it runs.
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl Runner {
    pub(crate) fn new(
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
            unhealthy_since_ms: None,
            log_lines_dropped: 0,
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
            last_failure: None,
            renewal: None,
        };
        match recovered {
            Recovered::Running(handle) => {
                runner.generation = Some(runner.record.assignment.generation);
                runner.status.pid = handle.pid;
                runner.status.adopted = true;
                runner.status.started_at_ms = handle.started_at_ms;
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

    /// Records what happened to this task, for `dozen events` and `ps`.
    fn event(&self, kind: EventKind) {
        let node = &self.shared.config.node_name;
        let event = Event::new(shim::wall_ms(), format!("agent {node}"), kind)
            .service(&self.record.assignment.service)
            .task(&self.task)
            .node(node);
        if self.shared.events.try_send(event).is_err() {
            tracing::warn!(task = %self.task, "event dropped: the server has not taken this agent's events for a while");
        }
    }

    /// The last thing the task said before it ended: its last stderr line among its last
    /// lines, else its last line (cut to 200 characters).
    fn last_words(&self) -> Option<String> {
        let (lines, _) = logs::read_tail(&self.dir.join(shim::LOG), 20, "", &self.task).ok()?;
        let line = lines
            .iter()
            .rev()
            .find(|l| l.stream == dozen_api::LogStream::Stderr && !l.line.starts_with("[dozen]"))
            .or_else(|| lines.last())?;
        let text = line.line.trim();
        if text.is_empty() {
            return None;
        }
        Some(match text.char_indices().nth(200) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text.to_string(),
        })
    }

    /// A start failure, where the user looks: the task's own log, its status and its events.
    fn start_failed(&mut self, message: String) {
        logs::append_note(
            &self.dir.join(shim::LOG),
            &format!("start failed: {message}"),
        );
        self.event(EventKind::StartFailed {
            error: message.clone(),
        });
        self.last_failure = Some(format!("start failed: {message}"));
        self.set(TaskState::Failed, false, Some(message));
    }

    fn finish(&mut self, state: TaskState, exit: &ExitInfo) {
        self.status.exit_code = exit.code;
        self.status.signal = exit.signal;
        self.status.finished_at_ms = Some(exit.finished_at_ms);
        if exit.started_at_ms.is_some() {
            self.status.started_at_ms = exit.started_at_ms;
        }
        if let (Some(error), None) = (&exit.error, exit.started_at_ms) {
            return self.start_failed(error.clone());
        }
        if state == TaskState::Exited {
            let exited = EventKind::Exited {
                code: exit.code,
                signal: exit.signal,
                oom: exit.oom_killed,
                last_line: self.last_words(),
            };
            self.last_failure = Some(exited.describe());
            self.event(exited);
        }
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

    pub(crate) async fn run(mut self) {
        // A task adopted after an agent restart keeps its identity fresh too.
        if self.handle.is_some() && crate::secrets::wanted(&self.record.assignment) {
            if let (Some(secrets), Ok((_, owner))) = (
                crate::secrets::existing(&self.shared.config.data_dir, &self.record.assignment),
                self.task_user(),
            ) {
                self.renewal = Some(tokio::spawn(crate::secrets::renew(
                    self.shared.client.clone(),
                    self.shared.config.node_name.clone(),
                    self.task.clone(),
                    secrets,
                    owner,
                )));
            }
        }
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
                    self.stop_now(TOLD_TO_STOP).await;
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
            self.event(EventKind::Restarting {
                backoff_ms: a.start_delay_ms,
                restarts: a.restarts,
            });
            let backoff = format!("restarting in {} ms (crash backoff)", a.start_delay_ms);
            let message = match &self.last_failure {
                Some(why) => format!("{why}; {backoff}"),
                None => backoff,
            };
            self.set(TaskState::Pending, false, Some(message));
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
                self.status.pid = handle.pid;
                self.status.started_at_ms = Some(shim::wall_ms());
                self.status.unhealthy_since_ms = None;
                let healthy = a.spec.health.is_none();
                let state = if healthy {
                    TaskState::Running
                } else {
                    TaskState::Starting
                };
                tracing::info!(task = %self.task, generation = a.generation, pid = ?handle.pid, port = ?self.record.port, "task started");
                self.event(EventKind::Started { pid: handle.pid });
                self.handle = Some(handle);
                self.set(state, healthy, None);
            }
            Err(message) => {
                tracing::warn!(task = %self.task, error = %message, "task failed to start");
                self.status.pid = None;
                let now = shim::wall_ms();
                self.status.started_at_ms = Some(now);
                self.status.finished_at_ms = Some(now);
                self.start_failed(message);
            }
        }
        true
    }

    /// The driver this task needs, if this node has it.
    fn driver(&self) -> Result<Arc<dyn Driver>, String> {
        let name = self.record.driver();
        self.shared.drivers.get(name).ok_or_else(|| {
            format!(
                "the `{name}` driver is not available on node `{}`",
                self.shared.config.node_name
            )
        })
    }

    async fn launch(&mut self) -> Result<TaskHandle, String> {
        let driver = self.driver()?;
        let a = &self.record.assignment;
        let spec = &a.spec;
        let (workload, wants_port) = match (&a.kind, &spec.image) {
            (TaskKind::OneOff { argv }, None) => (Workload::Command(argv.clone()), false),
            (TaskKind::OneOff { argv }, Some(image)) => (
                Workload::Image {
                    image: image.clone(),
                    args: Some(argv.clone()),
                    pin: a.image_pin.clone(),
                },
                false,
            ),
            (TaskKind::Service, Some(image)) => (
                Workload::Image {
                    image: image.clone(),
                    args: spec.command.as_ref().map(|c| c.argv()),
                    pin: a.image_pin.clone(),
                },
                spec.port,
            ),
            (TaskKind::Service, None) => (
                Workload::Command(
                    spec.command
                        .as_ref()
                        .map(|c| c.argv())
                        .ok_or("the service has neither a command nor an image")?,
                ),
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
        let env = env::task_env(a, self.record.port, &self.shared.config.proxy_internal_url);
        let (user, other) = self.task_user()?;
        let cwd = match &a.artifact_digest {
            Some(digest) => {
                let dir =
                    artifacts::unpacked(&self.shared.client, &self.shared.config.data_dir, digest)
                        .await?;
                // Another user gets a copy of its own: the agent's files are the agent's alone.
                match other {
                    Some((_, gid)) => Some(artifacts::readable_by_group(&dir, gid)?),
                    None => Some(dir),
                }
            }
            None => None,
        };
        let secrets = if crate::secrets::wanted(a) {
            let delivered = crate::secrets::deliver(
                &self.shared.client,
                &self.shared.config.node_name,
                &self.shared.config.data_dir,
                a,
                other,
            )
            .await?;
            if let Some(previous) = self.renewal.take() {
                previous.abort();
            }
            self.renewal = Some(tokio::spawn(crate::secrets::renew(
                self.shared.client.clone(),
                self.shared.config.node_name.clone(),
                self.task.clone(),
                delivered.clone(),
                other,
            )));
            Some(delivered)
        } else {
            None
        };
        let config = TaskConfig {
            task: self.task.clone(),
            node: self.shared.config.node_name.clone(),
            dir: self.dir.clone(),
            workload,
            env,
            port: self.record.port,
            resources: spec.resources,
            user,
            stop_signal: spec.stop_signal.clone(),
            stop_timeout: Duration::from_millis(spec.stop_timeout_ms),
            cwd,
            // Named volumes are the stack's: two stacks' `data` are two volumes.
            mounts: spec
                .volumes
                .iter()
                .map(|v| Mount {
                    source: if v.is_host_path() {
                        MountSource::HostPath(PathBuf::from(&v.source))
                    } else {
                        MountSource::Volume(format!("{}_{}", a.stack, v.source))
                    },
                    target: PathBuf::from(&v.target),
                    read_only: v.read_only,
                })
                .collect(),
            log: self.dir.join(shim::LOG),
            secrets,
        };
        self.record.handle = None;
        self.save_record();
        let handle = driver.start(&config).await.map_err(|e| e.to_string())?;
        // With the handle on disk, a restarted agent recovers the task through its driver.
        self.record.handle = Some(handle.clone());
        self.save_record();
        Ok(handle)
    }

    /// Watches the running generation: its exit, health, and changes to the assignment.
    /// Returns false when the runner should end.
    async fn supervise(&mut self) -> bool {
        let Some(handle) = self.handle.clone() else {
            return true;
        };
        let driver = match self.driver() {
            Ok(driver) => driver,
            Err(why) => {
                self.handle = None;
                self.set(TaskState::Failed, false, Some(why));
                return true;
            }
        };
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
        let mut log_check = tokio::time::interval(LOG_DROPS_EVERY);
        // Kept across wake-ups for other reasons, so they never push a probe back.
        let mut next_probe = None;
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
                _ = log_check.tick() => {
                    let dropped = shim::dropped_lines(&self.dir);
                    if dropped != self.status.log_lines_dropped {
                        tracing::warn!(task = %self.task, dropped, "task output dropped: its log cannot be written");
                        self.status.log_lines_dropped = dropped;
                        let _ = self.shared.reports.send(self.status.clone());
                    }
                }
                _ = tokio::time::sleep_until(*next_probe.get_or_insert_with(|| {
                    tokio::time::Instant::now() + Duration::from_millis(interval.max(10))
                })) => {
                    next_probe = None;
                    let Some(c) = &check else { continue };
                    probes += 1;
                    // A driver may run a command check its own way (inside its container).
                    let own = match &c.kind {
                        dozen_spec::HealthKind::Command { argv } => {
                            let timeout = Duration::from_millis(c.timeout_ms.max(1));
                            driver.check(&handle, argv, timeout).await
                        }
                        _ => None,
                    };
                    let context = match c.kind {
                        dozen_spec::HealthKind::Command { .. } => self.command_context(),
                        _ => Ok(CommandContext::default()),
                    };
                    let result = match (own, context) {
                        (Some(result), _) => result,
                        (None, Ok(context)) => self.shared.prober.probe(c, self.record.port, &context).await,
                        (None, Err(why)) => Err(why),
                    };
                    match result {
                        Ok(()) => {
                            health.successes += 1;
                            health.failures = 0;
                            if !self.status.healthy && health.successes >= c.healthy_threshold {
                                if self.status.unhealthy_since_ms.is_some() {
                                    self.event(EventKind::BackInRouting);
                                }
                                self.status.unhealthy_since_ms = None;
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
                            if health.failures >= c.unhealthy_threshold && self.status.healthy {
                                // Busy is not dead: out of routing at once, still running. The
                                // controller starts a replacement and stops this one through
                                // the stop protocol once that is healthy (or, with no room
                                // anywhere, after a stated wait); if it recovers first, it
                                // takes traffic again.
                                tracing::warn!(task = %self.task, reason = %why, "task is unhealthy; out of routing, still running");
                                self.event(EventKind::HealthCheckFailed {
                                    answer: why.clone(),
                                    failures: health.failures,
                                    threshold: c.unhealthy_threshold,
                                });
                                self.event(EventKind::OutOfRouting {
                                    reason: "its health check fails; it runs on until a replacement is healthy".into(),
                                });
                                self.status.unhealthy_since_ms = Some(crate::shim::wall_ms());
                                let message = format!(
                                    "unhealthy: {why} ({} checks failed); out of routing, still running",
                                    health.failures
                                );
                                self.set(TaskState::Running, false, Some(message));
                                continue;
                            }
                            if health.failures >= c.unhealthy_threshold && self.status.state == TaskState::Starting {
                                tracing::warn!(task = %self.task, reason = %why, "task never passed its health check; stopping it so it is replaced");
                                self.event(EventKind::HealthCheckFailed {
                                    answer: why.clone(),
                                    failures: health.failures,
                                    threshold: c.unhealthy_threshold,
                                });
                                self.status.message = Some(format!("unhealthy: {why}"));
                                // The stop protocol's signal, then SIGKILL after the timeout:
                                // a hung task that ignores the signal still goes.
                                self.stop_now("failed health checks").await;
                                self.last_failure = Some(format!("unhealthy: {why}"));
                                self.set(TaskState::Exited, false, Some(format!("stopped: unhealthy: {why}")));
                                return true;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Who runs the task: its service's `user`, else the node's task user; with uid and gid
    /// when that is someone other than the agent.
    /// A user that is named but cannot be found is an error, never the agent's own rights.
    fn task_user(&self) -> Result<(Option<String>, Option<UidGid>), String> {
        task_user_of(&self.shared, &self.record)
    }

    /// How a `command` health check runs: as the task does.
    fn command_context(&self) -> Result<CommandContext, String> {
        command_context_of(&self.shared, &self.record)
    }

    /// Stops the running generation, if any, with the service's signal and timeout.
    async fn stop_now(&mut self, why: &str) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let spec = &self.record.assignment.spec;
        let (signal, timeout) = (
            spec.stop_signal.clone(),
            Duration::from_millis(spec.stop_timeout_ms),
        );
        tracing::info!(task = %self.task, reason = why, "stopping task");
        // A stop the controller asked for is its event, with its reason; the agent records
        // the stops it decides itself.
        if why != TOLD_TO_STOP {
            self.event(EventKind::Stopped {
                reason: why.to_string(),
            });
        }
        self.set(TaskState::Stopping, false, None);
        let exit = match self.driver() {
            Ok(driver) => driver.stop(&handle, &signal, timeout).await,
            Err(why) => ExitInfo {
                code: None,
                signal: None,
                started_at_ms: None,
                finished_at_ms: shim::wall_ms(),
                error: Some(why),
                oom_killed: false,
            },
        };
        self.finish(TaskState::Stopped, &exit);
    }

    fn cleanup(&mut self) {
        if let Some(port) = self.record.port.take() {
            self.shared.ports.release(port);
        }
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
        crate::secrets::remove(&self.shared.config.data_dir, &self.task);
        self.shared.drivers.release(&self.task);
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

#[cfg(test)]
mod tests;

/// Who a task runs as: its service's `user`, else the agent's `--task-user`; the ids when
/// that is not the agent's own user.
fn task_user_of(
    shared: &Shared,
    record: &TaskRecord,
) -> Result<(Option<String>, Option<UidGid>), String> {
    let user = (record.assignment.spec.user.clone()).or_else(|| shared.config.task_user.clone());
    let Some(name) = &user else {
        return Ok((None, None));
    };
    let (uid, gid, _) = os::lookup_user(name).ok_or_else(|| {
        format!(
            "user `{name}` does not exist on node `{}`",
            shared.config.node_name
        )
    })?;
    let other = (uid != os::effective_uid()).then_some((uid, gid));
    Ok((user, other))
}

/// How a command runs as the task does (a `command` health check, `dozen exec` on the host):
/// its environment, directory and user.
pub(crate) fn command_context_of(
    shared: &Shared,
    record: &TaskRecord,
) -> Result<CommandContext, String> {
    let a = &record.assignment;
    let (_, user) = task_user_of(shared, record)?;
    let mut env = env::task_env(a, record.port, &shared.config.proxy_internal_url);
    env.entry("PATH".into())
        .or_insert_with(|| crate::driver::process::DEFAULT_PATH.into());
    Ok(CommandContext {
        env,
        cwd: a.artifact_digest.as_deref().and_then(|digest| {
            artifacts::unpacked_path(&shared.config.data_dir, digest, user.map(|u| u.1))
        }),
        user,
    })
}
