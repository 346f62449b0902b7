//! The behaviour every [`Store`] backend must show, as async checks that panic on a violation.
//!
//! Each check takes a fresh, empty store. Backend test files call [`run_all`] (or the checks one
//! by one) so the embedded and etcd backends are held to exactly the same rules.

use std::sync::Arc;
use std::time::Duration;

use crate::{Compare, EventKind, Op, Store, StoreError, Txn, WatchMessage};

/// Waits for the next watch message, failing the check after `secs` seconds.
pub async fn next_message(watch: &mut crate::Watch, secs: u64) -> WatchMessage {
    match tokio::time::timeout(Duration::from_secs(secs), watch.next()).await {
        Ok(Some(m)) => m,
        Ok(None) => panic!("watch ended unexpectedly"),
        Err(_) => panic!("no watch message within {secs}s"),
    }
}

pub async fn revisions_and_versions(store: Arc<dyn Store>) {
    let r0 = store.revision().await.unwrap();
    let r1 = store.put("/t/a", b"1".to_vec()).await.unwrap();
    assert_eq!(r1, r0 + 1, "every write bumps the revision by one");
    let r2 = store.put("/t/a", b"2".to_vec()).await.unwrap();
    assert_eq!(r2, r1 + 1);
    let kv = store.get("/t/a").await.unwrap().expect("key exists");
    assert_eq!(kv.value, b"2");
    assert_eq!(kv.create_revision, r1);
    assert_eq!(kv.mod_revision, r2);
    assert_eq!(kv.version, 2);
    let shared = store.get_shared("/t/a").await.unwrap().expect("key exists");
    assert_eq!(*shared, kv, "a shared read answers what a read does");
    assert_eq!(store.get("/t/missing").await.unwrap(), None);
    assert!(store.get_shared("/t/missing").await.unwrap().is_none());
    let r3 = store.delete("/t/a").await.unwrap();
    assert_eq!(r3, r2 + 1);
    assert_eq!(store.get("/t/a").await.unwrap(), None);
    // Deleting a missing key writes nothing.
    let r4 = store.delete("/t/a").await.unwrap();
    assert_eq!(r4, r3);
    // Re-creating starts the version again.
    let r5 = store.put("/t/a", b"3".to_vec()).await.unwrap();
    let kv = store.get("/t/a").await.unwrap().unwrap();
    assert_eq!((kv.version, kv.create_revision), (1, r5));
}

pub async fn transactions_with_compares(store: Arc<dyn Store>) {
    let created = store
        .txn(
            Txn::new()
                .when(Compare::missing("/t/lock"))
                .then(Op::put("/t/lock", b"me".to_vec()))
                .then(Op::put("/t/other", b"x".to_vec())),
        )
        .await
        .unwrap();
    assert!(created.succeeded);
    let lock = store.get("/t/lock").await.unwrap().unwrap();
    let other = store.get("/t/other").await.unwrap().unwrap();
    assert_eq!(
        lock.mod_revision, other.mod_revision,
        "one transaction is one revision"
    );

    let again = store
        .txn(
            Txn::new()
                .when(Compare::missing("/t/lock"))
                .then(Op::put("/t/lock", b"you".to_vec()))
                .otherwise(Op::put("/t/lost", b"1".to_vec())),
        )
        .await
        .unwrap();
    assert!(!again.succeeded);
    assert_eq!(store.get("/t/lock").await.unwrap().unwrap().value, b"me");
    assert!(store.get("/t/lost").await.unwrap().is_some());

    // Optimistic concurrency on mod_revision: a stale writer loses.
    let seen = lock.mod_revision;
    store.put("/t/lock", b"changed".to_vec()).await.unwrap();
    let stale = store
        .txn(
            Txn::new()
                .when(Compare::mod_revision("/t/lock", seen))
                .then(Op::put("/t/lock", b"stale".to_vec())),
        )
        .await
        .unwrap();
    assert!(!stale.succeeded);
    assert_eq!(
        store.get("/t/lock").await.unwrap().unwrap().value,
        b"changed"
    );
    // A failed compare with no failure ops writes nothing.
    assert_eq!(stale.revision, store.revision().await.unwrap());
}

pub async fn range_and_delete_prefix(store: Arc<dyn Store>) {
    for k in ["/r/b", "/r/a", "/r/c/1", "/rx", "/q"] {
        store.put(k, k.as_bytes().to_vec()).await.unwrap();
    }
    let range = store.range("/r/").await.unwrap();
    let keys: Vec<_> = range.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/r/a", "/r/b", "/r/c/1"], "sorted, prefix only");
    assert_eq!(range.revision, store.revision().await.unwrap());
    store
        .txn(Txn::new().then(Op::DeletePrefix {
            prefix: "/r/".into(),
        }))
        .await
        .unwrap();
    assert!(store.range("/r/").await.unwrap().kvs.is_empty());
    assert!(store.get("/rx").await.unwrap().is_some());
}

pub async fn watch_from_revision(store: Arc<dyn Store>) {
    store.put("/w/before", b"0".to_vec()).await.unwrap();
    let listed = store.range("/w/").await.unwrap();
    let r1 = store.put("/w/a", b"1".to_vec()).await.unwrap();
    store.put("/elsewhere", b"x".to_vec()).await.unwrap();
    let r2 = store.delete("/w/a").await.unwrap();

    // From the list's revision + 1: exactly what happened since, in order, prefix only.
    let mut watch = store.watch("/w/", listed.revision + 1).await.unwrap();
    match next_message(&mut watch, 5).await {
        WatchMessage::Events { revision, events } => {
            assert_eq!(revision, r1);
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].kind, EventKind::Put);
            assert_eq!(events[0].kv.key, "/w/a");
            assert_eq!(events[0].kv.value, b"1");
        }
        other => panic!("expected events, got {other:?}"),
    }
    match next_message(&mut watch, 5).await {
        WatchMessage::Events { revision, events } => {
            assert_eq!(revision, r2);
            assert_eq!(events[0].kind, EventKind::Delete);
            assert_eq!(events[0].kv.key, "/w/a");
        }
        other => panic!("expected events, got {other:?}"),
    }
    // Live events follow history without a gap.
    let r3 = store.put("/w/live", b"2".to_vec()).await.unwrap();
    match next_message(&mut watch, 5).await {
        WatchMessage::Events { revision, events } => {
            assert_eq!(revision, r3);
            assert_eq!(events[0].kv.key, "/w/live");
        }
        other => panic!("expected events, got {other:?}"),
    }
    // A transaction touching several keys arrives as one revision.
    store
        .txn(
            Txn::new()
                .then(Op::put("/w/t1", b"a".to_vec()))
                .then(Op::put("/w/t2", b"b".to_vec())),
        )
        .await
        .unwrap();
    match next_message(&mut watch, 5).await {
        WatchMessage::Events { events, .. } => assert_eq!(events.len(), 2),
        other => panic!("expected events, got {other:?}"),
    }
}

/// A progress answer comes after every event the watch has delivered, and names a revision
/// no older than the last of them: a bookmark taken from it never skips an event.
pub async fn progress_follows_delivered_events(store: Arc<dyn Store>) {
    let from = store.revision().await.unwrap() + 1;
    let mut watch = store.watch("/p/", from).await.unwrap();
    let mut last = 0;
    for i in 0..5 {
        last = store.put(&format!("/p/{i}"), b"v".to_vec()).await.unwrap();
    }
    store.put("/elsewhere", b"x".to_vec()).await.unwrap();
    let mut seen = Vec::new();
    // etcd answers once the watch has caught up: ask until it does.
    watch.request_progress();
    loop {
        match next_message(&mut watch, 5).await {
            WatchMessage::Events { revision, .. } => seen.push(revision),
            WatchMessage::Progress { revision } if revision >= last => {
                assert_eq!(
                    seen.len(),
                    5,
                    "progress at {revision} before every event: {seen:?}"
                );
                assert!(
                    seen.iter().all(|r| *r <= revision),
                    "{seen:?} after {revision}"
                );
                break;
            }
            WatchMessage::Progress { .. } => watch.request_progress(),
            other => panic!("expected events or progress, got {other:?}"),
        }
    }
}

/// A consumer that stops reading is cut off once its buffer is full: it gets what fitted,
/// then `CutOff`, then the end, and the store does not buffer the rest for it.
pub async fn a_watcher_that_stops_reading_is_cut_off(store: Arc<dyn Store>) {
    let from = store.revision().await.unwrap() + 1;
    let mut slow = store.watch("/slow/", from).await.unwrap();
    let mut keeping_up = store.watch("/slow/", from).await.unwrap();
    let writes = crate::WATCH_BUFFER + 20;
    let mut last = 0;
    let mut kept_up = 0;
    for i in 0..writes {
        last = store
            .put(&format!("/slow/{}", i % 7), vec![b'x'; 100])
            .await
            .unwrap();
        while let Some(message) = keeping_up.try_next() {
            assert!(
                matches!(message, WatchMessage::Events { .. }),
                "{message:?}"
            );
            kept_up += 1;
        }
    }
    let mut events = 0;
    loop {
        match next_message(&mut slow, 5).await {
            WatchMessage::Events { .. } => events += 1,
            WatchMessage::CutOff => break,
            other => panic!("expected events then CutOff, got {other:?}"),
        }
    }
    assert!(
        events < crate::WATCH_BUFFER,
        "{events} events buffered for a reader that never read"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(5), slow.next())
            .await
            .expect("the cut-off watch ends")
            .is_none(),
        "nothing follows CutOff"
    );
    // The one that kept reading has every revision.
    while kept_up < writes {
        match next_message(&mut keeping_up, 5).await {
            WatchMessage::Events { revision, .. } => {
                kept_up += 1;
                if kept_up == writes {
                    assert_eq!(revision, last);
                }
            }
            other => panic!("expected events, got {other:?}"),
        }
    }
}

pub async fn compaction_forces_resync(store: Arc<dyn Store>) {
    let first = store.put("/c/a", b"1".to_vec()).await.unwrap();
    for i in 0..5 {
        store.put("/c/a", vec![i]).await.unwrap();
    }
    let floor = store.put("/c/b", b"2".to_vec()).await.unwrap();
    store.compact(floor).await.unwrap();
    match store.watch("/c/", first).await {
        Err(StoreError::Compacted {
            requested,
            compact_revision,
        }) => {
            assert_eq!(requested, first);
            assert!(compact_revision >= floor);
        }
        Err(e) => panic!("expected Compacted, got error {e}"),
        Ok(_) => panic!("expected Compacted, got a watch"),
    }
    // The resync: list, then watch from the list's revision + 1.
    let listed = store.range("/c/").await.unwrap();
    assert_eq!(listed.kvs.len(), 2);
    let mut watch = store.watch("/c/", listed.revision + 1).await.unwrap();
    let r = store.put("/c/c", b"3".to_vec()).await.unwrap();
    match next_message(&mut watch, 5).await {
        WatchMessage::Events { revision, .. } => assert_eq!(revision, r),
        other => panic!("expected events, got {other:?}"),
    }
}

pub async fn leases_expire_and_keep_alive(store: Arc<dyn Store>) {
    let ttl = Duration::from_millis(1200);
    let kept = store.grant_lease(ttl).await.unwrap();
    let dropped = store.grant_lease(ttl).await.unwrap();
    assert_ne!(kept, dropped);
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("/l/", start + 1).await.unwrap();
    for (key, lease) in [("/l/kept", kept), ("/l/dropped", dropped)] {
        store
            .txn(Txn::new().then(Op::Put {
                key: key.into(),
                value: b"v".to_vec(),
                lease: Some(lease),
            }))
            .await
            .unwrap();
    }
    assert_eq!(
        store.get("/l/kept").await.unwrap().unwrap().lease,
        Some(kept)
    );
    // Keep one lease alive while the other runs out; the watch shows the expiry as a delete.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut saw_delete = false;
    while !saw_delete {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lease did not expire within 10s"
        );
        store.keep_alive(kept).await.unwrap();
        if let Ok(Some(WatchMessage::Events { events, .. })) =
            tokio::time::timeout(Duration::from_millis(300), watch.next()).await
        {
            for e in events {
                if e.kind == EventKind::Delete {
                    assert_eq!(e.kv.key, "/l/dropped", "only the unrefreshed lease expires");
                    saw_delete = true;
                }
            }
        }
    }
    assert!(store.get("/l/dropped").await.unwrap().is_none());
    assert!(store.get("/l/kept").await.unwrap().is_some());
    let refreshed = store.keep_alive(dropped).await;
    assert!(
        matches!(refreshed, Err(StoreError::LeaseNotFound(_))),
        "keeping an expired lease alive must fail with LeaseNotFound, got {refreshed:?}"
    );
    // Writing under an expired lease is refused.
    let refused = store
        .txn(Txn::new().then(Op::Put {
            key: "/l/late".into(),
            value: vec![],
            lease: Some(dropped),
        }))
        .await;
    assert!(matches!(refused, Err(StoreError::LeaseNotFound(_))));
    // Revoking deletes the lease's keys at once.
    store.revoke_lease(kept).await.unwrap();
    assert!(store.get("/l/kept").await.unwrap().is_none());
}

/// Runs every check, each on a fresh store from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Store>>,
{
    revisions_and_versions(make().await).await;
    transactions_with_compares(make().await).await;
    range_and_delete_prefix(make().await).await;
    watch_from_revision(make().await).await;
    progress_follows_delivered_events(make().await).await;
    a_watcher_that_stops_reading_is_cut_off(make().await).await;
    compaction_forces_resync(make().await).await;
    leases_expire_and_keep_alive(make().await).await;
}
