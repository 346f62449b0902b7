//! The audit trail as files: each API server appends to its own hash chain in its data dir
//! (`audit/<first seq>.log`, one JSON record per line). A record is durable before
//! [`AuditLog::record`] returns, so a request that cannot be audited is refused rather than
//! answered. Group commit keeps that fast: one thread writes whatever records have queued
//! while the previous fsync ran, then one fsync for all of them.
//!
//! The live segment is zeroed ahead of its last record, in chunks that grow with it (64 KiB
//! to 256 KiB): a record is then written over zeros the file already holds, and its fdatasync
//! flushes that data alone, without the inode's size (one device round trip fewer, which
//! is most of the cost of a synced append). Readers stop at the first zero byte (a record,
//! being JSON, has none); a closed segment is cut to its last record.
//!
//! A busy server (its live segment past 256 KiB) has a thread write a segment's worth of
//! zeros into a spare file, paced, and the next segment is that file: the writer never waits
//! for zeros to be written then.
//!
//! Bounds: at most [`QUEUE`] records wait; a segment is closed at [`SEGMENT_BYTES`] and at
//! most [`KEEP_SEGMENTS`] times that is kept (the oldest go first; the chain then starts at
//! the oldest kept record, and `verify` says so), plus one spare of [`SEGMENT_BYTES`], plus
//! what recovery sets aside (`cut-<ms>.bin`, only when a start finds more than a torn line).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use dozen_params::audit::{self, Broken, ChainKey, Event, Record, Tip};
use tokio::sync::{mpsc, oneshot};

/// Records waiting for the writer at most; callers wait for room beyond it.
pub const QUEUE: usize = 8192;
/// Most records one fsync covers.
const BATCH: usize = 4096;
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
pub const KEEP_SEGMENTS: usize = 16;
/// Zeros written ahead of the live segment's last record: as many as it holds already,
/// within these bounds.
const ZEROED_AHEAD_MIN: u64 = 64 * 1024;
const ZEROED_AHEAD_MAX: u64 = 256 * 1024;
/// The spare segment of zeros, and the name it is made under.
const SPARE: &str = "spare.zeros";
const SPARE_MAKING: &str = "spare.zeros.part";

/// Where segments close and when a spare is made (smaller in tests).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    segment: u64,
    /// A spare is made once the live segment holds this much.
    spare_after: u64,
}

const SIZES: Sizes = Sizes {
    segment: SEGMENT_BYTES,
    spare_after: ZEROED_AHEAD_MAX,
};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the audit trail cannot be written ({0}); the request is refused because it cannot be audited")]
    Write(String),
    #[error(
        "the audit trail's writer has stopped; the request is refused because it cannot be audited"
    )]
    Stopped,
}

type Pending = (Event, oneshot::Sender<Result<u64, AuditError>>);

pub struct AuditLog {
    dir: PathBuf,
    sender: mpsc::Sender<Pending>,
    key: std::sync::Arc<ChainKey>,
}

/// Which records a query wants.
#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    pub since_ms: Option<u64>,
    pub who: Option<String>,
    pub action: Option<String>,
    /// A prefix of the target (`/shop/` takes in everything under it).
    pub target: Option<String>,
    pub outcome: Option<String>,
    /// The newest this many.
    pub limit: usize,
}

/// How a verification went.
#[derive(Debug, Clone)]
pub struct Verified {
    pub tip: Tip,
    /// The first record's sequence number (above 1 when old segments were removed).
    pub first_seq: u64,
    pub broken: Option<Broken>,
}

impl AuditLog {
    /// Opens (or starts) the chain in `dir` for server `server`, and starts its writer. A
    /// record a crash left half-written (never acknowledged) is zeroed first; the chain goes
    /// on in the last segment.
    pub fn open(dir: &Path, server: &str, key: ChainKey) -> std::io::Result<AuditLog> {
        AuditLog::open_sized(dir, server, key, SIZES)
    }

    fn open_sized(
        dir: &Path,
        server: &str,
        key: ChainKey,
        sizes: Sizes,
    ) -> std::io::Result<AuditLog> {
        std::fs::create_dir_all(dir)?;
        // A spare cut short by a crash is made again when it is wanted.
        match std::fs::remove_file(dir.join(SPARE_MAKING)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let spare = match std::fs::metadata(dir.join(SPARE)) {
            Ok(m) if m.len() == sizes.segment => Spare::Ready,
            Ok(_) => {
                std::fs::remove_file(dir.join(SPARE))?;
                Spare::None
            }
            Err(_) => Spare::None,
        };
        let key = std::sync::Arc::new(key);
        let (tip, file) = recover(dir)?;
        let verified = verify_dir(dir, &key)?;
        if let Some(broken) = &verified.broken {
            tracing::error!(dir = %dir.display(), %broken, "the audit trail was altered; new records carry on from its last record");
        }
        let (sender, receiver) = mpsc::channel(QUEUE);
        let writer = Writer {
            dir: dir.to_path_buf(),
            server: server.to_string(),
            tip,
            file,
            key: key.clone(),
            sizes,
            spare,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(receiver))?;
        Ok(AuditLog {
            dir: dir.to_path_buf(),
            sender,
            key,
        })
    }

    /// Appends `event`; returns its sequence number once it is on disk.
    ///
    /// Once called, the record is written even if the caller stops waiting: queued at once,
    /// or, when the queue is full, by a task of its own that waits for room.
    pub async fn record(&self, event: Event) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        match self.sender.try_send((event, done)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(pending)) => {
                let sender = self.sender.clone();
                tokio::spawn(async move {
                    let _ = sender.send(pending).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(AuditError::Stopped),
        }
        wait.await.map_err(|_| AuditError::Stopped)?
    }

    /// The records `filter` takes, oldest first.
    pub fn read(&self, filter: &AuditFilter) -> std::io::Result<Vec<Record>> {
        let limit = filter.limit.clamp(1, 10_000);
        let mut kept = std::collections::VecDeque::with_capacity(limit.min(1024));
        for segment in segments(&self.dir)? {
            let mut reader = BufReader::new(File::open(segment)?);
            let mut line = Vec::new();
            while next_line(&mut reader, &mut line)? {
                let Ok(record) = serde_json::from_slice::<Record>(&line) else {
                    continue;
                };
                if filter.since_ms.is_some_and(|s| record.event.at_ms < s)
                    || filter.who.as_ref().is_some_and(|w| &record.event.who != w)
                    || filter
                        .action
                        .as_ref()
                        .is_some_and(|a| &record.event.action != a)
                    || filter
                        .target
                        .as_ref()
                        .is_some_and(|t| !record.event.target.starts_with(t.as_str()))
                    || filter
                        .outcome
                        .as_ref()
                        .is_some_and(|o| record.event.outcome.as_str() != o)
                {
                    continue;
                }
                if kept.len() == limit {
                    kept.pop_front();
                }
                kept.push_back(record);
            }
        }
        Ok(kept.into())
    }

    /// Follows the whole chain on disk.
    pub fn verify(&self) -> std::io::Result<Verified> {
        verify_dir(&self.dir, &self.key)
    }
}

/// The segment files of `dir`, oldest first.
fn segments(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let seq = name.strip_suffix(".log")?.parse::<u64>().ok()?;
            Some((seq, e.path()))
        })
        .collect();
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Reads a segment's next whole line into `line` (without its newline); false at the end of
/// its records: the end of the file, the first zero byte, or a last line still being written.
fn next_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<bool> {
    line.clear();
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(false);
        }
        match buf.iter().position(|b| *b == b'\n' || *b == 0) {
            Some(at) if buf[at] == 0 => return Ok(false),
            Some(at) => {
                line.extend_from_slice(&buf[..at]);
                reader.consume(at + 1);
                return Ok(true);
            }
            None => {
                let n = buf.len();
                line.extend_from_slice(buf);
                reader.consume(n);
            }
        }
    }
}

/// What a segment's bytes hold: everything before the first zero byte.
fn written(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// The tip of the chain on disk and the last segment to append to (None: start one). Zeroes
/// whatever follows the last segment's last whole record (a record a crash left half-written,
/// never acknowledged), and removes a last segment left empty.
fn recover(dir: &Path) -> std::io::Result<(Tip, Option<Segment>)> {
    let mut all = segments(dir)?;
    while let Some(last) = all.pop() {
        let bytes = std::fs::read(&last)?;
        let mut keep = 0usize;
        let mut tip = None;
        for line in written(&bytes).split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") {
                break;
            }
            let Ok(r) = serde_json::from_slice::<Record>(&line[..line.len() - 1]) else {
                break;
            };
            keep += line.len();
            tip = Some(Tip {
                records: 0,
                seq: r.seq,
                hash: r.hash,
            });
        }
        let Some(tip) = tip else {
            // Nothing whole in it: it goes, and the one before carries the chain.
            set_aside(dir, &last, &bytes)?;
            std::fs::remove_file(&last)?;
            File::open(dir)?.sync_all()?;
            continue;
        };
        let file = OpenOptions::new().write(true).open(&last)?;
        if let Some(stray) = bytes[keep..].iter().rposition(|b| *b != 0) {
            let stray = &bytes[keep..keep + stray + 1];
            tracing::warn!(file = %last.display(), cut = stray.len(), "zeroing a half-written audit record (never acknowledged)");
            set_aside(dir, &last, stray)?;
            file.write_all_at(&vec![0; stray.len()], keep as u64)?;
            file.sync_data()?;
        }
        return Ok((
            tip,
            Some(Segment {
                file,
                end: keep as u64,
                zeroed: bytes.len() as u64,
            }),
        ));
    }
    Ok((Tip::default(), None))
}

/// Keeps what recovery takes out of the trail when it is more than one torn line (a crash
/// tears only the batch in progress, but whole lines after a gap may be records someone
/// blanked the way to): `audit/cut-<ms>.bin`, one per start that finds such bytes.
fn set_aside(dir: &Path, segment: &Path, stray: &[u8]) -> std::io::Result<()> {
    let torn_line_only = !stray.contains(&b'\n') && !stray.contains(&0);
    if torn_line_only || stray.iter().all(|b| *b == 0) {
        return Ok(());
    }
    let kept = dir.join(format!("cut-{}.bin", crate::wall_ms()));
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&kept)?;
    std::io::Write::write_all(&mut file, stray)?;
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    tracing::error!(segment = %segment.display(), kept = %kept.display(), bytes = stray.len(), "the audit trail held bytes after its last whole record beyond a torn line; they are kept aside, and the chain goes on without them");
    Ok(())
}

/// Where non-zero bytes follow the zeros that end a segment's records, if they do.
fn after_gap(bytes: &[u8]) -> Option<usize> {
    let end = written(bytes).len();
    bytes[end..].iter().position(|b| *b != 0).map(|at| end + at)
}

fn verify_dir(dir: &Path, key: &ChainKey) -> std::io::Result<Verified> {
    let mut tip = Tip::default();
    let mut first_seq = 0;
    let all = segments(dir)?;
    for (i, segment) in all.iter().enumerate() {
        let mut bytes = std::fs::read(segment)?;
        if i + 1 == all.len() && after_gap(&bytes).is_some() {
            // The live segment, read while a batch was being written: once more.
            bytes = std::fs::read(segment)?;
        }
        let records = written(&bytes);
        // The live segment's last line may be in the middle of being written: whole ones only.
        let whole = if i + 1 == all.len() {
            records
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |at| at + 1)
        } else {
            records.len()
        };
        let text = String::from_utf8_lossy(&records[..whole]);
        let lines: Vec<&str> = text.lines().collect();
        if tip.hash.is_empty() {
            // The oldest kept segment: its first record starts the chain (it follows the
            // genesis only when nothing was removed before it).
            if let Some(first) = lines
                .first()
                .and_then(|l| serde_json::from_str::<Record>(l).ok())
            {
                // A segment is named after its first record: lines cut from its head show.
                let named = segment
                    .file_stem()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse::<u64>().ok());
                if named != Some(first.seq) {
                    return Ok(Verified {
                        tip,
                        first_seq: first.seq,
                        broken: Some(Broken {
                            seq: first.seq,
                            line: 1,
                            reason: format!(
                                "{} starts at record {} (records were removed from its head)",
                                segment.display(),
                                first.seq
                            ),
                        }),
                    });
                }
                first_seq = first.seq;
                if first.seq > 1 {
                    tip = Tip {
                        records: 0,
                        seq: first.seq - 1,
                        hash: first.prev.clone(),
                    };
                }
            }
        }
        match audit::verify(key, lines.iter().copied(), tip.clone()) {
            Ok(t) => tip = t,
            Err(mut broken) => {
                broken.reason = format!("{} (in {})", broken.reason, segment.display());
                return Ok(Verified {
                    tip,
                    first_seq,
                    broken: Some(broken),
                });
            }
        }
        if let Some(at) = after_gap(&bytes) {
            return Ok(Verified {
                broken: Some(Broken {
                    seq: tip.seq + 1,
                    line: lines.len() + 1,
                    reason: format!(
                        "{} holds bytes after the zeros that end its records (at byte {at}): records were blanked",
                        segment.display()
                    ),
                }),
                tip,
                first_seq,
            });
        }
    }
    Ok(Verified {
        tip,
        first_seq,
        broken: None,
    })
}

struct Writer {
    dir: PathBuf,
    server: String,
    tip: Tip,
    file: Option<Segment>,
    key: std::sync::Arc<ChainKey>,
    sizes: Sizes,
    spare: Spare,
}

/// The spare segment of zeros.
enum Spare {
    None,
    Making(std::thread::JoinHandle<std::io::Result<()>>),
    Ready,
    /// Making one failed: not tried again before the next segment.
    Failed,
}

impl Spare {
    /// Whether it is there to be taken (a finished making is looked at once).
    fn ready(&mut self) -> bool {
        if let Spare::Making(handle) = self {
            if !handle.is_finished() {
                return false;
            }
            let Spare::Making(handle) = std::mem::replace(self, Spare::None) else {
                unreachable!("matched above");
            };
            *self = match handle.join() {
                Ok(Ok(())) => Spare::Ready,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot make a spare audit segment; zeros are written as records come");
                    Spare::Failed
                }
                Err(_) => Spare::Failed,
            };
        }
        matches!(self, Spare::Ready)
    }
}

/// Writes a segment's worth of zeros to `dir/spare.zeros`, 256 KiB and a sync at a time, so the
/// writer's own syncs never queue behind much of it.
fn make_spare(dir: &Path, size: u64) -> std::io::Result<()> {
    let made = zero_spare(dir, size);
    if made.is_err() {
        // Its space back (a full disk is the likely cause).
        let _ = std::fs::remove_file(dir.join(SPARE_MAKING));
    }
    made
}

/// A file of the trail's, the server's alone: made if missing, emptied when `empty`.
fn open_private(path: &Path, empty: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(empty)
        .write(true)
        .mode(0o600)
        .open(path)
}

fn zero_spare(dir: &Path, size: u64) -> std::io::Result<()> {
    let making = dir.join(SPARE_MAKING);
    let file = open_private(&making, true)?;
    let chunk = vec![0u8; 256 * 1024];
    let mut at = 0;
    while at < size {
        let n = chunk.len().min((size - at) as usize);
        let started = std::time::Instant::now();
        file.write_all_at(&chunk[..n], at)?;
        file.sync_data()?;
        at += n as u64;
        // Paced: the device gives the writer's records three times the time it gives zeros
        // (measured here: a 256 KiB chunk at a time, so paced, kept the writer's p99 sync
        // within 1.7 times what it is alone; MiB chunks unpaced made it 3.4 times).
        std::thread::sleep((started.elapsed() * 3).max(std::time::Duration::from_millis(1)));
    }
    std::fs::rename(&making, dir.join(SPARE))?;
    File::open(dir)?.sync_all()
}

/// The live segment: records up to `end`, zeros from there up to `zeroed`.
struct Segment {
    file: File,
    end: u64,
    zeroed: u64,
}

impl Segment {
    /// Cuts the zeros off: a closed segment ends with its last record.
    fn close(self) -> std::io::Result<()> {
        // Longer than its records: zeros, or a refused batch a failed cut left behind.
        if self.file.metadata()?.len() > self.end {
            self.file.set_len(self.end)?;
            self.file.sync_all()?;
        }
        Ok(())
    }
}

impl Writer {
    fn run(mut self, mut receiver: mpsc::Receiver<Pending>) {
        let mut batch: Vec<Pending> = Vec::with_capacity(BATCH);
        while let Some(first) = receiver.blocking_recv() {
            batch.push(first);
            while batch.len() < BATCH {
                match receiver.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let result = self.append(&batch);
            for (i, (_, done)) in batch.drain(..).enumerate() {
                let _ = done.send(match &result {
                    Ok(first_seq) => Ok(first_seq + i as u64),
                    Err(e) => Err(AuditError::Write(e.to_string())),
                });
            }
        }
        // The live segment keeps its zeros: the next start goes on writing over them.
    }

    /// Writes and syncs `batch`; answers the first one's sequence number. On failure the
    /// file is cut back to where it was, and the chain does not move.
    fn append(&mut self, batch: &[Pending]) -> std::io::Result<u64> {
        let mut tip = self.tip.clone();
        let mut bytes = Vec::with_capacity(batch.len() * 320);
        for (event, _) in batch {
            let prev = if tip.hash.is_empty() {
                audit::GENESIS
            } else {
                &tip.hash
            };
            let seq = tip.seq + 1;
            let hash = Record::append_line(&self.key, &self.server, seq, prev, event, &mut bytes);
            tip = Tip {
                records: tip.records + 1,
                seq,
                hash,
            };
        }
        let rotate = match &self.file {
            None => true,
            Some(segment) => {
                segment.end >= self.sizes.segment
                    // Out of zeros: a spare is better than writing more of them now.
                    || (segment.end + bytes.len() as u64 > segment.zeroed && self.spare.ready())
            }
        };
        if rotate {
            self.next_segment()?;
        }
        let segment = self.file.as_mut().expect("a segment is open");
        let records_end = segment.end + bytes.len() as u64;
        if records_end > segment.zeroed {
            // More zeros, in the same write and sync: the file's size changes this once.
            let ahead = segment.end.clamp(ZEROED_AHEAD_MIN, ZEROED_AHEAD_MAX);
            let zeroed = (records_end + ahead).min(records_end.max(self.sizes.segment));
            bytes.resize(bytes.len() + (zeroed - records_end) as usize, 0);
        }
        let written = segment
            .file
            .write_all_at(&bytes, segment.end)
            .and_then(|_| segment.file.sync_data());
        if let Err(e) = written {
            // Cut back to the last acknowledged record: what was written may be in the file.
            let _ = segment.file.set_len(segment.end);
            segment.zeroed = segment.end;
            return Err(e);
        }
        segment.zeroed = segment.zeroed.max(segment.end + bytes.len() as u64);
        segment.end = records_end;
        if segment.end >= self.sizes.spare_after && matches!(self.spare, Spare::None) {
            let (dir, size) = (self.dir.clone(), self.sizes.segment);
            self.spare = match std::thread::Builder::new()
                .name("audit-spare".into())
                .spawn(move || make_spare(&dir, size))
            {
                Ok(handle) => Spare::Making(handle),
                Err(_) => Spare::Failed,
            };
        }
        let first = self.tip.seq + 1;
        self.tip = tip;
        Ok(first)
    }

    fn next_segment(&mut self) -> std::io::Result<()> {
        if let Some(closed) = self.file.take() {
            closed.close()?;
        }
        let path = self.dir.join(format!("{:012}.log", self.tip.seq + 1));
        let spare = self.spare.ready() && std::fs::rename(self.dir.join(SPARE), &path).is_ok();
        if !matches!(self.spare, Spare::Making(_)) {
            self.spare = Spare::None;
        }
        // Without the spare, a file of that name holds nothing of the chain (recovery removed
        // it, or it is new).
        let file = open_private(&path, !spare)?;
        let zeroed = file.metadata()?.len();
        // Its name in the directory must survive a crash too.
        File::open(&self.dir)?.sync_all()?;
        self.file = Some(Segment {
            file,
            end: 0,
            zeroed,
        });
        // Kept by size, not count: segments cut short (a spare taken early) count for what
        // they hold.
        let all = segments(&self.dir)?;
        let mut sizes = Vec::with_capacity(all.len());
        for path in &all {
            sizes.push(std::fs::metadata(path)?.len());
        }
        let mut total: u64 = sizes.iter().sum();
        let budget = KEEP_SEGMENTS as u64 * self.sizes.segment;
        for (old, size) in all.iter().zip(&sizes).take(all.len() - 1) {
            if total <= budget {
                break;
            }
            std::fs::remove_file(old)?;
            total -= size;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
