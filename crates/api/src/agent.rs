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
}

impl AgentClient<'_> {
    /// The log lines of `node`'s tasks that `query` selects (a stream when it follows).
    pub async fn logs(
        &self,
        node: &NodeRecord,
        query: &LogQuery,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, String> {
        let mut request = self.request(node, paths::AGENT_LOGS).await?.query(query);
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        request.send().await.map_err(|e| e.to_string())
    }

    /// A request to `path` of `node`'s agent. An `https://` agent is reached with the server's
    /// certificate and must show the certificate of the node it registered as; it never gets
    /// the token. A plain-HTTP agent gets the token, and only an operator can have registered
    /// one of those.
    async fn request(
        &self,
        node: &NodeRecord,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, String> {
        let Some(authority) = node.address.strip_prefix("https://") else {
            return Ok(self
                .http
                .get(format!("{}{path}", node.address))
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
        Ok(client.get(format!("https://{name}:{}{path}", addr.port())))
    }
}
