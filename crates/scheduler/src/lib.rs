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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    pub desired_replicas: u32,
    pub current_release: u64,
    pub restart_generation: u64,
    pub stopped: bool,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    /// The driver its tasks need (`process`, `docker`).
    pub driver: String,
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
    Drain { task: String, node: String },
    /// Ask the agent to stop the task.
    Stop { task: String, node: String },
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
        t.release == service.current_release && t.restart_generation == service.restart_generation
    };
    let (mut current, mut old): (Vec<&TaskView>, Vec<&TaskView>) =
        active.iter().copied().partition(|t| is_current(t));

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
    let stop = |t: &TaskView, actions: &mut Vec<Action>| {
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
            });
        } else {
            actions.push(Action::Stop {
                task: t.task.clone(),
                node: t.node.clone(),
            });
        }
    };

    // Too many: stop the least useful first (not ready, then newest).
    if current.len() > desired {
        current.sort_by_key(|t| (t.is_ready(), std::cmp::Reverse(t.created_at_ms)));
        let extra = current.len() - desired;
        for t in current.drain(..extra) {
            stop(t, &mut decision.actions);
        }
    }

    // Too few: place new tasks, counting each placement before the next.
    if current.len() < desired {
        let everything: Vec<&TaskView> = all_tasks.iter().collect();
        let mut used = usage(&everything);
        let mut replicas_on: BTreeMap<String, usize> = BTreeMap::new();
        for t in &active {
            *replicas_on.entry(t.node.clone()).or_default() += 1;
        }
        let needs = Needs {
            driver: &service.driver,
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
                    break;
                }
            }
        }
    }

    // Replacement is new-before-old: an old task stops only once a new one is ready for it.
    let ready_current = current.iter().filter(|t| t.is_ready()).count();
    let keep_old = desired.saturating_sub(ready_current);
    if old.len() > keep_old {
        old.sort_by_key(|t| (t.is_ready(), std::cmp::Reverse(t.created_at_ms)));
        let extra = old.len() - keep_old;
        for t in old.drain(..extra) {
            stop(t, &mut decision.actions);
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, alive: bool) -> NodeView {
        NodeView {
            name: name.into(),
            capacity: NodeResources {
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
            },
            drivers: vec!["process".into()],
            alive,
            down: !alive,
        }
    }

    fn svc(replicas: u32) -> ServiceView {
        ServiceView {
            name: "web".into(),
            desired_replicas: replicas,
            current_release: 2,
            restart_generation: 0,
            stopped: false,
            cpu_millis: 100,
            memory_bytes: 128 << 20,
            driver: "process".into(),
            routed: false,
            deregistration_delay_ms: 1000,
        }
    }

    fn task(id: &str, node: &str, release: u64, state: Option<TaskState>) -> TaskView {
        TaskView {
            task: id.into(),
            node: node.into(),
            release,
            generation: 1,
            desired: DesiredState::Run,
            kind: TaskKind::Service,
            restarts: 0,
            restart_generation: 0,
            created_at_ms: 0,
            cpu_millis: 100,
            memory_bytes: 128 << 20,
            status: state.map(|state| StatusView {
                generation: 1,
                state,
                healthy: state == TaskState::Running,
                started_at_ms: Some(1_000),
                finished_at_ms: state.is_terminal().then_some(1_500),
            }),
            drain_since_ms: None,
            mod_revision: 1,
        }
    }

    fn creates(d: &Decision) -> Vec<&str> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::Create { node } => Some(node.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn backoff_first_restart_is_immediate_then_doubles_to_a_cap() {
        assert_eq!(backoff_ms(1), 0);
        assert_eq!(backoff_ms(2), 500);
        assert_eq!(backoff_ms(3), 1000);
        assert_eq!(backoff_ms(4), 2000);
        assert_eq!(backoff_ms(50), BACKOFF_MAX_MS);
    }

    #[test]
    fn scale_out_spreads_over_nodes() {
        let nodes = [node("a", true), node("b", true), node("c", true)];
        let d = reconcile(&svc(6), &[], &[], &nodes, Clock::default());
        let mut placed = creates(&d);
        placed.sort();
        assert_eq!(placed, ["a", "a", "b", "b", "c", "c"]);
    }

    #[test]
    fn placement_respects_resources_and_reports_why_not() {
        let mut small = node("a", true);
        small.capacity.cpu_millis = 250;
        let d = reconcile(&svc(3), &[], &[], &[small], Clock::default());
        assert_eq!(creates(&d).len(), 2);
        assert_eq!(d.problems.len(), 1);
        assert!(d.problems[0].contains("cannot place"), "{:?}", d.problems);
    }

    #[test]
    fn a_task_whose_driver_no_node_has_stays_pending_and_says_so() {
        let nodes = [node("a", true), node("b", true)];
        let mut images = svc(2);
        images.driver = "docker".into();
        let d = reconcile(&images, &[], &[], &nodes, Clock::default());
        assert!(creates(&d).is_empty(), "{:?}", d.actions);
        assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
        assert!(
            d.problems[0].contains("no live node has the `docker` driver"),
            "{:?}",
            d.problems
        );
        // Once a node reports the driver, the tasks go there and nowhere else.
        let mut with_docker = node("c", true);
        with_docker.drivers.push("docker".into());
        let nodes = [node("a", true), with_docker];
        let d = reconcile(&images, &[], &[], &nodes, Clock::default());
        assert_eq!(creates(&d), ["c", "c"]);
        assert!(d.problems.is_empty(), "{:?}", d.problems);
    }

    fn decide(nodes: &[NodeView], tasks: &[TaskView]) -> Decision {
        reconcile(&svc(1), tasks, tasks, nodes, Clock::default())
    }

    /// Seen: a node that missed its lease had every task removed, so an agent that only
    /// stalled got all its tasks restarted. Now its tasks stay assigned (it re-claims them if
    /// it returns) and are replaced where there is room.
    #[test]
    fn a_down_nodes_tasks_stay_assigned_and_are_replaced_where_there_is_room() {
        let t = task("t1", "a", 2, Some(TaskState::Running));
        let d = decide(
            &[node("a", false), node("b", true)],
            std::slice::from_ref(&t),
        );
        assert!(
            !d.actions
                .iter()
                .any(|a| matches!(a, Action::Remove { .. } | Action::Stop { .. })),
            "{:?}",
            d.actions
        );
        assert_eq!(creates(&d), ["b"]);
    }

    #[test]
    fn without_room_elsewhere_a_down_nodes_tasks_are_left_alone_and_that_is_said() {
        let t = task("t1", "a", 2, Some(TaskState::Running));
        let d = decide(&[node("a", false)], std::slice::from_ref(&t));
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        assert!(d.problems[0].contains("cannot place"), "{:?}", d.problems);
    }

    #[test]
    fn a_returning_node_whose_task_was_replaced_retires_exactly_one_copy() {
        let mut stranded = task("t1", "a", 2, Some(TaskState::Running));
        stranded.created_at_ms = 1;
        let mut replacement = task("t2", "b", 2, Some(TaskState::Running));
        replacement.created_at_ms = 2;
        let both = [stranded, replacement];
        let d = decide(&[node("a", true), node("b", true)], &both);
        assert_eq!(d.actions.len(), 1, "{:?}", d.actions);
        assert!(
            matches!(&d.actions[0], Action::Stop { task, .. } if task == "t2"),
            "{:?}",
            d.actions
        );
        assert!(creates(&d).is_empty());
    }

    #[test]
    fn a_node_in_its_grace_period_keeps_its_tasks_counted_but_gets_nothing_new() {
        let mut grace = node("a", false);
        grace.down = false;
        let t = task("t1", "a", 2, Some(TaskState::Running));
        let d = decide(&[grace.clone(), node("b", true)], std::slice::from_ref(&t));
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        let mut two = svc(2);
        two.name = "web".into();
        let d = reconcile(
            &two,
            std::slice::from_ref(&t),
            std::slice::from_ref(&t),
            &[grace, node("b", true)],
            Clock::default(),
        );
        assert_eq!(creates(&d), ["b"]);
    }

    #[test]
    fn tasks_on_a_forgotten_node_are_removed() {
        let t = task("t1", "gone", 2, Some(TaskState::Running));
        let d = decide(&[node("b", true)], std::slice::from_ref(&t));
        assert!(d.actions.contains(&Action::Remove {
            task: "t1".into(),
            node: "gone".into()
        }));
        assert_eq!(creates(&d), ["b"]);
    }

    #[test]
    fn scale_in_stops_not_ready_and_newest_first() {
        let nodes = [node("a", true)];
        let mut ready_old = task("ready-old", "a", 2, Some(TaskState::Running));
        ready_old.created_at_ms = 1;
        let mut ready_new = task("ready-new", "a", 2, Some(TaskState::Running));
        ready_new.created_at_ms = 2;
        let starting = task("starting", "a", 2, Some(TaskState::Starting));
        let tasks = vec![ready_old, ready_new, starting];
        let d = reconcile(&svc(1), &tasks, &tasks, &nodes, Clock::default());
        let stopped: Vec<_> = d
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Stop { task, .. } => Some(task.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(stopped, ["starting", "ready-new"]);
    }

    #[test]
    fn new_release_starts_before_old_stops() {
        let nodes = [node("a", true)];
        let old = task("old", "a", 1, Some(TaskState::Running));
        let tasks = vec![old.clone()];
        let d = reconcile(&svc(1), &tasks, &tasks, &nodes, Clock::default());
        assert_eq!(creates(&d), ["a"]);
        assert!(!d.actions.iter().any(|a| matches!(a, Action::Stop { .. })));

        let new = task("new", "a", 2, Some(TaskState::Running));
        let tasks = vec![old, new];
        let d = reconcile(&svc(1), &tasks, &tasks, &nodes, Clock::default());
        assert_eq!(
            d.actions,
            [Action::Stop {
                task: "old".into(),
                node: "a".into()
            }]
        );
    }

    #[test]
    fn crashed_task_restarts_with_growing_backoff() {
        let nodes = [node("a", true)];
        let mut t = task("t", "a", 2, Some(TaskState::Exited));
        let mut delays = Vec::new();
        for _ in 0..4 {
            let d = reconcile(
                &svc(1),
                std::slice::from_ref(&t),
                &[],
                &nodes,
                Clock::default(),
            );
            let Some(Action::Restart {
                generation,
                restarts,
                start_delay_ms,
                ..
            }) = d.actions.first().cloned()
            else {
                panic!("expected a restart, got {:?}", d.actions);
            };
            assert_eq!(generation, t.generation + 1);
            delays.push(start_delay_ms);
            t.generation = generation;
            t.restarts = restarts;
            if let Some(s) = t.status.as_mut() {
                s.generation = generation;
            }
        }
        assert_eq!(delays, [0, 500, 1000, 2000]);
    }

    #[test]
    fn a_long_run_resets_the_backoff() {
        let nodes = [node("a", true)];
        let mut t = task("t", "a", 2, Some(TaskState::Exited));
        t.restarts = 7;
        if let Some(s) = t.status.as_mut() {
            s.finished_at_ms = Some(1_000 + CRASH_WINDOW_MS);
        }
        let d = reconcile(&svc(1), &[t], &[], &nodes, Clock::default());
        assert!(matches!(
            d.actions[0],
            Action::Restart {
                restarts: 1,
                start_delay_ms: 0,
                ..
            }
        ));
    }

    #[test]
    fn stopped_tasks_are_removed_once_ended() {
        let nodes = [node("a", true)];
        let mut stopping = task("s", "a", 2, Some(TaskState::Stopping));
        stopping.desired = DesiredState::Stop;
        let mut stopped = task("d", "a", 2, Some(TaskState::Stopped));
        stopped.desired = DesiredState::Stop;
        let d = reconcile(&svc(0), &[stopping, stopped], &[], &nodes, Clock::default());
        assert_eq!(
            d.actions,
            [Action::Remove {
                task: "d".into(),
                node: "a".into()
            }]
        );
    }

    #[test]
    fn stopped_service_runs_nothing_but_keeps_its_count() {
        let nodes = [node("a", true)];
        let mut s = svc(3);
        s.stopped = true;
        let t = task("t", "a", 2, Some(TaskState::Running));
        let d = reconcile(
            &s,
            std::slice::from_ref(&t),
            std::slice::from_ref(&t),
            &nodes,
            Clock::default(),
        );
        assert_eq!(
            d.actions,
            [Action::Stop {
                task: "t".into(),
                node: "a".into()
            }]
        );
    }

    #[test]
    fn routed_tasks_drain_until_every_proxy_has_seen_it_and_the_delay_passed() {
        let nodes = [node("a", true)];
        let mut s = svc(0);
        s.routed = true;
        let t = task("t", "a", 2, Some(TaskState::Running));
        let d = reconcile(&s, std::slice::from_ref(&t), &[], &nodes, Clock::default());
        assert_eq!(
            d.actions,
            [Action::Drain {
                task: "t".into(),
                node: "a".into()
            }],
            "a serving task leaves routing first"
        );

        let mut draining = t.clone();
        draining.desired = DesiredState::Drain;
        draining.drain_since_ms = Some(10_000);
        draining.mod_revision = 50;
        let at = |now_ms, applied| Clock {
            now_ms,
            proxies_applied: applied,
        };
        // A proxy still routes by an older table: wait, even after the delay.
        let d = reconcile(
            &s,
            std::slice::from_ref(&draining),
            &[],
            &nodes,
            at(20_000, Some(49)),
        );
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        // Proxies caught up, delay not over: wait, and say when to look again.
        let d = reconcile(
            &s,
            std::slice::from_ref(&draining),
            &[],
            &nodes,
            at(10_400, Some(50)),
        );
        assert!(d.actions.is_empty());
        assert_eq!(d.wake_after_ms, Some(600));
        // Both: stop it now.
        let d = reconcile(
            &s,
            std::slice::from_ref(&draining),
            &[],
            &nodes,
            at(11_000, Some(51)),
        );
        assert_eq!(
            d.actions,
            [Action::Stop {
                task: "t".into(),
                node: "a".into()
            }]
        );
        // A proxy that never catches up delays the stop, but not forever.
        let late = 11_000 + PROXY_ACK_TIMEOUT_MS;
        let d = reconcile(
            &s,
            std::slice::from_ref(&draining),
            &[],
            &nodes,
            at(late, Some(49)),
        );
        assert!(
            matches!(d.actions[..], [Action::Stop { .. }]),
            "{:?}",
            d.actions
        );
        // A draining task does not count as capacity: a replacement starts at once.
        let mut one = s.clone();
        one.desired_replicas = 1;
        let d = reconcile(
            &one,
            std::slice::from_ref(&draining),
            &[],
            &nodes,
            at(10_100, Some(49)),
        );
        assert_eq!(creates(&d), ["a"]);
    }

    #[test]
    fn placement_scales_to_many_nodes() {
        let nodes: Vec<NodeView> = (0..2000).map(|i| node(&format!("n{i:04}"), true)).collect();
        let d = reconcile(&svc(1000), &[], &[], &nodes, Clock::default());
        let placed = creates(&d);
        assert_eq!(placed.len(), 1000);
        let distinct: std::collections::BTreeSet<_> = placed.iter().collect();
        assert_eq!(
            distinct.len(),
            1000,
            "one replica per node while nodes are free"
        );
    }
}
