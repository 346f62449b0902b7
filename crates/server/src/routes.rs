//! Routes and proxies: the route table (long-polled by proxies), proxy registration and the
//! leased heartbeat that carries the revision each proxy applied.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use dozen_api::{
    ListResponse, ProxyHeartbeat, ProxyInfo, ProxyRegisterRequest, RegisterResponse, RouteQuery,
};
use dozen_control::proxies;

use crate::error::ApiResult;
use crate::AppState;

/// The route table, long-polled by proxies: with `after`, the answer waits until something that
/// routes depend on changed after that revision (or `wait_ms`, default 30 s, at most 120 s).
pub(crate) async fn routes(
    State(s): State<Arc<AppState>>,
    Query(q): Query<RouteQuery>,
) -> ApiResult<Json<dozen_model::RouteTable>> {
    if let Some(after) = q.after {
        let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000).min(120_000));
        proxies::wait_for_route_change(s.store.as_ref(), after, wait).await;
    }
    Ok(Json(proxies::route_table(s.store.as_ref()).await?))
}

pub(crate) async fn list_proxies(
    State(s): State<Arc<AppState>>,
) -> ApiResult<Json<ListResponse<ProxyInfo>>> {
    let (proxies, revision) = proxies::list(s.store.as_ref()).await?;
    Ok(Json(ListResponse {
        items: proxies
            .into_iter()
            .map(|(record, current)| ProxyInfo { record, current })
            .collect(),
        revision,
    }))
}

pub(crate) async fn register_proxy(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(req): Json<ProxyRegisterRequest>,
) -> ApiResult<Json<RegisterResponse>> {
    let lease = proxies::register(
        s.store.as_ref(),
        &id,
        req.public_address,
        req.internal_address,
        s.node_ttl,
    )
    .await?;
    Ok(Json(s.registered(lease)))
}

pub(crate) async fn proxy_heartbeat(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(hb): Json<ProxyHeartbeat>,
) -> ApiResult<StatusCode> {
    proxies::heartbeat(s.store.as_ref(), &id, hb.lease, hb.applied_revision).await?;
    Ok(StatusCode::NO_CONTENT)
}
