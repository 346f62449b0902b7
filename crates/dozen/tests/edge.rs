//! The proxy on a public port: slow and idle clients cost themselves, not the proxy; past its
//! connection cap a client gets 503 at once; forwarded headers are believed only from trusted
//! proxies; oversized and malformed requests get a 4xx and never reach a target.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dozen_testkit::{eventually, http_raw, http_request, Dozen};

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const APP: &str = env!("CARGO_BIN_EXE_dozen-testapp");

fn up(extra: &[&str]) -> Dozen {
    let mut d = Dozen::new(DOZEN);
    d.server_args.extend(extra.iter().map(|s| s.to_string()));
    d.start_server(true);
    d.write(
        "dozen.toml",
        &format!(
            "name = \"edge\"\n[services.web]\ncommand = [\"{APP}\"]\nhealth = {{ http = \"/healthz\", interval = \"200ms\" }}\n[[services.web.routes]]\npath = \"/\"\n"
        ),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    d.wait_ready("web", 1);
    eventually(Duration::from_secs(20), "the route", || {
        http_request(d.proxy_port, "edge.test", "/").filter(|r| r.status == 200)
    });
    d
}

/// A helper process holding `idle` connections that send nothing and `slow` ones that send a
/// header byte every 200 ms; it says `ready` once all are open, then, each second, how many
/// the proxy has closed.
fn clients(port: u16, idle: usize, slow: usize) -> (std::process::Child, impl FnMut() -> String) {
    let script = format!(
        r#"
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
idle = [socket.create_connection(("127.0.0.1", {port})) for _ in range({idle})]
slow = [socket.create_connection(("127.0.0.1", {port})) for _ in range({slow})]
for s in slow:
    s.sendall(b"GET / HTTP/1.1\r\nHost: edge.test\r\nX-Slow: ")
for s in idle + slow:
    s.setblocking(False)
print("ready", flush=True)
closed = set()
for tick in range(600):
    time.sleep(0.2)
    for i, s in enumerate(idle + slow):
        if i in closed:
            continue
        try:
            if i >= len(idle):
                s.send(b"x")
            if s.recv(65536) == b"":
                closed.add(i)
        except BlockingIOError:
            pass
        except OSError:
            closed.add(i)
    if tick % 5 == 4:
        print("closed", len(closed), flush=True)
"#
    );
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let next = move || lines.next().and_then(|l| l.ok()).unwrap_or_default();
    (child, next)
}

#[test]
fn slow_and_idle_clients_do_not_stop_the_proxy_and_are_cut_off() {
    let d = up(&["--proxy-header-timeout", "2s"]);
    let (mut helper, mut said) = clients(d.proxy_port, 1000, 1000);
    assert_eq!(said(), "ready");
    // 2,000 connections open: a normal request is answered within a second, every time.
    for _ in 0..5 {
        let started = Instant::now();
        let r = http_request(d.proxy_port, "edge.test", "/").expect("an answer");
        assert_eq!(r.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    // Past the header timeout, the proxy has closed all of them, idle and slow alike.
    let mut closed = 0;
    for _ in 0..10 {
        let line = said();
        closed = line
            .strip_prefix("closed ")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if closed == 2000 {
            break;
        }
    }
    let _ = helper.kill();
    let _ = helper.wait();
    assert_eq!(closed, 2000, "connections the proxy closed");
}

#[test]
fn past_the_connection_cap_a_client_gets_503_at_once() {
    let d = up(&[
        "--proxy-max-connections",
        "50",
        "--proxy-header-timeout",
        "3s",
    ]);
    let (mut helper, mut said) = clients(d.proxy_port, 50, 0);
    assert_eq!(said(), "ready");
    let started = Instant::now();
    let busy = http_request(d.proxy_port, "edge.test", "/").expect("an answer");
    assert_eq!(busy.status, 503, "{}", busy.body);
    assert!(busy.body.contains("50 connections"), "{}", busy.body);
    assert!(started.elapsed() < Duration::from_secs(1));
    let _ = helper.kill();
    let _ = helper.wait();
    // Once those are gone, the proxy serves again.
    eventually(Duration::from_secs(10), "served again", || {
        http_request(d.proxy_port, "edge.test", "/").filter(|r| r.status == 200)
    });
}

#[test]
fn forwarded_headers_are_believed_only_from_trusted_proxies() {
    let raw = |port: u16| {
        http_raw(
            port,
            "GET /headers HTTP/1.1\r\nHost: edge.test\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
        )
        .expect("an answer")
        .to_lowercase()
    };
    let d = up(&[]);
    let seen = raw(d.proxy_port);
    assert!(
        seen.contains("x-forwarded-for: 127.0.0.1\n")
            || seen.contains("x-forwarded-for: 127.0.0.1\r"),
        "{seen}"
    );
    assert!(
        !seen.contains("6.6.6.6") && seen.contains("x-forwarded-proto: http"),
        "{seen}"
    );
    let d = up(&["--trusted-proxy", "127.0.0.0/8"]);
    let seen = raw(d.proxy_port);
    assert!(
        seen.contains("x-forwarded-for: 6.6.6.6, 127.0.0.1"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: https"), "{seen}");
}

#[test]
fn oversized_and_malformed_requests_get_4xx_and_never_reach_a_target() {
    let d = up(&[]);
    let status = |raw: &str| -> u16 {
        let answer = http_raw(d.proxy_port, raw).unwrap_or_default();
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    let big = "x".repeat(80 * 1024);
    assert_eq!(
        status(&format!(
            "GET / HTTP/1.1\r\nHost: edge.test\r\nX-Big: {big}\r\n\r\n"
        )),
        431
    );
    // A URI over 8 KiB is refused as one; over the 64 KiB head, as the head.
    let long = "x".repeat(9 * 1024);
    assert_eq!(
        status(&format!("GET /{long} HTTP/1.1\r\nHost: edge.test\r\n\r\n")),
        414
    );
    assert_eq!(
        status(&format!("GET /{big} HTTP/1.1\r\nHost: edge.test\r\n\r\n")),
        431
    );
    assert_eq!(
        status("GET / HTTP/1.1\r\nHost: edge.test\r\nBad\u{1}Header: x\r\n\r\n"),
        400
    );
    // A Host that is more than a host (it would end up in redirects and the access log).
    assert_eq!(
        status("GET /smuggled HTTP/1.1\r\nHost: edge.test:80@evil.test\r\n\r\n"),
        400
    );
    assert_eq!(
        status("CONNECT smuggled.test:443 HTTP/1.1\r\nHost: smuggled.test:443\r\n\r\n"),
        405
    );
    // A body over the proxy's 1 GiB is refused from its length, before any of it is read.
    let huge = http_raw(
        d.proxy_port,
        "POST /toobig HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 2147483648\r\n\r\nsome",
    )
    .unwrap_or_default();
    assert!(huge.starts_with("HTTP/1.1 413"), "{huge}");
    assert!(huge.contains("request body over 1024 MiB"), "{huge}");
    // Both lengths: ambiguous (the way requests are smuggled), whichever comes first.
    assert_eq!(
        status("POST /smuggled HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        400
    );
    assert_eq!(
        status("POST /smuggled HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
        400
    );
    // A body that merely looks like such a head is a body: the request after it is served.
    let inner = "GET /smuggled HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
    let answer = http_raw(
        d.proxy_port,
        &format!("POST /count HTTP/1.1\r\nHost: edge.test\r\nContent-Length: {}\r\n\r\n{inner}GET /healthz HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n", inner.len()),
    )
    .unwrap_or_default();
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    assert!(
        answer.contains(&format!("bytes={}", inner.len())),
        "{answer}"
    );
    // None of them reached the task (it logs one line per request).
    let logs = d.ok(&["logs", "web"]);
    assert!(
        !logs.contains("xxxx")
            && !logs.contains("Bad")
            && !logs.contains("smuggled")
            && !logs.contains("toobig"),
        "{logs}"
    );
}

/// Bodies stream through: one far over what the proxy used to hold (16 MiB) arrives whole, as
/// a length or chunked, while the proxy's memory stays where it was.
#[test]
fn big_request_bodies_stream_through_without_being_held() {
    let d = up(&[]);
    let server = d.server.as_ref().unwrap().id();
    let file = d.dir.path().join("big.bin");
    std::fs::write(&file, vec![7u8; 40 << 20]).unwrap();
    let before = dozen_testkit::peak_rss_mib(server);
    let post = |extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "-H", "Host: edge.test", "--data-binary"])
            .arg(format!("@{}", file.display()))
            .args(extra)
            .arg(format!("http://127.0.0.1:{}/count", d.proxy_port))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(post(&[]), format!("bytes={}", 40 << 20));
    assert_eq!(
        post(&["-H", "Transfer-Encoding: chunked"]),
        format!("bytes={}", 40 << 20)
    );
    let after = dozen_testkit::peak_rss_mib(server);
    assert!(
        after < before + 20,
        "peak RSS went from {before} to {after} MiB"
    );
}

/// An upgrade (as WebSocket asks for one) goes through: the target's 101, then bytes both
/// ways on the same connection.
#[test]
fn upgraded_connections_pass_through_both_ways() {
    use std::io::{Read, Write};
    let d = up(&[]);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", d.proxy_port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            conn.read(&mut byte).unwrap(),
            1,
            "{}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for message in ["hello through the proxy", "and back again"] {
        conn.write_all(message.as_bytes()).unwrap();
        let mut echoed = vec![0u8; message.len()];
        conn.read_exact(&mut echoed).unwrap();
        assert_eq!(String::from_utf8_lossy(&echoed), message);
    }
}

/// SIGTERM to a proxy: it takes no new connection, finishes the request in flight, then exits.
#[test]
fn a_stopping_proxy_finishes_the_requests_in_flight() {
    let mut d = up(&[]);
    let (public, _) = d.start_proxy("p2");
    let slow = std::thread::spawn(move || http_request(public, "edge.test", "/sleep/1500"));
    eventually(Duration::from_secs(10), "the request in flight", || {
        d.ok(&["logs", "web"])
            .contains("sleeping 1500 ms")
            .then_some(())
    });
    dozen_testkit::signal(d.proxies[0].id(), "TERM");
    let answer = slow.join().unwrap().expect("an answer");
    assert_eq!((answer.status, answer.body.as_str()), (200, "slept"));
    let exited = eventually(Duration::from_secs(10), "the proxy exits", || {
        d.proxies[0].try_wait().ok().flatten()
    });
    assert!(exited.success(), "{exited}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", public)).is_err());
}

/// A client that stops sending its body half-way is answered 408 once it has paused longer
/// than the body timeout, and its request never reaches a target.
#[test]
fn a_client_that_pauses_its_body_gets_408() {
    use std::io::{Read, Write};
    let d = up(&["--proxy-body-timeout", "1s"]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", d.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /paused HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 100\r\n\r\nonly ten..",
    )
    .unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("paused its request body for over 1 s"),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!d.ok(&["logs", "web"]).contains("paused"));
}
