//! A container's output into its task's log, in the shim's format (`MILLIS o|e TEXT` lines),
//! read from the engine's multiplexed log stream (8-byte frame headers: stream, size), each
//! line stamped with the time the engine took it (`timestamps=1`), so a restarted agent goes on
//! after the last line it kept and nothing written meanwhile is lost. Lines are cut at 64 KiB
//! while read; the file rotates at half the task's cap, like the shim's.

use std::io::Write;
use std::path::PathBuf;

use http_body_util::BodyExt;
use hyper::Method;

use super::engine::Engine;

const MAX_LINE: usize = 64 * 1024;

struct Sink {
    log: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
    cap: u64,
}

impl Sink {
    fn line(&mut self, at_ms: u64, stream: u8, text: &[u8]) {
        let mut line = format!("{at_ms} {} ", stream as char).into_bytes();
        line.extend_from_slice(text);
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.cap / 2 {
            let _ = std::fs::rename(
                &self.log,
                self.log.with_file_name(crate::shim::LOG_PREVIOUS),
            );
            self.file = None;
            self.size = 0;
        }
        if self.file.is_none() {
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .ok();
            self.size = self
                .file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map_or(0, |m| m.len());
        }
        if let Some(file) = &mut self.file {
            if file.write_all(&line).is_ok() {
                self.size += line.len() as u64;
            }
        }
    }
}

/// Where a copy starts: the container's start (a new task), or just after the last line a
/// previous agent kept (an adopted one).
#[derive(Debug, Clone, Copy)]
pub(super) enum Resume {
    /// Unix seconds.
    Start(u64),
    /// Milliseconds of the last line kept: lines up to it are not copied again.
    After(u64),
}

/// The time of the last line of the task's log (`MILLIS o|e TEXT`), if it has one.
pub(super) fn last_line_ms(log: &std::path::Path) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    let tail = (MAX_LINE as u64 + 64).min(len);
    file.seek(SeekFrom::Start(len - tail)).ok()?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .rev()
        .find_map(|line| line.split(' ').next()?.parse::<u64>().ok())
}

/// Copies container `id`'s output into `log` until the container ends or the engine goes
/// away.
pub(super) async fn copy(engine: Engine, id: String, log: PathBuf, cap: u64, from: Resume) {
    let (since, after_ms) = match from {
        Resume::Start(seconds) => (seconds, None),
        Resume::After(ms) => (ms / 1000, Some(ms)),
    };
    let path =
        format!("/containers/{id}/logs?follow=1&stdout=1&stderr=1&timestamps=1&since={since}");
    let mut body = match engine.stream(Method::GET, &path).await {
        Ok(body) => body,
        Err(e) => {
            tracing::warn!(container = %id, error = %e, "cannot follow a container's output");
            return;
        }
    };
    let mut sink = Sink {
        log,
        file: None,
        size: 0,
        cap: cap.max(dozen_spec::MIN_LOG_BYTES),
    };
    let mut buffer: Vec<u8> = Vec::new();
    // A partial line per stream (stdout, stderr), never longer than MAX_LINE, and when it began.
    let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut began: [u64; 2] = [0, 0];
    let put = |sink: &mut Sink, at_ms: u64, letter: u8, text: &[u8]| {
        if after_ms.is_none_or(|after| at_ms > after) {
            sink.line(at_ms, letter, text);
        }
    };
    while let Some(Ok(frame)) = body.frame().await {
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buffer.extend_from_slice(data);
        while buffer.len() >= 8 {
            let size = u32::from_be_bytes([buffer[4], buffer[5], buffer[6], buffer[7]]) as usize;
            if buffer.len() < 8 + size {
                break;
            }
            let (which, letter) = if buffer[0] == 2 { (1, b'e') } else { (0, b'o') };
            // Each frame starts with the engine's time for it, then a space.
            let payload = &buffer[8..8 + size];
            let (at_ms, payload) = match payload.iter().position(|b| *b == b' ') {
                Some(i) => match std::str::from_utf8(&payload[..i])
                    .ok()
                    .and_then(super::rfc3339_ms)
                {
                    Some(ms) => (ms, &payload[i + 1..]),
                    None => (crate::shim::wall_ms(), payload),
                },
                None => (crate::shim::wall_ms(), payload),
            };
            for byte in payload.iter().copied() {
                let line = &mut partial[which];
                if line.is_empty() {
                    began[which] = at_ms;
                }
                if byte == b'\n' {
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    put(&mut sink, began[which], letter, line);
                    line.clear();
                } else {
                    line.push(byte);
                    if line.len() >= MAX_LINE {
                        put(&mut sink, began[which], letter, line);
                        line.clear();
                    }
                }
            }
            buffer.drain(..8 + size);
        }
    }
    for (which, letter) in [(0, b'o'), (1, b'e')] {
        if !partial[which].is_empty() {
            put(&mut sink, began[which], letter, &partial[which]);
        }
    }
}
