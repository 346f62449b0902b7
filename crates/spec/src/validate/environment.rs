//! What a service sees in its environment: `env` variables, and `uses` (the services it
//! calls, each given as `<NAME>_URL`).

use crate::node::{Entry, Val};
use crate::types::*;
use crate::units::*;

use super::Validator;

impl Validator {
    /// `uses = ["orders", "catalog"]`: services this one calls (it gets `ORDERS_URL` etc.).
    pub(super) fn uses(&mut self, e: &Entry, service: &str, svc: &mut Service) {
        let Val::Array(items) = &e.node.val else {
            let found = e.node.val.type_name();
            self.err(
                e.node.loc,
                format!("`uses` must be a list of service names, found {found}"),
                format!(
                    "for example {}",
                    self.syn.ex("uses", "[\"orders\", \"catalog\"]")
                ),
            );
            return;
        };
        for item in items {
            let Val::Str(name) = &item.val else {
                let found = item.val.type_name();
                self.err(
                    item.loc,
                    format!("`uses` entries are service names, found {found}"),
                    "write the name of another service of this stack, e.g. \"orders\"",
                );
                continue;
            };
            if let Err((message, hint)) = check_name(name, "service") {
                self.err(item.loc, message, hint);
            } else if name == service {
                self.err(
                    item.loc,
                    format!("service `{service}` lists itself in `uses`"),
                    "name the other services it calls",
                );
            } else if svc.uses.contains(name) {
                self.err(
                    item.loc,
                    format!("`{name}` is listed twice in `uses`"),
                    "keep one",
                );
            } else {
                self.uses_seen.push((name.clone(), item.loc));
                svc.uses.push(name.clone());
            }
        }
    }

    pub(super) fn env_var(&mut self, v: &Entry, svc: &mut Service) {
        if !is_env_var_name(&v.key) {
            self.err(
                v.key_loc,
                format!("invalid environment variable name `{}`", v.key),
                "names use letters, digits and '_' and do not start with a digit (e.g. LOG_LEVEL)",
            );
            return;
        }
        if v.key == "PORT" && svc.port {
            self.err(
                v.key_loc,
                "`PORT` cannot be set in `env`: dozen allocates it because `port = true`",
                "remove PORT from env and read $PORT in the program, or set `port = false` to manage ports yourself",
            );
            return;
        }
        let s = match &v.node.val {
            Val::Str(s) | Val::Datetime(s) => s.clone(),
            Val::Int(i) => i.to_string(),
            Val::Float(f) => format!("{f:?}"),
            Val::Bool(b) => b.to_string(),
            other => {
                let found = other.type_name();
                self.err(
                    v.node.loc,
                    format!(
                        "environment variable `{}` must be a string, found {found}",
                        v.key
                    ),
                    format!("quote the value, e.g. {}", self.syn.ex(&v.key, "\"value\"")),
                );
                return;
            }
        };
        svc.env.insert(v.key.clone(), s);
    }
}
