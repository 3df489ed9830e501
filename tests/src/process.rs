//! Long-running processes of a cluster (etcd, registry, hub, agents) and how they are stopped.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// A process recorded well enough to stop it later from another process (`xtask down`) without
/// hitting an unrelated process that reused the pid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcRecord {
    /// What it is ("etcd", "hub", "agent-node1").
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
}

/// A daemon this process started; stdout and stderr go to its log file.
#[derive(Debug)]
pub struct Daemon {
    record: ProcRecord,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with its output appended to `log`.
    ///
    /// `detached` daemons get their own process group so they outlive the caller and its terminal's
    /// Ctrl-C (`xtask up`); the others die with the calling thread (parent-death signal) so a test
    /// runner killed from outside does not leave them running.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        detached: bool,
    ) -> anyhow::Result<Daemon> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        if detached {
            cmd.process_group(0);
        } else {
            // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        let start_time = start_time(pid).unwrap_or(0);
        Ok(Daemon {
            record: ProcRecord {
                name: name.to_string(),
                pid,
                start_time,
            },
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Its pid and start time.
    pub fn record(&self) -> &ProcRecord {
        &self.record
    }

    /// Lets the process run on after this value is gone; returns its record.
    pub fn release(mut self) -> ProcRecord {
        self.child = None;
        self.record.clone()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether it still runs (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Fails with the tail of its log when the daemon already exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        anyhow::bail!(
            "{} exited; last lines of {}:\n{}",
            self.record.name,
            self.log.display(),
            tail(&self.log, 30)
        )
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps it.
    pub fn stop(&mut self, grace: Duration) {
        self.signal_and_reap(libc::SIGTERM, grace);
        self.signal_and_reap(libc::SIGKILL, Duration::from_secs(5));
    }

    /// SIGKILL at once (a crash, as far as the daemon can tell); reaps it.
    pub fn kill(&mut self) {
        self.signal_and_reap(libc::SIGKILL, Duration::from_secs(5));
    }

    fn signal_and_reap(&mut self, sig: libc::c_int, wait: Duration) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            self.child = None;
            return;
        }
        send(self.record.pid, sig);
        let start = Instant::now();
        while start.elapsed() < wait {
            if !matches!(child.try_wait(), Ok(None)) {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(STOP_GRACE);
    }
}

/// Stops a recorded process that is not our child: SIGTERM, then SIGKILL after `grace`.
///
/// Does nothing when the pid now belongs to another process (different start time).
pub fn stop_recorded(rec: &ProcRecord, grace: Duration) {
    if !same_process(rec) {
        return;
    }
    send(rec.pid, libc::SIGTERM);
    if wait_gone(rec, grace) {
        return;
    }
    send(rec.pid, libc::SIGKILL);
    wait_gone(rec, Duration::from_secs(5));
}

fn wait_gone(rec: &ProcRecord, wait: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < wait {
        if !same_process(rec) || is_zombie(rec.pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Whether `rec.pid` is still the process that was recorded.
pub fn same_process(rec: &ProcRecord) -> bool {
    match start_time(rec.pid) {
        Some(t) => rec.start_time == 0 || t == rec.start_time,
        None => false,
    }
}

/// Sends `sig` to `pid`, ignoring errors (it may be gone already).
pub fn send(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and has no memory effects on this process.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Start time of `pid` in clock ticks since boot.
pub fn start_time(pid: u32) -> Option<u64> {
    // After ')' the fields start at field 3 (state), so field 22 is index 19.
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s == "Z"))
}

/// The last `n` lines of a text file ("" when unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
