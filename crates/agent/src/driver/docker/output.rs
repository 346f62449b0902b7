//! A container's output into its task's log, in the shim's format (`MILLIS o|e TEXT` lines),
//! read from the engine's multiplexed log stream (8-byte frame headers: stream, size). Lines
//! are cut at 64 KiB while read; the file rotates at half the task's cap, like the shim's.

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
    fn line(&mut self, stream: u8, text: &[u8]) {
        let mut line = format!("{} {} ", crate::shim::wall_ms(), stream as char).into_bytes();
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

/// Copies container `id`'s output (from `since`, Unix seconds) into `log` until the container
/// ends or the engine goes away.
pub(super) async fn copy(engine: Engine, id: String, log: PathBuf, cap: u64, since: u64) {
    let path = format!("/containers/{id}/logs?follow=1&stdout=1&stderr=1&since={since}");
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
    // A partial line per stream (stdout, stderr), never longer than MAX_LINE.
    let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
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
            for byte in buffer[8..8 + size].iter().copied() {
                let line = &mut partial[which];
                if byte == b'\n' {
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    sink.line(letter, line);
                    line.clear();
                } else {
                    line.push(byte);
                    if line.len() >= MAX_LINE {
                        sink.line(letter, line);
                        line.clear();
                    }
                }
            }
            buffer.drain(..8 + size);
        }
    }
    for (which, letter) in [(0, b'o'), (1, b'e')] {
        if !partial[which].is_empty() {
            sink.line(letter, &partial[which]);
        }
    }
}
