//! Growth: blobs no release names are collected (after their upload grace); those a kept
//! release names stay, and go once their service does.

use std::sync::Arc;
use std::time::Duration;

use dozen_server::AppState;
use dozen_store::blob::{sha256_digest, BlobStore, FsBlobStore};
use dozen_store::embedded::EmbeddedStore;

#[tokio::test]
async fn blobs_go_once_no_release_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
    let blobs = Arc::new(FsBlobStore::new(dir.path().join("blobs")).unwrap());
    let state = AppState::new(
        store.clone(),
        blobs.clone(),
        "t0ken".into(),
        Duration::from_secs(10),
    );
    let bundle = sha256_digest(b"the web bundle");
    let stray = sha256_digest(b"uploaded, never applied");
    blobs.put(&bundle, b"the web bundle").unwrap();
    blobs.put(&stray, b"uploaded, never applied").unwrap();
    let stack = dozen_spec::parse_str(
        "name = \"shop\"\n[services.web]\ncommand = \"./web\"\n",
        "dozen.toml",
        dozen_spec::Format::Toml,
        None,
    )
    .unwrap();
    let artifacts = [("web".to_string(), bundle.clone())].into();
    dozen_control::desired::apply(store.as_ref(), &stack, &artifacts, &Default::default())
        .await
        .unwrap();

    // Within the grace, even the stray upload stays (its release may be on its way).
    let removed = dozen_server::blobs::collect_once(&state, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(removed.is_empty(), "{removed:?}");
    let removed = dozen_server::blobs::collect_once(&state, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(removed, vec![stray.clone()]);
    assert!(blobs.contains(&bundle).unwrap());

    // The service goes (and its releases with it): so does its bundle.
    dozen_control::desired::down(store.as_ref(), "shop")
        .await
        .unwrap();
    let removed = dozen_server::blobs::collect_once(&state, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(removed, vec![bundle.clone()]);
}
