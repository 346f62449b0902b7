//! `dozen up`: the one command a person tries first. Server, agent and proxy in this process
//! (or in the background with `-d`), the stack applied, every task's logs streamed with a
//! colour per service; Ctrl-C stops the stack gracefully, a second Ctrl-C forces it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use dozen_api::{ApplyRequest, Client, LogQuery, LogStream, TaskInfo};
use futures_util::StreamExt;

use crate::serve::{shutdown_signal, start_server, ServerArgs};
use crate::Global;

/// The demo stack built into the binary: what `dozen up` runs when there is no dozen.toml.
const DEMO: &str = include_str!("../../../examples/demo/dozen.toml");

#[derive(Args, Debug)]
pub struct UpArgs {
    /// The stack file. Default: ./dozen.toml, or the built-in demo stack when there is none.
    #[arg(short = 'f', long = "file", env = "DOZEN_FILE")]
    pub file: Option<PathBuf>,
    /// Environment overlay (the [env.NAME] table and/or dozen.NAME.toml).
    #[arg(long, env = "DOZEN_ENV")]
    pub env: Option<String>,
    /// Leave everything running in the background; `dozen down` stops it.
    #[arg(short = 'd', long)]
    pub detach: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// The stack to bring up, and where its relative paths (artifacts) start.
fn stack_for(
    args: &UpArgs,
) -> anyhow::Result<(dozen_spec::Stack, Option<crate::commands::FileArgs>)> {
    let file = match &args.file {
        Some(f) => Some(f.clone()),
        None if Path::new("dozen.toml").exists() => Some(PathBuf::from("dozen.toml")),
        None => None,
    };
    match file {
        Some(file) => {
            let fa = crate::commands::FileArgs {
                file,
                env: args.env.clone(),
            };
            Ok((crate::commands::load_stack(&fa)?, Some(fa)))
        }
        None => {
            // The demo's commands name ./target/release/dozen-demo; use the one beside us.
            let exe = std::env::current_exe().context("cannot find the dozen binary")?;
            let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            let demo = DEMO.replace("./target/release/", &format!("{}/", dir.display()));
            if !dir.join("dozen-demo").exists() {
                bail!(
                    "no dozen.toml here and no dozen-demo beside {} to run the built-in demo; \
                     build it with `cargo build --release` or pass -f FILE",
                    exe.display()
                );
            }
            let stack = dozen_spec::parse_str(
                &demo,
                "<built-in demo>",
                dozen_spec::Format::Toml,
                args.env.as_deref(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok((stack, None))
        }
    }
}

const COLOURS: &[&str] = &["36", "33", "35", "32", "34", "31", "96", "93"];

fn colour_for(service: &str, services: &[String]) -> &'static str {
    let i = services.iter().position(|s| s == service).unwrap_or(0);
    COLOURS[i % COLOURS.len()]
}

async fn apply_and_show(
    api: &Client,
    token: &str,
    stack: dozen_spec::Stack,
    file: Option<&crate::commands::FileArgs>,
    proxy_url: Option<&str>,
) -> anyhow::Result<(String, Vec<String>)> {
    let services: Vec<String> = stack.services.keys().cloned().collect();
    let name = stack.name.clone();
    let (artifacts, images) = match file {
        Some(f) => {
            let artifacts = crate::commands::artifacts(f, &stack, Some(api)).await?;
            let built = crate::build::build_and_push(api, token, false, f, &stack, &[]).await?;
            (artifacts, crate::build::digests(&built))
        }
        None => Default::default(),
    };
    let _: dozen_api::ApplyOutcome = api
        .apply(&ApplyRequest {
            stack,
            artifacts,
            images,
        })
        .await?;
    crate::wait::wait_converged(api, &services, &[], Duration::from_secs(120), true).await?;
    let tasks: Vec<TaskInfo> = api.tasks(None).await?;
    println!("\nstack `{name}` is up");
    if let Some(url) = proxy_url {
        println!("  open:   {url}/   (the proxy serves every public route)");
    }
    println!("  api:    {}", api.base());
    for t in tasks.iter().filter(|t| services.contains(&t.service)) {
        let port = t
            .status
            .as_ref()
            .and_then(|s| s.host_port)
            .map(|p| format!("127.0.0.1:{p}"))
            .unwrap_or_else(|| "-".into());
        println!("  {:<20} {:<10} {port}", t.task, t.service);
    }
    let first = if services.iter().any(|s| s == "web") {
        "web".to_string()
    } else {
        services.first().cloned().unwrap_or_default()
    };
    let dozen = invocation();
    println!(
        "\nfrom another shell in this directory: {dozen} ps | {dozen} logs {first} -f | {dozen} scale {first}=3"
    );
    Ok((name, services))
}

pub async fn up(global: &Global, args: UpArgs) -> anyhow::Result<i32> {
    let (stack, file) = stack_for(&args)?;
    if args.detach {
        return up_detached(global, &args, stack, file.as_ref()).await;
    }
    let running = start_server(global, &args.server).await?;
    let api = Client::with_tls(&running.url, &running.token, running.tls.clone());
    let (name, services) = apply_and_show(
        &api,
        &running.token,
        stack,
        file.as_ref(),
        running.proxy_url.as_deref(),
    )
    .await?;
    println!("Ctrl-C stops the stack (a second Ctrl-C forces it).\n");

    // Every task's output, coloured by service, like `docker compose up`.
    let tty = std::io::stdout().is_terminal();
    let logs = {
        let api = api.clone();
        let services = services.clone();
        tokio::spawn(async move {
            let q = LogQuery {
                follow: true,
                tail: Some(0),
                ..LogQuery::default()
            };
            let Ok(mut stream) = api.logs(&q).await else {
                return;
            };
            while let Some(Ok(l)) = stream.next().await {
                let tag = format!("{:<18}", l.task);
                let mark = if l.stream == LogStream::Stderr {
                    "!"
                } else {
                    "|"
                };
                if tty {
                    println!(
                        "\x1b[{}m{tag}{mark}\x1b[0m {}",
                        colour_for(&l.service, &services),
                        l.line
                    );
                } else {
                    println!("{tag}{mark} {}", l.line);
                }
            }
        })
    };
    shutdown_signal().await;
    logs.abort();
    eprintln!("\nstopping stack `{name}` (Ctrl-C again to force)...");
    let graceful = async {
        let _: Vec<String> = api.down(&name).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let tasks: Vec<TaskInfo> = api.tasks(None).await?;
            if tasks.is_empty() {
                return Ok::<bool, anyhow::Error>(true);
            }
            if tokio::time::Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        r = graceful => {
            if r? {
                eprintln!("stopped");
            } else {
                eprintln!("some tasks did not stop within 120 s; forcing");
                force_stop(&global.data_dir);
            }
        }
        _ = shutdown_signal() => {
            eprintln!("forcing: killing every task");
            force_stop(&global.data_dir);
        }
    }
    Ok(0)
}

/// Kills every task this data dir's agent runs (SIGKILL to each task's process group).
fn force_stop(data_dir: &Path) {
    let tasks = data_dir.join("agent").join("tasks");
    let Ok(entries) = std::fs::read_dir(&tasks) else {
        return;
    };
    for e in entries.flatten() {
        for (file, group) in [("task.pid", true), ("shim.pid", false)] {
            let Some((pid, start)) = dozen_agent::shim::read_pid_file(&e.path().join(file)) else {
                continue;
            };
            if dozen_agent::os::process_is(pid, start) {
                let _ = if group {
                    dozen_agent::os::kill_group(pid, libc::SIGKILL)
                } else {
                    dozen_agent::os::kill_pid(pid, libc::SIGKILL)
                };
            }
        }
    }
}

/// `up -d`: start `dozen server` in the background (pid in <data-dir>/server.pid), apply,
/// show, return. `dozen down` stops the stack and that server.
async fn up_detached(
    global: &Global,
    args: &UpArgs,
    stack: dozen_spec::Stack,
    file: Option<&crate::commands::FileArgs>,
) -> anyhow::Result<i32> {
    let data = &global.data_dir;
    dozen_agent::os::private_dir(data)
        .with_context(|| format!("cannot create data dir {}", data.display()))?;
    let exe = std::env::current_exe().context("cannot find the dozen binary")?;
    let log_path = data.join("server.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let s = &args.server;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("server")
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg(s.listen.to_string())
        .arg("--proxy-listen")
        .arg(s.proxy.proxy_listen.to_string())
        .arg("--proxy-internal-listen")
        .arg(s.proxy.proxy_internal_listen.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if s.no_proxy {
        cmd.arg("--no-proxy");
    }
    // `dozen up` runs tasks as the user who typed it, root too (a server started as root
    // would give them `nobody`).
    if dozen_agent::os::effective_uid() == 0 {
        cmd.arg("--task-user").arg("root");
    }
    // Its own process group: the shell's Ctrl-C and hang-up do not reach it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd
        .spawn()
        .context("cannot start `dozen server` in the background")?;
    // With its start time: `dozen down` signals it only while the pid still names it.
    dozen_agent::shim::write_pid_file(&data.join("server.pid"), child.id())
        .with_context(|| format!("cannot write {}", data.join("server.pid").display()))?;
    let server = format!("http://{}", s.listen);
    let health = format!("{server}{}", dozen_api::paths::HEALTHZ);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let token = std::fs::read_to_string(data.join("token")).unwrap_or_default();
        if !token.is_empty() {
            let api = Client::new(&server, token.trim());
            if api.check_access().await.is_ok() {
                break;
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the background server did not answer {health} within 20 s; see {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = std::fs::read_to_string(data.join("token"))?;
    let api = Client::new(&server, token.trim());
    let proxy = (!s.no_proxy).then(|| format!("http://{}", s.proxy.proxy_listen));
    apply_and_show(&api, token.trim(), stack, file, proxy.as_deref()).await?;
    println!(
        "running in the background (log: {}); `{} down` stops it",
        log_path.display(),
        invocation()
    );
    Ok(0)
}

/// How the user can run this binary from here: `dozen` when that is what PATH finds, else
/// its path (relative when under the current directory, as `./target/release/dozen`).
pub fn invocation() -> String {
    let Ok(exe) = std::env::current_exe().and_then(std::fs::canonicalize) else {
        return "dozen".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .filter_map(|dir| std::fs::canonicalize(dir.join("dozen")).ok())
            .next()
            .is_some_and(|found| found == exe)
    });
    if on_path {
        return "dozen".into();
    }
    let here = std::env::current_dir().and_then(std::fs::canonicalize);
    match here
        .ok()
        .and_then(|dir| exe.strip_prefix(dir).ok().map(|p| p.to_path_buf()))
    {
        Some(relative) => format!("./{}", relative.display()),
        None => exe.display().to_string(),
    }
}
