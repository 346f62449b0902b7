//! Artifact bundles: a service's `artifact` directory packed into a deterministic tar (sorted
//! entries, no owners or times), so the same content always has the same digest, and unpacked
//! on the node into a directory named by that digest.

use std::path::{Component, Path};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("artifact {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("artifact {0} is not a directory")]
    NotADirectory(String),
    #[error("bundle entry `{0}` would land outside its directory")]
    UnsafeEntry(String),
    #[error("{dir} holds over {limit} bytes of files")]
    TooLarge { dir: String, limit: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Packs `dir` (regular files, directories and symlinks) into tar bytes.
pub fn pack_dir(dir: &Path) -> Result<Vec<u8>, BundleError> {
    pack_dir_with(dir, &|_| false, u64::MAX)
}

/// [`pack_dir`] without the entries `skip` names (by their path relative to `dir`; a skipped
/// directory is not entered), refusing more than `limit` bytes of files: the bytes are held in
/// memory.
pub fn pack_dir_with(
    dir: &Path,
    skip: &dyn Fn(&Path) -> bool,
    limit: u64,
) -> Result<Vec<u8>, BundleError> {
    if !dir.is_dir() {
        return Err(BundleError::NotADirectory(dir.display().to_string()));
    }
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    let mut stack = vec![dir.to_path_buf()];
    let mut entries = Vec::new();
    let mut total = 0u64;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io(&d))? {
            let e = e.map_err(io(&d))?;
            let p = e.path();
            if skip(p.strip_prefix(dir).unwrap_or(&p)) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&p).map_err(io(&p))?;
            if meta.is_dir() {
                stack.push(p.clone());
            } else {
                total += meta.len();
                if total > limit {
                    return Err(BundleError::TooLarge {
                        dir: dir.display().to_string(),
                        limit,
                    });
                }
            }
            entries.push(p);
        }
    }
    entries.sort();
    for p in entries {
        let rel = p.strip_prefix(dir).unwrap_or(&p);
        builder.append_path_with_name(&p, rel).map_err(io(&p))?;
    }
    builder.into_inner().map_err(io(dir))
}

/// Unpacks tar bytes into `dest` (created), refusing entries that escape it.
pub fn unpack(bundle: impl std::io::Read, dest: &Path) -> Result<(), BundleError> {
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    let mut archive = tar::Archive::new(bundle);
    archive.set_preserve_permissions(true);
    for entry in archive.entries().map_err(io(dest))? {
        let mut entry = entry.map_err(io(dest))?;
        let path = entry.path().map_err(io(dest))?.into_owned();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(BundleError::UnsafeEntry(path.display().to_string()));
        }
        entry.unpack_in(dest).map_err(io(dest))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_packs_to_the_same_bytes_and_round_trips() {
        let a = tempfile::tempdir().unwrap();
        std::fs::create_dir(a.path().join("bin")).unwrap();
        std::fs::write(a.path().join("bin/run"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::write(a.path().join("config.txt"), b"x=1").unwrap();
        let first = pack_dir(a.path()).unwrap();
        // Touch a file: times are not part of the bundle.
        std::fs::write(a.path().join("config.txt"), b"x=1").unwrap();
        assert_eq!(pack_dir(a.path()).unwrap(), first);
        let out = tempfile::tempdir().unwrap();
        unpack(first.as_slice(), out.path()).unwrap();
        assert_eq!(
            std::fs::read(out.path().join("bin/run")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        std::fs::write(a.path().join("config.txt"), b"x=2").unwrap();
        assert_ne!(pack_dir(a.path()).unwrap(), first);
    }
}
