//! The typed API client of the CLI, agents and proxies: one method per route, so no caller
//! builds a path or a request by hand.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::paths::{self, fill};
use crate::{
    ApplyOutcome, ApplyRequest, ClusterInfo, ErrorBody, EventQuery, HeartbeatRequest, JoinRequest,
    JoinResponse, JoinTokenRequest, JoinTokenResponse, ListResponse, LogLine, LogQuery, NodeInfo,
    ProxyHeartbeat, ProxyInfo, ProxyRegisterRequest, RegisterRequest, RegisterResponse,
    RevokeResponse, RollbackRequest, RouteQuery, RunRequest, ScaleRequest, ServiceSummary,
    StatusReport, TaskInfo, TaskQuery, WatchEvent, WatchQuery,
};
use dozen_model::{Assignment, Release, RouteTable, StackRecord};

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

    /// The same servers and TLS, presenting `token` instead (a task's identity).
    pub fn with_token(&self, token: &str) -> Client {
        Client {
            token: token.to_string(),
            ..self.clone()
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
        let resp = self.send_raw(build, path).await?;
        answer(resp, path).await
    }

    /// A read of the built-in registry (`path_and_query` under [`paths::REGISTRY`]) as the
    /// server answers it, refusals included: the agent's loopback mirror hands it on to its
    /// engine. `accept` is the client's list of manifest types.
    pub async fn registry_read(
        &self,
        head: bool,
        path_and_query: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, ApiError> {
        // No dot segment, backslash or encoded character but `:` may turn it into another
        // route once a URL library normalises it.
        let path = path_and_query.split('?').next().unwrap_or("");
        let normal = path.starts_with(paths::REGISTRY)
            && !path.contains('\\')
            && path
                .split('/')
                .all(|s| s != "." && s != ".." && !s.replace("%3A", "").contains('%'));
        if !normal {
            return Err(ApiError::Protocol {
                url: self.url(path_and_query),
                detail: "not a registry path".into(),
            });
        }
        let build = |url: &str| {
            let request = if head {
                self.http.head(url)
            } else {
                self.http.get(url)
            };
            match accept {
                Some(accept) => request.header(reqwest::header::ACCEPT, accept),
                None => request,
            }
        };
        self.send_raw(build, path_and_query).await
    }

    async fn send_raw(
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
        Ok(resp)
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

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let resp = self
            .send(|url| self.http.get(url).timeout(ONE_SHOT_TIMEOUT), path)
            .await?;
        self.json(resp, path).await
    }

    async fn get_query<T: DeserializeOwned, Q: Serialize>(
        &self,
        path: &str,
        query: &Q,
    ) -> Result<T, ApiError> {
        let resp = self
            .send(|url| self.http.get(url).query(query), path)
            .await?;
        self.json(resp, path).await
    }

    async fn post<T: DeserializeOwned, B: Serialize>(
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
    async fn call<B: Serialize>(
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

    /// Any method, with a query and a JSON body, answering JSON.
    pub(crate) async fn request<T: DeserializeOwned, Q: Serialize, B: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &Q,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let build = |url: &str| {
            let req = self
                .http
                .request(method.clone(), url)
                .query(query)
                .timeout(ONE_SHOT_TIMEOUT);
            match body {
                Some(body) => req.json(body),
                None => req,
            }
        };
        let resp = self.send(build, path).await?;
        self.json(resp, path).await
    }

    async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let resp = self
            .send(|url| self.http.delete(url).timeout(ONE_SHOT_TIMEOUT), path)
            .await?;
        self.json(resp, path).await
    }

    /// Uploads an artifact bundle unless the server has it already; returns its digest.
    pub async fn upload_blob(&self, bytes: Vec<u8>) -> Result<String, ApiError> {
        let digest = dozen_digest::sha256_digest(&bytes);
        let path = fill(paths::BLOB, &[&digest]);
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
        let path = fill(paths::BLOB, &[digest]);
        dozen_digest::check(digest).map_err(|e| ApiError::Protocol {
            url: self.url(&path),
            detail: e.to_string(),
        })?;
        let resp = self.send(|url| self.http.get(url), &path).await?;
        let bytes = resp.bytes().await.map_err(|e| ApiError::Unreachable {
            url: self.url(&path),
            detail: root_cause(&e),
        })?;
        dozen_digest::verify(digest, &bytes).map_err(|e| ApiError::Protocol {
            url: self.url(&path),
            detail: e.to_string(),
        })?;
        Ok(bytes.to_vec())
    }

    /// The blob `digest` streamed into a new file `to` (never whole in memory) and checked
    /// against its digest; on any failure the file is removed. Returns its size.
    pub async fn download_blob_to(
        &self,
        digest: &str,
        to: &std::path::Path,
    ) -> Result<u64, ApiError> {
        use tokio::io::AsyncWriteExt;
        let path = fill(paths::BLOB, &[digest]);
        let protocol = |detail: String| ApiError::Protocol {
            url: self.url(&path),
            detail,
        };
        dozen_digest::check(digest).map_err(|e| protocol(e.to_string()))?;
        let resp = self.send(|url| self.http.get(url), &path).await?;
        let result = async {
            let mut file = tokio::fs::File::create(to)
                .await
                .map_err(|e| protocol(format!("cannot write {}: {e}", to.display())))?;
            let mut hasher = dozen_digest::Hasher::default();
            let mut size = 0u64;
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ApiError::Unreachable {
                    url: self.url(&path),
                    detail: root_cause(&e),
                })?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| protocol(format!("cannot write {}: {e}", to.display())))?;
            }
            file.sync_all()
                .await
                .map_err(|e| protocol(format!("cannot write {}: {e}", to.display())))?;
            let actual = hasher.finish();
            if actual != digest {
                return Err(protocol(format!(
                    "content hashes to {actual}, not {digest}"
                )));
            }
            Ok(size)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(to).await;
        }
        result
    }

    /// A stream of newline-delimited JSON values from `path`.
    async fn ndjson<T: DeserializeOwned + Send + 'static, Q: Serialize>(
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
    async fn watch<T: DeserializeOwned + Send + 'static>(
        &self,
        path: &str,
        revision: u64,
    ) -> Result<impl Stream<Item = Result<WatchEvent<T>, ApiError>> + Send + Unpin, ApiError> {
        let query = WatchQuery {
            watch: true,
            revision: Some(revision),
        };
        self.ndjson(path, &query).await
    }

    // One method per route.

    pub async fn plan(&self, req: &ApplyRequest) -> Result<dozen_spec::Plan, ApiError> {
        self.post(paths::PLAN, req).await
    }

    pub async fn apply(&self, req: &ApplyRequest) -> Result<ApplyOutcome, ApiError> {
        self.post(paths::APPLY, req).await
    }

    pub async fn stacks(&self) -> Result<Vec<StackRecord>, ApiError> {
        self.get(paths::STACKS).await
    }

    /// Removes a stack; returns the services it removed.
    pub async fn down(&self, stack: &str) -> Result<Vec<String>, ApiError> {
        self.delete(&fill(paths::STACK, &[stack])).await
    }

    pub async fn services(&self) -> Result<Vec<ServiceSummary>, ApiError> {
        self.get(paths::SERVICES).await
    }

    pub async fn releases(&self, service: &str) -> Result<Vec<Release>, ApiError> {
        self.get(&fill(paths::SERVICE_RELEASES, &[service])).await
    }

    pub async fn scale(&self, service: &str, replicas: u32) -> Result<(), ApiError> {
        let path = fill(paths::SERVICE_SCALE, &[service]);
        self.call(Method::POST, &path, Some(&ScaleRequest { replicas }))
            .await
    }

    pub async fn restart(&self, service: &str) -> Result<(), ApiError> {
        let path = fill(paths::SERVICE_RESTART, &[service]);
        self.call::<()>(Method::POST, &path, None).await
    }

    pub async fn stop(&self, service: &str) -> Result<(), ApiError> {
        let path = fill(paths::SERVICE_STOP, &[service]);
        self.call::<()>(Method::POST, &path, None).await
    }

    /// Rolls back to release `to`, or the one before the current; returns the release now
    /// current.
    pub async fn rollback(&self, service: &str, to: Option<u64>) -> Result<Release, ApiError> {
        let path = fill(paths::SERVICE_ROLLBACK, &[service]);
        self.post(&path, &RollbackRequest { to }).await
    }

    /// Starts a one-off task of `service`'s current release.
    pub async fn run(&self, service: &str, argv: Vec<String>) -> Result<TaskInfo, ApiError> {
        let path = fill(paths::SERVICE_RUN, &[service]);
        self.post(&path, &RunRequest { argv }).await
    }

    /// Every task, or those of one service.
    pub async fn tasks(&self, service: Option<&str>) -> Result<Vec<TaskInfo>, ApiError> {
        match service {
            Some(service) => {
                let query = TaskQuery {
                    service: Some(service.to_string()),
                };
                self.get_query(paths::TASKS, &query).await
            }
            None => self.get(paths::TASKS).await,
        }
    }

    pub async fn task(&self, task: &str) -> Result<TaskInfo, ApiError> {
        self.get(&fill(paths::TASK, &[task])).await
    }

    /// Removes a finished one-off task.
    pub async fn remove_task(&self, task: &str) -> Result<(), ApiError> {
        let path = fill(paths::TASK, &[task]);
        self.call::<()>(Method::DELETE, &path, None).await
    }

    /// Log lines of every node, merged; with `follow`, a stream that stays open.
    pub async fn logs(
        &self,
        query: &LogQuery,
    ) -> Result<impl Stream<Item = Result<LogLine, ApiError>> + Send + Unpin, ApiError> {
        self.ndjson(paths::LOGS, query).await
    }

    /// What each task uses (memory now, CPU time so far), read by its node's agent.
    pub async fn stats(
        &self,
        query: &crate::StatsQuery,
    ) -> Result<Vec<crate::TaskUsage>, ApiError> {
        self.get_query(paths::STATS, query).await
    }

    /// Runs a command inside a running task: its output as it comes, then its exit code.
    pub async fn exec(
        &self,
        task: &str,
        request: &crate::ExecRequest,
    ) -> Result<impl Stream<Item = Result<crate::ExecOutput, ApiError>> + Send + Unpin, ApiError>
    {
        let path = fill(paths::TASK_EXEC, &[task]);
        let resp = self
            .send(|url| self.http.post(url).json(request), &path)
            .await?;
        Ok(ndjson_lines(resp.bytes_stream(), self.url(&path)))
    }

    /// Events, oldest first; with `follow`, then the new ones as they are recorded.
    pub async fn events(
        &self,
        query: &EventQuery,
    ) -> Result<impl Stream<Item = Result<dozen_model::Event, ApiError>> + Send + Unpin, ApiError>
    {
        self.ndjson(paths::EVENTS, query).await
    }

    /// The route table; with `after`, once it may have changed after that revision.
    pub async fn routes(&self, query: &RouteQuery) -> Result<RouteTable, ApiError> {
        self.get_query(paths::ROUTES, query).await
    }

    pub async fn proxies(&self) -> Result<ListResponse<ProxyInfo>, ApiError> {
        self.get(paths::PROXIES).await
    }

    pub async fn register_proxy(
        &self,
        id: &str,
        req: &ProxyRegisterRequest,
    ) -> Result<RegisterResponse, ApiError> {
        self.post(&fill(paths::PROXY_REGISTER, &[id]), req).await
    }

    pub async fn proxy_heartbeat(&self, id: &str, hb: &ProxyHeartbeat) -> Result<(), ApiError> {
        let path = fill(paths::PROXY_HEARTBEAT, &[id]);
        self.call(Method::POST, &path, Some(hb)).await
    }

    pub async fn cluster(&self) -> Result<ClusterInfo, ApiError> {
        self.get(paths::CLUSTER).await
    }

    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ApiError> {
        self.get(paths::NODES).await
    }

    pub async fn register_node(
        &self,
        node: &str,
        req: &RegisterRequest,
    ) -> Result<RegisterResponse, ApiError> {
        self.post(&fill(paths::NODE_REGISTER, &[node]), req).await
    }

    pub async fn node_heartbeat(&self, node: &str, lease: u64) -> Result<(), ApiError> {
        let path = fill(paths::NODE_HEARTBEAT, &[node]);
        self.call(Method::POST, &path, Some(&HeartbeatRequest { lease }))
            .await
    }

    pub async fn list_assignments(&self, node: &str) -> Result<ListResponse<Assignment>, ApiError> {
        self.get(&fill(paths::NODE_ASSIGNMENTS, &[node])).await
    }

    /// Watches a node's assignments from `revision` (the list's). A 410 answer surfaces as
    /// `ApiError::Status { status: 410, .. }`: list again.
    pub async fn watch_assignments(
        &self,
        node: &str,
        revision: u64,
    ) -> Result<impl Stream<Item = Result<WatchEvent<Assignment>, ApiError>> + Send + Unpin, ApiError>
    {
        self.watch(&fill(paths::NODE_ASSIGNMENTS, &[node]), revision)
            .await
    }

    pub async fn report_status(&self, node: &str, report: &StatusReport) -> Result<(), ApiError> {
        let path = fill(paths::NODE_STATUS, &[node]);
        self.call(Method::PUT, &path, Some(report)).await
    }

    pub async fn create_join_token(
        &self,
        req: &JoinTokenRequest,
    ) -> Result<JoinTokenResponse, ApiError> {
        self.post(paths::JOIN_TOKENS, req).await
    }

    pub async fn revoke_node(&self, node: &str) -> Result<RevokeResponse, ApiError> {
        self.post(&fill(paths::NODE_REVOKE, &[node]), &serde_json::json!({}))
            .await
    }

    /// The OpenAPI 3 document of this API.
    pub async fn openapi(&self) -> Result<serde_json::Value, ApiError> {
        self.get(paths::OPENAPI).await
    }

    /// Answers once the server is up and this client's token is accepted.
    pub async fn check_access(&self) -> Result<(), ApiError> {
        self.get::<serde_json::Value>(paths::NODES)
            .await
            .map(|_| ())
    }
}

/// The CA certificate `server` serves, fetched without trusting anyone yet: the caller must
/// check it against a pin before it trusts it.
pub async fn fetch_ca_unverified(server: &str) -> Result<String, ApiError> {
    let builder = reqwest::Client::builder().danger_accept_invalid_certs(true);
    let body = before_joining(server, paths::CA, builder, |http, url| http.get(url)).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Joins the cluster at `server`, trusting only `tls`'s CA (already checked against a pin).
pub async fn join(
    server: &str,
    tls: rustls::ClientConfig,
    req: &JoinRequest,
) -> Result<JoinResponse, ApiError> {
    let builder = reqwest::Client::builder().use_preconfigured_tls(tls);
    let body = before_joining(server, paths::JOIN, builder, |http, url| {
        http.post(url).json(req)
    })
    .await?;
    serde_json::from_slice(&body).map_err(|e| ApiError::Protocol {
        url: format!("{server}{}", paths::JOIN),
        detail: e.to_string(),
    })
}

/// One call a node makes before it has an identity (so with no token and no [`Client`]).
async fn before_joining(
    server: &str,
    path: &str,
    builder: reqwest::ClientBuilder,
    request: impl FnOnce(&reqwest::Client, &str) -> reqwest::RequestBuilder,
) -> Result<Bytes, ApiError> {
    let url = format!("{}{path}", server.trim_end_matches('/'));
    let unreachable = |e: reqwest::Error| ApiError::Unreachable {
        url: url.clone(),
        detail: root_cause(&e),
    };
    let http = builder
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(unreachable)?;
    let resp = request(&http, &url).send().await.map_err(unreachable)?;
    let resp = answer(resp, path).await?;
    resp.bytes().await.map_err(unreachable)
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

/// The response when it succeeded, else the server's error (its message and hint).
async fn answer(resp: reqwest::Response, path: &str) -> Result<reqwest::Response, ApiError> {
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

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
