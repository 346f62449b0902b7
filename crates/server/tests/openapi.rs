//! The OpenAPI document and the router agree: every route the router serves is documented,
//! every documented route is served (over real HTTP), and both are exactly the routes listed
//! in `dozen_api::paths::SERVER_ROUTES`, which the client builds from.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use dozen_api::paths::{fill, SERVER_ROUTES};
use dozen_server::AppState;
use dozen_store::blob::FsBlobStore;
use dozen_store::embedded::EmbeddedStore;

fn documented() -> BTreeSet<(String, String)> {
    let doc = serde_json::to_value(dozen_server::openapi()).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            if ["get", "head", "post", "put", "delete", "patch", "options"]
                .contains(&method.as_str())
            {
                out.insert((method.clone(), path.clone()));
            }
        }
    }
    out
}

fn listed() -> BTreeSet<(String, String)> {
    SERVER_ROUTES
        .iter()
        .flat_map(|(path, methods)| methods.iter().map(|m| (m.to_string(), path.to_string())))
        .collect()
}

#[test]
fn every_route_served_is_documented_and_listed() {
    let served: BTreeSet<(String, String)> = dozen_server::served_routes()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let documented = documented();
    assert_eq!(
        served.symmetric_difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "served vs documented"
    );
    assert_eq!(
        served.symmetric_difference(&listed()).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "served vs dozen_api::paths::SERVER_ROUTES"
    );
}

#[test]
fn the_document_describes_bodies_answers_and_credentials() {
    let doc = serde_json::to_value(dozen_server::openapi()).unwrap();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    let apply = &doc["paths"]["/v1/apply"]["post"];
    let body = &apply["requestBody"]["content"]["application/json"]["schema"];
    assert!(
        body.to_string().contains("stack"),
        "apply's body names its stack: {body}"
    );
    assert_eq!(apply["security"][0]["token"], serde_json::json!([]));
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "ErrorBody",
        "Stack",
        "Service",
        "TaskStatus",
        "NodeRecord",
        "Plan",
    ] {
        assert!(schemas.contains_key(name), "{name} missing from components");
    }
    // Every schema reference resolves.
    let text = doc.to_string();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "dangling $ref to {name}");
    }
    // Public routes say so; the rest need the token.
    assert!(doc["paths"]["/v1/join"]["post"].get("security").is_none());
    assert_eq!(
        doc["paths"]["/v1/nodes/{node}/status"]["put"]["parameters"][0]["name"],
        "node"
    );
}

#[tokio::test]
async fn every_documented_route_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
    let blobs = Arc::new(FsBlobStore::new(dir.path().join("blobs")).unwrap());
    let state = Arc::new(AppState::new(
        store,
        blobs,
        "t0ken".into(),
        Duration::from_secs(10),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(dozen_server::serve(listener, state));
    let http = reqwest::Client::new();
    // An axum "no such route" is an empty 404 or a 405; a handler's own 404 has a JSON body.
    let unrouted = |status: u16, body: &str| status == 405 || (status == 404 && body.is_empty());
    let probe = |method: &str, path: &str| {
        let url = format!("{base}{path}");
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let request = http
            .request(method, url)
            .bearer_auth("t0ken")
            .timeout(Duration::from_secs(5));
        async move {
            let resp = request.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap_or_default())
        }
    };
    // The check can tell: a path nobody serves is seen as unrouted.
    let (status, body) = probe("get", "/v1/no-such-route").await;
    assert!(unrouted(status, &body), "{status} {body}");
    for (method, template) in documented() {
        if template == dozen_api::paths::ROUTES || template == dozen_api::paths::LOGS {
            // Served, but long-poll and fan-out: probed by the end-to-end tests.
            continue;
        }
        let values: Vec<&str> = template
            .split('/')
            .filter(|s| s.starts_with('{'))
            .map(|_| "x")
            .collect();
        let path = fill(&template, &values);
        let (status, body) = probe(&method, &path).await;
        assert!(
            !unrouted(status, &body),
            "{method} {template} ({path}) is documented but not served: {status} {body}"
        );
    }
}
