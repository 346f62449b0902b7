//! `dozen param`, `dozen keys`, `dozen token` and `dozen audit`: the parameter store from the
//! command line. Secret values come from stdin or a file, never from an argument (arguments
//! reach shell history and every process listing).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use dozen_api::params::{
    AuditQuery, CreateTokenRequest, LabelRequest, ParamListQuery, ParamQuery, ParamView,
    PutParamRequest, RotateKeyRequest,
};

use crate::commands::{client, parse_duration};
use crate::output::{self, table, utc_time};
use crate::{Global, Output};

/// Largest value read from stdin or a file before the server's own limit says no.
const MAX_INPUT_BYTES: u64 = 64 * 1024;

#[derive(Subcommand, Debug)]
pub enum ParamCommand {
    /// Store a new version: `echo -n s3cret | dozen param put /shop/prod/db/password --secure`.
    /// A SecureString's value must come on stdin or from --from-file.
    Put(PutArgs),
    /// Print a value: `dozen param get /shop/prod/db/password@prod --with-decryption`
    /// (`name`, `name:version` or `name@label`; `-o json` for the whole record).
    Get(GetArgs),
    /// List the parameters under a path (`-r` for every depth).
    Ls(LsArgs),
    /// Every kept version of a parameter, newest first, with its labels.
    History(NameArg),
    /// Put labels on a version (default the newest), moving them from where they were:
    /// `dozen param label /shop/prod/db/password:3 prod`. `--remove` takes them off.
    Label(LabelArgs),
    /// Delete a parameter and every version of it.
    Rm(NameArg),
}

#[derive(Args, Debug)]
pub struct PutArgs {
    name: String,
    /// The value (String and StringList only; `-` or nothing reads stdin).
    value: Option<String>,
    /// String, StringList or SecureString (default: the parameter's current type, String for
    /// a new one).
    #[arg(long = "type")]
    kind: Option<String>,
    /// Short for --type SecureString.
    #[arg(long, conflicts_with = "kind")]
    secure: bool,
    /// Read the value from this file.
    #[arg(long, conflicts_with = "value")]
    from_file: Option<PathBuf>,
    #[arg(long)]
    description: Option<String>,
    /// A tag, `key=value` (repeat for more); replaces the tags.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// It expires this long from now (`30d`); a warning event comes --warn-before earlier.
    #[arg(long, value_parser = parse_duration)]
    expires_in: Option<Duration>,
    /// How long before the expiry the warning event comes (default 1d).
    #[arg(long, value_parser = parse_duration, requires = "expires_in")]
    warn_before: Option<Duration>,
    /// The key-encryption key to seal a SecureString under.
    #[arg(long)]
    key: Option<String>,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// `name`, `name:version` or `name@label`; several: one `name value` line each.
    #[arg(required = true)]
    names: Vec<String>,
    /// Show a SecureString in plain text (needs `read` on it; the read is audited).
    #[arg(long)]
    with_decryption: bool,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    #[arg(default_value = "/")]
    path: String,
    /// Every depth under the path, not only its direct children.
    #[arg(short, long)]
    recursive: bool,
    /// Show values, SecureStrings decrypted (each decrypted read is audited).
    #[arg(long)]
    with_decryption: bool,
    /// One page of at most this many (the next page's token goes to stderr); default all.
    #[arg(long)]
    limit: Option<usize>,
    /// The page after this name (from a previous --limit run).
    #[arg(long)]
    after: Option<String>,
}

#[derive(Args, Debug)]
pub struct NameArg {
    name: String,
}

#[derive(Args, Debug)]
pub struct LabelArgs {
    /// `name` or `name:version`.
    name: String,
    #[arg(required = true)]
    labels: Vec<String>,
    /// Take the labels off instead.
    #[arg(long)]
    remove: bool,
}

pub async fn param(global: &Global, command: ParamCommand) -> anyhow::Result<i32> {
    let api = client(global)?;
    match command {
        ParamCommand::Put(a) => {
            let kind = if a.secure {
                Some("SecureString".to_string())
            } else {
                a.kind.clone()
            };
            // A value on the command line is refused for a secret, including one that is a
            // secret already and would stay one.
            let secure = match &kind {
                Some(k) => dozen_params::names::ParamType::parse(k)
                    .is_ok_and(|t| t == dozen_params::names::ParamType::SecureString),
                None if a.value.as_deref().is_some_and(|v| v != "-") => {
                    // Metadata only: no value read, and an expired parameter answers too.
                    match api.param_history(&a.name).await {
                        Ok(versions) => versions.first().is_some_and(|v| v.kind == "SecureString"),
                        Err(e) if e.status() == Some(404) => false,
                        Err(e) if e.status() == Some(403) => bail!(
                            "cannot tell whether {} is a SecureString (this token may not read it): give --type",
                            a.name
                        ),
                        Err(e) => return Err(e.into()),
                    }
                }
                None => false,
            };
            let value = read_value(&a, secure)?;
            let tags = if a.tags.is_empty() {
                None
            } else {
                Some(parse_tags(&a.tags)?)
            };
            let view = api
                .put_param(&PutParamRequest {
                    name: a.name.clone(),
                    kind,
                    value,
                    description: a.description,
                    tags,
                    expires_at_ms: a
                        .expires_in
                        .map(|d| dozen_agent::shim::wall_ms() + d.as_millis() as u64),
                    warn_before_ms: a.warn_before.map(|d| d.as_millis() as u64),
                    key: a.key,
                })
                .await?;
            match global.output {
                Output::Json => output::json(&view),
                Output::Table => println!("{} version {}", view.name, view.version),
            }
        }
        ParamCommand::Get(a) => {
            let mut views = Vec::with_capacity(a.names.len());
            for name in &a.names {
                views.push(
                    api.get_param(&ParamQuery {
                        name: name.clone(),
                        decrypt: a.with_decryption,
                    })
                    .await?,
                );
            }
            if global.output == Output::Json {
                match views.as_slice() {
                    [one] => output::json(one),
                    many => output::json(&many),
                }
                return Ok(0);
            }
            for view in &views {
                let Some(value) = &view.value else {
                    bail!(
                        "{} is a {}: add --with-decryption to see its value",
                        view.name,
                        view.kind
                    );
                };
                match views.len() {
                    1 => println!("{value}"),
                    _ => println!("{} {value}", view.name),
                }
            }
        }
        ParamCommand::Ls(a) => {
            let mut all: Vec<ParamView> = Vec::new();
            let mut after = a.after.clone();
            loop {
                let page = api
                    .list_params(&ParamListQuery {
                        path: a.path.clone(),
                        recursive: a.recursive,
                        decrypt: a.with_decryption,
                        after: after.clone(),
                        limit: a.limit,
                    })
                    .await?;
                all.extend(page.parameters);
                match page.next {
                    Some(next) if a.limit.is_none() => after = Some(next),
                    Some(next) => {
                        eprintln!("more: --after {next}");
                        break;
                    }
                    None => break,
                }
            }
            output::listing(global.output, &all, || {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|p| {
                        let mut row = vec![
                            p.name.clone(),
                            p.kind.clone(),
                            p.version.to_string(),
                            dash(p.labels.join(",")),
                            output::age(Some(p.modified_at_ms)),
                        ];
                        if a.with_decryption {
                            row.push(p.value.clone().unwrap_or_else(|| "-".into()));
                        }
                        row
                    })
                    .collect();
                let mut headers = vec!["NAME", "TYPE", "VERSION", "LABELS", "MODIFIED"];
                if a.with_decryption {
                    headers.push("VALUE");
                }
                table(&headers, &rows);
            });
        }
        ParamCommand::History(a) => {
            let versions = api.param_history(&a.name).await?;
            output::listing(global.output, &versions, || {
                let rows: Vec<Vec<String>> = versions
                    .iter()
                    .map(|p| {
                        vec![
                            p.version.to_string(),
                            p.kind.clone(),
                            dash(p.labels.join(",")),
                            utc_time(p.modified_at_ms),
                            p.modified_by.clone(),
                            p.key.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                table(
                    &["VERSION", "TYPE", "LABELS", "CREATED", "BY", "KEY"],
                    &rows,
                );
            });
        }
        ParamCommand::Label(a) => {
            let (name, version) = match a.name.rsplit_once(':') {
                Some((name, v)) => (
                    name.to_string(),
                    Some(v.parse::<u64>().with_context(|| {
                        format!("`{}`: the version after `:` must be a number", a.name)
                    })?),
                ),
                None => (a.name.clone(), None),
            };
            let (add, remove) = if a.remove {
                (Vec::new(), a.labels)
            } else {
                (a.labels, Vec::new())
            };
            let view = api
                .label_param(&LabelRequest {
                    name,
                    version,
                    add,
                    remove,
                })
                .await?;
            match global.output {
                Output::Json => output::json(&view),
                Output::Table => println!(
                    "{} version {}: labels {}",
                    view.name,
                    view.version,
                    dash(view.labels.join(", "))
                ),
            }
        }
        ParamCommand::Rm(a) => {
            api.delete_param(&a.name).await?;
            println!("deleted {}", a.name);
        }
    }
    Ok(0)
}

fn dash(text: String) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text
    }
}

fn read_value(a: &PutArgs, secure: bool) -> anyhow::Result<String> {
    let from_stdin = |what: &str| -> anyhow::Result<String> {
        let mut bytes = Vec::new();
        std::io::stdin()
            .take(MAX_INPUT_BYTES)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read {what}"))?;
        String::from_utf8(bytes).with_context(|| format!("{what} is not UTF-8"))
    };
    let value = match (&a.value, &a.from_file) {
        (Some(v), _) if v != "-" => {
            if secure {
                bail!(
                    "a SecureString's value does not go on the command line (shell history and process listings keep it): pipe it in (`... | dozen param put {} --secure`) or use --from-file",
                    a.name
                );
            }
            v.clone()
        }
        (_, Some(path)) => {
            let mut bytes = Vec::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_INPUT_BYTES).read_to_end(&mut bytes))
                .with_context(|| format!("cannot read {}", path.display()))?;
            String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))?
        }
        _ => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("value (end with Ctrl-D):");
            }
            from_stdin("the value from stdin")?
        }
    };
    // One trailing newline is the shell's, not the value's (`echo s3cret | ...`).
    Ok(value
        .strip_suffix('\n')
        .map(|v| v.strip_suffix('\r').unwrap_or(v))
        .unwrap_or(&value)
        .to_string())
}

fn parse_tags(tags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    tags.iter()
        .map(|t| {
            t.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("tag `{t}` is not key=value"))
        })
        .collect()
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// The key-encryption keys and their versions (never their secrets).
    Ls,
    /// A new version of a key-encryption key (`default` unless named); new SecureString
    /// versions are sealed under it. `--import-file` brings your own 32-byte key (hex or
    /// base64) instead of generating one.
    Rotate {
        #[arg(default_value = "default")]
        name: String,
        #[arg(long)]
        import_file: Option<PathBuf>,
    },
    /// Seal every old data key again under the newest version of its key; values are not
    /// touched, and every old version stays readable.
    Rewrap,
}

pub async fn keys(global: &Global, command: KeysCommand) -> anyhow::Result<i32> {
    let api = client(global)?;
    match command {
        KeysCommand::Ls => {
            let keys = api.keys().await?;
            output::listing(global.output, &keys, || {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.name.clone(),
                            k.version.to_string(),
                            utc_time(k.created_at_ms),
                            if k.current { "yes" } else { "" }.into(),
                        ]
                    })
                    .collect();
                table(&["NAME", "VERSION", "CREATED", "CURRENT"], &rows);
            });
        }
        KeysCommand::Rotate { name, import_file } => {
            let import = match import_file {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                ),
                None => None,
            };
            let key = api.rotate_key(&RotateKeyRequest { name, import }).await?;
            match global.output {
                Output::Json => output::json(&key),
                Output::Table => println!(
                    "key {} version {}: new SecureString versions are sealed under it; `dozen keys rewrap` moves old ones",
                    key.name, key.version
                ),
            }
        }
        KeysCommand::Rewrap => {
            let done = api.rewrap_keys().await?;
            match global.output {
                Output::Json => output::json(&done),
                Output::Table => println!(
                    "rewrapped {} version(s) under the newest key versions",
                    done.rewrapped
                ),
            }
        }
    }
    Ok(0)
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// A new operator token: `dozen token create ci --policy read:/shop/prod/* --ttl 30d`.
    /// The token is printed once; only its hash is kept.
    Create {
        name: String,
        /// admin, read-only, read:/path/* or write:/path/* (repeat for more).
        #[arg(long, required = true)]
        policy: Vec<String>,
        /// It stops working after this long.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// The tokens and their policies (never their secrets).
    Ls,
    /// Revoke a token: it stops working at once.
    Revoke { name: String },
}

pub async fn token(global: &Global, command: TokenCommand) -> anyhow::Result<i32> {
    let api = client(global)?;
    match command {
        TokenCommand::Create { name, policy, ttl } => {
            let created = api
                .create_token(&CreateTokenRequest {
                    name,
                    policy,
                    expires_at_ms: ttl.map(|d| dozen_agent::shim::wall_ms() + d.as_millis() as u64),
                })
                .await?;
            match global.output {
                Output::Json => output::json(&created),
                Output::Table => {
                    eprintln!(
                        "token {} ({}): shown this once, keep it safe",
                        created.view.name,
                        created.view.policy.join(", ")
                    );
                    println!("{}", created.token);
                }
            }
        }
        TokenCommand::Ls => {
            let tokens = api.tokens().await?;
            output::listing(global.output, &tokens, || {
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.policy.join(","),
                            utc_time(t.created_at_ms),
                            t.expires_at_ms.map(utc_time).unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                table(&["NAME", "POLICY", "CREATED", "EXPIRES"], &rows);
            });
        }
        TokenCommand::Revoke { name } => {
            api.revoke_token(&name).await?;
            println!("revoked token {name}");
        }
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: Option<AuditCommand>,
    /// Only records of this caller (`root token`, `token ci`).
    #[arg(long)]
    who: Option<String>,
    /// Only this action (`param.read`, `param.write`, `key.rotate`, ...).
    #[arg(long)]
    action: Option<String>,
    /// Only targets starting with this (`/shop/`).
    #[arg(long)]
    target: Option<String>,
    /// Only `asked` (a change before it was made), `ok`, `denied` or `failed`.
    #[arg(long)]
    outcome: Option<String>,
    /// Only records this recent (`1h`).
    #[arg(long, value_parser = parse_duration)]
    since: Option<Duration>,
    /// The newest this many.
    #[arg(short = 'n', long, default_value_t = 100)]
    limit: usize,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Follow the hash chain: exits 1, naming the record, when any was altered or removed.
    Verify,
}

pub async fn audit(global: &Global, args: AuditArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    if let Some(AuditCommand::Verify) = args.command {
        let chains = api.verify_audit().await?;
        let broken = chains.iter().any(|c| c.broken.is_some());
        output::listing(global.output, &chains, || {
            for c in &chains {
                match &c.broken {
                    None => println!(
                        "server {}: {} records ({} to {}), chain intact",
                        c.server, c.records, c.first_seq, c.last_seq
                    ),
                    Some(why) => println!("server {}: {why}", c.server),
                }
            }
        });
        return Ok(if broken { 1 } else { 0 });
    }
    let records = api
        .audit(&AuditQuery {
            since_ms: args
                .since
                .map(|d| dozen_agent::shim::wall_ms().saturating_sub(d.as_millis() as u64)),
            who: args.who,
            action: args.action,
            target: args.target,
            outcome: args.outcome,
            limit: Some(args.limit),
        })
        .await?;
    output::listing(global.output, &records, || {
        let rows: Vec<Vec<String>> = records
            .iter()
            .map(|r| {
                vec![
                    utc_time(r.at_ms),
                    r.who.clone(),
                    r.from.clone(),
                    r.action.clone(),
                    r.target.clone(),
                    r.outcome.clone(),
                    r.detail.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &[
                "TIME", "WHO", "FROM", "ACTION", "TARGET", "OUTCOME", "DETAIL",
            ],
            &rows,
        );
    });
    Ok(0)
}
