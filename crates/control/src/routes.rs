//! The route table proxies serve, derived from a snapshot: the routes of each service's current
//! release, and as targets its tasks that are running, healthy, and not leaving service.

use dozen_model::{
    discovery_prefix, DesiredState, RouteEntry, RouteTable, Target, TargetGroup, TaskState,
};

use crate::snapshot::Snapshot;

/// Keys whose change can change the route table (others, like proxy reports, cannot).
pub fn affects_routes(key: &str) -> bool {
    let Some(rest) = key.strip_prefix(dozen_model::keys::ROOT) else {
        return false;
    };
    rest.starts_with("services/") || rest.starts_with("releases/") || rest.starts_with("nodes/")
}

/// The rules of every service's current release, and a target group per service with a port.
pub fn table(snap: &Snapshot) -> RouteTable {
    let mut routes = Vec::new();
    let mut groups = Vec::new();
    for (name, service) in &snap.services {
        let Some(release) = snap.current_release(name) else {
            continue;
        };
        let stack = &service.record.stack;
        if !release.spec.port {
            // Rules that answer themselves (redirects, fixed responses) or forward to other
            // services need no port of their own.
            for r in release.spec.routes.iter().filter(|r| {
                !matches!(&r.action, dozen_spec::RouteAction::Forward { weights } if weights.is_empty())
            }) {
                routes.push(RouteEntry {
                    service: name.clone(),
                    stack: stack.clone(),
                    rule: r.clone(),
                    strip_prefix: false,
                });
            }
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
                stack: stack.clone(),
                rule: r.clone(),
                strip_prefix: false,
            });
        }
        routes.push(RouteEntry {
            service: name.clone(),
            stack: stack.clone(),
            rule: dozen_spec::Route {
                internal: true,
                ..dozen_spec::Route::prefix(&discovery_prefix(name))
            },
            strip_prefix: true,
        });
        groups.push(TargetGroup {
            name: name.clone(),
            balance: release.spec.balance.clone(),
            targets,
        });
    }
    RouteTable {
        revision: snap.revision,
        routes,
        groups,
    }
}
