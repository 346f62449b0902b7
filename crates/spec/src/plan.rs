//! Pure plan/diff between a desired stack and the live services.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::types::{Service, Stack};

/// A service as the store currently has it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, utoipa::ToSchema)]
pub struct LiveService {
    pub spec: Service,
    pub replicas: u32,
}

/// What applying a stack would do.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, utoipa::ToSchema)]
pub struct Plan {
    pub stack: String,
    /// Sorted by service name.
    pub services: Vec<ServicePlan>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, utoipa::ToSchema)]
pub struct ServicePlan {
    pub service: String,
    pub action: PlanAction,
    pub fields: Vec<FieldChange>,
    pub replicas: ReplicaPlan,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlanAction {
    Create,
    Update,
    Unchanged,
    Remove,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldChange {
    pub path: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, utoipa::ToSchema)]
pub struct ReplicaPlan {
    pub live: Option<u32>,
    pub file: Option<u32>,
    pub result: u32,
}

impl ReplicaPlan {
    /// `live` and `file` both set and different.
    pub fn drift(&self) -> bool {
        matches!((self.live, self.file), (Some(l), Some(f)) if l != f)
    }
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        self.services.iter().any(|s| {
            s.action != PlanAction::Unchanged || s.replicas.live != Some(s.replicas.result)
        })
    }
}

/// Compares the desired stack with the live services of that stack.
///
/// * Service only in `desired`: [`PlanAction::Create`]; `fields` lists every top-level field
///   of the new service (except `replicas`) with `before: None`.
/// * In both: `fields` is a leaf-level JSON diff of the two [`Service`] values (objects are
///   recursed into, arrays and scalars compared whole, `replicas` excluded);
///   [`PlanAction::Update`] when it is non-empty, else [`PlanAction::Unchanged`] (a replica
///   change alone is shown by [`ReplicaPlan`], and counts for [`Plan::has_changes`]).
/// * Only in `live`: [`PlanAction::Remove`] with no fields and a replica result of 0.
pub fn plan(desired: &Stack, live: &BTreeMap<String, LiveService>) -> Plan {
    let mut names: Vec<&String> = desired.services.keys().chain(live.keys()).collect();
    names.sort();
    names.dedup();
    let services = names
        .into_iter()
        .map(|name| match (desired.services.get(name), live.get(name)) {
            (Some(d), Some(l)) => {
                let fields = diff_services(&l.spec, d);
                ServicePlan {
                    service: name.clone(),
                    action: if fields.is_empty() {
                        PlanAction::Unchanged
                    } else {
                        PlanAction::Update
                    },
                    fields,
                    replicas: ReplicaPlan {
                        live: Some(l.replicas),
                        file: d.replicas,
                        result: d.replicas.unwrap_or(l.replicas),
                    },
                }
            }
            (Some(d), None) => ServicePlan {
                service: name.clone(),
                action: PlanAction::Create,
                fields: created_fields(d),
                replicas: ReplicaPlan {
                    live: None,
                    file: d.replicas,
                    result: d.replicas.unwrap_or(1),
                },
            },
            (None, l) => ServicePlan {
                service: name.clone(),
                action: PlanAction::Remove,
                fields: Vec::new(),
                replicas: ReplicaPlan {
                    live: l.map(|l| l.replicas),
                    file: None,
                    result: 0,
                },
            },
        })
        .collect();
    Plan {
        stack: desired.name.clone(),
        services,
    }
}

fn service_json(s: &Service) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.remove("replicas");
    }
    v
}

fn created_fields(s: &Service) -> Vec<FieldChange> {
    let v = service_json(s);
    let Value::Object(m) = v else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    keys.into_iter()
        .filter_map(|k| {
            let val = m.get(k)?;
            (!val.is_null()).then(|| FieldChange {
                path: k.clone(),
                before: None,
                after: Some(val.clone()),
            })
        })
        .collect()
}

/// The fields that differ between two versions of a service (`env.A`, `command`, ...).
pub fn diff_services(before: &Service, after: &Service) -> Vec<FieldChange> {
    let mut out = Vec::new();
    diff_json(
        "",
        Some(&service_json(before)),
        Some(&service_json(after)),
        &mut out,
    );
    out
}

fn non_null(v: Option<&Value>) -> Option<Value> {
    v.filter(|v| !v.is_null()).cloned()
}

/// Tagged enums (`{"kind": "http", ..}`, `{"mode": "keep"}`) of different variants are
/// compared whole rather than field by field.
fn different_variants(
    a: &serde_json::Map<String, Value>,
    b: &serde_json::Map<String, Value>,
) -> bool {
    ["kind", "mode"]
        .iter()
        .any(|tag| match (a.get(*tag), b.get(*tag)) {
            (Some(Value::String(x)), Some(Value::String(y))) => x != y,
            _ => false,
        })
}

/// Leaf-level diff: objects are recursed into (except enum variants, above) (keys in sorted order), everything else is
/// compared whole. `null` and a missing key are both reported as `None`.
fn diff_json(path: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<FieldChange>) {
    match (a, b) {
        (Some(Value::Object(ma)), Some(Value::Object(mb))) if !different_variants(ma, mb) => {
            let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_json(&p, ma.get(k), mb.get(k), out);
            }
        }
        _ => {
            let (a, b) = (non_null(a), non_null(b));
            if a != b {
                out.push(FieldChange {
                    path: path.to_string(),
                    before: a,
                    after: b,
                });
            }
        }
    }
}
