//! Write latency of the embedded store with many open watches (`bench/watches.sh` runs it).
//!
//! Opens `--watches` watches in three kinds: 80 % on a prefix of their own (a node's
//! assignments: a write wakes one of them), 18 % on the prefix every write goes to (a `-f`
//! follower: every write wakes all of them) and 2 % on that prefix that never read (a stalled
//! client). Then `--writes` puts of 1 KiB, one at a time, each timed from call to
//! acknowledgement; and prints p50/p99/max, the process's peak RSS, and a last line of
//! `key=value` figures. It uses only `watch`, `next` and `put`, so the same file builds against
//! older versions of the store for a side-by-side run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dozen_store::embedded::EmbeddedStore;
use dozen_store::Store;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, not {v}"))
        })
        .unwrap_or(default)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let watches = arg("--watches", 5000);
    let writes = arg("--writes", 2000);
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Arc::new(EmbeddedStore::open(dir.path()).expect("the store opens"));
    let from = store.revision().await.unwrap() + 1;
    let received = Arc::new(AtomicU64::new(0));
    let followers = watches * 18 / 100;
    let stalled = watches * 2 / 100;
    let own = watches - followers - stalled;
    let mut held = Vec::new();
    for i in 0..watches {
        let prefix = if i < own {
            format!("/dozen/assignments/n{i}/")
        } else {
            "/dozen/tasks/".to_string()
        };
        let mut watch = store.watch(&prefix, from).await.expect("a watch");
        if i >= own + followers {
            held.push(watch);
            continue;
        }
        let received = received.clone();
        tokio::spawn(async move {
            while watch.next().await.is_some() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let value = vec![b'x'; 1024];
    let mut latencies = Vec::with_capacity(writes as usize);
    let started = Instant::now();
    for j in 0..writes {
        let key = if j % 4 == 0 {
            format!("/dozen/assignments/n{}/t{j}", j % own.max(1))
        } else {
            format!("/dozen/tasks/t{}", j % 500)
        };
        let t = Instant::now();
        store.put(&key, value.clone()).await.expect("a write");
        latencies.push(t.elapsed());
    }
    let total = started.elapsed();
    // Let followers drain what is queued, bounded in time.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && received.load(Ordering::Relaxed) < (writes * 3 / 4) * followers
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let rss = peak_rss_kib();
    println!(
        "watches={watches} (own prefix {own}, following {followers}, stalled {stalled}) writes={writes} in {:.1} s",
        total.as_secs_f64()
    );
    println!(
        "write latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; events received by followers {}; peak RSS {} MiB",
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(*latencies.last().unwrap()),
        received.load(Ordering::Relaxed),
        rss / 1024
    );
    drop(held);
    println!(
        "write_p50_ms={:.2} write_p99_ms={:.2} write_max_ms={:.2} peak_rss_mib={}",
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(*latencies.last().unwrap()),
        rss / 1024
    );
}
