//! `dozen build` and the build step of `apply`: a service's `build` context is sent to the
//! Docker Engine of this machine (`DOCKER_HOST`, else `/var/run/docker.sock`) as a tar, the
//! build's output streams to the terminal, and the image is pushed to dozen's registry (the
//! server the CLI talks to) under the service's `image`, with the operator token. A failed
//! build says which step failed, and nothing is applied.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use dozen_agent::driver::docker::{Engine, EngineError};
use hyper::Method;

use crate::commands::{client, load_stack, FileArgs};
use crate::{output, Global, Output};

#[derive(Args, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// Only these services (default: every service with `build`).
    pub services: Vec<String>,
}

/// What one build pushed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    pub service: String,
    /// `repository:tag` in dozen's registry.
    pub image: String,
    pub digest: String,
}

/// `dozen build [SERVICE...]`: builds and pushes; `apply` deploys what was pushed.
pub async fn build(global: &Global, args: BuildArgs) -> anyhow::Result<i32> {
    let stack = load_stack(&args.file)?;
    for name in &args.services {
        match stack.services.get(name) {
            None => bail!("no service `{name}` in {}", args.file.file.display()),
            Some(s) if s.build.is_none() => {
                bail!("service `{name}` has no `build`; add e.g. build = {{ context = \".\" }}")
            }
            Some(_) => {}
        }
    }
    let api = client(global)?;
    let token = crate::commands::token(global)?;
    let quiet = global.output == Output::Json;
    let pushed = build_and_push(&api, &token, quiet, &args.file, &stack, &args.services).await?;
    if pushed.is_empty() {
        eprintln!("no service in {} has `build`", args.file.file.display());
    }
    output::listing(global.output, &pushed, || {
        for p in &pushed {
            println!("{}: pushed {} ({})", p.service, p.image, p.digest);
        }
        if !pushed.is_empty() {
            println!("`dozen apply` runs what was pushed");
        }
    });
    Ok(0)
}

/// Builds and pushes the services of `stack` with `build` (those in `only`, if any); returns
/// what was pushed, in service order.
/// `api` is the server whose registry takes the images, with the operator `token`; `quiet`
/// keeps progress off the terminal.
pub async fn build_and_push(
    api: &dozen_api::Client,
    token: &str,
    quiet: bool,
    file: &FileArgs,
    stack: &dozen_spec::Stack,
    only: &[String],
) -> anyhow::Result<Vec<Pushed>> {
    let registry = registry_host(api.base())?;
    let base = file
        .file
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let engine = Engine::from_env();
    let mut pushed = Vec::new();
    for (name, service) in &stack.services {
        let (Some(build), Some(image)) = (&service.build, &service.image) else {
            continue;
        };
        if !only.is_empty() && !only.contains(name) {
            continue;
        }
        let context = base.join(&build.context);
        let ignored = ignore_patterns(&context);
        let skip = |rel: &std::path::Path| {
            let rel = rel.to_string_lossy();
            ignored.iter().any(|p| ignores(p, &rel))
        };
        let tar = dozen_agent::bundle::pack_dir_with(&context, &skip, MAX_CONTEXT_BYTES)
            .with_context(|| {
                format!(
                    "service `{name}`: cannot send its build context {} (at most {} MiB; a \
                     .dockerignore there leaves out what the image does not need)",
                    context.display(),
                    MAX_CONTEXT_BYTES >> 20
                )
            })?;
        let (repository, tag) = split_tag(image);
        let target = format!("{registry}/{repository}:{tag}");
        say(
            quiet,
            &format!(
                "building {name} from {} ({} KiB)",
                context.display(),
                tar.len() / 1024
            ),
        );
        run_build(&engine, name, &target, &build.dockerfile, tar, quiet).await?;
        say(quiet, &format!("pushing {repository}:{tag} to {registry}"));
        let digest = push(&engine, name, &registry, &target, &tag, token).await?;
        pushed.push(Pushed {
            service: name.clone(),
            image: format!("{repository}:{tag}"),
            digest,
        });
    }
    Ok(pushed)
}

/// Largest build context sent (it is held in memory on its way).
const MAX_CONTEXT_BYTES: u64 = 512 << 20;

/// The patterns of `<context>/.dockerignore`: one per line, `#` comments, a leading `/`
/// dropped. `!` exceptions are not read (said on stderr).
fn ignore_patterns(context: &std::path::Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(context.join(".dockerignore")) else {
        return Vec::new();
    };
    let mut patterns = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('!') {
            eprintln!(
                "note: .dockerignore exceptions (`{line}`) are not read; that path stays left out"
            );
            continue;
        }
        patterns.push(
            line.trim_start_matches('/')
                .trim_end_matches('/')
                .to_string(),
        );
    }
    patterns
}

/// Whether `pattern` (`*` and `?` within a path part, `**` across parts) names `path` or one
/// of the directories it is in.
fn ignores(pattern: &str, path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    (1..=parts.len()).any(|n| glob(pattern.as_bytes(), parts[..n].join("/").as_bytes()))
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern {
        [] => text.is_empty(),
        [b'*', b'*', rest @ ..] => {
            let rest = rest.strip_prefix(b"/").unwrap_or(rest);
            (0..=text.len()).any(|i| glob(rest, &text[i..]))
        }
        [b'*', rest @ ..] => (0..=text.len())
            .take_while(|&i| i == 0 || text[i - 1] != b'/')
            .any(|i| glob(rest, &text[i..])),
        [b'?', rest @ ..] => text.first().is_some_and(|&c| c != b'/') && glob(rest, &text[1..]),
        [c, rest @ ..] => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

/// Progress goes to stderr (stdout stays the command's answer), unless JSON was asked for.
fn say(quiet: bool, line: &str) {
    if !quiet {
        eprintln!("{line}");
    }
}

/// `host:port` of the server's URL: where the engine pushes.
fn registry_host(base: &str) -> anyhow::Result<String> {
    let rest = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"))
        .with_context(|| format!("cannot tell the registry's address from `{base}`"))?;
    Ok(rest.split('/').next().unwrap_or(rest).to_string())
}

/// `repo:tag` split; the tag defaults to `latest`.
fn split_tag(image: &str) -> (String, String) {
    let last = image.rfind('/').map_or(0, |i| i + 1);
    match image[last..].rfind(':') {
        Some(i) => (
            image[..last + i].to_string(),
            image[last + i + 1..].to_string(),
        ),
        None => (image.to_string(), "latest".to_string()),
    }
}

fn query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn run_build(
    engine: &Engine,
    service: &str,
    target: &str,
    dockerfile: &str,
    context: Vec<u8>,
    quiet: bool,
) -> anyhow::Result<()> {
    let path = format!(
        "/build?t={}&dockerfile={}&rm=1&forcerm=1",
        query(target),
        query(dockerfile)
    );
    let headers = [("content-type", "application/x-tar".to_string())];
    let body = engine
        .stream_with(Method::POST, &path, &headers, Bytes::from(context))
        .await
        .map_err(|e| engine_failure(service, "build", e))?;
    let mut step = String::new();
    let mut failure = None;
    engine
        .json_lines(body, |line| {
            if let Some(text) = line["stream"].as_str() {
                for l in text.lines() {
                    if l.starts_with("Step ") {
                        step = l.to_string();
                    }
                }
                if !quiet {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(text.as_bytes());
                }
            }
            if let Some(message) = line["error"].as_str() {
                failure = Some(message.trim().to_string());
            }
        })
        .await
        .map_err(|e| engine_failure(service, "build", e))?;
    if let Some(message) = failure {
        if step.is_empty() {
            bail!("building `{service}` failed: {message}; nothing was applied");
        }
        bail!("building `{service}` failed at {step}: {message}; nothing was applied");
    }
    Ok(())
}

async fn push(
    engine: &Engine,
    service: &str,
    registry: &str,
    target: &str,
    tag: &str,
    token: &str,
) -> anyhow::Result<String> {
    use base64::Engine as _;
    let name = target.rsplit_once(':').map_or(target, |(name, _)| name);
    let auth =
        serde_json::json!({ "username": "dozen", "password": token, "serveraddress": registry });
    let auth = base64::engine::general_purpose::URL_SAFE.encode(auth.to_string());
    let path = format!("/images/{name}/push?tag={}", query(tag));
    let body = engine
        .stream_with(
            Method::POST,
            &path,
            &[("x-registry-auth", auth)],
            Bytes::new(),
        )
        .await
        .map_err(|e| engine_failure(service, "push", e))?;
    let (mut digest, mut failure) = (None, None);
    engine
        .json_lines(body, |line| {
            if let Some(d) = line["aux"]["Digest"].as_str() {
                digest = Some(d.to_string());
            }
            if let Some(message) = line["error"].as_str() {
                failure = Some(message.trim().to_string());
            }
        })
        .await
        .map_err(|e| engine_failure(service, "push", e))?;
    if let Some(message) = failure {
        bail!(
            "pushing the image of `{service}` to {registry} failed: {message}; nothing was applied"
        );
    }
    digest.with_context(|| format!("the engine pushed `{target}` but named no digest"))
}

fn engine_failure(service: &str, what: &str, e: EngineError) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot {what} the image of `{service}`: {e} (builds go through this machine's Docker Engine: DOCKER_HOST, else /var/run/docker.sock)"
    )
}

/// service -> pushed digest, for the apply request.
pub fn digests(pushed: &[Pushed]) -> BTreeMap<String, String> {
    pushed
        .iter()
        .map(|p| (p.service.clone(), p.digest.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_registry_repository_and_tag() {
        assert_eq!(
            registry_host("http://127.0.0.1:7700").unwrap(),
            "127.0.0.1:7700"
        );
        assert_eq!(
            registry_host("https://ctl.example:7700/").unwrap(),
            "ctl.example:7700"
        );
        assert!(registry_host("ctl:7700").is_err());
        assert_eq!(split_tag("shop/web"), ("shop/web".into(), "latest".into()));
        assert_eq!(split_tag("shop/web:2"), ("shop/web".into(), "2".into()));
        assert_eq!(
            query("127.0.0.1:7700/shop/web:2"),
            "127.0.0.1%3A7700%2Fshop%2Fweb%3A2"
        );
    }

    #[test]
    fn dockerignore_patterns_leave_out_paths_and_what_is_under_them() {
        assert!(ignores("target", "target/debug/app"));
        assert!(ignores(".git", ".git"));
        assert!(ignores("*.log", "build.log"));
        assert!(!ignores("*.log", "logs/build.log"));
        assert!(ignores("**/*.log", "logs/deep/build.log"));
        assert!(ignores("docs/*", "docs/a/b.md"));
        assert!(ignores("a?c", "abc"));
        assert!(!ignores("target", "src/target.rs"));
        assert!(!ignores(".env", ".envrc"));
    }
}
