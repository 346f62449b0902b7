//! Leadership through one leased key, and fencing of every controller write.
//!
//! The leader key holds the winner's server id under a lease it keeps alive. Every controller
//! write is a transaction that also compares the leader key's mod revision with the one this
//! server won at, so a server that lost leadership (paused, partitioned, slow) cannot write.
//! A server restarting with the same id takes its own key back at once instead of waiting for
//! the old lease to run out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dozen_model::keys;
use dozen_store::{Compare, CompareOp, CompareTarget, LeaseId, Op, Revision, Store, Txn};

use crate::{ControlError, Result};

pub fn leader_key() -> String {
    keys::controller("leader")
}

#[derive(Clone)]
pub struct Leadership {
    pub server_id: String,
    pub lease: LeaseId,
    /// The leader key's mod revision when we won: the fencing token.
    pub revision: Revision,
    lost: Arc<AtomicBool>,
    /// Woken when `lost` is set.
    lost_notify: Arc<tokio::sync::Notify>,
    /// The wall time of this term's first controller pass (0 until then).
    first_pass_ms: Arc<AtomicU64>,
    /// The watchdog's view of the controller: 0 while it waits for a change, else when (ms
    /// after `epoch`, plus one) it last made progress inside a pass.
    working_since_progress: Arc<AtomicU64>,
    epoch: tokio::time::Instant,
}

impl Leadership {
    /// The compare every controller write carries.
    pub fn fence(&self) -> Compare {
        Compare::mod_revision(leader_key(), self.revision)
    }

    /// When this term's first controller pass ran: `now_ms` if this is it.
    pub fn first_pass_at_ms(&self, now_ms: u64) -> u64 {
        match self
            .first_pass_ms
            .compare_exchange(0, now_ms, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => now_ms,
            Err(earlier) => earlier,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The controller is at work (a pass): from now on the lease is kept only while it makes
    /// progress (each fenced write, each [`Leadership::progressed`]).
    pub fn working(&self) {
        self.working_since_progress
            .store(self.now_ms(), Ordering::SeqCst);
    }

    /// The controller made progress: a pass that keeps doing so may take as long as it needs.
    pub fn progressed(&self) {
        let now = self.now_ms();
        let _ =
            self.working_since_progress
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |at| {
                    (at != 0).then_some(now)
                });
    }

    /// The controller is waiting for a change: nothing to watch.
    pub fn idle(&self) {
        self.working_since_progress.store(0, Ordering::SeqCst);
    }

    /// How long the controller has been in a pass without progress (None when idle).
    fn stuck_for(&self) -> Option<Duration> {
        match self.working_since_progress.load(Ordering::SeqCst) {
            0 => None,
            at => Some(Duration::from_millis(self.now_ms().saturating_sub(at))),
        }
    }

    fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.lost_notify.notify_waiters();
    }

    /// Resolves once this term is over (lost, resigned, or given up by the watchdog).
    pub async fn ended(&self) {
        loop {
            let woken = self.lost_notify.notified();
            if self.is_lost() {
                return;
            }
            woken.await;
        }
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Gives leadership up: stops refreshing the lease and revokes it, so the leader key goes
    /// at once and another server can win without waiting for the lease to run out.
    pub async fn resign(&self, store: &dyn Store) {
        self.mark_lost();
        if let Err(e) = store.revoke_lease(self.lease).await {
            tracing::debug!(error = %e, "leader lease already gone");
        }
    }

    /// Runs a fenced transaction. `Ok(false)` means the other compares failed; losing the
    /// fence is `Err(LostLeadership)`.
    pub async fn txn(&self, store: &dyn Store, mut txn: Txn) -> Result<bool> {
        if self.is_lost() {
            return Err(ControlError::LostLeadership);
        }
        txn.compares.push(self.fence());
        let resp = store.txn(txn).await?;
        self.progressed();
        if resp.succeeded {
            return Ok(true);
        }
        match store.get(&leader_key()).await? {
            Some(kv) if kv.mod_revision == self.revision => Ok(false),
            _ => {
                self.mark_lost();
                Err(ControlError::LostLeadership)
            }
        }
    }
}

/// Blocks until this server is the leader, then keeps the lease alive in the background.
pub async fn campaign(store: Arc<dyn Store>, server_id: &str, ttl: Duration) -> Result<Leadership> {
    loop {
        let lease = store.grant_lease(ttl).await?;
        let key = leader_key();
        let put = Op::Put {
            key: key.clone(),
            value: server_id.as_bytes().to_vec(),
            lease: Some(lease),
        };
        // Win when nobody leads, or when the leader is an earlier life of this same server.
        let mut won = store
            .txn(Txn::new().when(Compare::missing(&key)).then(put.clone()))
            .await?;
        if !won.succeeded {
            won = store
                .txn(
                    Txn::new()
                        .when(Compare {
                            key: key.clone(),
                            op: CompareOp::Equal,
                            target: CompareTarget::Value(server_id.as_bytes().to_vec()),
                        })
                        .then(put),
                )
                .await?;
        }
        if won.succeeded {
            // The fencing token is the winning write's own revision (the key's mod revision),
            // never read afterwards: a server paused between winning and reading could read
            // its successor's revision and fence with it.
            let revision = won.revision;
            let leadership = Leadership {
                server_id: server_id.to_string(),
                lease,
                revision,
                lost: Arc::new(AtomicBool::new(false)),
                lost_notify: Default::default(),
                first_pass_ms: Default::default(),
                working_since_progress: Default::default(),
                epoch: tokio::time::Instant::now(),
            };
            tokio::spawn(keep_leading(store.clone(), leadership.clone(), ttl));
            tracing::info!(server = server_id, revision, "became controller leader");
            return Ok(leadership);
        }
        let _ = store.revoke_lease(lease).await;
        // Someone else leads: wait for the key to go, then try again.
        let current = store.get(&key).await?;
        let from = current.map(|kv| kv.mod_revision + 1).unwrap_or(1);
        if let Ok(mut watch) = store.watch(&key, from).await {
            let _ = tokio::time::timeout(ttl, watch.next()).await;
        } else {
            tokio::time::sleep(ttl / 4).await;
        }
    }
}

async fn keep_leading(store: Arc<dyn Store>, leadership: Leadership, ttl: Duration) {
    let mut tick = tokio::time::interval(ttl / 3);
    loop {
        tick.tick().await;
        if leadership.is_lost() {
            return;
        }
        // The keep-alive runs on its own: were it to go on for a controller that hangs, the
        // cluster would have a leader that does nothing. Two thirds of the TTL without progress
        // inside a pass, and the lease is given up, so another server leads within the TTL.
        if let Some(stuck) = leadership.stuck_for() {
            if stuck >= ttl * 2 / 3 {
                tracing::error!(
                    stuck_ms = stuck.as_millis() as u64,
                    ttl_ms = ttl.as_millis() as u64,
                    "the controller made no progress in its pass; giving up leadership so another server leads"
                );
                leadership.resign(store.as_ref()).await;
                return;
            }
        }
        if let Err(e) = store.keep_alive(leadership.lease).await {
            tracing::warn!(error = %e, "lost controller leadership");
            leadership.mark_lost();
            return;
        }
    }
}

/// Whether work that one server of a cluster should do (the parameter store's expiry and
/// redeploy passes) is this server's: it leads, or nobody does (a server without a
/// controller, or between two terms). Such work stays safe when two servers do it at once
/// (guarded writes); this only keeps the others from repeating it.
pub async fn ours_to_do(store: &dyn Store, server_id: &str) -> Result<bool> {
    Ok(match store.get(&leader_key()).await? {
        Some(kv) => kv.value == server_id.as_bytes(),
        None => true,
    })
}

/// Called when a server shuts down: if it leads, it resigns, so another server takes over at
/// once instead of after the lease's time to live.
pub async fn resign_if_leading(store: &dyn Store, server_id: &str) {
    let Ok(Some(kv)) = store.get(&leader_key()).await else {
        return;
    };
    if kv.value == server_id.as_bytes() {
        if let Some(lease) = kv.lease {
            let _ = store.revoke_lease(lease).await;
            tracing::info!(server = server_id, "resigned controller leadership");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dozen_store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn work_for_one_server_is_the_leaders_or_anyones_while_none_leads() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        assert!(ours_to_do(store.as_ref(), "s2").await.unwrap());
        let leadership = campaign(store.clone(), "s1", Duration::from_secs(10))
            .await
            .unwrap();
        assert!(ours_to_do(store.as_ref(), "s1").await.unwrap());
        assert!(!ours_to_do(store.as_ref(), "s2").await.unwrap());
        leadership.resign(store.as_ref()).await;
        assert!(ours_to_do(store.as_ref(), "s2").await.unwrap());
    }
}
