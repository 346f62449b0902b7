//! plan(): create / update / unchanged / remove / replica drift.

use std::collections::BTreeMap;

use dozen_spec::{parse_str, plan, Format, LiveService, PlanAction, Service, Stack};
use serde_json::json;

fn stack(src: &str) -> Stack {
    parse_str(src, "dozen.toml", Format::Toml, None).unwrap()
}

fn live(pairs: &[(&str, &Service, u32)]) -> BTreeMap<String, LiveService> {
    pairs
        .iter()
        .map(|(n, s, r)| {
            (
                n.to_string(),
                LiveService {
                    spec: (*s).clone(),
                    replicas: *r,
                },
            )
        })
        .collect()
}

const V1: &str = r#"name = "demo"
[services.web]
command = "./web"
replicas = 2
[services.web.env]
LOG_LEVEL = "info"
[services.api]
command = "./api"
"#;

#[test]
fn everything_new_is_created() {
    let s = stack(V1);
    let p = plan(&s, &BTreeMap::new());
    assert_eq!(p.stack, "demo");
    let names: Vec<&str> = p.services.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(names, vec!["api", "web"], "sorted by name");
    assert!(p.services.iter().all(|s| s.action == PlanAction::Create));
    let web = &p.services[1];
    assert_eq!(
        (web.replicas.live, web.replicas.file, web.replicas.result),
        (None, Some(2), 2)
    );
    let api = &p.services[0];
    assert_eq!(
        (api.replicas.live, api.replicas.file, api.replicas.result),
        (None, None, 1)
    );
    assert!(web
        .fields
        .iter()
        .any(|f| f.path == "command" && f.before.is_none()));
    assert!(!web.fields.iter().any(|f| f.path == "replicas"));
    assert!(p.has_changes());
}

#[test]
fn identical_is_unchanged() {
    let s = stack(V1);
    let l = live(&[
        ("web", &s.services["web"], 2),
        ("api", &s.services["api"], 1),
    ]);
    let p = plan(&s, &l);
    assert!(
        p.services.iter().all(|s| s.action == PlanAction::Unchanged),
        "{p:#?}"
    );
    assert!(p.services.iter().all(|s| s.fields.is_empty()));
    assert!(!p.has_changes());
    // api has no replicas in the file: keep the live count.
    assert_eq!(p.services[0].replicas.result, 1);
}

#[test]
fn updates_list_field_paths() {
    let old = stack(V1);
    let new = stack(
        r#"name = "demo"
[services.web]
command = ["./web", "--v2"]
replicas = 2
stop_timeout = "30s"
[services.web.env]
LOG_LEVEL = "debug"
NEW = "1"
[services.web.health]
http = "/healthz"
[services.api]
command = "./api"
"#,
    );
    let l = live(&[
        ("web", &old.services["web"], 2),
        ("api", &old.services["api"], 1),
    ]);
    let p = plan(&new, &l);
    let web = p.services.iter().find(|s| s.service == "web").unwrap();
    assert_eq!(web.action, PlanAction::Update);
    let paths: Vec<&str> = web.fields.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "command",
            "env.LOG_LEVEL",
            "env.NEW",
            "health",
            "stop_timeout_ms"
        ]
    );
    let f = |p: &str| web.fields.iter().find(|f| f.path == p).unwrap();
    assert_eq!(f("env.LOG_LEVEL").before, Some(json!("info")));
    assert_eq!(f("env.LOG_LEVEL").after, Some(json!("debug")));
    assert_eq!(f("env.NEW").before, None);
    assert_eq!(f("health").before, None);
    assert_eq!(f("stop_timeout_ms").after, Some(json!(30_000)));
    assert_eq!(f("command").before, Some(json!("./web")));
    assert_eq!(f("command").after, Some(json!(["./web", "--v2"])));
    let api = p.services.iter().find(|s| s.service == "api").unwrap();
    assert_eq!(api.action, PlanAction::Unchanged);
    assert!(p.has_changes());
}

#[test]
fn nested_leaf_paths() {
    let old = stack(
        "name = \"d\"\n[services.web]\ncommand = \"x\"\n[services.web.health]\nhttp = \"/\"\n",
    );
    let new = stack("name = \"d\"\n[services.web]\ncommand = \"x\"\n[services.web.health]\nhttp = \"/\"\ninterval = \"10s\"\n");
    let p = plan(&new, &live(&[("web", &old.services["web"], 1)]));
    let paths: Vec<&str> = p.services[0]
        .fields
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(paths, vec!["health.interval_ms"]);
}

#[test]
fn enum_variant_changes_are_whole() {
    let old = stack(
        "name = \"d\"\n[services.web]\ncommand = \"x\"\n[services.web.health]\nhttp = \"/\"\n",
    );
    let new = stack("name = \"d\"\n[services.web]\ncommand = \"x\"\nstop_after = \"5s\"\n[services.web.health]\ntcp = true\n");
    let p = plan(&new, &live(&[("web", &old.services["web"], 1)]));
    let fields = &p.services[0].fields;
    let paths: Vec<&str> = fields.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, vec!["health.kind", "on_disconnect"]);
    assert_eq!(fields[0].before, Some(json!({"kind": "http", "path": "/"})));
    assert_eq!(fields[0].after, Some(json!({"kind": "tcp"})));
    assert_eq!(
        fields[1].after,
        Some(json!({"mode": "stop_after", "after_ms": 5000}))
    );
}

#[test]
fn missing_from_file_is_removed() {
    let old = stack(V1);
    let new = stack("name = \"demo\"\n[services.web]\ncommand = \"./web\"\nreplicas = 2\n[services.web.env]\nLOG_LEVEL = \"info\"\n");
    let l = live(&[
        ("web", &old.services["web"], 2),
        ("api", &old.services["api"], 3),
    ]);
    let p = plan(&new, &l);
    let api = p.services.iter().find(|s| s.service == "api").unwrap();
    assert_eq!(api.action, PlanAction::Remove);
    assert_eq!(
        (api.replicas.live, api.replicas.file, api.replicas.result),
        (Some(3), None, 0)
    );
    assert!(p.has_changes());
}

#[test]
fn replica_drift_and_scale() {
    let s = stack(V1);
    // Live was scaled to 5 by hand; the file says 2: result follows the file.
    let l = live(&[
        ("web", &s.services["web"], 5),
        ("api", &s.services["api"], 4),
    ]);
    let p = plan(&s, &l);
    let web = p.services.iter().find(|s| s.service == "web").unwrap();
    assert_eq!(
        web.action,
        PlanAction::Unchanged,
        "replicas are not a field change"
    );
    assert!(web.fields.is_empty());
    assert_eq!(
        (web.replicas.live, web.replicas.file, web.replicas.result),
        (Some(5), Some(2), 2)
    );
    assert!(web.replicas.drift());
    // api: no replicas in the file, live 4 is kept, no drift.
    let api = p.services.iter().find(|s| s.service == "api").unwrap();
    assert_eq!(api.replicas.result, 4);
    assert!(!api.replicas.drift());
    assert!(p.has_changes(), "scaling web back to 2 is a change");
}

#[test]
fn plan_serialises_snake_case() {
    let s = stack(V1);
    let p = plan(&s, &BTreeMap::new());
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["services"][0]["action"], json!("create"));
    let back: dozen_spec::Plan = serde_json::from_value(v).unwrap();
    assert_eq!(back, p);
}

#[test]
fn service_model_round_trips_through_json() {
    let s = stack(
        r#"name = "demo"
[services.web]
command = ["./web"]
stop_after = "30s"
[services.web.health]
command = "true"
[[services.web.routes]]
host = "a.local"
"#,
    );
    let v = serde_json::to_string(&s).unwrap();
    let back: Stack = serde_json::from_str(&v).unwrap();
    assert_eq!(back, s);
}
