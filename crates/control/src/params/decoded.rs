//! Records decoded once and remembered by the revision they were read at. A hot read (a
//! task's secret, a token on every request) still asks the store, so it sees every change
//! made on any server, but when the store answers the same `mod_revision` as last time, the
//! decoded record is used again instead of parsing the JSON once more. A key's
//! `mod_revision` is the store-wide revision of its last write, so it names one content.
//!
//! Bounded: at most `limit` records; when full, it starts over (a miss costs one decode).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dozen_model::{decode, Record};
use dozen_store::{KeyValue, Revision};

use crate::Result;

pub(crate) struct Decoded<T> {
    records: Mutex<HashMap<String, (Revision, Arc<T>)>>,
    limit: usize,
}

impl<T: Record> Decoded<T> {
    pub(crate) fn new(limit: usize) -> Decoded<T> {
        Decoded {
            records: Mutex::new(HashMap::new()),
            limit,
        }
    }

    /// The record `kv` holds, decoded now or at an earlier read of the same revision.
    pub(crate) fn of(&self, kv: &KeyValue) -> Result<Arc<T>> {
        if let Some((revision, record)) = self.lock().get(&kv.key) {
            if *revision == kv.mod_revision {
                return Ok(record.clone());
            }
        }
        let record: Arc<T> = Arc::new(decode(&kv.key, &kv.value)?);
        let mut records = self.lock();
        if records.len() >= self.limit && !records.contains_key(&kv.key) {
            records.clear();
        }
        records.insert(kv.key.clone(), (kv.mod_revision, record.clone()));
        Ok(record)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Revision, Arc<T>)>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dozen_model::params::TokenRecord;
    use dozen_model::{encode, SCHEMA};
    use dozen_params::policy::Policy;

    fn kv(name: &str, revision: Revision) -> KeyValue {
        let record = TokenRecord {
            schema: SCHEMA,
            name: name.into(),
            secret_sha256: "00".repeat(32),
            policy: Policy::admin(),
            created_at_ms: 1,
            created_by: "test".into(),
            expires_at_ms: None,
        };
        KeyValue {
            key: format!("/t/{revision}"),
            value: encode(&record),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: None,
        }
    }

    #[test]
    fn a_new_revision_is_decoded_again_and_the_bound_holds() {
        let decoded: Decoded<TokenRecord> = Decoded::new(2);
        let first = decoded.of(&kv("a", 1)).unwrap();
        assert!(Arc::ptr_eq(&first, &decoded.of(&kv("a", 1)).unwrap()));
        // The same key written again: its new content, not the remembered one.
        let mut changed = kv("b", 1);
        changed.mod_revision = 5;
        assert_eq!(decoded.of(&changed).unwrap().name, "b");
        for revision in 2..10 {
            decoded.of(&kv("c", revision)).unwrap();
            assert!(decoded.lock().len() <= 2);
        }
        // Bad bytes are an error, never a stale record.
        let mut bad = kv("a", 1);
        bad.mod_revision = 11;
        bad.value = b"{not json".to_vec();
        assert!(decoded.of(&bad).is_err());
    }
}
