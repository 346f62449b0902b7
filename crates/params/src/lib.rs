//! The parameter store's core: envelope encryption.
//!
//! Every SecureString version is sealed with a fresh 256-bit data key (AES-256-GCM); the data
//! key is sealed with a key-encryption key (KEK) that has a name and a version; every KEK is
//! sealed with the root key, which never leaves the servers (it comes from `DOZEN_MASTER_KEY`,
//! a key file, or is generated into a 0600 file on first start). Rotating a KEK adds a version
//! that new writes use; rewrapping re-seals old data keys under the newest version without
//! touching the values' ciphertext. Each layer binds what it protects to where it belongs
//! (associated data): a sealed value moved to another parameter, or a data key moved to
//! another value, no longer opens.
//!
//! No IO here beyond the system's random numbers: the shell stores the sealed records.
#![forbid(unsafe_code)]

pub mod audit;
pub mod identity;
pub mod names;
pub mod policy;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

pub const KEY_BYTES: usize = 32;

/// Lower-case hex of `bytes` (no formatter per byte: it is on every audited request).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("the system gave no random numbers")]
    Random,
    #[error("{what} cannot be opened: a different root key than the one it was sealed with, or a damaged record")]
    Open { what: String },
    #[error("no key-encryption key `{name}` version {version} in the keyring")]
    NoKek { name: String, version: u32 },
    #[error("the root key must be {KEY_BYTES} bytes, as 64 hex digits or base64; found {found}")]
    BadRootKey { found: String },
}

/// 256 bits of key, overwritten when dropped.
pub struct Key([u8; KEY_BYTES]);

impl Drop for Key {
    fn drop(&mut self) {
        // Volatile-free best effort: the bytes are written over before the memory is freed.
        for b in self.0.iter_mut() {
            *b = 0;
        }
        std::hint::black_box(&self.0);
    }
}

impl Key {
    pub fn generate() -> Result<Key, CryptoError> {
        let mut k = [0u8; KEY_BYTES];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| CryptoError::Random)?;
        Ok(Key(k))
    }

    /// A root key as given by a person: 64 hex digits, or base64 of 32 bytes (surrounding
    /// whitespace ignored). The error never repeats the text given.
    pub fn parse(text: &str) -> Result<Key, CryptoError> {
        let text = text.trim();
        let bad = |found: &str| CryptoError::BadRootKey {
            found: found.to_string(),
        };
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| bad("hex that does not read"))?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| {
                    bad(&format!(
                        "{} characters, neither hex nor base64",
                        text.len()
                    ))
                })?
        };
        let key: [u8; KEY_BYTES] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| bad(&format!("{} bytes", bytes.len())))?;
        Ok(Key(key))
    }

    /// The key as 64 hex digits (for the key file a server writes on first start).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("a 256-bit key"))
    }

    /// Seals `plain` with a random nonce; `aad` is bound to it.
    fn seal(&self, plain: &[u8], aad: &[u8]) -> Result<Sealed, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CryptoError::Random)?;
        let mut data = plain.to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut data,
            )
            .map_err(|_| CryptoError::Random)?;
        Ok(Sealed {
            nonce: nonce.to_vec(),
            data,
        })
    }

    /// Opens `sealed`; `what` names it in the error (made only then: reads are hot).
    fn open(
        &self,
        sealed: &Sealed,
        aad: &[u8],
        what: impl Fn() -> String,
    ) -> Result<Vec<u8>, CryptoError> {
        let failed = || CryptoError::Open { what: what() };
        let nonce: [u8; NONCE_LEN] = sealed.nonce.as_slice().try_into().map_err(|_| failed())?;
        let mut data = sealed.data.clone();
        let plain_len = self
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut data,
            )
            .map_err(|_| failed())?
            .len();
        data.truncate(plain_len);
        Ok(data)
    }

    fn from_bytes(bytes: &[u8], what: impl Fn() -> String) -> Result<Key, CryptoError> {
        let key: [u8; KEY_BYTES] = bytes
            .try_into()
            .map_err(|_| CryptoError::Open { what: what() })?;
        Ok(Key(key))
    }
}

/// Ciphertext with its tag, and the nonce it was sealed with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    #[serde(with = "bytes_b64")]
    pub nonce: Vec<u8>,
    #[serde(with = "bytes_b64")]
    pub data: Vec<u8>,
}

/// Bytes in a record as base64 text: a JSON array of numbers is four times the size and
/// several times slower to read. Arrays (what earlier records hold) are still read.
pub mod bytes_b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Array(Vec<u8>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        match Either::deserialize(d)? {
            Either::Text(text) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(serde::de::Error::custom),
            Either::Array(bytes) => Ok(bytes),
        }
    }
}

/// A key-encryption key as stored: sealed with the root key, bound to its name and version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StoredKek {
    pub name: String,
    pub version: u32,
    pub sealed: Sealed,
}

fn kek_aad(name: &str, version: u32) -> Vec<u8> {
    format!("dozen-kek:{name}:{version}").into_bytes()
}

/// One value as stored: its data key sealed by a KEK (named and versioned), and the value
/// sealed by its data key. `context` (e.g. `/shop/prod/db/password@3`) is bound to both.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub kek: String,
    pub kek_version: u32,
    pub data_key: Sealed,
    pub value: Sealed,
}

/// The KEKs a server holds open, by name, every version.
#[derive(Default)]
pub struct Keyring {
    keys: Vec<(String, u32, Key)>,
}

impl Keyring {
    /// Opens stored KEKs with the root key. A wrong root key fails here, naming the first
    /// KEK it cannot open, before anything is written.
    pub fn unlock(root: &Key, stored: &[StoredKek]) -> Result<Keyring, CryptoError> {
        let mut keys = Vec::new();
        for k in stored {
            let what = format!("key-encryption key `{}` version {}", k.name, k.version);
            let bytes = root.open(&k.sealed, &kek_aad(&k.name, k.version), || what.clone())?;
            keys.push((
                k.name.clone(),
                k.version,
                Key::from_bytes(&bytes, || what.clone())?,
            ));
        }
        Ok(Keyring { keys })
    }

    /// A new version of KEK `name` (version 1 when it is new), sealed with the root key for
    /// storing; it is the one new writes under `name` use from now on.
    pub fn rotate(&mut self, root: &Key, name: &str) -> Result<StoredKek, CryptoError> {
        self.add(root, name, Key::generate()?)
    }

    /// Brings a key of one's own in as the next version of KEK `name`.
    pub fn import(&mut self, root: &Key, name: &str, key: Key) -> Result<StoredKek, CryptoError> {
        self.add(root, name, key)
    }

    fn add(&mut self, root: &Key, name: &str, key: Key) -> Result<StoredKek, CryptoError> {
        let version = self.newest(name).map_or(1, |v| v + 1);
        let sealed = root.seal(&key.0, &kek_aad(name, version))?;
        self.keys.push((name.to_string(), version, key));
        Ok(StoredKek {
            name: name.to_string(),
            version,
            sealed,
        })
    }

    pub fn newest(&self, name: &str) -> Option<u32> {
        self.keys
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, v, _)| *v)
            .max()
    }

    fn get(&self, name: &str, version: u32) -> Result<&Key, CryptoError> {
        self.keys
            .iter()
            .find(|(n, v, _)| n == name && *v == version)
            .map(|(_, _, k)| k)
            .ok_or_else(|| CryptoError::NoKek {
                name: name.to_string(),
                version,
            })
    }

    /// Seals `value` for `context` under the newest version of KEK `kek`, with a fresh data key.
    pub fn seal(&self, kek: &str, context: &str, value: &[u8]) -> Result<Envelope, CryptoError> {
        let version = self.newest(kek).ok_or_else(|| CryptoError::NoKek {
            name: kek.to_string(),
            version: 0,
        })?;
        let data_key = Key::generate()?;
        Ok(Envelope {
            kek: kek.to_string(),
            kek_version: version,
            data_key: self
                .get(kek, version)?
                .seal(&data_key.0, &data_key_aad(context, kek, version))?,
            value: data_key.seal(value, context.as_bytes())?,
        })
    }

    /// The value of `envelope`, which must have been sealed for `context`.
    pub fn open(&self, context: &str, envelope: &Envelope) -> Result<Vec<u8>, CryptoError> {
        let data_key = self.data_key(context, envelope)?;
        data_key.open(&envelope.value, context.as_bytes(), || {
            format!("the value of `{context}`")
        })
    }

    fn data_key(&self, context: &str, envelope: &Envelope) -> Result<Key, CryptoError> {
        let what = || format!("the data key of `{context}`");
        let kek = self.get(&envelope.kek, envelope.kek_version)?;
        let bytes = kek.open(
            &envelope.data_key,
            &data_key_aad(context, &envelope.kek, envelope.kek_version),
            what,
        )?;
        Key::from_bytes(&bytes, what)
    }

    /// The same value under the newest version of its KEK: only the data key is sealed again;
    /// the value's ciphertext is kept as it is. None when it already is under the newest.
    pub fn rewrap(
        &self,
        context: &str,
        envelope: &Envelope,
    ) -> Result<Option<Envelope>, CryptoError> {
        let newest = self.newest(&envelope.kek).unwrap_or(envelope.kek_version);
        if newest == envelope.kek_version {
            return Ok(None);
        }
        let data_key = self.data_key(context, envelope)?;
        let kek = self.get(&envelope.kek, newest)?;
        Ok(Some(Envelope {
            kek: envelope.kek.clone(),
            kek_version: newest,
            data_key: kek.seal(&data_key.0, &data_key_aad(context, &envelope.kek, newest))?,
            value: envelope.value.clone(),
        }))
    }
}

fn data_key_aad(context: &str, kek: &str, version: u32) -> Vec<u8> {
    format!("dozen-data-key:{kek}:{version}:{context}").into_bytes()
}

#[cfg(test)]
mod tests;
