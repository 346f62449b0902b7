//! The other API servers: a server asked for a blob it does not hold (a client uploaded it to
//! another server) fetches it from a peer. Each server's record is kept by
//! `dozen_control::servers`.

use std::time::Duration;

use dozen_api::paths::{self, fill};
use dozen_api::LOCAL_ONLY;
use dozen_control::servers;

use crate::AppState;

/// Longest wait for a peer to start answering with its copy of a blob, and then for each next
/// piece of it: a big layer may take long as a whole, but never stalls.
const FETCH_START: Duration = Duration::from_secs(30);
const FETCH_IDLE: Duration = Duration::from_secs(60);

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
            let sent = tokio::time::timeout(FETCH_START, request.header(LOCAL_ONLY, "1").send());
            let resp = sent
                .await
                .map_err(|_| (None, "the peer did not answer in time".to_string()))?
                .map_err(|e| (e.status(), e.to_string()))?
                .error_for_status()
                .map_err(|e| (e.status(), e.to_string()))?;
            // Image layers are the largest blobs: the registry's bound, not a bundle's.
            let mut writer = s
                .blobs
                .writer(digest, crate::registry::MAX_LAYER_BYTES)
                .map_err(|e| (None, e.to_string()))?;
            let mut body = resp.bytes_stream();
            loop {
                // A peer that stops sending is given up on; one that sends slowly is not.
                let next =
                    tokio::time::timeout(FETCH_IDLE, futures_util::StreamExt::next(&mut body));
                let Some(chunk) = next
                    .await
                    .map_err(|_| (None, "the peer stopped sending".to_string()))?
                else {
                    break;
                };
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
