//! `volumes`: storage a container keeps across its replacements, as `SOURCE:TARGET[:ro]`
//! where SOURCE is a volume name (kept by the node's engine, per stack) or an absolute host
//! path, and TARGET an absolute path in the container.

use crate::node::{Entry, Val};
use crate::types::{Service, Volume};
use crate::validate::Validator;

const EXAMPLE: &str = "volumes = [\"data:/var/lib/data\", \"/srv/uploads:/uploads:ro\"]";

/// Parses one `SOURCE:TARGET[:ro]`; the error and its hint.
pub(crate) fn parse(text: &str) -> Result<Volume, (String, String)> {
    let hint = || format!("write SOURCE:TARGET or SOURCE:TARGET:ro, e.g. {EXAMPLE}");
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, read_only) = match parts.as_slice() {
        [s, t] => (*s, *t, false),
        [s, t, "ro"] => (*s, *t, true),
        [s, t, "rw"] => (*s, *t, false),
        _ => return Err((format!("`{text}` is not a volume"), hint())),
    };
    if !target.starts_with('/') {
        return Err((
            format!("the target `{target}` of volume `{text}` is not an absolute path"),
            hint(),
        ));
    }
    let named = source
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && source
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !source.starts_with('/') && !named {
        return Err((
            format!(
                "the source `{source}` of volume `{text}` is neither a volume name nor an \
                 absolute host path"
            ),
            "a name is letters, digits, `_`, `.` and `-`; a host path starts with `/`".into(),
        ));
    }
    Ok(Volume {
        source: source.to_string(),
        target: target.to_string(),
        read_only,
    })
}

/// The `volumes` entry of a service.
pub(crate) fn check(v: &mut Validator, e: &Entry, svc: &mut Service) {
    let Val::Array(items) = &e.node.val else {
        let found = e.node.val.type_name();
        v.err(
            e.node.loc,
            format!("`volumes` must be a list of strings, found {found}"),
            format!("for example {EXAMPLE}"),
        );
        return;
    };
    for item in items {
        let parsed = match &item.val {
            Val::Str(text) => parse(text),
            other => Err((
                format!("`volumes` entries are strings, found {}", other.type_name()),
                format!("for example {EXAMPLE}"),
            )),
        };
        match parsed {
            Ok(volume) => svc.volumes.push(volume),
            Err((message, hint)) => v.err(item.loc, message, hint),
        }
    }
}
