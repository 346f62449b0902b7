//! The API client used by the CLI, agents and (later) proxies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
pub use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{ErrorBody, WatchEvent};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the dozen server at {url}: {detail}\n  hint: is `dozen server` running there? (--server / DOZEN_SERVER)")]
    Unreachable { url: String, detail: String },
    #[error("{message}{}", hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default())]
    Status {
        status: u16,
        message: String,
        hint: Option<String>,
    },
    #[error("unexpected answer from {url}: {detail}")]
    Protocol { url: String, detail: String },
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Longest wait for a one-shot call (not a stream): a half-open connection must not hang a
/// heartbeat or a status report forever.
const ONE_SHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// A client of one or more API servers (`http://a:7700,http://b:7700`): any server answers
/// any call, so a call that cannot connect to one is sent to the next, and the client stays
/// with the server that last answered.
#[derive(Clone)]
pub struct Client {
    bases: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
    token: String,
    http: reqwest::Client,
    /// Why the HTTP client could not be built as asked; every call reports it rather than
    /// going out without the TLS it was given.
    broken: Option<Arc<str>>,
}

impl Client {
    pub fn new(servers: &str, token: &str) -> Self {
        Self::with_tls(servers, token, None)
    }

    /// A client of `https://` servers: `tls` trusts the cluster CA (and, for a node,
    /// presents its certificate).
    pub fn with_tls(servers: &str, token: &str, tls: Option<rustls::ClientConfig>) -> Self {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            builder = builder.use_preconfigured_tls(tls);
        }
        let (http, broken) = match builder.build() {
            Ok(http) => (http, None),
            Err(e) => {
                tracing::error!(error = %root_cause(&e), "cannot build the HTTP client");
                (reqwest::Client::new(), Some(Arc::from(root_cause(&e))))
            }
        };
        let bases: Vec<String> = servers
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_string())
            .filter(|b| !b.is_empty())
            .collect();
        Client {
            bases: Arc::new(bases),
            current: Arc::new(AtomicUsize::new(0)),
            token: token.to_string(),
            http,
            broken,
        }
    }

    /// The server calls go to now.
    pub fn base(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed);
        self.bases.get(i).map(String::as_str).unwrap_or("")
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base(), path)
    }

    /// Sends the request `build` makes for a base URL, moving on to the next server while
    /// one cannot be connected to (nothing reached it, so the call is safe to repeat).
    async fn send(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
        path: &str,
    ) -> Result<reqwest::Response, ApiError> {
        if let Some(why) = &self.broken {
            return Err(ApiError::Unreachable {
                url: self.url(path),
                detail: format!("cannot set up the HTTP client: {why}"),
            });
        }
        let first = self.current.load(Ordering::Relaxed);
        let count = self.bases.len().max(1);
        let mut attempt = 0;
        let resp = loop {
            let i = (first + attempt) % count;
            let base = self.bases.get(i).map(String::as_str).unwrap_or("");
            match build(&format!("{base}{path}"))
                .bearer_auth(&self.token)
                .send()
                .await
            {
                Ok(resp) => {
                    self.current.store(i, Ordering::Relaxed);
                    break resp;
                }
                Err(e) if e.is_connect() && attempt + 1 < count => attempt += 1,
                Err(e) => {
                    return Err(ApiError::Unreachable {
                        url: format!("{base}{path}"),
                        detail: root_cause(&e),
                    })
                }
            }
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        let (message, hint) = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(b) => (b.error, b.hint),
            Err(_) => (
                format!(
                    "{} {}: {}",
                    status,
                    path,
                    String::from_utf8_lossy(&body).trim()
                ),
                None,
            ),
        };
        Err(ApiError::Status {
            status,
            message,
            hint,
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        resp: reqwest::Response,
        path: &str,
    ) -> Result<T, ApiError> {
        let bytes = resp.bytes().await.map_err(|e| ApiError::Unreachable {
            url: self.url(path),
            detail: root_cause(&e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Protocol {
            url: self.url(path),
            detail: e.to_string(),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let resp = self
            .send(|url| self.http.get(url).timeout(ONE_SHOT_TIMEOUT), path)
            .await?;
        self.json(resp, path).await
    }

    pub async fn get_query<T: DeserializeOwned, Q: Serialize>(
        &self,
        path: &str,
        query: &Q,
    ) -> Result<T, ApiError> {
        let resp = self
            .send(|url| self.http.get(url).query(query), path)
            .await?;
        self.json(resp, path).await
    }

    pub async fn post<T: DeserializeOwned, B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let resp = self
            .send(
                |url| self.http.post(url).json(body).timeout(ONE_SHOT_TIMEOUT),
                path,
            )
            .await?;
        self.json(resp, path).await
    }

    /// POST/PUT/DELETE whose answer has no body.
    pub async fn call<B: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(), ApiError> {
        let build = |url: &str| {
            let req = self
                .http
                .request(method.clone(), url)
                .timeout(ONE_SHOT_TIMEOUT);
            match body {
                Some(body) => req.json(body),
                None => req,
            }
        };
        self.send(build, path).await?;
        Ok(())
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let resp = self
            .send(|url| self.http.delete(url).timeout(ONE_SHOT_TIMEOUT), path)
            .await?;
        self.json(resp, path).await
    }

    /// Uploads an artifact bundle unless the server has it already; returns its digest.
    pub async fn upload_blob(&self, bytes: Vec<u8>) -> Result<String, ApiError> {
        let digest = dozen_store::blob::sha256_digest(&bytes);
        let path = format!("/v1/blobs/{digest}");
        match self.send(|url| self.http.head(url), &path).await {
            Ok(_) => return Ok(digest),
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e),
        }
        let bytes = Bytes::from(bytes);
        self.send(|url| self.http.put(url).body(bytes.clone()), &path)
            .await?;
        Ok(digest)
    }

    /// Downloads a blob and checks that its content matches its digest.
    pub async fn download_blob(&self, digest: &str) -> Result<Vec<u8>, ApiError> {
        let path = format!("/v1/blobs/{digest}");
        let resp = self.send(|url| self.http.get(url), &path).await?;
        let bytes = resp.bytes().await.map_err(|e| ApiError::Unreachable {
            url: self.url(&path),
            detail: root_cause(&e),
        })?;
        let actual = dozen_store::blob::sha256_digest(&bytes);
        if actual != digest {
            return Err(ApiError::Protocol {
                url: self.url(&path),
                detail: format!("blob content hashes to {actual}"),
            });
        }
        Ok(bytes.to_vec())
    }

    /// A stream of newline-delimited JSON values from `path`.
    pub async fn ndjson<T: DeserializeOwned + Send + 'static, Q: Serialize>(
        &self,
        path: &str,
        query: &Q,
    ) -> Result<impl Stream<Item = Result<T, ApiError>> + Send + Unpin, ApiError> {
        let resp = self
            .send(|url| self.http.get(url).query(query), path)
            .await?;
        Ok(ndjson_lines(resp.bytes_stream(), self.url(path)))
    }

    /// Watches a list-then-watch endpoint from `revision` (the list's revision).
    /// A 410 answer surfaces as `ApiError::Status { status: 410, .. }`: list again.
    pub async fn watch<T: DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
        revision: u64,
    ) -> Result<impl Stream<Item = Result<WatchEvent<T>, ApiError>> + Send + Unpin, ApiError> {
        self.ndjson(
            path,
            &[
                ("watch", "true".to_string()),
                ("revision", revision.to_string()),
            ],
        )
        .await
    }
}

fn ndjson_lines<T: DeserializeOwned + Send + 'static>(
    bytes: impl Stream<Item = reqwest::Result<Bytes>> + Send + Unpin + 'static,
    url: String,
) -> impl Stream<Item = Result<T, ApiError>> + Send + Unpin {
    let state = (bytes, Vec::<u8>::new(), url, false);
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut bytes, mut buf, url, done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if line.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    let item = serde_json::from_slice::<T>(&line).map_err(|e| ApiError::Protocol {
                        url: url.clone(),
                        detail: e.to_string(),
                    });
                    return Some((item, (bytes, buf, url, false)));
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        let err = ApiError::Unreachable {
                            url: url.clone(),
                            detail: root_cause(&e),
                        };
                        return Some((Err(err), (bytes, buf, url, true)));
                    }
                    None => return None,
                }
            }
        },
    ))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
