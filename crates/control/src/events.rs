//! Writing, listing and trimming events (see `dozen_model::Event`). Every writer (the
//! controller, the API servers for operators, the agents through their status reports) goes
//! through [`record`]; retention is enforced there, so the count stays bounded however fast
//! events come.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};

use dozen_model::{decode, keys, Event};
use dozen_store::{Op, Revision, Store, Txn};

use crate::Result;

/// Most events kept per subject (a service, `_nodes`, `_cluster`): the oldest go first.
pub const KEEP_PER_SUBJECT: usize = 200;
/// Events older than this go, whatever their number.
pub const KEEP_FOR_MS: u64 = 24 * 3600 * 1000;
/// Most events one report or request may carry.
pub const MAX_BATCH: usize = 256;
/// A subject is trimmed once it holds this many more than it keeps: one read per few writes.
const TRIM_SLACK: usize = 20;

/// Writes `events` (at most [`MAX_BATCH`]) and trims the subjects they grew.
pub async fn record(store: &dyn Store, events: &[Event]) -> Result<()> {
    let events = &events[..events.len().min(MAX_BATCH)];
    let mut subjects = BTreeSet::new();
    for chunk in events.chunks(store.max_txn_ops().max(1)) {
        let mut txn = Txn::new();
        for event in chunk {
            let subject = event.subject();
            let key = keys::event(&subject, event.at_ms, &random_id());
            txn = txn.then(Op::put(key, serde_json::to_vec(event).unwrap_or_default()));
            subjects.insert(subject);
        }
        store.txn(txn).await?;
    }
    for subject in subjects {
        trim(store, &subject, crate::wall_ms(), TRIM_SLACK).await?;
    }
    Ok(())
}

/// Records what an agent reports about its node's tasks, and nothing else: only the kinds an
/// agent sees, only about tasks assigned to `node` (the service taken from the assignment),
/// stamped as seen by that agent, at a time no later than now and no older than the
/// retention. A node cannot write about another node's tasks, another service, or the
/// cluster. Returns how many were kept.
pub async fn record_from_agent(
    store: &dyn Store,
    node: &str,
    events: Vec<Event>,
    now_ms: u64,
) -> Result<usize> {
    use dozen_model::EventKind as K;
    let assigned: std::collections::BTreeMap<String, String> = store
        .range(&keys::assignments(node))
        .await?
        .kvs
        .iter()
        .filter_map(|kv| decode::<dozen_model::Assignment>(&kv.key, &kv.value).ok())
        .map(|a| (a.task, a.service))
        .collect();
    let by = format!("agent {node}");
    let kept: Vec<Event> = events
        .into_iter()
        .take(MAX_BATCH)
        .filter(|e| {
            matches!(
                e.kind,
                K::Started { .. }
                    | K::StartFailed { .. }
                    | K::HealthCheckFailed { .. }
                    | K::OutOfRouting { .. }
                    | K::BackInRouting
                    | K::Stopped { .. }
                    | K::Exited { .. }
                    | K::Restarting { .. }
            )
        })
        .filter_map(|e| {
            let service = assigned.get(e.task.as_deref()?)?.clone();
            Some(Event {
                service: Some(service),
                node: Some(node.to_string()),
                by: by.clone(),
                at_ms: e.at_ms.clamp(now_ms.saturating_sub(KEEP_FOR_MS), now_ms),
                ..e
            })
        })
        .collect();
    record(store, &kept).await?;
    Ok(kept.len())
}

/// Removes a subject's events past [`KEEP_PER_SUBJECT`] (when more than `slack` over) or
/// older than [`KEEP_FOR_MS`]; returns how many went.
pub async fn trim(store: &dyn Store, subject: &str, now_ms: u64, slack: usize) -> Result<usize> {
    let range = store.range(&keys::events(subject)).await?;
    let count = range.kvs.len();
    let too_many = if count > KEEP_PER_SUBJECT + slack {
        count - KEEP_PER_SUBJECT
    } else {
        0
    };
    let oldest_kept = now_ms.saturating_sub(KEEP_FOR_MS);
    // Keys sort by time: the first ones are the oldest.
    let doomed: Vec<String> = range
        .kvs
        .iter()
        .enumerate()
        .filter(|(i, kv)| *i < too_many || at_ms_of(&kv.key).is_some_and(|at| at < oldest_kept))
        .map(|(_, kv)| kv.key.clone())
        .collect();
    for chunk in doomed.chunks(store.max_txn_ops().max(1)) {
        let txn = chunk
            .iter()
            .fold(Txn::new(), |txn, key| txn.then(Op::delete(key)));
        store.txn(txn).await?;
    }
    Ok(doomed.len())
}

/// Trims every subject (the leader does this now and then, for subjects nobody writes to).
pub async fn trim_all(store: &dyn Store, now_ms: u64) -> Result<usize> {
    let range = store.range(keys::EVENTS).await?;
    let subjects: BTreeSet<String> = range
        .kvs
        .iter()
        .filter_map(|kv| {
            kv.key[keys::EVENTS.len()..]
                .split('/')
                .next()
                .map(String::from)
        })
        .collect();
    let mut removed = 0;
    for subject in subjects {
        removed += trim(store, &subject, now_ms, 0).await?;
    }
    Ok(removed)
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub service: Option<String>,
    pub task: Option<String>,
    pub since_ms: Option<u64>,
}

impl Filter {
    pub fn prefix(&self) -> String {
        match &self.service {
            Some(service) => keys::events(service),
            None => keys::EVENTS.to_string(),
        }
    }
    pub fn matches(&self, event: &Event) -> bool {
        self.service
            .as_ref()
            .is_none_or(|s| event.service.as_ref() == Some(s))
            && self
                .task
                .as_ref()
                .is_none_or(|t| event.task.as_ref() == Some(t))
            && self.since_ms.is_none_or(|since| event.at_ms >= since)
    }
}

/// The events that match, oldest first, and the revision they were read at (to watch from).
pub async fn list(store: &dyn Store, filter: &Filter) -> Result<(Vec<Event>, Revision)> {
    let range = store.range(&filter.prefix()).await?;
    let mut events: Vec<Event> = range
        .kvs
        .iter()
        .filter_map(|kv| decode::<Event>(&kv.key, &kv.value).ok())
        .filter(|e| filter.matches(e))
        .collect();
    events.sort_by_key(|e| e.at_ms);
    Ok((events, range.revision))
}

/// Why each of `tasks` (of `service`) is not running as asked, by task: its newest problem,
/// unless it recovered since.
pub async fn task_reasons(
    store: &dyn Store,
    service: &str,
    tasks: &[String],
) -> Result<std::collections::BTreeMap<String, Event>> {
    let (events, _) = list(
        store,
        &Filter {
            service: Some(service.to_string()),
            ..Filter::default()
        },
    )
    .await?;
    let mut latest = std::collections::BTreeMap::new();
    for event in events {
        let Some(task) = event.task.clone() else {
            continue;
        };
        // What follows a problem (a restart, a stop) only repeats it; back in routing ends it.
        let explains = event.kind.is_problem()
            && !matches!(event.kind, dozen_model::EventKind::Restarting { .. });
        if tasks.contains(&task)
            && (explains || event.kind == dozen_model::EventKind::BackInRouting)
        {
            latest.insert(task, event);
        }
    }
    latest.retain(|_, e: &mut Event| e.kind.is_problem());
    Ok(latest)
}

fn at_ms_of(key: &str) -> Option<u64> {
    key.rsplit('/').next()?.split('-').next()?.parse().ok()
}

/// A sequence number of this process, then 8 random hex digits: a writer's events of the same
/// millisecond keep their order (keys sort as written), and two writers never collide.
fn random_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(seq);
    format!("{seq:012x}{:08x}", hasher.finish() as u32)
}
