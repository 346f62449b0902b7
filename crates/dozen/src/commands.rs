//! The client commands: each turns arguments into API calls and prints the answer.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use dozen_api::ApplyOutcome;
use dozen_api::{ApplyRequest, Client, LogLine, LogQuery, LogStream, ServiceSummary, TaskInfo};
use dozen_model::{DesiredState, Release};
use dozen_spec::{Plan, PlanAction};
use futures_util::StreamExt;
use serde::Serialize;

use crate::output::{self, age, table};
use crate::{Global, Output};

#[derive(Args, Debug)]
pub struct FileArgs {
    /// The stack file (TOML; .yaml/.yml read as YAML).
    #[arg(
        short = 'f',
        long = "file",
        env = "DOZEN_FILE",
        default_value = "dozen.toml"
    )]
    pub file: PathBuf,
    /// Environment overlay: the [env.NAME] table and/or the sibling file dozen.NAME.toml.
    #[arg(long, env = "DOZEN_ENV")]
    pub env: Option<String>,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// Return once the change is recorded, without waiting for tasks.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for every service to be running and healthy.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct PsArgs {
    /// Only this service.
    pub service: Option<String>,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    pub service: String,
    /// Keep printing new lines as they are written.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only lines newer than this, e.g. 10m, 1h, 30s.
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Only the last N lines (before following).
    #[arg(long)]
    pub tail: Option<usize>,
    /// Only this task.
    #[arg(long)]
    pub task: Option<String>,
    /// Start each line with the time it was written (UTC, to the millisecond).
    #[arg(long)]
    pub timestamps: bool,
}

#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// SERVICE=COUNT pairs, e.g. web=4 worker=2.
    #[arg(required = true)]
    pub pairs: Vec<String>,
    /// Return only when every service runs exactly COUNT tasks, all healthy.
    #[arg(long)]
    pub wait: bool,
    /// Longest --wait before giving up (exit code 1).
    #[arg(long, default_value = "120s", value_parser = parse_duration, requires = "wait")]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct ServiceArg {
    pub service: String,
}

#[derive(Args, Debug)]
pub struct RestartArgs {
    pub service: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Args, Debug)]
pub struct ServicesArg {
    #[arg(required = true)]
    pub services: Vec<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `--wait` and its `--timeout`, for the commands that change tasks.
#[derive(Args, Debug)]
pub struct WaitArgs {
    /// Return only once the change is done: every task replaced, running and healthy (or,
    /// for `stop`, gone), showing progress; on a timeout, why not (exit code 1).
    #[arg(long)]
    pub wait: bool,
    /// Longest --wait before giving up.
    #[arg(long, default_value = "120s", value_parser = parse_duration, requires = "wait")]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// The stack to remove. Default: the only stack there is.
    pub stack: Option<String>,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    pub service: String,
    /// The release to go back to. Default: the one before the current.
    #[arg(long)]
    pub to: Option<u64>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    pub service: String,
    /// The command, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// "10s", "500ms", "1m30s", "2h".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration; write it like 500ms, 10s, 5m or 1h30m");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            "d" => n.checked_mul(86_400).map(Duration::from_secs),
            _ => return Err(bad()),
        };
        total = part.and_then(|p| total.checked_add(p)).ok_or_else(bad)?;
    }
    Ok(total)
}

pub fn client(global: &Global) -> anyhow::Result<Client> {
    let token = token(global)?;
    let tls = crate::identity::operator_tls(global)?;
    Ok(Client::with_tls(global.server(), &token, tls))
}

/// The operator token: `--token`, else the server's token file in the data directory.
pub fn token(global: &Global) -> anyhow::Result<String> {
    Ok(match &global.token {
        Some(t) => t.clone(),
        None => {
            let path = global.data_dir.join("token");
            std::fs::read_to_string(&path)
                .map(|t| t.trim().to_string())
                .map_err(|_| {
                    anyhow::anyhow!(
                        "no API token: pass --token (DOZEN_TOKEN), or run where `dozen server` keeps its data \
                         (looked for {}; set --data-dir / DOZEN_DATA_DIR)",
                        path.display()
                    )
                })?
        }
    })
}

pub fn load_stack(file: &FileArgs) -> anyhow::Result<dozen_spec::Stack> {
    dozen_spec::load(&file.file, file.env.as_deref()).map_err(|errors| {
        // Each error already reads `file:line:col: error: ...`; print them as they are.
        eprintln!("{errors}");
        anyhow::anyhow!(
            "{} error(s) in {}; nothing was applied",
            errors.len(),
            file.file.display()
        )
    })
}

/// Packs each service's `artifact` directory (relative to the stack file) into a bundle;
/// uploads it when `api` is given. Returns service -> digest.
pub async fn artifacts(
    file: &FileArgs,
    stack: &dozen_spec::Stack,
    api: Option<&Client>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let base = file
        .file
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for (name, svc) in &stack.services {
        let Some(dir) = &svc.artifact else { continue };
        let path = base.join(dir);
        let bytes = dozen_agent::bundle::pack_dir(&path).with_context(|| {
            format!(
                "service `{name}`: cannot bundle its artifact directory {}",
                path.display()
            )
        })?;
        let digest = match api {
            Some(api) => api.upload_blob(bytes).await?,
            None => dozen_digest::sha256_digest(&bytes),
        };
        out.insert(name.clone(), digest);
    }
    Ok(out)
}

fn print_plan(plan: &Plan) {
    println!("stack {}", plan.stack);
    for sp in &plan.services {
        let r = &sp.replicas;
        let drift = matches!((r.live, r.file), (Some(live), Some(file)) if live != file);
        let (mark, what) = match sp.action {
            PlanAction::Create => ("+", "create"),
            PlanAction::Update => ("~", "update (new release)"),
            // The same release, but the count changes: never "unchanged" above a change.
            PlanAction::Unchanged if drift => ("~", "scale (same release)"),
            PlanAction::Unchanged => ("=", "unchanged"),
            PlanAction::Remove => ("-", "remove"),
        };
        println!("{mark} {} : {what}", sp.service);
        // A new service lists every field; its command, and who runs it when the file says,
        // are what a reader needs to see.
        let shown = sp.fields.iter().filter(|f| {
            sp.action != PlanAction::Create
                || ["command", "image", "user"].contains(&f.path.as_str())
        });
        for f in shown {
            let show = |v: &Option<serde_json::Value>| {
                v.as_ref()
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "(none)".into())
            };
            println!("    {}: {} -> {}", f.path, show(&f.before), show(&f.after));
        }
        match (r.live, r.file) {
            (Some(live), Some(file)) if live != file => {
                println!("    replicas: {live} -> {file} (live count -> file)")
            }
            (None, _) if sp.action != PlanAction::Remove => {
                println!("    replicas: {}", r.result)
            }
            (Some(live), None) => println!("    replicas: {live} (live; not set in the file)"),
            _ => {}
        }
    }
    if !plan.has_changes() {
        println!("no changes");
    }
}

pub async fn plan(global: &Global, args: FileArgs) -> anyhow::Result<i32> {
    let stack = load_stack(&args)?;
    let api = client(global)?;
    let artifacts = artifacts(&args, &stack, None).await?;
    let request = ApplyRequest {
        stack,
        artifacts,
        images: Default::default(),
    };
    let plan: Plan = api.plan(&request).await?;
    output::listing(global.output, &plan, || print_plan(&plan));
    Ok(0)
}

pub async fn apply(global: &Global, args: ApplyArgs) -> anyhow::Result<i32> {
    let stack = load_stack(&args.file)?;
    let api = client(global)?;
    let services: Vec<String> = stack.services.keys().cloned().collect();
    let artifacts = artifacts(&args.file, &stack, Some(&api)).await?;
    let token = token(global)?;
    let quiet = global.output == Output::Json;
    let built = crate::build::build_and_push(&api, &token, quiet, &args.file, &stack, &[]).await?;
    let images = crate::build::digests(&built);
    let request = ApplyRequest {
        stack,
        artifacts,
        images,
    };
    let outcome: ApplyOutcome = api.apply(&request).await?;
    if global.output == Output::Table {
        print_plan(&outcome.plan);
        for r in &outcome.releases {
            println!("released {} #{}", r.service, r.release);
        }
    }
    if !args.no_wait {
        crate::wait::wait_converged(
            &api,
            &services,
            &[],
            args.timeout,
            global.output == Output::Table,
        )
        .await?;
    }
    if global.output == Output::Json {
        output::json(&outcome);
    }
    Ok(0)
}

#[derive(Serialize)]
struct PsOutput {
    services: Vec<ServiceSummary>,
    tasks: Vec<TaskInfo>,
}

pub async fn ps(global: &Global, args: PsArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    let mut services: Vec<ServiceSummary> = api.services().await?;
    let mut tasks: Vec<TaskInfo> = match &args.service {
        Some(s) => api.tasks(Some(s)).await?,
        None => api.tasks(None).await?,
    };
    if let Some(s) = &args.service {
        services.retain(|x| &x.name == s);
        if services.is_empty() && tasks.is_empty() {
            bail!("no service named `{s}`; `dozen ps` lists them all");
        }
    }
    tasks.sort_by(|a, b| (&a.service, &a.task).cmp(&(&b.service, &b.task)));
    let out = PsOutput { services, tasks };
    output::listing(global.output, &out, || {
        let rows: Vec<Vec<String>> = out
            .services
            .iter()
            .map(|s| {
                let status = if s.stopped {
                    "stopped".to_string()
                } else if let Some(p) = s.problems.first() {
                    p.clone()
                } else if s.healthy == s.desired {
                    "ok".to_string()
                } else {
                    "converging".to_string()
                };
                vec![
                    s.name.clone(),
                    s.stack.clone(),
                    s.process_type.clone(),
                    format!(
                        "#{}{}",
                        s.current_release,
                        if s.reproducible { "" } else { "*" }
                    ),
                    s.desired.to_string(),
                    s.running.to_string(),
                    s.healthy.to_string(),
                    status,
                ]
            })
            .collect();
        table(
            &[
                "SERVICE", "STACK", "TYPE", "RELEASE", "DESIRED", "RUNNING", "HEALTHY", "STATUS",
            ],
            &rows,
        );
        println!();
        let rows: Vec<Vec<String>> = out
            .tasks
            .iter()
            .map(|t| {
                let st = t.status.as_ref().filter(|s| s.generation == t.generation);
                let state = match (t.desired, st) {
                    (DesiredState::Drain, Some(s)) if !s.state.is_terminal() => "draining".into(),
                    (DesiredState::Drain, None) => "draining".into(),
                    (_, Some(s)) => s.state.as_str().to_string(),
                    (DesiredState::Stop, None) => "stopping".into(),
                    (DesiredState::Run, None) => "assigned".into(),
                };
                vec![
                    t.task.clone(),
                    t.service.clone(),
                    t.node.clone(),
                    format!("#{}", t.release),
                    state,
                    st.map(|s| if s.healthy { "healthy" } else { "-" })
                        .unwrap_or("-")
                        .to_string(),
                    st.and_then(|s| s.pid)
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "-".into()),
                    st.and_then(|s| s.host_port)
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "-".into()),
                    t.restarts.to_string(),
                    age(st.and_then(|s| s.started_at_ms)),
                    task_message(st),
                ]
            })
            .collect();
        table(
            &[
                "TASK", "SERVICE", "NODE", "RELEASE", "STATE", "HEALTH", "PID", "PORT", "RESTARTS",
                "AGE", "MESSAGE",
            ],
            &rows,
        );
        if out.services.iter().any(|s| !s.reproducible) {
            println!("\n* release runs a plain host command: not reproducible (the command can change under it)");
        }
    });
    Ok(0)
}

/// What `ps` says of a task: its status message, and any output its node could not keep.
fn task_message(status: Option<&dozen_model::TaskStatus>) -> String {
    let Some(status) = status else {
        return String::new();
    };
    let message = status.message.clone().unwrap_or_default();
    match status.log_lines_dropped {
        0 => message,
        n if message.is_empty() => dropped_note(n),
        n => format!("{message}; {}", dropped_note(n)),
    }
}

fn dropped_note(lines: u64) -> String {
    format!("{lines} log line(s) dropped: the node could not write them (disk full?)")
}

fn print_log_line(line: &LogLine, output: Output, timestamps: bool) {
    match output {
        Output::Json => println!("{}", serde_json::to_string(line).unwrap_or_default()),
        Output::Table => {
            let marker = if line.stream == LogStream::Stderr {
                "!"
            } else {
                "|"
            };
            let time = if timestamps {
                format!("{} ", output::utc_time(line.ts_ms))
            } else {
                String::new()
            };
            println!("{time}{} {marker} {}", line.task, line.line);
        }
    }
}

pub async fn logs(global: &Global, args: LogsArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    let query = LogQuery {
        service: Some(args.service.clone()),
        task: args.task.clone(),
        since_ms: args
            .since
            .map(|d| dozen_agent::shim::wall_ms().saturating_sub(d.as_millis() as u64)),
        tail: args.tail,
        follow: args.follow,
    };
    let mut stream = api.logs(&query).await?;
    let mut printed = false;
    while let Some(line) = stream.next().await {
        print_log_line(&line?, global.output, args.timestamps);
        printed = true;
    }
    // A mistyped task prints nothing: say so (a task removed within the hour still has logs).
    if let (Some(task), false) = (&args.task, printed) {
        let tasks = api.tasks(Some(&args.service)).await?;
        if !tasks.iter().any(|t| &t.task == task) {
            bail!(
                "no task `{task}` in service `{}`; `dozen ps {}` lists its tasks",
                args.service,
                args.service
            );
        }
    }
    // Lines a full disk swallowed are not in any answer: say so, where people read.
    if global.output == Output::Table {
        let tasks = api.tasks(Some(&args.service)).await.unwrap_or_default();
        for t in tasks {
            let dropped = t.status.as_ref().map_or(0, |s| s.log_lines_dropped);
            if dropped > 0 && args.task.as_ref().is_none_or(|only| *only == t.task) {
                eprintln!("note: {}: {}", t.task, dropped_note(dropped));
            }
        }
    }
    Ok(0)
}

pub async fn scale(global: &Global, args: ScaleArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    let mut wanted = Vec::new();
    for pair in &args.pairs {
        let (service, count) = pair
            .split_once('=')
            .with_context(|| format!("`{pair}` is not SERVICE=COUNT (e.g. web=4)"))?;
        let replicas: u32 = count
            .parse()
            .with_context(|| format!("`{count}` in `{pair}` is not a whole number of replicas"))?;
        wanted.push((service.to_string(), replicas));
    }
    for (service, replicas) in wanted {
        api.scale(&service, replicas).await?;
        println!("{service} scaled to {replicas}");
    }
    if args.wait {
        return crate::wait::wait_for_counts(
            &api,
            &crate::wait::wanted_after(&args.pairs),
            args.timeout,
        )
        .await;
    }
    Ok(0)
}

pub async fn restart(global: &Global, args: RestartArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    // The tasks running now: with --wait, done once none of them is left.
    let before: Vec<String> = api
        .tasks(Some(&args.service))
        .await?
        .into_iter()
        .map(|t| t.task)
        .collect();
    api.restart(&args.service).await?;
    println!("{}: replacing every task (new before old)", args.service);
    crate::wait::if_asked(&api, &args.wait, &[args.service], &before).await
}

pub async fn stop(global: &Global, args: ServicesArg) -> anyhow::Result<i32> {
    let api = client(global)?;
    for s in &args.services {
        api.stop(s).await?;
        println!("{s}: stopping (`dozen restart {s}` starts it again)");
    }
    crate::wait::if_asked(&api, &args.wait, &args.services, &[]).await
}

pub async fn down(global: &Global, args: DownArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    let stack = match args.stack {
        Some(s) => s,
        None => {
            let stacks: Vec<dozen_model::StackRecord> = api.stacks().await?;
            match stacks.as_slice() {
                [] => {
                    println!("nothing to remove: no stacks");
                    return Ok(0);
                }
                [one] => one.name.clone(),
                many => bail!(
                    "several stacks run ({}): name the one to remove, e.g. `dozen down {}`",
                    many.iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    many[0].name
                ),
            }
        }
    };
    let removed: Vec<String> = api.down(&stack).await?;
    println!(
        "removed stack {stack} ({}); stopping its tasks",
        removed.join(", ")
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let tasks: Vec<TaskInfo> = api.tasks(None).await?;
        if !tasks.iter().any(|t| t.stack == stack) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("tasks of stack `{stack}` did not stop within 120 s; `dozen ps` shows them");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A server that `dozen up -d` started in the background goes with its stack.
    // Only while the pid still names that server (same start time): after a reboot or a crash
    // it may name anything.
    let pid_file = global.data_dir.join("server.pid");
    if let Some((pid, start)) = dozen_agent::shim::read_pid_file(&pid_file) {
        if dozen_agent::os::process_is(pid, start) {
            let _ = dozen_agent::os::kill_pid(pid, libc::SIGTERM);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while dozen_agent::os::process_is(pid, start) && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if dozen_agent::os::process_is(pid, start) {
                eprintln!("the background server (pid {pid}) is still shutting down");
            } else {
                println!("stopped the background server (pid {pid})");
            }
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    Ok(0)
}

/// What `release` changed from the one before it: the fields, with their new values when
/// short (so a user can pick the release to roll back to).
fn changes(releases: &[Release], release: &Release) -> String {
    let Some(before) = releases
        .iter()
        .filter(|r| r.number < release.number)
        .max_by_key(|r| r.number)
    else {
        return "first release".into();
    };
    let mut said: Vec<String> = dozen_spec::diff_services(&before.spec, &release.spec)
        .into_iter()
        .map(|f| match &f.after {
            Some(v) if v.to_string().len() <= 24 => format!("{}={v}", f.path),
            Some(_) => f.path,
            None => format!("-{}", f.path),
        })
        .collect();
    if before.artifact_digest != release.artifact_digest {
        said.push("artifact".into());
    }
    if before.image_pin != release.image_pin && !said.iter().any(|s| s.starts_with("image")) {
        said.push("image".into());
    }
    if said.is_empty() {
        "no change (same spec)".into()
    } else {
        said.join(", ")
    }
}

pub async fn releases(global: &Global, args: ServiceArg) -> anyhow::Result<i32> {
    let api = client(global)?;
    let releases: Vec<Release> = api.releases(&args.service).await?;
    let services: Vec<ServiceSummary> = api.services().await?;
    let current = services
        .iter()
        .find(|s| s.name == args.service)
        .map(|s| s.current_release);
    output::listing(global.output, &releases, || {
        let rows: Vec<Vec<String>> = releases
            .iter()
            .rev()
            .map(|r| {
                vec![
                    format!(
                        "#{}{}",
                        r.number,
                        if Some(r.number) == current {
                            " (current)"
                        } else {
                            ""
                        }
                    ),
                    age(Some(r.created_at_ms)),
                    r.cause.clone(),
                    if r.reproducible {
                        r.artifact_digest
                            .clone()
                            .or(r.image_pin.as_ref().map(ToString::to_string))
                            .or(r.spec.image.clone())
                            .unwrap_or_default()
                    } else {
                        "not reproducible: host command".into()
                    },
                    r.spec
                        .command
                        .as_ref()
                        .map(|c| c.argv().join(" "))
                        .unwrap_or_default(),
                    changes(&releases, r),
                ]
            })
            .collect();
        table(
            &["RELEASE", "AGE", "CAUSE", "ARTIFACT", "COMMAND", "CHANGES"],
            &rows,
        );
    });
    Ok(0)
}

pub async fn rollback(global: &Global, args: RollbackArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    let release: Release = api.rollback(&args.service, args.to).await?;
    output::listing(global.output, &release, || {
        println!(
            "{}: release #{} ({}) is now current",
            args.service, release.number, release.cause
        );
    });
    crate::wait::if_asked(&api, &args.wait, &[args.service], &[]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("18446744073709551615s1s").is_err());
        assert!(parse_duration("99999999999999999h").is_err());
    }
}
