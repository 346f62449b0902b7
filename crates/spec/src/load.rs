//! Loading: decoding, parsing, environment overlays, validation, error conversion.

use std::path::{Path, PathBuf};

use crate::error::{SpecError, SpecErrors};
use crate::node::{self, Entry, Loc, Node, Val};
use crate::types::{Format, Stack};
use crate::units::check_name;
use crate::validate::{unknown_key, Diag, Syntax, Validator, OVERLAY_KEYS};

/// One decoded input file.
pub(crate) struct Source {
    pub name: String,
    pub text: String,
    pub format: Format,
}

/// Decodes bytes as UTF-8 (dropping a BOM); the error points at the first bad byte.
pub(crate) fn decode(bytes: &[u8], file: &str) -> Result<String, SpecError> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.strip_prefix('\u{feff}').unwrap_or(s).to_string()),
        Err(e) => {
            let (line, column) = node::utf8_error_position(bytes, e.valid_up_to());
            let bad = bytes.get(e.valid_up_to()).copied().unwrap_or(0);
            Err(SpecError {
                file: file.to_string(),
                line,
                column,
                message: format!("file is not valid UTF-8 text (byte 0x{bad:02x})"),
                hint: Some(
                    "stack files must be UTF-8 encoded TOML or YAML text; is this a binary file?"
                        .into(),
                ),
            })
        }
    }
}

fn parse_doc(src: &Source, file: usize) -> Result<Node, Diag> {
    let res = match src.format {
        Format::Toml => node::parse_toml(&src.text, file),
        Format::Yaml => node::parse_yaml(&src.text, file),
    };
    res.map_err(|e| {
        let (what, hint) = match src.format {
            Format::Toml => (
                "TOML",
                "fix the TOML syntax at this position (strings need quotes, tables look like [services.web])",
            ),
            Format::Yaml => (
                "YAML",
                "fix the YAML syntax at this position (check indentation and `key: value` pairs)",
            ),
        };
        Diag::new(
            Loc {
                file,
                line: e.line,
                col: e.col,
                overlay: false,
            },
            format!("{what} syntax error: {}", e.message),
            hint,
        )
    })
}

/// A sibling overlay file, or the reason it could not be read.
pub(crate) enum Sibling {
    None,
    Found(Source),
    Unreadable(SpecError),
}

/// Parses, overlays and validates. `sibling` is the `<stem>.<env>.<ext>` file (if any);
/// `sibling_envs` lists the environments that have sibling files (for error messages).
pub(crate) fn run(
    main: Source,
    env: Option<&str>,
    sibling: Sibling,
    sibling_envs: &[String],
    sibling_hint: Option<String>,
) -> Result<Stack, SpecErrors> {
    let mut files = vec![main.name.clone()];
    let mut diags: Vec<Diag> = Vec::new();
    let mut extra: Vec<SpecError> = Vec::new();
    let syn = Syntax {
        yaml: main.format == Format::Yaml,
    };

    let mut root = match parse_doc(&main, 0) {
        Ok(n) => Some(n),
        Err(d) => {
            diags.push(d);
            None
        }
    };
    let sibling_node = match sibling {
        Sibling::None => None,
        Sibling::Unreadable(e) => {
            extra.push(e);
            None
        }
        Sibling::Found(src) => {
            files.push(src.name.clone());
            match parse_doc(&src, 1) {
                Ok(mut n) => {
                    check_overlay_shape(&n, &mut diags, "in an environment file");
                    strip_key(&mut n, "env");
                    n.mark_overlay();
                    Some(n)
                }
                Err(d) => {
                    diags.push(d);
                    None
                }
            }
        }
    };

    if let Some(root) = root.as_mut() {
        if matches!(root.val, Val::Null) {
            root.val = Val::Table(Vec::new());
        }
        let env_entry = strip_key(root, "env");
        let tables = env_tables(env_entry.as_ref(), &mut diags);

        match env {
            Some(name) => {
                let table = tables
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t.clone());
                if let Err((m, h)) = check_name(name, "environment") {
                    diags.push(Diag::new(Loc::start(0), m, h));
                } else if table.is_none() && sibling_node.is_none() && extra.is_empty() {
                    let mut known: Vec<String> = tables.iter().map(|(n, _)| n.clone()).collect();
                    known.extend(sibling_envs.iter().cloned());
                    known.sort();
                    known.dedup();
                    let defined = if known.is_empty() {
                        "no environments are defined".to_string()
                    } else {
                        format!("defined environments: {}", known.join(", "))
                    };
                    let mut hint = format!("add an [env.{name}] table to this file");
                    if let Some(s) = &sibling_hint {
                        hint.push_str(&format!(" or create {s}"));
                    }
                    diags.push(Diag::new(
                        Loc::start(0),
                        format!("unknown environment `{name}` ({defined})"),
                        hint,
                    ));
                }
                if let Some(mut t) = table {
                    t.mark_overlay();
                    root.merge(t);
                }
                if let Some(s) = sibling_node {
                    root.merge(s);
                }
                if diags.is_empty() {
                    let mut v = Validator::new(syn);
                    if let Some(stack) = v.stack(root, 0) {
                        if extra.is_empty() {
                            return Ok(stack);
                        }
                    }
                    diags.extend(v.diags);
                }
            }
            None => {
                let mut v = Validator::new(syn);
                let stack = v.stack(root, 0);
                diags.extend(v.diags);
                // Also check every in-file overlay, reporting only problems located in it.
                for (_, t) in &tables {
                    let mut merged = root.clone();
                    let mut t = t.clone();
                    t.mark_overlay();
                    merged.merge(t);
                    let mut v = Validator::new(syn);
                    v.stack(&merged, 0);
                    diags.extend(v.diags.into_iter().filter(|d| d.loc.overlay));
                }
                if let Some(stack) = stack {
                    if diags.is_empty() && extra.is_empty() {
                        return Ok(stack);
                    }
                }
            }
        }
    }
    Err(finish(diags, extra, &files))
}

fn finish(mut diags: Vec<Diag>, extra: Vec<SpecError>, files: &[String]) -> SpecErrors {
    diags.sort_by_key(|d| (d.loc.file, d.loc.line, d.loc.col));
    diags.dedup_by(|a, b| a.loc == b.loc && a.message == b.message);
    let mut out: Vec<SpecError> = diags
        .into_iter()
        .map(|d| SpecError {
            file: files.get(d.loc.file).cloned().unwrap_or_default(),
            line: d.loc.line,
            column: d.loc.col,
            message: d.message,
            hint: d.hint,
        })
        .collect();
    out.extend(extra);
    if out.is_empty() {
        // Unreachable in practice; never report failure without a reason.
        out.push(SpecError {
            file: files.first().cloned().unwrap_or_default(),
            line: 1,
            column: 1,
            message: "invalid stack file".into(),
            hint: None,
        });
    }
    SpecErrors(out)
}

/// Removes `key` from a table node, returning its entry.
fn strip_key(node: &mut Node, key: &str) -> Option<Entry> {
    match &mut node.val {
        Val::Table(entries) => {
            let i = entries.iter().position(|e| e.key == key)?;
            Some(entries.remove(i))
        }
        _ => None,
    }
}

/// Checks the top level of an overlay document (env table content or sibling file).
fn check_overlay_shape(n: &Node, diags: &mut Vec<Diag>, context: &str) {
    match &n.val {
        Val::Table(entries) => {
            for e in entries {
                if e.key == "env" {
                    diags.push(Diag::new(
                        e.key_loc,
                        format!("environment overlays cannot be nested (`env` {context})"),
                        "move these settings into the main stack file's [env.<name>] tables or their own <stem>.<name>.<ext> files",
                    ));
                } else if !OVERLAY_KEYS.contains(&e.key.as_str()) {
                    diags.push(unknown_key(e, OVERLAY_KEYS, context));
                }
            }
        }
        Val::Null => {}
        other => diags.push(Diag::new(
            n.loc,
            format!(
                "an environment overlay must be a table, found {}",
                other.type_name()
            ),
            "write e.g. [env.prod.services.web] with `replicas = 6`",
        )),
    }
}

/// The in-file `[env.<name>]` overlays, in file order.
fn env_tables(env: Option<&Entry>, diags: &mut Vec<Diag>) -> Vec<(String, Node)> {
    let Some(env) = env else {
        return Vec::new();
    };
    let entries = match &env.node.val {
        Val::Table(e) => e,
        Val::Null => return Vec::new(),
        other => {
            diags.push(Diag::new(
                env.node.loc,
                format!("`env` must be a table of environments, found {}", other.type_name()),
                "write e.g. [env.prod.services.web] with `replicas = 6` (service variables go in [services.<name>.env])",
            ));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for e in entries {
        if let Err((m, h)) = check_name(&e.key, "environment") {
            diags.push(Diag::new(e.key_loc, m, h));
            continue;
        }
        let before = diags.len();
        check_overlay_shape(&e.node, diags, &format!("in environment `{}`", e.key));
        if diags.len() == before {
            let node = if matches!(e.node.val, Val::Null) {
                Node::empty_table(e.node.loc)
            } else {
                e.node.clone()
            };
            out.push((e.key.clone(), node));
        }
    }
    out
}

/// `<stem>.<env>.<ext>` next to `path`.
pub(crate) fn sibling_path(path: &Path, env: &str) -> Option<PathBuf> {
    let stem = path.file_stem()?.to_str()?;
    let name = match path.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{stem}.{env}.{ext}"),
        None => format!("{stem}.{env}"),
    };
    Some(path.with_file_name(name))
}

/// Environments that have a sibling file next to `path` (best effort, for messages).
pub(crate) fn sibling_envs(path: &Path) -> Vec<String> {
    let (Some(stem), Some(dir)) = (path.file_stem().and_then(|s| s.to_str()), path.parent()) else {
        return Vec::new();
    };
    let ext = path.extension().and_then(|e| e.to_str());
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(stem).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        let env = match ext {
            Some(ext) => rest.strip_suffix(ext).and_then(|r| r.strip_suffix('.')),
            None => Some(rest),
        };
        if let Some(env) = env {
            if check_name(env, "environment").is_ok() {
                out.push(env.to_string());
            }
        }
    }
    out.sort();
    out
}
