//! Serving HTTP/1.1 over plain TCP or TLS with hyper, for the API server and the agents: each
//! connection's service learns who is on the other end (the peer, and the node or server a
//! verified client certificate names).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::tls::{peer_identity, PeerIdentity};

/// Who is on the other end of a TLS connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    /// Set when the client presented a certificate the cluster CA signed.
    pub identity: Option<PeerIdentity>,
}

/// Serves HTTP/1.1 over TLS on `listener`: `service` makes the service of one connection. A
/// client certificate, when presented, must be signed by the cluster CA (else the handshake
/// fails, and the refusal is logged); whom it names reaches the service as its
/// [`ConnectionInfo`].
pub async fn serve<F, S, B>(
    listener: tokio::net::TcpListener,
    service: F,
    config: Arc<rustls::ServerConfig>,
) -> std::io::Result<()>
where
    F: Fn(ConnectionInfo) -> S + Clone + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, peer) = accept(&listener).await;
        let acceptor = acceptor.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "refused a TLS connection");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "refused a TLS connection: no handshake within 10s");
                    return;
                }
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| peer_identity(cert.as_ref()));
            let service = service(ConnectionInfo { peer, identity });
            serve_connection(tls, service, peer).await;
        });
    }
}

/// Serves plain HTTP/1.1 on `listener` (loopback, or a cluster without a CA): the service
/// gets a [`ConnectionInfo`] with no identity.
pub async fn serve_plain<F, S, B>(
    listener: tokio::net::TcpListener,
    service: F,
) -> std::io::Result<()>
where
    F: Fn(ConnectionInfo) -> S + Clone + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let (tcp, peer) = accept(&listener).await;
        let service = service(ConnectionInfo {
            peer,
            identity: None,
        });
        tokio::spawn(serve_connection(tcp, service, peer));
    }
}

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn accept(listener: &tokio::net::TcpListener) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, peer);
            }
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection<I, S, B>(io: I, service: S, peer: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let served = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
