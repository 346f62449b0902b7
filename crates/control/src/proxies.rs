//! Proxies as the control plane keeps them: a leased record carrying the route revision each
//! one applied (the stop protocol waits on it), and whether that table is still current.

use std::time::Duration;

use dozen_model::{decode, encode, keys, ProxyRecord, SCHEMA};
use dozen_store::{Compare, Op, Store, Txn, WatchMessage};

use crate::nodes::{check_name, keep_alive_record, put_leased};
use crate::snapshot::Snapshot;
use crate::{routes, Result};

/// Writes proxy `id`'s record under a new lease of `ttl`; returns the lease.
pub async fn register(
    store: &dyn Store,
    id: &str,
    public_address: String,
    internal_address: String,
    ttl: Duration,
) -> Result<u64> {
    check_name(id)?;
    let record = ProxyRecord {
        schema: SCHEMA,
        id: id.to_string(),
        applied_revision: 0,
        public_address,
        internal_address,
    };
    let lease = put_leased(store, keys::proxy(id), encode(&record), ttl).await?;
    tracing::info!(proxy = id, public = %record.public_address, "proxy registered");
    Ok(lease)
}

/// Keeps proxy `id`'s lease alive and records the route revision it applied (written only
/// when it changed, so a heartbeat is not a write).
pub async fn heartbeat(
    store: &dyn Store,
    id: &str,
    lease: u64,
    applied_revision: u64,
) -> Result<()> {
    let key = keys::proxy(id);
    keep_alive_record(store, &key, lease, "proxy", id).await?;
    let Some(kv) = store.get(&key).await? else {
        return Ok(());
    };
    let mut record: ProxyRecord = decode(&key, &kv.value)?;
    if record.applied_revision != applied_revision && kv.lease == Some(lease) {
        record.applied_revision = applied_revision;
        store
            .txn(
                Txn::new()
                    .when(Compare::mod_revision(&key, kv.mod_revision))
                    .then(Op::Put {
                        key: key.clone(),
                        value: encode(&record),
                        lease: Some(lease),
                    }),
            )
            .await?;
    }
    Ok(())
}

/// Every live proxy, each with whether nothing routes depend on changed since its table;
/// and the revision read at.
pub async fn list(store: &dyn Store) -> Result<(Vec<(ProxyRecord, bool)>, u64)> {
    let snap = Snapshot::read(store).await?;
    let head = snap.revision;
    let checks = snap.proxies.into_values().map(|proxy| async move {
        let current = routes_unchanged(store, proxy.record.applied_revision, head).await;
        (proxy.record, current)
    });
    Ok((futures_util::future::join_all(checks).await, head))
}

/// Whether nothing that routes depend on changed after revision `applied`, up to `head`: read
/// from the store's history (false when that history is compacted away, or when the store
/// does not say within a few seconds). The watch's progress answer says when every event up
/// to `head` has been seen (on an etcd shared with others, revision `head` itself may hold no
/// dozen key).
async fn routes_unchanged(store: &dyn Store, applied: u64, head: u64) -> bool {
    if applied >= head {
        return true;
    }
    let Ok(mut watch) = store.watch(keys::ROOT, applied + 1).await else {
        return false;
    };
    watch.request_progress();
    let answer = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match watch.next().await {
                Some(WatchMessage::Events { revision, events }) => {
                    if revision > head {
                        return true;
                    }
                    if events.iter().any(|e| routes::affects_routes(&e.kv.key)) {
                        return false;
                    }
                    if revision == head {
                        return true;
                    }
                }
                Some(WatchMessage::Progress { revision }) if revision >= head => return true,
                // etcd answers progress once the watch has caught up: ask again.
                Some(WatchMessage::Progress { .. }) => watch.request_progress(),
                Some(WatchMessage::Compacted { .. } | WatchMessage::CutOff) | None => return false,
            }
        }
    })
    .await;
    answer.unwrap_or(false)
}

/// Waits (at most `wait`) until something routes depend on changes after revision `after`.
pub async fn wait_for_route_change(store: &dyn Store, after: u64, wait: Duration) {
    let Ok(mut watch) = store.watch(keys::ROOT, after.saturating_add(1)).await else {
        return;
    };
    let _ = tokio::time::timeout(wait, async {
        while let Some(msg) = watch.next().await {
            match msg {
                WatchMessage::Events { events, .. } => {
                    if events.iter().any(|e| routes::affects_routes(&e.kv.key)) {
                        return;
                    }
                }
                WatchMessage::Progress { .. } => {}
                WatchMessage::Compacted { .. } | WatchMessage::CutOff => return,
            }
        }
    })
    .await;
}

/// The route table as of now.
pub async fn route_table(store: &dyn Store) -> Result<dozen_model::RouteTable> {
    let snap = Snapshot::read(store).await?;
    Ok(routes::table(&snap))
}
