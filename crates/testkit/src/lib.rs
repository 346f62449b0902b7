//! Test harness for end-to-end tests: the real `dozen` binary in a temp dir, driven through its
//! CLI, with an eventually-helper instead of sleeps, and cleanup of every task it started.
#![forbid(unsafe_code)]

mod http;
pub mod images;
mod processes;

pub use http::*;
pub use processes::end_tasks_under;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Polls `f` every 50 ms until it returns `Some`, failing the test with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls the future `f` makes every 50 ms until it gives `Some`, failing the test with `what`
/// after `timeout`: the async twin of [`eventually`].
pub async fn eventually_async<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A block of 50 host ports for one installation's tasks, disjoint from other tests' by
/// chance (the agent reserves each port with its task; nothing is bound here), and below the
/// kernel's ephemeral range (32768 and up), so no outgoing connection's port takes one.
pub fn random_port_range() -> (u16, u16) {
    let block = (random_u32() % 200) as u16;
    let lo = 20000 + block * 50;
    (lo, lo + 49)
}

/// A loopback address of its own (`127.a.b.c`) for servers whose ports must be known before
/// they start (etcd members name each other): fixed ports on an address no other test uses.
pub fn random_loopback() -> String {
    let r = random_u32();
    format!(
        "127.{}.{}.{}",
        1 + (r % 250),
        1 + ((r >> 8) % 250),
        1 + ((r >> 16) % 250)
    )
}

/// The `name=ADDRESS` field of the first line containing `marker` at or after byte `from` of
/// the log at `path`.
pub fn logged_address(path: &Path, from: u64, marker: &str, name: &str) -> Option<String> {
    let log = std::fs::read(path).ok()?;
    let log = String::from_utf8_lossy(log.get(from as usize..)?);
    let line = log.lines().find(|l| l.contains(marker))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .map(|v| v.trim_matches('"').to_string())
}

fn port_of(address: &str) -> Option<u16> {
    address
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse()
        .ok()
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    u32::from_le_bytes(b)
}

/// Sends a signal with the `kill` command (no unsafe code in tests).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status();
}

/// Sends a signal to a whole process group.
pub fn signal_group(pgid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args(["-s", sig, "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

/// The URL in a `dozen server` log's "dozen server listening" line (a server started with
/// `--listen 127.0.0.1:0` says there which port it got).
pub fn listening_url(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("dozen server listening"))?;
    let url = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("url="))?;
    Some(url.trim_matches('"').to_string())
}

pub fn process_alive(pid: u32) -> bool {
    // A zombie counts as dead.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = &s[s.rfind(')')? + 2..];
            after
                .split_whitespace()
                .next()
                .map(|st| st != "Z" && st != "X")
        })
        .unwrap_or(false)
}

/// The status and body of `curl -w '\n%{http_code}'`'s output.
pub fn code_and_body(out: &std::process::Output) -> (u16, String) {
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no status line in curl's output: {text}"));
    (code.trim().parse().unwrap(), body.to_string())
}

/// A small tmpfs of its own (unmounted on drop); `None`, saying so, where mounting is not
/// allowed outside CI.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            if std::env::var_os("CI").is_some() {
                panic!("cannot mount a tmpfs: CI runs as root and must be able to");
            }
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(SmallDisk { dir })
    }

    /// Fills what is left with a file; removing it frees the space again.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// One dozen installation in a temp dir: its data dir, server address and processes.
pub struct Dozen {
    pub bin: PathBuf,
    /// The loopback address its server and proxy listen on.
    pub host: String,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Host ports handed to this installation's tasks (disjoint per test, by chance).
    pub port_range: (u16, u16),
    pub server: Option<Child>,
    pub agents: Vec<Child>,
    /// The in-process proxy's public and internal ports.
    pub proxy_port: u16,
    pub proxy_internal_port: u16,
    /// Pin `start_proxy`'s proxies to these cores (`taskset -c`), e.g. "0".
    pub proxy_cores: Option<&'static str>,
    /// More arguments for `dozen server`.
    pub server_args: Vec<String>,
    /// More environment for `dozen server` (`DOCKER_HOST`, say).
    pub server_env: Vec<(String, String)>,
    /// More arguments for the next `dozen agent` started.
    pub agent_args: Vec<String>,
    pub proxies: Vec<Child>,
}

impl Dozen {
    /// Ports are 0 until the server first starts: it listens on port 0 and the log says
    /// which port it got; a restarted server asks for the same ports again, as a real one
    /// configured with them would.
    pub fn new(bin: &str) -> Dozen {
        Dozen {
            bin: PathBuf::from(bin),
            host: "127.0.0.1".into(),
            dir: tempfile::tempdir().expect("temp dir"),
            port: 0,
            port_range: random_port_range(),
            server: None,
            agents: Vec::new(),
            proxy_port: 0,
            proxy_cores: None,
            proxy_internal_port: 0,
            server_args: Vec::new(),
            server_env: Vec::new(),
            agent_args: Vec::new(),
            proxies: Vec::new(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// For commands that are given their addresses up front (`dozen up`, `up -d`): the usual
    /// ports, on a loopback address of this installation's own, so nothing is bound to learn
    /// a free port.
    pub fn use_fixed_ports_on_own_address(&mut self) {
        self.host = random_loopback();
        self.port = 7700;
        self.proxy_port = 7780;
        self.proxy_internal_port = 7781;
    }

    /// `ip:port` of the public proxy listener.
    pub fn proxy_address(&self) -> String {
        format!("{}:{}", self.host, self.proxy_port)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, content).expect("write file");
        p
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))
            .expect("log file")
    }

    /// Starts `dozen server` (with its own agent unless `with_agent` is false) and waits until
    /// it answers.
    pub fn start_server(&mut self, with_agent: bool) {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("server")
            .arg("--listen")
            .arg(format!("{}:{}", self.host, self.port))
            .arg("--port-range")
            .arg(format!("{}-{}", self.port_range.0, self.port_range.1))
            .arg("--node-name")
            .arg("node-a")
            .arg("--proxy-listen")
            .arg(format!("{}:{}", self.host, self.proxy_port))
            .arg("--proxy-internal-listen")
            .arg(format!("{}:{}", self.host, self.proxy_internal_port))
            .env("DOZEN_DATA_DIR", self.data_dir())
            // The harness reads the listening addresses from these text lines.
            .env("DOZEN_LOG", "info")
            .env("DOZEN_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(self.log_file("server.log"))
            .stderr(self.log_file("server.log"));
        if !with_agent {
            cmd.arg("--no-agent");
        }
        cmd.args(&self.server_args);
        cmd.envs(self.server_env.iter().map(|(k, v)| (k, v)));
        let log = self.dir.path().join("server.log");
        let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        self.server = Some(cmd.spawn().expect("spawn dozen server"));
        let url = eventually(
            Duration::from_secs(20),
            "the server says where it listens",
            || logged_address(&log, from, "dozen server listening", "url"),
        );
        self.port = port_of(&url).expect("a port in the server's URL");
        let with_proxy = !self.server_args.iter().any(|a| a == "--no-proxy");
        if with_proxy {
            let (public, internal) = eventually(
                Duration::from_secs(20),
                "the server's proxy says where it listens",
                || {
                    let public = logged_address(&log, from, "proxy listening", "public_address")?;
                    let internal =
                        logged_address(&log, from, "proxy listening", "internal_address")?;
                    Some((port_of(&public)?, port_of(&internal)?))
                },
            );
            self.proxy_port = public;
            self.proxy_internal_port = internal;
        }
        let address = format!("{}:{}", self.host, self.port);
        eventually(Duration::from_secs(20), "server answers /healthz", || {
            http_request_at(&address, "localhost", "/healthz").filter(|r| r.status == 200)
        });
    }

    /// The server with its agent and no proxy (most tests reach tasks directly).
    pub fn start_without_proxy(&mut self) {
        self.server_args.push("--no-proxy".into());
        self.start_server(true);
    }

    /// Starts `dozen agent` as its own process, with its own data dir.
    pub fn start_agent(&mut self, name: &str) -> u32 {
        let token = self.token();
        let child = Command::new(&self.bin)
            .arg("agent")
            .arg("--server")
            .arg(self.url())
            .arg("--port-range")
            .arg(format!("{}-{}", self.port_range.0, self.port_range.1))
            .arg("--node-name")
            .arg(name)
            .arg("--proxy-internal-url")
            .arg(format!("http://127.0.0.1:{}", self.proxy_internal_port))
            .args(std::mem::take(&mut self.agent_args))
            .env("DOZEN_TOKEN", token)
            .env(
                "DOZEN_DATA_DIR",
                self.dir.path().join(format!("agent-{name}")),
            )
            .stdin(Stdio::null())
            .stdout(self.log_file(&format!("agent-{name}.log")))
            .stderr(self.log_file(&format!("agent-{name}.log")))
            .spawn()
            .expect("spawn dozen agent");
        let pid = child.id();
        self.agents.push(child);
        let dozen = &*self;
        eventually(Duration::from_secs(20), "agent registers", || {
            let nodes = dozen.json(&["nodes"]);
            nodes
                .as_array()?
                .iter()
                .any(|n| n["node"]["name"] == name)
                .then_some(())
        });
        pid
    }

    /// Starts `dozen proxy` as its own process; returns its (public, internal) ports once it
    /// has registered.
    pub fn start_proxy(&mut self, id: &str) -> (u16, u16) {
        let log = self.dir.path().join(format!("proxy-{id}.log"));
        let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        // `taskset -c CORES dozen proxy ...` when the proxy is to be pinned.
        let mut command = match self.proxy_cores {
            Some(cores) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cores]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = command
            .arg("proxy")
            .arg("--server")
            .arg(self.url())
            .arg("--id")
            .arg(id)
            .arg("--proxy-listen")
            .arg(format!("{}:0", self.host))
            .arg("--proxy-internal-listen")
            .arg(format!("{}:0", self.host))
            .env("DOZEN_TOKEN", self.token())
            // The harness reads the listening addresses from these text lines.
            .env("DOZEN_LOG", "info")
            .env("DOZEN_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(self.log_file(&format!("proxy-{id}.log")))
            .stderr(self.log_file(&format!("proxy-{id}.log")))
            .spawn()
            .expect("spawn dozen proxy");
        self.proxies.push(child);
        let (public, internal) = eventually(
            Duration::from_secs(20),
            "the proxy says where it listens",
            || {
                let public = logged_address(&log, from, "proxy listening", "public_address")?;
                let internal = logged_address(&log, from, "proxy listening", "internal_address")?;
                Some((port_of(&public)?, port_of(&internal)?))
            },
        );
        let dozen = &*self;
        eventually(Duration::from_secs(20), "proxy registers", || {
            let p = dozen.json(&["proxies"]);
            p["items"]
                .as_array()?
                .iter()
                .any(|x| x["id"] == id)
                .then_some(())
        });
        (public, internal)
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("token"))
            .expect("token file")
            .trim()
            .to_string()
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill_server(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }

    pub fn kill_proxies(&mut self) {
        for mut p in self.proxies.drain(..) {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    pub fn kill_agents(&mut self) {
        for mut a in self.agents.drain(..) {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// The CLI against this installation, to spawn (for output read as it comes).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .args(args)
            .current_dir(self.dir.path())
            .env("DOZEN_SERVER", self.url())
            .env("DOZEN_DATA_DIR", self.data_dir())
            .env_remove("DOZEN_TOKEN")
            .stdin(Stdio::null());
        command
    }

    /// Runs the CLI against this installation.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run dozen")
    }

    /// Runs the CLI with `stdin` as its input (a secret's value, never an argument).
    pub fn cli_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run dozen");
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("run dozen")
    }

    /// Runs the CLI and insists it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`dozen {}` failed ({}):\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `-o json` and parses its output (Null if it failed).
    pub fn json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        let out = self.cli(&full);
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// `ps -o json` tasks of `service` (service replicas only).
    pub fn tasks(&self, service: &str) -> Vec<Value> {
        let ps = self.json(&["ps"]);
        ps["tasks"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter(|t| t["service"] == service && t["oneoff"] == false)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Tasks of `service` that run the current generation, healthy.
    pub fn ready_tasks(&self, service: &str) -> Vec<Value> {
        self.tasks(service)
            .into_iter()
            .filter(|t| {
                t["desired"] == "run"
                    && t["status"]["state"] == "running"
                    && t["status"]["healthy"] == true
                    && t["status"]["generation"] == t["generation"]
            })
            .collect()
    }

    /// Waits until `service` has exactly `n` tasks, all ready; returns them.
    pub fn wait_ready(&self, service: &str, n: usize) -> Vec<Value> {
        eventually(
            Duration::from_secs(60),
            &format!("{n} ready tasks of {service}"),
            || {
                let all = self.tasks(service);
                let ready = self.ready_tasks(service);
                (all.len() == n && ready.len() == n).then_some(ready)
            },
        )
    }

    /// `dozen up -f FILE` in the foreground, on this installation's ports and data dir.
    pub fn up_command(&self, file: &str) -> Command {
        let mut up = Command::new(&self.bin);
        up.args(["up", "-f", file, "--node-name", "node-a"])
            .arg("--listen")
            .arg(format!("{}:{}", self.host, self.port))
            .args(["--proxy-listen", &self.proxy_address()])
            .arg("--proxy-internal-listen")
            .arg(format!("{}:{}", self.host, self.proxy_internal_port))
            .arg("--port-range")
            .arg(format!("{}-{}", self.port_range.0, self.port_range.1))
            .current_dir(self.dir.path())
            .env("DOZEN_DATA_DIR", self.data_dir())
            .stdin(Stdio::null());
        up
    }

    /// `dozen stats` of `service`'s one task, which keeps a core busy under `cpu = "250m"`:
    /// checks its CPU is held to about a quarter core and its memory is at least
    /// `memory_at_least` bytes; returns the row.
    pub fn busy_task_stats(&self, service: &str, memory_at_least: u64) -> Value {
        let rows = eventually(Duration::from_secs(30), "stats with a CPU rate", || {
            let rows = self.json(&["stats", service, "--interval", "2s"]);
            (rows[0]["cpu_percent"].as_f64()? > 5.0).then_some(rows)
        });
        let row = rows[0].clone();
        // A quarter of a core at most, though the task would take a whole one.
        assert!(row["cpu_percent"].as_f64().unwrap() < 40.0, "{rows}");
        assert!(
            row["memory_bytes"].as_u64().unwrap() >= memory_at_least,
            "{rows}"
        );
        let table = self.ok(&["stats", service]);
        assert!(table.contains("CPU") && table.contains(" MiB"), "{table}");
        row
    }

    /// Every process started under this installation's shims: (shim pid, task pid).
    pub fn shim_processes(&self) -> Vec<(u32, Option<u32>)> {
        shim_processes_under(self.dir.path())
    }
}

/// The live shims (and their tasks) of every agent data dir under `root`.
pub fn shim_processes_under(root: &Path) -> Vec<(u32, Option<u32>)> {
    let mut out = Vec::new();
    for tasks in task_dirs(root) {
        let read = |f: &str| -> Option<u32> {
            std::fs::read_to_string(tasks.join(f))
                .ok()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        if let Some(shim) = read("shim.pid").filter(|p| process_alive(*p)) {
            out.push((shim, read("task.pid").filter(|p| process_alive(*p))));
        }
    }
    out
}

/// The home ids of every agent data dir under `root` (their `home-id` files).
pub(crate) fn agent_homes(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(id) = std::fs::read_to_string(dir.join("home-id")) {
            out.push(id.trim().to_string());
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    out
}

fn task_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.join("launch.json").exists() {
                    out.push(p);
                } else {
                    stack.push(p);
                }
            }
        }
    }
    out
}

impl Drop for Dozen {
    fn drop(&mut self) {
        self.kill_server();
        self.kill_agents();
        self.kill_proxies();
        end_tasks_under(self.dir.path());
        remove_secrets_under(self.dir.path());
    }
}

/// Removes the task secrets that agents with data dirs under `root` keep on `/dev/shm` (an
/// agent killed with its tasks cannot): each agent's directory there names its data dir in
/// `.data-dir`.
pub fn remove_secrets_under(root: &Path) {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with("dozen-") {
            continue;
        }
        let Ok(owner) = std::fs::read(e.path().join(".data-dir")) else {
            continue;
        };
        let owner = std::path::PathBuf::from(String::from_utf8_lossy(&owner).into_owned());
        if owner.starts_with(root) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A 3-member etcd cluster on loopback (Debian's `etcd-server`; `DOZEN_ETCD_BIN` overrides),
/// with timeouts relaxed for a 2-core machine. Killed when dropped.
pub struct EtcdCluster {
    pub members: Vec<Child>,
    /// `http://127.a.b.c:PORT`, one per member.
    pub endpoints: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

impl EtcdCluster {
    /// Starts the members (not waiting for a leader). Without an etcd binary: panics in CI,
    /// and elsewhere says it skips and returns `None`.
    pub fn start() -> Option<EtcdCluster> {
        let bin = std::env::var("DOZEN_ETCD_BIN").ok().or_else(|| {
            ["/usr/bin/etcd", "/usr/local/bin/etcd"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .map(String::from)
        });
        let Some(bin) = bin else {
            if std::env::var_os("CI").is_some() {
                panic!("etcd is not installed: CI must install etcd-server (see .ci/run)");
            }
            eprintln!("SKIPPED: no etcd binary (install etcd-server or set DOZEN_ETCD_BIN)");
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        // Members name each other before they start, so their ports are fixed: on an address
        // of this cluster's own.
        let host = random_loopback();
        let ports: Vec<(u16, u16)> = (0..3u16).map(|i| (2379 + 10 * i, 2380 + 10 * i)).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://{host}:{peer}"))
            .collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data = dir.path().join(format!("m{i}"));
            let child = Command::new(&bin)
                .args(["--name", &format!("m{i}")])
                .args(["--data-dir", &data.display().to_string()])
                .args(["--listen-client-urls", &format!("http://{host}:{client}")])
                .args([
                    "--advertise-client-urls",
                    &format!("http://{host}:{client}"),
                ])
                .args(["--listen-peer-urls", &format!("http://{host}:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://{host}:{peer}"),
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--heartbeat-interval", "200", "--election-timeout", "2000"])
                .args(["--log-level", "error"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start etcd");
            members.push(child);
        }
        let endpoints = ports
            .iter()
            .map(|(c, _)| format!("http://{host}:{c}"))
            .collect();
        Some(EtcdCluster {
            members,
            endpoints,
            _dir: dir,
        })
    }
}

/// A process's peak resident memory (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024
}
