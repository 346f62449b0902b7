//! parse_bytes never panics: random bytes and random mutations of valid documents.

use dozen_spec::{parse_bytes, Format};
use proptest::prelude::*;

const VALID_TOML: &str = r#"name = "demo"

[services.web]
command = "./web --flag"
artifact = "./web-dist"
process_type = "web"
replicas = 2
port = true
stop_signal = "SIGTERM"
stop_timeout = "10s"
user = "nobody"
on_disconnect = "keep"
[services.web.env]
LOG_LEVEL = "info"
[services.web.health]
http = "/healthz"
interval = "5s"
timeout = "2s"
healthy_threshold = 1
unhealthy_threshold = 3
grace_period = "10s"
[services.web.resources]
cpu = 0.5
memory = "256MiB"
[[services.web.routes]]
host = "shop.local"
path = "/"

[env.prod.services.web]
replicas = 6
"#;

const VALID_YAML: &str = "name: demo
services:
  web:
    command: [\"./web\", \"--flag\"]
    replicas: 2
    env:
      LOG_LEVEL: info
    health:
      http: /healthz
    routes:
      - host: shop.local
        path: /
    resources:
      cpu: 500m
      memory: 1GiB
env:
  prod:
    services:
      web:
        replicas: 6
";

#[test]
fn the_fuzz_seeds_are_valid() {
    for env in [None, Some("prod")] {
        parse_bytes(VALID_TOML.as_bytes(), "f", Format::Toml, env).unwrap();
        parse_bytes(VALID_YAML.as_bytes(), "f", Format::Yaml, env).unwrap();
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Duplicate(usize, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let tokens = prop_oneof![
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"=".to_vec()),
        Just(b":".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"  ".to_vec()),
        Just(b"- ".to_vec()),
        Just(b"{".to_vec()),
        Just(b"&a *a".to_vec()),
        Just(b"[[services.web.routes]]\n".to_vec()),
        Just(b"\xff\xfe".to_vec()),
        Just("é".as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), tokens).prop_map(|(i, t)| Mutation::Insert(i, t)),
        (any::<usize>(), 0usize..40).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<usize>(), 0usize..60, any::<usize>())
            .prop_map(|(i, n, j)| Mutation::Duplicate(i, n, j)),
    ]
}

fn apply(mut doc: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let len = doc.len().max(1);
        match m {
            Mutation::Flip(i, b) => {
                if !doc.is_empty() {
                    let i = i % doc.len();
                    doc[i] = *b;
                }
            }
            Mutation::Insert(i, t) => {
                let i = i % (doc.len() + 1);
                doc.splice(i..i, t.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let i = i % len;
                let end = (i + n).min(doc.len());
                if i < end {
                    doc.drain(i..end);
                }
            }
            Mutation::Duplicate(i, n, j) => {
                let i = i % len;
                let end = (i + n).min(doc.len());
                if i < end {
                    let chunk: Vec<u8> = doc[i..end].to_vec();
                    let j = j % (doc.len() + 1);
                    doc.splice(j..j, chunk);
                }
            }
        }
    }
    doc
}

fn check(bytes: &[u8]) {
    for f in [Format::Toml, Format::Yaml] {
        for env in [None, Some("prod"), Some("x")] {
            match parse_bytes(bytes, "fuzz", f, env) {
                Ok(_) => {}
                Err(e) => {
                    assert!(!e.0.is_empty());
                    for err in &e.0 {
                        assert!(err.line >= 1 && err.column >= 1, "{err:?}");
                    }
                    let _ = e.to_string();
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes);
    }

    #[test]
    fn random_text_never_panics(s in "[a-z\\[\\]=\\-: \"\\n{}.,#0-9]{0,300}") {
        check(s.as_bytes());
    }

    #[test]
    fn mutated_toml_never_panics(muts in proptest::collection::vec(mutation(), 1..6)) {
        check(&apply(VALID_TOML.as_bytes().to_vec(), &muts));
    }

    #[test]
    fn mutated_yaml_never_panics(muts in proptest::collection::vec(mutation(), 1..6)) {
        check(&apply(VALID_YAML.as_bytes().to_vec(), &muts));
    }
}

#[test]
fn deep_nesting_does_not_overflow() {
    let deep = format!("x = {}{}", "[".repeat(10_000), "]".repeat(10_000));
    check(deep.as_bytes());
    let deep = format!("x: {}{}", "[".repeat(10_000), "]".repeat(10_000));
    check(deep.as_bytes());
    let deep = format!("x = {}", "{a = ".repeat(5_000));
    check(deep.as_bytes());
}
