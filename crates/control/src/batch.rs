//! Writes bigger than one transaction of the backend (etcd takes 128 compares and 128
//! operations per branch): committed whole where they fit, else in parts, in order.
//!
//! What stays atomic when a write is split is each part: a part holds one record's change
//! with its own compares (one service of a stack, one task's status), so a reader never sees
//! half of one record's change. A split write that stops half-way (a conflict, a crash) leaves
//! the parts before it committed; every caller writes its parts so that running it again
//! converges (`apply`, `down` and status reports all read, compare and write again).

use dozen_store::{Op, Revision, Store, StoreError, Txn};

use crate::Result;

/// Commits `parts` as one transaction when the store takes that many operations, else part by
/// part in order (a part without compares, such as deletes that may happen any time, is cut
/// to size). `None` when a part's compares failed: the parts before it are committed, the
/// caller reads again and retries.
pub(crate) async fn commit(store: &dyn Store, parts: Vec<Txn>) -> Result<Option<Revision>> {
    let limit = store.max_txn_ops();
    let merged = merge(&parts);
    if fits(&merged, limit) {
        let resp = store.txn(merged).await?;
        return Ok(resp.succeeded.then_some(resp.revision));
    }
    let mut revision = None;
    for part in parts {
        for piece in cut(part, limit)? {
            let resp = store.txn(piece).await?;
            if !resp.succeeded {
                return Ok(None);
            }
            revision = Some(resp.revision);
        }
    }
    Ok(revision.or(Some(store.revision().await?)))
}

fn fits(txn: &Txn, limit: usize) -> bool {
    txn.compares.len() <= limit && txn.success.len() <= limit && txn.failure.len() <= limit
}

fn merge(parts: &[Txn]) -> Txn {
    let mut all = Txn::new();
    for part in parts {
        all.compares.extend(part.compares.iter().cloned());
        all.success.extend(part.success.iter().cloned());
        all.failure.extend(part.failure.iter().cloned());
    }
    all
}

/// `part` in pieces the store takes: only a part without compares (or failure branch) can be
/// cut, since cutting one with compares would commit some of its writes without them.
fn cut(part: Txn, limit: usize) -> Result<Vec<Txn>> {
    if fits(&part, limit) {
        return Ok(vec![part]);
    }
    if !part.compares.is_empty() || !part.failure.is_empty() {
        return Err(StoreError::TooManyOps {
            ops: part.compares.len().max(part.success.len()),
            limit,
        }
        .into());
    }
    let ops: Vec<Op> = part.success;
    Ok(ops
        .chunks(limit.max(1))
        .map(|chunk| Txn {
            compares: Vec::new(),
            success: chunk.to_vec(),
            failure: Vec::new(),
        })
        .collect())
}
