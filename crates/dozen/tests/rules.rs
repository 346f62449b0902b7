//! Routing rules and target groups through the real proxy: every condition kind, weights,
//! redirects and fixed responses, sticky sessions, least outstanding requests, slow start,
//! passive outlier detection; `dozen routes` and `routes test`; a rule another stack serves is
//! refused at plan.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use dozen_testkit::{eventually, http_request, Dozen};

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const APP: &str = env!("CARGO_BIN_EXE_dozen-testapp");

fn stack(fail_dir: &str) -> String {
    let service = |name: &str, replicas: u32, extra: &str| {
        format!(
            "[services.{name}]\ncommand = [\"{APP}\"]\nreplicas = {replicas}\nenv = {{ FAIL_DIR = \"{fail_dir}\" }}\nhealth = {{ http = \"/healthz\", interval = \"200ms\" }}\n{extra}"
        )
    };
    let mut s = String::from("name = \"rules\"\n");
    s += &service(
        "web",
        3,
        r#"[services.web.balance]
sticky = { cookie = "shop" }
outlier = { errors = 3, ejection = "10m" }
[[services.web.routes]]
path = "/"
[[services.web.routes]]
host = "shop.test"
path = "/img/*.png"
path_match = "glob"
forward = { img = 1 }
[[services.web.routes]]
headers = { "x-canary" = ["on", "yes*"] }
forward = { canary = 1 }
[[services.web.routes]]
query = { v = "2" }
forward = { canary = 1 }
[[services.web.routes]]
path = "/write"
methods = ["POST", "PUT"]
forward = { canary = 1 }
[[services.web.routes]]
path = "/near"
source = ["127.0.0.0/8"]
forward = { canary = 1 }
[[services.web.routes]]
path = "/far"
source = ["10.0.0.0/8"]
forward = { canary = 1 }
[[services.web.routes]]
path = "/old"
path_match = "exact"
redirect = { scheme = "https", path = "/new#{path}", status = 308 }
[[services.web.routes]]
path = "/maintenance"
respond = { status = 503, body = "back soon", content_type = "text/plain" }
[[services.web.routes]]
path = "/split"
forward = { img = 75, canary = 25 }
[[services.web.routes]]
path = "/first"
priority = 1
forward = { img = 1 }
"#,
    );
    s += &service("canary", 1, "");
    s += &service("img", 1, "");
    s += &service(
        "lor",
        2,
        "[services.lor.balance]\nalgorithm = \"least_outstanding\"\n[[services.lor.routes]]\nhost = \"lor.test\"\n",
    );
    s
}

/// A kept-alive client connection to the proxy.
struct Conn {
    reader: BufReader<TcpStream>,
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Conn {
    fn open(port: u16) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Conn {
            reader: BufReader::new(s),
        }
    }

    fn send(&mut self, method: &str, host: &str, path: &str, headers: &str) -> Answer {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\n{headers}\r\n"
        );
        self.reader.get_mut().write_all(request.as_bytes()).unwrap();
        let mut head = String::new();
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "closed");
            if line == "\r\n" {
                break;
            }
            head += &line;
        }
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        Answer {
            status: head.split_whitespace().nth(1).unwrap().parse().unwrap(),
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    fn get(&mut self, host: &str, path: &str, headers: &str) -> Answer {
        self.send("GET", host, path, headers)
    }
}

impl Answer {
    /// The task that answered (the test app says `hello from <task>`).
    fn task(&self) -> String {
        self.body
            .strip_prefix("hello from ")
            .unwrap_or(&self.body)
            .to_string()
    }

    fn service(&self) -> String {
        let task = self.task();
        task.rsplit_once('-')
            .map_or(task.clone(), |(s, _)| s.to_string())
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

fn counts(answers: impl Iterator<Item = String>) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for a in answers {
        *seen.entry(a).or_insert(0) += 1;
    }
    seen
}

#[test]
fn every_rule_kind_and_target_group_setting_through_the_proxy() {
    let mut d = Dozen::new(DOZEN);
    d.server_args
        .extend(["--trusted-proxy".to_string(), "127.0.0.2".to_string()]);
    d.start_server(true);
    let fail_dir = d.path("fail");
    std::fs::create_dir_all(&fail_dir).unwrap();
    d.write("dozen.toml", &stack(fail_dir.to_str().unwrap()));
    d.ok(&["apply", "--timeout", "60s"]);
    for (service, n) in [("web", 3), ("canary", 1), ("img", 1), ("lor", 2)] {
        d.wait_ready(service, n);
    }
    let port = d.proxy_port;
    eventually(Duration::from_secs(20), "every target routed", || {
        let mut c = Conn::open(port);
        let tasks: std::collections::BTreeSet<String> =
            (0..12).map(|_| c.get("x.test", "/", "").task()).collect();
        (tasks.len() == 3).then_some(())
    });
    let mut c = Conn::open(port);

    // Conditions: host and glob path, header (values fold case, globs), query, method, source.
    let svc =
        |c: &mut Conn, host: &str, path: &str, headers: &str| c.get(host, path, headers).service();
    assert_eq!(svc(&mut c, "shop.test", "/img/a/b.png", ""), "img");
    assert_eq!(svc(&mut c, "other.test", "/img/a/b.png", ""), "web");
    assert_eq!(svc(&mut c, "shop.test", "/img/a/b.gif", ""), "web");
    assert_eq!(svc(&mut c, "x.test", "/", "x-canary: on\r\n"), "canary");
    assert_eq!(
        svc(&mut c, "x.test", "/", "x-canary: YES please\r\n"),
        "canary"
    );
    assert_eq!(svc(&mut c, "x.test", "/", "x-canary: off\r\n"), "web");
    assert_eq!(svc(&mut c, "x.test", "/a?x=1&v=2", ""), "canary");
    assert_eq!(svc(&mut c, "x.test", "/a?v=20", ""), "web");
    assert_eq!(c.send("POST", "x.test", "/write", "").service(), "canary");
    assert_eq!(c.send("DELETE", "x.test", "/write", "").service(), "web");
    assert_eq!(svc(&mut c, "x.test", "/near", ""), "canary");
    assert_eq!(
        svc(&mut c, "x.test", "/far", ""),
        "web",
        "127.0.0.1 is not in 10/8"
    );
    assert_eq!(
        svc(&mut c, "x.test", "/first", "x-canary: on\r\n"),
        "img",
        "priority first"
    );
    // Through a trusted proxy the client is the address it forwarded for.
    let via = |xff: &str| {
        let raw = format!("GET /far HTTP/1.1\r\nhost: x.test\r\nx-forwarded-for: {xff}\r\nconnection: close\r\n\r\n");
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys; s=socket.socket(); s.bind(('127.0.0.2',0)); s.connect(('127.0.0.1',int(sys.argv[1]))); s.sendall(sys.argv[2].encode()); print(s.makefile('rb').read().decode())",
                &port.to_string(),
                &raw,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        via("10.9.9.9").contains("hello from canary"),
        "{}",
        via("10.9.9.9")
    );
    assert!(via("192.168.1.1").contains("hello from web"));
    // An untrusted sender's X-Forwarded-For is not believed.
    assert_eq!(
        svc(&mut c, "x.test", "/far", "x-forwarded-for: 10.9.9.9\r\n"),
        "web"
    );

    // Redirect and fixed response: the proxy answers itself.
    let r = c.get("shop.test:8080", "/old?x=1", "");
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location").as_deref(),
        Some("https://shop.test/new/old?x=1")
    );
    assert_eq!(
        svc(&mut c, "x.test", "/old/more", ""),
        "web",
        "exact path only"
    );
    let r = c.get("x.test", "/maintenance/x", "");
    assert_eq!((r.status, r.body.as_str()), (503, "back soon"));
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));

    // Weights: 10,000 requests split 75/25 within a few percent.
    let split = counts((0..10_000).map(|_| c.get("x.test", "/split", "").service()));
    let img = split.get("img").copied().unwrap_or(0);
    assert!((7_300..=7_700).contains(&img), "{split:?}");
    assert_eq!(split.values().sum::<usize>(), 10_000, "{split:?}");
    // Each request has its access line, naming the service that answered; never the query.
    eventually(Duration::from_secs(5), "the access lines written", || {
        let log = std::fs::read_to_string(d.path("server.log")).unwrap_or_default();
        let lines = |service: &str| {
            log.lines()
                .filter(|l| l.contains(&format!(" access service={service} method=GET host=x.test path=/split status=200 target=127.0.0.1:")))
                .count()
        };
        (lines("img") == img && lines("canary") == 10_000 - img).then_some(())
    });
    let log = std::fs::read_to_string(d.path("server.log")).unwrap();
    assert!(log.contains(" access service=canary method=GET host=x.test path=/a status=200"));
    assert!(!log.contains("v=2"), "the query is not logged");

    // Sticky: the first answer sets the cookie; with it every request goes to that target.
    let first = c.get("x.test", "/", "");
    let cookie = first.header("set-cookie").expect("a sticky cookie");
    assert!(
        cookie.starts_with(&format!("shop={}; ", first.task())),
        "{cookie}"
    );
    let held = format!("cookie: other=1; shop={}\r\n", first.task());
    let stuck = counts((0..30).map(|_| c.get("x.test", "/", &held).task()));
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(c.get("x.test", "/", &held).header("set-cookie"), None);
    let spread = counts((0..30).map(|_| c.get("x.test", "/", "").task()));
    assert_eq!(spread.len(), 3, "{spread:?}");

    // Outlier detection: a target that answers 500 (its checks still pass) is ejected after
    // three in a row; the others take everything after that.
    let bad = first.task();
    std::fs::write(fail_dir.join(&bad), "").unwrap();
    let mut fives = 0;
    for _ in 0..60 {
        if c.get("x.test", "/", "").status == 500 {
            fives += 1;
        }
    }
    assert_eq!(fives, 3, "failures before the ejection");
    let after = counts((0..30).map(|_| c.get("x.test", "/", "").task()));
    assert!(!after.contains_key(&bad) && after.len() == 2, "{after:?}");
    std::fs::remove_file(fail_dir.join(&bad)).unwrap();

    // Least outstanding requests: while one request is held on a target, the next ones go
    // to the other.
    let mut slow = Conn::open(port);
    let request = "GET /sleep/3000 HTTP/1.1\r\nhost: lor.test\r\ncontent-length: 0\r\n\r\n";
    slow.reader.get_mut().write_all(request.as_bytes()).unwrap();
    eventually(Duration::from_secs(5), "the slow request in flight", || {
        let logs = d.ok(&["logs", "lor"]);
        logs.contains("sleeping 3000 ms").then_some(())
    });
    let quick = counts((0..10).map(|_| c.get("lor.test", "/", "").task()));
    assert_eq!(quick.len(), 1, "{quick:?}");
    let _ = slow.get("lor.test", "/", "");

    // `dozen routes` lists the rules in the order tried; `routes test` explains a match.
    let listed = d.ok(&["routes"]);
    // Discovery first (no declared rule may hide it), then the priority rule.
    let first_line = listed
        .lines()
        .skip(1)
        .find(|l| !l.contains("* /_/"))
        .unwrap_or_default();
    assert!(
        first_line.contains("* /first") && first_line.contains("→ img"),
        "{listed}"
    );
    assert!(
        listed.lines().nth(1).unwrap_or_default().contains("* /_/"),
        "{listed}"
    );
    assert!(
        listed.contains("→ img 75% (1 targets), → canary 25% (1 targets)"),
        "{listed}"
    );
    assert!(
        listed.contains("redirect 308 scheme=https path=/new#{path}"),
        "{listed}"
    );
    let tested = d.cli(&["routes", "test", "http://x.test/far", "-H", "x-canary: no"]);
    let text = String::from_utf8_lossy(&tested.stdout);
    assert!(tested.status.success(), "{text}");
    assert!(
        text.contains("/far from 10.0.0.0/8: client address outside the source blocks"),
        "{text}"
    );
    assert!(
        text.contains("header `x-canary` missing or another value"),
        "{text}"
    );
    assert!(
        text.contains("matches rule") && text.contains("of service `web`: → web"),
        "{text}"
    );
    let json = d.json(&["routes", "test", "http://x.test/far", "--from", "10.1.1.1"]);
    assert_eq!(json["matched"]["rule"]["path"], "/far", "{json}");
    let none = d.cli(&["routes", "test", "http://x.test/_/nope", "--internal"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stdout).contains("no service `nope`"));
    let discovery = d.ok(&["routes", "test", "http://x.test/_/lor/x", "--internal"]);
    assert!(discovery.contains("of service `lor`"), "{discovery}");

    // Another stack may not take a rule this one serves.
    d.write(
        "other.toml",
        &format!("name = \"other\"\n[services.thief]\ncommand = [\"{APP}\"]\n[[services.thief.routes]]\npath = \"/maintenance\"\n"),
    );
    let refused = d.cli(&["plan", "-f", "other.toml"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("route `* /maintenance` of service `thief` is already served by service `web` of stack `rules`"),
        "{err}"
    );
}

#[test]
fn a_new_target_starts_with_a_small_share() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    d.write(
        "dozen.toml",
        &format!("name = \"ramp\"\n[services.web]\ncommand = [\"{APP}\"]\nreplicas = 1\nhealth = {{ http = \"/healthz\", interval = \"200ms\" }}\nbalance = {{ slow_start = \"60s\" }}\n[[services.web.routes]]\npath = \"/\"\n"),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    d.wait_ready("web", 1);
    let port = d.proxy_port;
    let old = eventually(Duration::from_secs(20), "the route", || {
        http_request(port, "x.test", "/").filter(|r| r.status == 200)
    })
    .body;
    d.ok(&["scale", "web=2", "--wait", "--timeout", "60s"]);
    // Once the new target is in the proxy's table, it gets a sliver at first (a second or
    // two into a minute's ramp), not half.
    let mut c = Conn::open(port);
    eventually(Duration::from_secs(20), "the new target routed", || {
        (0..200)
            .any(|_| c.get("x.test", "/", "").body != old)
            .then_some(())
    });
    let share = counts((0..400).map(|_| c.get("x.test", "/", "").body));
    let new = share
        .iter()
        .filter(|(k, _)| **k != old)
        .map(|(_, n)| *n)
        .sum::<usize>();
    assert!(new < 80, "{share:?}");
}
