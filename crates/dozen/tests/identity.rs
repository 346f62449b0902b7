//! Identity on the wire, with real processes over TLS on loopback: a cluster CA, a server
//! serving HTTPS, nodes joining with one-time tokens, and the refusals: a node whose
//! certificate another CA signed, a revoked node, an operator without a token, plain HTTP
//! off loopback. Each refusal is logged, and nothing else in the cluster is disturbed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use dozen_testkit::{eventually, listening_url, random_port_range};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dozen");

struct Site {
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Drop for Site {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Site {
    fn new() -> Site {
        Site {
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(self.dir.path())
            // No user contexts file leaks into the test.
            .env("DOZEN_CONFIG", self.path("contexts.json"))
            .env_remove("DOZEN_SERVER")
            .env_remove("DOZEN_TOKEN")
            .env_remove("DOZEN_DATA_DIR")
            .env_remove("DOZEN_CA")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run dozen")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "dozen {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn spawn(&mut self, args: &[&str], log: &str) {
        let file = std::fs::File::create(self.path(log)).unwrap();
        let child = self
            .command(args)
            .env("DOZEN_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn dozen");
        self.children.push(child);
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

/// A CA, a token file and a TLS server on loopback; returns the server URL.
fn start_server(site: &mut Site, name: &str) -> String {
    let ca_dir = site.path(&format!("{name}-ca"));
    site.ok(&["ca", "init", "--dir", ca_dir.to_str().unwrap()]);
    std::fs::write(
        site.path(&format!("{name}-token")),
        format!("{name}-operator-token-0123456789abcdef"),
    )
    .unwrap();
    let data = site.path(&format!("{name}-data"));
    site.spawn(
        &[
            "server",
            "--data-dir",
            data.to_str().unwrap(),
            // Port 0: the server picks a free one and logs it, so no other test can take it
            // between our choosing and its binding.
            "--listen",
            "127.0.0.1:0",
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--token-file",
            site.path(&format!("{name}-token")).to_str().unwrap(),
            "--no-agent",
            "--no-proxy",
            "--node-ttl",
            "3s",
        ],
        &format!("{name}.log"),
    );
    eventually(Duration::from_secs(20), "the TLS server answers", || {
        listening_url(&site.log(&format!("{name}.log")))
    })
}

fn operator(site: &Site, name: &str, url: &str, args: &[&str]) -> Output {
    let ca = site.path(&format!("{name}-ca/ca.crt"));
    let token = std::fs::read_to_string(site.path(&format!("{name}-token"))).unwrap();
    let mut all = vec![
        "--server",
        url,
        "--ca",
        ca.to_str().unwrap(),
        "--token",
        &token,
    ];
    all.extend_from_slice(args);
    site.run(&all)
}

fn operator_json(site: &Site, name: &str, url: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = operator(site, name, url, &all);
    assert!(
        out.status.success(),
        "operator {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// `dozen node token` + `dozen node join` for `node`, with its own data dir; the token goes
/// through the environment, as `dozen node token` says. Returns the data dir and the token.
fn join(site: &Site, name: &str, url: &str, node: &str) -> (PathBuf, String) {
    let made = operator_json(site, name, url, &["node", "token", node, "--ttl", "10m"]);
    let token = made["token"].as_str().unwrap().to_string();
    let data = site.path(&format!("{node}-data"));
    let out = site
        .command(&[
            "--server",
            url,
            "--data-dir",
            data.to_str().unwrap(),
            "node",
            "join",
            "--ca-hash",
            made["ca_hash"].as_str().unwrap(),
            "--node-name",
            node,
        ])
        .env("DOZEN_JOIN_TOKEN", &token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "join {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (data, token)
}

/// The TLS client of a joined node: its certificate from `dozen node join`, the pinned CA.
fn node_tls(data: &Path) -> dozen_api::tls::ClientConfig {
    let read = |file: &str| std::fs::read_to_string(data.join("node").join(file)).unwrap();
    dozen_api::tls::client_config(
        &read("ca.crt"),
        Some((&read("node.crt"), &read("node.key"))),
    )
    .unwrap()
}

/// Calls the API as a node: its certificate from `dozen node join`, no token.
fn as_node(data: &Path, url: &str, method: &str, path: &str, body: Option<Value>) -> u16 {
    let tls = node_tls(data);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = client.request(method, format!("{url}{path}"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        request
            .send()
            .await
            .expect("the server answers")
            .status()
            .as_u16()
    })
}

/// Opens `node`'s assignment watch with its certificate, in a thread that ends when the server
/// ends the stream.
fn watch_as_node(data: &Path, url: &str, node: &str) -> std::thread::JoinHandle<()> {
    let tls = node_tls(data);
    let path = dozen_api::paths::fill(dozen_api::paths::NODE_ASSIGNMENTS, &[node]);
    let url = format!("{url}{path}?watch=true&revision=1");
    let (opened, is_open) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let client = reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .build()
                .unwrap();
            let mut resp = client.get(url).send().await.expect("the watch opens");
            assert_eq!(resp.status(), 200);
            let _ = opened.send(());
            while let Ok(Some(_)) = resp.chunk().await {}
        })
    });
    is_open
        .recv_timeout(Duration::from_secs(10))
        .expect("the watch opened");
    thread
}

fn start_agent(site: &mut Site, url: &str, data: &Path, node: &str) {
    let range = {
        let (lo, hi) = random_port_range();
        format!("{lo}-{hi}")
    };
    site.spawn(
        &[
            "--server",
            url,
            "--data-dir",
            data.to_str().unwrap(),
            "agent",
            "--agent-listen",
            "127.0.0.1:0",
            "--port-range",
            &range,
        ],
        &format!("agent-{node}.log"),
    );
}

/// The nodes that are up (heartbeats arriving).
fn node_names(site: &Site, name: &str, url: &str) -> Vec<String> {
    operator_json(site, name, url, &["nodes"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "up")
        .filter_map(|n| n["node"]["name"].as_str().map(String::from))
        .collect()
}

#[test]
fn nodes_join_with_tokens_and_bad_credentials_are_refused_and_logged() {
    let mut site = Site::new();
    let url = start_server(&mut site, "main");

    // `dozen node token` prints a join command that keeps the token out of argv.
    let printed = operator(&site, "main", &url, &["node", "token", "n9"]);
    let printed = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(
        printed.contains("DOZEN_JOIN_TOKEN=")
            && !printed.contains("--token")
            && printed.contains("--node-name n9"),
        "{printed}"
    );
    // A token is for one node: making one without a name is refused, saying so.
    let unnamed = operator(&site, "main", &url, &["node", "token"]);
    assert!(!unnamed.status.success());

    // Two nodes join and run their agents on certificates alone (no token given).
    let (n1, n1_token) = join(&site, "main", &url, "n1");
    let (n2, n2_token) = join(&site, "main", &url, "n2");
    start_agent(&mut site, &url, &n1, "n1");
    start_agent(&mut site, &url, &n2, "n2");
    eventually(Duration::from_secs(20), "both nodes registered", || {
        let names = node_names(&site, "main", &url);
        (names.contains(&"n1".to_string()) && names.contains(&"n2".to_string())).then_some(())
    });

    // A node's certificate opens its own routes only: not another node's, not an operator's,
    // not its own revocation; and it cannot point servers at a plain-HTTP address (where they
    // would have to show a token).
    assert_eq!(
        as_node(&n2, &url, "GET", "/v1/nodes/n2/assignments", None),
        200
    );
    for (method, path) in [
        ("GET", "/v1/nodes/n1/assignments"),
        ("POST", "/v1/nodes/n1/heartbeat"),
        ("POST", "/v1/nodes/n2/revoke"),
        ("GET", "/v1/nodes"),
        ("POST", "/v1/join-tokens"),
        ("GET", "/v1/logs"),
    ] {
        let body = (method == "POST").then(|| serde_json::json!({}));
        assert_eq!(
            as_node(&n2, &url, method, path, body),
            403,
            "n2's certificate on {method} {path}"
        );
    }
    let mut record = operator_json(&site, "main", &url, &["nodes"])
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"]["name"] == "n2")
        .unwrap()["node"]
        .clone();
    // Seen: a node could register any host, and proxies would send public traffic there. It
    // may claim only the host fixed when it joined (here the address it joined from).
    let mut elsewhere = record.clone();
    elsewhere["host"] = Value::from("10.9.9.9");
    assert_eq!(
        as_node(
            &n2,
            &url,
            "POST",
            "/v1/nodes/n2/register",
            Some(serde_json::json!({ "node": elsewhere }))
        ),
        403
    );
    assert!(site
        .log("main.log")
        .lines()
        .any(|l| l.contains("refused a node's host claim") && l.contains("10.9.9.9")));
    record["address"] = Value::from("http://127.0.0.1:1");
    let body = serde_json::json!({ "node": record });
    assert_eq!(
        as_node(&n2, &url, "POST", "/v1/nodes/n2/register", Some(body)),
        400
    );
    let log = site.log("main.log");
    assert!(
        log.lines().any(|l| l.contains("refused a node certificate")
            && l.contains("node=n2")
            && l.contains("/v1/nodes/n1/assignments")),
        "{log}"
    );

    // A join token works once.
    let made = operator_json(&site, "main", &url, &["node", "token", "once"]);
    let args = |data: &str| {
        vec![
            "--server".to_string(),
            url.clone(),
            "--data-dir".into(),
            site.path(data).display().to_string(),
            "node".into(),
            "join".into(),
            "--token".into(),
            made["token"].as_str().unwrap().to_string(),
            "--ca-hash".into(),
            made["ca_hash"].as_str().unwrap().to_string(),
            "--node-name".into(),
            "once".into(),
        ]
    };
    let first: Vec<String> = args("once-a");
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    site.ok(&first);
    let second: Vec<String> = args("once-b");
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    let again = site.run(&second);
    assert!(!again.status.success(), "a join token is good for one join");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("unknown, used or expired"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // A wrong CA hash: the joining node refuses to send its token.
    let mut wrong = first.clone();
    let hash_at = wrong.len() - 3;
    wrong[hash_at] = "sha256:00";
    let out = site.run(&wrong);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the --ca-hash"));

    // A node whose certificate another cluster's CA signed is refused at the handshake, by
    // the server, for its certificate: it trusts main's CA, so nothing else stops it.
    let other = start_server(&mut site, "other");
    let (stranger, _) = join(&site, "other", &other, "stranger");
    std::fs::copy(
        site.path("main-ca/ca.crt"),
        stranger.join("node").join("ca.crt"),
    )
    .unwrap();
    start_agent(&mut site, &url, &stranger, "stranger");
    eventually(
        Duration::from_secs(20),
        "the stranger's refusal logged",
        || {
            site.log("main.log")
                .lines()
                .any(|l| l.contains("refused a TLS connection") && l.contains("peer certificate"))
                .then_some(())
        },
    );
    assert!(!node_names(&site, "main", &url).contains(&"stranger".to_string()));

    // An operator without a token, or with a wrong one, is refused, and that is logged.
    let ca = site.path("main-ca/ca.crt");
    let out = site.run(&["--server", &url, "--ca", ca.to_str().unwrap(), "nodes"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no API token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = site.run(&[
        "--server",
        &url,
        "--ca",
        ca.to_str().unwrap(),
        "--token",
        "not-the-token-at-all",
        "nodes",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing or wrong API token"));
    assert!(site
        .log("main.log")
        .contains("refused request without a valid token"));

    // Revoke n1: its open assignment watch ends at once (bookmarks alone would keep it open),
    // and its agent is refused from its next call on; n2 and operators carry on.
    let watch = watch_as_node(&n1, &url, "n1");
    let revoked = operator_json(&site, "main", &url, &["node", "revoke", "n1"]);
    assert_eq!(revoked["serials"].as_array().unwrap().len(), 1);
    eventually(Duration::from_secs(3), "n1's open watch closed", || {
        watch.is_finished().then_some(())
    });
    assert!(
        site.log("main.log")
            .contains("closed the watch of a revoked node certificate"),
        "the server says why it closed the watch"
    );
    eventually(Duration::from_secs(20), "n1's refusal logged", || {
        let log = site.log("main.log");
        log.lines()
            .any(|l| l.contains("refused a node certificate") && l.contains("node=n1"))
            .then_some(())
    });
    eventually(Duration::from_secs(20), "n1 down, n2 still up", || {
        let names = node_names(&site, "main", &url);
        (!names.contains(&"n1".to_string()) && names.contains(&"n2".to_string())).then_some(())
    });
    // Its proxy's access lines carry request ids and timings, which may spell 403.
    let n2_log: String = site
        .log("agent-n2.log")
        .lines()
        .filter(|l| !l.contains(" access "))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !n2_log.contains("403") && !n2_log.contains("revoked"),
        "n2 was not disturbed: {n2_log}"
    );

    // A token joins the node it was made for, no other (seen: a joiner could take an existing
    // node's name and read its assignments). A name is one node's: joining as n2 while n2
    // holds a live certificate is refused too. Neither refusal spends the token; n1's name,
    // revoked, can be joined again.
    let made = operator_json(
        &site,
        "main",
        &url,
        &["node", "token", "n1", "--ttl", "10m"],
    );
    let for_n2 = operator_json(
        &site,
        "main",
        &url,
        &["node", "token", "n2", "--ttl", "10m"],
    );
    let join_as = |node: &str, token: &str| {
        site.command(&[
            "--server",
            &url,
            "--data-dir",
            site.path(&format!("{node}-again")).to_str().unwrap(),
            "node",
            "join",
            "--ca-hash",
            made["ca_hash"].as_str().unwrap(),
            "--node-name",
            node,
        ])
        .env("DOZEN_JOIN_TOKEN", token)
        .output()
        .unwrap()
    };
    let refused = join_as("n2", made["token"].as_str().unwrap());
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("the token is for node `n1`, not `n2`"),
        "{err}"
    );
    let refused = join_as("n2", for_n2["token"].as_str().unwrap());
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("node name `n2` is in use"), "{err}");
    let again = join_as("n1", made["token"].as_str().unwrap());
    assert!(
        again.status.success(),
        "a revoked name can be joined again with the same token: {}",
        String::from_utf8_lossy(&again.stderr)
    );

    // No secret reached a log: not the operator token, not a join token's secret.
    for log in ["main.log", "agent-n1.log", "agent-n2.log"] {
        let text = site.log(log);
        assert!(
            !text.contains("-operator-token-"),
            "operator token in {log}"
        );
        for token in [&n1_token, &n2_token] {
            let secret = token.split_once('.').unwrap().1;
            assert!(!text.contains(secret), "a join secret in {log}");
        }
    }

    // Plain HTTP off loopback is refused at start, naming the fix.
    let out = site.run(&[
        "server",
        "--data-dir",
        site.path("plain").to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
        "--no-agent",
        "--no-proxy",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("plain HTTP is only for loopback"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // So is an agent that would serve logs off loopback without a node certificate.
    let out = site.run(&[
        "--server",
        "http://127.0.0.1:1",
        "--token",
        "some-token-0123456789abcdef",
        "--data-dir",
        site.path("plain-agent").to_str().unwrap(),
        "agent",
        "--agent-listen",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("join the cluster first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_context_carries_server_ca_and_token_file() {
    let mut site = Site::new();
    let url = start_server(&mut site, "ctx");
    let ca = site.path("ctx-ca/ca.crt");
    let token = site.path("ctx-token");
    site.ok(&[
        "context",
        "add",
        "prod",
        "--url",
        &url,
        "--ca-file",
        ca.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
    ]);
    let saved = std::fs::read_to_string(site.path("contexts.json")).unwrap();
    assert!(
        !saved.contains("operator-token"),
        "a context keeps the token file's path, not the token: {saved}"
    );
    // No --server, --ca or --token: the current context supplies them.
    let out = site.ok(&["cluster", "-o", "json"]);
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["store"], "embedded");
    let listed = site.ok(&["context", "list"]);
    assert!(listed.contains("* prod"), "{listed}");
    let missing = site.run(&["--context", "staging", "cluster"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no context named `staging`"));
}
