//! Every decision the service controller makes, as pure functions of a snapshot.
//!
//! [`reconcile`] compares one service's desired state with its tasks and returns the actions
//! that move it one step closer; [`place`] picks a node for a new task. No IO, no clock: the
//! shell reads the snapshot from the store, applies the actions as fenced transactions, and
//! calls again on the next change. Because each call starts from the snapshot alone, a
//! controller killed between two writes simply decides the rest on its next run.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use dozen_model::{DesiredState, NodeResources, TaskKind, TaskState};

/// A run shorter than this counts as a crash for backoff; a longer one resets the count.
pub const CRASH_WINDOW_MS: u64 = 10_000;
/// Backoff of the second consecutive crash; doubles each time after.
pub const BACKOFF_BASE_MS: u64 = 500;
pub const BACKOFF_MAX_MS: u64 = 30_000;
/// A draining task waits at most this long past its deregistration delay for the proxies'
/// acknowledgement: a proxy that holds its lease but no longer applies routes must not keep
/// every scale-in waiting forever.
pub const PROXY_ACK_TIMEOUT_MS: u64 = 30_000;

/// Delay before restart number `restarts` (1 = the first restart after a crash).
/// The first restart is immediate: a single crash should cost as little as possible.
pub fn backoff_ms(restarts: u32) -> u64 {
    if restarts <= 1 {
        return 0;
    }
    let exp = (restarts - 2).min(20);
    (BACKOFF_BASE_MS << exp).min(BACKOFF_MAX_MS)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub capacity: NodeResources,
    /// The drivers the node's agent can run tasks with (its fingerprint).
    pub drivers: Vec<String>,
    /// What its agent was started with (`--label`), for placement constraints.
    pub labels: BTreeMap<String, String>,
    /// Holds a live lease (heartbeats arrive): new tasks may go there.
    pub alive: bool,
    /// Missed its lease and is judged: its service tasks no longer count, and are replaced
    /// where there is room. They stay assigned to it, so if it returns it re-claims them
    /// (same processes); where a replacement was started, the surplus copy is retired. A node
    /// neither alive nor down is in its grace period (a new leader's first TTL): its tasks
    /// still count, and nothing new goes there.
    pub down: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusView {
    pub generation: u64,
    pub state: TaskState,
    pub healthy: bool,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub unhealthy_since_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskView {
    pub task: String,
    pub node: String,
    pub release: u64,
    pub generation: u64,
    pub desired: DesiredState,
    pub kind: TaskKind,
    pub restarts: u32,
    pub restart_generation: u64,
    pub created_at_ms: u64,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub status: Option<StatusView>,
    /// When the task was taken out of routing (desired = Drain).
    pub drain_since_ms: Option<u64>,
    /// Store revision of the assignment's last write (for a draining task: when it left
    /// routing).
    pub mod_revision: u64,
}

impl TaskView {
    fn status_of_current_generation(&self) -> Option<&StatusView> {
        self.status
            .as_ref()
            .filter(|s| s.generation == self.generation)
    }
    fn is_ready(&self) -> bool {
        self.status_of_current_generation()
            .is_some_and(|s| s.state == TaskState::Running && s.healthy)
    }
    fn has_ended(&self) -> bool {
        self.status_of_current_generation()
            .is_some_and(|s| s.state.is_terminal())
    }
    /// Was healthy, now fails its checks: out of routing, still running.
    fn unhealthy_since(&self) -> Option<u64> {
        self.status_of_current_generation()
            .filter(|s| s.state == TaskState::Running && !s.healthy)
            .and_then(|s| s.unhealthy_since_ms)
    }
}

/// How long an unhealthy task keeps running when no replacement can be placed anywhere:
/// then it is stopped (through the stop protocol) and started again in its place.
pub const UNHEALTHY_WITHOUT_ROOM_MS: u64 = 30_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    pub desired_replicas: u32,
    pub current_release: u64,
    /// Earlier releases that run exactly as the current one (they differ in routing only):
    /// their tasks count as current and are not replaced.
    pub runs_like_current: Vec<u64>,
    pub restart_generation: u64,
    pub stopped: bool,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    /// The driver its tasks need (`process`, `docker`).
    pub driver: String,
    /// Only this node may run its tasks.
    pub node: Option<String>,
    /// Only nodes with all these labels may.
    pub node_labels: BTreeMap<String, String>,
    /// Reachable through the proxy: its tasks leave routing before they stop.
    pub routed: bool,
    pub deregistration_delay_ms: u64,
}

/// What time it is and what the proxies have seen, for the stop protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Clock {
    /// Wall time (ms): deregistration delays are persisted, so they survive a restart.
    pub now_ms: u64,
    /// The lowest route revision applied by any live proxy; None when no proxy runs.
    pub proxies_applied: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a new task of the current release on `node`.
    Create { node: String },
    /// Start the task again as its next generation after `start_delay_ms`.
    Restart {
        task: String,
        node: String,
        generation: u64,
        restarts: u32,
        start_delay_ms: u64,
    },
    /// Take the task out of routing; it keeps running while in-flight requests finish.
    /// `why`: what the user reads (scaled in, replaced, unhealthy, ...).
    Drain {
        task: String,
        node: String,
        why: String,
    },
    /// Ask the agent to stop the task.
    Stop {
        task: String,
        node: String,
        why: String,
    },
    /// Delete the task's records: it has ended, or its node is gone.
    Remove { task: String, node: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// Why the service cannot reach its desired state right now (shown by `ps`).
    pub problems: Vec<String>,
    /// Run again after this long even if nothing changes (a deregistration delay ends).
    pub wake_after_ms: Option<u64>,
}

/// Resources already promised on each node, by every task that should be running.
pub fn usage(tasks: &[&TaskView]) -> BTreeMap<String, NodeResources> {
    let mut used: BTreeMap<String, NodeResources> = BTreeMap::new();
    for t in tasks.iter().filter(|t| t.desired == DesiredState::Run) {
        let u = used.entry(t.node.clone()).or_default();
        u.cpu_millis += u64::from(t.cpu_millis);
        u.memory_bytes += t.memory_bytes;
    }
    used
}

/// What one new task needs of its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs<'a> {
    pub driver: &'a str,
    /// Only this node.
    pub node: Option<&'a str>,
    /// Only nodes with all these labels.
    pub labels: &'a BTreeMap<String, String>,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
}

/// Picks the node for one new task: it must be alive, run the task's driver and have room;
/// among those, the one with the fewest replicas of this service (spread), then the most free
/// memory, then by name so the choice is stable. O(nodes).
pub fn place<'a>(
    nodes: &'a [NodeView],
    used: &BTreeMap<String, NodeResources>,
    replicas_on: &BTreeMap<String, usize>,
    needs: &Needs,
) -> Option<&'a NodeView> {
    nodes
        .iter()
        .filter(|n| n.alive && n.drivers.iter().any(|d| d == needs.driver))
        .filter(|n| allowed(n, needs))
        .filter_map(|n| {
            let u = used.get(&n.name).cloned().unwrap_or_default();
            let free_cpu = n.capacity.cpu_millis.checked_sub(u.cpu_millis)?;
            let free_mem = n.capacity.memory_bytes.checked_sub(u.memory_bytes)?;
            (free_cpu >= u64::from(needs.cpu_millis) && free_mem >= needs.memory_bytes).then(|| {
                let spread = replicas_on.get(&n.name).copied().unwrap_or(0);
                (spread, std::cmp::Reverse(free_mem), n)
            })
        })
        .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)).then(a.2.name.cmp(&b.2.name)))
        .map(|(_, _, n)| n)
}

/// Why [`place`] found no node for `needs`: no live node, no live node with the driver, or
/// none with room. Shown to the user (`ps`, a failed `run`), so it names what is missing.
pub fn why_unplaceable(nodes: &[NodeView], needs: &Needs) -> String {
    let live: Vec<&NodeView> = nodes.iter().filter(|n| n.alive).collect();
    if live.is_empty() {
        return "cannot place a task: no live node (start an agent, or see `dozen nodes`)".into();
    }
    let live: Vec<&NodeView> = live.into_iter().filter(|n| allowed(n, needs)).collect();
    if live.is_empty() {
        return match needs.node {
            Some(node) => format!(
                "cannot place a task: it must run on node `{node}` (`node`), which is not a live \
                 node{}",
                labels_said(needs.labels, " with")
            ),
            None => format!(
                "cannot place a task: no live node has the labels {} (`node_labels`; `dozen \
                 agent --label KEY=VALUE` gives a node labels)",
                labels_said(needs.labels, "").trim()
            ),
        };
    }
    if !live
        .iter()
        .any(|n| n.drivers.iter().any(|d| d == needs.driver))
    {
        return format!(
            "cannot place a task: no live node has the `{}` driver ({} live node(s); `dozen \
             nodes` shows each node's drivers)",
            needs.driver,
            live.len()
        );
    }
    format!(
        "cannot place a task needing {}m cpu and {} MiB memory: {} live node(s), none with room",
        needs.cpu_millis,
        needs.memory_bytes / (1024 * 1024),
        live.len()
    )
}

/// Whether node `n` meets the placement constraints of `needs`.
fn allowed(n: &NodeView, needs: &Needs) -> bool {
    needs.node.is_none_or(|want| n.name == want)
        && needs.labels.iter().all(|(k, v)| n.labels.get(k) == Some(v))
}

fn labels_said(labels: &BTreeMap<String, String>, lead: &str) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let said: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{lead} {}", said.join(", "))
}

/// One step of the service controller for one service.
///
/// `tasks` are this service's tasks; `all_tasks` every task in the cluster (for resource
/// usage). Oneoff tasks are left alone except to clean up after a lost node.
pub fn reconcile(
    service: &ServiceView,
    tasks: &[TaskView],
    all_tasks: &[TaskView],
    nodes: &[NodeView],
    clock: Clock,
) -> Decision {
    let mut decision = Decision::default();
    let down: BTreeMap<&str, bool> = nodes.iter().map(|n| (n.name.as_str(), n.down)).collect();

    // Records of tasks that are gone: told to stop and stopped, or on a node that is gone
    // (forgotten, not merely down).
    let mut active: Vec<&TaskView> = Vec::new();
    for t in tasks {
        match down.get(t.node.as_str()) {
            None => {
                decision.actions.push(Action::Remove {
                    task: t.task.clone(),
                    node: t.node.clone(),
                });
                continue;
            }
            // Left as they are until their node returns (or is forgotten): nothing written
            // to them can reach a node that does not answer, and they must not count.
            Some(true) => continue,
            Some(false) => {}
        }
        if t.desired == DesiredState::Stop {
            if t.has_ended() || t.status.is_none() {
                decision.actions.push(Action::Remove {
                    task: t.task.clone(),
                    node: t.node.clone(),
                });
            }
        } else if t.desired == DesiredState::Drain {
            // The stop protocol: every live proxy has stopped routing to it, and the
            // deregistration delay has let its in-flight requests finish.
            let since = t.drain_since_ms.unwrap_or(0);
            let left = (since + service.deregistration_delay_ms).saturating_sub(clock.now_ms);
            let proxies_done = clock.proxies_applied.is_none_or(|r| r >= t.mod_revision)
                || clock.now_ms >= since + service.deregistration_delay_ms + PROXY_ACK_TIMEOUT_MS;
            if t.has_ended() {
                decision.actions.push(Action::Remove {
                    task: t.task.clone(),
                    node: t.node.clone(),
                });
            } else if proxies_done && left == 0 {
                decision.actions.push(Action::Stop {
                    task: t.task.clone(),
                    node: t.node.clone(),
                    why: "drained: out of routing, its requests finished".into(),
                });
            } else if left > 0 {
                decision.wake_after_ms = Some(decision.wake_after_ms.map_or(left, |w| w.min(left)));
            }
        } else if t.kind == TaskKind::Service {
            active.push(t);
        }
    }

    let desired = if service.stopped {
        0
    } else {
        service.desired_replicas as usize
    };
    let is_current = |t: &TaskView| {
        (t.release == service.current_release || service.runs_like_current.contains(&t.release))
            && t.restart_generation == service.restart_generation
    };
    let (current, mut old): (Vec<&TaskView>, Vec<&TaskView>) =
        active.iter().copied().partition(|t| is_current(t));
    // Unhealthy tasks do not count: a replacement starts beside each (new before old), and
    // they go once enough others are ready, or after a stated wait when there is no room.
    let (mut unhealthy, mut current): (Vec<&TaskView>, Vec<&TaskView>) = current
        .into_iter()
        .partition(|t| t.unhealthy_since().is_some());

    // Crashed tasks of the current release come back, with backoff; old ones are not revived.
    for t in &current {
        if !t.has_ended() {
            continue;
        }
        let status = t.status_of_current_generation();
        let ran_ms = status
            .and_then(|s| Some(s.finished_at_ms?.saturating_sub(s.started_at_ms?)))
            .unwrap_or(0);
        let restarts = if ran_ms >= CRASH_WINDOW_MS {
            1
        } else {
            t.restarts + 1
        };
        decision.actions.push(Action::Restart {
            task: t.task.clone(),
            node: t.node.clone(),
            generation: t.generation + 1,
            restarts,
            start_delay_ms: backoff_ms(restarts),
        });
    }
    let stop = |t: &TaskView, why: String, actions: &mut Vec<Action>| {
        let serving = t
            .status_of_current_generation()
            .is_some_and(|s| !s.state.is_terminal());
        if t.has_ended() {
            actions.push(Action::Remove {
                task: t.task.clone(),
                node: t.node.clone(),
            });
        } else if service.routed && serving {
            actions.push(Action::Drain {
                task: t.task.clone(),
                node: t.node.clone(),
                why,
            });
        } else {
            actions.push(Action::Stop {
                task: t.task.clone(),
                node: t.node.clone(),
                why,
            });
        }
    };

    // Too many: stop the least useful first (not ready, then newest).
    if current.len() > desired {
        current.sort_by_key(|t| (t.is_ready(), std::cmp::Reverse(t.created_at_ms)));
        let extra = current.len() - desired;
        for t in current.drain(..extra) {
            let why = if service.stopped {
                "the service was stopped (`dozen stop`)".to_string()
            } else {
                format!("scaled in: more tasks than the {desired} asked for")
            };
            stop(t, why, &mut decision.actions);
        }
    }

    // Too few: place new tasks, counting each placement before the next.
    let mut no_room = false;
    if current.len() < desired {
        let everything: Vec<&TaskView> = all_tasks.iter().collect();
        let mut used = usage(&everything);
        let mut replicas_on: BTreeMap<String, usize> = BTreeMap::new();
        for t in &active {
            *replicas_on.entry(t.node.clone()).or_default() += 1;
        }
        let needs = Needs {
            driver: &service.driver,
            node: service.node.as_deref(),
            labels: &service.node_labels,
            cpu_millis: service.cpu_millis,
            memory_bytes: service.memory_bytes,
        };
        for _ in current.len()..desired {
            match place(nodes, &used, &replicas_on, &needs) {
                Some(node) => {
                    let u = used.entry(node.name.clone()).or_default();
                    u.cpu_millis += u64::from(service.cpu_millis);
                    u.memory_bytes += service.memory_bytes;
                    *replicas_on.entry(node.name.clone()).or_default() += 1;
                    decision.actions.push(Action::Create {
                        node: node.name.clone(),
                    });
                }
                None => {
                    decision.problems.push(format!(
                        "{}: {}",
                        service.name,
                        why_unplaceable(nodes, &needs)
                    ));
                    no_room = true;
                    break;
                }
            }
        }
    }

    // Unhealthy tasks: stopped once the others ready cover the desired count, or after a
    // stated wait when no replacement could be placed; else they keep running, out of routing.
    let ready_current = current.iter().filter(|t| t.is_ready()).count();
    unhealthy.sort_by_key(|t| t.unhealthy_since());
    // Without room, one at a time: never every task of the service at once.
    let mut one_stopping = tasks
        .iter()
        .any(|t| t.desired != DesiredState::Run && !t.has_ended());
    for t in unhealthy.iter().copied() {
        let since = t.unhealthy_since().unwrap_or(clock.now_ms);
        let waited = clock.now_ms.saturating_sub(since);
        if ready_current >= desired {
            let why = "unhealthy, and enough healthy tasks serve without it".to_string();
            stop(t, why, &mut decision.actions);
        } else if no_room && waited >= UNHEALTHY_WITHOUT_ROOM_MS {
            if !one_stopping {
                let why = format!(
                    "unhealthy for {} s with no room for a replacement",
                    UNHEALTHY_WITHOUT_ROOM_MS / 1000
                );
                stop(t, why, &mut decision.actions);
                one_stopping = true;
            }
        } else if no_room {
            let left = UNHEALTHY_WITHOUT_ROOM_MS - waited;
            decision.wake_after_ms = Some(decision.wake_after_ms.map_or(left, |w| w.min(left)));
        }
    }
    if ready_current == 0 && !unhealthy.is_empty() {
        decision.problems.push(format!(
            "{}: every task fails its health check; the proxies send to all of them (fail open)",
            service.name
        ));
    }

    // Replacement is new-before-old: an old task stops only once a new one is ready for it.
    let keep_old = desired.saturating_sub(ready_current);
    if old.len() > keep_old {
        old.sort_by_key(|t| (t.is_ready(), std::cmp::Reverse(t.created_at_ms)));
        let extra = old.len() - keep_old;
        for t in old.drain(..extra) {
            let why = if service.stopped {
                "the service was stopped (`dozen stop`)".to_string()
            } else if t.release != service.current_release {
                format!(
                    "replaced by release #{} (new before old)",
                    service.current_release
                )
            } else {
                "replaced by `dozen restart` (new before old)".to_string()
            };
            stop(t, why, &mut decision.actions);
        }
    }
    decision
}

#[cfg(test)]
mod tests;
