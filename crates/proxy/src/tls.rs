//! TLS termination: certificates from a directory, chosen per connection by the name the
//! client asks for (SNI), reloaded when the directory changes without touching connections
//! already open. HTTP/2 and HTTP/1.1 are offered (ALPN).
//!
//! The directory holds pairs `<name>.crt` + `<name>.key` (PEM; the chain in the `.crt`), or a
//! `<name>.pem` holding both. A certificate serves the DNS names of its subjectAltName
//! (wildcards too); `default.*` (else the first by name) serves clients that ask for no name
//! or an unknown one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Largest certificate or key file read.
const MAX_FILE: u64 = 1024 * 1024;
/// How often the directory is looked at for changes.
pub const RELOAD_EVERY: Duration = Duration::from_millis(100);

/// The certificates of one load.
#[derive(Default, Debug)]
pub struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` kept as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// Every name served, for the log.
    pub names: Vec<String>,
}

impl Certs {
    fn for_name(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = name.map(|n| n.trim_end_matches('.').to_ascii_lowercase()) else {
            return self.default.clone();
        };
        if let Some(c) = self.exact.get(&name) {
            return Some(c.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(c) = self.wildcard.get(parent) {
                return Some(c.clone());
            }
        }
        self.default.clone()
    }
}

/// The resolver rustls asks per handshake; its certificates are swapped on reload.
#[derive(Debug)]
pub struct CertResolver {
    current: RwLock<Arc<Certs>>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.current.read().ok()?.clone();
        certs.for_name(hello.server_name())
    }
}

/// What a directory's certificate files are now (names, sizes, times): a change reloads.
fn fingerprint(dir: &Path) -> Vec<(String, u64, Option<SystemTime>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    out.sort();
    out
}

/// Reads every certificate of `dir`. An error names the file and what is wrong with it.
pub fn load(dir: &Path) -> Result<Certs, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "cannot read the certificate directory {}: {e}",
            dir.display()
        )
    })?;
    // stem -> (certificate file, key file)
    let mut pairs: BTreeMap<String, (Option<PathBuf>, Option<PathBuf>)> = BTreeMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let (Some(stem), Some(ext)) = (
            path.file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        let slot = pairs.entry(stem).or_default();
        match ext {
            "crt" | "pem" => slot.0 = Some(path.clone()),
            "key" => slot.1 = Some(path.clone()),
            _ => {}
        }
    }
    let provider = rustls::crypto::ring::default_provider();
    let mut certs = Certs::default();
    for (stem, (cert_file, key_file)) in pairs {
        let Some(cert_file) = cert_file else {
            return Err(format!(
                "{}: a key without a certificate; add {stem}.crt",
                key_file
                    .map(|k| k.display().to_string())
                    .unwrap_or_else(|| stem.clone())
            ));
        };
        let cert_pem = read_small(&cert_file)?;
        let key_pem = match &key_file {
            Some(k) => read_small(k)?,
            None => cert_pem.clone(),
        };
        let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
            rustls_pemfile::certs(&mut cert_pem.as_slice())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: not PEM certificates: {e}", cert_file.display()))?;
        let Some(leaf) = chain.first() else {
            return Err(format!("{}: no certificate in it", cert_file.display()));
        };
        let key_source = key_file.as_ref().unwrap_or(&cert_file);
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| format!("{}: not a PEM private key: {e}", key_source.display()))?
            .ok_or_else(|| format!("{}: no private key in it", key_source.display()))?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("{}: unusable private key: {e}", key_source.display()))?;
        let certified = Arc::new(CertifiedKey::new(chain.clone(), signing));
        certified.keys_match().map_err(|e| {
            format!(
                "{} and {}: the key does not belong to the certificate ({e})",
                cert_file.display(),
                key_source.display()
            )
        })?;
        let names = dns_names(leaf)
            .map_err(|e| format!("{}: cannot read its names: {e}", cert_file.display()))?;
        if names.is_empty() && stem != "default" {
            return Err(format!(
                "{}: the certificate names no DNS host (subjectAltName); add one, or call it default.crt",
                cert_file.display()
            ));
        }
        for name in names {
            certs.names.push(name.clone());
            match name.strip_prefix("*.") {
                Some(parent) => certs.wildcard.insert(parent.to_string(), certified.clone()),
                None => certs.exact.insert(name, certified.clone()),
            };
        }
        if stem == "default" || certs.default.is_none() {
            certs.default = Some(certified);
        }
    }
    if certs.default.is_none() {
        return Err(format!(
            "no certificate in {}: add <name>.crt and <name>.key (PEM), or <name>.pem with both",
            dir.display()
        ));
    }
    Ok(certs)
}

fn read_small(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_FILE {
        return Err(format!(
            "{}: over 1 MiB, not a certificate or key",
            path.display()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn dns_names(cert: &rustls::pki_types::CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

/// A TLS acceptor over `dir`, and the task that reloads it when the directory changes.
pub struct Terminator {
    pub acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<CertResolver>,
    dir: PathBuf,
}

impl Terminator {
    pub fn new(dir: &Path) -> Result<Terminator, String> {
        let certs = load(dir)?;
        tracing::info!(dir = %dir.display(), names = ?certs.names, "TLS certificates loaded");
        let resolver = Arc::new(CertResolver {
            current: RwLock::new(Arc::new(certs)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Terminator {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            resolver,
            dir: dir.to_path_buf(),
        })
    }

    /// Looks at the directory every [`RELOAD_EVERY`]; a changed one is loaded whole and
    /// swapped in, or, when it does not load, kept as it was (the error logged).
    pub async fn reload_forever(self: Arc<Self>) {
        let mut seen = fingerprint(&self.dir);
        loop {
            tokio::time::sleep(RELOAD_EVERY).await;
            let now = fingerprint(&self.dir);
            if now == seen {
                continue;
            }
            seen = now;
            let dir = self.dir.clone();
            match tokio::task::spawn_blocking(move || load(&dir)).await {
                Ok(Ok(certs)) => {
                    tracing::info!(names = ?certs.names, "TLS certificates reloaded");
                    if let Ok(mut slot) = self.resolver.current.write() {
                        *slot = Arc::new(certs);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "TLS certificates not reloaded; serving the ones loaded before")
                }
                Err(_) => {}
            }
        }
    }
}
