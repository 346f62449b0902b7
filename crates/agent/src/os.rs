//! The few operating-system calls the agent and shim make, in one place.
//!
//! Everything `unsafe` in dozen lives here: each call is a thin wrapper over one libc call whose
//! arguments are plain integers, so the wrappers themselves are safe to call.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

/// Sends `signal` to the process group `pgid` (the task and everything it started).
pub fn kill_group(pgid: u32, signal: i32) -> io::Result<()> {
    let pgid = i32::try_from(pgid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if pgid <= 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill(2) with a negative pid targets a process group; no memory is involved.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `signal` to one process.
pub fn kill_pid(pid: u32, signal: i32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if pid <= 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: plain kill(2).
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

static TASK_UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Makes every file this process creates from now on private to its user (umask 077: files
/// 0600, directories 0700): tokens, keys, the store, task records and logs. Tasks still get
/// the umask the process was started with (see [`task_umask`]). Returns that umask.
pub fn keep_files_private() -> u32 {
    // SAFETY: umask(2) cannot fail; it sets the mask and returns the previous one.
    let original = unsafe { libc::umask(0o077) } as u32;
    let _ = TASK_UMASK.set(original);
    original
}

/// The umask tasks are started with: the one dozen was started with, when it made its own
/// files private.
pub fn task_umask() -> Option<u32> {
    TASK_UMASK.get().copied()
}

/// Creates `dir` (and its parents) and makes it its user's alone (0700), also when it existed
/// with wider permissions from an earlier version.
pub fn private_dir(dir: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Gives the child `cmd` will start the umask `mask` before it execs.
pub fn umask_before_exec(cmd: &mut std::process::Command, mask: u32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask(2) is async-signal-safe and touches nothing but the child's own mask.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(mask as libc::mode_t);
            Ok(())
        });
    }
}

/// Makes the child `cmd` will start enter `cwd` and become `uid`:`gid` (with no supplementary
/// groups) just before it execs: after it has joined its cgroups and while it may still enter
/// directories only its supervisor can reach, such as its unpacked artifact under the data
/// directory. Register it after every other step that needs the supervisor's rights.
pub fn switch_user_before_exec(
    cmd: &mut std::process::Command,
    uid: u32,
    gid: u32,
    cwd: Option<&std::path::Path>,
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let cwd = match cwd {
        Some(dir) => Some(
            std::ffi::CString::new(dir.as_os_str().as_bytes())
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        ),
        None => None,
    };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on values prepared before the fork (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(dir) = &cwd {
                if libc::chdir(dir.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid as libc::gid_t) != 0
                || libc::setuid(uid as libc::uid_t) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes the calling process the leader of a new session (used between fork and exec).
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid(2) takes no arguments and is async-signal-safe.
    if unsafe { libc::setsid() } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes the child `cmd` will start join the cgroups whose `cgroup.procs` files are given, before
/// it execs: the task is limited from its first instruction, and its supervisor is not.
pub fn join_cgroups_before_exec(cmd: &mut std::process::Command, procs: Vec<std::path::PathBuf>) {
    use std::os::unix::process::CommandExt;
    if procs.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec. The shim forks while it has a
    // single thread (its pipe readers start after the spawn), so allocating here cannot
    // deadlock on a lock held by another thread; it only opens and writes files.
    unsafe {
        cmd.pre_exec(move || {
            for p in &procs {
                // "0" moves the writing process (this child) into the group.
                std::fs::write(p, "0")?;
            }
            Ok(())
        });
    }
}

/// A file descriptor that becomes readable when process `pid` exits (Linux pidfd).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with flags 0 returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until the pidfd becomes readable, i.e. its process has exited.
pub async fn pidfd_wait(fd: OwnedFd) -> io::Result<()> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open for as long as it is
    // registered with the reactor and is closed only after deregistration (on drop).
    let async_fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)?;
    let _guard = async_fd.readable().await?;
    Ok(())
}

/// Drops this process's resident copies of clean file pages (code and read-only data of the
/// binary and its shared libraries).
///
/// The shim runs from the full dozen binary; start-up touches code it never runs again, and the
/// kernel maps neighbouring pages around every fault. Only mappings that hold no anonymous
/// (copied-on-write) page are trimmed: every page there is an unchanged page of the file, so
/// dropping it loses nothing and the next access faults it in again from the page cache.
/// MADV_RANDOM then keeps later faults from mapping their neighbours too.
pub fn trim_clean_file_pages() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let mut current: Option<(usize, usize, bool)> = None;
    let mut candidates = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            if let Some(c) = current.take() {
                candidates.push(c);
            }
            let mut fields = line.split_whitespace();
            let perms = fields.nth(1).unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            let file_backed = path.starts_with('/') && !perms.contains('w') && perms.ends_with('p');
            if let (Ok(s), Ok(e)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) {
                current = Some((s, e, file_backed));
            }
        } else if let Some(kib) = line.strip_prefix("Anonymous:") {
            if kib.trim() != "0 kB" {
                if let Some(c) = current.as_mut() {
                    c.2 = false;
                }
            }
        }
    }
    if let Some(c) = current {
        candidates.push(c);
    }
    for (start, end, clean) in candidates {
        if !clean {
            continue;
        }
        // SAFETY: [start, end) is a whole private, non-writable file mapping of this process
        // with no anonymous page (per /proc/self/smaps): MADV_DONTNEED only drops page-table
        // entries of unchanged file pages, which fault in again from the page cache.
        unsafe {
            let addr = start as *mut libc::c_void;
            libc::madvise(addr, end - start, libc::MADV_DONTNEED);
            libc::madvise(addr, end - start, libc::MADV_RANDOM);
        }
    }
}

/// The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the
/// pid it names one process for good, even after the pid is reused.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past its last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    // `after` starts at field 3; field 22 is the 20th from here.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the file or directory `path` was last changed at least `age` ago.
pub fn older_than(path: &Path, age: std::time::Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|elapsed| elapsed >= age)
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(2)?.parse().ok()
}

/// Whether `pid` still names the process that started at `start_time` and has not exited.
pub fn process_is(pid: u32, start_time: u64) -> bool {
    if process_start_time(pid) != Some(start_time) {
        return false;
    }
    // A zombie has exited already.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = &s[s.rfind(')')? + 2..];
            after
                .split_whitespace()
                .next()
                .map(|st| st != "Z" && st != "X")
        })
        .unwrap_or(false)
}

/// Resident set size of a process in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// uid, gid and home of a user, from /etc/passwd (no NSS: works in minimal containers).
pub fn lookup_user(name: &str) -> Option<(u32, u32, String)> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entry = |matches: &dyn Fn(&[&str]) -> bool| {
        passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 7 && matches(&f))
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?, f[5].to_string())))?
        })
    };
    // `uid` or `uid:gid`: an account need not exist for numbers.
    if let Some((uid, gid)) = name.split_once(':') {
        let (uid, gid): (u32, u32) = (uid.parse().ok()?, gid.parse().ok()?);
        let home = entry(&|f| f[2] == uid.to_string()).map_or_else(|| "/".into(), |e| e.2);
        return Some((uid, gid, home));
    }
    if let Ok(uid) = name.parse::<u32>() {
        return Some(entry(&|f| f[2] == name).unwrap_or((uid, uid, "/".into())));
    }
    entry(&|f| f[0] == name)
}

/// Signal number from a normalised name such as "SIGTERM".
pub fn signal_number(name: &str) -> Option<i32> {
    Some(match name.trim_start_matches("SIG") {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        _ => return None,
    })
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

pub fn total_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(1 << 30)
}

/// Writes `bytes` to `path` atomically: a reader sees the old file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Waits until `pid` (a child) has exited, leaving it a zombie: its pid, and the process group
/// id it leads, stay reserved until it is reaped, so signals sent to that group meanwhile
/// cannot reach a stranger that got the number.
pub fn wait_exit_keep_zombie(pid: u32) -> io::Result<()> {
    loop {
        // SAFETY: waitid writes into the zeroed siginfo we own; no other memory is involved.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether `pid` (a child) has exited, leaving it a zombie; never blocks.
pub fn exited_keep_zombie(pid: u32) -> io::Result<bool> {
    // SAFETY: waitid writes into the zeroed siginfo we own; no other memory is involved.
    let (rc, found) = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
        );
        (rc, info.si_pid() != 0)
    };
    if rc == 0 {
        Ok(found)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes reads from `fd` return `WouldBlock` instead of waiting.
pub fn set_nonblocking(fd: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor the caller holds open; only its flags change.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            -1
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Waits until one of `fds` is readable or closed, or `timeout` passes; returns, per fd,
/// whether it is. A signal cutting the wait short counts as nothing ready.
pub fn wait_readable(fds: &[i32], timeout: std::time::Duration) -> Vec<bool> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // Rounded up: a wait due in under a millisecond must not spin with a zero timeout.
    let millis = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    // SAFETY: poll reads and writes only the array we own, of the length we pass.
    let rc = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, millis) };
    polled.iter().map(|p| rc > 0 && p.revents != 0).collect()
}

/// Whether any process other than `except` (a zombie leader) is alive in process group `pgid`.
pub fn group_has_others(pgid: u32, except: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == except {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        // Fields 3 (state) and 5 (process group) of /proc/PID/stat.
        let mut fields = after.split_whitespace();
        let state = fields.next();
        let group = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
        if group == Some(pgid) && !matches!(state, Some("Z") | Some("X")) {
            return true;
        }
    }
    false
}

/// One malloc arena for the whole process: glibc gives each new thread an arena of its own,
/// and each touches pages of its own; the shim's three small threads do not need them.
pub fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before the threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Raises this process's open-files limit to its hard limit (a proxy holds a descriptor per
/// client and per target connection; 1,024 is a common default). Returns the limit now.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read the struct given; nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable_and_identifies_us() {
        let me = std::process::id();
        let t = process_start_time(me).expect("readable /proc");
        assert_eq!(process_start_time(me), Some(t));
        assert!(process_is(me, t));
        assert!(!process_is(me, t + 1));
    }

    #[test]
    fn signals_by_name() {
        assert_eq!(signal_number("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(signal_number("SIGBOGUS"), None);
    }

    #[test]
    fn refuses_to_signal_init_or_everyone() {
        assert!(kill_group(1, 0).is_err());
        assert!(kill_group(0, 0).is_err());
        assert!(kill_pid(1, 0).is_err());
    }
}
