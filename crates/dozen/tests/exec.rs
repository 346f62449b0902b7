//! `dozen exec`: a command inside a running task, as that task runs (its environment,
//! directory and user), its output streamed back, its exit code the CLI's.

use dozen_testkit::Dozen;

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");
const APP: &str = env!("CARGO_BIN_EXE_dozen-testapp");

/// Pids of the `sleep 4321` processes on this machine.
fn sleeps() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            (cmdline == b"sleep\x004321\x00").then_some(pid)
        })
        .collect()
}

#[test]
fn exec_runs_a_command_as_the_task_runs_and_gives_back_its_output_and_exit_code() {
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "ex"
[services.web]
command = ["{APP}"]
replicas = 2
health = {{ http = "/healthz", interval = "200ms" }}
[services.web.env]
GREETING = "hello from the task's env"
"#
        ),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    let ready = d.wait_ready("web", 2);
    let second = ready[1]["task"].as_str().unwrap().to_string();
    let port = ready[1]["status"]["host_port"].as_u64().unwrap();

    let out = d
        .command(&[
            "exec",
            "web",
            "--task",
            &second,
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\"; echo \"port=$PORT\"; echo oops >&2; exit 7",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(7), "{stdout}{stderr}");
    assert_eq!(stdout, format!("hello from the task's env\nport={port}\n"));
    assert_eq!(stderr, "oops\n");
    // As the task's user (a root server gives tasks `nobody`), in the task's directory.
    let pid = ready[1]["status"]["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let task_uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let uid = d.ok(&["exec", "web", "--task", &second, "--", "id", "-u"]);
    assert_eq!(uid.trim(), task_uid);
    // Not dozen's own environment: the token never reaches a task, exec'd or not.
    let env = d.ok(&["exec", "web", "--", "env"]);
    assert!(
        env.contains("GREETING=") && env.contains("DOZEN_TASK="),
        "{env}"
    );
    assert!(
        !env.contains("DOZEN_DATA_DIR") && !env.contains("DOZEN_SERVER"),
        "{env}"
    );

    // A command whose reader goes away is ended, even one that says nothing.
    let mut reader = d
        .command(&["exec", "web", "--", "sleep", "4321"])
        .spawn()
        .unwrap();
    dozen_testkit::eventually(
        std::time::Duration::from_secs(10),
        "the exec'd sleep runs",
        || (!sleeps().is_empty()).then_some(()),
    );
    reader.kill().unwrap();
    reader.wait().unwrap();
    dozen_testkit::eventually(
        std::time::Duration::from_secs(10),
        "it ends with its reader",
        || sleeps().is_empty().then_some(()),
    );

    // Mistakes say what to do.
    let out = d.cli(&["exec", "web", "--task", "web-nosuch", "--", "true"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains("no task `web-nosuch`") && said.contains(&second),
        "{said}"
    );
    let out = d.cli(&["exec", "web", "-t", "--", "true"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("a terminal (-t) is for container tasks"),
        "{said}"
    );
    let out = d.cli(&["exec", "web", "--", "/no/such/program"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("cannot run `/no/such/program`"),
        "{said}"
    );
    let out = d.cli(&["exec", "nosuch", "--", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service `nosuch`"));
    d.ok(&["stop", "web", "--wait"]);
    let out = d.cli(&["exec", "web", "--", "true"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no task of `web` is running"), "{said}");
}

#[test]
fn stats_show_what_a_process_task_uses_within_its_limits() {
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    d.write(
        "dozen.toml",
        &format!(
            r#"
name = "st"
[services.busy]
command = ["{APP}"]
resources = {{ cpu = "250m", memory = "256MiB" }}
[services.busy.env]
SPIN = "1"
ALLOC_MB = "64"
"#
        ),
    );
    d.ok(&["apply", "--timeout", "60s"]);
    d.wait_ready("busy", 1);
    let row = d.busy_task_stats("busy", 64 << 20);
    assert_eq!(row["driver"], "process");
}
