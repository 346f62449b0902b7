//! Routing rules and how a service's targets share its traffic: the validated model of a
//! service's `routes` and `balance`, and the pure pieces both the proxy and the CLI evaluate
//! them with (address blocks, glob patterns, rule order).

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An HTTP routing rule: the conditions a request must meet (all of them), and what is done
/// with a request that meets them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
pub struct Route {
    /// Exact, or `*.example.com` (one or more labels); None: any host.
    pub host: Option<String>,
    /// `http` or `https`: how the request reached the proxy (`https` through its TLS
    /// listener, or as a trusted proxy in front says); None: either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Records written before rules had kinds called it `path_prefix`.
    #[serde(alias = "path_prefix")]
    pub path: String,
    #[serde(default, skip_serializing_if = "PathMatch::is_prefix")]
    pub path_match: PathMatch,
    /// Upper-case method names; empty: any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Each named header must be present with one of its values (case-insensitive globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    /// Each named query parameter must be present with one of its values (globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<ValueMatch>,
    /// The client's address must be in one of these blocks (`10.0.0.0/8`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// Rules with a priority are tried first, lowest number first; the others after them,
    /// most specific first (see [`Specificity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Served only on the internal listener (service-to-service).
    pub internal: bool,
    #[serde(default, skip_serializing_if = "RouteAction::is_plain_forward")]
    pub action: RouteAction,
}

impl Route {
    /// A rule matching `path` (prefix) on any host, forwarding to its service.
    pub fn prefix(path: &str) -> Route {
        Route {
            host: None,
            scheme: None,
            path: path.to_string(),
            path_match: PathMatch::Prefix,
            methods: Vec::new(),
            headers: Vec::new(),
            query: Vec::new(),
            sources: Vec::new(),
            priority: None,
            internal: false,
            action: RouteAction::default(),
        }
    }

    /// What two rules must not share: rules with the same conditions cannot both be served.
    pub fn conditions_key(&self) -> String {
        let values = |v: &[ValueMatch]| {
            let mut v: Vec<String> = v
                .iter()
                .map(|m| format!("{}={}", m.name.to_ascii_lowercase(), m.values.join("|")))
                .collect();
            v.sort();
            v.join("&")
        };
        let mut methods = self.methods.clone();
        methods.sort();
        let mut sources = self.sources.clone();
        sources.sort();
        format!(
            "scheme={} host={} path={}:{} methods={} headers={} query={} sources={} internal={}",
            self.scheme.as_deref().unwrap_or("*any*"),
            self.host.as_deref().unwrap_or("*any*"),
            self.path_match.as_str(),
            self.path,
            methods.join(","),
            values(&self.headers),
            values(&self.query),
            sources.join(","),
            self.internal
        )
    }

    /// A one-line description: `shop.local /api/* GET header x-canary=on`.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "{}{} {}",
            self.scheme
                .as_deref()
                .map(|s| format!("{s}://"))
                .unwrap_or_default(),
            self.host.as_deref().unwrap_or("*"),
            match self.path_match {
                PathMatch::Prefix => self.path.clone(),
                PathMatch::Exact => format!("={}", self.path),
                PathMatch::Glob => format!("~{}", self.path),
            }
        );
        if !self.methods.is_empty() {
            out += &format!(" {}", self.methods.join(","));
        }
        for h in &self.headers {
            out += &format!(" header {}={}", h.name, h.values.join("|"));
        }
        for q in &self.query {
            out += &format!(" query {}={}", q.name, q.values.join("|"));
        }
        if !self.sources.is_empty() {
            out += &format!(" from {}", self.sources.join(","));
        }
        out
    }

    /// How specific the rule is, for ordering rules without a priority.
    pub fn specificity(&self) -> Specificity {
        let literal = match self.path_match {
            PathMatch::Glob => self
                .path
                .chars()
                .filter(|c| !matches!(c, '*' | '?'))
                .count(),
            _ => self.path.len(),
        };
        Specificity {
            path_literal: literal,
            exact_path: self.path_match == PathMatch::Exact,
            host: match &self.host {
                None => 0,
                Some(h) if h.starts_with("*.") => 1,
                Some(_) => 2,
            },
            conditions: usize::from(self.scheme.is_some())
                + self.methods.len().min(1)
                + self.headers.len()
                + self.query.len()
                + self.sources.len().min(1),
        }
    }
}

/// The order of rules without a priority: the longest path first (an exact path before a
/// prefix of the same length), then an exact host before a wildcard before any host, then the
/// rule with more conditions. Later fields break ties of earlier ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    pub path_literal: usize,
    pub exact_path: bool,
    pub host: u8,
    pub conditions: usize,
}

/// How a rule's `path` is compared with a request's path.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    /// The path or a path below it, on a segment boundary: `/api` matches `/api/x`, not `/apix`.
    #[default]
    Prefix,
    /// Exactly this path.
    Exact,
    /// The whole path against a pattern: `*` any characters (slashes too), `?` one.
    Glob,
}

impl PathMatch {
    fn is_prefix(&self) -> bool {
        *self == PathMatch::Prefix
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            PathMatch::Prefix => "prefix",
            PathMatch::Exact => "exact",
            PathMatch::Glob => "glob",
        }
    }
}

/// A header or query parameter and the values it may have.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
pub struct ValueMatch {
    pub name: String,
    /// Any of these (globs: `*`, `?`).
    pub values: Vec<String>,
}

/// What a matching request gets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RouteAction {
    /// To the targets of services, split by weight; no weights: all to the rule's service.
    Forward {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        weights: Vec<Weight>,
    },
    Redirect(Redirect),
    Respond(FixedResponse),
}

impl Default for RouteAction {
    fn default() -> Self {
        RouteAction::Forward {
            weights: Vec::new(),
        }
    }
}

impl RouteAction {
    fn is_plain_forward(&self) -> bool {
        matches!(self, RouteAction::Forward { weights } if weights.is_empty())
    }

    /// Whether requests reach targets (a redirect or fixed response needs none).
    pub fn forwards(&self) -> bool {
        matches!(self, RouteAction::Forward { .. })
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
pub struct Weight {
    pub service: String,
    /// A share: 90 and 10 send nine requests in ten to the first.
    pub weight: u32,
}

/// A redirect: each part not given keeps the request's. `host`, `path` and `query` may use
/// `#{host}`, `#{path}`, `#{port}` and `#{query}` for the request's parts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// An answer the proxy gives itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
pub struct FixedResponse {
    pub status: u16,
    #[serde(default)]
    pub body: String,
    pub content_type: String,
}

/// Largest fixed response body a stack file may give.
pub const MAX_FIXED_BODY: usize = 64 * 1024;
/// Most conditions of one kind (headers, query parameters, values, address blocks) in a rule.
pub const MAX_CONDITIONS: usize = 16;

/// How a service's targets share the requests its routes send it (its target group).
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema, utoipa::ToSchema,
)]
pub struct Balance {
    #[serde(default)]
    pub algorithm: Algorithm,
    /// A new target's share grows from nothing to a full one over this long (0: at once).
    #[serde(default)]
    pub slow_start_ms: u64,
    /// Requests of a client that holds the cookie go to the same target while it is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    #[serde(default)]
    pub outlier: Outlier,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    /// The target with the fewest requests in flight (from this proxy).
    LeastOutstanding,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema)]
pub struct Sticky {
    pub cookie: String,
    pub duration_ms: u64,
}

/// Passive outlier detection: a target that fails this many requests in a row (a 5xx
/// answer, or no connection) gets none for `ejection_ms`, then one request to prove itself.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, utoipa::ToSchema,
)]
pub struct Outlier {
    /// 0: never ejected.
    pub consecutive_errors: u32,
    pub ejection_ms: u64,
}

pub const DEFAULT_OUTLIER_ERRORS: u32 = 5;
pub const DEFAULT_EJECTION_MS: u64 = 30_000;
pub const DEFAULT_STICKY_MS: u64 = 24 * 3600 * 1000;
pub const MAX_SLOW_START_MS: u64 = 15 * 60 * 1000;
pub const MAX_EJECTION_MS: u64 = 3600 * 1000;

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_errors: DEFAULT_OUTLIER_ERRORS,
            ejection_ms: DEFAULT_EJECTION_MS,
        }
    }
}

/// An address block, `10.0.0.0/8` or `::1/128` (a bare address is the block of itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{text}` is not an address block: write e.g. 10.0.0.0/8, 192.168.1.7 or fd00::/8"
            )
        };
        let (addr, bits) = match text.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if bits > max {
            return Err(bad());
        }
        Ok(Cidr { addr, bits })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            (_, ip) => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// Whether `text` matches `pattern`: `*` any run of characters, `?` one; ASCII letters
/// compared without case when `fold` is set. Linear in practice (one backtrack point).
pub fn glob_matches(pattern: &str, text: &str, fold: bool) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let eq = |a: u8, b: u8| a == b || (fold && a.eq_ignore_ascii_case(&b));
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && (p[pi] == b'?' || eq(p[pi], t[ti])) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_matches("/img/*.png", "/img/a/b.png", false));
        assert!(!glob_matches("/img/*.png", "/img/a/b.jpg", false));
        assert!(glob_matches("*", "", false));
        assert!(glob_matches("a?c", "abc", false));
        assert!(!glob_matches("a?c", "ac", false));
        assert!(glob_matches("*mobile*", "Foo Mobile Safari", true));
        assert!(!glob_matches("*mobile*", "Foo Mobile Safari", false));
        assert!(glob_matches("*a*b*c", "xxaxxbxxc", false));
        assert!(!glob_matches("*a*b*c", "xxaxxbxxcx", false));
    }

    #[test]
    fn old_records_with_path_prefix_still_read() {
        let r: Route =
            serde_json::from_str(r#"{"host":null,"path_prefix":"/api","internal":false}"#).unwrap();
        assert_eq!(r, Route::prefix("/api"));
    }
}
