//! The compiled route table and matching. Rules with a priority come first (lowest number
//! first), then the rest, most specific first (longest path, exact host before wildcard before
//! any, more conditions); the first rule whose every condition holds is the request's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dozen_model::{RouteEntry, RouteTable};
use dozen_spec::{glob_matches, Cidr, FixedResponse, PathMatch, Redirect, ValueMatch};
use hyper::HeaderMap;

use crate::balance::{cookie, Group, Pick};

/// What a rule is matched against.
pub struct Request<'a> {
    /// `http` or `https`.
    pub scheme: &'a str,
    /// As the client sent it (a port is ignored, case too).
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a str,
    pub headers: &'a HeaderMap,
    /// The client's address (past trusted proxies).
    pub client: IpAddr,
    /// Came in on the internal listener, which serves every rule; the public one serves
    /// only public rules.
    pub internal: bool,
}

/// Why a rule did not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    Internal,
    Scheme,
    Host,
    Path,
    Method,
    Header(String),
    Query(String),
    Source,
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Miss::Internal => write!(f, "internal rule (served on the internal listener only)"),
            Miss::Scheme => write!(f, "scheme differs"),
            Miss::Host => write!(f, "host differs"),
            Miss::Path => write!(f, "path differs"),
            Miss::Method => write!(f, "method differs"),
            Miss::Header(h) => write!(f, "header `{h}` missing or another value"),
            Miss::Query(q) => write!(f, "query parameter `{q}` missing or another value"),
            Miss::Source => write!(f, "client address outside the source blocks"),
        }
    }
}

pub enum Action {
    /// To target groups by weight (one group: weight irrelevant).
    Forward {
        groups: Vec<(Arc<Group>, u32)>,
        /// Requests so far: slot `n` of every `total` goes to the group whose share holds it.
        next: Arc<AtomicU64>,
    },
    Redirect(Redirect),
    Respond(FixedResponse),
}

pub struct Rule {
    pub service: String,
    pub stack: String,
    pub spec: dozen_spec::Route,
    pub strip_prefix: bool,
    sources: Vec<Cidr>,
    pub action: Action,
}

/// The step that spreads one cycle of `total` requests over the groups' shares: slot
/// `n * step mod total` rather than `n`, so a 90/10 split is not ninety in a row then ten. The
/// step is near the golden section of `total` (which scatters evenly) and shares no factor
/// with it (so a cycle visits every slot once).
fn stride(total: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let mut step = (total * 618 / 1000).max(1);
    while gcd(step, total) != 1 {
        step += 1;
    }
    step
}

impl Rule {
    fn matches(&self, req: &Request, host: &str) -> Result<(), Miss> {
        let r = &self.spec;
        if r.internal && !req.internal {
            return Err(Miss::Internal);
        }
        if r.scheme.as_deref().is_some_and(|s| s != req.scheme) {
            return Err(Miss::Scheme);
        }
        if !host_matches(r.host.as_deref(), host) {
            return Err(Miss::Host);
        }
        let path_ok = match r.path_match {
            PathMatch::Prefix => prefix_matches(&r.path, req.path),
            PathMatch::Exact => r.path == req.path,
            PathMatch::Glob => glob_matches(&r.path, req.path, false),
        };
        if !path_ok {
            return Err(Miss::Path);
        }
        if !r.methods.is_empty() && !r.methods.iter().any(|m| m == req.method) {
            return Err(Miss::Method);
        }
        for h in &r.headers {
            let ok = req
                .headers
                .get_all(h.name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| any_value(h, v, true));
            if !ok {
                return Err(Miss::Header(h.name.clone()));
            }
        }
        for q in &r.query {
            let ok = req.query.is_some_and(|query| {
                query
                    .split('&')
                    .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
                    .any(|(k, v)| decode(k) == q.name && any_value(q, &decode(v), false))
            });
            if !ok {
                return Err(Miss::Query(q.name.clone()));
            }
        }
        if !self.sources.is_empty() && !self.sources.iter().any(|c| c.contains(req.client)) {
            return Err(Miss::Source);
        }
        Ok(())
    }

    /// The group and target for a request: the target its sticky cookie names if that one
    /// can take it, else a group by weight and a target by the group's algorithm.
    pub fn pick(&self, headers: &HeaderMap) -> Option<(Arc<Group>, Pick)> {
        let Action::Forward { groups, next } = &self.action else {
            return None;
        };
        for (group, weight) in groups {
            // A group given no share takes no one, not even those holding its cookie.
            let Some(sticky) = group.balance.sticky.as_ref().filter(|_| *weight > 0) else {
                continue;
            };
            if let Some(task) = cookie(headers, &sticky.cookie) {
                if group.targets.iter().any(|t| t.task == task) {
                    if let Some(pick) = group.pick(Some(task)) {
                        return Some((group.clone(), pick));
                    }
                }
            }
        }
        let live = || {
            groups
                .iter()
                .filter(|(g, w)| *w > 0 && !g.targets.is_empty())
        };
        let total: u64 = live().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let n = next.fetch_add(1, Ordering::Relaxed);
        let mut slot = (n % total) * stride(total) % total;
        for (group, weight) in live() {
            let weight = u64::from(*weight);
            if slot < weight {
                return group.pick(None).map(|p| (group.clone(), p));
            }
            slot -= weight;
        }
        None
    }

    /// The path to send upstream.
    pub fn upstream_path<'a>(&self, path_and_query: &'a str) -> std::borrow::Cow<'a, str> {
        if !self.strip_prefix {
            return path_and_query.into();
        }
        // By byte position, but never inside a character (a path that did not come from a
        // request's ASCII URI passes through unchanged).
        let rest = path_and_query
            .get(self.spec.path.len().min(path_and_query.len())..)
            .unwrap_or(path_and_query);
        if rest.starts_with('/') {
            rest.into()
        } else {
            format!("/{rest}").into()
        }
    }
}

fn any_value(m: &ValueMatch, value: &str, fold: bool) -> bool {
    m.values.iter().any(|p| glob_matches(p, value, fold))
}

/// Percent-decoding of a query part (`+` is a space); bad escapes stay as they are.
fn decode(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(['%', '+']) {
        return text.into();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

#[derive(Default)]
pub struct Table {
    pub revision: u64,
    pub rules: Vec<Rule>,
    pub groups: HashMap<String, Arc<Group>>,
}

fn host_matches(rule: Option<&str>, host: &str) -> bool {
    match rule {
        None => true,
        Some(h) if h == host => true,
        Some(h) => h.strip_prefix("*.").is_some_and(|suffix| {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }),
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let p = prefix.trim_end_matches('/');
    path.starts_with(p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/') | Some(b'?'))
}

impl Table {
    pub fn new(table: RouteTable) -> Self {
        Table::after(None, table)
    }

    /// The table for `table`, keeping from `previous` the state of each group and target
    /// that is still there, and each rule's weighted position: a table is rebuilt on every
    /// status write, and starting from nothing each time skewed traffic to the first target.
    pub fn after(previous: Option<&Table>, table: RouteTable) -> Self {
        let groups: HashMap<String, Arc<Group>> = table
            .groups
            .into_iter()
            .map(|g| {
                let before = previous.and_then(|p| p.groups.get(&g.name));
                let group = Group::new(
                    g.name.clone(),
                    g.balance,
                    g.targets,
                    before.map(|b| b.as_ref()),
                );
                (g.name, Arc::new(group))
            })
            .collect();
        let positions: HashMap<(String, String), Arc<AtomicU64>> = previous
            .map(|p| {
                p.rules
                    .iter()
                    .filter_map(|r| match &r.action {
                        Action::Forward { next, .. } => {
                            Some(((r.service.clone(), r.spec.conditions_key()), next.clone()))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut rules: Vec<Rule> = table
            .routes
            .into_iter()
            .map(|e| compile(e, &groups, &positions))
            .collect();
        // Discovery (`/_/<service>`, internal) before any rule a stack declares, so no
        // priority hides it; then priorities, then specificity. Stable: equal rules keep the
        // table's order (by service name).
        rules.sort_by(|a, b| {
            let rank = |r: &Rule| match r.spec.priority {
                _ if r.strip_prefix => (0, 0, std::cmp::Reverse(r.spec.specificity())),
                Some(p) => (1, p, std::cmp::Reverse(r.spec.specificity())),
                None => (2, 0, std::cmp::Reverse(r.spec.specificity())),
            };
            rank(a).cmp(&rank(b))
        });
        Table {
            revision: table.revision,
            rules,
            groups,
        }
    }

    /// The rule for a request.
    pub fn find(&self, req: &Request) -> Option<&Rule> {
        let host = normal_host(req.host);
        self.rules.iter().find(|r| r.matches(req, &host).is_ok())
    }

    /// Each rule in order with why it did not match, up to the one that did.
    pub fn explain(&self, req: &Request) -> Vec<(&Rule, Result<(), Miss>)> {
        let host = normal_host(req.host);
        let mut out = Vec::new();
        for r in &self.rules {
            let m = r.matches(req, &host);
            let hit = m.is_ok();
            out.push((r, m));
            if hit {
                break;
            }
        }
        out
    }
}

/// Lowercase, without a port; most clients send it lowercase already: no copy then.
fn normal_host(host: &str) -> std::borrow::Cow<'_, str> {
    let host = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.split(':').next().unwrap_or(host)
    };
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        host.to_ascii_lowercase().into()
    } else {
        host.into()
    }
}

fn compile(
    e: RouteEntry,
    groups: &HashMap<String, Arc<Group>>,
    positions: &HashMap<(String, String), Arc<AtomicU64>>,
) -> Rule {
    let action = match &e.rule.action {
        dozen_spec::RouteAction::Redirect(r) => Action::Redirect(r.clone()),
        dozen_spec::RouteAction::Respond(f) => Action::Respond(f.clone()),
        dozen_spec::RouteAction::Forward { .. } => Action::Forward {
            groups: e
                .groups()
                .into_iter()
                .filter_map(|(name, weight)| Some((groups.get(name)?.clone(), weight)))
                .collect(),
            next: positions
                .get(&(e.service.clone(), e.rule.conditions_key()))
                .cloned()
                .unwrap_or_default(),
        },
    };
    Rule {
        sources: e
            .rule
            .sources
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
        service: e.service,
        stack: e.stack,
        spec: e.rule,
        strip_prefix: e.strip_prefix,
        action,
    }
}

#[cfg(test)]
mod tests;
