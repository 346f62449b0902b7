//! What tasks use: each agent reads its tasks through their drivers; the server asks every
//! agent it may call (and the peers for those only they reach) and joins the answers.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::Json;
use dozen_api::{paths, StatsQuery, TaskUsage};
use dozen_control::snapshot::Snapshot;

use crate::error::ApiResult;
use crate::logs::Source;
use crate::AppState;

/// How long one agent (or peer) may take to answer.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

pub(crate) async fn stats(
    State(s): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    Query(q): Query<StatsQuery>,
) -> ApiResult<Json<Vec<TaskUsage>>> {
    let snap = Snapshot::read(s.store.as_ref()).await?;
    let local_only = headers.contains_key(dozen_api::LOCAL_ONLY);
    let sources = crate::logs::sources(&s, &snap, local_only).await;
    let asks = sources.iter().map(|source| ask(&s, source, &q));
    let mut all = Vec::new();
    for (source, answer) in sources
        .iter()
        .zip(futures_util::future::join_all(asks).await)
    {
        match answer {
            Ok(usages) => all.extend(usages),
            Err(e) => tracing::warn!(source = %source.name(), error = %e, "no task stats from it"),
        }
    }
    all.sort_by(|a, b| (&a.service, &a.task).cmp(&(&b.service, &b.task)));
    Ok(Json(all))
}

async fn ask(s: &AppState, source: &Source, q: &StatsQuery) -> Result<Vec<TaskUsage>, String> {
    let answer = match source {
        Source::Agent(node) => crate::logs::agent(s).stats(node, q, ANSWER_WAIT).await?,
        Source::Peer(peer) => {
            let url = format!("{}{}", peer.url.trim_end_matches('/'), paths::STATS);
            crate::peers::request(s, peer, &url)
                .ok_or_else(|| {
                    format!(
                        "server {} is not reachable the way this one speaks",
                        peer.id
                    )
                })?
                .query(q)
                .header(dozen_api::LOCAL_ONLY, "1")
                .timeout(ANSWER_WAIT)
                .send()
                .await
                .map_err(|e| e.to_string())?
        }
    };
    let answer = answer.error_for_status().map_err(|e| e.to_string())?;
    answer.json().await.map_err(|e| e.to_string())
}
