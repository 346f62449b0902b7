//! Plain HTTP/1.1 requests over a socket, as a client on the wire sends them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A plain HTTP/1.1 GET on loopback; returns (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let r = http_request(port, "127.0.0.1", path)?;
    Some((r.status, r.body))
}

pub struct HttpResponse {
    pub status: u16,
    /// Header lines, lowercased names.
    pub headers: String,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// GET `path` with a Host header, over a fresh connection (30 s read timeout).
pub fn http_request(port: u16, host: &str, path: &str) -> Option<HttpResponse> {
    http_request_at(&format!("127.0.0.1:{port}"), host, path)
}

/// GET `path` from `address` (`ip:port`, any host) with a Host header.
pub fn http_request_at(address: &str, host: &str, path: &str) -> Option<HttpResponse> {
    let raw = http_raw_at(
        address,
        &format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"),
    )?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let headers = head
        .split_once("\r\n")
        .map(|(_, h)| h.to_string())
        .unwrap_or_default();
    Some(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Sends `raw` bytes as they are and returns everything the server answers.
pub fn http_raw(port: u16, raw: &str) -> Option<String> {
    http_raw_at(&format!("127.0.0.1:{port}"), raw)
}

fn http_raw_at(address: &str, raw: &str) -> Option<String> {
    let address: std::net::SocketAddr = address.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&address, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(raw.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned())
}
