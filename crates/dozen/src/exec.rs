//! `dozen exec SERVICE [--task ID] -- CMD`: a command run inside a running task (a process
//! task's environment, directory and user; a container's exec), its output here as it comes,
//! its exit code ours.

use std::io::Write;

use anyhow::bail;
use clap::Args;
use dozen_api::{ExecOutput, ExecRequest};
use futures_util::StreamExt;

use crate::commands::client;
use crate::Global;

#[derive(Args, Debug)]
pub struct ExecArgs {
    pub service: String,
    /// This task of the service (default: a running one, healthy first).
    #[arg(long)]
    pub task: Option<String>,
    /// Give the command a terminal (container tasks).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub async fn exec(global: &Global, args: ExecArgs) -> anyhow::Result<i32> {
    let api = client(global)?;
    let tasks = api.tasks(Some(&args.service)).await?;
    if tasks.is_empty() {
        let known = api.services().await?.iter().any(|s| s.name == args.service);
        if !known {
            bail!("no service `{}` (`dozen ps` lists services)", args.service);
        }
    }
    let running = |t: &&dozen_api::TaskInfo| {
        t.status
            .as_ref()
            .is_some_and(|s| s.state == dozen_model::TaskState::Running)
    };
    let task = match &args.task {
        Some(id) => match tasks.iter().find(|t| &t.task == id) {
            Some(t) => t.task.clone(),
            None => bail!(
                "service `{}` has no task `{id}`; its tasks: {}",
                args.service,
                tasks
                    .iter()
                    .map(|t| t.task.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        None => {
            let mut candidates: Vec<_> = tasks.iter().filter(running).collect();
            candidates.sort_by_key(|t| !t.status.as_ref().is_some_and(|s| s.healthy));
            match candidates.first() {
                Some(t) => t.task.clone(),
                None => bail!(
                    "no task of `{}` is running (`dozen ps {}` says why)",
                    args.service,
                    args.service
                ),
            }
        }
    };
    let request = ExecRequest {
        argv: args.command.clone(),
        tty: args.tty,
    };
    let mut output = api.exec(&task, &request).await?;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(line) = output.next().await {
        match line? {
            ExecOutput::Stdout { text } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            ExecOutput::Stderr { text } => {
                err.write_all(text.as_bytes())?;
                err.flush()?;
            }
            ExecOutput::Exit { code } => return Ok(code.unwrap_or(1)),
            ExecOutput::Error { message } => bail!("exec in task `{task}`: {message}"),
        }
    }
    bail!("the answer from task `{task}` ended before the command did")
}
