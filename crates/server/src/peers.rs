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
    match (&s.peer_client, peer.url.starts_with("https://")) {
        (Some(client), true) => Some(client.get(url)),
        (None, false) => Some(s.http.get(url).bearer_auth(&s.token)),
        _ => None,
    }
}

/// The blob `digest` from the first peer that has it. Over TLS this server shows its own
/// certificate and never the token; a plain-HTTP peer (loopback clusters) gets the token,
/// and only when this server is plain HTTP too.
pub(crate) async fn fetch_blob(s: &AppState, digest: &str) -> Option<Vec<u8>> {
    let peers = match servers::peers(s.store.as_ref(), &s.server_id).await {
        Ok(peers) => peers,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list peers");
            return None;
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
        let answer = async {
            let resp = request
                .header(LOCAL_ONLY, "1")
                .timeout(FETCH_TIMEOUT)
                .send()
                .await?
                .error_for_status()?;
            resp.bytes().await
        }
        .await;
        match answer {
            Ok(bytes) => {
                tracing::info!(peer = %peer.id, digest, bytes = bytes.len(), "fetched a blob from a peer");
                return Some(bytes.to_vec());
            }
            Err(e) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => {}
            Err(e) => {
                tracing::warn!(peer = %peer.id, error = %e, "cannot fetch a blob from a peer")
            }
        }
    }
    None
}
