//! Identity on the wire: the cluster CA, the certificates of servers and nodes, the TLS
//! configurations of the API server and its clients, and whom a verified client certificate
//! names.
//!
//! One CA per cluster (`dozen ca init`). Servers hold its key (like the root key, it is given
//! to every server) so they can issue their own serving certificate at start and sign the
//! certificate requests of joining nodes. A node's private key never leaves the node: it sends
//! a certificate request and gets back a certificate naming it (CN = node name).
//!
//! A node certificate can never pass for a server's: its one DNS name is
//! `<node>.node.dozen.invalid` (a name no resolver answers and no operator types), and every
//! client of the API also requires the server's common name, `dozen server`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
/// What agents and proxies are given to reach `https://` servers.
pub use rustls::ClientConfig;

pub use crate::serving::{serve, ConnectionInfo};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; remove it first if you really mean to make a new CA (every certificate it signed stops working)")]
    Exists { path: PathBuf },
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
}

fn invalid(what: &str) -> impl Fn(String) -> TlsError + '_ {
    move |detail| TlsError::Invalid {
        what: what.to_string(),
        detail,
    }
}

/// The common name of every API server's certificate: agents serve their logs only to it.
pub const SERVER_CN: &str = "dozen server";

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";

/// A certificate and, for ones made here, its key (PEM).
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// Hex of the certificate's serial number (revocation names it).
    pub serial: String,
}

impl std::fmt::Debug for Issued {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// The cluster's certificate authority.
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    let _ = getrandom(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte, so the hex form is canonical
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    (SerialNumber::from_slice(&bytes), hex)
}

/// `bytes` random bytes from the kernel, as hex.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Writes `content` to `path` with `mode`, through a temporary file of its own (created anew,
/// so the mode holds even where an earlier run left one) and a rename.
fn write_file(path: &Path, content: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", random_hex(6).map_err(err)?));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(err)
}

fn read_file(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Ca {
    pub fn generate() -> Result<Ca, TlsError> {
        let key = KeyPair::generate().map_err(|e| invalid("CA key")(e.to_string()))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "dozen cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial().0);
        validity(&mut params, 3650);
        let cert = params
            .self_signed(&key)
            .map_err(|e| invalid("CA certificate")(e.to_string()))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Reads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Ca, TlsError> {
        let cert_pem = read_file(&dir.join(CA_CERT_FILE))?;
        let key_pem = read_file(&dir.join(CA_KEY_FILE))?;
        let ca = Ca { cert_pem, key_pem };
        // Fail at start, naming the files, rather than at the first signature.
        ca.issuer()?;
        Ok(ca)
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`; refuses to replace a CA.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        for name in [CA_CERT_FILE, CA_KEY_FILE] {
            if dir.join(name).exists() {
                return Err(TlsError::Exists {
                    path: dir.join(name),
                });
            }
        }
        write_file(&dir.join(CA_KEY_FILE), &self.key_pem, 0o600)?;
        write_file(&dir.join(CA_CERT_FILE), &self.cert_pem, 0o644)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, TlsError> {
        let key = KeyPair::from_pem(&self.key_pem)
            .map_err(|e| invalid("CA key (ca.key)")(e.to_string()))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key)
            .map_err(|e| invalid("CA certificate (ca.crt)")(e.to_string()))
    }

    /// `sha256:<hex>` of the CA certificate: what `dozen node join --ca-hash` pins.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        fingerprint(&self.cert_pem)
    }

    /// A serving certificate for an API server reachable as `hosts` (names or addresses).
    pub fn issue_server(&self, hosts: &[String]) -> Result<Issued, TlsError> {
        let key = KeyPair::generate().map_err(|e| invalid("server key")(e.to_string()))?;
        let mut params = CertificateParams::new(hosts.to_vec())
            .map_err(|e| invalid("server certificate names")(e.to_string()))?;
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_CN);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (serial, hex) = random_serial();
        params.serial_number = Some(serial);
        validity(&mut params, i64::from(dozen_model::CERT_VALIDITY_DAYS));
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(|e| invalid("server certificate")(e.to_string()))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: hex,
        })
    }

    /// Signs a node's certificate request: the certificate names `node` whatever the request
    /// asked for, as its common name and as its one DNS name, [`node_dns_name`] (servers reach
    /// the agent's log endpoint under that name).
    pub fn sign_node(&self, csr_pem: &str, node: &str) -> Result<Issued, TlsError> {
        if node == SERVER_CN {
            return Err(invalid("node name")(format!("`{node}` is reserved")));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| invalid("certificate request")(e.to_string()))?;
        let mut params = CertificateParams::new(vec![node_dns_name(node)])
            .map_err(|e| invalid("node name")(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, node);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let (serial, hex) = random_serial();
        params.serial_number = Some(serial);
        validity(&mut params, i64::from(dozen_model::CERT_VALIDITY_DAYS));
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer()?)
            .map_err(|e| invalid("node certificate")(e.to_string()))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: String::new(),
            serial: hex,
        })
    }
}

/// The DNS name in a node's certificate, under which servers reach its agent.
pub fn node_dns_name(node: &str) -> String {
    format!("{node}.node.dozen.invalid")
}

/// `sha256:<hex>` of the one certificate in `cert_pem`. More than one is refused: a pin on
/// the first would otherwise let the others ride along into the trust store.
pub fn fingerprint(cert_pem: &str) -> Result<String, TlsError> {
    let mut all = certs(cert_pem, "CA certificate")?;
    if all.len() != 1 {
        return Err(invalid("CA certificate")(format!(
            "holds {} certificates; a cluster CA is exactly one",
            all.len()
        )));
    }
    let der = all.remove(0);
    let digest = Sha256::digest(der.as_ref());
    Ok(format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

/// A fresh key and a certificate request for `node`: (request PEM, key PEM).
pub fn node_request(node: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(|e| invalid("node key")(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, node);
    let csr = params
        .serialize_request(&key)
        .map_err(|e| invalid("certificate request")(e.to_string()))?;
    let pem = csr
        .pem()
        .map_err(|e| invalid("certificate request")(e.to_string()))?;
    Ok((pem, key.serialize_pem()))
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_bytes()).collect();
    let certs = certs.map_err(|e| invalid(what)(e.to_string()))?;
    if certs.is_empty() {
        return Err(invalid(what)("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn private_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| invalid(what)(e.to_string()))?
        .ok_or_else(|| invalid(what)("no PEM private key in it".into()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca_pem, "CA certificate")? {
        roots
            .add(cert)
            .map_err(|e| invalid("CA certificate")(e.to_string()))?;
    }
    Ok(roots)
}

/// The API server's TLS: its certificate, and client certificates verified against the CA
/// when presented (operators come without one and show a token instead).
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| invalid("client certificate verifier")(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS versions")(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(cert_pem, "server certificate")?,
            private_key(key_pem, "server key")?,
        )
        .map_err(|e| invalid("server certificate")(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client of the API: trust only the cluster CA, and only a certificate whose common name
/// is [`SERVER_CN`] (a node's certificate is signed by the same CA but is no server). Present
/// `identity` (cert PEM, key PEM) when given (nodes do; operators use a token).
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider(),
    )
    .build()
    .map_err(|e| invalid("server certificate verifier")(e.to_string()))?;
    let verifier = Arc::new(ServerOnly { webpki });
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS versions")(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    finish_client(builder, identity)
}

/// A server reaching an agent: trust only the cluster CA; the name it connects under
/// ([`node_dns_name`]) picks the node. Presents the server's own certificate.
pub fn agent_client_config(
    ca_pem: &str,
    identity: (&str, &str),
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS versions")(e.to_string()))?
        .with_root_certificates(roots(ca_pem)?);
    finish_client(builder, Some(identity))
}

fn finish_client(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    identity: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(certs(cert, "certificate")?, private_key(key, "key")?)
            .map_err(|e| invalid("client certificate")(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The usual WebPKI checks against the cluster CA, then: the certificate is a server's.
#[derive(Debug)]
struct ServerOnly {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for ServerOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match peer_identity(end_entity.as_ref()) {
            Some(id) if id.name == SERVER_CN => Ok(verified),
            other => Err(rustls::Error::General(format!(
                "the certificate at {} names `{}`, not a dozen server",
                server_name.to_str(),
                other.map(|id| id.name).unwrap_or_default()
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Whom a verified client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate's common name: the node's name.
    pub name: String,
    /// Hex of its serial number.
    pub serial: String,
}

pub fn peer_identity(der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let serial = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02x}"))
        .collect();
    Some(PeerIdentity { name, serial })
}

/// Whom the first certificate in `cert_pem` names.
pub fn peer_identity_pem(cert_pem: &str) -> Option<PeerIdentity> {
    let der = certs(cert_pem, "certificate").ok()?.into_iter().next()?;
    peer_identity(der.as_ref())
}

/// Writes a node's certificate, key and CA into `dir` (the key 0600).
pub fn save_node_identity(
    dir: &Path,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    write_file(&dir.join("node.key"), key_pem, 0o600)?;
    write_file(&dir.join("node.crt"), cert_pem, 0o644)?;
    write_file(&dir.join(CA_CERT_FILE), ca_pem, 0o644)
}

/// A node identity on disk: (cert PEM, key PEM, CA PEM), when `dir` holds one.
pub fn load_node_identity(dir: &Path) -> Result<Option<(String, String, String)>, TlsError> {
    if !dir.join("node.crt").exists() {
        return Ok(None);
    }
    Ok(Some((
        read_file(&dir.join("node.crt"))?,
        read_file(&dir.join("node.key"))?,
        read_file(&dir.join(CA_CERT_FILE))?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_the_node_not_what_it_asked_for() {
        let ca = Ca::generate().unwrap();
        let (csr, _key) = node_request("asked-for-admin").unwrap();
        let issued = ca.sign_node(&csr, "node-7").unwrap();
        let der = certs(&issued.cert_pem, "cert").unwrap().remove(0);
        let id = peer_identity(der.as_ref()).unwrap();
        assert_eq!(id.name, "node-7");
        assert_eq!(id.serial, issued.serial);
    }

    #[test]
    fn a_saved_ca_loads_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate().unwrap();
        ca.save(dir.path()).unwrap();
        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.fingerprint().unwrap(), ca.fingerprint().unwrap());
        let again = Ca::generate().unwrap().save(dir.path());
        assert!(matches!(again, Err(TlsError::Exists { .. })), "{again:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// Runs a TLS handshake in memory; the client's error, if any.
    fn handshake(
        client: rustls::ClientConfig,
        name: &str,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<(), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            let server_side = s.process_new_packets();
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            server_side.map_err(|e| rustls::Error::General(format!("server: {e}")))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    fn joined(ca: &Ca, node: &str) -> (String, String) {
        let (csr, key) = node_request(node).unwrap();
        (ca.sign_node(&csr, node).unwrap().cert_pem, key)
    }

    #[test]
    fn a_node_certificate_cannot_pass_for_a_server() {
        let ca = Ca::generate().unwrap();
        // Even a node named like the host a client dials.
        let (cert, key) = joined(&ca, "localhost");
        let node_serving = server_config(&cert, &key, &ca.cert_pem).unwrap();
        let api_client = client_config(&ca.cert_pem, None).unwrap();
        let e = handshake(api_client.clone(), "localhost", node_serving.clone()).unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        // Dialled under the very name it carries, it is still no server.
        let e = handshake(
            api_client,
            &node_dns_name("localhost"),
            node_serving.clone(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a dozen server"), "{e}");
        // Under its node name, as the server dials agents, the same certificate is fine...
        let server = ca.issue_server(&["localhost".into()]).unwrap();
        let to_agents =
            agent_client_config(&ca.cert_pem, (&server.cert_pem, &server.key_pem)).unwrap();
        handshake(
            to_agents.clone(),
            &node_dns_name("localhost"),
            node_serving.clone(),
        )
        .unwrap();
        // ...but not under another node's name.
        let e = handshake(to_agents, &node_dns_name("other"), node_serving).unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        // And a real server's certificate passes the API client's check.
        let api = server_config(&server.cert_pem, &server.key_pem, &ca.cert_pem).unwrap();
        handshake(client_config(&ca.cert_pem, None).unwrap(), "localhost", api).unwrap();
    }

    #[test]
    fn node_names_with_underscores_and_dots_get_a_usable_certificate() {
        let ca = Ca::generate().unwrap();
        let server = ca.issue_server(&["localhost".into()]).unwrap();
        let to_agents =
            agent_client_config(&ca.cert_pem, (&server.cert_pem, &server.key_pem)).unwrap();
        for node in ["web_1", "rack2.node-7", "N1"] {
            let (cert, key) = joined(&ca, node);
            let serving = server_config(&cert, &key, &ca.cert_pem).unwrap();
            handshake(to_agents.clone(), &node_dns_name(node), serving)
                .unwrap_or_else(|e| panic!("{node}: {e}"));
        }
    }

    #[test]
    fn a_ca_bundle_cannot_ride_on_a_pin() {
        let ca = Ca::generate().unwrap();
        let other = Ca::generate().unwrap();
        let bundle = format!("{}{}", ca.cert_pem, other.cert_pem);
        let e = fingerprint(&bundle).unwrap_err().to_string();
        assert!(e.contains("2 certificates"), "{e}");
    }

    #[test]
    fn a_key_is_written_0600_even_over_a_stale_temporary_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // What an older version, or a crash, may have left behind, world-readable.
        std::fs::write(dir.path().join("node.tmp"), "stale").unwrap();
        std::fs::write(dir.path().join(".node.key.tmp"), "stale").unwrap();
        write_file(&dir.path().join("node.key"), "KEY", 0o600).unwrap();
        let meta = std::fs::metadata(dir.path().join("node.key")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("node.key")).unwrap(),
            "KEY"
        );
    }

    #[test]
    fn garbage_is_refused_with_the_name_of_what_was_bad() {
        let ca = Ca::generate().unwrap();
        let e = ca.sign_node("not a request", "n").unwrap_err().to_string();
        assert!(e.contains("certificate request"), "{e}");
        let e = server_config("nope", "nope", &ca.cert_pem)
            .unwrap_err()
            .to_string();
        assert!(e.contains("server certificate"), "{e}");
    }
}

/// A node's identity on disk, as `dozen node join` left it.
#[derive(Clone)]
pub struct NodeIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for NodeIdentity {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("name", &peer_identity_pem(&self.cert_pem).map(|i| i.name))
            .finish_non_exhaustive()
    }
}
