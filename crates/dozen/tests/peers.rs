//! Two API servers over one etcd cluster, with TLS, on loopback: a blob uploaded to one is
//! served by the other (fetched from its peer with the server's own certificate, checked and
//! kept), and still served after the first server is gone; the leading controller's problems
//! are seen through either server (`dozen ps`); each server's own agent's logs are reachable
//! through the other, which never calls that agent's loopback address itself.
//!
//! Needs etcd-server: fails in CI without it, skips (saying so) elsewhere.
#![cfg(feature = "etcd")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dozen_testkit::{eventually, listening_url, EtcdCluster};

const BIN: &str = env!("CARGO_BIN_EXE_dozen");
const TOKEN: &str = "peers-operator-token-0123456789abcdef";

struct Server {
    child: Child,
    url: String,
    data: PathBuf,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its agent's tasks outlive it by design; a test leaves none behind.
        dozen_testkit::end_tasks_under(&self.data);
    }
}

fn start_server(work: &Path, name: &str, store: &str) -> Server {
    start_server_with_agent(work, name, store, None)
}

/// With `node`, the server runs its own agent under that node name.
fn start_server_with_agent(work: &Path, name: &str, store: &str, node: Option<&str>) -> Server {
    let data = work.join(name);
    let log = work.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(BIN)
        .args(["server", "--store", store])
        .arg("--data-dir")
        .arg(&data)
        // Port 0: the server picks a free one and logs it.
        .args(["--listen", "127.0.0.1:0"])
        .arg("--ca-dir")
        .arg(work.join("ca"))
        .arg("--token-file")
        .arg(work.join("token"))
        // Servers of one store share its root key.
        .arg("--master-key-file")
        .arg(work.join("master.key"))
        .args(match node {
            Some(node) => {
                let (low, high) = dozen_testkit::random_port_range();
                vec![
                    "--node-name".to_string(),
                    node.to_string(),
                    "--port-range".to_string(),
                    format!("{low}-{high}"),
                    "--no-proxy".to_string(),
                ]
            }
            None => vec!["--no-agent".to_string(), "--no-proxy".to_string()],
        })
        .env("DOZEN_LOG", "info")
        .env_remove("DOZEN_SERVER")
        .env_remove("DOZEN_TOKEN")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("start dozen server");
    let mut server = Server {
        child,
        url: String::new(),
        data,
        log,
    };
    server.url = eventually(Duration::from_secs(30), &format!("{name} listens"), || {
        listening_url(&std::fs::read_to_string(&server.log).ok()?)
    });
    server
}

/// A work dir with a cluster CA and the operator token, and the `--store` URL of `etcd`.
fn site(etcd: &EtcdCluster) -> (tempfile::TempDir, String) {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["ca", "init", "--dir"])
        .arg(work.path().join("ca"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(work.path().join("token"), TOKEN).unwrap();
    let store = format!(
        "etcd://{}",
        etcd.endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect::<Vec<_>>()
            .join(",")
    );
    (work, store)
}

fn operator(work: &Path) -> reqwest::Client {
    let ca = std::fs::read_to_string(work.join("ca/ca.crt")).unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(dozen_api::tls::client_config(&ca, None).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_blobs_and_what_the_controller_found() {
    let Some(etcd) = EtcdCluster::start() else {
        return;
    };
    let (work, store) = site(&etcd);
    let mut a = start_server(work.path(), "a", &store);
    let b = start_server(work.path(), "b", &store);

    let bundle: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let digest = dozen_store::blob::sha256_digest(&bundle);
    let client = operator(work.path());
    let put = client
        .put(format!("{}/v1/blobs/{digest}", a.url))
        .bearer_auth(TOKEN)
        .body(bundle.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);

    // B never saw the upload; an agent talking to B still gets the bundle.
    let get = |url: String| {
        let client = client.clone();
        let digest = digest.clone();
        async move {
            let resp = client
                .get(format!("{url}/v1/blobs/{digest}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.bytes().await.unwrap().to_vec())
        }
    };
    let served = dozen_testkit::eventually_async(
        Duration::from_secs(30),
        "B serves the blob uploaded to A",
        || async {
            let (status, body) = get(b.url.clone()).await;
            (status == 200).then_some(body)
        },
    )
    .await;
    assert!(served == bundle, "B served other bytes than were uploaded");
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert!(
        b.data.join("blobs").join(format!("sha256-{hex}")).exists(),
        "B keeps its copy"
    );

    // A blob no server holds is a plain 404, from each server, while both are up: a server
    // asked by a peer answers from what it holds and never asks back.
    let missing = dozen_store::blob::sha256_digest(b"nobody uploaded this");
    for server in [&a, &b] {
        let started = std::time::Instant::now();
        let resp = client
            .get(format!("{}/v1/blobs/{missing}", server.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("an answer, not a loop between the servers");
        assert_eq!(resp.status(), 404);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    // What the leading controller finds wrong is seen through either server (`dozen ps`). here, a service
    // with no node to run on.
    std::fs::write(
        work.path().join("dozen.toml"),
        "name = \"nowhere\"\n[services.lonely]\ncommand = \"sleep 1000\"\nport = false\n",
    )
    .unwrap();
    let cli = |url: &str, args: &[&str]| {
        Command::new(BIN)
            .args(["--server", url, "--ca"])
            .arg(work.path().join("ca/ca.crt"))
            .args(args)
            .env("DOZEN_TOKEN", TOKEN)
            .env("DOZEN_CONFIG", work.path().join("contexts.json"))
            .current_dir(work.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let applied = cli(&a.url, &["apply", "--no-wait"]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    for server in [&a, &b] {
        let what = format!("a placement problem through {}", server.url);
        dozen_testkit::eventually_async(Duration::from_secs(20), &what, || async {
            let out = cli(&server.url, &["ps", "-o", "json"]);
            String::from_utf8_lossy(&out.stdout)
                .contains("cannot place")
                .then_some(())
        })
        .await;
    }

    // A goes; B serves its own copy.
    let _ = a.child.kill();
    let _ = a.child.wait();
    let (status, body) = get(b.url.clone()).await;
    assert_eq!(status, 200);
    assert!(body == bundle);
    // With A dead, a miss is still a prompt 404: the dead peer is skipped.
    let resp = client
        .get(format!("{}/v1/blobs/{missing}", b.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // Peers spoke with certificates: the token never reached a log.
    for server in [&a, &b] {
        let log = std::fs::read_to_string(&server.log).unwrap();
        assert!(
            !log.contains(TOKEN),
            "the token in {}",
            server.log.display()
        );
    }
}

/// Seen: each server's own agent registers `http://127.0.0.1:P`, and another server asked for
/// logs sent the operator token to that port on its own host, to whatever listened there. Now
/// an agent at a loopback address is asked only by the server it registered through (the
/// others forward to that server), so every agent's logs are reachable from every server and
/// the token never goes to an address another server's agent registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_servers_own_agent_is_reachable_for_logs_and_the_token_stays_home() {
    let Some(etcd) = EtcdCluster::start() else {
        return;
    };
    let (work, store) = site(&etcd);
    let a = start_server_with_agent(work.path(), "a", &store, Some("node-a"));
    let mut b = start_server_with_agent(work.path(), "b", &store, Some("node-b"));
    let client = operator(work.path());
    let get_json = |url: String| {
        let client = client.clone();
        async move {
            let resp = client.get(url).bearer_auth(TOKEN).send().await.ok()?;
            resp.error_for_status().ok()?.text().await.ok()
        }
    };
    let nodes: serde_json::Value = dozen_testkit::eventually_async(
        Duration::from_secs(30),
        "both servers' agents registered",
        || async {
            let text = get_json(format!("{}/v1/nodes", a.url)).await?;
            let nodes: serde_json::Value = serde_json::from_str(&text).ok()?;
            (nodes.as_array()?.len() == 2).then_some(nodes)
        },
    )
    .await;
    let b_agent = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"]["name"] == "node-b")
        .and_then(|n| n["node"]["address"].as_str())
        .unwrap()
        .to_string();
    assert!(b_agent.starts_with("http://127.0.0.1:"), "{b_agent}");

    std::fs::write(
        work.path().join("dozen.toml"),
        "name = \"talk\"\n[services.ticker]\ncommand = \"while true; do echo tick; sleep 0.2; done\"\nport = false\nreplicas = 2\n",
    )
    .unwrap();
    let applied = Command::new(BIN)
        .args(["--server", &a.url, "--ca"])
        .arg(work.path().join("ca/ca.crt"))
        .args(["apply", "--no-wait"])
        .env("DOZEN_TOKEN", TOKEN)
        .env("DOZEN_CONFIG", work.path().join("contexts.json"))
        .current_dir(work.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // Through either server, the lines of both tasks (one on each server's agent).
    for server in [&a, &b] {
        let what = format!("logs of both tasks through {}", server.url);
        dozen_testkit::eventually_async(Duration::from_secs(30), &what, || async {
            let text = get_json(format!("{}/v1/logs?service=ticker", server.url)).await?;
            let tasks: std::collections::BTreeSet<String> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|l| l["line"] == "tick")
                .filter_map(|l| l["task"].as_str().map(String::from))
                .collect();
            (tasks.len() == 2).then_some(())
        })
        .await;
    }

    // B goes, and something else takes its agent's port. A still lists node-b (its lease has
    // not run out), but never calls that loopback port itself.
    let _ = b.child.kill();
    let _ = b.child.wait();
    let port: u16 = b_agent
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let squatter =
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("B's agent port is free");
    squatter.set_nonblocking(true).unwrap();
    let text = get_json(format!("{}/v1/logs?service=ticker", a.url))
        .await
        .expect("A answers with what it can reach");
    assert!(text.contains("tick"), "A's own agent still answers: {text}");
    match squatter.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((mut conn, _)) => {
            let mut seen = [0u8; 512];
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let n = std::io::Read::read(&mut conn, &mut seen).unwrap_or(0);
            panic!(
                "server A called B's agent's loopback port itself: {}",
                String::from_utf8_lossy(&seen[..n])
            );
        }
        Err(e) => panic!("{e}"),
    }
}
