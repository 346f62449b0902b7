//! The built-in image registry: the OCI Distribution API under `/v2/`, beside the dozen API on
//! the same listener. Blobs and manifests are bytes in the blob store (content addressed, the
//! same store as artifact bundles); which repository holds what and where tags point are
//! records (`control::registry`). Pushing takes the operator token (as a bearer token, or as
//! the password of HTTP basic auth, which is what `docker login` sends); a node certificate
//! may pull. Errors carry the spec's codes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use dozen_control::{registry as records, ControlError};
use dozen_model::registry::{Code, Reference, RegistryError, MAX_MANIFEST_BYTES};
use dozen_store::blob::BlobError;

use crate::{AppState, ConnectionInfo};

mod uploads;
pub(crate) use uploads::Uploads;

/// Largest blob (an image layer) taken.
pub const MAX_LAYER_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// Most repositories or tags one page of a listing holds.
const MAX_PAGE: usize = 1000;
const API_VERSION: &str = "Docker-Distribution-API-Version";
const CONTENT_DIGEST: &str = "Docker-Content-Digest";

/// An answer in the spec's error format: `{"errors":[{"code","message","detail"}]}`, under
/// the code's status unless a server fault (500, 503) or a size limit (413) says otherwise.
pub(crate) struct Failure {
    error: RegistryError,
    status: Option<u16>,
}

impl From<RegistryError> for Failure {
    fn from(error: RegistryError) -> Self {
        Failure {
            error,
            status: None,
        }
    }
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Registry(e) => e.into(),
            other => {
                tracing::error!(error = %other, "registry request failed");
                Failure::new(
                    Code::Unsupported,
                    "the registry cannot answer now; the server's log says why",
                )
                .status(500)
            }
        }
    }
}

impl From<BlobError> for Failure {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::BadDigest(e) => Failure::new(Code::DigestInvalid, e.to_string()),
            BlobError::Mismatch { expected, actual } => Failure::new(
                Code::DigestInvalid,
                format!("the content hashes to {actual}, not {expected}; nothing was kept"),
            ),
            BlobError::TooLarge { limit, .. } => Failure::new(
                Code::SizeInvalid,
                format!("a blob may be at most {limit} bytes"),
            )
            .status(413),
            io @ BlobError::Io { .. } => {
                tracing::error!(error = %io, "registry blob store failed");
                Failure::new(
                    Code::Unsupported,
                    "the registry's blob store failed; the server's log says why",
                )
                .status(500)
            }
        }
    }
}

impl Failure {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        RegistryError::new(code, message).into()
    }
    pub(crate) fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or(self.error.code.status());
        let body = serde_json::json!({
            "errors": [{ "code": self.error.code.as_str(), "message": self.error.message, "detail": null }]
        });
        let mut response = (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            axum::Json(body),
        )
            .into_response();
        if self.error.code == Code::Unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"dozen registry\""),
            );
        }
        response
    }
}

type Answer = Result<Response, Failure>;

/// The registry's routes: every method and path under `/v2/`, dispatched here (repository
/// names contain `/`, so the path is read from its end).
pub(crate) fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/v2", axum::routing::any(dispatch))
        .route("/v2/", axum::routing::any(dispatch))
        .route("/v2/{*rest}", axum::routing::any(dispatch))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(state, authenticate))
        .layer(axum::middleware::map_response(
            |mut r: Response| async move {
                r.headers_mut()
                    .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
                r
            },
        ))
}

/// The operator token (bearer, or the password of basic auth) opens everything; a node's
/// certificate opens pulls; anything else gets the challenge `docker login` answers.
async fn authenticate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(presented_token)
        .unwrap_or_default();
    if dozen_api::token_matches(given.as_bytes(), state.token.as_bytes()) {
        return next.run(request).await;
    }
    let node = request
        .extensions()
        .get::<ConnectionInfo>()
        .and_then(|c| c.identity.clone());
    if let Some(node) = node {
        let reading = matches!(*request.method(), Method::GET | Method::HEAD);
        let revoked = dozen_control::pki::is_revoked(state.store.as_ref(), &node.serial).await;
        return match (reading, revoked) {
            (true, Ok(false)) => next.run(request).await,
            (false, _) => Failure::new(
                Code::Denied,
                format!("a node certificate (`{}`) may pull images, not push or delete them; use the operator token", node.name),
            )
            .into_response(),
            (true, Ok(true)) => Failure::new(
                Code::Denied,
                format!("the certificate of node `{}` is revoked", node.name),
            )
            .into_response(),
            (true, Err(e)) => {
                Failure::new(Code::Denied, format!("cannot check revocation now: {e}"))
                    .status(503)
                    .into_response()
            }
        };
    }
    Failure::new(
        Code::Unauthorized,
        "the registry takes the operator token: `dozen registry login` or `docker login -u dozen` with the token as password",
    )
    .into_response()
}

/// The token in `Bearer TOKEN` or `Basic base64(USER:TOKEN)` (any user name).
fn presented_token(header: &str) -> String {
    if let Some(token) = header.strip_prefix("Bearer ") {
        return token.trim().to_string();
    }
    use base64::Engine;
    header
        .strip_prefix("Basic ")
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|pair| {
            pair.split_once(':')
                .map(|(_, password)| password.to_string())
        })
        .unwrap_or_default()
}

/// What a path under `/v2/` names.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Base,
    Catalog,
    Tags(String),
    Manifest(String, String),
    Blob(String, String),
    UploadStart(String),
    Upload(String, String),
}

fn target(path: &str) -> Option<Target> {
    let rest = path.strip_prefix("/v2")?.trim_start_matches('/');
    if rest.is_empty() {
        return Some(Target::Base);
    }
    if rest == "_catalog" {
        return Some(Target::Catalog);
    }
    if let Some(repo) = rest.strip_suffix("/tags/list") {
        return Some(Target::Tags(repo.into()));
    }
    if let Some(repo) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Some(Target::UploadStart(repo.into()));
    }
    let (head, last) = rest.rsplit_once('/')?;
    let last = last.replace("%3A", ":").replace("%3a", ":");
    if let Some(repo) = head.strip_suffix("/blobs/uploads") {
        return Some(Target::Upload(repo.into(), last));
    }
    if let Some(repo) = head.strip_suffix("/manifests") {
        return Some(Target::Manifest(repo.into(), last));
    }
    if let Some(repo) = head.strip_suffix("/blobs") {
        return Some(Target::Blob(repo.into(), last));
    }
    None
}

async fn dispatch(State(s): State<Arc<AppState>>, request: Request) -> Response {
    let method = request.method().clone();
    let query = query_pairs(request.uri().query());
    let headers = request.headers().clone();
    let Some(target) = target(request.uri().path()) else {
        return Failure::new(
            Code::Unsupported,
            format!("{} is no registry route", request.uri().path()),
        )
        .status(404)
        .into_response();
    };
    let body = request.into_body();
    let answer = route(&s, &method, target, &query, &headers, body).await;
    answer.unwrap_or_else(IntoResponse::into_response)
}

async fn route(
    s: &Arc<AppState>,
    method: &Method,
    target: Target,
    query: &[(String, String)],
    headers: &HeaderMap,
    body: Body,
) -> Answer {
    if let Target::Tags(repo)
    | Target::Manifest(repo, _)
    | Target::Blob(repo, _)
    | Target::UploadStart(repo)
    | Target::Upload(repo, _) = &target
    {
        dozen_model::registry::check_name(repo)?;
    }
    let wrong_method = || {
        Err(Failure::new(
            Code::Unsupported,
            format!("{method} is not served here"),
        ))
    };
    match (method.clone(), target) {
        (Method::GET | Method::HEAD, Target::Base) => {
            Ok(axum::Json(serde_json::json!({})).into_response())
        }
        (Method::GET, Target::Catalog) => {
            let names = records::catalog(s.store.as_ref()).await?;
            Ok(page("/v2/_catalog", "repositories", None, names, query))
        }
        (Method::GET, Target::Tags(repo)) => {
            let tags = records::tags(s.store.as_ref(), &repo).await?;
            let path = format!("/v2/{repo}/tags/list");
            Ok(page(&path, "tags", Some(&repo), tags, query))
        }
        (Method::GET | Method::HEAD, Target::Manifest(repo, reference)) => {
            get_manifest(s, method == Method::HEAD, &repo, &reference).await
        }
        (Method::PUT, Target::Manifest(repo, reference)) => {
            put_manifest(s, &repo, &reference, headers, body).await
        }
        (Method::DELETE, Target::Manifest(repo, reference)) => {
            let reference = Reference::parse(&reference)?;
            records::delete_manifest(s.store.as_ref(), &repo, &reference).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (Method::GET | Method::HEAD, Target::Blob(repo, digest)) => {
            get_blob(s, method == Method::HEAD, &repo, &digest).await
        }
        (Method::DELETE, Target::Blob(repo, digest)) => {
            dozen_model::registry::check_digest(&digest)?;
            records::unlink_blob(s.store.as_ref(), &repo, &digest).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (Method::POST, Target::UploadStart(repo)) => uploads::start(s, &repo, query, body).await,
        (Method::PATCH, Target::Upload(repo, id)) => {
            uploads::patch(s, &repo, &id, headers, body).await
        }
        (Method::PUT, Target::Upload(repo, id)) => {
            uploads::finish(s, &repo, &id, query, body).await
        }
        (Method::GET, Target::Upload(repo, id)) => uploads::status(s, &repo, &id).await,
        (Method::DELETE, Target::Upload(repo, id)) => uploads::cancel(s, &repo, &id).await,
        _ => wrong_method(),
    }
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode_component(k), decode_component(v))
        })
        .collect()
}

fn decode_component(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn query_value<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// One page of a sorted listing (`n` at most, after `last`), with a `Link` to the next.
fn page(
    path: &str,
    field: &str,
    repo: Option<&str>,
    all: Vec<String>,
    query: &[(String, String)],
) -> Response {
    let n = query_value(query, "n")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(MAX_PAGE)
        .min(MAX_PAGE);
    let last = query_value(query, "last").unwrap_or("");
    let after: Vec<String> = all
        .into_iter()
        .filter(|name| last.is_empty() || name.as_str() > last)
        .collect();
    let more = after.len() > n;
    let shown: Vec<String> = after.into_iter().take(n).collect();
    let mut body = serde_json::Map::new();
    if let Some(repo) = repo {
        body.insert("name".into(), repo.into());
    }
    body.insert(field.into(), shown.clone().into());
    let mut response = axum::Json(serde_json::Value::Object(body)).into_response();
    if let (true, Some(last)) = (more, shown.last()) {
        let link = format!("<{path}?n={n}&last={last}>; rel=\"next\"");
        if let Ok(value) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    response
}

async fn get_manifest(s: &Arc<AppState>, head: bool, repo: &str, reference: &str) -> Answer {
    let reference = Reference::parse(reference)?;
    let unknown = || {
        Failure::new(
            Code::ManifestUnknown,
            match &reference {
                Reference::Tag(t) => format!("repository `{repo}` has no tag `{t}`"),
                Reference::Digest(d) => format!("repository `{repo}` has no manifest {d}"),
            },
        )
    };
    let record = records::resolve(s.store.as_ref(), repo, &reference)
        .await?
        .ok_or_else(unknown)?;
    let Some(file) = crate::blobs::open_or_fetch(s, &record.digest).await? else {
        tracing::warn!(repo, digest = %record.digest, "a recorded manifest's bytes are missing");
        return Err(unknown());
    };
    let mut response = if head {
        Response::new(Body::empty())
    } else {
        crate::blobs::file_response(file)
    };
    let headers = response.headers_mut();
    insert(headers, header::CONTENT_TYPE.as_str(), &record.media_type);
    insert(
        headers,
        header::CONTENT_LENGTH.as_str(),
        &record.size.to_string(),
    );
    insert(headers, CONTENT_DIGEST, &record.digest);
    insert(
        headers,
        header::ETAG.as_str(),
        &format!("\"{}\"", record.digest),
    );
    Ok(response)
}

pub(crate) fn insert(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(name), Ok(value)) = (
        header::HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        headers.insert(name, value);
    }
}

async fn put_manifest(
    s: &Arc<AppState>,
    repo: &str,
    reference: &str,
    headers: &HeaderMap,
    body: Body,
) -> Answer {
    let reference = Reference::parse(reference)?;
    let bytes = read_limited(body, MAX_MANIFEST_BYTES).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let parsed = dozen_model::registry::parse_manifest(content_type, &bytes)?;
    let digest = dozen_store::blob::sha256_digest(&bytes);
    let size = bytes.len() as u64;
    let (blobs, name) = (s.blobs.clone(), digest.clone());
    crate::blobs::blocking(move || blobs.put(&name, &bytes))
        .await
        .map_err(|_| Failure::new(Code::Unsupported, "cannot store the manifest").status(500))?;
    records::put_manifest(s.store.as_ref(), repo, &reference, &digest, size, parsed).await?;
    tracing::info!(repo, %digest, "manifest pushed");
    let mut response = StatusCode::CREATED.into_response();
    let h = response.headers_mut();
    insert(
        h,
        header::LOCATION.as_str(),
        &format!("/v2/{repo}/manifests/{digest}"),
    );
    insert(h, CONTENT_DIGEST, &digest);
    Ok(response)
}

/// The body, refused once over `limit` bytes (never held beyond it).
async fn read_limited(body: Body, limit: usize) -> Result<Vec<u8>, Failure> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| {
            Failure::new(Code::ManifestInvalid, format!("the upload broke off: {e}"))
        })?;
        if out.len() + chunk.len() > limit {
            return Err(Failure::new(
                Code::SizeInvalid,
                format!("a manifest may be at most {limit} bytes"),
            )
            .status(413));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn get_blob(s: &Arc<AppState>, head: bool, repo: &str, digest: &str) -> Answer {
    dozen_model::registry::check_digest(digest)?;
    let unknown = || {
        Failure::new(
            Code::BlobUnknown,
            format!("repository `{repo}` holds no blob {digest}"),
        )
    };
    let link = records::blob_link(s.store.as_ref(), repo, digest)
        .await?
        .ok_or_else(unknown)?;
    let file = crate::blobs::open_or_fetch(s, digest)
        .await?
        .ok_or_else(unknown)?;
    let mut response = if head {
        Response::new(Body::empty())
    } else {
        crate::blobs::file_response(file)
    };
    let h = response.headers_mut();
    insert(h, header::CONTENT_TYPE.as_str(), "application/octet-stream");
    insert(h, header::CONTENT_LENGTH.as_str(), &link.size.to_string());
    insert(h, CONTENT_DIGEST, digest);
    Ok(response)
}

impl From<crate::error::ApiFailure> for Failure {
    fn from(_: crate::error::ApiFailure) -> Self {
        Failure::new(
            Code::Unsupported,
            "the blob store failed; see the server's log",
        )
        .status(500)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_read_from_their_end() {
        let d = "sha256:abc";
        assert_eq!(target("/v2/"), Some(Target::Base));
        assert_eq!(target("/v2"), Some(Target::Base));
        assert_eq!(target("/v2/_catalog"), Some(Target::Catalog));
        assert_eq!(
            target("/v2/a/manifests/b/manifests/latest"),
            Some(Target::Manifest("a/manifests/b".into(), "latest".into()))
        );
        assert_eq!(
            target(&format!("/v2/shop/web/blobs/{d}")),
            Some(Target::Blob("shop/web".into(), d.into()))
        );
        assert_eq!(
            target("/v2/shop/web/blobs/sha256%3Aabc"),
            Some(Target::Blob("shop/web".into(), d.into()))
        );
        assert_eq!(
            target("/v2/web/blobs/uploads/"),
            Some(Target::UploadStart("web".into()))
        );
        assert_eq!(
            target("/v2/web/blobs/uploads/1234"),
            Some(Target::Upload("web".into(), "1234".into()))
        );
        assert_eq!(target("/v2/x/tags/list"), Some(Target::Tags("x".into())));
        assert_eq!(target("/v2/x/other/thing"), None);
        assert_eq!(target("/healthz"), None);
    }

    #[test]
    fn credentials_come_as_bearer_or_basic() {
        use base64::Engine;
        assert_eq!(presented_token("Bearer abc"), "abc");
        let basic = base64::engine::general_purpose::STANDARD.encode("dozen:s3cret:x");
        assert_eq!(presented_token(&format!("Basic {basic}")), "s3cret:x");
        assert_eq!(presented_token("Basic !!!"), "");
        assert_eq!(presented_token("Digest x"), "");
    }

    #[test]
    fn query_components_are_decoded() {
        let q = query_pairs(Some("mount=sha256%3Aab&from=shop%2Fweb&n=2"));
        assert_eq!(query_value(&q, "mount"), Some("sha256:ab"));
        assert_eq!(query_value(&q, "from"), Some("shop/web"));
        assert_eq!(query_value(&q, "n"), Some("2"));
        assert_eq!(decode_component("100%"), "100%");
    }
}
