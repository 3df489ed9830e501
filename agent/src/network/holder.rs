//! A network namespace made before the process that will live in it: what a CRIU restore needs
//! (the target of a live migration attaches the instance's veth and address first, then restores
//! the container into that namespace).
//!
//! The namespace is held by a tiny process, `berth-agent __netns-holder`, which unshares its
//! network namespace, says `ready`, and waits for its stdin to close. Everything in this crate
//! that plugs instances in works on "the namespace of pid N" ([`super::Network::attach`]), so the
//! holder's pid is all it needs; CRIU gets `/proc/<pid>/ns/net`. Once the restored container is in
//! the namespace the holder can go: the namespace lives as long as a process is in it. If the agent
//! dies, the holder's stdin closes and it exits by itself: nothing is left behind.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

/// The agent binary's first argument that runs [`run_netns_holder`].
pub const NETNS_HOLDER_ARG: &str = "__netns-holder";

/// What can go wrong making the namespace.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("starting {exe} {NETNS_HOLDER_ARG}: {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("the netns holder did not get ready: {0}")]
    NotReady(String),
}

/// A fresh network namespace, held open until this is dropped.
#[derive(Debug)]
pub struct NetnsHolder {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl NetnsHolder {
    /// Starts `exe __netns-holder` and waits until its namespace exists.
    pub fn spawn(exe: &Path) -> Result<Self, HolderError> {
        let mut child = Command::new(exe)
            .arg(NETNS_HOLDER_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| HolderError::Spawn {
                exe: exe.to_owned(),
                source,
            })?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        let ready = child
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut line));
        let mut holder = Self { child, stdin };
        match ready {
            Some(Ok(_)) if line.trim() == "ready" => Ok(holder),
            other => {
                let mut said = String::new();
                if let Some(mut err) = holder.child.stderr.take() {
                    let _ = err.read_to_string(&mut said);
                }
                holder.stop();
                Err(HolderError::NotReady(match other {
                    Some(Err(e)) => e.to_string(),
                    _ if !said.trim().is_empty() => said.trim().to_owned(),
                    _ => format!("it said {:?}", line.trim()),
                }))
            }
        }
    }

    /// The holder's pid: its network namespace is the one to plug into.
    pub fn pid(&self) -> i32 {
        // Linux pids fit in i32.
        self.child.id() as i32
    }

    /// `/proc/<pid>/ns/net`, for CRIU's restore.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid()))
    }

    fn stop(&mut self) {
        // EOF on its stdin ends it; the kill is for one that hangs.
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The holder's body (in a fresh process of the agent binary): a new network namespace, `ready`
/// on stdout, then nothing until stdin closes.
pub fn run_netns_holder() -> i32 {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        eprintln!("unshare(CLONE_NEWNET): {e}");
        return 1;
    }
    println!("ready");
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin();
    loop {
        match stdin.read(&mut sink) {
            Ok(0) | Err(_) => return 0,
            Ok(_) => {}
        }
    }
}
