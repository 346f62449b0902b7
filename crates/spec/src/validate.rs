//! Validation of a (merged) document tree into the [`Stack`] model, collecting every error.

use std::collections::BTreeMap;

use crate::node::{Entry, Loc, Node, Val};
use crate::types::*;
use crate::units::*;

mod environment;
mod health;
mod routes;
mod secrets;

pub use secrets::check_secrets;

/// An error before file names are attached.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Diag {
    pub loc: Loc,
    pub message: String,
    pub hint: Option<String>,
}

impl Diag {
    pub(crate) fn new(loc: Loc, message: impl Into<String>, hint: impl Into<String>) -> Diag {
        Diag {
            loc,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }
}

pub(crate) const TOP_KEYS: &[&str] = &["name", "services", "env"];
pub(crate) const OVERLAY_KEYS: &[&str] = &["name", "services"];
pub(crate) const SERVICE_KEYS: &[&str] = &[
    "command",
    "image",
    "artifact",
    "process_type",
    "replicas",
    "env",
    "port",
    "health",
    "routes",
    "resources",
    "stop_signal",
    "stop_timeout",
    "user",
    "on_disconnect",
    "stop_after",
    "deregistration_delay",
    "uses",
    "volumes",
    "node",
    "node_labels",
    "build",
    "balance",
    "secrets",
    "secrets_as",
    "on_change",
    "access",
];
pub(crate) const HEALTH_KEYS: &[&str] = &[
    "http",
    "tcp",
    "command",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "grace_period",
];
pub(crate) const ROUTE_KEYS: &[&str] = &[
    "host",
    "scheme",
    "path",
    "path_match",
    "methods",
    "headers",
    "query",
    "source",
    "priority",
    "internal",
    "forward",
    "redirect",
    "respond",
];
pub(crate) const BALANCE_KEYS: &[&str] = &["algorithm", "slow_start", "sticky", "outlier"];
pub(crate) const RESOURCES_KEYS: &[&str] = &["cpu", "memory", "pids", "logs"];
pub(crate) const ON_DISCONNECT_KEYS: &[&str] = &["stop_after"];

/// Renders examples in the syntax of the file being validated.
#[derive(Clone, Copy)]
pub(crate) struct Syntax {
    pub yaml: bool,
}

impl Syntax {
    fn ex(self, key: &str, value: &str) -> String {
        if self.yaml {
            format!("`{key}: {value}`")
        } else {
            format!("`{key} = {value}`")
        }
    }
}

pub(crate) struct Validator {
    pub diags: Vec<Diag>,
    syn: Syntax,
    /// Every `uses` entry, checked against the stack's services once all are read.
    uses_seen: Vec<(String, Loc)>,
    /// Every service a route's `forward` names, checked the same way.
    forwards_seen: Vec<(String, Loc)>,
}

/// The error for a key not in `allowed`, with a did-you-mean hint.
pub(crate) fn unknown_key(entry: &Entry, allowed: &[&str], context: &str) -> Diag {
    let hint = match suggest(&entry.key, allowed) {
        Some(s) => format!("did you mean `{s}`?"),
        None => format!("allowed keys {context}: {}", allowed.join(", ")),
    };
    Diag::new(
        entry.key_loc,
        format!("unknown field `{}` {context}", entry.key),
        hint,
    )
}

/// Non-null entries of a table node (YAML `key:` with no value counts as absent).
fn entries(node: &Node) -> impl Iterator<Item = &Entry> {
    let list: &[Entry] = match &node.val {
        Val::Table(e) => e,
        _ => &[],
    };
    list.iter().filter(|e| !matches!(e.node.val, Val::Null))
}

struct RouteSeen {
    conditions: String,
    description: String,
    priority: Option<u32>,
    service: String,
    loc: Loc,
}

impl Validator {
    pub(crate) fn new(syn: Syntax) -> Self {
        Validator {
            diags: Vec::new(),
            syn,
            uses_seen: Vec::new(),
            forwards_seen: Vec::new(),
        }
    }

    pub(crate) fn err(&mut self, loc: Loc, message: impl Into<String>, hint: impl Into<String>) {
        self.diags.push(Diag::new(loc, message, hint));
    }

    fn type_err(&mut self, e: &Entry, expected: &str, example: &str) {
        let found = e.node.val.type_name();
        let hint = format!("write e.g. {}", self.syn.ex(&e.key, example));
        self.err(
            e.node.loc,
            format!("`{}` must be {expected}, found {found}", e.key),
            hint,
        );
    }

    fn is_table(&mut self, e: &Entry, example: &str) -> bool {
        if matches!(e.node.val, Val::Table(_)) {
            true
        } else {
            let found = e.node.val.type_name();
            self.err(
                e.node.loc,
                format!("`{}` must be a table, found {found}", e.key),
                format!("write e.g. {example}"),
            );
            false
        }
    }

    fn str_of<'a>(&mut self, e: &'a Entry, example: &str) -> Option<&'a str> {
        match &e.node.val {
            Val::Str(s) => Some(s),
            _ => {
                self.type_err(e, "a string", example);
                None
            }
        }
    }

    fn bool_of(&mut self, e: &Entry) -> Option<bool> {
        match e.node.val {
            Val::Bool(b) => Some(b),
            _ => {
                self.type_err(e, "a boolean", "true");
                None
            }
        }
    }

    fn int_of(&mut self, e: &Entry, example: &str) -> Option<i128> {
        match e.node.val {
            Val::Int(i) => Some(i),
            _ => {
                self.type_err(e, "an integer", example);
                None
            }
        }
    }

    fn duration_of(&mut self, e: &Entry) -> Option<u64> {
        let s = self.str_of(e, "\"10s\"")?;
        match parse_duration_ms(s) {
            Ok(ms) => Some(ms),
            Err(m) => {
                self.err(
                    e.node.loc,
                    format!("`{}`: {m}", e.key),
                    DURATION_EXAMPLES.to_string(),
                );
                None
            }
        }
    }

    fn non_empty_str(&mut self, e: &Entry, example: &str) -> Option<String> {
        let s = self.str_of(e, example)?;
        if s.trim().is_empty() {
            let hint = format!(
                "write e.g. {} or remove the key",
                self.syn.ex(&e.key, example)
            );
            self.err(e.node.loc, format!("`{}` is empty", e.key), hint);
            return None;
        }
        Some(s.to_string())
    }

    /// A command given as a string (shell) or a non-empty array of strings (exec).
    fn command_of(&mut self, e: &Entry) -> Option<Command> {
        let shell_ex = "\"./web --port $PORT\"";
        match &e.node.val {
            Val::Str(s) => {
                if s.trim().is_empty() {
                    let hint = format!(
                        "give the program to run, e.g. {} or {}",
                        self.syn.ex(&e.key, shell_ex),
                        self.syn.ex(&e.key, "[\"./web\", \"--flag\"]")
                    );
                    self.err(e.node.loc, format!("`{}` is empty", e.key), hint);
                    None
                } else {
                    Some(Command::Shell(s.clone()))
                }
            }
            Val::Array(items) => {
                let mut argv = Vec::new();
                let mut ok = true;
                for item in items {
                    match &item.val {
                        Val::Str(s) => argv.push(s.clone()),
                        other => {
                            ok = false;
                            let found = other.type_name();
                            self.err(
                                item.loc,
                                format!("`{}` array items must be strings, found {found}", e.key),
                                "quote every argument, e.g. [\"./web\", \"--port\", \"8080\"]",
                            );
                        }
                    }
                }
                if !ok {
                    return None;
                }
                if argv.first().is_none_or(|p| p.trim().is_empty()) {
                    let hint = format!(
                        "the first element is the program to run, e.g. {}",
                        self.syn.ex(&e.key, "[\"./web\", \"--flag\"]")
                    );
                    self.err(e.node.loc, format!("`{}` is empty", e.key), hint);
                    return None;
                }
                Some(Command::Exec(argv))
            }
            _ => {
                self.type_err(e, "a string or an array of strings", shell_ex);
                None
            }
        }
    }

    /// Validates a whole (merged, `env`-stripped) document.
    pub(crate) fn stack(&mut self, root: &Node, main_file: usize) -> Option<Stack> {
        let before = self.diags.len();
        if !matches!(root.val, Val::Table(_) | Val::Null) {
            let found = root.val.type_name();
            self.err(
                root.loc,
                format!("a stack file must be a table/mapping at the top level, found {found}"),
                "start the file with `name = \"my-stack\"` and a [services.<name>] table",
            );
            return None;
        }
        if let Some(diag) = crate::compose::looks_like_compose(root) {
            self.diags.push(diag);
            return None;
        }
        let mut name = None;
        let mut services_entry = None;
        for e in entries(root) {
            match e.key.as_str() {
                "name" => {
                    if let Some(s) = self.str_of(e, "\"my-stack\"") {
                        match check_name(s, "stack") {
                            Ok(()) => name = Some(s.to_string()),
                            Err((m, h)) => self.err(e.node.loc, m, h),
                        }
                    }
                }
                "services" => services_entry = Some(e),
                // Environment overlays are handled (and removed) by the loader.
                "env" => {}
                _ => self
                    .diags
                    .push(unknown_key(e, TOP_KEYS, "at the top level")),
            }
        }
        if root
            .get("name")
            .is_none_or(|e| matches!(e.node.val, Val::Null))
        {
            let hint = format!(
                "add {} at the top of the file",
                self.syn.ex("name", "\"my-stack\"")
            );
            self.err(
                Loc::start(main_file),
                "missing `name` (the stack name)",
                hint,
            );
        }
        let mut services = BTreeMap::new();
        let no_services_hint = if self.syn.yaml {
            "add a service, e.g. `services:` / `  web:` / `    command: \"./web\"`"
        } else {
            "add a service, e.g. `[services.web]` with `command = \"./web\"`"
        };
        match services_entry {
            None => self.err(
                Loc::start(main_file),
                "the stack defines no services",
                no_services_hint,
            ),
            Some(se) => {
                if self.is_table(se, "[services.web]") {
                    let mut routes_seen: Vec<RouteSeen> = Vec::new();
                    let mut any = false;
                    for e in entries(&se.node) {
                        any = true;
                        if let Some(svc) = self.service(e, &mut routes_seen) {
                            services.insert(e.key.clone(), svc);
                        }
                    }
                    if !any {
                        self.err(
                            se.key_loc,
                            "the stack defines no services",
                            no_services_hint,
                        );
                    }
                    self.duplicate_routes(routes_seen);
                    let names: Vec<String> = entries(&se.node).map(|e| e.key.clone()).collect();
                    self.forwards_known(&names, &services);
                    for (name, loc) in std::mem::take(&mut self.uses_seen) {
                        if !names.contains(&name) {
                            self.err(
                                loc,
                                format!(
                                    "`uses` names `{name}`, which is not a service of this stack"
                                ),
                                format!("services here: {}", names.join(", ")),
                            );
                        }
                    }
                }
            }
        }
        if self.diags.len() > before {
            return None;
        }
        Some(Stack {
            name: name?,
            services,
        })
    }

    fn service(&mut self, se: &Entry, routes_seen: &mut Vec<RouteSeen>) -> Option<Service> {
        let before = self.diags.len();
        if let Err((m, h)) = check_name(&se.key, "service") {
            self.err(se.key_loc, m, h);
        }
        if !self.is_table(se, "[services.web] with `command = \"./web\"`") {
            return None;
        }
        let mut svc = Service::default();
        let mut command_key: Option<&Entry> = None;
        let mut image_key: Option<&Entry> = None;
        let mut build_key: Option<&Entry> = None;
        let mut env_entries: Vec<&Entry> = Vec::new();
        let mut health_entry: Option<&Entry> = None;
        let mut routes_entry: Option<&Entry> = None;
        let mut on_disc_entry: Option<&Entry> = None;
        let mut stop_after_entry: Option<&Entry> = None;
        let mut secrets_key: Option<&Entry> = None;

        for e in entries(&se.node) {
            match e.key.as_str() {
                "command" => {
                    command_key = Some(e);
                    svc.command = self.command_of(e);
                }
                "image" => {
                    image_key = Some(e);
                    if let Some(s) = self.str_of(e, "\"nginx:1.25\"") {
                        match check_image(s) {
                            Ok(()) => svc.image = Some(s.to_string()),
                            Err(m) => self.err(
                                e.node.loc,
                                m,
                                "image references look like \"nginx\", \"nginx:1.25\", \"ghcr.io/owner/app:v1\" or \"app@sha256:<64 hex>\" (lowercase repository)",
                            ),
                        }
                    }
                }
                "artifact" => svc.artifact = self.non_empty_str(e, "\"./dist\""),
                "process_type" => {
                    if let Some(s) = self.str_of(e, "\"web\"") {
                        match check_name(s, "process type") {
                            Ok(()) => svc.process_type = s.to_string(),
                            Err((m, h)) => self.err(e.node.loc, m, h),
                        }
                    }
                }
                "replicas" => {
                    if let Some(n) = self.int_of(e, "2") {
                        match u32::try_from(n) {
                            Ok(n) if n <= MAX_REPLICAS => svc.replicas = Some(n),
                            _ => self.err(
                                e.node.loc,
                                format!("`replicas` = {n} is out of range"),
                                format!("replicas must be between 0 and {MAX_REPLICAS}"),
                            ),
                        }
                    }
                }
                "env" => {
                    if self.is_table(e, "[services.web.env] with `LOG_LEVEL = \"info\"`") {
                        env_entries.push(e);
                    }
                }
                "port" => {
                    if let Some(b) = self.bool_of(e) {
                        svc.port = b;
                    }
                }
                "health" => {
                    if self.is_table(e, "[services.web.health] with `http = \"/healthz\"`") {
                        health_entry = Some(e);
                    }
                }
                "routes" => routes_entry = Some(e),
                "resources" => {
                    if self.is_table(e, "[services.web.resources] with `memory = \"256MiB\"`") {
                        self.resources(e, &mut svc.resources);
                    }
                }
                "stop_signal" => {
                    if let Some(s) = self.str_of(e, "\"SIGTERM\"") {
                        match normalize_signal(s) {
                            Some(sig) => svc.stop_signal = sig,
                            None => self.err(
                                e.node.loc,
                                format!("unknown stop signal `{s}`"),
                                format!(
                                    "use one of: {}",
                                    SIGNALS
                                        .iter()
                                        .map(|s| format!("SIG{s}"))
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            ),
                        }
                    }
                }
                "stop_timeout" => {
                    if let Some(ms) = self.duration_of(e) {
                        svc.stop_timeout_ms = ms;
                    }
                }
                "user" => {
                    if let Some(u) = self.non_empty_str(e, "\"nobody\"") {
                        if u.chars().any(|c| c.is_whitespace() || c.is_control()) {
                            self.err(
                                e.node.loc,
                                format!("invalid user `{u}`"),
                                "give a user name, a uid, or uid:gid, without spaces",
                            );
                        } else {
                            svc.user = Some(u);
                        }
                    }
                }
                "on_disconnect" => on_disc_entry = Some(e),
                "stop_after" => stop_after_entry = Some(e),
                "deregistration_delay" => {
                    if let Some(ms) = self.duration_of(e) {
                        svc.deregistration_delay_ms = ms;
                    }
                }
                "uses" => self.uses(e, &se.key, &mut svc),
                "secrets" => {
                    secrets_key = Some(e);
                    self.secrets(e, &mut svc)
                }
                "secrets_as" => self.secrets_as(e, &mut svc),
                "on_change" => self.on_change(e, &mut svc),
                "access" => self.access(e, &mut svc),
                "balance" => svc.balance = self.balance(e),
                "volumes" => crate::volumes::check(self, e, &mut svc),
                "node" => crate::placement::node(self, e, &mut svc),
                "node_labels" => crate::placement::labels(self, e, &mut svc),
                "build" => {
                    build_key = Some(e);
                    crate::build::check(self, e, &mut svc);
                }
                _ => self.diags.push(unknown_key(
                    e,
                    SERVICE_KEYS,
                    &format!("in service `{}`", se.key),
                )),
            }
        }

        if let Some(e) = secrets_key {
            self.secrets_against_env(e, &svc);
        }
        match (command_key, image_key) {
            (None, None) => {
                let hint = format!(
                    "add {} (a process) or {} (a container)",
                    self.syn.ex("command", "\"./web\""),
                    self.syn.ex("image", "\"nginx:1.25\"")
                );
                self.err(
                    se.key_loc,
                    format!("service `{}` has neither `command` nor `image`", se.key),
                    hint,
                );
            }
            // Both: `command` is the container's command (the image's entrypoint gets it).
            (Some(c), None) if !svc.volumes.is_empty() => self.err(c.key_loc, format!("service `{}` has `volumes` but runs a host command", se.key), "volumes are for image services: a host command reads the host's files where they are"),
            _ => {}
        }

        if let (Some(b), true) = (build_key, svc.build.is_some()) {
            crate::build::check_target(self, &se.key, b, &svc);
        }
        for e in env_entries {
            for v in entries(&e.node) {
                self.env_var(v, &mut svc);
            }
        }
        if let Some(h) = health_entry {
            svc.health = self.health(h);
            if svc.health.is_some() && !svc.port {
                if let Some(HealthKind::Http { .. } | HealthKind::Tcp) =
                    svc.health.as_ref().map(|h| &h.kind)
                {
                    self.err(
                        h.key_loc,
                        format!(
                            "service `{}` has an http/tcp health check but `port = false`",
                            se.key
                        ),
                        "http and tcp checks probe $PORT: set `port = true`, or use a `command` health check",
                    );
                }
            }
        }
        if let Some(r) = routes_entry {
            svc.routes = self.routes(r, &se.key, routes_seen);
            let to_itself = |r: &Route| matches!(&r.action, RouteAction::Forward { weights } if weights.is_empty());
            if !svc.port && svc.routes.iter().any(to_itself) {
                self.err(
                    r.key_loc,
                    format!("service `{}` has routes but `port = false`", se.key),
                    "routes forward traffic to $PORT: set `port = true`, or give the routes a `redirect`, `respond` or `forward` to other services",
                );
            }
        }
        svc.on_disconnect = self.on_disconnect(on_disc_entry, stop_after_entry);

        if self.diags.len() > before {
            None
        } else {
            Some(svc)
        }
    }

    fn resources(&mut self, e: &Entry, out: &mut Resources) {
        for r in entries(&e.node) {
            match r.key.as_str() {
                "cpu" => {
                    let res = match &r.node.val {
                        Val::Float(f) => cpu_from_cores(*f),
                        Val::Int(i) => {
                            // Exact: integers are whole cores.
                            #[allow(clippy::cast_precision_loss)]
                            let f = *i as f64;
                            cpu_from_cores(f)
                        }
                        Val::Str(s) => parse_cpu_str(s),
                        _ => {
                            self.type_err(r, "a number of cores or a string", "0.5");
                            continue;
                        }
                    };
                    match res {
                        Ok(m) => out.cpu_millis = m,
                        Err(m) => self.err(r.node.loc, m, CPU_EXAMPLES),
                    }
                }
                "memory" => {
                    let res = match &r.node.val {
                        Val::Str(s) => parse_size_bytes(s),
                        Val::Int(i) => u64::try_from(*i).map_err(|_| format!("invalid memory {i}")),
                        _ => {
                            self.type_err(r, "a size string", "\"256MiB\"");
                            continue;
                        }
                    };
                    match res {
                        Ok(0) => self.err(
                            r.node.loc,
                            "`memory` must be greater than zero",
                            SIZE_EXAMPLES,
                        ),
                        Ok(b) => out.memory_bytes = b,
                        Err(m) => self.err(r.node.loc, m, SIZE_EXAMPLES),
                    }
                }
                "pids" => match self.int_of(r, "512") {
                    Some(n) if n >= 1 && u32::try_from(n).is_ok() => out.pids = n as u32,
                    Some(n) => self.err(
                        r.node.loc,
                        format!("`pids` must be between 1 and {}, found {n}", u32::MAX),
                        "count the task's processes and threads together, e.g. `pids = 512`",
                    ),
                    None => {}
                },
                "logs" => {
                    let res = match &r.node.val {
                        Val::Str(s) => parse_size_bytes(s),
                        Val::Int(i) => u64::try_from(*i).map_err(|_| format!("invalid size {i}")),
                        _ => {
                            self.type_err(r, "a size string", "\"20MiB\"");
                            continue;
                        }
                    };
                    match res {
                        Ok(b) if b < MIN_LOG_BYTES => self.err(
                            r.node.loc,
                            format!("`logs` must be at least 1MiB, found {b} bytes"),
                            "give the disk the task's output may take, e.g. `logs = \"20MiB\"`",
                        ),
                        Ok(b) => out.log_bytes = b,
                        Err(m) => self.err(r.node.loc, m, SIZE_EXAMPLES),
                    }
                }
                _ => self
                    .diags
                    .push(unknown_key(r, RESOURCES_KEYS, "in `resources`")),
            }
        }
    }

    fn on_disconnect(&mut self, od: Option<&Entry>, sa: Option<&Entry>) -> OnDisconnect {
        let from_od = od.and_then(|e| match &e.node.val {
            Val::Str(s) if s == "keep" => Some(OnDisconnect::Keep),
            Val::Str(s) => {
                let hint = format!(
                    "use {} or {}",
                    self.syn.ex("on_disconnect", "\"keep\""),
                    self.syn.ex("stop_after", "\"30s\"")
                );
                self.err(
                    e.node.loc,
                    format!("unknown `on_disconnect` value `{s}`"),
                    hint,
                );
                None
            }
            Val::Table(_) => {
                let mut res = None;
                for t in entries(&e.node) {
                    if t.key == "stop_after" {
                        res = self
                            .duration_of(t)
                            .map(|ms| OnDisconnect::StopAfter { after_ms: ms });
                    } else {
                        self.diags
                            .push(unknown_key(t, ON_DISCONNECT_KEYS, "in `on_disconnect`"));
                    }
                }
                if res.is_none() && entries(&e.node).next().is_none() {
                    let hint = format!("write {}", self.syn.ex("stop_after", "\"30s\""));
                    self.err(e.node.loc, "`on_disconnect` table is empty", hint);
                }
                res
            }
            _ => {
                self.type_err(e, "\"keep\" or a table with `stop_after`", "\"keep\"");
                None
            }
        });
        let from_sa = sa.and_then(|e| {
            self.duration_of(e)
                .map(|ms| OnDisconnect::StopAfter { after_ms: ms })
        });
        match (od, sa) {
            (Some(o), Some(s)) => {
                let later = if o.key_loc > s.key_loc { o } else { s };
                self.err(
                    later.key_loc,
                    "both `on_disconnect` and `stop_after` are set",
                    "keep only one: `on_disconnect = \"keep\"` or `stop_after = \"30s\"`",
                );
                OnDisconnect::Keep
            }
            _ => from_sa.or(from_od).unwrap_or_default(),
        }
    }
}
