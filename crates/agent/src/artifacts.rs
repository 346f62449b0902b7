//! Artifact bundles: fetched from the control plane once per node, checked against their
//! digest, unpacked into a directory of their own that every task of the release shares.

use std::path::{Path, PathBuf};

use dozen_api::Client;

use crate::{bundle, random_id};

/// The unpacked artifact bundle `digest` under `data_dir`, fetched (and checked against its
/// digest) the first time.
pub(crate) async fn unpacked(
    client: &Client,
    data_dir: &Path,
    digest: &str,
) -> Result<PathBuf, String> {
    let hex = dozen_digest::check(digest).map_err(|e| e.to_string())?;
    let root = data_dir.join("artifacts");
    let dir = root.join(hex);
    if dir.is_dir() {
        return Ok(dir);
    }
    // Streamed to a file and unpacked from there: a bundle is never whole in memory.
    std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let download = root.join(format!(".partial-{hex}-{}.bundle", random_id()));
    client
        .download_blob_to(digest, &download)
        .await
        .map_err(|e| format!("cannot fetch artifact {digest}: {e}"))?;
    let tmp = root.join(format!(".partial-{hex}-{}", random_id()));
    let opened = std::fs::File::open(&download).map_err(|source| bundle::BundleError::Io {
        path: download.display().to_string(),
        source,
    });
    let unpacked = opened
        .and_then(|file| bundle::unpack(std::io::BufReader::new(file), &tmp))
        .and_then(|()| {
            // Its user's alone, like everything under the data directory.
            keep_owner_bits(&tmp).map_err(|source| bundle::BundleError::Io {
                path: tmp.display().to_string(),
                source,
            })
        })
        .and_then(|()| {
            std::fs::rename(&tmp, &dir).map_err(|source| bundle::BundleError::Io {
                path: dir.display().to_string(),
                source,
            })
        });
    let _ = std::fs::remove_file(&download);
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another runner may have unpacked the same bundle first.
        if !dir.is_dir() {
            return Err(format!("cannot unpack artifact {digest}: {e}"));
        }
    }
    Ok(dir)
}

/// Where the bundle `digest` is unpacked, for tasks of the agent's user (`group` None) or of
/// another user, in group `group`.
pub(crate) fn unpacked_path(data_dir: &Path, digest: &str, group: Option<u32>) -> Option<PathBuf> {
    let hex = dozen_digest::check(digest).ok()?;
    let dir = data_dir.join("artifacts").join(hex);
    Some(match group {
        Some(gid) => group_copy_path(&dir, gid),
        None => dir,
    })
}

fn group_copy_path(dir: &Path, gid: u32) -> PathBuf {
    dir.with_file_name(format!("{}.g{gid}", file_name(dir)))
}

/// A copy of the unpacked bundle `dir` that tasks in group `gid` can read and run but not
/// change (`<dir>.g<gid>`: the agent's, group `gid`, group bits read and execute only), made
/// once, for tasks that run as a user other than the agent's.
pub(crate) fn readable_by_group(dir: &Path, gid: u32) -> Result<PathBuf, String> {
    let copy = group_copy_path(dir, gid);
    if copy.is_dir() {
        return Ok(copy);
    }
    let tmp = dir.with_file_name(format!(".partial-{}", random_id()));
    let copied = copy_for_group(dir, &tmp, gid).and_then(|()| std::fs::rename(&tmp, &copy));
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&tmp);
        if !copy.is_dir() {
            return Err(format!(
                "cannot copy {} for group {gid}: {e}",
                dir.display()
            ));
        }
    }
    Ok(copy)
}

/// Clears the group and other permission bits of every entry under `dir` (and of `dir`).
fn keep_owner_bits(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::symlink_metadata(dir)?.permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            keep_owner_bits(&entry.path())?;
        } else if kind.is_file() {
            let mode = entry.metadata()?.permissions().mode();
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode & 0o700))?;
        }
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Copies the tree `from` to `to` (files, directories, symbolic links) into group `gid`, each
/// entry's group bits its owner's read and execute bits, no bits for others.
fn copy_for_group(from: &Path, to: &Path, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let for_group = |mode: u32| (mode & 0o700) | ((mode & 0o500) >> 3);
    std::fs::create_dir(to)?;
    std::os::unix::fs::lchown(to, None, Some(gid))?;
    let mode = std::fs::metadata(from)?.permissions().mode();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(for_group(mode)))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_for_group(&source, &target, gid)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source)?, &target)?;
            std::os::unix::fs::lchown(&target, None, Some(gid))?;
        } else if kind.is_file() {
            std::fs::copy(&source, &target)?;
            std::os::unix::fs::lchown(&target, None, Some(gid))?;
            let mode = entry.metadata()?.permissions().mode();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(for_group(mode)))?;
        }
    }
    Ok(())
}

/// Removes the unpacked bundles under `data_dir` that no task of this node uses (`in_use`:
/// digests), once older than `grace`, and unpacks cut short as long ago; returns the digests
/// removed. The bundle of a release a task may come back to (rollback) is fetched again.
pub(crate) fn collect(
    data_dir: &Path,
    in_use: &std::collections::HashSet<String>,
    grace: std::time::Duration,
) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(data_dir.join("artifacts")) else {
        return removed;
    };
    for entry in entries.flatten() {
        if !crate::os::older_than(&entry.path(), grace) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".partial-") {
            // An unpack (a directory) or a download (a file) cut short.
            let _ = std::fs::remove_dir_all(entry.path())
                .or_else(|_| std::fs::remove_file(entry.path()));
            continue;
        }
        // A user's own copy (`<hex>.<uid>`) goes with its bundle.
        let hex = name.split_once('.').map_or(name.as_str(), |(hex, _)| hex);
        let digest = format!("sha256:{hex}");
        if dozen_digest::check(&digest).is_ok()
            && !in_use.contains(&digest)
            && std::fs::remove_dir_all(entry.path()).is_ok()
        {
            removed.push(digest);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::collect;

    /// Seen: unpacked artifacts were never collected. Those no task uses go once past their
    /// grace; those in use, and fresh ones, stay.
    #[test]
    fn unpacked_bundles_no_task_uses_are_collected() {
        let data = tempfile::tempdir().unwrap();
        let root = data.path().join("artifacts");
        let hex = |c: char| std::iter::repeat_n(c, 64).collect::<String>();
        let (used, unused, fresh) = (hex('a'), hex('b'), hex('c'));
        for name in [&used, &unused, &fresh] {
            std::fs::create_dir_all(root.join(name).join("bin")).unwrap();
        }
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for name in [&used, &unused] {
            std::fs::File::open(root.join(name))
                .unwrap()
                .set_modified(hour_ago)
                .unwrap();
        }
        let in_use = std::collections::HashSet::from([format!("sha256:{used}")]);
        let removed = collect(data.path(), &in_use, std::time::Duration::from_secs(600));
        assert_eq!(removed, vec![format!("sha256:{unused}")]);
        assert!(root.join(&used).is_dir());
        assert!(root.join(&fresh).is_dir());
        assert!(!root.join(&unused).exists());
    }
}
