//! The shim: a tiny supervisor per task (the same binary, `dozen shim DIR`).
//!
//! It runs in its own session, so it outlives the agent that started it. It owns the task's
//! stdout/stderr (so the task never dies of SIGPIPE when the agent goes), appends them to
//! `output.log` with a timestamp per line, fsyncs that file in batches (a line counts once
//! fsynced), and records the exit status in `exit.json`. No async runtime and no threads: one
//! poll loop over the two pipes and the task's pidfd.
//!
//! Files in the task directory:
//! - `launch.json` (written by the agent): what to run
//! - `shim.pid`, `task.pid`: `PID STARTTIME`, so a reused pid is never mistaken for ours
//! - `output.log`: `MILLIS o|e TEXT` lines (and `output.log.1`, the half before)
//! - `log.dropped`: how many lines could not be written (a full disk)
//! - `exit.json`: how the task ended (or why it never started)
//! - `stopping` (written by the agent): the agent has sent the stop signal itself

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    /// Disk the task's logs may take; None: [`LOG_MAX_BYTES`].
    #[serde(default)]
    pub log_max_bytes: Option<u64>,
    /// A JSON object of environment variables to add (the task's secrets, for
    /// `secrets_as = "env"`), on a memory file system: never in this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<PathBuf>,
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
/// A task's logs take at most this much disk unless its service says otherwise: two files of
/// half of it each.
pub const LOG_MAX_BYTES: u64 = dozen_spec::DEFAULT_LOG_BYTES;
/// How many lines of output could not be written, as a right-aligned number.
pub const LOG_DROPPED: &str = "log.dropped";

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

/// Where the task's output goes: buffered lines, appended and fsynced in batches, rotated at
/// half the cap. A write that fails (a full disk) never blocks the task: its lines are dropped
/// and counted, the count kept in `log.dropped` and said in the log once writes work again.
struct LogSink {
    file: File,
    buffer: Vec<u8>,
    /// Lines in `buffer`.
    lines: u64,
    dir: PathBuf,
    /// Bytes in the current file.
    size: u64,
    cap: u64,
    dropped: u64,
    /// How many of the dropped lines the log already says were dropped.
    dropped_said: u64,
    last_error: String,
    /// `log.dropped`, made at start so that updating it in place needs no new disk blocks.
    counter: Option<File>,
    last_flush: Instant,
}

impl LogSink {
    fn push(&mut self, stream: u8, text: &[u8]) {
        let ts = wall_ms();
        // Pieces of at most MAX_LINE; an empty line is a line too.
        let mut rest = text;
        loop {
            let (piece, more) = rest.split_at(rest.len().min(MAX_LINE));
            self.buffer
                .extend_from_slice(format!("{ts} {} ", stream as char).as_bytes());
            self.buffer.extend_from_slice(piece);
            self.buffer.push(b'\n');
            self.lines += 1;
            rest = more;
            if rest.is_empty() {
                break;
            }
        }
        // Whatever the flush pace, what waits in memory stays small, and a batch never
        // outgrows half the cap (so neither file does).
        if self.buffer.len() as u64 >= (self.cap / 4).min(1024 * 1024) {
            self.flush();
        }
    }
    fn flush(&mut self) {
        self.last_flush = Instant::now();
        if self.buffer.is_empty() {
            return;
        }
        if self.dropped > self.dropped_said {
            let note = format!(
                "{} e [dozen] {} line(s) of output were dropped: cannot write {LOG}: {}\n",
                wall_ms(),
                self.dropped - self.dropped_said,
                self.last_error
            );
            if self.append(note.as_bytes()).is_ok() {
                self.dropped_said = self.dropped;
            }
        }
        let buffer = std::mem::take(&mut self.buffer);
        if let Err(e) = self.append(&buffer) {
            self.dropped += self.lines;
            self.last_error = e.to_string();
            if let Some(counter) = &self.counter {
                let _ = counter.write_at(format!("{:>20}\n", self.dropped).as_bytes(), 0);
            }
        }
        self.buffer = buffer;
        self.buffer.clear();
        self.lines = 0;
    }
    /// Appends whole lines and fsyncs them; on failure the file is cut back to where it was.
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        // Rotate at half the cap: the current file and the one before stay, at most the cap.
        if self.size > 0 && self.size + bytes.len() as u64 > self.cap / 2 {
            self.rotate();
        }
        match self
            .file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data())
        {
            Ok(()) => {
                self.size += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.size);
                Err(e)
            }
        }
    }
    fn rotate(&mut self) {
        let (current, previous) = (self.dir.join(LOG), self.dir.join(LOG_PREVIOUS));
        let reopened = std::fs::rename(&current, &previous)
            .and_then(|()| OpenOptions::new().create(true).append(true).open(&current));
        match reopened {
            Ok(file) => self.file = file,
            // Whatever failed, the cap holds: the older half goes instead of moving.
            Err(_) => {
                let _ = self.file.set_len(0);
            }
        }
        self.size = 0;
    }
}

/// How many lines of a task's output were dropped because they could not be written.
pub fn dropped_lines(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(LOG_DROPPED))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// One of the task's output pipes, read without blocking. A line is cut at MAX_LINE while it
/// is read (never buffered whole: a task's output must not grow the shim without bound), and
/// the cut is said in the log.
struct Pipe {
    file: File,
    stream: u8,
    line: Vec<u8>,
    split: bool,
    open: bool,
}

impl Pipe {
    fn new(fd: impl Into<OwnedFd>, stream: u8) -> Pipe {
        let fd: OwnedFd = fd.into();
        let _ = os::set_nonblocking(&fd);
        Pipe {
            file: File::from(fd),
            stream,
            line: Vec::with_capacity(256),
            split: false,
            open: true,
        }
    }
    /// Reads what the pipe holds, a few chunks at most so the other pipe gets its turn.
    fn read(&mut self, chunk: &mut [u8], sink: &mut LogSink) {
        for _ in 0..4 {
            match (&self.file).read(chunk) {
                Ok(0) => return self.close(sink),
                Ok(n) => self.take(&chunk[..n], sink),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(sink),
            }
        }
    }
    fn take(&mut self, mut bytes: &[u8], sink: &mut LogSink) {
        while !bytes.is_empty() {
            let room = MAX_LINE - self.line.len();
            let (take, ended) = match bytes.iter().take(room).position(|b| *b == b'\n') {
                Some(at) => (at + 1, true),
                None => (bytes.len().min(room), false),
            };
            self.line.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if ended {
                self.line.pop();
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                sink.push(self.stream, &self.line);
                self.line.clear();
                self.split = false;
            } else if self.line.len() >= MAX_LINE {
                sink.push(self.stream, &self.line);
                self.line.clear();
                if !self.split {
                    let note = format!(
                        "[dozen] the line above was longer than {} KiB: it goes on in the next line(s)",
                        MAX_LINE / 1024
                    );
                    sink.push(self.stream, note.as_bytes());
                    self.split = true;
                }
            }
        }
    }
    fn close(&mut self, sink: &mut LogSink) {
        if !self.line.is_empty() {
            sink.push(self.stream, &self.line);
            self.line.clear();
        }
        self.open = false;
    }
}

/// The task's pipes and the log they feed, driven by one poll loop: no threads.
struct Output {
    pipes: Vec<Pipe>,
    sink: LogSink,
    chunk: Vec<u8>,
    next_trim: Instant,
}

impl Output {
    fn open(&self) -> bool {
        self.pipes.iter().any(|p| p.open)
    }
    /// Waits up to `timeout` for output (or for `also` to become readable), reads what came,
    /// and flushes the log when a batch is due. Returns whether `also` is readable.
    fn pump(&mut self, also: Option<i32>, timeout: Duration) -> bool {
        let mut fds: Vec<i32> = self
            .pipes
            .iter()
            .filter(|p| p.open)
            .map(|p| p.file.as_raw_fd())
            .collect();
        let pipes = fds.len();
        fds.extend(also);
        // Never wait past a due flush (a line counts once it is on disk) or a due trim.
        let now = Instant::now();
        let flush_due = (self.sink.last_flush + FLUSH_EVERY).saturating_duration_since(now);
        let mut timeout = timeout.min(self.next_trim.saturating_duration_since(now));
        if !self.sink.buffer.is_empty() {
            timeout = timeout.min(flush_due);
        }
        let ready = os::wait_readable(&fds, timeout);
        let mut ready_pipes = ready[..pipes].iter();
        for pipe in self.pipes.iter_mut().filter(|p| p.open) {
            if ready_pipes.next() == Some(&true) {
                pipe.read(&mut self.chunk, &mut self.sink);
            }
        }
        if self.sink.last_flush.elapsed() >= FLUSH_EVERY {
            self.sink.flush();
        }
        if Instant::now() >= self.next_trim {
            // What stays resident is what the steady state (read, append, fsync) runs.
            os::trim_clean_file_pages();
            self.next_trim = Instant::now() + TRIM_EVERY;
        }
        also.is_some() && ready.get(pipes) == Some(&true)
    }
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
    let launch: Launch = match std::fs::read(dir.join(LAUNCH))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot read {}: {e}", dir.join(LAUNCH).display())),
    };
    let log = match OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG))
    {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot open {}: {e}", dir.join(LOG).display())),
    };
    let counter = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.join(LOG_DROPPED))
        .ok();
    let dropped = dropped_lines(dir);
    if let Some(counter) = &counter {
        let _ = counter.write_at(format!("{dropped:>20}\n").as_bytes(), 0);
    }
    let Some((program, args)) = launch.argv.split_first() else {
        return fail("empty command".into());
    };
    let secret_env: BTreeMap<String, String> = match &launch.secret_env {
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(values) => values,
            Err(e) => return fail(format!("cannot read the task's secrets ({e})")),
        },
        None => BTreeMap::new(),
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&launch.env)
        .envs(&secret_env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    os::join_cgroups_before_exec(&mut cmd, launch.cgroup_procs.clone());
    if let Some(mask) = launch.umask {
        os::umask_before_exec(&mut cmd, mask);
    }
    match launch.uid {
        // Last, with the shim's rights until then: cgroups joined, the working directory
        // entered (it may be under the data directory, which only dozen's user can reach).
        Some(uid) => {
            let gid = launch.gid.unwrap_or(uid);
            if let Err(e) = os::switch_user_before_exec(&mut cmd, uid, gid, launch.cwd.as_deref()) {
                return fail(format!("cannot run as {uid}:{gid}: {e}"));
            }
        }
        None => {
            if let Some(cwd) = &launch.cwd {
                cmd.current_dir(cwd);
            }
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start `{program}`: {e}")),
    };
    let started_at_ms = wall_ms();
    let task_pid = child.id();
    let _ = write_pid_file(&dir.join(TASK_PID), task_pid);

    let size = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut pipes = Vec::with_capacity(2);
    if let Some(out) = child.stdout.take() {
        pipes.push(Pipe::new(out, b'o'));
    }
    if let Some(err) = child.stderr.take() {
        pipes.push(Pipe::new(err, b'e'));
    }
    let mut output = Output {
        pipes,
        sink: LogSink {
            file: log,
            buffer: Vec::with_capacity(64 * 1024),
            lines: 0,
            dir: dir.to_path_buf(),
            size,
            // However small a launch asks: two halves must each hold a batch and a long line.
            cap: launch
                .log_max_bytes
                .unwrap_or(LOG_MAX_BYTES)
                .max(dozen_spec::MIN_LOG_BYTES),
            dropped,
            dropped_said: dropped,
            last_error: String::new(),
            counter,
            last_flush: Instant::now(),
        },
        chunk: vec![0; 16 * 1024],
        next_trim: Instant::now() + TRIM_FIRST,
    };
    // Everything is set up: give back the code pages start-up touched.
    os::trim_clean_file_pages();
    // Wait without reaping: until the final SIGKILL below, the task's pid (its process group
    // id) stays ours, so no signal to the group can reach a process that reused the number.
    // Without pidfds (kernels before 5.3) the exit is looked for every GROUP_POLL.
    let exit_fd = os::pidfd_open(task_pid).ok();
    let (also, idle) = match &exit_fd {
        Some(fd) => (Some(fd.as_raw_fd()), TRIM_EVERY),
        None => (None, GROUP_POLL),
    };
    let waited = loop {
        let exited = output.pump(also, idle);
        if exited || exit_fd.is_none() {
            match os::exited_keep_zombie(task_pid) {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        }
    };
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
    let deadline = Instant::now() + linger;
    while waited.is_ok()
        && (output.open() || os::group_has_others(task_pid, task_pid))
        && Instant::now() < deadline
    {
        let left = deadline.saturating_duration_since(Instant::now());
        output.pump(None, left.min(GROUP_POLL));
    }
    // Whatever the task started dies with it: an orphan would keep its port and our pipes.
    let _ = os::kill_group(task_pid, libc::SIGKILL);
    let status = child.wait();
    let deadline = Instant::now() + FINAL_DRAIN;
    while output.open() && Instant::now() < deadline {
        output.pump(None, deadline.saturating_duration_since(Instant::now()));
    }
    // Out of time: what the pipes hold now, and the last partial lines, still go in the log.
    for pipe in output.pipes.iter_mut().filter(|p| p.open) {
        pipe.read(&mut output.chunk, &mut output.sink);
        if pipe.open {
            pipe.close(&mut output.sink);
        }
    }
    output.sink.flush();
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
