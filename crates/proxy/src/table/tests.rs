use super::*;
use dozen_model::{Target, TargetGroup};
use dozen_spec::{Balance, Route, RouteAction, Weight};

fn entry(service: &str, rule: Route) -> RouteEntry {
    RouteEntry {
        service: service.into(),
        stack: "s".into(),
        strip_prefix: rule.path.starts_with("/_/"),
        rule,
    }
}

fn group(name: &str, addrs: &[&str]) -> TargetGroup {
    TargetGroup {
        name: name.into(),
        balance: Balance::default(),
        targets: addrs
            .iter()
            .map(|a| Target {
                task: format!("{name}-{a}"),
                addr: a.to_string(),
            })
            .collect(),
    }
}

fn table(routes: Vec<RouteEntry>) -> Table {
    let mut groups: Vec<TargetGroup> = Vec::new();
    for r in &routes {
        for (name, _) in r.groups() {
            if !groups.iter().any(|g| g.name == name) {
                groups.push(group(name, &[&format!("{name}:1")]));
            }
        }
    }
    Table::new(RouteTable {
        revision: 1,
        routes,
        groups,
    })
}

struct Req {
    host: &'static str,
    path: &'static str,
    query: Option<&'static str>,
    method: &'static str,
    headers: HeaderMap,
    client: IpAddr,
    internal: bool,
}

fn req(host: &'static str, path: &'static str) -> Req {
    Req {
        host,
        path,
        query: None,
        method: "GET",
        headers: HeaderMap::new(),
        client: "127.0.0.1".parse().unwrap(),
        internal: false,
    }
}

impl Req {
    fn service(&self, t: &Table) -> Option<String> {
        t.find(&self.view()).map(|r| r.service.clone())
    }

    fn view(&self) -> Request<'_> {
        Request {
            scheme: "http",
            host: self.host,
            path: self.path,
            query: self.query,
            method: self.method,
            headers: &self.headers,
            client: self.client,
            internal: self.internal,
        }
    }
}

fn prefix(path: &str) -> Route {
    Route::prefix(path)
}

fn on_host(host: &str, path: &str) -> Route {
    Route {
        host: Some(host.into()),
        ..Route::prefix(path)
    }
}

#[test]
fn longest_prefix_on_segment_boundaries_and_host_rules_first() {
    let t = table(vec![
        entry("web", prefix("/")),
        entry("api", prefix("/api")),
        entry("shop", on_host("shop.local", "/")),
        entry("wild", on_host("*.example.com", "/")),
        entry(
            "orders",
            Route {
                internal: true,
                ..prefix("/_/orders")
            },
        ),
    ]);
    let svc = |host, path, internal| {
        let mut r = req(host, path);
        r.internal = internal;
        r.service(&t)
    };
    assert_eq!(svc("x", "/api/items", false).as_deref(), Some("api"));
    assert_eq!(svc("x", "/api", false).as_deref(), Some("api"));
    assert_eq!(svc("x", "/apiary", false).as_deref(), Some("web"));
    assert_eq!(
        svc("shop.local:7780", "/api", false).as_deref(),
        Some("api")
    );
    assert_eq!(svc("SHOP.local", "/", false).as_deref(), Some("shop"));
    assert_eq!(svc("a.example.com", "/", false).as_deref(), Some("wild"));
    assert_eq!(svc("aexample.com", "/", false).as_deref(), Some("web"));
    assert_eq!(svc("example.com", "/", false).as_deref(), Some("web"));
    assert_eq!(svc("x", "/_/orders/1", false).as_deref(), Some("web"));
    assert_eq!(svc("x", "/_/orders/1", true).as_deref(), Some("orders"));
    let r = req("x", "/_/orders/1");
    let mut r = r;
    r.internal = true;
    let orders = t.find(&r.view()).unwrap();
    assert_eq!(orders.upstream_path("/_/orders/1?q=2"), "/1?q=2");
    assert_eq!(orders.upstream_path("/_/orders"), "/");
}

#[test]
fn every_condition_kind_and_priorities() {
    let mut canary = prefix("/");
    canary.headers = vec![ValueMatch {
        name: "x-canary".into(),
        values: vec!["on".into(), "yes*".into()],
    }];
    let mut v2 = prefix("/");
    v2.query = vec![ValueMatch {
        name: "v".into(),
        values: vec!["2".into()],
    }];
    let mut writes = prefix("/");
    writes.methods = vec!["POST".into(), "PUT".into()];
    let mut office = prefix("/admin");
    office.sources = vec!["10.0.0.0/8".into()];
    let mut exact = prefix("/admin/login");
    exact.path_match = PathMatch::Exact;
    let mut images = prefix("/static/*.png");
    images.path_match = PathMatch::Glob;
    let mut first = prefix("/");
    first.priority = Some(1);
    first.headers = vec![ValueMatch {
        name: "x-first".into(),
        values: vec!["*".into()],
    }];
    let t = table(vec![
        entry("web", prefix("/")),
        entry("canary", canary),
        entry("v2", v2),
        entry("writes", writes),
        entry("office", office),
        entry("login", exact),
        entry("images", images),
        entry("first", first),
    ]);
    let base = || req("h", "/x");
    assert_eq!(base().service(&t).as_deref(), Some("web"));
    let mut r = base();
    r.headers.insert("x-canary", "YES please".parse().unwrap());
    assert_eq!(r.service(&t).as_deref(), Some("canary"), "values fold case");
    let mut r = base();
    r.query = Some("a=1&v=2");
    assert_eq!(r.service(&t).as_deref(), Some("v2"));
    r.query = Some("v=20");
    assert_eq!(r.service(&t).as_deref(), Some("web"));
    let mut r = base();
    r.method = "PUT";
    assert_eq!(r.service(&t).as_deref(), Some("writes"));
    let mut r = req("h", "/admin/x");
    assert_eq!(r.service(&t).as_deref(), Some("web"), "not from the office");
    r.client = "10.2.3.4".parse().unwrap();
    assert_eq!(r.service(&t).as_deref(), Some("office"));
    let r = req("h", "/admin/login");
    assert_eq!(
        r.service(&t).as_deref(),
        Some("login"),
        "exact beats prefix"
    );
    let r = req("h", "/static/a/b.png");
    assert_eq!(r.service(&t).as_deref(), Some("images"));
    let r = req("h", "/static/a/b.gif");
    assert_eq!(r.service(&t).as_deref(), Some("web"));
    let mut r = req("h", "/static/a/b.png");
    r.headers.insert("x-first", "".parse().unwrap());
    assert_eq!(
        r.service(&t).as_deref(),
        Some("first"),
        "a priority comes first"
    );
    // Why each rule before the match missed.
    let r = req("h", "/admin/x");
    let why = t.explain(&r.view());
    let last = why.last().unwrap();
    assert_eq!(last.0.service, "web");
    assert!(why
        .iter()
        .any(|(rule, m)| rule.service == "office" && *m == Err(Miss::Source)));
    assert!(why
        .iter()
        .any(|(rule, m)| rule.service == "canary" && *m == Err(Miss::Header("x-canary".into()))));
}

/// Seen in review: a priority rule on `/` (an http-to-https redirect, say) came before the
/// implicit `/_/<service>` rules and hid service discovery on the internal listener.
#[test]
fn discovery_comes_before_every_declared_rule() {
    let mut everything = prefix("/");
    everything.priority = Some(1);
    let t = table(vec![
        entry("web", everything),
        entry(
            "orders",
            Route {
                internal: true,
                ..prefix("/_/orders")
            },
        ),
    ]);
    let mut r = req("x", "/_/orders/1");
    r.internal = true;
    assert_eq!(r.service(&t).as_deref(), Some("orders"));
    r.internal = false;
    assert_eq!(r.service(&t).as_deref(), Some("web"));
}

#[test]
fn query_values_are_decoded() {
    let mut q = prefix("/");
    q.query = vec![ValueMatch {
        name: "name".into(),
        values: vec!["a b/c".into()],
    }];
    let t = table(vec![entry("q", q)]);
    let mut r = req("h", "/");
    r.query = Some("name=a+b%2Fc");
    assert_eq!(r.service(&t).as_deref(), Some("q"));
    r.query = Some("name=a+b%2");
    assert_eq!(r.service(&t), None);
}

#[test]
fn weights_split_exactly_and_interleave() {
    let mut split = prefix("/");
    split.action = RouteAction::Forward {
        weights: vec![
            Weight {
                service: "blue".into(),
                weight: 90,
            },
            Weight {
                service: "green".into(),
                weight: 10,
            },
        ],
    };
    let t = table(vec![entry("blue", split)]);
    let r = req("h", "/");
    let rule = t.find(&r.view()).unwrap();
    let picks: Vec<String> = (0..1000)
        .map(|_| rule.pick(&r.headers).unwrap().0.name.clone())
        .collect();
    let green = picks.iter().filter(|g| *g == "green").count();
    assert_eq!(green, 100);
    let longest_blue_run = picks
        .split(|g| g == "green")
        .map(|run| run.len())
        .max()
        .unwrap();
    assert!(longest_blue_run < 20, "{longest_blue_run}");
}

#[test]
fn round_robin_goes_on_across_table_rebuilds() {
    let tables = |previous: Option<&Table>, revision| {
        Table::after(
            previous,
            RouteTable {
                revision,
                routes: vec![entry("web", prefix("/"))],
                groups: vec![group("web", &["a:1", "b:1", "c:1"])],
            },
        )
    };
    let mut t = tables(None, 1);
    let mut picked = Vec::new();
    for revision in 2..=7 {
        let r = req("x", "/");
        let rule = t.find(&r.view()).unwrap();
        picked.push(rule.pick(&r.headers).unwrap().1.target.addr.clone());
        t = tables(Some(&t), revision);
    }
    assert_eq!(picked, ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1"]);
}
