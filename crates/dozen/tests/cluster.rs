//! Cluster mode end to end, on a Docker network: a 3-member etcd cluster, two API servers and
//! two agent nodes (each with its proxy), every one a container of a `FROM scratch` image.
//! dozen is built statically for it; etcd is Debian's binary with the libraries `ldd` lists.
//!
//! The API is served over TLS: servers hold the cluster CA, nodes join with one-time tokens
//! and then speak with their own certificates. The demo stack is applied across the nodes;
//! every route is read through the proxy of each node, the logs of every service are read and
//! followed through the servers; then the leading server is killed and a scale request made
//! after the kill, by a CLI given both servers, must complete on the other one.
//!
//! Needs Docker and etcd-server: fails in CI without them, skips (saying so) elsewhere.
#![cfg(feature = "etcd")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use dozen_testkit::images::docker;
use dozen_testkit::{eventually, http_request_at};
use serde_json::Value;

fn missing(what: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is needed for the cluster test in CI");
    }
    eprintln!("SKIPPED: {what} is not available");
    true
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

/// Containers and the network of one run, removed when the test ends (pass or fail).
struct Cluster {
    prefix: String,
    subnet: String,
    network: String,
    containers: Vec<String>,
    token: String,
    /// Host directory with the cluster CA (`ca.crt`, `ca.key`) and the nodes' data dirs.
    work: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in &self.containers {
                let logs = run(Command::new("docker").args(["logs", "--tail", "40", c]));
                eprintln!(
                    "--- last log lines of {c}:\n{}{}",
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                );
            }
        }
        for c in &self.containers {
            let _ = run(Command::new("docker").args(["rm", "-f", c]));
        }
        let _ = run(Command::new("docker").args(["network", "rm", &self.network]));
    }
}

impl Cluster {
    fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.subnet)
    }

    fn start(&mut self, name: &str, ip: u8, image: &str, env: &[(&str, &str)], args: &[&str]) {
        let container = format!("{}-{name}", self.prefix);
        self.run_container(&container, ip, image, env, &["-d"], args);
        self.containers.push(container);
    }

    /// Runs a container to its end (`docker run --rm`), e.g. a `dozen node join`.
    fn run_once(&self, name: &str, ip: u8, mounts: &[String], args: &[&str]) {
        let container = format!("{}-{name}", self.prefix);
        let mut extra = vec!["--rm"];
        for m in mounts {
            extra.extend(["-v", m.as_str()]);
        }
        self.run_container(&container, ip, "dozen-test/dozen:latest", &[], &extra, args);
    }

    fn run_container(
        &self,
        container: &str,
        ip: u8,
        image: &str,
        env: &[(&str, &str)],
        extra: &[&str],
        args: &[&str],
    ) {
        let ip = self.ip(ip);
        let mut cmd: Vec<String> = vec![
            "run".into(),
            "--name".into(),
            container.to_string(),
            "--hostname".into(),
            container
                .strip_prefix(&format!("{}-", self.prefix))
                .unwrap_or(container)
                .to_string(),
            "--network".into(),
            self.network.clone(),
            "--ip".into(),
            ip,
        ];
        for (k, v) in env {
            cmd.push("-e".into());
            cmd.push(format!("{k}={v}"));
        }
        cmd.extend(extra.iter().map(|a| a.to_string()));
        cmd.push(image.into());
        cmd.extend(args.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
        docker(&refs);
    }

    fn servers(&self) -> String {
        format!("https://{}:7700,https://{}:7700", self.ip(21), self.ip(22))
    }

    fn ca_dir(&self) -> PathBuf {
        self.work.path().join("ca")
    }

    /// The host's dozen CLI against `server`, trusting the cluster CA.
    fn cli_command(&self, server: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dozen"));
        cmd.args(["--server", server])
            .arg("--ca")
            .arg(self.ca_dir().join("ca.crt"))
            .env("DOZEN_CONFIG", self.work.path().join("contexts.json"))
            .args(args)
            .env("DOZEN_TOKEN", &self.token)
            .env_remove("DOZEN_DATA_DIR")
            .stdin(Stdio::null());
        cmd
    }

    fn cli(&self, server: &str, args: &[&str]) -> Output {
        run(&mut self.cli_command(server, args))
    }

    fn json(&self, server: &str, args: &[&str]) -> Option<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cli(server, &all);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }
}

/// etcd from Debian is linked against glibc: the image carries the libraries `ldd` lists.
fn etcd_image_files(etcd: &Path) -> Vec<(PathBuf, &'static str)> {
    let ldd = run(Command::new("ldd").arg(etcd));
    let mut files = vec![(etcd.to_path_buf(), "/usr/bin/etcd")];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(path) = path {
            let dest: &'static str = Box::leak(path.display().to_string().into_boxed_str());
            files.push((path, dest));
        }
    }
    files
}

fn random_byte() -> u8 {
    use std::io::Read;
    let mut b = [0u8; 1];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .unwrap();
    b[0]
}

/// Creates a network on a random private /24 (another run or network may hold one).
fn create_network(prefix: &str) -> (String, String) {
    let name = format!("{prefix}-net");
    for _ in 0..10 {
        let subnet = format!("172.30.{}", random_byte());
        let out = run(Command::new("docker").args([
            "network",
            "create",
            "--subnet",
            &format!("{subnet}.0/24"),
            &name,
        ]));
        if out.status.success() {
            return (name, subnet);
        }
    }
    panic!("cannot create a docker network for the cluster test");
}

#[test]
fn demo_stack_across_nodes_survives_losing_the_leader() {
    let docker_ok = run(Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]))
        .status
        .success();
    if !docker_ok && missing("a running Docker Engine") {
        return;
    }
    let etcd = PathBuf::from(std::env::var("DOZEN_ETCD_BIN").unwrap_or("/usr/bin/etcd".into()));
    if !etcd.exists() && missing("etcd (apt-get install etcd-server)") {
        return;
    }

    // Images.
    let bin = dozen_testkit::images::static_binaries(&["dozen", "dozen-demo"], &["etcd"]);
    dozen_testkit::images::build(
        "dozen-test/dozen:latest",
        &[
            (bin.join("dozen"), "/bin/dozen"),
            (bin.join("dozen-demo"), "/bin/dozen-demo"),
        ],
        "/bin/dozen",
    );
    dozen_testkit::images::build(
        "dozen-test/etcd:latest",
        &etcd_image_files(&etcd),
        "/usr/bin/etcd",
    );

    let prefix = format!("dozen-e2e-{}", std::process::id());
    let (network, subnet) = create_network(&prefix);
    let token = format!(
        "{:032x}",
        u128::from(random_byte()) << 100 | 0xfeed_beef_cafe
    );
    let mut cluster = Cluster {
        prefix,
        subnet,
        network,
        containers: Vec::new(),
        token,
        work: tempfile::tempdir().unwrap(),
    };
    // The cluster CA, made on the operator's machine and given to the servers.
    let made = cluster.cli(
        "https://unused:1",
        &[
            "ca",
            "init",
            "--dir",
            &cluster.ca_dir().display().to_string(),
        ],
    );
    assert!(made.status.success(), "ca init: {made:?}");

    // etcd: three members, timeouts relaxed for 2 cores.
    let initial: Vec<String> = (0..3)
        .map(|i| format!("e{i}=http://{}:2380", cluster.ip(11 + i)))
        .collect();
    let initial = initial.join(",");
    for i in 0..3u8 {
        let ip = cluster.ip(11 + i);
        let args = [
            "--name".to_string(),
            format!("e{i}"),
            "--data-dir".into(),
            "/data".into(),
            "--listen-client-urls".into(),
            "http://0.0.0.0:2379".into(),
            "--advertise-client-urls".into(),
            format!("http://{ip}:2379"),
            "--listen-peer-urls".into(),
            "http://0.0.0.0:2380".into(),
            "--initial-advertise-peer-urls".into(),
            format!("http://{ip}:2380"),
            "--initial-cluster".into(),
            initial.clone(),
            "--initial-cluster-state".into(),
            "new".into(),
            "--heartbeat-interval".into(),
            "200".into(),
            "--election-timeout".into(),
            "2000".into(),
            "--log-level".into(),
            "warn".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cluster.start(
            &format!("etcd{i}"),
            11 + i,
            "dozen-test/etcd:latest",
            &[],
            &args,
        );
    }
    let store = format!(
        "etcd://{}:2379,{}:2379,{}:2379",
        cluster.ip(11),
        cluster.ip(12),
        cluster.ip(13)
    );

    // Two servers over TLS, each given the CA directory. etcd's shortest lease here is 3 s
    // (1.5 election timeouts).
    let token = cluster.token.clone();
    // Servers of one store share its root key.
    let master_key = dozen_api::tls::random_hex(32).unwrap();
    let ca_mount = format!("{}:/ca:ro", cluster.ca_dir().display());
    for (i, ip) in [(1, 21u8), (2, 22u8)] {
        let container = format!("{}-server{i}", cluster.prefix);
        let san = cluster.ip(ip);
        cluster.run_container(
            &container,
            ip,
            "dozen-test/dozen:latest",
            &[("DOZEN_TOKEN", &token), ("DOZEN_MASTER_KEY", &master_key)],
            &["-d", "-v", &ca_mount],
            &[
                "server",
                "--ca-dir",
                "/ca",
                "--tls-san",
                &san,
                "--data-dir",
                "/data",
                "--store",
                &store,
                "--listen",
                "0.0.0.0:7700",
                "--no-agent",
                "--no-proxy",
                "--leader-ttl",
                "3s",
            ],
        );
        cluster.containers.push(container);
    }
    let servers = cluster.servers();
    eventually(Duration::from_secs(60), "both servers answer", || {
        [21u8, 22]
            .iter()
            .all(|ip| {
                let url = format!("https://{}:7700", cluster.ip(*ip));
                cluster.json(&url, &["cluster"]).is_some()
            })
            .then_some(())
    });
    // Two nodes: each joins with a one-time token (its key never leaves it), then runs an
    // agent with its proxy on its certificate alone: no operator token inside.
    for (i, ip) in [(1, 31u8), (2, 32u8)] {
        let advertise = cluster.ip(ip);
        let node_data = cluster.work.path().join(format!("node{i}"));
        std::fs::create_dir_all(&node_data).unwrap();
        let mount = format!("{}:/data", node_data.display());
        // The token names the node and the one host it may route traffic to.
        let token = cluster
            .json(
                &servers,
                &["node", "token", &format!("node{i}"), "--host", &advertise],
            )
            .expect("join token");
        cluster.run_once(
            &format!("join{i}"),
            ip + 10,
            std::slice::from_ref(&mount),
            &[
                "--server",
                &servers,
                "--data-dir",
                "/data",
                "node",
                "join",
                "--token",
                token["token"].as_str().unwrap(),
                "--ca-hash",
                token["ca_hash"].as_str().unwrap(),
                "--node-name",
                &format!("node{i}"),
            ],
        );
        let container = format!("{}-node{i}", cluster.prefix);
        cluster.run_container(
            &container,
            ip,
            "dozen-test/dozen:latest",
            &[],
            &["-d", "-v", &mount],
            &[
                "--server",
                &servers,
                "agent",
                "--data-dir",
                "/data",
                "--node-name",
                &format!("node{i}"),
                "--agent-listen",
                "0.0.0.0:7701",
                "--advertise-host",
                &advertise,
                "--with-proxy",
                "--proxy-listen",
                "0.0.0.0:7780",
                "--proxy-internal-listen",
                "127.0.0.1:7781",
                "--port-range",
                "20000-20999",
            ],
        );
        cluster.containers.push(container);
    }
    eventually(Duration::from_secs(90), "both nodes registered", || {
        let nodes = cluster.json(&servers, &["nodes"])?;
        (nodes.as_array()?.len() == 2).then_some(())
    });

    // The demo stack, its binary inside the image (exec form: a scratch image has no shell).
    let mut demo = std::fs::read_to_string(
        dozen_testkit::images::workspace_root().join("examples/demo/dozen.toml"),
    )
    .unwrap()
    .replace("WORK_EVERY_MS = \"5000\"", "WORK_EVERY_MS = \"300\"");
    for role in ["web", "catalog", "orders", "worker"] {
        demo = demo.replace(
            &format!("\"./target/release/dozen-demo {role}\""),
            &format!("[\"/bin/dozen-demo\", \"{role}\"]"),
        );
    }
    assert!(
        !demo.contains("command = \"./target"),
        "every command rewritten: {demo}"
    );
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("dozen.toml");
    std::fs::write(&stack, demo).unwrap();
    let applied = cluster.cli(
        &servers,
        &[
            "apply",
            "-f",
            &stack.display().to_string(),
            "--timeout",
            "120s",
        ],
    );
    assert!(
        applied.status.success(),
        "apply failed: {}{}",
        String::from_utf8_lossy(&applied.stdout),
        String::from_utf8_lossy(&applied.stderr)
    );

    // Tasks run on both nodes.
    let ps = cluster.json(&servers, &["ps"]).expect("ps");
    let nodes: std::collections::BTreeSet<&str> = ps["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["node"].as_str())
        .collect();
    assert_eq!(nodes.len(), 2, "tasks should spread over both nodes: {ps}");

    // Every route through the proxy of each node (web calls catalog and orders through the
    // node's internal proxy, so its page crosses nodes too).
    for node_ip in [cluster.ip(31), cluster.ip(32)] {
        let proxy = format!("{node_ip}:7780");
        for (path, expect) in [
            ("/", "dozen demo shop"),
            ("/api/catalog", "teapot"),
            ("/api/orders", "open_orders"),
        ] {
            let what = format!("GET {path} through the proxy at {proxy}");
            let body = eventually(Duration::from_secs(30), &what, || {
                let r = http_request_at(&proxy, "demo.local", path)?;
                (r.status == 200 && r.body.contains(expect)).then_some(r.body)
            });
            assert!(!body.is_empty(), "{what}: empty body");
        }
    }

    // The logs of every service, fanned out through the agents of both nodes.
    for service in ["web", "catalog", "orders", "worker"] {
        eventually(
            Duration::from_secs(30),
            &format!("logs of {service}"),
            || {
                let out = cluster.cli(&servers, &["logs", service, "-o", "json"]);
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let lines: Vec<Value> = text
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                let wanted = if service == "worker" {
                    "checked orders"
                } else {
                    ""
                };
                lines
                    .iter()
                    .any(|l| {
                        l["service"] == service
                            && l["line"].as_str().is_some_and(|s| s.contains(wanted))
                    })
                    .then_some(())
            },
        );
    }

    // Following logs: a line the worker writes after the command started reaches it, over
    // mTLS from the agent of the worker's node.
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut follow = cluster.cli_command(&servers, &["logs", "worker", "-f", "-o", "json"]);
    let mut follower = follow
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dozen logs -f");
    let lines = std::io::BufReader::new(follower.stdout.take().unwrap());
    let (line_tx, line_rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in lines.lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if line_tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = line_rx.recv_timeout(left) else {
            let _ = follower.kill();
            panic!("`dozen logs -f worker` showed no line written after it started within 30 s");
        };
        if line["service"] == "worker" && line["ts_ms"].as_u64() > Some(started_ms) {
            break;
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();

    // Kill the leading server; a scale request made after the kill completes on the other,
    // with the CLI given both servers, the dead one first.
    let (leader_container, leader_url, survivor) =
        eventually(Duration::from_secs(30), "a leader", || {
            for (i, ip) in [(1, 21u8), (2, 22u8)] {
                let url = format!("https://{}:7700", cluster.ip(ip));
                let info = cluster.json(&url, &["cluster"])?;
                if info["leader"] == info["server"] {
                    let other = if ip == 21 { 22 } else { 21 };
                    return Some((
                        format!("{}-server{i}", cluster.prefix),
                        url,
                        format!("https://{}:7700", cluster.ip(other)),
                    ));
                }
            }
            None
        });
    docker(&["kill", &leader_container]);
    let scaled = cluster.cli(
        &format!("{leader_url},{survivor}"),
        &["scale", "web=3", "--wait", "--timeout", "60s"],
    );
    assert!(
        scaled.status.success(),
        "scale after killing the leader did not complete: {}{}",
        String::from_utf8_lossy(&scaled.stdout),
        String::from_utf8_lossy(&scaled.stderr)
    );
    let info = cluster.json(&survivor, &["cluster"]).expect("cluster info");
    assert_eq!(info["leader"], info["server"], "the survivor leads now");
    // The new task serves through the proxies too.
    for node_ip in [cluster.ip(31), cluster.ip(32)] {
        let proxy = format!("{node_ip}:7780");
        eventually(Duration::from_secs(30), "the shop after failover", || {
            let r = http_request_at(&proxy, "demo.local", "/")?;
            (r.status == 200).then_some(())
        });
    }
}
