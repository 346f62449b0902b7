//! The route table proxies serve, derived from a snapshot: the routes of each service's current
//! release, and as targets its tasks that are running, healthy, and not leaving service.

use dozen_model::{discovery_prefix, DesiredState, RouteEntry, Target, TaskState};

use crate::snapshot::Snapshot;

/// Keys whose change can change the route table (others, like proxy reports, cannot).
pub fn affects_routes(key: &str) -> bool {
    let Some(rest) = key.strip_prefix(dozen_model::keys::ROOT) else {
        return false;
    };
    rest.starts_with("services/") || rest.starts_with("releases/") || rest.starts_with("nodes/")
}

pub fn table(snap: &Snapshot) -> Vec<RouteEntry> {
    let mut routes = Vec::new();
    for name in snap.services.keys() {
        let Some(release) = snap.current_release(name) else {
            continue;
        };
        if !release.spec.port {
            continue;
        }
        // (rank, target): 0 healthy on an up node, 1 healthy on a down node, 2 running but
        // failing its checks. Traffic goes to the best rank present: a down node's tasks may
        // well still serve (its agent stalled, not its tasks) but nobody vouches for them; and
        // when every task fails its checks, the proxies send to all of them (fail open, as an
        // ALB does) rather than to none.
        let candidates: Vec<(u8, Target)> = snap
            .assignments
            .values()
            .map(|a| &a.record)
            .filter(|a| &a.service == name && a.desired == DesiredState::Run)
            .filter(|a| matches!(a.kind, dozen_model::TaskKind::Service))
            .filter_map(|a| {
                let status = &snap.statuses.get(&a.task)?.record;
                let node = &snap.nodes.get(&a.node)?.record;
                let running =
                    status.generation == a.generation && status.state == TaskState::Running;
                let port = status.host_port.filter(|_| running)?;
                let rank = match (status.healthy, snap.alive_nodes.contains(&node.name)) {
                    (true, true) => 0,
                    (true, false) => 1,
                    (false, _) => 2,
                };
                Some((
                    rank,
                    Target {
                        task: a.task.clone(),
                        addr: format!("{}:{}", node.host, port),
                    },
                ))
            })
            .collect();
        let best = candidates.iter().map(|(rank, _)| *rank).min();
        let mut targets: Vec<Target> = candidates
            .into_iter()
            .filter(|(rank, _)| Some(*rank) == best)
            .map(|(_, t)| t)
            .collect();
        targets.sort();
        for r in &release.spec.routes {
            routes.push(RouteEntry {
                service: name.clone(),
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                internal: r.internal,
                strip_prefix: false,
                targets: targets.clone(),
            });
        }
        routes.push(RouteEntry {
            service: name.clone(),
            host: None,
            path_prefix: discovery_prefix(name),
            internal: true,
            strip_prefix: true,
            targets,
        });
    }
    routes
}
