use std::sync::Arc;

use dozen_params::names::{ParamType, Reference, MAX_VERSIONS};
use dozen_store::embedded::EmbeddedStore;
use dozen_store::Store;

use super::{ParamStore, PutParam, Reveal};
use crate::ControlError;

async fn open(dir: &std::path::Path) -> (ParamStore, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir).unwrap());
    let root = dozen_params::Key::parse(&"ab".repeat(32)).unwrap();
    (ParamStore::open(store.clone(), root).await.unwrap(), store)
}

fn put(name: &str, kind: Option<ParamType>, value: &str) -> PutParam {
    PutParam {
        name: name.into(),
        kind,
        value: value.into(),
        description: None,
        tags: None,
        expires_at_ms: None,
        warn_before_ms: None,
        key: None,
    }
}

fn get_ref(name: &str) -> Reference {
    Reference::parse(name).unwrap()
}

#[tokio::test]
async fn history_keeps_the_newest_versions_and_drops_labels_of_the_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let (params, store) = open(dir.path()).await;
    params.put(put("/a", None, "v1"), "t").await.unwrap();
    params
        .label("/a", Some(1), &["first".into()], &[], "t")
        .await
        .unwrap();
    for i in 2..=MAX_VERSIONS + 1 {
        params
            .put(put("/a", None, &format!("v{i}")), "t")
            .await
            .unwrap();
    }
    let history = params.history("/a").await.unwrap();
    assert_eq!(history.len() as u64, MAX_VERSIONS);
    assert_eq!(history[0].version, MAX_VERSIONS + 1);
    assert_eq!(history.last().unwrap().version, 2);
    // Version 1 is gone from the store, and its label with it.
    let stored = store
        .range(&dozen_model::params::versions("/a"))
        .await
        .unwrap();
    assert_eq!(stored.kvs.len() as u64, MAX_VERSIONS);
    let missing = params
        .get(&get_ref("/a:1"), Reveal::Plain)
        .await
        .unwrap_err();
    assert!(
        missing.to_string().contains("versions kept: 2 to 101"),
        "{missing}"
    );
    let label = params
        .get(&get_ref("/a@first"), Reveal::Plain)
        .await
        .unwrap_err();
    assert!(label.to_string().contains("no label `first`"), "{label}");
}

#[tokio::test]
async fn concurrent_writers_never_share_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let (params, _) = open(dir.path()).await;
    let params = Arc::new(params);
    let writes = (0..20).map(|i| {
        let params = params.clone();
        tokio::spawn(async move {
            params
                .put(
                    put("/c", Some(ParamType::SecureString), &format!("s{i}")),
                    "t",
                )
                .await
                .unwrap()
                .version
        })
    });
    let mut versions: Vec<u64> = futures_util::future::join_all(writes)
        .await
        .into_iter()
        .map(|v| v.unwrap())
        .collect();
    versions.sort();
    assert_eq!(versions, (1..=20).collect::<Vec<_>>());
    for v in 1..=20u64 {
        let view = params
            .get(&get_ref(&format!("/c:{v}")), Reveal::Decrypted)
            .await
            .unwrap();
        assert!(view.value.unwrap().starts_with('s'));
    }
}

#[tokio::test]
async fn secrets_are_sealed_at_rest_and_shown_only_when_decryption_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (params, store) = open(dir.path()).await;
    params
        .put(
            put("/s", Some(ParamType::SecureString), "hunter2-secret"),
            "t",
        )
        .await
        .unwrap();
    let raw = store.range("/").await.unwrap();
    for kv in &raw.kvs {
        assert!(
            !String::from_utf8_lossy(&kv.value).contains("hunter2"),
            "{} holds the value in plain text",
            kv.key
        );
    }
    assert_eq!(
        params
            .get(&get_ref("/s"), Reveal::Plain)
            .await
            .unwrap()
            .value,
        None
    );
    assert_eq!(
        params
            .get(&get_ref("/s"), Reveal::Decrypted)
            .await
            .unwrap()
            .value
            .as_deref(),
        Some("hunter2-secret")
    );
    // A new version without a type stays a SecureString.
    let next = params.put(put("/s", None, "second"), "t").await.unwrap();
    assert_eq!(next.kind, "SecureString");
    assert!(next.key.is_some());
}

#[tokio::test]
async fn rotation_and_rewrap_keep_every_version_readable_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (params, _) = open(dir.path()).await;
        params
            .put(put("/r", Some(ParamType::SecureString), "one"), "t")
            .await
            .unwrap();
        params.rotate("default", None).await.unwrap();
        params.put(put("/r", None, "two"), "t").await.unwrap();
        let imported = dozen_params::Key::parse(&"cd".repeat(32)).unwrap();
        let key = params.rotate("default", Some(imported)).await.unwrap();
        assert_eq!(key.version, 3);
        assert_eq!(params.rewrap().await.unwrap(), 2);
        assert_eq!(params.rewrap().await.unwrap(), 0, "nothing left to move");
    }
    let (params, _) = open(dir.path()).await;
    for (v, want) in [(1, "one"), (2, "two")] {
        let view = params
            .get(&get_ref(&format!("/r:{v}")), Reveal::Decrypted)
            .await
            .unwrap();
        assert_eq!(view.value.as_deref(), Some(want));
        assert_eq!(view.key.as_deref(), Some("default:3"));
    }
}

#[tokio::test]
async fn listings_page_through_a_path_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let (params, _) = open(dir.path()).await;
    for name in ["/p/a", "/p/b", "/p/c/d", "/p/e", "/pq/x", "/p/f"] {
        params.put(put(name, None, "v"), "t").await.unwrap();
    }
    let all = |_: &str| Some(Reveal::Plain);
    let direct = params.list("/p", false, None, 100, all).await.unwrap();
    let names: Vec<_> = direct.parameters.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["/p/a", "/p/b", "/p/e", "/p/f"]);
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = params
            .list("/p/", true, after.as_deref(), 2, all)
            .await
            .unwrap();
        assert!(page.parameters.len() <= 2);
        seen.extend(page.parameters.into_iter().map(|p| p.name));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, ["/p/a", "/p/b", "/p/c/d", "/p/e", "/p/f"]);
    let hidden = params
        .list("/p", true, None, 100, |n| {
            (n != "/p/b").then_some(Reveal::Nothing)
        })
        .await
        .unwrap();
    assert_eq!(hidden.parameters.len(), 4);
    assert!(hidden.parameters.iter().all(|p| p.value.is_none()));
    params.delete("/p/a").await.unwrap();
    assert!(matches!(
        params.get(&get_ref("/p/a"), Reveal::Plain).await,
        Err(ControlError::NotFound { .. })
    ));
}

#[tokio::test]
async fn bad_input_is_refused_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (params, store) = open(dir.path()).await;
    let before = store
        .range("/dozen/params/v1/names")
        .await
        .unwrap()
        .kvs
        .len();
    for (p, says) in [
        (put("/a/../b", None, "v"), "`..`"),
        (put("/a//b", None, "v"), "empty segment"),
        (put(&format!("/{}", "a".repeat(1100)), None, "v"), "bytes"),
        (put("/a", None, &"x".repeat(9000)), "8192"),
        (put("/a", None, ""), "empty"),
    ] {
        let e = params.put(p, "t").await.unwrap_err();
        assert!(matches!(e, ControlError::Invalid(_)), "{e}");
        assert!(e.to_string().contains(says), "{e}");
    }
    let mut expired = put("/a", None, "v");
    expired.expires_at_ms = Some(1);
    assert!(params.put(expired, "t").await.is_err());
    let after = store
        .range("/dozen/params/v1/names")
        .await
        .unwrap()
        .kvs
        .len();
    assert_eq!(before, after);
}

#[tokio::test]
async fn a_rotation_on_another_server_is_used_by_the_next_write_here() {
    let dir = tempfile::tempdir().unwrap();
    let (a, store) = open(dir.path()).await;
    let root = dozen_params::Key::parse(&"ab".repeat(32)).unwrap();
    let b = ParamStore::open(store.clone(), root).await.unwrap();
    b.put(put("/k", Some(ParamType::SecureString), "one"), "t")
        .await
        .unwrap();
    a.rotate("default", None).await.unwrap();
    let second = b.put(put("/k", None, "two"), "t").await.unwrap();
    assert_eq!(second.key.as_deref(), Some("default:2"));
    let read = b.get(&get_ref("/k:1"), Reveal::Decrypted).await.unwrap();
    assert_eq!(read.value.as_deref(), Some("one"));
}
