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
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let path_and_query = if path_and_query == "/v2" {
        paths::REGISTRY.to_string()
    } else {
        path_and_query
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
