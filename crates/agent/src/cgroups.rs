//! Resource limits through cgroups, v1 (what these machines mount) or v2, behind one interface.
//! Where neither is writable, tasks run without limits and the agent says so once.

use std::path::{Path, PathBuf};

use dozen_spec::Resources;

const CPU_PERIOD_US: u64 = 100_000;

pub trait Cgroups: Send + Sync {
    fn describe(&self) -> String;
    /// Creates the task's groups with its limits; returns the `cgroup.procs` files to join.
    fn prepare(&self, task: &str, resources: &Resources) -> std::io::Result<Vec<PathBuf>>;
    fn remove(&self, task: &str);
    /// Sends `signal` to every process in the task's groups, daemonised children included
    /// (they leave the task's process group, never its cgroup), except those in the process
    /// group `except` (signalled already: a second SIGTERM means "now" to many programs);
    /// returns how many.
    fn signal_all(&self, task: &str, signal: i32, except: Option<u32>) -> usize;
    /// How many processes the kernel has killed in the task's groups for want of memory.
    /// What the task's group uses now: memory (bytes) and CPU time so far (nanoseconds).
    fn usage(&self, _task: &str) -> Usage {
        Usage::default()
    }
    fn oom_kills(&self, _task: &str) -> u64 {
        0
    }
}

/// The `oom_kill N` line of a cgroup's `memory.oom_control` (v1) or `memory.events` (v2).
/// A task group's use of memory and CPU, where the machine's cgroups tell it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: Option<u64>,
    pub cpu_nanos: Option<u64>,
}

fn read_u64(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn oom_kill_count(file: &Path) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Signals every pid listed in the `cgroup.procs` file `procs`.
fn signal_listed(procs: &Path, signal: i32, except: Option<u32>) -> usize {
    let listed = std::fs::read_to_string(procs).unwrap_or_default();
    let mut sent = 0;
    // A pid listed in the task's own cgroup is one of its processes.
    for pid in listed.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        if except.is_some() && crate::os::process_group(pid) == except {
            continue;
        }
        if crate::os::kill_pid(pid, signal).is_ok() {
            sent += 1;
        }
    }
    sent
}

pub fn detect(root: &Path) -> Box<dyn Cgroups> {
    let v1_memory = root.join("memory");
    let v1_cpu = root.join("cpu");
    if v1_memory.join("memory.limit_in_bytes").exists() && v1_cpu.join("cpu.cfs_quota_us").exists()
    {
        let v1_pids = root.join("pids");
        // cpuacct is mounted with cpu on some machines, on its own on others.
        let v1_cpuacct = root.join("cpuacct");
        let v1 = V1 {
            memory: v1_memory.join("dozen"),
            cpuacct: (!v1_cpu.join("cpuacct.usage").exists()
                && v1_cpuacct.join("cpuacct.usage").exists())
            .then(|| v1_cpuacct.join("dozen"))
            .filter(|dir| std::fs::create_dir_all(dir).is_ok()),
            cpu: v1_cpu.join("dozen"),
            pids: (v1_pids.join("pids.max").exists() || v1_pids.join("tasks").exists())
                .then(|| v1_pids.join("dozen"))
                .filter(|dir| std::fs::create_dir_all(dir).is_ok()),
        };
        if std::fs::create_dir_all(&v1.memory).is_ok() && std::fs::create_dir_all(&v1.cpu).is_ok() {
            return Box::new(v1);
        }
    }
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if controllers.contains("memory") && controllers.contains("cpu") {
        let enable = if controllers.contains("pids") {
            "+memory +cpu +pids"
        } else {
            "+memory +cpu"
        };
        let v2 = V2 {
            base: root.join("dozen"),
            pids: controllers.contains("pids"),
        };
        if std::fs::create_dir_all(&v2.base).is_ok()
            && std::fs::write(root.join("cgroup.subtree_control"), enable).is_ok()
            && std::fs::write(v2.base.join("cgroup.subtree_control"), enable).is_ok()
        {
            return Box::new(v2);
        }
    }
    Box::new(NoCgroups)
}

struct V1 {
    memory: PathBuf,
    cpu: PathBuf,
    /// A cpuacct hierarchy of its own (where it is not mounted with cpu): CPU time is read
    /// there.
    cpuacct: Option<PathBuf>,
    /// The pids controller, where this machine mounts one.
    pids: Option<PathBuf>,
}

impl Cgroups for V1 {
    fn describe(&self) -> String {
        let pids = match &self.pids {
            Some(dir) => format!(", {}", dir.display()),
            None => "; no pids controller: process counts unlimited".into(),
        };
        format!(
            "cgroup v1 ({}, {}{pids})",
            self.memory.display(),
            self.cpu.display()
        )
    }
    fn prepare(&self, task: &str, r: &Resources) -> std::io::Result<Vec<PathBuf>> {
        let mem = self.memory.join(task);
        let cpu = self.cpu.join(task);
        std::fs::create_dir_all(&mem)?;
        std::fs::create_dir_all(&cpu)?;
        std::fs::write(
            mem.join("memory.limit_in_bytes"),
            r.memory_bytes.to_string(),
        )?;
        std::fs::write(cpu.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
        let quota = (u64::from(r.cpu_millis) * CPU_PERIOD_US / 1000).max(1000);
        std::fs::write(cpu.join("cpu.cfs_quota_us"), quota.to_string())?;
        let mut procs = vec![mem.join("cgroup.procs"), cpu.join("cgroup.procs")];
        if let Some(acct) = &self.cpuacct {
            let dir = acct.join(task);
            std::fs::create_dir_all(&dir)?;
            procs.push(dir.join("cgroup.procs"));
        }
        if let Some(pids) = &self.pids {
            let dir = pids.join(task);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("pids.max"), r.pids.to_string())?;
            procs.push(dir.join("cgroup.procs"));
        }
        Ok(procs)
    }
    fn remove(&self, task: &str) {
        let _ = std::fs::remove_dir(self.memory.join(task));
        let _ = std::fs::remove_dir(self.cpu.join(task));
        if let Some(acct) = &self.cpuacct {
            let _ = std::fs::remove_dir(acct.join(task));
        }
        if let Some(pids) = &self.pids {
            let _ = std::fs::remove_dir(pids.join(task));
        }
    }
    fn signal_all(&self, task: &str, signal: i32, except: Option<u32>) -> usize {
        // A task's processes are in both groups; the memory group's list is enough.
        signal_listed(&self.memory.join(task).join("cgroup.procs"), signal, except)
    }
    fn oom_kills(&self, task: &str) -> u64 {
        oom_kill_count(&self.memory.join(task).join("memory.oom_control"))
    }
    fn usage(&self, task: &str) -> Usage {
        Usage {
            memory_bytes: read_u64(&self.memory.join(task).join("memory.usage_in_bytes")),
            cpu_nanos: read_u64(
                &self
                    .cpuacct
                    .as_ref()
                    .unwrap_or(&self.cpu)
                    .join(task)
                    .join("cpuacct.usage"),
            ),
        }
    }
}

struct V2 {
    base: PathBuf,
    pids: bool,
}

impl Cgroups for V2 {
    fn describe(&self) -> String {
        format!("cgroup v2 ({})", self.base.display())
    }
    fn prepare(&self, task: &str, r: &Resources) -> std::io::Result<Vec<PathBuf>> {
        let dir = self.base.join(task);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("memory.max"), r.memory_bytes.to_string())?;
        let quota = (u64::from(r.cpu_millis) * CPU_PERIOD_US / 1000).max(1000);
        std::fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
        if self.pids {
            std::fs::write(dir.join("pids.max"), r.pids.to_string())?;
        }
        Ok(vec![dir.join("cgroup.procs")])
    }
    fn remove(&self, task: &str) {
        let _ = std::fs::remove_dir(self.base.join(task));
    }
    fn signal_all(&self, task: &str, signal: i32, except: Option<u32>) -> usize {
        let dir = self.base.join(task);
        let listed = signal_listed(&dir.join("cgroup.procs"), signal, except);
        if signal == libc::SIGKILL && except.is_none() {
            // Also catches a process forked between the read and the kills.
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        listed
    }
    fn oom_kills(&self, task: &str) -> u64 {
        oom_kill_count(&self.base.join(task).join("memory.events"))
    }
    fn usage(&self, task: &str) -> Usage {
        let dir = self.base.join(task);
        let cpu = std::fs::read_to_string(dir.join("cpu.stat"))
            .ok()
            .and_then(|stat| {
                stat.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|usec| usec * 1000)
            });
        Usage {
            memory_bytes: read_u64(&dir.join("memory.current")),
            cpu_nanos: cpu,
        }
    }
}

pub struct NoCgroups;

impl Cgroups for NoCgroups {
    fn describe(&self) -> String {
        "none (no writable cgroup memory and cpu controllers): tasks run without limits".into()
    }
    fn prepare(&self, _: &str, _: &Resources) -> std::io::Result<Vec<PathBuf>> {
        Ok(Vec::new())
    }
    fn remove(&self, _: &str) {}
    fn signal_all(&self, _: &str, _: i32, _: Option<u32>) -> usize {
        0
    }
}
