//! The service controller's pass, step by step in virtual time: scale out and in, the stop
//! protocol waiting for the proxies, crash restarts with backoff, and a leader that lost its
//! lease. The store is the real embedded one in a temp dir; the pass is given the wall time
//! it decides at, so no wall clock is read.

use std::sync::Arc;
use std::time::Duration;

use dozen_control::controller::{Controller, Pass};
use dozen_control::leader::{campaign, Leadership};
use dozen_control::snapshot::Snapshot;
use dozen_control::{desired, nodes, proxies, ControlError};
use dozen_model::{
    Assignment, DesiredState, NodeRecord, NodeResources, TaskState, TaskStatus, SCHEMA,
};
use dozen_scheduler::PROXY_ACK_TIMEOUT_MS;
use dozen_store::embedded::EmbeddedStore;
use dozen_store::Store;

/// An arbitrary wall time the tests decide at.
const T: u64 = 1_700_000_000_000;

struct World {
    store: Arc<dyn Store>,
    retention: desired::Retention,
    controller: Controller,
    leadership: Leadership,
    _dir: tempfile::TempDir,
}

fn node_record(name: &str) -> NodeRecord {
    NodeRecord {
        schema: SCHEMA,
        name: name.to_string(),
        address: format!("http://{name}.test:1"),
        host: "127.0.0.1".into(),
        resources: NodeResources {
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
        },
        labels: Default::default(),
        drivers: vec!["process".into()],
        agent_instance: "a1".into(),
        registered_at_ms: T,
        registered_via: String::new(),
    }
}

impl World {
    fn node_record(&self, name: &str) -> NodeRecord {
        node_record(name)
    }

    async fn new(nodes: &[&str]) -> World {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        for name in nodes {
            let record = node_record(name);
            nodes::register(
                store.as_ref(),
                name,
                record,
                Duration::from_secs(3600),
                false,
            )
            .await
            .unwrap();
        }
        let leadership = campaign(store.clone(), "server-a", Duration::from_secs(2))
            .await
            .unwrap();
        let controller = Controller {
            store: store.clone(),
            server_id: "server-a".into(),
            leader_ttl: Duration::from_secs(2),
            node_ttl: Duration::from_secs(3),
            history_window: dozen_control::controller::HISTORY_WINDOW,
        };
        World {
            store,
            retention: Default::default(),
            controller,
            leadership,
            _dir: dir,
        }
    }

    async fn apply(&self, toml: &str) {
        let stack = dozen_spec::parse_str(toml, "dozen.toml", dozen_spec::Format::Toml, None)
            .unwrap_or_else(|e| panic!("{e}"));
        desired::apply(
            self.store.as_ref(),
            &stack,
            &Default::default(),
            &self.retention,
        )
        .await
        .unwrap();
    }

    async fn pass(&self, now_ms: u64) -> Pass {
        let snap = Snapshot::read(self.store.as_ref()).await.unwrap();
        self.controller
            .pass(&self.leadership, &snap, now_ms)
            .await
            .unwrap()
    }

    async fn tasks(&self) -> Vec<Assignment> {
        let snap = Snapshot::read(self.store.as_ref()).await.unwrap();
        snap.assignments.into_values().map(|a| a.record).collect()
    }

    async fn with(&self, desired: DesiredState) -> Vec<Assignment> {
        let mut tasks = self.tasks().await;
        tasks.retain(|a| a.desired == desired);
        tasks
    }

    /// Reports what the task's agent would: `state` for its current generation.
    async fn report(&self, a: &Assignment, state: TaskState, started: u64, finished: Option<u64>) {
        let status = TaskStatus {
            schema: SCHEMA,
            task: a.task.clone(),
            node: a.node.clone(),
            generation: a.generation,
            state,
            healthy: state == TaskState::Running,
            pid: Some(1),
            host_port: Some(30_000),
            exit_code: finished.map(|_| 1),
            signal: None,
            started_at_ms: Some(started),
            finished_at_ms: finished,
            message: None,
            agent_instance: "a1".into(),
            adopted: false,
            unhealthy_since_ms: None,
            log_lines_dropped: 0,
        };
        nodes::report_status(self.store.as_ref(), &a.node, &[status])
            .await
            .unwrap();
    }

    async fn all_running(&self) {
        for a in self.tasks().await {
            self.report(&a, TaskState::Running, T - 60_000, None).await;
        }
    }
}

const WEB: &str = r#"
name = "shop"
[services.web]
command = "./web"
replicas = 4
"#;

#[tokio::test(start_paused = true)]
async fn scale_out_spreads_tasks_over_the_nodes_once() {
    let w = World::new(&["n1", "n2"]).await;
    w.apply(WEB).await;
    w.pass(T).await;
    let tasks = w.tasks().await;
    assert_eq!(tasks.len(), 4);
    for node in ["n1", "n2"] {
        assert_eq!(
            tasks.iter().filter(|a| a.node == node).count(),
            2,
            "{tasks:?}"
        );
    }
    assert!(tasks.iter().all(|a| a.created_at_ms == T));
    // A second pass over the same state decides nothing new.
    w.pass(T + 1).await;
    assert_eq!(w.tasks().await.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn scale_in_drains_first_and_stops_after_the_deregistration_delay() {
    let w = World::new(&["n1"]).await;
    w.apply(WEB).await;
    w.pass(T).await;
    w.all_running().await;
    desired::scale(w.store.as_ref(), "web", 1).await.unwrap();

    w.pass(T).await;
    let draining = w.with(DesiredState::Drain).await;
    assert_eq!(draining.len(), 3);
    assert!(draining.iter().all(|a| a.drain_since_ms == Some(T)));
    // Out of routing, still running while requests finish: no proxy runs, so only the delay.
    w.pass(T + 999).await;
    assert_eq!(w.with(DesiredState::Drain).await.len(), 3);
    w.pass(T + 1000).await;
    let stopping = w.with(DesiredState::Stop).await;
    assert_eq!(stopping.len(), 3);
    // Once their agents report them stopped, their records go.
    for a in &stopping {
        w.report(a, TaskState::Stopped, T - 60_000, Some(T + 1100))
            .await;
    }
    w.pass(T + 1200).await;
    let left = w.tasks().await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].desired, DesiredState::Run);
}

#[tokio::test(start_paused = true)]
async fn a_drain_waits_for_every_live_proxy_to_apply_it() {
    let w = World::new(&["n1"]).await;
    w.apply(WEB).await;
    w.pass(T).await;
    w.all_running().await;
    let lease = proxies::register(
        w.store.as_ref(),
        "p1",
        "http://127.0.0.1:7780".into(),
        "http://127.0.0.1:7781".into(),
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let before = w.store.revision().await.unwrap();
    proxies::heartbeat(w.store.as_ref(), "p1", lease, before)
        .await
        .unwrap();
    desired::scale(w.store.as_ref(), "web", 2).await.unwrap();
    w.pass(T).await;
    assert_eq!(w.with(DesiredState::Drain).await.len(), 2);

    // The delay is over, but the proxy still serves the table from before the drain.
    w.pass(T + 5_000).await;
    assert_eq!(w.with(DesiredState::Drain).await.len(), 2);
    assert!(w.with(DesiredState::Stop).await.is_empty());

    // It applies the new table and says so: now they stop.
    let now = w.store.revision().await.unwrap();
    proxies::heartbeat(w.store.as_ref(), "p1", lease, now)
        .await
        .unwrap();
    w.pass(T + 5_000).await;
    assert_eq!(w.with(DesiredState::Stop).await.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_proxy_that_never_acknowledges_holds_a_drain_only_until_the_ack_timeout() {
    let w = World::new(&["n1"]).await;
    w.apply(WEB).await;
    w.pass(T).await;
    w.all_running().await;
    proxies::register(
        w.store.as_ref(),
        "stuck",
        "http://127.0.0.1:7780".into(),
        "http://127.0.0.1:7781".into(),
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    desired::scale(w.store.as_ref(), "web", 3).await.unwrap();
    w.pass(T).await;
    assert_eq!(w.with(DesiredState::Drain).await.len(), 1);
    let delay = 1_000;
    w.pass(T + delay + PROXY_ACK_TIMEOUT_MS - 1).await;
    assert_eq!(w.with(DesiredState::Drain).await.len(), 1);
    w.pass(T + delay + PROXY_ACK_TIMEOUT_MS).await;
    assert_eq!(w.with(DesiredState::Stop).await.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crashing_task_is_restarted_at_once_then_with_growing_backoff() {
    let w = World::new(&["n1"]).await;
    w.apply(
        r#"
name = "shop"
[services.worker]
command = "./work"
replicas = 1
"#,
    )
    .await;
    w.pass(T).await;
    let mut delays = Vec::new();
    for crash in 0..4 {
        let a = w.tasks().await.remove(0);
        // Ran for a moment and crashed: a crash, for backoff.
        let started = T + crash * 1000;
        w.report(&a, TaskState::Exited, started, Some(started + 100))
            .await;
        w.pass(started + 200).await;
        let next = w.tasks().await.remove(0);
        assert_eq!(next.generation, a.generation + 1);
        delays.push(next.start_delay_ms);
    }
    assert_eq!(delays, [0, 500, 1000, 2000]);
}

#[tokio::test(start_paused = true)]
async fn a_service_whose_driver_no_node_has_stays_pending_and_says_why() {
    let w = World::new(&["n1", "n2"]).await;
    w.apply(
        r#"
name = "shop"
[services.web]
image = "shop/web:1"
replicas = 2
"#,
    )
    .await;
    let pass = w.pass(T).await;
    assert!(w.tasks().await.is_empty());
    let problems = &pass.problems["web"];
    assert!(
        problems
            .iter()
            .any(|p| p.contains("no live node has the `docker` driver")),
        "{problems:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_controller_that_lost_its_lease_writes_nothing() {
    let w = World::new(&["n1"]).await;
    w.apply(WEB).await;
    // Its lease ends (a long pause, a partition); another server is elected.
    w.store.revoke_lease(w.leadership.lease).await.unwrap();
    let other = tokio::time::timeout(
        Duration::from_secs(20),
        campaign(w.store.clone(), "server-b", Duration::from_secs(2)),
    )
    .await
    .expect("server-b elected")
    .unwrap();
    assert_eq!(other.server_id, "server-b");

    let snap = Snapshot::read(w.store.as_ref()).await.unwrap();
    let late = w.controller.pass(&w.leadership, &snap, T).await;
    assert!(
        matches!(late, Err(ControlError::LostLeadership)),
        "{:?}",
        late.map(|p| p.problems)
    );
    assert!(w.tasks().await.is_empty(), "the old leader placed tasks");
}

fn versioned(n: u32) -> String {
    format!(
        r#"
name = "shop"
[services.web]
command = "./web"
replicas = 1
[services.web.env]
VERSION = "{n}"
"#
    )
}

#[tokio::test(start_paused = true)]
async fn old_releases_are_pruned_but_never_the_current_one_or_one_a_task_runs() {
    let mut w = World::new(&["n1"]).await;
    w.retention = desired::Retention { keep_releases: 5 };
    w.apply(&versioned(1)).await;
    // A task of release 1 is placed, and nothing replaces it meanwhile.
    w.pass(T).await;
    assert_eq!(w.tasks().await[0].release, 1);
    for n in 2..=12 {
        w.apply(&versioned(n)).await;
    }
    let snap = Snapshot::read(w.store.as_ref()).await.unwrap();
    let kept: Vec<u64> = snap.releases["web"].keys().copied().collect();
    assert_eq!(
        kept,
        [1, 8, 9, 10, 11, 12],
        "the newest five, and the one a task runs"
    );
    assert_eq!(snap.services["web"].record.current_release, 12);

    // A rollback makes a release too, and prunes the same way.
    let back = desired::rollback(w.store.as_ref(), "web", Some(9), &w.retention)
        .await
        .unwrap();
    assert_eq!((back.number, back.cause.as_str()), (13, "rollback to 9"));
    let snap = Snapshot::read(w.store.as_ref()).await.unwrap();
    let kept: Vec<u64> = snap.releases["web"].keys().copied().collect();
    assert_eq!(kept, [1, 9, 10, 11, 12, 13]);
    // A pruned release is gone for rollback too, with a clear answer.
    let gone = desired::rollback(w.store.as_ref(), "web", Some(3), &w.retention).await;
    assert!(
        matches!(&gone, Err(ControlError::NotFound { name, .. }) if name == "web #3"),
        "{gone:?}"
    );
}

/// Seen: a node that stalled past its TTL had every task removed and restarted. Now a missed
/// lease marks it down: after the new leader's grace period its tasks are replaced where there
/// is room, they stay assigned to it, and when it returns exactly one copy of each is retired.
#[tokio::test(start_paused = true)]
async fn a_node_that_misses_its_lease_is_down_not_gone() {
    let w = World::new(&["n1", "n2"]).await;
    w.apply(WEB).await;
    w.pass(T).await;
    w.all_running().await;
    let on_n1: Vec<Assignment> = w
        .tasks()
        .await
        .into_iter()
        .filter(|a| a.node == "n1")
        .collect();
    assert_eq!(on_n1.len(), 2);

    // n1's lease lapses (its agent stalled).
    let alive = w
        .store
        .get(&dozen_model::keys::node_alive("n1"))
        .await
        .unwrap()
        .expect("n1 is alive");
    w.store.revoke_lease(alive.lease.unwrap()).await.unwrap();

    // The leader is in its first node TTL (3 s here): nothing is judged yet.
    w.pass(T + 2_999).await;
    assert_eq!(w.tasks().await.len(), 4);

    // Then n1 is down: its tasks stay assigned, untouched, and two more start on n2.
    w.pass(T + 3_000).await;
    let tasks = w.tasks().await;
    assert_eq!(tasks.len(), 6, "{tasks:?}");
    for a in &on_n1 {
        let now = tasks
            .iter()
            .find(|t| t.task == a.task)
            .expect("still assigned");
        assert_eq!(
            (now.generation, now.desired),
            (a.generation, DesiredState::Run)
        );
    }
    assert_eq!(tasks.iter().filter(|a| a.node == "n2").count(), 4);

    // n1 comes back: its tasks count again, and the surplus (two copies) is retired.
    w.all_running().await;
    nodes::register(
        w.store.as_ref(),
        "n1",
        w.node_record("n1"),
        Duration::from_secs(3600),
        false,
    )
    .await
    .unwrap();
    w.pass(T + 4_000).await;
    let tasks = w.tasks().await;
    let running: Vec<_> = tasks
        .iter()
        .filter(|a| a.desired == DesiredState::Run)
        .collect();
    let retired: Vec<_> = tasks
        .iter()
        .filter(|a| a.desired != DesiredState::Run)
        .collect();
    assert_eq!((running.len(), retired.len()), (4, 2), "{tasks:?}");
    for a in &on_n1 {
        let now = tasks.iter().find(|t| t.task == a.task).unwrap();
        assert_eq!(now.generation, a.generation, "{} was not restarted", a.task);
    }
}

/// A new leader waits one node TTL before judging: nodes whose leases lapsed while no server
/// ran keep every task if they come back within it.
#[tokio::test(start_paused = true)]
async fn a_new_leader_gives_every_node_one_ttl_of_grace() {
    let w = World::new(&["n1", "n2"]).await;
    w.apply(WEB).await;
    w.pass(T).await;
    w.all_running().await;
    for node in ["n1", "n2"] {
        let alive = w
            .store
            .get(&dozen_model::keys::node_alive(node))
            .await
            .unwrap()
            .unwrap();
        w.store.revoke_lease(alive.lease.unwrap()).await.unwrap();
    }
    // A new term: its first pass is long after the old one's.
    let later = campaign_again(&w).await;
    let snap = Snapshot::read(w.store.as_ref()).await.unwrap();
    w.controller.pass(&later, &snap, T + 60_000).await.unwrap();
    assert!(w
        .tasks()
        .await
        .iter()
        .all(|a| a.desired == DesiredState::Run));
    assert_eq!(w.tasks().await.len(), 4);
    for node in ["n1", "n2"] {
        nodes::register(
            w.store.as_ref(),
            node,
            w.node_record(node),
            Duration::from_secs(3600),
            false,
        )
        .await
        .unwrap();
    }
    let snap = Snapshot::read(w.store.as_ref()).await.unwrap();
    w.controller.pass(&later, &snap, T + 63_000).await.unwrap();
    let tasks = w.tasks().await;
    assert_eq!(tasks.len(), 4, "{tasks:?}");
    assert!(tasks.iter().all(|a| a.desired == DesiredState::Run));
}

/// Takes the leadership over from the world's current term.
async fn campaign_again(w: &World) -> Leadership {
    w.store.revoke_lease(w.leadership.lease).await.unwrap();
    campaign(w.store.clone(), "server-b", Duration::from_secs(2))
        .await
        .unwrap()
}

/// Polls `check` in virtual time for up to `within`.
async fn within<T>(within: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(found) = check().await {
            return Some(found);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Seen: the keep-alive runs on its own, so a controller that hangs in a pass keeps its lease
/// and the cluster a leader that does nothing. Now a pass without progress for two thirds of
/// the TTL gives the lease up, and another server leads within the TTL.
#[tokio::test(start_paused = true)]
async fn a_controller_hung_in_a_pass_gives_up_its_lease_within_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let ttl = Duration::from_secs(3);
    let hung = campaign(store.clone(), "server-a", ttl).await.unwrap();
    // Idle (waiting for a change), a leader keeps its lease for as long as it likes.
    tokio::time::sleep(ttl * 3).await;
    assert!(!hung.is_lost());
    hung.working();
    let started = tokio::time::Instant::now();
    let next = tokio::time::timeout(ttl, campaign(store.clone(), "server-b", ttl))
        .await
        .expect("another server leads within the TTL")
        .unwrap();
    assert!(started.elapsed() <= ttl, "{:?}", started.elapsed());
    assert!(hung.is_lost());
    assert!(next.revision > hung.revision);
}

/// A store whose reads fail once told to (`fault`: 1 panics, 2 never answers): a controller
/// bug, or a call that hangs, in the middle of a pass.
struct PanicsOnRead {
    inner: Arc<dyn Store>,
    panic: std::sync::atomic::AtomicBool,
    hang: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Store for PanicsOnRead {
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<dozen_store::KeyValue>, dozen_store::StoreError> {
        self.inner.get(key).await
    }
    async fn range(
        &self,
        prefix: &str,
    ) -> Result<dozen_store::RangeResponse, dozen_store::StoreError> {
        if self.panic.load(std::sync::atomic::Ordering::SeqCst) {
            panic!("injected: a controller bug");
        }
        if self.hang.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.range(prefix).await
    }
    async fn txn(
        &self,
        txn: dozen_store::Txn,
    ) -> Result<dozen_store::TxnResponse, dozen_store::StoreError> {
        self.inner.txn(txn).await
    }
    async fn watch(
        &self,
        prefix: &str,
        from: u64,
    ) -> Result<dozen_store::Watch, dozen_store::StoreError> {
        self.inner.watch(prefix, from).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<u64, dozen_store::StoreError> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: u64) -> Result<(), dozen_store::StoreError> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: u64) -> Result<(), dozen_store::StoreError> {
        self.inner.revoke_lease(lease).await
    }
    async fn compact(&self, revision: u64) -> Result<(), dozen_store::StoreError> {
        self.inner.compact(revision).await
    }
    async fn revision(&self) -> Result<u64, dozen_store::StoreError> {
        self.inner.revision().await
    }
}

const FAULTY_TTL: Duration = Duration::from_secs(3);

/// A controller running on a store whose reads can be made to fail, once it leads: the store
/// as it is, the faulty view the controller has, and the leader key it wrote.
async fn leading_on_a_faulty_store() -> (
    tempfile::TempDir,
    Arc<dyn Store>,
    Arc<PanicsOnRead>,
    dozen_store::KeyValue,
) {
    let dir = tempfile::tempdir().unwrap();
    let embedded: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let faulty = Arc::new(PanicsOnRead {
        inner: embedded.clone(),
        panic: Default::default(),
        hang: Default::default(),
    });
    let controller = Controller {
        store: faulty.clone(),
        server_id: "server-a".into(),
        leader_ttl: FAULTY_TTL,
        node_ttl: FAULTY_TTL,
        history_window: dozen_control::controller::HISTORY_WINDOW,
    };
    tokio::spawn(controller.run());
    let key = dozen_control::leader::leader_key();
    let first = within(Duration::from_secs(5), async || {
        embedded.get(&key).await.unwrap()
    })
    .await
    .expect("the controller leads");
    (dir, embedded, faulty, first)
}

/// A controller that panics ends its term: the lease goes at once (a new term begins), instead
/// of a keep-alive running on for a controller that is gone.
#[tokio::test(start_paused = true)]
async fn a_controller_that_panics_gives_up_its_lease() {
    let (_dir, embedded, faulty, first) = leading_on_a_faulty_store().await;
    let (ttl, key) = (FAULTY_TTL, dozen_control::leader::leader_key());
    faulty
        .panic
        .store(true, std::sync::atomic::Ordering::SeqCst);
    embedded
        .put("/dozen/v1/scale/web", b"{}".to_vec())
        .await
        .unwrap();
    let changed = within(ttl / 2, async || {
        let now = embedded.get(&key).await.unwrap();
        (now.as_ref().map(|kv| kv.mod_revision) != Some(first.mod_revision)).then_some(())
    })
    .await;
    assert!(
        changed.is_some(),
        "the panicked term still holds the leader key"
    );
}

/// Seen: dozen never compacted etcd's history, so etcd would reach its quota and turn
/// read-only. The leader compacts every five minutes to `history_window` revisions behind.
#[tokio::test(start_paused = true)]
async fn the_leader_compacts_history_behind_the_watch_window() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let first = store
        .put("/dozen/v1/scratch/0", b"0".to_vec())
        .await
        .unwrap();
    for i in 1..200 {
        store
            .put(&format!("/dozen/v1/scratch/{}", i % 7), b"v".to_vec())
            .await
            .unwrap();
    }
    let controller = Controller {
        store: store.clone(),
        server_id: "server-a".into(),
        leader_ttl: Duration::from_secs(3),
        node_ttl: Duration::from_secs(3),
        history_window: 50,
    };
    tokio::spawn(controller.run());
    let compacted = within(
        dozen_control::controller::COMPACT_EVERY,
        async || match store.watch("/dozen/v1/scratch/", first).await {
            Err(dozen_store::StoreError::Compacted {
                compact_revision, ..
            }) => Some(compact_revision),
            _ => None,
        },
    )
    .await
    .expect("history behind the window is compacted");
    let head = store.revision().await.unwrap();
    assert!(
        compact_revision_near(compacted, head, 50),
        "{compacted} vs head {head}"
    );
    // What is inside the window is still there for watchers.
    assert!(store.watch("/dozen/v1/scratch/", head - 10).await.is_ok());
}

fn compact_revision_near(compacted: u64, head: u64, window: u64) -> bool {
    compacted + window >= head.saturating_sub(5) && compacted + window <= head + 5
}

/// A pass that hangs: the watchdog gives the lease up, and the server drops that pass and
/// campaigns again (a new term begins) instead of waiting on it for ever.
#[tokio::test(start_paused = true)]
async fn a_controller_hung_in_a_pass_is_dropped_and_a_new_term_begins() {
    let (_dir, embedded, faulty, first) = leading_on_a_faulty_store().await;
    let (ttl, key) = (FAULTY_TTL, dozen_control::leader::leader_key());
    faulty.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    embedded
        .put("/dozen/v1/scale/web", b"{}".to_vec())
        .await
        .unwrap();
    let next_term = within(ttl * 2, async || {
        let now = embedded.get(&key).await.unwrap()?;
        (now.mod_revision != first.mod_revision).then_some(now)
    })
    .await;
    assert!(next_term.is_some(), "no new term after the hung one");
}
