//! Task identity: a short-lived token naming one task, signed (HMAC-SHA256) with a key
//! derived from the root key, so any server of the cluster can check it and no one without
//! the root key can make one. The signature proves who the task is; whether it still runs
//! is the server's to check on every use (a stopped task's token opens nothing).

use base64::Engine as _;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::Key;

pub const PREFIX: &str = "dzk.";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskClaims {
    pub node: String,
    pub task: String,
    pub service: String,
    pub stack: String,
    pub expires_at_ms: u64,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

impl Key {
    /// A key for one purpose, derived from this one: HMAC-SHA256(self, label).
    pub fn derive(&self, label: &str) -> Key {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let tag = hmac::sign(&key, label.as_bytes());
        let mut out = [0u8; crate::KEY_BYTES];
        out.copy_from_slice(tag.as_ref());
        Key(out)
    }
}

/// `dzk.<claims>.<signature>`.
pub fn mint(key: &Key, claims: &TaskClaims) -> String {
    let body = b64().encode(serde_json::to_vec(claims).unwrap_or_default());
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key.0), body.as_bytes());
    format!("{PREFIX}{body}.{}", b64().encode(tag.as_ref()))
}

/// The claims of a token this key signed, unexpired at `now_ms`.
pub fn open(key: &Key, token: &str, now_ms: u64) -> Option<TaskClaims> {
    let rest = token.strip_prefix(PREFIX)?;
    let (body, tag) = rest.split_once('.')?;
    let tag = b64().decode(tag).ok()?;
    hmac::verify(
        &hmac::Key::new(hmac::HMAC_SHA256, &key.0),
        body.as_bytes(),
        &tag,
    )
    .ok()?;
    let claims: TaskClaims = serde_json::from_slice(&b64().decode(body).ok()?).ok()?;
    (claims.expires_at_ms > now_ms).then_some(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_with_its_key_until_it_expires_and_not_once_altered() {
        let root = Key::parse(&"11".repeat(32)).unwrap();
        let key = root.derive("task identity");
        let claims = TaskClaims {
            node: "n1".into(),
            task: "web-1".into(),
            service: "web".into(),
            stack: "shop".into(),
            expires_at_ms: 2000,
        };
        let token = mint(&key, &claims);
        assert_eq!(open(&key, &token, 1000), Some(claims.clone()));
        assert_eq!(open(&key, &token, 2000), None, "expired");
        let other = Key::parse(&"22".repeat(32))
            .unwrap()
            .derive("task identity");
        assert_eq!(open(&other, &token, 1000), None, "another cluster's key");
        // Claims changed (another task), signature kept.
        let mut forged = claims;
        forged.task = "db-1".into();
        let forged_body = mint(&key, &forged);
        let (_, tag) = token.rsplit_once('.').unwrap();
        let (body, _) = forged_body.rsplit_once('.').unwrap();
        assert_eq!(open(&key, &format!("{body}.{tag}"), 1000), None);
        assert_ne!(root.derive("a").0, root.derive("b").0);
    }
}
