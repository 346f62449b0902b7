//! The audit trail's files: chain, restarts, crashes, blanked records, spare segments.

use super::*;
use dozen_params::audit::Outcome;
use std::io::Write;

fn key() -> ChainKey {
    ChainKey::new(&dozen_params::Key::parse(&"55".repeat(32)).unwrap())
}

fn event(target: &str) -> Event {
    Event {
        at_ms: crate::wall_ms(),
        who: "root token".into(),
        from: "127.0.0.1:1".into(),
        action: "param.read".into(),
        target: target.into(),
        outcome: Outcome::Ok,
        detail: None,
    }
}

/// A new trail in a temp dir with `n` records (`/a/0`, `/a/1`, ...).
async fn chain_of(n: usize) -> (tempfile::TempDir, AuditLog) {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), "s1", key()).unwrap();
    for i in 0..n {
        log.record(event(&format!("/a/{i}"))).await.unwrap();
    }
    (dir, log)
}

#[tokio::test]
async fn records_are_durable_chained_and_carry_on_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), "s1", key()).unwrap();
    let seqs = futures_util::future::join_all((0..50).map(|i| {
        let log = &log;
        async move { log.record(event(&format!("/a/{i}"))).await.unwrap() }
    }))
    .await;
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=50).collect::<Vec<_>>());
    // The live segment holds its records, then zeros ahead of them.
    let bytes = std::fs::read(segments(dir.path()).unwrap().remove(0)).unwrap();
    let records = written(&bytes);
    assert_eq!(records.iter().filter(|b| **b == b'\n').count(), 50);
    assert!(records.ends_with(b"\n"));
    assert!(bytes.len() > records.len() && bytes.len() as u64 >= ZEROED_AHEAD_MIN);
    assert!(bytes[records.len()..].iter().all(|b| *b == 0));
    drop(log);
    let log = AuditLog::open(dir.path(), "s1", key()).unwrap();
    assert_eq!(log.record(event("/b")).await.unwrap(), 51);
    let verified = log.verify().unwrap();
    assert!(verified.broken.is_none(), "{:?}", verified.broken);
    assert_eq!((verified.tip.records, verified.first_seq), (51, 1));
    let only_b = log
        .read(&AuditFilter {
            target: Some("/b".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(only_b.len(), 1);
    assert_eq!(only_b[0].seq, 51);
}

#[tokio::test]
async fn a_busy_trail_moves_onto_spare_segments_of_zeros_and_the_chain_holds() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = Sizes {
        segment: 96 * 1024,
        spare_after: 8 * 1024,
    };
    let log = AuditLog::open_sized(dir.path(), "s1", key(), sizes).unwrap();
    // Past `spare_after`, a spare is made in the background.
    let mut seq = 0;
    while !dir.path().join(SPARE).exists() {
        seq = log.record(event(&format!("/a/{seq}"))).await.unwrap();
        assert!(seq < 100_000, "no spare was made");
        tokio::task::yield_now().await;
    }
    assert_eq!(
        std::fs::metadata(dir.path().join(SPARE)).unwrap().len(),
        sizes.segment
    );
    // Once the live segment runs out of zeros, the spare is the next segment.
    let before = segments(dir.path()).unwrap().len();
    while segments(dir.path()).unwrap().len() == before {
        seq = log.record(event(&format!("/a/{seq}"))).await.unwrap();
        assert!(seq < 100_000, "no next segment");
    }
    let live = segments(dir.path()).unwrap().pop().unwrap();
    let name = live.file_stem().unwrap().to_str().unwrap().parse::<u64>();
    assert_eq!(name.unwrap(), seq, "named after its first record");
    assert_eq!(std::fs::metadata(&live).unwrap().len(), sizes.segment);
    // The closed segments end with their last record: no zeros left in them.
    for closed in &segments(dir.path()).unwrap()[..before] {
        let bytes = std::fs::read(closed).unwrap();
        assert!(bytes.ends_with(b"\n") && !bytes.contains(&0));
    }
    let verified = log.verify().unwrap();
    assert!(verified.broken.is_none(), "{:?}", verified.broken);
    assert_eq!(verified.tip.seq, seq);
    // And a restart carries on in the live segment, over its zeros.
    drop(log);
    let log = AuditLog::open_sized(dir.path(), "s1", key(), sizes).unwrap();
    assert_eq!(log.record(event("/b")).await.unwrap(), seq + 1);
    assert!(log.verify().unwrap().broken.is_none());
    let all = log
        .read(&AuditFilter {
            limit: 10_000,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.len() as u64, seq + 1);
}

#[tokio::test]
async fn an_edited_record_is_found_by_verify() {
    let (dir, log) = chain_of(5).await;
    let segment = segments(dir.path()).unwrap().remove(0);
    let text = std::fs::read_to_string(&segment).unwrap();
    std::fs::write(&segment, text.replacen("/a/3", "/a/9", 1)).unwrap();
    let broken = log.verify().unwrap().broken.expect("the edit is found");
    assert_eq!(broken.seq, 4, "{broken}");
}

#[tokio::test]
async fn records_blanked_with_zeros_are_found_and_kept_aside_at_the_next_start() {
    let (dir, log) = chain_of(5).await;
    let segment = segments(dir.path()).unwrap().remove(0);
    let mut bytes = std::fs::read(&segment).unwrap();
    let start = bytes
        .split(|b| *b == b'\n')
        .take(2)
        .map(|l| l.len() + 1)
        .sum();
    let end = start + bytes[start..].iter().position(|b| *b == b'\n').unwrap();
    bytes[start..end].fill(0);
    std::fs::write(&segment, &bytes).unwrap();
    let broken = log
        .verify()
        .unwrap()
        .broken
        .expect("the blanked record is found");
    assert_eq!((broken.seq, broken.line), (3, 3), "{broken}");
    assert!(broken.reason.contains("blanked"), "{broken}");
    // A start keeps what follows the gap aside (not read as the chain, not lost).
    drop(log);
    let log = AuditLog::open(dir.path(), "s1", key()).unwrap();
    let kept: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("cut-"))
        .collect();
    assert_eq!(kept.len(), 1);
    let aside = std::fs::read_to_string(kept[0].path()).unwrap();
    assert!(aside.contains("/a/3") && aside.contains("/a/4"), "{aside}");
    assert_eq!(log.record(event("/b")).await.unwrap(), 3);
    assert!(log.verify().unwrap().broken.is_none());
}

#[tokio::test]
async fn a_half_written_record_is_cut_and_the_chain_goes_on_in_the_same_segment() {
    let (dir, log) = chain_of(3).await;
    drop(log);
    let segment = segments(dir.path()).unwrap().remove(0);
    let mut f = OpenOptions::new().append(true).open(&segment).unwrap();
    f.write_all(b"{\"seq\":4,\"server\":\"s1\",\"at_").unwrap();
    drop(f);
    let log = AuditLog::open(dir.path(), "s1", key()).unwrap();
    assert_eq!(log.record(event("/b")).await.unwrap(), 4);
    assert_eq!(
        segments(dir.path()).unwrap().len(),
        1,
        "no new segment per restart"
    );
    let verified = log.verify().unwrap();
    assert!(verified.broken.is_none(), "{:?}", verified.broken);
    assert_eq!(verified.tip.seq, 4);
    // Lines cut from the head of the first segment are found.
    let text = std::fs::read_to_string(&segment).unwrap();
    let rest: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&segment, rest).unwrap();
    assert!(log.verify().unwrap().broken.is_some());
}
