//! The proxy's listening flags, shared by `dozen server`, `dozen up` and `dozen proxy`: where
//! it listens and what it takes from clients.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::commands::parse_duration;

#[derive(Args, Debug, Clone)]
pub struct ProxyListenArgs {
    /// Where the proxy serves public routes.
    #[arg(long, env = "DOZEN_PROXY_LISTEN", default_value = "127.0.0.1:7780")]
    pub proxy_listen: SocketAddr,
    /// Where the proxy serves every route, internal ones and `/_/<service>` included.
    #[arg(
        long,
        env = "DOZEN_PROXY_INTERNAL_LISTEN",
        default_value = "127.0.0.1:7781"
    )]
    pub proxy_internal_listen: SocketAddr,
    /// How long the proxy waits for a target's answer.
    #[arg(long, env = "DOZEN_PROXY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub proxy_timeout: Duration,
    /// How long a client may take to send a request's headers (or to start its next request
    /// on a kept-alive connection) before the proxy closes the connection.
    #[arg(long, env = "DOZEN_PROXY_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub proxy_header_timeout: Duration,
    /// Longest a client may pause while sending a request body: past it, a held body gets 408
    /// and a streamed one is cut off at the target.
    #[arg(long, env = "DOZEN_PROXY_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub proxy_body_timeout: Duration,
    /// Most client connections the proxy keeps open on each listener; past it, 503 at once.
    #[arg(long, env = "DOZEN_PROXY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub proxy_max_connections: usize,
    /// A proxy in front of this one (an address or a block, e.g. 10.0.0.0/8; repeat it or
    /// separate with commas) whose X-Forwarded-For and -Proto are kept. Anyone else's are
    /// replaced with what the proxy sees.
    #[arg(
        long = "trusted-proxy",
        env = "DOZEN_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<dozen_proxy::Cidr>,
    /// Log one request in this many to the proxy's log (method, host, path, status, target,
    /// time taken; never the query): 1 logs every request, 0 none.
    #[arg(long, env = "DOZEN_PROXY_ACCESS_LOG_EVERY", default_value_t = 1)]
    pub proxy_access_log_every: u64,
    /// Also serve public routes with TLS here (HTTP/2 and HTTP/1.1), e.g. 0.0.0.0:7443; needs
    /// --proxy-certs.
    #[arg(long, env = "DOZEN_PROXY_TLS_LISTEN", requires = "proxy_certs")]
    pub proxy_tls_listen: Option<SocketAddr>,
    /// Certificates of the TLS listener: `<name>.crt` + `<name>.key` (PEM), or `<name>.pem`
    /// with both, each serving the DNS names it carries (SNI); `default.*` serves the rest.
    /// Changes are picked up within 100 ms, connections kept.
    #[arg(long, env = "DOZEN_PROXY_CERTS", requires = "proxy_tls_listen")]
    pub proxy_certs: Option<std::path::PathBuf>,
}

impl ProxyListenArgs {
    /// What the proxy takes from clients.
    pub fn edge(&self) -> dozen_proxy::Edge {
        dozen_proxy::Edge {
            header_read_timeout: self.proxy_header_timeout,
            body_timeout: self.proxy_body_timeout,
            max_connections: self.proxy_max_connections.max(1),
            trusted_proxies: self.trusted_proxies.clone(),
        }
    }
}
