//! A task's secrets on its node: the agent asks the servers for the task's identity, fetches
//! exactly the versions its release pinned with that identity, and writes them to a directory
//! on a memory file system (`/dev/shm`), readable by the task's user alone: never to disk,
//! never into `launch.json`. For `secrets_as = "env"` the values go to a file there that the
//! shim (running as root or as the agent) reads into the task's environment at exec.
//!
//! The directory also holds the task's identity token (`.token`), which the task may use to
//! read what its service's `access` grants; the agent renews it while the task runs. The
//! directory goes when the task stops.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use dozen_api::params::ParamQuery;
use dozen_api::Client;
use dozen_model::Assignment;
use dozen_spec::SecretsAs;

use crate::driver::Secrets;

type UidGid = (u32, u32);

/// Where every agent keeps its tasks' secrets: a memory file system.
const MEMORY_FS: &str = "/dev/shm";
/// The task's identity token, in its secrets directory.
pub const TOKEN_FILE: &str = ".token";
/// For `secrets_as = "env"`: the values, read by the shim into the task's environment.
pub const ENV_FILE: &str = ".env.json";

/// This agent's directory of task secrets (one per agent data dir, so agents sharing a
/// machine keep theirs apart).
pub fn root(data_dir: &Path) -> PathBuf {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data_dir.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    Path::new(MEMORY_FS).join(format!("dozen-{hash:016x}"))
}

/// Whether a task needs its secrets directory: it has secrets, or its service may read the
/// parameter store at run time.
pub fn wanted(a: &Assignment) -> bool {
    !a.secrets.is_empty() || !a.spec.access.is_empty()
}

/// Fetches and writes the task's secrets; answers where they are.
pub async fn deliver(
    client: &Client,
    node: &str,
    data_dir: &Path,
    a: &Assignment,
    owner: Option<UidGid>,
) -> Result<Secrets, String> {
    let identity = client
        .task_token(&a.task, node)
        .await
        .map_err(|e| format!("cannot get the task's identity: {e}"))?;
    let as_task = client.with_token(&identity.token);
    let mut values = BTreeMap::new();
    for (key, pinned) in &a.secrets {
        let view = as_task
            .get_param(&ParamQuery {
                name: format!("{}:{}", pinned.name, pinned.version),
                decrypt: true,
            })
            .await
            .map_err(|e| {
                format!(
                    "cannot read secret {key} ({}:{}): {e}",
                    pinned.name, pinned.version
                )
            })?;
        let value = view
            .value
            .ok_or_else(|| format!("secret {key}: the server sent no value"))?;
        values.insert(key.clone(), value);
    }
    let root = root(data_dir);
    let dir = root.join(&a.task);
    write_all(
        &root,
        &dir,
        &values,
        &identity.token,
        a.spec.secrets_as,
        owner,
    )
    .map_err(|e| format!("cannot write the task's secrets to {}: {e}", dir.display()))?;
    Ok(Secrets {
        env_file: (a.spec.secrets_as == SecretsAs::Env).then(|| dir.join(ENV_FILE)),
        token_file: dir.join(TOKEN_FILE),
        dir,
        expires_at_ms: identity.expires_at_ms,
    })
}

fn write_all(
    root: &Path,
    dir: &Path,
    values: &BTreeMap<String, String>,
    token: &str,
    delivery: SecretsAs,
    owner: Option<UidGid>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(root)?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    match delivery {
        SecretsAs::File => {
            for (key, value) in values {
                write_private(&dir.join(key), value.as_bytes(), owner)?;
            }
        }
        // Read by the shim, not the task: it stays the agent's.
        SecretsAs::Env => {
            let json = serde_json::to_vec(values).unwrap_or_default();
            write_private(&dir.join(ENV_FILE), &json, None)?;
        }
    }
    write_private(&dir.join(TOKEN_FILE), token.as_bytes(), owner)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// A file readable by `owner` (or the agent) alone, replaced whole.
fn write_private(path: &Path, bytes: &[u8], owner: Option<UidGid>) -> std::io::Result<()> {
    let aside = path.with_extension("new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o400)
        .open(&aside)?;
    f.write_all(bytes)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&aside, Some(uid), Some(gid))?;
    }
    std::fs::rename(&aside, path)
}

/// Keeps the task's identity token fresh while its directory exists: a new one at half its
/// life. Ends when the task is gone (no directory, or the servers no longer issue one).
pub async fn renew(
    client: Client,
    node: String,
    task: String,
    secrets: Secrets,
    owner: Option<UidGid>,
) {
    let mut expires_at_ms = secrets.expires_at_ms;
    loop {
        let now = crate::shim::wall_ms();
        let wait = expires_at_ms.saturating_sub(now) / 2;
        tokio::time::sleep(Duration::from_millis(wait.max(1000))).await;
        if !secrets.dir.exists() {
            return;
        }
        match client.task_token(&task, &node).await {
            Ok(fresh) => {
                if write_private(&secrets.token_file, fresh.token.as_bytes(), owner).is_err() {
                    return;
                }
                expires_at_ms = fresh.expires_at_ms;
            }
            Err(e) if e.status() == Some(404) => return,
            Err(e) => {
                tracing::warn!(task, error = %e, "cannot renew the task's identity; trying again")
            }
        }
    }
}

/// Removes a task's secrets (it stopped, or is no longer this node's).
pub fn remove(data_dir: &Path, task: &str) {
    let dir = root(data_dir).join(task);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(task, dir = %dir.display(), error = %e, "cannot remove the task's secrets");
        }
    }
}
