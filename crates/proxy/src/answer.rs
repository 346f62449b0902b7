//! Answers the proxy gives itself: redirects and fixed responses.

use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};

use dozen_spec::{FixedResponse, Redirect};

use crate::{full, Body};

/// Where a redirect sends the client: each part the rule does not give is the request's, and
/// `#{host}`, `#{port}`, `#{path}` and `#{query}` in the rule stand for the request's.
pub fn location(r: &Redirect, scheme: &str, host_header: &str, uri: &hyper::Uri) -> String {
    let (host, port) = split_host_port(host_header);
    let fill = |text: &str| {
        text.replace("#{host}", host)
            .replace("#{port}", port.unwrap_or(""))
            .replace("#{path}", uri.path())
            .replace("#{query}", uri.query().unwrap_or(""))
    };
    let new_scheme = r.scheme.as_deref().unwrap_or(scheme);
    let new_host = r
        .host
        .as_deref()
        .map(fill)
        .unwrap_or_else(|| host.to_string());
    // A changed scheme drops the request's port (it was the old scheme's); a port given wins.
    let new_port = match (
        r.port,
        r.scheme.is_some() && r.scheme.as_deref() != Some(scheme),
    ) {
        (Some(p), _) => Some(p.to_string()),
        (None, true) => None,
        (None, false) => port.map(str::to_string),
    };
    let new_port = new_port.filter(|p| {
        !((new_scheme == "http" && p == "80") || (new_scheme == "https" && p == "443"))
    });
    let path = r
        .path
        .as_deref()
        .map(fill)
        .unwrap_or_else(|| uri.path().to_string());
    let query = match r.query.as_deref() {
        Some(q) => Some(fill(q)),
        None => uri.query().map(str::to_string),
    }
    .filter(|q| !q.is_empty());
    let mut out = format!("{new_scheme}://{new_host}");
    if let Some(p) = new_port {
        out += &format!(":{p}");
    }
    out += &path;
    if let Some(q) = query {
        out += &format!("?{q}");
    }
    out
}

/// `shop.local:8080` → (`shop.local`, `8080`); `[::1]:80` → (`[::1]`, `80`).
fn split_host_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.split_once(']') {
            Some((h, rest)) => (&host[..h.len() + 1], rest.strip_prefix(':')),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (host, None),
    }
}

pub fn redirect(status: u16, location: &str, id: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("redirecting to {location}\n")));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let h = resp.headers_mut();
    match HeaderValue::from_str(location) {
        Ok(v) => {
            h.insert(hyper::header::LOCATION, v);
        }
        Err(_) => {
            return crate::problem(
                StatusCode::BAD_REQUEST,
                "the redirect's location holds characters a header cannot".into(),
                id,
            )
        }
    }
    h.insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("x-request-id", v);
    }
    resp
}

pub fn fixed(f: &FixedResponse, id: &str) -> Response<Body> {
    let mut resp = Response::new(full(f.body.clone()));
    *resp.status_mut() = StatusCode::from_u16(f.status).unwrap_or(StatusCode::OK);
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&f.content_type) {
        h.insert("content-type", v);
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("x-request-id", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Redirect {
        Redirect {
            scheme: None,
            host: None,
            port: None,
            path: None,
            query: None,
            status: 301,
        }
    }

    #[test]
    fn redirect_locations_keep_what_the_rule_does_not_change() {
        let uri: hyper::Uri = "/a/b?x=1".parse().unwrap();
        let https = Redirect {
            scheme: Some("https".into()),
            ..r()
        };
        assert_eq!(
            location(&https, "http", "shop.local:8080", &uri),
            "https://shop.local/a/b?x=1"
        );
        let moved = Redirect {
            host: Some("www.#{host}".into()),
            path: Some("/new#{path}".into()),
            query: Some("#{query}&from=old".into()),
            ..r()
        };
        assert_eq!(
            location(&moved, "http", "shop.local:8080", &uri),
            "http://www.shop.local:8080/new/a/b?x=1&from=old"
        );
        let port = Redirect {
            port: Some(443),
            scheme: Some("https".into()),
            ..r()
        };
        assert_eq!(location(&port, "http", "h", &uri), "https://h/a/b?x=1");
    }
}
