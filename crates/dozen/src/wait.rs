//! Waiting for a change to be done, with progress, and saying why not when it is not.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::bail;
use dozen_api::{Client, ServiceSummary, TaskInfo};
use dozen_model::{DesiredState, TaskState};

use crate::commands::WaitArgs;

/// With `--wait`, waits until `services` converged without any of the tasks in `replaced`;
/// returns the exit code.
pub async fn if_asked(
    api: &Client,
    wait: &WaitArgs,
    services: &[String],
    replaced: &[String],
) -> anyhow::Result<i32> {
    if wait.wait {
        wait_converged(api, services, replaced, wait.timeout, true).await?;
    }
    Ok(0)
}

/// Waits until each service runs exactly its desired count of ready tasks of its current
/// release (none of them in `replaced`), showing progress.
pub async fn wait_converged(
    api: &Client,
    services: &[String],
    replaced: &[String],
    timeout: Duration,
    show: bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let summaries: Vec<ServiceSummary> = api.services().await?;
        let tasks: Vec<TaskInfo> = api.tasks(None).await?;
        let mut done = true;
        let mut progress = Vec::new();
        let mut problems = Vec::new();
        for name in services {
            let Some(s) = summaries.iter().find(|s| &s.name == name) else {
                continue;
            };
            let mine: Vec<&TaskInfo> = tasks
                .iter()
                .filter(|t| &t.service == name && !t.oneoff)
                .collect();
            let ready = mine
                .iter()
                .filter(|t| {
                    !replaced.contains(&t.task)
                        && (t.release == s.current_release
                            || s.runs_like_current.contains(&t.release))
                        && t.desired == DesiredState::Run
                        && t.state() == Some(TaskState::Running)
                        && t.status.as_ref().is_some_and(|st| st.healthy)
                })
                .count();
            let want = if s.stopped { 0 } else { s.desired as usize };
            if ready != want || mine.len() != want {
                done = false;
            }
            progress.push(format!("{name} {ready}/{want}"));
            problems.extend(s.problems.iter().cloned());
        }
        let line = format!("waiting for tasks: {}", progress.join(", "));
        if show && line != last {
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
            last = line;
        }
        if done {
            if show {
                if tty {
                    eprintln!();
                }
                eprintln!("all services converged");
            }
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            if tty && show {
                eprintln!();
            }
            let mut msg = format!(
                "services did not converge within {:?} ({})",
                timeout,
                progress.join(", ")
            );
            for p in problems {
                msg.push_str(&format!("\n  {p}"));
            }
            msg.push_str(
                "\n  hint: `dozen events SERVICE` says what happened to each task, `dozen logs SERVICE` shows its output",
            );
            bail!(msg);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn wanted_after(pairs: &[String]) -> Vec<(String, u32)> {
    pairs
        .iter()
        .filter_map(|p| p.split_once('='))
        .filter_map(|(s, c)| Some((s.to_string(), c.parse().ok()?)))
        .collect()
}

/// Polls until each service runs exactly its count of tasks, all healthy.
pub async fn wait_for_counts(
    api: &Client,
    wanted: &[(String, u32)],
    timeout: Duration,
) -> anyhow::Result<i32> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    let mut reasons: Vec<String> = Vec::new();
    loop {
        // A server may be gone mid-wait (the client moves on to another); keep polling.
        if let Ok(services) = api.services().await {
            let mut pending = Vec::new();
            reasons.clear();
            for (service, replicas) in wanted {
                match services.iter().find(|s| &s.name == service) {
                    Some(s) if s.running == *replicas && s.healthy >= *replicas => {}
                    Some(s) => {
                        pending.push(format!(
                            "{service}: {} running, {} healthy of {replicas}",
                            s.running, s.healthy
                        ));
                        reasons.extend(s.problems.iter().cloned());
                    }
                    None => pending.push(format!("{service}: gone")),
                }
            }
            if pending.is_empty() {
                println!("all scaled services are running and healthy");
                return Ok(0);
            }
            last = pending.join("; ");
        }
        if std::time::Instant::now() >= deadline {
            eprintln!("gave up waiting after {timeout:?}: {last}");
            // Why, per task that did not come up, as `ps` and `events` say it.
            for reason in &reasons {
                eprintln!("  {reason}");
            }
            return Ok(1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
