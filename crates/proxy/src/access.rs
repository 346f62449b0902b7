//! The access log: a line per request (or one in every `every`), through `tracing` under the
//! target `dozen::access`, so it goes where the proxy's log goes and can be filtered apart.

use std::sync::atomic::{AtomicU64, Ordering};

pub const TARGET: &str = "dozen::access";

/// One request as logged.
pub struct Line<'a> {
    pub service: &'a str,
    pub method: &'a hyper::Method,
    pub uri: &'a hyper::Uri,
    pub host: &'a str,
    /// The target's address, or `-` when the proxy answered itself.
    pub target: &'a str,
    pub status: u16,
    pub elapsed_ms: u64,
    pub id: &'a str,
}

pub struct AccessLog {
    /// Log one request in this many; 0: none.
    every: u64,
    seen: AtomicU64,
}

impl AccessLog {
    pub fn new(every: u64) -> AccessLog {
        AccessLog {
            every,
            seen: AtomicU64::new(0),
        }
    }

    pub fn log(&self, line: Line<'_>) {
        if self.every == 0 {
            return;
        }
        if self.every > 1
            && !self
                .seen
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(self.every)
        {
            return;
        }
        // The path only: a query may carry what should not sit in a log.
        tracing::info!(
            target: TARGET,
            service = line.service,
            method = %line.method,
            host = line.host,
            path = line.uri.path(),
            status = line.status,
            target = line.target,
            ms = line.elapsed_ms,
            request_id = line.id,
            "access"
        );
    }
}
