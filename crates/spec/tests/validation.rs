//! Every validation rule: the error's line, column and hint.

use dozen_spec::{parse_bytes, parse_str, Format, SpecError};

const BASE: &str = "name = \"demo\"\n[services.web]\ncommand = \"./web\"\n";

fn errors(src: &str) -> Vec<SpecError> {
    match parse_str(src, "dozen.toml", Format::Toml, None) {
        Ok(s) => panic!("expected errors, got {s:#?}"),
        Err(e) => e.0,
    }
}

fn yaml_errors(src: &str) -> Vec<SpecError> {
    match parse_str(src, "dozen.yaml", Format::Yaml, None) {
        Ok(s) => panic!("expected errors, got {s:#?}"),
        Err(e) => e.0,
    }
}

/// Asserts that exactly one error contains `needle`, at `line:col`, with a hint; returns it.
#[track_caller]
fn expect(errs: &[SpecError], needle: &str, line: usize, col: usize) -> SpecError {
    let found: Vec<&SpecError> = errs.iter().filter(|e| e.message.contains(needle)).collect();
    assert_eq!(
        found.len(),
        1,
        "want one error containing {needle:?} in {errs:#?}"
    );
    let e = found[0].clone();
    assert_eq!((e.line, e.column), (line, col), "position of {e:#?}");
    assert!(
        e.hint.as_deref().is_some_and(|h| !h.is_empty()),
        "no hint: {e:#?}"
    );
    e
}

fn with(extra: &str) -> String {
    format!("{BASE}{extra}")
}

#[test]
fn valid_base_parses() {
    let s = parse_str(BASE, "dozen.toml", Format::Toml, None).unwrap();
    assert_eq!(s.name, "demo");
    assert!(s.services.contains_key("web"));
}

#[test]
fn toml_syntax_error_has_position() {
    let errs = errors("name = \"demo\"\n[services.web]\ncommand = \"./web\n");
    assert_eq!(errs.len(), 1);
    let e = expect(&errs, "TOML syntax error", 3, 17);
    assert_eq!(e.file, "dozen.toml");
    let errs = errors("name = \"demo\"\n[services.web\n");
    expect(&errs, "TOML syntax error", 2, 14);
    let errs = errors("name = demo\n");
    expect(&errs, "TOML syntax error", 1, 8);
}

#[test]
fn duplicate_toml_key_is_a_syntax_error() {
    let errs = errors(&with("command = \"again\"\n"));
    assert_eq!(errs[0].line, 4);
    assert!(errs[0].message.contains("syntax"), "{errs:#?}");
}

#[test]
fn yaml_syntax_error_has_position() {
    let errs = yaml_errors("name: demo\nservices:\n  web:\n    command: \"x\n  - bad\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].message.contains("YAML syntax error"));
    assert!(errs[0].line >= 4, "{errs:#?}");
    assert!(errs[0].hint.is_some());
    let errs = yaml_errors("name: demo\nservices: [\n");
    assert!(errs[0].line >= 2, "{errs:#?}");
}

#[test]
fn non_utf8_points_at_first_bad_byte() {
    let e = parse_bytes(b"name = \"d\xffemo\"\n", "dozen.toml", Format::Toml, None).unwrap_err();
    assert_eq!(e.0.len(), 1);
    expect(&e.0, "not valid UTF-8", 1, 10);
    let e = parse_bytes(
        "name = \"é\"\n\n  x\u{e9}\u{e9}"
            .as_bytes()
            .iter()
            .chain(b"\xc3\x28")
            .copied()
            .collect::<Vec<_>>()
            .as_slice(),
        "dozen.toml",
        Format::Toml,
        None,
    )
    .unwrap_err();
    expect(&e.0, "not valid UTF-8", 3, 6);
}

#[test]
fn binary_garbage_is_rejected_with_position() {
    let garbage = [0u8, 1, 2, 0x9f, 0x92, 0x96, 0xfe];
    for f in [Format::Toml, Format::Yaml] {
        let e = parse_bytes(&garbage, "x", f, None).unwrap_err();
        assert_eq!((e.0[0].line, e.0[0].column), (1, 4), "{e}");
        // Valid UTF-8 but control characters: a syntax error.
        let e = parse_bytes(&[0, 1, 2, 3], "x", f, None).unwrap_err();
        assert_eq!(e.0[0].line, 1, "{e}");
    }
}

#[test]
fn empty_file_is_missing_name_and_services() {
    for (errs, kind) in [(errors(""), "toml"), (yaml_errors(""), "yaml")] {
        let e = expect(&errs, "missing `name`", 1, 1);
        assert!(e.hint.unwrap().contains("name"), "{kind}");
        expect(&errs, "no services", 1, 1);
    }
    let errs = errors("\n# just a comment\n");
    expect(&errs, "missing `name`", 1, 1);
}

#[test]
fn unknown_fields_suggest_the_right_name() {
    let errs = errors(&with("replica = 2\n"));
    let e = expect(&errs, "unknown field `replica`", 4, 1);
    assert_eq!(e.hint.as_deref(), Some("did you mean `replicas`?"));

    let errs = errors(&with(
        "[services.web.health]\nhttp = \"/\"\nintervall = \"3s\"\n",
    ));
    let e = expect(&errs, "unknown field `intervall`", 6, 1);
    assert_eq!(e.hint.as_deref(), Some("did you mean `interval`?"));

    let errs = errors(&with("[services.web.resources]\nmemroy = \"1GiB\"\n"));
    let e = expect(&errs, "unknown field `memroy`", 5, 1);
    assert_eq!(e.hint.as_deref(), Some("did you mean `memory`?"));

    let errs = errors(&with("[[services.web.routes]]\nhots = \"a.b\"\n"));
    let e = expect(&errs, "unknown field `hots`", 5, 1);
    assert_eq!(e.hint.as_deref(), Some("did you mean `host`?"));

    let errs = errors(&format!("nmae = \"x\"\n{BASE}"));
    let e = expect(&errs, "unknown field `nmae`", 1, 1);
    assert_eq!(e.hint.as_deref(), Some("did you mean `name`?"));

    let errs = errors(&with("zzzzzzzzzz = 1\n"));
    let e = expect(&errs, "unknown field `zzzzzzzzzz`", 4, 1);
    assert!(e.hint.unwrap().contains("allowed keys"));
}

#[test]
fn bad_durations() {
    let errs = errors(&with("stop_timeout = \"10 sec\"\n"));
    let e = expect(&errs, "stop_timeout", 4, 16);
    assert!(e.hint.unwrap().contains("1m30s"));
    let errs = errors(&with("stop_timeout = \"-5s\"\n"));
    expect(&errs, "negative", 4, 16);
    let errs = errors(&with("stop_timeout = 10\n"));
    expect(&errs, "must be a string", 4, 16);
    let errs = errors(&with(
        "[services.web.health]\ntcp = true\ninterval = \"5\"\n",
    ));
    expect(&errs, "missing unit", 6, 12);
    let errs = errors(&with("stop_after = \"soon\"\n"));
    expect(&errs, "`stop_after`", 4, 14);
}

#[test]
fn bad_sizes_and_cpu() {
    let errs = errors(&with("[services.web.resources]\nmemory = \"12XB\"\n"));
    let e = expect(&errs, "invalid size", 5, 10);
    assert!(e.hint.unwrap().contains("256MiB"));
    let errs = errors(&with("[services.web.resources]\nmemory = \"0\"\n"));
    expect(&errs, "greater than zero", 5, 10);
    let errs = errors(&with("[services.web.resources]\nmemory = true\n"));
    expect(&errs, "must be a size", 5, 10);
    let errs = errors(&with("[services.web.resources]\ncpu = \"lots\"\n"));
    let e = expect(&errs, "cpu", 5, 7);
    assert!(e.hint.unwrap().contains("500m"));
    let errs = errors(&with("[services.web.resources]\ncpu = -1.0\n"));
    expect(&errs, "cpu", 5, 7);
    let errs = errors(&with("[services.web.resources]\ncpu = 0.0001\n"));
    expect(&errs, "millicores", 5, 7);
    let errs = errors(&with("[services.web.resources]\npids = 0\n"));
    let e = expect(&errs, "`pids` must be between 1", 5, 8);
    assert!(e.hint.unwrap().contains("pids = 512"));
    let errs = errors(&with("[services.web.resources]\nlogs = \"10KiB\"\n"));
    let e = expect(&errs, "`logs` must be at least 1MiB", 5, 8);
    assert!(e.hint.unwrap().contains("20MiB"));
}

#[test]
fn process_and_log_limits_parse_with_defaults() {
    let s = parse_str(&with(""), "f", Format::Toml, None).unwrap();
    let r = s.services["web"].resources;
    assert_eq!((r.pids, r.log_bytes), (4096, 100 << 20));
    let s = parse_str(
        &with("[services.web.resources]\npids = 64\nlogs = \"20MiB\"\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let r = s.services["web"].resources;
    assert_eq!((r.pids, r.log_bytes), (64, 20 << 20));
}

#[test]
fn resources_parse() {
    let s = parse_str(
        &with("[services.web.resources]\ncpu = 0.5\nmemory = \"256MiB\"\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let r = s.services["web"].resources;
    assert_eq!((r.cpu_millis, r.memory_bytes), (500, 256 << 20));
    let s = parse_str(
        &with("[services.web.resources]\ncpu = \"250m\"\nmemory = 1024\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let r = s.services["web"].resources;
    assert_eq!((r.cpu_millis, r.memory_bytes), (250, 1024));
    let s = parse_str(
        &with("[services.web.resources]\ncpu = 2\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    assert_eq!(s.services["web"].resources.cpu_millis, 2000);
}

#[test]
fn bad_names() {
    let errs = errors("name = \"My_Stack\"\n[services.web]\ncommand = \"x\"\n");
    let e = expect(&errs, "invalid stack name", 1, 8);
    assert!(e.hint.unwrap().contains("lowercase"));
    let errs = errors("name = \"demo\"\n[services.Web]\ncommand = \"x\"\n");
    expect(&errs, "invalid service name `Web`", 2, 11);
    let errs = errors("name = \"demo\"\n[services.\"a/b\"]\ncommand = \"x\"\n");
    expect(&errs, "must not contain '/' or '..'", 2, 11);
    let errs = errors("name = \"../etc\"\n[services.web]\ncommand = \"x\"\n");
    expect(&errs, "must not contain '/' or '..'", 1, 8);
    let long = "a".repeat(64);
    let errs = errors(&format!(
        "name = \"demo\"\n[services.{long}]\ncommand = \"x\"\n"
    ));
    expect(&errs, "invalid service name", 2, 11);
    let errs = errors("name = \"demo\"\n[services.web-]\ncommand = \"x\"\n");
    expect(&errs, "invalid service name", 2, 11);
}

#[test]
fn env_var_names_and_port() {
    let errs = errors(&with("[services.web.env]\n\"1BAD\" = \"x\"\n"));
    let e = expect(&errs, "invalid environment variable name `1BAD`", 5, 1);
    assert!(e.hint.unwrap().contains("LOG_LEVEL"));
    let errs = errors(&with("[services.web.env]\nPORT = \"8080\"\n"));
    expect(&errs, "`PORT` cannot be set", 5, 1);
    // With port = false, PORT is the user's business.
    let s = parse_str(
        &with("port = false\n[services.web.env]\nPORT = 8080\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    assert_eq!(s.services["web"].env["PORT"], "8080");
    let errs = errors(&with("[services.web.env]\nX = [1]\n"));
    expect(&errs, "must be a string", 5, 5);
}

#[test]
fn env_values_are_stringified() {
    let s = parse_str(
        &with("[services.web.env]\nA = \"s\"\nB = 3\nC = true\nD = 1.5\nE = 2.0\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let env = &s.services["web"].env;
    assert_eq!(env["A"], "s");
    assert_eq!(env["B"], "3");
    assert_eq!(env["C"], "true");
    assert_eq!(env["D"], "1.5");
    assert_eq!(env["E"], "2.0");
}

#[test]
fn command_and_image_rules() {
    let errs = errors("name = \"demo\"\n[services.web]\nport = true\n");
    let e = expect(&errs, "neither `command` nor `image`", 2, 11);
    assert!(e.hint.unwrap().contains("image"));
    // With an image, `command` is the container's command.
    let s = parse_str(&with("image = \"nginx\"\n"), "f", Format::Toml, None).unwrap();
    let web = &s.services["web"];
    assert_eq!(web.image.as_deref(), Some("nginx"));
    assert!(web.command.is_some());
    assert_eq!(web.driver(), dozen_spec::DOCKER_DRIVER);
    let errs = errors("name = \"demo\"\n[services.web]\ncommand = \"  \"\n");
    expect(&errs, "`command` is empty", 3, 11);
    let errs = errors("name = \"demo\"\n[services.web]\ncommand = []\n");
    expect(&errs, "`command` is empty", 3, 11);
    let errs = errors("name = \"demo\"\n[services.web]\ncommand = [\"\", \"x\"]\n");
    expect(&errs, "`command` is empty", 3, 11);
    let errs = errors("name = \"demo\"\n[services.web]\ncommand = [\"a\", 1]\n");
    expect(&errs, "array items must be strings", 3, 17);
    let errs = errors("name = \"demo\"\n[services.web]\ncommand = 5\n");
    expect(&errs, "must be a string or an array", 3, 11);
}

#[test]
fn commands_parse() {
    use dozen_spec::Command;
    let s = parse_str(BASE, "f", Format::Toml, None).unwrap();
    let c = s.services["web"].command.clone().unwrap();
    assert_eq!(c, Command::Shell("./web".into()));
    assert_eq!(c.argv(), vec!["/bin/sh", "-c", "./web"]);
    let s = parse_str(
        "name = \"demo\"\n[services.web]\ncommand = [\"python\", \"app.py\"]\n",
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let c = s.services["web"].command.clone().unwrap();
    assert_eq!(c.argv(), vec!["python", "app.py"]);
}

#[test]
fn replicas_range_and_type() {
    let errs = errors(&with("replicas = 1001\n"));
    let e = expect(&errs, "out of range", 4, 12);
    assert!(e.hint.unwrap().contains("1000"));
    let errs = errors(&with("replicas = -1\n"));
    expect(&errs, "out of range", 4, 12);
    let errs = errors(&with("replicas = \"2\"\n"));
    let e = expect(&errs, "must be an integer, found a string", 4, 12);
    assert!(e.hint.unwrap().contains("replicas = 2"));
    for n in [0, 1000] {
        let s = parse_str(&with(&format!("replicas = {n}\n")), "f", Format::Toml, None).unwrap();
        assert_eq!(s.services["web"].replicas, Some(n));
    }
    let s = parse_str(BASE, "f", Format::Toml, None).unwrap();
    assert_eq!(s.services["web"].replicas, None);
}

#[test]
fn duplicate_routes_across_services() {
    let src = "name = \"demo\"
[services.a]
command = \"a\"
[[services.a.routes]]
host = \"shop.local\"
path = \"/\"
[[services.a.routes]]
host = \"shop.local\"
path = \"/api\"
[services.b]
command = \"b\"
[[services.b.routes]]
path = \"/\"
[[services.b.routes]]
host = \"shop.local\"
path = \"/\"
";
    let errs = errors(src);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = expect(&errs, "duplicate route", 14, 1);
    assert!(e.message.contains("service `a`"), "{e:#?}");
    assert!(e.message.contains("line 4"), "{e:#?}");
}

#[test]
fn route_rules() {
    let errs = errors(&with("[[services.web.routes]]\npath = \"api\"\n"));
    let e = expect(&errs, "must start with '/'", 5, 8);
    assert!(e.hint.unwrap().contains("/api"));
    let errs = errors(&with("[[services.web.routes]]\nhost = \"Shop.Local:80\"\n"));
    expect(&errs, "invalid route host", 5, 8);
    let errs = errors(&with("routes = \"/\"\n"));
    expect(&errs, "must be an array of tables", 4, 10);
    let errs = errors(&with(
        "port = false\n[[services.web.routes]]\npath = \"/\"\n",
    ));
    expect(&errs, "has routes but `port = false`", 5, 16);
    let s = parse_str(
        &with("[[services.web.routes]]\nhost = \"shop.local\"\ninternal = true\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let r = &s.services["web"].routes[0];
    assert_eq!(r.host.as_deref(), Some("shop.local"));
    assert_eq!(r.path, "/");
    assert!(r.internal);
}

#[test]
fn rule_conditions_and_actions_read_back() {
    let src = "name = \"demo\"
[services.web]
command = \"./web\"
[services.web.balance]
algorithm = \"least_outstanding\"
slow_start = \"30s\"
sticky = { cookie = \"shop\", duration = \"1h\" }
outlier = { errors = 3, ejection = \"10s\" }
[[services.web.routes]]
host = \"*.shop.local\"
path = \"/img/*.png\"
path_match = \"glob\"
methods = [\"get\", \"HEAD\"]
headers = { \"X-Canary\" = [\"on\", \"yes*\"] }
query = { v = \"2\" }
source = [\"10.0.0.0/8\", \"::1\"]
priority = 7
forward = { web = 90, next = 10 }
[[services.web.routes]]
path = \"/old\"
path_match = \"exact\"
redirect = { scheme = \"https\", path = \"/new#{path}\", status = 308 }
[[services.web.routes]]
path = \"/down\"
respond = { status = 503, body = \"back soon\" }
[services.next]
command = \"./web\"
";
    let s = parse_str(src, "f", Format::Toml, None).unwrap();
    let web = &s.services["web"];
    let b = &web.balance;
    assert_eq!(b.algorithm, dozen_spec::Algorithm::LeastOutstanding);
    assert_eq!(b.slow_start_ms, 30_000);
    assert_eq!(
        b.sticky
            .as_ref()
            .map(|s| (s.cookie.as_str(), s.duration_ms)),
        Some(("shop", 3_600_000))
    );
    assert_eq!(
        (b.outlier.consecutive_errors, b.outlier.ejection_ms),
        (3, 10_000)
    );
    let r = &web.routes[0];
    assert_eq!(r.path_match, dozen_spec::PathMatch::Glob);
    assert_eq!(r.methods, ["GET", "HEAD"]);
    assert_eq!(r.headers[0].name, "x-canary");
    assert_eq!(r.headers[0].values, ["on", "yes*"]);
    assert_eq!(r.query[0].values, ["2"]);
    assert_eq!(r.sources, ["10.0.0.0/8", "::1"]);
    assert_eq!(r.priority, Some(7));
    let dozen_spec::RouteAction::Forward { weights } = &r.action else {
        panic!("{r:?}")
    };
    assert_eq!(
        weights
            .iter()
            .map(|w| (w.service.as_str(), w.weight))
            .collect::<Vec<_>>(),
        [("web", 90), ("next", 10)]
    );
    let dozen_spec::RouteAction::Redirect(red) = &web.routes[1].action else {
        panic!()
    };
    assert_eq!(
        (red.scheme.as_deref(), red.path.as_deref(), red.status),
        (Some("https"), Some("/new#{path}"), 308)
    );
    let dozen_spec::RouteAction::Respond(fixed) = &web.routes[2].action else {
        panic!()
    };
    assert_eq!((fixed.status, fixed.body.as_str()), (503, "back soon"));
    assert_eq!(s.services["next"].balance, dozen_spec::Balance::default());
}

#[test]
fn rule_errors_name_the_bad_input() {
    let route = |body: &str| with(&format!("[[services.web.routes]]\n{body}\n"));
    let e = expect(&errors(&route("path = \"/a/*\"")), "has a wildcard", 5, 8);
    assert!(e.hint.unwrap().contains("glob"));
    expect(
        &errors(&route("path_match = \"regex\"")),
        "unknown path_match `regex`",
        5,
        14,
    );
    expect(
        &errors(&route("methods = [\"GE T\"]")),
        "`GE T` is not an HTTP method",
        5,
        12,
    );
    expect(
        &errors(&route("headers = { \"a b\" = \"x\" }")),
        "`a b` is not a header name",
        5,
        13,
    );
    expect(
        &errors(&route("source = \"10.0.0.0/40\"")),
        "not an address block",
        5,
        10,
    );
    expect(
        &errors(&route("priority = 0")),
        "priority 0 is out of range",
        5,
        12,
    );
    expect(
        &errors(&route("forward = { nope = 1 }")),
        "`forward` names `nope`, which is not a service",
        5,
        13,
    );
    expect(
        &errors(&route("forward = { web = 0 }")),
        "gives no service a share",
        5,
        11,
    );
    expect(
        &errors(&route("redirect = { status = 200 }")),
        "redirect status 200 is not a redirect",
        5,
        23,
    );
    expect(
        &errors(&route("redirect = {}")),
        "sends the client to the URL it asked for",
        5,
        12,
    );
    // The request's host may be used in a redirect's host; its path may not.
    expect(
        &errors(&route("redirect = { host = \"#{path}.x\" }")),
        "is not a host name",
        5,
        21,
    );
    assert!(parse_str(
        &with("[[services.web.routes]]\nredirect = { host = \"www.#{host}\" }\n"),
        "f",
        Format::Toml,
        None
    )
    .is_ok());
    expect(
        &errors(&with(
            "[services.web.balance]\noutlier = { ejection = \"2h\" }\n",
        )),
        "an ejection over an hour",
        5,
        24,
    );
    expect(
        &errors(&with("[services.web.balance]\nslow_start = \"1h\"\n")),
        "`slow_start` over 15 minutes",
        5,
        14,
    );
    expect(
        &errors(&route("respond = { status = 99 }")),
        "response status 99 is out of range",
        5,
        22,
    );
    expect(
        &errors(&route("respond = {}\nredirect = { scheme = \"https\" }")),
        "a route takes one action",
        6,
        1,
    );
    expect(
        &errors(&route("colour = 1")),
        "unknown field `colour` in a route",
        5,
        1,
    );
    expect(
        &errors(&with("[services.web.balance]\nalgorithm = \"random\"\n")),
        "unknown balance algorithm",
        5,
        13,
    );
    expect(
        &errors(&with(
            "[services.web.balance]\nsticky = { cookie = \"a;b\" }\n",
        )),
        "cannot name a cookie",
        5,
        21,
    );
    // A redirect needs no port; forwarding to itself does.
    assert!(parse_str(
        &with("port = false\n[[services.web.routes]]\nredirect = { scheme = \"https\" }\n"),
        "f",
        Format::Toml,
        None
    )
    .is_ok());
    let src = "name = \"demo\"
[services.a]
command = \"a\"
[[services.a.routes]]
path = \"/x\"
priority = 5
[[services.a.routes]]
path = \"/y\"
priority = 5
[[services.a.routes]]
path = \"/x\"
methods = [\"GET\"]
[[services.a.routes]]
methods = [\"GET\"]
path = \"/x\"
";
    let errs = errors(src);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    expect(&errs, "route priority 5 is already taken", 7, 1);
    expect(&errs, "duplicate route `* /x GET`", 13, 1);
}

#[test]
fn health_rules() {
    let h = |body: &str| with(&format!("[services.web.health]\n{body}"));
    let errs = errors(&h("http = \"/\"\ninterval = \"2s\"\ntimeout = \"2s\"\n"));
    let e = expect(&errs, "must be shorter than `interval`", 7, 11);
    assert!(e.hint.is_some());
    let errs = errors(&h("http = \"/\"\ntimeout = \"9s\"\n"));
    expect(&errs, "must be shorter than `interval`", 6, 11);
    // Seen: `interval = "1s"` alone was refused, the default timeout (2 s) being longer. A
    // timeout left unset follows a shorter interval: half of it.
    let s = parse_str(
        &h("http = \"/\"\ninterval = \"1s\"\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let check = s.services["web"].health.as_ref().unwrap();
    assert_eq!((check.interval_ms, check.timeout_ms), (1000, 500));
    let s = parse_str(
        &h("http = \"/\"\ninterval = \"10s\"\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    assert_eq!(s.services["web"].health.as_ref().unwrap().timeout_ms, 2000);
    let errs = errors(&h("tcp = true\nhealthy_threshold = 0\n"));
    expect(&errs, "`healthy_threshold` = 0 must be at least 1", 6, 21);
    let errs = errors(&h("tcp = true\nunhealthy_threshold = 0\n"));
    expect(&errs, "`unhealthy_threshold` = 0 must be at least 1", 6, 23);
    let errs = errors(&h("http = \"healthz\"\n"));
    let e = expect(&errs, "must start with '/'", 5, 8);
    assert!(e.hint.unwrap().contains("/healthz"));
    let errs = errors(&h("http = \"/\"\ntcp = true\n"));
    expect(&errs, "several kinds", 6, 1);
    let errs = errors(&h("interval = \"5s\"\n"));
    expect(&errs, "no kind", 4, 15);
    let errs = errors(&with("port = false\n[services.web.health]\ntcp = true\n"));
    expect(&errs, "but `port = false`", 5, 15);
    let errs = errors(&h("command = \"\"\n"));
    expect(&errs, "`command` is empty", 5, 11);
}

#[test]
fn health_parses_with_defaults() {
    use dozen_spec::HealthKind;
    let s = parse_str(
        &with("[services.web.health]\nhttp = \"/healthz\"\ngrace_period = \"10s\"\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let h = s.services["web"].health.clone().unwrap();
    assert_eq!(
        h.kind,
        HealthKind::Http {
            path: "/healthz".into()
        }
    );
    assert_eq!(
        (
            h.interval_ms,
            h.timeout_ms,
            h.healthy_threshold,
            h.unhealthy_threshold,
            h.grace_period_ms
        ),
        (5000, 2000, 1, 3, 10_000)
    );
    let s = parse_str(
        &with("[services.web.health]\ncommand = [\"./check\", \"-q\"]\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    assert_eq!(
        s.services["web"].health.as_ref().unwrap().kind,
        HealthKind::Command {
            argv: vec!["./check".into(), "-q".into()]
        }
    );
    let s = parse_str(
        &with("[services.web.health]\ncommand = \"true\"\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    assert_eq!(
        s.services["web"].health.as_ref().unwrap().kind,
        HealthKind::Command {
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()]
        }
    );
}

#[test]
fn no_services() {
    let errs = errors("name = \"demo\"\n");
    let e = expect(&errs, "no services", 1, 1);
    assert!(e.hint.unwrap().contains("services"));
    let errs = errors("name = \"demo\"\n[services]\n");
    expect(&errs, "no services", 2, 2);
    let errs = errors("name = \"demo\"\nservices = 3\n");
    expect(&errs, "must be a table", 2, 12);
}

#[test]
fn stop_signals() {
    let errs = errors(&with("stop_signal = \"SIGSTOP\"\n"));
    let e = expect(&errs, "unknown stop signal `SIGSTOP`", 4, 15);
    assert!(e.hint.unwrap().contains("SIGTERM"));
    for (given, want) in [
        ("TERM", "SIGTERM"),
        ("sigint", "SIGINT"),
        ("SIGKILL", "SIGKILL"),
        ("usr1", "SIGUSR1"),
    ] {
        let s = parse_str(
            &with(&format!("stop_signal = \"{given}\"\n")),
            "f",
            Format::Toml,
            None,
        )
        .unwrap();
        assert_eq!(s.services["web"].stop_signal, want);
    }
}

#[test]
fn image_references() {
    let svc = |img: &str| format!("name = \"demo\"\n[services.web]\nimage = \"{img}\"\n");
    let errs = errors(&svc("Nginx:latest"));
    let e = expect(&errs, "invalid image repository component", 3, 9);
    assert!(e.hint.unwrap().contains("nginx:1.25"));
    let errs = errors(&svc("nginx@sha256:1234"));
    expect(&errs, "64 lowercase hex", 3, 9);
    let errs = errors(&svc("nginx:"));
    expect(&errs, "invalid image tag", 3, 9);
    let digest = "0123456789abcdef".repeat(4);
    for ok in [
        "nginx",
        "nginx:1.25",
        "ghcr.io/owner/app:v1",
        "localhost:5000/a/b",
    ] {
        let s = parse_str(&svc(ok), "f", Format::Toml, None).unwrap();
        assert_eq!(s.services["web"].image.as_deref(), Some(ok));
    }
    parse_str(
        &svc(&format!("registry.local:5000/app:1@sha256:{digest}")),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
}

#[test]
fn on_disconnect_forms() {
    use dozen_spec::OnDisconnect;
    let get = |extra: &str| {
        parse_str(&with(extra), "f", Format::Toml, None)
            .unwrap()
            .services["web"]
            .on_disconnect
    };
    assert_eq!(get(""), OnDisconnect::Keep);
    assert_eq!(get("on_disconnect = \"keep\"\n"), OnDisconnect::Keep);
    assert_eq!(
        get("stop_after = \"30s\"\n"),
        OnDisconnect::StopAfter { after_ms: 30_000 }
    );
    assert_eq!(
        get("on_disconnect = { stop_after = \"1m\" }\n"),
        OnDisconnect::StopAfter { after_ms: 60_000 }
    );
    let errs = errors(&with("on_disconnect = \"stop\"\n"));
    expect(&errs, "unknown `on_disconnect` value", 4, 17);
    let errs = errors(&with("on_disconnect = \"keep\"\nstop_after = \"3s\"\n"));
    expect(&errs, "both `on_disconnect` and `stop_after`", 5, 1);
}

#[test]
fn other_fields_parse() {
    let s = parse_str(
        &with("artifact = \"./dist\"\nprocess_type = \"worker\"\nport = false\nstop_timeout = \"1m30s\"\nuser = \"nobody\"\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let w = &s.services["web"];
    assert_eq!(w.artifact.as_deref(), Some("./dist"));
    assert_eq!(w.process_type, "worker");
    assert!(!w.port);
    assert_eq!(w.stop_timeout_ms, 90_000);
    assert_eq!(w.user.as_deref(), Some("nobody"));
    let d = &parse_str(BASE, "f", Format::Toml, None).unwrap().services["web"];
    assert_eq!(
        (
            d.process_type.as_str(),
            d.port,
            d.stop_signal.as_str(),
            d.stop_timeout_ms
        ),
        ("web", true, "SIGTERM", 10_000)
    );
    assert_eq!(
        (d.resources.cpu_millis, d.resources.memory_bytes),
        (100, 128 << 20)
    );
    let errs = errors(&with("user = \"no body\"\n"));
    expect(&errs, "invalid user", 4, 8);
    let errs = errors(&with("artifact = \"\"\n"));
    expect(&errs, "`artifact` is empty", 4, 12);
    let errs = errors(&with("port = \"yes\"\n"));
    expect(&errs, "must be a boolean", 4, 8);
}

#[test]
fn all_errors_are_collected_and_sorted() {
    let src = "name = \"Bad\"
[services.web]
replica = 2
stop_signal = \"NOPE\"
[services.web.resources]
memory = \"lots\"
[services.api]
image = \"UPPER\"
";
    let errs = errors(src);
    let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![1, 2, 3, 4, 6, 8], "{errs:#?}");
    assert!(errs.iter().all(|e| e.hint.is_some()));
}

#[test]
fn display_format() {
    let err = parse_str(&with("replica = 2\n"), "dozen.toml", Format::Toml, None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "dozen.toml:4:1: error: unknown field `replica` in service `web`\n  hint: did you mean `replicas`?"
    );
    let _: &dyn std::error::Error = &err;
}

#[test]
fn yaml_semantic_errors_have_best_effort_positions() {
    let src = "name: demo
services:
  web:
    command: [\"./web\"]
    replica: 2
    env:
      PORT: 80
    health:
      http: healthz
    routes:
      - host: shop.local
        path: /
      - host: shop.local
        path: api
  worker:
    image: Nginx
";
    let errs = yaml_errors(src);
    let e = expect(&errs, "unknown field `replica`", 5, 5);
    assert_eq!(e.hint.as_deref(), Some("did you mean `replicas`?"));
    expect(&errs, "`PORT` cannot be set", 7, 7);
    let e = expect(&errs, "health check path", 9, 13);
    assert!(e.hint.unwrap().contains("http: \"/healthz\""));
    expect(&errs, "route path `api`", 14, 15);
    expect(&errs, "invalid image repository component", 16, 12);
    assert_eq!(errs.len(), 5, "{errs:#?}");
    let errs = yaml_errors("name: demo\nservices:\n  web:\n    port: true\n");
    expect(&errs, "neither `command` nor `image`", 3, 3);
}

#[test]
fn yaml_valid_document() {
    let src = "name: demo
services:
  web:
    command: ./web --flag
    replicas: 2
    env:
      LOG_LEVEL: info
      N: 3
    health:
      http: /healthz
      interval: 5s
    routes:
    - host: shop.local
    resources:
      cpu: 0.5
      memory: 256MiB
    on_disconnect:
      stop_after: 30s
  worker:
    image: ghcr.io/owner/worker:1
    port: false
";
    let s = parse_str(src, "dozen.yaml", Format::Yaml, None).unwrap();
    let toml = parse_str(
        "name = \"demo\"
[services.web]
command = \"./web --flag\"
replicas = 2
on_disconnect = { stop_after = \"30s\" }
env = { LOG_LEVEL = \"info\", N = 3 }
health = { http = \"/healthz\", interval = \"5s\" }
routes = [{ host = \"shop.local\" }]
resources = { cpu = 0.5, memory = \"256MiB\" }
[services.worker]
image = \"ghcr.io/owner/worker:1\"
port = false
",
        "dozen.toml",
        Format::Toml,
        None,
    )
    .unwrap();
    assert_eq!(s, toml);
}

#[test]
fn yaml_top_level_must_be_a_mapping() {
    let errs = yaml_errors("- a\n- b\n");
    expect(&errs, "must be a table/mapping", 1, 1);
}

#[test]
fn uses_must_name_other_services_of_the_stack() {
    let src = "name = \"demo\"\n[services.web]\ncommand = \"./web\"\nuses = [\"orders\", \"web\", \"api\"]\n[services.api]\ncommand = \"./api\"\nderegistration_delay = \"2s\"\n";
    let errs = errors(src);
    expect(
        &errs,
        "`orders`, which is not a service of this stack",
        4,
        9,
    );
    expect(&errs, "lists itself", 4, 19);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    let ok = parse_str(
        "name = \"demo\"\n[services.web]\ncommand = \"./web\"\nuses = [\"api\"]\n[services.api]\ncommand = \"./api\"\nderegistration_delay = \"2s\"\n",
        "dozen.toml",
        Format::Toml,
        None,
    )
    .unwrap();
    assert_eq!(ok.services["web"].uses, ["api"]);
    assert_eq!(ok.services["api"].deregistration_delay_ms, 2000);
    assert_eq!(ok.services["web"].deregistration_delay_ms, 1000);
}

/// Seen: a compose file got "unknown field `ports` … did you mean `port`?". It is named as a
/// compose file, once, with what to write instead.
#[test]
fn a_docker_compose_file_is_named_as_one() {
    let compose = "services:\n  web:\n    image: nginx\n    ports:\n      - \"80:80\"\n    environment:\n      A: b\n";
    let errs = yaml_errors(compose);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let e = expect(
        &errs,
        "this looks like a docker compose file (`ports`",
        4,
        5,
    );
    let hint = e.hint.unwrap();
    assert!(hint.contains("`port = true` for `ports`"), "{hint}");
    assert!(!e.message.contains("did you mean"));
    let errs = yaml_errors("version: \"3.8\"\nservices:\n  web:\n    image: nginx\n");
    expect(&errs, "compose file (`version`", 1, 1);
}

#[test]
fn volumes_parse_and_bad_ones_are_named() {
    let image = |extra: &str| {
        format!("name = \"s\"\n[services.db]\nimage = \"db:1\"\nport = false\n{extra}")
    };
    let s = parse_str(
        &image("volumes = [\"data:/var/lib/data\", \"/srv/up:/up:ro\"]\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let v = &s.services["db"].volumes;
    assert_eq!(
        (v[0].source.as_str(), v[0].target.as_str(), v[0].read_only),
        ("data", "/var/lib/data", false)
    );
    assert!(v[1].is_host_path() && v[1].read_only);
    let errs = errors(&image("volumes = [\"data:relative\"]\n"));
    expect(&errs, "is not an absolute path", 5, 12);
    let errs = errors(&image("volumes = [\"../x:/x\"]\n"));
    expect(
        &errs,
        "neither a volume name nor an absolute host path",
        5,
        12,
    );
    let errs = errors(&with("volumes = [\"data:/data\"]\n"));
    let e = expect(&errs, "has `volumes` but runs a host command", 3, 1);
    assert!(e.hint.unwrap().contains("image services"));
}

#[test]
fn placement_constraints_parse() {
    let s = parse_str(
        &with("node = \"n2\"\nnode_labels = { disk = \"ssd\" }\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let web = &s.services["web"];
    assert_eq!(web.node.as_deref(), Some("n2"));
    assert_eq!(web.node_labels["disk"], "ssd");
    let errs = errors(&with("node_labels = { disk = 1 }\n"));
    let e = expect(&errs, "label `disk` must be a string", 4, 24);
    assert!(e.hint.unwrap().contains("disk = \"ssd\""));
}

#[test]
fn builds_need_a_context_and_an_image_of_dozen_s_registry() {
    let svc = |lines: &str| format!("name = \"s\"\n[services.web]\n{lines}");
    let s = parse_str(
        &svc("image = \"shop/web\"\nbuild = { context = \"./web\" }\n"),
        "f",
        Format::Toml,
        None,
    )
    .unwrap();
    let build = s.services["web"].build.as_ref().unwrap();
    assert_eq!(
        (build.context.as_str(), build.dockerfile.as_str()),
        ("./web", "Dockerfile")
    );

    let errs = errors(&svc("build = { context = \"./web\" }\ncommand = \"x\"\n"));
    let e = expect(&errs, "has `build` but no `image`", 3, 1);
    assert!(e.hint.unwrap().contains("image = \"shop/web\""));
    let errs = errors(&svc(
        "image = \"ghcr.io/x/web:1\"\nbuild = { context = \".\" }\n",
    ));
    expect(&errs, "names another registry or a digest", 4, 1);
    let errs = errors(&svc(
        "image = \"shop/web\"\nbuild = { dockerfile = \"D\" }\n",
    ));
    expect(&errs, "`build` has no `context`", 4, 9);
    let errs = errors(&svc(
        "image = \"shop/web\"\nbuild = { context = \".\", dockerfile = \"../D\" }\n",
    ));
    expect(&errs, "leaves the build context", 4, 39);
    let errs = errors(&svc(
        "image = \"shop/web\"\nbuild = { context = \".\", dockerfil = \"D\" }\n",
    ));
    expect(&errs, "unknown field `dockerfil` in `build`", 4, 26);
    let errs = errors(&svc("image = \"shop/web\"\nbuild = \"./web\"\n"));
    expect(&errs, "`build` must be a table", 4, 9);
}
