//! The etcd-shaped key-value store every control record lives in.
//!
//! One trait ([`Store`]) with etcd's semantics: a single global revision bumped by every write,
//! transactions guarded by compares, watches from a revision, compaction that makes older
//! revisions unwatchable (the watcher lists again), and leases whose keys vanish when they
//! expire. The embedded backend ([`embedded::EmbeddedStore`]) keeps it on one machine; an etcd
//! backend (cluster mode) implements the same trait and must pass the same
//! [`conformance`] suite.
#![forbid(unsafe_code)]

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub mod blob;
pub mod conformance;
pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;
mod wal;

pub type Revision = u64;
pub type LeaseId = u64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created this key (since it last did not exist).
    pub create_revision: Revision,
    /// Revision of the last write to this key.
    pub mod_revision: Revision,
    /// Number of writes since creation, starting at 1.
    pub version: u64,
    pub lease: Option<LeaseId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// 0 when the key does not exist.
    Version(u64),
    /// 0 when the key does not exist.
    CreateRevision(Revision),
    /// 0 when the key does not exist.
    ModRevision(Revision),
    /// A missing key compares as never equal.
    Value(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: String,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    /// True when `key` does not exist.
    pub fn missing(key: impl Into<String>) -> Self {
        Compare {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Version(0),
        }
    }
    /// True when `key` exists.
    pub fn exists(key: impl Into<String>) -> Self {
        Compare {
            key: key.into(),
            op: CompareOp::Greater,
            target: CompareTarget::Version(0),
        }
    }
    /// True when `key` was last written at `revision` (0: does not exist).
    pub fn mod_revision(key: impl Into<String>, revision: Revision) -> Self {
        Compare {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::ModRevision(revision),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }
    pub fn then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }
    pub fn otherwise(mut self, op: Op) -> Self {
        self.failure.push(op);
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResponse {
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged if it wrote nothing).
    pub revision: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    /// The store revision this read saw; watch from `revision + 1` to follow on.
    pub revision: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// For a delete: the key with an empty value and `mod_revision` = the delete's revision.
    pub kv: KeyValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// Events of one revision, in order.
    Events {
        revision: Revision,
        events: Vec<Event>,
    },
    /// The watcher fell behind history kept by the store: list again, then watch from there.
    Compacted { compact_revision: Revision },
    /// Every event up to `revision` has been delivered on this watch, in order: the answer to
    /// [`Watch::request_progress`], and the only safe source of a bookmark.
    Progress { revision: Revision },
    /// The consumer fell [`WATCH_BUFFER`] messages behind and the store dropped the watch
    /// rather than buffer without bound: list again (or watch again from the last revision
    /// seen, while the store still keeps it).
    CutOff,
}

/// How many messages a watch may have waiting for its consumer. One that falls further behind
/// is cut off ([`WatchMessage::CutOff`]), so a slow consumer costs itself, not the store.
pub const WATCH_BUFFER: usize = 1024;

/// A live watch. Dropping it cancels the watch.
pub struct Watch {
    receiver: mpsc::Receiver<WatchMessage>,
    progress: Box<dyn Fn() + Send + Sync>,
}

impl Watch {
    /// A watch fed by a backend: `progress` asks it to send a [`WatchMessage::Progress`].
    pub fn new(
        receiver: mpsc::Receiver<WatchMessage>,
        progress: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        Watch {
            receiver,
            progress: Box::new(progress),
        }
    }

    pub async fn next(&mut self) -> Option<WatchMessage> {
        self.receiver.recv().await
    }

    /// A message already waiting, if any.
    pub fn try_next(&mut self) -> Option<WatchMessage> {
        self.receiver.try_recv().ok()
    }

    /// Asks the store for a [`WatchMessage::Progress`] in this watch's stream, after every
    /// event it has delivered so far. (etcd answers only once the watch has caught up.)
    pub fn request_progress(&self) {
        (self.progress)()
    }
}

/// Queues `message` for a watcher unless that would take the last free slot, which is kept
/// for [`WatchMessage::CutOff`]. False when the watcher is gone or has just been cut off: drop
/// it.
pub(crate) fn offer(sender: &mpsc::Sender<WatchMessage>, message: WatchMessage) -> bool {
    if sender.capacity() > 1 {
        return sender.try_send(message).is_ok();
    }
    let _ = sender.try_send(WatchMessage::CutOff);
    false
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("revision {requested} has been compacted (oldest kept: {compact_revision}); list again and watch from the list's revision")]
    Compacted {
        requested: Revision,
        compact_revision: Revision,
    },
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("store data in {path} is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    /// A write found no room: refused and undone; reads and watches go on, and writes succeed
    /// again once space is freed.
    #[error("the disk holding {path} is full: writes are refused until space is freed (reads and watches still work)")]
    NoSpace { path: String },
    /// A write bigger than the store takes in one transaction; nothing was written.
    #[error("{what} of {bytes} bytes is larger than the store's limit of {limit} bytes; nothing was written")]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },
    /// A transaction with more compares or operations than the backend takes at once.
    #[error("a transaction with {ops} compares or operations in one part; the store takes at most {limit} (split the write)")]
    TooManyOps { ops: usize, limit: usize },
    #[error("store I/O on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("store is closed")]
    Closed,
    #[error("store backend: {0}")]
    Backend(String),
}

/// etcd's data model, as one trait for every backend.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// As [`Store::get`], shared: a store that keeps its values in memory answers without
    /// copying the value (hot reads that decode it once and remember it by `mod_revision`).
    async fn get_shared(&self, key: &str) -> Result<Option<std::sync::Arc<KeyValue>>, StoreError> {
        Ok(self.get(key).await?.map(std::sync::Arc::new))
    }
    /// Every key starting with `prefix`, sorted by key.
    async fn range(&self, prefix: &str) -> Result<RangeResponse, StoreError>;
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;
    /// Events for keys under `prefix` with revision >= `start_revision`.
    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<Watch, StoreError>;
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Forget history before `revision`: watches from an older revision get `Compacted`.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;
    async fn revision(&self) -> Result<Revision, StoreError>;

    /// The most compares, and the most operations in each branch, one transaction may hold.
    /// Callers that write more split their writes and say what stays atomic.
    fn max_txn_ops(&self) -> usize {
        usize::MAX
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        Ok(self
            .txn(Txn::new().then(Op::put(key, value)))
            .await?
            .revision)
    }
    async fn delete(&self, key: &str) -> Result<Revision, StoreError> {
        Ok(self.txn(Txn::new().then(Op::delete(key))).await?.revision)
    }
}
