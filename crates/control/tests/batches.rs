//! Writes bigger than one etcd transaction (128 compares and operations per branch): an
//! agent's status report for 200 tasks, `apply` and `down` of a 60-service stack. On the
//! embedded store, and on a real 3-member etcd cluster with `--features etcd` (fails in CI
//! without etcd, skips elsewhere, saying so).

use std::sync::Arc;

use dozen_control::snapshot::Snapshot;
use dozen_control::{desired, nodes};
use dozen_model::{keys, TaskState, TaskStatus, SCHEMA};
use dozen_store::embedded::EmbeddedStore;
use dozen_store::Store;

async fn a_report_of_200_statuses_is_recorded(store: Arc<dyn Store>) {
    let node = "n1";
    let statuses: Vec<TaskStatus> = (0..200)
        .map(|i| TaskStatus {
            schema: SCHEMA,
            task: format!("t{i:03}"),
            node: node.into(),
            generation: 1,
            state: TaskState::Running,
            healthy: true,
            pid: Some(1000 + i),
            host_port: None,
            exit_code: None,
            signal: None,
            started_at_ms: Some(1),
            finished_at_ms: None,
            message: None,
            agent_instance: "a1".into(),
            adopted: true,
            unhealthy_since_ms: None,
            log_lines_dropped: 0,
        })
        .collect();
    for status in &statuses {
        store
            .put(&keys::assignment(node, &status.task), b"{}".to_vec())
            .await
            .unwrap();
    }
    nodes::report_status(store.as_ref(), node, &statuses)
        .await
        .expect("a report of 200 statuses is recorded");
    let recorded = store.range(&keys::statuses(node)).await.unwrap().kvs;
    assert_eq!(recorded.len(), 200);
}

async fn a_stack_of_60_services_applies_and_goes_down(store: Arc<dyn Store>) {
    let mut toml = String::from("name = \"big\"\n");
    for i in 0..60 {
        toml.push_str(&format!(
            "[services.s{i:02}]\ncommand = \"sleep 1000\"\nport = false\nreplicas = 2\n"
        ));
    }
    let stack = dozen_spec::parse_str(&toml, "dozen.toml", dozen_spec::Format::Toml, None)
        .unwrap_or_else(|e| panic!("{e}"));
    let outcome = desired::apply(
        store.as_ref(),
        &stack,
        &Default::default(),
        &Default::default(),
    )
    .await
    .expect("a 60-service stack applies");
    assert_eq!(outcome.releases.len(), 60);
    let snap = Snapshot::read(store.as_ref()).await.unwrap();
    assert_eq!(snap.services.len(), 60);
    assert_eq!(snap.scales.len(), 60);
    assert!(snap.stacks.contains_key("big"));
    // Applying the same file again changes nothing.
    let again = desired::apply(
        store.as_ref(),
        &stack,
        &Default::default(),
        &Default::default(),
    )
    .await
    .unwrap();
    assert!(again.releases.is_empty());

    let removed = desired::down(store.as_ref(), "big").await.expect("down");
    assert_eq!(removed.len(), 60);
    let snap = Snapshot::read(store.as_ref()).await.unwrap();
    assert!(snap.services.is_empty() && snap.stacks.is_empty() && snap.releases.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_the_embedded_store() {
    for check in [0, 1] {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        match check {
            0 => a_report_of_200_statuses_is_recorded(store).await,
            _ => a_stack_of_60_services_applies_and_goes_down(store).await,
        }
    }
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_etcd() {
    let Some(cluster) = dozen_testkit::EtcdCluster::start() else {
        return;
    };
    let connect = || async {
        dozen_testkit::eventually_async(
            std::time::Duration::from_secs(30),
            "etcd comes up",
            || async {
                let store = dozen_store::etcd::EtcdStore::connect(&cluster.endpoints)
                    .await
                    .ok()?;
                store.revision().await.ok()?;
                Some(Arc::new(store) as Arc<dyn Store>)
            },
        )
        .await
    };
    a_report_of_200_statuses_is_recorded(connect().await).await;
    a_stack_of_60_services_applies_and_goes_down(connect().await).await;
}
