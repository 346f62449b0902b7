//! The rule matcher meets whatever rules a table holds and whatever a client sends: random
//! hosts, prefixes and requests never make it panic, and what it picks is the rule's.

use dozen_model::{RouteEntry, Target};
use dozen_proxy::table::Table;
use proptest::prelude::*;

fn entry(service: usize, host: Option<String>, prefix: String, internal: bool) -> RouteEntry {
    RouteEntry {
        service: format!("s{service}"),
        host,
        path_prefix: prefix,
        internal,
        strip_prefix: service.is_multiple_of(2),
        targets: vec![Target {
            task: format!("s{service}-1"),
            addr: format!("127.0.0.1:{}", 1000 + service),
        }],
    }
}

fn text() -> impl Strategy<Value = String> {
    // Anything, and often the characters rules are made of.
    prop_oneof![
        ".{0,24}",
        "[a-z*./:?%\\-]{0,24}",
        Just(String::new()),
        Just("/".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_rules_and_requests_never_panic(
        rules in prop::collection::vec((prop::option::of(text()), text(), any::<bool>()), 0..12),
        host in text(),
        path in text(),
        internal in any::<bool>(),
    ) {
        let entries = rules
            .into_iter()
            .enumerate()
            .map(|(i, (h, p, int))| entry(i, h, p, int))
            .collect();
        let table = Table::new(1, entries);
        if let Some(route) = table.find(&host, &path, internal) {
            let (target, _) = route.pick().expect("every rule here has a target");
            prop_assert!(route.targets.iter().any(|t| t == target));
            let _ = route.upstream_path(&path);
        }
    }
}
