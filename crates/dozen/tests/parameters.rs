//! The parameter store end to end, through the real server and CLI: versions, labels, paths,
//! pages and expiry; tokens with policies and their denials; the audit trail of each case,
//! and an altered record found by `dozen audit verify`; bad input refused, storing nothing.

use std::process::Output;
use std::time::Duration;

use dozen_testkit::{eventually, Dozen, SmallDisk};
use serde_json::Value;

const DOZEN: &str = env!("CARGO_BIN_EXE_dozen");

fn server() -> Dozen {
    let mut d = Dozen::new(DOZEN);
    d.server_args.extend(
        ["--no-proxy", "--param-check-every", "100ms"]
            .iter()
            .map(|s| s.to_string()),
    );
    d.start_server(false);
    d
}

/// The CLI with `stdin` piped in.
fn with_stdin(d: &Dozen, args: &[&str], stdin: &str) -> Output {
    d.cli_with_stdin(args, stdin)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The CLI run with `token` instead of the data dir's.
fn as_token(d: &Dozen, token: &str, args: &[&str]) -> Output {
    d.command(args)
        .env("DOZEN_TOKEN", token)
        .env("DOZEN_DATA_DIR", "/nonexistent")
        .output()
        .unwrap()
}

fn audit(d: &Dozen, filter: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit"];
    args.extend_from_slice(filter);
    d.json(&args).as_array().cloned().unwrap_or_default()
}

#[test]
fn parameters_have_versions_labels_paths_pages_and_expiry() {
    let d = server();
    // A secret from stdin; one trailing newline is the shell's.
    let out = with_stdin(
        &d,
        &["param", "put", "/shop/prod/db/password", "--secure"],
        "pa55-word\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // On the command line it is refused: shell history and `ps` would keep it.
    let out = d.cli(&["param", "put", "/shop/prod/db/password", "other"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not go on the command line"),
        "{}",
        stderr(&out)
    );
    let out = d.cli(&["param", "get", "/shop/prod/db/password"]);
    assert!(
        stderr(&out).contains("add --with-decryption"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        d.ok(&[
            "param",
            "get",
            "/shop/prod/db/password",
            "--with-decryption"
        ]),
        "pa55-word\n"
    );
    let json = d.json(&["param", "get", "/shop/prod/db/password"]);
    assert_eq!(json["type"], "SecureString");
    assert!(json.get("value").is_none(), "{json}");

    d.ok(&[
        "param",
        "put",
        "/shop/prod/db/host",
        "db1.local",
        "--description",
        "primary",
    ]);
    d.ok(&["param", "put", "/shop/prod/db/host", "db2.local"]);
    d.ok(&[
        "param",
        "put",
        "/shop/prod/hosts",
        "a,b,c",
        "--type",
        "StringList",
    ]);
    assert_eq!(d.ok(&["param", "get", "/shop/prod/db/host"]), "db2.local\n");
    assert_eq!(
        d.ok(&["param", "get", "/shop/prod/db/host:1"]),
        "db1.local\n"
    );
    // Several at once: one `name value` line each.
    assert_eq!(
        d.ok(&["param", "get", "/shop/prod/db/host", "/shop/prod/hosts"]),
        "/shop/prod/db/host db2.local\n/shop/prod/hosts a,b,c\n"
    );
    d.ok(&["param", "label", "/shop/prod/db/host:1", "prod", "stable"]);
    assert_eq!(
        d.ok(&["param", "get", "/shop/prod/db/host@prod"]),
        "db1.local\n"
    );
    // A label moves: on version 2 now, off version 1.
    d.ok(&["param", "label", "/shop/prod/db/host", "prod"]);
    assert_eq!(
        d.ok(&["param", "get", "/shop/prod/db/host@prod"]),
        "db2.local\n"
    );
    let history = d.json(&["param", "history", "/shop/prod/db/host"]);
    assert_eq!(history[0]["version"], 2);
    assert_eq!(history[0]["labels"], serde_json::json!(["prod"]));
    assert_eq!(history[1]["labels"], serde_json::json!(["stable"]));
    assert_eq!(history[1]["description"], "primary");
    d.ok(&["param", "label", "/shop/prod/db/host", "stable", "--remove"]);
    let out = d.cli(&["param", "get", "/shop/prod/db/host@stable"]);
    assert!(
        stderr(&out).contains("no label `stable`"),
        "{}",
        stderr(&out)
    );
    let out = d.cli(&["param", "get", "/shop/prod/db/host:9"]);
    assert!(
        stderr(&out).contains("no version 9 (versions kept: 1 to 2)"),
        "{}",
        stderr(&out)
    );

    // Paths: direct children, or every depth.
    let direct = d.json(&["param", "ls", "/shop/prod"]);
    let names: Vec<&str> = direct
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["/shop/prod/hosts"]);
    let all = d.json(&["param", "ls", "/shop", "-r", "--with-decryption"]);
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[1]["value"], "pa55-word");

    // Pages: seven under /page, three at a time, each once, in order.
    for i in 0..7 {
        d.ok(&["param", "put", &format!("/page/p{i}"), "v"]);
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..4 {
        let mut args = vec!["param", "ls", "/page", "--limit", "3", "-o", "json"];
        if let Some(a) = &after {
            args.extend(["--after", a.as_str()]);
        }
        let out = d.cli(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let page: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(page.as_array().unwrap().len() <= 3);
        seen.extend(
            page.as_array()
                .unwrap()
                .iter()
                .map(|p| p["name"].as_str().unwrap().to_string()),
        );
        after = stderr(&out)
            .trim()
            .strip_prefix("more: --after ")
            .map(str::to_string);
        if after.is_none() {
            break;
        }
    }
    let want: Vec<String> = (0..7).map(|i| format!("/page/p{i}")).collect();
    assert_eq!(seen, want);

    // Expiry: a warning event, then the expiry event, then reads refused.
    d.ok(&[
        "param",
        "put",
        "/shop/prod/tmp",
        "v",
        "--expires-in",
        "2s",
        "--warn-before",
        "1500ms",
    ]);
    let events = |kind: &str| {
        // One JSON event per line.
        d.ok(&["events", "-o", "json"])
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["kind"] == kind && e["name"] == "/shop/prod/tmp")
            .count()
    };
    eventually(Duration::from_secs(10), "the expiry warning", || {
        (events("param_expiring") == 1).then_some(())
    });
    eventually(Duration::from_secs(10), "the expiry", || {
        (events("param_expired") == 1).then_some(())
    });
    let out = d.cli(&["param", "get", "/shop/prod/tmp"]);
    assert!(stderr(&out).contains("expired at"), "{}", stderr(&out));
    assert_eq!(events("param_expiring"), 1, "said once");
    // A new version makes it readable again.
    d.ok(&["param", "put", "/shop/prod/tmp", "v2"]);
    assert_eq!(d.ok(&["param", "get", "/shop/prod/tmp"]), "v2\n");
    d.ok(&["param", "rm", "/shop/prod/tmp"]);
    let out = d.cli(&["param", "get", "/shop/prod/tmp"]);
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
}

#[test]
fn tokens_are_held_to_their_policy_and_every_case_is_audited() {
    let d = server();
    let put = with_stdin(
        &d,
        &["param", "put", "/shop/prod/db/password", "--secure"],
        "prod-secret",
    );
    assert!(put.status.success(), "{}", stderr(&put));
    let put = with_stdin(
        &d,
        &["param", "put", "/shop/dev/db/password", "--secure"],
        "dev-secret",
    );
    assert!(put.status.success(), "{}", stderr(&put));

    let dev = d.ok(&["token", "create", "dev", "--policy", "read:/shop/dev/*"]);
    let dev = dev.trim();
    assert!(dev.starts_with("dzt.dev."), "{dev}");
    let reader = d.ok(&["token", "create", "viewer", "--policy", "read-only"]);
    let reader = reader.trim();

    // In its path: the value, decrypted.
    let out = as_token(
        &d,
        dev,
        &["param", "get", "/shop/dev/db/password", "--with-decryption"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "dev-secret\n",
        "{}",
        stderr(&out)
    );
    // Outside it: denied, naming the permission it lacks.
    let out = as_token(
        &d,
        dev,
        &[
            "param",
            "get",
            "/shop/prod/db/password",
            "--with-decryption",
        ],
    );
    assert!(!out.status.success());
    let said = stderr(&out);
    assert!(
        said.contains("needs the permission `read:/shop/prod/db/password`")
            && said.contains("it has read:/shop/dev/*")
            && !said.contains("prod-secret"),
        "{said}"
    );
    let out = as_token(
        &d,
        dev,
        &["param", "put", "/shop/dev/x", "v", "--type", "String"],
    );
    assert!(
        stderr(&out).contains("`write:/shop/dev/x`"),
        "{}",
        stderr(&out)
    );
    let out = as_token(&d, dev, &["ps"]);
    assert!(
        stderr(&out).contains("needs the permission `read-only`"),
        "{}",
        stderr(&out)
    );
    // A listing shows only what the token may read.
    let out = as_token(&d, dev, &["param", "ls", "/", "-r", "-o", "json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // Read-only: the cluster's state and metadata, never a value.
    assert!(as_token(&d, reader, &["ps"]).status.success());
    let out = as_token(
        &d,
        reader,
        &[
            "param",
            "get",
            "/shop/prod/db/password",
            "--with-decryption",
        ],
    );
    assert!(
        stderr(&out).contains("`read:/shop/prod/db/password`"),
        "{}",
        stderr(&out)
    );
    let out = as_token(&d, reader, &["token", "create", "x", "--policy", "admin"]);
    assert!(
        stderr(&out).contains("needs the permission `admin`"),
        "{}",
        stderr(&out)
    );

    // Revoked: no longer a token at all.
    d.ok(&["token", "revoke", "dev"]);
    let out = as_token(&d, dev, &["param", "get", "/shop/dev/db/password"]);
    assert!(
        stderr(&out).contains("revoked, expired or mistyped"),
        "{}",
        stderr(&out)
    );

    // The trail holds each case: who, what, outcome.
    let records = audit(&d, &["-n", "1000"]);
    let has = |who: &str, action: &str, target: &str, outcome: &str| {
        records.iter().any(|r| {
            r["who"] == who
                && r["action"] == action
                && r["target"].as_str().unwrap().starts_with(target)
                && r["outcome"] == outcome
        })
    };
    assert!(has(
        "root token",
        "param.write",
        "/shop/prod/db/password:1",
        "ok"
    ));
    assert!(has(
        "token dev",
        "param.read",
        "/shop/dev/db/password:1",
        "ok"
    ));
    assert!(has(
        "token dev",
        "param.read",
        "/shop/prod/db/password",
        "denied"
    ));
    assert!(has("token dev", "param.write", "/shop/dev/x", "denied"));
    assert!(has(
        "token viewer",
        "param.read",
        "/shop/prod/db/password",
        "denied"
    ));
    assert!(has("token viewer", "token.create", "x", "denied"));
    assert!(has("root token", "token.create", "dev", "ok"));
    assert!(has("root token", "token.revoke", "dev", "ok"));
    // Each change is on the record as asked before it was made, then with its outcome.
    let position = |action: &str, outcome: &str| {
        records.iter().position(|r| {
            r["who"] == "root token"
                && r["action"] == action
                && r["target"]
                    .as_str()
                    .unwrap()
                    .starts_with("/shop/prod/db/password")
                && r["outcome"] == outcome
        })
    };
    let asked = position("param.write", "asked").expect("the write was asked first");
    assert!(asked < position("param.write", "ok").unwrap());
    let text = serde_json::to_string(&records).unwrap();
    assert!(!text.contains("prod-secret") && !text.contains("dev-secret"));
    // Only an admin reads the trail.
    assert!(!as_token(&d, reader, &["audit"]).status.success());

    // The chain holds; altering any one record is found, and named.
    assert!(d.cli(&["audit", "verify"]).status.success());
    let dir = d.data_dir().join("audit");
    let segment = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let original = std::fs::read_to_string(&segment).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    for (from_line, (from, to)) in [
        (2, ("root token", "token evil!")),
        (3, ("\"outcome\":\"ok\"", "\"outcome\":\"denied\"")),
    ] {
        let i = (from_line..lines.len())
            .find(|&i| lines[i].contains(from))
            .unwrap();
        let mut altered: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        altered[i] = altered[i].replacen(from, to, 1);
        std::fs::write(&segment, altered.join("\n") + "\n").unwrap();
        let out = d.cli(&["audit", "verify"]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{said}");
        assert!(
            said.contains(&format!("altered at record {}", i + 1)),
            "{said}"
        );
    }
    // And a record taken out.
    let mut removed: Vec<&str> = lines.clone();
    removed.remove(3);
    std::fs::write(&segment, removed.join("\n") + "\n").unwrap();
    let out = d.cli(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    std::fs::write(&segment, &original).unwrap();
    assert!(d.cli(&["audit", "verify"]).status.success());
}

/// A change that cannot be put on the audit trail is refused and not made (the disk holding
/// the trail fills up): every version stored had its asking recorded first.
#[test]
fn a_change_that_cannot_be_audited_is_refused_and_not_made() {
    let Some(disk) = SmallDisk::mount("1m") else {
        return;
    };
    let mut d = Dozen::new(DOZEN);
    d.server_args.push("--no-proxy".into());
    std::fs::create_dir_all(d.data_dir()).unwrap();
    std::os::unix::fs::symlink(disk.path(), d.data_dir().join("audit")).unwrap();
    d.start_server(false);
    let mut made = 0;
    assert!(d.cli(&["param", "put", "/a/x", "0"]).status.success());
    made += 1;
    let filler = disk.fill();
    // The trail's zeros ahead of its last record take records for a while; then a write is
    // refused.
    let mut refused = None;
    for n in 1..2000 {
        let out = d.cli(&["param", "put", "/a/x", &n.to_string()]);
        if !out.status.success() {
            refused = Some(stderr(&out));
            break;
        }
        made += 1;
    }
    let said = refused.expect("a write is refused once the trail's disk is full");
    assert!(said.contains("cannot be audited"), "{said}");
    let newest = d.json(&["param", "history", "/a/x"])[0]["version"]
        .as_u64()
        .unwrap();
    // Space again: the trail shows one asked record per version made.
    std::fs::remove_file(filler).unwrap();
    let asked = audit(
        &d,
        &[
            "--action",
            "param.write",
            "--outcome",
            "asked",
            "-n",
            "10000",
        ],
    )
    .len() as u64;
    // Either the refused write's asking could not be recorded (nothing made), or its outcome
    // could not (made, and on the record as asked).
    assert!(
        newest == made || (newest == made + 1 && asked == newest),
        "{made} writes answered, newest version {newest}, {asked} asked records"
    );
    assert!(
        asked >= newest,
        "a version was made without its asking on the record"
    );
    assert!(d.cli(&["param", "put", "/a/x", "again"]).status.success());
    assert!(d.cli(&["audit", "verify"]).status.success());
}

/// Raw API calls: each bad request gets a 4xx that names the problem, and nothing is stored.
#[test]
fn bad_input_gets_a_4xx_naming_it_and_stores_nothing() {
    let d = server();
    let call = |method: &str, path: &str, body: &str| -> (u16, String) {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .args(["-H", &format!("authorization: Bearer {}", d.token())])
            .args(["-H", "content-type: application/json"])
            .args(["--data-binary", body])
            .arg(format!("{}{path}", d.url()))
            .output()
            .expect("curl");
        dozen_testkit::code_and_body(&out)
    };
    let long_name = format!("/{}", "a".repeat(1100));
    let long_value = "x".repeat(9000);
    let cases: Vec<(String, &str)> = vec![
        (r#"{"name":"/a/../b","value":"v"}"#.into(), "`..` segment"),
        (r#"{"name":"/a//b","value":"v"}"#.into(), "empty segment"),
        (
            r#"{"name":"a/b","value":"v"}"#.into(),
            "must start with `/`",
        ),
        (
            format!(r#"{{"name":"{long_name}","value":"v"}}"#),
            "at most 1011",
        ),
        (
            format!(r#"{{"name":"/a","value":"{long_value}"}}"#),
            "at most 8192",
        ),
        (
            r#"{"name":"/a","value":"v","type":"Secret"}"#.into(),
            "unknown parameter type `Secret`",
        ),
        (
            r#"{"name":"/a","value":"v","colour":1}"#.into(),
            "unknown field `colour`",
        ),
        (r#"{"name":"/a","value":"#.into(), "JSON"),
        (r#"{"name":"/a"}"#.into(), "missing field `value`"),
    ];
    for (body, says) in &cases {
        let (code, answer) = call("PUT", "/v1/param", body);
        assert!((400..500).contains(&code), "{body}: {code} {answer}");
        assert!(answer.contains(says), "{body}: {answer}");
    }
    let (code, answer) = call(
        "POST",
        "/v1/param/labels",
        r#"{"name":"/a","add":["1bad"]}"#,
    );
    assert!((400..500).contains(&code), "{answer}");
    let (code, answer) = call("POST", "/v1/tokens", r#"{"name":"t","policy":["root"]}"#);
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("unknown permission `root`"), "{answer}");
    let (code, answer) = call("GET", "/v1/params?path=/a/../b", "");
    assert_eq!(code, 400, "{answer}");
    // Nothing stored.
    let listed = d.json(&["param", "ls", "/", "-r"]);
    assert_eq!(listed, serde_json::json!([]));
    assert_eq!(d.json(&["token", "ls"]), serde_json::json!([]));
}
