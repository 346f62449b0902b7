//! Secrets reach tasks, and nothing else: a release pins each secret to a version, the agent
//! fetches exactly those with the task's identity and writes them on a memory file system
//! (or into the task's environment when asked); a task's identity reads only what its service
//! may; a new version redeploys a service that asked, and a rollback brings the old value
//! back. Then a scan finds each secret in plain text only in its own task's file or
//! environment: not in the data dir, the store, the logs, the audit trail, a command line or
//! any other process's environment.

use std::path::Path;
use std::time::Duration;

use dozen_testkit::{eventually, http_get, Dozen};
use serde_json::Value;

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const APP: &str = env!("CARGO_BIN_EXE_dozen-testapp");

fn put_secret(d: &Dozen, name: &str, value: &str) {
    let out = d.cli_with_stdin(&["param", "put", name, "--secure"], value);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn random(label: &str) -> String {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{label}-{hex}")
}

fn port_of(task: &Value) -> u16 {
    task["status"]["host_port"].as_u64().unwrap() as u16
}

fn get(port: u16, path: &str) -> String {
    http_get(port, path)
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// `GET /v1/param` as whoever `token` names: status and body.
fn read_as(d: &Dozen, token: &str, name: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-G"])
        .args(["-H", &format!("authorization: Bearer {token}")])
        .args(["--data-urlencode", &format!("name={name}")])
        .args(["--data-urlencode", "decrypt=true"])
        .arg(format!("{}/v1/param", d.url()))
        .output()
        .expect("curl");
    dozen_testkit::code_and_body(&out)
}

/// Every file under `dir` (following no links) holding `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(kind) = e.file_type() else { continue };
            let p = e.path();
            if kind.is_dir() {
                stack.push(p);
            } else if kind.is_file() {
                if let Ok(bytes) = std::fs::read(&p) {
                    if bytes.windows(needle.len()).any(|w| w == needle) {
                        found.push(p.display().to_string());
                    }
                }
            }
        }
    }
    found
}

/// Every process whose command line or environment holds `needle`: (pid, where).
fn processes_holding(needle: &[u8]) -> Vec<(u32, &'static str)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        for (file, what) in [("cmdline", "command line"), ("environ", "environment")] {
            if let Ok(bytes) = std::fs::read(format!("/proc/{pid}/{file}")) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push((pid, what));
                }
            }
        }
    }
    found
}

#[test]
fn tasks_get_their_secrets_and_nothing_leaks_anywhere_else() {
    let mut d = Dozen::new(DOZEN);
    d.server_args.extend(
        ["--param-check-every", "100ms"]
            .iter()
            .map(|s| s.to_string()),
    );
    d.start_without_proxy();
    let db_password = random("db-pw");
    let api_key_1 = random("api-key-one");
    let api_key_2 = random("api-key-two");
    let other = random("other");
    put_secret(&d, "/shop/prod/db/password", &db_password);
    d.ok(&["param", "label", "/shop/prod/db/password", "prod"]);
    put_secret(&d, "/shop/prod/api/key", &api_key_1);
    put_secret(&d, "/shop/other/x", &other);
    let service = |name: &str, extra: &str| {
        format!(
            "[services.{name}]\ncommand = [\"{APP}\"]\nhealth = {{ http = \"/healthz\", interval = \"200ms\" }}\n{extra}\n"
        )
    };
    let stack = format!(
        "name = \"shop\"\n{}{}{}",
        service(
            "web",
            "secrets = { DB_PASSWORD = \"/shop/prod/db/password@prod\" }"
        ),
        service(
            "envy",
            "secrets = { API_KEY = \"/shop/prod/api/key\" }\nsecrets_as = \"env\"\non_change = \"redeploy\""
        ),
        service("other", "secrets = { X = \"/shop/other/x\" }"),
    );
    let file = d.write("shop.toml", &stack);
    let plan = d.ok(&["plan", "-f", file.to_str().unwrap()]);
    assert!(!plan.contains(&db_password));
    d.ok(&["apply", "-f", file.to_str().unwrap()]);

    // The release pinned each secret to a version.
    let releases = d.json(&["releases", "web"]);
    assert_eq!(
        releases[0]["secrets"]["DB_PASSWORD"],
        serde_json::json!({ "name": "/shop/prod/db/password", "version": 1 })
    );

    // A file, readable by the task; the environment, when asked.
    let web = d.wait_ready("web", 1).remove(0);
    assert_eq!(get(port_of(&web), "/secret/DB_PASSWORD"), db_password);
    assert_eq!(get(port_of(&web), "/env/DB_PASSWORD"), "");
    let envy = d.wait_ready("envy", 1).remove(0);
    assert_eq!(get(port_of(&envy), "/env/API_KEY"), api_key_1);
    assert_eq!(get(port_of(&envy), "/secret/API_KEY"), "");

    // The file is the task user's alone, in a directory the task cannot write (so it cannot
    // plant a link for the agent to follow).
    {
        use std::os::unix::fs::MetadataExt;
        let task = web["task"].as_str().unwrap();
        let found = files_holding(Path::new("/dev/shm"), db_password.as_bytes());
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].ends_with(&format!("/{task}/DB_PASSWORD")),
            "{found:?}"
        );
        let file = std::fs::metadata(&found[0]).unwrap();
        let dir = std::fs::metadata(Path::new(&found[0]).parent().unwrap()).unwrap();
        assert_eq!(file.mode() & 0o777, 0o400);
        assert_ne!(
            file.uid(),
            dir.uid(),
            "the task's user owns the file, not the directory"
        );
        assert_eq!(dir.mode() & 0o777, 0o750);
    }

    // The task's identity reads its own secret and nothing of another service.
    let token = get(port_of(&web), "/secret/.token");
    assert!(token.starts_with("dzk."), "{token}");
    let (code, body) = read_as(&d, &token, "/shop/prod/db/password:1");
    assert_eq!(code, 200, "{body}");
    // Its own secret, but not the version its release pinned: refused, saying which.
    let (code, body) = read_as(&d, &token, "/shop/prod/db/password");
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("pinned /shop/prod/db/password:1 only"),
        "{body}"
    );
    let (code, body) = read_as(&d, &token, "/shop/other/x");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("`read:/shop/other/x`"), "{body}");
    assert!(!body.contains(&other));
    let web_task = web["task"].as_str().unwrap().to_string();
    let records = d.json(&["audit", "-n", "1000"]);
    let records = records.as_array().unwrap();
    let by_web = |outcome: &str, target: &str| {
        records.iter().any(|r| {
            r["who"] == format!("task {web_task} (shop/web)")
                && r["outcome"] == outcome
                && r["target"].as_str().unwrap().starts_with(target)
        })
    };
    assert!(by_web("ok", "/shop/prod/db/password:1"));
    assert!(by_web("denied", "/shop/other/x"));

    // A new version redeploys the service that asked; a rollback brings the old value back.
    put_secret(&d, "/shop/prod/api/key", &api_key_2);
    eventually(Duration::from_secs(30), "envy runs the new key", || {
        let ready = d.ready_tasks("envy");
        (ready.len() == 1 && get(port_of(&ready[0]), "/env/API_KEY") == api_key_2).then_some(())
    });
    let releases = d.json(&["releases", "envy"]);
    assert!(
        releases
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["cause"].as_str().unwrap().starts_with("secret changed")),
        "{releases}"
    );
    d.ok(&["rollback", "envy"]);
    eventually(
        Duration::from_secs(30),
        "envy runs the old key again",
        || {
            let ready = d.ready_tasks("envy");
            (ready.len() == 1 && get(port_of(&ready[0]), "/env/API_KEY") == api_key_1).then_some(())
        },
    );
    let envy = d.wait_ready("envy", 1).remove(0);
    let envy_pid = envy["status"]["pid"].as_u64().unwrap() as u32;
    let web_pid = web["status"]["pid"].as_u64().unwrap() as u32;

    // The scan: each secret in plain text only where its own task reads it.
    for (secret, allowed_file, allowed_pid) in [
        (&db_password, Some("DB_PASSWORD"), None),
        (&api_key_1, Some(".env.json"), Some(envy_pid)),
        (&other, Some("X"), None),
    ] {
        let needle = secret.as_bytes();
        let in_dozen_files = files_holding(d.path("").as_path(), needle);
        assert!(
            in_dozen_files.is_empty(),
            "{secret} in {in_dozen_files:?} (data dir, store, logs, audit trail)"
        );
        let in_memory_fs: Vec<String> = files_holding(Path::new("/dev/shm"), needle)
            .into_iter()
            .filter(|f| !allowed_file.is_some_and(|a| f.ends_with(&format!("/{a}"))))
            .collect();
        assert!(in_memory_fs.is_empty(), "{secret} in {in_memory_fs:?}");
        let in_processes: Vec<(u32, &str)> = processes_holding(needle)
            .into_iter()
            .filter(|(pid, what)| !(Some(*pid) == allowed_pid && *what == "environment"))
            .collect();
        assert!(
            in_processes.is_empty(),
            "{secret} in the {in_processes:?} of processes other than its task"
        );
    }
    // The newest key is not running anywhere now, and is found nowhere but the store's
    // envelope (sealed).
    assert!(processes_holding(api_key_2.as_bytes()).is_empty());

    // A stopped task's identity opens nothing, and its secrets are gone from memory.
    d.ok(&["stop", "web"]);
    eventually(Duration::from_secs(30), "web stopped", || {
        d.tasks("web").is_empty().then_some(())
    });
    let (code, body) = read_as(&d, &token, "/shop/prod/db/password:1");
    assert_eq!(code, 401, "{body}");
    assert!(files_holding(Path::new("/dev/shm"), db_password.as_bytes()).is_empty());
    let _ = web_pid;

    // An agent killed with its tasks cannot clear their secrets; its directory there names
    // its data dir, so the harness clears them when it removes that.
    let roots_of = |data: &Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir("/dev/shm")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join(".data-dir")).is_ok_and(|owner| {
                    Path::new(&*String::from_utf8_lossy(&owner)).starts_with(data)
                })
            })
            .map(|e| e.path())
            .collect()
    };
    let data = d.dir.path().to_path_buf();
    assert!(
        !roots_of(&data).is_empty(),
        "envy still runs with its secrets"
    );
    drop(d);
    assert_eq!(roots_of(&data), Vec::<std::path::PathBuf>::new());
}
