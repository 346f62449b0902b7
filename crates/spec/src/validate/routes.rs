//! `routes`: each rule's conditions and action, rules two services both claim, and `balance`
//! (how a service's targets share its traffic).

use std::collections::BTreeMap;

use crate::node::{Entry, Loc, Val};
use crate::types::*;
use crate::units::*;

use super::{entries, unknown_key, Diag, RouteSeen, Validator, BALANCE_KEYS, ROUTE_KEYS};

const REDIRECT_KEYS: &[&str] = &["scheme", "host", "port", "path", "query", "status"];
const RESPOND_KEYS: &[&str] = &["status", "body", "content_type"];
const STICKY_KEYS: &[&str] = &["cookie", "duration"];
const OUTLIER_KEYS: &[&str] = &["errors", "ejection"];

impl Validator {
    pub(super) fn routes(
        &mut self,
        e: &Entry,
        service: &str,
        seen: &mut Vec<RouteSeen>,
    ) -> Vec<Route> {
        let items = match &e.node.val {
            Val::Array(items) => items,
            _ => {
                let found = e.node.val.type_name();
                let hint = if self.syn.yaml {
                    "write a list: `routes:` / `  - host: shop.local` / `    path: /`"
                } else {
                    "write `[[services.web.routes]]` tables with `host` and `path`"
                };
                self.err(
                    e.node.loc,
                    format!("`routes` must be an array of tables, found {found}"),
                    hint,
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for item in items {
            let fake = Entry {
                key: "routes".into(),
                key_loc: item.loc,
                node: item.clone(),
            };
            if !matches!(item.val, Val::Table(_)) {
                let found = item.val.type_name();
                self.err(
                    item.loc,
                    format!("each route must be a table, found {found}"),
                    "a route has `host` (optional), `path` (default \"/\") and `internal` (default false)",
                );
                continue;
            }
            let before = self.diags.len();
            let mut route = Route::prefix("/");
            let mut path_loc = None;
            let mut actions: Vec<&Entry> = Vec::new();
            for r in entries(&fake.node) {
                match r.key.as_str() {
                    "host" => {
                        if let Some(h) = self.str_of(r, "\"shop.local\"") {
                            if is_route_host(h) {
                                route.host = Some(h.to_string());
                            } else {
                                self.err(
                                    r.node.loc,
                                    format!("invalid route host `{h}`"),
                                    "use a lowercase DNS name like \"shop.local\" or \"*.example.com\", without scheme, port or path",
                                );
                            }
                        }
                    }
                    "path" => {
                        if let Some(p) = self.str_of(r, "\"/\"") {
                            route.path = p.to_string();
                            path_loc = Some(r.node.loc);
                        }
                    }
                    "scheme" => match self.str_of(r, "\"http\"") {
                        Some(s @ ("http" | "https")) => route.scheme = Some(s.to_string()),
                        Some(s) => self.err(
                            r.node.loc,
                            format!("route scheme `{s}` is not http or https"),
                            "`scheme = \"http\"` matches requests that came without TLS (e.g. to redirect them to https)",
                        ),
                        None => {}
                    },
                    "path_match" => {
                        if let Some(m) = self.str_of(r, "\"exact\"") {
                            match m {
                                "prefix" => route.path_match = PathMatch::Prefix,
                                "exact" => route.path_match = PathMatch::Exact,
                                "glob" => route.path_match = PathMatch::Glob,
                                _ => self.err(
                                    r.node.loc,
                                    format!("unknown path_match `{m}`"),
                                    "use \"prefix\" (the default: the path and below it), \"exact\", or \"glob\" (`*` any characters, `?` one)",
                                ),
                            }
                        }
                    }
                    "methods" => route.methods = self.methods(r),
                    "headers" => route.headers = self.value_matches(r, true),
                    "query" => route.query = self.value_matches(r, false),
                    "source" => route.sources = self.sources(r),
                    "priority" => {
                        if let Some(p) = self.int_of(r, "10") {
                            match u32::try_from(p) {
                                Ok(p @ 1..=50_000) => route.priority = Some(p),
                                _ => self.err(
                                    r.node.loc,
                                    format!("route priority {p} is out of range"),
                                    "use 1 to 50000: lower numbers are tried first",
                                ),
                            }
                        }
                    }
                    "internal" => {
                        if let Some(b) = self.bool_of(r) {
                            route.internal = b;
                        }
                    }
                    "forward" | "redirect" | "respond" => actions.push(r),
                    _ => self.diags.push(unknown_key(r, ROUTE_KEYS, "in a route")),
                }
            }
            self.check_path(&route, path_loc.unwrap_or(item.loc));
            match actions.as_slice() {
                [] => {}
                [a] => {
                    if let Some(action) = self.action(a) {
                        route.action = action;
                    }
                }
                [_, second, ..] => self.err(
                    second.key_loc,
                    format!(
                        "a route takes one action, found `{}` and `{}`",
                        actions[0].key, second.key
                    ),
                    "keep one of `forward`, `redirect` and `respond`",
                ),
            }
            if self.diags.len() == before {
                seen.push(RouteSeen {
                    conditions: route.conditions_key(),
                    description: route.describe(),
                    priority: route.priority,
                    service: service.to_string(),
                    loc: item.loc,
                });
                out.push(route);
            }
        }
        out
    }

    fn check_path(&mut self, route: &Route, loc: Loc) {
        let p = &route.path;
        let example = |s: &Self, v: &str| format!("write e.g. {}", s.syn.ex("path", v));
        match route.path_match {
            PathMatch::Glob if !(p.starts_with('/') || p.starts_with('*')) => {
                let hint = example(self, &format!("\"/{p}\""));
                self.err(
                    loc,
                    format!("route path `{p}` must start with '/' or '*'"),
                    hint,
                )
            }
            PathMatch::Prefix | PathMatch::Exact if !p.starts_with('/') => {
                let hint = example(self, &format!("\"/{p}\""));
                self.err(loc, format!("route path `{p}` must start with '/'"), hint)
            }
            PathMatch::Prefix | PathMatch::Exact if p.contains(['*', '?']) => self.err(
                loc,
                format!(
                    "route path `{p}` has a wildcard, but the path is matched as a {}",
                    route.path_match.as_str()
                ),
                "add `path_match = \"glob\"` to match `*` (any characters) and `?` (one)",
            ),
            _ if p.len() > 1024 || p.chars().any(|c| c.is_whitespace() || c.is_control()) => self
                .err(
                    loc,
                    format!(
                        "route path `{p}` has spaces or control characters, or is over 1024 bytes"
                    ),
                    "a path is what a request line carries: percent-encode what it cannot",
                ),
            _ => {}
        }
    }

    fn methods(&mut self, e: &Entry) -> Vec<String> {
        let Some(items) = self.strings(e, "[\"GET\", \"HEAD\"]") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (m, loc) in items {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
                self.err(
                    loc,
                    format!("`{m}` is not an HTTP method"),
                    "write method names such as \"GET\", \"POST\", \"DELETE\"",
                );
            } else {
                out.push(m.to_ascii_uppercase());
            }
        }
        out
    }

    /// A string, or an array of strings, each with its location.
    fn strings(&mut self, e: &Entry, example: &str) -> Option<Vec<(String, Loc)>> {
        let items = match &e.node.val {
            Val::Str(s) => return Some(vec![(s.clone(), e.node.loc)]),
            Val::Array(items) => items,
            _ => {
                self.type_err(e, "a string or an array of strings", example);
                return None;
            }
        };
        let mut out = Vec::new();
        for item in items {
            match &item.val {
                Val::Str(s) => out.push((s.clone(), item.loc)),
                other => {
                    let found = other.type_name();
                    self.err(
                        item.loc,
                        format!("`{}` holds {found}; it takes strings", e.key),
                        format!("write e.g. {}", self.syn.ex(&e.key, example)),
                    );
                    return None;
                }
            }
        }
        if out.is_empty() || out.len() > MAX_CONDITIONS {
            self.err(
                e.node.loc,
                format!("`{}` takes 1 to {MAX_CONDITIONS} values", e.key),
                format!("write e.g. {}", self.syn.ex(&e.key, example)),
            );
            return None;
        }
        Some(out)
    }

    /// `headers = { "x-canary" = "on" }` or `query = { v = ["2", "3"] }`.
    fn value_matches(&mut self, e: &Entry, header: bool) -> Vec<ValueMatch> {
        let example = if header {
            "{ \"x-canary\" = \"on\" }"
        } else {
            "{ version = [\"2\", \"3\"] }"
        };
        if !self.is_table(e, &self.syn.ex(&e.key, example)) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for v in entries(&e.node) {
            let name_ok = if header {
                !v.key.is_empty()
                    && v.key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            } else {
                !v.key.is_empty()
            };
            if !name_ok {
                self.err(
                    v.key_loc,
                    format!("`{}` is not a header name", v.key),
                    "header names are letters, digits and `-`, e.g. \"x-canary\"",
                );
                continue;
            }
            let Some(values) = self.strings(v, "\"on\"") else {
                continue;
            };
            if let Some((bad, loc)) = values.iter().find(|(s, _)| s.chars().any(char::is_control)) {
                self.err(
                    *loc,
                    format!("the value for `{}` has control characters: {bad:?}", v.key),
                    "match printable text; `*` and `?` are wildcards",
                );
                continue;
            }
            out.push(ValueMatch {
                name: if header {
                    v.key.to_ascii_lowercase()
                } else {
                    v.key.clone()
                },
                values: values.into_iter().map(|(s, _)| s).collect(),
            });
        }
        if out.len() > MAX_CONDITIONS {
            self.err(
                e.node.loc,
                format!("`{}` names more than {MAX_CONDITIONS}", e.key),
                "split the rule, or match fewer names",
            );
        }
        out
    }

    fn sources(&mut self, e: &Entry) -> Vec<String> {
        let Some(items) = self.strings(e, "[\"10.0.0.0/8\"]") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (s, loc) in items {
            match s.parse::<Cidr>() {
                Ok(_) => out.push(s),
                Err(m) => self.err(loc, m, "a source is an address block of clients"),
            }
        }
        out
    }

    fn action(&mut self, e: &Entry) -> Option<RouteAction> {
        match e.key.as_str() {
            "forward" => {
                if !self.is_table(e, "`forward = { web = 90, web-next = 10 }`") {
                    return None;
                }
                let mut weights = Vec::new();
                for w in entries(&e.node) {
                    let weight = self.int_of(w, "10")?;
                    let Ok(weight @ 0..=1000) = u32::try_from(weight) else {
                        self.err(
                            w.node.loc,
                            format!("weight {weight} for `{}` is out of range", w.key),
                            "weights are 0 to 1000; each service gets its share of their sum",
                        );
                        return None;
                    };
                    self.forwards_seen.push((w.key.clone(), w.key_loc));
                    weights.push(Weight {
                        service: w.key.clone(),
                        weight,
                    });
                }
                if weights.iter().all(|w| w.weight == 0) {
                    self.err(
                        e.node.loc,
                        "`forward` gives no service a share",
                        "give at least one service a weight above 0, e.g. `{ web = 90, web-next = 10 }`",
                    );
                    return None;
                }
                Some(RouteAction::Forward { weights })
            }
            "redirect" => self.redirect(e).map(RouteAction::Redirect),
            _ => self.respond(e).map(RouteAction::Respond),
        }
    }

    fn redirect(&mut self, e: &Entry) -> Option<Redirect> {
        if !self.is_table(e, "`redirect = { scheme = \"https\" }`") {
            return None;
        }
        let before = self.diags.len();
        let mut r = Redirect {
            scheme: None,
            host: None,
            port: None,
            path: None,
            query: None,
            status: 301,
        };
        for k in entries(&e.node) {
            match k.key.as_str() {
                "scheme" => match self.str_of(k, "\"https\"") {
                    Some(s @ ("http" | "https")) => r.scheme = Some(s.to_string()),
                    Some(s) => self.err(
                        k.node.loc,
                        format!("redirect scheme `{s}` is not http or https"),
                        "write `scheme = \"https\"`",
                    ),
                    None => {}
                },
                "host" => {
                    if let Some(h) = self.str_of(k, "\"www.example.com\"") {
                        // `#{host}` may stand for the request's host; nothing else may come
                        // from the request here (a path or query would move the redirect).
                        let plain = h.replace("#{host}", "host");
                        if plain.starts_with("*.") || !is_route_host(&plain) {
                            self.err(
                                k.node.loc,
                                format!("redirect host `{h}` is not a host name"),
                                "write a lowercase host name such as \"www.example.com\", or one with `#{host}` for the request's, e.g. \"www.#{host}\"",
                            );
                        }
                        r.host = Some(h.to_string());
                    }
                }
                "port" => match self.int_of(k, "443").map(u16::try_from) {
                    Some(Ok(p)) if p > 0 => r.port = Some(p),
                    Some(_) => self.err(
                        k.node.loc,
                        "redirect port is out of range",
                        "use 1 to 65535",
                    ),
                    None => {}
                },
                "path" => {
                    if let Some(p) = self.str_of(k, "\"/new#{path}\"") {
                        if !p.starts_with('/') || p.contains([' ', '?', '#']) && !p.contains("#{") {
                            self.err(
                                k.node.loc,
                                format!(
                                    "redirect path `{p}` must start with '/' and hold no query"
                                ),
                                "write e.g. \"/new/#{path}\"; give a query with `query`",
                            );
                        }
                        r.path = Some(p.to_string());
                    }
                }
                "query" => {
                    if let Some(q) = self.str_of(k, "\"#{query}&from=old\"") {
                        r.query = Some(q.trim_start_matches('?').to_string());
                    }
                }
                "status" => match self.int_of(k, "301") {
                    Some(s @ (301 | 302 | 303 | 307 | 308)) => r.status = s as u16,
                    Some(s) => self.err(
                        k.node.loc,
                        format!("redirect status {s} is not a redirect"),
                        "use 301 or 308 (permanent), 302, 303 or 307 (temporary)",
                    ),
                    None => {}
                },
                _ => self
                    .diags
                    .push(unknown_key(k, REDIRECT_KEYS, "in a redirect")),
            }
        }
        if r.scheme.is_none()
            && r.host.is_none()
            && r.port.is_none()
            && r.path.is_none()
            && r.query.is_none()
        {
            self.err(
                e.node.loc,
                "this redirect sends the client to the URL it asked for",
                "change at least one of scheme, host, port, path and query, e.g. `{ scheme = \"https\" }`",
            );
        }
        (self.diags.len() == before).then_some(r)
    }

    fn respond(&mut self, e: &Entry) -> Option<FixedResponse> {
        if !self.is_table(e, "`respond = { status = 503, body = \"back soon\" }`") {
            return None;
        }
        let before = self.diags.len();
        let mut r = FixedResponse {
            status: 200,
            body: String::new(),
            content_type: "text/plain; charset=utf-8".into(),
        };
        for k in entries(&e.node) {
            match k.key.as_str() {
                "status" => match self.int_of(k, "503") {
                    Some(s @ 200..=599) => r.status = s as u16,
                    Some(s) => self.err(
                        k.node.loc,
                        format!("response status {s} is out of range"),
                        "use a final status, 200 to 599",
                    ),
                    None => {}
                },
                "body" => {
                    if let Some(b) = self.str_of(k, "\"back soon\"") {
                        if b.len() > MAX_FIXED_BODY {
                            self.err(
                                k.node.loc,
                                format!(
                                    "response body of {} bytes is over {} KiB",
                                    b.len(),
                                    MAX_FIXED_BODY >> 10
                                ),
                                "serve bigger answers from a service",
                            );
                        }
                        r.body = b.to_string();
                    }
                }
                "content_type" => {
                    if let Some(c) = self.str_of(k, "\"text/html\"") {
                        if c.is_empty() || c.chars().any(char::is_control) {
                            self.err(
                                k.node.loc,
                                format!("content type {c:?} is not a media type"),
                                "write e.g. \"text/html; charset=utf-8\"",
                            );
                        }
                        r.content_type = c.to_string();
                    }
                }
                _ => self
                    .diags
                    .push(unknown_key(k, RESPOND_KEYS, "in a fixed response")),
            }
        }
        (self.diags.len() == before).then_some(r)
    }

    /// After every service is read: what `forward` names must be services of the stack that
    /// listen on a port.
    pub(super) fn forwards_known(
        &mut self,
        names: &[String],
        services: &BTreeMap<String, Service>,
    ) {
        for (name, loc) in std::mem::take(&mut self.forwards_seen) {
            match services.get(&name) {
                Some(s) if s.port => {}
                _ if names.contains(&name) && !services.contains_key(&name) => {}
                Some(_) => self.err(
                    loc,
                    format!("`forward` names `{name}`, which has `port = false`"),
                    "a forwarded request goes to the service's $PORT: set `port = true` on it",
                ),
                None => self.err(
                    loc,
                    format!("`forward` names `{name}`, which is not a service of this stack"),
                    format!("services here: {}", names.join(", ")),
                ),
            }
        }
    }

    pub(super) fn duplicate_routes(&mut self, mut seen: Vec<RouteSeen>) {
        seen.sort_by_key(|r| r.loc);
        for (i, r) in seen.iter().enumerate() {
            let earlier = seen.get(..i).unwrap_or(&[]);
            let same = earlier.iter().find(|p| p.conditions == r.conditions);
            let same_priority = earlier
                .iter()
                .find(|p| p.priority.is_some() && p.priority == r.priority);
            let where_ = |p: &RouteSeen| {
                format!(
                    "service `{}` at line {}, column {}{}",
                    p.service,
                    p.loc.line,
                    p.loc.col,
                    if p.loc.file == r.loc.file {
                        ""
                    } else {
                        " of the main stack file"
                    }
                )
            };
            if let Some(p) = same {
                self.diags.push(Diag::new(
                    r.loc,
                    format!(
                        "duplicate route `{}`: already declared by {}",
                        r.description,
                        where_(p)
                    ),
                    "two rules with the same conditions cannot both be served; change a condition or remove one route",
                ));
            } else if let Some(p) = same_priority {
                self.diags.push(Diag::new(
                    r.loc,
                    format!(
                        "route priority {} is already taken by {}",
                        r.priority.unwrap_or(0),
                        where_(p)
                    ),
                    "priorities order rules, so each is used once; pick another number",
                ));
            }
        }
    }

    /// `[services.web.balance]`.
    pub(super) fn balance(&mut self, e: &Entry) -> Balance {
        let mut b = Balance::default();
        if !self.is_table(
            e,
            "[services.web.balance] with `algorithm = \"least_outstanding\"`",
        ) {
            return b;
        }
        for k in entries(&e.node) {
            match k.key.as_str() {
                "algorithm" => match self.str_of(k, "\"least_outstanding\"") {
                    Some("round_robin") => b.algorithm = Algorithm::RoundRobin,
                    Some("least_outstanding") => b.algorithm = Algorithm::LeastOutstanding,
                    Some(a) => self.err(
                        k.node.loc,
                        format!("unknown balance algorithm `{a}`"),
                        "use \"round_robin\" (the default) or \"least_outstanding\"",
                    ),
                    None => {}
                },
                "slow_start" => match self.duration_of(k) {
                    Some(ms) if ms <= MAX_SLOW_START_MS => b.slow_start_ms = ms,
                    Some(_) => self.err(
                        k.node.loc,
                        "`slow_start` over 15 minutes",
                        "a new target reaches its full share over at most \"15m\"",
                    ),
                    None => {}
                },
                "sticky" => b.sticky = self.sticky(k),
                "outlier" => {
                    if let Some(o) = self.outlier(k) {
                        b.outlier = o;
                    }
                }
                _ => self
                    .diags
                    .push(unknown_key(k, BALANCE_KEYS, "in `balance`")),
            }
        }
        b
    }

    /// `sticky = true`, `sticky = "1h"` or `sticky = { cookie = "...", duration = "1h" }`.
    fn sticky(&mut self, e: &Entry) -> Option<Sticky> {
        let mut s = Sticky {
            cookie: "dozen-target".into(),
            duration_ms: DEFAULT_STICKY_MS,
        };
        match &e.node.val {
            Val::Bool(false) => return None,
            Val::Bool(true) => {}
            Val::Str(_) => s.duration_ms = self.duration_of(e)?,
            Val::Table(_) => {
                for k in entries(&e.node) {
                    match k.key.as_str() {
                        "cookie" => {
                            let c = self.str_of(k, "\"shop-session\"")?;
                            if c.is_empty()
                                || c.len() > 64
                                || !c
                                    .bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                            {
                                self.err(
                                    k.node.loc,
                                    format!("`{c}` cannot name a cookie"),
                                    "use letters, digits, `-`, `_` and `.`, at most 64",
                                );
                                return None;
                            }
                            s.cookie = c.to_string();
                        }
                        "duration" => s.duration_ms = self.duration_of(k)?,
                        _ => self.diags.push(unknown_key(k, STICKY_KEYS, "in `sticky`")),
                    }
                }
            }
            _ => {
                self.type_err(e, "true, a duration or a table", "{ duration = \"1h\" }");
                return None;
            }
        }
        if s.duration_ms < 1000 {
            self.err(
                e.node.loc,
                "a sticky duration under a second",
                "use e.g. \"1h\"",
            );
            return None;
        }
        Some(s)
    }

    /// `outlier = false` or `outlier = { errors = 5, ejection = "30s" }`.
    fn outlier(&mut self, e: &Entry) -> Option<Outlier> {
        let mut o = Outlier::default();
        match &e.node.val {
            Val::Bool(false) => o.consecutive_errors = 0,
            Val::Bool(true) => {}
            Val::Table(_) => {
                for k in entries(&e.node) {
                    match k.key.as_str() {
                        "errors" => match self.int_of(k, "5")? {
                            n @ 1..=1000 => o.consecutive_errors = n as u32,
                            n => self.err(
                                k.node.loc,
                                format!("`errors = {n}` is out of range"),
                                "give 1 to 1000 failures in a row, or `outlier = false` to never eject",
                            ),
                        },
                        "ejection" => match self.duration_of(k)? {
                            0 => self.err(k.node.loc, "an ejection of no time", "use e.g. \"30s\""),
                            ms if ms > MAX_EJECTION_MS => self.err(
                                k.node.loc,
                                "an ejection over an hour",
                                "use at most \"1h\"; the target proves itself again after it",
                            ),
                            ms => o.ejection_ms = ms,
                        },
                        _ => self.diags.push(unknown_key(k, OUTLIER_KEYS, "in `outlier`")),
                    }
                }
            }
            _ => {
                self.type_err(e, "false or a table", "{ errors = 5, ejection = \"30s\" }");
                return None;
            }
        }
        Some(o)
    }
}
