use super::*;

fn node(name: &str, alive: bool) -> NodeView {
    NodeView {
        name: name.into(),
        capacity: NodeResources {
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
        },
        drivers: vec!["process".into()],
        labels: BTreeMap::new(),
        alive,
        down: !alive,
    }
}

fn svc(replicas: u32) -> ServiceView {
    ServiceView {
        name: "web".into(),
        desired_replicas: replicas,
        current_release: 2,
        runs_like_current: Vec::new(),
        restart_generation: 0,
        stopped: false,
        cpu_millis: 100,
        memory_bytes: 128 << 20,
        driver: "process".into(),
        node: None,
        node_labels: BTreeMap::new(),
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
            unhealthy_since_ms: None,
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
            node: "a".into(),
            why: "replaced by release #2 (new before old)".into()
        }]
    );
}

/// A release that changes only how requests reach the service (routes, balance) replaces no
/// task: the proxies apply it live.
#[test]
fn a_routing_only_release_keeps_the_tasks() {
    let nodes = [node("a", true)];
    let old = task("old", "a", 1, Some(TaskState::Running));
    let tasks = vec![old];
    let mut view = svc(1);
    view.runs_like_current = vec![1];
    let d = reconcile(&view, &tasks, &tasks, &nodes, Clock::default());
    assert_eq!(d.actions, []);
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
            node: "a".into(),
            why: "the service was stopped (`dozen stop`)".into()
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
            node: "a".into(),
            why: "scaled in: more tasks than the 0 asked for".into()
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
            node: "a".into(),
            why: "drained: out of routing, its requests finished".into()
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

/// A task that was healthy and now fails its checks: running, out of routing, since `at`.
fn unhealthy(id: &str, node: &str, at: u64) -> TaskView {
    let mut t = task(id, node, 2, Some(TaskState::Running));
    let status = t.status.as_mut().unwrap();
    status.healthy = false;
    status.unhealthy_since_ms = Some(at);
    t
}

fn stops(d: &Decision) -> Vec<&str> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop { task, .. } | Action::Drain { task, .. } => Some(task.as_str()),
            _ => None,
        })
        .collect()
}

fn at(now_ms: u64) -> Clock {
    Clock {
        now_ms,
        proxies_applied: None,
    }
}

/// Seen: a busy task failing its checks was stopped at once, even the service's last one.
/// Now a replacement starts beside it and it runs on, out of routing, meanwhile.
#[test]
fn an_unhealthy_task_runs_on_while_its_replacement_starts() {
    let busy = unhealthy("t1", "a", 1_000);
    let d = reconcile(
        &svc(1),
        std::slice::from_ref(&busy),
        std::slice::from_ref(&busy),
        &[node("a", true)],
        at(2_000),
    );
    assert_eq!(creates(&d), ["a"]);
    assert!(stops(&d).is_empty(), "{:?}", d.actions);
    assert!(d.problems[0].contains("fail open"), "{:?}", d.problems);
}

#[test]
fn an_unhealthy_task_goes_once_its_replacement_is_ready() {
    let busy = unhealthy("t1", "a", 1_000);
    let mut fresh = task("t2", "a", 2, Some(TaskState::Running));
    fresh.created_at_ms = 5;
    let both = [busy, fresh];
    let d = reconcile(&svc(1), &both, &both, &[node("a", true)], at(2_000));
    assert_eq!(stops(&d), ["t1"]);
    assert!(creates(&d).is_empty());
    // A replacement still starting is not enough.
    let mut starting = both.clone();
    starting[1].status.as_mut().unwrap().healthy = false;
    starting[1].status.as_mut().unwrap().state = TaskState::Starting;
    let d = reconcile(&svc(1), &starting, &starting, &[node("a", true)], at(2_000));
    assert!(stops(&d).is_empty(), "{:?}", d.actions);
}

#[test]
fn without_room_an_unhealthy_task_goes_after_the_stated_wait_one_at_a_time() {
    let mut full = node("a", true);
    full.capacity.cpu_millis = 200; // room for two tasks of 100m
    let both = [unhealthy("t1", "a", 1_000), unhealthy("t2", "a", 2_000)];
    let d = reconcile(
        &svc(2),
        &both,
        &both,
        std::slice::from_ref(&full),
        at(1_000 + UNHEALTHY_WITHOUT_ROOM_MS - 1),
    );
    assert!(stops(&d).is_empty(), "{:?}", d.actions);
    assert_eq!(d.wake_after_ms, Some(1));
    let d = reconcile(
        &svc(2),
        &both,
        &both,
        std::slice::from_ref(&full),
        at(2_000 + UNHEALTHY_WITHOUT_ROOM_MS),
    );
    assert_eq!(
        stops(&d),
        ["t1"],
        "the longest unhealthy first, and only one"
    );
}

/// `node` and `node_labels` keep a service's tasks on the nodes it names, and say why when
/// none is there.
#[test]
fn placement_constraints_pick_the_named_node_or_the_labelled_ones() {
    let mut ssd = node("b", true);
    ssd.labels.insert("disk".into(), "ssd".into());
    let nodes = [node("a", true), ssd, node("c", true)];
    let mut s = svc(2);
    s.node = Some("c".into());
    let d = reconcile(&s, &[], &[], &nodes, Clock::default());
    assert_eq!(
        d.actions,
        [
            Action::Create { node: "c".into() },
            Action::Create { node: "c".into() }
        ]
    );
    let mut s = svc(1);
    s.node_labels.insert("disk".into(), "ssd".into());
    let d = reconcile(&s, &[], &[], &nodes, Clock::default());
    assert_eq!(d.actions, [Action::Create { node: "b".into() }]);

    s.node_labels.insert("zone".into(), "eu".into());
    let d = reconcile(&s, &[], &[], &nodes, Clock::default());
    assert!(d.actions.is_empty());
    assert_eq!(
        d.problems,
        [
            "web: cannot place a task: no live node has the labels disk=ssd, zone=eu \
          (`node_labels`; `dozen agent --label KEY=VALUE` gives a node labels)"
        ]
    );
    let mut s = svc(1);
    s.node = Some("z".into());
    let d = reconcile(&s, &[], &[], &nodes, Clock::default());
    assert_eq!(
        d.problems,
        ["web: cannot place a task: it must run on node `z` (`node`), which is not a live node"]
    );
}
