//! The access log: a line per request (or one in every `every`) on standard error, beside the
//! proxy's other log lines and in the same format (text or JSON). Lines are gathered in a
//! buffer written out every 100 ms or at 32 KiB, not formatted through `tracing` and written
//! one by one: that cost about a tenth of the proxy's CPU per request.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Written out when this full, at the latest.
const FLUSH_AT: usize = 32 * 1024;
/// How often what is gathered is written out.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

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
    json: bool,
    seen: AtomicU64,
    pending: Mutex<String>,
}

impl AccessLog {
    pub fn new(every: u64, json: bool) -> AccessLog {
        AccessLog {
            every,
            json,
            seen: AtomicU64::new(0),
            pending: Mutex::new(String::new()),
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
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let stamp = dozen_model::utc_time(now.as_millis() as u64);
        let Ok(mut text) = self.pending.lock() else {
            return;
        };
        // The path only: a query may carry what should not sit in a log.
        let path = line.uri.path();
        if self.json {
            let _ = writeln!(
                text,
                r#"{{"timestamp":"{stamp}","level":"INFO","fields":{{"message":"access","service":{},"method":"{}","host":{},"path":{},"status":{},"target":"{}","ms":{},"request_id":{}}},"target":"dozen::access"}}"#,
                json_string(line.service),
                line.method,
                json_string(line.host),
                json_string(path),
                line.status,
                line.target,
                line.elapsed_ms,
                json_string(line.id),
            );
        } else {
            let _ = writeln!(
                text,
                "{stamp}  INFO access service={} method={} host={} path={} status={} target={} ms={} request_id={}",
                line.service,
                line.method,
                line.host,
                path,
                line.status,
                line.target,
                line.elapsed_ms,
                line.id
            );
        }
        if text.len() >= FLUSH_AT {
            let full = std::mem::take(&mut *text);
            drop(text);
            write_out(&full);
        }
    }

    /// Writes out what has gathered.
    pub fn flush(&self) {
        let gathered = match self.pending.lock() {
            Ok(mut text) if !text.is_empty() => std::mem::take(&mut *text),
            _ => return,
        };
        write_out(&gathered);
    }
}

fn write_out(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// A string as JSON writes it.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}
