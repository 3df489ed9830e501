//! Undoing a `leave_stopped` dump: what CRIU leaves behind when it stops a tree instead of
//! killing it or letting it run.
//!
//! Verified against CRIU 4.2.1 (`cr_dump_finish`, `compel_resume_task_sig`): every task gets
//! SIGSTOP when CRIU detaches (cgroup freezer, if used, is thawed first); the network stays locked
//! (the `CRIU` iptables chain jumped to from INPUT and OUTPUT in the container's netns, unless
//! the lock method was `skip`); TCP sockets dumped with `tcp_established` stay in repair mode
//! (CRIU only leaves repair on the unlock path it skips here). Resuming therefore takes the lock
//! out, turns repair off on every TCP socket of the tree, then sends SIGCONT to every task.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::CheckpointError;

/// How long resumed tasks get to leave the stopped state before `resume` says they did not.
const RESUME_WAIT: Duration = Duration::from_secs(2);

/// What a resume did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeReport {
    /// Processes sent SIGCONT (every process in the container's pid namespace).
    pub tasks: Vec<i32>,
    /// TCP sockets taken out of repair mode.
    pub sockets_unrepaired: usize,
    /// Whether CRIU's iptables lock was found and removed.
    pub network_unlocked: bool,
}

pub(super) fn resume(pid: i32, unlock_network: bool) -> Result<ResumeReport, CheckpointError> {
    let fail = |reason: String| CheckpointError::Resume { pid, reason };
    let tasks = pidns_members(pid).map_err(|e| fail(format!("list tasks: {e}")))?;
    let mut report = ResumeReport {
        tasks: tasks.clone(),
        ..Default::default()
    };
    if unlock_network {
        report.network_unlocked =
            unlock_iptables(pid).map_err(|e| fail(format!("unlock network: {e}")))?;
    }
    report.sockets_unrepaired =
        unrepair_tcp(&tasks).map_err(|e| fail(format!("tcp repair: {e}")))?;
    for &task in &tasks {
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(task),
            nix::sys::signal::Signal::SIGCONT,
        ) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(fail(format!("SIGCONT {task}: {e}"))),
        }
    }
    // Verify: a task still stopped after SIGCONT would mean something else holds it.
    let deadline = Instant::now() + RESUME_WAIT;
    loop {
        let stopped: Vec<i32> = tasks.iter().copied().filter(|&t| is_stopped(t)).collect();
        if stopped.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "tasks {stopped:?} still stopped after SIGCONT"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::info!(
        pid,
        tasks = report.tasks.len(),
        sockets = report.sockets_unrepaired,
        unlocked = report.network_unlocked,
        "resumed tasks left stopped by a dump"
    );
    Ok(report)
}

/// Every process whose pid namespace is `pid`'s (the container's tree), `pid` first.
pub(super) fn pidns_members(pid: i32) -> std::io::Result<Vec<i32>> {
    let ns = std::fs::metadata(format!("/proc/{pid}/ns/pid"))?.ino();
    let mut out = vec![pid];
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(other) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if other == pid {
            continue;
        }
        // Processes come and go while we scan: a vanished one is simply not a member.
        if let Ok(meta) = std::fs::metadata(format!("/proc/{other}/ns/pid")) {
            if meta.ino() == ns {
                out.push(other);
            }
        }
    }
    Ok(out)
}

fn is_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "T"))
        })
        .unwrap_or(false)
}

/// Removes CRIU's `CRIU` chain and the jumps to it in `pid`'s netns (IPv4 and IPv6); false when
/// no lock was there.
fn unlock_iptables(pid: i32) -> std::io::Result<bool> {
    let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let mut found = false;
    for tool in ["iptables", "ip6tables"] {
        let run = |args: &[&str]| run_in_netns(&netns, tool, args);
        match run(&["-w", "-n", "-L", "CRIU"]) {
            Ok(true) => {}
            // No such chain, or no such tool (an IPv4-only host): nothing locked here.
            Ok(false) | Err(_) => continue,
        }
        found = true;
        for hook in ["INPUT", "OUTPUT"] {
            // iptables-nft may hold the jump twice (CRIU deletes it twice for that reason).
            for _ in 0..4 {
                if !run(&["-w", "-C", hook, "-j", "CRIU"])? {
                    break;
                }
                run(&["-w", "-D", hook, "-j", "CRIU"])?;
            }
        }
        if !(run(&["-w", "-F", "CRIU"])? && run(&["-w", "-X", "CRIU"])?) {
            return Err(std::io::Error::other(format!(
                "{tool} could not delete the CRIU chain"
            )));
        }
    }
    Ok(found)
}

/// Runs `tool args` inside the network namespace `netns`; true when it exited 0.
fn run_in_netns(netns: &PathBuf, tool: &str, args: &[&str]) -> std::io::Result<bool> {
    let ns = File::open(netns)?;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setns is a single async-signal-safe syscall in the forked child, on an fd the
    // parent keeps open until the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd.status()?.success())
}

/// Turns TCP repair mode off on every TCP socket the tasks hold (each socket once).
fn unrepair_tcp(tasks: &[i32]) -> std::io::Result<usize> {
    let mut seen = HashSet::new();
    let mut count = 0;
    for &task in tasks {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{task}/fd")) else {
            continue;
        };
        let mut pidfd = None;
        for entry in fds.flatten() {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            if !target.starts_with("socket:[") || !seen.insert(target) {
                continue;
            }
            let Some(num) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if pidfd.is_none() {
                pidfd = Some(pidfd_open(task)?);
            }
            let Some(pfd) = &pidfd else { continue };
            let sock = match pidfd_getfd(pfd, num) {
                Ok(sock) => sock,
                // The task closed it meanwhile (it cannot: it is stopped; but never fail on it).
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => continue,
                Err(e) => return Err(e),
            };
            let in_repair =
                getsockopt_int(&sock, libc::SOL_TCP, libc::TCP_REPAIR).unwrap_or(0) == 1;
            if is_tcp(&sock) && in_repair {
                setsockopt_int(&sock, libc::SOL_TCP, libc::TCP_REPAIR, 0)?;
                count += 1;
            }
        }
    }
    Ok(count)
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall on a pidfd we own; returns a new close-on-exec fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn is_tcp(sock: &OwnedFd) -> bool {
    let domain = getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(-1);
    let proto = getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PROTOCOL).unwrap_or(-1);
    (domain == libc::AF_INET || domain == libc::AF_INET6) && proto == libc::IPPROTO_TCP
}

fn getsockopt_int(sock: &OwnedFd, level: i32, name: i32) -> std::io::Result<i32> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: val and len are valid for writes of an int and its length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(val)
}

fn setsockopt_int(sock: &OwnedFd, level: i32, name: i32, val: i32) -> std::io::Result<()> {
    // SAFETY: val is a valid int for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
