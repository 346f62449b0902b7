//! Content-addressed blobs (artifact bundles; later images): the `BlobStore` trait and its
//! file-system backend. A blob is named by the SHA-256 of its bytes, checked on the way in.

use std::io::Write;
use std::path::PathBuf;

pub use dozen_digest::sha256_digest;
use dozen_digest::DigestError;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error(transparent)]
    BadDigest(DigestError),
    #[error("blob content hashes to {actual}, not {expected}")]
    Mismatch { expected: String, actual: String },
    #[error("blob store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl From<DigestError> for BlobError {
    fn from(e: DigestError) -> Self {
        match e {
            DigestError::Mismatch { expected, actual } => BlobError::Mismatch { expected, actual },
            malformed => BlobError::BadDigest(malformed),
        }
    }
}

pub trait BlobStore: Send + Sync + 'static {
    fn contains(&self, digest: &str) -> Result<bool, BlobError>;
    /// Stores `bytes` under `digest` after checking that they hash to it.
    fn put(&self, digest: &str, bytes: &[u8]) -> Result<(), BlobError>;
    fn get(&self, digest: &str) -> Result<Option<Vec<u8>>, BlobError>;
    /// Removes every blob not in `keep` that is older than `grace` (an upload waits that long
    /// for the release that will name it), and leftovers of interrupted writes; returns the
    /// digests removed.
    fn collect(
        &self,
        keep: &std::collections::BTreeSet<String>,
        grace: std::time::Duration,
    ) -> Result<Vec<String>, BlobError>;
}

pub struct FsBlobStore {
    dir: PathBuf,
}

impl FsBlobStore {
    pub fn new(dir: PathBuf) -> Result<Self, BlobError> {
        std::fs::create_dir_all(&dir).map_err(|source| BlobError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(FsBlobStore { dir })
    }

    fn path(&self, digest: &str) -> Result<PathBuf, BlobError> {
        Ok(self
            .dir
            .join(format!("sha256-{}", dozen_digest::check(digest)?)))
    }
}

/// Marks a blob as just wanted: a client that finds it present (and so does not upload it
/// again) is about to name it in a release, and the collector must not take it meanwhile.
fn touch(path: &std::path::Path) {
    if let Ok(file) = std::fs::File::options().write(true).open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

impl BlobStore for FsBlobStore {
    fn contains(&self, digest: &str) -> Result<bool, BlobError> {
        let path = self.path(digest)?;
        let there = path.exists();
        if there {
            touch(&path);
        }
        Ok(there)
    }

    fn put(&self, digest: &str, bytes: &[u8]) -> Result<(), BlobError> {
        let path = self.path(digest)?;
        dozen_digest::verify(digest, bytes)?;
        if path.exists() {
            touch(&path);
            return Ok(());
        }
        let io = |source| BlobError::Io {
            path: path.display().to_string(),
            source,
        };
        // A temporary file of its own: two puts of the same blob at once (peers fetching a new
        // bundle for several agents) must not write into one file.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{}-{n}.partial", std::process::id()));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }

    fn collect(
        &self,
        keep: &std::collections::BTreeSet<String>,
        grace: std::time::Duration,
    ) -> Result<Vec<String>, BlobError> {
        let io = |source| BlobError::Io {
            path: self.dir.display().to_string(),
            source,
        };
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= grace);
            if !old {
                continue;
            }
            let digest = name
                .strip_prefix("sha256-")
                .filter(|hex| !hex.contains('.'))
                .map(|hex| format!("sha256:{hex}"));
            match digest {
                Some(digest) if keep.contains(&digest) => {}
                Some(digest) if std::fs::remove_file(entry.path()).is_ok() => removed.push(digest),
                Some(_) => {}
                // A write cut short (`.partial`) long ago.
                None if name.ends_with(".partial") => {
                    let _ = std::fs::remove_file(entry.path());
                }
                None => {}
            }
        }
        Ok(removed)
    }

    fn get(&self, digest: &str) -> Result<Option<Vec<u8>>, BlobError> {
        let path = self.path(digest)?;
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BlobError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_content_that_does_not_match_and_names_that_are_not_digests() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FsBlobStore::new(dir.path().to_path_buf()).unwrap();
        let d = sha256_digest(b"hello");
        blobs.put(&d, b"hello").unwrap();
        assert!(blobs.contains(&d).unwrap());
        assert_eq!(blobs.get(&d).unwrap().unwrap(), b"hello");
        assert!(matches!(
            blobs.put(&d, b"evil"),
            Err(BlobError::Mismatch { .. })
        ));
        assert!(matches!(
            blobs.get("sha256:../../etc/passwd"),
            Err(BlobError::BadDigest(_))
        ));
        assert!(blobs.get(&sha256_digest(b"other")).unwrap().is_none());
    }

    /// Seen: blobs were never collected. Those no release names go once past their grace;
    /// those a release names, and fresh uploads still waiting for theirs, stay.
    #[test]
    fn unreferenced_blobs_past_their_grace_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FsBlobStore::new(dir.path().to_path_buf()).unwrap();
        let [named, orphan, fresh] = [b"named".as_slice(), b"orphan", b"fresh"].map(|b| {
            let d = sha256_digest(b);
            blobs.put(&d, b).unwrap();
            d
        });
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for d in [&named, &orphan] {
            let path = blobs.path(d).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(hour_ago)
                .unwrap();
        }
        let keep = std::collections::BTreeSet::from([named.clone()]);
        // A client that asks for a blob (and so will not upload it again) makes it fresh: the
        // release naming it may be on its way.
        let asked = sha256_digest(b"asked");
        blobs.put(&asked, b"asked").unwrap();
        std::fs::File::options()
            .write(true)
            .open(blobs.path(&asked).unwrap())
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        assert!(blobs.contains(&asked).unwrap());
        let removed = blobs
            .collect(&keep, std::time::Duration::from_secs(600))
            .unwrap();
        assert_eq!(removed, vec![orphan.clone()]);
        assert!(blobs.contains(&asked).unwrap());
        assert!(blobs.contains(&named).unwrap());
        assert!(blobs.contains(&fresh).unwrap());
        assert!(!blobs.contains(&orphan).unwrap());
    }
}
