//! The embedded backend against the conformance suite, plus what only a durable local backend
//! shows: restart recovery, torn writes and kill -9 in the middle of a stream of writes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dozen_store::conformance;
use dozen_store::embedded::EmbeddedStore;
use dozen_store::{Op, Store, StoreError, Txn};
use dozen_testkit::SmallDisk;

fn fresh() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    (dir, Arc::new(store))
}

macro_rules! conformance_test {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_dir, store) = fresh();
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

#[tokio::test]
async fn writes_survive_reopen_with_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let rev;
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.put("/k/a", b"1".to_vec()).await.unwrap();
        store.put("/k/b", b"2".to_vec()).await.unwrap();
        rev = store.delete("/k/a").await.unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.revision().await.unwrap(), rev);
    assert!(store.get("/k/a").await.unwrap().is_none());
    let b = store.get("/k/b").await.unwrap().unwrap();
    assert_eq!(b.value, b"2");
    assert_eq!(store.put("/k/c", vec![]).await.unwrap(), rev + 1);
}

#[tokio::test]
async fn watch_history_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let first;
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        first = store.put("/h/a", b"1".to_vec()).await.unwrap();
        store.put("/h/b", b"2".to_vec()).await.unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let mut watch = store.watch("/h/", first).await.unwrap();
    match conformance::next_message(&mut watch, 5).await {
        dozen_store::WatchMessage::Events { revision, .. } => assert_eq!(revision, first),
        other => panic!("expected replayed events, got {other:?}"),
    }
}

/// In virtual time: the downtime passes without a wall-clock wait.
#[tokio::test(start_paused = true)]
async fn leases_get_their_full_ttl_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_millis(1500);
    let lease;
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        lease = store.grant_lease(ttl).await.unwrap();
        store
            .txn(Txn::new().then(Op::Put {
                key: "/node/n1".into(),
                value: b"alive".to_vec(),
                lease: Some(lease),
            }))
            .await
            .unwrap();
    }
    // Most of the TTL passes while "the server is down".
    tokio::time::advance(Duration::from_millis(1200)).await;
    let reopened_at = tokio::time::Instant::now();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert!(
        store.get("/node/n1").await.unwrap().is_some(),
        "a restart must not expire leases"
    );
    // The agent refreshes it after reconnecting: that works because the lease was extended.
    store.keep_alive(lease).await.unwrap();
    assert!(reopened_at.elapsed() < ttl);
    assert!(store.get("/node/n1").await.unwrap().is_some());
}

#[tokio::test]
async fn torn_tail_is_dropped_and_earlier_writes_kept() {
    let dir = tempfile::tempdir().unwrap();
    let rev;
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.put("/t/a", b"1".to_vec()).await.unwrap();
        rev = store.put("/t/b", b"2".to_vec()).await.unwrap();
    }
    // A write cut short by a crash: a frame header promising more bytes than follow.
    let wal = dir.path().join("store.wal");
    let mut bytes = std::fs::read(&wal).unwrap();
    let keep = bytes.len();
    bytes.extend_from_slice(&200u32.to_le_bytes());
    bytes.extend_from_slice(&[1, 2, 3, 4, b'{', b'"']);
    std::fs::write(&wal, &bytes).unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.revision().await.unwrap(), rev);
    assert_eq!(store.get("/t/b").await.unwrap().unwrap().value, b"2");
    assert_eq!(std::fs::metadata(&wal).unwrap().len() as usize, keep);
    // And the log is writable again after the truncation.
    store.put("/t/c", b"3".to_vec()).await.unwrap();
    drop(store);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.get("/t/c").await.unwrap().unwrap().value, b"3");
}

#[tokio::test]
async fn kill_9_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_store-crash-writer"))
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut acked: Option<u64> = None;
        // Kill it at a different point of the stream each round.
        let kill_after = 150 + round * 97;
        let mut seen = 0;
        while let Some(Ok(line)) = lines.next() {
            let n: u64 = line.strip_prefix("ack ").unwrap().parse().unwrap();
            acked = Some(n);
            seen += 1;
            if seen == kill_after {
                child.kill().unwrap(); // SIGKILL
                break;
            }
        }
        // Lines already in the pipe were acknowledged too.
        for line in lines.map_while(Result::ok) {
            acked = Some(line.strip_prefix("ack ").unwrap().parse().unwrap());
        }
        child.wait().unwrap();
        let acked = acked.expect("the writer acknowledged writes");

        let store = EmbeddedStore::open(dir.path()).unwrap();
        let all = store.range("/crash/").await.unwrap().kvs;
        assert!(
            all.len() as u64 > acked,
            "round {round}: acknowledged up to {acked}, found only {} records",
            all.len()
        );
        for (i, kv) in all.iter().enumerate() {
            let i = i as u64;
            assert_eq!(kv.key, format!("/crash/{i:08}"), "no hole before {i}");
            let expected = format!("{i}:{}", "x".repeat(200 + (i % 100) as usize));
            assert_eq!(kv.value, expected.as_bytes(), "record {i} is whole");
        }
        drop(store);
        // Next round continues on the same directory, appending after recovery.
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .txn(Txn::new().then(Op::DeletePrefix {
                prefix: "/crash/".into(),
            }))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn snapshots_fold_the_log_and_keep_everything() {
    use dozen_store::embedded::Options;
    let dir = tempfile::tempdir().unwrap();
    let opts = Options { snapshot_every: 10 };
    let (rev, first);
    {
        let store = EmbeddedStore::open_with(dir.path(), opts).unwrap();
        first = store.put("/s/0", b"0".to_vec()).await.unwrap();
        let mut r = first;
        for i in 1..25u32 {
            r = store
                .put(&format!("/s/{i}"), i.to_string().into_bytes())
                .await
                .unwrap();
        }
        rev = store.delete("/s/3").await.unwrap();
        assert!(rev > r);
    }
    assert!(dir.path().join("store.snapshot").exists());
    let wal_len = std::fs::metadata(dir.path().join("store.wal"))
        .unwrap()
        .len();
    assert!(
        wal_len < 10 * 200,
        "the log was folded: {wal_len} bytes left"
    );
    let store = EmbeddedStore::open_with(dir.path(), opts).unwrap();
    assert_eq!(store.revision().await.unwrap(), rev);
    let kvs = store.range("/s/").await.unwrap().kvs;
    assert_eq!(kvs.len(), 24);
    assert!(kvs.iter().all(|kv| kv.key != "/s/3"));
    assert_eq!(store.get("/s/24").await.unwrap().unwrap().value, b"24");
    // History before the snapshot is gone: an old watcher must list again.
    assert!(matches!(
        store.watch("/s/", first).await,
        Err(dozen_store::StoreError::Compacted { .. })
    ));
}

/// The error opening the store in `dir` gives; the test fails if it opens.
fn refused_open(dir: &std::path::Path, what: &str) -> String {
    match EmbeddedStore::open(dir) {
        Ok(_) => panic!("opened a log with {what}"),
        Err(e) => e.to_string(),
    }
}

/// Damage in the middle of the log is not a torn write: start-up stops, naming the file and
/// the offset, and leaves the file as it was (acknowledged writes after it are not dropped).
#[tokio::test]
async fn a_damaged_frame_in_the_middle_stops_start_up_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        for i in 0..10 {
            store
                .put(&format!("/m/{i}"), format!("value {i}").into_bytes())
                .await
                .unwrap();
        }
    }
    let wal = dir.path().join("store.wal");
    let intact = std::fs::read(&wal).unwrap();
    // One bit flipped in the payload of the fourth frame (of ten).
    let mut offsets = Vec::new();
    let mut at = 0;
    while at < intact.len() {
        offsets.push(at);
        let len = u32::from_le_bytes(intact[at..at + 4].try_into().unwrap()) as usize;
        at += 8 + len;
    }
    assert!(offsets.len() >= 10, "{} frames", offsets.len());
    let mut damaged = intact.clone();
    damaged[offsets[3] + 12] ^= 0x01;
    std::fs::write(&wal, &damaged).unwrap();

    let err = refused_open(dir.path(), "a damaged middle frame");
    assert!(err.contains("store.wal"), "{err}");
    assert!(
        err.contains(&format!("byte offset {}", offsets[3])),
        "{err}"
    );
    assert!(err.contains("nothing was changed on disk"), "{err}");
    assert_eq!(std::fs::read(&wal).unwrap(), damaged, "the log was changed");

    // A frame whose checksum matches but which is no log entry is damage too.
    let mut alien = intact[..offsets[2]].to_vec();
    let payload = br#"{"not":"an entry"}"#;
    alien.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    alien.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    alien.extend_from_slice(payload);
    alien.extend_from_slice(&intact[offsets[2]..]);
    std::fs::write(&wal, &alien).unwrap();
    let err = refused_open(dir.path(), "a frame that is not an entry");
    assert!(err.contains("not a log entry"), "{err}");
    assert!(
        err.contains(&format!("byte offset {}", offsets[2])),
        "{err}"
    );
    assert_eq!(std::fs::read(&wal).unwrap(), alien);

    // Put back as it was, every write is there.
    std::fs::write(&wal, &intact).unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(
        store.get("/m/9").await.unwrap().unwrap().value,
        b"value 9".to_vec()
    );
}

/// A whole last frame that fails its checksum (its sectors half-written) is still a torn tail.
#[tokio::test]
async fn a_damaged_last_frame_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let rev;
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        rev = store.put("/t/a", b"1".to_vec()).await.unwrap();
        store.put("/t/b", b"2".to_vec()).await.unwrap();
    }
    let wal = dir.path().join("store.wal");
    let mut bytes = std::fs::read(&wal).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0xff;
    std::fs::write(&wal, &bytes).unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.revision().await.unwrap(), rev);
    assert!(store.get("/t/b").await.unwrap().is_none());
}

/// A full disk refuses writes with a clear error and changes nothing; reads and watches go on;
/// once space is freed, writes succeed again, and everything acknowledged survives a restart.
#[tokio::test]
async fn a_full_disk_refuses_writes_and_recovers_when_space_returns() {
    let Some(disk) = SmallDisk::mount("2m") else {
        return;
    };
    let data = disk.path().join("store");
    let store = EmbeddedStore::open(&data).unwrap();
    let before = store.put("/d/kept", b"before".to_vec()).await.unwrap();
    let mut watch = store.watch("/d/", before + 1).await.unwrap();
    let filler = disk.fill();

    let refused = store.put("/d/x", vec![7u8; 64 * 1024]).await;
    match &refused {
        Err(StoreError::NoSpace { path }) => assert!(path.contains("store.wal"), "{path}"),
        other => panic!("expected NoSpace, got {other:?}"),
    }
    let message = refused.unwrap_err().to_string();
    assert!(message.contains("is full"), "{message}");
    // Nothing of the refused write is visible, and reads go on.
    assert_eq!(store.revision().await.unwrap(), before);
    assert!(store.get("/d/x").await.unwrap().is_none());
    assert_eq!(
        store.get("/d/kept").await.unwrap().unwrap().value,
        b"before"
    );

    std::fs::remove_file(&filler).unwrap();
    let after = store.put("/d/x", b"after".to_vec()).await.unwrap();
    assert_eq!(after, before + 1);
    // The watch, open all along, sees the write that succeeded (and nothing of the refused one).
    match conformance::next_message(&mut watch, 5).await {
        dozen_store::WatchMessage::Events { revision, events } => {
            assert_eq!(revision, after);
            assert_eq!(events[0].kv.value, b"after");
        }
        other => panic!("expected the write after space returned, got {other:?}"),
    }
    drop(watch);
    drop(store);
    let store = EmbeddedStore::open(&data).unwrap();
    assert_eq!(store.get("/d/x").await.unwrap().unwrap().value, b"after");
    assert_eq!(store.revision().await.unwrap(), after);
}

/// A value of `len` bytes that differs from every other index's.
fn big_value(index: u32, len: usize) -> Vec<u8> {
    let seed = index.wrapping_mul(2_654_435_761);
    (0..len as u32)
        .map(|i| (seed.wrapping_add(i.wrapping_mul(31)) >> 3) as u8)
        .collect()
}

/// Seen: values were logged as JSON arrays of numbers (about 3.5 times their size) and the
/// snapshot was one frame read back with a 64 MiB limit, so with about 18 MiB of records the
/// next restart failed after the log had been truncated. Now values are raw bytes and the
/// snapshot is a stream of bounded frames: 200 MiB of records survive a fold and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_200_mib_of_records_restarts_after_a_snapshot() {
    use dozen_store::embedded::Options;
    const RECORDS: u32 = 200;
    const SIZE: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        snapshot_every: 150,
    };
    let last;
    {
        let store = EmbeddedStore::open_with(dir.path(), opts).unwrap();
        let mut rev = 0;
        for i in 0..RECORDS {
            rev = store
                .put(&format!("/big/{i:03}"), big_value(i, SIZE))
                .await
                .unwrap();
        }
        last = rev;
    }
    let snapshot = std::fs::metadata(dir.path().join("store.snapshot"))
        .expect("the log was folded into a snapshot")
        .len();
    let wal = std::fs::metadata(dir.path().join("store.wal"))
        .unwrap()
        .len();
    let held = (RECORDS as u64) * SIZE as u64;
    assert!(
        snapshot + wal < held + held / 20,
        "values are kept as bytes: {snapshot} + {wal} bytes on disk for {held} bytes of values"
    );
    assert!(snapshot > 64 * 1024 * 1024, "{snapshot} byte snapshot");

    let store = EmbeddedStore::open_with(dir.path(), opts).unwrap();
    assert_eq!(store.revision().await.unwrap(), last);
    let kvs = store.range("/big/").await.unwrap().kvs;
    assert_eq!(kvs.len(), RECORDS as usize);
    for (i, kv) in kvs.iter().enumerate() {
        assert_eq!(kv.key, format!("/big/{i:03}"));
        assert!(kv.value == big_value(i as u32, SIZE), "{} differs", kv.key);
    }
}

/// A store written before values were kept as bytes (a one-frame JSON snapshot and JSON log
/// entries) opens with everything in it, and the next fold rewrites it in the new form.
#[tokio::test]
async fn a_store_written_in_the_json_form_still_opens() {
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("store.snapshot"),
        frame(
            br#"{"revision":3,"compact_revision":0,"kvs":[{"key":"/l/a","value":[104,105],"create_revision":1,"mod_revision":3,"version":2,"lease":null}],"leases":[],"next_lease":1}"#,
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("store.wal"),
        frame(br#"{"Write":{"revision":4,"ops":[{"Put":{"key":"/l/b","value":[104,111],"lease":null}}]}}"#),
    )
    .unwrap();
    {
        let store = EmbeddedStore::open_with(
            dir.path(),
            dozen_store::embedded::Options { snapshot_every: 2 },
        )
        .unwrap();
        assert_eq!(store.revision().await.unwrap(), 4);
        let a = store.get("/l/a").await.unwrap().unwrap();
        assert_eq!((a.value.as_slice(), a.version), (&b"hi"[..], 2));
        assert_eq!(store.get("/l/b").await.unwrap().unwrap().value, b"ho");
        store.put("/l/c", b"new".to_vec()).await.unwrap();
    }
    let snapshot = std::fs::read(dir.path().join("store.snapshot")).unwrap();
    assert_eq!(&snapshot[..8], b"DZSNAP02", "the fold rewrote the snapshot");
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let keys: Vec<String> = store
        .range("/l/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["/l/a", "/l/b", "/l/c"]);
}

/// A transaction larger than one log frame may be is refused up front, naming the limit; it
/// is never acknowledged and then lost at the next start.
#[tokio::test]
async fn a_transaction_over_the_frame_limit_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let before = store.put("/x/small", b"1".to_vec()).await.unwrap();
    let err = store
        .put("/x/huge", vec![7u8; 65 * 1024 * 1024])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("limit of 67104768 bytes"), "{err}");
    assert_eq!(store.revision().await.unwrap(), before);
    drop(store);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.revision().await.unwrap(), before);
    assert!(store.get("/x/huge").await.unwrap().is_none());
}

/// A damaged snapshot stops start-up naming the file and the frame's offset.
#[tokio::test]
async fn a_damaged_snapshot_frame_stops_start_up_with_its_offset() {
    use dozen_store::embedded::Options;
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open_with(dir.path(), Options { snapshot_every: 4 }).unwrap();
        for i in 0..4u32 {
            store
                .put(&format!("/s/{i}"), big_value(i, 600 * 1024))
                .await
                .unwrap();
        }
    }
    let path = dir.path().join("store.snapshot");
    let intact = std::fs::read(&path).unwrap();
    // The magic, then frames: the header, then records in chunks of about 1 MiB.
    let mut offsets = Vec::new();
    let mut at = 8;
    while at < intact.len() {
        offsets.push(at);
        at += 8 + u32::from_le_bytes(intact[at..at + 4].try_into().unwrap()) as usize;
    }
    assert!(
        offsets.len() >= 4,
        "header, two chunks and the end: {offsets:?}"
    );
    let mut damaged = intact.clone();
    damaged[offsets[2] + 100] ^= 0x10;
    std::fs::write(&path, &damaged).unwrap();
    let err = refused_open(dir.path(), "a damaged snapshot");
    assert!(err.contains("store.snapshot"), "{err}");
    assert!(
        err.contains(&format!("byte offset {}", offsets[2])),
        "{err}"
    );
    assert!(err.contains("fails its checksum"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), damaged);
    // Cut short after a whole frame: the end frame is missing.
    std::fs::write(&path, &intact[..offsets[2]]).unwrap();
    let err = refused_open(dir.path(), "a truncated snapshot");
    assert!(err.contains("ends before its end frame"), "{err}");
}

/// Seen: a watch from a past revision replayed everything history held (up to 20,000
/// revisions) into an unbounded buffer. A replay that does not fit the watch's buffer is
/// refused like compacted history (the caller lists again); one that fits is served.
#[tokio::test]
async fn a_watch_further_back_than_its_buffer_holds_is_told_to_list_again() {
    let (_dir, store) = fresh();
    let first = store.put("/r/0", b"0".to_vec()).await.unwrap();
    let mut last = first;
    for i in 1..(dozen_store::WATCH_BUFFER as u64 + 5) {
        last = store
            .put(&format!("/r/{}", i % 3), b"v".to_vec())
            .await
            .unwrap();
    }
    match store.watch("/r/", first).await {
        Err(StoreError::Compacted { requested, .. }) => assert_eq!(requested, first),
        Ok(_) => panic!("replayed {} revisions into one watch", last - first + 1),
        Err(e) => panic!("{e}"),
    }
    // Other prefixes and recent revisions are still served from history.
    let mut recent = store.watch("/r/", last - 9).await.unwrap();
    for expected in (last - 9)..=last {
        match conformance::next_message(&mut recent, 5).await {
            dozen_store::WatchMessage::Events { revision, .. } => assert_eq!(revision, expected),
            other => panic!("{other:?}"),
        }
    }
    assert!(store.watch("/other/", first).await.is_ok());
}

/// History for watchers is bounded in bytes as well as revisions: big values push old
/// revisions out (a watch from there is told to list again) instead of piling up.
#[tokio::test]
async fn history_kept_for_watchers_is_bounded_in_bytes() {
    let (_dir, store) = fresh();
    let first = store.put("/h/0", vec![1; 1024 * 1024]).await.unwrap();
    for i in 1..80u32 {
        store
            .put(&format!("/h/{i}"), vec![2; 1024 * 1024])
            .await
            .unwrap();
    }
    assert!(matches!(
        store.watch("/h/", first).await,
        Err(StoreError::Compacted { .. })
    ));
}

/// A record close to the limit after a small one: the small one's chunk is written first, so
/// the big record gets a frame of its own and the fold (and the restart after it) succeed.
#[tokio::test]
async fn a_record_near_the_limit_after_a_small_one_folds_and_restarts() {
    use dozen_store::embedded::Options;
    let dir = tempfile::tempdir().unwrap();
    let opts = Options { snapshot_every: 2 };
    let big = vec![9u8; 64 * 1024 * 1024 - 8192];
    {
        let store = EmbeddedStore::open_with(dir.path(), opts).unwrap();
        store
            .put("/n/a-small", vec![1u8; 900 * 1024])
            .await
            .unwrap();
        store.put("/n/b-big", big.clone()).await.unwrap();
    }
    let snapshot = std::fs::read(dir.path().join("store.snapshot")).unwrap();
    assert_eq!(&snapshot[..8], b"DZSNAP02", "the log was folded");
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert!(store.get("/n/b-big").await.unwrap().unwrap().value == big);
    assert_eq!(
        store.get("/n/a-small").await.unwrap().unwrap().value.len(),
        900 * 1024
    );
}
