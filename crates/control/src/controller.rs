//! The service controller: level-triggered, idempotent, fenced.
//!
//! Each pass reads a snapshot, asks [`dozen_scheduler::reconcile`] what each service needs and
//! writes the answer; it runs again on every store change (and on a slow tick, as a safety net).
//! Nothing is kept between passes but the leadership, so a controller killed at any point
//! continues from the store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dozen_model::{encode, keys, Assignment, DesiredState, Event, EventKind, TaskKind, SCHEMA};
use dozen_scheduler::{Action, Clock, NodeView, ServiceView, StatusView, TaskView};
use dozen_store::{Compare, Op, Store, Txn, WatchMessage};

use crate::leader::{campaign, Leadership};
use crate::snapshot::Snapshot;
use crate::{wall_ms, ControlError, Result};

/// The nodes as the scheduler sees them. `judging`: whether a node without heartbeats counts
/// as down (false during a new leader's grace period).
pub fn node_views(snap: &Snapshot, judging: bool) -> Vec<NodeView> {
    snap.nodes
        .values()
        .map(|n| {
            let alive = snap.alive_nodes.contains(&n.record.name);
            NodeView {
                name: n.record.name.clone(),
                capacity: n.record.resources.clone(),
                drivers: n.record.drivers.clone(),
                labels: n.record.labels.clone(),
                alive,
                down: !alive && judging,
            }
        })
        .collect()
}

pub fn task_views(snap: &Snapshot) -> Vec<TaskView> {
    snap.assignments
        .values()
        .map(|a| {
            let a = &a.record;
            TaskView {
                task: a.task.clone(),
                node: a.node.clone(),
                release: a.release,
                generation: a.generation,
                desired: a.desired,
                kind: a.kind.clone(),
                restarts: a.restarts,
                restart_generation: a.restart_generation,
                created_at_ms: a.created_at_ms,
                cpu_millis: a.spec.resources.cpu_millis,
                memory_bytes: a.spec.resources.memory_bytes,
                drain_since_ms: a.drain_since_ms,
                mod_revision: snap.assignments[&a.task].mod_revision,
                status: snap.statuses.get(&a.task).map(|s| StatusView {
                    generation: s.record.generation,
                    state: s.record.state,
                    healthy: s.record.healthy,
                    started_at_ms: s.record.started_at_ms,
                    finished_at_ms: s.record.finished_at_ms,
                    unhealthy_since_ms: s.record.unhealthy_since_ms,
                }),
            }
        })
        .collect()
}

/// Problems found by the last pass, per service (shown by `dozen ps`).
pub type Problems = BTreeMap<String, Vec<String>>;

pub struct Pass {
    pub problems: Problems,
    /// Run again after this many ms even without a change.
    pub wake: Option<u64>,
}

#[derive(Clone)]
pub struct Controller {
    pub store: Arc<dyn Store>,
    pub server_id: String,
    pub leader_ttl: Duration,
    /// How long a node may go without a heartbeat. A new leader waits this long before it
    /// judges any node down: the node may simply not have reached it yet (after an outage of
    /// the control plane every node's lease has lapsed, and none of its tasks must restart).
    pub node_ttl: Duration,
    /// Revisions of history kept behind the head for watchers: every [`COMPACT_EVERY`] the
    /// leader compacts the store to this far behind (etcd never compacts on its own, and would
    /// reach its space quota and turn read-only). 0: never compact.
    pub history_window: u64,
}

/// The published problems record holds at most this many per service (then "... and N more"):
/// it is rewritten whenever they change, so it must stay small.
pub const MAX_PROBLEMS_PER_SERVICE: usize = 10;

/// How often the leader compacts the store's history.
pub const COMPACT_EVERY: Duration = Duration::from_secs(300);
/// The history kept for watchers by default: as many revisions as the embedded store keeps.
pub const HISTORY_WINDOW: u64 = 20_000;

/// The problems of the last pass, where every server reads them (`dozen services` may ask any
/// server, not only the leader). Written only when they change.
pub fn problems_key() -> String {
    keys::controller("problems")
}

/// The problems the leading controller published last (none when nothing was published).
pub async fn read_problems(store: &dyn Store) -> Result<Problems> {
    let key = problems_key();
    match store.get(&key).await? {
        Some(kv) => serde_json::from_slice(&kv.value).map_err(|e| {
            ControlError::Invalid(format!("unreadable controller problems at {key}: {e}"))
        }),
        None => Ok(Problems::new()),
    }
}

impl Controller {
    /// Runs until the process ends: campaign, lead, and campaign again if leadership is lost.
    pub async fn run(self) {
        loop {
            let leadership =
                match campaign(self.store.clone(), &self.server_id, self.leader_ttl).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "campaign failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
            // Led in a task of its own, so a panic ends the term (and its lease) instead of
            // leaving the keep-alive running for a controller that is gone.
            let this = self.clone();
            let term = leadership.clone();
            let mut led = tokio::spawn(async move { this.lead(&term).await });
            let outcome = tokio::select! {
                joined = &mut led => match joined {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        tracing::error!(error = %e, "the controller panicked; giving up leadership");
                        Err(ControlError::Invalid(format!("the controller panicked: {e}")))
                    }
                },
                // The term ended under a pass that does not return (the watchdog gave the
                // lease up): drop that pass and campaign again.
                _ = leadership.ended() => {
                    led.abort();
                    Err(ControlError::LostLeadership)
                }
            };
            // Whatever ended the term, end the lease with it: no keep-alive left behind, and
            // the key free for whoever campaigns first (this server too).
            leadership.resign(self.store.as_ref()).await;
            match outcome {
                Err(ControlError::LostLeadership) => {
                    tracing::warn!("controller lost leadership; campaigning again");
                }
                Err(e) => {
                    tracing::error!(error = %e, "controller failed; campaigning again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(()) => {}
            }
        }
    }

    async fn lead(&self, leadership: &Leadership) -> Result<()> {
        let mut watch: Option<dozen_store::Watch> = None;
        // Each term publishes once, then on change only: nothing per pass reaches the store.
        // What the last leader published is known: its problems are not new events.
        let mut published: Option<Problems> = read_problems(self.store.as_ref()).await.ok();
        let mut published_once = false;
        let mut compacted_at: Option<tokio::time::Instant> = None;
        self.note(vec![Event::new(
            wall_ms(),
            "controller",
            EventKind::LeaderChanged {
                server: self.server_id.clone(),
            },
        )])
        .await;
        // Nodes seen up by the last pass of this term: a change is an event.
        let mut up_before: Option<std::collections::BTreeSet<String>> = None;
        loop {
            leadership.working();
            let snap = Snapshot::read(self.store.as_ref()).await?;
            leadership.progressed();
            if let Some(before) = &up_before {
                let now = wall_ms();
                let changes = before
                    .difference(&snap.alive_nodes)
                    .map(|n| Event::new(now, "controller", EventKind::NodeDown).node(n))
                    .chain(
                        snap.alive_nodes
                            .difference(before)
                            .map(|n| Event::new(now, "controller", EventKind::NodeUp).node(n)),
                    )
                    .collect();
                self.note(changes).await;
            }
            up_before = Some(snap.alive_nodes.clone());
            if compacted_at.is_none_or(|at| at.elapsed() >= COMPACT_EVERY) {
                compacted_at = Some(tokio::time::Instant::now());
                let floor = snap.revision.checked_sub(self.history_window);
                if let Some(floor) = floor.filter(|_| self.history_window > 0) {
                    match self.store.compact(floor).await {
                        Ok(()) => tracing::debug!(floor, "compacted the store's history"),
                        Err(e) => {
                            tracing::warn!(error = %e, floor, "cannot compact the store's history")
                        }
                    }
                    leadership.progressed();
                }
                if let Err(e) = crate::pki::forget_expired(self.store.as_ref(), wall_ms()).await {
                    tracing::warn!(error = %e, "cannot forget expired certificates");
                }
                leadership.progressed();
                // Events of subjects nobody writes to any more age out here.
                if let Err(e) = crate::events::trim_all(self.store.as_ref(), wall_ms()).await {
                    tracing::warn!(error = %e, "cannot trim old events");
                }
                leadership.progressed();
            }
            if watch.is_none() {
                watch = self.store.watch(keys::ROOT, snap.revision + 1).await.ok();
            }
            let pass = self.pass(leadership, &snap, wall_ms()).await?;
            if !published_once || published.as_ref() != Some(&pass.problems) {
                published_once = true;
                self.note(new_problem_events(published.as_ref(), &pass.problems))
                    .await;
                let value = serde_json::to_vec(&pass.problems).unwrap_or_default();
                leadership
                    .txn(
                        self.store.as_ref(),
                        Txn::new().then(Op::put(problems_key(), value)),
                    )
                    .await?;
                published = Some(pass.problems);
            }
            let tick = pass
                .wake
                .map(|ms| Duration::from_millis(ms.max(10)))
                .unwrap_or(Duration::from_secs(2))
                .min(Duration::from_secs(2));
            if leadership.is_lost() {
                return Err(ControlError::LostLeadership);
            }
            leadership.idle();
            // Wait for a change that matters (or the safety-net tick), then take everything
            // that arrived with it so one pass covers a burst of writes.
            let Some(w) = watch.as_mut() else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let leader_prefix = keys::controller("");
            let waited = tokio::time::timeout(tick, async {
                loop {
                    match w.next().await {
                        Some(WatchMessage::Events { events, .. }) => {
                            if events.iter().any(|e| !e.kv.key.starts_with(&leader_prefix)) {
                                return true;
                            }
                        }
                        Some(WatchMessage::Progress { .. }) => {}
                        Some(WatchMessage::Compacted { .. } | WatchMessage::CutOff) | None => {
                            return false
                        }
                    }
                }
            })
            .await;
            if waited == Ok(false) {
                watch = None;
            } else {
                while w.try_next().is_some() {}
            }
        }
    }

    /// One reconcile pass over every service, at wall time `now_ms` (the one clock the
    /// controller reads: deregistration delays are persisted wall times).
    pub async fn pass(
        &self,
        leadership: &Leadership,
        snap: &Snapshot,
        now_ms: u64,
    ) -> Result<Pass> {
        let term_started_ms = leadership.first_pass_at_ms(now_ms);
        let judging = now_ms >= term_started_ms + self.node_ttl.as_millis() as u64;
        let nodes = node_views(snap, judging);
        let tasks = task_views(snap);
        let mut by_service: BTreeMap<&str, Vec<TaskView>> = BTreeMap::new();
        for (t, a) in tasks.iter().zip(snap.assignments.values()) {
            by_service
                .entry(a.record.service.as_str())
                .or_default()
                .push(t.clone());
        }
        let mut problems = Problems::new();
        let mut wake: Option<u64> = None;
        let clock = Clock {
            now_ms,
            proxies_applied: snap.proxies_applied(),
        };
        for (name, svc) in &snap.services {
            leadership.progressed();
            let Some(release) = snap.current_release(name) else {
                continue;
            };
            let view = ServiceView {
                name: name.clone(),
                desired_replicas: snap.desired_replicas(name),
                current_release: svc.record.current_release,
                runs_like_current: snap.runs_like_current(name),
                restart_generation: svc.record.restart_generation,
                stopped: svc.record.stopped,
                cpu_millis: release.spec.resources.cpu_millis,
                memory_bytes: release.spec.resources.memory_bytes,
                driver: release.spec.driver().to_string(),
                node: release.spec.node.clone(),
                node_labels: release.spec.node_labels.clone(),
                routed: release.spec.port,
                deregistration_delay_ms: release.spec.deregistration_delay_ms,
            };
            let mine = by_service.remove(name.as_str()).unwrap_or_default();
            let decision = dozen_scheduler::reconcile(&view, &mine, &tasks, &nodes, clock);
            if let Some(w) = decision.wake_after_ms {
                wake = Some(wake.map_or(w, |x: u64| x.min(w)));
            }
            if !decision.problems.is_empty() {
                let mut found = decision.problems;
                if found.len() > MAX_PROBLEMS_PER_SERVICE {
                    let more = found.len() - MAX_PROBLEMS_PER_SERVICE;
                    found.truncate(MAX_PROBLEMS_PER_SERVICE);
                    found.push(format!("... and {more} more"));
                }
                problems.insert(name.clone(), found);
            }
            for action in decision.actions {
                self.act(leadership, snap, name, &action, now_ms).await?;
            }
        }
        // Tasks whose service is gone (removed from the file, or `down`): stop, then remove.
        for (name, orphans) in by_service {
            for t in orphans {
                let action = match (t.desired, t.kind == TaskKind::Service) {
                    (_, false) => continue,
                    (DesiredState::Run | DesiredState::Drain, true) => Action::Stop {
                        task: t.task.clone(),
                        node: t.node.clone(),
                        why: format!("its service `{name}` was removed"),
                    },
                    (DesiredState::Stop, true) => {
                        // On a node that is not up, the record goes now: the agent stops a task
                        // whose assignment is gone when it returns.
                        let ended = t.status.as_ref().is_some_and(|s| s.state.is_terminal())
                            || !snap.alive_nodes.contains(&t.node);
                        if !ended {
                            continue;
                        }
                        Action::Remove {
                            task: t.task.clone(),
                            node: t.node.clone(),
                        }
                    }
                };
                self.act(leadership, snap, name, &action, now_ms).await?;
            }
        }
        // Status records without an assignment (written late by an agent): clean up.
        for (task, status) in &snap.statuses {
            if !snap.assignments.contains_key(task) && status.record.state.is_terminal() {
                let key = keys::status(&status.record.node, task);
                leadership
                    .txn(
                        self.store.as_ref(),
                        Txn::new()
                            .when(Compare::mod_revision(&key, status.mod_revision))
                            .then(Op::delete(&key)),
                    )
                    .await?;
            }
        }
        Ok(Pass { problems, wake })
    }

    /// Writes a changed copy of a task's assignment, if nobody changed it since `snap`.
    async fn rewrite(
        &self,
        leadership: &Leadership,
        snap: &Snapshot,
        task: &str,
        change: impl FnOnce(&mut Assignment),
    ) -> Result<()> {
        let Some(current) = snap.assignments.get(task) else {
            return Ok(());
        };
        let mut a = current.record.clone();
        change(&mut a);
        let key = keys::assignment(&a.node, task);
        leadership
            .txn(
                self.store.as_ref(),
                Txn::new()
                    .when(Compare::mod_revision(&key, current.mod_revision))
                    .then(Op::put(&key, encode(&a))),
            )
            .await?;
        Ok(())
    }

    /// Records events; a failure to record one never stops the controller.
    async fn note(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        if let Err(e) = crate::events::record(self.store.as_ref(), &events).await {
            tracing::warn!(error = %e, count = events.len(), "cannot record events");
        }
    }

    async fn act(
        &self,
        leadership: &Leadership,
        snap: &Snapshot,
        service: &str,
        action: &Action,
        now_ms: u64,
    ) -> Result<()> {
        let store = self.store.as_ref();
        match action {
            Action::Create { node } => {
                let Some(release) = snap.current_release(service) else {
                    return Ok(());
                };
                let svc = &snap.services[service];
                let task = format!("{service}-{}", crate::random_suffix());
                let assignment = Assignment {
                    schema: SCHEMA,
                    task: task.clone(),
                    service: service.to_string(),
                    stack: release.stack.clone(),
                    node: node.clone(),
                    release: release.number,
                    generation: 1,
                    desired: DesiredState::Run,
                    kind: TaskKind::Service,
                    start_delay_ms: 0,
                    restarts: 0,
                    restart_generation: svc.record.restart_generation,
                    spec: release.spec.clone(),
                    artifact_digest: release.artifact_digest.clone(),
                    image_pin: release.image_pin.clone(),
                    secrets: release.secrets.clone(),
                    created_at_ms: now_ms,
                    drain_since_ms: None,
                };
                let key = keys::assignment(node, &task);
                tracing::info!(
                    service,
                    task,
                    node,
                    release = release.number,
                    "placing task"
                );
                leadership
                    .txn(
                        store,
                        Txn::new()
                            .when(Compare::missing(&key))
                            // The service must still be what we decided on.
                            .when(Compare::mod_revision(
                                keys::service(service),
                                svc.mod_revision,
                            ))
                            .then(Op::put(&key, encode(&assignment))),
                    )
                    .await?;
                self.note(vec![Event::new(
                    now_ms,
                    "controller",
                    EventKind::Placed {
                        why: format!(
                            "a live node with the `{}` driver and room for it, holding the \
                             fewest tasks of `{service}`",
                            release.spec.driver()
                        ),
                    },
                )
                .service(service)
                .task(&task)
                .node(node)])
                    .await;
            }
            Action::Restart {
                task,
                generation,
                restarts,
                start_delay_ms,
                ..
            } => {
                tracing::info!(
                    service,
                    task,
                    generation,
                    restarts,
                    delay_ms = start_delay_ms,
                    "restarting crashed task"
                );
                self.rewrite(leadership, snap, task, |a| {
                    a.generation = *generation;
                    a.restarts = *restarts;
                    a.start_delay_ms = *start_delay_ms;
                })
                .await?;
            }
            Action::Drain { task, node, why } => {
                tracing::info!(service, task, node, why, "taking task out of routing");
                self.rewrite(leadership, snap, task, |a| {
                    a.desired = DesiredState::Drain;
                    a.drain_since_ms = Some(now_ms);
                })
                .await?;
                // Once it is done: a deposed leader's write fails and says nothing.
                let draining = EventKind::Draining {
                    reason: why.clone(),
                };
                self.note(vec![Event::new(now_ms, "controller", draining)
                    .service(service)
                    .task(task)
                    .node(node)])
                    .await;
            }
            Action::Stop { task, node, why } => {
                tracing::info!(service, task, node, why, "stopping task");
                self.rewrite(leadership, snap, task, |a| a.desired = DesiredState::Stop)
                    .await?;
                let stopped = EventKind::Stopped {
                    reason: why.clone(),
                };
                self.note(vec![Event::new(now_ms, "controller", stopped)
                    .service(service)
                    .task(task)
                    .node(node)])
                    .await;
            }
            Action::Remove { task, node } => {
                let key = keys::assignment(node, task);
                let Some(current) = snap.assignments.get(task) else {
                    return Ok(());
                };
                tracing::info!(service, task, node, "removing task records");
                leadership
                    .txn(
                        store,
                        Txn::new()
                            .when(Compare::mod_revision(&key, current.mod_revision))
                            .then(Op::delete(&key))
                            .then(Op::delete(keys::status(node, task))),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

/// Events for the problems a pass found that the last published problems did not have.
fn new_problem_events(before: Option<&Problems>, now: &Problems) -> Vec<Event> {
    let at = wall_ms();
    let mut events = Vec::new();
    for (service, found) in now {
        let known = before.and_then(|b| b.get(service));
        for problem in found {
            if known.is_some_and(|k| k.contains(problem)) || problem.starts_with("... and") {
                continue;
            }
            let text = problem
                .strip_prefix(&format!("{service}: "))
                .unwrap_or(problem);
            let kind = if text.contains("fail open") {
                EventKind::FailingOpen
            } else {
                EventKind::Unplaceable {
                    reason: text.to_string(),
                }
            };
            events.push(Event::new(at, "controller", kind).service(service));
        }
    }
    events
}
