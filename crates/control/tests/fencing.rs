//! Fencing (blueprint §8): a leader whose lease ran out cannot write, not even late, once
//! another server leads. On the embedded store, and on a real etcd cluster with `--features
//! etcd`.

use std::sync::Arc;
use std::time::Duration;

use dozen_control::leader::{campaign, leader_key, resign_if_leading};
use dozen_control::ControlError;
use dozen_store::{Op, Store, Txn};

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
