//! The other API servers: a server asked for a blob it does not hold (a client uploaded it to
//! another server) fetches it from a peer. Each server's record is kept by
//! `dozen_control::servers`.

use std::time::Duration;

use dozen_api::paths::{self, fill};
use dozen_api::LOCAL_ONLY;
use dozen_control::servers;

use crate::AppState;

/// Longest wait for a peer's copy of a blob (bundles are up to a few hundred MiB).
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// A GET of `url` on `peer`: over TLS with this server's own certificate (never the token); a
/// plain-HTTP peer (loopback clusters) gets the token, and only when this server is plain HTTP
/// too. None when the two do not speak alike.
pub(crate) fn request(
    s: &AppState,
    peer: &dozen_model::ServerRecord,
    url: &str,
) -> Option<reqwest::RequestBuilder> {
    request_with(s, peer, reqwest::Method::GET, url)
}

/// [`request`] with another method.
pub(crate) fn request_with(
    s: &AppState,
    peer: &dozen_model::ServerRecord,
    method: reqwest::Method,
    url: &str,
) -> Option<reqwest::RequestBuilder> {
    match (&s.peer_client, peer.url.starts_with("https://")) {
        (Some(client), true) => Some(client.request(method, url)),
        (None, false) => Some(s.http.request(method, url).bearer_auth(&s.token)),
        _ => None,
    }
}

/// Fetches the blob `digest` from the first peer that has it into this server's blob store,
/// streamed to disk and checked against its digest; true when it is now held here.
pub(crate) async fn fetch_blob(s: &AppState, digest: &str) -> bool {
    let peers = match servers::peers(s.store.as_ref(), &s.server_id).await {
        Ok(peers) => peers,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list peers");
            return false;
        }
    };
    for peer in peers {
        let url = format!(
            "{}{}",
            peer.url.trim_end_matches('/'),
            fill(paths::BLOB, &[digest])
        );
        let Some(request) = request(s, &peer, &url) else {
            tracing::debug!(peer = %peer.id, url = %peer.url, "peer not reachable the way this server speaks");
            continue;
        };
        let fetched = async {
            let resp = request
                .header(LOCAL_ONLY, "1")
                .timeout(FETCH_TIMEOUT)
                .send()
                .await
                .map_err(|e| (e.status(), e.to_string()))?
                .error_for_status()
                .map_err(|e| (e.status(), e.to_string()))?;
            let mut writer = s
                .blobs
                .writer(digest, crate::blobs::MAX_BLOB_BYTES as u64)
                .map_err(|e| (None, e.to_string()))?;
            let mut body = resp.bytes_stream();
            while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
                let chunk = chunk.map_err(|e| (None, e.to_string()))?;
                writer
                    .write(&chunk)
                    .await
                    .map_err(|e| (None, e.to_string()))?;
            }
            writer.commit().await.map_err(|e| (None, e.to_string()))
        }
        .await;
        match fetched {
            Ok(bytes) => {
                tracing::info!(peer = %peer.id, digest, bytes, "fetched a blob from a peer");
                return true;
            }
            Err((Some(reqwest::StatusCode::NOT_FOUND), _)) => {}
            Err((_, e)) => {
                tracing::warn!(peer = %peer.id, error = %e, "cannot fetch a blob from a peer")
            }
        }
    }
    false
}
