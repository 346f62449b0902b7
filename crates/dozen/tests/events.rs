//! End-to-end: `dozen events`, `ps` and a failed `apply` say what happened and why: a command
//! that does not exist (both forms), a port someone else holds, a failing health check, a task
//! no node can take, an image no node can run, running out of memory; and a follower sees new
//! events as they are recorded.

use std::io::BufRead;
use std::time::Duration;

use dozen_testkit::{eventually, Dozen};

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const APP: &str = env!("CARGO_BIN_EXE_dozen-testapp");

fn server_with(stack: &str) -> Dozen {
    let mut d = Dozen::new(DOZEN);
    // A node without a container engine: image services have no driver here.
    d.server_env = vec![(
        "DOCKER_HOST".into(),
        "unix:///nonexistent/docker.sock".into(),
    )];
    d.start_without_proxy();
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
    // Every command that waits says it: `scale --wait` too.
    let wait = d.cli(&["scale", "web=2", "--wait", "--timeout", "1s"]);
    let said = String::from_utf8_lossy(&wait.stderr);
    assert!(!wait.status.success(), "{said}");
    assert!(said.contains("start failed: cannot start"), "{said}");
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

/// `events`, `ps` (table and JSON) and a failed `apply --timeout` for `service`, once they
/// show `wanted`.
fn reason_everywhere(d: &Dozen, service: &str, wanted: &str) {
    events_showing(d, service, wanted);
    eventually(Duration::from_secs(30), "ps shows the reason", || {
        let ps = d.json(&["ps"]);
        let mine = ps["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service)?
            .clone();
        mine["problems"].to_string().contains(wanted).then_some(())
    });
    let table = d.ok(&["ps", service]);
    assert!(
        table.contains(wanted),
        "`ps {service}` says `{wanted}`: {table}"
    );
    let out = d.cli(&["apply", "--timeout", "1s"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(wanted),
        "apply's failed wait says `{wanted}`: {said}"
    );
}

/// The other ways a task fails to come up, each with its reason in `events`, `ps -o json`
/// and a failed `apply`: a shell-form command that does not exist, a port someone else
/// holds, a health check answering 500, a service no node fits, an image with no driver.
#[test]
fn each_way_of_failing_says_why_where_the_user_looks() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let d = server_with(&format!(
        r#"
name = "failing"
[services.shell]
command = "nosuch-program --serve"
port = false
[services.clash]
command = "PORT={port} exec {APP}"
[services.sick]
command = ["{APP}"]
health = {{ http = "/status/500", interval = "200ms", unhealthy_threshold = 2 }}
[services.huge]
command = "sleep 1000"
port = false
resources = {{ memory = "900TiB" }}
[services.boxed]
image = "shop/web:1"
port = false
"#
    ));
    reason_everywhere(&d, "shell", "nosuch-program: not found");
    reason_everywhere(&d, "clash", &format!("cannot listen on {port}"));
    reason_everywhere(&d, "sick", "answered 500");
    let text = events_showing(&d, "sick", "health check failed");
    assert!(text.contains("(2 of 2): GET http://127.0.0.1:"), "{text}");
    reason_everywhere(&d, "huge", "none with room");
    reason_everywhere(&d, "boxed", "no live node has the `docker` driver");
}

/// A task killed for want of memory says so, and what to change.
#[test]
fn a_task_out_of_memory_says_so() {
    if !std::path::Path::new("/sys/fs/cgroup/memory/memory.oom_control").exists()
        && !std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.contains("memory"))
    {
        assert!(std::env::var_os("CI").is_none(), "CI has memory cgroups");
        eprintln!("skipped: no memory cgroup here (this test runs in CI)");
        return;
    }
    let d = server_with(
        r#"
name = "hungry"
[services.eater]
command = "head -c 400000000 /dev/zero | tail"
port = false
resources = { memory = "32MiB" }
"#,
    );
    let text = events_showing(&d, "eater", "out of memory");
    assert!(text.contains("raise `resources.memory`"), "{text}");
}
