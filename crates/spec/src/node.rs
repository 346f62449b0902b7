//! A format-neutral document tree with source positions.
//!
//! TOML and YAML documents are both converted into [`Node`]s; overlays are merged on this
//! tree (tables merge recursively, anything else replaces) and validation works on it, so
//! every semantic error can point at the file, line and column the offending value came from.
//!
//! Positions: TOML positions are exact (taken from the parser's spans). The YAML crate does
//! not expose positions of values, so for YAML the position of a key is found by a
//! best-effort text search (following indentation of block mappings/sequences, see
//! [`yaml_locate`]); when the search fails (e.g. flow style `{a: 1}`), the position of the
//! closest enclosing key that was found is used.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// A 1-based position in one of the files of a parse (index into the file list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Loc {
    pub file: usize,
    pub line: usize,
    pub col: usize,
    /// True when the node came from an environment overlay (table or sibling file).
    pub overlay: bool,
}

impl Loc {
    pub(crate) fn start(file: usize) -> Loc {
        Loc {
            file,
            line: 1,
            col: 1,
            overlay: false,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub val: Val,
    pub loc: Loc,
}

#[derive(Clone, Debug)]
pub(crate) enum Val {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub key: String,
    pub key_loc: Loc,
    pub node: Node,
}

impl Val {
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Val::Null => "null",
            Val::Bool(_) => "a boolean",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a float",
            Val::Str(_) => "a string",
            Val::Datetime(_) => "a datetime",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }
}

impl Node {
    pub(crate) fn empty_table(loc: Loc) -> Node {
        Node {
            val: Val::Table(Vec::new()),
            loc,
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Entry> {
        match &self.val {
            Val::Table(entries) => entries.iter().find(|e| e.key == key),
            _ => None,
        }
    }

    /// Marks this node and every descendant as coming from an overlay.
    pub(crate) fn mark_overlay(&mut self) {
        self.loc.overlay = true;
        match &mut self.val {
            Val::Array(items) => items.iter_mut().for_each(Node::mark_overlay),
            Val::Table(entries) => {
                for e in entries {
                    e.key_loc.overlay = true;
                    e.node.mark_overlay();
                }
            }
            _ => {}
        }
    }

    /// Deep merge: tables merge recursively, anything else in `over` replaces.
    pub(crate) fn merge(&mut self, over: Node) {
        match (&mut self.val, over.val) {
            (Val::Table(base), Val::Table(over_entries)) => {
                for oe in over_entries {
                    if let Some(be) = base.iter_mut().find(|b| b.key == oe.key) {
                        be.node.merge(oe.node);
                    } else {
                        base.push(oe);
                    }
                }
            }
            (_, v) => {
                self.val = v;
                self.loc = over.loc;
            }
        }
    }

    /// JSON view of the tree (positions dropped). Used by tests and diagnostics.
    #[allow(dead_code)]
    pub(crate) fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.val {
            Val::Null => J::Null,
            Val::Bool(b) => J::Bool(*b),
            Val::Int(i) => i64::try_from(*i)
                .map(J::from)
                .or_else(|_| u64::try_from(*i).map(J::from))
                .unwrap_or(J::Null),
            Val::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Val::Str(s) | Val::Datetime(s) => J::String(s.clone()),
            Val::Array(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Val::Table(entries) => J::Object(
                entries
                    .iter()
                    .map(|e| (e.key.clone(), e.node.to_json()))
                    .collect(),
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Line index
// ---------------------------------------------------------------------------

/// Maps byte offsets to 1-based (line, column-in-characters).
pub(crate) struct LineIndex<'a> {
    src: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(src: &'a str) -> Self {
        let mut starts = vec![0];
        for (i, b) in src.bytes().enumerate() {
            if b == b'\n' {
                starts.push(i + 1);
            }
        }
        LineIndex { src, starts }
    }

    pub(crate) fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.src.len());
        while offset > 0 && !self.src.is_char_boundary(offset) {
            offset -= 1;
        }
        let line_idx = match self.starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let start = self.starts.get(line_idx).copied().unwrap_or(0);
        let col = self.src.get(start..offset).map_or(0, |s| s.chars().count());
        (line_idx + 1, col + 1)
    }
}

/// 1-based line/column of the first invalid UTF-8 byte (or of `valid_up_to`).
pub(crate) fn utf8_error_position(bytes: &[u8], valid_up_to: usize) -> (usize, usize) {
    let prefix = bytes.get(..valid_up_to).unwrap_or(bytes);
    // `prefix` is valid UTF-8 by construction of `valid_up_to`.
    let text = String::from_utf8_lossy(prefix);
    let idx = LineIndex::new(&text);
    idx.line_col(text.len())
}

// ---------------------------------------------------------------------------
// TOML
// ---------------------------------------------------------------------------

/// A syntax error: message and byte span start (if known).
pub(crate) struct SyntaxError {
    pub message: String,
    pub line: usize,
    pub col: usize,
}

// Magic names of the `serde_spanned` 0.6 protocol used by `toml` to hand out spans. Needed
// for table keys because a TOML datetime is presented as a one-entry map whose key does not
// support spans, so `toml::Spanned<String>` cannot be used for keys.
const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
const TOML_DATETIME_KEY: &str = "$__toml_private_datetime";

enum TVal {
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Datetime(String),
    Array(Vec<SVal>),
    Table(Vec<(TKey, SVal)>),
}

/// A value with its start offset when the parser knows it (implicit tables such as
/// `services` in `[services.web]` have no span).
struct SVal {
    start: Option<usize>,
    val: TVal,
}

struct TKey {
    name: String,
    start: Option<usize>,
}

impl<'de> Deserialize<'de> for TKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KV;
        impl<'de> Visitor<'de> for KV {
            type Value = TKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TKey, E> {
                Ok(TKey {
                    name: v.to_string(),
                    start: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TKey, A::Error> {
                let mut start = None;
                let mut name = None;
                while let Some(k) = map.next_key::<String>()? {
                    if k == SPANNED_START {
                        start = Some(map.next_value::<usize>()?);
                    } else if k == SPANNED_END {
                        map.next_value::<usize>()?;
                    } else if k == SPANNED_VALUE {
                        name = Some(map.next_value::<String>()?);
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
                let name = name.ok_or_else(|| de::Error::custom("key without a value"))?;
                Ok(TKey { name, start })
            }
        }
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, KV)
    }
}

/// Visitor shared by [`TVal`] (plain) and [`SVal`] (maybe spanned).
struct ValVisitor {
    spanned: bool,
}

impl ValVisitor {
    fn table<'de, A: MapAccess<'de>>(mut map: A, first: Option<TKey>) -> Result<TVal, A::Error> {
        let mut entries = Vec::new();
        let mut next = first;
        loop {
            let key = match next.take() {
                Some(k) => k,
                None => match map.next_key::<TKey>()? {
                    Some(k) => k,
                    None => break,
                },
            };
            if key.name == TOML_DATETIME_KEY && key.start.is_none() {
                let s: String = map.next_value()?;
                return Ok(TVal::Datetime(s));
            }
            let value = map.next_value::<SVal>()?;
            entries.push((key, value));
        }
        Ok(TVal::Table(entries))
    }
}

impl<'de> Visitor<'de> for ValVisitor {
    type Value = SVal;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<SVal, E> {
        Ok(plain(TVal::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<SVal, E> {
        Ok(plain(TVal::Int(v.into())))
    }
    fn visit_u64<E>(self, v: u64) -> Result<SVal, E> {
        Ok(plain(TVal::Int(v.into())))
    }
    fn visit_f64<E>(self, v: f64) -> Result<SVal, E> {
        Ok(plain(TVal::Float(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<SVal, E> {
        Ok(plain(TVal::Str(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<SVal, E> {
        Ok(plain(TVal::Str(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SVal, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<SVal>()? {
            items.push(item);
        }
        Ok(plain(TVal::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SVal, A::Error> {
        if !self.spanned {
            return Ok(plain(Self::table(map, None)?));
        }
        let Some(first) = map.next_key::<TKey>()? else {
            return Ok(plain(TVal::Table(Vec::new())));
        };
        if first.name != SPANNED_START || first.start.is_some() {
            return Ok(plain(Self::table(map, Some(first))?));
        }
        let start = map.next_value::<usize>()?;
        let mut val = None;
        while let Some(k) = map.next_key::<String>()? {
            if k == SPANNED_VALUE {
                val = Some(map.next_value::<TVal>()?);
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        let val = val.ok_or_else(|| de::Error::custom("spanned value without a value"))?;
        Ok(SVal {
            start: Some(start),
            val,
        })
    }
}

fn plain(val: TVal) -> SVal {
    SVal { start: None, val }
}

impl<'de> Deserialize<'de> for TVal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValVisitor { spanned: false })
            .map(|s| s.val)
    }
}

impl<'de> Deserialize<'de> for SVal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, ValVisitor { spanned: true })
    }
}

/// Parses TOML text into a node tree. Positions refer to file `file`.
pub(crate) fn parse_toml(src: &str, file: usize) -> Result<Node, SyntaxError> {
    let idx = LineIndex::new(src);
    match toml::from_str::<TVal>(src) {
        Ok(v) => Ok(tval_to_node(v, Loc::start(file), &idx)),
        Err(e) => {
            let (line, col) = e.span().map_or((1, 1), |s| idx.line_col(s.start));
            Err(SyntaxError {
                message: e.message().trim().to_string(),
                line,
                col,
            })
        }
    }
}

fn loc_at(idx: &LineIndex<'_>, file: usize, offset: usize) -> Loc {
    let (line, col) = idx.line_col(offset);
    Loc {
        file,
        line,
        col,
        overlay: false,
    }
}

fn tval_to_node(v: TVal, loc: Loc, idx: &LineIndex<'_>) -> Node {
    let file = loc.file;
    let val = match v {
        TVal::Bool(b) => Val::Bool(b),
        TVal::Int(i) => Val::Int(i),
        TVal::Float(f) => Val::Float(f),
        TVal::Str(s) => Val::Str(s),
        TVal::Datetime(s) => Val::Datetime(s),
        TVal::Array(items) => Val::Array(
            items
                .into_iter()
                .map(|sv| {
                    let l = sv.start.map_or(loc, |s| loc_at(idx, file, s));
                    tval_to_node(sv.val, l, idx)
                })
                .collect(),
        ),
        TVal::Table(entries) => Val::Table(
            entries
                .into_iter()
                .map(|(k, sv)| {
                    let key_loc = k.start.map_or(loc, |s| loc_at(idx, file, s));
                    let vloc = sv.start.map_or(key_loc, |s| loc_at(idx, file, s));
                    Entry {
                        key: k.name,
                        key_loc,
                        node: tval_to_node(sv.val, vloc, idx),
                    }
                })
                .collect(),
        ),
    };
    Node { val, loc }
}

// ---------------------------------------------------------------------------
// YAML
// ---------------------------------------------------------------------------

/// Parses YAML text into a node tree. Positions of keys and values are found by a
/// best-effort text search (see module docs).
pub(crate) fn parse_yaml(src: &str, file: usize) -> Result<Node, SyntaxError> {
    let mut value: serde_norway::Value = match serde_norway::from_str(src) {
        Ok(v) => v,
        Err(e) => {
            let (line, col) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            let mut message = e.to_string();
            // The crate appends " at line L column C"; the position is reported separately.
            if let Some(i) = message.find(" at line ") {
                message.truncate(i);
            }
            return Err(SyntaxError { message, line, col });
        }
    };
    if let Err(e) = value.apply_merge() {
        return Err(SyntaxError {
            message: e.to_string(),
            line: 1,
            col: 1,
        });
    }
    let lines: Vec<&str> = src.lines().collect();
    let root = YamlCursor {
        line: None,
        indent: -1,
    };
    Ok(yaml_to_node(value, Loc::start(file), root, &lines, file))
}

/// Where a YAML node was found: its (0-based) line and the indentation of its key.
#[derive(Clone, Copy)]
struct YamlCursor {
    line: Option<usize>,
    indent: isize,
}

fn yaml_to_node(
    v: serde_norway::Value,
    loc: Loc,
    cur: YamlCursor,
    lines: &[&str],
    file: usize,
) -> Node {
    use serde_norway::Value as Y;
    let val = match v {
        Y::Null => Val::Null,
        Y::Bool(b) => Val::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Val::Int(i.into())
            } else if let Some(u) = n.as_u64() {
                Val::Int(u.into())
            } else {
                Val::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Y::String(s) => Val::Str(s),
        Y::Sequence(items) => {
            let mut search_from = cur.line.map_or(0, |l| l + 1);
            let mut out = Vec::new();
            for item in items {
                let found = yaml_find_item(lines, search_from, cur.indent);
                let (iloc, icur) = match found {
                    Some((line, col, indent)) => {
                        search_from = line + 1;
                        (
                            Loc {
                                file,
                                line: line + 1,
                                col: col + 1,
                                overlay: false,
                            },
                            YamlCursor {
                                line: Some(line),
                                indent,
                            },
                        )
                    }
                    None => (
                        loc,
                        YamlCursor {
                            line: None,
                            indent: cur.indent,
                        },
                    ),
                };
                out.push(yaml_to_node(item, iloc, icur, lines, file));
            }
            Val::Array(out)
        }
        Y::Mapping(map) => {
            let mut entries = Vec::new();
            for (k, v) in map {
                let key = match k {
                    Y::String(s) => s,
                    Y::Bool(b) => b.to_string(),
                    Y::Number(n) => n.to_string(),
                    Y::Null => "null".to_string(),
                    _ => "<complex key>".to_string(),
                };
                let found = yaml_find_key(lines, cur, &key);
                let (key_loc, vloc, vcur) = match found {
                    Some((line, col, indent, vcol)) => (
                        Loc {
                            file,
                            line: line + 1,
                            col: col + 1,
                            overlay: false,
                        },
                        Loc {
                            file,
                            line: line + 1,
                            col: vcol + 1,
                            overlay: false,
                        },
                        YamlCursor {
                            line: Some(line),
                            indent,
                        },
                    ),
                    None => (
                        loc,
                        loc,
                        YamlCursor {
                            line: None,
                            indent: cur.indent,
                        },
                    ),
                };
                let node = yaml_to_node(v, vloc, vcur, lines, file);
                entries.push(Entry { key, key_loc, node });
            }
            Val::Table(entries)
        }
        Y::Tagged(t) => {
            // Tags are not part of the stack format; keep the value, positions unchanged.
            return yaml_to_node(t.value, loc, cur, lines, file);
        }
    };
    Node { val, loc }
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#') || t == "---"
}

/// Char-based column of a byte offset in a line.
fn char_col(line: &str, byte: usize) -> usize {
    line.get(..byte).map_or(0, |s| s.chars().count())
}

/// Finds `key:` inside the block that starts after `cur.line` (or the whole document when
/// `cur.line` is None), among the lines at the block's child indentation (deeper than
/// `cur.indent`). Returns the 0-based line, key column, key indentation and value column.
fn yaml_find_key(
    lines: &[&str],
    cur: YamlCursor,
    key: &str,
) -> Option<(usize, usize, isize, usize)> {
    let patterns = [
        format!("{key}:"),
        format!("\"{key}\":"),
        format!("'{key}':"),
    ];
    let try_match = |i: usize, line: &str, body_start: usize| {
        let rest = line.get(body_start..)?;
        for p in &patterns {
            if let Some(after) = rest.strip_prefix(p.as_str()) {
                if after.is_empty() || after.starts_with(' ') || after.starts_with('\t') {
                    let value = after.trim_start();
                    let vcol = if value.is_empty() || value.starts_with('#') {
                        char_col(line, body_start)
                    } else {
                        char_col(line, line.len() - value.len())
                    };
                    return Some((i, char_col(line, body_start), body_start as isize, vcol));
                }
            }
        }
        None
    };
    let mut child_indent: Option<usize> = None;
    let scan_from = match cur.line {
        Some(pl) => {
            // A sequence item's first key sits on the item's own line after `- `.
            let line = lines.get(pl).copied().unwrap_or("");
            let ind = indent_of(line);
            if let Some(r) = line.get(ind..).and_then(|r| r.strip_prefix("- ")) {
                let body_start = line.len() - r.trim_start_matches(' ').len();
                if let Some(found) = try_match(pl, line, body_start) {
                    return Some(found);
                }
                child_indent = Some(body_start);
            }
            pl + 1
        }
        None => 0,
    };
    for (i, line) in lines.iter().enumerate().skip(scan_from) {
        if is_blank_or_comment(line) {
            continue;
        }
        let ind = indent_of(line);
        if cur.line.is_some() && (ind as isize) <= cur.indent {
            return None; // left the parent's block
        }
        let want = *child_indent.get_or_insert(ind);
        if ind != want {
            continue;
        }
        if let Some(found) = try_match(i, line, ind) {
            return Some(found);
        }
    }
    None
}

/// Finds the next `- ` sequence item after line `from`, deeper than `parent_indent`
/// (or at the same indentation, as YAML allows `key:\n- item`). Returns the 0-based line,
/// the column of the item content and the indentation to use for its children.
fn yaml_find_item(
    lines: &[&str],
    from: usize,
    parent_indent: isize,
) -> Option<(usize, usize, isize)> {
    for (i, line) in lines.iter().enumerate().skip(from) {
        if is_blank_or_comment(line) {
            continue;
        }
        let ind = indent_of(line);
        if (ind as isize) < parent_indent.max(0) {
            return None;
        }
        let rest = line.get(ind..).unwrap_or("");
        if rest.starts_with("- ") || rest == "-" {
            let content = rest.get(1..).unwrap_or("");
            let skip = content.len() - content.trim_start().len();
            let ccol = ind + 1 + skip;
            return Some((i, char_col(line, ccol), ind as isize));
        }
    }
    None
}
