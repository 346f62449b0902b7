//! The node's loopback registry mirror: the node's Docker Engine pulls the built-in registry's
//! images from `127.0.0.1:PORT` (which an engine takes without TLS or credentials), and this
//! hands each read on to the API servers with the agent's own credential (its token or node
//! certificate). Reads only: nothing can be pushed through it. The port is kept in the
//! agent's data directory, so an image pulled once keeps its name across agent restarts.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use dozen_api::{paths, Client};
use futures_util::TryStreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};

type Body = BoxBody<Bytes, std::io::Error>;

/// The file under the agent's data directory that keeps the mirror's port.
const PORT_FILE: &str = "mirror-port";

/// Binds the mirror on loopback, on the port it had before if it is still free.
pub(crate) async fn bind(data_dir: &Path) -> std::io::Result<tokio::net::TcpListener> {
    let path = data_dir.join(PORT_FILE);
    let kept = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok());
    if let Some(port) = kept {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => return Ok(listener),
            Err(e) => {
                tracing::warn!(port, error = %e, "the registry mirror's port is taken; using another (images are pulled again under the new name)");
            }
        }
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    if let Err(e) = crate::os::write_atomic(&path, port.to_string().as_bytes()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the registry mirror's port");
    }
    Ok(listener)
}

pub(crate) async fn serve(listener: tokio::net::TcpListener, client: Client) {
    let client = Arc::new(client);
    let service = move |_connection| {
        let client = client.clone();
        hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let client = client.clone();
            async move { Ok::<_, Infallible>(pass_on(&client, request).await) }
        })
    };
    if let Err(e) = dozen_api::tls::serve(listener, service, None).await {
        tracing::error!(error = %e, "the registry mirror stopped");
    }
}

async fn pass_on(client: &Client, request: Request<hyper::body::Incoming>) -> Response<Body> {
    let head = match *request.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "the node's registry mirror only reads; push to the API server",
            )
        }
    };
    // Only a loopback name: a web page's script that rebinds a name to 127.0.0.1 reads
    // nothing here.
    let host = request
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let host_name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    if !matches!(host_name, "127.0.0.1" | "localhost" | "[::1]") {
        return refusal(
            StatusCode::FORBIDDEN,
            "DENIED",
            "the node's registry mirror answers on 127.0.0.1 only",
        );
    }
    let Some(path_and_query) = registry_read_path(request.uri()) else {
        return refusal(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "not a registry read: the mirror passes on /v2/ reads of manifests, blobs and tags only",
        );
    };
    let accept = request
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let answer = match client
        .registry_read(head, &path_and_query, accept.as_deref())
        .await
    {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(path = %path_and_query, error = %e, "the registry mirror cannot reach a server");
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                &format!("no API server answers the node's registry mirror: {e}"),
            );
        }
    };
    let mut response = Response::builder().status(answer.status().as_u16());
    for name in [
        "content-type",
        "content-length",
        "docker-content-digest",
        "docker-distribution-api-version",
        "etag",
        "link",
    ] {
        if let Some(value) = answer.headers().get(name) {
            response = response.header(name, value.as_bytes());
        }
    }
    let body: Body = if head {
        Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
    } else {
        let frames = answer
            .bytes_stream()
            .map_ok(Frame::data)
            .map_err(std::io::Error::other);
        BodyExt::boxed(StreamBody::new(frames))
    };
    response.body(body).unwrap_or_else(|_| {
        refusal(
            StatusCode::BAD_GATEWAY,
            "UNAVAILABLE",
            "the server's answer could not be passed on",
        )
    })
}

/// The request as a registry read to pass on, or None: `/v2/`, or `/v2/NAME/manifests/REF`,
/// `/v2/NAME/blobs/DIGEST`, `/v2/NAME/tags/list` with a name of the registry's grammar. Anything
/// else (dot segments, encoded characters but `:` in the last one, backslashes, other
/// routes) is refused here, before a URL library could normalise it into another API path.
fn registry_read_path(uri: &hyper::Uri) -> Option<String> {
    let path = uri.path();
    if path == "/v2" || path == paths::REGISTRY {
        return Some(paths::REGISTRY.to_string());
    }
    let rest = path.strip_prefix(paths::REGISTRY)?;
    let segments: Vec<&str> = rest.split('/').collect();
    let (name, kind, last) = match segments.as_slice() {
        [name @ .., "tags", "list"] => (name, "tags", None),
        [name @ .., kind @ ("manifests" | "blobs"), last] => (name, *kind, Some(*last)),
        _ => return None,
    };
    let name = name.join("/");
    dozen_model::registry::check_name(&name).ok()?;
    let last = match last {
        Some(reference) => {
            let reference = reference.replace("%3A", ":").replace("%3a", ":");
            dozen_model::registry::Reference::parse(&reference).ok()?;
            Some(reference)
        }
        None => None,
    };
    let mut out = format!(
        "{}{name}/{kind}/{}",
        paths::REGISTRY,
        last.as_deref().unwrap_or("list")
    );
    // Tag lists page with `n` and `last` (a tag); nothing else is passed on.
    if let (None, Some(query)) = (&last, uri.query()) {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (key == "n" && value.bytes().all(|b| b.is_ascii_digit()))
                    || (key == "last" && dozen_model::registry::check_tag(value).is_ok())
            })
            .collect();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
    }
    Some(out)
}

fn refusal(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body =
        serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] });
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::registry_read_path;

    fn read(path: &str) -> Option<String> {
        registry_read_path(&path.parse().unwrap())
    }

    #[test]
    fn only_registry_reads_are_passed_on_as_they_were_asked() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(read("/v2/").as_deref(), Some("/v2/"));
        assert_eq!(read("/v2").as_deref(), Some("/v2/"));
        assert_eq!(
            read("/v2/shop/web/manifests/1.2").as_deref(),
            Some("/v2/shop/web/manifests/1.2")
        );
        assert_eq!(
            read(&format!("/v2/shop/web/blobs/{}", d.replace(':', "%3A"))),
            Some(format!("/v2/shop/web/blobs/{d}"))
        );
        assert_eq!(
            read("/v2/shop/web/tags/list?n=5&last=v1&x=1").as_deref(),
            Some("/v2/shop/web/tags/list?n=5&last=v1")
        );
        for hostile in [
            "/v2/../v1/stacks",
            "/v2/%2e%2e/v1/logs",
            "/v2/.%2e/v1/logs",
            "/v2/..%5cv1/events",
            "/v2/x/../../v1/stacks/manifests/latest",
            "/v2/_catalog",
            "/v2/shop/web/blobs/uploads/",
            "/v2/shop/web/manifests/%2e%2e",
            dozen_api::paths::STACKS,
            "/v2/Shop/manifests/1",
        ] {
            assert_eq!(read(hostile), None, "{hostile}");
        }
    }
}
