//! Serving HTTP/1.1 over plain TCP or TLS with hyper, for the API server and the agents: each
//! connection's service learns who is on the other end (the peer, and the node or server a
//! verified client certificate names).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::tls::{peer_identity, PeerIdentity};

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    /// Set when the client presented a certificate the cluster CA signed.
    pub identity: Option<PeerIdentity>,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection's byte stream, TLS or not.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Serves HTTP/1.1 on `listener`, over TLS when `tls` is given: `service` makes the service
/// of one connection, told who is on the other end. Over TLS a client certificate, when
/// presented, must be signed by the cluster CA (else the handshake fails, and the refusal is
/// logged); whom it names reaches the service in its [`ConnectionInfo`].
pub async fn serve<F, S, B>(
    listener: tokio::net::TcpListener,
    service: F,
    tls: Option<Arc<rustls::ServerConfig>>,
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
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            let (io, identity): (Box<dyn Io>, _) = match acceptor {
                None => (Box::new(tcp), None),
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                        .await
                    {
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
                    (Box::new(tls), identity)
                }
            };
            let service = service(ConnectionInfo { peer, identity });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
