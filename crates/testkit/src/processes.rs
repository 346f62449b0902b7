//! Ending what a test started: tasks outlive dozen by design, so a test's clean-up finds
//! them by their pid files and by their command lines, and ends their sessions.

use std::path::Path;

use crate::{agent_homes, images, shim_processes_under, signal, signal_group};

/// Tasks outlive dozen by design: ends every task (and shim) of the agent data dirs under
/// `root`, and the containers their agents made, so a test leaves nothing behind.
pub fn end_tasks_under(root: &Path) {
    for (shim, task) in shim_processes_under(root) {
        if let Some(t) = task {
            signal_group(t, "KILL");
        }
        signal(shim, "KILL");
    }
    // A shim started as its agent was killed may not have written its pid file yet: found by
    // its command line instead, it goes with everything in its session (its task).
    for shim in shims_by_command_line(root) {
        for pid in session_members(shim) {
            signal(pid, "KILL");
        }
    }
    for home in agent_homes(root) {
        images::remove_containers_of(&home);
    }
}

/// Pids of `dozen shim DIR` processes whose DIR is under `root`.
fn shims_by_command_line(root: &Path) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let dir = std::str::from_utf8(args.get(2)?).ok()?;
            (args.get(1) == Some(&&b"shim"[..]) && Path::new(dir).starts_with(root)).then_some(pid)
        })
        .collect()
}

/// Pids of the processes in the session `leader` leads (a shim and its task).
fn session_members(leader: u32) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // Fields after the command (which may hold spaces) in parentheses.
            let after = stat.rsplit_once(") ")?.1;
            let session: u32 = after.split_whitespace().nth(3)?.parse().ok()?;
            (session == leader).then_some(pid)
        })
        .collect()
}
