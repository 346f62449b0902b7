//! Append-only, checksummed log of committed changes plus a snapshot file.
//!
//! A frame is `len: u32 LE | crc32(payload): u32 LE | payload`, the payload a compact binary
//! encoding (postcard) in which values are raw bytes. Logs and snapshots written before that
//! hold JSON payloads; they are still read (a JSON payload starts with `{`, a binary entry
//! never does), and the next fold rewrites them in the binary form.
//!
//! The snapshot is a stream of bounded frames (a header, records in chunks of about
//! [`SNAPSHOT_CHUNK`] bytes, an end frame with the record count), read back one frame at a
//! time, so its size is bounded by the disk and not by a frame limit. A frame counts once
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
        #[serde(with = "serde_bytes")]
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

/// Everything a snapshot holds besides the records.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct SnapshotHeader {
    pub revision: Revision,
    pub compact_revision: Revision,
    pub leases: Vec<(LeaseId, u64)>,
    pub next_lease: LeaseId,
}

#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub header: SnapshotHeader,
    pub kvs: Vec<KeyValue>,
}

/// The first bytes of a snapshot in the chunked form (an older snapshot is one JSON frame).
const SNAPSHOT_MAGIC: &[u8; 8] = b"DZSNAP02";
/// A snapshot frame holds records until it reaches about this many bytes.
pub(crate) const SNAPSHOT_CHUNK: usize = 1024 * 1024;
/// The log is folded into a snapshot once it holds this many bytes (or `snapshot_every`
/// entries), which bounds what start-up reads into memory from it.
pub(crate) const FOLD_AFTER_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Serialize)]
enum SnapshotFrameOut<'a> {
    Header(&'a SnapshotHeader),
    Records(Vec<StoredKv<'a>>),
    End { records: u64 },
}

#[derive(Deserialize)]
enum SnapshotFrameIn {
    Header(SnapshotHeader),
    Records(Vec<OwnedKv>),
    End { records: u64 },
}

#[derive(Serialize)]
struct StoredKv<'a> {
    key: &'a str,
    #[serde(with = "serde_bytes")]
    value: &'a [u8],
    create_revision: Revision,
    mod_revision: Revision,
    version: u64,
    lease: Option<LeaseId>,
}

#[derive(Deserialize)]
struct OwnedKv {
    key: String,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    create_revision: Revision,
    mod_revision: Revision,
    version: u64,
    lease: Option<LeaseId>,
}

/// The snapshot form before the chunked one: one JSON frame.
#[derive(Deserialize)]
struct LegacySnapshot {
    revision: Revision,
    compact_revision: Revision,
    kvs: Vec<KeyValue>,
    leases: Vec<(LeaseId, u64)>,
    next_lease: LeaseId,
}

fn encode_entry(entry: &WalEntry) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(entry)
        .map_err(|e| StoreError::Backend(format!("encoding a log entry: {e}")))
}

fn decode_entry(payload: &[u8]) -> Option<WalEntry> {
    if payload.first() == Some(&b'{') {
        serde_json::from_slice(payload).ok()
    } else {
        postcard::from_bytes(payload).ok()
    }
}

pub(crate) struct Wal {
    dir: PathBuf,
    file: File,
    pub entries_since_snapshot: u64,
    pub bytes_since_snapshot: u64,
    /// A failed append could not be cut off: refuse further writes.
    failed: bool,
}

const MAX_FRAME: u32 = 64 * 1024 * 1024;
/// The log takes transactions this much smaller than a frame may be.
const FRAME_HEADROOM: usize = 4096;

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
        let snapshot = read_snapshot(&snap_path)?;

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
            bytes_since_snapshot: offset as u64,
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
        let payload = encode_entry(entry)?;
        let path = Self::wal_path(&self.dir);
        // Headroom below the frame limit: a record's snapshot frame carries a few more bytes
        // (its revisions) than the log entry that wrote it.
        let limit = MAX_FRAME as usize - FRAME_HEADROOM;
        if payload.len() > limit {
            return Err(StoreError::TooLarge {
                what: "a transaction".into(),
                bytes: payload.len() as u64,
                limit: limit as u64,
            });
        }
        let frame = encode_frame(&payload);
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
        self.bytes_since_snapshot += frame.len() as u64;
        Ok(())
    }

    /// Whether the log has grown enough to be folded into a snapshot.
    pub fn should_fold(&self, every_entries: u64) -> bool {
        self.entries_since_snapshot >= every_entries
            || self.bytes_since_snapshot >= FOLD_AFTER_BYTES
    }

    /// Writes a snapshot of `header` and `kvs` atomically (temp file in bounded frames, fsync,
    /// rename) and empties the log.
    pub fn write_snapshot(
        &mut self,
        header: &SnapshotHeader,
        kvs: &[std::sync::Arc<KeyValue>],
    ) -> Result<(), StoreError> {
        let tmp = self.dir.join("store.snapshot.tmp");
        if let Err(e) = write_snapshot_file(&tmp, header, kvs) {
            let _ = fs::remove_file(&tmp);
            // Try again only after as much again: a fold that keeps failing (a full disk) must
            // not rewrite the whole store on every write.
            self.entries_since_snapshot = 0;
            self.bytes_since_snapshot = 0;
            return Err(e);
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
        self.bytes_since_snapshot = 0;
        Ok(())
    }
}

fn write_snapshot_file(
    path: &Path,
    header: &SnapshotHeader,
    kvs: &[std::sync::Arc<KeyValue>],
) -> Result<(), StoreError> {
    let file = File::create(path).map_err(io_err(path))?;
    let mut out = std::io::BufWriter::with_capacity(SNAPSHOT_CHUNK, file);
    let put = |out: &mut std::io::BufWriter<File>,
               frame: &SnapshotFrameOut<'_>|
     -> Result<(), StoreError> {
        let payload = postcard::to_stdvec(frame)
            .map_err(|e| StoreError::Backend(format!("encoding a snapshot frame: {e}")))?;
        if payload.len() > MAX_FRAME as usize {
            // A record got in through a log frame of at most MAX_FRAME bytes, so this cannot
            // happen; should it, fail the fold rather than write a snapshot that cannot be read.
            return Err(StoreError::Backend(format!(
                "a snapshot frame of {} bytes exceeds the limit of {MAX_FRAME}",
                payload.len()
            )));
        }
        out.write_all(&encode_frame(&payload)).map_err(io_err(path))
    };
    out.write_all(SNAPSHOT_MAGIC).map_err(io_err(path))?;
    put(&mut out, &SnapshotFrameOut::Header(header))?;
    let mut chunk = Vec::new();
    let mut chunk_bytes = 0usize;
    for kv in kvs {
        let size = kv.key.len() + kv.value.len() + 32;
        // Flush first if this record would take the chunk past its size: a big record then
        // gets a frame of its own, which the log's limit keeps under the frame limit.
        if !chunk.is_empty() && chunk_bytes + size > SNAPSHOT_CHUNK {
            put(
                &mut out,
                &SnapshotFrameOut::Records(std::mem::take(&mut chunk)),
            )?;
            chunk_bytes = 0;
        }
        chunk_bytes += size;
        chunk.push(StoredKv {
            key: &kv.key,
            value: &kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        });
        if chunk_bytes >= SNAPSHOT_CHUNK {
            put(
                &mut out,
                &SnapshotFrameOut::Records(std::mem::take(&mut chunk)),
            )?;
            chunk_bytes = 0;
        }
    }
    if !chunk.is_empty() {
        put(&mut out, &SnapshotFrameOut::Records(chunk))?;
    }
    put(
        &mut out,
        &SnapshotFrameOut::End {
            records: kvs.len() as u64,
        },
    )?;
    let file = out.into_inner().map_err(|e| io_err(path)(e.into_error()))?;
    file.sync_all().map_err(io_err(path))
}

/// Reads the snapshot at `path` one frame at a time (none if there is no file).
fn read_snapshot(path: &Path) -> Result<Snapshot, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Snapshot::default()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let corrupt = |offset: u64, what: &str| StoreError::Corrupt {
        path: path.display().to_string(),
        detail: format!(
            "{what} at byte offset {offset}; nothing was changed on disk. Restore {} from a \
             backup",
            path.display()
        ),
    };
    let mut input = std::io::BufReader::with_capacity(SNAPSHOT_CHUNK, file);
    let mut magic = [0u8; 8];
    let magic_read = read_full(&mut input, &mut magic).map_err(io_err(path))?;
    if magic_read < magic.len() || &magic != SNAPSHOT_MAGIC {
        // The older form: the whole snapshot in one JSON frame (at most MAX_FRAME bytes).
        let mut bytes = magic[..magic_read].to_vec();
        input
            .take(MAX_FRAME as u64 + 8)
            .read_to_end(&mut bytes)
            .map_err(io_err(path))?;
        let legacy = decode_frame(&bytes)
            .and_then(|(payload, _)| serde_json::from_slice::<LegacySnapshot>(payload).ok())
            .ok_or_else(|| corrupt(0, "a snapshot frame that fails its checksum"))?;
        return Ok(Snapshot {
            header: SnapshotHeader {
                revision: legacy.revision,
                compact_revision: legacy.compact_revision,
                leases: legacy.leases,
                next_lease: legacy.next_lease,
            },
            kvs: legacy.kvs,
        });
    }
    let mut offset = magic.len() as u64;
    let mut header = None;
    let mut kvs = Vec::new();
    let mut payload = Vec::new();
    loop {
        let mut head = [0u8; 8];
        if read_full(&mut input, &mut head).map_err(io_err(path))? < head.len() {
            return Err(corrupt(offset, "the snapshot ends before its end frame"));
        }
        let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        if len > MAX_FRAME {
            return Err(corrupt(offset, &format!("a frame claiming {len} bytes")));
        }
        payload.resize(len as usize, 0);
        if read_full(&mut input, &mut payload).map_err(io_err(path))? < payload.len() {
            return Err(corrupt(offset, "the snapshot ends inside a frame"));
        }
        if crc32fast::hash(&payload) != crc {
            return Err(corrupt(offset, "a snapshot frame that fails its checksum"));
        }
        let frame: SnapshotFrameIn = postcard::from_bytes(&payload)
            .map_err(|_| corrupt(offset, "a snapshot frame that cannot be decoded"))?;
        match (frame, header.is_some()) {
            (SnapshotFrameIn::Header(h), false) => header = Some(h),
            (SnapshotFrameIn::Records(records), true) => {
                kvs.extend(records.into_iter().map(|r| KeyValue {
                    key: r.key,
                    value: r.value,
                    create_revision: r.create_revision,
                    mod_revision: r.mod_revision,
                    version: r.version,
                    lease: r.lease,
                }));
            }
            (SnapshotFrameIn::End { records }, true) => {
                if records != kvs.len() as u64 {
                    return Err(corrupt(
                        offset,
                        &format!(
                            "an end frame counting {records} records after {} were read",
                            kvs.len()
                        ),
                    ));
                }
                let header = header.expect("checked above");
                return Ok(Snapshot { header, kvs });
            }
            (_, _) => return Err(corrupt(offset, "a snapshot frame out of order")),
        }
        offset += 8 + len as u64;
    }
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
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
        let Some(entry) = decode_entry(payload) else {
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
        decode_frame(&bytes[at..]).is_some_and(|(payload, _)| decode_entry(payload).is_some())
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
