//! What the store keeps of the cluster's identities: join tokens (only a secret's SHA-256,
//! under a lease: the token's life), the certificates issued to each node, and revocations.
//! Signing is the server's (it holds the CA); these decide and write.

use std::time::Duration;

use dozen_model::keys;
use dozen_store::{Compare, Op, Store, Txn};

use crate::{wall_ms, Result};

/// Stores join token `id` (its secret's SHA-256 in hex) for `ttl`.
pub async fn store_join_token(
    store: &dyn Store,
    id: &str,
    secret_sha256_hex: &str,
    ttl: Duration,
) -> Result<()> {
    crate::nodes::put_leased(
        store,
        keys::join_token(id),
        secret_sha256_hex.as_bytes().to_vec(),
        ttl,
    )
    .await?;
    tracing::info!(
        token_id = id,
        ttl_ms = ttl.as_millis() as u64,
        "join token created"
    );
    Ok(())
}

/// A join token still to be used: its secret's hash, and the revision to spend it at.
pub struct PendingJoin {
    pub secret_sha256_hex: Vec<u8>,
    mod_revision: u64,
    id: String,
}

/// The join token `id`, unless it is unknown, used or expired.
pub async fn find_join_token(store: &dyn Store, id: &str) -> Result<Option<PendingJoin>> {
    Ok(store
        .get(&keys::join_token(id))
        .await?
        .map(|kv| PendingJoin {
            secret_sha256_hex: kv.value,
            mod_revision: kv.mod_revision,
            id: id.to_string(),
        }))
}

/// Spends `token` and records the certificate `serial` issued to `node`, in one step: false
/// when another join used the token first.
pub async fn spend_join_token(
    store: &dyn Store,
    token: PendingJoin,
    node: &str,
    serial: &str,
) -> Result<bool> {
    let key = keys::join_token(&token.id);
    let issued = serde_json::json!({ "serial": serial, "issued_at_ms": wall_ms() });
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
    let mut txn = Txn::new();
    for serial in &serials {
        txn = txn.then(Op::put(keys::revoked(serial), node.as_bytes().to_vec()));
    }
    store.txn(txn).await?;
    tracing::warn!(node, serials = %serials.join(","), "node certificates revoked");
    Ok(serials)
}
