//! What the cluster is made of: `dozen nodes`, `dozen proxies`, `dozen cluster`.

use dozen_api::NodeInfo;

use crate::commands::client;
use crate::output::{self, age, table};
use crate::Global;

pub async fn proxies(global: &Global) -> anyhow::Result<i32> {
    let api = client(global)?;
    let list: dozen_api::ListResponse<dozen_api::ProxyInfo> = api.proxies().await?;
    output::listing(global.output, &list, || {
        let rows: Vec<Vec<String>> = list
            .items
            .iter()
            .map(|p| {
                vec![
                    p.record.id.clone(),
                    p.record.public_address.clone(),
                    p.record.internal_address.clone(),
                    p.record.applied_revision.to_string(),
                    if p.current { "yes" } else { "catching up" }.to_string(),
                ]
            })
            .collect();
        table(
            &[
                "PROXY",
                "PUBLIC",
                "INTERNAL",
                "ROUTES AT REVISION",
                "CURRENT",
            ],
            &rows,
        );
        println!("\nstore revision now: {}", list.revision);
    });
    Ok(0)
}

pub async fn nodes(global: &Global) -> anyhow::Result<i32> {
    let api = client(global)?;
    let nodes: Vec<NodeInfo> = api.nodes().await?;
    output::listing(global.output, &nodes, || {
        let rows: Vec<Vec<String>> = nodes
            .iter()
            .map(|n| {
                vec![
                    n.node.name.clone(),
                    match n.state {
                        dozen_api::NodeState::Up => "up".into(),
                        dozen_api::NodeState::Down => "down".into(),
                    },
                    n.node.address.clone(),
                    format!("{}m", n.node.resources.cpu_millis),
                    format!("{} MiB", n.node.resources.memory_bytes / (1024 * 1024)),
                    n.tasks.to_string(),
                    n.node.drivers.join(","),
                    if n.node.labels.is_empty() {
                        "-".into()
                    } else {
                        let labels: Vec<String> = n
                            .node
                            .labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect();
                        labels.join(",")
                    },
                    age(Some(n.node.registered_at_ms)),
                ]
            })
            .collect();
        table(
            &[
                "NODE",
                "STATE",
                "AGENT",
                "CPU",
                "MEMORY",
                "TASKS",
                "DRIVERS",
                "LABELS",
                "REGISTERED",
            ],
            &rows,
        );
    });
    Ok(0)
}

pub async fn cluster(global: &Global) -> anyhow::Result<i32> {
    let api = client(global)?;
    let info: dozen_api::ClusterInfo = api.cluster().await?;
    output::listing(global.output, &info, || {
        println!("server: {} ({})", info.server, api.base());
        match &info.leader {
            Some(l) if *l == info.server => println!("leader: {l} (this server)"),
            Some(l) => println!("leader: {l}"),
            None => println!("leader: none (an election is under way)"),
        }
        println!("store:  {}", info.store);
    });
    Ok(0)
}
