//! End-to-end through the real proxy: routing, discovery, errors, and the stop protocol
//! (a task leaving service finishes its in-flight requests and gets no new ones).

use std::collections::BTreeSet;
use std::time::Duration;

use dozen_testkit::{eventually, http_raw, http_request, Dozen};
use serde_json::Value;

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const APP: &str = env!("CARGO_BIN_EXE_dozen-testapp");

fn stack(web: u32, delay: &str) -> String {
    format!(
        r#"
name = "shop"

[services.web]
command = ["{APP}"]
replicas = {web}
uses = ["api"]
deregistration_delay = "{delay}"
[[services.web.routes]]
host = "shop.test"
path = "/"
[services.web.health]
http = "/healthz"
interval = "200ms"
timeout = "100ms"

[services.api]
command = ["{APP}"]
[services.api.env]
NAME = "the api"
[[services.api.routes]]
path = "/api"
[[services.api.routes]]
path = "/admin"
internal = true
[services.api.health]
http = "/healthz"
interval = "200ms"
timeout = "100ms"

[services.sleepy]
command = "sleep 3600"
port = true
[[services.sleepy.routes]]
host = "sleepy.local"
[services.sleepy.health]
tcp = true
interval = "200ms"
timeout = "100ms"
"#
    )
}

fn task_of(body: &str) -> String {
    body.trim().trim_start_matches("hello from ").to_string()
}

/// Waits until every live proxy serves the current route table.
fn proxies_caught_up(d: &Dozen) {
    eventually(
        Duration::from_secs(10),
        "proxies apply the latest routes",
        || {
            let p = d.json(&["proxies"]);
            let items = p["items"].as_array()?;
            (!items.is_empty() && items.iter().all(|x| x["current"] == true)).then_some(())
        },
    );
}

#[test]
fn routes_discovery_and_errors_through_the_proxy() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    d.write("dozen.toml", &stack(2, "1s"));
    d.ok(&["apply", "--no-wait"]);
    d.wait_ready("web", 2);
    d.wait_ready("api", 1);
    proxies_caught_up(&d);
    let port = d.proxy_port;

    // Both web tasks take traffic, in turn.
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        let r = http_request(port, "shop.test", "/").expect("proxy answers");
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            r.header("x-request-id").is_some(),
            "request id: {}",
            r.headers
        );
        seen.insert(task_of(&r.body));
    }
    assert_eq!(seen.len(), 2, "round robin over both tasks: {seen:?}");

    // Longest prefix wins; forwarded headers reach the task.
    let r = http_request(port, "shop.test", "/api/env/NAME").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "the api"));
    let h = http_request(port, "shop.test:7780", "/api/headers")
        .unwrap()
        .body;
    assert!(h.contains("x-forwarded-for: 127.0.0.1"), "{h}");
    assert!(h.contains("x-forwarded-host: shop.test:7780"), "{h}");
    assert!(h.contains("x-forwarded-proto: http"), "{h}");
    assert!(h.to_ascii_lowercase().contains("x-request-id: "), "{h}");

    // Discovery: web calls the api through API_URL, which points at the internal listener.
    let r = http_request(port, "shop.test", "/fetch/API_URL/env/NAME").unwrap();
    assert_eq!(
        r.body, "the api",
        "web reached the api by its discovery URL"
    );
    // Internal routes are served on the internal listener only.
    assert_eq!(
        http_request(port, "shop.test", "/admin/env/NAME")
            .unwrap()
            .status,
        200,
        "falls to web's `/`"
    );
    let internal = http_request(d.proxy_internal_port, "x", "/admin/env/NAME").unwrap();
    assert_eq!((internal.status, internal.body.as_str()), (200, "the api"));
    let missing = http_request(port, "shop.test", "/_/api/env/NAME").unwrap();
    assert_ne!(missing.body, "the api", "discovery paths are not public");
    // Seen: a mistyped discovery URL fell through to the `/` route (web) on the internal
    // listener. It names the unknown service instead.
    let typo = http_request(d.proxy_internal_port, "shop.test", "/_/apii/env/NAME").unwrap();
    assert_eq!(typo.status, 404, "{}", typo.body);
    assert!(typo.body.contains("no service `apii`"), "{}", typo.body);

    // Errors name the cause and leak nothing.
    let r = http_request(port, "x", "/nowhere").unwrap();
    assert_eq!(r.status, 404);
    assert!(
        r.body.contains("no route for host `x` and path `/nowhere`"),
        "{}",
        r.body
    );
    d.ok(&["scale", "sleepy=0"]);
    let r = eventually(Duration::from_secs(20), "no healthy sleepy target", || {
        http_request(port, "sleepy.local", "/").filter(|r| r.status == 503)
    });
    assert!(
        r.body.contains("no healthy target for service `sleepy`"),
        "{}",
        r.body
    );
    assert!(
        !r.body.contains("127.0.0.1:"),
        "no internal address in errors: {}",
        r.body
    );

    // Malformed requests get 400 and never reach a task.
    let bad = http_raw(
        port,
        "GET /bad-marker HTTP/1.1\r\nhost: shop.test\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
    )
    .unwrap();
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let garbage = http_raw(port, "\x01\x02 nonsense\r\n\r\n").unwrap();
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    let no_host = http_raw(
        port,
        "GET /bad-marker HTTP/1.1\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(no_host.starts_with("HTTP/1.1 400"), "{no_host}");
    // A good request after them shows up in the logs; the bad ones before it never do.
    assert_eq!(
        http_request(port, "shop.test", "/good-marker")
            .unwrap()
            .status,
        200
    );
    let logs = eventually(
        Duration::from_secs(10),
        "the good request is logged",
        || {
            let logs = d.ok(&["logs", "web"]);
            logs.contains("/good-marker").then_some(logs)
        },
    );
    assert!(
        !logs.contains("bad-marker"),
        "a malformed request reached a task: {logs}"
    );
}

#[test]
fn a_task_leaving_service_finishes_its_requests_and_gets_no_new_ones() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    d.write("dozen.toml", &stack(2, "3s"));
    d.ok(&["apply", "--no-wait"]);
    let web = d.wait_ready("web", 2);
    proxies_caught_up(&d);
    let port = d.proxy_port;

    // A long request on each task (round robin sends one to each), both in flight before
    // the scale-in: each task logs the sleep it starts.
    let long: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || http_request(port, "shop.test", "/sleep/2500")))
        .collect();
    eventually(
        Duration::from_secs(10),
        "both tasks serve a long request",
        || {
            let logs = d.ok(&["logs", "web", "-o", "json"]);
            let sleeping: std::collections::BTreeSet<String> = logs
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|l| l["line"] == "sleeping 2500 ms")
                .filter_map(|l| l["task"].as_str().map(String::from))
                .collect();
            (sleeping.len() == 2).then_some(())
        },
    );
    d.ok(&["scale", "web=1"]);
    let draining: Value = eventually(Duration::from_secs(10), "a web task drains", || {
        d.tasks("web").into_iter().find(|t| t["desired"] == "drain")
    });
    let leaving = draining["task"].as_str().unwrap().to_string();
    proxies_caught_up(&d);
    for _ in 0..30 {
        let r = http_request(port, "shop.test", "/").unwrap();
        assert_eq!(r.status, 200);
        assert_ne!(
            task_of(&r.body),
            leaving,
            "a draining task got a new request"
        );
    }
    for h in long {
        let r = h.join().unwrap().expect("long request answered");
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "slept"),
            "in-flight request completed"
        );
    }
    // Then it is stopped and removed; one task remains.
    let left = d.wait_ready("web", 1);
    assert_ne!(left[0]["task"], leaving.as_str());
    assert!(web.iter().any(|t| t["task"] == leaving.as_str()));
    let logs = d.ok(&["logs", "web", "--task", &leaving]);
    assert!(
        logs.contains("stopped cleanly"),
        "got SIGTERM only after draining: {logs}"
    );
}

#[test]
fn a_standalone_proxy_routes_too_and_slow_targets_get_504() {
    let mut d = Dozen::new(DOZEN);
    d.server_args = vec!["--proxy-timeout".into(), "1s".into()];
    d.start_server(true);
    // Given one core, the standalone proxy runs on one thread.
    d.proxy_cores = Some("0");
    let (public, _) = d.start_proxy("edge-1");
    assert!(std::fs::read_to_string(d.path("proxy-edge-1.log"))
        .unwrap()
        .contains("one core: the proxy serves every connection on one thread"));
    d.write("dozen.toml", &stack(1, "1s"));
    d.ok(&["apply", "--no-wait"]);
    d.wait_ready("web", 1);
    d.wait_ready("api", 1);
    proxies_caught_up(&d);
    assert_eq!(d.json(&["proxies"])["items"].as_array().unwrap().len(), 2);
    for port in [public, d.proxy_port] {
        let r = http_request(port, "shop.test", "/api/env/NAME").unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "the api"),
            "via proxy on {port}"
        );
    }
    // The in-process proxy has a 1 s upstream timeout.
    let r = http_request(d.proxy_port, "shop.test", "/api/sleep/2500").unwrap();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(
        r.body
            .contains("a target of service `api` did not answer within 1 s"),
        "{}",
        r.body
    );
}

#[test]
fn a_target_that_closes_without_answering_gets_a_get_retried_but_not_a_post() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    let markers = d.dir.path().join("markers");
    std::fs::create_dir(&markers).unwrap();
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "flaky"
[services.api]
command = ["{APP}"]
replicas = 2
# It leaves markers in the test's own directory, which only root can enter.
user = "root"
[services.api.env]
CLOSE_ONCE_DIR = "{}"
[[services.api.routes]]
path = "/api"
[services.api.health]
http = "/healthz"
interval = "200ms"
timeout = "100ms"
"#,
            markers.display()
        ),
    );
    d.ok(&["apply", "--no-wait"]);
    d.wait_ready("api", 2);
    proxies_caught_up(&d);

    // The first target to see it closes the connection; the GET goes to the other one.
    let r = http_request(d.proxy_port, "x", "/api/close-once/get").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "answered"), "{}", r.body);
    assert!(
        markers.join("get").exists(),
        "the first attempt was refused"
    );

    // A POST may have been acted on: not sent again, the client hears of the failure.
    let r = http_raw(
        d.proxy_port,
        "POST /api/close-once/post HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    assert!(markers.join("post").exists());
}

fn busy_stack(replicas: u32) -> String {
    format!(
        r#"
name = "busy"
[services.slow]
command = ["{APP}"]
replicas = {replicas}
deregistration_delay = "1s"
[services.slow.env]
SINGLE_THREADED = "1"
[[services.slow.routes]]
host = "slow.test"
path = "/"
[services.slow.health]
http = "/healthz"
interval = "1s"
"#
    )
}

/// Running tasks of `service` (any health), as `ps` shows them.
fn running_tasks(d: &Dozen, service: &str) -> usize {
    d.tasks(service)
        .iter()
        .filter(|t| t["status"]["state"] == "running")
        .count()
}

/// Seen: a single-threaded app serving a 6 s request failed its health checks (they wait
/// behind the request) and its only task was stopped mid-request: the client got 502 and the
/// service had no task. Now a failing check takes the task out of routing, a replacement
/// starts beside it, and it is stopped through the stop protocol once that one is healthy.
#[test]
fn a_busy_single_threaded_task_finishes_its_slow_request_and_the_service_never_empties() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    d.write("dozen.toml", &busy_stack(1));
    d.ok(&["apply"]);
    d.wait_ready("slow", 1);
    let port = d.proxy_port;
    let slow = std::thread::spawn(move || http_request(port, "slow.test", "/sleep/6000"));
    let started = std::time::Instant::now();
    while !slow.is_finished() {
        assert!(
            running_tasks(&d, "slow") >= 1,
            "the service had no running task {:?} into the slow request",
            started.elapsed()
        );
    }
    let answer = slow.join().unwrap().expect("an answer");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(started.elapsed() >= Duration::from_secs(6));
    // The busy task went out of routing and a replacement took over: one ready task again.
    d.wait_ready("slow", 1);
}

/// When every task fails its checks (both busy), the proxies send to all of them (fail open,
/// as an ALB does) instead of answering 503, and `ps` says so.
#[test]
fn when_every_task_is_unhealthy_the_proxy_fails_open() {
    let mut d = Dozen::new(DOZEN);
    // No room for replacements: the node offers 1 CPU, each task asks for half of it.
    d.server_args = vec!["--cpu-millis".into(), "1000".into()];
    d.start_server(true);
    let stack = busy_stack(2).replace(
        "[services.slow.health]",
        "[services.slow.resources]\ncpu = \"500m\"\nmemory = \"16MiB\"\n[services.slow.health]",
    );
    d.write("dozen.toml", &stack);
    d.ok(&["apply"]);
    d.wait_ready("slow", 2);
    let port = d.proxy_port;
    let busy: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || http_request(port, "slow.test", "/sleep/8000")))
        .collect();
    eventually(Duration::from_secs(20), "ps says it fails open", || {
        let ps = d.json(&["ps"]).to_string();
        ps.contains("fail open").then_some(())
    });
    let during = http_request(port, "slow.test", "/pid").expect("an answer");
    assert_eq!(during.status, 200, "{}", during.body);
    for b in busy {
        assert_eq!(b.join().unwrap().expect("an answer").status, 200);
    }
}
