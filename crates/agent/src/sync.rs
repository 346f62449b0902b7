//! Keeping the node in step with the control plane: registration and heartbeats, status
//! reports in batches, list-then-watch of the node's assignments (one runner per task), the
//! re-adoption of tasks already running when the agent starts, and the removal of old task
//! directories.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dozen_api::lease::{heartbeat_interval, Registration};
use dozen_api::{RegisterRequest, RegisterResponse, StatusReport, WatchEvent, WatchEventType};
use dozen_model::{Assignment, NodeRecord, NodeResources, TaskStatus, SCHEMA};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::driver::{ExitInfo, Recovered};
use crate::runner::Runner;
use crate::{shim, Shared, TaskRecord, KEEP_REMOVED, REMOVED_MARKER, TASK_RECORD};

pub(crate) async fn adopt_existing(shared: &Arc<Shared>) {
    // No tasks dir: nothing to adopt, but strays (of a data dir wiped) are still removed.
    let entries = std::fs::read_dir(shared.tasks_dir()).into_iter().flatten();
    let mut adopted = 0;
    let mut kept = Vec::new();
    let mut kept_tasks: Vec<String> = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir.join(REMOVED_MARKER).exists() {
            continue;
        }
        let Some(record) = std::fs::read(dir.join(TASK_RECORD))
            .ok()
            .and_then(|b| serde_json::from_slice::<TaskRecord>(&b).ok())
        else {
            continue;
        };
        if let Some(port) = record.port {
            shared.ports.reserve(port);
        }
        // Each task through its own driver, with the handle that driver gave.
        let recovered = match shared.drivers.get(record.driver()) {
            Some(driver) => driver.recover(&dir, record.handle.as_ref()).await,
            None => Recovered::Exited(ExitInfo {
                code: None,
                signal: None,
                started_at_ms: None,
                finished_at_ms: shim::wall_ms(),
                error: Some(format!(
                    "the `{}` driver that ran this task is not available on this node now",
                    record.driver()
                )),
                oom_killed: false,
            }),
        };
        if let Recovered::Running(handle) = &recovered {
            adopted += 1;
            kept.push(handle.clone());
            kept_tasks.push(record.assignment.task.clone());
        }
        spawn_runner(shared, record, recovered);
    }
    if adopted > 0 {
        tracing::info!(adopted, "re-attached to running tasks");
    }
    let node = &shared.config.node_name;
    let strays = shared.drivers.forget_strays(node, &kept).await;
    crate::secrets::forget_strays(&shared.config.data_dir, &kept_tasks);
    if strays > 0 {
        tracing::info!(strays, "removed what no task of this node kept");
    }
}

/// This node's registration: its record (resources, drivers, address) under a lease.
pub(crate) fn registration(shared: &Arc<Shared>, address: &str) -> Registration {
    let (shared, address) = (shared.clone(), address.to_string());
    let (client, name) = (shared.client.clone(), shared.config.node_name.clone());
    Registration {
        what: "node",
        register: Box::new(move || {
            // Made anew for each registration: when it registered, and the drivers it has now.
            let node = node_record(&shared, &address);
            let (client, name) = (shared.client.clone(), shared.config.node_name.clone());
            Box::pin(async move { client.register_node(&name, &RegisterRequest { node }).await })
        }),
        heartbeat: Box::new(move |lease| {
            let (client, name) = (client.clone(), name.clone());
            Box::pin(async move { client.node_heartbeat(&name, lease).await })
        }),
    }
}

/// This node as it registers: its resources, drivers and address.
fn node_record(shared: &Shared, address: &str) -> NodeRecord {
    NodeRecord {
        schema: SCHEMA,
        name: shared.config.node_name.clone(),
        address: address.to_string(),
        host: shared.config.host.clone(),
        resources: NodeResources {
            cpu_millis: shared.config.cpu_millis,
            memory_bytes: shared.config.memory_bytes,
        },
        labels: shared.config.labels.clone(),
        drivers: shared.drivers.available(),
        agent_instance: shared.instance.clone(),
        registered_at_ms: shim::wall_ms(),
        registered_via: String::new(),
    }
}

pub(crate) async fn heartbeat_loop(
    shared: Arc<Shared>,
    address: String,
    mut held: RegisterResponse,
) {
    let registration = registration(&shared, &address);
    // What the node said it can run when it registered: a driver that comes or goes (an
    // engine stopped, or back) is registered again, so placement follows it.
    let mut registered = shared.drivers.available();
    let mut refreshed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(heartbeat_interval(&held)).await;
        registration.heartbeat(&mut held).await;
        if refreshed.elapsed() >= DRIVERS_REFRESH {
            refreshed = tokio::time::Instant::now();
            shared.drivers.refresh().await;
            let now = shared.drivers.available();
            if now != registered {
                tracing::info!(before = ?registered, now = ?now, "the node's drivers changed; registering again");
                held = registration.register().await;
                registered = now;
            }
        }
    }
}

/// How often the drivers look again whether they can run tasks here.
const DRIVERS_REFRESH: Duration = Duration::from_secs(5);

/// Sends status changes in batches, with the events seen since; keeps the newest status per
/// task, and the events, until the server has them.
pub(crate) async fn report_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<TaskStatus>,
    mut events_rx: mpsc::Receiver<dozen_model::Event>,
) {
    let mut pending: BTreeMap<String, TaskStatus> = BTreeMap::new();
    let mut events: Vec<dozen_model::Event> = Vec::new();
    loop {
        if pending.is_empty() && events.is_empty() {
            tokio::select! {
                status = rx.recv() => match status {
                    Some(s) => {
                        pending.insert(s.task.clone(), s);
                    }
                    None => return,
                },
                Some(event) = events_rx.recv() => events.push(event),
            }
        }
        // Gather what arrives together into one request.
        tokio::time::sleep(Duration::from_millis(5)).await;
        while let Ok(s) = rx.try_recv() {
            pending.insert(s.task.clone(), s);
        }
        while events.len() < crate::EVENTS_BUFFERED {
            match events_rx.try_recv() {
                Ok(event) => events.push(event),
                Err(_) => break,
            }
        }
        let report = StatusReport {
            statuses: pending.values().cloned().collect(),
            events: events.clone(),
        };
        match shared
            .client
            .report_status(&shared.config.node_name, &report)
            .await
        {
            Ok(()) => {
                pending.clear();
                events.clear();
            }
            Err(e) => {
                tracing::warn!(error = %e, pending = pending.len(), events = events.len(), "status report failed; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

/// List, then watch from the list's revision; on 410 list again. Runs forever.
pub(crate) async fn follow_assignments(shared: Arc<Shared>) {
    let node = shared.config.node_name.clone();
    let mut revision: Option<u64> = None;
    loop {
        let rev = match revision {
            Some(r) => r,
            None => match shared.client.list_assignments(&node).await {
                Ok(list) => {
                    sync_all(&shared, list.items);
                    list.revision
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list assignments; retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            },
        };
        revision = Some(rev);
        let stream = shared.client.watch_assignments(&node, rev).await;
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) if e.status() == Some(410) => {
                revision = None;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "assignment watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        // Bookmarks come every few seconds: silence longer than this is a dead connection.
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_secs(20), stream.next()).await
        {
            let event: WatchEvent<Assignment> = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "assignment watch broke; resuming");
                    break;
                }
            };
            revision = Some(event.revision);
            match event.kind {
                WatchEventType::Put => {
                    if let Some(a) = event.object {
                        update_runner(&shared, a);
                    }
                }
                WatchEventType::Delete => {
                    if let Some(task) = event.key.rsplit('/').next() {
                        remove_runner(&shared, task);
                    }
                }
                WatchEventType::Bookmark => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn sync_all(shared: &Arc<Shared>, items: Vec<Assignment>) {
    let wanted: std::collections::HashSet<String> = items.iter().map(|a| a.task.clone()).collect();
    let existing: Vec<String> = shared
        .runners
        .lock()
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default();
    for task in existing.iter().filter(|t| !wanted.contains(*t)) {
        remove_runner(shared, task);
    }
    for a in items {
        update_runner(shared, a);
    }
}

pub(crate) fn update_runner(shared: &Arc<Shared>, assignment: Assignment) {
    if assignment.node != shared.config.node_name {
        return;
    }
    {
        let runners = shared.runners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = runners.get(&assignment.task) {
            tx.send_if_modified(|cur| {
                // Never go back to an older generation (a stale event after a resync).
                let newer = cur.as_ref().is_none_or(|c| {
                    c.generation < assignment.generation
                        || (c.generation == assignment.generation && *c != assignment)
                });
                if newer {
                    *cur = Some(assignment.clone());
                }
                newer
            });
            return;
        }
    }
    let record = TaskRecord {
        assignment,
        port: None,
        handle: None,
    };
    spawn_runner(shared, record, Recovered::Nothing);
}

pub(crate) fn remove_runner(shared: &Arc<Shared>, task: &str) {
    let runners = shared.runners.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(tx) = runners.get(task) {
        let _ = tx.send(None);
    }
}

pub(crate) fn spawn_runner(shared: &Arc<Shared>, record: TaskRecord, recovered: Recovered) {
    let (tx, rx) = watch::channel(Some(record.assignment.clone()));
    shared
        .runners
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(record.assignment.task.clone(), tx);
    let runner = Runner::new(shared.clone(), record, recovered, rx);
    tokio::spawn(runner.run());
}

pub(crate) async fn gc_loop(shared: Arc<Shared>) {
    loop {
        // Bundles no task of this node runs any more (after an hour, so one a new task is
        // about to use is not taken from under it).
        let in_use: std::collections::HashSet<String> = shared
            .runners
            .lock()
            .map(|runners| {
                runners
                    .values()
                    .filter_map(|tx| tx.borrow().as_ref()?.artifact_digest.clone())
                    .collect()
            })
            .unwrap_or_default();
        let removed =
            crate::artifacts::collect(&shared.config.data_dir, &in_use, Duration::from_secs(3600));
        if !removed.is_empty() {
            tracing::info!(
                count = removed.len(),
                "removed unpacked artifacts no task uses"
            );
        }
        if let Ok(entries) = std::fs::read_dir(shared.tasks_dir()) {
            for entry in entries.flatten() {
                if crate::os::older_than(&entry.path().join(REMOVED_MARKER), KEEP_REMOVED) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
}
