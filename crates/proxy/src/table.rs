//! The compiled route table and matching: host (exact, `*.suffix`, or any), then the longest
//! path prefix on a segment boundary; host-specific rules win over any-host rules.

use std::sync::atomic::{AtomicUsize, Ordering};

use dozen_model::RouteEntry;

pub struct Route {
    pub service: String,
    host: Option<String>,
    prefix: String,
    internal: bool,
    pub strip_prefix: bool,
    pub targets: Vec<String>,
    next: AtomicUsize,
}

impl Route {
    /// The next target in round-robin order, and the one after it (for a retry).
    pub fn pick(&self) -> Option<(&str, Option<&str>)> {
        let n = self.targets.len();
        if n == 0 {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let retry = (n > 1).then(|| self.targets[(i + 1) % n].as_str());
        Some((self.targets[i].as_str(), retry))
    }

    /// The path to send upstream.
    pub fn upstream_path<'a>(&self, path_and_query: &'a str) -> std::borrow::Cow<'a, str> {
        if !self.strip_prefix {
            return path_and_query.into();
        }
        // By byte position, but never inside a character (a path that did not come from a
        // request's ASCII URI passes through unchanged).
        let rest = path_and_query
            .get(self.prefix.len().min(path_and_query.len())..)
            .unwrap_or(path_and_query);
        if rest.starts_with('/') {
            rest.into()
        } else {
            format!("/{rest}").into()
        }
    }
}

#[derive(Default)]
pub struct Table {
    pub revision: u64,
    routes: Vec<Route>,
}

fn host_matches(rule: &Option<String>, host: &str) -> Option<u8> {
    match rule {
        None => Some(0),
        Some(h) if h == host => Some(2),
        Some(h) => h
            .strip_prefix("*.")
            .filter(|suffix| host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")))
            .map(|_| 1),
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
    pub fn new(revision: u64, entries: Vec<RouteEntry>) -> Self {
        Table::after(None, revision, entries)
    }

    /// The table for `entries`, each route's round-robin position taken over from the same
    /// route (service, host, prefix) of `previous`: a table is rebuilt on every status write,
    /// and starting each at 0 again sent most traffic to the first target.
    pub fn after(previous: Option<&Table>, revision: u64, entries: Vec<RouteEntry>) -> Self {
        let position = |e: &RouteEntry| {
            previous
                .and_then(|t| {
                    t.routes.iter().find(|r| {
                        r.service == e.service && r.host == e.host && r.prefix == e.path_prefix
                    })
                })
                .map_or(0, |r| r.next.load(Ordering::Relaxed))
        };
        let routes = entries
            .into_iter()
            .map(|e| {
                let next = AtomicUsize::new(position(&e));
                Route {
                    service: e.service,
                    host: e.host,
                    prefix: e.path_prefix,
                    internal: e.internal,
                    strip_prefix: e.strip_prefix,
                    targets: e.targets.into_iter().map(|t| t.addr).collect(),
                    next,
                }
            })
            .collect();
        Table { revision, routes }
    }

    /// The rule for a request. `internal`: the request came in on the internal listener,
    /// which serves every route; the public listener serves only public ones.
    pub fn find(&self, host: &str, path: &str, internal: bool) -> Option<&Route> {
        let host = host.split(':').next().unwrap_or(host);
        // Most clients send it lowercase already: no copy then.
        let host: std::borrow::Cow<str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            host.to_ascii_lowercase().into()
        } else {
            host.into()
        };
        self.routes
            .iter()
            .filter(|r| internal || !r.internal)
            .filter_map(|r| {
                let h = host_matches(&r.host, &host)?;
                prefix_matches(&r.prefix, path).then_some(((r.prefix.len(), h), r))
            })
            .max_by_key(|(rank, _)| *rank)
            .map(|(_, r)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dozen_model::Target;

    fn entry(service: &str, host: Option<&str>, prefix: &str, internal: bool) -> RouteEntry {
        RouteEntry {
            service: service.into(),
            host: host.map(Into::into),
            path_prefix: prefix.into(),
            internal,
            strip_prefix: prefix.starts_with("/_/"),
            targets: vec![Target {
                task: format!("{service}-1"),
                addr: format!("{service}:1"),
            }],
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries_and_host_rules_first() {
        let t = Table::new(
            1,
            vec![
                entry("web", None, "/", false),
                entry("api", None, "/api", false),
                entry("shop", Some("shop.local"), "/", false),
                entry("wild", Some("*.example.com"), "/", false),
                entry("orders", None, "/_/orders", true),
            ],
        );
        let svc = |host, path, internal| t.find(host, path, internal).map(|r| r.service.as_str());
        assert_eq!(svc("x", "/api/items", false), Some("api"));
        assert_eq!(svc("x", "/api", false), Some("api"));
        assert_eq!(
            svc("x", "/apiary", false),
            Some("web"),
            "prefix ends on a segment"
        );
        assert_eq!(
            svc("shop.local:7780", "/api", false),
            Some("api"),
            "longer path wins"
        );
        assert_eq!(svc("shop.local", "/", false), Some("shop"));
        assert_eq!(svc("a.example.com", "/", false), Some("wild"));
        assert_eq!(svc("example.com", "/", false), Some("web"));
        assert_eq!(
            svc("x", "/_/orders/1", false),
            Some("web"),
            "internal routes stay internal"
        );
        assert_eq!(svc("x", "/_/orders/1", true), Some("orders"));
        let orders = t.find("x", "/_/orders/1?q=2", true).unwrap();
        assert_eq!(orders.upstream_path("/_/orders/1?q=2"), "/1?q=2");
        assert_eq!(orders.upstream_path("/_/orders"), "/");
    }

    #[test]
    fn round_robin_with_a_different_target_to_retry() {
        let mut e = entry("web", None, "/", false);
        e.targets.push(Target {
            task: "web-2".into(),
            addr: "web:2".into(),
        });
        let t = Table::new(1, vec![e]);
        let r = t.find("h", "/", false).unwrap();
        let (a, retry_a) = r.pick().unwrap();
        let (b, _) = r.pick().unwrap();
        assert_ne!(a, b);
        assert_eq!(retry_a, Some(b));
    }

    /// Seen: every status write rebuilds the table, and each rebuild started round robin at the
    /// first target again, which then took most of the traffic.
    #[test]
    fn round_robin_goes_on_across_table_rebuilds() {
        let entries = || {
            let mut e = entry("web", None, "/", false);
            e.targets = ["a:1", "b:1", "c:1"]
                .iter()
                .map(|addr| Target {
                    task: addr.to_string(),
                    addr: addr.to_string(),
                })
                .collect();
            vec![e]
        };
        let mut table = Table::new(1, entries());
        let mut picked = Vec::new();
        for revision in 2..=7 {
            let route = table.find("x", "/", false).unwrap();
            picked.push(route.pick().unwrap().0.to_string());
            table = Table::after(Some(&table), revision, entries());
        }
        assert_eq!(picked, ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1"]);
    }
}
