//! The built-in registry's records over the store: which repository holds which blob and
//! manifest, where tags point, the catalog, and what the blob collector must keep. The bytes
//! themselves are the API server's blob store's; a handler stores them, then calls one of these.

use std::collections::BTreeSet;

use dozen_model::registry::{
    keys, BlobLink, Code, ImagePin, ManifestRecord, ParsedManifest, Reference, RegistryError,
    RepositoryRecord, TagRecord,
};
use dozen_model::{decode, encode, SCHEMA};
use dozen_store::{Op, Store, Txn};

use crate::{ControlError, Result};

fn spec(code: Code, message: String) -> ControlError {
    ControlError::Registry(RegistryError::new(code, message))
}

/// Records that `repo` holds the blob `digest` (pushed into it or mounted from another).
pub async fn link_blob(store: &dyn Store, repo: &str, digest: &str, size: u64) -> Result<()> {
    let link = BlobLink {
        schema: SCHEMA,
        size,
        linked_at_ms: crate::wall_ms(),
    };
    store.put(&keys::blob(repo, digest), encode(&link)).await?;
    Ok(())
}

/// The blob `digest` as `repo` holds it, if it does.
pub async fn blob_link(store: &dyn Store, repo: &str, digest: &str) -> Result<Option<BlobLink>> {
    let key = keys::blob(repo, digest);
    match store.get(&key).await? {
        Some(kv) => Ok(Some(decode(&key, &kv.value)?)),
        None => Ok(None),
    }
}

/// Removes the blob from `repo` (the bytes go with the next collection if nothing else needs
/// them). Unknown: `BLOB_UNKNOWN`.
pub async fn unlink_blob(store: &dyn Store, repo: &str, digest: &str) -> Result<()> {
    if let Some(user) = manifest_needing(store, repo, digest).await? {
        return Err(spec(
            Code::Denied,
            format!("manifest {user} of `{repo}` needs blob {digest}; delete that manifest first"),
        ));
    }
    let key = keys::blob(repo, digest);
    let answer = store
        .txn(
            Txn::new()
                .when(dozen_store::Compare::exists(&key))
                .then(Op::delete(&key)),
        )
        .await?;
    if answer.succeeded {
        Ok(())
    } else {
        Err(spec(
            Code::BlobUnknown,
            format!("repository `{repo}` holds no blob {digest}"),
        ))
    }
}

/// Records a manifest whose bytes (hashing to `digest`) are in the blob store, under `repo`
/// and, when `reference` is a tag, that tag. Everything it names must be in the repository
/// already: a missing blob is `MANIFEST_BLOB_UNKNOWN` naming it, and nothing is recorded.
pub async fn put_manifest(
    store: &dyn Store,
    repo: &str,
    reference: &Reference,
    digest: &str,
    size: u64,
    parsed: ParsedManifest,
) -> Result<()> {
    if let Reference::Digest(named) = reference {
        if named != digest {
            return Err(spec(
                Code::DigestInvalid,
                format!("the manifest was pushed as {named} but its content hashes to {digest}"),
            ));
        }
    }
    for blob in &parsed.blobs {
        if store.get(&keys::blob(repo, blob)).await?.is_none() {
            return Err(spec(
                Code::ManifestBlobUnknown,
                format!("the manifest names blob {blob}, which repository `{repo}` does not hold; push it first"),
            ));
        }
    }
    for child in &parsed.manifests {
        if store.get(&keys::manifest(repo, child)).await?.is_none() {
            return Err(spec(
                Code::ManifestBlobUnknown,
                format!("the index names manifest {child}, which repository `{repo}` does not hold; push it first"),
            ));
        }
    }
    let now = crate::wall_ms();
    let record = ManifestRecord {
        schema: SCHEMA,
        repository: repo.to_string(),
        digest: digest.to_string(),
        media_type: parsed.media_type,
        size,
        references: parsed.blobs.into_iter().chain(parsed.manifests).collect(),
        config: parsed.config,
        pushed_at_ms: now,
    };
    let mut txn = Txn::new().then(Op::put(keys::manifest(repo, digest), encode(&record)));
    if let Reference::Tag(tag) = reference {
        let tag_record = TagRecord {
            schema: SCHEMA,
            digest: digest.to_string(),
            pushed_at_ms: now,
        };
        txn = txn.then(Op::put(keys::tag(repo, tag), encode(&tag_record)));
    }
    if store.get(&keys::repository(repo)).await?.is_none() {
        let repository = RepositoryRecord {
            schema: SCHEMA,
            created_at_ms: now,
        };
        txn = txn.then(Op::put(keys::repository(repo), encode(&repository)));
    }
    store.txn(txn).await?;
    Ok(())
}

/// The manifest `reference` names in `repo`, if any.
pub async fn resolve(
    store: &dyn Store,
    repo: &str,
    reference: &Reference,
) -> Result<Option<ManifestRecord>> {
    let digest = match reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(tag) => {
            let key = keys::tag(repo, tag);
            match store.get(&key).await? {
                Some(kv) => decode::<TagRecord>(&key, &kv.value)?.digest,
                None => return Ok(None),
            }
        }
    };
    let key = keys::manifest(repo, &digest);
    match store.get(&key).await? {
        Some(kv) => Ok(Some(decode(&key, &kv.value)?)),
        None => Ok(None),
    }
}

/// The tags of `repo`, sorted; `NAME_UNKNOWN` if no such repository.
pub async fn tags(store: &dyn Store, repo: &str) -> Result<Vec<String>> {
    if store.get(&keys::repository(repo)).await?.is_none() {
        return Err(spec(
            Code::NameUnknown,
            format!("no repository `{repo}` in this registry"),
        ));
    }
    let prefix = keys::tags(repo);
    let found = store.range(&prefix).await?;
    Ok(found
        .kvs
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_string))
        .collect())
}

/// Every repository, sorted.
pub async fn catalog(store: &dyn Store) -> Result<Vec<String>> {
    let prefix = keys::repositories();
    let found = store.range(&prefix).await?;
    Ok(found
        .kvs
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_string))
        .collect())
}

/// Deletes a tag, or a manifest by digest together with every tag pointing at it.
pub async fn delete_manifest(store: &dyn Store, repo: &str, reference: &Reference) -> Result<()> {
    let unknown = || {
        spec(
            Code::ManifestUnknown,
            format!("repository `{repo}` has no manifest {}", shown(reference)),
        )
    };
    let txn = match reference {
        Reference::Tag(tag) => {
            let key = keys::tag(repo, tag);
            Txn::new()
                .when(dozen_store::Compare::exists(&key))
                .then(Op::delete(key))
        }
        Reference::Digest(digest) => {
            let key = keys::manifest(repo, digest);
            let current = store.get(&key).await?.ok_or_else(unknown)?;
            if let Some(index) = manifest_needing(store, repo, digest).await? {
                return Err(spec(
                    Code::Denied,
                    format!(
                        "index {index} of `{repo}` names manifest {digest}; delete the index first"
                    ),
                ));
            }
            // A release that runs it (or may be rolled back to) keeps it.
            for kv in store.range(&dozen_model::keys::all_releases()).await?.kvs {
                let release: dozen_model::Release = decode(&kv.key, &kv.value)?;
                if release
                    .image_pin
                    .as_ref()
                    .is_some_and(|p| p.repository == repo && p.digest == *digest)
                {
                    return Err(spec(
                        Code::Denied,
                        format!(
                            "release #{} of service `{}` runs {repo}@{digest}; it stays while that release is kept (delete the tag instead, or remove the service)",
                            release.number, release.service
                        ),
                    ));
                }
            }
            let mut txn = Txn::new()
                .when(dozen_store::Compare::mod_revision(
                    &key,
                    current.mod_revision,
                ))
                .then(Op::delete(&key));
            let prefix = keys::tags(repo);
            for kv in store.range(&prefix).await?.kvs {
                if decode::<TagRecord>(&kv.key, &kv.value)?.digest == *digest {
                    txn = txn.then(Op::delete(kv.key));
                }
            }
            txn
        }
    };
    if store.txn(txn).await?.succeeded {
        Ok(())
    } else {
        Err(unknown())
    }
}

/// A manifest of `repo` that names `digest` (as a blob, or an index its manifest), if any.
async fn manifest_needing(store: &dyn Store, repo: &str, digest: &str) -> Result<Option<String>> {
    for kv in store.range(&keys::manifests(repo)).await?.kvs {
        let record: ManifestRecord = decode(&kv.key, &kv.value)?;
        if record.references.iter().any(|r| r == digest) {
            return Ok(Some(record.digest));
        }
    }
    Ok(None)
}

fn shown(reference: &Reference) -> String {
    match reference {
        Reference::Tag(t) => format!("tagged `{t}`"),
        Reference::Digest(d) => d.clone(),
    }
}

/// What the blob collector keeps: every blob a manifest of any repository needs (the
/// manifests themselves, their configs, layers and indexed manifests), and every blob a
/// repository linked since `linked_after_ms` (an upload whose manifest may be on its way).
/// Returns (all kept, those manifests need).
pub async fn kept_blobs(
    store: &dyn Store,
    linked_after_ms: u64,
) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let mut needed = BTreeSet::new();
    let mut recent = BTreeSet::new();
    for kv in store.range(&keys::all()).await?.kvs {
        match keys::parse(&kv.key) {
            Some((_, "_manifests", _)) => {
                let record: ManifestRecord = decode(&kv.key, &kv.value)?;
                needed.insert(record.digest);
                needed.extend(record.references);
            }
            Some((_, "_blobs", digest)) => {
                let link: BlobLink = decode(&kv.key, &kv.value)?;
                if link.linked_at_ms > linked_after_ms {
                    recent.insert(digest.to_string());
                }
            }
            _ => {}
        }
    }
    let mut kept = needed.clone();
    kept.extend(recent);
    Ok((kept, needed))
}

/// Forgets the repositories' links that no manifest needs and that are older than
/// `linked_before_ms` (uploads no manifest came to name): decided from the records, the same
/// on every server, never because one server dropped its copy. Each link goes only if it is
/// unchanged since it was read.
pub async fn forget_blobs(
    store: &dyn Store,
    needed: &BTreeSet<String>,
    linked_before_ms: u64,
) -> Result<usize> {
    let mut gone = 0;
    for kv in store.range(&keys::all()).await?.kvs {
        let Some((_, "_blobs", digest)) = keys::parse(&kv.key) else {
            continue;
        };
        let link: BlobLink = decode(&kv.key, &kv.value)?;
        if needed.contains(digest) || link.linked_at_ms > linked_before_ms {
            continue;
        }
        let txn = Txn::new()
            .when(dozen_store::Compare::mod_revision(&kv.key, kv.mod_revision))
            .then(Op::delete(&kv.key));
        if store.txn(txn).await?.succeeded {
            gone += 1;
        }
    }
    Ok(gone)
}

/// The pin of `image` if it names an image of this registry that exists (see
/// [`dozen_model::registry::local_reference`]); `None` for any other image, which the engine
/// resolves itself.
pub async fn pin(store: &dyn Store, image: &str) -> Result<Option<ImagePin>> {
    let Some((repository, reference)) = dozen_model::registry::local_reference(image) else {
        return Ok(None);
    };
    Ok(resolve(store, &repository, &reference)
        .await?
        .map(|manifest| ImagePin {
            repository,
            digest: manifest.digest,
        }))
}
