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
    #[error("blob {digest} is over the limit of {limit} bytes")]
    TooLarge { digest: String, limit: u64 },
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
    /// The blob `digest` to read from (stream, never whole into memory); None if not held.
    fn open(&self, digest: &str) -> Result<Option<std::fs::File>, BlobError>;
    /// A writer that keeps `digest` once what is written to it hashes to that digest (and
    /// refuses more than `limit` bytes): content streams through, never whole into memory.
    fn writer(&self, digest: &str, limit: u64) -> Result<BlobWriter, BlobError>;
    /// A writer for content whose digest is told only at the end ([`BlobWriter::commit_as`]):
    /// a registry upload that comes in chunks.
    fn upload(&self, limit: u64) -> Result<BlobWriter, BlobError>;
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

/// A number for a temporary file of its own: two writes of the same blob at once (peers
/// fetching a new bundle for several agents) must not write into one file.
fn next_tmp() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Marks a blob as just wanted: a client that finds it present (and so does not upload it
/// again) is about to name it in a release, and the collector must not take it meanwhile.
fn touch(path: &std::path::Path) {
    if let Ok(file) = std::fs::File::options().write(true).open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Content on its way into the store: written to a file of its own while hashed, kept under
/// its digest by [`BlobWriter::commit`] if it matches, removed otherwise (also when dropped).
pub struct BlobWriter {
    /// Empty until known (an upload learns it at the end).
    digest: String,
    tmp: PathBuf,
    dir: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: dozen_digest::Hasher,
    written: u64,
    limit: u64,
}

impl BlobWriter {
    fn io(&self) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
        move |source| BlobError::Io {
            path: self.tmp.display().to_string(),
            source,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        use tokio::io::AsyncWriteExt;
        if self.written + chunk.len() as u64 > self.limit {
            return Err(BlobError::TooLarge {
                digest: if self.digest.is_empty() {
                    "upload".into()
                } else {
                    self.digest.clone()
                },
                limit: self.limit,
            });
        }
        self.written += chunk.len() as u64;
        self.hasher.update(chunk);
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let written = file.write_all(chunk).await;
        written.map_err(self.io())
    }

    /// Keeps the upload as `digest` if what was written is the content it names.
    pub async fn commit_as(mut self, digest: &str) -> Result<u64, BlobError> {
        dozen_digest::check(digest)?;
        self.digest = digest.to_string();
        self.commit().await
    }

    /// Keeps the blob if what was written is the content its digest names.
    pub async fn commit(mut self) -> Result<u64, BlobError> {
        let hex = dozen_digest::check(&self.digest)?;
        let path = self.dir.join(format!("sha256-{hex}"));
        let Some(file) = self.file.take() else {
            return Ok(self.written);
        };
        let synced = file.sync_all().await;
        drop(file);
        synced.map_err(self.io())?;
        let actual = std::mem::take(&mut self.hasher).finish();
        if actual != self.digest {
            return Err(BlobError::Mismatch {
                expected: self.digest.clone(),
                actual,
            });
        }
        let renamed = tokio::fs::rename(&self.tmp, &path).await;
        renamed.map_err(self.io())?;
        Ok(self.written)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Not committed (or committed: then the file is already gone).
        let _ = std::fs::remove_file(&self.tmp);
    }
}

impl BlobStore for FsBlobStore {
    fn open(&self, digest: &str) -> Result<Option<std::fs::File>, BlobError> {
        let path = self.path(digest)?;
        match std::fs::File::open(&path) {
            Ok(f) => {
                touch(&path);
                Ok(Some(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BlobError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    fn writer(&self, digest: &str, limit: u64) -> Result<BlobWriter, BlobError> {
        let path = self.path(digest)?;
        let mut writer = self.upload(limit)?;
        writer.digest = digest.to_string();
        // Named after its blob, for whoever looks in the directory meanwhile.
        let tmp = path.with_extension(format!("{}-{}.partial", std::process::id(), next_tmp()));
        if std::fs::rename(&writer.tmp, &tmp).is_ok() {
            writer.tmp = tmp;
        }
        Ok(writer)
    }

    fn upload(&self, limit: u64) -> Result<BlobWriter, BlobError> {
        let tmp = self.dir.join(format!(
            "upload-{}-{}.partial",
            std::process::id(),
            next_tmp()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|source| BlobError::Io {
                path: tmp.display().to_string(),
                source,
            })?;
        Ok(BlobWriter {
            digest: String::new(),
            tmp,
            dir: self.dir.clone(),
            file: Some(tokio::fs::File::from_std(file)),
            hasher: Default::default(),
            written: 0,
            limit,
        })
    }

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
        let tmp = path.with_extension(format!("{}-{}.partial", std::process::id(), next_tmp()));
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

    /// A registry upload learns its digest at the end: kept only if the content matches, and
    /// nothing is left behind either way.
    #[tokio::test]
    async fn an_upload_is_kept_under_the_digest_it_is_told_if_it_matches() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FsBlobStore::new(dir.path().to_path_buf()).unwrap();
        let mut up = blobs.upload(10).unwrap();
        up.write(b"hello ").await.unwrap();
        up.write(b"you").await.unwrap();
        assert_eq!(up.written(), 9);
        assert!(matches!(
            up.write(b"!!").await,
            Err(BlobError::TooLarge { .. })
        ));
        let wrong = sha256_digest(b"hello");
        let mismatch = up.commit_as(&wrong).await;
        assert!(
            matches!(mismatch, Err(BlobError::Mismatch { .. })),
            "{mismatch:?}"
        );
        assert!(!blobs.contains(&wrong).unwrap());
        let mut up = blobs.upload(10).unwrap();
        up.write(b"hello you").await.unwrap();
        let right = sha256_digest(b"hello you");
        assert_eq!(up.commit_as(&right).await.unwrap(), 9);
        assert_eq!(blobs.get(&right).unwrap().unwrap(), b"hello you");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![format!("sha256-{}", &right[7..])]);
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
