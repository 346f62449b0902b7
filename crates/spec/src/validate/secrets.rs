//! What a service reads from the parameter store: `secrets` (each an environment name bound
//! to a parameter, pinned to a version when the release is made), how they are delivered
//! (`secrets_as`), whether a new version redeploys (`on_change`), and what else its tasks'
//! identity may read or write at run time (`access`).

use dozen_params::names::Reference;
use dozen_params::policy::Permission;

use crate::node::{Entry, Val};
use crate::types::*;
use crate::units::*;

use super::{entries, Validator};

/// Most secrets one service takes.
pub const MAX_SECRETS: usize = 64;

impl Validator {
    /// `secrets = { DB_PASSWORD = "/shop/prod/db/password@prod" }`.
    pub(super) fn secrets(&mut self, e: &Entry, svc: &mut Service) {
        if !self.is_table(e, "secrets = { DB_PASSWORD = \"/shop/prod/db/password\" }") {
            return;
        }
        for s in entries(&e.node) {
            if !is_env_var_name(&s.key) {
                self.err(
                    s.key_loc,
                    format!("invalid secret name `{}`", s.key),
                    "a secret is named as the environment variable or file it becomes: letters, digits and '_', not starting with a digit (e.g. DB_PASSWORD)",
                );
                continue;
            }
            let Val::Str(text) = &s.node.val else {
                let found = s.node.val.type_name();
                self.err(
                    s.node.loc,
                    format!("secret `{}` must name a parameter, found {found}", s.key),
                    "write e.g. \"/shop/prod/db/password\", \"/shop/prod/db/password@prod\" or \"/shop/prod/db/password:3\"",
                );
                continue;
            };
            match Reference::parse(text) {
                Ok(_) => {
                    svc.secrets.insert(s.key.clone(), text.clone());
                }
                Err(error) => self.err(
                    s.node.loc,
                    format!("secret `{}`: {error}", s.key),
                    "name a parameter, optionally with @label or :version",
                ),
            }
        }
        if svc.secrets.len() > MAX_SECRETS {
            self.err(
                e.node.loc,
                format!(
                    "{} secrets; a service takes at most {MAX_SECRETS}",
                    svc.secrets.len()
                ),
                "group values into fewer parameters",
            );
        }
    }

    /// `secrets_as = "file"` (default) or `"env"`.
    pub(super) fn secrets_as(&mut self, e: &Entry, svc: &mut Service) {
        match self.str_of(e, "\"file\"") {
            Some("file") => svc.secrets_as = SecretsAs::File,
            Some("env") => svc.secrets_as = SecretsAs::Env,
            Some(other) => self.err(
                e.node.loc,
                format!("`secrets_as` is \"file\" or \"env\", found \"{other}\""),
                "\"file\" (default): files in $DOZEN_SECRETS_DIR, on a memory file system; \"env\": environment variables",
            ),
            None => {}
        }
    }

    /// `on_change = "redeploy"`: a new version of a parameter it reads starts a new release.
    pub(super) fn on_change(&mut self, e: &Entry, svc: &mut Service) {
        match self.str_of(e, "\"redeploy\"") {
            Some("keep") => svc.on_change = OnChange::Keep,
            Some("redeploy") => svc.on_change = OnChange::Redeploy,
            Some(other) => self.err(
                e.node.loc,
                format!("`on_change` is \"keep\" or \"redeploy\", found \"{other}\""),
                "\"keep\" (default): tasks keep the versions their release pinned; \"redeploy\": a new version of a secret starts a new release",
            ),
            None => {}
        }
    }

    /// `access = ["read:/shop/prod/orders/*"]`: what the tasks' identity may do besides
    /// reading their own secrets.
    pub(super) fn access(&mut self, e: &Entry, svc: &mut Service) {
        let Val::Array(items) = &e.node.val else {
            let found = e.node.val.type_name();
            self.err(
                e.node.loc,
                format!("`access` must be a list of permissions, found {found}"),
                "write e.g. access = [\"read:/shop/prod/orders/*\"]",
            );
            return;
        };
        for item in items {
            let Val::Str(text) = &item.val else {
                self.err(
                    item.loc,
                    "`access` entries are permissions such as \"read:/shop/prod/*\"",
                    "quote each one",
                );
                continue;
            };
            match Permission::parse(text) {
                Ok(Permission::Param { .. }) => svc.access.push(text.clone()),
                Ok(_) => self.err(
                    item.loc,
                    format!("`access` gives a service parameters only; `{text}` is an operator's permission"),
                    "use read:/path/* or write:/path/*",
                ),
                Err(error) => self.err(item.loc, error.to_string(), "use read:/path/* or write:/path/*"),
            }
        }
    }

    /// A secret and an `env` variable of the same name: one would hide the other.
    pub(super) fn secrets_against_env(&mut self, e: &Entry, svc: &Service) {
        for name in svc.secrets.keys() {
            if svc.env.contains_key(name) {
                self.err(
                    e.node.loc,
                    format!("`{name}` is both in `env` and in `secrets`"),
                    "keep one: a secret's value never goes in `env`",
                );
            }
        }
    }
}

/// The same rules for a service that arrived over the wire (the API is also for scripts):
/// secret names are plain names, references parse, at most [`MAX_SECRETS`], none shadows an
/// `env` variable, and `access` holds parameter permissions only.
pub fn check_secrets(svc: &Service) -> Result<(), String> {
    if svc.secrets.len() > MAX_SECRETS {
        return Err(format!(
            "{} secrets; a service takes at most {MAX_SECRETS}",
            svc.secrets.len()
        ));
    }
    for (key, reference) in &svc.secrets {
        if !is_env_var_name(key) {
            return Err(format!("invalid secret name `{key}`"));
        }
        Reference::parse(reference).map_err(|e| format!("secret `{key}`: {e}"))?;
        if svc.env.contains_key(key) {
            return Err(format!("`{key}` is both in `env` and in `secrets`"));
        }
    }
    for text in &svc.access {
        match Permission::parse(text) {
            Ok(Permission::Param { .. }) => {}
            Ok(_) => return Err(format!("`access` gives parameters only, not `{text}`")),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}
