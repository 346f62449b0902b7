//! The etcd backend against the same conformance suite as the embedded one, on a real
//! 3-member etcd cluster started here (Debian's `etcd-server`; `DOZEN_ETCD_BIN` overrides).
//! Without etcd the tests fail in CI and are skipped, saying so, elsewhere.
#![cfg(feature = "etcd")]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dozen_store::conformance;
use dozen_store::etcd::EtcdStore;
use dozen_store::Store;

struct Cluster {
    members: Vec<Child>,
    endpoints: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn etcd_binary() -> Option<String> {
    if let Ok(b) = std::env::var("DOZEN_ETCD_BIN") {
        return Some(b);
    }
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(String::from)
}

/// Starts three members on loopback with timeouts relaxed for a 2-core machine.
fn start_cluster() -> Option<Cluster> {
    let Some(bin) = etcd_binary() else {
        if std::env::var_os("CI").is_some() {
            panic!("etcd is not installed: CI must install etcd-server (see .ci/run)");
        }
        eprintln!("SKIPPED: no etcd binary (install etcd-server or set DOZEN_ETCD_BIN)");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect();
    let mut members = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let child = Command::new(&bin)
            .args(["--name", &format!("m{i}")])
            .args([
                "--data-dir",
                &dir.path().join(format!("m{i}")).display().to_string(),
            ])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
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
        .map(|(c, _)| format!("http://127.0.0.1:{c}"))
        .collect();
    Some(Cluster {
        members,
        endpoints,
        _dir: dir,
    })
}

async fn connect(cluster: &Cluster) -> Arc<dyn Store> {
    let start = Instant::now();
    loop {
        if let Ok(store) = EtcdStore::connect(&cluster.endpoints).await {
            if store.put("/ready", b"1".to_vec()).await.is_ok() {
                store.delete("/ready").await.unwrap();
                return Arc::new(store);
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "etcd cluster did not come up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

macro_rules! conformance_test {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(cluster) = start_cluster() else {
                return;
            };
            let store = connect(&cluster).await;
            conformance::$name(store).await;
        }
    };
}

conformance_test!(revisions_and_versions);
conformance_test!(transactions_with_compares);
conformance_test!(range_and_delete_prefix);
conformance_test!(watch_from_revision);
conformance_test!(compaction_forces_resync);
conformance_test!(leases_expire_and_keep_alive);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_down_does_not_stop_the_store() {
    let Some(mut cluster) = start_cluster() else {
        return;
    };
    let store = connect(&cluster).await;
    let r = store.put("/m/a", b"1".to_vec()).await.unwrap();
    let _ = cluster.members[2].kill();
    let _ = cluster.members[2].wait();
    // The two left still form a quorum (perhaps after an election).
    let start = Instant::now();
    let r2 = loop {
        match store.put("/m/b", b"2".to_vec()).await {
            Ok(r2) => break r2,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(20), "no quorum: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(r2 > r);
    assert_eq!(store.get("/m/a").await.unwrap().unwrap().value, b"1");
}
