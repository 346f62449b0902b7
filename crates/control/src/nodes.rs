//! Nodes as the control plane keeps them: registration under a lease, heartbeats, and the task
//! statuses agents report. The API server parses and authorises; these decide and write.

use std::time::Duration;

use dozen_model::{encode, keys, NodeRecord, TaskStatus, SCHEMA};
use dozen_store::{Compare, Op, Store, StoreError, Txn};

use crate::{ControlError, Result};

/// Node (and proxy) names become keys and certificate names: letters, digits, '-', '_', '.'.
pub fn check_name(node: &str) -> Result<()> {
    if node.is_empty()
        || node.len() > 63
        || !node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || node.contains("..")
        || node.starts_with(['.', '-'])
        || node.ends_with(['.', '-'])
    {
        return Err(ControlError::Invalid(format!(
            "node name `{node}` is not valid: use letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// Writes `record` for node `node` under a new lease of `ttl`; returns the lease.
/// `by_certificate`: the caller showed the node's certificate, so servers will call the
/// address with theirs and it must be `https://` (only an operator, who holds the token
/// anyway, may name a plain-HTTP one, which servers call with the token).
pub async fn register(
    store: &dyn Store,
    node: &str,
    record: NodeRecord,
    ttl: Duration,
    by_certificate: bool,
) -> Result<u64> {
    check_name(node)?;
    if record.name != node {
        return Err(ControlError::Invalid(format!(
            "node record names `{}` but was sent for `{node}`",
            record.name
        )));
    }
    if by_certificate && !record.address.starts_with("https://") {
        return Err(ControlError::Invalid(format!(
            "node `{node}` registered the address `{}`: a node with a certificate serves its \
             agent API over https://",
            record.address
        )));
    }
    let record = NodeRecord {
        schema: SCHEMA,
        ..record
    };
    let lease = store.grant_lease(ttl).await?;
    let written = store
        .txn(
            Txn::new()
                .then(Op::put(keys::node(node), encode(&record)))
                .then(Op::Put {
                    key: keys::node_alive(node),
                    value: record.agent_instance.clone().into_bytes(),
                    lease: Some(lease),
                }),
        )
        .await;
    if let Err(e) = written {
        let _ = store.revoke_lease(lease).await;
        return Err(e.into());
    }
    tracing::info!(node, instance = %record.agent_instance, address = %record.address, "node registered");
    Ok(lease)
}

/// Writes `value` at `key` under a new lease of `ttl`; returns the lease.
pub(crate) async fn put_leased(
    store: &dyn Store,
    key: String,
    value: Vec<u8>,
    ttl: Duration,
) -> Result<u64> {
    let lease = store.grant_lease(ttl).await?;
    store
        .txn(Txn::new().then(Op::Put {
            key,
            value,
            lease: Some(lease),
        }))
        .await?;
    Ok(lease)
}

/// Keeps node `node`'s lease alive. `NotFound` when it holds another lease or none: the
/// agent registers again.
pub async fn heartbeat(store: &dyn Store, node: &str, lease: u64) -> Result<()> {
    keep_alive_record(store, &keys::node_alive(node), lease, "node", node).await
}

/// Keeps the lease of the record at `key` alive, if that record holds `lease`.
pub(crate) async fn keep_alive_record(
    store: &dyn Store,
    key: &str,
    lease: u64,
    kind: &'static str,
    name: &str,
) -> Result<()> {
    let kv = store.get(key).await?;
    if kv.and_then(|kv| kv.lease) != Some(lease) {
        return Err(ControlError::LeaseLost(format!(
            "{kind} `{name}` holds no lease {lease}; register again"
        )));
    }
    match store.keep_alive(lease).await {
        Ok(()) => Ok(()),
        Err(StoreError::LeaseNotFound(_)) => Err(ControlError::LeaseLost(format!(
            "lease of {kind} `{name}` expired; register again"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Records the statuses node `node` reports, for the tasks still assigned to it: a late
/// report about a removed task is dropped. The write is guarded by those assignments
/// existing; if one vanishes meanwhile, the batch is filtered again so the other statuses are
/// never lost with it.
pub async fn report_status(store: &dyn Store, node: &str, statuses: &[TaskStatus]) -> Result<()> {
    check_name(node)?;
    for status in statuses {
        if status.node != node {
            return Err(ControlError::Invalid(format!(
                "status of task `{}` names node `{}`, sent by `{node}`",
                status.task, status.node
            )));
        }
    }
    // Each status stands alone (guarded by its own assignment), so a report is written in
    // transactions of as many as the store takes (etcd: 128): an agent re-reporting hundreds
    // of tasks after a restart is never refused for its size.
    let per_txn = store.max_txn_ops().max(1);
    for chunk in statuses.chunks(per_txn) {
        report_chunk(store, node, chunk).await?;
    }
    Ok(())
}

async fn report_chunk(store: &dyn Store, node: &str, statuses: &[TaskStatus]) -> Result<()> {
    for _ in 0..5 {
        let mut txn = Txn::new();
        let mut any = false;
        for status in statuses {
            let akey = keys::assignment(node, &status.task);
            if store.get(&akey).await?.is_none() {
                continue;
            }
            let record = TaskStatus {
                schema: SCHEMA,
                ..status.clone()
            };
            txn = txn
                .when(Compare::exists(&akey))
                .then(Op::put(keys::status(node, &record.task), encode(&record)));
            any = true;
        }
        if !any || store.txn(txn).await?.succeeded {
            return Ok(());
        }
    }
    Err(ControlError::Conflict(format!(
        "assignments of node `{node}` kept changing while recording status; report again"
    )))
}
