//! The audit trail's records and their hash chain. Each record carries the hash of the one
//! before it and its own hash over everything it says, so changing, removing or reordering
//! any record breaks the chain at that point, and [`verify`] names where. The writing (files,
//! fsync, group commit) is the shell's.

use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::{hex, Key};

/// The key a chain's hashes are made with (HMAC-SHA256, derived from the root key): without
/// it, records cannot be rewritten with hashes that verify.
pub struct ChainKey(hmac::Key);

impl ChainKey {
    pub fn new(root: &Key) -> ChainKey {
        ChainKey(hmac::Key::new(
            hmac::HMAC_SHA256,
            &root.derive("dozen audit chain v1").0,
        ))
    }
}

/// The `prev` of a chain's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A change as asked, before it is made: a change that cannot be put on the record is
    /// refused and not made. Its outcome follows in a record of its own.
    Asked,
    Ok,
    /// Refused for want of a permission.
    Denied,
    /// Allowed, but it did not happen (not found, bad input, a store error).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Asked => "asked",
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// What happened, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    /// Who: `root token`, `token ci`, `task web-1a2b (shop/web)`.
    pub who: String,
    /// From where: the client's address.
    pub from: String,
    /// `param.read`, `param.write`, `param.delete`, `param.label`, `key.rotate`, `key.import`,
    /// `key.rewrap`, `token.create`, `token.revoke`.
    pub action: String,
    /// What it was done to: a parameter (with its version), a key, a token's name.
    pub target: String,
    pub outcome: Outcome,
    /// Why it was refused or failed; never a value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One record of the trail as written: the event, its place in the chain, and the hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// The server that wrote it (each server keeps its own chain).
    pub server: String,
    #[serde(flatten)]
    pub event: Event,
    pub prev: String,
    pub hash: String,
}

impl Record {
    /// The record that follows a chain whose last record has `seq` and `hash` (or [`GENESIS`]
    /// and 0 for a new chain).
    pub fn chain(key: &ChainKey, server: &str, seq: u64, prev: &str, event: Event) -> Record {
        let mut record = Record {
            seq,
            server: server.to_string(),
            event,
            prev: prev.to_string(),
            hash: String::new(),
        };
        record.hash = record.expected_hash(key);
        record
    }

    /// Appends the line of the record that follows `prev` (as [`Record::chain`] makes it,
    /// byte for byte) to `out`, without copying `event`; answers its hash. The record is
    /// serialized once: its hash covers it with `hash` empty, the last field.
    pub fn append_line(
        key: &ChainKey,
        server: &str,
        seq: u64,
        prev: &str,
        event: &Event,
        out: &mut Vec<u8>,
    ) -> String {
        #[derive(Serialize)]
        struct Unhashed<'a> {
            seq: u64,
            server: &'a str,
            #[serde(flatten)]
            event: &'a Event,
            prev: &'a str,
            hash: &'a str,
        }
        let start = out.len();
        let unhashed = Unhashed {
            seq,
            server,
            event,
            prev,
            hash: "",
        };
        if serde_json::to_writer(&mut *out, &unhashed).is_err() || !out.ends_with(b"\"\"}") {
            // Not reached (the fields serialize, `hash` comes last); the slow way stays right.
            out.truncate(start);
            let record = Record::chain(key, server, seq, prev, event.clone());
            serde_json::to_writer(&mut *out, &record).unwrap_or_default();
            out.push(b'\n');
            return record.hash;
        }
        let hash = hex(hmac::sign(&key.0, &out[start..]).as_ref());
        out.truncate(out.len() - 2);
        out.extend_from_slice(hash.as_bytes());
        out.extend_from_slice(b"\"}\n");
        hash
    }

    /// The keyed hash over every field but `hash` itself.
    pub fn expected_hash(&self, key: &ChainKey) -> String {
        let mut unhashed = self.clone();
        unhashed.hash.clear();
        let bytes = serde_json::to_vec(&unhashed).unwrap_or_default();
        hex(hmac::sign(&key.0, &bytes).as_ref())
    }
}

/// Where a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the audit trail is altered at record {seq} (line {line}): {reason}")]
pub struct Broken {
    pub seq: u64,
    pub line: usize,
    pub reason: String,
}

/// The end of a chain that holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tip {
    pub records: u64,
    pub seq: u64,
    pub hash: String,
}

/// Follows a chain through `lines` (one JSON record each, in order), starting after `from`
/// (the tip of what came before, or the default for a chain's start).
pub fn verify<'a>(
    key: &ChainKey,
    lines: impl IntoIterator<Item = &'a str>,
    from: Tip,
) -> Result<Tip, Broken> {
    let mut tip = from;
    for (i, line) in lines.into_iter().enumerate() {
        let line_no = i + 1;
        let expected_seq = tip.seq + 1;
        let record: Record = serde_json::from_str(line).map_err(|e| Broken {
            seq: expected_seq,
            line: line_no,
            reason: format!("the record does not read ({e})"),
        })?;
        let prev = if tip.hash.is_empty() {
            GENESIS
        } else {
            &tip.hash
        };
        if record.seq != expected_seq {
            return Err(Broken {
                seq: expected_seq,
                line: line_no,
                reason: format!(
                    "found record {} where {expected_seq} belongs: records were removed or reordered",
                    record.seq
                ),
            });
        }
        if record.prev != prev {
            return Err(Broken {
                seq: record.seq,
                line: line_no,
                reason: "it does not follow the record before it (its `prev` differs)".into(),
            });
        }
        // The line exactly as written: nothing added, nothing reordered.
        if record.hash != record.expected_hash(key)
            || serde_json::to_string(&record).ok().as_deref() != Some(line)
        {
            return Err(Broken {
                seq: record.seq,
                line: line_no,
                reason: "its content does not match its hash".into(),
            });
        }
        tip = Tip {
            records: tip.records + 1,
            seq: record.seq,
            hash: record.hash,
        };
    }
    Ok(tip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> Event {
        Event {
            at_ms: 1000 + n,
            who: "token ci".into(),
            from: "127.0.0.1:5000".into(),
            action: "param.read".into(),
            target: format!("/a/b:{n}"),
            outcome: Outcome::Ok,
            detail: None,
        }
    }

    fn key() -> ChainKey {
        ChainKey::new(&Key::parse(&"33".repeat(32)).unwrap())
    }

    fn chain(n: u64) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let r = Record::chain(&key(), "s1", seq, &prev, event(seq));
                prev = r.hash.clone();
                serde_json::to_string(&r).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_line_appended_is_the_record_chain_makes() {
        let mut out = b"before\n".to_vec();
        let mut with_detail = event(2);
        with_detail.detail = Some("why \"quoted\" \u{e9}".into());
        let hash = Record::append_line(&key(), "s1", 2, GENESIS, &with_detail, &mut out);
        let record = Record::chain(&key(), "s1", 2, GENESIS, with_detail);
        assert_eq!(hash, record.hash);
        let line = format!("before\n{}\n", serde_json::to_string(&record).unwrap());
        assert_eq!(String::from_utf8(out).unwrap(), line);
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let lines = chain(5);
        let tip = verify(&key(), lines.iter().map(String::as_str), Tip::default()).unwrap();
        assert_eq!((tip.records, tip.seq), (5, 5));
        // And in two pieces, the second starting at the first's tip.
        let first = verify(
            &key(),
            lines[..2].iter().map(String::as_str),
            Tip::default(),
        )
        .unwrap();
        assert_eq!(
            verify(&key(), lines[2..].iter().map(String::as_str), first).unwrap(),
            tip
        );
    }

    #[test]
    fn any_change_removal_or_reordering_is_found() {
        let lines = chain(4);
        let check =
            |lines: &[String]| verify(&key(), lines.iter().map(String::as_str), Tip::default());
        let mut changed = lines.clone();
        changed[2] = changed[2].replace("token ci", "token cj");
        assert_eq!(check(&changed).unwrap_err().seq, 3);
        let mut removed = lines.clone();
        removed.remove(1);
        assert_eq!(check(&removed).unwrap_err().line, 2);
        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        assert!(check(&swapped).is_err());
        // A record rewritten with a fresh hash still breaks the next one's link; and without
        // the key, no hash that verifies can be made at all.
        let mut rehashed = lines.clone();
        let mut r: Record = serde_json::from_str(&rehashed[1]).unwrap();
        r.event.outcome = Outcome::Denied;
        r.hash = r.expected_hash(&key());
        rehashed[1] = serde_json::to_string(&r).unwrap();
        let broken = check(&rehashed).unwrap_err();
        assert_eq!(broken.seq, 3, "{broken}");
        let other = ChainKey::new(&Key::parse(&"44".repeat(32)).unwrap());
        let mut forged = lines.clone();
        let mut r: Record = serde_json::from_str(&forged[3]).unwrap();
        r.event.who = "someone else".into();
        r.hash = r.expected_hash(&other);
        forged[3] = serde_json::to_string(&r).unwrap();
        assert_eq!(check(&forged).unwrap_err().seq, 4);
        // A field added to a line.
        let mut added = lines.clone();
        added[0] = added[0].replacen('{', "{\"extra\":1,", 1);
        assert_eq!(check(&added).unwrap_err().seq, 1);
        let mut garbage = lines;
        garbage[3] = "{not json".into();
        assert!(check(&garbage)
            .unwrap_err()
            .reason
            .contains("does not read"));
    }
}
