//! Identity: the public CA certificate, join tokens, joins (the server signs the node's
//! request) and revocation. What the store keeps of them is `dozen_control::pki`'s.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use dozen_api::{
    token_matches, JoinRequest, JoinResponse, JoinTokenRequest, JoinTokenResponse, RevokeResponse,
};
use dozen_control::{nodes, pki};

use crate::error::{bad_request, error, unauthorized, ApiFailure, ApiResult};
use crate::AppState;

const JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);
const JOIN_TOKEN_MAX_TTL: Duration = Duration::from_secs(24 * 3600);

fn no_ca() -> ApiFailure {
    ApiFailure::from_response(error(
        StatusCode::NOT_FOUND,
        "this server has no cluster CA, so nodes cannot join through it".into(),
        Some("start the servers with --ca-dir (made by `dozen ca init`)".into()),
    ))
}

pub(crate) async fn ca_certificate(State(s): State<Arc<AppState>>) -> ApiResult<String> {
    let ca = s.ca.as_ref().ok_or_else(no_ca)?;
    Ok(ca.cert_pem.clone())
}

pub(crate) async fn create_join_token(
    State(s): State<Arc<AppState>>,
    Json(req): Json<JoinTokenRequest>,
) -> ApiResult<Json<JoinTokenResponse>> {
    let ca = s.ca.as_ref().ok_or_else(no_ca)?;
    let ttl = req
        .ttl_ms
        .map(Duration::from_millis)
        .unwrap_or(JOIN_TOKEN_TTL);
    if ttl.is_zero() || ttl > JOIN_TOKEN_MAX_TTL {
        return Err(bad_request(format!(
            "a join token lives between 1 ms and 24 h, not {} ms",
            ttl.as_millis()
        )));
    }
    let random = |n| {
        dozen_api::tls::random_hex(n).map_err(|e| {
            ApiFailure::from_response(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("no randomness: {e}"),
                None,
            ))
        })
    };
    let Some(node) = req.node.filter(|n| !n.is_empty()) else {
        return Err(bad_request(
            "a join token is for one node: name it (`dozen node token NODE`)".into(),
        ));
    };
    nodes::check_name(&node)?;
    check_hosts(&req.hosts)?;
    let (id, secret) = (random(6)?, random(24)?);
    let hash = dozen_api::tls::sha256_hex(secret.as_bytes());
    pki::store_join_token(s.store.as_ref(), &id, &hash, &node, &req.hosts, ttl).await?;
    Ok(Json(JoinTokenResponse {
        token: format!("{id}.{secret}"),
        ttl_ms: ttl.as_millis() as u64,
        ca_hash: ca.fingerprint().map_err(|e| bad_request(e.to_string()))?,
        node,
    }))
}

/// Host names or addresses a node may claim: each a plain name or IP, nothing else.
fn check_hosts(hosts: &[String]) -> Result<(), ApiFailure> {
    for host in hosts {
        let plain = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
        if !plain {
            return Err(bad_request(format!(
                "host `{host}`: give a host name or an IP address (no scheme, no port)"
            )));
        }
    }
    Ok(())
}

pub(crate) async fn join(
    State(s): State<Arc<AppState>>,
    connection: Option<axum::Extension<dozen_api::serving::ConnectionInfo>>,
    Json(req): Json<JoinRequest>,
) -> ApiResult<Json<JoinResponse>> {
    let ca = s.ca.as_ref().ok_or_else(no_ca)?;
    nodes::check_name(&req.node)?;
    let refuse = |why: &str| {
        tracing::warn!(node = %req.node, reason = why, "refused a join");
        unauthorized(format!(
            "join refused: {why}; ask an operator for a new token (`dozen node token`)"
        ))
    };
    let Some((id, secret)) = req.token.split_once('.') else {
        return Err(refuse("the token is not of the form <id>.<secret>"));
    };
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(refuse("the token id is not hex"));
    }
    let Some(token) = pki::find_join_token(s.store.as_ref(), id).await? else {
        return Err(refuse("the token is unknown, used or expired"));
    };
    let presented = dozen_api::tls::sha256_hex(secret.as_bytes());
    if !token_matches(presented.as_bytes(), &token.secret_sha256_hex) {
        return Err(refuse("the token's secret does not match"));
    }
    // A token joins the one node it was made for: it cannot take another node's name.
    if let Some(bound) = token.node.as_deref().filter(|bound| *bound != req.node) {
        return Err(refuse(&format!(
            "the token is for node `{bound}`, not `{}`",
            req.node
        )));
    }
    // What the node may later register as its host (where proxies send traffic): what the
    // operator gave with the token, else what the node names now, else where it joins from.
    check_hosts(&req.hosts)?;
    let hosts: Vec<String> = if !token.hosts.is_empty() {
        token.hosts.clone()
    } else if !req.hosts.is_empty() {
        req.hosts.clone()
    } else {
        connection
            .map(|c| vec![c.peer.ip().to_canonical().to_string()])
            .unwrap_or_default()
    };
    // One node per name: another joiner must not take a live node's name (and read its
    // assignments). Checked before the token is spent, so a refused join does not use it up.
    let taken = pki::unrevoked_certificates(s.store.as_ref(), &req.node).await?;
    if let Some(serial) = taken.first() {
        tracing::warn!(node = %req.node, holder = %serial, "refused a join under a name in use");
        return Err(ApiFailure::from_response(error(
            StatusCode::CONFLICT,
            format!(
                "node name `{}` is in use: a node holds certificate {serial} for it",
                req.node
            ),
            Some(format!(
                "join under another name (--node-name), or revoke the old one first (`dozen node \
                 revoke {}`)",
                req.node
            )),
        )));
    }
    // Sign before spending the token, so a bad request does not use it up.
    let issued = ca
        .sign_node(&req.csr_pem, &req.node)
        .map_err(|e| bad_request(e.to_string()))?;
    if !pki::spend_join_token(s.store.as_ref(), token, &req.node, &issued.serial, &hosts).await? {
        return Err(refuse("the token was used by another join just now"));
    }
    tracing::info!(node = %req.node, serial = %issued.serial, hosts = %hosts.join(","), "node joined; certificate issued");
    Ok(Json(JoinResponse {
        cert_pem: issued.cert_pem,
        ca_pem: ca.cert_pem.clone(),
        serial: issued.serial,
    }))
}

pub(crate) async fn revoke_node(
    State(s): State<Arc<AppState>>,
    Path(node): Path<String>,
) -> ApiResult<Json<RevokeResponse>> {
    let serials = pki::revoke_node(s.store.as_ref(), &node).await?;
    if serials.is_empty() {
        return Err(ApiFailure::from_response(error(
            StatusCode::NOT_FOUND,
            format!("no certificate was issued to node `{node}`"),
            Some(
                "`dozen nodes` lists the nodes; only nodes that joined with a token hold \
                 certificates"
                    .into(),
            ),
        )));
    }
    Ok(Json(RevokeResponse { node, serials }))
}
