//! Who may do what: the permissions an operator token or a service's identity carries.
//!
//! - `admin`: everything.
//! - `read-only`: every read of the cluster's state, and parameters' names and metadata; no
//!   parameter value.
//! - `read:<pattern>` and `write:<pattern>`: parameter values whose name matches. In a pattern
//!   `*` matches any run of characters, `/` included (as IAM's resource patterns do), so
//!   `read:/shop/prod/*` covers everything under `/shop/prod/`.

use serde::{Deserialize, Serialize};

use crate::names::NameError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A value (decrypted when it is a SecureString).
    Read,
    /// A new version, labels, deletion.
    Write,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Write => "write",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    Admin,
    ReadOnly,
    Param { action: Action, pattern: String },
}

/// Longest pattern, in bytes.
const MAX_PATTERN_BYTES: usize = 1100;
/// Most permissions one policy holds.
pub const MAX_PERMISSIONS: usize = 64;

impl Permission {
    pub fn parse(text: &str) -> Result<Permission, NameError> {
        match text {
            "admin" => return Ok(Permission::Admin),
            "read-only" | "readonly" => return Ok(Permission::ReadOnly),
            _ => {}
        }
        let (action, pattern) = match text.split_once(':') {
            Some(("read", p)) => (Action::Read, p),
            Some(("write", p)) => (Action::Write, p),
            _ => {
                return Err(NameError(format!(
                    "unknown permission `{}`: use admin, read-only, read:/path/* or write:/path/*",
                    text.chars().take(80).collect::<String>()
                )))
            }
        };
        if !pattern.starts_with('/') || pattern.len() > MAX_PATTERN_BYTES {
            return Err(NameError(format!(
                "permission `{}`: the pattern must start with `/` and be at most {MAX_PATTERN_BYTES} bytes",
                text.chars().take(80).collect::<String>()
            )));
        }
        if let Some(bad) = pattern
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/' | '*')))
        {
            return Err(NameError(format!(
                "permission `{}` has the character {bad:?}; patterns use name characters and `*`",
                text.chars().take(80).collect::<String>()
            )));
        }
        Ok(Permission::Param {
            action,
            pattern: pattern.to_string(),
        })
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Permission::Admin => f.write_str("admin"),
            Permission::ReadOnly => f.write_str("read-only"),
            Permission::Param { action, pattern } => write!(f, "{}:{pattern}", action.as_str()),
        }
    }
}

impl Serialize for Permission {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Permission {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Permission::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Policy(pub Vec<Permission>);

impl Policy {
    pub fn admin() -> Policy {
        Policy(vec![Permission::Admin])
    }

    pub fn parse(texts: &[String]) -> Result<Policy, NameError> {
        if texts.is_empty() {
            return Err(NameError(
                "a policy needs at least one permission: admin, read-only, read:/path/* or write:/path/*".into(),
            ));
        }
        if texts.len() > MAX_PERMISSIONS {
            return Err(NameError(format!(
                "{} permissions; at most {MAX_PERMISSIONS} are allowed",
                texts.len()
            )));
        }
        let mut permissions: Vec<Permission> = texts
            .iter()
            .map(|t| Permission::parse(t))
            .collect::<Result<_, _>>()?;
        permissions.sort();
        permissions.dedup();
        Ok(Policy(permissions))
    }

    pub fn is_admin(&self) -> bool {
        self.0.contains(&Permission::Admin)
    }

    /// Whether the policy allows reads of the cluster's state (not parameter values).
    pub fn may_read_state(&self) -> bool {
        self.is_admin() || self.0.contains(&Permission::ReadOnly)
    }

    /// Whether `action` on parameter `name` is allowed.
    pub fn may(&self, action: Action, name: &str) -> bool {
        self.0.iter().any(|p| match p {
            Permission::Admin => true,
            Permission::ReadOnly => false,
            Permission::Param {
                action: granted,
                pattern,
            } => *granted == action && pattern_matches(pattern, name),
        })
    }

    /// Whether the policy could allow `action` on some parameter under `path` (a listing
    /// shows only what the caller may read).
    pub fn may_list(&self, path: &str) -> bool {
        self.may_read_state()
            || self.0.iter().any(|p| match p {
                Permission::Param { pattern, .. } => {
                    let fixed = pattern.split('*').next().unwrap_or("");
                    fixed.starts_with(path) || path.starts_with(fixed)
                }
                _ => false,
            })
    }

    /// The sentence a denial carries: what was needed and what the caller has.
    pub fn denial(&self, who: &str, action: Action, name: &str) -> String {
        format!(
            "{who} may not {} `{name}`: that needs the permission `{}:{name}` (or a pattern covering it); it has {}",
            action.as_str(),
            action.as_str(),
            self.describe()
        )
    }

    pub fn describe(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        self.0
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `*` matches any run of characters, `/` included; everything else matches itself.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_cover_what_they_name() {
        assert!(pattern_matches("/shop/prod/*", "/shop/prod/db/password"));
        assert!(pattern_matches(
            "/shop/prod/db/password",
            "/shop/prod/db/password"
        ));
        assert!(pattern_matches("/shop/*/db", "/shop/prod/db"));
        assert!(!pattern_matches("/shop/prod/*", "/shop/production"));
        assert!(!pattern_matches("/shop/prod/db", "/shop/prod/db/password"));
        assert!(!pattern_matches("/shop/prod/*", "/shop/dev/x"));
    }

    #[test]
    fn a_policy_allows_only_its_grants_and_says_what_is_missing() {
        let policy =
            Policy::parse(&["read:/shop/prod/*".into(), "write:/shop/dev/*".into()]).unwrap();
        assert!(policy.may(Action::Read, "/shop/prod/db"));
        assert!(!policy.may(Action::Write, "/shop/prod/db"));
        assert!(policy.may(Action::Write, "/shop/dev/db"));
        assert!(!policy.may(Action::Read, "/shop/dev/db"));
        assert!(!policy.may_read_state());
        let denial = policy.denial("token `ci`", Action::Write, "/shop/prod/db");
        assert!(
            denial.contains("`write:/shop/prod/db`")
                && denial.contains("read:/shop/prod/*, write:/shop/dev/*"),
            "{denial}"
        );
        assert!(policy.may_list("/shop/"));
        assert!(policy.may_list("/shop/prod/db/"));
        assert!(!policy.may_list("/other/"));
        assert!(Policy::admin().may(Action::Write, "/x"));
        let read_only = Policy::parse(&["read-only".into()]).unwrap();
        assert!(read_only.may_read_state() && !read_only.may(Action::Read, "/x"));
    }

    #[test]
    fn permissions_parse_strictly_and_round_trip() {
        for bad in ["root", "read:shop", "delete:/x", "read:/a b", ""] {
            assert!(Permission::parse(bad).is_err(), "{bad}");
        }
        let p = Permission::parse("write:/a/*").unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, "\"write:/a/*\"");
        assert_eq!(serde_json::from_str::<Permission>(&json).unwrap(), p);
        assert!(Policy::parse(&[]).is_err());
    }
}
