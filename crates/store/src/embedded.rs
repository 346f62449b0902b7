//! The embedded backend: the whole keyspace in memory, every write in a checksummed log
//! (fsynced before it is acknowledged), a snapshot when the log grows.
//!
//! Leases are kept with a monotonic deadline. Restoring them after a restart gives each its full
//! TTL again (as etcd does on a leader change), so a crashed server does not declare its nodes dead.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::wal::{AppliedOp, Snapshot, Wal, WalEntry};
use crate::{
    CompareOp, CompareTarget, Event, EventKind, KeyValue, LeaseId, Op, RangeResponse, Revision,
    Store, StoreError, Txn, TxnResponse, Watch, WatchMessage,
};

/// How many revisions of history are kept for watchers before old ones are dropped.
const HISTORY_REVISIONS: u64 = 20_000;
/// By default the log is folded into a snapshot after this many entries.
pub const SNAPSHOT_EVERY: u64 = 50_000;

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Fold the log into a snapshot after this many entries.
    pub snapshot_every: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            snapshot_every: SNAPSHOT_EVERY,
        }
    }
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    sender: mpsc::UnboundedSender<WatchMessage>,
}

struct State {
    revision: Revision,
    compact_revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    /// (revision, events) for revisions >= compact_revision.
    history: VecDeque<(Revision, Vec<Event>)>,
    leases: HashMap<LeaseId, LeaseState>,
    next_lease: LeaseId,
    watchers: Vec<Watcher>,
    wal: Wal,
    snapshot_every: u64,
}

struct Inner {
    state: Mutex<State>,
    path: PathBuf,
}

#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl EmbeddedStore {
    /// Opens the store in `dir`, replaying its log. Must be called inside a tokio runtime: a
    /// background task expires leases.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, Options::default())
    }

    pub fn open_with(dir: &Path, options: Options) -> Result<Self, StoreError> {
        let (wal, snapshot, entries) = Wal::open(dir)?;
        let now = Instant::now();
        let mut state = State {
            revision: snapshot.revision,
            compact_revision: snapshot.compact_revision.max(snapshot.revision + 1),
            kvs: snapshot
                .kvs
                .into_iter()
                .map(|kv| (kv.key.clone(), kv))
                .collect(),
            history: VecDeque::new(),
            leases: HashMap::new(),
            next_lease: snapshot.next_lease.max(1),
            watchers: Vec::new(),
            wal,
            snapshot_every: options.snapshot_every.max(1),
        };
        for (id, ttl_ms) in snapshot.leases {
            state.restore_lease(id, ttl_ms, now);
        }
        for kv in state.kvs.values() {
            if let Some(lease) = kv.lease {
                if let Some(l) = state.leases.get_mut(&lease) {
                    l.keys.insert(kv.key.clone());
                }
            }
        }
        for entry in entries {
            match entry {
                WalEntry::Write { revision, ops } => {
                    if revision <= state.revision {
                        continue;
                    }
                    state.apply(revision, ops);
                }
                WalEntry::LeaseGrant { id, ttl_ms } => {
                    // Already in the snapshot (a crash between snapshot and log truncation):
                    // keep it, with the keys attached to it.
                    if !state.leases.contains_key(&id) {
                        state.restore_lease(id, ttl_ms, now);
                    }
                    state.next_lease = state.next_lease.max(id + 1);
                }
                WalEntry::LeaseRevoke { id } => {
                    state.leases.remove(&id);
                }
                WalEntry::Compact { revision } => {
                    state.compact_revision = state.compact_revision.max(revision);
                }
            }
        }
        state.trim_history();
        tracing::debug!(
            path = %dir.display(),
            revision = state.revision,
            keys = state.kvs.len(),
            leases = state.leases.len(),
            "embedded store opened"
        );
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            path: dir.to_path_buf(),
        });
        tokio::spawn(expire_leases(Arc::downgrade(&inner)));
        Ok(EmbeddedStore { inner })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.inner)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&inner)))
            .await
            .map_err(|_| StoreError::Closed)?
    }
}

fn lock(inner: &Inner) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves memory consistent with the log (the log is written
    // first), so a poisoned lock is still usable.
    inner.state.lock().unwrap_or_else(|p| p.into_inner())
}

async fn expire_leases(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(inner) = inner.upgrade() else { return };
        let result = tokio::task::spawn_blocking(move || {
            let mut state = lock(&inner);
            let now = Instant::now();
            let expired: Vec<LeaseId> = state
                .leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                tracing::info!(lease = id, "lease expired");
                state.revoke(id)?;
            }
            Ok::<(), StoreError>(())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "expiring leases failed"),
            Err(_) => return,
        }
    }
}

impl State {
    fn restore_lease(&mut self, id: LeaseId, ttl_ms: u64, now: Instant) {
        let ttl = Duration::from_millis(ttl_ms);
        self.leases.insert(
            id,
            LeaseState {
                ttl,
                deadline: now + ttl,
                keys: BTreeSet::new(),
            },
        );
    }

    fn compare(&self, c: &crate::Compare) -> bool {
        let kv = self.kvs.get(&c.key);
        let ord = match (&c.target, kv) {
            (CompareTarget::Version(v), kv) => kv.map_or(0, |kv| kv.version).cmp(v),
            (CompareTarget::CreateRevision(r), kv) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
            (CompareTarget::ModRevision(r), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
            (CompareTarget::Value(v), Some(kv)) => kv.value.as_slice().cmp(v.as_slice()),
            (CompareTarget::Value(_), None) => return c.op == CompareOp::NotEqual,
        };
        match c.op {
            CompareOp::Equal => ord.is_eq(),
            CompareOp::NotEqual => ord.is_ne(),
            CompareOp::Less => ord.is_lt(),
            CompareOp::Greater => ord.is_gt(),
        }
    }

    /// Expands ops against the current keyspace into the concrete changes to log.
    fn resolve(&self, ops: &[Op]) -> Result<Vec<AppliedOp>, StoreError> {
        let mut out = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    if let Some(lease) = lease {
                        if !self.leases.contains_key(lease) {
                            return Err(StoreError::LeaseNotFound(*lease));
                        }
                    }
                    out.push(AppliedOp::Put {
                        key: key.clone(),
                        value: value.clone(),
                        lease: *lease,
                    });
                }
                Op::Delete { key } => {
                    if self.kvs.contains_key(key) {
                        out.push(AppliedOp::Delete { key: key.clone() });
                    }
                }
                Op::DeletePrefix { prefix } => {
                    for key in self
                        .kvs
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                        .map(|(k, _)| k.clone())
                    {
                        out.push(AppliedOp::Delete { key });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Applies logged changes to memory, records history and notifies watchers.
    fn apply(&mut self, revision: Revision, ops: Vec<AppliedOp>) {
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                AppliedOp::Put { key, value, lease } => {
                    let prev = self.kvs.get(&key);
                    let (create_revision, version, prev_lease) = match prev {
                        Some(p) => (p.create_revision, p.version + 1, p.lease),
                        None => (revision, 1, None),
                    };
                    if let Some(old) = prev_lease {
                        if let Some(l) = self.leases.get_mut(&old) {
                            l.keys.remove(&key);
                        }
                    }
                    if let Some(new) = lease {
                        if let Some(l) = self.leases.get_mut(&new) {
                            l.keys.insert(key.clone());
                        }
                    }
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: revision,
                        version,
                        lease,
                    };
                    events.push(Event {
                        kind: EventKind::Put,
                        kv: kv.clone(),
                    });
                    self.kvs.insert(key, kv);
                }
                AppliedOp::Delete { key } => {
                    if let Some(prev) = self.kvs.remove(&key) {
                        if let Some(old) = prev.lease {
                            if let Some(l) = self.leases.get_mut(&old) {
                                l.keys.remove(&key);
                            }
                        }
                        events.push(Event {
                            kind: EventKind::Delete,
                            kv: KeyValue {
                                key,
                                value: Vec::new(),
                                create_revision: 0,
                                mod_revision: revision,
                                version: 0,
                                lease: None,
                            },
                        });
                    }
                }
            }
        }
        self.revision = revision;
        self.notify(revision, &events);
        self.history.push_back((revision, events));
        self.trim_history();
    }

    fn trim_history(&mut self) {
        let floor = self.revision.saturating_sub(HISTORY_REVISIONS);
        if floor > self.compact_revision {
            self.compact_revision = floor;
        }
        while let Some((rev, _)) = self.history.front() {
            if *rev < self.compact_revision {
                self.history.pop_front();
            } else {
                break;
            }
        }
    }

    fn notify(&mut self, revision: Revision, events: &[Event]) {
        self.watchers.retain(|w| {
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| e.kv.key.starts_with(&w.prefix))
                .cloned()
                .collect();
            if mine.is_empty() {
                return !w.sender.is_closed();
            }
            w.sender
                .send(WatchMessage::Events {
                    revision,
                    events: mine,
                })
                .is_ok()
        });
    }

    /// Logs then applies a write; returns the new revision (unchanged if `ops` is empty).
    fn write(&mut self, ops: Vec<AppliedOp>) -> Result<Revision, StoreError> {
        if ops.is_empty() {
            return Ok(self.revision);
        }
        let revision = self.revision + 1;
        self.wal.append(&WalEntry::Write {
            revision,
            ops: ops.clone(),
        })?;
        self.apply(revision, ops);
        // The write is durable and applied: a failed snapshot must not report it as failed.
        if let Err(e) = self.maybe_snapshot() {
            tracing::error!(error = %e, "store snapshot failed; the log keeps growing");
        }
        Ok(revision)
    }

    fn revoke(&mut self, id: LeaseId) -> Result<(), StoreError> {
        let Some(lease) = self.leases.get(&id) else {
            return Err(StoreError::LeaseNotFound(id));
        };
        let ops: Vec<AppliedOp> = lease
            .keys
            .iter()
            .map(|k| AppliedOp::Delete { key: k.clone() })
            .collect();
        // Delete the keys first: if we crash between the two entries the lease comes back with
        // a fresh TTL and no keys, and simply expires again.
        self.write(ops)?;
        self.wal.append(&WalEntry::LeaseRevoke { id })?;
        self.leases.remove(&id);
        Ok(())
    }

    fn maybe_snapshot(&mut self) -> Result<(), StoreError> {
        if self.wal.entries_since_snapshot < self.snapshot_every {
            return Ok(());
        }
        let snapshot = Snapshot {
            revision: self.revision,
            compact_revision: self.compact_revision,
            kvs: self.kvs.values().cloned().collect(),
            leases: self
                .leases
                .iter()
                .map(|(id, l)| (*id, l.ttl.as_millis() as u64))
                .collect(),
            next_lease: self.next_lease,
        };
        self.wal.write_snapshot(&snapshot)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse, StoreError> {
        let state = self.lock();
        let kvs = state
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok(RangeResponse {
            kvs,
            revision: state.revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.blocking(move |state| {
            let succeeded = txn.compares.iter().all(|c| state.compare(c));
            let ops = if succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            let applied = state.resolve(ops)?;
            let revision = state.write(applied)?;
            Ok(TxnResponse {
                succeeded,
                revision,
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<Watch, StoreError> {
        let mut state = self.lock();
        let start = start_revision.max(1);
        if start < state.compact_revision && start <= state.revision {
            return Err(StoreError::Compacted {
                requested: start,
                compact_revision: state.compact_revision,
            });
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        for (revision, events) in state.history.iter().filter(|(r, _)| *r >= start) {
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| e.kv.key.starts_with(prefix))
                .cloned()
                .collect();
            if !mine.is_empty() {
                let _ = sender.send(WatchMessage::Events {
                    revision: *revision,
                    events: mine,
                });
            }
        }
        state.watchers.push(Watcher {
            prefix: prefix.to_string(),
            sender,
        });
        Ok(Watch { receiver })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.blocking(move |state| {
            let id = state.next_lease;
            let ttl_ms = ttl.as_millis().max(1) as u64;
            state.wal.append(&WalEntry::LeaseGrant { id, ttl_ms })?;
            state.next_lease += 1;
            state.restore_lease(id, ttl_ms, Instant::now());
            Ok(id)
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut state = self.lock();
        let l = state
            .leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |state| state.revoke(lease)).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.blocking(move |state| {
            let revision = revision.min(state.revision);
            if revision <= state.compact_revision {
                return Ok(());
            }
            state.wal.append(&WalEntry::Compact { revision })?;
            state.compact_revision = revision;
            state.trim_history();
            // Watchers behind the new floor cannot be served any more.
            Ok(())
        })
        .await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.lock().revision)
    }
}
