//! What clients speak to the proxy: HTTP/2 without TLS (h2c) and with it, TLS with a
//! certificate per host (SNI) swapped while connections stay open, the redirect from http to
//! https, and a WebSocket echoed through.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use dozen_testkit::{eventually, http_request, logged_address, Dozen};

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const APP: &str = env!("CARGO_BIN_EXE_dozen-testapp");

/// curl, asking for `url` with `args`; (exit code, output).
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn issue(ca: &dozen_api::tls::Ca, dir: &std::path::Path, name: &str, hosts: &[&str]) {
    let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let issued = ca.issue_server(&hosts).unwrap();
    // Written aside and renamed, as a tool replacing certificates would.
    for (ext, pem) in [("key", &issued.key_pem), ("crt", &issued.cert_pem)] {
        let tmp = dir.join(format!(".{name}.{ext}.tmp"));
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).unwrap();
    }
}

#[test]
fn http2_with_and_without_tls_sni_certificates_reloaded_live_and_https_redirects() {
    let mut d = Dozen::new(DOZEN);
    let ca = dozen_api::tls::Ca::generate().unwrap();
    let ca_file = d.write("ca.crt", &ca.cert_pem);
    let certs = d.path("certs");
    std::fs::create_dir_all(&certs).unwrap();
    issue(&ca, &certs, "a", &["a.test"]);
    issue(&ca, &certs, "b", &["b.test", "*.b.test"]);
    d.server_args.extend(
        [
            "--proxy-tls-listen",
            "127.0.0.1:0",
            "--proxy-certs",
            certs.to_str().unwrap(),
        ]
        .map(String::from),
    );
    d.start_server(true);
    let tls_port = eventually(Duration::from_secs(20), "the TLS listener", || {
        logged_address(
            &d.path("server.log"),
            0,
            "TLS listener ready",
            "secure_address",
        )
    })
    .rsplit(':')
    .next()
    .unwrap()
    .parse::<u16>()
    .unwrap();
    d.write(
        "dozen.toml",
        &format!(
            r#"name = "protocols"
[services.web]
command = ["{APP}"]
health = {{ http = "/healthz", interval = "200ms" }}
[[services.web.routes]]
path = "/"
[[services.web.routes]]
host = "secure.test"
scheme = "http"
redirect = {{ scheme = "https" }}
"#
        ),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    d.wait_ready("web", 1);
    let port = d.proxy_port;
    eventually(Duration::from_secs(20), "the route", || {
        http_request(port, "x.test", "/").filter(|r| r.status == 200)
    });
    let version = ["-w", "\n%{http_version}"];

    // h2c: HTTP/2 with prior knowledge on the plain port.
    let (code, out) = curl(&[
        "--http2-prior-knowledge",
        &format!("http://127.0.0.1:{port}/headers"),
        "-H",
        "host: x.test",
        version[0],
        version[1],
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("\n2"), "{out}");
    assert!(
        out.contains("host: x.test"),
        "the target gets a Host: {out}"
    );
    // An HTTP/2 upload that states no length streams through (it is not held as if small).
    let mut upload = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--http2-prior-knowledge",
            "-T",
            "-",
            "-H",
            "host: x.test",
        ])
        .arg(format!("http://127.0.0.1:{port}/count"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    upload
        .stdin
        .take()
        .unwrap()
        .write_all(&vec![b'x'; 200 * 1024])
        .unwrap();
    let counted = upload.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&counted.stdout), "bytes=204800");
    // And HTTP/1.1 on the same port, as before.
    let (_, out) = curl(&[&format!("http://127.0.0.1:{port}/"), version[0], version[1]]);
    assert!(
        out.ends_with("\n1.1") && out.contains("hello from web-"),
        "{out}"
    );

    // TLS: each host gets its own certificate (curl checks the name against the CA's).
    let https = |host: &str, extra: &[&str]| {
        let resolve = format!("{host}:{tls_port}:127.0.0.1");
        let url = format!("https://{host}:{tls_port}/headers");
        let mut args = vec![
            "--cacert",
            ca_file.to_str().unwrap(),
            "--resolve",
            &resolve,
            &url,
            version[0],
            version[1],
        ];
        args.extend_from_slice(extra);
        curl(&args)
    };
    let (code, out) = https("a.test", &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("\n2"), "HTTP/2 over TLS: {out}");
    assert!(out.contains("x-forwarded-proto: https"), "{out}");
    let (code, out) = https("shop.b.test", &["--http1.1"]);
    assert_eq!(code, 0, "a wildcard name: {out}");
    assert!(out.ends_with("\n1.1"), "{out}");
    let (code, out) = https("c.test", &[]);
    assert_eq!(code, 60, "no certificate names c.test yet: {out}");

    // A request in flight over TLS while b's certificate is replaced by one that also names
    // c.test: the new one serves within moments, and the request open on the old finishes.
    let resolve = format!("b.test:{tls_port}:127.0.0.1");
    let slow_url = format!("https://b.test:{tls_port}/sleep/2000");
    let slow = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&ca_file)
        .args(["--resolve", &resolve, &slow_url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(5), "the slow request in flight", || {
        d.ok(&["logs", "web"])
            .contains("sleeping 2000 ms")
            .then_some(())
    });
    issue(&ca, &certs, "b", &["b.test", "*.b.test", "c.test"]);
    eventually(Duration::from_secs(3), "the new certificate served", || {
        (https("c.test", &[]).0 == 0).then_some(())
    });
    let finished = slow.wait_with_output().unwrap();
    assert!(finished.status.success());
    assert_eq!(String::from_utf8_lossy(&finished.stdout), "slept");
    // A directory that does not load keeps the certificates loaded before.
    std::fs::write(certs.join("broken.crt"), "not a certificate").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(https("a.test", &[]).0, 0);

    // http to https for the host that asks for it; the same host over TLS is served.
    let r = http_request(port, "secure.test", "/cart?x=1").unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location").as_deref(),
        Some("https://secure.test/cart?x=1")
    );
    let (code, out) = {
        let resolve = format!("secure.test:{tls_port}:127.0.0.1");
        let url = format!("https://secure.test:{tls_port}/");
        curl(&["-k", "--resolve", &resolve, &url])
    };
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("hello from web-"), "{out}");
}

#[test]
fn a_websocket_is_echoed_through_the_proxy() {
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    d.write(
        "dozen.toml",
        &format!("name = \"ws\"\n[services.web]\ncommand = [\"{APP}\"]\nhealth = {{ http = \"/healthz\", interval = \"200ms\" }}\n[[services.web.routes]]\npath = \"/\"\n"),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    d.wait_ready("web", 1);
    let port = d.proxy_port;
    eventually(Duration::from_secs(20), "the route", || {
        http_request(port, "x.test", "/").filter(|r| r.status == 200)
    });
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The key and its answer are RFC 6455's own example.
    s.write_all(b"GET /ws HTTP/1.1\r\nhost: x.test\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    for message in ["hello", "a second message, longer than the first"] {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut frame = vec![0x81, 0x80 | message.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(message.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        s.write_all(&frame).unwrap();
        let mut answer = vec![0u8; 2 + message.len()];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(answer[0], 0x81, "a final text frame");
        assert_eq!(usize::from(answer[1]), message.len());
        assert_eq!(&answer[2..], message.as_bytes());
    }
    // A close frame is answered, and the connection ends.
    s.write_all(&[0x88, 0x80, 0, 0, 0, 0]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(rest.first(), Some(&0x88));
}

/// An HTTP/2 connection that opens no stream is closed once the header timeout has passed
/// (GOAWAY, then the end), as an idle HTTP/1 connection is: it does not keep its place under
/// the connection cap for ever.
#[test]
fn an_idle_http2_connection_is_closed() {
    let mut d = Dozen::new(DOZEN);
    d.server_args
        .extend(["--proxy-header-timeout", "1s"].map(String::from));
    d.start_server(true);
    let mut s = TcpStream::connect(("127.0.0.1", d.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The preface and an empty SETTINGS frame, then nothing.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "closed after {:?}",
        started.elapsed()
    );
    // Somewhere in what came back: a GOAWAY frame (type 7).
    let mut at = 0;
    let mut goaway = false;
    while at + 9 <= got.len() {
        let len = (usize::from(got[at]) << 16)
            | (usize::from(got[at + 1]) << 8)
            | usize::from(got[at + 2]);
        goaway |= got[at + 3] == 7;
        at += 9 + len;
    }
    assert!(goaway, "{got:?}");
}
