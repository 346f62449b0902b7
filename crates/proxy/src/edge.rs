//! What the proxy takes from clients on a public port: how long a client may take to send its
//! headers, how many connections it keeps open at once (past that: 503 at once), how big the
//! headers may be, and whose `X-Forwarded-*` headers it believes.

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// Largest request head (request line and headers) read: past it the client gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Edge {
    /// Longest a client may take to send a request's headers, the first or the next one on a
    /// kept-alive connection.
    pub header_read_timeout: Duration,
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
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Edge {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }
}

/// An address block, `10.0.0.0/8` or `::1/128` (a bare address is the block of itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{text}` is not an address block: write e.g. 10.0.0.0/8, 192.168.1.7 or fd00::/8"
            )
        };
        let (addr, bits) = match text.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, bits })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
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
