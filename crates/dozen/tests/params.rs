//! The parameter store's root key: written on first start, readable by its owner alone; a
//! wrong or missing one stops the start with a clear error and changes nothing on disk.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dozen_testkit::Dozen;

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");

/// Every file under `dir` with its content.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.insert(p.display().to_string(), bytes);
            }
        }
    }
    out
}

/// `dozen server` that is expected to stop at start: its exit status and what it said.
fn failed_start(d: &Dozen, env: &[(&str, &str)]) -> (bool, String) {
    let mut child = Command::new(DOZEN)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--no-agent",
            "--no-proxy",
        ])
        .env("DOZEN_DATA_DIR", d.data_dir())
        .env_remove("DOZEN_MASTER_KEY")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the server kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn the_root_key_is_made_once_and_a_wrong_or_missing_one_stops_the_start() {
    let mut d = Dozen::new(DOZEN);
    d.server_args.push("--no-proxy".into());
    d.start_server(false);
    let key_file = d.data_dir().join("master.key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(key.trim().len(), 64, "64 hex digits");
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let log = std::fs::read_to_string(d.path("server.log")).unwrap();
    assert!(
        log.contains("a new root key for the parameter store: back it up"),
        "{log}"
    );
    assert!(!log.contains(key.trim()), "the key is never logged");
    d.kill_server();

    // A wrong key: refused, naming the problem, and nothing on disk changes.
    let before = snapshot(&d.data_dir());
    let (ok, said) = failed_start(&d, &[("DOZEN_MASTER_KEY", &"ab".repeat(32))]);
    assert!(!ok, "{said}");
    assert!(
        said.contains("the root key does not open the keys this store holds")
            && said.contains("(the root key given: DOZEN_MASTER_KEY)"),
        "{said}"
    );
    assert!(
        !said.contains(&"ab".repeat(32)),
        "the key is never repeated"
    );
    assert_eq!(snapshot(&d.data_dir()), before, "nothing on disk changed");

    // A malformed one: refused without repeating it.
    let (ok, said) = failed_start(&d, &[("DOZEN_MASTER_KEY", "not a key at all")]);
    assert!(
        !ok && said.contains("DOZEN_MASTER_KEY") && !said.contains("not a key"),
        "{said}"
    );

    // No key at all for a store that has keys: refused, not a new key made.
    std::fs::rename(&key_file, d.path("master.key.backup")).unwrap();
    let before = snapshot(&d.data_dir());
    let (ok, said) = failed_start(&d, &[]);
    assert!(!ok, "{said}");
    assert!(
        said.contains("sealed with a root key, and none was given"),
        "{said}"
    );
    assert_eq!(snapshot(&d.data_dir()), before, "no new key was written");

    // A key file others can read: refused until it is private.
    std::fs::rename(d.path("master.key.backup"), &key_file).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, said) = failed_start(&d, &[]);
    assert!(
        !ok && said.contains("can be read by others (mode 644)"),
        "{said}"
    );
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The right key again: it starts.
    d.start_server(false);
}
