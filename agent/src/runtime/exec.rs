//! Runs a command inside a running container (its namespaces, cgroup, user and environment) with
//! libcontainer's tenant builder, in a short-lived helper process.
//!
//! Like creates, execs never clone from the multi-threaded agent (see `Runtime::with_create_helper`):
//! the agent runs its own binary with [`EXEC_HELPER_ARG`], sends an [`ExecRequest`] as JSON on the
//! helper's stdin and reads line-tagged answers from its stdout: `started <pid>` once the command
//! runs, then `result <json>` ([`ExecOutput`]). The helper owns the command's process (it is the
//! helper's child), enforces the timeout with SIGKILL and reaps everything it cloned before it
//! exits, so nothing is orphaned onto the agent. A SIGTERM to the helper (what dropping
//! [`Exec::run`]'s future sends) makes it kill the command and exit early.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::errno::Errno;
use nix::sys::signal::{kill, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// The first argument that makes the agent binary act as an exec helper.
pub const EXEC_HELPER_ARG: &str = "__runtime-exec";

/// How much of the command's combined stdout and stderr is kept (the rest is read and dropped).
pub const OUTPUT_LIMIT: usize = 4096;

/// Time the helper gets beyond the command's timeout (to build, kill and reap) before the agent
/// gives up on it.
const HELPER_GRACE: Duration = Duration::from_secs(5);

/// How often the helper looks at the command's process and output.
const HELPER_POLL: Duration = Duration::from_millis(5);

/// What the agent asks the helper to do (JSON on the helper's stdin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    /// youki's state directory of the container (`Runtime::state_dir(id)`).
    pub state_dir: PathBuf,
    /// Program and arguments, resolved in the container's `PATH`.
    pub command: Vec<String>,
    /// How long the command may run before it is killed, in milliseconds.
    pub timeout_ms: u64,
}

/// How an exec'd command ended, with the start of its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Its end.
    pub status: ExecStatus,
    /// The first [`OUTPUT_LIMIT`] bytes of its stdout and stderr (lossy UTF-8).
    pub output: String,
}

/// How an exec'd command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecStatus {
    /// Exited by itself with this code.
    Exited(i32),
    /// Killed by this signal (not by us).
    Signaled(i32),
    /// Ran past its timeout and was killed with SIGKILL.
    TimedOut,
}

/// Why a command could not be run (as opposed to ran and failed).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The helper process could not be started or talked to.
    #[error("exec helper for {state_dir}: {message}")]
    Helper {
        /// The container's state directory.
        state_dir: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The helper ran but could not start the command (no such container, not running, no such
    /// program…): its own words.
    #[error("exec in {state_dir}: {message}")]
    Failed {
        /// The container's state directory.
        state_dir: PathBuf,
        /// The helper's error.
        message: String,
    },
    /// The helper did not answer within the command's timeout plus its grace; it was stopped.
    #[error("exec helper for {state_dir} did not answer within {waited:?}")]
    HelperTimeout {
        /// The container's state directory.
        state_dir: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
}

/// Runs commands in containers through the exec helper. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Exec {
    program: PathBuf,
    leading_args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

impl Exec {
    /// Runs `program EXEC_HELPER_ARG` (the agent's own binary) for each command.
    pub fn new(program: PathBuf) -> Self {
        Self {
            program,
            leading_args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// Runs `program leading_args... EXEC_HELPER_ARG` with `envs` added instead: tests use this
    /// to make their own test binary the helper.
    pub fn with_invocation(
        mut self,
        leading_args: Vec<OsString>,
        envs: Vec<(OsString, OsString)>,
    ) -> Self {
        self.leading_args = leading_args;
        self.envs = envs;
        self
    }

    /// Runs `command` in the container whose youki state is `state_dir`, killing it after
    /// `timeout`. `Ok` whenever the command ran, whatever its exit status. Dropping the future
    /// stops the command (SIGTERM to the helper, which kills and reaps it).
    pub async fn run(
        &self,
        state_dir: &Path,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, ExecError> {
        let helper_err = |message: String| ExecError::Helper {
            state_dir: state_dir.to_owned(),
            message,
        };
        let request = ExecRequest {
            state_dir: state_dir.to_owned(),
            command: command.to_vec(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let request =
            serde_json::to_vec(&request).map_err(|e| helper_err(format!("encode request: {e}")))?;
        let mut child = tokio::process::Command::new(&self.program)
            .args(&self.leading_args)
            .arg(EXEC_HELPER_ARG)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| helper_err(format!("run {}: {e}", self.program.display())))?;
        // From here on, a dropped future must still stop the command.
        let mut guard = HelperGuard {
            pid: child.id(),
            done: false,
        };
        let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(helper_err("no pipes to the helper".to_owned()));
        };
        let talk = async {
            use tokio::io::AsyncWriteExt;
            stdin
                .write_all(&request)
                .await
                .map_err(|e| helper_err(format!("send request: {e}")))?;
            drop(stdin);
            let read_stderr = async {
                let mut text = Vec::new();
                let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut text).await;
                String::from_utf8_lossy(&text).trim().to_owned()
            };
            let read_result = async {
                let mut lines = BufReader::new(stdout).lines();
                let mut result = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(json) = line.strip_prefix("result ") {
                        result = serde_json::from_str::<ExecOutput>(json).ok();
                    } else if let Some(pid) = line.strip_prefix("started ") {
                        tracing::debug!(pid, "exec started");
                    }
                }
                result
            };
            let (said, result) = tokio::join!(read_stderr, read_result);
            let status = child
                .wait()
                .await
                .map_err(|e| helper_err(format!("wait: {e}")))?;
            match result {
                Some(out) if status.success() => Ok(out),
                _ => Err(ExecError::Failed {
                    state_dir: state_dir.to_owned(),
                    message: if said.is_empty() {
                        format!("helper exited with {status}")
                    } else {
                        said
                    },
                }),
            }
        };
        let waited = timeout.saturating_add(HELPER_GRACE);
        let answer = tokio::time::timeout(waited, talk).await;
        guard.done = true;
        match answer {
            Ok(result) => result,
            Err(_) => {
                // Polite first: the helper kills and reaps its command on SIGTERM. A helper stuck
                // inside libcontainer does not listen; tokio reaps it after the SIGKILL.
                guard.terminate();
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = child.start_kill();
                Err(ExecError::HelperTimeout {
                    state_dir: state_dir.to_owned(),
                    waited,
                })
            }
        }
    }
}

/// SIGTERMs the helper when [`Exec::run`]'s future is dropped before it answered.
struct HelperGuard {
    pid: Option<u32>,
    done: bool,
}

impl HelperGuard {
    fn terminate(&self) {
        // The helper is our child and tokio has not reaped it (the `Child` is alive in `run`'s
        // frame or in tokio's orphan queue), so its pid cannot have been reused.
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
}

impl Drop for HelperGuard {
    fn drop(&mut self) {
        if !self.done {
            self.terminate();
        }
    }
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

/// The exec helper's whole life: an [`ExecRequest`] as JSON on stdin; prints `started <pid>` and
/// then `result <ExecOutput as JSON>` on stdout, or the error on stderr and exits non-zero.
/// Returns the process exit code. Must run in a fresh single-threaded process (the agent binary
/// started with [`EXEC_HELPER_ARG`]).
pub fn run_exec_helper() -> i32 {
    let request: ExecRequest = match serde_json::from_reader(std::io::stdin().lock()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bad exec request on stdin: {e}");
            return 2;
        }
    };
    // SA_RESTART: libcontainer's own reads and waits must not fail with EINTR on a SIGTERM.
    let action = SigAction::new(
        SigHandler::Handler(on_sigterm),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    if let Err(e) = unsafe { nix::sys::signal::sigaction(Signal::SIGTERM, &action) } {
        eprintln!("install SIGTERM handler: {e}");
        return 1;
    }
    match exec_in_process(&request) {
        Ok(out) => match serde_json::to_string(&out) {
            Ok(json) => {
                println!("result {json}");
                let _ = std::io::stdout().flush();
                0
            }
            Err(e) => {
                eprintln!("encode result: {e}");
                1
            }
        },
        Err(message) => {
            eprintln!("{message}");
            1
        }
    }
}

fn exec_in_process(req: &ExecRequest) -> Result<ExecOutput, String> {
    let (Some(root), Some(id)) = (
        req.state_dir.parent(),
        req.state_dir.file_name().and_then(|n| n.to_str()),
    ) else {
        return Err(format!(
            "{}: not a container state dir",
            req.state_dir.display()
        ));
    };
    if req.command.is_empty() {
        return Err("empty command".to_owned());
    }
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("output pipe: {e}"))?;
    let stderr_end = write_end
        .try_clone()
        .map_err(|e| format!("output pipe: {e}"))?;
    let stdin = std::fs::File::open("/dev/null").map_err(|e| format!("open /dev/null: {e}"))?;
    let before = notify_sockets(&req.state_dir);
    let built = ContainerBuilder::new(id.to_owned(), SyscallType::default())
        .with_root_path(root)
        .and_then(|b| b.validate_id())
        .map(|b| {
            b.with_stdin(stdin)
                .with_stdout(write_end)
                .with_stderr(stderr_end)
                .as_tenant()
                .with_detach(false)
                .with_container_args(req.command.clone())
                .build()
        });
    // libcontainer leaves the notify socket of each exec in the state dir; probes exec every few
    // seconds for the container's whole life, so they must not pile up.
    for stale in notify_sockets(&req.state_dir).difference(&before) {
        let _ = std::fs::remove_file(stale);
    }
    let pid = match built {
        Ok(Ok(pid)) => pid,
        Ok(Err(e)) | Err(e) => {
            reap_all();
            return Err(format!("youki exec in container {id}: {e}"));
        }
    };
    println!("started {pid}");
    let _ = std::io::stdout().flush();

    let mut output = Output::new(read_end);
    let deadline = Instant::now() + Duration::from_millis(req.timeout_ms);
    let mut timed_out = false;
    let status = loop {
        output.drain();
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => break ExecStatus::Exited(code),
            Ok(WaitStatus::Signaled(_, _, _)) if timed_out => break ExecStatus::TimedOut,
            Ok(WaitStatus::Signaled(_, sig, _)) => break ExecStatus::Signaled(sig as i32),
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                reap_all();
                return Err(format!("wait for exec'd process {pid}: {e}"));
            }
        }
        let terminate = TERMINATE.load(Ordering::SeqCst);
        if !timed_out && (terminate || Instant::now() >= deadline) {
            // Our unreaped child: the pid cannot have been reused.
            let _ = kill(pid, Signal::SIGKILL);
            timed_out = true;
        }
        std::thread::sleep(HELPER_POLL);
    };
    // Whatever is already in the pipe; processes the command left behind may keep it open, so
    // no waiting for EOF.
    output.drain();
    reap_all();
    Ok(ExecOutput {
        status,
        output: output.text(),
    })
}

/// Reaps every child of this (single-purpose) process: libcontainer's intermediate process and,
/// on early errors, whatever else it cloned.
fn reap_all() {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

fn notify_sockets(dir: &Path) -> std::collections::HashSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.starts_with("tenant-notify-"))
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// The read end of the command's output pipe, non-blocking, keeping the first [`OUTPUT_LIMIT`]
/// bytes.
struct Output {
    pipe: std::fs::File,
    kept: Vec<u8>,
}

impl Output {
    fn new(read_end: OwnedFd) -> Self {
        let flags = nix::fcntl::fcntl(read_end.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map(nix::fcntl::OFlag::from_bits_truncate)
            .unwrap_or(nix::fcntl::OFlag::empty());
        // Best effort: if this fails, reads below may block until the command writes or exits.
        let _ = nix::fcntl::fcntl(
            read_end.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(flags | nix::fcntl::OFlag::O_NONBLOCK),
        );
        Self {
            pipe: std::fs::File::from(read_end),
            kept: Vec::new(),
        }
    }

    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.pipe.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let room = OUTPUT_LIMIT.saturating_sub(self.kept.len());
                    self.kept.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }
}
