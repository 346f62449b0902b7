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

use crate::wal::{AppliedOp, SnapshotHeader, Wal, WalEntry};
use crate::{
    CompareOp, CompareTarget, Event, EventKind, KeyValue, LeaseId, Op, RangeResponse, Revision,
    Store, StoreError, Txn, TxnResponse, Watch, WatchMessage,
};

/// How many revisions of history are kept for watchers before old ones are dropped.
const HISTORY_REVISIONS: u64 = 20_000;
/// ...and how many bytes of keys and values they may hold at most.
const HISTORY_BYTES: usize = 64 * 1024 * 1024;
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
    /// A writer is revoking it (between its log writes): keep-alives fail from now on.
    revoking: bool,
}

struct Watcher {
    id: u64,
    prefix: String,
    sender: mpsc::Sender<WatchMessage>,
    /// Every revision up to this one has been queued for it (or held nothing under its
    /// prefix); a revision replayed from history when it registered is not sent again.
    delivered: Revision,
}

/// Open watches. Events are queued for them after memory is updated and outside the state
/// lock (readers never wait for delivery), but still under the log lock, so they go out in
/// revision order.
#[derive(Default)]
struct Watchers {
    next_id: u64,
    list: Vec<Watcher>,
}

impl Watchers {
    fn deliver(&mut self, revision: Revision, events: &[Event]) {
        self.list.retain_mut(|w| {
            if revision <= w.delivered {
                return true;
            }
            w.delivered = revision;
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| e.kv.key.starts_with(&w.prefix))
                .cloned()
                .collect();
            if mine.is_empty() {
                return !w.sender.is_closed();
            }
            let kept = crate::offer(
                &w.sender,
                WatchMessage::Events {
                    revision,
                    events: mine,
                },
            );
            if !kept && !w.sender.is_closed() {
                tracing::warn!(
                    prefix = %w.prefix,
                    revision,
                    buffer = crate::WATCH_BUFFER,
                    "cut off a watcher that fell behind; it lists again"
                );
            }
            kept
        });
    }

    fn progress(&mut self, id: u64) {
        self.list.retain(|w| {
            w.id != id
                || crate::offer(
                    &w.sender,
                    WatchMessage::Progress {
                        revision: w.delivered,
                    },
                )
        });
    }
}

struct State {
    revision: Revision,
    compact_revision: Revision,
    /// Shared, so a snapshot or a range copies pointers under the lock, not values.
    kvs: BTreeMap<String, Arc<KeyValue>>,
    /// (revision, events) for revisions >= compact_revision.
    history: VecDeque<(Revision, Arc<Vec<Event>>)>,
    /// Bytes of keys and values in `history`.
    history_bytes: usize,
    leases: HashMap<LeaseId, LeaseState>,
    next_lease: LeaseId,
}

/// The log, and with it the right to write.
struct Log {
    wal: Wal,
    snapshot_every: u64,
}

/// Two locks, taken in this order: `log` then `state`. A writer holds `log` from its compares
/// to its apply, so what it compared still holds when it applies; it takes `state` only for
/// the moments it reads or changes memory, never across an fsync. Readers take `state` alone,
/// so a read never waits for a write to reach the disk (or for a snapshot to be written).
struct Inner {
    state: Mutex<State>,
    watchers: Mutex<Watchers>,
    log: Mutex<Log>,
    path: PathBuf,
}

/// A writer: holds the log; reaches memory through short `state` locks.
struct Writer<'a> {
    log: MutexGuard<'a, Log>,
    inner: &'a Inner,
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
            revision: snapshot.header.revision,
            compact_revision: snapshot
                .header
                .compact_revision
                .max(snapshot.header.revision + 1),
            kvs: snapshot
                .kvs
                .into_iter()
                .map(|kv| (kv.key.clone(), Arc::new(kv)))
                .collect(),
            history: VecDeque::new(),
            history_bytes: 0,
            leases: HashMap::new(),
            next_lease: snapshot.header.next_lease.max(1),
        };
        for (id, ttl_ms) in snapshot.header.leases {
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
                    // No watcher exists yet: the events live on in history only.
                    let _ = state.apply(revision, ops);
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
            watchers: Mutex::new(Watchers::default()),
            log: Mutex::new(Log {
                wal,
                snapshot_every: options.snapshot_every.max(1),
            }),
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

    /// Runs a write on a blocking thread (it fsyncs), holding the log.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&mut Writer::new(&inner)))
            .await
            .map_err(|_| StoreError::Closed)?
    }
}

fn lock(inner: &Inner) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves memory consistent with the log (the log is written
    // first), so a poisoned lock is still usable.
    inner.state.lock().unwrap_or_else(|p| p.into_inner())
}

impl<'a> Writer<'a> {
    fn new(inner: &'a Inner) -> Self {
        Writer {
            log: inner.log.lock().unwrap_or_else(|p| p.into_inner()),
            inner,
        }
    }

    fn state(&self) -> MutexGuard<'a, State> {
        lock(self.inner)
    }

    /// Logs then applies a write; returns the new revision (unchanged if `ops` is empty).
    fn write(&mut self, ops: Vec<AppliedOp>) -> Result<Revision, StoreError> {
        if ops.is_empty() {
            return Ok(self.state().revision);
        }
        let revision = self.state().revision + 1;
        self.log.wal.append(&WalEntry::Write {
            revision,
            ops: ops.clone(),
        })?;
        let applied = self.state().apply(revision, ops);
        self.inner.deliver(applied);
        // The write is durable and applied: a failed snapshot must not report it as failed.
        if let Err(e) = self.maybe_snapshot() {
            tracing::error!(error = %e, "store snapshot failed; the log keeps growing");
        }
        Ok(revision)
    }

    /// Revokes lease `id`; with `expired_at`, only if it had expired by then (checked in the
    /// same step that stops keep-alives, so one that came in meanwhile wins).
    fn revoke(&mut self, id: LeaseId, expired_at: Option<Instant>) -> Result<(), StoreError> {
        let ops: Vec<AppliedOp> = {
            let mut state = self.state();
            let Some(lease) = state.leases.get_mut(&id) else {
                return Err(StoreError::LeaseNotFound(id));
            };
            if let Some(at) = expired_at {
                if lease.deadline > at {
                    return Ok(());
                }
                tracing::info!(lease = id, "lease expired");
            }
            lease.revoking = true;
            lease
                .keys
                .iter()
                .map(|k| AppliedOp::Delete { key: k.clone() })
                .collect()
        };
        // Log the deletes first: if we crash between the two entries the lease comes back with
        // a fresh TTL and no keys, and simply expires again.
        let deletes = if ops.is_empty() {
            None
        } else {
            let revision = self.state().revision + 1;
            let logged = self.log.wal.append(&WalEntry::Write {
                revision,
                ops: ops.clone(),
            });
            if let Err(e) = logged {
                // Nothing changed: the lease lives on.
                if let Some(lease) = self.state().leases.get_mut(&id) {
                    lease.revoking = false;
                }
                return Err(e);
            }
            Some((revision, ops))
        };
        let revoked = self.log.wal.append(&WalEntry::LeaseRevoke { id });
        let applied = {
            // One step for readers: once a watcher sees the keys go, the lease is gone too.
            let mut state = self.state();
            let applied = deletes.map(|(revision, ops)| state.apply(revision, ops));
            if revoked.is_ok() {
                state.leases.remove(&id);
            }
            applied
        };
        if let Some(applied) = applied {
            self.inner.deliver(applied);
        }
        if let Err(e) = self.maybe_snapshot() {
            tracing::error!(error = %e, "store snapshot failed; the log keeps growing");
        }
        revoked
    }

    fn maybe_snapshot(&mut self) -> Result<(), StoreError> {
        if !self.log.wal.should_fold(self.log.snapshot_every) {
            return Ok(());
        }
        // Memory cannot run ahead of the log while we hold it: this copy (of pointers, not
        // values) is what the log holds, and readers go on while it is written out.
        let (header, kvs) = {
            let state = self.state();
            let header = SnapshotHeader {
                revision: state.revision,
                compact_revision: state.compact_revision,
                leases: state
                    .leases
                    .iter()
                    .map(|(id, l)| (*id, l.ttl.as_millis() as u64))
                    .collect(),
                next_lease: state.next_lease,
            };
            (header, state.kvs.values().cloned().collect::<Vec<_>>())
        };
        self.log.wal.write_snapshot(&header, &kvs)
    }
}

async fn expire_leases(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(inner) = inner.upgrade() else { return };
        let result = tokio::task::spawn_blocking(move || {
            let now = Instant::now();
            let expired = |state: &State, id: &LeaseId| {
                state.leases.get(id).is_some_and(|l| l.deadline <= now)
            };
            let candidates: Vec<LeaseId> = {
                let state = lock(&inner);
                state
                    .leases
                    .keys()
                    .filter(|id| expired(&state, id))
                    .copied()
                    .collect()
            };
            if candidates.is_empty() {
                return Ok::<(), StoreError>(());
            }
            let mut writer = Writer::new(&inner);
            for id in candidates {
                // A keep-alive may have come in since the list was made: revoke checks again.
                writer.revoke(id, Some(now))?;
            }
            Ok(())
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
                revoking: false,
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

    /// Applies logged changes to memory and records them in history; returns the events for
    /// the watchers (deliver them with [`Inner::deliver`] after releasing the state lock).
    #[must_use]
    fn apply(&mut self, revision: Revision, ops: Vec<AppliedOp>) -> (Revision, Arc<Vec<Event>>) {
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
                    self.kvs.insert(key, Arc::new(kv));
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
        let events = Arc::new(events);
        self.history_bytes += events_bytes(&events);
        self.history.push_back((revision, events.clone()));
        self.trim_history();
        (revision, events)
    }

    fn trim_history(&mut self) {
        let floor = self.revision.saturating_sub(HISTORY_REVISIONS);
        if floor > self.compact_revision {
            self.compact_revision = floor;
        }
        while let Some((rev, events)) = self.history.front() {
            if *rev < self.compact_revision || self.history_bytes > HISTORY_BYTES {
                self.history_bytes -= events_bytes(events);
                self.compact_revision = self.compact_revision.max(rev + 1);
                self.history.pop_front();
            } else {
                break;
            }
        }
    }
}

fn events_bytes(events: &[Event]) -> usize {
    events
        .iter()
        .map(|e| e.kv.key.len() + e.kv.value.len() + 64)
        .sum()
}

impl Inner {
    fn deliver(&self, (revision, events): (Revision, Arc<Vec<Event>>)) {
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deliver(revision, &events);
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let found = self.lock().kvs.get(key).cloned();
        Ok(found.map(|kv| (*kv).clone()))
    }

    async fn get_shared(&self, key: &str) -> Result<Option<Arc<KeyValue>>, StoreError> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse, StoreError> {
        // Pointers under the lock, values copied after it.
        let (shared, revision): (Vec<Arc<KeyValue>>, Revision) = {
            let state = self.lock();
            let shared = state
                .kvs
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v.clone())
                .collect();
            (shared, state.revision)
        };
        Ok(RangeResponse {
            kvs: shared.iter().map(|kv| (**kv).clone()).collect(),
            revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.blocking(move |writer| {
            let (succeeded, applied) = {
                let state = writer.state();
                let succeeded = txn.compares.iter().all(|c| state.compare(c));
                let ops = if succeeded {
                    &txn.success
                } else {
                    &txn.failure
                };
                (succeeded, state.resolve(ops)?)
            };
            let revision = writer.write(applied)?;
            Ok(TxnResponse {
                succeeded,
                revision,
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<Watch, StoreError> {
        let state = self.lock();
        let start = start_revision.max(1);
        if start < state.compact_revision && start <= state.revision {
            return Err(StoreError::Compacted {
                requested: start,
                compact_revision: state.compact_revision,
            });
        }
        // What is in history for it goes into its buffer at once, so a replay that does not
        // fit is refused like compacted history: the caller lists again.
        let (sender, receiver) = mpsc::channel(crate::WATCH_BUFFER);
        let first = state.history.partition_point(|(r, _)| *r < start);
        let mut replayed = 0;
        for (revision, events) in state.history.range(first..) {
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| e.kv.key.starts_with(prefix))
                .cloned()
                .collect();
            if mine.is_empty() {
                continue;
            }
            replayed += 1;
            // Half the buffer at most, so live events have room behind the replay.
            if replayed > crate::WATCH_BUFFER / 2 {
                return Err(StoreError::Compacted {
                    requested: start,
                    compact_revision: revision + 1,
                });
            }
            let _ = sender.try_send(WatchMessage::Events {
                revision: *revision,
                events: mine,
            });
        }
        let mut watchers = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let id = watchers.next_id;
        watchers.next_id += 1;
        watchers.list.push(Watcher {
            id,
            prefix: prefix.to_string(),
            sender,
            delivered: state.revision,
        });
        drop(watchers);
        drop(state);
        let inner = Arc::downgrade(&self.inner);
        Ok(Watch::new(receiver, move || {
            if let Some(inner) = inner.upgrade() {
                inner
                    .watchers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .progress(id);
            }
        }))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.blocking(move |writer| {
            let id = writer.state().next_lease;
            let ttl_ms = ttl.as_millis().max(1) as u64;
            writer
                .log
                .wal
                .append(&WalEntry::LeaseGrant { id, ttl_ms })?;
            let mut state = writer.state();
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
            .filter(|l| !l.revoking)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |writer| writer.revoke(lease, None))
            .await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.blocking(move |writer| {
            let revision = {
                let state = writer.state();
                let revision = revision.min(state.revision);
                if revision <= state.compact_revision {
                    return Ok(());
                }
                revision
            };
            writer.log.wal.append(&WalEntry::Compact { revision })?;
            let mut state = writer.state();
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

#[cfg(test)]
mod tests;
