//! Append-only, checksummed log of committed changes plus a snapshot file.
//!
//! A frame is `len: u32 LE | crc32(payload): u32 LE | payload (JSON)`. A frame counts once
//! `append` returns: it has been written and `fdatasync`ed. Only the last frame can be torn by a
//! crash (that write was never acknowledged): recovery drops it and truncates there. A bad frame
//! with an intact one anywhere after it, or an intact frame that is not a log entry, is damage,
//! not a torn write: start-up stops with the file and offset and changes nothing on disk, since
//! going on would silently drop acknowledged writes.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{KeyValue, LeaseId, Revision, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum AppliedOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum WalEntry {
    Write {
        revision: Revision,
        ops: Vec<AppliedOp>,
    },
    LeaseGrant {
        id: LeaseId,
        ttl_ms: u64,
    },
    LeaseRevoke {
        id: LeaseId,
    },
    Compact {
        revision: Revision,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub revision: Revision,
    pub compact_revision: Revision,
    pub kvs: Vec<KeyValue>,
    pub leases: Vec<(LeaseId, u64)>,
    pub next_lease: LeaseId,
}

pub(crate) struct Wal {
    dir: PathBuf,
    file: File,
    pub entries_since_snapshot: u64,
    /// A failed append could not be cut off: refuse further writes.
    failed: bool,
}

const MAX_FRAME: u32 = 64 * 1024 * 1024;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| {
        // ENOSPC, EDQUOT: the disk (or the quota) is full, not the store broken.
        if source.kind() == std::io::ErrorKind::StorageFull
            || matches!(source.raw_os_error(), Some(28) | Some(122))
        {
            return StoreError::NoSpace {
                path: path.display().to_string(),
            };
        }
        StoreError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

impl Wal {
    fn wal_path(dir: &Path) -> PathBuf {
        dir.join("store.wal")
    }
    fn snapshot_path(dir: &Path) -> PathBuf {
        dir.join("store.snapshot")
    }

    /// Opens (creating) the log in `dir`; returns the snapshot and every intact entry after it.
    pub fn open(dir: &Path) -> Result<(Wal, Snapshot, Vec<WalEntry>), StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let snap_path = Self::snapshot_path(dir);
        let snapshot = match fs::read(&snap_path) {
            Ok(bytes) => decode_frame(&bytes)
                .and_then(|(payload, _)| serde_json::from_slice::<Snapshot>(payload).ok())
                .ok_or_else(|| StoreError::Corrupt {
                    path: snap_path.display().to_string(),
                    detail: "snapshot frame fails its checksum".into(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Snapshot::default(),
            Err(e) => return Err(io_err(&snap_path)(e)),
        };

        let wal_path = Self::wal_path(dir);
        let mut bytes = Vec::new();
        match File::open(&wal_path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(io_err(&wal_path))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&wal_path)(e)),
        }
        let (entries, offset) = read_entries(&wal_path, &bytes)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&wal_path)
            .map_err(io_err(&wal_path))?;
        if offset < bytes.len() {
            tracing::warn!(
                path = %wal_path.display(),
                kept_bytes = offset,
                dropped_bytes = bytes.len() - offset,
                "store log ends in a torn write; truncating it (that write was never acknowledged)"
            );
            file.set_len(offset as u64).map_err(io_err(&wal_path))?;
            file.sync_all().map_err(io_err(&wal_path))?;
        }
        let mut file = file;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0))
            .map_err(io_err(&wal_path))?;
        let wal = Wal {
            dir: dir.to_path_buf(),
            file,
            entries_since_snapshot: entries.len() as u64,
            failed: false,
        };
        Ok((wal, snapshot, entries))
    }

    /// Durable once this returns.
    pub fn append(&mut self, entry: &WalEntry) -> Result<(), StoreError> {
        if self.failed {
            return Err(StoreError::Corrupt {
                path: Self::wal_path(&self.dir).display().to_string(),
                detail: "an earlier write could not be undone; restart to recover the log".into(),
            });
        }
        let payload = serde_json::to_vec(entry).map_err(|e| StoreError::Backend(e.to_string()))?;
        let frame = encode_frame(&payload);
        let path = Self::wal_path(&self.dir);
        use std::io::Seek;
        let before = self
            .file
            .seek(std::io::SeekFrom::End(0))
            .map_err(io_err(&path))?;
        let written = self
            .file
            .write_all(&frame)
            .and_then(|_| self.file.sync_data());
        if let Err(e) = written {
            // Cut the failed frame off, so a later acknowledged write never lands behind a
            // torn one (recovery would stop at it and drop everything after).
            let undone = self
                .file
                .set_len(before)
                .and_then(|_| self.file.seek(std::io::SeekFrom::Start(before)).map(|_| ()))
                .and_then(|_| self.file.sync_data());
            if undone.is_err() {
                self.failed = true;
            }
            return Err(io_err(&path)(e));
        }
        self.entries_since_snapshot += 1;
        Ok(())
    }

    /// Writes `snapshot` atomically (temp file, fsync, rename) and empties the log.
    pub fn write_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let payload =
            serde_json::to_vec(snapshot).map_err(|e| StoreError::Backend(e.to_string()))?;
        let frame = encode_frame(&payload);
        let tmp = self.dir.join("store.snapshot.tmp");
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&frame).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        let snap = Self::snapshot_path(&self.dir);
        fs::rename(&tmp, &snap).map_err(io_err(&snap))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        // Every entry in the log is now in the snapshot: a crash before this truncate replays
        // them onto the snapshot again, which is harmless because replay skips revisions the
        // snapshot already has.
        let wal_path = Self::wal_path(&self.dir);
        self.file.set_len(0).map_err(io_err(&wal_path))?;
        use std::io::Seek;
        self.file
            .seek(std::io::SeekFrom::Start(0))
            .map_err(io_err(&wal_path))?;
        self.file.sync_all().map_err(io_err(&wal_path))?;
        self.entries_since_snapshot = 0;
        Ok(())
    }
}

/// Every entry of the log `bytes` and where the intact part ends: the end of the file, or the
/// start of a torn last frame. Damage anywhere else is an error naming the offset.
fn read_entries(path: &Path, bytes: &[u8]) -> Result<(Vec<WalEntry>, usize), StoreError> {
    let damaged = |offset: usize, what: &str| StoreError::Corrupt {
        path: path.display().to_string(),
        detail: format!(
            "{what} at byte offset {offset} of {}; nothing was changed on disk. Restore \
             {} from a backup; or, to start without the writes from that offset on, move it \
             aside (the snapshot beside it keeps everything before its last fold)",
            bytes.len(),
            path.display()
        ),
    };
    let mut entries = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        let Some((payload, used)) = decode_frame(&bytes[offset..]) else {
            // Torn only if nothing intact follows it: a crash tears the last write alone.
            if let Some(next) = next_intact_frame(bytes, offset + 1) {
                return Err(damaged(
                    offset,
                    &format!("a damaged frame, followed by intact ones (the next at {next}),"),
                ));
            }
            break;
        };
        let Ok(entry) = serde_json::from_slice::<WalEntry>(payload) else {
            return Err(damaged(
                offset,
                "a frame whose checksum matches but which is not a log entry",
            ));
        };
        entries.push(entry);
        offset += used;
    }
    Ok((entries, offset))
}

/// The offset of the first frame at or after `from` that is whole, passes its checksum and
/// holds a log entry.
fn next_intact_frame(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(8)).find(|&at| {
        decode_frame(&bytes[at..])
            .is_some_and(|(payload, _)| serde_json::from_slice::<WalEntry>(payload).is_ok())
    })
}

fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 8);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The payload and the frame's total length, or None if the frame is short or corrupt.
fn decode_frame(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
    if len > MAX_FRAME {
        return None;
    }
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let payload = bytes.get(8..8 + len as usize)?;
    (crc32fast::hash(payload) == crc).then_some((payload, 8 + len as usize))
}
