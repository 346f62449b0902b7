//! Test helper for the crash test in tests/embedded.rs: writes numbered records to an embedded
//! store as fast as it can and prints `ack N` after each write is acknowledged, until killed.
#![forbid(unsafe_code)]

use std::io::Write;

use dozen_store::embedded::EmbeddedStore;
use dozen_store::Store;

/// The value written for record `i`: long enough that a torn write would be visible.
fn value_for(i: u64) -> Vec<u8> {
    format!("{i}:{}", "x".repeat(200 + (i % 100) as usize)).into_bytes()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: store-crash-writer DIR");
        std::process::exit(2);
    };
    let store = match EmbeddedStore::open(std::path::Path::new(&dir)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("open {dir}: {e}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        if let Err(e) = store.put(&format!("/crash/{i:08}"), value_for(i)).await {
            eprintln!("write {i}: {e}");
            std::process::exit(1);
        }
        let _ = writeln!(out, "ack {i}");
        let _ = out.flush();
    }
}
