//! Agents' own small API (their tasks' logs) as servers call it: over TLS with the server's
//! certificate, checked against the node's name, or with the token over plain HTTP.

use std::time::Duration;

use dozen_model::NodeRecord;

use crate::{paths, LogQuery};

/// A server's client of agents' own API.
pub struct AgentClient<'a> {
    /// For plain-HTTP agents.
    pub http: &'a reqwest::Client,
    /// For `https://` agents: trusts the cluster CA, presents the server's certificate.
    pub tls: Option<&'a rustls::ClientConfig>,
    /// Sent to plain-HTTP agents only.
    pub token: &'a str,
    /// The calling server: an agent at a loopback address that registered through another
    /// server is never called (the address means that server's host, not this one's).
    pub server_id: &'a str,
}

/// The server through which alone `node`'s agent can be reached: the one it registered through,
/// when it registered a loopback address (a server's own agent, or one beside it).
pub fn reachable_only_through(node: &NodeRecord) -> Option<&str> {
    let rest = node
        .address
        .strip_prefix("http://")
        .or_else(|| node.address.strip_prefix("https://"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (loopback && !node.registered_via.is_empty()).then_some(node.registered_via.as_str())
}

impl AgentClient<'_> {
    /// The log lines of `node`'s tasks that `query` selects (a stream when it follows).
    pub async fn logs(
        &self,
        node: &NodeRecord,
        query: &LogQuery,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, String> {
        let mut request = self
            .request(node, reqwest::Method::GET, paths::AGENT_LOGS)
            .await?
            .query(query);
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        request.send().await.map_err(|e| e.to_string())
    }

    /// What `node`'s tasks use (those of `query.service`, if given).
    pub async fn stats(
        &self,
        node: &NodeRecord,
        query: &crate::StatsQuery,
        timeout: Duration,
    ) -> Result<reqwest::Response, String> {
        self.request(node, reqwest::Method::GET, paths::AGENT_STATS)
            .await?
            .query(query)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| e.to_string())
    }

    /// Runs `request` inside `task` on `node`: the answer streams [`crate::ExecOutput`] lines.
    pub async fn exec(
        &self,
        node: &NodeRecord,
        task: &str,
        request: &crate::ExecRequest,
    ) -> Result<reqwest::Response, String> {
        let path = paths::fill(paths::AGENT_EXEC, &[task]);
        self.request(node, reqwest::Method::POST, &path)
            .await?
            .json(request)
            .send()
            .await
            .map_err(|e| e.to_string())
    }

    /// A request to `path` of `node`'s agent. An `https://` agent is reached with the server's
    /// certificate and must show the certificate of the node it registered as; it never gets
    /// the token. A plain-HTTP agent gets the token, and only an operator can have registered
    /// one of those.
    async fn request(
        &self,
        node: &NodeRecord,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, String> {
        if let Some(via) = reachable_only_through(node).filter(|via| *via != self.server_id) {
            return Err(format!(
                "the agent of node `{}` listens on a loopback address of server `{via}`'s host; \
                 ask that server",
                node.name
            ));
        }
        let Some(authority) = node.address.strip_prefix("https://") else {
            return Ok(self
                .http
                .request(method, format!("{}{path}", node.address))
                .bearer_auth(self.token));
        };
        let Some(tls) = self.tls else {
            return Err(format!(
                "agent address {} is https but this server has no CA (--ca-dir)",
                node.address
            ));
        };
        let authority = authority.trim_end_matches('/');
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        {
            authority.to_string()
        } else {
            format!("{authority}:443")
        };
        let addr = tokio::net::lookup_host(&with_port)
            .await
            .map_err(|e| format!("cannot resolve agent address {}: {e}", node.address))?
            .next()
            .ok_or_else(|| format!("agent address {} resolves to nothing", node.address))?;
        let name = crate::tls::node_dns_name(&node.name);
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls.clone())
            .connect_timeout(Duration::from_secs(3))
            .resolve(&name, addr)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(client.request(method, format!("https://{name}:{}{path}", addr.port())))
    }
}

#[cfg(test)]
mod tests {
    use super::reachable_only_through;
    use dozen_model::NodeRecord;

    fn node(address: &str, via: &str) -> NodeRecord {
        NodeRecord {
            schema: 1,
            name: "n".into(),
            address: address.into(),
            host: "127.0.0.1".into(),
            resources: Default::default(),
            labels: Default::default(),
            drivers: vec![],
            agent_instance: "i".into(),
            registered_at_ms: 0,
            registered_via: via.into(),
        }
    }

    #[test]
    fn a_loopback_agent_is_reachable_only_through_the_server_it_registered_with() {
        for address in [
            "http://127.0.0.1:7000",
            "http://127.8.9.10:7000/",
            "http://localhost:7000",
            "https://[::1]:7000",
        ] {
            assert_eq!(
                reachable_only_through(&node(address, "s1")),
                Some("s1"),
                "{address}"
            );
        }
        for address in ["http://10.0.0.5:7000", "https://n.nodes.dozen:7000"] {
            assert_eq!(
                reachable_only_through(&node(address, "s1")),
                None,
                "{address}"
            );
        }
        // Registered before servers recorded themselves: nothing to go by.
        assert_eq!(
            reachable_only_through(&node("http://127.0.0.1:1", "")),
            None
        );
    }
}
