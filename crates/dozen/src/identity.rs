//! Identity commands and their plumbing: `dozen ca init`, `dozen node token|join|revoke`,
//! `dozen context ...`, and how the CLI, agents and proxies find their trust and credentials.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use dozen_api::tls::{self, Ca};
use dozen_api::{JoinRequest, JoinResponse, JoinTokenRequest, JoinTokenResponse, RevokeResponse};
use serde::{Deserialize, Serialize};

use crate::{output, Global};

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Make the cluster CA: ca.crt (public) and ca.key (secret, 0600). Give the directory to
    /// every server (--ca-dir); nodes get their certificates by `dozen node join`.
    Init {
        /// Where to write it. Default: <data-dir>/ca.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Make a one-time join token for node NODE (operator) and print the command it runs.
    ///
    /// The token joins that name only, and the node may then register only the hosts given
    /// here (where proxies send its tasks' traffic); without --host, what the node names at
    /// `node join --advertise-host`, else the address it joins from.
    Token {
        /// The node the token is for.
        node: String,
        /// How long the token can be used.
        #[arg(long, default_value = "1h", value_parser = crate::commands::parse_duration)]
        ttl: Duration,
        /// An address the node may register as its host (repeat for several).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Join this machine to a cluster: trade a join token for a node certificate (the key is
    /// made here and never leaves). Then run `dozen agent` with the same --data-dir.
    Join(JoinArgs),
    /// Revoke every certificate issued to a node: its agent and proxy are refused from now on.
    Revoke { node: String },
}

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// The token from `dozen node token`. Prefer the environment variable: a command line is
    /// visible to every user of the machine.
    #[arg(long, env = "DOZEN_JOIN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// `sha256:<hex>` of the cluster CA, printed by `dozen node token`: the server must prove
    /// it holds that CA before the token is sent.
    #[arg(long)]
    pub ca_hash: String,
    /// Name of this node. Default: the host name.
    #[arg(long, env = "DOZEN_NODE_NAME")]
    pub node_name: Option<String>,
    /// The address this node's agent will advertise (`dozen agent --advertise-host`), fixed
    /// in its identity when the token names none. Default: the address it joins from.
    #[arg(long, env = "DOZEN_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ContextCommand {
    /// Save a named context: server URL(s), the CA to trust, where the token is.
    Add(ContextAddArgs),
    /// Make a context the current one.
    Use { name: String },
    /// List contexts (* marks the current one).
    List,
    /// Forget a context.
    Remove { name: String },
}

#[derive(Args, Debug)]
pub struct ContextAddArgs {
    pub name: String,
    /// `https://a:7700,https://b:7700`.
    #[arg(long = "url")]
    pub url: String,
    /// The cluster CA certificate (ca.crt).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// File holding the operator token (the context keeps the path, never the token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Make it the current context too.
    #[arg(long = "use")]
    pub make_current: bool,
}

/// The node identity of an agent or proxy lives here, under its data dir.
pub fn node_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("node")
}

pub fn ca_init(global: &Global, dir: Option<PathBuf>) -> anyhow::Result<i32> {
    let dir = dir.unwrap_or_else(|| global.data_dir.join("ca"));
    let ca = Ca::generate()?;
    ca.save(&dir)?;
    // The parameter store's root key goes with the CA: every server gets both.
    crate::master_key::create(&dir.join(crate::master_key::FILE))?;
    let hash = ca.fingerprint()?;
    if global.output == crate::Output::Json {
        output::json(&serde_json::json!({ "dir": dir, "ca_hash": hash }));
        return Ok(0);
    }
    println!("cluster CA written to {}", dir.display());
    println!("  ca.crt  public; CLIs and nodes trust it");
    println!("  ca.key  secret (0600); copy the directory to every server, nowhere else");
    println!("  master.key  secret (0600): the parameter store's root key; back it up");
    println!("  hash    {hash}");
    println!();
    println!("next:");
    println!(
        "  dozen server --ca-dir {} --store etcd://... --token-file TOKEN --listen 0.0.0.0:7700",
        dir.display()
    );
    println!("  dozen node token NODE   # on an operator machine: a join token for a new node");
    Ok(0)
}

pub async fn node_token(
    global: &Global,
    node: String,
    ttl: Duration,
    hosts: Vec<String>,
) -> anyhow::Result<i32> {
    let api = crate::commands::client(global)?;
    let made: JoinTokenResponse = api
        .create_join_token(&JoinTokenRequest {
            ttl_ms: Some(ttl.as_millis() as u64),
            node: Some(node),
            hosts,
        })
        .await?;
    if global.output == crate::Output::Json {
        output::json(&made);
        return Ok(0);
    }
    println!(
        "join token for node {} (one use, {}):",
        made.node,
        humanize(made.ttl_ms)
    );
    println!("  {}", made.token);
    // The token goes in the environment, not argv: argv is visible to every local user.
    println!("on the new node:");
    println!(
        "  DOZEN_JOIN_TOKEN={} dozen --server {} node join --ca-hash {} --node-name {}",
        made.token,
        api.base(),
        made.ca_hash,
        made.node
    );
    println!("  dozen --server {} agent --with-proxy", api.base());
    Ok(0)
}

fn humanize(ms: u64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 => format!("valid {} h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("valid {} min", ms / 60_000),
        ms => format!("valid {} s", ms / 1000),
    }
}

pub async fn node_join(global: &Global, args: JoinArgs) -> anyhow::Result<i32> {
    let server = global.server().split(',').next().unwrap_or("").to_string();
    if !server.starts_with("https://") {
        bail!("--server {server}: joining needs the cluster's https:// URL");
    }
    let node = args
        .node_name
        .clone()
        .unwrap_or_else(dozen_agent::os::hostname);
    // Fetch the CA without trusting anyone yet, then accept it only if it is the one the
    // operator named: the token is sent only to a server that holds that CA.
    let ca_pem = dozen_api::client::fetch_ca_unverified(&server)
        .await
        .with_context(|| format!("cannot fetch the cluster CA from {server}"))?;
    let actual = tls::fingerprint(&ca_pem)?;
    if actual != args.ca_hash.trim() {
        bail!(
            "the server at {server} holds CA {actual}, not the --ca-hash {} you gave: not joining \
             (is this the right server?)",
            args.ca_hash
        );
    }
    let (csr_pem, key_pem) = tls::node_request(&node)?;
    let request = JoinRequest {
        token: args.token.clone(),
        node: node.clone(),
        csr_pem,
        hosts: args.advertise_host.clone().into_iter().collect(),
    };
    let joined: JoinResponse = match dozen_api::client::join(
        &server,
        tls::client_config(&ca_pem, None)?,
        &request,
    )
    .await
    {
        Ok(joined) => joined,
        Err(e @ dozen_api::ApiError::Unreachable { .. }) => {
            return Err(anyhow::Error::new(e).context(format!("cannot reach {server} to join")))
        }
        Err(dozen_api::ApiError::Status {
            status,
            message,
            hint,
        }) => match hint {
            Some(hint) => bail!("{message} ({status})\n  hint: {hint}"),
            None => bail!("{message} ({status})"),
        },
        Err(e) => return Err(e.into()),
    };
    if tls::fingerprint(&joined.ca_pem).ok().as_deref() != Some(actual.as_str()) {
        bail!(
            "the server at {server} answered the join with a CA other than {actual}: not joining"
        );
    }
    let dir = node_dir(&global.data_dir);
    // The pinned CA is what this node trusts from now on.
    tls::save_node_identity(&dir, &joined.cert_pem, &key_pem, &ca_pem)?;
    if global.output == crate::Output::Json {
        output::json(&serde_json::json!({ "node": node, "serial": joined.serial, "dir": dir }));
        return Ok(0);
    }
    println!(
        "joined as node `{node}` (certificate {}), kept in {}",
        joined.serial,
        dir.display()
    );
    println!(
        "start it: dozen --server {} --data-dir {} agent --with-proxy",
        global.server(),
        global.data_dir.display()
    );
    Ok(0)
}

pub async fn node_revoke(global: &Global, node: &str) -> anyhow::Result<i32> {
    let api = crate::commands::client(global)?;
    let revoked: RevokeResponse = api.revoke_node(node).await?;
    output::listing(global.output, &revoked, || {
        println!(
            "revoked {} certificate(s) of node `{}`: {}",
            revoked.serials.len(),
            revoked.node,
            revoked.serials.join(", ")
        );
    });
    Ok(0)
}

/// What an agent or proxy presents to `https://` servers: its node certificate (from
/// `dozen node join`), or, without one, the CA given by --ca (then the token authenticates).
pub fn node_tls(
    global: &Global,
) -> anyhow::Result<(
    Option<dozen_api::tls::ClientConfig>,
    Option<tls::NodeIdentity>,
)> {
    let dir = node_dir(&global.data_dir);
    if let Some((cert_pem, key_pem, ca_pem)) = tls::load_node_identity(&dir)? {
        let config = tls::client_config(&ca_pem, Some((&cert_pem, &key_pem)))?;
        let identity = tls::NodeIdentity {
            cert_pem,
            key_pem,
            ca_pem,
        };
        return Ok((Some(config), Some(identity)));
    }
    Ok((operator_tls(global)?, None))
}

/// Trust for an operator's `https://` calls: --ca, or the current context's CA.
pub fn operator_tls(global: &Global) -> anyhow::Result<Option<dozen_api::tls::ClientConfig>> {
    let Some(ca_file) = &global.ca else {
        if global.server().contains("https://") {
            bail!(
                "{} is https: give the cluster CA with --ca (DOZEN_CA) or use a context \
                 (`dozen context add NAME --url ... --ca-file ca.crt`)",
                global.server()
            );
        }
        return Ok(None);
    };
    let ca = std::fs::read_to_string(ca_file)
        .with_context(|| format!("cannot read the CA certificate {}", ca_file.display()))?;
    Ok(Some(tls::client_config(&ca, None)?))
}

// --- contexts -----------------------------------------------------------------------------

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Contexts {
    #[serde(default)]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, SavedContext>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedContext {
    pub url: String,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// `$DOZEN_CONFIG`, else `$HOME/.config/dozen/contexts.json`.
pub fn contexts_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DOZEN_CONFIG") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".config/dozen/contexts.json")
}

fn load_contexts(path: &Path) -> anyhow::Result<Contexts> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a dozen contexts file; fix or remove it",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Contexts::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save_contexts(path: &Path, contexts: &Contexts) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(contexts)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Fills what the command line left unset (server, CA, token file) from the named or current
/// context. Flags and environment variables always win.
pub fn apply_context(global: &mut Global) -> anyhow::Result<()> {
    let path = contexts_path();
    let saved = load_contexts(&path)?;
    let Some(name) = global.context.clone().or(saved.current.clone()) else {
        return Ok(());
    };
    let Some(ctx) = saved.contexts.get(&name) else {
        bail!(
            "no context named `{name}` in {}; `dozen context list` shows the ones there are",
            path.display()
        );
    };
    if global.server.is_none() {
        global.server = Some(ctx.url.clone());
    }
    if global.ca.is_none() {
        global.ca = ctx.ca_file.clone();
    }
    if global.token.is_none() {
        if let Some(file) = &ctx.token_file {
            let token = std::fs::read_to_string(file).with_context(|| {
                format!(
                    "context `{name}`: cannot read its token file {}",
                    file.display()
                )
            })?;
            global.token = Some(token.trim().to_string());
        }
    }
    Ok(())
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("cannot find {}", p.display()))
}

pub fn context(global: &Global, command: ContextCommand) -> anyhow::Result<i32> {
    let path = contexts_path();
    let mut saved = load_contexts(&path)?;
    match command {
        ContextCommand::Add(a) => {
            if !a
                .url
                .split(',')
                .all(|u| u.starts_with("http://") || u.starts_with("https://"))
            {
                bail!(
                    "--url {}: write http(s)://host:port, comma-separated",
                    a.url
                );
            }
            if a.url.contains("https://") && a.ca_file.is_none() {
                bail!(
                    "--url {} is https: give the cluster CA with --ca-file",
                    a.url
                );
            }
            let ctx = SavedContext {
                url: a.url,
                ca_file: a.ca_file.as_deref().map(absolute).transpose()?,
                token_file: a.token_file.as_deref().map(absolute).transpose()?,
            };
            if let Some(ca) = &ctx.ca_file {
                let pem = std::fs::read_to_string(ca)?;
                tls::fingerprint(&pem)
                    .with_context(|| format!("{} is not a CA certificate", ca.display()))?;
            }
            saved.contexts.insert(a.name.clone(), ctx);
            if a.make_current || saved.current.is_none() {
                saved.current = Some(a.name.clone());
            }
            save_contexts(&path, &saved)?;
            println!("context `{}` saved in {}", a.name, path.display());
        }
        ContextCommand::Use { name } => {
            if !saved.contexts.contains_key(&name) {
                bail!("no context named `{name}`; `dozen context list` shows them");
            }
            saved.current = Some(name.clone());
            save_contexts(&path, &saved)?;
            println!("now using context `{name}`");
        }
        ContextCommand::Remove { name } => {
            if saved.contexts.remove(&name).is_none() {
                bail!("no context named `{name}`");
            }
            if saved.current.as_deref() == Some(name.as_str()) {
                saved.current = None;
            }
            save_contexts(&path, &saved)?;
            println!("context `{name}` removed");
        }
        ContextCommand::List => {
            output::listing(global.output, &saved, || {
                for (name, ctx) in &saved.contexts {
                    let mark = if saved.current.as_deref() == Some(name.as_str()) {
                        "*"
                    } else {
                        " "
                    };
                    println!("{mark} {name}  {}", ctx.url);
                }
                if saved.contexts.is_empty() {
                    println!("no contexts; add one with `dozen context add NAME --url URL`");
                }
            });
        }
    }
    Ok(0)
}
