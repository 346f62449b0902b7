//! `dozen exec` in a container: the engine's exec, its output demultiplexed as it comes (or
//! one raw stream with a TTY), then its exit code from the engine.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::json;
use tokio::sync::mpsc;

use super::Engine;
use crate::exec::{ExecChunk, EXEC_BUFFER};

/// Runs `argv` in container `id`. A reader that goes away ends the command: the engine has no
/// way to end an exec, so its process is killed by pid (the engine runs on this host).
pub(super) async fn run(
    engine: &Engine,
    id: &str,
    argv: &[String],
    tty: bool,
) -> Result<mpsc::Receiver<ExecChunk>, String> {
    let body = json!({ "Cmd": argv, "AttachStdout": true, "AttachStderr": true, "Tty": tty });
    let created = engine
        .call(Method::POST, &format!("/containers/{id}/exec"), Some(&body))
        .await
        .map_err(|e| e.to_string())?;
    let exec = created["Id"].as_str().unwrap_or_default().to_string();
    let start = json!({ "Detach": false, "Tty": tty }).to_string();
    let headers = [("content-type", "application/json".to_string())];
    let mut output = engine
        .stream_with(
            Method::POST,
            &format!("/exec/{exec}/start"),
            &headers,
            Bytes::from(start),
        )
        .await
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel(EXEC_BUFFER);
    let engine = engine.clone();
    tokio::spawn(async move {
        let mut demux = Demux::default();
        let state = format!("/exec/{exec}/json");
        loop {
            let frame = tokio::select! {
                frame = output.frame() => frame,
                _ = tx.closed() => None,
            };
            let data = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Some(Err(e)) => {
                    let why = format!("the engine's output broke off: {e}");
                    let _ = tx.send(ExecChunk::Failed(why)).await;
                    break;
                }
                None => break,
            };
            let pieces = if tty {
                vec![ExecChunk::Stdout(data)]
            } else {
                demux.feed(&data)
            };
            for piece in pieces {
                if tx.send(piece).await.is_err() {
                    break;
                }
            }
        }
        // The engine may close the output a moment before it marks the exec ended.
        let mut answer = engine.call(Method::GET, &state, None).await;
        for _ in 0..25 {
            let running = matches!(&answer, Ok(v) if v["Running"].as_bool() == Some(true));
            if !running || tx.is_closed() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            answer = engine.call(Method::GET, &state, None).await;
        }
        if tx.is_closed() {
            // Its reader went away: the engine cannot end an exec, so its process is ended
            // here (the engine's processes are this host's).
            if let Ok(state) = &answer {
                if state["Running"].as_bool() == Some(true) {
                    if let Some(pid) = state["Pid"].as_u64().and_then(|p| u32::try_from(p).ok()) {
                        let _ = crate::os::kill_pid(pid, libc::SIGKILL);
                    }
                }
            }
            return;
        }
        let last = match answer {
            Ok(state) if state["Running"].as_bool() == Some(true) => {
                ExecChunk::Failed("the engine stopped sending the command's output".into())
            }
            Ok(state) => ExecChunk::Exited(state["ExitCode"].as_i64().map(|c| c as i32)),
            Err(e) => ExecChunk::Failed(e.to_string()),
        };
        let _ = tx.send(last).await;
    });
    Ok(rx)
}

/// The engine's multiplexed stream: 8-byte headers (stream, 0, 0, 0, big-endian size), each
/// followed by that many bytes, handed on as they arrive rather than once a frame is whole.
#[derive(Default)]
struct Demux {
    header: Vec<u8>,
    stream: u8,
    remaining: usize,
}

impl Demux {
    fn feed(&mut self, mut data: &[u8]) -> Vec<ExecChunk> {
        let mut out = Vec::new();
        while !data.is_empty() {
            if self.remaining == 0 {
                let take = (8 - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.header.len() == 8 {
                    let h = &self.header;
                    self.stream = h[0];
                    self.remaining = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
                    self.header.clear();
                }
                continue;
            }
            let take = self.remaining.min(data.len());
            let piece = Bytes::copy_from_slice(&data[..take]);
            out.push(if self.stream == 2 {
                ExecChunk::Stderr(piece)
            } else {
                ExecChunk::Stdout(piece)
            });
            self.remaining -= take;
            data = &data[take..];
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_come_out_in_order_and_by_stream() {
        let mut wire = vec![1, 0, 0, 0, 0, 0, 0, 3];
        wire.extend_from_slice(b"out");
        wire.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 4]);
        wire.extend_from_slice(b"err!");
        for cut in 0..wire.len() {
            let mut demux = Demux::default();
            let mut got = demux.feed(&wire[..cut]);
            got.extend(demux.feed(&wire[cut..]));
            let (mut out, mut err) = (Vec::new(), Vec::new());
            for piece in got {
                match piece {
                    ExecChunk::Stdout(b) => out.extend_from_slice(&b),
                    ExecChunk::Stderr(b) => err.extend_from_slice(&b),
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(
                (out.as_slice(), err.as_slice()),
                (&b"out"[..], &b"err!"[..]),
                "cut at {cut}"
            );
        }
    }
}
