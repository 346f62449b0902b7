//! The built-in registry with the clients people use: the real `docker` CLI logs in, pushes
//! and pulls through the engine, and `skopeo` copies images in and out; every digest stays
//! the same on the way.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use dozen_testkit::images::{self, docker};
use dozen_testkit::{eventually, Dozen};

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");

/// False (the test skips) without an engine or skopeo, which fails in CI (it has both).
fn clients_here() -> bool {
    let skopeo = Command::new("skopeo").arg("--version").output().is_ok();
    if images::engine_answers() && skopeo {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI has a Docker Engine and skopeo"
    );
    eprintln!("skipped: needs a Docker Engine and skopeo (this test runs in CI)");
    false
}

/// Runs `program args`, feeding `stdin`; (success, stdout, stderr).
fn run(program: &str, args: &[&str], env: &[(&str, &Path)], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The manifest digest an OCI layout directory holds for its one image.
fn layout_digest(dir: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Removes the test's images from the engine, however the test ends.
struct Images(Vec<String>);
impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = Command::new("docker").args(["rmi", "-f", image]).output();
        }
    }
}

#[test]
fn docker_pushes_and_pulls_and_skopeo_copies_in_and_out_with_equal_digests() {
    if !clients_here() {
        return;
    }
    let mut d = Dozen::new(DOZEN);
    d.server_args.push("--no-proxy".into());
    d.start_server(false);
    let registry = format!("127.0.0.1:{}", d.port);
    let token = d.token();
    let docker_config = d.dir.path().join("docker-config");
    let env = [("DOCKER_CONFIG", docker_config.as_path())];

    // An image of its own (a rootfs with a random file, so its layer is new to the registry).
    let rootfs = d.dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let unique = std::fs::read("/proc/sys/kernel/random/uuid").unwrap();
    std::fs::write(rootfs.join("data"), unique.repeat(5000)).unwrap();
    let suffix = format!("{}-{}", d.port, std::process::id());
    let local = format!("dozen-test/registry-{suffix}:1");
    let pushed = format!("{registry}/shop/app-{suffix}:1");
    let _cleanup = Images(vec![local.clone(), pushed.clone()]);
    let tar = Command::new("tar")
        .args(["-C", &rootfs.display().to_string(), "-c", "."])
        .output()
        .unwrap();
    let mut import = Command::new("docker")
        .args(["import", "--change", "LABEL dozen-test=1", "-", &local])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    import.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
    assert!(import.wait().unwrap().success());
    let image_id = docker(&["inspect", "-f", "{{.Id}}", &local]);
    docker(&["tag", &local, &pushed]);

    // Without logging in, the push is refused; a wrong token does not log in.
    let (ok, _, err) = run("docker", &["push", &pushed], &env, "");
    assert!(
        !ok && (err.contains("no basic auth credentials") || err.contains("unauthorized")),
        "{err}"
    );
    let (ok, _, err) = run(
        "docker",
        &["login", &registry, "-u", "dozen", "--password-stdin"],
        &env,
        "not-the-token",
    );
    assert!(!ok, "a wrong token logged in: {err}");
    let (ok, _, err) = run(
        "docker",
        &["login", &registry, "-u", "dozen", "--password-stdin"],
        &env,
        &token,
    );
    assert!(ok, "docker login: {err}");

    let (ok, out, err) = run("docker", &["push", &pushed], &env, "");
    assert!(ok, "docker push: {out}{err}");
    let digest = out
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in the push's output: {out}"))
        .to_string();

    // Gone from the engine, then pulled back: the same image under the same digest.
    docker(&["rmi", "-f", &image_id]);
    let (ok, out, err) = run("docker", &["pull", &pushed], &env, "");
    assert!(ok, "docker pull: {out}{err}");
    assert!(out.contains(&digest), "{out}");
    assert_eq!(docker(&["inspect", "-f", "{{.Id}}", &pushed]), image_id);
    let repo_digests = docker(&["inspect", "-f", "{{json .RepoDigests}}", &pushed]);
    assert!(
        repo_digests.contains(&format!("{registry}/shop/app-{suffix}@{digest}")),
        "{repo_digests}"
    );

    // skopeo: registry to registry keeps the digest (a mount across repositories).
    let creds = format!("dozen:{token}");
    let skopeo = |args: &[&str]| {
        let mut all = vec!["--insecure-policy"];
        all.extend_from_slice(args);
        let (ok, out, err) = run("skopeo", &all, &[], "");
        assert!(ok, "skopeo {}: {out}{err}", args.join(" "));
        out
    };
    let copy = format!("docker://{registry}/copies/app-{suffix}:same");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--src-creds",
        &creds,
        "--dest-creds",
        &creds,
        &format!("docker://{pushed}"),
        &copy,
    ]);
    let inspected = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        &creds,
        "--format",
        "{{.Digest}}",
        &copy,
    ]);
    assert_eq!(inspected.trim(), digest);

    // Out to an OCI layout, in again from it, and out once more: one digest throughout.
    let a = d.dir.path().join("oci-a");
    let b = d.dir.path().join("oci-b");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        &creds,
        &copy,
        &format!("oci:{}:v1", a.display()),
    ]);
    let oci_digest = layout_digest(&a);
    let back = format!("docker://{registry}/copies/app-{suffix}:from-oci");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &creds,
        &format!("oci:{}:v1", a.display()),
        &back,
    ]);
    let inspected = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        &creds,
        "--format",
        "{{.Digest}}",
        &back,
    ]);
    assert_eq!(inspected.trim(), oci_digest);
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        &creds,
        &back,
        &format!("oci:{}:v1", b.display()),
    ]);
    assert_eq!(layout_digest(&b), oci_digest);

    // Without credentials skopeo is refused too.
    let (ok, _, err) = run("skopeo", &["inspect", "--tls-verify=false", &back], &[], "");
    assert!(!ok && err.to_lowercase().contains("unauthorized"), "{err}");
}

/// The image each running container of `service` was created from.
fn running_images(d: &Dozen, service: &str) -> Vec<String> {
    d.ready_tasks(service)
        .iter()
        .flat_map(|t| {
            let filter = format!("label=dozen.task={}", t["task"].as_str().unwrap());
            docker(&["ps", "-q", "--filter", &filter])
                .lines()
                .map(|id| docker(&["inspect", "--format", "{{.Config.Image}}", id]))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A release runs the manifest its tag named when it was made: pushing the tag again changes
/// nothing that runs until the next apply (which `plan` shows), and rollback returns the
/// exact image.
#[test]
fn a_release_keeps_the_image_its_tag_named_and_rollback_returns_it() {
    if !clients_here() {
        return;
    }
    let bin = images::static_binaries(&["dozen-testapp"], &[]);
    let v1 = "dozen-test/testapp:latest";
    let v2 = "dozen-test/testapp:other";
    images::build(v1, &[(bin.join("dozen-testapp"), "/testapp")], "/testapp");
    let version = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(version.path(), "2\n").unwrap();
    images::build(
        v2,
        &[
            (bin.join("dozen-testapp"), "/testapp"),
            (version.path().to_path_buf(), "/VERSION"),
        ],
        "/testapp",
    );

    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    let first = images::push_to_registry(&d, v1, "shop/pinned:live");
    d.write(
        "dozen.toml",
        r#"
name = "pins"
[services.web]
image = "shop/pinned:live"
stop_timeout = "2s"
health = { http = "/healthz", interval = "200ms" }
"#,
    );
    d.ok(&["apply", "--timeout", "60s"]);
    let mirror = std::fs::read_to_string(d.data_dir().join("agent").join("mirror-port")).unwrap();
    let by_digest = |digest: &str| format!("127.0.0.1:{}/shop/pinned@{digest}", mirror.trim());
    assert_eq!(running_images(&d, "web"), vec![by_digest(&first)]);

    // The tag moves: nothing that runs changes; `plan` says what `apply` would do.
    let second = images::push_to_registry(&d, v2, "shop/pinned:live");
    assert_ne!(first, second);
    let plan = d.ok(&["plan"]);
    assert!(plan.contains("image_digest"), "{plan}");
    assert_eq!(running_images(&d, "web"), vec![by_digest(&first)]);
    let untouched = d.tasks("web");
    assert_eq!(untouched.len(), 1);

    d.ok(&["apply", "--timeout", "60s"]);
    eventually(Duration::from_secs(60), "the new image runs", || {
        (running_images(&d, "web") == vec![by_digest(&second)]).then_some(())
    });
    let releases = d.json(&["releases", "web"]);
    let pinned: Vec<&str> = releases
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["image_pin"]["digest"].as_str().unwrap())
        .collect();
    assert_eq!(pinned.len(), 2, "{releases}");
    assert!(pinned.contains(&first.as_str()) && pinned.contains(&second.as_str()));

    // Rollback runs the first manifest again, though the tag names the second.
    d.ok(&["rollback", "web", "--wait", "--timeout", "60s"]);
    eventually(
        Duration::from_secs(60),
        "the first image runs again",
        || (running_images(&d, "web") == vec![by_digest(&first)]).then_some(()),
    );
    // The manifest a kept release runs cannot be deleted; its tag can.
    let registry = format!("http://127.0.0.1:{}", d.port);
    let delete = |reference: &str| {
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/stderr",
                "-w",
                "%{http_code}",
                "-X",
                "DELETE",
            ])
            .args(["-u", &format!("dozen:{}", d.token())])
            .arg(format!("{registry}/v2/shop/pinned/manifests/{reference}"))
            .output()
            .unwrap()
    };
    let refused = delete(&first);
    assert_eq!(String::from_utf8_lossy(&refused.stdout), "403");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("DENIED") && why.contains("of service `web`"),
        "{why}"
    );
    assert_eq!(String::from_utf8_lossy(&delete("live").stdout), "202");
    d.ok(&["down"]);
}

/// `build = { context }`: `apply` builds through the engine (its steps on the terminal),
/// pushes to dozen's registry and runs exactly what it pushed; a failed build names its step
/// and applies nothing; `dozen build` pushes without applying.
#[test]
fn apply_builds_pushes_and_runs_the_image_and_a_failed_build_changes_nothing() {
    if !clients_here() {
        return;
    }
    let bin = images::static_binaries(&["dozen-testapp"], &[]);
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    let context = d.dir.path().join("app");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::copy(bin.join("dozen-testapp"), context.join("testapp")).unwrap();
    let dockerfile = |extra: &str| {
        std::fs::write(
            context.join("Dockerfile"),
            format!("FROM scratch\nCOPY testapp /testapp\n{extra}ENTRYPOINT [\"/testapp\"]\nLABEL dozen-test=1\n"),
        )
        .unwrap();
    };
    dockerfile("");
    let repository = format!("shop/built-{}", d.port);
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "built"
[services.web]
image = "{repository}"
build = {{ context = "./app" }}
stop_timeout = "2s"
health = {{ http = "/healthz", interval = "200ms" }}
"#
        ),
    );
    let _cleanup = Images(vec![format!("127.0.0.1:{}/{repository}:latest", d.port)]);
    let out = d.command(&["apply", "--timeout", "60s"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Step 1/") && stderr.contains("pushing"),
        "{stderr}"
    );
    d.wait_ready("web", 1);
    let releases = d.json(&["releases", "web"]);
    let first = releases[0]["image_pin"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mirror = std::fs::read_to_string(d.data_dir().join("agent").join("mirror-port")).unwrap();
    let running = |digest: &str| format!("127.0.0.1:{}/{repository}@{digest}", mirror.trim());
    assert_eq!(running_images(&d, "web"), vec![running(&first)]);
    let task = d.ready_tasks("web")[0]["task"]
        .as_str()
        .unwrap()
        .to_string();

    // A step that fails: said with its step; nothing applied, the task runs on.
    dockerfile("RUN [\"/testapp\", \"exit\", \"3\"]\n");
    let out = d.command(&["apply", "--timeout", "60s"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("building `web` failed at Step 3/5 : RUN")
            && stderr.contains("nothing was applied"),
        "{stderr}"
    );
    assert_eq!(d.json(&["releases", "web"]).as_array().unwrap().len(), 1);
    assert_eq!(
        d.ready_tasks("web")[0]["task"].as_str(),
        Some(task.as_str())
    );

    // `dozen build` pushes a new image; only `apply` runs it.
    dockerfile("LABEL version=2\n");
    let out = d.ok(&["build", "web"]);
    assert!(
        out.contains(&format!("web: pushed {repository}:latest (sha256:")),
        "{out}"
    );
    assert_eq!(d.json(&["releases", "web"]).as_array().unwrap().len(), 1);
    let plan = d.ok(&["plan"]);
    assert!(plan.contains("image_digest"), "{plan}");
    d.ok(&["apply", "--timeout", "60s"]);
    let releases = d.json(&["releases", "web"]);
    let second = releases
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["image_pin"]["digest"].as_str().unwrap().to_string())
        .find(|d| *d != first)
        .expect("a release of the new image");
    eventually(Duration::from_secs(60), "the new image runs", || {
        (running_images(&d, "web") == vec![running(&second)]).then_some(())
    });
    d.ok(&["down"]);
}
