//! One consistent read of the keyspace, decoded.

use std::collections::BTreeMap;

use dozen_model::{
    decode, keys, Assignment, NodeRecord, ProxyRecord, Release, ScaleRecord, ServiceRecord,
    StackRecord, TaskStatus,
};
use dozen_store::{Revision, Store};

use crate::Result;

/// A record together with the revision it was last written at (for compare-and-swap).
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub record: T,
    pub mod_revision: Revision,
}

#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub revision: Revision,
    pub stacks: BTreeMap<String, Versioned<StackRecord>>,
    pub services: BTreeMap<String, Versioned<ServiceRecord>>,
    pub scales: BTreeMap<String, Versioned<ScaleRecord>>,
    /// service -> release number -> release
    pub releases: BTreeMap<String, BTreeMap<u64, Release>>,
    /// Every node that registered (up or down).
    pub nodes: BTreeMap<String, Versioned<NodeRecord>>,
    /// Nodes whose heartbeats arrive (their leased `alive` key exists); the others are down.
    pub alive_nodes: std::collections::BTreeSet<String>,
    /// task -> assignment
    pub assignments: BTreeMap<String, Versioned<Assignment>>,
    /// task -> status
    pub statuses: BTreeMap<String, Versioned<TaskStatus>>,
    /// proxy id -> proxy (leased: only live proxies are here)
    pub proxies: BTreeMap<String, Versioned<ProxyRecord>>,
    /// Keys that failed to decode, with the reason; shown, never fatal.
    pub unreadable: Vec<String>,
}

impl Snapshot {
    pub async fn read(store: &dyn Store) -> Result<Snapshot> {
        let range = store.range(keys::ROOT).await?;
        let mut snap = Snapshot {
            revision: range.revision,
            ..Snapshot::default()
        };
        for kv in range.kvs {
            let key = kv.key.as_str();
            let rest = &key[keys::ROOT.len()..];
            let result: std::result::Result<(), dozen_model::ModelError> = (|| {
                fn v<T>(record: T, mod_revision: Revision) -> Versioned<T> {
                    Versioned {
                        record,
                        mod_revision,
                    }
                }
                let rev = kv.mod_revision;
                if let Some(name) = rest.strip_prefix("stacks/") {
                    snap.stacks
                        .insert(name.to_string(), v(decode(key, &kv.value)?, rev));
                } else if let Some(name) = rest.strip_prefix("services/") {
                    snap.services
                        .insert(name.to_string(), v(decode(key, &kv.value)?, rev));
                } else if let Some(name) = rest.strip_prefix("scale/") {
                    snap.scales
                        .insert(name.to_string(), v(decode(key, &kv.value)?, rev));
                } else if let Some(id) = rest.strip_prefix("proxies/") {
                    snap.proxies
                        .insert(id.to_string(), v(decode(key, &kv.value)?, rev));
                } else if rest.starts_with("releases/") {
                    let release: Release = decode(key, &kv.value)?;
                    snap.releases
                        .entry(release.service.clone())
                        .or_default()
                        .insert(release.number, release);
                } else if let Some((node, kind, item)) = keys::parse_node_key(key) {
                    match kind {
                        "node" => {
                            snap.nodes
                                .insert(node.to_string(), v(decode(key, &kv.value)?, rev));
                        }
                        "alive" => {
                            snap.alive_nodes.insert(node.to_string());
                        }
                        "assignments" => {
                            snap.assignments
                                .insert(item.to_string(), v(decode(key, &kv.value)?, rev));
                        }
                        "status" => {
                            snap.statuses
                                .insert(item.to_string(), v(decode(key, &kv.value)?, rev));
                        }
                        _ => {}
                    }
                }
                Ok(())
            })();
            if let Err(e) = result {
                tracing::warn!(key, error = %e, "unreadable record");
                snap.unreadable.push(e.to_string());
            }
        }
        Ok(snap)
    }

    pub fn current_release(&self, service: &str) -> Option<&Release> {
        let svc = self.services.get(service)?;
        self.releases.get(service)?.get(&svc.record.current_release)
    }

    /// Earlier releases of `service` that run exactly as its current one (see
    /// [`Release::runs_like`]): their tasks are current.
    pub fn runs_like_current(&self, service: &str) -> Vec<u64> {
        let Some(current) = self.current_release(service) else {
            return Vec::new();
        };
        self.releases
            .get(service)
            .into_iter()
            .flat_map(|r| r.values())
            .filter(|r| r.number != current.number && r.runs_like(current))
            .map(|r| r.number)
            .collect()
    }

    /// The lowest route revision any live proxy serves (None without proxies).
    pub fn proxies_applied(&self) -> Option<u64> {
        self.proxies
            .values()
            .map(|p| p.record.applied_revision)
            .min()
    }

    pub fn desired_replicas(&self, service: &str) -> u32 {
        self.scales
            .get(service)
            .map(|s| s.record.replicas)
            .unwrap_or(0)
    }
}
