//! Operator tokens with policies (`dozen token`). A token is `dzt.<name>.<secret>`; the store
//! keeps the secret's SHA-256 only, so a copy of the store opens nothing. The first token of
//! a cluster (the data dir's `token` file) stays an admin token outside this list.

use std::sync::Arc;

use dozen_model::params::{self as records, TokenRecord, TokenView};
use dozen_model::{decode, encode, SCHEMA};
use dozen_params::policy::Policy;
use dozen_store::{Compare, Op, Store, Txn};
use ring::digest::{digest, SHA256};

use crate::{ControlError, Result};

pub const PREFIX: &str = "dzt.";
/// Most tokens one store holds.
pub const MAX_TOKENS: usize = 1000;

/// The name a presented token claims, if it has a token's shape.
pub fn claimed_name(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (name, secret) = rest.rsplit_once('.')?;
    check_name(name).ok()?;
    Some((name, secret))
}

pub fn check_name(name: &str) -> Result<()> {
    super::check_plain_name(name, "token")
}

fn sha256_hex(text: &str) -> String {
    dozen_params::hex(digest(&SHA256, text.as_bytes()).as_ref())
}

/// Makes token `name` with `policy`; answers the token itself, which is shown this once.
pub async fn create(
    store: &dyn Store,
    name: &str,
    policy: Policy,
    expires_at_ms: Option<u64>,
    by: &str,
) -> Result<(String, TokenView)> {
    check_name(name)?;
    if store.range(&records::tokens()).await?.kvs.len() >= MAX_TOKENS {
        return Err(ControlError::Conflict(format!(
            "the store holds {MAX_TOKENS} tokens, the most it keeps; revoke some first"
        )));
    }
    let secret = dozen_params::Key::generate()
        .map_err(|e| ControlError::Invalid(e.to_string()))?
        .to_hex();
    let record = TokenRecord {
        schema: SCHEMA,
        name: name.to_string(),
        secret_sha256: sha256_hex(&secret),
        policy,
        created_at_ms: crate::wall_ms(),
        created_by: by.to_string(),
        expires_at_ms,
    };
    let key = records::token(name);
    let written = store
        .txn(
            Txn::new()
                .when(Compare::missing(&key))
                .then(Op::put(&key, encode(&record))),
        )
        .await?;
    if !written.succeeded {
        return Err(ControlError::Conflict(format!(
            "token `{name}` exists; `dozen token revoke {name}` first, or pick another name"
        )));
    }
    Ok((format!("{PREFIX}{name}.{secret}"), token_view(&record)))
}

impl super::ParamStore {
    /// The name and policy of a presented token, if it is one this store holds, unexpired.
    /// Its record is decoded once per revision: every request of a token's holder asks.
    pub async fn authenticate(&self, token: &str) -> Result<Option<(String, Arc<Policy>)>> {
        let Some((name, secret)) = claimed_name(token) else {
            return Ok(None);
        };
        let Some(kv) = self.store().get_shared(&records::token(name)).await? else {
            return Ok(None);
        };
        let record = self.tokens.of(&kv)?;
        Ok(holds(&record, secret).then(|| (record.name.clone(), record.policy.clone().into())))
    }
}

/// Whether `secret` is the one `record` was made with, and the token is unexpired.
fn holds(record: &TokenRecord, secret: &str) -> bool {
    let given = sha256_hex(secret);
    // Hashes compared in full whatever differs, so the time taken says nothing.
    let same = given.len() == record.secret_sha256.len()
        && given
            .bytes()
            .zip(record.secret_sha256.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    same && record.expires_at_ms.is_none_or(|at| at > crate::wall_ms())
}

pub async fn list(store: &dyn Store) -> Result<Vec<TokenView>> {
    store
        .range(&records::tokens())
        .await?
        .kvs
        .iter()
        .map(|kv| Ok(token_view(&decode::<TokenRecord>(&kv.key, &kv.value)?)))
        .collect()
}

pub async fn revoke(store: &dyn Store, name: &str) -> Result<()> {
    check_name(name)?;
    let key = records::token(name);
    let done = store
        .txn(
            Txn::new()
                .when(Compare::exists(&key))
                .then(Op::delete(&key)),
        )
        .await?;
    if done.succeeded {
        Ok(())
    } else {
        Err(ControlError::NotFound {
            kind: "token",
            name: name.to_string(),
        })
    }
}

fn token_view(record: &TokenRecord) -> TokenView {
    TokenView {
        name: record.name.clone(),
        policy: record.policy.0.iter().map(|p| p.to_string()).collect(),
        created_at_ms: record.created_at_ms,
        created_by: record.created_by.clone(),
        expires_at_ms: record.expires_at_ms,
    }
}
