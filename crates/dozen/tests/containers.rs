//! End-to-end on the real Docker Engine: image tasks run as containers through the `docker`
//! driver, are reached on their published port, write into `dozen logs`, are replaced when
//! killed, and `down` removes every container dozen made and nothing else.

use std::time::Duration;

use dozen_testkit::images::{self, docker};
use dozen_testkit::{eventually, http_request, Dozen};

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const IMAGE: &str = "dozen-test/testapp:latest";

/// Builds [`IMAGE`] (the static test app `FROM scratch`); false (the test skips) without an
/// engine, which fails in CI (it has one).
fn testapp_image() -> bool {
    if !images::engine_answers() {
        assert!(std::env::var_os("CI").is_none(), "CI has a Docker Engine");
        eprintln!("skipped: no Docker Engine answers here (this test runs in CI)");
        return false;
    }
    let bin = images::static_binaries(&["dozen-testapp"], &[]);
    images::build(
        IMAGE,
        &[(bin.join("dozen-testapp"), "/testapp")],
        "/testapp",
    );
    true
}

/// Waits until every container this installation's agent made is gone (its home's label:
/// other tests run their own).
fn gone_after_down(d: &Dozen) {
    let home = std::fs::read_to_string(d.data_dir().join("agent").join("home-id")).unwrap();
    let mine = format!("label=dozen.home={}", home.trim());
    eventually(
        Duration::from_secs(30),
        "every container dozen made is gone",
        || {
            docker(&["ps", "-aq", "--filter", &mine])
                .is_empty()
                .then_some(())
        },
    );
}

fn containers_of(task: Option<&str>) -> Vec<String> {
    let filter = format!("label=dozen.task={}", task.unwrap_or_default());
    docker(&["ps", "-aq", "--filter", &filter])
        .lines()
        .map(String::from)
        .collect()
}

/// The whole path of an image: built, pushed to dozen's registry, run as three replicas
/// pulled through the node's mirror and reached through the proxy; a killed container is
/// replaced, a restarted agent takes the same containers back, `down` removes what dozen made.
#[test]
fn image_tasks_run_as_containers_are_replaced_when_killed_and_removed_by_down() {
    if !testapp_image() {
        return;
    }
    // A container dozen did not make: `down` leaves it alone.
    let stranger = docker(&["create", "--label", "dozen-test=1", IMAGE]);

    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    let digest = images::push_to_registry(&d, IMAGE, "shop/testapp:1");
    d.write(
        "dozen.toml",
        r#"
name = "boxes"
[services.web]
image = "shop/testapp:1"
replicas = 3
stop_timeout = "2s"
health = { http = "/healthz", interval = "200ms" }
resources = { memory = "128MiB", cpu = "100m" }
[[services.web.routes]]
path = "/"
[services.web.env]
EMIT_LINES = "2"
"#,
    );
    d.ok(&["apply", "--timeout", "60s"]);
    let ready = d.wait_ready("web", 3);
    let releases = d.json(&["releases", "web"]);
    assert_eq!(
        releases[0]["image_pin"]["digest"].as_str(),
        Some(digest.as_str()),
        "{releases}"
    );
    let mirror = std::fs::read_to_string(d.data_dir().join("agent").join("mirror-port")).unwrap();
    let pulled = format!("127.0.0.1:{}/shop/testapp@{digest}", mirror.trim());
    for task in &ready {
        let name = task["task"].as_str().unwrap();
        let mine = containers_of(Some(name));
        assert_eq!(mine.len(), 1, "one container for {name}");
        let image = docker(&["inspect", "--format", "{{.Config.Image}}", &mine[0]]);
        assert_eq!(image, pulled, "pulled by digest through the node's mirror");
    }
    // Through the proxy, every replica answers.
    let names: std::collections::BTreeSet<String> = ready
        .iter()
        .map(|t| t["task"].as_str().unwrap().to_string())
        .collect();
    let answered = eventually(
        Duration::from_secs(20),
        "each replica through the proxy",
        || {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..30 {
                let r = http_request(d.proxy_port, "localhost", "/")?;
                seen.insert(r.body.strip_prefix("hello from ")?.to_string());
            }
            (seen == names).then_some(seen)
        },
    );
    assert_eq!(answered.len(), 3);
    // Its output is the task's log, as a process's is.
    let logs = eventually(Duration::from_secs(20), "the containers' output", || {
        let logs = d.ok(&["logs", "web"]);
        (logs.matches("line 1").count() == 3).then_some(logs)
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
            (ready.len() == 3 && now.len() == 1 && now != before).then_some(())
        },
    );
    let events = d.ok(&["events", "web"]);
    assert!(events.contains("exited with code 137"), "{events}");

    // kill -9 of the server and its agent: the containers run on and are taken back, the
    // same ones; a container the agent made that no task keeps is removed.
    let ids = |d: &Dozen| -> Vec<String> {
        let mut ids: Vec<String> = d
            .tasks("web")
            .iter()
            .flat_map(|t| containers_of(t["task"].as_str()))
            .collect();
        ids.sort();
        ids
    };
    let before = ids(&d);
    assert_eq!(before.len(), 3);
    let home = std::fs::read_to_string(d.data_dir().join("agent").join("home-id")).unwrap();
    let stray = docker(&[
        "create",
        "--label",
        &format!("dozen.home={}", home.trim()),
        "--label",
        "dozen.task=web-stray",
        IMAGE,
    ]);
    d.kill_server();
    d.start_server(true);
    eventually(Duration::from_secs(30), "every task re-adopted", || {
        let ps = d.json(&["ps"]);
        let tasks = ps["tasks"].as_array()?;
        (tasks.len() == 3 && tasks.iter().all(|t| t["status"]["adopted"] == true)).then_some(())
    });
    assert_eq!(ids(&d), before, "the same containers");
    eventually(Duration::from_secs(20), "the stray is removed", || {
        docker(&["ps", "-aq", "--filter", &format!("id={stray}")])
            .is_empty()
            .then_some(())
    });
    // The limits are on the containers.
    let limits = docker(&[
        "inspect",
        "--format",
        "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{.HostConfig.PidsLimit}}",
        &before[0],
    ]);
    assert_eq!(limits, "134217728 100000000 4096");

    d.ok(&["down"]);
    gone_after_down(&d);
    let left = docker(&["ps", "-aq", "--filter", &format!("id={stranger}")]);
    assert!(!left.is_empty(), "the stranger's container is left alone");
    docker(&["rm", "-f", &stranger]);
}

/// A container over its memory limit is killed by the kernel, and `ps` and `events` say so.
#[test]
fn a_container_over_its_memory_limit_says_it_ran_out_of_memory() {
    if !testapp_image() {
        return;
    }
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "greedy"
[services.eater]
image = "{IMAGE}"
port = false
resources = {{ memory = "16MiB" }}
[services.eater.env]
ALLOC_MB = "256"
"#
        ),
    );
    d.ok(&["apply", "--no-wait"]);
    let events = eventually(Duration::from_secs(60), "out of memory", || {
        let events = d.ok(&["events", "eater"]);
        events.contains("out of memory").then_some(events)
    });
    assert!(events.contains("raise `resources.memory`"), "{events}");
    let ps = d.json(&["ps"]);
    assert!(
        ps["services"][0]["problems"]
            .to_string()
            .contains("out of memory"),
        "{ps}"
    );
    d.ok(&["down"]);
    gone_after_down(&d);
}

/// A unix socket that forwards to the real engine's, and can be cut: the engine "stops"
/// for the agent without stopping the machine's engine.
struct EngineSwitch {
    path: std::path::PathBuf,
    on: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl EngineSwitch {
    fn start(dir: &std::path::Path) -> EngineSwitch {
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::atomic::Ordering;
        let path = dir.join("engine.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (on2, open2) = (on.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !on2.load(Ordering::SeqCst) {
                    continue; // dropped: the caller sees the connection closed
                }
                let Ok(engine) = UnixStream::connect("/var/run/docker.sock") else {
                    continue;
                };
                let mut kept = open2.lock().unwrap();
                kept.push(client.try_clone().unwrap());
                kept.push(engine.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), engine.try_clone().unwrap()),
                    (engine, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        EngineSwitch { path, on, open }
    }

    fn set(&self, on: bool) {
        self.on.store(on, std::sync::atomic::Ordering::SeqCst);
        if !on {
            for stream in self.open.lock().unwrap().drain(..) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Seen in the issue: with the engine stopped, image tasks must wait with the reason, nothing
/// crashes, process tasks are untouched, and image tasks start once the engine is back.
#[test]
fn an_engine_that_stops_answering_holds_image_tasks_back_and_nothing_else() {
    if !testapp_image() {
        return;
    }
    let mut d = Dozen::new(DOZEN);
    let switch = EngineSwitch::start(d.dir.path());
    d.server_env = vec![(
        "DOCKER_HOST".into(),
        format!("unix://{}", switch.path.display()),
    )];
    d.start_without_proxy();
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "mixed"
[services.boxed]
image = "{IMAGE}"
health = {{ http = "/healthz", interval = "200ms" }}
[services.plain]
command = "exec sleep 1000"
port = false
"#
        ),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    let plain_pid = d.tasks("plain")[0]["status"]["pid"].clone();

    switch.set(false);
    // The node says it has no engine now; a new image task waits, saying why.
    eventually(
        Duration::from_secs(30),
        "the node lost its docker driver",
        || {
            let nodes = d.json(&["nodes"]);
            (!nodes.to_string().contains("\"docker\"")).then_some(())
        },
    );
    d.ok(&["scale", "boxed=2"]);
    eventually(Duration::from_secs(30), "the reason in ps", || {
        let ps = d.json(&["ps"]).to_string();
        ps.contains("no live node has the `docker` driver")
            .then_some(())
    });
    assert_eq!(
        d.tasks("plain")[0]["status"]["pid"],
        plain_pid,
        "process tasks untouched"
    );
    assert_eq!(d.tasks("plain")[0]["status"]["state"], "running");

    switch.set(true);
    d.wait_ready("boxed", 2);
    assert_eq!(d.tasks("plain")[0]["status"]["pid"], plain_pid);
    d.ok(&["down"]);
    gone_after_down(&d);
}

/// A `command` health check of an image task runs inside its container (`/testapp` exists
/// only there), and its failure is the task's reason.
#[test]
fn command_health_checks_run_inside_the_container() {
    if !testapp_image() {
        return;
    }
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "checked"
[services.good]
image = "{IMAGE}"
port = false
health = {{ command = ["/testapp", "exit", "0"], interval = "200ms" }}
[services.bad]
image = "{IMAGE}"
port = false
health = {{ command = ["/testapp", "exit", "3"], interval = "200ms", unhealthy_threshold = 2 }}
"#
        ),
    );
    d.ok(&["apply", "--no-wait"]);
    d.wait_ready("good", 1);
    let events = eventually(Duration::from_secs(30), "the bad check's reason", || {
        let events = d.ok(&["events", "bad"]);
        events.contains("health check failed").then_some(events)
    });
    assert!(events.contains("exited with exit status: 3"), "{events}");
    d.ok(&["down"]);
    gone_after_down(&d);
}

/// A named volume keeps its data across the containers of a service: a restart's new
/// container counts on from where the old one was.
#[test]
fn a_named_volume_outlives_its_containers() {
    if !testapp_image() {
        return;
    }
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    // A stack name of its own: its volume is `<stack>_data`.
    let stack = format!("vol{}", std::process::id());
    let _volume = VolumeGone(format!("{stack}_data"));
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "{stack}"
[services.db]
image = "{IMAGE}"
# As the task user a root server gives tasks (nobody): the new volume is given to it.
volumes = ["data:/data"]
health = {{ http = "/healthz", interval = "200ms" }}
[services.db.env]
COUNT_FILE = "/data/count"
"#
        ),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    eventually(Duration::from_secs(20), "the first start", || {
        d.ok(&["logs", "db"]).contains("start 1").then_some(())
    });
    d.ok(&["restart", "db", "--wait", "--timeout", "60s"]);
    eventually(Duration::from_secs(20), "the count goes on", || {
        d.ok(&["logs", "db"]).contains("start 2").then_some(())
    });
    d.ok(&["down"]);
    gone_after_down(&d);
}

/// Removes a test's volume however the test ends.
struct VolumeGone(String);
impl Drop for VolumeGone {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["volume", "rm", "-f", &self.0])
            .output();
    }
}

/// The demo in containers, as the README runs it: `dozen up` builds the image from the static
/// demo binary, pushes it to its own registry, and the services (each a container) reach each
/// other through the node's proxy; Ctrl-C removes every container.
#[test]
fn the_container_demo_builds_its_image_and_its_services_reach_each_other() {
    if !images::engine_answers() {
        assert!(std::env::var_os("CI").is_none(), "CI has a Docker Engine");
        eprintln!("skipped: no Docker Engine answers here (this test runs in CI)");
        return;
    }
    let bin = images::static_binaries(&["dozen-demo"], &[]);
    let mut d = Dozen::new(DOZEN);
    d.use_fixed_ports_on_own_address();
    let demo = d.dir.path().join("demo");
    std::fs::create_dir_all(&demo).unwrap();
    let example = images::workspace_root().join("examples/demo-containers");
    for file in ["dozen.toml", "Dockerfile"] {
        std::fs::copy(example.join(file), demo.join(file)).unwrap();
    }
    std::fs::copy(bin.join("dozen-demo"), demo.join("dozen-demo")).unwrap();
    let log = d.dir.path().join("up.log");
    // Both streams appending: one written at its own offset would overwrite the other.
    let append = || {
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap()
    };
    let up = d
        .up_command("demo/dozen.toml")
        .stdout(append())
        .stderr(append())
        .spawn()
        .unwrap();
    // Declared after `d`: dropped first, so `up` is gone before `d` ends its tasks.
    let mut up = EndOnDrop(up);
    let page = eventually(
        Duration::from_secs(120),
        "the shop page through the proxy",
        || {
            let r = dozen_testkit::http_request_at(&d.proxy_address(), "demo.local", "/")?;
            (r.status == 200
                && r.body.contains("\"products\"")
                && r.body.contains("\"open_orders\""))
            .then_some(r.body)
        },
    );
    assert!(page.contains("dozen demo shop (containers)"), "{page}");
    let built = std::fs::read_to_string(&log).unwrap();
    assert!(
        built.contains("Step 1/") && built.contains("pushing demo/shop"),
        "{built}"
    );
    // Every task is a container of the pushed image.
    let home = std::fs::read_to_string(d.data_dir().join("agent").join("home-id")).unwrap();
    let mine = format!("label=dozen.home={}", home.trim());
    // (The page needs three services; the worker may come a moment later.)
    eventually(Duration::from_secs(30), "seven containers", || {
        let containers = docker(&["ps", "-q", "--filter", &mine]);
        (containers.lines().count() == 7).then_some(())
    });
    let worker = eventually(Duration::from_secs(30), "the worker reaches orders", || {
        let logs = d.ok(&["logs", "worker"]);
        logs.contains("checked orders").then_some(logs)
    });
    assert!(worker.contains("open_orders"), "{worker}");

    // Once `dozen up` says Ctrl-C stops the stack (it listens for it from then on).
    eventually(Duration::from_secs(30), "up's banner", || {
        let said = std::fs::read_to_string(&log).ok()?;
        said.contains("Ctrl-C stops the stack").then_some(())
    });
    dozen_testkit::signal(up.0.id(), "INT");
    let status = eventually(
        Duration::from_secs(60),
        "dozen up exits after Ctrl-C",
        || up.0.try_wait().ok().flatten(),
    );
    assert!(status.success(), "{status}");
    gone_after_down(&d);
}

/// `dozen exec` in a container: through the engine's exec, stdout and stderr apart (or one
/// stream with a terminal), the command's exit code the CLI's.
#[test]
fn exec_runs_inside_the_container() {
    if !testapp_image() {
        return;
    }
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    d.write(
        "dozen.toml",
        &format!("name = \"exec\"\n[services.web]\nimage = \"{IMAGE}\"\n"),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    let ready = d.wait_ready("web", 1);
    let port = ready[0]["status"]["host_port"].as_u64().unwrap();
    let out = d
        .command(&["exec", "web", "--", "/testapp", "echo", "hi", "there"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi there\n");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("stderr hi there port={port}\n")
    );
    let out = d.cli(&["exec", "web", "--", "/testapp", "exit", "5"]);
    assert_eq!(out.status.code(), Some(5));
    // With a terminal: one stream, both in it.
    let both = d.ok(&[
        "exec", "-t", "web", "--", "/testapp", "echo", "on", "a", "tty",
    ]);
    assert!(
        both.contains("on a tty") && both.contains("stderr on a tty"),
        "{both}"
    );
    let out = d.cli(&["exec", "web", "--", "/no/such/program"]);
    assert!(!out.status.success());
    d.ok(&["down"]);
    gone_after_down(&d);
}

/// A container gets its secrets as files at `/run/secrets` (the same memory-backed directory
/// the agent wrote), readable by its user; and as environment variables when asked.
#[test]
fn a_container_reads_its_secrets_from_run_secrets() {
    if !testapp_image() {
        return;
    }
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    for (name, value) in [
        ("/c/file", "container-file-secret"),
        ("/c/env", "container-env-secret"),
    ] {
        let out = d.cli_with_stdin(&["param", "put", name, "--secure"], value);
        assert!(out.status.success());
    }
    d.write(
        "dozen.toml",
        &format!(
            "name = \"csec\"\n[services.files]\nimage = \"{IMAGE}\"\nsecrets = {{ S = \"/c/file\" }}\n[services.envs]\nimage = \"{IMAGE}\"\nsecrets = {{ S = \"/c/env\" }}\nsecrets_as = \"env\"\n"
        ),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    let get = |service: &str, path: &str| {
        let port = d.wait_ready(service, 1)[0]["status"]["host_port"]
            .as_u64()
            .unwrap() as u16;
        http_request(port, "localhost", path)
            .map(|r| r.body)
            .unwrap_or_default()
    };
    assert_eq!(get("files", "/env/DOZEN_SECRETS_DIR"), "/run/secrets");
    assert_eq!(get("files", "/secret/S"), "container-file-secret");
    assert!(get("files", "/secret/.token").starts_with("dzk."));
    assert_eq!(get("envs", "/env/S"), "container-env-secret");
    assert_eq!(get("envs", "/secret/S"), "");
    d.ok(&["down"]);
    gone_after_down(&d);
}

/// `dozen stats` of a container: CPU held to its limit and memory, from the engine.
#[test]
fn stats_show_what_a_container_uses_within_its_limits() {
    if !testapp_image() {
        return;
    }
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    d.write(
        "dozen.toml",
        &format!(
            "name = \"cst\"\n[services.busy]\nimage = \"{IMAGE}\"\nresources = {{ cpu = \"250m\", memory = \"256MiB\" }}\n[services.busy.env]\nSPIN = \"1\"\nALLOC_MB = \"64\"\n"
        ),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    d.wait_ready("busy", 1);
    let row = d.busy_task_stats("busy", 64 << 20);
    assert_eq!(row["driver"], "docker");
    d.ok(&["down"]);
    gone_after_down(&d);
}

/// The numbers `tick N` in `text`, in order.
fn ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.split("tick ").nth(1)?.trim().parse().ok())
        .collect()
}

/// What a container writes while no agent listens reaches its log once an agent is back:
/// every line once, none lost, none twice.
#[test]
fn output_written_while_the_agent_is_down_reaches_the_log() {
    if !testapp_image() {
        return;
    }
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    d.write(
        "dozen.toml",
        &format!("name = \"ticks\"\n[services.ticker]\nimage = \"{IMAGE}\"\n[services.ticker.env]\nTICK_MS = \"50\"\n"),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    let task = d.wait_ready("ticker", 1)[0]["task"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(Duration::from_secs(20), "ticks in the log", || {
        (ticks(&d.ok(&["logs", "ticker"])).len() >= 3).then_some(())
    });
    let container = containers_of(Some(&task)).remove(0);
    d.kill_server();
    // No agent: the container goes on writing; wait until it has written plenty.
    let log = d
        .data_dir()
        .join("agent/tasks")
        .join(&task)
        .join("output.log");
    let kept = ticks(&std::fs::read_to_string(&log).unwrap())
        .last()
        .copied()
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "ticks written while no agent listens",
        || {
            let out = std::process::Command::new("docker")
                .args(["logs", &container])
                .output()
                .ok()?;
            let engine = ticks(&String::from_utf8_lossy(&out.stdout));
            (engine.last().copied()? >= kept + 20).then_some(())
        },
    );
    d.start_server(true);
    let all = eventually(Duration::from_secs(30), "the gap filled in", || {
        let seen = ticks(&d.ok(&["logs", "ticker"]));
        (seen.last().copied()? >= kept + 30).then_some(seen)
    });
    let expected: Vec<u64> = (1..=*all.last().unwrap()).collect();
    assert_eq!(all, expected, "every tick once, in order");
    d.ok(&["down"]);
    gone_after_down(&d);
}

/// A process the test started itself, killed however the test ends.
struct EndOnDrop(std::process::Child);
impl Drop for EndOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
