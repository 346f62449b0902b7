//! Blob uploads: monolithic (`POST ?digest=`), chunked (`POST`, `PATCH`..., `PUT ?digest=`)
//! and cross-repository mounts (`POST ?mount=&from=`). A session streams into a temporary
//! file of the blob store while it hashes, and becomes a blob only if the digest it is closed
//! with matches. Sessions live in this server's memory: at most [`MAX_SESSIONS`], each
//! dropped (with its file) after [`IDLE_LIMIT`] without a request; a client whose session is
//! gone starts its upload again, as the spec lets it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use dozen_control::registry as records;
use dozen_model::registry::Code;
use dozen_store::blob::BlobWriter;

use super::{insert, query_value, Answer, Failure, MAX_LAYER_BYTES};
use crate::AppState;

/// Most uploads open at once on one server.
pub const MAX_SESSIONS: usize = 128;
/// How long an upload waits for its next request.
pub const IDLE_LIMIT: Duration = Duration::from_secs(15 * 60);

#[derive(Default)]
pub(crate) struct Uploads {
    sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Session>>>>,
}

struct Session {
    repo: String,
    /// None once finished or cancelled.
    writer: Option<BlobWriter>,
    touched: Instant,
}

impl Uploads {
    /// Drops the sessions idle past [`IDLE_LIMIT`] and their files (also run with every blob
    /// collection, so an idle session never holds its disk space for long).
    pub(crate) fn sweep(&self) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, s| {
            s.try_lock()
                .map(|s| s.touched.elapsed() < IDLE_LIMIT)
                .unwrap_or(true)
        });
    }

    fn open(&self, repo: &str, writer: BlobWriter) -> Result<String, Failure> {
        self.sweep();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.len() >= MAX_SESSIONS {
            return Err(Failure::new(
                Code::TooManyRequests,
                format!("{MAX_SESSIONS} uploads are open on this server; try again shortly"),
            ));
        }
        let id = format!(
            "{}{}{}{}",
            dozen_control::random_suffix(),
            dozen_control::random_suffix(),
            dozen_control::random_suffix(),
            dozen_control::random_suffix()
        );
        let session = Session {
            repo: repo.to_string(),
            writer: Some(writer),
            touched: Instant::now(),
        };
        sessions.insert(id.clone(), Arc::new(tokio::sync::Mutex::new(session)));
        Ok(id)
    }

    fn get(&self, repo: &str, id: &str) -> Result<Arc<tokio::sync::Mutex<Session>>, Failure> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.get(id).cloned().ok_or_else(|| unknown(repo, id))
    }

    fn remove(&self, id: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.remove(id);
    }
}

fn unknown(repo: &str, id: &str) -> Failure {
    Failure::new(
        Code::BlobUploadUnknown,
        format!("no upload `{id}` in repository `{repo}` (finished, cancelled, idle over {} minutes, or begun on another server); start again", IDLE_LIMIT.as_secs() / 60),
    )
}

/// `POST /v2/<repo>/blobs/uploads/`: a mount, a whole blob, or a new session.
pub(crate) async fn start(
    s: &Arc<AppState>,
    repo: &str,
    query: &[(String, String)],
    body: Body,
) -> Answer {
    if let (Some(digest), Some(from)) = (query_value(query, "mount"), query_value(query, "from")) {
        if mount(s, repo, digest, from).await? {
            return Ok(created(repo, digest));
        }
        // Not there to mount: the client uploads it instead, as the spec says.
    }
    let (blobs, limit) = (s.blobs.clone(), MAX_LAYER_BYTES);
    let mut writer = crate::blobs::blocking(move || blobs.upload(limit)).await?;
    if let Some(digest) = query_value(query, "digest") {
        dozen_model::registry::check_digest(digest)?;
        stream_into(&mut writer, body).await?;
        let size = writer.commit_as(digest).await?;
        records::link_blob(s.store.as_ref(), repo, digest, size).await?;
        return Ok(created(repo, digest));
    }
    let id = s.uploads.open(repo, writer)?;
    Ok(progress(StatusCode::ACCEPTED, repo, &id, 0))
}

/// Links `digest` from repository `from` into `repo`, if `from` holds it and its bytes are here.
async fn mount(s: &Arc<AppState>, repo: &str, digest: &str, from: &str) -> Result<bool, Failure> {
    dozen_model::registry::check_digest(digest)?;
    if dozen_model::registry::check_name(from).is_err() {
        return Ok(false);
    }
    let Some(link) = records::blob_link(s.store.as_ref(), from, digest).await? else {
        return Ok(false);
    };
    let (blobs, name) = (s.blobs.clone(), digest.to_string());
    if !crate::blobs::blocking(move || blobs.contains(&name)).await? {
        return Ok(false);
    }
    records::link_blob(s.store.as_ref(), repo, digest, link.size).await?;
    Ok(true)
}

/// `PATCH`: the next chunk. A `Content-Range` must start where the upload is.
pub(crate) async fn patch(
    s: &Arc<AppState>,
    repo: &str,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Answer {
    let session = s.uploads.get(repo, id)?;
    let mut session = session.lock().await;
    if session.repo != repo {
        return Err(unknown(repo, id));
    }
    let offset = session.writer.as_ref().map_or(0, BlobWriter::written);
    if let Some(range) = headers
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
    {
        let start = range
            .trim_start_matches("bytes ")
            .split(['-', '/'])
            .next()
            .and_then(|n| n.parse::<u64>().ok());
        if start != Some(offset) {
            let mut answer = Failure::new(
                Code::BlobUploadInvalid,
                format!("the chunk starts at `{range}` but the upload holds {offset} bytes; send from there"),
            )
            .status(416)
            .into_response();
            insert(answer.headers_mut(), "range", &range_header(offset));
            return Ok(answer);
        }
    }
    let Some(writer) = session.writer.as_mut() else {
        return Err(unknown(repo, id));
    };
    let streamed = stream_into(writer, body).await;
    session.touched = Instant::now();
    if let Err(failure) = streamed {
        drop(session);
        s.uploads.remove(id);
        return Err(failure);
    }
    let written = session.writer.as_ref().map_or(0, BlobWriter::written);
    Ok(progress(StatusCode::ACCEPTED, repo, id, written))
}

/// `PUT ?digest=`: the last chunk (maybe empty); the blob is kept if the digest matches.
pub(crate) async fn finish(
    s: &Arc<AppState>,
    repo: &str,
    id: &str,
    query: &[(String, String)],
    body: Body,
) -> Answer {
    let Some(digest) = query_value(query, "digest") else {
        return Err(Failure::new(
            Code::DigestInvalid,
            "closing an upload takes ?digest=sha256:… of the whole blob",
        ));
    };
    dozen_model::registry::check_digest(digest)?;
    let session = s.uploads.get(repo, id)?;
    let mut session = session.lock().await;
    if session.repo != repo {
        return Err(unknown(repo, id));
    }
    let writer = session.writer.take();
    drop(session);
    s.uploads.remove(id);
    let Some(mut writer) = writer else {
        return Err(unknown(repo, id));
    };
    stream_into(&mut writer, body).await?;
    let size = writer.commit_as(digest).await?;
    records::link_blob(s.store.as_ref(), repo, digest, size).await?;
    Ok(created(repo, digest))
}

/// `GET`: how much of the upload the server holds.
pub(crate) async fn status(s: &Arc<AppState>, repo: &str, id: &str) -> Answer {
    let session = s.uploads.get(repo, id)?;
    let session = session.lock().await;
    if session.repo != repo {
        return Err(unknown(repo, id));
    }
    let written = session.writer.as_ref().map_or(0, BlobWriter::written);
    Ok(progress(StatusCode::NO_CONTENT, repo, id, written))
}

/// `DELETE`: gives the upload up; its bytes go.
pub(crate) async fn cancel(s: &Arc<AppState>, repo: &str, id: &str) -> Answer {
    let session = s.uploads.get(repo, id)?;
    if session.lock().await.repo != repo {
        return Err(unknown(repo, id));
    }
    s.uploads.remove(id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn stream_into(writer: &mut BlobWriter, body: Body) -> Result<(), Failure> {
    let mut stream = body.into_data_stream();
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| {
            Failure::new(
                Code::BlobUploadInvalid,
                format!("the upload broke off: {e}"),
            )
        })?;
        writer.write(&chunk).await?;
    }
    Ok(())
}

/// `0-(n-1)`, as registries say how much they hold (`0-0` for nothing yet, as the reference
/// registry does).
fn range_header(written: u64) -> String {
    format!("0-{}", written.saturating_sub(1))
}

fn progress(status: StatusCode, repo: &str, id: &str, written: u64) -> Response {
    let mut response = status.into_response();
    let h = response.headers_mut();
    insert(h, "location", &format!("/v2/{repo}/blobs/uploads/{id}"));
    insert(h, "range", &range_header(written));
    insert(h, "docker-upload-uuid", id);
    insert(h, "content-length", "0");
    response
}

fn created(repo: &str, digest: &str) -> Response {
    let mut response = StatusCode::CREATED.into_response();
    let h = response.headers_mut();
    insert(h, "location", &format!("/v2/{repo}/blobs/{digest}"));
    insert(h, super::CONTENT_DIGEST, digest);
    insert(h, "content-length", "0");
    response
}
