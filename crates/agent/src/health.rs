//! Health checks the agent runs against its tasks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use dozen_spec::{HealthCheck, HealthKind};

/// How a `command` check runs: as its task would, with the task's environment, working
/// directory and user (never with the agent's rights).
#[derive(Debug, Clone, Default)]
pub struct CommandContext {
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    /// uid and gid, when the task runs as a user other than the agent's.
    pub user: Option<(u32, u32)>,
}

/// Runs health checks. Behind a trait so the runner's state machine can be driven by scripted
/// answers in tests (with paused time), and so a driver can run `command` checks its own way.
#[async_trait::async_trait]
pub trait Prober: Send + Sync + 'static {
    /// One probe. `Err` carries what failed, for the task's status message.
    async fn probe(
        &self,
        check: &HealthCheck,
        port: Option<u16>,
        context: &CommandContext,
    ) -> Result<(), String>;
}

/// Probes for real: HTTP and TCP on loopback, commands on the host.
pub struct HostProber {
    pub http: reqwest::Client,
}

#[async_trait::async_trait]
impl Prober for HostProber {
    async fn probe(
        &self,
        check: &HealthCheck,
        port: Option<u16>,
        context: &CommandContext,
    ) -> Result<(), String> {
        probe(&self.http, check, port, context).await
    }
}

/// One probe. `Err` carries what failed, for the task's status message.
pub async fn probe(
    http: &reqwest::Client,
    check: &HealthCheck,
    port: Option<u16>,
    context: &CommandContext,
) -> Result<(), String> {
    let timeout = Duration::from_millis(check.timeout_ms.max(1));
    match &check.kind {
        HealthKind::Http { path } => {
            let port = port.ok_or("http health check needs a port (port = true)")?;
            let url = format!("http://127.0.0.1:{port}{path}");
            let resp = http
                .get(&url)
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {}", short(&e)))?;
            let status = resp.status();
            if status.is_success() || status.is_redirection() {
                Ok(())
            } else {
                Err(format!("GET {url} answered {status}"))
            }
        }
        HealthKind::Tcp => {
            let port = port.ok_or("tcp health check needs a port (port = true)")?;
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(("127.0.0.1", port)))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("connect 127.0.0.1:{port}: {e}")),
                Err(_) => Err(format!("connect 127.0.0.1:{port}: timed out")),
            }
        }
        HealthKind::Command { argv } => {
            let (program, args) = argv.split_first().ok_or("empty health command")?;
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .env_clear()
                .envs(&context.env)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            match context.user {
                Some((uid, gid)) => crate::os::switch_user_before_exec(
                    cmd.as_std_mut(),
                    uid,
                    gid,
                    context.cwd.as_deref(),
                )
                .map_err(|e| format!("health command `{program}`: {e}"))?,
                None => {
                    if let Some(cwd) = &context.cwd {
                        cmd.current_dir(cwd);
                    }
                }
            }
            match tokio::time::timeout(timeout, cmd.status()).await {
                Ok(Ok(st)) if st.success() => Ok(()),
                Ok(Ok(st)) => Err(format!("health command exited with {st}")),
                Ok(Err(e)) => Err(format!("health command `{program}`: {e}")),
                Err(_) => Err("health command timed out".into()),
            }
        }
    }
}

fn short(e: &reqwest::Error) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
