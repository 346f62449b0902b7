//! Parameters and their versions: put, get, list by path, history, labels, delete, expiry,
//! and rewrapping data keys under the newest key version.
//!
//! Every change is one transaction guarded by the head record's revision, retried a few
//! times when another writer got there first: two writers never make the same version.

use std::collections::BTreeMap;
use std::sync::Arc;

use dozen_model::params::{
    self as records, ExpiryNotice, ParamPage, ParamRecord, ParamVersionRecord, ParamView,
    StoredValue,
};
use dozen_model::{decode, encode, Event, EventKind, SCHEMA};
use dozen_params::names::{self, ParamType, Reference, Selector};
use dozen_store::{Compare, KeyValue, Op, Txn};

use super::{crypto, ParamStore, DEFAULT_KEK};
use crate::{ControlError, Result};

/// Attempts at a guarded write before giving up with 409 (each lost only to another writer
/// of the same parameter, which made progress).
const ATTEMPTS: usize = 32;
/// Most parameters one page lists.
pub const MAX_PAGE: usize = 100;
/// The warning before an expiry, unless the put says otherwise.
pub const DEFAULT_WARN_BEFORE_MS: u64 = 24 * 3600 * 1000;

/// A write of a new version.
pub struct PutParam {
    pub name: String,
    /// None: the parameter's current type (String for a new one).
    pub kind: Option<ParamType>,
    pub value: String,
    /// Replaces the description when given.
    pub description: Option<String>,
    /// Replace the tags when given.
    pub tags: Option<BTreeMap<String, String>>,
    /// When it expires; each put states it (none when not given).
    pub expires_at_ms: Option<u64>,
    pub warn_before_ms: Option<u64>,
    /// The key-encryption key to seal under (default [`DEFAULT_KEK`]).
    pub key: Option<String>,
}

/// How much of a value a read shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reveal {
    /// Metadata only.
    Nothing,
    /// String and StringList values; SecureString stays withheld.
    Plain,
    /// Every value, SecureString decrypted.
    Decrypted,
}

fn context(name: &str, version: u64) -> String {
    format!("{name}@{version}")
}

fn not_found(name: &str) -> ControlError {
    ControlError::NotFound {
        kind: "parameter",
        name: name.to_string(),
    }
}

impl ParamStore {
    async fn head(&self, name: &str) -> Result<Option<(ParamRecord, KeyValue)>> {
        let Some(kv) = self.store().get(&records::name(name)).await? else {
            return Ok(None);
        };
        Ok(Some((decode(&kv.key, &kv.value)?, kv)))
    }

    /// Stores a new version; answers it without its value.
    pub async fn put(&self, put: PutParam, by: &str) -> Result<ParamView> {
        names::check_name(&put.name).map_err(invalid)?;
        names::check_value(put.kind.unwrap_or(ParamType::String), &put.value).map_err(invalid)?;
        if let Some(d) = &put.description {
            names::check_description(d).map_err(invalid)?;
        }
        if let Some(t) = &put.tags {
            names::check_tags(t).map_err(invalid)?;
        }
        let now = crate::wall_ms();
        if let Some(at) = put.expires_at_ms {
            if at <= now {
                return Err(ControlError::Invalid(format!(
                    "the expiry {} is not in the future",
                    dozen_model::utc_time(at)
                )));
            }
        }
        let kek = put.key.as_deref().unwrap_or(DEFAULT_KEK);
        for _ in 0..ATTEMPTS {
            let head = self.head(&put.name).await?;
            let mut txn = Txn::new();
            let mut record = match &head {
                Some((record, kv)) => {
                    txn = txn.when(Compare::mod_revision(&kv.key, kv.mod_revision));
                    record.clone()
                }
                None => {
                    txn = txn.when(Compare::missing(records::name(&put.name)));
                    let count = self.store().range(&records::names()).await?.kvs.len();
                    if count >= names::MAX_PARAMETERS {
                        return Err(ControlError::Conflict(format!(
                            "the store holds {count} parameters, the most it keeps; delete some first"
                        )));
                    }
                    // Versions a crash left behind after a delete: gone before version 1.
                    for kv in self.store().range(&records::versions(&put.name)).await?.kvs {
                        txn = txn.then(Op::delete(kv.key));
                    }
                    ParamRecord {
                        schema: SCHEMA,
                        name: put.name.clone(),
                        kind: ParamType::String,
                        description: String::new(),
                        tags: BTreeMap::new(),
                        labels: BTreeMap::new(),
                        newest: 0,
                        kept: Vec::new(),
                        expires_at_ms: None,
                        warn_before_ms: None,
                        warned: ExpiryNotice::default(),
                        created_at_ms: now,
                        updated_at_ms: now,
                        updated_by: by.to_string(),
                    }
                }
            };
            let version = record.newest + 1;
            let kind = put.kind.unwrap_or(if head.is_some() {
                record.kind
            } else {
                ParamType::String
            });
            names::check_value(kind, &put.value).map_err(invalid)?;
            let value = match kind {
                ParamType::SecureString => StoredValue::Sealed({
                    let envelope =
                    self.with_ring(|ring| {
                        ring.seal(kek, &context(&put.name, version), put.value.as_bytes())
                    })
                    .await
                    .map_err(|e| match e {
                        ControlError::Invalid(m) if m.contains("no key-encryption key") => {
                            ControlError::Invalid(format!(
                                "no key `{kek}`: `dozen keys ls` lists them, `dozen keys rotate {kek}` makes it"
                            ))
                        }
                        other => other,
                    })?;
                    // Sealed under the newest version this server knows: refused if another
                    // server has rotated since (then the keyring is reloaded and it is sealed
                    // again), so a rotation takes effect on every server at once.
                    txn = txn.when(Compare::missing(records::kek(
                        &envelope.kek,
                        envelope.kek_version + 1,
                    )));
                    envelope
                }),
                _ => StoredValue::Plain(put.value.clone()),
            };
            record.kind = kind;
            record.newest = version;
            record.kept.push(version);
            while record.kept.len() as u64 > names::MAX_VERSIONS {
                let oldest = record.kept.remove(0);
                record.labels.retain(|_, v| *v != oldest);
                txn = txn.then(Op::delete(records::version(&put.name, oldest)));
            }
            if let Some(d) = &put.description {
                record.description = d.clone();
            }
            if let Some(t) = &put.tags {
                record.tags = t.clone();
            }
            record.expires_at_ms = put.expires_at_ms;
            record.warn_before_ms = put.warn_before_ms;
            record.warned = ExpiryNotice::default();
            record.updated_at_ms = now;
            record.updated_by = by.to_string();
            let stored = ParamVersionRecord {
                schema: SCHEMA,
                name: put.name.clone(),
                version,
                kind,
                value,
                created_at_ms: now,
                created_by: by.to_string(),
            };
            txn = txn
                .then(Op::put(records::name(&put.name), encode(&record)))
                .then(Op::put(
                    records::version(&put.name, version),
                    encode(&stored),
                ));
            if self.store().txn(txn).await?.succeeded {
                return Ok(view(&record, &stored, None));
            }
            // Lost to another writer of this parameter, or to a rotation: only the second
            // needs the keyring again.
            if let StoredValue::Sealed(e) = &stored.value {
                let next = records::kek(&e.kek, e.kek_version + 1);
                if self.store().get(&next).await?.is_some() {
                    self.reload().await?;
                }
            }
            tokio::task::yield_now().await;
        }
        Err(busy(&put.name))
    }

    /// One value, as `reveal` allows.
    pub async fn get(&self, reference: &Reference, reveal: Reveal) -> Result<ParamView> {
        let kv = self
            .store()
            .get_shared(&records::name(&reference.name))
            .await?
            .ok_or_else(|| not_found(&reference.name))?;
        let record = self.heads.of(&kv)?;
        let version = resolve(&record, reference)?;
        if let Some(at) = record.expires_at_ms.filter(|at| *at <= crate::wall_ms()) {
            if reveal != Reveal::Nothing {
                return Err(ControlError::Gone(format!(
                    "parameter {} expired at {}: put a new version to use it again",
                    record.name,
                    dozen_model::utc_time(at)
                )));
            }
        }
        let stored = self.version(&record.name, version).await?;
        let value = self.reveal(&stored, reveal).await?;
        Ok(view(&record, &stored, value))
    }

    async fn version(&self, name: &str, version: u64) -> Result<Arc<ParamVersionRecord>> {
        let kv = self
            .store()
            .get_shared(&records::version(name, version))
            .await?
            .ok_or_else(|| {
                ControlError::Absent(format!("parameter {name} has no version {version}"))
            })?;
        self.versions.of(&kv)
    }

    async fn reveal(&self, stored: &ParamVersionRecord, reveal: Reveal) -> Result<Option<String>> {
        Ok(match (&stored.value, reveal) {
            (_, Reveal::Nothing) => None,
            (StoredValue::Plain(v), _) => Some(v.clone()),
            (StoredValue::Sealed(_), Reveal::Plain) => None,
            (StoredValue::Sealed(envelope), Reveal::Decrypted) => {
                let ctx = context(&stored.name, stored.version);
                let bytes = self.with_ring(|ring| ring.open(&ctx, envelope)).await?;
                Some(String::from_utf8(bytes).map_err(|_| {
                    ControlError::Invalid(format!("the value of {ctx} is not UTF-8"))
                })?)
            }
        })
    }

    /// The parameters under `path` (directly, or at any depth with `recursive`), in name
    /// order, after `after`, at most `limit` ([`MAX_PAGE`]); `reveal` says for each name how
    /// much of its value to show, and None hides the parameter altogether.
    pub async fn list(
        &self,
        path: &str,
        recursive: bool,
        after: Option<&str>,
        limit: usize,
        reveal: impl Fn(&str) -> Option<Reveal>,
    ) -> Result<ParamPage> {
        names::check_path(path).map_err(invalid)?;
        let prefix = if path.ends_with('/') {
            path.to_string()
        } else {
            format!("{path}/")
        };
        let limit = limit.clamp(1, MAX_PAGE);
        let range = self.store().range(&records::names_under(&prefix)).await?;
        let mut parameters = Vec::new();
        let mut next = None;
        let now = crate::wall_ms();
        for kv in &range.kvs {
            let name = &kv.key[records::names().len() - 1..];
            if !recursive && name[prefix.len()..].contains('/') {
                continue;
            }
            if after.is_some_and(|a| name <= a) {
                continue;
            }
            let Some(mut shown) = reveal(name) else {
                continue;
            };
            if parameters.len() == limit {
                next = parameters.last().map(|p: &ParamView| p.name.clone());
                break;
            }
            let record: ParamRecord = decode(&kv.key, &kv.value)?;
            if record.expires_at_ms.is_some_and(|at| at <= now) {
                shown = Reveal::Nothing;
            }
            let stored = self.version(&record.name, record.newest).await?;
            let value = self.reveal(&stored, shown).await?;
            parameters.push(view(&record, &stored, value));
        }
        Ok(ParamPage { parameters, next })
    }

    /// Every kept version, newest first, without values.
    pub async fn history(&self, name: &str) -> Result<Vec<ParamView>> {
        names::check_name(name).map_err(invalid)?;
        let (record, _) = self.head(name).await?.ok_or_else(|| not_found(name))?;
        let range = self.store().range(&records::versions(name)).await?;
        let mut out = Vec::new();
        for kv in range.kvs.iter().rev() {
            let stored: ParamVersionRecord = decode(&kv.key, &kv.value)?;
            if record.kept.contains(&stored.version) {
                out.push(view(&record, &stored, None));
            }
        }
        Ok(out)
    }

    /// Puts `add` on `version` (default the newest), moving them from where they were, and
    /// takes `remove` off wherever they are. Answers the labels now on that version.
    pub async fn label(
        &self,
        name: &str,
        version: Option<u64>,
        add: &[String],
        remove: &[String],
        by: &str,
    ) -> Result<ParamView> {
        names::check_name(name).map_err(invalid)?;
        for label in add.iter().chain(remove) {
            names::check_label(label).map_err(invalid)?;
        }
        if add.is_empty() && remove.is_empty() {
            return Err(ControlError::Invalid(
                "name at least one label to add or remove".into(),
            ));
        }
        for _ in 0..ATTEMPTS {
            let (mut record, kv) = self.head(name).await?.ok_or_else(|| not_found(name))?;
            let version = version.unwrap_or(record.newest);
            if !record.kept.contains(&version) {
                return Err(missing_version(&record, version));
            }
            for label in remove {
                record.labels.remove(label);
            }
            for label in add {
                record.labels.insert(label.clone(), version);
            }
            let on_version = record.labels.values().filter(|v| **v == version).count();
            if on_version > names::MAX_LABELS_PER_VERSION {
                return Err(ControlError::Invalid(format!(
                    "version {version} of {name} would carry {on_version} labels; at most {} are allowed",
                    names::MAX_LABELS_PER_VERSION
                )));
            }
            record.updated_at_ms = crate::wall_ms();
            record.updated_by = by.to_string();
            let txn = Txn::new()
                .when(Compare::mod_revision(&kv.key, kv.mod_revision))
                .then(Op::put(&kv.key, encode(&record)));
            if self.store().txn(txn).await?.succeeded {
                let stored = self.version(name, version).await?;
                return Ok(view(&record, &stored, None));
            }
        }
        Err(busy(name))
    }

    /// Deletes a parameter and every version of it.
    pub async fn delete(&self, name: &str) -> Result<()> {
        names::check_name(name).map_err(invalid)?;
        for _ in 0..ATTEMPTS {
            let (_, kv) = self.head(name).await?.ok_or_else(|| not_found(name))?;
            let versions = self.store().range(&records::versions(name)).await?.kvs;
            let room = self.store().max_txn_ops().saturating_sub(1).max(1);
            let mut txn = Txn::new()
                .when(Compare::mod_revision(&kv.key, kv.mod_revision))
                .then(Op::delete(&kv.key));
            for v in versions.iter().take(room) {
                txn = txn.then(Op::delete(&v.key));
            }
            if !self.store().txn(txn).await?.succeeded {
                continue;
            }
            // What did not fit: without its head no read reaches it, and a new version 1
            // clears it (see `put`).
            for chunk in versions[room.min(versions.len())..].chunks(room) {
                let mut txn = Txn::new();
                for v in chunk {
                    txn = txn.then(Op::delete(&v.key));
                }
                self.store().txn(txn).await?;
            }
            return Ok(());
        }
        Err(busy(name))
    }

    /// Seals every data key under a key whose newer version exists again under the newest
    /// version; values' ciphertext is untouched. Answers how many versions it rewrapped.
    pub async fn rewrap(&self) -> Result<usize> {
        self.reload().await?;
        let mut rewrapped = 0;
        let range = self
            .store()
            .range(&format!("{}versions/", records::ROOT))
            .await?;
        for kv in range.kvs {
            let mut stored: ParamVersionRecord = decode(&kv.key, &kv.value)?;
            let StoredValue::Sealed(envelope) = &stored.value else {
                continue;
            };
            let ctx = context(&stored.name, stored.version);
            let Some(newer) = self.ring().rewrap(&ctx, envelope).map_err(crypto)? else {
                continue;
            };
            stored.value = StoredValue::Sealed(newer);
            let txn = Txn::new()
                .when(Compare::mod_revision(&kv.key, kv.mod_revision))
                .then(Op::put(&kv.key, encode(&stored)));
            // A version changed meanwhile was deleted (trimmed or its parameter removed):
            // nothing left to rewrap.
            if self.store().txn(txn).await?.succeeded {
                rewrapped += 1;
            }
        }
        Ok(rewrapped)
    }

    /// Records each parameter's expiry warning and expiry once, when due. Answers the events
    /// it recorded.
    pub async fn expiry_pass(&self, now_ms: u64, by: &str) -> Result<Vec<Event>> {
        let range = self.store().range(&records::names()).await?;
        let mut recorded = Vec::new();
        for kv in range.kvs {
            let mut record: ParamRecord = decode(&kv.key, &kv.value)?;
            let Some(at) = record.expires_at_ms else {
                continue;
            };
            let warn_from =
                at.saturating_sub(record.warn_before_ms.unwrap_or(DEFAULT_WARN_BEFORE_MS));
            let kind = if now_ms >= at && record.warned.expired_for != Some(at) {
                record.warned.expired_for = Some(at);
                record.warned.expiring_for = Some(at);
                EventKind::ParamExpired {
                    name: record.name.clone(),
                }
            } else if now_ms >= warn_from && now_ms < at && record.warned.expiring_for != Some(at) {
                record.warned.expiring_for = Some(at);
                EventKind::ParamExpiring {
                    name: record.name.clone(),
                    expires_at_ms: at,
                }
            } else {
                continue;
            };
            let txn = Txn::new()
                .when(Compare::mod_revision(&kv.key, kv.mod_revision))
                .then(Op::put(&kv.key, encode(&record)));
            // Another server said it, or a new version came: nothing to say now.
            if self.store().txn(txn).await?.succeeded {
                recorded.push(Event::new(now_ms, by, kind));
            }
        }
        if !recorded.is_empty() {
            crate::events::record(self.store(), &recorded).await?;
        }
        Ok(recorded)
    }
}

fn resolve(record: &ParamRecord, reference: &Reference) -> Result<u64> {
    match &reference.selector {
        Selector::Newest => Ok(record.newest),
        Selector::Version(v) if record.kept.contains(v) => Ok(*v),
        Selector::Version(v) => Err(missing_version(record, *v)),
        Selector::Label(label) => record.labels.get(label).copied().ok_or_else(|| {
            ControlError::Absent(format!(
                "parameter {} has no label `{label}` (its labels: {})",
                record.name,
                if record.labels.is_empty() {
                    "none".into()
                } else {
                    record.labels.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            ))
        }),
    }
}

fn missing_version(record: &ParamRecord, version: u64) -> ControlError {
    ControlError::Absent(format!(
        "parameter {} has no version {version} (versions kept: {})",
        record.name,
        match (record.kept.first(), record.kept.last()) {
            (Some(a), Some(b)) => format!("{a} to {b}"),
            _ => "none".into(),
        }
    ))
}

fn view(record: &ParamRecord, stored: &ParamVersionRecord, value: Option<String>) -> ParamView {
    ParamView {
        name: record.name.clone(),
        kind: stored.kind.as_str().to_string(),
        version: stored.version,
        value,
        labels: record
            .labels
            .iter()
            .filter(|(_, v)| **v == stored.version)
            .map(|(l, _)| l.clone())
            .collect(),
        description: record.description.clone(),
        tags: record.tags.clone(),
        modified_at_ms: stored.created_at_ms,
        modified_by: stored.created_by.clone(),
        expires_at_ms: record.expires_at_ms,
        key: match &stored.value {
            StoredValue::Sealed(e) => Some(format!("{}:{}", e.kek, e.kek_version)),
            StoredValue::Plain(_) => None,
        },
    }
}

fn invalid(e: names::NameError) -> ControlError {
    ControlError::Invalid(e.0)
}

fn busy(name: &str) -> ControlError {
    ControlError::Conflict(format!(
        "parameter {name} kept changing under this write; try again"
    ))
}
