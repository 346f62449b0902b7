//! The etcd backend (cluster mode): the same [`Store`] trait over an etcd v3 cluster.
//!
//! etcd already has the semantics the trait describes (it was written after it), so this is a
//! translation: prefixes become ranges, compares and ops map one to one, a watch from a
//! compacted revision is refused with `Compacted`, and leases are etcd leases (etcd counts TTLs
//! in whole seconds and enforces its own minimum).

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client as ec;
use tokio::sync::mpsc;

use crate::{
    CompareOp, CompareTarget, Event, EventKind, KeyValue, LeaseId, Op, RangeResponse, Revision,
    Store, StoreError, Txn, TxnResponse, Watch, WatchMessage,
};

/// How to reach an etcd cluster.
#[derive(Clone, Default)]
pub struct EtcdOptions {
    /// `http://h1:2379` or `https://h1:2379`, one per member.
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
    /// User name and password for etcd's own authentication.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdOptions {
    // The password stays out of logs and error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

#[derive(Clone, Default)]
pub struct EtcdTls {
    /// The CA that signed the members' certificates (PEM); the system roots when absent.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its key (PEM), for members that require one.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

#[derive(Clone)]
pub struct EtcdStore {
    client: ec::Client,
    endpoints: Vec<String>,
}

fn backend(endpoints: &[String]) -> impl Fn(ec::Error) -> StoreError + '_ {
    move |e| StoreError::Backend(format!("etcd {}: {e}", endpoints.join(",")))
}

/// True only for a failure to open a connection (tonic reports those as `Unavailable` with the
/// connector's message, and drops the source): nothing was sent, so even a txn may be sent
/// again. A connection lost after the request went out is not this, and is not retried.
fn never_reached_a_member(e: &ec::Error) -> bool {
    let ec::Error::GRpcStatus(status) = e else {
        return false;
    };
    let message = status.message();
    status.code() == tonic::Code::Unavailable
        && (message.contains("tcp connect error")
            || message.contains("error trying to connect")
            || message.contains("dns error"))
}

fn revision_of(header: Option<&ec::ResponseHeader>) -> Revision {
    header.map(|h| h.revision().max(0) as u64).unwrap_or(0)
}

fn key_value(kv: &ec::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision().max(0) as u64,
        mod_revision: kv.mod_revision().max(0) as u64,
        version: kv.version().max(0) as u64,
        lease: (kv.lease() != 0).then_some(kv.lease() as u64),
    }
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://h1:2379`, ...) without TLS or auth.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        Self::connect_with(&EtcdOptions {
            endpoints: endpoints.to_vec(),
            ..EtcdOptions::default()
        })
        .await
    }

    /// Connects with TLS (a CA, and a client certificate when etcd asks for one) and user
    /// authentication as `options` say.
    pub async fn connect_with(options: &EtcdOptions) -> Result<Self, StoreError> {
        let endpoints = &options.endpoints;
        let mut connect = ec::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        if let Some(tls) = &options.tls {
            let mut config = ec::TlsOptions::new();
            if let Some(ca) = &tls.ca_pem {
                config = config.ca_certificate(ec::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity_pem {
                config = config.identity(ec::Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(config);
        }
        if let Some((user, password)) = &options.user {
            connect = connect.with_user(user, password);
        }
        let client = ec::Client::connect(endpoints, Some(connect))
            .await
            .map_err(backend(endpoints))?;
        Ok(EtcdStore {
            client,
            endpoints: endpoints.clone(),
        })
    }

    /// Runs `call` again, on whichever member the balancer picks next, while the failure is a
    /// connection that never reached a member: with one member down, its share of calls
    /// fails that way, and such a call is safe to repeat because nothing was sent.
    async fn call<T, Fut>(&self, mut call: impl FnMut(ec::Client) -> Fut) -> Result<T, ec::Error>
    where
        Fut: Future<Output = Result<T, ec::Error>>,
    {
        let mut attempt = 0u64;
        loop {
            match call(self.client.clone()).await {
                Err(e) if attempt < 10 && never_reached_a_member(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                other => return other,
            }
        }
    }

    fn err(&self) -> impl Fn(ec::Error) -> StoreError + '_ {
        backend(&self.endpoints)
    }

    /// True when history at `revision` is gone: a read at a compacted revision is refused,
    /// while one beyond the head is refused as a future revision (not compacted).
    async fn is_compacted(&self, prefix: &str, revision: Revision) -> Result<bool, StoreError> {
        let options = ec::GetOptions::new()
            .with_prefix()
            .with_revision(revision as i64)
            .with_count_only();
        let read = self
            .call(|mut c| {
                let options = options.clone();
                async move { c.get(prefix, Some(options)).await }
            })
            .await;
        match read {
            Ok(_) => Ok(false),
            Err(e) if e.to_string().contains("future revision") => Ok(false),
            Err(e) if e.to_string().contains("compacted") => Ok(true),
            Err(e) => Err(self.err()(e)),
        }
    }

    fn compare(c: &crate::Compare) -> ec::Compare {
        let op = match c.op {
            CompareOp::Equal => ec::CompareOp::Equal,
            CompareOp::NotEqual => ec::CompareOp::NotEqual,
            CompareOp::Less => ec::CompareOp::Less,
            CompareOp::Greater => ec::CompareOp::Greater,
        };
        let key = c.key.as_bytes().to_vec();
        match &c.target {
            CompareTarget::Version(v) => ec::Compare::version(key, op, *v as i64),
            CompareTarget::CreateRevision(r) => ec::Compare::create_revision(key, op, *r as i64),
            CompareTarget::ModRevision(r) => ec::Compare::mod_revision(key, op, *r as i64),
            CompareTarget::Value(v) => ec::Compare::value(key, op, v.clone()),
        }
    }

    fn op(op: &Op) -> ec::TxnOp {
        match op {
            Op::Put { key, value, lease } => {
                let options = lease.map(|l| ec::PutOptions::new().with_lease(l as i64));
                ec::TxnOp::put(key.as_bytes().to_vec(), value.clone(), options)
            }
            Op::Delete { key } => ec::TxnOp::delete(key.as_bytes().to_vec(), None),
            Op::DeletePrefix { prefix } => ec::TxnOp::delete(
                prefix.as_bytes().to_vec(),
                Some(ec::DeleteOptions::new().with_prefix()),
            ),
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .call(|mut c| async move { c.get(key, None).await })
            .await
            .map_err(self.err())?;
        Ok(resp.kvs().first().map(key_value))
    }

    /// In pages, all read at the first page's revision (one consistent view): a whole-prefix
    /// read in one answer fails past the client's 4 MiB message limit. A page that is still too
    /// big is asked again with half as many keys.
    async fn range(&self, prefix: &str) -> Result<RangeResponse, StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut kvs = Vec::new();
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0i64;
        let mut limit = RANGE_PAGE_KEYS;
        loop {
            let options = ec::GetOptions::new()
                .with_range(end.clone())
                .with_limit(limit)
                .with_revision(revision);
            let read = self
                .call(|mut c| {
                    let (key, options) = (from.clone(), options.clone());
                    async move { c.get(key, Some(options)).await }
                })
                .await;
            let resp = match read {
                Ok(resp) => resp,
                Err(e) if limit > 1 && answer_too_large(&e) => {
                    limit /= 2;
                    continue;
                }
                Err(e) => return Err(self.err()(e)),
            };
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let page = resp.kvs();
            kvs.extend(page.iter().map(key_value));
            match page.last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(RangeResponse {
            kvs,
            revision: revision.max(0) as u64,
        })
    }

    fn max_txn_ops(&self) -> usize {
        ETCD_MAX_TXN_OPS
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let ops = txn
            .compares
            .len()
            .max(txn.success.len())
            .max(txn.failure.len());
        if ops > ETCD_MAX_TXN_OPS {
            return Err(StoreError::TooManyOps {
                ops,
                limit: ETCD_MAX_TXN_OPS,
            });
        }
        // etcd refuses a put under a lease it does not know with a generic error: name it.
        for op in txn.success.iter().chain(&txn.failure) {
            if let Op::Put {
                lease: Some(lease), ..
            } = op
            {
                let lease = *lease as i64;
                let ttl = self
                    .call(|mut c| async move { c.lease_time_to_live(lease, None).await })
                    .await
                    .map_err(self.err())?;
                if ttl.ttl() <= 0 {
                    return Err(StoreError::LeaseNotFound(lease as u64));
                }
            }
        }
        let request = ec::Txn::new()
            .when(txn.compares.iter().map(Self::compare).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(Self::op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(Self::op).collect::<Vec<_>>());
        let resp = self
            .call(|mut c| {
                let request = request.clone();
                async move { c.txn(request).await }
            })
            .await
            .map_err(self.err())?;
        Ok(TxnResponse {
            succeeded: resp.succeeded(),
            revision: revision_of(resp.header()),
        })
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<Watch, StoreError> {
        let start_revision = start_revision.max(1);
        let compacted = self.is_compacted(prefix, start_revision).await?;
        let options = ec::WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision as i64);
        let (watcher, mut stream) = self
            .call(|mut c| {
                let options = options.clone();
                async move { c.watch(prefix, Some(options)).await }
            })
            .await
            .map_err(self.err())?;
        if compacted {
            // etcd cancels a watch from compacted history right after creating it, and that
            // cancellation is the only place it names the compaction revision.
            let canceled = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
            let compact_revision = match canceled {
                Ok(Ok(Some(resp))) if resp.compact_revision() > 0 => resp.compact_revision() as u64,
                _ => start_revision,
            };
            return Err(StoreError::Compacted {
                requested: start_revision,
                compact_revision,
            });
        }
        let (sender, receiver) = mpsc::channel(crate::WATCH_BUFFER);
        let forward = |resp: &ec::WatchResponse, sender: &mpsc::Sender<WatchMessage>| {
            if resp.events().is_empty() && !resp.created() {
                // A progress notification: every event up to its revision has been sent.
                return crate::offer(
                    sender,
                    WatchMessage::Progress {
                        revision: revision_of(resp.header()),
                    },
                );
            }
            let mut by_revision: Vec<(Revision, Vec<Event>)> = Vec::new();
            for e in resp.events() {
                let Some(kv) = e.kv() else { continue };
                let mut kv = key_value(kv);
                let kind = match e.event_type() {
                    ec::EventType::Put => EventKind::Put,
                    ec::EventType::Delete => {
                        kv.value.clear();
                        kv.create_revision = 0;
                        kv.version = 0;
                        kv.lease = None;
                        EventKind::Delete
                    }
                };
                let rev = kv.mod_revision;
                match by_revision.last_mut() {
                    Some((r, events)) if *r == rev => events.push(Event { kind, kv }),
                    _ => by_revision.push((rev, vec![Event { kind, kv }])),
                }
            }
            for (revision, events) in by_revision {
                if !crate::offer(sender, WatchMessage::Events { revision, events }) {
                    return false;
                }
            }
            true
        };
        // Progress requests reach etcd through the watch's own stream; at most one waits.
        let (progress_tx, mut progress_rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            let mut watcher = watcher;
            loop {
                tokio::select! {
                    Some(()) = progress_rx.recv() => {
                        if watcher.request_progress().await.is_err() {
                            return;
                        }
                    }
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) => {
                            if resp.canceled() {
                                if resp.compact_revision() > 0 {
                                    let _ = crate::offer(&sender, WatchMessage::Compacted {
                                        compact_revision: resp.compact_revision() as u64,
                                    });
                                } else {
                                    // Not history lost (a member shutting down, an auth
                                    // change): end the stream, the consumer watches again.
                                    tracing::warn!(
                                        reason = resp.cancel_reason(),
                                        "etcd cancelled a watch"
                                    );
                                }
                                return;
                            }
                            if !forward(&resp, &sender) {
                                return;
                            }
                        }
                        // The stream broke: the consumer sees the end and watches again.
                        _ => return,
                    },
                    _ = sender.closed() => return,
                }
            }
        });
        Ok(Watch::new(receiver, move || {
            let _ = progress_tx.try_send(());
        }))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let resp = self
            .call(|mut c| async move { c.lease_grant(secs, None).await })
            .await
            .map_err(self.err())?;
        Ok(resp.id() as u64)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let not_found = |e: ec::Error| {
            if e.to_string().contains("not found") {
                StoreError::LeaseNotFound(lease)
            } else {
                self.err()(e)
            }
        };
        let (mut keeper, mut stream) = self
            .call(|mut c| async move { c.lease_keep_alive(lease as i64).await })
            .await
            .map_err(not_found)?;
        keeper.keep_alive().await.map_err(not_found)?;
        match stream.message().await.map_err(not_found)? {
            Some(resp) if resp.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let revoked = self
            .call(|mut c| async move { c.lease_revoke(lease as i64).await })
            .await;
        match revoked {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(self.err()(e)),
        }
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let compacted = self
            .call(|mut c| async move {
                c.compact(
                    revision as i64,
                    Some(ec::CompactionOptions::new().with_physical()),
                )
                .await
            })
            .await;
        match compacted {
            Ok(_) => Ok(()),
            // Compacting at or below the current floor is not an error for us.
            Err(e) if e.to_string().contains("compacted") => Ok(()),
            Err(e) => Err(self.err()(e)),
        }
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        // A range over one key that does not exist answers with the header alone.
        let resp = self
            .call(|mut c| async move { c.get("\0dozen-revision-probe", None).await })
            .await
            .map_err(self.err())?;
        Ok(revision_of(resp.header()))
    }
}

/// Keys per page of a range read (halved while a page is too big for one answer).
const RANGE_PAGE_KEYS: i64 = 1000;

/// etcd's default `--max-txn-ops`: compares, and operations per branch, in one transaction.
pub const ETCD_MAX_TXN_OPS: usize = 128;

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// The answer was bigger than the client takes in one message.
fn answer_too_large(e: &ec::Error) -> bool {
    match e {
        ec::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::OutOfRange || status.message().contains("too large")
        }
        _ => e.to_string().contains("too large"),
    }
}
