//! An open-loop HTTP/1.1 load generator for the benchmarks: requests are due at a fixed rate
//! whatever the answers do, and each one's latency counts from when it was due, not from when
//! a connection was free to send it (so a stall shows in the figures instead of hiding).
//!
//! `dozen-loadgen URL RATE SECONDS [CONNECTIONS]` prints one line:
//! `sent=N errors=E achieved_rps=R p50_us=A p90_us=B p99_us=C max_us=D`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Most requests one run may schedule (the latencies are kept whole to sort).
const MAX_REQUESTS: u64 = 5_000_000;

fn usage() -> ! {
    eprintln!("usage: dozen-loadgen http://HOST:PORT/PATH RATE SECONDS [CONNECTIONS]");
    std::process::exit(2);
}

/// One request and its answer on a kept-alive connection; false when it failed.
async fn exchange(conn: &mut BufReader<TcpStream>, request: &[u8]) -> bool {
    if conn.get_mut().write_all(request).await.is_err() {
        return false;
    }
    let mut line = String::new();
    let mut length = 0usize;
    let mut first = true;
    let mut ok = false;
    loop {
        line.clear();
        match conn.read_line(&mut line).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        if first {
            ok = line
                .split_whitespace()
                .nth(1)
                .is_some_and(|s| s.starts_with('2'));
            first = false;
            continue;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await.is_ok() && ok
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        usage();
    }
    let Some(rest) = args[1].strip_prefix("http://") else {
        usage()
    };
    let (address, path) = match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    };
    let rate: f64 = args[2].parse().unwrap_or_else(|_| usage());
    let seconds: f64 = args[3].parse().unwrap_or_else(|_| usage());
    let connections: usize = args.get(4).and_then(|c| c.parse().ok()).unwrap_or(64);
    let total = ((rate * seconds) as u64).min(MAX_REQUESTS);
    let request = Arc::new(
        format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: dozen-loadgen\r\n\r\n")
            .into_bytes(),
    );
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(100);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (address, request, next, errors) = (
            address.clone(),
            request.clone(),
            next.clone(),
            errors.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::new();
            let mut conn: Option<BufReader<TcpStream>> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return latencies;
                }
                let due = start + interval.mul_f64(i as f64);
                tokio::time::sleep_until(due).await;
                if conn.is_none() {
                    conn = TcpStream::connect(&address).await.ok().map(|s| {
                        let _ = s.set_nodelay(true);
                        BufReader::new(s)
                    });
                }
                let ok = match conn.as_mut() {
                    Some(c) => exchange(c, &request).await,
                    None => false,
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
                let taken = Instant::now().saturating_duration_since(due);
                latencies.push(taken.as_micros().min(u128::from(u32::MAX)) as u32);
            }
        }));
    }
    let mut all: Vec<u32> = Vec::with_capacity(total as usize);
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let at = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "sent={} errors={} achieved_rps={:.0} p50_us={} p90_us={} p99_us={} max_us={}",
        all.len(),
        errors.load(Ordering::Relaxed),
        all.len() as f64 / elapsed.max(1e-9),
        at(0.50),
        at(0.90),
        at(0.99),
        all.last().copied().unwrap_or(0)
    );
}
