//! The parameter store's records, beside the others and not under [`crate::keys::ROOT`]:
//! controllers neither read nor wait on them, so a parameter write does not wake them or grow
//! their snapshot.

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
    pub nonce: Vec<u8>,
    pub sealed: Vec<u8>,
    pub created_at_ms: u64,
}
crate::record!(KekRecord, "key-encryption key");
