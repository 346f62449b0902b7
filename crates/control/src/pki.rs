//! What the store keeps of the cluster's identities: join tokens (only a secret's SHA-256,
//! under a lease: the token's life), the certificates issued to each node, and revocations.
//! Signing is the server's (it holds the CA); these decide and write.

use std::time::Duration;

use dozen_model::keys;
use dozen_store::{Compare, Op, Store, Txn};
use serde::{Deserialize, Serialize};

use crate::{wall_ms, Result};

/// What a join token's record holds: never the secret, only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JoinTokenRecord {
    sha256: String,
    /// The one node name it joins.
    node: String,
    /// The hosts that node may claim (empty: decided at the join).
    #[serde(default)]
    hosts: Vec<String>,
}

/// What the store keeps of a certificate issued to a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IssuedRecord {
    serial: String,
    issued_at_ms: u64,
    /// The addresses the node may register as its `host` (empty in records from before
    /// hosts were bound: any).
    #[serde(default)]
    hosts: Vec<String>,
}

/// Stores join token `id` (its secret's SHA-256 in hex) for `ttl`, good for joining as `node`
/// only, claiming `hosts` (or, if empty, what is decided at the join).
pub async fn store_join_token(
    store: &dyn Store,
    id: &str,
    secret_sha256_hex: &str,
    node: &str,
    hosts: &[String],
    ttl: Duration,
) -> Result<()> {
    crate::nodes::check_name(node)?;
    let record = JoinTokenRecord {
        sha256: secret_sha256_hex.to_string(),
        node: node.to_string(),
        hosts: hosts.to_vec(),
    };
    crate::nodes::put_leased(
        store,
        keys::join_token(id),
        serde_json::to_vec(&record).unwrap_or_default(),
        ttl,
    )
    .await?;
    tracing::info!(
        token_id = id,
        node,
        ttl_ms = ttl.as_millis() as u64,
        "join token created"
    );
    Ok(())
}

/// A join token still to be used: its secret's hash, the node it is for, and the revision to
/// spend it at.
pub struct PendingJoin {
    pub secret_sha256_hex: Vec<u8>,
    /// None for a token made before tokens named their node.
    pub node: Option<String>,
    pub hosts: Vec<String>,
    mod_revision: u64,
    id: String,
}

/// The join token `id`, unless it is unknown, used or expired.
pub async fn find_join_token(store: &dyn Store, id: &str) -> Result<Option<PendingJoin>> {
    Ok(store.get(&keys::join_token(id)).await?.map(|kv| {
        match serde_json::from_slice::<JoinTokenRecord>(&kv.value) {
            Ok(record) => PendingJoin {
                secret_sha256_hex: record.sha256.into_bytes(),
                node: Some(record.node),
                hosts: record.hosts,
                mod_revision: kv.mod_revision,
                id: id.to_string(),
            },
            // Made by an earlier version: the value is the hash itself.
            Err(_) => PendingJoin {
                secret_sha256_hex: kv.value,
                node: None,
                hosts: Vec::new(),
                mod_revision: kv.mod_revision,
                id: id.to_string(),
            },
        }
    }))
}

/// Spends `token` and records the certificate `serial` issued to `node`, which may claim
/// `hosts`, in one step: false when another join used the token first.
pub async fn spend_join_token(
    store: &dyn Store,
    token: PendingJoin,
    node: &str,
    serial: &str,
    hosts: &[String],
) -> Result<bool> {
    let key = keys::join_token(&token.id);
    let issued = IssuedRecord {
        serial: serial.to_string(),
        issued_at_ms: wall_ms(),
        hosts: hosts.to_vec(),
    };
    let spent = store
        .txn(
            Txn::new()
                .when(Compare::mod_revision(&key, token.mod_revision))
                .then(Op::delete(&key))
                .then(Op::put(
                    keys::node_cert(node, serial),
                    serde_json::to_vec(&issued).unwrap_or_default(),
                )),
        )
        .await?;
    Ok(spent.succeeded)
}

/// The hosts the holder of certificate `serial` (issued to `node`) may register; None when
/// any (a certificate from before hosts were bound). A certificate the store has no record of
/// (forgotten, or issued under another name) may claim none.
pub async fn claimable_hosts(
    store: &dyn Store,
    node: &str,
    serial: &str,
) -> Result<Option<Vec<String>>> {
    let Some(kv) = store.get(&keys::node_cert(node, serial)).await? else {
        return Ok(Some(Vec::new()));
    };
    Ok(serde_json::from_slice::<IssuedRecord>(&kv.value)
        .ok()
        .map(|r| r.hosts)
        .filter(|hosts| !hosts.is_empty()))
}

/// The serials of the certificates issued to `node` that are not revoked: a node name is
/// taken while one of them exists.
pub async fn unrevoked_certificates(store: &dyn Store, node: &str) -> Result<Vec<String>> {
    let prefix = keys::node_certs(node);
    let issued = store.range(&prefix).await?;
    let mut live = Vec::new();
    for kv in issued.kvs {
        let Some(serial) = kv.key.strip_prefix(&prefix) else {
            continue;
        };
        if !is_revoked(store, serial).await? {
            live.push(serial.to_string());
        }
    }
    Ok(live)
}

/// Whether the certificate `serial` was revoked.
pub async fn is_revoked(store: &dyn Store, serial: &str) -> Result<bool> {
    Ok(store.get(&keys::revoked(serial)).await?.is_some())
}

/// Revokes every certificate issued to `node`; returns their serials (none when no
/// certificate was issued to it).
pub async fn revoke_node(store: &dyn Store, node: &str) -> Result<Vec<String>> {
    crate::nodes::check_name(node)?;
    let prefix = keys::node_certs(node);
    let issued = store.range(&prefix).await?;
    if issued.kvs.is_empty() {
        return Ok(Vec::new());
    }
    let serials: Vec<String> = issued
        .kvs
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_string))
        .collect();
    // A revoked node is forgotten too (not merely down): its tasks are replaced elsewhere and
    // it gets no traffic; it can join again with a new token, as a new node.
    let mut txn = Txn::new()
        .then(Op::delete(keys::node(node)))
        .then(Op::delete(keys::node_alive(node)));
    for serial in &serials {
        txn = txn.then(Op::put(keys::revoked(serial), node.as_bytes().to_vec()));
    }
    store.txn(txn).await?;
    tracing::warn!(node, serials = %serials.join(","), "node certificates revoked");
    Ok(serials)
}

/// Forgets the certificates issued to nodes that have expired by `now_ms`, with their
/// revocations: a certificate past its validity is refused by TLS anyway, so these records
/// are bounded by the joins of the last year. Returns how many were forgotten.
pub async fn forget_expired(store: &dyn Store, now_ms: u64) -> Result<usize> {
    let life_ms = u64::from(dozen_model::CERT_VALIDITY_DAYS) * 24 * 3600 * 1000;
    let prefix = format!("{}pki/certs/", keys::ROOT);
    let issued = store.range(&prefix).await?;
    let mut ops = Vec::new();
    for kv in &issued.kvs {
        let Ok(record) = serde_json::from_slice::<IssuedRecord>(&kv.value) else {
            continue;
        };
        // A day of margin for clocks that disagree.
        if record.issued_at_ms + life_ms + 24 * 3600 * 1000 < now_ms {
            ops.push(Op::delete(&kv.key));
            ops.push(Op::delete(keys::revoked(&record.serial)));
        }
    }
    let forgotten = ops.len() / 2;
    for chunk in ops.chunks((store.max_txn_ops().max(2) / 2) * 2) {
        let mut txn = Txn::new();
        txn.success = chunk.to_vec();
        store.txn(txn).await?;
    }
    if forgotten > 0 {
        tracing::info!(count = forgotten, "forgot expired node certificates");
    }
    Ok(forgotten)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seen: `pki/` only grew. Certificates past their validity are forgotten with their
    /// revocations; live ones, revoked or not, stay.
    #[tokio::test]
    async fn expired_certificates_are_forgotten_with_their_revocations() {
        let dir = tempfile::tempdir().unwrap();
        let store = dozen_store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let now: u64 = 1_800_000_000_000;
        let year_and_a_half = 548 * 24 * 3600 * 1000;
        for (serial, issued_at_ms) in [("0old", now - year_and_a_half), ("0new", now - 1000)] {
            let record = IssuedRecord {
                serial: serial.into(),
                issued_at_ms,
                hosts: vec![],
            };
            store
                .put(
                    &keys::node_cert("n1", serial),
                    serde_json::to_vec(&record).unwrap(),
                )
                .await
                .unwrap();
            store
                .put(&keys::revoked(serial), b"n1".to_vec())
                .await
                .unwrap();
        }
        assert_eq!(forget_expired(&store, now).await.unwrap(), 1);
        assert!(store
            .get(&keys::node_cert("n1", "0old"))
            .await
            .unwrap()
            .is_none());
        assert!(store.get(&keys::revoked("0old")).await.unwrap().is_none());
        assert!(store
            .get(&keys::node_cert("n1", "0new"))
            .await
            .unwrap()
            .is_some());
        assert!(is_revoked(&store, "0new").await.unwrap());
    }
}
