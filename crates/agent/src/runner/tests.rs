//! The runner's state machine in virtual time: the fake driver and prober stand in for
//! processes and HTTP, so crash, backoff, health, stop and re-adoption are walked through
//! deterministically.

use std::sync::atomic::Ordering;
use std::time::Duration;

use dozen_model::{DesiredState, TaskState};
use tokio::time::Instant;

use crate::driver::Recovered;
use crate::testing::{assignment, http_check, Call, FakeDriver, Harness};

fn running(generation: u64) -> impl Fn(&dozen_model::TaskStatus) -> bool {
    move |s| s.generation == generation && s.state == TaskState::Running && s.healthy
}

/// Waits in virtual time (at most a second of it) until `cond` holds.
async fn settle(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{what} did not happen");
}

#[tokio::test(start_paused = true)]
async fn a_crashed_task_restarts_after_its_backoff_and_not_before() {
    let mut h = Harness::new(assignment("web-1", "web"));
    h.until("running", running(1)).await;
    h.driver.exit_latest(1);
    let exited = h.until("exited", |s| s.state == TaskState::Exited).await;
    assert_eq!(exited.exit_code, Some(1));

    let asked = Instant::now();
    h.assign(|a| {
        a.generation = 2;
        a.restarts = 2;
        a.start_delay_ms = 500;
    });
    let waiting = h
        .until("pending in backoff", |s| {
            s.generation == 2 && s.state == TaskState::Pending
        })
        .await;
    // Why it is restarting, not only when.
    assert_eq!(
        waiting.message.as_deref(),
        Some("exited with code 1; restarting in 500 ms (crash backoff)")
    );
    tokio::time::sleep(Duration::from_millis(499)).await;
    assert_eq!(
        h.driver.starts(),
        1,
        "started again before the backoff ended"
    );
    h.until("running again", running(2)).await;
    assert_eq!(h.driver.starts(), 2);
    assert!(asked.elapsed() >= Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn a_failing_health_check_takes_the_task_out_of_routing_and_keeps_it_running() {
    // Seen: a busy task (slow requests in flight) failed its checks and was stopped, even the
    // service's last one. Now it leaves routing and keeps running; the controller decides.
    let mut a = assignment("web-1", "web");
    a.spec.health = Some(http_check(1000, 3));
    let mut h = Harness::new(a);
    h.until("healthy", running(1)).await;

    let failing_since = Instant::now();
    h.prober.failing.store(true, Ordering::SeqCst);
    let out = h.until("out of routing", |s| !s.healthy).await;
    let took = failing_since.elapsed();
    assert_eq!(out.state, TaskState::Running, "{out:?}");
    assert!(out.unhealthy_since_ms.is_some(), "{out:?}");
    assert!(
        out.message.as_deref().is_some_and(|m| m
            .starts_with("unhealthy: GET /healthz answered 500 Internal Server Error (3 checks failed); out of routing")),
        "{out:?}"
    );
    // Three failures, one per interval: not sooner, and not much later.
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(
        !h.driver
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Stop { .. })),
        "the task was not stopped: {:?}",
        h.driver.calls()
    );
    // It recovers: back in routing, the same process.
    h.prober.failing.store(false, Ordering::SeqCst);
    let back = h.until("healthy again", |s| s.healthy).await;
    assert_eq!(
        (back.state, back.unhealthy_since_ms),
        (TaskState::Running, None)
    );
    assert!(!h
        .driver
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Stop { .. })));
    // Each change is an event, once: not one per probe.
    let mut kinds = Vec::new();
    while let Ok(event) = h.events.try_recv() {
        assert_eq!(event.task.as_deref(), Some("web-1"));
        kinds.push(event.describe());
    }
    assert_eq!(
        kinds,
        [
            "started (pid 1001)".to_string(),
            "health check failed (3 of 3): GET /healthz answered 500 Internal Server Error".into(),
            "out of routing: its health check fails; it runs on until a replacement is healthy"
                .into(),
            "healthy again: back in routing".into(),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_is_healthy_only_once_a_probe_passes() {
    let mut a = assignment("web-1", "web");
    a.spec.health = Some(http_check(1000, 3));
    let mut h = Harness::new(a);
    h.prober.failing.store(true, Ordering::SeqCst);
    let starting = h
        .until("starting", |s| s.state == TaskState::Starting)
        .await;
    assert!(!starting.healthy);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h.prober.failing.store(false, Ordering::SeqCst);
    h.until("healthy", running(1)).await;
    assert!(
        h.seen
            .iter()
            .all(|s| s.state != TaskState::Running || s.healthy),
        "reported running before a probe passed: {:?}",
        h.seen
    );
}

/// A task that crashed once and whose next generation waits `delay_ms` to start.
async fn crashed_and_waiting(delay_ms: u64) -> Harness {
    let mut h = Harness::new(assignment("web-1", "web"));
    h.until("running", running(1)).await;
    h.driver.exit_latest(1);
    h.until("exited", |s| s.state == TaskState::Exited).await;
    h.assign(|a| {
        a.generation = 2;
        a.start_delay_ms = delay_ms;
    });
    h.until("pending", |s| {
        s.generation == 2 && s.state == TaskState::Pending
    })
    .await;
    h
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_the_backoff_never_starts_the_task() {
    let mut h = crashed_and_waiting(5_000).await;
    h.assign(|a| a.desired = DesiredState::Stop);
    h.until("stopped", |s| {
        s.generation == 2 && s.state == TaskState::Stopped
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(h.driver.starts(), 1, "{:?}", h.driver.calls());
}

#[tokio::test(start_paused = true)]
async fn a_task_drained_during_its_backoff_is_not_started() {
    let h = crashed_and_waiting(5_000).await;
    h.assign(|a| a.desired = DesiredState::Drain);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(h.driver.starts(), 1, "{:?}", h.driver.calls());
}

#[tokio::test(start_paused = true)]
async fn an_adopted_task_keeps_running_and_is_not_started_twice() {
    let mut h = Harness::recovering(
        assignment("web-1", "web"),
        Some(Recovered::Running(FakeDriver::handle(7))),
    );
    let adopted = h.until("adopted", running(1)).await;
    assert!(adopted.adopted);
    assert_eq!(adopted.pid, Some(1007));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.driver.starts(), 0, "{:?}", h.driver.calls());
    // It is supervised like any other: its exit is seen and reported.
    h.driver.exit_latest(3);
    let exited = h.until("exited", |s| s.state == TaskState::Exited).await;
    assert_eq!(exited.exit_code, Some(3));
}

#[tokio::test(start_paused = true)]
async fn a_stop_sends_the_services_signal_with_its_timeout() {
    let mut a = assignment("web-1", "web");
    a.spec.stop_signal = "SIGINT".into();
    a.spec.stop_timeout_ms = 7_000;
    let mut h = Harness::new(a);
    h.until("running", running(1)).await;
    h.assign(|a| a.desired = DesiredState::Stop);
    let stopped = h.until("stopped", |s| s.state == TaskState::Stopped).await;
    assert_eq!(stopped.signal, Some(15));
    assert_eq!(
        h.driver.calls().last(),
        Some(&Call::Stop {
            instance: 1,
            signal: "SIGINT".into(),
            timeout: Duration::from_secs(7),
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_that_ignores_its_stop_signal_is_killed_when_the_timeout_ends() {
    let mut a = assignment("web-1", "web");
    a.spec.stop_timeout_ms = 5_000;
    let mut h = Harness::new(a);
    h.until("running", running(1)).await;
    h.driver.ignore_stop_signals();
    let asked = Instant::now();
    h.assign(|a| a.desired = DesiredState::Stop);
    h.until("stopping", |s| s.state == TaskState::Stopping)
        .await;
    let stopped = h.until("stopped", |s| s.state == TaskState::Stopped).await;
    assert_eq!(stopped.signal, Some(9));
    assert!(asked.elapsed() >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_newer_generation_replaces_the_running_one() {
    let mut h = Harness::new(assignment("web-1", "web"));
    h.until("running", running(1)).await;
    h.assign(|a| a.generation = 2);
    h.until("running the new generation", running(2)).await;
    let calls = h.driver.calls();
    let stop = calls
        .iter()
        .position(|c| matches!(c, Call::Stop { instance: 1, .. }))
        .expect("the old generation was stopped");
    let start = calls
        .iter()
        .position(|c| matches!(c, Call::Start { instance: 2, .. }))
        .expect("the new generation was started");
    assert!(stop < start, "{calls:?}");
}

#[tokio::test(start_paused = true)]
async fn a_start_failure_is_reported_with_the_drivers_reason() {
    let h_assignment = assignment("web-1", "web");
    let mut h = Harness::new_with(h_assignment, |d| {
        d.fail_next_start("cannot exec ./web: No such file or directory")
    });
    let failed = h.until("failed", |s| s.state == TaskState::Failed).await;
    assert_eq!(
        failed.message.as_deref(),
        Some("cannot exec ./web: No such file or directory")
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_whose_driver_this_node_lacks_fails_and_says_which() {
    let mut a = assignment("web-1", "web");
    a.spec.command = None;
    a.spec.image = Some("shop/web:1".into());
    let mut h = Harness::new(a);
    let failed = h.until("failed", |s| s.state == TaskState::Failed).await;
    assert_eq!(
        failed.message.as_deref(),
        Some("the `docker` driver is not available on node `n1`")
    );
    assert_eq!(h.driver.starts(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_removed_task_is_stopped_and_gives_back_its_port() {
    let mut h = Harness::new(assignment("web-1", "web"));
    let started = h.until("running", running(1)).await;
    let port = started.host_port.expect("a port");
    h.remove();
    h.until("stopped", |s| s.state == TaskState::Stopped).await;
    let shared = h.shared.clone();
    settle("the runner is gone", || {
        !shared.runners.lock().unwrap().contains_key("web-1")
    })
    .await;
    // The port is free again: the allocator hands it out once more.
    let mut handed = Vec::new();
    while let Some(p) = h.shared.ports.allocate() {
        handed.push(p);
    }
    assert!(handed.contains(&port), "{port} not freed: {handed:?}");
}
