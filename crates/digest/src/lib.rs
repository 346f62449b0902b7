//! Content addresses: `sha256:` followed by 64 lowercase hex digits. The one place that
//! computes a digest and checks one, for the blob store, the API client and the agent alike.
//! A checked digest may become a file name, so nothing else passes the check.
#![forbid(unsafe_code)]

use sha2::{Digest as _, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("`{0}` is not a blob digest: expected sha256: followed by 64 lowercase hex digits")]
    Malformed(String),
    #[error("content hashes to {actual}, not {expected}")]
    Mismatch { expected: String, actual: String },
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    render(&Sha256::digest(bytes))
}

/// A digest computed piece by piece, for content too big to hold at once.
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// `sha256:<hex>` of everything given.
    pub fn finish(self) -> String {
        render(&self.0.finalize())
    }
}

fn render(hash: &[u8]) -> String {
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for &b in hash {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Checks the form of `digest`; returns its hex part.
pub fn check(digest: &str) -> Result<&str, DigestError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .ok_or_else(|| DigestError::Malformed(digest.to_string()))
}

/// Checks that `bytes` are the content `digest` names (and that `digest` is well formed).
pub fn verify(digest: &str, bytes: &[u8]) -> Result<(), DigestError> {
    check(digest)?;
    let actual = sha256_digest(bytes);
    if actual != digest {
        return Err(DigestError::Mismatch {
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_names_its_content_and_nothing_else_passes() {
        let d = sha256_digest(b"hello");
        assert_eq!(
            d,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(check(&d).unwrap().len(), 64);
        verify(&d, b"hello").unwrap();
        assert!(matches!(
            verify(&d, b"evil"),
            Err(DigestError::Mismatch { .. })
        ));
        for bad in [
            "sha256:../../etc/passwd",
            "sha256:",
            "md5:2cf24dba5fb0a30e26e83b2ac5b9e29e",
            // Upper case would name a second file for the same content.
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        ] {
            assert!(
                matches!(check(bad), Err(DigestError::Malformed(_))),
                "{bad}"
            );
            assert!(verify(bad, b"hello").is_err(), "{bad}");
        }
    }
}
