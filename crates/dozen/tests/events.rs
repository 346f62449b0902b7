//! End-to-end: `dozen events` says what happened and why, where a user looks: a command that
//! does not exist, a failing health check, a task no node can take, and a follower that sees
//! new events as they are recorded.

use std::io::BufRead;
use std::time::Duration;

use dozen_testkit::{eventually, Dozen};

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const APP: &str = env!("CARGO_BIN_EXE_dozen-testapp");

fn server_with(stack: &str) -> Dozen {
    let mut d = Dozen::new(DOZEN);
    d.server_args = vec!["--no-proxy".into()];
    d.start_server(true);
    d.write("dozen.toml", stack);
    d.ok(&["apply", "--no-wait"]);
    d
}

/// `dozen events SERVICE` once it shows `wanted`.
fn events_showing(d: &Dozen, service: &str, wanted: &str) -> String {
    eventually(Duration::from_secs(30), wanted, || {
        let text = d.ok(&["events", service]);
        text.contains(wanted).then_some(text)
    })
}

/// Seen: a command that does not exist showed only as "restarting in 8000 ms (crash backoff)";
/// `logs` was empty. The exec error is an event, and the task's log says it too.
#[test]
fn a_command_that_does_not_exist_says_so_in_events_and_logs() {
    let d = server_with(
        r#"
name = "broken"
[services.web]
command = ["/nonexistent/web-server", "--port", "80"]
port = false
"#,
    );
    let text = events_showing(&d, "web", "start failed");
    assert!(
        text.contains("cannot start `/nonexistent/web-server`: No such file or directory"),
        "{text}"
    );
    assert!(text.contains("(agent "), "who saw it: {text}");
    assert!(text.contains("placed on"), "{text}");
    assert!(text.contains("release #1 created"), "{text}");
    let logs = d.ok(&["logs", "web"]);
    assert!(
        logs.contains("[dozen] start failed: cannot start"),
        "{logs}"
    );
    let json = d.ok(&["events", "web", "-o", "json"]);
    let kinds: Vec<String> = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "start_failed"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "placed"), "{kinds:?}");
    // `ps` says why, in its table and its JSON, and a failed wait says it too.
    let ps = d.ok(&["ps"]);
    assert!(ps.contains("start failed: cannot start"), "{ps}");
    let json = d.json(&["ps"]);
    let problems = json["services"][0]["problems"].to_string();
    assert!(problems.contains("start failed: cannot start"), "{json}");
    let wait = d.cli(&["apply", "--timeout", "1s"]);
    let said = String::from_utf8_lossy(&wait.stderr);
    assert!(!wait.status.success(), "{said}");
    assert!(
        said.contains("start failed: cannot start `/nonexistent/web-server`"),
        "{said}"
    );
}

#[test]
fn a_failing_health_check_and_a_task_no_node_can_take_are_events() {
    let d = server_with(&format!(
        r#"
name = "sick"
[services.web]
command = ["{APP}"]
health = {{ http = "/status/500", interval = "200ms", unhealthy_threshold = 2 }}
[services.huge]
command = "sleep 1000"
port = false
resources = {{ memory = "900TiB" }}
"#
    ));
    let text = events_showing(&d, "web", "health check failed");
    assert!(text.contains("(2 of 2): GET http://127.0.0.1:"), "{text}");
    assert!(text.contains("answered 500"), "{text}");
    let text = events_showing(&d, "huge", "none with room");
    assert!(text.contains("cannot place a task needing"), "{text}");
}

/// `dozen events -f` prints a new event within a second of the change that caused it.
#[test]
fn events_follow_streams_new_events_as_they_are_recorded() {
    let d = server_with(
        r#"
name = "calm"
[services.worker]
command = "sleep 1000"
port = false
"#,
    );
    events_showing(&d, "worker", "started");
    let mut follower = d
        .command(&["events", "worker", "-f"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    // What happened before the follower came is printed first.
    let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(first.contains("release #1 created"), "{first}");
    while rx.try_recv().is_ok() {}
    d.ok(&["scale", "worker=2"]);
    let asked = std::time::Instant::now();
    let line = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(1).saturating_sub(asked.elapsed()))
            .expect("the scale event within a second");
        if line.contains("scaled from 1 to 2") {
            break line;
        }
    };
    assert!(line.contains("(operator)"), "{line}");
    let _ = follower.kill();
    let _ = follower.wait();
}
