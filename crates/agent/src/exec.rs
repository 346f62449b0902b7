//! `dozen exec`: a command run inside a running task, its output handed back as it comes.
//! The agent's API takes the request (from a server), finds the task, and asks its driver:
//! the `process` driver runs the command on the host as the task runs (its environment,
//! directory and user), the `docker` driver through the engine's exec in the container.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use dozen_api::{ExecOutput, ExecRequest};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::health::CommandContext;
use crate::{Shared, TaskRecord, TASK_RECORD};

/// What an exec gives back, piece by piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecChunk {
    Stdout(Bytes),
    Stderr(Bytes),
    Exited(Option<i32>),
    Failed(String),
}

/// Pieces in flight per exec: a reader that stops reading holds the command up, not memory.
pub const EXEC_BUFFER: usize = 16;
/// Execs at once on one agent.
pub const MAX_EXECS: usize = 16;
static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_EXECS);

/// Runs `argv` on the host as the task runs: its environment, directory and user. The
/// command is killed if the reader goes away.
pub fn on_host(
    context: &CommandContext,
    argv: &[String],
) -> Result<mpsc::Receiver<ExecChunk>, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("no command to run".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&context.env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    match context.user {
        Some((uid, gid)) => {
            crate::os::switch_user_before_exec(cmd.as_std_mut(), uid, gid, context.cwd.as_deref())
                .map_err(|e| format!("`{program}`: {e}"))?
        }
        None => {
            if let Some(cwd) = &context.cwd {
                cmd.current_dir(cwd);
            }
        }
    }
    // A group of its own: a reader that goes away ends what the command started too.
    std::os::unix::process::CommandExt::process_group(cmd.as_std_mut(), 0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;
    let group = child.id();
    let (tx, rx) = mpsc::channel(EXEC_BUFFER);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    tokio::spawn(async move {
        let closed = tx.clone();
        let run = async move {
            let out = pump(stdout, tx.clone(), ExecChunk::Stdout);
            let err = pump(stderr, tx.clone(), ExecChunk::Stderr);
            if tokio::join!(out, err) != (true, true) {
                return;
            }
            let last = match child.wait().await {
                Ok(status) => ExecChunk::Exited(status.code()),
                Err(e) => ExecChunk::Failed(e.to_string()),
            };
            let _ = tx.send(last).await;
        };
        // A reader that goes away ends the command (the child is killed when dropped), even
        // one that writes nothing.
        tokio::select! {
            _ = closed.closed() => {
                if let Some(group) = group {
                    let _ = crate::os::kill_group(group, libc::SIGKILL);
                }
            }
            _ = run => {}
        }
    });
    Ok(rx)
}

/// `bytes` after what `carry` held, as text, but for a character cut at the end, which waits
/// in `carry` for its other bytes (output is read in pieces that need not end between
/// characters). Bytes that are no UTF-8 become U+FFFD: exec output is text.
fn complete_utf8(carry: &mut Vec<u8>, bytes: &[u8]) -> String {
    carry.extend_from_slice(bytes);
    let mut cut = carry.len();
    for back in 1..=carry.len().min(3) {
        let b = carry[carry.len() - back];
        if b & 0xC0 == 0x80 {
            continue;
        }
        let needs = match b {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        if needs > back {
            cut = carry.len() - back;
        }
        break;
    }
    let text = String::from_utf8_lossy(&carry[..cut]).into_owned();
    carry.drain(..cut);
    text
}

/// Copies a pipe into the channel; false when the reader went away.
async fn pump<R: tokio::io::AsyncRead + Unpin>(
    pipe: Option<R>,
    tx: mpsc::Sender<ExecChunk>,
    wrap: fn(Bytes) -> ExecChunk,
) -> bool {
    let Some(mut pipe) = pipe else {
        return true;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(n) => {
                if tx
                    .send(wrap(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
        }
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn refuse(status: StatusCode, message: String) -> Response<Body> {
    let line = serde_json::to_vec(&ExecOutput::Error { message }).unwrap_or_default();
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(line))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

/// `POST /v1/agent/tasks/{task}/exec` (already authorised).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    task: String,
    request: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let Ok(permit) = RUNNING.try_acquire() else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_EXECS} commands already run through this agent; try again shortly"),
        );
    };
    let body = match http_body_util::Limited::new(request.into_body(), 256 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("the request: {e}")),
    };
    let exec: ExecRequest = match serde_json::from_slice(&body) {
        Ok(exec) => exec,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("not an exec request: {e}")),
    };
    let dir = shared.tasks_dir().join(&task);
    let record: Option<TaskRecord> = (!task.contains('/') && !task.starts_with('.'))
        .then(|| std::fs::read(dir.join(TASK_RECORD)).ok())
        .flatten()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let Some(record) = record else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("no task `{task}` on node `{}`", shared.config.node_name),
        );
    };
    let Some(handle) = record.handle.clone() else {
        return refuse(
            StatusCode::CONFLICT,
            format!("task `{task}` is not running"),
        );
    };
    let Some(driver) = shared.drivers.get(&handle.driver) else {
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "the `{}` driver of task `{task}` is not available",
                handle.driver
            ),
        );
    };
    let context = match crate::runner::command_context_of(&shared, &record) {
        Ok(context) => context,
        Err(why) => return refuse(StatusCode::CONFLICT, why),
    };
    let mut rx = match driver.exec(&handle, &context, &exec.argv, exec.tty).await {
        Ok(rx) => rx,
        Err(e) => return refuse(StatusCode::CONFLICT, e.to_string()),
    };
    tracing::info!(task, program = %exec.argv.first().cloned().unwrap_or_default(), "exec");
    let (tx, out) = mpsc::channel::<Bytes>(EXEC_BUFFER);
    tokio::spawn(async move {
        // Held until the command has ended or its reader has gone (which ends the command).
        let _permit = permit;
        let mut carry = [Vec::new(), Vec::new()];
        loop {
            let chunk = tokio::select! {
                chunk = rx.recv() => chunk,
                // Gone, even while the command says nothing: dropping `rx` ends it.
                _ = tx.closed() => return,
            };
            let Some(chunk) = chunk else {
                return;
            };
            let lines = match chunk {
                ExecChunk::Stdout(b) => vec![ExecOutput::Stdout {
                    text: complete_utf8(&mut carry[0], &b),
                }],
                ExecChunk::Stderr(b) => vec![ExecOutput::Stderr {
                    text: complete_utf8(&mut carry[1], &b),
                }],
                ExecChunk::Exited(code) => vec![
                    ExecOutput::Stdout {
                        text: String::from_utf8_lossy(&std::mem::take(&mut carry[0])).into(),
                    },
                    ExecOutput::Stderr {
                        text: String::from_utf8_lossy(&std::mem::take(&mut carry[1])).into(),
                    },
                    ExecOutput::Exit { code },
                ],
                ExecChunk::Failed(message) => vec![ExecOutput::Error { message }],
            };
            for line in lines {
                if matches!(&line, ExecOutput::Stdout { text } | ExecOutput::Stderr { text } if text.is_empty())
                {
                    continue;
                }
                let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
                bytes.push(b'\n');
                if tx.send(Bytes::from(bytes)).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(out, |mut out| async move {
        out.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), out))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::complete_utf8;

    #[test]
    fn characters_cut_between_pieces_come_out_whole() {
        let text = "añ€😀z".as_bytes();
        for cut in 0..=text.len() {
            let mut carry = Vec::new();
            let mut out = complete_utf8(&mut carry, &text[..cut]);
            out.push_str(&complete_utf8(&mut carry, &text[cut..]));
            assert_eq!(out, "añ€😀z", "cut at {cut}");
            assert!(carry.is_empty());
        }
        let mut carry = Vec::new();
        assert_eq!(complete_utf8(&mut carry, b"a\xffb"), "a\u{fffd}b");
    }
}
