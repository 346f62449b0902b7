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
        .and_then(|_| {
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
        let digest = format!("sha256:{name}");
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
