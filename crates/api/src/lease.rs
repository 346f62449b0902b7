//! Holding a lease through the API, the one loop agents and proxies share: register (retrying
//! with backoff while the control plane is away), heartbeat, and register again as soon as the
//! server answers that the lease is gone.

use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::{ApiError, RegisterResponse};

/// Registers once.
pub type RegisterFn =
    Box<dyn Fn() -> BoxFuture<'static, Result<RegisterResponse, ApiError>> + Send + Sync>;
/// Heartbeats the lease it is given once.
pub type HeartbeatFn = Box<dyn Fn(u64) -> BoxFuture<'static, Result<(), ApiError>> + Send + Sync>;

/// A registration: what to call to register, and to heartbeat a lease.
pub struct Registration {
    /// For logs: "node", "proxy".
    pub what: &'static str,
    pub register: RegisterFn,
    pub heartbeat: HeartbeatFn,
}

impl Registration {
    /// Registers, retrying (100 ms doubling to 5 s) until a server accepts.
    pub async fn register(&self) -> RegisterResponse {
        let mut delay = Duration::from_millis(100);
        loop {
            match (self.register)().await {
                Ok(r) => {
                    tracing::info!(
                        what = self.what,
                        lease = r.lease,
                        "registered with the control plane"
                    );
                    return r;
                }
                Err(e) => {
                    tracing::warn!(what = self.what, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot register yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One heartbeat of `held`; when the server no longer knows the lease, registers again
    /// and replaces `held`. Returns true when it registered again. Any other failure (the
    /// control plane is away) is logged and changes nothing: tasks keep running.
    pub async fn heartbeat(&self, held: &mut RegisterResponse) -> bool {
        match (self.heartbeat)(held.lease).await {
            Ok(()) => false,
            Err(e) if e.status() == Some(404) => {
                tracing::warn!(what = self.what, "lease lost; registering again");
                *held = self.register().await;
                true
            }
            Err(e) => {
                tracing::warn!(what = self.what, error = %e, "heartbeat failed");
                false
            }
        }
    }
}

/// How long to wait between heartbeats of `held`: a quarter of its time to live.
pub fn heartbeat_interval(held: &RegisterResponse) -> Duration {
    Duration::from_millis(held.ttl_ms / 4).max(Duration::from_millis(100))
}
