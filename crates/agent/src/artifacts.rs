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
    let bytes = client
        .download_blob(digest)
        .await
        .map_err(|e| format!("cannot fetch artifact {digest}: {e}"))?;
    let tmp = root.join(format!(".partial-{hex}-{}", random_id()));
    let unpacked = bundle::unpack(&bytes, &tmp).and_then(|_| {
        std::fs::rename(&tmp, &dir).map_err(|source| bundle::BundleError::Io {
            path: dir.display().to_string(),
            source,
        })
    });
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another runner may have unpacked the same bundle first.
        if !dir.is_dir() {
            return Err(format!("cannot unpack artifact {digest}: {e}"));
        }
    }
    Ok(dir)
}
