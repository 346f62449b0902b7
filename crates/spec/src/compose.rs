//! A docker compose file given where a stack file is expected: said as such, once, instead of
//! a did-you-mean per compose key (`ports` is not a typo of `port`).

use crate::node::{Entry, Node, Val};
use crate::validate::Diag;

/// Keys only a compose file has: at the top level, and in a service (a service's `volumes`
/// and `build` are dozen's too).
const COMPOSE_TOP: &[&str] = &["version", "volumes", "networks", "configs", "secrets"];
const COMPOSE_SERVICE: &[&str] = &[
    "ports",
    "environment",
    "depends_on",
    "container_name",
    "restart",
    "networks",
    "expose",
    "entrypoint",
    "healthcheck",
    "deploy",
    "env_file",
    "working_dir",
    "labels",
];

fn table(node: &Node) -> &[Entry] {
    match &node.val {
        Val::Table(entries) => entries,
        _ => &[],
    }
}

/// The error for a file that looks like a compose file, pointing at its first compose key.
pub(crate) fn looks_like_compose(root: &Node) -> Option<Diag> {
    let top = table(root)
        .iter()
        .find(|e| COMPOSE_TOP.contains(&e.key.as_str()) || e.key.starts_with("x-"));
    let in_service = || {
        let services = table(root).iter().find(|e| e.key == "services")?;
        table(&services.node)
            .iter()
            .flat_map(|s| table(&s.node))
            .find(|e| COMPOSE_SERVICE.contains(&e.key.as_str()))
    };
    let found = top.or_else(in_service)?;
    Some(Diag::new(
        found.key_loc,
        format!(
            "this looks like a docker compose file (`{}` is a compose key); dozen reads its own \
             stack format",
            found.key
        ),
        "give the stack a `name`, and each service `command` (or `image`), `env` for \
         `environment`, `port = true` for `ports` (dozen assigns $PORT) and `routes` for HTTP; \
         `dozen schema` prints the whole format",
    ))
}
