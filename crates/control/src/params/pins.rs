//! Secrets of releases: each reference in a service's `secrets` pinned to the version it
//! names when a release is made, and the redeploy of services that asked for one when a
//! reference comes to name another version.

use std::collections::BTreeMap;

use dozen_model::params::{self as records, ParamRecord, PinnedSecret};
use dozen_model::{decode, Release};
use dozen_params::names::{Reference, Selector};
use dozen_spec::{OnChange, Service, Stack};
use dozen_store::Store;

use crate::desired::Retention;
use crate::snapshot::Snapshot;
use crate::{ControlError, Result};

/// The version `reference` names now.
async fn pin(store: &dyn Store, service: &str, key: &str, reference: &str) -> Result<PinnedSecret> {
    let at =
        |why: String| ControlError::Invalid(format!("service `{service}`, secret {key}: {why}"));
    let parsed = Reference::parse(reference).map_err(|e| at(e.0))?;
    let Some(kv) = store.get(&records::name(&parsed.name)).await? else {
        return Err(at(format!(
            "parameter {} does not exist; `dozen param put {}` first",
            parsed.name, parsed.name
        )));
    };
    let head: ParamRecord = decode(&kv.key, &kv.value)?;
    let version = match &parsed.selector {
        Selector::Newest => head.newest,
        Selector::Version(v) if head.kept.contains(v) => *v,
        Selector::Version(v) => {
            return Err(at(format!(
                "parameter {} has no version {v} any more",
                parsed.name
            )))
        }
        Selector::Label(label) => *head
            .labels
            .get(label)
            .ok_or_else(|| at(format!("parameter {} has no label `{label}`", parsed.name)))?,
    };
    if head
        .expires_at_ms
        .is_some_and(|exp| exp <= crate::wall_ms())
    {
        return Err(at(format!(
            "parameter {} expired; put a new version",
            parsed.name
        )));
    }
    Ok(PinnedSecret {
        name: parsed.name,
        version,
    })
}

/// The secrets of `spec`, pinned.
pub async fn for_service(
    store: &dyn Store,
    service: &str,
    spec: &Service,
) -> Result<BTreeMap<String, PinnedSecret>> {
    let mut pinned = BTreeMap::new();
    for (key, reference) in &spec.secrets {
        pinned.insert(key.clone(), pin(store, service, key, reference).await?);
    }
    Ok(pinned)
}

/// Every service's secrets, pinned (services without secrets are absent).
pub async fn for_stack(
    store: &dyn Store,
    stack: &Stack,
) -> Result<BTreeMap<String, BTreeMap<String, PinnedSecret>>> {
    let mut out = BTreeMap::new();
    for (name, service) in &stack.services {
        if !service.secrets.is_empty() {
            out.insert(name.clone(), for_service(store, name, service).await?);
        }
    }
    Ok(out)
}

/// Whether any parameter `spec` reads had a new version or a label moved after `since_ms`.
async fn changed_since(store: &dyn Store, spec: &Service, since_ms: u64) -> Result<bool> {
    for reference in spec.secrets.values() {
        let Ok(parsed) = Reference::parse(reference) else {
            continue;
        };
        if let Some(kv) = store.get(&records::name(&parsed.name)).await? {
            let head: ParamRecord = decode(&kv.key, &kv.value)?;
            if head.updated_at_ms > since_ms {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// `DB_PASSWORD=/shop/prod/db/password:3, ...` (names and versions; never values).
pub fn describe(secrets: &BTreeMap<String, PinnedSecret>) -> String {
    if secrets.is_empty() {
        return "none".into();
    }
    secrets
        .iter()
        .map(|(k, p)| format!("{k}={}:{}", p.name, p.version))
        .collect::<Vec<_>>()
        .join(", ")
}

/// New releases for the services with `on_change = "redeploy"` whose secrets now name other
/// versions than their current release pinned.
pub async fn redeploy_changed(store: &dyn Store, retention: &Retention) -> Result<Vec<Release>> {
    let snap = Snapshot::read(store).await?;
    let mut made = Vec::new();
    for service in snap.services.keys() {
        let Some(current) = snap.current_release(service) else {
            continue;
        };
        if current.spec.on_change != OnChange::Redeploy || current.spec.secrets.is_empty() {
            continue;
        }
        let pinned = match for_service(store, service, &current.spec).await {
            Ok(p) => p,
            // A reference that no longer resolves (deleted, expired) keeps what runs.
            Err(ControlError::Invalid(why)) => {
                tracing::warn!(service, why, "cannot pin the secrets of a redeploy");
                continue;
            }
            Err(e) => return Err(e),
        };
        // Only a parameter changed since the release was made redeploys: a rollback to
        // older versions stays rolled back.
        if pinned == current.secrets
            || !changed_since(store, &current.spec, current.created_at_ms).await?
        {
            continue;
        }
        if let Some(release) =
            crate::desired::repin(store, service, current.number, pinned, retention).await?
        {
            made.push(release);
        }
    }
    Ok(made)
}
