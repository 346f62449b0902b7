//! The rule matcher meets whatever rules a table holds and whatever a client sends: random
//! rules of every kind and random requests never make it panic, and what it picks is the
//! rule's.

use dozen_model::{RouteEntry, RouteTable, Target, TargetGroup};
use dozen_proxy::table::{Request, Table};
use dozen_spec::{PathMatch, Route, RouteAction, ValueMatch, Weight};
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    // Anything, and often the characters rules are made of.
    prop_oneof![
        ".{0,24}",
        "[a-z*./:?%=&\\-]{0,24}",
        Just(String::new()),
        Just("/".to_string()),
    ]
}

fn values() -> impl Strategy<Value = Vec<ValueMatch>> {
    prop::collection::vec(
        (text(), prop::collection::vec(text(), 1..3))
            .prop_map(|(name, values)| ValueMatch { name, values }),
        0..3,
    )
}

fn rule() -> impl Strategy<Value = Route> {
    (
        (
            prop::option::of(text()),
            text(),
            0..3u8,
            prop::collection::vec("[A-Z]{1,7}", 0..3),
        ),
        (
            values(),
            values(),
            prop::collection::vec(prop_oneof![text(), Just("10.0.0.0/8".to_string())], 0..2),
            prop::option::of(1..100u32),
            any::<bool>(),
            prop::collection::vec(0..4u32, 0..3),
        ),
    )
        .prop_map(
            |(
                (host, path, kind, methods),
                (headers, query, sources, priority, internal, weights),
            )| {
                Route {
                    host,
                    scheme: priority.map(|p| if p % 2 == 0 { "http" } else { "https" }.to_string()),
                    path,
                    path_match: [PathMatch::Prefix, PathMatch::Exact, PathMatch::Glob]
                        [usize::from(kind)],
                    methods,
                    headers,
                    query,
                    sources,
                    priority,
                    internal,
                    action: RouteAction::Forward {
                        weights: weights
                            .into_iter()
                            .enumerate()
                            .map(|(i, weight)| Weight {
                                service: format!("s{i}"),
                                weight,
                            })
                            .collect(),
                    },
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_rules_and_requests_never_panic(
        rules in prop::collection::vec(rule(), 0..12),
        host in text(),
        path in text(),
        query in prop::option::of(text()),
        method in "[A-Z]{0,7}",
        header in (text(), text()),
        internal in any::<bool>(),
    ) {
        let routes: Vec<RouteEntry> = rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| RouteEntry {
                service: format!("s{}", i % 4),
                stack: "x".into(),
                strip_prefix: i % 2 == 0,
                rule,
            })
            .collect();
        let groups = (0..4)
            .map(|i| TargetGroup {
                name: format!("s{i}"),
                balance: Default::default(),
                targets: vec![Target {
                    task: format!("s{i}-1"),
                    addr: format!("127.0.0.1:{}", 1000 + i),
                }],
            })
            .collect();
        let table = Table::new(RouteTable { revision: 1, routes, groups });
        let mut headers = hyper::HeaderMap::new();
        if let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(header.0.as_bytes()),
            hyper::header::HeaderValue::from_str(&header.1),
        ) {
            headers.insert(name, value);
        }
        let req = Request {
            scheme: if internal { "https" } else { "http" },
            host: &host,
            path: &path,
            query: query.as_deref(),
            method: &method,
            headers: &headers,
            client: "10.1.2.3".parse().unwrap(),
            internal,
        };
        let explained = table.explain(&req);
        if let Some(rule) = table.find(&req) {
            prop_assert!(explained.last().is_some_and(|(r, m)| std::ptr::eq(*r, rule) && m.is_ok()));
            if let Some((group, pick)) = rule.pick(&headers) {
                prop_assert!(group.targets.iter().any(|t| t.addr == pick.target.addr));
            }
            let _ = rule.upstream_path(&path);
        } else {
            prop_assert!(explained.iter().all(|(_, m)| m.is_err()));
        }
    }
}
