//! Operations that change desired state. Each reads what it needs, decides, and writes one
//! transaction guarded by compares on everything it read; on a concurrent change it reads again.

use std::collections::BTreeMap;

use dozen_model::params::PinnedSecret;
use dozen_model::registry::ImagePin;
use dozen_model::{
    encode, keys, Assignment, DesiredState, Release, ScaleRecord, ServiceRecord, StackRecord,
    TaskKind, SCHEMA,
};
use dozen_spec::{LiveService, Plan, PlanAction, Stack};
use dozen_store::{Compare, Op, Store, Txn};

use crate::snapshot::Snapshot;
use crate::{wall_ms, ControlError, Result};

const ATTEMPTS: usize = 5;

pub use dozen_model::{ApplyOutcome, ReleaseChange};

/// How many releases of each service are kept (`dozen server --keep-releases`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep_releases: usize,
}

pub const DEFAULT_KEEP_RELEASES: usize = 20;

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep_releases: DEFAULT_KEEP_RELEASES,
        }
    }
}

/// The releases of `service` to delete once release `newest` is written: all but the newest
/// `keep`, and never the current one or one a task still runs (a rollback target that was
/// pruned is refused as not found, like one that never existed).
pub fn releases_to_prune(snap: &Snapshot, service: &str, newest: u64, keep: usize) -> Vec<u64> {
    let keep = keep.max(1);
    let current = snap.services.get(service).map(|s| s.record.current_release);
    let in_use: std::collections::BTreeSet<u64> = snap
        .assignments
        .values()
        .filter(|a| a.record.service == service)
        .map(|a| a.record.release)
        .collect();
    let mut numbers: Vec<u64> = snap
        .releases
        .get(service)
        .map(|r| r.keys().copied().collect())
        .unwrap_or_default();
    numbers.push(newest);
    numbers.sort_unstable();
    numbers.dedup();
    let cut = numbers.len().saturating_sub(keep);
    numbers[..cut]
        .iter()
        .copied()
        .filter(|n| Some(*n) != current && !in_use.contains(n))
        .collect()
}

/// Re-checks a stack that arrived over the wire: the CLI validated the file, but the API is
/// also for scripts. `plan` and `apply` call it first.
pub fn check_stack(stack: &Stack) -> Result<()> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.len() <= 63
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !n.starts_with('-')
            && !n.ends_with('-')
    };
    if !valid_name(&stack.name) {
        return Err(ControlError::Invalid(format!(
            "stack name `{}` is not valid: use lowercase letters, digits and '-'",
            stack.name
        )));
    }
    for (name, svc) in &stack.services {
        if !valid_name(name) {
            return Err(ControlError::Invalid(format!(
                "service name `{name}` is not valid: use lowercase letters, digits and '-'"
            )));
        }
        if svc.command.is_none() && svc.image.is_none() {
            return Err(ControlError::Invalid(format!(
                "service `{name}` has neither command nor image"
            )));
        }
        if svc.replicas.is_some_and(|r| r > dozen_spec::MAX_REPLICAS) {
            return Err(ControlError::Invalid(format!(
                "service `{name}`: replicas out of range 0..={}",
                dozen_spec::MAX_REPLICAS
            )));
        }
        dozen_spec::check_secrets(svc)
            .map_err(|why| ControlError::Invalid(format!("service `{name}`: {why}")))?;
    }
    Ok(())
}

/// Services that belong to `stack` in the store, as `plan` wants them.
fn live_services(snap: &Snapshot, stack: &str) -> BTreeMap<String, LiveService> {
    snap.services
        .iter()
        .filter(|(_, s)| s.record.stack == stack)
        .filter_map(|(name, _)| {
            let release = snap.current_release(name)?;
            Some((
                name.clone(),
                LiveService {
                    spec: release.spec.clone(),
                    replicas: snap.desired_replicas(name),
                },
            ))
        })
        .collect()
}

fn check_ownership(snap: &Snapshot, stack: &Stack) -> Result<()> {
    for name in stack.services.keys() {
        if let Some(existing) = snap.services.get(name) {
            if existing.record.stack != stack.name {
                return Err(ControlError::Conflict(format!(
                    "service `{name}` already belongs to stack `{}`; rename it in stack `{}` or remove it from `{}` first",
                    existing.record.stack, stack.name, existing.record.stack
                )));
            }
        }
    }
    Ok(())
}

/// A rule another stack already serves (the same conditions), or a priority another stack
/// already uses, is refused: which of two stacks a request reaches must not depend on names.
fn check_routes(snap: &Snapshot, stack: &Stack) -> Result<()> {
    let others: Vec<(&str, &str, &dozen_spec::Route)> = snap
        .services
        .iter()
        .filter(|(_, s)| s.record.stack != stack.name)
        .filter_map(|(name, s)| Some((name, s, snap.current_release(name)?)))
        .flat_map(|(name, s, release)| {
            release
                .spec
                .routes
                .iter()
                .map(move |r| (name.as_str(), s.record.stack.as_str(), r))
        })
        .collect();
    for (name, service) in &stack.services {
        for rule in &service.routes {
            let key = rule.conditions_key();
            let clash = others.iter().find(|(_, _, r)| r.conditions_key() == key);
            if let Some((other, other_stack, _)) = clash {
                return Err(ControlError::Conflict(format!(
                    "route `{}` of service `{name}` is already served by service `{other}` of stack `{other_stack}`; change a condition of one of them, or remove it from stack `{other_stack}` first",
                    rule.describe()
                )));
            }
            let taken = others
                .iter()
                .find(|(_, _, r)| r.priority.is_some() && r.priority == rule.priority);
            if let Some((other, other_stack, _)) = taken {
                return Err(ControlError::Conflict(format!(
                    "route `{}` of service `{name}` has priority {}, which service `{other}` of stack `{other_stack}` already uses; priorities order rules across stacks, so pick another",
                    rule.describe(),
                    rule.priority.unwrap_or(0)
                )));
            }
        }
    }
    Ok(())
}

/// What `apply` would do, changing nothing. `artifacts` maps service -> bundle digest.
pub async fn plan(
    store: &dyn Store,
    stack: &Stack,
    artifacts: &BTreeMap<String, String>,
) -> Result<Plan> {
    check_stack(stack)?;
    let snap = Snapshot::read(store).await?;
    check_ownership(&snap, stack)?;
    check_routes(&snap, stack)?;
    let pins = image_pins(store, stack, &BTreeMap::new()).await?;
    let secret_pins = crate::params::pins::for_stack(store, stack).await?;
    Ok(plan_against(&snap, stack, artifacts, &pins, &secret_pins))
}

/// The services whose image is one of the built-in registry's, each pinned to the digest its
/// tag points at now, or to the one just pushed for it (`built`: service -> digest).
async fn image_pins(
    store: &dyn Store,
    stack: &Stack,
    built: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, ImagePin>> {
    let mut pins = BTreeMap::new();
    for (name, service) in &stack.services {
        let Some(image) = &service.image else {
            continue;
        };
        let pin = match built.get(name) {
            Some(digest) => {
                let pinned = dozen_model::registry::local_reference(image)
                    .map(|(repository, _)| format!("{repository}@{digest}"));
                let found = match &pinned {
                    Some(pinned) => crate::registry::pin(store, pinned).await?,
                    None => None,
                };
                Some(found.ok_or_else(|| {
                    ControlError::Invalid(format!(
                        "service `{name}`: the image built for it ({digest}) is not in the registry as `{image}`; build again"
                    ))
                })?)
            }
            None => crate::registry::pin(store, image).await?,
        };
        if let Some(pin) = pin {
            pins.insert(name.clone(), pin);
        }
    }
    Ok(pins)
}

fn plan_against(
    snap: &Snapshot,
    stack: &Stack,
    artifacts: &BTreeMap<String, String>,
    pins: &BTreeMap<String, ImagePin>,
    secret_pins: &BTreeMap<String, BTreeMap<String, PinnedSecret>>,
) -> Plan {
    let mut plan = dozen_spec::plan(stack, &live_services(snap, &stack.name));
    // A new artifact bundle is a change even when the spec text is the same.
    for sp in &mut plan.services {
        let Some(current) = snap.current_release(&sp.service) else {
            continue;
        };
        let new_digest = artifacts.get(&sp.service);
        if sp.action == PlanAction::Unchanged && current.artifact_digest.as_ref() != new_digest {
            sp.action = PlanAction::Update;
            sp.fields.push(dozen_spec::FieldChange {
                path: "artifact_digest".into(),
                before: current.artifact_digest.clone().map(Into::into),
                after: new_digest.cloned().map(Into::into),
            });
        }
        // So is an image tag of the registry that now points at another manifest.
        let new_pin = pins.get(&sp.service);
        if sp.action == PlanAction::Unchanged && current.image_pin.as_ref() != new_pin {
            sp.action = PlanAction::Update;
            sp.fields.push(dozen_spec::FieldChange {
                path: "image_digest".into(),
                before: current.image_pin.as_ref().map(|p| p.digest.clone().into()),
                after: new_pin.map(|p| p.digest.clone().into()),
            });
        }
        // And a secret whose reference now names another version.
        let empty = BTreeMap::new();
        let new_secrets = secret_pins.get(&sp.service).unwrap_or(&empty);
        if sp.action == PlanAction::Unchanged && &current.secrets != new_secrets {
            sp.action = PlanAction::Update;
            sp.fields.push(dozen_spec::FieldChange {
                path: "secret_versions".into(),
                before: Some(crate::params::pins::describe(&current.secrets).into()),
                after: Some(crate::params::pins::describe(new_secrets).into()),
            });
        }
    }
    plan
}

/// Converges the store to `stack`: new releases for changed services, scale where the file sets
/// it, removal of services no longer in the file.
pub async fn apply(
    store: &dyn Store,
    stack: &Stack,
    artifacts: &BTreeMap<String, String>,
    retention: &Retention,
) -> Result<ApplyOutcome> {
    apply_built(store, stack, artifacts, &BTreeMap::new(), retention).await
}

/// [`apply`], with the images just built for some services (service -> pushed digest).
pub async fn apply_built(
    store: &dyn Store,
    stack: &Stack,
    artifacts: &BTreeMap<String, String>,
    built: &BTreeMap<String, String>,
    retention: &Retention,
) -> Result<ApplyOutcome> {
    check_stack(stack)?;
    let pins = image_pins(store, stack, built).await?;
    let secret_pins = crate::params::pins::for_stack(store, stack).await?;
    for _ in 0..ATTEMPTS {
        let snap = Snapshot::read(store).await?;
        check_ownership(&snap, stack)?;
        check_routes(&snap, stack)?;
        let plan = plan_against(&snap, stack, artifacts, &pins, &secret_pins);
        let now = wall_ms();
        // One part per service (its compares with its writes), then the stack record, then
        // pruning: one transaction where the store takes it, else in that order (see `batch`).
        let mut parts = Vec::new();
        let mut cleanup = Txn::new();
        let mut releases = Vec::new();
        for sp in &plan.services {
            let name = &sp.service;
            let svc_key = keys::service(name);
            let mut txn = Txn::new();
            match sp.action {
                PlanAction::Remove => {
                    let existing = &snap.services[name];
                    txn = txn
                        .when(Compare::mod_revision(&svc_key, existing.mod_revision))
                        .then(Op::delete(&svc_key))
                        .then(Op::delete(keys::scale(name)))
                        .then(Op::DeletePrefix {
                            prefix: keys::releases(name),
                        });
                    parts.push(txn);
                    continue;
                }
                PlanAction::Create | PlanAction::Update => {
                    let spec = stack.services[name].clone();
                    let (number, record) = match snap.services.get(name) {
                        Some(existing) => {
                            txn = txn.when(Compare::mod_revision(&svc_key, existing.mod_revision));
                            let number = existing.record.latest_release + 1;
                            let mut rec = existing.record.clone();
                            rec.current_release = number;
                            rec.latest_release = number;
                            rec.updated_at_ms = now;
                            (number, rec)
                        }
                        None => {
                            txn = txn.when(Compare::missing(&svc_key));
                            // A service re-created after `down` keeps counting from scratch.
                            let number = 1;
                            (
                                number,
                                ServiceRecord {
                                    schema: SCHEMA,
                                    name: name.clone(),
                                    stack: stack.name.clone(),
                                    current_release: number,
                                    latest_release: number,
                                    restart_generation: 0,
                                    stopped: false,
                                    updated_at_ms: now,
                                },
                            )
                        }
                    };
                    let artifact_digest = artifacts.get(name).cloned();
                    let release = Release {
                        schema: SCHEMA,
                        service: name.clone(),
                        stack: stack.name.clone(),
                        number,
                        reproducible: spec.image.is_some() || artifact_digest.is_some(),
                        spec,
                        artifact_digest,
                        image_pin: pins.get(name).cloned(),
                        secrets: secret_pins.get(name).cloned().unwrap_or_default(),
                        created_at_ms: now,
                        cause: "apply".into(),
                    };
                    txn = txn
                        .when(Compare::missing(keys::release(name, number)))
                        .then(Op::put(keys::release(name, number), encode(&release)))
                        .then(Op::put(&svc_key, encode(&record)));
                    for old in releases_to_prune(&snap, name, number, retention.keep_releases) {
                        cleanup = cleanup.then(Op::delete(keys::release(name, old)));
                    }
                    releases.push(ReleaseChange {
                        service: name.clone(),
                        release: number,
                    });
                }
                PlanAction::Unchanged => {}
            }
            if sp.replicas.live != Some(sp.replicas.result) {
                let scale_key = keys::scale(name);
                txn = match snap.scales.get(name) {
                    Some(s) => txn.when(Compare::mod_revision(&scale_key, s.mod_revision)),
                    None => txn.when(Compare::missing(&scale_key)),
                };
                txn = txn.then(Op::put(
                    scale_key,
                    encode(&ScaleRecord {
                        schema: SCHEMA,
                        replicas: sp.replicas.result,
                        set_by: "apply".into(),
                    }),
                ));
            }
            parts.push(txn);
        }
        let stack_record = StackRecord {
            schema: SCHEMA,
            name: stack.name.clone(),
            services: stack.services.keys().cloned().collect(),
            updated_at_ms: now,
        };
        parts.push(Txn::new().then(Op::put(keys::stack(&stack.name), encode(&stack_record))));
        parts.push(cleanup);
        if let Some(revision) = crate::batch::commit(store, parts).await? {
            return Ok(ApplyOutcome {
                plan,
                releases,
                revision,
            });
        }
    }
    Err(ControlError::Conflict(format!(
        "stack `{}` kept changing while applying; try again",
        stack.name
    )))
}

fn service_or_404<'a>(
    snap: &'a Snapshot,
    name: &str,
) -> Result<&'a crate::snapshot::Versioned<ServiceRecord>> {
    snap.services
        .get(name)
        .ok_or_else(|| ControlError::NotFound {
            kind: "service",
            name: name.to_string(),
        })
}

/// Sets the live desired count (what `dozen scale` and later the autoscaler write).
/// Sets the live replica count; returns the count before.
pub async fn scale(store: &dyn Store, service: &str, replicas: u32) -> Result<u32> {
    if replicas > dozen_spec::MAX_REPLICAS {
        return Err(ControlError::Invalid(format!(
            "replicas {replicas} for `{service}` is out of range 0..={}",
            dozen_spec::MAX_REPLICAS
        )));
    }
    let snap = Snapshot::read(store).await?;
    let svc = service_or_404(&snap, service)?;
    let before = snap.desired_replicas(service);
    let record = ScaleRecord {
        schema: SCHEMA,
        replicas,
        set_by: "scale".into(),
    };
    let ok = store
        .txn(
            Txn::new()
                .when(Compare::mod_revision(
                    keys::service(service),
                    svc.mod_revision,
                ))
                .then(Op::put(keys::scale(service), encode(&record))),
        )
        .await?
        .succeeded;
    if !ok {
        return Err(ControlError::Conflict(format!(
            "service `{service}` changed while scaling; try again"
        )));
    }
    Ok(before)
}

/// Updates the service record with `change`, retrying on concurrent writes.
async fn update_service(
    store: &dyn Store,
    service: &str,
    change: impl Fn(&Snapshot, &mut ServiceRecord) -> Result<Vec<Op>>,
) -> Result<ServiceRecord> {
    for _ in 0..ATTEMPTS {
        let snap = Snapshot::read(store).await?;
        let svc = service_or_404(&snap, service)?;
        let mut record = svc.record.clone();
        let extra = change(&snap, &mut record)?;
        record.updated_at_ms = wall_ms();
        let mut txn = Txn::new()
            .when(Compare::mod_revision(
                keys::service(service),
                svc.mod_revision,
            ))
            .then(Op::put(keys::service(service), encode(&record)));
        for op in extra {
            txn = txn.then(op);
        }
        if store.txn(txn).await?.succeeded {
            return Ok(record);
        }
    }
    Err(ControlError::Conflict(format!(
        "service `{service}` kept changing; try again"
    )))
}

/// Replaces every task of the service (new before old); also starts a stopped service.
pub async fn restart(store: &dyn Store, service: &str) -> Result<ServiceRecord> {
    update_service(store, service, |_, rec| {
        rec.restart_generation += 1;
        rec.stopped = false;
        Ok(vec![])
    })
    .await
}

/// Stops every task of the service; its desired count is kept for `restart`.
pub async fn stop(store: &dyn Store, service: &str) -> Result<ServiceRecord> {
    update_service(store, service, |_, rec| {
        rec.stopped = true;
        Ok(vec![])
    })
    .await
}

/// Makes a new release that repeats release `to` (default: the one before the current).
pub async fn rollback(
    store: &dyn Store,
    service: &str,
    to: Option<u64>,
    retention: &Retention,
) -> Result<Release> {
    let made = std::sync::Mutex::new(None);
    update_service(store, service, |snap, rec| {
        let target = match to {
            Some(n) => n,
            None => rec
                .current_release
                .checked_sub(1)
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    ControlError::Invalid(format!(
                        "`{service}` is at release {}: there is no earlier release to roll back to",
                        rec.current_release
                    ))
                })?,
        };
        if target == rec.current_release {
            return Err(ControlError::Invalid(format!(
                "`{service}` already runs release {target}"
            )));
        }
        let source = snap
            .releases
            .get(service)
            .and_then(|r| r.get(&target))
            .ok_or_else(|| ControlError::NotFound {
                kind: "release",
                name: format!("{service} #{target}"),
            })?;
        let (release, ops) = next_release(
            snap,
            rec,
            source.clone(),
            format!("rollback to {target}"),
            retention,
        );
        *made.lock().unwrap_or_else(|p| p.into_inner()) = Some(release);
        Ok(ops)
    })
    .await?;
    made.into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .ok_or_else(|| ControlError::Conflict("rollback made no release".into()))
}

/// `like` as the service's next release, made current: the release and the writes (with the
/// pruning of releases past the retention).
fn next_release(
    snap: &Snapshot,
    rec: &mut ServiceRecord,
    like: Release,
    cause: String,
    retention: &Retention,
) -> (Release, Vec<Op>) {
    let number = rec.latest_release + 1;
    let release = Release {
        number,
        created_at_ms: wall_ms(),
        cause,
        ..like
    };
    rec.current_release = number;
    rec.latest_release = number;
    let service = &release.service;
    let mut ops = vec![Op::put(keys::release(service, number), encode(&release))];
    for old in releases_to_prune(snap, service, number, retention.keep_releases) {
        ops.push(Op::delete(keys::release(service, old)));
    }
    (release, ops)
}

/// A new release repeating the current one with `secrets` (the newest versions its
/// references name): `on_change = "redeploy"`.
pub async fn repin(
    store: &dyn Store,
    service: &str,
    from_release: u64,
    secrets: BTreeMap<String, PinnedSecret>,
    retention: &Retention,
) -> Result<Option<Release>> {
    let made = std::sync::Mutex::new(None);
    update_service(store, service, |snap, rec| {
        *made.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // The pins were worked out from `from_release`; another release since (an apply, a
        // rollback) decides for itself.
        if rec.current_release != from_release {
            return Ok(vec![]);
        }
        let current = snap
            .current_release(service)
            .ok_or_else(|| ControlError::NotFound {
                kind: "release",
                name: format!("{service} #{}", rec.current_release),
            })?;
        if current.secrets == secrets {
            return Ok(vec![]);
        }
        let (release, ops) = next_release(
            snap,
            rec,
            Release {
                secrets: secrets.clone(),
                ..current.clone()
            },
            format!(
                "secret changed: {}",
                crate::params::pins::describe(&secrets)
            ),
            retention,
        );
        *made.lock().unwrap_or_else(|p| p.into_inner()) = Some(release);
        Ok(ops)
    })
    .await?;
    Ok(made.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Removes a stack: its services stop and their records go.
pub async fn down(store: &dyn Store, stack: &str) -> Result<Vec<String>> {
    let snap = Snapshot::read(store).await?;
    let Some(st) = snap.stacks.get(stack) else {
        return Err(ControlError::NotFound {
            kind: "stack",
            name: stack.to_string(),
        });
    };
    // One part per service, the stack record last: split where the store needs it, a `down`
    // stopped half-way leaves the stack with fewer services, and `down` again finishes it.
    let mut parts = Vec::new();
    let mut removed = Vec::new();
    for (name, svc) in snap
        .services
        .iter()
        .filter(|(_, s)| s.record.stack == stack)
    {
        parts.push(
            Txn::new()
                .when(Compare::mod_revision(keys::service(name), svc.mod_revision))
                .then(Op::delete(keys::service(name)))
                .then(Op::delete(keys::scale(name)))
                .then(Op::DeletePrefix {
                    prefix: keys::releases(name),
                }),
        );
        removed.push(name.clone());
    }
    parts.push(
        Txn::new()
            .when(Compare::mod_revision(keys::stack(stack), st.mod_revision))
            .then(Op::delete(keys::stack(stack))),
    );
    if crate::batch::commit(store, parts).await?.is_none() {
        return Err(ControlError::Conflict(format!(
            "stack `{stack}` changed while removing it; try again"
        )));
    }
    Ok(removed)
}

/// Starts a one-off task (`dozen run`) on the service's current release with `argv`.
pub async fn run_oneoff(store: &dyn Store, service: &str, argv: Vec<String>) -> Result<Assignment> {
    if argv.is_empty() {
        return Err(ControlError::Invalid(
            "no command given: use `dozen run SERVICE -- CMD [ARGS...]`".into(),
        ));
    }
    let snap = Snapshot::read(store).await?;
    service_or_404(&snap, service)?;
    let release = snap
        .current_release(service)
        .ok_or_else(|| ControlError::NotFound {
            kind: "release",
            name: service.to_string(),
        })?;
    let nodes = crate::controller::node_views(&snap, true);
    let tasks = crate::controller::task_views(&snap);
    let all: Vec<&dozen_scheduler::TaskView> = tasks.iter().collect();
    let used = dozen_scheduler::usage(&all);
    let needs = dozen_scheduler::Needs {
        driver: release.spec.driver(),
        node: release.spec.node.as_deref(),
        labels: &release.spec.node_labels,
        cpu_millis: release.spec.resources.cpu_millis,
        memory_bytes: release.spec.resources.memory_bytes,
    };
    let node =
        dozen_scheduler::place(&nodes, &used, &BTreeMap::new(), &needs).ok_or_else(|| {
            ControlError::Conflict(format!(
                "cannot run a one-off task of `{service}`: {}",
                dozen_scheduler::why_unplaceable(&nodes, &needs)
            ))
        })?;
    let task = format!("{service}-run-{}", crate::random_suffix());
    let assignment = Assignment {
        schema: SCHEMA,
        task: task.clone(),
        service: service.to_string(),
        stack: release.stack.clone(),
        node: node.name.clone(),
        release: release.number,
        generation: 1,
        desired: DesiredState::Run,
        kind: TaskKind::OneOff { argv },
        start_delay_ms: 0,
        restarts: 0,
        restart_generation: 0,
        spec: release.spec.clone(),
        artifact_digest: release.artifact_digest.clone(),
        image_pin: release.image_pin.clone(),
        secrets: release.secrets.clone(),
        created_at_ms: wall_ms(),
        drain_since_ms: None,
    };
    let key = keys::assignment(&node.name, &task);
    store
        .txn(
            Txn::new()
                .when(Compare::missing(&key))
                .then(Op::put(&key, encode(&assignment))),
        )
        .await?;
    Ok(assignment)
}

/// Deletes a finished one-off task's records (the `dozen run` client does it when done).
pub async fn remove_oneoff(store: &dyn Store, task: &str) -> Result<()> {
    let snap = Snapshot::read(store).await?;
    let a = snap
        .assignments
        .get(task)
        .ok_or_else(|| ControlError::NotFound {
            kind: "task",
            name: task.to_string(),
        })?;
    if a.record.kind == TaskKind::Service {
        return Err(ControlError::Invalid(format!(
            "task `{task}` is a service replica; scale the service instead"
        )));
    }
    store
        .txn(
            Txn::new()
                .when(Compare::mod_revision(
                    keys::assignment(&a.record.node, task),
                    a.mod_revision,
                ))
                .then(Op::delete(keys::assignment(&a.record.node, task)))
                .then(Op::delete(keys::status(&a.record.node, task))),
        )
        .await?;
    Ok(())
}
