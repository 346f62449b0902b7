//! The root key of the parameter store: it seals the key-encryption keys, which seal the data
//! keys of secret values. From `DOZEN_MASTER_KEY`, else the key file, else (only for a store
//! that holds no keys yet) a new one written to the key file, readable by its owner alone.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use dozen_params::Key;

#[derive(Args, Debug, Clone)]
pub struct RootKeyArgs {
    /// The parameter store's root key file (64 hex digits, mode 0600). Default:
    /// <ca-dir>/master.key with --ca-dir (`dozen ca init` writes it: every server gets it
    /// with the CA), else <data-dir>/master.key, written on first start. Back it up: without
    /// it no secret this store holds can be read. `DOZEN_MASTER_KEY` (the key itself) takes
    /// precedence.
    #[arg(long, env = "DOZEN_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// How often parameters' expiry dates, and the secret versions of services with
    /// `on_change = "redeploy"`, are checked.
    #[arg(long, default_value = "2s", value_parser = crate::commands::parse_duration, hide = true)]
    pub param_check_every: std::time::Duration,
}

/// The parameter store (its keys opened with the root key) and this server's audit trail.
/// A root key that does not open the store's keys stops the start before anything is written.
pub async fn open_param_store(
    data: &Path,
    ca_dir: Option<&Path>,
    args: &RootKeyArgs,
    store: &std::sync::Arc<dyn dozen_store::Store>,
    server_id: &str,
) -> anyhow::Result<(
    std::sync::Arc<dozen_control::params::ParamStore>,
    std::sync::Arc<dozen_control::audit::AuditLog>,
)> {
    let stored = dozen_control::params::stored_keks(store.as_ref()).await?;
    let default = ca_dir.unwrap_or(data).join(FILE);
    let (root, root_source) = root_key(&default, args, !stored.is_empty())?;
    let params = dozen_control::params::ParamStore::open(store.clone(), root)
        .await
        .map_err(|e| anyhow::anyhow!("{e} (the root key given: {root_source})"))?;
    let audit_dir = data.join("audit");
    let audit = dozen_control::audit::AuditLog::open(&audit_dir, server_id, params.audit_key())
        .with_context(|| format!("cannot open the audit trail in {}", audit_dir.display()))?;
    Ok((std::sync::Arc::new(params), std::sync::Arc::new(audit)))
}

/// Records each parameter's expiry warning and expiry as they come due, and redeploys the
/// services with `on_change = "redeploy"` whose secrets name new versions; on the
/// controller's leader only (or any server while none leads).
pub async fn params_loop(
    params: std::sync::Arc<dozen_control::params::ParamStore>,
    store: std::sync::Arc<dyn dozen_store::Store>,
    retention: dozen_control::desired::Retention,
    every: std::time::Duration,
    server_id: String,
) {
    let by = format!("server {server_id}");
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // One server of a cluster does this: the controller's leader.
        match dozen_control::leader::ours_to_do(store.as_ref(), &server_id).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell which server checks parameters now");
                continue;
            }
        }
        if let Err(e) = params.expiry_pass(dozen_control::wall_ms(), &by).await {
            tracing::warn!(error = %e, "cannot check parameters' expiry");
        }
        match dozen_control::params::pins::redeploy_changed(store.as_ref(), &retention).await {
            Ok(made) => {
                let events: Vec<dozen_model::Event> = made
                    .iter()
                    .map(|r| {
                        tracing::info!(service = %r.service, release = r.number, cause = %r.cause, "redeploying for a new secret version");
                        dozen_model::Event::new(
                            r.created_at_ms,
                            by.clone(),
                            dozen_model::EventKind::ReleaseCreated { release: r.number },
                        )
                        .service(&r.service)
                    })
                    .collect();
                if let Err(e) = dozen_control::events::record(store.as_ref(), &events).await {
                    tracing::warn!(error = %e, "cannot record redeploy events");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot check services' secret versions"),
        }
    }
}

/// The root key, and where it came from (for messages; never the key).
/// The root key file's name, in the data dir or beside the CA.
pub const FILE: &str = "master.key";

/// Writes a new root key to `path` (0600), refusing to replace one.
pub fn create(path: &Path) -> anyhow::Result<()> {
    let key = Key::generate()?;
    write_new(path, &key)
        .with_context(|| format!("cannot create the root key file {}", path.display()))
}

pub fn root_key(
    default: &Path,
    args: &RootKeyArgs,
    store_has_keys: bool,
) -> anyhow::Result<(Key, String)> {
    if let Some(given) = std::env::var_os("DOZEN_MASTER_KEY").filter(|v| !v.is_empty()) {
        let key = Key::parse(&given.to_string_lossy()).context("DOZEN_MASTER_KEY")?;
        return Ok((key, "DOZEN_MASTER_KEY".into()));
    }
    let path = args
        .master_key_file
        .clone()
        .unwrap_or_else(|| default.to_path_buf());
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                bail!(
                    "the root key file {} can be read by others (mode {:o}): `chmod 600 {}`",
                    path.display(),
                    mode & 0o777,
                    path.display()
                );
            }
            let key = Key::parse(&text)
                .with_context(|| format!("the root key file {}", path.display()))?;
            Ok((key, path.display().to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if store_has_keys {
                bail!(
                    "this store's secrets are sealed with a root key, and none was given: set DOZEN_MASTER_KEY, or put the key file this store was first started with at {} (--master-key-file)",
                    path.display()
                );
            }
            let key = Key::generate()?;
            match write_new(&path, &key) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), "a new root key for the parameter store: back it up; without it no secret stored here can be read");
                    Ok((key, path.display().to_string()))
                }
                // Another server sharing the file made it first: use that one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    root_key(default, args, store_has_keys)
                }
                Err(e) => Err(e)
                    .with_context(|| format!("cannot create the root key file {}", path.display())),
            }
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot read the root key file {}", path.display()))
        }
    }
}

/// Writes the key aside and links it into place, so a reader never sees half a key and a
/// second writer finds the first one's file.
fn write_new(path: &Path, key: &Key) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(format!("{}\n", key.to_hex()).as_bytes())?;
    f.sync_all()?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked
}
