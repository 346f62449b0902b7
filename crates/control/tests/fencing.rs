//! Fencing: a leader whose lease ran out cannot write, not even late, once
//! another server leads. On the embedded store, and on a real etcd cluster with `--features
//! etcd`.

use std::sync::Arc;
use std::time::Duration;

use dozen_control::leader::{campaign, leader_key, resign_if_leading};
use dozen_control::ControlError;
use dozen_store::{Op, Store, StoreError, Txn};

const PROBE: &str = "/dozen/v1/controller/fencing-probe";

async fn an_old_leaders_late_write_fails(store: Arc<dyn Store>) {
    let ttl = Duration::from_secs(2);
    let a = campaign(store.clone(), "server-a", ttl).await.unwrap();
    let put = |v: &str| Txn::new().then(Op::put(PROBE, v.as_bytes().to_vec()));
    assert!(a.txn(store.as_ref(), put("a1")).await.unwrap());

    // A stalls: its lease ends as if it had stopped refreshing it. B is elected.
    store.revoke_lease(a.lease).await.unwrap();
    let b = tokio::time::timeout(
        Duration::from_secs(20),
        campaign(store.clone(), "server-b", ttl),
    )
    .await
    .expect("B elected within 20 s")
    .unwrap();
    assert!(b.revision > a.revision, "a new fencing token");
    let leader = store.get(&leader_key()).await.unwrap().unwrap();
    assert_eq!(leader.value, b"server-b");

    // A wakes up and writes: refused, and nothing it wrote lands.
    let late = a.txn(store.as_ref(), put("a2")).await;
    assert!(
        matches!(late, Err(ControlError::LostLeadership)),
        "the old leader's write must fail: {late:?}"
    );
    assert_eq!(store.get(PROBE).await.unwrap().unwrap().value, b"a1");
    // The refusal is the store's, not only A's own bookkeeping: A's fence, sent as is,
    // fails in the store itself.
    let raw = store
        .txn(
            Txn::new()
                .when(a.fence())
                .then(Op::put(PROBE, b"a3".to_vec())),
        )
        .await
        .unwrap();
    assert!(
        !raw.succeeded,
        "the store must refuse a write under A's fence"
    );
    assert_eq!(store.get(PROBE).await.unwrap().unwrap().value, b"a1");
    assert!(b.txn(store.as_ref(), put("b1")).await.unwrap());
    assert_eq!(store.get(PROBE).await.unwrap().unwrap().value, b"b1");
}

/// A server shutting down hands over at once, long before its lease would run out.
async fn a_resigning_leader_hands_over_at_once(store: Arc<dyn Store>) {
    let long = Duration::from_secs(60);
    let a = campaign(store.clone(), "server-a", long).await.unwrap();
    resign_if_leading(store.as_ref(), "server-b").await;
    assert_eq!(
        store.get(&leader_key()).await.unwrap().unwrap().value,
        b"server-a",
        "only the leader itself resigns"
    );
    resign_if_leading(store.as_ref(), "server-a").await;
    let b = tokio::time::timeout(
        Duration::from_secs(10),
        campaign(store.clone(), "server-b", long),
    )
    .await
    .expect("B takes over without waiting for A's 60 s lease")
    .unwrap();
    assert!(b.revision > a.revision);
    let late = a
        .txn(
            store.as_ref(),
            Txn::new().then(Op::put(PROBE, b"a".to_vec())),
        )
        .await;
    assert!(
        matches!(late, Err(ControlError::LostLeadership)),
        "{late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dozen_store::embedded::EmbeddedStore::open(dir.path()).unwrap();
    an_old_leaders_late_write_fails(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dozen_store::embedded::EmbeddedStore::open(dir.path()).unwrap();
    a_resigning_leader_hands_over_at_once(Arc::new(store)).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_on_etcd() {
    let Some(cluster) = dozen_testkit::EtcdCluster::start() else {
        return;
    };
    let store =
        dozen_testkit::eventually_async(Duration::from_secs(30), "etcd comes up", || async {
            let store = dozen_store::etcd::EtcdStore::connect(&cluster.endpoints)
                .await
                .ok()?;
            store.revision().await.ok()?;
            Some(store)
        })
        .await;
    let store: Arc<dyn Store> = Arc::new(store);
    an_old_leaders_late_write_fails(store.clone()).await;
    // A fresh key for the next scenario: B resigns first.
    resign_if_leading(store.as_ref(), "server-b").await;
    a_resigning_leader_hands_over_at_once(store).await;
}

/// The real store, with one pause injected: the first time the leader key is read, another
/// server takes the leadership first (as if this one stalled right after winning).
struct StallBeforeRead {
    inner: Arc<dyn Store>,
    stall: tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    stalled: tokio::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

#[async_trait::async_trait]
impl Store for StallBeforeRead {
    async fn get(&self, key: &str) -> Result<Option<dozen_store::KeyValue>, StoreError> {
        if key == leader_key() {
            if let Some(resume) = self.stall.lock().await.take() {
                if let Some(tell) = self.stalled.lock().await.take() {
                    let _ = tell.send(());
                }
                let _ = resume.await;
            }
        }
        self.inner.get(key).await
    }
    async fn range(&self, prefix: &str) -> Result<dozen_store::RangeResponse, StoreError> {
        self.inner.range(prefix).await
    }
    async fn txn(&self, txn: Txn) -> Result<dozen_store::TxnResponse, StoreError> {
        self.inner.txn(txn).await
    }
    async fn watch(&self, prefix: &str, from: u64) -> Result<dozen_store::Watch, StoreError> {
        self.inner.watch(prefix, from).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<u64, StoreError> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: u64) -> Result<(), StoreError> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: u64) -> Result<(), StoreError> {
        self.inner.revoke_lease(lease).await
    }
    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }
    async fn revision(&self) -> Result<u64, StoreError> {
        self.inner.revision().await
    }
}

/// A server that stalls between winning the leader key and anything after it must not come
/// back fencing with its successor's revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stalled_right_after_winning_fences_with_its_own_revision() {
    let dir = tempfile::tempdir().unwrap();
    let inner: Arc<dyn Store> =
        Arc::new(dozen_store::embedded::EmbeddedStore::open(dir.path()).unwrap());
    let (resume, stall) = tokio::sync::oneshot::channel();
    let (stalled, is_stalled) = tokio::sync::oneshot::channel();
    let store: Arc<dyn Store> = Arc::new(StallBeforeRead {
        inner: inner.clone(),
        stall: tokio::sync::Mutex::new(Some(stall)),
        stalled: tokio::sync::Mutex::new(Some(stalled)),
    });
    let ttl = Duration::from_secs(2);
    let mut a = tokio::spawn({
        let store = store.clone();
        async move { campaign(store, "server-a", ttl).await }
    });
    // A wins on an empty store. If it reads the leader key after winning, it stalls there and
    // its lease ends meanwhile; otherwise it ends the same way just after its campaign returns.
    // Either way B is elected before A writes anything.
    let takeover = || async {
        let held = inner.get(&leader_key()).await.unwrap().unwrap();
        inner.revoke_lease(held.lease.unwrap()).await.unwrap();
        campaign(inner.clone(), "server-b", ttl).await.unwrap()
    };
    let (a, b) = tokio::select! {
        _ = is_stalled => {
            let b = takeover().await;
            let _ = resume.send(());
            (a.await.unwrap().unwrap(), b)
        }
        won = &mut a => {
            let a = won.unwrap().unwrap();
            (a, takeover().await)
        }
    };
    assert_ne!(a.revision, b.revision, "A took B's fencing token");
    let late = a
        .txn(
            inner.as_ref(),
            Txn::new().then(Op::put(PROBE, b"a".to_vec())),
        )
        .await;
    assert!(
        matches!(late, Err(ControlError::LostLeadership)),
        "A wrote under B's leadership: {late:?}"
    );
    assert!(inner.get(PROBE).await.unwrap().is_none());
}
