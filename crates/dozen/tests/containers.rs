//! End-to-end on the real Docker Engine: image tasks run as containers through the `docker`
//! driver, are reached on their published port, write into `dozen logs`, are replaced when
//! killed, and `down` removes every container dozen made and nothing else.

use std::time::Duration;

use dozen_testkit::images::{self, docker};
use dozen_testkit::{eventually, http_get, Dozen};

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const IMAGE: &str = "dozen-test/testapp:latest";

/// Fails in CI without an engine (it has one), skips elsewhere, saying so.
fn engine_or_skip() -> bool {
    if images::engine_answers() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI has a Docker Engine");
    eprintln!("skipped: no Docker Engine answers here (this test runs in CI)");
    false
}

fn containers_of(task_label_value: Option<&str>) -> Vec<String> {
    let filter = match task_label_value {
        Some(task) => format!("label=dozen.task={task}"),
        None => "label=dozen.task".to_string(),
    };
    docker(&["ps", "-aq", "--filter", &filter])
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn image_tasks_run_as_containers_are_replaced_when_killed_and_removed_by_down() {
    if !engine_or_skip() {
        return;
    }
    let bin = images::static_binaries(&["dozen-testapp"], &[]);
    images::build(
        IMAGE,
        &[(bin.join("dozen-testapp"), "/testapp")],
        "/testapp",
    );
    // A container dozen did not make: `down` leaves it alone.
    let stranger = docker(&["create", "--label", "dozen-test=1", IMAGE]);

    let mut d = Dozen::new(DOZEN);
    d.server_args = vec!["--no-proxy".into()];
    d.start_server(true);
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "boxes"
[services.web]
image = "{IMAGE}"
replicas = 2
stop_timeout = "2s"
health = {{ http = "/healthz", interval = "200ms" }}
[services.web.env]
EMIT_LINES = "2"
"#
        ),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    let ready = d.wait_ready("web", 2);
    for task in &ready {
        let port = task["status"]["host_port"].as_u64().unwrap() as u16;
        let name = task["task"].as_str().unwrap();
        let (status, body) = http_get(port, "/").unwrap();
        assert_eq!((status, body), (200, format!("hello from {name}")));
        assert_eq!(
            containers_of(Some(name)).len(),
            1,
            "one container for {name}"
        );
    }
    // Its output is the task's log, as a process's is.
    let logs = eventually(Duration::from_secs(20), "the containers' output", || {
        let logs = d.ok(&["logs", "web"]);
        (logs.matches("line 1").count() == 2).then_some(logs)
    });
    assert!(logs.contains("listening on"), "{logs}");

    // `docker kill` one: it is replaced by a new container.
    let victim = ready[0]["task"].as_str().unwrap().to_string();
    let before = containers_of(Some(&victim));
    docker(&["kill", &before[0]]);
    eventually(
        Duration::from_secs(60),
        "the killed task comes back",
        || {
            let now = containers_of(Some(&victim));
            let ready = d.ready_tasks("web");
            (ready.len() == 2 && now.len() == 1 && now != before).then_some(())
        },
    );
    let events = d.ok(&["events", "web"]);
    assert!(events.contains("exited with code 137"), "{events}");

    d.ok(&["down"]);
    eventually(
        Duration::from_secs(30),
        "every container dozen made is gone",
        || containers_of(None).is_empty().then_some(()),
    );
    let left = docker(&["ps", "-aq", "--filter", &format!("id={stranger}")]);
    assert!(!left.is_empty(), "the stranger's container is left alone");
    docker(&["rm", "-f", &stranger]);
}
