//! Container images for tests: binaries built statically (glibc's static libc: no loader, no
//! libraries) and images `FROM scratch` around them, as the engine here can pull nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the workspace root")
        .to_path_buf()
}

/// Builds `bins` of the `dozen` package statically with `features`, in a target dir of their
/// own (so the test build is not disturbed); returns the directory holding them.
pub fn static_binaries(bins: &[&str], features: &[&str]) -> PathBuf {
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("cluster-image");
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(workspace_root())
        .args(["build", "--target", &triple, "-p", "dozen"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_DEV_DEBUG", "0");
    if !features.is_empty() {
        cargo.args(["--features", &features.join(",")]);
    }
    for bin in bins {
        cargo.args(["--bin", bin]);
    }
    let out = cargo.output().expect("run cargo");
    assert!(
        out.status.success(),
        "static build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    target_dir.join(triple).join("debug")
}

/// Builds image `tag` `FROM scratch` holding `files` (source, path in the image) and an empty
/// /tmp, running `entrypoint`; removes the copy a rebuild replaced.
pub fn build(tag: &str, files: &[(PathBuf, &str)], entrypoint: &str) {
    let context = tempfile::tempdir().unwrap();
    let mut dockerfile = String::from("FROM scratch\n");
    for (i, (src, dest)) in files.iter().enumerate() {
        let name = format!("f{i}");
        std::fs::copy(src, context.path().join(&name))
            .unwrap_or_else(|e| panic!("cannot copy {}: {e}", src.display()));
        dockerfile.push_str(&format!("COPY {name} {dest}\n"));
    }
    std::fs::create_dir(context.path().join("tmp")).unwrap();
    dockerfile.push_str("COPY tmp /tmp\n");
    dockerfile.push_str(&format!("ENTRYPOINT [\"{entrypoint}\"]\n"));
    // Labelled, so the copy a rebuild replaces (left untagged) is found and removed below:
    // every run would otherwise leave one image behind.
    dockerfile.push_str("LABEL dozen-test=1\n");
    std::fs::write(context.path().join("Dockerfile"), dockerfile).unwrap();
    docker(&[
        "build",
        "-q",
        "-t",
        tag,
        &context.path().display().to_string(),
    ]);
    // Best effort: a prune already running (another test's) does the same.
    let _ = Command::new("docker")
        .args(["image", "prune", "-f", "--filter", "label=dozen-test=1"])
        .output();
}

/// Runs the docker CLI (tests only: the product talks to the engine's API) and insists.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker: {e}"));
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether a Docker Engine answers here.
pub fn engine_answers() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Removes, best effort, every container an agent whose home id is `home` made.
pub fn remove_containers_of(home: &str) {
    let listed = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=dozen.home={home}")])
        .output();
    let Ok(listed) = listed else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .arg("rm")
            .arg("-f")
            .args(&ids)
            .output();
    }
}

/// Logs the docker CLI in to `d`'s built-in registry (with a docker config of the test's
/// own), tags `local` as `<registry>/<repo_tag>`, pushes it and drops that tag again; returns
/// the digest the push reported.
pub fn push_to_registry(d: &crate::Dozen, local: &str, repo_tag: &str) -> String {
    use std::io::Write;
    let registry = format!("{}:{}", d.host, d.port);
    let config = d.dir.path().join("docker-config");
    let docker_with_config = |args: &[&str], stdin: &str| {
        let mut child = Command::new("docker")
            .args(args)
            .env("DOCKER_CONFIG", &config)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run docker");
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "docker {}: {text}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    docker_with_config(
        &["login", &registry, "-u", "dozen", "--password-stdin"],
        &d.token(),
    );
    let remote = format!("{registry}/{repo_tag}");
    docker(&["tag", local, &remote]);
    let out = docker_with_config(&["push", &remote], "");
    let _ = Command::new("docker").args(["rmi", &remote]).output();
    out.split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in the push's output: {out}"))
        .to_string()
}
