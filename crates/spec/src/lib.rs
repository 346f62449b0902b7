//! Stack files for dozen: the validated model, parsing (TOML and YAML) with positioned
//! errors, environment overlays, the JSON Schema of the file format, and plan/diff.
//!
//! Pure: no async, no network, no clock. The only IO is reading stack files in [`load`].
//!
//! # How parsing works
//! Each file is parsed on its own into a format-neutral tree that keeps positions (exact
//! for TOML; best-effort text search for YAML, whose parser does not expose value
//! positions). Environment overlays are deep-merged on that tree (tables merge recursively,
//! any other value replaces), so every node remembers the file it came from, and the merged
//! tree is validated into [`Stack`], collecting all errors. The serde/schemars types in
//! [`file`] describe the same format and generate [`json_schema`].
#![forbid(unsafe_code)]

mod build;
mod compose;
mod error;
pub mod file;
mod load;
mod node;
mod placement;
mod plan;
mod routing;
mod types;
mod units;
mod validate;
pub use validate::check_secrets;
mod volumes;

use std::path::Path;

pub use error::{SpecError, SpecErrors};
pub use plan::{
    diff_services, plan, FieldChange, LiveService, Plan, PlanAction, ReplicaPlan, ServicePlan,
};
pub use types::*;
pub use units::is_env_var_name;

use load::{Sibling, Source};

/// Reads `path` (TOML by default; `.yaml`/`.yml` as YAML), applies the environment overlay
/// `env` if given (an `[env.<name>]` table in the same file overlays the top-level document,
/// then a sibling file `<stem>.<name>.<ext>`, e.g. `dozen.prod.toml` next to `dozen.toml`,
/// is overlaid after the table), validates, and returns the stack.
///
/// An unknown environment (no table and no file) is an error naming the environments that
/// exist. Without `env`, the in-file overlays are still checked (errors located in them are
/// reported).
pub fn load(path: &Path, env: Option<&str>) -> Result<Stack, SpecErrors> {
    let file_name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| {
        SpecErrors(vec![SpecError {
            file: file_name.clone(),
            line: 1,
            column: 1,
            message: format!("cannot read stack file: {e}"),
            hint: Some("check the path (the default stack file is dozen.toml)".into()),
        }])
    })?;
    let format = Format::from_path(path);
    let text = load::decode(&bytes, &file_name)?;
    let main = Source {
        name: file_name,
        text,
        format,
    };
    let mut sibling = Sibling::None;
    let mut sibling_envs = Vec::new();
    let mut sibling_hint = None;
    if let Some(env) = env {
        // Only look for a sibling when the name is safe to put in a path.
        if units::check_name(env, "environment").is_ok() {
            if let Some(sp) = load::sibling_path(path, env) {
                sibling_hint = Some(sp.display().to_string());
                match std::fs::read(&sp) {
                    Ok(b) => {
                        let name = sp.display().to_string();
                        sibling = match load::decode(&b, &name) {
                            Ok(text) => Sibling::Found(Source {
                                name,
                                text,
                                format: Format::from_path(&sp),
                            }),
                            Err(e) => Sibling::Unreadable(e),
                        };
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        sibling_envs = load::sibling_envs(path);
                    }
                    Err(e) => {
                        sibling = Sibling::Unreadable(SpecError {
                            file: sp.display().to_string(),
                            line: 1,
                            column: 1,
                            message: format!("cannot read environment file: {e}"),
                            hint: Some("check the file's permissions".into()),
                        });
                    }
                }
            }
        }
    }
    load::run(main, env, sibling, &sibling_envs, sibling_hint)
}

/// Parses a stack from text. `file_name` is used in error messages. Only in-file
/// `[env.<name>]` overlays are available (no sibling files are read).
pub fn parse_str(
    source: &str,
    file_name: &str,
    format: Format,
    env: Option<&str>,
) -> Result<Stack, SpecErrors> {
    let text = source
        .strip_prefix('\u{feff}')
        .unwrap_or(source)
        .to_string();
    let main = Source {
        name: file_name.to_string(),
        text,
        format,
    };
    load::run(main, env, Sibling::None, &[], None)
}

/// Parses a stack from bytes; non-UTF-8 input is an error at the line and column of the
/// first bad byte.
pub fn parse_bytes(
    bytes: &[u8],
    file_name: &str,
    format: Format,
    env: Option<&str>,
) -> Result<Stack, SpecErrors> {
    let text = load::decode(bytes, file_name)?;
    parse_str(&text, file_name, format, env)
}

/// JSON Schema of the FILE format (what users write), e.g. for editor completion.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(file::StackFile);
    serde_json::to_value(schema).unwrap_or_default()
}
