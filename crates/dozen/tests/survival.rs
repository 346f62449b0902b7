//! End-to-end: processes killed with SIGKILL at awkward moments. Tasks outlive the server and
//! the agent (their shims hold them), nothing starts twice, and a killed task comes back.

use std::collections::BTreeMap;
use std::time::Duration;

use dozen_testkit::{eventually, process_alive, signal, Dozen};
use serde_json::Value;

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const APP: &str = env!("CARGO_BIN_EXE_dozen-testapp");

fn stack() -> String {
    format!(
        r#"
name = "survivors"

[services.web]
command = ["{APP}"]
replicas = 3
[services.web.health]
http = "/healthz"
interval = "200ms"
timeout = "100ms"
[services.web.resources]
cpu = "10m"
memory = "16MiB"

[services.ticker]
command = "while true; do echo tick; sleep 0.2; done"
port = false
[services.ticker.resources]
cpu = "10m"
memory = "16MiB"
"#
    )
}

/// task id -> pid of every running task.
fn running(d: &Dozen) -> BTreeMap<String, u64> {
    let ps = d.json(&["ps"]);
    ps["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["status"]["state"] == "running")
        .filter_map(|t| {
            Some((
                t["task"].as_str()?.to_string(),
                t["status"]["pid"].as_u64()?,
            ))
        })
        .collect()
}

/// Waits until `n` tasks run; returns them (task id -> pid).
fn running_once(d: &Dozen, n: usize) -> BTreeMap<String, u64> {
    eventually(
        Duration::from_secs(20),
        &format!("{n} running tasks"),
        || {
            let r = running(d);
            (r.len() == n).then_some(r)
        },
    )
}

/// `ps` must describe exactly the processes that exist: one shim and one task per task.
fn assert_ps_matches_processes(d: &Dozen, expected: &BTreeMap<String, u64>) {
    let mut from_shims: Vec<u64> = d
        .shim_processes()
        .into_iter()
        .map(|(_, task)| u64::from(task.expect("every shim has a live task")))
        .collect();
    from_shims.sort();
    let mut from_ps: Vec<u64> = expected.values().copied().collect();
    from_ps.sort();
    assert_eq!(from_shims, from_ps, "no duplicate or missing processes");
    for pid in from_ps {
        assert!(process_alive(pid as u32));
    }
}

fn all_adopted_by_new_agent(d: &Dozen, old_instance: &Value) -> Option<BTreeMap<String, u64>> {
    let ps = d.json(&["ps"]);
    let tasks = ps["tasks"].as_array()?;
    let ok = tasks.len() == 4
        && tasks.iter().all(|t| {
            t["status"]["state"] == "running"
                && t["status"]["adopted"] == true
                && &t["status"]["agent_instance"] != old_instance
        });
    ok.then(|| running(d))
}

#[test]
fn kill_9_of_the_server_keeps_every_task_and_readopts_it() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    d.write("dozen.toml", &stack());
    d.ok(&["apply"]);
    d.wait_ready("web", 3);
    let before = running_once(&d, 4);
    let instance = d.json(&["ps"])["tasks"][0]["status"]["agent_instance"].clone();
    assert_ps_matches_processes(&d, &before);

    d.kill_server();
    for pid in before.values() {
        assert!(process_alive(*pid as u32), "task {pid} survives the server");
    }
    // The ticker keeps writing while nobody supervises it: its shim owns the pipe.
    let ticker_log = |d: &Dozen| -> usize {
        let dir = d.data_dir().join("agent/tasks");
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("ticker-"))
            .map(|e| std::fs::read_to_string(e.path().join("output.log")).unwrap_or_default())
            .map(|s| s.matches("tick").count())
            .sum()
    };
    let ticks = ticker_log(&d);
    eventually(
        Duration::from_secs(10),
        "ticker logs while the server is down",
        || (ticker_log(&d) > ticks + 2).then_some(()),
    );

    d.start_server(true);
    let after = eventually(Duration::from_secs(20), "tasks re-adopted", || {
        all_adopted_by_new_agent(&d, &instance)
    });
    assert_eq!(
        after, before,
        "same tasks, same pids: nothing started twice"
    );
    assert_ps_matches_processes(&d, &after);
    let nodes = d.json(&["nodes"]);
    assert_eq!(
        nodes.as_array().unwrap().len(),
        1,
        "the node is alive: {nodes}"
    );
    // And the re-adopted tasks are still managed: scaling works.
    d.ok(&["scale", "web=1"]);
    d.wait_ready("web", 1);
}

#[test]
fn kill_9_of_a_task_restarts_it() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    d.write("dozen.toml", &stack());
    d.ok(&["apply"]);
    let web = d.wait_ready("web", 3);
    let victim = web[0]["task"].as_str().unwrap().to_string();
    let pid = web[0]["status"]["pid"].as_u64().unwrap();
    signal(pid as u32, "KILL");
    let back = eventually(Duration::from_secs(20), "killed task restarted", || {
        d.ready_tasks("web")
            .into_iter()
            .find(|t| t["task"] == victim.as_str() && t["status"]["pid"].as_u64() != Some(pid))
    });
    assert_eq!(back["generation"], 2);
    assert_eq!(back["restarts"], 1);
    assert_eq!(d.tasks("web").len(), 3, "replaced in place, not duplicated");
    assert!(!process_alive(pid as u32));
}

#[test]
fn kill_9_of_an_agent_leaves_its_tasks_running() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(false);
    d.start_agent("node-b");
    d.write("dozen.toml", &stack());
    d.ok(&["apply"]);
    d.wait_ready("web", 3);
    let before = running_once(&d, 4);
    let instance = d.json(&["ps"])["tasks"][0]["status"]["agent_instance"].clone();
    d.kill_agents();
    for pid in before.values() {
        assert!(process_alive(*pid as u32), "task {pid} survives its agent");
    }
    d.start_agent("node-b");
    let after = eventually(Duration::from_secs(20), "tasks re-adopted", || {
        all_adopted_by_new_agent(&d, &instance)
    });
    assert_eq!(after, before);
    assert_ps_matches_processes(&d, &after);
}

#[test]
fn kill_9_of_a_shell_task_takes_its_children_too_and_it_comes_back() {
    // `command` as a string runs under /bin/sh: the app is the shell's child. Killing the
    // shell must not leave the app behind holding the task's port.
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "shells"
[services.web]
command = "{APP} --under-a-shell"
[services.web.health]
http = "/healthz"
interval = "200ms"
timeout = "100ms"
"#
        ),
    );
    d.ok(&["apply"]);
    let web = d.wait_ready("web", 1);
    let shell = web[0]["status"]["pid"].as_u64().unwrap() as u32;
    let port = web[0]["status"]["host_port"].as_u64().unwrap() as u16;
    let app_pid: u32 = dozen_testkit::http_get(port, "/pid")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert_ne!(app_pid, shell, "the app runs as the shell's child");
    signal(shell, "KILL");
    eventually(
        Duration::from_secs(10),
        "the orphaned app is killed too",
        || (!process_alive(app_pid)).then_some(()),
    );
    let back = eventually(Duration::from_secs(20), "the task serves again", || {
        d.ready_tasks("web")
            .into_iter()
            .find(|t| t["generation"] == 2)
    });
    assert_eq!(
        back["status"]["host_port"].as_u64(),
        Some(u64::from(port)),
        "same port, free again"
    );
    let new_app: u32 = dozen_testkit::http_get(port, "/pid")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert_ne!(new_app, app_pid);
}

fn node_state(d: &Dozen, node: &str) -> Option<String> {
    d.json(&["nodes"])
        .as_array()?
        .iter()
        .find(|n| n["node"]["name"] == node)
        .and_then(|n| n["state"].as_str().map(String::from))
}

/// Waits until `node` is in `state` (as `dozen nodes` says).
fn wait_node(d: &Dozen, node: &str, state: &str) {
    eventually(
        Duration::from_secs(20),
        &format!("{node} is {state}"),
        || (node_state(d, node).as_deref() == Some(state)).then_some(()),
    );
}

/// Seen: an agent stopped (SIGSTOP) past its node TTL, on a cluster with no other node, got
/// every task replaced by new processes when it resumed. A missed lease now marks the node
/// down; with nowhere else to go its tasks stay, and it re-claims them: same tasks, same pids.
#[test]
fn an_agent_stalled_past_its_ttl_keeps_every_task_when_no_other_node_can_take_them() {
    let mut d = Dozen::new(DOZEN);
    d.server_args = vec!["--node-ttl".into(), "2s".into()];
    d.start_server(false);
    let agent = d.start_agent("node-b");
    d.write("dozen.toml", &stack());
    d.ok(&["apply"]);
    d.wait_ready("web", 3);
    let before = running_once(&d, 4);

    signal(agent, "STOP");
    wait_node(&d, "node-b", "down");
    // The controller has judged it: the tasks it would replace have nowhere to go, and `ps`
    // says so, while the tasks themselves run on.
    eventually(
        Duration::from_secs(20),
        "`ps` says why nothing is replaced",
        || {
            let problems = d.json(&["ps"])["services"].to_string();
            problems.contains("cannot place").then_some(())
        },
    );
    for pid in before.values() {
        assert!(
            process_alive(*pid as u32),
            "task {pid} runs on while its agent is stopped"
        );
    }
    signal(agent, "CONT");
    wait_node(&d, "node-b", "up");
    eventually(Duration::from_secs(20), "the problem is gone", || {
        let services = d.json(&["ps"])["services"].to_string();
        (!services.contains("cannot place")).then_some(())
    });
    let after = running(&d);
    assert_eq!(after, before, "the same tasks with the same processes");
    assert_eq!(
        d.tasks("web").len(),
        3,
        "nothing was started in their place"
    );
    assert_ps_matches_processes(&d, &after);
    // Each change is an event: who leads, the node going and coming back.
    let events = d.ok(&["events"]);
    assert!(events.contains("leads the controllers"), "{events}");
    let down = events
        .find("node node-b  node down: its heartbeats stopped")
        .unwrap_or_else(|| panic!("node down in:\n{events}"));
    assert!(
        events[down..].contains("node node-b  node up"),
        "node up after it in:\n{events}"
    );
}

/// With a second node, a stalled node's tasks are replaced there; when it resumes, exactly one
/// copy of each task remains (the surplus is retired through the stop protocol).
#[test]
fn a_stalled_nodes_tasks_are_replaced_elsewhere_and_one_copy_remains_when_it_returns() {
    let mut d = Dozen::new(DOZEN);
    d.server_args = vec!["--node-ttl".into(), "2s".into()];
    d.start_server(false);
    let stalled = d.start_agent("node-b");
    d.write("dozen.toml", &stack());
    d.ok(&["apply"]);
    d.wait_ready("web", 3);
    d.start_agent("node-c");
    let on_b: BTreeMap<String, u64> = running_once(&d, 4);

    signal(stalled, "STOP");
    wait_node(&d, "node-b", "down");
    eventually(
        Duration::from_secs(30),
        "replacements serve on node-c",
        || {
            let ready = d.ready_tasks("web");
            (ready.iter().filter(|t| t["node"] == "node-c").count() == 3).then_some(())
        },
    );
    for pid in on_b.values() {
        assert!(
            process_alive(*pid as u32),
            "node-b's task {pid} was not touched"
        );
    }
    signal(stalled, "CONT");
    wait_node(&d, "node-b", "up");
    let after = eventually(Duration::from_secs(30), "one copy of each task", || {
        let ps = d.json(&["ps"]);
        let tasks = ps["tasks"].as_array()?;
        let settled = tasks.len() == 4 && tasks.iter().all(|t| t["desired"] == "run");
        let r = running(&d);
        (settled && r.len() == 4).then_some(r)
    });
    assert_eq!(d.tasks("web").len(), 3);
    assert_ps_matches_processes(&d, &after);
    let retired: Vec<u64> = on_b
        .iter()
        .filter(|(task, _)| !after.contains_key(*task))
        .map(|(_, pid)| *pid)
        .collect();
    for pid in retired {
        assert!(!process_alive(pid as u32), "retired copy {pid} was stopped");
    }
}

/// Whether this machine lets the agent make cgroups (v1 memory and cpu, or v2).
fn cgroups_writable() -> bool {
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        && std::fs::create_dir_all("/sys/fs/cgroup/memory/dozen").is_ok();
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.contains("memory") && c.contains("cpu"));
    v1 || v2
}

/// Skips outside CI where the agent cannot make cgroups; CI must let it.
fn needs_cgroups() -> bool {
    if cgroups_writable() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must let the agent make cgroups"
    );
    eprintln!("skipped: no writable cgroups here (this test runs in CI)");
    false
}

/// A task forking without end meets its `pids` limit, not the node's process table.
#[test]
fn a_task_cannot_start_more_processes_than_its_pids_limit() {
    if !needs_cgroups() {
        return;
    }
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    d.write(
        "dozen.toml",
        r#"
name = "forks"
[services.bomb]
command = "i=0; while [ $i -lt 40 ]; do sleep 1000 & i=$((i+1)); done; echo 40 started; sleep 1000"
port = false
stop_timeout = "1s"
resources = { pids = 10 }
"#,
    );
    d.ok(&["apply", "--no-wait"]);
    let logs = eventually(
        Duration::from_secs(20),
        "the shell is refused a fork",
        || {
            let logs = d.ok(&["logs", "bomb"]);
            logs.contains("Cannot fork").then_some(logs)
        },
    );
    assert!(!logs.contains("40 started"), "{logs}");
    d.ok(&["down"]);
}

/// Seen: a stop signalled the task's process group only, so a `setsid` (daemonised) child
/// outlived its task. Where cgroups are available the stop reaches every process in the
/// task's cgroups.
#[test]
fn stopping_a_task_stops_its_daemonised_children_too() {
    if !needs_cgroups() {
        return;
    }
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    let pid_file = d.path("daemon.pid");
    let script = d.write(
        "daemon.sh",
        &format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 1000\n",
            pid_file.display()
        ),
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "forks"
[services.forker]
command = "setsid {} & sleep 1000"
# It writes its pid into the test's own directory, which only root can enter.
user = "root"
port = false
stop_timeout = "1s"
"#,
            script.display()
        ),
    );
    d.ok(&["apply"]);
    let daemon: u32 = eventually(Duration::from_secs(20), "the daemon started", || {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    });
    assert!(process_alive(daemon));
    d.ok(&["down"]);
    eventually(
        Duration::from_secs(20),
        "the daemon is stopped with its task",
        || (!process_alive(daemon)).then_some(()),
    );
}
