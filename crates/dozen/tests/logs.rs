//! End-to-end: task logs as a user reads them through `dozen logs` and `ps`: following, tails
//! of large logs, the per-task cap, long lines, whole logs streamed, and a full disk.

use std::time::Duration;

use dozen_testkit::{eventually, peak_rss_mib, Dozen};

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");

#[test]
fn logs_follow_streams_new_lines_as_tasks_write_them() {
    use std::io::BufRead;
    let mut d = Dozen::new(DOZEN);
    d.start_server(true);
    d.write(
        "dozen.toml",
        r#"
name = "ticks"
[services.ticker]
command = "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done"
port = false
"#,
    );
    d.ok(&["apply"]);
    let mut follow = std::process::Command::new(DOZEN)
        .args(["logs", "ticker", "-f", "--tail", "1"])
        .env("DOZEN_SERVER", d.url())
        .env("DOZEN_DATA_DIR", d.data_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let mut numbers = Vec::new();
    while numbers.len() < 5 {
        let line = lines.next().expect("a line").unwrap();
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        numbers.push(n);
    }
    follow.kill().unwrap();
    let _ = follow.wait();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive lines, in order, as they are written: {numbers:?}"
    );
}

/// A server (with its agent, no proxy) running one service of shell `command`, applied.
fn one_service(name: &str, command: &str) -> Dozen {
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    // A TOML literal string: the command's quotes and backslashes stay as they are.
    d.write(
        "dozen.toml",
        &format!("name = \"{name}\"\n[services.{name}]\ncommand = '''{command}'''\nport = false\n"),
    );
    d.ok(&["apply"]);
    d
}

/// Seen: a task that wrote 300 MB to stdout left 311 MiB on disk, and `logs --tail` read whole
/// files. Now a task's logs rotate within 100 MiB, and a tail is read from the end.
#[test]
fn a_task_writing_300_mb_keeps_within_its_log_cap_and_tails_come_fast() {
    let d = one_service(
        "chatty",
        r#"L=$(head -c 999 /dev/zero | tr '\000' x); yes "$L" | head -c 300000000; echo; echo all-written; sleep 1000"#,
    );
    until_written(&d, Duration::from_secs(240), "300 MB written");
    let on_disk = logs_on_disk(&d);
    assert!(
        on_disk <= 100 * 1024 * 1024,
        "{on_disk} bytes of logs on disk"
    );
    assert!(
        on_disk >= 40 * 1024 * 1024,
        "the newest logs are kept: {on_disk} bytes"
    );
    let started = std::time::Instant::now();
    let out = d.cli(&["logs", "chatty", "--tail", "5"]);
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 5, "{text}");
    assert!(text.contains("all-written"));
    eprintln!("logs --tail 5 over {on_disk} bytes of logs took {took:?}");
    // The whole log, streamed from the agent through the server to the reader: neither
    // holds it.
    let mut whole = d.command(&["logs", "chatty"]);
    let mut reader = whole.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let (mut lines, mut bytes) = (0usize, 0usize);
    for line in std::io::BufRead::lines(std::io::BufReader::new(reader.stdout.take().unwrap())) {
        let line = line.unwrap();
        lines += 1;
        bytes += line.len();
    }
    assert!(reader.wait().unwrap().success());
    assert!(
        bytes as u64 >= on_disk / 2,
        "{lines} lines, {bytes} bytes read of {on_disk}"
    );
    let pid = d.server.as_ref().unwrap().id();
    let peak = peak_rss_mib(pid);
    assert!(peak < 100, "the server's peak memory was {peak} MiB");
}

/// Seen: the shim grew its line buffer without limit before splitting a line. A line is cut at
/// 64 KiB while it is read, and the log says so.
#[test]
fn a_very_long_line_is_cut_while_read_and_the_log_says_so() {
    let d = one_service(
        "long",
        r#"head -c 200000 /dev/zero | tr '\000' y; echo; echo after; sleep 1000"#,
    );
    let text = eventually(Duration::from_secs(30), "the long line logged", || {
        let out = d.cli(&["logs", "long"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("after").then_some(text)
    });
    let ys: Vec<usize> = text
        .lines()
        .filter(|l| l.ends_with("yyyy"))
        .map(|l| l.len())
        .collect();
    assert_eq!(
        ys.len(),
        4,
        "200,000 bytes in pieces of at most 64 KiB: {ys:?}"
    );
    assert!(ys.iter().all(|n| *n <= 64 * 1024 + 64), "{ys:?}");
    assert_eq!(
        text.matches("[dozen] the line above was longer than 64 KiB")
            .count(),
        1,
        "said once per long line"
    );
}

/// Waits until the `chatty` task's last line says it wrote everything.
fn until_written(d: &Dozen, within: Duration, what: &str) {
    eventually(within, what, || {
        let out = d.cli(&["logs", "chatty", "--tail", "1"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("all-written")
            .then_some(())
    });
}

/// Bytes of log files a service's tasks keep on disk.
fn logs_on_disk(d: &Dozen) -> u64 {
    let tasks = d.data_dir().join("agent").join("tasks");
    let mut on_disk = 0;
    for task in std::fs::read_dir(&tasks).unwrap().flatten() {
        for file in ["output.log", "output.log.1"] {
            on_disk += std::fs::metadata(task.path().join(file))
                .map(|m| m.len())
                .unwrap_or(0);
        }
    }
    on_disk
}

/// A service sets its own cap (`resources.logs`), and its tasks keep within it.
#[test]
fn a_service_sets_its_own_log_cap() {
    let mut d = Dozen::new(DOZEN);
    d.start_without_proxy();
    d.write(
        "dozen.toml",
        r#"
name = "capped"
[services.chatty]
command = '''L=$(head -c 99 /dev/zero | tr '\000' x); yes "$L" | head -c 20000000; echo all-written; sleep 1000'''
port = false
resources = { logs = "2MiB" }
"#,
    );
    d.ok(&["apply"]);
    until_written(&d, Duration::from_secs(60), "20 MB written");
    let on_disk = logs_on_disk(&d);
    assert!(
        on_disk <= 2 * 1024 * 1024,
        "{on_disk} bytes of logs on disk"
    );
    assert!(
        on_disk >= 1024 * 1024,
        "the newest are kept: {on_disk} bytes"
    );
}

/// A full disk never blocks a task's output: the shim drops lines and counts them, `ps` and
/// `logs` say how many, and once there is room again the log says so and goes on.
#[test]
fn a_full_disk_drops_and_counts_output_and_the_task_goes_on() {
    let Some(disk) = dozen_testkit::SmallDisk::mount("8m") else {
        return;
    };
    let mut d = Dozen::new(DOZEN);
    // Only the tasks' files on the small disk: the server keeps recording what it sees.
    std::fs::create_dir_all(d.data_dir().join("agent")).unwrap();
    std::os::unix::fs::symlink(disk.path(), d.data_dir().join("agent").join("tasks")).unwrap();
    d.start_without_proxy();
    d.write(
        "dozen.toml",
        r#"
name = "full"
[services.counter]
command = "i=0; while true; do i=$((i+1)); echo line $i; sleep 0.01; done"
port = false
"#,
    );
    d.ok(&["apply"]);
    let number = |line: &str| -> Option<u64> { line.rsplit("line ").next()?.trim().parse().ok() };
    let last_line = |d: &Dozen| -> Option<u64> {
        let out = d.cli(&["logs", "counter", "--tail", "1"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .and_then(number)
    };
    eventually(Duration::from_secs(20), "the task writes", || last_line(&d));
    let filler = disk.fill();
    let dropped_in_ps = || {
        let ps = d.json(&["ps"]);
        let task = &ps["tasks"][0];
        let dropped = task["status"]["log_lines_dropped"]
            .as_u64()
            .filter(|n| *n > 0)?;
        Some((dropped, task["status"]["pid"].as_u64()))
    };
    let (dropped, pid) = eventually(
        Duration::from_secs(30),
        "ps counts dropped lines",
        dropped_in_ps,
    );
    let before = last_line(&d).unwrap_or(0);
    let table = d.ok(&["ps"]);
    assert!(table.contains("log line(s) dropped"), "{table}");
    let out = d.cli(&["logs", "counter", "--tail", "1"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("log line(s) dropped"), "{said}");

    std::fs::remove_file(filler).unwrap();
    let text = eventually(
        Duration::from_secs(30),
        "the log says what was dropped",
        || {
            let text = d.ok(&["logs", "counter"]);
            text.contains("line(s) of output were dropped")
                .then_some(text)
        },
    );
    assert!(text.contains("No space left on device"), "{text}");
    // The task was never blocked: the same process, its count far past where writes stopped.
    let after = eventually(Duration::from_secs(20), "lines after the gap", || {
        last_line(&d).filter(|n| *n > before + dropped / 2)
    });
    let ps = d.json(&["ps"]);
    assert_eq!(ps["tasks"][0]["status"]["pid"].as_u64(), pid, "{ps}");
    eprintln!("{dropped} lines dropped; the count went from {before} to {after}");
}

/// An empty line a task writes is a line of its log too.
#[test]
fn empty_lines_are_kept() {
    let d = one_service("blank", "echo first; echo; echo third; sleep 1000");
    let text = eventually(Duration::from_secs(20), "three lines", || {
        let text = d.ok(&["logs", "blank"]);
        text.contains("third").then_some(text)
    });
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.split_once(" | ").map_or(l, |x| x.1))
        .collect();
    assert_eq!(lines, ["first", "", "third"], "{text}");
}
