//! The parameter store's keys in the store: the key-encryption keys, sealed with the root
//! key. A server opens them all at start; a root key that does not open them stops the start
//! before anything is written.

use dozen_model::params::{self as keys, KekRecord};
use dozen_model::{decode, encode, SCHEMA};
use dozen_params::{Key, Keyring, Sealed, StoredKek};
use dozen_store::{Compare, Op, Store, Txn};

use crate::{ControlError, Result};

/// The KEK new values are sealed under unless one is named.
pub const DEFAULT_KEK: &str = "default";

/// The key-encryption keys the store holds.
pub async fn stored_keks(store: &dyn Store) -> Result<Vec<StoredKek>> {
    let range = store.range(&keys::keks()).await?;
    range
        .kvs
        .iter()
        .map(|kv| {
            let r: KekRecord = decode(&kv.key, &kv.value)?;
            Ok(StoredKek {
                name: r.name,
                version: r.version,
                sealed: Sealed {
                    nonce: r.nonce,
                    data: r.sealed,
                },
            })
        })
        .collect()
}

/// The keyring `root` opens: the stored KEKs, or, in a store that holds none yet, a first
/// version of [`DEFAULT_KEK`] written now.
pub async fn open_keyring(store: &dyn Store, root: &Key, stored: &[StoredKek]) -> Result<Keyring> {
    if !stored.is_empty() {
        return Keyring::unlock(root, stored).map_err(|e| {
            ControlError::Invalid(format!(
                "the root key does not open the keys this store holds ({e}); start with the root key this store was first started with"
            ))
        });
    }
    let mut ring = Keyring::default();
    let first = ring
        .rotate(root, DEFAULT_KEK)
        .map_err(|e| ControlError::Invalid(e.to_string()))?;
    let key = keys::kek(&first.name, first.version);
    let record = KekRecord {
        schema: SCHEMA,
        name: first.name.clone(),
        version: first.version,
        nonce: first.sealed.nonce.clone(),
        sealed: first.sealed.data.clone(),
        created_at_ms: crate::wall_ms(),
    };
    let written = store
        .txn(
            Txn::new()
                .when(Compare::missing(&key))
                .then(Op::put(&key, encode(&record))),
        )
        .await?;
    if written.succeeded {
        return Ok(ring);
    }
    // Another server made it first: open what it wrote.
    let stored = stored_keks(store).await?;
    Keyring::unlock(root, &stored).map_err(|e| {
        ControlError::Invalid(format!(
            "the root key does not open the keys another server just stored ({e}); every server needs the same root key"
        ))
    })
}
