//! Nodes: registration, heartbeats, their assignments (list-then-watch) and status reports,
//! the node list and which server leads.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use dozen_api::{
    ClusterInfo, HeartbeatRequest, NodeInfo, RegisterRequest, RegisterResponse, StatusReport,
    WatchQuery,
};
use dozen_control::snapshot::Snapshot;
use dozen_control::{nodes, pki};
use dozen_model::{keys, Assignment};

use crate::auth::Caller;
use crate::error::ApiResult;
use crate::watch::list_or_watch;
use crate::AppState;

pub(crate) async fn cluster(State(s): State<Arc<AppState>>) -> ApiResult<Json<ClusterInfo>> {
    let leader = s
        .store
        .get(&dozen_control::leader::leader_key())
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
    Ok(Json(ClusterInfo {
        server: s.server_id.clone(),
        leader,
        store: s.store_kind.clone(),
    }))
}
pub(crate) async fn list_nodes(State(s): State<Arc<AppState>>) -> ApiResult<Json<Vec<NodeInfo>>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    Ok(Json(
        snap.nodes
            .values()
            .map(|n| NodeInfo {
                tasks: snap
                    .assignments
                    .values()
                    .filter(|a| a.record.node == n.record.name)
                    .count() as u32,
                node: n.record.clone(),
                state: if snap.alive_nodes.contains(&n.record.name) {
                    dozen_api::NodeState::Up
                } else {
                    dozen_api::NodeState::Down
                },
            })
            .collect(),
    ))
}

/// Whether two host strings name the same host: IP addresses compared as addresses (an
/// IPv4-mapped IPv6 address is its IPv4 address), names compared without case.
fn same_host(a: &str, b: &str) -> bool {
    use std::net::IpAddr;
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a.to_canonical() == b.to_canonical(),
        _ => a.eq_ignore_ascii_case(b),
    }
}

pub(crate) async fn register(
    State(s): State<Arc<AppState>>,
    Path(node): Path<String>,
    caller: Option<axum::Extension<Caller>>,
    connection: Option<axum::Extension<dozen_api::serving::ConnectionInfo>>,
    Json(req): Json<RegisterRequest>,
) -> ApiResult<Json<RegisterResponse>> {
    let by_certificate = matches!(caller.as_deref(), Some(Caller::Node(_)));
    // Proxies send public traffic to the host a node registers: a node with a certificate
    // may claim only the hosts fixed when it joined.
    let serial = connection
        .and_then(|c| c.identity.clone())
        .map(|id| id.serial);
    if let (true, Some(serial)) = (by_certificate, serial) {
        if let Some(hosts) = pki::claimable_hosts(s.store.as_ref(), &node, &serial).await? {
            if !hosts.iter().any(|h| same_host(h, &req.node.host)) {
                tracing::warn!(node, host = %req.node.host, allowed = %hosts.join(","), "refused a node's host claim");
                let (message, hint) = match hosts.first() {
                    Some(first) => (
                        format!(
                            "node `{node}` may register host {} (fixed when it joined), not `{}`",
                            hosts.join(" or "),
                            req.node.host
                        ),
                        format!(
                            "start the agent with --advertise-host {first}, or revoke the node \
                             (`dozen node revoke {node}`) and join again with a token for the new \
                             host (`dozen node token {node} --host {}`)",
                            req.node.host
                        ),
                    ),
                    None => (
                        format!(
                            "node `{node}`'s certificate is not on record; it may claim no host"
                        ),
                        format!("join again with a new token (`dozen node token {node}`)"),
                    ),
                };
                return Err(crate::error::ApiFailure::from_response(
                    crate::error::error(axum::http::StatusCode::FORBIDDEN, message, Some(hint)),
                ));
            }
        }
    }
    let record = dozen_model::NodeRecord {
        registered_via: s.server_id.clone(),
        ..req.node
    };
    let lease =
        nodes::register(s.store.as_ref(), &node, record, s.node_ttl, by_certificate).await?;
    Ok(Json(s.registered(lease)))
}

pub(crate) async fn heartbeat(
    State(s): State<Arc<AppState>>,
    Path(node): Path<String>,
    Json(req): Json<HeartbeatRequest>,
) -> ApiResult<StatusCode> {
    nodes::heartbeat(s.store.as_ref(), &node, req.lease).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn assignments(
    State(s): State<Arc<AppState>>,
    Path(node): Path<String>,
    connection: Option<axum::Extension<crate::ConnectionInfo>>,
    Query(q): Query<WatchQuery>,
) -> ApiResult<Response> {
    nodes::check_name(&node)?;
    // A node's own watch ends when its certificate is revoked.
    let revocable = connection
        .and_then(|c| c.0.identity)
        .map(|identity| identity.serial);
    list_or_watch::<Assignment>(s, keys::assignments(&node), q, revocable).await
}

pub(crate) async fn report_status(
    State(s): State<Arc<AppState>>,
    Path(node): Path<String>,
    Json(report): Json<StatusReport>,
) -> ApiResult<StatusCode> {
    nodes::report_status(s.store.as_ref(), &node, &report.statuses).await?;
    if !report.events.is_empty() {
        let now = dozen_control::wall_ms();
        dozen_control::events::record_from_agent(s.store.as_ref(), &node, report.events, now)
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::same_host;

    #[test]
    fn hosts_compare_as_addresses() {
        assert!(same_host("10.0.0.7", "::ffff:10.0.0.7"));
        assert!(same_host("fe80::0:1", "fe80::1"));
        assert!(same_host("Node-1.example", "node-1.example"));
        assert!(!same_host("10.0.0.7", "10.0.0.8"));
        assert!(!same_host("10.0.0.7", "node-1.example"));
    }
}
