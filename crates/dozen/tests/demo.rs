//! The demo stack under `dozen up`: every route answers through the proxy, the page shows data
//! from both APIs, and a kill -9 of the whole `dozen up` process loses nothing.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dozen_testkit::{eventually, http_request_at, process_alive, Dozen};

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const DEMO: &str = env!("CARGO_BIN_EXE_dozen-demo");

fn demo_stack() -> String {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/demo/dozen.toml"
    );
    std::fs::read_to_string(file)
        .unwrap()
        .replace("./target/release/dozen-demo", DEMO)
}

/// `dozen up`'s own output, kept for the failure messages.
fn up_log(d: &Dozen) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.dir.path().join("up.log"))
        .expect("up.log")
}

fn start_up(d: &Dozen) -> Child {
    d.up_command("dozen.toml")
        .env("DOZEN_LOG", "info")
        .stdout(up_log(d))
        .stderr(up_log(d))
        .spawn()
        .expect("spawn dozen up")
}

fn page_ok(d: &Dozen) -> Option<String> {
    let r = http_request_at(&d.proxy_address(), "demo.local", "/")?;
    (r.status == 200 && r.body.contains("\"products\"") && r.body.contains("\"open_orders\""))
        .then_some(r.body)
}

fn pids(d: &Dozen) -> BTreeMap<String, u64> {
    d.json(&["ps"])["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            Some((
                t["task"].as_str()?.to_string(),
                t["status"]["pid"].as_u64()?,
            ))
        })
        .collect()
}

#[test]
fn the_demo_comes_up_and_survives_a_kill_9_of_dozen_up() {
    let mut d = Dozen::new(DOZEN);
    d.use_fixed_ports_on_own_address();
    d.write("dozen.toml", &demo_stack());
    let mut up = start_up(&d);
    let page = eventually(
        Duration::from_secs(60),
        "the demo page shows both APIs",
        || page_ok(&d),
    );
    assert!(page.contains("dozen demo shop"), "{page}");
    // The banner names a binary the user can run: not on PATH here, so its path.
    let exe = std::fs::canonicalize(DOZEN).unwrap();
    let banner = format!("in this directory: {} ps | ", exe.display());
    eventually(Duration::from_secs(20), "the banner", || {
        let log = std::fs::read_to_string(d.dir.path().join("up.log")).ok()?;
        log.contains(&banner).then_some(())
    });
    for (path, needle) in [("/api/catalog", "teapot"), ("/api/orders", "EUR")] {
        let r = http_request_at(&d.proxy_address(), "demo.local", path).unwrap();
        assert_eq!(r.status, 200, "{path}");
        assert!(r.body.contains(needle), "{path}: {}", r.body);
    }
    let worker_log = eventually(Duration::from_secs(30), "the worker reaches orders", || {
        let logs = d.ok(&["logs", "worker"]);
        logs.contains("checked orders").then_some(logs)
    });
    assert!(worker_log.contains("open_orders"), "{worker_log}");
    let before = eventually(Duration::from_secs(20), "7 running tasks", || {
        let p = pids(&d);
        (p.len() == 7).then_some(p)
    });

    // kill -9 of the whole `dozen up`: the tasks stay, and a new `dozen up` takes them back.
    up.kill().unwrap();
    up.wait().unwrap();
    for pid in before.values() {
        assert!(process_alive(*pid as u32));
    }
    let mut again = start_up(&d);
    eventually(Duration::from_secs(30), "the proxy serves again", || {
        page_ok(&d)
    });
    let after = eventually(Duration::from_secs(20), "all tasks re-adopted", || {
        let ps = d.json(&["ps"]);
        let tasks = ps["tasks"].as_array()?;
        (tasks.len() == 7 && tasks.iter().all(|t| t["status"]["adopted"] == true)).then(|| pids(&d))
    });
    assert_eq!(
        after, before,
        "same tasks, same processes, nothing started twice"
    );
    assert_eq!(d.shim_processes().len(), 7, "no duplicate shims");

    // Ctrl-C: the stack stops gracefully and `dozen up` exits.
    dozen_testkit::signal(again.id(), "INT");
    let status = eventually(
        Duration::from_secs(60),
        "dozen up exits after Ctrl-C",
        || again.try_wait().ok().flatten(),
    );
    assert!(status.success(), "{status}");
    assert!(d.shim_processes().is_empty(), "every task stopped");
    let orders_log = std::fs::read_dir(d.data_dir().join("agent/tasks"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("orders-"))
        .map(|e| {
            // The exit record too: it tells a graceful exit from a kill when the line is missing.
            format!(
                "{}--- exit: {}\n",
                std::fs::read_to_string(e.path().join("output.log")).unwrap_or_default(),
                std::fs::read_to_string(e.path().join("exit.json")).unwrap_or_default()
            )
        })
        .collect::<String>();
    assert!(
        orders_log.contains("stopped after serving"),
        "graceful SIGTERM: {orders_log}\n--- dozen up:\n{}",
        std::fs::read_to_string(d.dir.path().join("up.log")).unwrap_or_default()
    );
}

/// Kills a background server left behind by a failed assertion.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .status();
    }
}

#[test]
fn up_d_runs_in_the_background_and_down_stops_that_server_and_never_a_stranger() {
    let mut d = Dozen::new(DOZEN);
    d.use_fixed_ports_on_own_address();
    d.write(
        "dozen.toml",
        "name = \"bg\"\n[services.ticker]\ncommand = \"while true; do echo tick; sleep 1; done\"\nport = false\n",
    );
    let out = Command::new(DOZEN)
        .args(["up", "-d", "-f", "dozen.toml"])
        .args(["--listen", &format!("{}:{}", d.host, d.port)])
        .args(["--proxy-listen", &d.proxy_address()])
        .args([
            "--proxy-internal-listen",
            &format!("{}:{}", d.host, d.proxy_internal_port),
        ])
        .current_dir(d.dir.path())
        .env("DOZEN_DATA_DIR", d.data_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "up -d: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid_file = d.data_dir().join("server.pid");
    let recorded = std::fs::read_to_string(&pid_file).unwrap();
    let mut fields = recorded.split_whitespace();
    let pid: u32 = fields.next().unwrap().parse().unwrap();
    let start: u64 = fields.next().expect("pid and start time").parse().unwrap();
    let _guard = KillOnDrop(pid);
    assert!(process_alive(pid));

    // The pid file names another process (same pid, another start time: the pid was reused):
    // `down` removes the stack but signals no one.
    std::fs::write(&pid_file, format!("{pid} {}\n", start + 1)).unwrap();
    let said = d.ok(&["down", "bg"]);
    assert!(!said.contains("stopped the background server"), "{said}");
    assert!(
        process_alive(pid),
        "a process the pid file does not name was signalled"
    );

    // With the real record, `down` stops that server and waits for it.
    std::fs::write(&pid_file, &recorded).unwrap();
    d.ok(&["apply"]);
    let said = d.ok(&["down", "bg"]);
    assert!(said.contains("stopped the background server"), "{said}");
    assert!(
        !process_alive(pid),
        "the background server is gone when down returns"
    );
    assert!(!pid_file.exists());
}
