//! Tracks the container init processes this agent is the parent of and collects their exit status.
//!
//! libcontainer clones each init as a direct child of the caller. Only those pids are ever
//! waited for (`waitpid(pid, WNOHANG)`), never `-1`: tokio's process driver reaps the agent's
//! other children. After a reap the pid may be reused, so the id's status is taken from here
//! rather than from `/proc`.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// What `try_reap` found for one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Child {
    /// Not a child of this process (created by an earlier agent, or never tracked).
    NotOurs,
    /// Still running (or a zombie that is not ours to see yet).
    Alive,
    /// Exited with this status (now, or at an earlier reap).
    Exited(i32),
}

/// Init pids tracked by every `Reaper` of this process, so one runtime's sweep never takes the
/// exit status of another runtime's container.
static TRACKED: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

fn tracked_pids() -> MutexGuard<'static, Option<HashSet<i32>>> {
    TRACKED.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
pub(crate) struct Reaper {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<String, i32>,
    exited: HashMap<String, i32>,
    /// Exits collected outside `reap` (by `state` or `remove`), still owed to the next `reap`.
    unreported: Vec<(String, i32)>,
}

impl Inner {
    fn insert_live(&mut self, id: &str, pid: i32) {
        if let Some(old) = self.live.insert(id.to_owned(), pid) {
            untrack(old);
        }
        tracked_pids().get_or_insert_with(HashSet::new).insert(pid);
    }

    fn remove_live(&mut self, id: &str) {
        if let Some(pid) = self.live.remove(id) {
            untrack(pid);
        }
    }
}

fn untrack(pid: i32) {
    if let Some(set) = tracked_pids().as_mut() {
        set.remove(&pid);
    }
}

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The maps stay consistent even if a holder panicked: every update is a single insert/remove.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking `pid` as the init process of `id`.
    pub(crate) fn track(&self, id: &str, pid: i32) {
        let mut inner = self.lock();
        inner.exited.remove(id);
        inner.insert_live(id, pid);
    }

    /// Stops tracking `id`, reaping it first if it already exited (it must be dead by now).
    pub(crate) fn forget(&self, id: &str) {
        let _ = self.try_reap(id);
        let mut inner = self.lock();
        inner.remove_live(id);
        inner.exited.remove(id);
        // Removed on purpose: the caller knows, no exit report follows.
        inner.unreported.retain(|(i, _)| i != id);
    }

    /// The recorded exit status of `id`, if it was reaped.
    pub(crate) fn exit_code(&self, id: &str) -> Option<i32> {
        self.lock().exited.get(id).copied()
    }

    /// Reaps `id` if it exited, without blocking.
    pub(crate) fn try_reap(&self, id: &str) -> Child {
        let mut inner = self.lock();
        if let Some(code) = inner.exited.get(id) {
            return Child::Exited(*code);
        }
        let Some(&pid) = inner.live.get(id) else {
            return Child::NotOurs;
        };
        match wait_nohang(pid) {
            Waited::Alive => Child::Alive,
            Waited::Exited(code) => {
                inner.remove_live(id);
                inner.exited.insert(id.to_owned(), code);
                inner.unreported.push((id.to_owned(), code));
                Child::Exited(code)
            }
            Waited::Gone => {
                inner.remove_live(id);
                Child::NotOurs
            }
        }
    }

    /// Reaps every tracked init that exited since the last call (including exits another call
    /// happened to collect first), each reported once.
    pub(crate) fn reap(&self) -> Vec<(String, i32)> {
        let mut inner = self.lock();
        let mut done = std::mem::take(&mut inner.unreported);
        let mut gone = Vec::new();
        for (id, &pid) in &inner.live {
            match wait_nohang(pid) {
                Waited::Alive => {}
                Waited::Exited(code) => done.push((id.clone(), code)),
                Waited::Gone => gone.push(id.clone()),
            }
        }
        for id in gone {
            inner.remove_live(&id);
        }
        for (id, code) in &done {
            if inner.live.contains_key(id) {
                inner.remove_live(id);
                inner.exited.insert(id.clone(), *code);
            }
        }
        drop(inner);
        sweep_strays();
        done
    }

    /// Reaps the zombies a failed create leaves: youki returns the error without waiting for its
    /// intermediate and init processes, which are our children but whose pids it never told us.
    pub(crate) fn sweep(&self) {
        sweep_strays();
    }
}

/// Our children that libcontainer named (`youki:[1:INTER]`, `youki:[2:INIT]`) and that no
/// container tracks: `(pid, comm, state)`.
fn untracked_youki_children() -> Vec<(i32, String, char)> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if tracked_pids().as_ref().is_some_and(|t| t.contains(&pid)) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((comm, state, ppid)) = parse_stat(&stat) {
            if ppid == me && comm.starts_with("youki:") {
                found.push((pid, comm.to_owned(), state));
            }
        }
    }
    found
}

/// Waits for the zombies among [`untracked_youki_children`]. Only exact pids are waited for, and
/// only zombies, so the exit status of anything else (tokio's children, live containers) is never
/// taken.
fn sweep_strays() {
    for (pid, comm, state) in untracked_youki_children() {
        if state == 'Z' {
            tracing::debug!(pid, comm, "reaping stray youki process");
            let _ = wait_nohang(pid);
        }
    }
}

/// Kills the live ones among [`untracked_youki_children`]: the helper processes of a create that
/// never answered. libcontainer clones them from its caller; cloned while another thread held a
/// lock (allocator, log writer) they can wait on it forever. Killing them makes the create fail
/// and be retried instead of hanging. Returns how many were killed.
pub(crate) fn kill_stuck_helpers() -> usize {
    let mut killed = 0;
    for (pid, comm, state) in untracked_youki_children() {
        if state == 'Z' {
            continue;
        }
        tracing::warn!(
            pid,
            comm,
            "killing a libcontainer helper that stopped answering"
        );
        let target = nix::unistd::Pid::from_raw(pid);
        if nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}

/// `(comm, state, ppid)` from a `/proc/<pid>/stat` line; comm may contain spaces and parens.
fn parse_stat(stat: &str) -> Option<(&str, char, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

enum Waited {
    Alive,
    Exited(i32),
    /// ECHILD: someone else reaped it or it is not our child.
    Gone,
}

fn wait_nohang(pid: i32) -> Waited {
    loop {
        // __WALL: also wait for children whose exit signal is not SIGCHLD (CLONE_PARENT clones
        // inherit the intermediate process's exit signal, which today is SIGCHLD, but do not rely
        // on it).
        match waitpid(
            Pid::from_raw(pid),
            Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
        ) {
            Ok(WaitStatus::StillAlive) => return Waited::Alive,
            Ok(WaitStatus::Exited(_, code)) => return Waited::Exited(code),
            // Shell convention, so a SIGKILLed init reports 137.
            Ok(WaitStatus::Signaled(_, sig, _)) => return Waited::Exited(128 + sig as i32),
            Ok(_) => return Waited::Alive,
            Err(Errno::EINTR) => continue,
            Err(_) => return Waited::Gone,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
mod tests {
    use super::*;

    #[test]
    fn stuck_helpers_are_killed_and_others_are_not() {
        // A child whose comm looks like libcontainer's helper (the name of the executed file), and
        // one that does not.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("youki:[1:INTER]");
        std::os::unix::fs::symlink("/bin/sleep", &fake).unwrap();
        let mut helper = std::process::Command::new(&fake).arg("30").spawn().unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{}/stat", helper.id()))
            .map_or(true, |s| !s.contains("youki:"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "helper never showed its name"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(kill_stuck_helpers() >= 1);
        let status = helper.wait().unwrap();
        assert!(!status.success(), "the helper was killed");
        assert!(
            other.try_wait().unwrap().is_none(),
            "other children are left alone"
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn parses_stat_lines() {
        assert_eq!(
            parse_stat("29697 (youki:[2:INIT]) Z 1 29697 29697 0 -1 4228"),
            Some(("youki:[2:INIT]", 'Z', 1))
        );
        assert_eq!(
            parse_stat("12 (a) b (c)) S 7 12"),
            Some(("a) b (c)", 'S', 7))
        );
        assert_eq!(parse_stat("garbage"), None);
    }
}
