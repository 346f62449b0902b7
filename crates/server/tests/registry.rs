//! The built-in registry over real HTTP, as an OCI Distribution client sees it: uploads in one
//! piece and in chunks, mounts, manifests by tag and digest, listings in pages, deletion, the
//! spec's error codes, and the blob collector keeping what manifests name.

use std::sync::Arc;
use std::time::Duration;

use dozen_server::AppState;
use dozen_store::blob::{sha256_digest, BlobStore, FsBlobStore};
use dozen_store::embedded::EmbeddedStore;
use serde_json::Value;

const TOKEN: &str = "t0ken";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

struct Registry {
    base: String,
    http: reqwest::Client,
    state: Arc<AppState>,
    blobs: Arc<FsBlobStore>,
    _dir: tempfile::TempDir,
}

async fn registry() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
    let blobs = Arc::new(FsBlobStore::new(dir.path().join("blobs")).unwrap());
    let state = Arc::new(AppState::new(
        store,
        blobs.clone(),
        TOKEN.into(),
        Duration::from_secs(10),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(dozen_server::serve(listener, state.clone()));
    Registry {
        base,
        http: reqwest::Client::new(),
        state,
        blobs,
        _dir: dir,
    }
}

impl Registry {
    fn request(&self, method: &str, path: &str) -> reqwest::RequestBuilder {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        self.http
            .request(method, url)
            .basic_auth("dozen", Some(TOKEN))
            .timeout(Duration::from_secs(10))
    }

    /// What came back: the status, the code of the first error (if any), headers and body.
    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, String, Answer) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap().to_vec();
        let mut code = String::new();
        if status >= 400 && !body.is_empty() {
            let error: Value = serde_json::from_slice(&body).unwrap();
            code = error["errors"][0]["code"]
                .as_str()
                .unwrap_or("")
                .to_string();
            assert!(
                !error["errors"][0]["message"]
                    .as_str()
                    .unwrap_or("")
                    .is_empty(),
                "an error says why: {error}"
            );
        }
        (status, code, Answer { headers, body })
    }

    async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let (status, code, _) = self
            .send(
                self.request(
                    "POST",
                    &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
                )
                .body(bytes.to_vec()),
            )
            .await;
        assert_eq!((status, code.as_str()), (201, ""));
        digest
    }

    async fn push_manifest(&self, repo: &str, reference: &str, manifest: &str) -> (u16, String) {
        let (status, code, response) = self
            .send(
                self.request("PUT", &format!("/v2/{repo}/manifests/{reference}"))
                    .header("content-type", DOCKER_MANIFEST)
                    .body(manifest.to_string()),
            )
            .await;
        if status == 201 {
            assert_eq!(
                header(&response, "docker-content-digest"),
                sha256_digest(manifest.as_bytes())
            );
        }
        (status, code)
    }
}

struct Answer {
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

fn header(answer: &Answer, name: &str) -> String {
    answer
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn image_manifest(config: &str, layers: &[&str]) -> String {
    let layers: Vec<Value> = layers
        .iter()
        .map(|d| serde_json::json!({"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": d, "size": 1}))
        .collect();
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config, "size": 1},
        "layers": layers,
    })
    .to_string()
}

#[tokio::test]
async fn blobs_upload_whole_or_in_chunks_and_are_checked() {
    let r = registry().await;
    // Without the token: the challenge docker login answers.
    let (status, code, response) = r.send(r.http.get(format!("{}/v2/", r.base))).await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    assert!(header(&response, "www-authenticate").starts_with("Basic "));
    assert_eq!(
        header(&response, "docker-distribution-api-version"),
        "registry/2.0"
    );
    let (status, code, _) = r
        .send(
            r.http
                .get(format!("{}/v2/", r.base))
                .basic_auth("x", Some("wrong")),
        )
        .await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    let (status, _, _) = r.send(r.request("GET", "/v2/")).await;
    assert_eq!(status, 200);

    // Whole, with a digest that is not the content's: refused, nothing kept.
    let wrong = sha256_digest(b"something else");
    let (status, code, _) = r
        .send(
            r.request(
                "POST",
                &format!("/v2/shop/web/blobs/uploads/?digest={wrong}"),
            )
            .body("corrupt bytes"),
        )
        .await;
    assert_eq!((status, code.as_str()), (400, "DIGEST_INVALID"));
    assert!(!r.blobs.contains(&wrong).unwrap());
    let (status, code, _) = r
        .send(r.request("HEAD", &format!("/v2/shop/web/blobs/{wrong}")))
        .await;
    // HEAD carries no body: the status says it.
    assert_eq!(status, 404, "{code}");
    let (status, code, _) = r
        .send(r.request("GET", &format!("/v2/shop/web/blobs/{wrong}")))
        .await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));

    // In chunks: each must start where the upload is.
    let (status, _, started) = r
        .send(r.request("POST", "/v2/shop/web/blobs/uploads/"))
        .await;
    assert_eq!(status, 202);
    let location = header(&started, "location");
    assert!(
        location.starts_with("/v2/shop/web/blobs/uploads/"),
        "{location}"
    );
    let (status, _, first) = r
        .send(
            r.request("PATCH", &location)
                .header("content-range", "0-5")
                .body("hello "),
        )
        .await;
    assert_eq!((status, header(&first, "range").as_str()), (202, "0-5"));
    let (status, code, _) = r
        .send(
            r.request("PATCH", &location)
                .header("content-range", "3-8")
                .body("again"),
        )
        .await;
    assert_eq!((status, code.as_str()), (416, "BLOB_UPLOAD_INVALID"));
    let (status, _, _) = r.send(r.request("PATCH", &location).body("registry")).await;
    assert_eq!(status, 202);
    let (status, _, progress) = r.send(r.request("GET", &location)).await;
    assert_eq!((status, header(&progress, "range").as_str()), (204, "0-13"));
    let whole = sha256_digest(b"hello registry!");
    let (status, _, done) = r
        .send(
            r.request("PUT", &format!("{location}?digest={whole}"))
                .body("!"),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(header(&done, "docker-content-digest"), whole);
    // The session is over.
    let (status, code, _) = r.send(r.request("GET", &location)).await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UPLOAD_UNKNOWN"));
    let (status, _, blob) = r
        .send(r.request("GET", &format!("/v2/shop/web/blobs/{whole}")))
        .await;
    assert_eq!(status, 200);
    assert_eq!(blob.body.as_slice(), b"hello registry!");

    // A chunked upload closed with the wrong digest keeps nothing.
    let (_, _, started) = r
        .send(r.request("POST", "/v2/shop/web/blobs/uploads/"))
        .await;
    let location = header(&started, "location");
    let (status, code, _) = r
        .send(
            r.request("PUT", &format!("{location}?digest={wrong}"))
                .body("not it"),
        )
        .await;
    assert_eq!((status, code.as_str()), (400, "DIGEST_INVALID"));
    assert!(!r.blobs.contains(&wrong).unwrap());

    // Mounted into another repository, then deleted from the first.
    let (status, _, mounted) = r
        .send(r.request(
            "POST",
            &format!("/v2/shop/api/blobs/uploads/?mount={whole}&from=shop/web"),
        ))
        .await;
    assert_eq!(status, 201);
    assert_eq!(
        header(&mounted, "location"),
        format!("/v2/shop/api/blobs/{whole}")
    );
    // A mount of what the source does not hold starts an upload instead.
    let (status, _, _) = r
        .send(r.request(
            "POST",
            &format!("/v2/shop/api/blobs/uploads/?mount={wrong}&from=shop/web"),
        ))
        .await;
    assert_eq!(status, 202);
    let (status, _, _) = r
        .send(r.request("DELETE", &format!("/v2/shop/web/blobs/{whole}")))
        .await;
    assert_eq!(status, 202);
    let (status, code, _) = r
        .send(r.request("GET", &format!("/v2/shop/web/blobs/{whole}")))
        .await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));
    let (status, _, _) = r
        .send(r.request("HEAD", &format!("/v2/shop/api/blobs/{whole}")))
        .await;
    assert_eq!(status, 200);

    // Names and digests the spec does not allow.
    let (status, code, _) = r.send(r.request("POST", "/v2/Shop/blobs/uploads/")).await;
    assert_eq!((status, code.as_str()), (400, "NAME_INVALID"));
    let (status, code, _) = r
        .send(r.request("GET", "/v2/shop/web/blobs/sha256:nothex"))
        .await;
    assert_eq!((status, code.as_str()), (400, "DIGEST_INVALID"));
}

#[tokio::test]
async fn manifests_by_tag_and_digest_listings_deletion_and_collection() {
    let r = registry().await;
    let config = r.push_blob("shop/web", b"{\"config\":1}").await;
    let layer = r.push_blob("shop/web", b"a layer").await;
    let unknown = sha256_digest(b"never pushed");

    // A manifest naming a blob the repository lacks.
    let refused = image_manifest(&config, &[&unknown]);
    let (status, code) = r.push_manifest("shop/web", "v1", &refused).await;
    assert_eq!((status, code.as_str()), (400, "MANIFEST_BLOB_UNKNOWN"));
    let (status, code) = r
        .push_manifest("shop/web", "v1", "{\"schemaVersion\":1}")
        .await;
    assert_eq!((status, code.as_str()), (400, "MANIFEST_INVALID"));

    let manifest = image_manifest(&config, &[&layer]);
    let digest = sha256_digest(manifest.as_bytes());
    for tag in ["v1", "v2", "latest"] {
        assert_eq!(r.push_manifest("shop/web", tag, &manifest).await.0, 201);
    }
    // By digest, a mismatch is refused.
    let (status, code) = r.push_manifest("shop/web", &unknown, &manifest).await;
    assert_eq!((status, code.as_str()), (400, "DIGEST_INVALID"));

    // What a manifest needs cannot be deleted from under it.
    let (status, code, _) = r
        .send(r.request("DELETE", &format!("/v2/shop/web/blobs/{layer}")))
        .await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    let (status, _, got) = r.send(r.request("GET", "/v2/shop/web/manifests/v2")).await;
    assert_eq!(status, 200);
    assert_eq!(header(&got, "content-type"), DOCKER_MANIFEST);
    assert_eq!(header(&got, "docker-content-digest"), digest);
    assert_eq!(String::from_utf8(got.body.clone()).unwrap(), manifest);
    let (status, _, head) = r
        .send(r.request("HEAD", &format!("/v2/shop/web/manifests/{digest}")))
        .await;
    assert_eq!(
        (status, header(&head, "content-length")),
        (200, manifest.len().to_string())
    );
    let (status, code, _) = r.send(r.request("GET", "/v2/shop/web/manifests/v9")).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    let (status, code, _) = r.send(r.request("GET", "/v2/shop/nothing/tags/list")).await;
    assert_eq!((status, code.as_str()), (404, "NAME_UNKNOWN"));

    // Listings in pages, with a link to the next.
    let (_, _, page) = r.send(r.request("GET", "/v2/shop/web/tags/list?n=2")).await;
    let link = header(&page, "link");
    let body = page.json();
    assert_eq!(body["tags"], serde_json::json!(["latest", "v1"]));
    assert_eq!(link, "</v2/shop/web/tags/list?n=2&last=v1>; rel=\"next\"");
    let (_, _, page) = r
        .send(r.request("GET", "/v2/shop/web/tags/list?n=2&last=v1"))
        .await;
    assert_eq!(header(&page, "link"), "");
    assert_eq!(page.json()["tags"], serde_json::json!(["v2"]));
    let (_, _, catalog) = r.send(r.request("GET", "/v2/_catalog")).await;
    assert_eq!(
        catalog.json()["repositories"],
        serde_json::json!(["shop/web"])
    );

    // An upload whose file looks old (written early in a long push) but whose link is new
    // waits for its manifest.
    let early = r
        .push_blob("shop/web", b"the first layer of a long push")
        .await;
    let file = r
        ._dir
        .path()
        .join("blobs")
        .join(format!("sha256-{}", &early[7..]));
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    let removed = dozen_server::blobs::collect_once(&r.state, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(removed.is_empty(), "{removed:?}");
    assert!(r.blobs.contains(&early).unwrap());

    // Blobs nothing names are collected (past their grace): an upload no manifest came to
    // name, and the bytes of the refused manifest. What the manifest names stays.
    let stray = r.push_blob("shop/web", b"uploaded, never named").await;
    let mut removed = dozen_server::blobs::collect_once(&r.state, Duration::ZERO)
        .await
        .unwrap();
    removed.sort();
    let mut expected = vec![stray.clone(), early, sha256_digest(refused.as_bytes())];
    expected.sort();
    assert_eq!(removed, expected);
    let (status, code, _) = r
        .send(r.request("GET", &format!("/v2/shop/web/blobs/{stray}")))
        .await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));
    for kept in [&config, &layer, &digest] {
        assert!(r.blobs.contains(kept).unwrap(), "{kept}");
    }

    // Deleting a tag leaves the others; deleting by digest takes the rest with it.
    let (status, _, _) = r
        .send(r.request("DELETE", "/v2/shop/web/manifests/v1"))
        .await;
    assert_eq!(status, 202);
    let (_, _, tags) = r.send(r.request("GET", "/v2/shop/web/tags/list")).await;
    assert_eq!(tags.json()["tags"], serde_json::json!(["latest", "v2"]));
    let (status, _, _) = r
        .send(r.request("DELETE", &format!("/v2/shop/web/manifests/{digest}")))
        .await;
    assert_eq!(status, 202);
    let (status, code, _) = r.send(r.request("GET", "/v2/shop/web/manifests/v2")).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    let (status, code, _) = r
        .send(r.request("DELETE", &format!("/v2/shop/web/manifests/{digest}")))
        .await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    // Now nothing names them: the next collection takes them.
    let mut removed = dozen_server::blobs::collect_once(&r.state, Duration::ZERO)
        .await
        .unwrap();
    removed.sort();
    let mut expected = vec![config, layer, digest];
    expected.sort();
    assert_eq!(removed, expected);
}
