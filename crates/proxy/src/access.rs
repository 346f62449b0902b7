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

struct Pending {
    text: String,
    /// The second `stamp` was made for, and its text (`2026-12-04T23:41:07`).
    second: u64,
    stamp: String,
}

pub struct AccessLog {
    /// Log one request in this many; 0: none.
    every: u64,
    json: bool,
    seen: AtomicU64,
    pending: Mutex<Pending>,
}

impl AccessLog {
    pub fn new(every: u64, json: bool) -> AccessLog {
        AccessLog {
            every,
            json,
            seen: AtomicU64::new(0),
            pending: Mutex::new(Pending {
                text: String::new(),
                second: u64::MAX,
                stamp: String::new(),
            }),
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
        let Ok(mut p) = self.pending.lock() else {
            return;
        };
        if p.second != now.as_secs() {
            p.second = now.as_secs();
            p.stamp = utc(now.as_secs());
        }
        let Pending { text, stamp, .. } = &mut *p;
        let millis = now.subsec_millis();
        // The path only: a query may carry what should not sit in a log.
        let path = line.uri.path();
        if self.json {
            let _ = writeln!(
                text,
                r#"{{"timestamp":"{stamp}.{millis:03}Z","level":"INFO","fields":{{"message":"access","service":{},"method":"{}","host":{},"path":{},"status":{},"target":"{}","ms":{},"request_id":{}}},"target":"dozen::access"}}"#,
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
                "{stamp}.{millis:03}Z  INFO access service={} method={} host={} path={} status={} target={} ms={} request_id={}",
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
            let full = std::mem::take(text);
            drop(p);
            write_out(&full);
        }
    }

    /// Writes out what has gathered.
    pub fn flush(&self) {
        let gathered = match self.pending.lock() {
            Ok(mut p) if !p.text.is_empty() => std::mem::take(&mut p.text),
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

/// `2026-12-04T23:41:07` for a second since the epoch (UTC; the civil calendar from days).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::with_capacity(19);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_times() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00");
        assert_eq!(super::utc(1_796_427_667), "2026-12-04T23:41:07");
        assert_eq!(super::utc(951_782_400), "2000-02-29T00:00:00");
    }
}
