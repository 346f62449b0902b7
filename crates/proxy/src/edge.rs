//! What the proxy takes from clients on a public port: how long a client may take to send its
//! headers, how many connections it keeps open at once (past that: 503 at once), how big the
//! headers may be, and whose `X-Forwarded-*` headers it believes.

use std::net::IpAddr;

pub use dozen_spec::Cidr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// Largest request head (request line and headers) read: past it the client gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Longest path and query passed on (nginx's default line buffer): past it, 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone)]
pub struct Edge {
    /// Longest a client may take to send a request's headers, the first or the next one on a
    /// kept-alive connection.
    pub header_read_timeout: Duration,
    /// Longest a client may pause while sending a request body.
    pub body_timeout: Duration,
    /// Most client connections open at once on each listener.
    pub max_connections: usize,
    /// Proxies in front of this one whose `X-Forwarded-For` and `-Proto` are kept (appended to);
    /// anyone else's are replaced.
    pub trusted_proxies: Vec<Cidr>,
}

impl Default for Edge {
    fn default() -> Self {
        Edge {
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Edge {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }

    /// Who the client is and how it came: from a trusted proxy, the nearest address in
    /// `X-Forwarded-For` that is not itself a trusted proxy, and its `X-Forwarded-Proto`;
    /// from anyone else, the connection's address and plain http.
    pub fn forwarded(&self, peer: IpAddr, headers: &hyper::HeaderMap, tls: bool) -> Forwarded {
        let own = if tls { "https" } else { "http" };
        let plain = Forwarded {
            client: peer,
            forwarded_for: peer.to_string(),
            proto: own,
        };
        if !self.trusts(peer) {
            return plain;
        }
        let given: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let chain: Vec<IpAddr> = given
            .iter()
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        let client = chain
            .iter()
            .rev()
            .find(|a| !self.trusts(**a))
            .or(chain.first())
            .copied()
            .unwrap_or(peer);
        let proto = match headers.get("x-forwarded-proto").map(|v| v.as_bytes()) {
            Some(b"https") => "https",
            Some(b"http") => "http",
            _ => own,
        };
        let forwarded_for = if given.is_empty() {
            peer.to_string()
        } else {
            format!("{}, {peer}", given.join(", "))
        };
        Forwarded {
            client,
            forwarded_for,
            proto,
        }
    }
}

/// Who a request came from, as far as the proxy believes it.
pub struct Forwarded {
    pub client: IpAddr,
    /// `X-Forwarded-For` as it goes to the target.
    pub forwarded_for: String,
    /// `X-Forwarded-Proto` as it goes to the target.
    pub proto: &'static str,
}

/// A request body whose client may pause at most `limit` between pieces: past it the body
/// ends with an error (the target sees the request cut short).
pub(crate) struct PausedAtMost<B> {
    inner: B,
    limit: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<B> PausedAtMost<B> {
    pub(crate) fn new(inner: B, limit: Duration) -> PausedAtMost<B> {
        PausedAtMost {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

/// The error a paused body ends with.
#[derive(Debug)]
pub(crate) struct BodyPaused(pub Duration);

impl std::fmt::Display for BodyPaused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the client paused its request body for over {} s",
            self.0.as_secs()
        )
    }
}

impl std::error::Error for BodyPaused {}

impl<B> hyper::body::Body for PausedAtMost<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + self.limit;
                self.deadline.as_mut().reset(next);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyPaused(self.limit))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a Host header (or HTTP/2 authority) is a host name or address with an optional
/// port, and nothing else: it goes into redirects, the target's headers and the access log.
pub(crate) fn host_is_valid(host: &str) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, after)) if v6.parse::<std::net::Ipv6Addr>().is_ok() => (None, after),
            _ => return false,
        },
        None => match host.split_once(':') {
            Some((n, _)) => (Some(n), &host[n.len()..]),
            None => (Some(host), ""),
        },
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
        });
    let name_ok = name.is_none_or(|n| {
        !n.is_empty()
            && n.len() <= 253
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    });
    port_ok && name_ok
}

/// A plain connection's first bytes, read to tell HTTP/2's preface (h2c with prior
/// knowledge) from HTTP/1, then given back to whoever reads the connection. None when the
/// client closed before sending anything.
pub(crate) async fn sniff_h2(
    mut stream: tokio::net::TcpStream,
) -> Option<(Rewind<tokio::net::TcpStream>, bool)> {
    use tokio::io::AsyncReadExt;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    let mut seen = Vec::with_capacity(PREFACE.len());
    let mut buf = [0u8; 14];
    while seen.len() < PREFACE.len() && PREFACE.starts_with(&seen) {
        let n = stream
            .read(&mut buf[..PREFACE.len() - seen.len()])
            .await
            .ok()?;
        if n == 0 {
            return None;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let h2 = seen == PREFACE;
    Some((
        Rewind {
            prefix: seen,
            at: 0,
            inner: stream,
        },
        h2,
    ))
}

/// A stream whose first bytes were already read: they are read again first.
pub(crate) struct Rewind<T> {
    prefix: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The answer to a client past the connection cap: a 503 that says so, then the connection
/// closed (at most a second spent on it).
pub(crate) async fn turn_away(mut stream: tokio::net::TcpStream, cap: usize) {
    let body = format!(
        "{{\"error\":\"the proxy holds {cap} connections, its most; try again shortly\"}}\n"
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers() {
        for ok in [
            "shop.local",
            "shop.local:8080",
            "127.0.0.1:7780",
            "[::1]:80",
            "[::1]",
            "a_b",
        ] {
            assert!(host_is_valid(ok), "{ok}");
        }
        for bad in [
            "shop.local:80@evil.com",
            "a b",
            "a:b",
            "[::1",
            "[zz]:80",
            "",
            "x:123456",
            "user@host",
            "a/b",
        ] {
            assert!(!host_is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn address_blocks_contain_what_they_name() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let block: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(block.contains(ip("10.1.200.3")));
        assert!(!block.contains(ip("10.2.0.1")));
        assert!(block.contains(ip("::ffff:10.1.0.9")));
        let one: Cidr = "192.168.1.7".parse().unwrap();
        assert!(one.contains(ip("192.168.1.7")) && !one.contains(ip("192.168.1.8")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        for bad in ["10.0.0.0/33", "x", "10.0.0/8", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
