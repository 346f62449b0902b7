//! Test support for the agent's state machine: a fake driver whose tasks end when the test
//! says, a prober whose answers the test sets, and a harness that runs one real [`Runner`]
//! against them. With `#[tokio::test(start_paused = true)]` every wait (start delays, health
//! intervals, stop timeouts) passes in virtual time: no process, no wall clock.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dozen_api::Client;
use dozen_model::{Assignment, DesiredState, TaskKind, TaskStatus, SCHEMA};
use dozen_spec::HealthCheck;
use tokio::sync::{mpsc, watch};

use crate::driver::{
    Driver, DriverError, DriverInfo, Drivers, ExitInfo, Recovered, TaskConfig, TaskHandle,
    TaskStats,
};
use crate::health::Prober;
use crate::runner::Runner;
use crate::{ports, AgentConfig, Shared, TaskRecord};

pub(crate) fn assignment(task: &str, service: &str) -> Assignment {
    Assignment {
        schema: SCHEMA,
        task: task.into(),
        service: service.into(),
        stack: "shop".into(),
        node: "n1".into(),
        release: 1,
        generation: 1,
        desired: DesiredState::Run,
        kind: TaskKind::Service,
        start_delay_ms: 0,
        restarts: 0,
        restart_generation: 0,
        spec: dozen_spec::Service {
            command: Some(dozen_spec::Command::Exec(vec!["./web".into()])),
            ..dozen_spec::Service::default()
        },
        artifact_digest: None,
        image_pin: None,
        secrets: Default::default(),
        created_at_ms: 0,
        drain_since_ms: None,
    }
}

/// What the fake driver was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Start {
        task: String,
        instance: u32,
    },
    Stop {
        instance: u32,
        signal: String,
        timeout: Duration,
    },
}

#[derive(Default)]
struct FakeState {
    calls: Vec<Call>,
    /// Each started instance's exit, once it has one.
    exits: HashMap<u32, watch::Sender<Option<ExitInfo>>>,
    fail_next_start: Option<String>,
    recover: Option<Recovered>,
    /// Instances that ignore the stop signal (they end at the kill after the timeout).
    stubborn: bool,
}

/// A driver of pretend tasks: each start is an instance that runs until the test ends it
/// ([`FakeDriver::exit`]) or the runner stops it.
#[derive(Clone, Default)]
pub(crate) struct FakeDriver {
    state: Arc<Mutex<FakeState>>,
    next: Arc<AtomicU32>,
}

fn instance_of(handle: &TaskHandle) -> u32 {
    handle.state["instance"].as_u64().unwrap_or(0) as u32
}

fn exit(code: Option<i32>, signal: Option<i32>) -> ExitInfo {
    ExitInfo {
        code,
        signal,
        started_at_ms: Some(1),
        finished_at_ms: 2,
        error: None,
        oom_killed: false,
    }
}

impl FakeDriver {
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub(crate) fn starts(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| matches!(c, Call::Start { .. }))
            .count()
    }

    pub(crate) fn fail_next_start(&self, why: &str) {
        self.state.lock().unwrap().fail_next_start = Some(why.into());
    }

    pub(crate) fn recover_as(&self, recovered: Recovered) {
        self.state.lock().unwrap().recover = Some(recovered);
    }

    pub(crate) fn ignore_stop_signals(&self) {
        self.state.lock().unwrap().stubborn = true;
    }

    /// Ends the latest instance as if it exited with `code`.
    pub(crate) fn exit_latest(&self, code: i32) {
        let state = self.state.lock().unwrap();
        let latest = state.exits.keys().max().copied().expect("an instance ran");
        state.exits[&latest].send_replace(Some(exit(Some(code), None)));
    }

    pub(crate) fn handle(instance: u32) -> TaskHandle {
        TaskHandle {
            driver: "process".into(),
            pid: Some(1000 + instance),
            started_at_ms: Some(1),
            state: serde_json::json!({ "instance": instance }),
        }
    }
}

#[async_trait]
impl Driver for FakeDriver {
    fn name(&self) -> &'static str {
        // Stands in for the process driver: the tasks under test run host commands.
        "process"
    }

    fn fingerprint(&self) -> DriverInfo {
        DriverInfo {
            name: "process".into(),
            available: true,
            detail: "fake".into(),
        }
    }

    async fn start(&self, config: &TaskConfig) -> Result<TaskHandle, DriverError> {
        let mut state = self.state.lock().unwrap();
        if let Some(why) = state.fail_next_start.take() {
            return Err(DriverError::Start(why));
        }
        let instance = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        state.calls.push(Call::Start {
            task: config.task.clone(),
            instance,
        });
        state.exits.insert(instance, watch::channel(None).0);
        Ok(Self::handle(instance))
    }

    async fn wait(&self, handle: &TaskHandle) -> ExitInfo {
        let instance = instance_of(handle);
        let mut rx = {
            let mut state = self.state.lock().unwrap();
            state
                .exits
                .entry(instance)
                .or_insert_with(|| watch::channel(None).0)
                .subscribe()
        };
        let exited = rx.wait_for(Option::is_some).await.map(|e| e.clone());
        exited.ok().flatten().unwrap_or_else(|| exit(None, Some(9)))
    }

    async fn stop(&self, handle: &TaskHandle, signal: &str, timeout: Duration) -> ExitInfo {
        let instance = instance_of(handle);
        let stubborn = {
            let mut state = self.state.lock().unwrap();
            state.calls.push(Call::Stop {
                instance,
                signal: signal.into(),
                timeout,
            });
            state.stubborn
        };
        if stubborn {
            tokio::time::sleep(timeout).await;
        }
        let sender = {
            let mut state = self.state.lock().unwrap();
            state
                .exits
                .entry(instance)
                .or_insert_with(|| watch::channel(None).0)
                .clone()
        };
        let signal = if stubborn { 9 } else { 15 };
        sender.send_if_modified(|e| {
            let was_running = e.is_none();
            if was_running {
                *e = Some(exit(None, Some(signal)));
            }
            was_running
        });
        self.wait(handle).await
    }

    async fn stats(&self, _handle: &TaskHandle) -> TaskStats {
        TaskStats::default()
    }

    async fn recover(&self, _dir: &std::path::Path, _handle: Option<&TaskHandle>) -> Recovered {
        self.recover_now()
    }
}

impl FakeDriver {
    /// What `recover` answers: the state `recover_as` set, its task running again.
    pub(crate) fn recover_now(&self) -> Recovered {
        let recovered = self.state.lock().unwrap().recover.take();
        if let Some(Recovered::Running(handle)) = &recovered {
            self.state
                .lock()
                .unwrap()
                .exits
                .insert(instance_of(handle), watch::channel(None).0);
        }
        recovered.unwrap_or(Recovered::Nothing)
    }
}

/// A prober that answers what the test says, counting the probes.
#[derive(Default)]
pub(crate) struct FakeProber {
    pub(crate) failing: AtomicBool,
    pub(crate) probes: AtomicU32,
}

#[async_trait]
impl Prober for FakeProber {
    async fn probe(
        &self,
        _check: &HealthCheck,
        _port: Option<u16>,
        _context: &crate::health::CommandContext,
    ) -> Result<(), String> {
        self.probes.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            Err("GET /healthz answered 500 Internal Server Error".into())
        } else {
            Ok(())
        }
    }
}

/// One runner of one task, against the fakes, with its status reports in order.
pub(crate) struct Harness {
    pub(crate) shared: Arc<Shared>,
    pub(crate) driver: FakeDriver,
    pub(crate) prober: Arc<FakeProber>,
    pub(crate) assignment: watch::Sender<Option<Assignment>>,
    reports: mpsc::UnboundedReceiver<TaskStatus>,
    /// The events the runner emitted, in order.
    pub(crate) events: mpsc::Receiver<dozen_model::Event>,
    pub(crate) seen: Vec<TaskStatus>,
    _dir: tempfile::TempDir,
}

impl Harness {
    pub(crate) fn new(assignment: Assignment) -> Harness {
        Self::recovering(assignment, None)
    }

    /// A runner whose driver `prepare` sets up before the runner starts.
    pub(crate) fn new_with(assignment: Assignment, prepare: impl FnOnce(&FakeDriver)) -> Harness {
        Self::build(assignment, None, prepare)
    }

    /// A runner as an agent restarting over a task it left running would make it.
    pub(crate) fn recovering(assignment: Assignment, recovered: Option<Recovered>) -> Harness {
        Self::build(assignment, recovered, |_| {})
    }

    fn build(
        assignment: Assignment,
        recovered: Option<Recovered>,
        prepare: impl FnOnce(&FakeDriver),
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let driver = FakeDriver::default();
        prepare(&driver);
        let prober = Arc::new(FakeProber::default());
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::channel(crate::EVENTS_BUFFERED);
        let shared = Arc::new(Shared {
            config: AgentConfig {
                server: "http://127.0.0.1:9".into(),
                token: String::new(),
                tls: None,
                identity: None,
                data_dir: dir.path().to_path_buf(),
                node_name: "n1".into(),
                listen: "127.0.0.1:0".parse().unwrap(),
                port_range: 40_000..=40_009,
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                exe: PathBuf::from("/nonexistent/dozen"),
                host: "127.0.0.1".into(),
                proxy_internal_url: "http://127.0.0.1:7781".into(),
                cgroup_root: PathBuf::from("/nonexistent"),
                task_user: None,
                labels: Default::default(),
            },
            // Never called: the tasks under test have no artifact to fetch.
            client: Client::new("http://127.0.0.1:9", ""),
            drivers: Drivers::new().with(driver.clone()),
            prober: prober.clone(),
            ports: ports::PortAllocator::new(40_000..=40_009),
            instance: "agent-1".into(),
            runners: Mutex::new(HashMap::new()),
            reports: reports_tx,
            events: events_tx,
        });
        let recovered = match recovered {
            Some(r) => {
                driver.recover_as(r);
                driver.recover_now()
            }
            None => Recovered::Nothing,
        };
        let (tx, rx) = watch::channel(Some(assignment.clone()));
        shared
            .runners
            .lock()
            .unwrap()
            .insert(assignment.task.clone(), tx.clone());
        let record = TaskRecord {
            assignment,
            port: None,
            handle: None,
        };
        tokio::spawn(Runner::new(shared.clone(), record, recovered, rx).run());
        Harness {
            shared,
            driver,
            prober,
            assignment: tx,
            reports,
            events,
            seen: Vec::new(),
            _dir: dir,
        }
    }

    /// The next status the runner reports that matches `pred`. A runner that reports nothing
    /// more fails the test within a minute of virtual time, naming what it did report.
    pub(crate) async fn until(
        &mut self,
        what: &str,
        pred: impl Fn(&TaskStatus) -> bool,
    ) -> TaskStatus {
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let status = self.reports.recv().await?;
                self.seen.push(status.clone());
                if pred(&status) {
                    return Some(status);
                }
            }
        })
        .await;
        match found {
            Ok(Some(status)) => status,
            _ => panic!(
                "no status {what}; reported: {:#?}",
                self.seen
                    .iter()
                    .map(|s| (s.generation, s.state, s.healthy, s.message.clone()))
                    .collect::<Vec<_>>()
            ),
        }
    }

    /// Changes the assignment as the control plane would.
    pub(crate) fn assign(&self, change: impl FnOnce(&mut Assignment)) {
        self.assignment.send_modify(|a| {
            if let Some(a) = a.as_mut() {
                change(a);
            }
        });
    }

    pub(crate) fn remove(&self) {
        self.assignment.send_replace(None);
    }
}

pub(crate) fn http_check(interval_ms: u64, unhealthy_threshold: u32) -> HealthCheck {
    HealthCheck {
        kind: dozen_spec::HealthKind::Http {
            path: "/healthz".into(),
        },
        interval_ms,
        timeout_ms: interval_ms,
        healthy_threshold: 1,
        unhealthy_threshold,
        grace_period_ms: 0,
    }
}
