//! A small client of the Docker Engine API over its unix socket: one HTTP/1.1 connection per
//! request (hyper), JSON in and out. Only what the driver uses.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The API version asked for: what Docker Engine 20.10 speaks, and newer engines accept.
const API: &str = "/v1.41";
/// Longest a plain request may take (a container's wait and logs have none).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read whole (inspect, list): bigger is refused, not buffered.
const MAX_ANSWER: usize = 8 * 1024 * 1024;
/// Longest a pull may take.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the Docker Engine at {socket} does not answer: {why}")]
    Unreachable { socket: String, why: String },
    #[error("the Docker Engine answered {status} to {what}: {message}")]
    Refused {
        what: String,
        status: StatusCode,
        message: String,
    },
}

#[derive(Clone, Debug)]
pub struct Engine {
    socket: PathBuf,
}

impl Engine {
    pub fn new(socket: PathBuf) -> Engine {
        Engine { socket }
    }

    /// The engine of `DOCKER_HOST` (a `unix://` path), else `/var/run/docker.sock`.
    pub fn from_env() -> Engine {
        let socket = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"));
        Engine { socket }
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> EngineError {
        EngineError::Unreachable {
            socket: self.socket.display().to_string(),
            why: why.to_string(),
        }
    }

    /// Sends one request; the answer's status and body stream.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Incoming), EngineError> {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        let headers = [("content-type", "application/json".to_string())];
        self.send_raw(
            method,
            path,
            &headers,
            Bytes::from(bytes.unwrap_or_default()),
        )
        .await
    }

    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<(StatusCode, Incoming), EngineError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.unreachable(e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{API}{path}"))
            .header("host", "docker");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| self.unreachable(e))?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok((answer.status(), answer.into_body()))
    }

    /// A request whose whole answer is wanted (bounded), with a timeout; a status of 400 or
    /// more is an error carrying the engine's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, EngineError> {
        let what = format!("{method} {path}");
        let exchange = async {
            let (status, mut incoming) = self.send(method, path, body).await?;
            let mut bytes = Vec::new();
            while let Some(frame) = incoming.frame().await {
                let frame = frame.map_err(|e| self.unreachable(e))?;
                if let Some(data) = frame.data_ref() {
                    if bytes.len() + data.len() > MAX_ANSWER {
                        return Err(self.unreachable(format!("{what}: answer over 8 MiB")));
                    }
                    bytes.extend_from_slice(data);
                }
            }
            Ok((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| self.unreachable(format!("{what} took over 30 s")))??;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.as_u16() >= 400 {
            let message = value["message"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
            return Err(EngineError::Refused {
                what,
                status,
                message,
            });
        }
        Ok(value)
    }

    /// A request whose answer is a stream (logs, wait): its body, once the status is good.
    pub async fn stream(&self, method: Method, path: &str) -> Result<Incoming, EngineError> {
        self.stream_with(method, path, &[], Bytes::new()).await
    }

    /// A request with a body of its own (a build context) and headers (registry credentials)
    /// whose answer is a stream.
    pub async fn stream_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Incoming, EngineError> {
        let (status, body) = self.send_raw(method.clone(), path, headers, body).await?;
        if status.as_u16() >= 400 {
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(EngineError::Refused {
                what: format!("{method} {path}"),
                status,
                message: value["message"].as_str().unwrap_or_default().to_string(),
            });
        }
        Ok(body)
    }

    /// Whether the engine holds image `reference`.
    pub async fn has_image(&self, reference: &str) -> Result<bool, EngineError> {
        match self
            .call(Method::GET, &format!("/images/{reference}/json"), None)
            .await
        {
            Ok(_) => Ok(true),
            Err(EngineError::Refused { status, .. }) if status == StatusCode::NOT_FOUND => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Pulls image `reference`, reading the engine's progress to its end: an error in it is
    /// the pull's failure (the engine answers 200 before it knows). Only the last line is
    /// kept, never the whole progress.
    pub async fn pull(&self, reference: &str) -> Result<(), EngineError> {
        let what = format!("pull {reference}");
        let path = format!("/images/create?fromImage={reference}");
        let exchange = async {
            let body = self.stream(Method::POST, &path).await?;
            let mut failure = None;
            self.json_lines(body, |value| {
                if let Some(message) = value["error"].as_str() {
                    failure = Some(message.to_string());
                }
            })
            .await?;
            match failure {
                Some(message) => Err(EngineError::Refused {
                    what: what.clone(),
                    status: StatusCode::OK,
                    message,
                }),
                None => Ok(()),
            }
        };
        tokio::time::timeout(PULL_TIMEOUT, exchange)
            .await
            .map_err(|_| self.unreachable(format!("{what} took over 10 minutes")))?
    }

    /// Reads an answer of JSON lines (pull, build and push progress) to its end, handing
    /// each to `each`; a line is cut at 64 KiB, and nothing else is kept.
    pub async fn json_lines(
        &self,
        mut body: Incoming,
        mut each: impl FnMut(&Value),
    ) -> Result<(), EngineError> {
        let mut line = Vec::new();
        let mut take = |line: &[u8]| {
            if !line.is_empty() {
                each(&serde_json::from_slice(line).unwrap_or(Value::Null));
            }
        };
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.unreachable(e))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            for &b in data.iter() {
                if b == b'\n' {
                    take(&line);
                    line.clear();
                } else if line.len() < 64 * 1024 {
                    line.push(b);
                }
            }
        }
        take(&line);
        Ok(())
    }

    /// The engine's version, or why it does not answer.
    pub async fn version(&self) -> Result<String, EngineError> {
        let v = self.call(Method::GET, "/version", None).await?;
        Ok(format!(
            "Docker Engine {} (API {})",
            v["Version"].as_str().unwrap_or("?"),
            v["ApiVersion"].as_str().unwrap_or("?")
        ))
    }
}
