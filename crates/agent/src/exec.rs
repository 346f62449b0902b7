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
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;
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
            _ = closed.closed() => {}
            _ = run => {}
        }
    });
    Ok(rx)
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
        let _permit = permit;
        while let Some(chunk) = rx.recv().await {
            let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
            let line = match &chunk {
                ExecChunk::Stdout(b) => ExecOutput::Stdout { text: text(b) },
                ExecChunk::Stderr(b) => ExecOutput::Stderr { text: text(b) },
                ExecChunk::Exited(code) => ExecOutput::Exit { code: *code },
                ExecChunk::Failed(message) => ExecOutput::Error {
                    message: message.clone(),
                },
            };
            let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
            bytes.push(b'\n');
            if tx.send(Bytes::from(bytes)).await.is_err() {
                return;
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
