//! What a parameter's name, a path, a label, a value and its metadata may be. Every check
//! names the input and the rule it breaks, so the API can answer 400 with it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest name, in bytes (SSM's limit).
pub const MAX_NAME_BYTES: usize = 1011;
/// Most segments in a name.
pub const MAX_DEPTH: usize = 15;
/// Largest value, in bytes (SSM's advanced tier).
pub const MAX_VALUE_BYTES: usize = 8 * 1024;
pub const MAX_DESCRIPTION_BYTES: usize = 1024;
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_KEY_BYTES: usize = 128;
pub const MAX_TAG_VALUE_BYTES: usize = 256;
/// Versions kept per parameter: the oldest goes when a write would keep more.
pub const MAX_VERSIONS: u64 = 100;
pub const MAX_LABELS_PER_VERSION: usize = 10;
pub const MAX_LABEL_BYTES: usize = 100;
/// Most parameters one store holds.
pub const MAX_PARAMETERS: usize = 10_000;

/// A parameter's type, spelled as SSM spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum ParamType {
    String,
    /// Comma-separated values.
    StringList,
    /// Encrypted at rest; read back in plain text only with decryption asked for and allowed.
    SecureString,
}

impl ParamType {
    pub fn parse(text: &str) -> Result<ParamType, NameError> {
        match text {
            "String" | "string" => Ok(ParamType::String),
            "StringList" | "stringlist" | "string-list" => Ok(ParamType::StringList),
            "SecureString" | "securestring" | "secure" => Ok(ParamType::SecureString),
            other => Err(NameError(format!(
                "unknown parameter type `{}`: use String, StringList or SecureString",
                shorten(other)
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "String",
            ParamType::StringList => "StringList",
            ParamType::SecureString => "SecureString",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(pub String);

/// A parameter name: `/` then segments of letters, digits, `_`, `.` and `-`, none empty, none
/// `.` or `..`, at most [`MAX_DEPTH`] of them, at most [`MAX_NAME_BYTES`] in all.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.ends_with('/') {
        return Err(NameError(format!(
            "parameter name `{}` ends with `/`: a name is a path to one value, such as /shop/prod/db/password",
            shorten(name)
        )));
    }
    check_hierarchy(name, "parameter name")
}

/// A path to list under: `/`, or a name's leading segments (a trailing `/` is allowed).
pub fn check_path(path: &str) -> Result<(), NameError> {
    if path == "/" {
        return Ok(());
    }
    check_hierarchy(path.strip_suffix('/').unwrap_or(path), "path")
}

fn check_hierarchy(name: &str, what: &str) -> Result<(), NameError> {
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError(format!(
            "{what} is {} bytes; at most {MAX_NAME_BYTES} are allowed",
            name.len()
        )));
    }
    let Some(rest) = name.strip_prefix('/') else {
        return Err(NameError(format!(
            "{what} `{}` must start with `/`, as in /shop/prod/db/password",
            shorten(name)
        )));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    if segments.len() > MAX_DEPTH {
        return Err(NameError(format!(
            "{what} `{}` has {} segments; at most {MAX_DEPTH} are allowed",
            shorten(name),
            segments.len()
        )));
    }
    for segment in &segments {
        if segment.is_empty() {
            return Err(NameError(format!(
                "{what} `{}` has an empty segment (`//`)",
                shorten(name)
            )));
        }
        if *segment == "." || *segment == ".." {
            return Err(NameError(format!(
                "{what} `{}` has a `{segment}` segment; names are not relative",
                shorten(name)
            )));
        }
        if let Some(bad) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(NameError(format!(
                "{what} `{}` has the character {bad:?}; segments use letters, digits, `_`, `.` and `-`",
                shorten(name)
            )));
        }
    }
    Ok(())
}

/// A label: letters, digits, `_`, `.` and `-`, not starting with a digit (so `name:3` is a
/// version and `name@prod` a label, never confused).
pub fn check_label(label: &str) -> Result<(), NameError> {
    if label.is_empty() || label.len() > MAX_LABEL_BYTES {
        return Err(NameError(format!(
            "label `{}` must be 1 to {MAX_LABEL_BYTES} bytes",
            shorten(label)
        )));
    }
    if label.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(NameError(format!(
            "label `{}` starts with a digit; a number names a version",
            shorten(label)
        )));
    }
    if let Some(bad) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(NameError(format!(
            "label `{}` has the character {bad:?}; labels use letters, digits, `_`, `.` and `-`",
            shorten(label)
        )));
    }
    Ok(())
}

/// A value of `kind`: not empty, at most [`MAX_VALUE_BYTES`]. The error never repeats it.
pub fn check_value(kind: ParamType, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError("the value is empty".into()));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(NameError(format!(
            "the value is {} bytes; a {} holds at most {MAX_VALUE_BYTES}",
            value.len(),
            kind.as_str()
        )));
    }
    if kind == ParamType::StringList && value.split(',').any(|item| item.is_empty()) {
        return Err(NameError(
            "a StringList is comma-separated items, none empty".into(),
        ));
    }
    Ok(())
}

pub fn check_description(description: &str) -> Result<(), NameError> {
    if description.len() > MAX_DESCRIPTION_BYTES {
        return Err(NameError(format!(
            "the description is {} bytes; at most {MAX_DESCRIPTION_BYTES} are allowed",
            description.len()
        )));
    }
    Ok(())
}

pub fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), NameError> {
    if tags.len() > MAX_TAGS {
        return Err(NameError(format!(
            "{} tags; at most {MAX_TAGS} are allowed",
            tags.len()
        )));
    }
    for (key, value) in tags {
        if key.is_empty() || key.len() > MAX_TAG_KEY_BYTES {
            return Err(NameError(format!(
                "tag key `{}` must be 1 to {MAX_TAG_KEY_BYTES} bytes",
                shorten(key)
            )));
        }
        if value.len() > MAX_TAG_VALUE_BYTES {
            return Err(NameError(format!(
                "the value of tag `{}` is {} bytes; at most {MAX_TAG_VALUE_BYTES} are allowed",
                shorten(key),
                value.len()
            )));
        }
        if key.chars().chain(value.chars()).any(char::is_control) {
            return Err(NameError(format!(
                "tag `{}` has a control character",
                shorten(key)
            )));
        }
    }
    Ok(())
}

/// A reference to one value: `name`, `name:version` or `name@label`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    pub name: String,
    pub selector: Selector,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    Newest,
    Version(u64),
    Label(String),
}

impl Reference {
    pub fn parse(text: &str) -> Result<Reference, NameError> {
        let (name, selector) = if let Some((name, label)) = text.rsplit_once('@') {
            check_label(label)?;
            (name, Selector::Label(label.to_string()))
        } else if let Some((name, version)) = text.rsplit_once(':') {
            let version: u64 = version.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
                NameError(format!(
                    "`{}`: the version after `:` must be a number from 1",
                    shorten(text)
                ))
            })?;
            (name, Selector::Version(version))
        } else {
            (text, Selector::Newest)
        };
        check_name(name)?;
        Ok(Reference {
            name: name.to_string(),
            selector,
        })
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.selector {
            Selector::Newest => write!(f, "{}", self.name),
            Selector::Version(v) => write!(f, "{}:{v}", self.name),
            Selector::Label(l) => write!(f, "{}@{l}", self.name),
        }
    }
}

/// At most 80 characters of a given name, for messages.
fn shorten(text: &str) -> String {
    if text.chars().count() <= 80 {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(80).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_absolute_paths_of_plain_segments() {
        for good in ["/a", "/shop/prod/db/password", "/a.b/c-d/e_f"] {
            check_name(good).unwrap();
        }
        for (bad, says) in [
            ("a/b", "must start with `/`"),
            ("/a//b", "empty segment"),
            ("/a/../b", "`..` segment"),
            ("/a/./b", "`.` segment"),
            ("/a/b/", "ends with `/`"),
            ("/", "ends with `/`"),
            ("/a b", "character ' '"),
            ("/a@b", "character '@'"),
            ("/a:b", "character ':'"),
        ] {
            let e = check_name(bad).unwrap_err().0;
            assert!(e.contains(says), "{bad}: {e}");
        }
        let long = format!("/{}", "a".repeat(MAX_NAME_BYTES));
        assert!(check_name(&long).unwrap_err().0.contains("bytes"));
        let deep = "/a".repeat(MAX_DEPTH + 1);
        assert!(check_name(&deep).unwrap_err().0.contains("segments"));
        check_name(&"/a".repeat(MAX_DEPTH)).unwrap();
    }

    #[test]
    fn paths_allow_the_root_and_a_trailing_slash() {
        check_path("/").unwrap();
        check_path("/shop/").unwrap();
        check_path("/shop").unwrap();
        assert!(check_path("/shop//").is_err());
        assert!(check_path("shop").is_err());
        assert!(check_path("/../").is_err());
    }

    #[test]
    fn references_name_a_version_or_a_label() {
        let r = Reference::parse("/a/b:3").unwrap();
        assert_eq!(r.selector, Selector::Version(3));
        let r = Reference::parse("/a/b@prod").unwrap();
        assert_eq!(r.selector, Selector::Label("prod".into()));
        assert_eq!(r.to_string(), "/a/b@prod");
        assert_eq!(Reference::parse("/a/b").unwrap().selector, Selector::Newest);
        assert!(Reference::parse("/a/b:0").is_err());
        assert!(Reference::parse("/a/b:x").is_err());
        assert!(Reference::parse("/a/b@1x").is_err());
    }

    #[test]
    fn values_and_metadata_have_limits_that_are_named() {
        assert!(check_value(ParamType::String, "").is_err());
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        let e = check_value(ParamType::SecureString, &big).unwrap_err().0;
        assert!(e.contains("8192") && !e.contains("xxx"), "{e}");
        assert!(check_value(ParamType::StringList, "a,,b").is_err());
        check_value(ParamType::StringList, "a,b").unwrap();
        assert!(ParamType::parse("Secret")
            .unwrap_err()
            .0
            .contains("unknown parameter type `Secret`"));
        let mut tags = BTreeMap::new();
        tags.insert(String::new(), "x".into());
        assert!(check_tags(&tags).is_err());
    }
}
