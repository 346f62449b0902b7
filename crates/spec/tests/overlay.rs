//! Environment overlays: `[env.<name>]` tables and `<stem>.<name>.<ext>` sibling files.

use std::fs;
use std::path::PathBuf;

use dozen_spec::{load, parse_str, Format};

const MAIN: &str = r#"name = "demo"

[services.web]
command = "./web"
replicas = 2
[services.web.env]
LOG_LEVEL = "info"
MODE = "base"

[env.prod.services.web]
replicas = 6
[env.prod.services.web.env]
LOG_LEVEL = "warn"

[env.prod.services.cron]
command = "./cron"
port = false

[env.dev]
name = "demo-dev"
"#;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    fs::write(&p, text).unwrap();
    p
}

#[test]
fn no_env_uses_the_base_document() {
    let s = parse_str(MAIN, "dozen.toml", Format::Toml, None).unwrap();
    assert_eq!(s.name, "demo");
    assert_eq!(s.services.len(), 1);
    assert_eq!(s.services["web"].replicas, Some(2));
}

#[test]
fn table_overlay_deep_merges() {
    let s = parse_str(MAIN, "dozen.toml", Format::Toml, Some("prod")).unwrap();
    let web = &s.services["web"];
    assert_eq!(web.replicas, Some(6));
    assert_eq!(web.env["LOG_LEVEL"], "warn");
    assert_eq!(web.env["MODE"], "base", "tables merge, untouched keys stay");
    assert_eq!(web.command.as_ref().unwrap().argv()[2], "./web");
    assert!(!s.services["cron"].port);
    let s = parse_str(MAIN, "dozen.toml", Format::Toml, Some("dev")).unwrap();
    assert_eq!(s.name, "demo-dev");
}

#[test]
fn unknown_env_names_the_existing_ones() {
    let e = parse_str(MAIN, "dozen.toml", Format::Toml, Some("staging")).unwrap_err();
    assert_eq!(e.0.len(), 1);
    let e = &e.0[0];
    assert!(e.message.contains("unknown environment `staging`"), "{e}");
    assert!(e.message.contains("dev, prod"), "{e}");
    assert_eq!((e.line, e.column), (1, 1));
    assert!(e.hint.as_deref().unwrap().contains("[env.staging]"));
    let e = parse_str(
        "name = \"x\"\n[services.a]\ncommand = \"a\"\n",
        "f",
        Format::Toml,
        Some("prod"),
    )
    .unwrap_err();
    assert!(
        e.0[0].message.contains("no environments are defined"),
        "{e}"
    );
}

#[test]
fn bad_env_name_is_rejected() {
    let e = parse_str(MAIN, "dozen.toml", Format::Toml, Some("../prod")).unwrap_err();
    assert!(e.0[0].message.contains("'/'"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "dozen.toml", MAIN);
    let e = load(&p, Some("a/b")).unwrap_err();
    assert!(e.0[0].message.contains("'/'"), "{e}");
}

#[test]
fn overlay_errors_point_into_the_env_table_even_without_env() {
    let src = "name = \"demo\"
[services.web]
command = \"./web\"
[env.prod.services.web]
replica = 6
";
    for env in [None, Some("prod")] {
        let e = parse_str(src, "dozen.toml", Format::Toml, env).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!((e.0[0].line, e.0[0].column), (5, 1), "{e}");
        assert_eq!(e.0[0].hint.as_deref(), Some("did you mean `replicas`?"));
    }
    let e = parse_str(
        "name = \"demo\"\n[services.web]\ncommand = \"a\"\n[env.prod]\nservics = {}\n",
        "f",
        Format::Toml,
        None,
    )
    .unwrap_err();
    assert_eq!((e.0[0].line, e.0[0].column), (5, 1), "{e}");
    assert_eq!(e.0[0].hint.as_deref(), Some("did you mean `services`?"));
    let e = parse_str(
        "name = \"demo\"\n[services.web]\ncommand = \"a\"\n[env]\nprod = 3\n",
        "f",
        Format::Toml,
        None,
    )
    .unwrap_err();
    assert!(e.0[0].message.contains("must be a table"), "{e}");
}

#[test]
fn sibling_file_is_overlaid_after_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let main = write(&dir, "dozen.toml", MAIN);
    write(
        &dir,
        "dozen.prod.toml",
        "[services.web]\nreplicas = 8\n[services.web.env]\nEXTRA = 1\n",
    );
    let s = load(&main, Some("prod")).unwrap();
    let web = &s.services["web"];
    assert_eq!(web.replicas, Some(8), "file wins over table");
    assert_eq!(web.env["LOG_LEVEL"], "warn", "table still applies");
    assert_eq!(web.env["EXTRA"], "1");
    assert!(s.services.contains_key("cron"));
    // Without env the sibling is not read.
    let s = load(&main, None).unwrap();
    assert_eq!(s.services["web"].replicas, Some(2));
}

#[test]
fn sibling_file_alone_defines_an_env() {
    let dir = tempfile::tempdir().unwrap();
    let main = write(&dir, "dozen.toml", MAIN);
    write(&dir, "dozen.staging.toml", "name = \"demo-staging\"\n");
    let s = load(&main, Some("staging")).unwrap();
    assert_eq!(s.name, "demo-staging");
    let e = load(&main, Some("qa")).unwrap_err();
    let msg = &e.0[0].message;
    assert!(msg.contains("dev, prod, staging"), "{msg}");
    assert!(e.0[0].hint.as_deref().unwrap().contains("dozen.qa.toml"));
}

#[test]
fn sibling_errors_point_into_the_sibling() {
    let dir = tempfile::tempdir().unwrap();
    let main = write(&dir, "dozen.toml", MAIN);
    let sib = write(&dir, "dozen.prod.toml", "\n[services.web]\nreplica = 8\n");
    let e = load(&main, Some("prod")).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(e.0[0].file, sib.display().to_string());
    assert_eq!((e.0[0].line, e.0[0].column), (3, 1));
    assert_eq!(e.0[0].hint.as_deref(), Some("did you mean `replicas`?"));

    fs::write(&sib, "[services.web\n").unwrap();
    let e = load(&main, Some("prod")).unwrap_err();
    assert_eq!(e.0[0].file, sib.display().to_string());
    assert!(e.0[0].message.contains("syntax"), "{e}");

    fs::write(&sib, "[env.x]\nname = \"y\"\n").unwrap();
    let e = load(&main, Some("prod")).unwrap_err();
    assert!(e.0[0].message.contains("cannot be nested"), "{e}");

    fs::write(&sib, b"name = \"\xff\"").unwrap();
    let e = load(&main, Some("prod")).unwrap_err();
    assert_eq!(e.0[0].file, sib.display().to_string());
    assert!(e.0[0].message.contains("UTF-8"), "{e}");
}

#[test]
fn main_and_sibling_errors_are_both_reported() {
    let dir = tempfile::tempdir().unwrap();
    let main = write(
        &dir,
        "dozen.toml",
        "name = \"demo\"\n[services.web]\ncommand = \"a\"\nstop_timeout = \"x\"\n",
    );
    write(&dir, "dozen.prod.toml", "[services.web]\nreplicas = 5000\n");
    let e = load(&main, Some("prod")).unwrap_err();
    assert_eq!(e.0.len(), 2, "{e}");
    assert!(e.0[0].file.ends_with("dozen.toml"));
    assert_eq!(e.0[0].line, 4);
    assert!(e.0[1].file.ends_with("dozen.prod.toml"));
    assert_eq!((e.0[1].line, e.0[1].column), (2, 12));
}

#[test]
fn yaml_files_and_siblings() {
    let dir = tempfile::tempdir().unwrap();
    let main = write(
        &dir,
        "stack.yaml",
        "name: demo\nservices:\n  web:\n    command: ./web\nenv:\n  prod:\n    services:\n      web:\n        replicas: 3\n",
    );
    let s = load(&main, None).unwrap();
    assert_eq!(s.services["web"].replicas, None);
    let s = load(&main, Some("prod")).unwrap();
    assert_eq!(s.services["web"].replicas, Some(3));
    write(
        &dir,
        "stack.prod.yaml",
        "services:\n  web:\n    replicas: 4\n",
    );
    let s = load(&main, Some("prod")).unwrap();
    assert_eq!(s.services["web"].replicas, Some(4));
    let yml = write(
        &dir,
        "other.yml",
        "name: demo\nservices:\n  web:\n    command: ./web\n",
    );
    assert!(load(&yml, None).is_ok());
}

#[test]
fn missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(&dir.path().join("nope.toml"), None).unwrap_err();
    assert!(e.0[0].message.contains("cannot read"), "{e}");
    assert!(e.0[0].file.ends_with("nope.toml"));
}
