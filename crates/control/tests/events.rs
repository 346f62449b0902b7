//! Events: written through one function, listed by service and task, kept within their bound
//! (count per subject and age) however fast they come.

use dozen_control::events::{self, Filter, KEEP_PER_SUBJECT};
use dozen_model::{keys, Event, EventKind};
use dozen_store::embedded::EmbeddedStore;
use dozen_store::Store;

fn exited(at_ms: u64, task: &str) -> Event {
    Event::new(
        at_ms,
        "agent n1",
        EventKind::Exited {
            code: Some(1),
            signal: None,
            oom: false,
            last_line: None,
        },
    )
    .service("web")
    .task(task)
    .node("n1")
}

#[tokio::test]
async fn a_crash_loop_keeps_a_bounded_count_and_old_events_go() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let now = dozen_control::wall_ms();
    // A day and a half ago: past the age limit.
    let old = exited(now - 36 * 3600 * 1000, "web-0");
    events::record(&store, &[old]).await.unwrap();
    // A crash loop: a thousand exits, in reports of three.
    for i in 0..1000u64 {
        let batch: Vec<Event> = (0..3)
            .map(|j| exited(now + i * 3 + j, &format!("web-{}", 1 + (i + j) % 2)))
            .collect();
        events::record(&store, &batch).await.unwrap();
    }
    let kept = store.range(&keys::events("web")).await.unwrap().kvs.len();
    assert!(
        (KEEP_PER_SUBJECT..=KEEP_PER_SUBJECT + 20).contains(&kept),
        "{kept} events kept"
    );
    let (listed, _) = events::list(&store, &Filter::default()).await.unwrap();
    assert!(listed.iter().all(|e| e.at_ms >= now), "the old one went");
    assert!(
        listed.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "oldest first"
    );
    assert_eq!(listed.last().unwrap().at_ms, now + 2999, "the newest stay");

    let (one, _) = events::list(
        &store,
        &Filter {
            service: Some("web".into()),
            task: Some("web-1".into()),
            since_ms: Some(now + 2900),
        },
    )
    .await
    .unwrap();
    assert!(!one.is_empty());
    assert!(one
        .iter()
        .all(|e| e.task.as_deref() == Some("web-1") && e.at_ms >= now + 2900));
    // Events live outside the records the controllers read.
    let records = store.range(keys::ROOT).await.unwrap().kvs.len();
    assert_eq!(records, 0);
}

/// Subjects nobody writes to any more are trimmed by `trim_all` (the leader runs it now and
/// then): their events past the age limit go.
#[tokio::test]
async fn trim_all_ages_out_every_subject() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let now = dozen_control::wall_ms();
    let day_and_a_half = 36 * 3600 * 1000;
    for (at, service) in [(now - day_and_a_half, "old"), (now, "new")] {
        let event = exited(at, "t").service(service);
        let key = keys::event(service, at, "x");
        store
            .put(&key, serde_json::to_vec(&event).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(events::trim_all(&store, now).await.unwrap(), 1);
    let (left, _) = events::list(&store, &Filter::default()).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].service.as_deref(), Some("new"));
}

/// A node records events only about its own tasks, as its agent, now: nothing about another
/// node's task, another service, the cluster, or the future.
#[tokio::test]
async fn an_agent_records_events_about_its_own_tasks_only() {
    use dozen_model::{Assignment, DesiredState, TaskKind, SCHEMA};
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let assign = |task: &str, node: &str| Assignment {
        schema: SCHEMA,
        task: task.into(),
        service: "web".into(),
        stack: "shop".into(),
        node: node.into(),
        release: 1,
        generation: 1,
        desired: DesiredState::Run,
        kind: TaskKind::Service,
        start_delay_ms: 0,
        restarts: 0,
        restart_generation: 0,
        spec: dozen_spec::Service::default(),
        artifact_digest: None,
        image_pin: None,
        secrets: Default::default(),
        created_at_ms: 0,
        drain_since_ms: None,
    };
    for (task, node) in [("web-1", "n1"), ("web-2", "n2")] {
        let a = assign(task, node);
        store
            .put(
                &keys::assignment(node, task),
                serde_json::to_vec(&a).unwrap(),
            )
            .await
            .unwrap();
    }
    let now = dozen_control::wall_ms();
    let reported = vec![
        // Its own task, claiming another service and a time far in the future.
        exited(now + 10_000_000_000, "web-1")
            .service("payments")
            .node("n2"),
        // Another node's task.
        exited(now, "web-2"),
        // A task that does not exist.
        exited(now, "web-9"),
        // A kind only the controller decides.
        Event::new(
            now,
            "agent n1",
            EventKind::LeaderChanged {
                server: "me".into(),
            },
        ),
    ];
    let kept = events::record_from_agent(&store, "n1", reported, now)
        .await
        .unwrap();
    assert_eq!(kept, 1);
    let (listed, _) = events::list(&store, &Filter::default()).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let e = &listed[0];
    assert_eq!(
        (e.service.as_deref(), e.task.as_deref(), e.node.as_deref()),
        (Some("web"), Some("web-1"), Some("n1"))
    );
    assert_eq!((e.by.as_str(), e.at_ms), ("agent n1", now));
}
