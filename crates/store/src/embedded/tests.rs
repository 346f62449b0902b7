use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_wait_for_a_write_on_its_way_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    store.put("/k", b"1".to_vec()).await.unwrap();

    // A writer in the middle of its fsync (or of a snapshot) holds the log, and only that.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let inner = store.inner.clone();
    let holder = std::thread::spawn(move || {
        let _log = inner.log.lock().unwrap();
        held_tx.send(()).unwrap();
        let _ = release_rx.recv();
    });
    held_rx.recv().unwrap();

    let reads = async {
        (
            store.get("/k").await.unwrap(),
            store.range("/").await.unwrap(),
            store.revision().await.unwrap(),
        )
    };
    let (got, range, revision) = tokio::time::timeout(Duration::from_secs(5), reads)
        .await
        .expect("reads answer while a write holds the log");
    assert_eq!(got.unwrap().value, b"1");
    assert_eq!(range.kvs.len(), 1);
    assert_eq!(revision, 1);

    // A write waits its turn, and is not visible before it is durable.
    let writer = store.clone();
    let write = tokio::spawn(async move { writer.put("/k", b"2".to_vec()).await });
    let watched = store.watch("/", 2).await.unwrap();
    assert_eq!(store.get("/k").await.unwrap().unwrap().value, b"1");
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(write.await.unwrap().unwrap(), 2);
    assert_eq!(store.get("/k").await.unwrap().unwrap().value, b"2");
    let mut watched = watched;
    match tokio::time::timeout(Duration::from_secs(5), watched.next()).await {
        Ok(Some(WatchMessage::Events { revision, events })) => {
            assert_eq!(revision, 2);
            assert_eq!(events[0].kv.value, b"2");
        }
        other => panic!("the watcher sees the write: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_being_revoked_cannot_be_kept_alive() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .txn(Txn::new().then(Op::Put {
            key: "/l".into(),
            value: b"v".to_vec(),
            lease: Some(lease),
        }))
        .await
        .unwrap();
    // A writer has begun revoking it (its deletes are on their way to the disk) when a
    // keep-alive comes in: it must not be told the lease lives on.
    let inner = store.inner.clone();
    let (marked_tx, marked_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let revoker = std::thread::spawn(move || {
        let mut writer = Writer::new(&inner);
        writer.state().leases.get_mut(&lease).unwrap().revoking = true;
        marked_tx.send(()).unwrap();
        let _ = go_rx.recv();
        writer.revoke(lease, None)
    });
    marked_rx.recv().unwrap();
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    go_tx.send(()).unwrap();
    revoker.join().unwrap().unwrap();
    assert!(store.get("/l").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_spares_a_lease_kept_alive_after_the_list_was_made() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    // Expiry decided at a moment before the lease's deadline: nothing is revoked.
    let mut writer = Writer::new(&store.inner);
    writer.revoke(lease, Some(Instant::now())).unwrap();
    drop(writer);
    store.keep_alive(lease).await.unwrap();
}
