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
/// In an agent's root: the data dir it belongs to, so what a killed agent left behind can be
/// found and removed by whoever removes that data dir (test harnesses do).
pub const DATA_DIR_FILE: &str = ".data-dir";

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
        // A file name of the directory, nothing else, whatever the server sent.
        if !dozen_spec::is_env_var_name(key) {
            return Err(format!("secret name `{key}` is not a plain name"));
        }
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
        data_dir,
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
    data_dir: &Path,
    root: &Path,
    dir: &Path,
    values: &BTreeMap<String, String>,
    token: &str,
    delivery: SecretsAs,
    owner: Option<UidGid>,
) -> std::io::Result<()> {
    ensure_own_dir(root, 0o711)?;
    let marker = root.join(DATA_DIR_FILE);
    if !marker.exists() {
        write_private(&marker, data_dir.as_os_str().as_encoded_bytes(), None)?;
    }
    let _ = std::fs::remove_dir_all(dir);
    // The agent's, never the task's: a task that could write here could plant a link for
    // the agent to follow. Its group may enter and read the files it owns.
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    if let Some((_, gid)) = owner {
        std::os::unix::fs::chown(dir, None, Some(gid))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
    }
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
    write_private(&dir.join(TOKEN_FILE), token.as_bytes(), owner)
}

/// Makes `dir` (in a directory anyone may write, such as `/dev/shm`) or checks that the one
/// there is a real directory of this user's that no one else may write: one made by someone
/// else first is refused, never used.
fn ensure_own_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        // Its mode set after, not by `mode` (which the umask trims).
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir()
        || meta.uid() != crate::os::effective_uid()
        || meta.mode() & 0o022 != 0
    {
        return Err(std::io::Error::other(format!(
            "{} is not a directory of this agent's user that only it may write (someone made it first?); remove it",
            dir.display()
        )));
    }
    if meta.mode() & 0o777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Removes the secrets of tasks this agent no longer runs (it was down when they stopped).
pub fn forget_strays(data_dir: &Path, kept: &[String]) {
    let Ok(entries) = std::fs::read_dir(root(data_dir)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        // A task's name never starts with a dot; the root's own files do.
        if !kept.contains(&name) && !name.starts_with('.') {
            remove(data_dir, &name);
        }
    }
}

/// A file readable by `owner` (or the agent) alone, replaced whole; never through a link.
fn write_private(path: &Path, bytes: &[u8], owner: Option<UidGid>) -> std::io::Result<()> {
    let aside = path.with_extension("new");
    match std::fs::remove_file(&aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o400)
        .open(&aside)?;
    f.write_all(bytes)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    std::fs::rename(&aside, path)
}

/// Keeps the task's identity token fresh while its directory exists: a new one at half its
/// life, retried with a growing pause (1 s to a minute) while the servers cannot be reached.
/// Ends when the task is gone (no directory, or the servers no longer issue one).
pub async fn renew(
    client: Client,
    node: String,
    task: String,
    secrets: Secrets,
    owner: Option<UidGid>,
) {
    let mut expires_at_ms = secrets.expires_at_ms;
    let mut retry: Option<Duration> = None;
    loop {
        let wait = match retry {
            Some(pause) => pause,
            None => Duration::from_millis(
                (expires_at_ms.saturating_sub(crate::shim::wall_ms()) / 2).max(1000),
            ),
        };
        tokio::time::sleep(wait).await;
        if !secrets.dir.exists() {
            return;
        }
        match client.task_token(&task, &node).await {
            Ok(fresh) => {
                if let Err(e) = write_private(&secrets.token_file, fresh.token.as_bytes(), owner) {
                    tracing::warn!(task, error = %e, "cannot write the task's renewed identity; renewal stops");
                    return;
                }
                expires_at_ms = fresh.expires_at_ms;
                retry = None;
            }
            Err(e) if e.status() == Some(404) => return,
            Err(e) => {
                let next = retry.map_or(Duration::from_secs(1), |p| {
                    (p * 2).min(Duration::from_secs(60))
                });
                tracing::warn!(task, error = %e, retry_in_ms = next.as_millis() as u64, "cannot renew the task's identity");
                retry = Some(next);
            }
        }
    }
}

/// The secrets a task adopted after an agent restart already has (their token renewed from
/// now on), if its directory is there.
pub fn existing(data_dir: &Path, a: &Assignment) -> Option<Secrets> {
    let dir = root(data_dir).join(&a.task);
    dir.is_dir().then(|| Secrets {
        env_file: (a.spec.secrets_as == SecretsAs::Env).then(|| dir.join(ENV_FILE)),
        token_file: dir.join(TOKEN_FILE),
        dir,
        expires_at_ms: 0,
    })
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
