//! End-to-end: a real server and a real agent as separate processes, driven through the CLI.
//! apply, plan diff, scale 1→10→2 from CLI and file, restart, rollback, run, crash backoff.

use std::time::Duration;

use dozen_testkit::{eventually, http_get, peak_rss_mib, process_alive, Dozen};
use serde_json::Value;

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const APP: &str = env!("CARGO_BIN_EXE_dozen-testapp");

fn stack(web_replicas: u32, greeting: &str, extra: &str) -> String {
    format!(
        r#"
name = "shop"

[services.web]
command = ["{APP}"]
replicas = {web_replicas}
stop_timeout = "2s"
[services.web.env]
GREETING = "{greeting}"
[services.web.health]
http = "/healthz"
interval = "200ms"
timeout = "100ms"
[services.web.resources]
cpu = "10m"
memory = "16MiB"

[services.worker]
command = "echo worker up; while true; do sleep 1; done"
port = false
[services.worker.resources]
cpu = "10m"
memory = "16MiB"
{extra}
"#
    )
}

fn pids(tasks: &[Value]) -> Vec<u64> {
    let mut v: Vec<u64> = tasks
        .iter()
        .filter_map(|t| t["status"]["pid"].as_u64())
        .collect();
    v.sort();
    v
}

fn port_of(task: &Value) -> u16 {
    task["status"]["host_port"]
        .as_u64()
        .expect("task has a port") as u16
}

#[test]
fn apply_plan_scale_restart_rollback_and_run() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(false);
    d.start_agent("node-b");
    d.write("dozen.toml", &stack(1, "v1", ""));

    // plan on an empty store: everything is created, nothing is applied.
    let plan = d.ok(&["plan"]);
    assert!(plan.contains("+ web : create"), "{plan}");
    assert!(plan.contains("+ worker : create"), "{plan}");
    assert_eq!(d.json(&["ps"])["services"], serde_json::json!([]));

    d.ok(&["apply"]);
    let web = d.wait_ready("web", 1);
    assert_eq!(
        web[0]["node"], "node-b",
        "the only node is the separate agent"
    );
    assert_eq!(web[0]["release"], 1);
    let (status, body) = http_get(port_of(&web[0]), "/env/GREETING").expect("task answers");
    assert_eq!((status, body.as_str()), (200, "v1"));
    assert!(
        d.ok(&["plan"]).contains("no changes"),
        "plan after apply shows nothing to do"
    );

    // Scale 1 -> 10 -> 2 from the CLI.
    d.ok(&["scale", "web=10"]);
    let ten = d.wait_ready("web", 10);
    let ports: std::collections::BTreeSet<u16> = ten.iter().map(port_of).collect();
    assert_eq!(ports.len(), 10, "every task has its own host port");
    d.ok(&["scale", "web=2"]);
    let two = d.wait_ready("web", 2);
    let kept = pids(&two);
    for pid in pids(&ten).into_iter().filter(|p| !kept.contains(p)) {
        eventually(Duration::from_secs(10), "scaled-in process exits", || {
            (!process_alive(pid as u32)).then_some(())
        });
    }

    // Scale from the file, 1 -> 10 -> 2 -> 3: plan shows the live count moving to the file's.
    d.write("dozen.toml", &stack(1, "v1", ""));
    assert!(d.ok(&["plan"]).contains("replicas: 2 -> 1"));
    d.ok(&["apply"]);
    d.wait_ready("web", 1);
    d.write("dozen.toml", &stack(10, "v1", ""));
    d.ok(&["apply"]);
    d.wait_ready("web", 10);
    d.write("dozen.toml", &stack(2, "v1", ""));
    d.ok(&["apply"]);
    d.wait_ready("web", 2);
    d.write("dozen.toml", &stack(3, "v1", ""));
    let plan = d.ok(&["plan"]);
    assert!(plan.contains("replicas: 2 -> 3"), "{plan}");
    // Seen: "= web : unchanged" above that line.
    assert!(plan.contains("~ web : scale (same release)"), "{plan}");
    assert!(!plan.contains("web : unchanged"), "{plan}");
    d.ok(&["apply"]);
    d.wait_ready("web", 3);

    // A changed env is a new release; its tasks replace the old ones.
    d.write("dozen.toml", &stack(3, "v2", ""));
    let plan = d.ok(&["plan"]);
    assert!(plan.contains("~ web : update"), "{plan}");
    assert!(plan.contains("env.GREETING: \"v1\" -> \"v2\""), "{plan}");
    d.ok(&["apply"]);
    let v2 = eventually(Duration::from_secs(30), "web runs release 2", || {
        let t = d.wait_ready("web", 3);
        t.iter().all(|t| t["release"] == 2).then_some(t)
    });
    assert_eq!(http_get(port_of(&v2[0]), "/env/GREETING").unwrap().1, "v2");

    // Roll back to release 1: a new release #3 that repeats #1.
    let out = d.ok(&["rollback", "web", "--to", "1"]);
    assert!(out.contains("release #3 (rollback to 1)"), "{out}");
    let v3 = eventually(Duration::from_secs(30), "web runs release 3", || {
        let t = d.wait_ready("web", 3);
        t.iter().all(|t| t["release"] == 3).then_some(t)
    });
    assert_eq!(http_get(port_of(&v3[0]), "/env/GREETING").unwrap().1, "v1");
    let releases = d.json(&["releases", "web"]);
    let causes: Vec<&str> = releases
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cause"].as_str().unwrap())
        .collect();
    assert_eq!(causes, ["apply", "apply", "rollback to 1"]);
    // Each release says what changed, so a user can pick one to roll back to.
    let table = d.ok(&["releases", "web"]);
    let line = |n: &str| {
        table
            .lines()
            .find(|l| l.starts_with(n))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("#2").contains("env.GREETING=\"v2\""), "{table}");
    assert!(line("#3").contains("env.GREETING=\"v1\""), "{table}");
    assert!(line("#1").contains("first release"), "{table}");

    // Restart replaces every task.
    let before = pids(&v3);
    d.ok(&["restart", "web"]);
    eventually(Duration::from_secs(30), "every web task replaced", || {
        let now = pids(&d.wait_ready("web", 3));
        now.iter().all(|p| !before.contains(p)).then_some(())
    });

    // One-off task on the current release: output and exit code come back.
    let out = d.cli(&[
        "run",
        "web",
        "--",
        "/bin/sh",
        "-c",
        "echo greeting=$GREETING; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "exit code passes through");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("greeting=v1"),
        "one-off runs with the release's config: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let ok = d.cli(&["run", "worker", "--", "true"]);
    assert_eq!(ok.status.code(), Some(0));
    assert!(
        d.tasks("web").iter().all(|t| t["oneoff"] == false),
        "finished one-offs are cleaned up"
    );

    // Logs of a service come back through the agent, as text and as JSON.
    let logs = d.ok(&["logs", "worker"]);
    assert!(logs.contains("worker up"), "{logs}");
    let json_logs = d.cli(&["logs", "web", "-o", "json", "--tail", "5"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&json_logs.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each log line is JSON"))
        .collect();
    assert_eq!(lines.len(), 5);
    assert!(lines.iter().all(|l| l["service"] == "web"));
    assert!(d
        .ok(&["logs", "web", "--since", "1h"])
        .contains("GET /healthz"));

    // down stops everything and removes the stack.
    d.ok(&["down"]);
    eventually(Duration::from_secs(30), "no tasks after down", || {
        let ps = d.json(&["ps"]);
        (ps["tasks"] == serde_json::json!([]) && ps["services"] == serde_json::json!([]))
            .then_some(())
    });
    eventually(
        Duration::from_secs(10),
        "no task processes after down",
        || d.shim_processes().is_empty().then_some(()),
    );
}

#[test]
fn crash_looping_tasks_back_off_without_disturbing_others() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    let crashing = r#"
[services.crasher]
command = "echo starting; exit 3"
port = false
"#;
    d.write("dozen.toml", &stack(2, "v1", crashing));
    d.ok(&["apply", "--no-wait"]);
    let web = d.wait_ready("web", 2);
    let web_pids = pids(&web);

    // The crasher restarts, each time later than the one before.
    let crasher = eventually(Duration::from_secs(30), "crasher restarted 5 times", || {
        d.tasks("crasher")
            .into_iter()
            .find(|t| t["restarts"].as_u64() >= Some(5))
    });
    assert!(
        crasher["start_delay_ms"].as_u64() >= Some(2000),
        "the fifth restart waits at least two seconds: {crasher}"
    );
    // The gaps between its starts, as its own log lines record them, grow.
    let logs = d.cli(&["logs", "crasher", "-o", "json"]);
    let starts: Vec<u64> = String::from_utf8_lossy(&logs.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["line"] == "starting")
        .filter_map(|l| l["ts_ms"].as_u64())
        .collect();
    assert!(starts.len() >= 4, "{starts:?}");
    let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] < 450, "the first restart is immediate: {gaps:?}");
    assert!(gaps[1] >= 450, "then it backs off: {gaps:?}");
    assert!(gaps[2] >= 950, "and doubles: {gaps:?}");

    // The healthy service never noticed.
    assert_eq!(pids(&d.wait_ready("web", 2)), web_pids);
    assert!(web.iter().all(|t| t["restarts"] == 0));
}

#[test]
fn the_api_refuses_requests_without_the_token() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(false);
    let (status, _) = http_get(d.port, "/v1/services").unwrap();
    assert_eq!(status, 401);
    let (status, body) = http_get(d.port, "/healthz").unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    let out = d.cli(&["ps", "--token", "wrong"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing or wrong API token"), "{err}");
    let mode = std::fs::metadata(d.data_dir().join("token")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    let log = std::fs::read_to_string(d.path("server.log")).unwrap();
    assert!(
        log.contains("refused request without a valid token"),
        "{log}"
    );
}

#[test]
fn malformed_stack_files_are_refused_and_nothing_is_applied() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(false);
    let cases: &[(&str, &[u8], &str)] = &[
        ("syntax.toml", b"name = \"x\"\n[services.web\ncommand = \"a\"\n", "syntax.toml:2:"),
        (
            "unknown.toml",
            b"name = \"x\"\n[services.web]\ncommand = \"a\"\nreplica = 2\n",
            "did you mean `replicas`",
        ),
        (
            "duration.toml",
            b"name = \"x\"\n[services.web]\ncommand = \"a\"\nstop_timeout = \"ten\"\n",
            "duration.toml:4:",
        ),
        (
            "size.toml",
            b"name = \"x\"\n[services.web]\ncommand = \"a\"\n[services.web.resources]\nmemory = \"lots\"\n",
            "size.toml:5:",
        ),
        (
            "routes.toml",
            b"name = \"x\"\n[services.a]\ncommand = \"a\"\n[[services.a.routes]]\npath = \"/x\"\n[services.b]\ncommand = \"b\"\n[[services.b.routes]]\npath = \"/x\"\n",
            "routes.toml:8:",
        ),
        ("missing.toml", b"name = \"x\"\n[services.web]\nreplicas = 1\n", "missing.toml:2:"),
        (
            "range.toml",
            b"name = \"x\"\n[services.web]\ncommand = \"a\"\nreplicas = 5000\n",
            "range.toml:4:",
        ),
        ("slash.toml", b"name = \"a/../b\"\n[services.web]\ncommand = \"a\"\n", "slash.toml:1:"),
        ("garbage.toml", &[0xff, 0xfe, 0x00, 0x13, 0x37, b'\n', 0x80], "garbage.toml:1:"),
    ];
    for (name, content, expect) in cases {
        let path = d.path(name);
        std::fs::write(&path, content).unwrap();
        for verb in ["plan", "apply"] {
            let out = d.cli(&[verb, "-f", path.to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(1), "{verb} {name} must fail");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(expect),
                "{verb} {name}: expected `{expect}` in:\n{err}"
            );
            assert!(err.contains("hint:"), "{verb} {name} gives a hint:\n{err}");
            assert!(err.contains("nothing was applied"), "{err}");
        }
    }
    let ps = d.json(&["ps"]);
    assert_eq!(ps["services"], serde_json::json!([]), "nothing was applied");
}

#[test]
fn tasks_get_port_and_config_but_nothing_of_dozens_own_environment() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    d.write("dozen.toml", &stack(1, "v1", ""));
    d.ok(&["apply"]);
    let web = d.wait_ready("web", 1);
    let port = port_of(&web[0]);
    assert_eq!(http_get(port, "/env/PORT").unwrap().1, port.to_string());
    assert_eq!(http_get(port, "/env/GREETING").unwrap().1, "v1");
    let pid = web[0]["status"]["pid"].as_u64().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    let token = d.token();
    assert!(
        !environ.contains(&token),
        "the API token never reaches a task"
    );
    assert!(!environ.contains("DOZEN_DATA_DIR"), "{environ}");
    assert!(!environ.contains("DOZEN_LOG"), "{environ}");

    // Resource limits, where the machine has writable cgroup v1 memory and cpu controllers.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let memory = cgroups
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()));
    match memory.filter(|p| p.contains("dozen")) {
        Some(path) => {
            let limit = std::fs::read_to_string(format!(
                "/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"
            ))
            .unwrap();
            assert_eq!(limit.trim(), (16 * 1024 * 1024).to_string());
        }
        None if std::env::var_os("CI").is_some()
            && std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() =>
        {
            panic!("cgroup v1 memory is mounted but the task is not in a dozen group: {cgroups}")
        }
        None => eprintln!("note: no writable cgroup v1 memory controller here; limits not checked"),
    }
}

#[test]
fn an_artifact_directory_becomes_a_content_addressed_release() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(false);
    d.start_agent("node-b");
    std::fs::create_dir_all(d.path("site/conf")).unwrap();
    d.write("site/conf/message.txt", "first edition");
    d.write(
        "dozen.toml",
        r#"
name = "pages"
[services.static]
artifact = "site"
command = "cat conf/message.txt; echo; while true; do sleep 1; done"
port = false
"#,
    );
    d.ok(&["apply"]);
    let releases = d.json(&["releases", "static"]);
    let first = releases[0]["artifact_digest"].as_str().unwrap().to_string();
    assert!(first.starts_with("sha256:"), "{releases}");
    assert_eq!(releases[0]["reproducible"], true);
    eventually(
        Duration::from_secs(10),
        "task prints the bundled file",
        || {
            d.ok(&["logs", "static"])
                .contains("first edition")
                .then_some(())
        },
    );
    assert!(
        d.ok(&["plan"]).contains("no changes"),
        "same content, same digest"
    );

    d.write("site/conf/message.txt", "second edition");
    let plan = d.ok(&["plan"]);
    assert!(plan.contains("artifact_digest"), "{plan}");
    d.ok(&["apply"]);
    let releases = d.json(&["releases", "static"]);
    assert_eq!(releases.as_array().unwrap().len(), 2);
    assert_ne!(releases[1]["artifact_digest"].as_str().unwrap(), first);
    eventually(
        Duration::from_secs(10),
        "new release prints the new file",
        || {
            d.ok(&["logs", "static"])
                .contains("second edition")
                .then_some(())
        },
    );
    // Rolling back brings the first bundle back, byte for byte.
    d.ok(&["rollback", "static"]);
    let releases = d.json(&["releases", "static"]);
    assert_eq!(releases[2]["artifact_digest"].as_str().unwrap(), first);
}

#[test]
fn a_shell_form_programs_graceful_stop_is_not_cut_short() {
    // The task's own process is `sh`, which dies at once on SIGTERM. `polite`, the program it
    // started, takes half a second to say goodbye and counts the SIGTERMs it gets: one. `quiet`
    // writes nowhere near our pipes (so their closing says nothing) and leaves a mark when it
    // has finished.
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    let mark = d.dir.path().join("quiet-finished");
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "grace"
[services.polite]
command = """sh -c 'stopping=0; trap "echo got TERM; stopping=1" TERM; echo ready; while [ $stopping = 0 ]; do sleep 0.1; done; i=0; while [ $i -lt 5 ]; do sleep 0.1; i=$((i+1)); done; echo said goodbye'"""
port = false
stop_timeout = "10s"

[services.quiet]
command = """sh -c 'trap "sleep 0.5; echo bye > {}; exit 0" TERM; exec >/dev/null 2>&1; while true; do sleep 0.1; done'"""
port = false
stop_timeout = "10s"
# It leaves its mark in the test's own directory, which only root can enter.
user = "root"
"#,
            mark.display()
        ),
    );
    d.ok(&["apply"]);
    eventually(Duration::from_secs(20), "the program is ready", || {
        d.ok(&["logs", "polite"]).contains("ready").then_some(())
    });
    d.ok(&["stop", "polite", "quiet"]);
    let log = eventually(Duration::from_secs(20), "its goodbye in the log", || {
        let log = d.ok(&["logs", "polite"]);
        log.contains("said goodbye").then_some(log)
    });
    assert_eq!(log.matches("got TERM").count(), 1, "one stop signal: {log}");
    eventually(
        Duration::from_secs(20),
        "quiet finished its shutdown",
        || {
            std::fs::read_to_string(&mark)
                .ok()?
                .contains("bye")
                .then_some(())
        },
    );
}

#[test]
fn the_api_document_is_served_and_printed_alike() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(false);
    let printed: serde_json::Value = serde_json::from_str(&d.ok(&["api", "openapi"])).unwrap();
    let raw = dozen_testkit::http_raw(
        d.port,
        &format!(
            "GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            dozen_api::paths::OPENAPI,
            d.token()
        ),
    )
    .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let served: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(served, printed);
    assert!(served["paths"][dozen_api::paths::APPLY]["post"].is_object());
    // Like every route but three, it needs the token.
    let (status, _) = http_get(d.port, dozen_api::paths::OPENAPI).unwrap();
    assert_eq!(status, 401);
}

/// The control plane's disk fills up: writes answer 503 saying so, reads go on, and writes
/// work again once space is freed. Nothing goes down.
#[test]
fn a_full_disk_gives_503s_and_the_server_recovers() {
    let Some(disk) = dozen_testkit::SmallDisk::mount("8m") else {
        return;
    };
    let mut d = Dozen::new(DOZEN);
    std::os::unix::fs::symlink(disk.path(), d.data_dir()).unwrap();
    d.start_server(false);
    d.write("dozen.toml", &stack(1, "hello", ""));
    d.ok(&["apply", "--no-wait"]);
    let filler = disk.fill();

    // The log's last page may still hold a few small writes; the first that needs a new one
    // is refused.
    let refused = (0..200).find_map(|i| {
        let out = d.cli(&["scale", &format!("web={}", 1 + i % 2)]);
        (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
    });
    let err = refused.expect("a write refused on a full disk");
    assert!(err.contains("is full"), "{err}");
    let raw = dozen_testkit::http_raw(
        d.port,
        &format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: \
             application/json\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{{\"replicas\":3}}",
            dozen_api::paths::fill(dozen_api::paths::SERVICE_SCALE, &["web"]),
            d.token()
        ),
    )
    .unwrap();
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    // Reads go on while it is full.
    let ps = d.json(&["ps"]);
    assert_eq!(ps["services"][0]["name"], "web", "{ps}");

    std::fs::remove_file(filler).unwrap();
    d.ok(&["scale", "web=3"]);
    let ps = d.json(&["ps"]);
    assert_eq!(ps["services"][0]["desired"], 3, "{ps}");
}

/// Every regular file under `dir` that other users can read.
fn readable_by_others(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if meta.is_dir() {
                todo.push(entry.path());
            } else if meta.is_file() && meta.permissions().mode() & 0o004 != 0 {
                found.push(format!(
                    "{} {:o}",
                    entry.path().display(),
                    meta.permissions().mode() & 0o777
                ));
            }
        }
    }
    found
}

/// Seen: the token, the CA and node keys, the store, task records (the environment) and logs
/// were created readable by every user (11 files after one short run). Now the data dir is
/// 0700 and everything in it 0600, while tasks still get the umask dozen was started with.
#[test]
fn nothing_dozen_writes_is_readable_by_other_users() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(false);
    d.start_agent("node-b");
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "private"
[services.web]
command = ["{APP}"]
[services.web.env]
EMIT_LINES = "3"
[services.mask]
command = "echo umask $(umask); sleep 1000"
port = false
"#
        ),
    );
    d.ok(&["apply"]);
    d.wait_ready("web", 1);
    let ours = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:").map(|m| m.trim().to_string()))
        .unwrap();
    eventually(Duration::from_secs(20), "the task says its umask", || {
        let out = d.cli(&["logs", "mask"]);
        let logs = String::from_utf8_lossy(&out.stdout).into_owned();
        logs.contains(&format!("umask {ours}")).then_some(())
    });
    let found = readable_by_others(&d.data_dir());
    let mut agent = d.data_dir();
    agent.set_file_name("agent-node-b");
    let found_agent = readable_by_others(&agent);
    assert!(
        found.is_empty() && found_agent.is_empty(),
        "readable by every user:\n{}\n{}",
        found.join("\n"),
        found_agent.join("\n")
    );
    for dir in [d.data_dir(), agent] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
    }
}

/// Seen: blobs were read whole into memory on every upload and every GET, so 20 agents
/// fetching a 400 MiB bundle needed 8 GB. They stream to and from disk now: a 64 MiB blob
/// uploaded once and fetched 8 times at once leaves the server's peak memory far below it.
#[test]
fn blobs_stream_to_and_from_disk() {
    use std::io::{Read, Write};
    let mut d = Dozen::new(DOZEN);
    d.server_args = vec!["--no-proxy".into()];
    d.start_server(false);
    let pid = d.server.as_ref().unwrap().id();
    let size = 64 * 1024 * 1024;
    let blob: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let digest = dozen_store::blob::sha256_digest(&blob);
    let address = format!("{}:{}", d.host, d.port);
    let token = d.token();
    let mut put = std::net::TcpStream::connect(&address).unwrap();
    write!(
        put,
        "PUT /v1/blobs/{digest} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    for chunk in blob.chunks(1 << 20) {
        put.write_all(chunk).unwrap();
    }
    let mut answer = String::new();
    put.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (address, token, digest) = (address.clone(), token.clone(), digest.clone());
            std::thread::spawn(move || {
                let mut get = std::net::TcpStream::connect(&address).unwrap();
                write!(
                    get,
                    "GET /v1/blobs/{digest} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
                )
                .unwrap();
                let mut got = Vec::new();
                get.read_to_end(&mut got).unwrap();
                got
            })
        })
        .collect();
    for r in readers {
        let got = r.join().unwrap();
        let body = &got[got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        assert_eq!(body.len(), size, "a whole copy");
        assert!(dozen_store::blob::sha256_digest(body) == digest);
    }
    let peak = peak_rss_mib(pid);
    assert!(
        peak < 64,
        "the server's peak memory was {peak} MiB for a 64 MiB blob"
    );
}

/// Seen: tasks ran as the agent's user (root on a server) and could read dozen's token and
/// keys. A server running as root gives tasks `nobody` unless their service opts in with
/// `user = "root"` (which `plan` shows); the task, its artifact and its `command` health
/// check all run as that user, and the task cannot read the token.
#[test]
fn a_root_servers_tasks_run_unprivileged_and_cannot_read_the_token() {
    if dozen_agent::os::effective_uid() != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the tests as root"
        );
        eprintln!("skipped: the tests run as root in CI, not here");
        return;
    }
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    let app = d.path("app");
    std::fs::create_dir_all(&app).unwrap();
    let script = |name: &str, body: &str| {
        use std::os::unix::fs::PermissionsExt;
        let path = app.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script(
        "run.sh",
        "#!/bin/sh\necho uid $(id -u)\nif cat \"$TOKEN_FILE\"; then echo token read; else echo token denied; fi\nexec sleep 1000\n",
    );
    script("check.sh", "#!/bin/sh\ntest \"$(id -u)\" = 65534\n");
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "users"
[services.plain]
artifact = "./app"
command = "./run.sh"
port = false
env = {{ TOKEN_FILE = "{}" }}
health = {{ command = ["./check.sh"], interval = "200ms" }}
[services.rooted]
command = "echo uid $(id -u); exec sleep 1000"
port = false
user = "root"
"#,
            d.data_dir().join("token").display()
        ),
    );
    let plan = d.ok(&["plan"]);
    assert!(plan.contains(r#"user: (none) -> "root""#), "{plan}");
    d.ok(&["apply", "--no-wait"]);
    // Healthy only if the check ran as nobody, in the artifact.
    d.wait_ready("plain", 1);
    let logs = eventually(
        Duration::from_secs(20),
        "both tasks say who they are",
        || {
            let logs = d.ok(&["logs", "plain"]) + &d.ok(&["logs", "rooted"]);
            (logs.contains("token ") && logs.contains("uid 0")).then_some(logs)
        },
    );
    assert!(logs.contains("uid 65534"), "{logs}");
    assert!(logs.contains("token denied"), "{logs}");
    assert!(!logs.contains("token read"), "{logs}");
    assert!(!logs.contains(&d.token()), "{logs}");
    assert!(readable_by_others(&d.data_dir()).is_empty());
}

/// `node` and `node_labels` keep a service on the nodes it names: a database beside its
/// data. `dozen nodes` shows each node's labels.
#[test]
fn placement_constraints_keep_services_on_their_nodes() {
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    d.agent_args = vec!["--label".into(), "disk=ssd".into()];
    d.start_agent("node-b");
    d.write(
        "dozen.toml",
        r#"
name = "placed"
[services.db]
command = "exec sleep 1000"
port = false
replicas = 2
node_labels = { disk = "ssd" }
[services.cron]
command = "exec sleep 1000"
port = false
node = "node-a"
[services.nowhere]
command = "exec sleep 1000"
port = false
node = "node-z"
"#,
    );
    d.ok(&["apply", "--no-wait"]);
    d.wait_ready("db", 2);
    d.wait_ready("cron", 1);
    let nodes_of = |service: &str| -> Vec<String> {
        d.tasks(service)
            .iter()
            .map(|t| t["node"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(nodes_of("db"), ["node-b", "node-b"]);
    assert_eq!(nodes_of("cron"), ["node-a"]);
    let ps = d.json(&["ps"]).to_string();
    assert!(
        ps.contains("it must run on node `node-z` (`node`), which is not a live node"),
        "{ps}"
    );
    let nodes = d.ok(&["nodes"]);
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with("node-b") && l.contains("disk=ssd")),
        "{nodes}"
    );
    d.ok(&["down"]);
}
