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
        // (on a node that is up, target)
        let candidates: Vec<(bool, Target)> = snap
            .assignments
            .values()
            .map(|a| &a.record)
            .filter(|a| &a.service == name && a.desired == DesiredState::Run)
            .filter(|a| matches!(a.kind, dozen_model::TaskKind::Service))
            .filter_map(|a| {
                let status = &snap.statuses.get(&a.task)?.record;
                let node = &snap.nodes.get(&a.node)?.record;
                let serving = status.generation == a.generation
                    && status.state == TaskState::Running
                    && status.healthy;
                let port = status.host_port.filter(|_| serving)?;
                Some((
                    snap.alive_nodes.contains(&node.name),
                    Target {
                        task: a.task.clone(),
                        addr: format!("{}:{}", node.host, port),
                    },
                ))
            })
            .collect();
        // A down node's tasks may well still serve (its agent stalled, not its tasks), but
        // nobody vouches for them: they get traffic only while no task on an up node can.
        let any_up = candidates.iter().any(|(up, _)| *up);
        let mut targets: Vec<Target> = candidates
            .into_iter()
            .filter(|(up, _)| *up || !any_up)
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
