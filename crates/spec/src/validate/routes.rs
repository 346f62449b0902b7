//! `routes`: hosts and path prefixes, and routes two services both claim.

use crate::node::{Entry, Val};
use crate::types::*;
use crate::units::*;

use super::{entries, unknown_key, Diag, RouteSeen, Validator, ROUTE_KEYS};

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
            let mut route = Route {
                host: None,
                path_prefix: "/".into(),
                internal: false,
            };
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
                            if p.starts_with('/') {
                                route.path_prefix = p.to_string();
                            } else {
                                self.err(
                                    r.node.loc,
                                    format!("route path `{p}` must start with '/'"),
                                    format!(
                                        "write e.g. {}",
                                        self.syn.ex("path", &format!("\"/{p}\""))
                                    ),
                                );
                            }
                        }
                    }
                    "internal" => {
                        if let Some(b) = self.bool_of(r) {
                            route.internal = b;
                        }
                    }
                    _ => self.diags.push(unknown_key(r, ROUTE_KEYS, "in a route")),
                }
            }
            if self.diags.len() == before {
                seen.push(RouteSeen {
                    host: route.host.clone(),
                    path: route.path_prefix.clone(),
                    service: service.to_string(),
                    loc: item.loc,
                });
                out.push(route);
            }
        }
        out
    }

    pub(super) fn duplicate_routes(&mut self, mut seen: Vec<RouteSeen>) {
        seen.sort_by_key(|r| r.loc);
        for (i, r) in seen.iter().enumerate() {
            let first = seen
                .get(..i)
                .unwrap_or(&[])
                .iter()
                .find(|p| p.host == r.host && p.path == r.path);
            if let Some(p) = first {
                let host = r.host.as_deref().unwrap_or("<any host>");
                self.diags.push(Diag {
                    loc: r.loc,
                    message: format!(
                        "duplicate route host `{host}` path `{}`: already declared by service `{}` at line {}, column {}{}",
                        r.path,
                        p.service,
                        p.loc.line,
                        p.loc.col,
                        if p.loc.file == r.loc.file {
                            ""
                        } else {
                            " of the main stack file"
                        }
                    ),
                    hint: Some(
                        "each (host, path) pair may be routed to only one service; change the host or path, or remove one route"
                            .into(),
                    ),
                });
            }
        }
    }
}
