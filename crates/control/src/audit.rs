//! The audit trail as files: each API server appends to its own hash chain in its data dir
//! (`audit/<first seq>.log`, one JSON record per line). A record is durable before
//! [`AuditLog::record`] returns, so a request that cannot be audited is refused rather than
//! answered. Group commit keeps that fast: one thread writes whatever records have queued
//! while the previous fsync ran, then one fsync for all of them.
//!
//! Bounds: at most [`QUEUE`] records wait; a segment is closed at [`SEGMENT_BYTES`] and at
//! most [`KEEP_SEGMENTS`] are kept (the oldest go first; the chain then starts at the oldest
//! kept record, and `verify` says so).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use dozen_params::audit::{self, Broken, ChainKey, Event, Record, Tip};
use tokio::sync::{mpsc, oneshot};

/// Records waiting for the writer at most; callers wait for room beyond it.
pub const QUEUE: usize = 8192;
/// Most records one fsync covers.
const BATCH: usize = 4096;
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
pub const KEEP_SEGMENTS: usize = 16;

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
    /// record a crash left half-written (never acknowledged) is cut off first; the chain goes
    /// on in the last segment.
    pub fn open(dir: &Path, server: &str, key: ChainKey) -> std::io::Result<AuditLog> {
        std::fs::create_dir_all(dir)?;
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
            for line in BufReader::new(File::open(segment)?).lines() {
                let Ok(record) = serde_json::from_str::<Record>(&line?) else {
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

/// The tip of the chain on disk and the last segment to append to (None: start one). Cuts
/// the last segment back to its last whole record, and removes a last segment left empty.
fn recover(dir: &Path) -> std::io::Result<(Tip, Option<(File, u64)>)> {
    let mut all = segments(dir)?;
    while let Some(last) = all.pop() {
        let bytes = std::fs::read(&last)?;
        let mut keep = 0usize;
        let mut tip = None;
        for line in bytes.split_inclusive(|b| *b == b'\n') {
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
            std::fs::remove_file(&last)?;
            File::open(dir)?.sync_all()?;
            continue;
        };
        let file = OpenOptions::new().append(true).open(&last)?;
        if keep < bytes.len() {
            tracing::warn!(file = %last.display(), cut = bytes.len() - keep, "cutting a half-written audit record (never acknowledged)");
            file.set_len(keep as u64)?;
            file.sync_all()?;
        }
        return Ok((tip, Some((file, keep as u64))));
    }
    Ok((Tip::default(), None))
}

fn verify_dir(dir: &Path, key: &ChainKey) -> std::io::Result<Verified> {
    let mut tip = Tip::default();
    let mut first_seq = 0;
    for segment in segments(dir)? {
        let text = std::fs::read_to_string(&segment)?;
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
    file: Option<(File, u64)>,
    key: std::sync::Arc<ChainKey>,
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
    }

    /// Writes and syncs `batch`; answers the first one's sequence number. On failure the
    /// file is cut back to where it was, and the chain does not move.
    fn append(&mut self, batch: &[Pending]) -> std::io::Result<u64> {
        if self
            .file
            .as_ref()
            .is_none_or(|(_, size)| *size >= SEGMENT_BYTES)
        {
            self.next_segment()?;
        }
        let mut tip = self.tip.clone();
        let mut bytes = Vec::with_capacity(batch.len() * 256);
        for (event, _) in batch {
            let prev = if tip.hash.is_empty() {
                audit::GENESIS.to_string()
            } else {
                tip.hash.clone()
            };
            let record = Record::chain(&self.key, &self.server, tip.seq + 1, &prev, event.clone());
            serde_json::to_writer(&mut bytes, &record)?;
            bytes.push(b'\n');
            tip = Tip {
                records: tip.records + 1,
                seq: record.seq,
                hash: record.hash,
            };
        }
        let (file, size) = self.file.as_mut().expect("a segment is open");
        let written = file.write_all(&bytes).and_then(|_| file.sync_data());
        if let Err(e) = written {
            let _ = file.set_len(*size);
            return Err(e);
        }
        *size += bytes.len() as u64;
        let first = self.tip.seq + 1;
        self.tip = tip;
        Ok(first)
    }

    fn next_segment(&mut self) -> std::io::Result<()> {
        let path = self.dir.join(format!("{:012}.log", self.tip.seq + 1));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        let size = file.metadata()?.len();
        // Its name in the directory must survive a crash too.
        File::open(&self.dir)?.sync_all()?;
        self.file = Some((file, size));
        let all = segments(&self.dir)?;
        if all.len() > KEEP_SEGMENTS {
            for old in &all[..all.len() - KEEP_SEGMENTS] {
                std::fs::remove_file(old)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dozen_params::audit::Outcome;

    fn key() -> ChainKey {
        ChainKey::new(&dozen_params::Key::parse(&"55".repeat(32)).unwrap())
    }

    fn event(target: &str) -> Event {
        Event {
            at_ms: crate::wall_ms(),
            who: "root token".into(),
            from: "127.0.0.1:1".into(),
            action: "param.read".into(),
            target: target.into(),
            outcome: Outcome::Ok,
            detail: None,
        }
    }

    #[tokio::test]
    async fn records_are_durable_chained_and_carry_on_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), "s1", key()).unwrap();
        let seqs = futures_util::future::join_all((0..50).map(|i| {
            let log = &log;
            async move { log.record(event(&format!("/a/{i}"))).await.unwrap() }
        }))
        .await;
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(sorted, (1..=50).collect::<Vec<_>>());
        drop(log);
        let log = AuditLog::open(dir.path(), "s1", key()).unwrap();
        assert_eq!(log.record(event("/b")).await.unwrap(), 51);
        let verified = log.verify().unwrap();
        assert!(verified.broken.is_none(), "{:?}", verified.broken);
        assert_eq!((verified.tip.records, verified.first_seq), (51, 1));
        let only_b = log
            .read(&AuditFilter {
                target: Some("/b".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(only_b.len(), 1);
        assert_eq!(only_b[0].seq, 51);
    }

    #[tokio::test]
    async fn an_edited_record_is_found_by_verify() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), "s1", key()).unwrap();
        for i in 0..5 {
            log.record(event(&format!("/a/{i}"))).await.unwrap();
        }
        let segment = segments(dir.path()).unwrap().remove(0);
        let text = std::fs::read_to_string(&segment).unwrap();
        std::fs::write(&segment, text.replacen("/a/3", "/a/9", 1)).unwrap();
        let broken = log.verify().unwrap().broken.expect("the edit is found");
        assert_eq!(broken.seq, 4, "{broken}");
    }

    #[tokio::test]
    async fn a_half_written_record_is_cut_and_the_chain_goes_on_in_the_same_segment() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), "s1", key()).unwrap();
        for i in 0..3 {
            log.record(event(&format!("/a/{i}"))).await.unwrap();
        }
        drop(log);
        let segment = segments(dir.path()).unwrap().remove(0);
        let mut f = OpenOptions::new().append(true).open(&segment).unwrap();
        f.write_all(b"{\"seq\":4,\"server\":\"s1\",\"at_").unwrap();
        drop(f);
        let log = AuditLog::open(dir.path(), "s1", key()).unwrap();
        assert_eq!(log.record(event("/b")).await.unwrap(), 4);
        assert_eq!(
            segments(dir.path()).unwrap().len(),
            1,
            "no new segment per restart"
        );
        let verified = log.verify().unwrap();
        assert!(verified.broken.is_none(), "{:?}", verified.broken);
        assert_eq!(verified.tip.seq, 4);
        // Lines cut from the head of the first segment are found.
        let text = std::fs::read_to_string(&segment).unwrap();
        let rest: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
        std::fs::write(&segment, rest).unwrap();
        assert!(log.verify().unwrap().broken.is_some());
    }
}
