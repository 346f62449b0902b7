//! The control plane's behaviour over the store.
//!
//! - [`desired`]: operations that change desired state (apply, scale, rollback, restart, stop,
//!   down, run). The API server calls them; each is one transaction guarded by compares.
//! - [`leader`]: leadership through a leased key, and fenced writes.
//! - [`controller`]: the service controller loop: read a snapshot, ask the pure scheduler what to
//!   do, write it as fenced transactions, repeat on every change.
//! - [`nodes`], [`proxies`], [`servers`], [`pki`]: the leased records of nodes, proxies and
//!   servers, task status reports, join tokens and revocations. The API server's handlers
//!   parse and authorise, then call one of these.
#![forbid(unsafe_code)]

pub mod audit;
mod batch;
pub mod controller;
pub mod desired;
pub mod events;
pub mod leader;
pub mod nodes;
pub mod params;
pub mod pki;
pub mod proxies;
pub mod registry;
pub mod routes;
pub mod servers;
pub mod snapshot;

use dozen_model::ModelError;
use dozen_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{kind} `{name}` not found")]
    NotFound { kind: &'static str, name: String },
    /// Not found, in a sentence of its own (what is there instead).
    #[error("{0}")]
    Absent(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The server's own failure (a sealed value that does not open, no randomness).
    #[error("{0}")]
    Internal(String),
    /// It existed, and is no longer readable (an expired parameter).
    #[error("{0}")]
    Gone(String),
    /// A heartbeat for a lease the record no longer holds: register again.
    #[error("{0}")]
    LeaseLost(String),
    #[error("this server is not the leader any more")]
    LostLeadership,
    /// A registry request refused in the OCI Distribution spec's terms.
    #[error(transparent)]
    Registry(#[from] dozen_model::registry::RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// Milliseconds since the Unix epoch: for people reading records, never for timeouts.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A short random hex string for task ids.
pub fn random_suffix() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 4];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        // Never expected on Linux; fall back to the clock, still unique enough per service.
        bytes = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0))
        .to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
