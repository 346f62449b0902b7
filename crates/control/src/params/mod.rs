//! The parameter store over the store: parameters and their versions ([`values`]), the
//! key-encryption keys ([`keys`]) and operator tokens ([`tokens`]). Records live under
//! `dozen_model::params::ROOT`, which no controller reads: a parameter write wakes nothing
//! and grows no snapshot.
//!
//! A [`ParamStore`] holds the keyring open for the server's life; the root key stays in it
//! too, because rotating or importing a key-encryption key seals the new one with it.

mod decoded;
pub mod identity;
mod keys;
pub mod pins;
pub mod tokens;
mod values;

use std::sync::{Arc, RwLock};

use dozen_model::params::{
    self as records, KekRecord, KeyView, ParamRecord, ParamVersionRecord, TokenRecord,
};
use dozen_model::{decode, encode, SCHEMA};
use dozen_params::{CryptoError, Key, Keyring};
use dozen_store::{Compare, Op, Store, Txn};

pub use keys::{open_keyring, stored_keks, DEFAULT_KEK};
pub use values::{PutParam, Reveal};

use crate::{ControlError, Result};
use decoded::Decoded;

pub struct ParamStore {
    store: Arc<dyn Store>,
    root: Key,
    ring: RwLock<Arc<Keyring>>,
    /// Signs task tokens: derived from the root key, so every server holds the same one.
    task_key: Key,
    /// Records of the hot reads, decoded once per revision.
    heads: Decoded<ParamRecord>,
    versions: Decoded<ParamVersionRecord>,
    tokens: Decoded<TokenRecord>,
}

/// How many records of each kind stay decoded (beyond them, a read decodes again).
const DECODED_HEADS: usize = 4096;
const DECODED_VERSIONS: usize = 1024;

impl ParamStore {
    /// The parameter store of `store`, its keys opened with `root` (or, for a store that has
    /// none yet, a first key made).
    pub async fn open(store: Arc<dyn Store>, root: Key) -> Result<ParamStore> {
        let stored = stored_keks(store.as_ref()).await?;
        let ring = open_keyring(store.as_ref(), &root, &stored).await?;
        Ok(ParamStore {
            store,
            task_key: root.derive("dozen task identity v1"),
            root,
            ring: RwLock::new(Arc::new(ring)),
            heads: Decoded::new(DECODED_HEADS),
            versions: Decoded::new(DECODED_VERSIONS),
            tokens: Decoded::new(tokens::MAX_TOKENS),
        })
    }

    /// The key the audit trail's hash chain is made with (derived from the root key).
    pub fn audit_key(&self) -> dozen_params::audit::ChainKey {
        dozen_params::audit::ChainKey::new(&self.root)
    }

    pub(crate) fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    fn ring(&self) -> Arc<Keyring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The keyring as the store holds it now: another server may have rotated a key.
    async fn reload(&self) -> Result<Arc<Keyring>> {
        let stored = stored_keks(self.store()).await?;
        let ring = Arc::new(Keyring::unlock(&self.root, &stored).map_err(crypto)?);
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = ring.clone();
        Ok(ring)
    }

    /// Runs `f` with the keyring, reloading it once when `f` meets a key it does not hold.
    async fn with_ring<T>(
        &self,
        f: impl Fn(&Keyring) -> std::result::Result<T, CryptoError>,
    ) -> Result<T> {
        match f(&self.ring()) {
            Err(CryptoError::NoKek { .. }) => f(&*self.reload().await?).map_err(crypto),
            other => other.map_err(crypto),
        }
    }

    /// Every key-encryption key, without secrets.
    pub async fn keys(&self) -> Result<Vec<KeyView>> {
        let range = self.store().range(&records::keks()).await?;
        let mut views: Vec<KeyView> = range
            .kvs
            .iter()
            .map(|kv| {
                let r: KekRecord = decode(&kv.key, &kv.value)?;
                Ok(KeyView {
                    name: r.name,
                    version: r.version,
                    created_at_ms: r.created_at_ms,
                    current: false,
                })
            })
            .collect::<Result<_>>()?;
        let newest: std::collections::BTreeMap<String, u32> =
            views.iter().fold(Default::default(), |mut m, v| {
                let e = m.entry(v.name.clone()).or_insert(0);
                *e = (*e).max(v.version);
                m
            });
        for v in &mut views {
            v.current = newest.get(&v.name) == Some(&v.version);
        }
        Ok(views)
    }

    /// A new version of key-encryption key `name` (a new name starts at 1), or, with
    /// `imported`, that key as the new version. New values are sealed under it from now on.
    pub async fn rotate(&self, name: &str, imported: Option<Key>) -> Result<KeyView> {
        check_key_name(name)?;
        let Some(imported) = imported else {
            // A generated key can be made again when another server added a version first.
            for _ in 0..5 {
                if let Some(view) = self.add_version(name, None).await? {
                    return Ok(view);
                }
            }
            return Err(ControlError::Conflict(format!(
                "key `{name}` kept changing while a new version was added; try again"
            )));
        };
        self.add_version(name, Some(imported))
            .await?
            .ok_or_else(|| {
                ControlError::Conflict(format!(
                    "another version of key `{name}` was added at the same time; import again"
                ))
            })
    }

    /// One attempt: None when another server stored that version first.
    async fn add_version(&self, name: &str, imported: Option<Key>) -> Result<Option<KeyView>> {
        // From the store, not memory: versions are numbered after what every server made.
        let stored = stored_keks(self.store()).await?;
        let mut ring = Keyring::unlock(&self.root, &stored).map_err(crypto)?;
        let added = match imported {
            Some(key) => ring.import(&self.root, name, key),
            None => ring.rotate(&self.root, name),
        }
        .map_err(crypto)?;
        let key = records::kek(&added.name, added.version);
        let now = crate::wall_ms();
        let record = KekRecord {
            schema: SCHEMA,
            name: added.name.clone(),
            version: added.version,
            nonce: added.sealed.nonce.clone(),
            sealed: added.sealed.data.clone(),
            created_at_ms: now,
        };
        let written = self
            .store()
            .txn(
                Txn::new()
                    .when(Compare::missing(&key))
                    .then(Op::put(&key, encode(&record))),
            )
            .await?;
        if !written.succeeded {
            return Ok(None);
        }
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
        Ok(Some(KeyView {
            name: added.name,
            version: added.version,
            created_at_ms: now,
            current: true,
        }))
    }
}

fn check_key_name(name: &str) -> Result<()> {
    check_plain_name(name, "key")
}

/// A key's or a token's name: 1 to 64 letters, digits, `_` or `-`.
pub(crate) fn check_plain_name(name: &str, what: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ControlError::Invalid(format!(
            "{what} name `{}` must be 1 to 64 letters, digits, `_` or `-`",
            name.chars().take(80).collect::<String>()
        )))
    }
}

/// A missing key is the caller's to fix (400); a value or key that does not open, or no
/// randomness, is the server's (500).
fn crypto(e: CryptoError) -> ControlError {
    match e {
        CryptoError::NoKek { .. } | CryptoError::BadRootKey { .. } => {
            ControlError::Invalid(e.to_string())
        }
        CryptoError::Open { .. } | CryptoError::Random => ControlError::Internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
