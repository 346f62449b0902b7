//! API servers as the store knows them: each keeps a leased record of the URL its peers reach
//! it at, for as long as it runs.

use std::time::Duration;

use dozen_model::{decode, encode, keys, ServerRecord, SCHEMA};
use dozen_store::{Op, Store, Txn};

use crate::Result;

/// How long a server's record outlives it.
pub const SERVER_TTL: Duration = Duration::from_secs(10);

/// Keeps this server's record in the store for as long as the process runs.
pub async fn register(store: &dyn Store, id: String, url: String) {
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

/// Every server but `except` (this one).
pub async fn peers(store: &dyn Store, except: &str) -> Result<Vec<ServerRecord>> {
    let range = store.range(&keys::servers()).await?;
    Ok(range
        .kvs
        .iter()
        .filter_map(|kv| decode::<ServerRecord>(&kv.key, &kv.value).ok())
        .filter(|peer| peer.id != except)
        .collect())
}
