//! The etcd backend against the same conformance suite as the embedded one, on a real
//! 3-member etcd cluster started here (Debian's `etcd-server`; `DOZEN_ETCD_BIN` overrides).
//! Without etcd the tests fail in CI and are skipped, saying so, elsewhere.
#![cfg(feature = "etcd")]

use std::sync::Arc;
use std::time::Duration;

use dozen_store::conformance;
use dozen_store::etcd::EtcdStore;
use dozen_store::Store;
use dozen_testkit::{eventually_async, EtcdCluster};

async fn connect(cluster: &EtcdCluster) -> Arc<dyn Store> {
    let store = eventually_async(
        Duration::from_secs(30),
        "the etcd cluster comes up",
        || async {
            let store = EtcdStore::connect(&cluster.endpoints).await.ok()?;
            store.put("/ready", b"1".to_vec()).await.ok()?;
            Some(store)
        },
    )
    .await;
    store.delete("/ready").await.unwrap();
    Arc::new(store)
}

macro_rules! conformance_test {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(cluster) = EtcdCluster::start() else {
                return;
            };
            let store = connect(&cluster).await;
            conformance::$name(store).await;
        }
    };
}

conformance_test!(revisions_and_versions);
conformance_test!(transactions_with_compares);
conformance_test!(range_and_delete_prefix);
conformance_test!(watch_from_revision);
conformance_test!(progress_follows_delivered_events);
conformance_test!(a_watcher_that_stops_reading_is_cut_off);
conformance_test!(compaction_forces_resync);
conformance_test!(leases_expire_and_keep_alive);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_down_does_not_stop_the_store() {
    let Some(mut cluster) = EtcdCluster::start() else {
        return;
    };
    let store = connect(&cluster).await;
    let r = store.put("/m/a", b"1".to_vec()).await.unwrap();
    let _ = cluster.members[2].kill();
    let _ = cluster.members[2].wait();
    // The two left still form a quorum (perhaps after an election).
    let r2 = eventually_async(Duration::from_secs(20), "a quorum of two", || async {
        store.put("/m/b", b"2".to_vec()).await.ok()
    })
    .await;
    assert!(r2 > r);
    assert_eq!(store.get("/m/a").await.unwrap().unwrap().value, b"1");
    // With quorum back, no caller sees the dead member: the calls the balancer sends its way
    // fail to connect and go to another member.
    for i in 0..40 {
        store.get("/m/a").await.expect("read with a member down");
        store
            .put(&format!("/m/n{i}"), b"1".to_vec())
            .await
            .expect("write with a member down");
    }
}

/// Seen: reading a whole prefix failed past the etcd client's 4 MiB answer limit (the
/// controller's snapshot, every list). Reads go in pages at one revision: 6 MiB read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_of_more_than_5_mib_is_read_whole_at_one_revision() {
    let Some(cluster) = EtcdCluster::start() else {
        return;
    };
    let store = connect(&cluster).await;
    const KEYS: usize = 600;
    let value = |i: usize| vec![(i % 251) as u8; 10 * 1024];
    for i in 0..KEYS {
        store.put(&format!("/big/{i:04}"), value(i)).await.unwrap();
    }
    let head = store.revision().await.unwrap();
    let range = store.range("/big/").await.expect("a 6 MiB prefix is read");
    assert_eq!(range.kvs.len(), KEYS);
    assert_eq!(range.revision, head);
    for (i, kv) in range.kvs.iter().enumerate() {
        assert_eq!(kv.key, format!("/big/{i:04}"));
        assert!(kv.value == value(i));
    }
    // Keys just past the prefix are not in it.
    store.put("/big0", b"x".to_vec()).await.unwrap();
    assert_eq!(store.range("/big/").await.unwrap().kvs.len(), KEYS);
}

/// A transaction over etcd's 128-operation limit is refused with an error that says so
/// (callers split their writes; see the control crate's `batch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_over_128_operations_is_refused_saying_so() {
    let Some(cluster) = EtcdCluster::start() else {
        return;
    };
    let store = connect(&cluster).await;
    let mut txn = dozen_store::Txn::new();
    for i in 0..129 {
        txn = txn.then(dozen_store::Op::put(format!("/ops/{i}"), b"1".to_vec()));
    }
    match store.txn(txn).await {
        Err(dozen_store::StoreError::TooManyOps { ops, limit }) => {
            assert_eq!((ops, limit), (129, 128));
        }
        other => panic!("expected TooManyOps, got {other:?}"),
    }
    assert_eq!(store.max_txn_ops(), 128);
}
