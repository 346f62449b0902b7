//! End-to-end: CLI habits a user relies on: commands end quietly when their reader goes away,
//! `restart`, `stop` and `rollback` wait when asked, `logs` prints times and refuses a task
//! that does not exist.

use std::time::Duration;

use dozen_testkit::{eventually, Dozen};

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const APP: &str = env!("CARGO_BIN_EXE_dozen-testapp");

fn running_stack(replicas: u32) -> Dozen {
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "habits"
[services.web]
command = ["{APP}"]
replicas = {replicas}
stop_timeout = "1s"
health = {{ http = "/healthz", interval = "200ms" }}
[services.web.env]
EMIT_LINES = "2"
"#
        ),
    );
    d.ok(&["apply"]);
    d
}

fn task_names(d: &Dozen) -> Vec<String> {
    let mut names: Vec<String> = d.json(&["ps"])["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// Seen: `dozen ps | head -1` panicked with "failed printing to stdout: Broken pipe" (exit
/// 101). Every listing command whose reader is gone before it prints ends with 0, quietly.
#[test]
fn every_listing_command_ends_quietly_when_its_reader_goes_away() {
    let d = running_stack(1);
    let listings: &[&[&str]] = &[
        &["ps"],
        &["ps", "-o", "json"],
        &["logs", "web"],
        &["events"],
        &["releases", "web"],
        &["nodes"],
        &["proxies"],
        &["cluster"],
        &["plan"],
        &["schema"],
        &["api", "openapi"],
        &["context", "list"],
        &["--help"],
    ];
    for args in listings {
        let (reader, writer) = std::io::pipe().unwrap();
        // The reader is gone before the command prints its first byte.
        drop(reader);
        let out = d.command(args).stdout(writer).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !said.contains("panicked"),
            "`dozen {}` exited {} saying: {said}",
            args.join(" "),
            out.status
        );
    }
}

#[test]
fn restart_stop_and_rollback_wait_when_asked() {
    let d = running_stack(2);
    let before = task_names(&d);
    let out = d.ok(&["restart", "web", "--wait"]);
    assert!(out.contains("replacing every task"), "{out}");
    // Returned only once every task was replaced and the new ones are ready.
    let after = task_names(&d);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        after.iter().all(|t| !before.contains(t)),
        "{before:?} -> {after:?}"
    );
    let ready = d.ready_tasks("web");
    assert_eq!(ready.len(), 2);

    // A second release, then back to the first.
    d.write(
        "dozen.toml",
        &std::fs::read_to_string(d.path("dozen.toml"))
            .unwrap()
            .replace("EMIT_LINES = \"2\"", "EMIT_LINES = \"3\""),
    );
    d.ok(&["apply"]);
    d.ok(&["rollback", "web", "--wait"]);
    let ps = d.json(&["ps"]);
    let tasks = ps["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{ps}");
    assert!(tasks.iter().all(|t| t["release"] == 3), "{ps}");
    assert_eq!(d.ready_tasks("web").len(), 2);

    d.ok(&["stop", "web", "--wait"]);
    assert!(
        task_names(&d).is_empty(),
        "every task gone once stop returns"
    );
    // Each stop says who decided it and why.
    let events = d.ok(&["events", "web"]);
    for why in [
        "replaced by `dozen restart` (new before old)",
        "replaced by release #3 (new before old)",
        "the service was stopped (`dozen stop`)",
        "stopped: drained: out of routing, its requests finished  (controller)",
    ] {
        assert!(events.contains(why), "`{why}` in:\n{events}");
    }
}

#[test]
fn logs_print_times_and_refuse_a_task_that_does_not_exist() {
    let d = running_stack(1);
    let text = eventually(Duration::from_secs(20), "the task's lines", || {
        let text = d.ok(&["logs", "web", "--timestamps"]);
        text.contains("line 1").then_some(text)
    });
    let first = text.lines().next().unwrap();
    // 2026-12-04T17:08:00.123Z web-… | …
    let (time, rest) = first.split_once(' ').unwrap();
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{first}"
    );
    assert!(rest.starts_with("web-"), "{first}");

    let out = d.cli(&["logs", "web", "--task", "web-nosuch"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("no task `web-nosuch` in service `web`; `dozen ps web` lists its tasks"),
        "{said}"
    );
}

/// Seen: a port clash printed "error: or run without a proxy: --no-proxy: cannot listen on …"
/// (the clauses backwards). It is one sentence naming the port and the flag that moves it.
#[test]
fn a_port_clash_on_the_proxy_is_one_readable_sentence() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let d = Dozen::new(DOZEN);
    let out = d
        .command(&[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--proxy-listen",
            &address,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    let error = said
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        error.starts_with(&format!(
            "error: cannot listen on {address} for the proxy ("
        )),
        "{said}"
    );
    assert!(
        error.ends_with(
            "): free that port or choose another with --proxy-listen, or run without a proxy (--no-proxy)"
        ),
        "{said}"
    );
}

/// The project's docs stand on their own: a user's clone has nothing outside the repository,
/// so no doc points outside it, and every relative link in them leads to a file that exists.
#[test]
fn the_docs_stand_on_their_own() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap();
    let mut docs = vec![root.join("README.md")];
    for dir in ["docs", "examples/demo", "bench"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            docs.extend(entries.flatten().map(|e| e.path()).filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "md" || x == "sh" || x == "toml")
            }));
        }
    }
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        // The design documents the project started from are not part of it.
        for outside in ["blueprint", "DEVELOPERS.md"] {
            assert!(
                !text.contains(outside),
                "{} mentions `{outside}`, which a clone does not have",
                doc.display()
            );
        }
        // Markdown links: `](target)` with a relative target, which must lead to a file
        // inside the repository.
        for (i, _) in text.match_indices("](") {
            let target = text[i + 2..].split(')').next().unwrap_or_default();
            let path = target.split('#').next().unwrap_or_default();
            if path.is_empty() || path.contains("://") || path.starts_with("mailto:") {
                continue;
            }
            let resolved = doc.parent().unwrap().join(path).canonicalize();
            assert!(
                resolved.is_ok_and(|p| p.starts_with(&root)),
                "{} links to `{target}`, which is not in the repository",
                doc.display()
            );
        }
    }
}
