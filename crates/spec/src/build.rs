//! `build = { context = "...", dockerfile = "..." }`: the service's image is built from a
//! directory (relative to the stack file) through the Docker Engine, pushed to dozen's registry
//! under the service's `image` name, and the release pins what was pushed.

use crate::node::{Entry, Val};
use crate::types::{Build, Service};
use crate::validate::Validator;

const EXAMPLE: &str = "build = { context = \"./web\", dockerfile = \"Dockerfile\" }";

/// The `build` entry of a service.
pub(crate) fn check(v: &mut Validator, e: &Entry, svc: &mut Service) {
    let Val::Table(entries) = &e.node.val else {
        let found = e.node.val.type_name();
        v.err(
            e.node.loc,
            format!("`build` must be a table, found {found}"),
            format!("for example {EXAMPLE}"),
        );
        return;
    };
    let mut build = Build {
        context: String::new(),
        dockerfile: "Dockerfile".into(),
    };
    for field in entries {
        let text = match &field.node.val {
            Val::Str(text) if !text.trim().is_empty() => text.clone(),
            other => {
                v.err(
                    field.node.loc,
                    format!(
                        "`build.{}` must be a non-empty path, found {}",
                        field.key,
                        other.type_name()
                    ),
                    format!("for example {EXAMPLE}"),
                );
                continue;
            }
        };
        match field.key.as_str() {
            "context" => build.context = text,
            "dockerfile" if text.starts_with('/') || text.split('/').any(|p| p == "..") => v.err(
                field.node.loc,
                format!("`build.dockerfile` `{text}` leaves the build context"),
                "give a path inside the context, e.g. `dockerfile = \"docker/Dockerfile\"`",
            ),
            "dockerfile" => build.dockerfile = text,
            _ => v.diags.push(crate::validate::unknown_key(
                field,
                &["context", "dockerfile"],
                "in `build`",
            )),
        }
    }
    if build.context.is_empty() {
        v.err(
            e.node.loc,
            "`build` has no `context` (the directory sent to the engine)",
            format!("for example {EXAMPLE}"),
        );
        return;
    }
    svc.build = Some(build);
}

/// A built image goes to dozen's registry under the service's `image`: that name must be
/// given, without a registry host or a digest.
pub(crate) fn check_target(v: &mut Validator, service: &str, e: &Entry, svc: &Service) {
    let Some(image) = &svc.image else {
        v.err(
            e.key_loc,
            format!("service `{service}` has `build` but no `image` to push the result as"),
            format!("add e.g. `image = \"shop/{service}\"` (a name in dozen's registry; the tag defaults to latest)"),
        );
        return;
    };
    let first = image.split('/').next().unwrap_or("");
    let has_host = image.contains('/') && (first.contains(['.', ':']) || first == "localhost");
    if has_host || image.contains('@') {
        v.err(
            e.key_loc,
            format!("service `{service}` builds its image, but `image = \"{image}\"` names another registry or a digest"),
            "a built image is pushed to dozen's own registry: name it without a host or digest, e.g. `image = \"shop/web\"`",
        );
    }
}
