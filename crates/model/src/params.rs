//! The parameter store's records, beside the others and not under [`crate::keys::ROOT`]:
//! controllers neither read nor wait on them, so a parameter write does not wake them or grow
//! their snapshot.

use std::collections::BTreeMap;

use dozen_params::names::ParamType;
use dozen_params::policy::Policy;
use dozen_params::Envelope;
use serde::{Deserialize, Serialize};

pub const ROOT: &str = "/dozen/params/v1/";

/// Every key-encryption key.
pub fn keks() -> String {
    format!("{ROOT}keks/")
}

/// One version of a key-encryption key.
pub fn kek(name: &str, version: u32) -> String {
    format!("{ROOT}keks/{name}/{version:010}")
}

/// A key-encryption key, sealed with the root key (AES-256-GCM, bound to its name and
/// version): without the root key it is noise.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KekRecord {
    pub schema: u32,
    pub name: String,
    pub version: u32,
    #[serde(with = "dozen_params::bytes_b64")]
    pub nonce: Vec<u8>,
    #[serde(with = "dozen_params::bytes_b64")]
    pub sealed: Vec<u8>,
    pub created_at_ms: u64,
}
crate::record!(KekRecord, "key-encryption key");

/// Every parameter's head record, under its name: `{ROOT}names/shop/prod/db/password`.
pub fn names() -> String {
    format!("{ROOT}names/")
}

/// The head record of parameter `name` (which starts with `/`).
pub fn name(name: &str) -> String {
    format!("{ROOT}names{name}")
}

/// The heads under `path` (`/` or `/shop/prod/`, with its trailing slash).
pub fn names_under(path: &str) -> String {
    format!("{ROOT}names{path}")
}

/// Every version of parameter `name`. `@` cannot be in a name, so `/a@` never takes in `/a/b`.
pub fn versions(name: &str) -> String {
    format!("{ROOT}versions{name}@")
}

pub fn version(name: &str, version: u64) -> String {
    format!("{ROOT}versions{name}@{version:010}")
}

pub fn tokens() -> String {
    format!("{ROOT}tokens/")
}

pub fn token(name: &str) -> String {
    format!("{ROOT}tokens/{name}")
}

/// A parameter: what every version shares, and where its labels point. Its values are
/// [`ParamVersionRecord`]s.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParamRecord {
    pub schema: u32,
    pub name: String,
    /// The newest version's type.
    pub kind: ParamType,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Label → version.
    #[serde(default)]
    pub labels: BTreeMap<String, u64>,
    pub newest: u64,
    /// The versions kept, oldest first (at most `MAX_VERSIONS`).
    pub kept: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// How long before expiry the warning event is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_before_ms: Option<u64>,
    /// The expiry the warning (or the expiry event) was recorded for, so each is said once.
    #[serde(default)]
    pub warned: ExpiryNotice,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub updated_by: String,
}
crate::record!(ParamRecord, "parameter");

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExpiryNotice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiring_for: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_for: Option<u64>,
}

/// One version of a parameter's value: plain text for String and StringList, an envelope for
/// SecureString.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParamVersionRecord {
    pub schema: u32,
    pub name: String,
    pub version: u64,
    pub kind: ParamType,
    pub value: StoredValue,
    pub created_at_ms: u64,
    pub created_by: String,
}
crate::record!(ParamVersionRecord, "parameter version");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoredValue {
    Plain(String),
    Sealed(Envelope),
}

/// An operator token: a name, the SHA-256 of its secret (the secret itself is shown once, at
/// creation), and its policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub schema: u32,
    pub name: String,
    pub secret_sha256: String,
    pub policy: Policy,
    pub created_at_ms: u64,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}
crate::record!(TokenRecord, "token");

// Wire views (what the API answers).

/// One parameter's value (or, without decryption, its metadata with the value withheld).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ParamView {
    pub name: String,
    /// `String`, `StringList` or `SecureString`.
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u64,
    /// The value; absent for a SecureString read without decryption, and in listings that
    /// did not ask for values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Labels on this version.
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    pub modified_at_ms: u64,
    pub modified_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// For a SecureString: the key-encryption key and version its data key is sealed under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// One page of a listing by path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ParamPage {
    pub parameters: Vec<ParamView>,
    /// Give it back as `after` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A key-encryption key, without its secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct KeyView {
    pub name: String,
    pub version: u32,
    pub created_at_ms: u64,
    /// Whether new values are sealed under it (the newest version of its name).
    pub current: bool,
}

/// A token, without its secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct TokenView {
    pub name: String,
    pub policy: Vec<String>,
    pub created_at_ms: u64,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// A secret of a release: the parameter and the version it was pinned to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PinnedSecret {
    pub name: String,
    pub version: u64,
}
