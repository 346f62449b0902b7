//! The `docker` driver: image tasks as containers of the node's Docker Engine, through its API
//! (no CLI). A container carries labels naming its task and node, gets the task's environment,
//! `PORT` published on the same host port, the service's memory, CPU and process limits, stop
//! signal and timeout; its output goes into the task's log like a process's. A restarted agent
//! finds its containers again by id (`recover`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    Driver, DriverError, DriverInfo, ExitInfo, MountSource, Recovered, TaskConfig, TaskHandle,
    TaskStats, Workload,
};

mod engine;
mod exec;
mod output;

pub use engine::{Engine, EngineError};

pub const NAME: &str = "docker";
/// Labels on every container dozen creates.
pub const TASK_LABEL: &str = "dozen.task";
pub const NODE_LABEL: &str = "dozen.node";
/// The agent's data directory, by the id kept there: strays are what this agent made, never
/// another agent's on the same host.
pub const HOME_LABEL: &str = "dozen.home";

/// The driver's part of a [`TaskHandle`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Contained {
    id: String,
    /// The task's log file and its cap, for following the output again after a restart.
    log: PathBuf,
    log_cap: u64,
}

impl Contained {
    fn of(handle: &TaskHandle) -> Option<Contained> {
        serde_json::from_value(handle.state.clone()).ok()
    }
}

pub struct DockerDriver {
    engine: Engine,
    home: String,
    /// The node's loopback registry mirror, `127.0.0.1:PORT`.
    mirror: Option<String>,
    /// Whether the engine answered the last time it was asked, and what it said.
    seen: Arc<Mutex<(bool, String)>>,
}

impl DockerDriver {
    /// The engine of `DOCKER_HOST` (a `unix://` path), else `/var/run/docker.sock`, for the
    /// agent whose data directory has the id `home`, pulling the built-in registry's images
    /// through `mirror`.
    pub fn from_env(home: String, mirror: Option<String>) -> DockerDriver {
        DockerDriver {
            engine: Engine::from_env(),
            home,
            mirror,
            seen: Arc::new(Mutex::new((false, "not asked yet".into()))),
        }
    }

    fn exit_of(&self, inspected: &Value) -> ExitInfo {
        let state = &inspected["State"];
        let millis = |field: &str| -> Option<u64> {
            let text = state[field].as_str()?;
            rfc3339_ms(text)
        };
        ExitInfo {
            code: state["ExitCode"].as_i64().map(|c| c as i32),
            signal: None,
            started_at_ms: millis("StartedAt"),
            finished_at_ms: millis("FinishedAt").unwrap_or_else(crate::shim::wall_ms),
            error: state["Error"]
                .as_str()
                .filter(|e| !e.is_empty())
                .map(String::from),
            oom_killed: state["OOMKilled"].as_bool().unwrap_or(false),
        }
    }

    /// What the engine is asked to run: a pinned image of the built-in registry by its
    /// digest through the node's mirror, any other as the stack file names it.
    fn reference(
        &self,
        image: &str,
        pin: Option<&dozen_model::registry::ImagePin>,
    ) -> Result<String, DriverError> {
        match (pin, &self.mirror) {
            (None, _) => Ok(image.to_string()),
            (Some(pin), Some(mirror)) => Ok(format!("{mirror}/{pin}")),
            (Some(pin), None) => Err(DriverError::Start(format!(
                "image {pin} is in dozen's registry, but this agent has no registry mirror to pull it through"
            ))),
        }
    }

    /// A named volume the engine makes on first use is root's: a task running as another
    /// user could not write to it. Made here first and, while still empty and root's, given
    /// to the task's user (the engine's volumes are on this host, and the agent is root when
    /// tasks run as another user). Best effort: the task starts either way.
    async fn give_fresh_volume(&self, volume: &str, uid: u32, gid: u32) {
        let body = json!({ "Name": volume, "Labels": { HOME_LABEL: self.home } });
        let made = self
            .engine
            .call(Method::POST, "/volumes/create", Some(&body))
            .await;
        let mountpoint = made
            .ok()
            .and_then(|v| v["Mountpoint"].as_str().map(PathBuf::from));
        let Some(dir) = mountpoint else {
            return;
        };
        use std::os::unix::fs::MetadataExt;
        let fresh = std::fs::metadata(&dir).is_ok_and(|m| m.uid() == 0)
            && std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_none());
        if fresh {
            if let Err(e) = std::os::unix::fs::chown(&dir, Some(uid), Some(gid)) {
                tracing::warn!(volume, error = %e, "cannot give a new volume to the task's user");
            }
        }
    }

    /// Pulls `reference` unless the engine has it.
    async fn ensure_image(&self, reference: &str) -> Result<(), DriverError> {
        let present = self
            .engine
            .has_image(reference)
            .await
            .map_err(|e| DriverError::Start(e.to_string()))?;
        if present {
            return Ok(());
        }
        tracing::info!(image = reference, "pulling image");
        self.engine
            .pull(reference)
            .await
            .map_err(|e| DriverError::Start(format!("cannot pull image `{reference}`: {e}")))
    }

    /// How container `id` ended, and the container removed (its output is in the task's log).
    async fn ended(&self, id: &str) -> ExitInfo {
        let inspected = self
            .engine
            .call(Method::GET, &format!("/containers/{id}/json"), None)
            .await;
        let exit = match &inspected {
            Ok(v) => self.exit_of(v),
            Err(e) => gone(e.to_string()),
        };
        let _ = self
            .engine
            .call(Method::DELETE, &format!("/containers/{id}?force=1"), None)
            .await;
        exit
    }

    /// Resolves when container `id` is not running, as the engine says it (a wait cut short
    /// by an engine that went away is no answer: the engine is asked again once it is back).
    async fn until_stopped(&self, id: &str) {
        let wait = format!("/containers/{id}/wait?condition=not-running");
        let inspect = format!("/containers/{id}/json");
        loop {
            if let Ok(body) = self.engine.stream(Method::POST, &wait).await {
                let _ = http_body_util::BodyExt::collect(body).await;
            }
            match self.engine.call(Method::GET, &inspect, None).await {
                Ok(v) if v["State"]["Running"].as_bool() == Some(true) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(_) | Err(EngineError::Refused { .. }) => return,
                Err(EngineError::Unreachable { .. }) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Runs `argv` inside container `id` (as its user), detached; Ok once it exits with 0.
    async fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<(), String> {
        let program = argv.first().cloned().unwrap_or_default();
        let body = json!({ "Cmd": argv, "AttachStdout": false, "AttachStderr": false });
        let created = self
            .engine
            .call(Method::POST, &format!("/containers/{id}/exec"), Some(&body))
            .await
            .map_err(|e| format!("health command `{program}`: {e}"))?;
        let exec = created["Id"].as_str().unwrap_or_default().to_string();
        let started = json!({ "Detach": true, "Tty": false });
        self.engine
            .call(Method::POST, &format!("/exec/{exec}/start"), Some(&started))
            .await
            .map_err(|e| format!("health command `{program}`: {e}"))?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let state = self
                .engine
                .call(Method::GET, &format!("/exec/{exec}/json"), None)
                .await
                .map_err(|e| format!("health command `{program}`: {e}"))?;
            if state["Running"].as_bool() != Some(true) {
                return match state["ExitCode"].as_i64() {
                    Some(0) => Ok(()),
                    Some(code) => Err(format!("health command exited with exit status: {code}")),
                    None => Err(format!("health command `{program}` did not run")),
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("health command timed out".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn follow_output(&self, contained: &Contained, from: output::Resume) {
        tokio::spawn(output::copy(
            self.engine.clone(),
            contained.id.clone(),
            contained.log.clone(),
            contained.log_cap,
            from,
        ));
    }
}

fn gone(why: String) -> ExitInfo {
    ExitInfo {
        code: None,
        signal: None,
        started_at_ms: None,
        finished_at_ms: crate::shim::wall_ms(),
        error: Some(why),
        oom_killed: false,
    }
}

/// Milliseconds since the epoch of an engine time such as `2026-12-04T18:46:41.123456789Z`;
/// None for the engine's zero time (`0001-01-01T00:00:00Z`: not started or not finished).
fn rfc3339_ms(text: &str) -> Option<u64> {
    let (date, time) = text.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    if y < 1970 {
        return None;
    }
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    let millis: i64 = format!("{:0<3}", &fraction[..fraction.len().min(3)])
        .parse()
        .ok()?;
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 86_400 + h * 3600 + min * 60 + s) * 1000) + millis).ok()
}

/// A query value with everything but unreserved characters percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn unix_seconds() -> u64 {
    crate::shim::wall_ms() / 1000
}

#[async_trait]
impl Driver for DockerDriver {
    fn name(&self) -> &'static str {
        NAME
    }

    fn fingerprint(&self) -> DriverInfo {
        let (available, detail) = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        DriverInfo {
            name: NAME.into(),
            available,
            detail,
        }
    }

    async fn refresh(&self) {
        let answer = tokio::time::timeout(Duration::from_secs(3), self.engine.version()).await;
        let seen = match answer {
            Ok(Ok(version)) => (true, version),
            Ok(Err(e)) => (false, e.to_string()),
            Err(_) => (false, "the Docker Engine did not answer within 3 s".into()),
        };
        if let Ok(mut s) = self.seen.lock() {
            *s = seen;
        }
    }

    async fn start(&self, config: &TaskConfig) -> Result<TaskHandle, DriverError> {
        let (image, args) = match &config.workload {
            Workload::Image { image, args, pin } => (self.reference(image, pin.as_ref())?, args),
            Workload::Command(_) => {
                return Err(DriverError::Unsupported {
                    driver: NAME,
                    why: "the task is a host command; the docker driver runs images".into(),
                })
            }
        };
        self.ensure_image(&image).await?;
        let mut env = config.env.clone();
        let mut mounts_wanted = config.mounts.clone();
        if let Some(secrets) = &config.secrets {
            // The same memory-backed directory, read-only, at the usual place.
            mounts_wanted.push(crate::driver::Mount {
                source: MountSource::HostPath(secrets.dir.clone()),
                target: crate::driver::CONTAINER_SECRETS_DIR.into(),
                read_only: true,
            });
            env.insert(
                "DOZEN_SECRETS_DIR".into(),
                crate::driver::CONTAINER_SECRETS_DIR.into(),
            );
            env.insert(
                "DOZEN_TOKEN_FILE".into(),
                format!(
                    "{}/{}",
                    crate::driver::CONTAINER_SECRETS_DIR,
                    crate::secrets::TOKEN_FILE
                ),
            );
            // Asked for as environment variables: the engine keeps a container's environment
            // in its own files, which is why files are the default.
            if let Some(file) = &secrets.env_file {
                let values: std::collections::BTreeMap<String, String> = std::fs::read(file)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .ok_or_else(|| DriverError::Start("cannot read the task's secrets".into()))?;
                env.extend(values);
            }
        }
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut host = json!({
            "Memory": config.resources.memory_bytes,
            "NanoCpus": u64::from(config.resources.cpu_millis) * 1_000_000,
            "PidsLimit": config.resources.pids,
        });
        let mut body = json!({
            "Image": &image,
            "Env": env,
            "Labels": { TASK_LABEL: config.task, NODE_LABEL: config.node, HOME_LABEL: self.home },
            "StopSignal": config.stop_signal,
            "StopTimeout": config.stop_timeout.as_secs().max(1),
        });
        if let Some(args) = args {
            body["Cmd"] = json!(args);
        }
        // The node's network, as a process has: the task listens on $PORT on the node (the
        // proxy reaches it at the node's address) and reaches the services it uses through
        // the node's loopback proxy (`<NAME>_URL`), with no NAT or port proxy in the way.
        host["NetworkMode"] = json!("host");
        if let Some(user) = &config.user {
            // Numbers: a minimal image has no account names.
            let (uid, gid, _) = crate::os::lookup_user(user).ok_or_else(|| {
                DriverError::Start(format!(
                    "user `{user}` does not exist on node `{}`",
                    config.node
                ))
            })?;
            body["User"] = json!(format!("{uid}:{gid}"));
            if uid != 0 {
                for m in &mounts_wanted {
                    if let MountSource::Volume(volume) = &m.source {
                        self.give_fresh_volume(volume, uid, gid).await;
                    }
                }
            }
        }
        let mounts: Vec<Value> = mounts_wanted
            .iter()
            .map(|m| {
                let (kind, source) = match &m.source {
                    MountSource::HostPath(path) => ("bind", path.display().to_string()),
                    MountSource::Volume(name) => ("volume", name.clone()),
                };
                json!({ "Type": kind, "Source": source, "Target": m.target, "ReadOnly": m.read_only })
            })
            .collect();
        if !mounts.is_empty() {
            host["Mounts"] = json!(mounts);
        }
        body["HostConfig"] = host;
        let name = format!("dozen-{}-{}", config.task, crate::random_id());
        let created = self
            .engine
            .call(
                Method::POST,
                &format!("/containers/create?name={name}"),
                Some(&body),
            )
            .await
            .map_err(|e| DriverError::Start(e.to_string()))?;
        let id = created["Id"].as_str().unwrap_or_default().to_string();
        let since = unix_seconds();
        if let Err(e) = self
            .engine
            .call(Method::POST, &format!("/containers/{id}/start"), None)
            .await
        {
            let _ = self
                .engine
                .call(Method::DELETE, &format!("/containers/{id}?force=1"), None)
                .await;
            return Err(DriverError::Start(e.to_string()));
        }
        let inspected = self
            .engine
            .call(Method::GET, &format!("/containers/{id}/json"), None)
            .await
            .unwrap_or(Value::Null);
        let contained = Contained {
            id,
            log: config.log.clone(),
            log_cap: config.resources.log_bytes,
        };
        self.follow_output(&contained, output::Resume::Start(since));
        Ok(TaskHandle {
            driver: NAME.into(),
            pid: inspected["State"]["Pid"]
                .as_u64()
                .filter(|p| *p > 0)
                .map(|p| p as u32),
            started_at_ms: Some(crate::shim::wall_ms()),
            state: serde_json::to_value(&contained).unwrap_or_default(),
        })
    }

    async fn wait(&self, handle: &TaskHandle) -> ExitInfo {
        let Some(contained) = Contained::of(handle) else {
            return gone(format!(
                "the docker driver was given a `{}` handle",
                handle.driver
            ));
        };
        self.until_stopped(&contained.id).await;
        self.ended(&contained.id).await
    }

    async fn stop(&self, handle: &TaskHandle, _signal: &str, timeout: Duration) -> ExitInfo {
        let Some(contained) = Contained::of(handle) else {
            return gone(format!(
                "the docker driver was given a `{}` handle",
                handle.driver
            ));
        };
        // The engine sends the container's stop signal (set at create), then SIGKILL after
        // the timeout.
        let path = format!(
            "/containers/{}/stop?t={}",
            contained.id,
            timeout.as_secs().max(1)
        );
        let _ = tokio::time::timeout(
            timeout + Duration::from_secs(10),
            self.engine.call(Method::POST, &path, None),
        )
        .await;
        self.until_stopped(&contained.id).await;
        self.ended(&contained.id).await
    }

    async fn forget_strays(&self, _node: &str, kept: &[TaskHandle]) -> usize {
        let keep: Vec<String> = kept
            .iter()
            .filter_map(Contained::of)
            .map(|c| c.id)
            .collect();
        let filters = json!({ "label": [format!("{HOME_LABEL}={}", self.home)] }).to_string();
        let path = format!(
            "/containers/json?all=1&filters={}",
            percent_encode(&filters)
        );
        let Ok(listed) = self.engine.call(Method::GET, &path, None).await else {
            return 0;
        };
        let mut removed = 0;
        for container in listed.as_array().into_iter().flatten() {
            let Some(id) = container["Id"].as_str() else {
                continue;
            };
            if keep.iter().any(|k| k == id) {
                continue;
            }
            tracing::info!(container = %id, "removing a container no task of this node keeps");
            let gone = self
                .engine
                .call(Method::DELETE, &format!("/containers/{id}?force=1"), None)
                .await;
            if gone.is_ok() {
                removed += 1;
            }
        }
        removed
    }

    async fn check(
        &self,
        handle: &TaskHandle,
        argv: &[String],
        timeout: Duration,
    ) -> Option<Result<(), String>> {
        let contained = Contained::of(handle)?;
        Some(self.exec(&contained.id, argv, timeout).await)
    }

    async fn exec(
        &self,
        handle: &TaskHandle,
        _context: &crate::health::CommandContext,
        argv: &[String],
        tty: bool,
    ) -> Result<tokio::sync::mpsc::Receiver<crate::exec::ExecChunk>, DriverError> {
        let contained = Contained::of(handle).ok_or_else(|| {
            DriverError::Start(format!(
                "the docker driver was given a `{}` handle",
                handle.driver
            ))
        })?;
        exec::run(&self.engine, &contained.id, argv, tty)
            .await
            .map_err(DriverError::Start)
    }

    async fn stats(&self, handle: &TaskHandle) -> TaskStats {
        let Some(contained) = Contained::of(handle) else {
            return TaskStats::default();
        };
        let path = format!(
            "/containers/{}/stats?stream=false&one-shot=true",
            contained.id
        );
        let Ok(stats) = self.engine.call(Method::GET, &path, None).await else {
            return TaskStats::default();
        };
        TaskStats {
            rss_kib: stats["memory_stats"]["stats"]["rss"]
                .as_u64()
                .map(|b| b / 1024),
            overhead_rss_kib: None,
            memory_bytes: stats["memory_stats"]["usage"].as_u64(),
            cpu_nanos: stats["cpu_stats"]["cpu_usage"]["total_usage"].as_u64(),
        }
    }

    async fn recover(&self, _dir: &Path, handle: Option<&TaskHandle>) -> Recovered {
        let Some(handle) = handle else {
            return Recovered::Nothing;
        };
        let Some(contained) = Contained::of(handle) else {
            return Recovered::Nothing;
        };
        let inspected = self
            .engine
            .call(
                Method::GET,
                &format!("/containers/{}/json", contained.id),
                None,
            )
            .await;
        match inspected {
            Ok(v) if v["State"]["Running"].as_bool() == Some(true) => {
                // Going on after the last line kept: what it wrote while no agent listened
                // is copied too.
                let from = match output::last_line_ms(&contained.log) {
                    Some(ms) => output::Resume::After(ms),
                    None => output::Resume::Start(0),
                };
                self.follow_output(&contained, from);
                Recovered::Running(handle.clone())
            }
            Ok(_) => Recovered::Exited(self.ended(&contained.id).await),
            // The engine does not know it: gone while no agent watched.
            Err(EngineError::Refused { .. }) => Recovered::Nothing,
            // The engine does not answer: the container may well run on; waiting for it
            // asks again until the engine is back.
            Err(EngineError::Unreachable { .. }) => Recovered::Running(handle.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn engine_times_read_as_milliseconds() {
        assert_eq!(super::rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(
            super::rfc3339_ms("2026-12-04T16:08:00.007123456Z"),
            Some(1_796_400_480_007)
        );
        assert_eq!(super::rfc3339_ms("0001-01-01T00:00:00Z"), None);
    }
}
