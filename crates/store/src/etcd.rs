//! The etcd backend (cluster mode): the same [`Store`] trait over an etcd v3 cluster.
//!
//! etcd already has the semantics the trait describes (it was written after it), so this is a
//! translation: prefixes become ranges, compares and ops map one to one, a watch from a
//! compacted revision is refused with `Compacted`, and leases are etcd leases (etcd counts TTLs
//! in whole seconds and enforces its own minimum).

use std::time::Duration;

use async_trait::async_trait;
use etcd_client as ec;
use tokio::sync::mpsc;

use crate::{
    CompareOp, CompareTarget, Event, EventKind, KeyValue, LeaseId, Op, RangeResponse, Revision,
    Store, StoreError, Txn, TxnResponse, Watch, WatchMessage,
};

#[derive(Clone)]
pub struct EtcdStore {
    client: ec::Client,
    endpoints: Vec<String>,
}

fn backend(endpoints: &[String]) -> impl Fn(ec::Error) -> StoreError + '_ {
    move |e| StoreError::Backend(format!("etcd {}: {e}", endpoints.join(",")))
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
    /// Connects to the cluster at `endpoints` (`http://h1:2379`, ...).
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let options = ec::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let client = ec::Client::connect(endpoints, Some(options))
            .await
            .map_err(backend(endpoints))?;
        Ok(EtcdStore {
            client,
            endpoints: endpoints.to_vec(),
        })
    }

    fn err(&self) -> impl Fn(ec::Error) -> StoreError + '_ {
        backend(&self.endpoints)
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
        let mut client = self.client.clone();
        let resp = client.get(key, None).await.map_err(self.err())?;
        Ok(resp.kvs().first().map(key_value))
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse, StoreError> {
        let mut client = self.client.clone();
        let resp = client
            .get(prefix, Some(ec::GetOptions::new().with_prefix()))
            .await
            .map_err(self.err())?;
        Ok(RangeResponse {
            kvs: resp.kvs().iter().map(key_value).collect(),
            revision: revision_of(resp.header()),
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        // etcd refuses a put under a lease it does not know with a generic error: name it.
        for op in txn.success.iter().chain(&txn.failure) {
            if let Op::Put {
                lease: Some(lease), ..
            } = op
            {
                let mut client = self.client.clone();
                let ttl = client
                    .lease_time_to_live(*lease as i64, None)
                    .await
                    .map_err(self.err())?;
                if ttl.ttl() <= 0 {
                    return Err(StoreError::LeaseNotFound(*lease));
                }
            }
        }
        let request = ec::Txn::new()
            .when(txn.compares.iter().map(Self::compare).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(Self::op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(Self::op).collect::<Vec<_>>());
        let mut client = self.client.clone();
        let resp = client.txn(request).await.map_err(self.err())?;
        Ok(TxnResponse {
            succeeded: resp.succeeded(),
            revision: revision_of(resp.header()),
        })
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<Watch, StoreError> {
        let mut client = self.client.clone();
        let options = ec::WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision.max(1) as i64);
        let (watcher, mut stream) = client
            .watch(prefix, Some(options))
            .await
            .map_err(self.err())?;
        let first = stream.message().await.map_err(self.err())?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let forward = |resp: &ec::WatchResponse, sender: &mpsc::UnboundedSender<WatchMessage>| {
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
                if sender
                    .send(WatchMessage::Events { revision, events })
                    .is_err()
                {
                    return false;
                }
            }
            true
        };
        match first {
            Some(resp) if resp.canceled() && resp.compact_revision() > 0 => {
                return Err(StoreError::Compacted {
                    requested: start_revision,
                    compact_revision: resp.compact_revision() as u64,
                });
            }
            Some(resp) if resp.canceled() => {
                return Err(StoreError::Backend(format!(
                    "etcd refused the watch: {}",
                    resp.cancel_reason()
                )));
            }
            Some(resp) => {
                forward(&resp, &sender);
            }
            None => return Err(StoreError::Closed),
        }
        tokio::spawn(async move {
            let _watcher = watcher;
            loop {
                tokio::select! {
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) => {
                            if resp.canceled() {
                                let _ = sender.send(WatchMessage::Compacted {
                                    compact_revision: resp.compact_revision().max(0) as u64,
                                });
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
        Ok(Watch { receiver })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut client = self.client.clone();
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let resp = client.lease_grant(secs, None).await.map_err(self.err())?;
        Ok(resp.id() as u64)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let (mut keeper, mut stream) = client
            .lease_keep_alive(lease as i64)
            .await
            .map_err(self.err())?;
        keeper.keep_alive().await.map_err(self.err())?;
        match stream.message().await.map_err(self.err())? {
            Some(resp) if resp.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        match client.lease_revoke(lease as i64).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(self.err()(e)),
        }
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        match client
            .compact(
                revision as i64,
                Some(ec::CompactionOptions::new().with_physical()),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Compacting at or below the current floor is not an error for us.
            Err(e) if e.to_string().contains("compacted") => Ok(()),
            Err(e) => Err(self.err()(e)),
        }
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        let mut client = self.client.clone();
        // A range over one key that does not exist answers with the header alone.
        let resp = client
            .get("\0dozen-revision-probe", None)
            .await
            .map_err(self.err())?;
        Ok(revision_of(resp.header()))
    }
}
