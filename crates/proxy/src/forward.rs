//! The leg to a target: the request's body held (small, for a retry) or streamed, hop-by-hop
//! headers dropped and forwarded ones set, one retry on another target when the first failed
//! before answering, upgrades joined, and what became of it told to the target's group.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::balance::{Group, InFlight, Pick, TargetState};
use crate::edge::{BodyPaused, PausedAtMost};
use crate::table::Rule;
use crate::{full, problem, Body, Caller, Shared, UpBody, MAX_BODY, RETRY_BODY};

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Methods that may be sent twice (RFC 9110 §9.2.2): only these are retried once the request
/// went out.
fn is_idempotent(method: &hyper::Method) -> bool {
    matches!(
        *method,
        hyper::Method::GET
            | hyper::Method::HEAD
            | hyper::Method::OPTIONS
            | hyper::Method::PUT
            | hyper::Method::DELETE
    )
}

/// The target closed the connection before any answer: it was leaving (a stopping task may
/// drop the connections it still accepts) or it died. Whether it acted on the request is not
/// known, so only a method that may be sent twice goes to another target.
fn closed_without_answer(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            return h.is_incomplete_message();
        }
        source = err.source();
    }
    false
}

/// Whether `Connection` asks for an upgrade.
fn wants_upgrade(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Joins an upgraded client connection to the target's, bytes both ways until either ends.
async fn join_upgraded(
    client: hyper::upgrade::OnUpgrade,
    target: hyper::upgrade::OnUpgrade,
    _permit: Arc<tokio::sync::OwnedSemaphorePermit>,
) {
    let (Ok(client), Ok(target)) = (client.await, target.await) else {
        return;
    };
    let mut client = TokioIo::new(client);
    let mut target = TokioIo::new(target);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut target).await;
}

pub(crate) fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

/// What the proxy knows of a request when it forwards it.
pub(crate) struct Forward<'a> {
    pub rule: &'a Rule,
    pub group: Arc<Group>,
    pub pick: Pick,
    pub host: String,
    pub path_and_query: String,
    /// `X-Forwarded-For` as it goes upstream, and `-Proto`.
    pub forwarded_for: String,
    pub proto: &'static str,
    pub id: String,
}

pub(crate) async fn forward(
    shared: &Shared,
    req: Request<Incoming>,
    caller: Caller,
    how: Forward<'_>,
) -> Response<Body> {
    let Forward {
        rule,
        group,
        pick,
        host,
        path_and_query,
        forwarded_for,
        proto,
        id,
    } = how;
    let permit = caller.permit;
    let framing = caller.framing;
    let started = std::time::Instant::now();
    // An upgrade (WebSocket and the like): both sides' connections are joined once the target
    // agrees (101), and bytes flow both ways until either side closes.
    let upgrade = req
        .headers()
        .get(hyper::header::UPGRADE)
        .filter(|_| wants_upgrade(req.headers()))
        .cloned();
    let mut req = req;
    let client_side = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let length = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = parts.headers.contains_key(hyper::header::TRANSFER_ENCODING);
    if length.is_some_and(|n| n > MAX_BODY) {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {} MiB", MAX_BODY >> 20),
            &id,
        );
    }
    // Small and known: held for a retry. Anything else streams through as it comes.
    // (An HTTP/2 body states no length unless the client gives one: unknown is not small.)
    let small = !chunked && length.is_some_and(|n| n <= RETRY_BODY);
    let (held, mut streamed) = if small || body.is_end_stream() {
        let limit = shared.edge.body_timeout;
        let body = PausedAtMost::new(body, limit);
        match Limited::new(body, RETRY_BODY as usize).collect().await {
            Ok(b) => (Some(b.to_bytes()), None),
            Err(e) if e.is::<BodyPaused>() => {
                return problem(StatusCode::REQUEST_TIMEOUT, e.to_string(), &id);
            }
            Err(_) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "the request body was cut short or longer than its Content-Length".into(),
                    &id,
                )
            }
        }
    } else {
        let paused = PausedAtMost::new(body, shared.edge.body_timeout);
        let limited: UpBody = Limited::new(paused, MAX_BODY as usize).boxed();
        (None, Some(limited))
    };
    strip_hop_by_hop(&mut parts.headers);
    // An HTTP/2 request names its host in the URI only; the target reads it from Host.
    if !parts.headers.contains_key(hyper::header::HOST) {
        if let Ok(v) = HeaderValue::from_str(&host) {
            parts.headers.insert(hyper::header::HOST, v);
        }
    }
    if let Some(protocol) = &upgrade {
        parts
            .headers
            .insert(hyper::header::UPGRADE, protocol.clone());
        parts.headers.insert(
            hyper::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
    let h = &mut parts.headers;
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Ok(v) = HeaderValue::from_str(&host) {
        h.insert("x-forwarded-host", v);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-request-id", v);
    }
    let upstream_path = rule.upstream_path(&path_and_query).into_owned();
    let service = &group.name;
    let access = |parts: &hyper::http::request::Parts, target: &str, status: u16, elapsed_ms| {
        shared.access.log(crate::access::Line {
            service,
            method: &parts.method,
            uri: &parts.uri,
            host: &host,
            target,
            status,
            elapsed_ms,
            id: &id,
        })
    };
    // An attempt that got no answer: it counts against its target.
    let failed = |attempt: &TargetState, elapsed_ms| {
        group.outcome(attempt, false);
        attempt.counters.record(None, elapsed_ms);
    };
    let mut attempt: Arc<TargetState> = pick.target.clone();
    let mut retried = false;
    loop {
        let uri = match format!("http://{}{upstream_path}", attempt.addr).parse::<hyper::Uri>() {
            Ok(u) => u,
            Err(_) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "malformed request path".into(),
                    &id,
                )
            }
        };
        let can_retry = !retried && pick.retry.is_some() && held.is_some();
        let body: UpBody = match (&held, streamed.take()) {
            (Some(bytes), _) => Full::new(bytes.clone())
                .map_err(|never: Infallible| match never {})
                .boxed(),
            (None, Some(stream)) => stream,
            (None, None) => {
                // A streamed body goes once: it cannot be sent again.
                return problem(
                    StatusCode::BAD_GATEWAY,
                    format!("could not connect to a target of service `{service}`"),
                    &id,
                );
            }
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = uri;
        // Kept for a second attempt only when one can happen.
        *upstream.headers_mut() = if can_retry {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let in_flight = InFlight::new(attempt.clone());
        let sent = tokio::time::timeout(shared.timeout, shared.client.request(upstream)).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match sent {
            Ok(Ok(mut resp)) => {
                let status = resp.status();
                group.outcome(&attempt, status.as_u16() < 500);
                attempt.counters.record(Some(status.as_u16()), elapsed_ms);
                group.counters.record(Some(status.as_u16()), elapsed_ms);
                if let (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) = (client_side, status)
                {
                    let target_side = hyper::upgrade::on(&mut resp);
                    // The client's connection now carries the other protocol.
                    if let Some(verdicts) = &framing {
                        crate::framing::upgraded(verdicts);
                    }
                    tokio::spawn(join_upgraded(client_side, target_side, permit));
                    let mut answer = Response::new(full(Bytes::new()));
                    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    for name in [hyper::header::UPGRADE, hyper::header::CONNECTION] {
                        if let Some(v) = resp.headers().get(&name) {
                            answer.headers_mut().insert(name, v.clone());
                        }
                    }
                    for (name, value) in resp.headers() {
                        if name.as_str().starts_with("sec-websocket-") {
                            answer.headers_mut().insert(name.clone(), value.clone());
                        }
                    }
                    return answer;
                }
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                if let Ok(v) = HeaderValue::from_str(&id) {
                    rparts.headers.insert("x-request-id", v);
                }
                if let Some(cookie) = pick.set_cookie.as_deref() {
                    if let Ok(v) = HeaderValue::from_str(cookie) {
                        rparts.headers.append(hyper::header::SET_COOKIE, v);
                    }
                }
                access(&parts, &attempt.addr, status.as_u16(), elapsed_ms);
                let body = Tracked {
                    inner: rbody,
                    _in_flight: in_flight,
                };
                return Response::from_parts(rparts, body.boxed());
            }
            Ok(Err(e))
                if can_retry
                    && (e.is_connect()
                        || (is_idempotent(&parts.method) && closed_without_answer(&e))) =>
            {
                failed(&attempt, elapsed_ms);
                tracing::info!(service = %service, target = %attempt.addr, request_id = %id, error = %e, "target failed before answering; retrying on another target");
                attempt = pick.retry.clone().unwrap_or_else(|| pick.target.clone());
                retried = true;
            }
            Ok(Err(e)) => {
                failed(&attempt, elapsed_ms);
                group.counters.record(Some(502), elapsed_ms);
                tracing::warn!(service = %service, target = %attempt.addr, request_id = %id, error = %e, "upstream failed");
                access(&parts, &attempt.addr, 502, elapsed_ms);
                let what = if e.is_connect() {
                    "could not connect to"
                } else {
                    "lost the connection to"
                };
                return problem(
                    StatusCode::BAD_GATEWAY,
                    format!("{what} a target of service `{service}`"),
                    &id,
                );
            }
            Err(_) => {
                failed(&attempt, elapsed_ms);
                group.counters.record(Some(504), elapsed_ms);
                tracing::warn!(service = %service, target = %attempt.addr, request_id = %id, "upstream timed out");
                access(&parts, &attempt.addr, 504, elapsed_ms);
                return problem(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "a target of service `{service}` did not answer within {} s",
                        shared.timeout.as_secs()
                    ),
                    &id,
                );
            }
        }
    }
}

/// A response body that keeps its request counted in flight on its target until the body
/// has been sent (or dropped).
struct Tracked {
    inner: Incoming,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
