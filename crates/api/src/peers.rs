//! The other API servers. Each registers its URL under a lease; a server asked for a blob it
//! does not hold (a client uploaded it to another server) fetches it from a peer, checks its
//! digest and keeps it, so agents may talk to any server.

use std::sync::Arc;
use std::time::Duration;

use dozen_model::{decode, encode, keys, ServerRecord, SCHEMA};
use dozen_store::{Op, Store, Txn};

use crate::server::AppState;

/// Sent by a server asking a peer for a blob: answer from what you hold, do not ask your own
/// peers (else two servers that both lack a blob would ask each other forever).
pub const LOCAL_ONLY: &str = "x-dozen-local-only";

/// How long a server's record outlives it.
pub const SERVER_TTL: Duration = Duration::from_secs(10);
/// Longest wait for a peer's copy of a blob (bundles are up to a few hundred MiB).
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// Keeps this server's record in the store for as long as the process runs.
pub async fn register(store: Arc<dyn Store>, id: String, url: String) {
    let record = ServerRecord {
        schema: SCHEMA,
        id: id.clone(),
        url,
    };
    loop {
        let written = async {
            let lease = store.grant_lease(SERVER_TTL).await?;
            store
                .txn(Txn::new().then(Op::Put {
                    key: keys::server(&id),
                    value: encode(&record),
                    lease: Some(lease),
                }))
                .await?;
            Ok::<_, dozen_store::StoreError>(lease)
        }
        .await;
        let lease = match written {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register this server with its peers yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::debug!(url = %record.url, lease, "registered with peers");
        loop {
            tokio::time::sleep(SERVER_TTL / 3).await;
            if let Err(e) = store.keep_alive(lease).await {
                tracing::warn!(error = %e, "server record lease lost; registering again");
                break;
            }
        }
    }
}

/// The blob `digest` from the first peer that has it. Over TLS this server shows its own
/// certificate and never the token; a plain-HTTP peer (loopback clusters) gets the token,
/// and only when this server is plain HTTP too.
pub async fn fetch_blob(s: &AppState, digest: &str) -> Option<Vec<u8>> {
    let peers = match s.store.range(&keys::servers()).await {
        Ok(peers) => peers.kvs,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list peers");
            return None;
        }
    };
    for kv in peers {
        let Ok(peer) = decode::<ServerRecord>(&kv.key, &kv.value) else {
            continue;
        };
        if peer.id == s.server_id {
            continue;
        }
        let url = format!("{}/v1/blobs/{digest}", peer.url.trim_end_matches('/'));
        let request = match (&s.peer_client, peer.url.starts_with("https://")) {
            (Some(client), true) => client.get(&url),
            (None, false) => s.http.get(&url).bearer_auth(&s.token),
            _ => {
                tracing::debug!(peer = %peer.id, url = %peer.url, "peer not reachable the way this server speaks");
                continue;
            }
        };
        let answer = async {
            let resp = request
                .header(LOCAL_ONLY, "1")
                .timeout(FETCH_TIMEOUT)
                .send()
                .await?
                .error_for_status()?;
            resp.bytes().await
        }
        .await;
        match answer {
            Ok(bytes) => {
                tracing::info!(peer = %peer.id, digest, bytes = bytes.len(), "fetched a blob from a peer");
                return Some(bytes.to_vec());
            }
            Err(e) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => {}
            Err(e) => {
                tracing::warn!(peer = %peer.id, error = %e, "cannot fetch a blob from a peer")
            }
        }
    }
    None
}
