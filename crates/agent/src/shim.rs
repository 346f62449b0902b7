//! The shim: a tiny supervisor per task (the same binary, `dozen shim DIR`).
//!
//! It runs in its own session, so it outlives the agent that started it. It owns the task's
//! stdout/stderr (so the task never dies of SIGPIPE when the agent goes), appends them to
//! `output.log` with a timestamp per line, fsyncs that file in batches (a line counts once
//! fsynced), and records the exit status in `exit.json`. No async runtime: a thread per pipe.
//!
//! Files in the task directory:
//! - `launch.json` (written by the agent): what to run
//! - `shim.pid`, `task.pid`: `PID STARTTIME`, so a reused pid is never mistaken for ours
//! - `output.log`: `MILLIS o|e TEXT` lines
//! - `exit.json`: how the task ended (or why it never started)
//! - `stopping` (written by the agent): the agent has sent the stop signal itself

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::os;

/// Longest log line kept whole; longer ones are split.
const MAX_LINE: usize = 64 * 1024;
/// When the shim gives back code pages again after start-up, and how often after that.
const TRIM_FIRST: Duration = Duration::from_secs(2);
const TRIM_EVERY: Duration = Duration::from_secs(60);
/// How often buffered log lines are written and fsynced.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// `cgroup.procs` files the task joins before it execs (the shim stays outside).
    pub cgroup_procs: Vec<PathBuf>,
    /// When the task itself exits, what it started is stopped like a task: `stop_signal`,
    /// then SIGKILL once `linger_ms` (its stop timeout) is over. So a shell-form command's
    /// `sh`, which dies at once on SIGTERM, does not cut short the graceful shutdown of the
    /// program it started; and children left behind by a crash are not left running.
    #[serde(default)]
    pub linger_ms: Option<u64>,
    #[serde(default)]
    pub stop_signal: Option<i32>,
    /// The task's umask (the one dozen was started with); None: the shim's own.
    #[serde(default)]
    pub umask: Option<u32>,
}

/// How long the rest of a task's process group may linger when the launch does not say.
const DEFAULT_LINGER: Duration = Duration::from_secs(2);
/// After the final SIGKILL, how long the pipes get to close.
const FINAL_DRAIN: Duration = Duration::from_millis(500);
/// How often the shim looks whether the rest of the task's process group has gone.
const GROUP_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: u64,
    /// Set when the task could not be started at all.
    pub error: Option<String>,
}

pub const LAUNCH: &str = "launch.json";
pub const SHIM_PID: &str = "shim.pid";
pub const TASK_PID: &str = "task.pid";
/// Written by the agent before it sends the stop signal: the task is being stopped.
pub const STOPPING: &str = "stopping";
pub const EXIT: &str = "exit.json";
pub const LOG: &str = "output.log";
/// The log before the current one: `output.log` moves here when it reaches half the cap.
pub const LOG_PREVIOUS: &str = "output.log.1";
/// A task's logs take at most this much disk: two files of half of it each.
pub const LOG_MAX_BYTES: u64 = 100 * 1024 * 1024;

pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `PID STARTTIME` of the running process, written atomically.
pub fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    let start = os::process_start_time(pid).unwrap_or(0);
    os::write_atomic(path, format!("{pid} {start}\n").as_bytes())
}

pub fn read_pid_file(path: &Path) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let mut it = s.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn write_exit(dir: &Path, record: &ExitRecord) {
    let bytes = serde_json::to_vec(record).unwrap_or_default();
    // Nothing else to do if this fails: the agent treats a missing exit file of a dead shim as
    // "ended, status unknown".
    let _ = os::write_atomic(&dir.join(EXIT), &bytes);
}

/// Buffered log sink shared by the two pipe readers.
struct LogSink {
    file: File,
    buffer: Vec<u8>,
    dir: std::path::PathBuf,
    /// Bytes in the current file.
    size: u64,
}

impl LogSink {
    fn push(&mut self, stream: u8, text: &[u8]) {
        let ts = wall_ms();
        for chunk in text.chunks(MAX_LINE) {
            self.buffer
                .extend_from_slice(format!("{ts} {} ", stream as char).as_bytes());
            self.buffer.extend_from_slice(chunk);
            self.buffer.push(b'\n');
        }
    }
    fn flush(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        // Rotate at half the cap: the current file and the one before stay, at most the cap.
        if self.size > 0 && self.size + self.buffer.len() as u64 > LOG_MAX_BYTES / 2 {
            self.rotate();
        }
        if self.file.write_all(&self.buffer).is_ok() {
            let _ = self.file.sync_data();
            self.size += self.buffer.len() as u64;
        }
        self.buffer.clear();
    }
    fn rotate(&mut self) {
        let (current, previous) = (self.dir.join(LOG), self.dir.join(LOG_PREVIOUS));
        if std::fs::rename(&current, &previous).is_err() {
            return;
        }
        if let Ok(file) = OpenOptions::new().create(true).append(true).open(&current) {
            self.file = file;
            self.size = 0;
        }
    }
}

fn pump(reader: impl std::io::Read, stream: u8, sink: Arc<Mutex<LogSink>>) {
    let mut reader = BufReader::with_capacity(16 * 1024, reader);
    let mut line = Vec::with_capacity(256);
    // A line is cut at MAX_LINE while it is read (never buffered whole: a task's output
    // must not grow the shim without bound), and the cut is said in the log.
    let mut split = false;
    loop {
        let available = match reader.fill_buf() {
            Ok([]) | Err(_) => {
                if !line.is_empty() {
                    emit(&sink, stream, &mut line);
                }
                return;
            }
            Ok(bytes) => bytes,
        };
        let room = MAX_LINE - line.len();
        let (take, ended) = match available.iter().take(room).position(|b| *b == b'\n') {
            Some(at) => (at + 1, true),
            None => (available.len().min(room), false),
        };
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if ended {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            emit(&sink, stream, &mut line);
            split = false;
        } else if line.len() >= MAX_LINE {
            emit(&sink, stream, &mut line);
            if !split {
                let note = format!(
                    "[dozen] the line above was longer than {} KiB: it goes on in the next line(s)",
                    MAX_LINE / 1024
                );
                emit(&sink, stream, &mut note.into_bytes());
                split = true;
            }
        }
    }
}

fn emit(sink: &Arc<Mutex<LogSink>>, stream: u8, line: &mut Vec<u8>) {
    if let Ok(mut s) = sink.lock() {
        s.push(stream, line);
        // Whatever the flusher's pace, what waits in memory stays small.
        if s.buffer.len() >= 1024 * 1024 {
            s.flush();
        }
    }
    line.clear();
}

/// Entry point of `dozen shim DIR`. Returns the shim's own exit code.
pub fn main(dir: &Path) -> i32 {
    // Leave the agent's session and process group: a Ctrl-C or kill aimed at the agent's group
    // must not reach the shim or its task.
    let _ = os::setsid();
    os::one_malloc_arena();
    if write_pid_file(&dir.join(SHIM_PID), std::process::id()).is_err() {
        return 1;
    }
    let launch: Launch = match std::fs::read(dir.join(LAUNCH))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(l) => l,
        Err(e) => {
            write_exit(
                dir,
                &ExitRecord {
                    code: None,
                    signal: None,
                    started_at_ms: None,
                    finished_at_ms: wall_ms(),
                    error: Some(format!("cannot read {}: {e}", dir.join(LAUNCH).display())),
                },
            );
            return 0;
        }
    };
    let fail = |error: String| {
        write_exit(
            dir,
            &ExitRecord {
                code: None,
                signal: None,
                started_at_ms: None,
                finished_at_ms: wall_ms(),
                error: Some(error),
            },
        );
        0
    };
    let log = match OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG))
    {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot open {}: {e}", dir.join(LOG).display())),
    };
    let Some((program, args)) = launch.argv.split_first() else {
        return fail("empty command".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&launch.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    os::join_cgroups_before_exec(&mut cmd, launch.cgroup_procs.clone());
    if let Some(mask) = launch.umask {
        os::umask_before_exec(&mut cmd, mask);
    }
    if let Some(cwd) = &launch.cwd {
        cmd.current_dir(cwd);
    }
    if let Some(gid) = launch.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = launch.uid {
        cmd.uid(uid);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start `{program}`: {e}")),
    };
    let started_at_ms = wall_ms();
    let _ = write_pid_file(&dir.join(TASK_PID), child.id());

    let size = log.metadata().map(|m| m.len()).unwrap_or(0);
    let sink = Arc::new(Mutex::new(LogSink {
        file: log,
        buffer: Vec::with_capacity(64 * 1024),
        dir: dir.to_path_buf(),
        size,
    }));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut readers = 0;
    if let Some(out) = child.stdout.take() {
        let (sink, done) = (sink.clone(), done_tx.clone());
        readers += 1;
        std::thread::spawn(move || {
            pump(out, b'o', sink);
            let _ = done.send(());
        });
    }
    if let Some(err) = child.stderr.take() {
        let (sink, done) = (sink.clone(), done_tx.clone());
        readers += 1;
        std::thread::spawn(move || {
            pump(err, b'e', sink);
            let _ = done.send(());
        });
    }
    drop(done_tx);
    {
        let sink = sink.clone();
        std::thread::spawn(move || {
            // Trim again once start-up is behind us, then now and then: what stays resident
            // is what the steady state (read a line, append, fsync) actually runs.
            let mut next_trim = std::time::Instant::now() + TRIM_FIRST;
            loop {
                std::thread::sleep(FLUSH_EVERY);
                if let Ok(mut s) = sink.lock() {
                    s.flush();
                }
                if std::time::Instant::now() >= next_trim {
                    os::trim_clean_file_pages();
                    next_trim = std::time::Instant::now() + TRIM_EVERY;
                }
            }
        });
    }
    // Everything is set up: give back the code pages start-up touched.
    os::trim_clean_file_pages();
    // Wait without reaping: until the final SIGKILL below, the task's pid (its process group
    // id) stays ours, so no signal to the group can reach a process that reused the number.
    let task_pid = child.id();
    let waited = os::wait_exit_keep_zombie(task_pid);
    // What the task started is stopped as the task would be (as systemd does with a unit's
    // control group): the stop signal, unless the agent is stopping the task and so has sent
    // it already (a second one tells many programs to give up on a graceful shutdown), then
    // SIGKILL once the linger time is over. Until the group is empty and the pipes closed, the
    // last lines may still come.
    if !dir.join(STOPPING).exists() {
        let _ = os::kill_group(task_pid, launch.stop_signal.unwrap_or(libc::SIGTERM));
    }
    let linger = launch
        .linger_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_LINGER);
    let deadline = std::time::Instant::now() + linger;
    let mut open_pipes = readers;
    loop {
        while open_pipes > 0 && done_rx.try_recv().is_ok() {
            open_pipes -= 1;
        }
        if waited.is_err()
            || (open_pipes == 0 && !os::group_has_others(task_pid, task_pid))
            || std::time::Instant::now() >= deadline
        {
            break;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if done_rx.recv_timeout(left.min(GROUP_POLL)).is_ok() {
            open_pipes -= 1;
        }
    }
    // Whatever the task started dies with it: an orphan would keep its port and our pipes.
    let _ = os::kill_group(task_pid, libc::SIGKILL);
    let status = child.wait();
    while open_pipes > 0 && done_rx.recv_timeout(FINAL_DRAIN).is_ok() {
        open_pipes -= 1;
    }
    if let Ok(mut s) = sink.lock() {
        s.flush();
    }
    let (code, signal, error) = match status {
        Ok(st) => (st.code(), st.signal(), None),
        Err(e) => (
            None,
            None,
            Some(format!("waiting for the task failed: {e}")),
        ),
    };
    write_exit(
        dir,
        &ExitRecord {
            code,
            signal,
            started_at_ms: Some(started_at_ms),
            finished_at_ms: wall_ms(),
            error,
        },
    );
    0
}
