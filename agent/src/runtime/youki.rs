//! Container lifecycles through youki's `libcontainer`, used as a library.
//!
//! Layout under the runtime root: `state/<id>/` is youki's state directory, `bundles/<id>/config.json`
//! the OCI bundle youki reads at build time (the rootfs itself lives elsewhere, absolute in the
//! spec). Order of calls follows youki's own `create`/`start`/`kill`/`delete` commands.
//!
//! A container's stdout and stderr are the write ends of two pipes whose read ends a log shim
//! holds (`crate::logs`): no host file is open in the container, so CRIU can checkpoint it, and the
//! shim outlives the agent. Without a shim (`with_log_shim`/`with_create_helper` not called) they
//! are the log file itself, opened for appending.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::Signal;

use super::locks;
use super::reaper::{Child, Reaper};
use super::spec::{build_spec, is_valid_name};
use super::{cgroup, ContainerConfig, ContainerState, RuntimeError, Status};
use crate::logs::LogShim;

/// How long processes get to disappear after SIGKILL before `remove` reports them.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(5);

/// How long a create may wait on libcontainer's helper processes before they are presumed stuck.
const CREATE_WATCHDOG: Duration = Duration::from_secs(10);

/// How long `remove` waits for a container's log shim to write the last output and exit.
const SHIM_EXIT_WAIT: Duration = Duration::from_secs(2);

/// The create helper's third argument when the container's stdout and stderr are at fds 3 and 4.
const INHERITED_STDIO: &str = "--stdio-fds";

/// Creates, starts, inspects and removes containers with libcontainer. `Send + Sync`; every
/// method blocks.
pub struct Runtime {
    root: PathBuf,
    /// When set, creates run in this executable (`HELPER_ARG`), a fresh single-threaded process.
    create_helper: Option<PathBuf>,
    state_root: PathBuf,
    bundles: PathBuf,
    cgroup_parent: String,
    reaper: Reaper,
    /// When set, every container's output goes through pipes to a log shim.
    log_shim: Option<LogShim>,
    /// Log shims this process started, `(container id, pid)`, until reaped.
    shims: Mutex<Vec<(String, i32)>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("state_root", &self.state_root)
            .field("cgroup_parent", &self.cgroup_parent)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// A runtime keeping youki state and bundles under `root` (`<agent data dir>/runtime`) and its
    /// containers' cgroups under `/<cgroup_parent>` in every hierarchy.
    pub fn new(root: &Path, cgroup_parent: String) -> Result<Self, RuntimeError> {
        if !is_valid_name(&cgroup_parent) {
            return Err(RuntimeError::InvalidCgroupParent {
                parent: cgroup_parent,
                reason: "must be 1-128 characters of [A-Za-z0-9_+.-]",
            });
        }
        let state_root = root.join("state");
        let bundles = root.join("bundles");
        for dir in [&state_root, &bundles] {
            std::fs::create_dir_all(dir).map_err(|source| RuntimeError::Io {
                op: "create dir",
                path: dir.clone(),
                source,
            })?;
        }
        // youki canonicalizes its root; doing it once here keeps our paths and its paths equal.
        let state_root = state_root
            .canonicalize()
            .map_err(|source| RuntimeError::Io {
                op: "canonicalize",
                path: state_root.clone(),
                source,
            })?;
        Ok(Self {
            root: root.to_path_buf(),
            create_helper: None,
            state_root,
            bundles,
            cgroup_parent,
            reaper: Reaper::default(),
            log_shim: None,
            shims: Mutex::new(Vec::new()),
        })
    }

    /// Runs every `create` in a child process: `exe HELPER_ARG ...` (the agent's own binary, which
    /// calls [`run_create_helper`]). libcontainer clones its helper processes from the caller; cloned
    /// from a multi-threaded daemon they can inherit a lock another thread held (allocator, log
    /// writer) and wait on it forever. A fresh single-threaded process has no such locks, and the
    /// process-wide changes libcontainer makes (dumpable flag) stay out of the daemon. The caller
    /// must be a child subreaper (`PR_SET_CHILD_SUBREAPER`) so the container's init, orphaned when
    /// the helper exits, becomes its child and can be reaped. The same executable is the log shim
    /// (with default rotation) unless [`Runtime::with_log_shim`] chose one.
    pub fn with_create_helper(mut self, exe: PathBuf) -> Self {
        if self.log_shim.is_none() {
            self.log_shim = Some(LogShim::new(exe.clone()));
        }
        self.create_helper = Some(exe);
        self
    }

    /// Sends every container's stdout and stderr through pipes to a log shim started per
    /// container (`exe __log-shim`, see `crate::logs`), which writes and rotates the log file.
    pub fn with_log_shim(mut self, shim: LogShim) -> Self {
        self.log_shim = Some(shim);
        self
    }

    /// How to run commands inside this runtime's containers (health probes' `exec`): through the
    /// create helper's executable, which is the agent binary and dispatches the exec helper too.
    /// `None` without a create helper.
    pub fn exec_helper(&self) -> Option<super::exec::Exec> {
        self.create_helper.clone().map(super::exec::Exec::new)
    }

    /// The cgroup parent this runtime puts its containers under.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The bundle directory of container `id` (holds `config.json`).
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.bundles.join(id)
    }

    /// youki's state directory of container `id`.
    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.state_root.join(id)
    }

    /// Writes the bundle, connects the container's stdout and stderr to `log_path` (through a log
    /// shim's pipes when one is configured, else the file opened for appending), and creates the
    /// container without starting it. Returns the init's host pid; its network namespace is
    /// `/proc/<pid>/ns/net`. Fails with `AlreadyExists` if the id has state.
    pub fn create(&self, cfg: &ContainerConfig, log_path: &Path) -> Result<i32, RuntimeError> {
        let output = match &self.log_shim {
            Some(shim) => {
                self.reap_shims();
                let pipes = shim
                    .spawn(log_path)
                    .map_err(|source| RuntimeError::LogShim {
                        id: cfg.id.clone(),
                        source,
                    })?;
                self.lock_shims().push((cfg.id.clone(), pipes.pid));
                // Dropped (closed) when the create returns: from then on only the container's
                // processes hold them, and the shim sees EOF when the last one exits.
                Output::Pipes {
                    stdout: pipes.stdout,
                    stderr: pipes.stderr,
                }
            }
            None => Output::File(log_path.to_owned()),
        };
        match &self.create_helper {
            Some(exe) => self.create_via_helper(exe, cfg, output),
            None => self.create_with_output(cfg, output),
        }
    }

    fn create_via_helper(
        &self,
        exe: &Path,
        cfg: &ContainerConfig,
        output: Output,
    ) -> Result<i32, RuntimeError> {
        let span = tracing::info_span!("runtime_create", id = %cfg.id);
        let _span = span.enter();
        let id = cfg.id.as_str();
        let helper_err = |message: String| RuntimeError::Helper {
            id: id.to_owned(),
            message,
        };
        let config =
            serde_json::to_vec(cfg).map_err(|e| helper_err(format!("encode config: {e}")))?;
        // The helper is its own process: only calls for this id wait, other creates run beside it.
        let waited = Instant::now();
        let _lock = locks::for_id(id);
        let lock_wait_ms = waited.elapsed().as_millis() as u64;
        let ran = Instant::now();
        let mut cmd = std::process::Command::new(exe);
        cmd.arg(HELPER_ARG).arg(&self.root).arg(&self.cgroup_parent);
        match &output {
            Output::File(log_path) => {
                cmd.arg(log_path);
            }
            Output::Pipes { stdout, stderr } => {
                cmd.arg(INHERITED_STDIO);
                let fds = [stdout.as_raw_fd(), stderr.as_raw_fd()];
                // SAFETY: runs in the forked child before exec; `place_fds` only makes
                // async-signal-safe calls (fcntl, dup2) on these fds, which stay open in the
                // parent until the child is waited for.
                unsafe {
                    cmd.pre_exec(move || crate::logs::place_fds(fds));
                }
            }
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| helper_err(format!("run {}: {e}", exe.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin
                .write_all(&config)
                .map_err(|e| helper_err(format!("send config: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| helper_err(format!("wait: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout.trim().parse::<i32>() {
            Ok(pid) if out.status.success() && pid > 0 => {
                self.reaper.track(id, pid);
                tracing::info!(
                    pid,
                    lock_wait_ms,
                    helper_ms = ran.elapsed().as_millis() as u64,
                    "container created"
                );
                Ok(pid)
            }
            _ => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let message = match stderr.trim() {
                    "" => format!("exited with {}", out.status),
                    said => said.to_owned(),
                };
                self.reaper.sweep();
                Err(helper_err(message))
            }
        }
    }

    /// [`Runtime::create`] in this process with `log_path` opened as stdout and stderr (no shim).
    pub fn create_in_process(
        &self,
        cfg: &ContainerConfig,
        log_path: &Path,
    ) -> Result<i32, RuntimeError> {
        self.create_with_output(cfg, Output::File(log_path.to_owned()))
    }

    /// Creates in this process (what the create helper runs), with the given stdout and stderr.
    fn create_with_output(
        &self,
        cfg: &ContainerConfig,
        output: Output,
    ) -> Result<i32, RuntimeError> {
        let span = tracing::info_span!("runtime_create", id = %cfg.id);
        let _span = span.enter();
        let spec = build_spec(cfg, &self.cgroup_parent)?;
        let id = cfg.id.as_str();

        let _lock = locks::exclusive();
        let state_dir = self.state_dir(id);
        if state_dir.symlink_metadata().is_ok() {
            return Err(RuntimeError::AlreadyExists { id: id.to_owned() });
        }

        let bundle = self.bundle_dir(id);
        std::fs::create_dir_all(&bundle).map_err(|source| RuntimeError::Io {
            op: "create bundle dir",
            path: bundle.clone(),
            source,
        })?;
        let built = (|| {
            let config = bundle.join("config.json");
            spec.save(&config).map_err(|source| RuntimeError::Spec {
                id: id.to_owned(),
                source,
            })?;
            let (stdin, stdout, stderr) = open_stdio(output)?;
            let youki = |source: LibcontainerError| youki_err("create", id, source);
            let builder = ContainerBuilder::new(id.to_owned(), SyscallType::default())
                .with_root_path(&self.state_root)
                .map_err(youki)?
                .validate_id()
                .map_err(youki)?
                .with_stdin(stdin)
                .with_stdout(stdout)
                .with_stderr(stderr)
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true);
            // A watchdog for a create whose cloned helpers hang (see `kill_stuck_helpers`).
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let watchdog = std::thread::spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    done_rx.recv_timeout(CREATE_WATCHDOG)
                {
                    super::reaper::kill_stuck_helpers();
                }
            });
            let result = builder.build();
            drop(done_tx);
            let _ = watchdog.join();
            // build() makes this whole process non-dumpable when the spec has namespaces; the
            // agent needs its /proc entries (and CRIU later), so give it back whatever happened.
            if let Err(e) = nix::sys::prctl::set_dumpable(true) {
                tracing::warn!(error = %e, "cannot restore the dumpable flag");
            }
            result.map_err(youki)
        })();

        let container = match built {
            Ok(container) => container,
            Err(first) => {
                // libcontainer removes its own state and cgroup when its process setup fails, but
                // not when it fails earlier; make sure nothing of this id stays behind.
                let cleaned = self.cleanup(id);
                // Its intermediate and init processes may be zombies by now; the rest are reaped
                // by the next `reap`.
                self.reaper.sweep();
                return Err(match cleaned {
                    Ok(()) => first,
                    Err(cleanup) => RuntimeError::Cleanup {
                        first: Box::new(first),
                        cleanup: Box::new(cleanup),
                    },
                });
            }
        };
        let Some(pid) = container.pid() else {
            let first = youki_err(
                "create",
                id,
                LibcontainerError::Other("no init pid recorded".to_owned()),
            );
            return Err(match self.cleanup(id) {
                Ok(()) => first,
                Err(cleanup) => RuntimeError::Cleanup {
                    first: Box::new(first),
                    cleanup: Box::new(cleanup),
                },
            });
        };
        let pid = pid.as_raw();
        self.reaper.track(id, pid);
        tracing::info!(pid, "container created");
        Ok(pid)
    }

    /// Starts a created container: its init executes the user process.
    pub fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let _lock = locks::for_id(id);
        let mut container = self
            .load(id)?
            .ok_or_else(|| RuntimeError::NotFound { id: id.to_owned() })?;
        // Connects to the init's notify socket by chdir and a relative name.
        let _cwd = locks::cwd();
        container
            .start()
            .map_err(|source| youki_err("start", id, source))?;
        tracing::info!(id, "container started");
        Ok(())
    }

    /// Takes over a container CRIU restored into this runtime's cgroup parent (the target end of a
    /// live migration): from now on `state`, `list`, `reap` and `remove` handle `id` like the
    /// containers this runtime created. `pid` is the restored init, a child of this process (or at
    /// least alive). Fails with `AlreadyExists` if the id has state.
    pub fn adopt_restored(&self, id: &str, pid: i32) -> Result<(), RuntimeError> {
        if !is_valid_name(id) {
            return Err(RuntimeError::NotFound { id: id.to_owned() });
        }
        let _lock = locks::for_id(id);
        let dir = self.state_dir(id);
        if dir.symlink_metadata().is_ok() {
            return Err(RuntimeError::AlreadyExists { id: id.to_owned() });
        }
        let record = super::restored::Restored::of(pid).ok_or_else(|| RuntimeError::Io {
            op: "adopt restored container",
            path: PathBuf::from(format!("/proc/{pid}")),
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
        super::restored::write(&dir, &record)?;
        self.reaper.track(id, pid);
        tracing::info!(id, pid, "restored container adopted");
        Ok(())
    }

    /// Starts the log shim of container `id` before CRIU restores it (the target end of a live
    /// migration): writing `log_path`, registered like a created container's (so `remove` waits
    /// for its last output). Returns the write ends of its stdout and stderr pipes, which replace
    /// the dumped init's; close them once the restore is done, so the shim sees EOF when the
    /// container's last process exits. Fails when no log shim is configured.
    pub fn spawn_log_shim(
        &self,
        id: &str,
        log_path: &Path,
    ) -> Result<(OwnedFd, OwnedFd), RuntimeError> {
        let shim = self
            .log_shim
            .as_ref()
            .ok_or_else(|| RuntimeError::InvalidConfig {
                id: id.to_owned(),
                reason: "no log shim configured: a restored container's output needs one"
                    .to_owned(),
            })?;
        self.reap_shims();
        let pipes = shim
            .spawn(log_path)
            .map_err(|source| RuntimeError::LogShim {
                id: id.to_owned(),
                source,
            })?;
        self.lock_shims().push((id.to_owned(), pipes.pid));
        Ok((pipes.stdout, pipes.stderr))
    }

    /// Sets `id`'s cpu quota and memory limit in its cgroups (see [`cgroup::set_limits`]); for a
    /// restored container, whose limits CRIU did not write.
    pub fn set_limits(
        &self,
        id: &str,
        cpu_millis: u64,
        memory_bytes: u64,
    ) -> Result<(), RuntimeError> {
        let _lock = locks::for_id(id);
        cgroup::set_limits(&self.cgroup_parent, id, cpu_millis, memory_bytes)
    }

    /// The container's status (refreshed against its process) and init pid; `None` for an
    /// unknown id. A container whose state file is missing (half created or half deleted) reads as
    /// `Stopped` without a pid.
    pub fn state(&self, id: &str) -> Result<Option<ContainerState>, RuntimeError> {
        let _lock = locks::for_id(id);
        if !self.state_dir(id).exists() {
            return Ok(None);
        }
        // Reap first: a pid reaped here may be reused at once, so our record wins over /proc.
        let reaped = matches!(self.reaper.try_reap(id), Child::Exited(_));
        if let Some(r) = super::restored::read(&self.state_dir(id)) {
            let status = if !reaped && r.alive() {
                Status::Running
            } else {
                Status::Stopped
            };
            return Ok(Some(ContainerState {
                status,
                pid: Some(r.pid),
            }));
        }
        match self.load(id) {
            Ok(Some(container)) => {
                let status = if reaped {
                    Status::Stopped
                } else {
                    status_of(container.status())
                };
                Ok(Some(ContainerState {
                    status,
                    pid: container.pid().map(|p| p.as_raw()),
                }))
            }
            Ok(None) => Ok(None),
            Err(_) if !self.state_dir(id).join("state.json").exists() => Ok(Some(ContainerState {
                status: Status::Stopped,
                pid: None,
            })),
            Err(e) => Err(e),
        }
    }

    /// The exit status of `id`'s init if this runtime reaped it (128 + signal when killed).
    pub fn exit_code(&self, id: &str) -> Option<i32> {
        self.reaper.exit_code(id)
    }

    /// Stops and deletes container `id`: SIGTERM to its processes and up to `grace` for them to
    /// exit (zero skips this), then SIGKILL, then removes youki's state, the bundle, the
    /// container's cgroups and the parent's when they became empty. Ok for unknown or
    /// half-deleted ids.
    pub fn remove(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        self.remove_with_signal(id, Signal::SIGTERM, grace)
    }

    /// [`Runtime::remove`] with another stop signal than SIGTERM (the image's `StopSignal` or the
    /// user's `stop_signal`): `signal` first, up to `grace` for the processes to exit, then SIGKILL.
    /// The grace is skipped when the container's init has no handler for `signal` (pid 1 of a
    /// namespace ignores signals it does not catch, so waiting would only delay the SIGKILL).
    pub fn remove_with_signal(
        &self,
        id: &str,
        signal: Signal,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        let span = tracing::info_span!("runtime_remove", id, signal = %signal);
        let _span = span.enter();
        if !is_valid_name(id) {
            // Never joined to a path: nothing of it can exist.
            return Ok(());
        }
        let restored = super::restored::read(&self.state_dir(id));
        if !grace.is_zero() {
            let signalled = {
                let _lock = locks::for_id(id);
                // Not libcontainer's: signal the init by the pid we recorded, if it is still
                // that process.
                let loaded = match restored {
                    Some(_) => Ok(None),
                    None => self.load(id),
                };
                match (restored, loaded) {
                    (Some(r), _) => {
                        r.alive()
                            && super::signal::catches(r.pid, signal)
                            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid), signal)
                                .is_ok()
                    }
                    (None, Ok(Some(mut c))) if c.status() == ContainerStatus::Running => {
                        // The init is pid 1 of its namespace: without a handler it ignores the
                        // signal, and waiting out the grace would only delay the SIGKILL below.
                        let init_listens = c
                            .pid()
                            .is_none_or(|pid| super::signal::catches(pid.as_raw(), signal));
                        // `all`: signal through the cgroup, never a possibly reused pid.
                        c.kill(signal, true).is_ok() && init_listens
                    }
                    _ => false,
                }
            };
            // Wait without the lock: a `state` of this id (liveness) must not queue behind the grace.
            if signalled && self.wait_exit(id, grace) {
                tracing::debug!("exited after the stop signal");
            }
        }

        let _lock = locks::for_id(id);
        let mut first_err = None;
        if let Some(r) = restored {
            // Everything in its cgroups, and the init itself should it have left them.
            let dirs = cgroup::container_dirs(&self.cgroup_parent, id);
            let mut pids = cgroup::pids(&dirs);
            if r.alive() && !pids.contains(&r.pid) {
                pids.push(r.pid);
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
            if !self.wait_exit(id, KILL_TIMEOUT) {
                first_err.get_or_insert(RuntimeError::KillTimeout {
                    id: id.to_owned(),
                    waited: KILL_TIMEOUT,
                });
            }
        } else {
            self.kill_and_delete(id, &mut first_err);
        }
        if let Err(e) = self.cleanup(id) {
            first_err.get_or_insert(e);
        }
        self.reaper.forget(id);
        self.wait_shims(id, SHIM_EXIT_WAIT);
        match first_err {
            None => {
                tracing::info!("container removed");
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// SIGKILL through libcontainer, wait for the processes to go, delete youki's state.
    fn kill_and_delete(&self, id: &str, first_err: &mut Option<RuntimeError>) {
        match self.load(id) {
            Ok(Some(mut container)) => {
                if container.status() != ContainerStatus::Stopped {
                    if let Err(e) = container.kill(Signal::SIGKILL, true) {
                        // Cgroup removal below kills whatever is left.
                        tracing::warn!(error = %e, "youki kill failed");
                    }
                }
                if !self.wait_exit(id, KILL_TIMEOUT) {
                    first_err.get_or_insert(RuntimeError::KillTimeout {
                        id: id.to_owned(),
                        waited: KILL_TIMEOUT,
                    });
                }
                if let Err(e) = container.delete(true) {
                    tracing::warn!(error = %e, "youki delete failed, cleaning up by hand");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "unreadable youki state, cleaning up by hand"),
        }
    }

    /// Ids of every container this runtime has youki state or a bundle for (what an agent
    /// restart must reconcile: running containers and leftovers of interrupted creates).
    pub fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let mut ids = Vec::new();
        for dir in [&self.state_root, &self.bundles] {
            let entries = std::fs::read_dir(dir).map_err(|source| RuntimeError::Io {
                op: "read dir",
                path: dir.clone(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| RuntimeError::Io {
                    op: "read dir",
                    path: dir.clone(),
                    source,
                })?;
                if let Some(name) = entry.file_name().to_str() {
                    if is_valid_name(name) && !ids.iter().any(|i| i == name) {
                        ids.push(name.to_owned());
                    }
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Reaps, without blocking, the init processes of this runtime's containers that exited;
    /// returns `(id, status)` for each (128 + signal when killed by one).
    pub fn reap(&self) -> Vec<(String, i32)> {
        self.reap_shims();
        self.reaper.reap()
    }

    fn lock_shims(&self) -> MutexGuard<'_, Vec<(String, i32)>> {
        // A list of pids: a panicking holder cannot leave it half-updated.
        self.shims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Collects the exit of log shims that finished (their container's output ended).
    fn reap_shims(&self) {
        self.lock_shims().retain(|(id, pid)| {
            let done = !matches!(
                nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(*pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG)
                ),
                Ok(nix::sys::wait::WaitStatus::StillAlive)
            );
            if done {
                tracing::debug!(id, pid, "log shim exited");
            }
            !done
        });
    }

    /// Waits up to `timeout` for `id`'s log shims (whose container is gone) to flush and exit.
    fn wait_shims(&self, id: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap_shims();
            if !self.lock_shims().iter().any(|(i, _)| i == id) {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(id, "log shim still running after the container was removed");
                return;
            }
            std::thread::sleep(POLL);
        }
    }

    fn load(&self, id: &str) -> Result<Option<Container>, RuntimeError> {
        let dir = self.state_dir(id);
        if !dir.exists() {
            return Ok(None);
        }
        Container::load(dir)
            .map(Some)
            .map_err(|source| youki_err("load", id, source))
    }

    /// True once `id`'s processes are gone (its init reaped if it is our child, its cgroups empty).
    fn wait_exit(&self, id: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let init_done = match self.reaper.try_reap(id) {
                Child::Exited(_) | Child::NotOurs => true,
                Child::Alive => false,
            };
            if init_done
                && cgroup::pids(&cgroup::container_dirs(&self.cgroup_parent, id)).is_empty()
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Removes every trace of `id`: youki state dir, bundle, cgroups (and an empty parent).
    fn cleanup(&self, id: &str) -> Result<(), RuntimeError> {
        let mut first = None;
        for (op, dir) in [
            ("remove state dir", self.state_dir(id)),
            ("remove bundle", self.bundle_dir(id)),
        ] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    first.get_or_insert(RuntimeError::Io {
                        op,
                        path: dir,
                        source,
                    });
                }
            }
        }
        if let Err(e) = cgroup::remove_container(&self.cgroup_parent, id) {
            first.get_or_insert(e);
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

fn status_of(s: ContainerStatus) -> Status {
    match s {
        ContainerStatus::Creating => Status::Creating,
        ContainerStatus::Created => Status::Created,
        ContainerStatus::Running => Status::Running,
        ContainerStatus::Stopped => Status::Stopped,
        ContainerStatus::Paused => Status::Paused,
    }
}

fn youki_err(op: &'static str, id: &str, source: LibcontainerError) -> RuntimeError {
    RuntimeError::Youki {
        op,
        id: id.to_owned(),
        source: Box::new(source),
    }
}

/// Where a container's stdout and stderr go.
enum Output {
    /// Appended to this file (no log shim).
    File(PathBuf),
    /// The write ends of a log shim's pipes.
    Pipes { stdout: OwnedFd, stderr: OwnedFd },
}

/// stdin from /dev/null (never the agent's own), stdout and stderr per `output`.
fn open_stdio(output: Output) -> Result<(File, OwnedFd, OwnedFd), RuntimeError> {
    let io_err = |op, path: &Path| {
        let path = path.to_owned();
        move |source| RuntimeError::Io { op, path, source }
    };
    let stdin = File::open("/dev/null").map_err(io_err("open", Path::new("/dev/null")))?;
    match output {
        Output::Pipes { stdout, stderr } => Ok((stdin, stdout, stderr)),
        Output::File(log_path) => {
            let stdout = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&log_path)
                .map_err(io_err("open log", &log_path))?;
            let stderr = stdout.try_clone().map_err(io_err("dup log", &log_path))?;
            Ok((stdin, stdout.into(), stderr.into()))
        }
    }
}

/// The first argument that makes the agent binary act as a create helper.
pub const HELPER_ARG: &str = "__runtime-create";

/// The create helper's whole life: `HELPER_ARG <runtime root> <cgroup parent> <log path | --stdio-fds>`
/// (`--stdio-fds`: the container's stdout and stderr are this process's fds 3 and 4), the
/// container config as JSON on stdin; prints the init pid on stdout, or the error on stderr and
/// exits non-zero. Returns the process exit code.
pub fn run_create_helper(args: &[std::ffi::OsString]) -> i32 {
    let [root, parent, log] = args else {
        eprintln!(
            "usage: {HELPER_ARG} ROOT CGROUP_PARENT (LOG_PATH | {INHERITED_STDIO}) < config.json"
        );
        return 2;
    };
    let output = if log == INHERITED_STDIO {
        match crate::logs::take_placed_fds() {
            Ok((stdout, stderr)) => Output::Pipes { stdout, stderr },
            Err(e) => {
                eprintln!("{e}");
                return 2;
            }
        }
    } else {
        Output::File(PathBuf::from(log))
    };
    let Some(parent) = parent.to_str() else {
        eprintln!("cgroup parent {parent:?} is not UTF-8");
        return 2;
    };
    let cfg: ContainerConfig = match serde_json::from_reader(std::io::stdin().lock()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("bad container config on stdin: {e}");
            return 2;
        }
    };
    let created = Runtime::new(Path::new(root), parent.to_owned())
        .and_then(|rt| rt.create_with_output(&cfg, output));
    match created {
        Ok(pid) => {
            println!("{pid}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}
