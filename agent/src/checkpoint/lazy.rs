//! Post-copy with CRIU lazy pages: the container moves with everything but its memory, runs on
//! the target at once, and its pages follow on demand (userfaultfd) and in the background.
//!
//! Verified against CRIU 4.2.1 (`cr-service.c`, `cr-dump.c` `cr_lazy_mem_dump`, `page-xfer.c`,
//! `uffd.c`):
//! - A lazy dump over RPC writes every image but the lazy memory, then turns the dumping CRIU
//!   into a page server holding the frozen pages in pipes. It announces that moment with the
//!   `status-ready` notification (sent because `notify_scripts` is on): the images are complete
//!   and the server listens. CRIU only answers the dump request once the lazy-pages daemon has
//!   fetched everything and said goodbye (`PS_IOV_CLOSE`), or the transfer failed. [`LazyDump`]
//!   is that running CRIU: [`Criu::lazy_dump`] returns at `status-ready`,
//!   [`LazyDump::finish`] waits for the answer.
//! - Over RPC a lazy dump takes only the port of `ps`, not its address (it would listen on every
//!   address): the address comes from a one-line CRIU config file (`address …`), which RPC
//!   requests may name. The page server serves exactly one connection.
//! - The page server's tasks stay frozen while it serves (their pages are referenced by the
//!   pipes, so a running task would change what is sent). When the transfer fails, CRIU resumes
//!   them (`pstree_switch_state(.., TASK_ALIVE)`): after the target started running its copy, the
//!   caller must kill the source's tasks on a failed [`LazyDump::finish`]. Killing the dumping
//!   CRIU ([`LazyDumpAbort`]) detaches it; the tasks are then left to
//!   [`super::Checkpointer::resume`].
//! - RPC cannot start the lazy-pages daemon (there is no request type for it): [`LazyPages`] runs
//!   `criu lazy-pages --page-server --address A --port P -D images` as a child; `--status-fd`
//!   says when its socket (`lazy-pages.socket` in the images dir) accepts the restore. It
//!   connects to the page server only once the restore handed it the userfaultfds, pulls every
//!   page, then exits 0: its exit status is the only verdict used (its log is `lazy-pages.log`).
//! - A restore with `lazy_pages` ([`Criu::restore_lazy`]) gives the daemon the userfaultfds of
//!   the restored tasks and returns as soon as they run. If the daemon then fails, the tasks'
//!   missing pages would read as zeroes once its userfaultfds close: the caller kills the
//!   restored tree when [`LazyPages::wait`] fails.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use prost::Message;

use super::{
    check_absolute, criu_failed, images_size, log_tail, path_str, rpc, CheckpointError, Criu,
    DumpMode, DumpRequest, RestoreReport, RestoreRequest, DUMP_LOG, LOG_LEVEL, METADATA_FILE,
};

/// The lazy-pages daemon's log, in the images dir.
pub const LAZY_PAGES_LOG: &str = "lazy-pages.log";

/// The CRIU config file a lazy dump reads its page server address from (in the images dir,
/// removed once the server listens).
const ADDRESS_CONFIG: &str = "berth-lazy-dump.conf";

/// The socket the lazy-pages daemon listens on and the restore connects to (CRIU's fixed name,
/// relative to the images dir).
const LAZY_SOCKET: &str = "lazy-pages.socket";

/// How often a wait for a child process looks at it.
const POLL: Duration = Duration::from_millis(5);

thread_local! {
    /// Set while [`Criu::restore_lazy`] runs the common restore on this thread: the restore
    /// adds `lazy_pages` to its CRIU options.
    static LAZY_RESTORE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the restore running on this thread is a lazy one (read by `Criu::restore`).
pub(super) fn restoring_lazily() -> bool {
    LAZY_RESTORE.with(Cell::get)
}

/// A lazy dump: a checkpoint without memory, whose pages a page server then hands out.
#[derive(Debug, Clone)]
pub struct LazyDumpRequest {
    /// The dump itself. Its mode must be [`DumpMode::LeaveStopped`] (a failed migration resumes
    /// the tasks) or [`DumpMode::Kill`]; its `timeout` bounds freezing the tasks.
    pub dump: DumpRequest,
    /// Where the page server listens (e.g. `127.0.0.1:P`): a fixed port, since CRIU cannot tell
    /// which one it picked before the transfer ends.
    pub listen: SocketAddr,
    /// CRIU is killed when the images are not written and the server not listening by then.
    pub ready_timeout: Duration,
}

/// A lazy dump whose images are written and whose page server is waiting for the lazy-pages
/// daemon. Dropping it kills the page server (see [`LazyDumpAbort`]).
#[derive(Debug)]
pub struct LazyDump {
    sock: OwnedFd,
    child: Arc<Mutex<Child>>,
    images_dir: PathBuf,
    listen: SocketAddr,
    pid: i32,
    started: Instant,
    ready_after: Duration,
    images_bytes: u64,
    stdio: Vec<String>,
}

/// Kills a [`LazyDump`]'s CRIU from another thread (it may be blocked in [`LazyDump::finish`],
/// which then fails). Killing it after the page server ended does nothing.
#[derive(Debug, Clone)]
pub struct LazyDumpAbort(Arc<Mutex<Child>>);

/// What a finished lazy dump took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyDumpReport {
    /// From sending the request to `status-ready` (the tasks' frozen non-memory state).
    pub ready_after: Duration,
    /// From sending the request to CRIU's answer (after the last page was served).
    pub wall: Duration,
}

/// The lazy-pages daemon for one restore.
#[derive(Debug, Clone)]
pub struct LazyPagesRequest {
    /// The images (as received on the target): the daemon reads the process tree from them and
    /// listens on its socket there.
    pub images_dir: PathBuf,
    /// Where the source's page server (or a relay to it) is reachable.
    pub page_server: SocketAddr,
    /// The daemon is killed when it does not listen by then.
    pub ready_timeout: Duration,
}

/// A running `criu lazy-pages` daemon, ready for [`Criu::restore_lazy`]. Dropping it kills it.
#[derive(Debug)]
pub struct LazyPages {
    child: Arc<Mutex<Child>>,
    images_dir: PathBuf,
    started: Instant,
}

/// Kills a [`LazyPages`] daemon from another thread (e.g. when the migration is cancelled
/// while [`LazyPages::wait`] blocks).
#[derive(Debug, Clone)]
pub struct LazyPagesAbort(Arc<Mutex<Child>>);

/// What a lazy-pages daemon did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LazyPagesReport {
    /// From the daemon's start until it had every page and exited.
    pub wall: Duration,
}

impl Criu {
    /// Starts a lazy dump and returns once its images are complete and its page server listens
    /// on `req.listen`. The tasks stay frozen until [`LazyDump::finish`] says how the transfer
    /// ended. Blocks: use `spawn_blocking`.
    pub fn lazy_dump(&self, req: &LazyDumpRequest) -> Result<LazyDump, CheckpointError> {
        let d = &req.dump;
        let span = tracing::info_span!("criu_lazy_dump", pid = d.pid, images = %d.images_dir.display(), listen = %req.listen);
        let _span = span.enter();
        if d.mode == DumpMode::LeaveRunning {
            return Err(CheckpointError::InvalidRequest(
                "a lazy dump cannot leave the tasks running: the pages it serves would change"
                    .to_owned(),
            ));
        }
        if req.listen.port() == 0 {
            return Err(CheckpointError::InvalidRequest(
                "a lazy dump's page server needs a fixed port".to_owned(),
            ));
        }
        let (base, metadata, _) = self.prepare_dump(d)?;
        let stdio = metadata.stdio.clone();
        // Written first: the images travel as soon as the server is ready.
        write_file(
            &d.images_dir.join(METADATA_FILE),
            &serde_json::to_vec_pretty(&metadata)
                .map_err(|e| CheckpointError::InvalidRequest(format!("encode metadata: {e}")))?,
        )?;
        let config = d.images_dir.join(ADDRESS_CONFIG);
        write_file(&config, format!("address {}\n", req.listen.ip()).as_bytes())?;

        let opts = rpc::Opts {
            // The tasks stay stopped while their pages are served: they must not change.
            leave_running: Some(false),
            track_mem: None,
            parent_img: None,
            lazy_pages: Some(true),
            ps: Some(rpc::PageServerInfo {
                address: Some(req.listen.ip().to_string()),
                port: Some(i32::from(req.listen.port())),
            }),
            notify_scripts: Some(true),
            config_file: Some(path_str(&config)?),
            ..base
        };
        let rpc_req = rpc::Req {
            r#type: rpc::ReqType::Dump as i32,
            opts: Some(opts),
            ..Default::default()
        };

        let started = Instant::now();
        let rpc_err = |message: String| CheckpointError::Rpc {
            op: "lazy dump",
            images_dir: d.images_dir.clone(),
            message,
        };
        let (child, sock) = spawn_swrk(&self.path).map_err(|e| rpc_err(e.to_string()))?;
        let child = Arc::new(Mutex::new(child));
        let ready = wait_ready(
            &sock,
            &rpc_req,
            started + req.ready_timeout,
            req.ready_timeout,
        );
        let _ = std::fs::remove_file(&config);
        let failed = |e: CheckpointError| {
            kill_and_reap(&child);
            tracing::warn!(error = %e, "lazy dump failed before serving pages");
            e
        };
        match ready {
            Ok(None) => {}
            Ok(Some(resp)) if !resp.success => {
                return Err(failed(criu_failed("dump", &d.images_dir, &resp)));
            }
            Ok(Some(_)) => {
                return Err(failed(rpc_err(
                    "criu finished the dump without serving pages".to_owned(),
                )));
            }
            Err(e) => {
                let tail = log_tail(&d.images_dir.join(DUMP_LOG));
                return Err(failed(rpc_err(format!("{e}; log: {tail}"))));
            }
        }
        let ready_after = started.elapsed();
        let images_bytes = images_size(&d.images_dir)?;
        tracing::info!(
            ready_ms = ready_after.as_millis() as u64,
            images_bytes,
            "lazy dump ready: serving pages"
        );
        Ok(LazyDump {
            sock,
            child,
            images_dir: d.images_dir.clone(),
            listen: req.listen,
            pid: d.pid,
            started,
            ready_after,
            images_bytes,
            stdio,
        })
    }

    /// Starts `criu lazy-pages` for the images in `req.images_dir`, fetching from
    /// `req.page_server`, and returns once it accepts a restore. Blocks: use `spawn_blocking`.
    pub fn start_lazy_pages(&self, req: &LazyPagesRequest) -> Result<LazyPages, CheckpointError> {
        let span = tracing::info_span!("criu_lazy_pages", images = %req.images_dir.display(), page_server = %req.page_server);
        let _span = span.enter();
        check_absolute("images dir", &req.images_dir)?;
        let rpc_err = |message: String| CheckpointError::Rpc {
            op: "lazy-pages",
            images_dir: req.images_dir.clone(),
            message,
        };
        // A socket left by an earlier daemon would make this one's bind fail.
        match std::fs::remove_file(req.images_dir.join(LAZY_SOCKET)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CheckpointError::Io {
                    op: "remove stale",
                    path: req.images_dir.join(LAZY_SOCKET),
                    source,
                })
            }
        }
        let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| rpc_err(format!("status pipe: {}", io::Error::from(e))))?;
        let mut cmd = Command::new(&self.path);
        cmd.arg("lazy-pages")
            .arg("--page-server")
            .arg("--address")
            .arg(req.page_server.ip().to_string())
            .arg("--port")
            .arg(req.page_server.port().to_string())
            .arg("-D")
            .arg(&req.images_dir)
            .arg("-o")
            .arg(LAZY_PAGES_LOG)
            .arg(format!("-v{LOG_LEVEL}"))
            .arg("--status-fd")
            .arg("3")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let sources = [status_w.as_raw_fd()];
        // SAFETY: runs in the forked child before exec; `place` only calls fcntl and dup2
        // (async-signal safe) on an fd the parent keeps open until `spawn` returns.
        unsafe {
            cmd.pre_exec(move || rpc::place(&sources));
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| rpc_err(format!("run {}: {e}", self.path.display())))?;
        // Ours would keep the pipe open past the daemon's exit.
        drop(status_w);
        let child = Arc::new(Mutex::new(child));
        if let Err(e) = wait_status_byte(&status_r, started + req.ready_timeout) {
            kill_and_reap(&child);
            let tail = log_tail(&req.images_dir.join(LAZY_PAGES_LOG));
            let err = rpc_err(format!("daemon not ready: {e}; log: {tail}"));
            tracing::warn!(error = %err, "lazy-pages daemon did not start");
            return Err(err);
        }
        tracing::info!(
            ready_ms = started.elapsed().as_millis() as u64,
            "lazy-pages daemon listening"
        );
        Ok(LazyPages {
            child,
            images_dir: req.images_dir.clone(),
            started,
        })
    }

    /// Restores lazy images with `pages` feeding the tasks' memory: as
    /// [`super::Checkpointer::restore`], returning once the tasks run (their memory still
    /// arriving). On success the caller waits for [`LazyPages::wait`] and kills the restored
    /// tree if it fails; on failure it drops `pages`.
    pub fn restore_lazy(
        &self,
        req: &RestoreRequest<'_>,
        pages: &LazyPages,
    ) -> Result<RestoreReport, CheckpointError> {
        if req.images_dir != pages.images_dir {
            return Err(CheckpointError::InvalidRequest(format!(
                "the lazy-pages daemon serves {}, not {}",
                pages.images_dir.display(),
                req.images_dir.display()
            )));
        }
        if let Some(status) = pages.exited() {
            return Err(CheckpointError::Rpc {
                op: "restore",
                images_dir: req.images_dir.clone(),
                message: format!(
                    "the lazy-pages daemon already exited ({status}); log: {}",
                    log_tail(&req.images_dir.join(LAZY_PAGES_LOG))
                ),
            });
        }
        struct Flag;
        impl Drop for Flag {
            fn drop(&mut self) {
                LAZY_RESTORE.with(|f| f.set(false));
            }
        }
        LAZY_RESTORE.with(|f| f.set(true));
        let _flag = Flag;
        super::Checkpointer::restore(self, req)
    }
}

impl LazyDump {
    /// The images dir (complete: every image but the lazy memory, plus berth's metadata).
    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    /// Where the page server listens.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The dumped init's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// From the request to `status-ready`.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// Bytes of the image files (no lazy memory in them).
    pub fn images_bytes(&self) -> u64 {
        self.images_bytes
    }

    /// The init's fds 0, 1, 2 at dump time, as in the metadata.
    pub fn stdio(&self) -> &[String] {
        &self.stdio
    }

    /// A handle that kills this dump's CRIU from elsewhere.
    pub fn abort_handle(&self) -> LazyDumpAbort {
        LazyDumpAbort(self.child.clone())
    }

    /// Waits for CRIU's answer: success once the lazy-pages daemon fetched every page and
    /// closed (the tasks are then in the dump's final state), an error when the transfer failed
    /// (CRIU then resumed the tasks: see the module doc), the dump was aborted, or `timeout`
    /// passed (CRIU is killed).
    pub fn finish(self, timeout: Duration) -> Result<LazyDumpReport, CheckpointError> {
        let deadline = Instant::now() + timeout;
        let answer = loop {
            match next_answer(&self.sock, deadline, timeout) {
                Ok(Answer::Notify) => continue,
                Ok(Answer::Ready) => continue,
                Ok(Answer::Resp(resp)) => break Ok(resp),
                Err(e) => break Err(e),
            }
        };
        let wall = self.started.elapsed();
        let resp = match answer {
            Ok(resp) => resp,
            Err(e) => {
                kill_and_reap(&self.child);
                let tail = log_tail(&self.images_dir.join(DUMP_LOG));
                let err = CheckpointError::Rpc {
                    op: "lazy dump",
                    images_dir: self.images_dir.clone(),
                    message: format!("while serving pages: {e}; log: {tail}"),
                };
                tracing::warn!(error = %err, "lazy dump ended badly");
                return Err(err);
            }
        };
        reap(&self.child);
        if !resp.success {
            return Err(criu_failed("dump", &self.images_dir, &resp));
        }
        // No CRIU figures: its page server resets the dump's stats before serving and writes
        // its own (zeroes) over `stats-dump` at the end.
        tracing::info!(
            wall_ms = wall.as_millis() as u64,
            "lazy dump finished: every page served"
        );
        Ok(LazyDumpReport {
            ready_after: self.ready_after,
            wall,
        })
    }
}

impl Drop for LazyDump {
    fn drop(&mut self) {
        kill_and_reap(&self.child);
    }
}

impl LazyDumpAbort {
    /// Kills the page server's CRIU (its tasks are left stopped or resumed by the kernel's
    /// ptrace detach: resume them).
    pub fn abort(&self) {
        kill(&self.0);
    }
}

impl LazyPages {
    /// A handle that kills the daemon from elsewhere.
    pub fn abort_handle(&self) -> LazyPagesAbort {
        LazyPagesAbort(self.child.clone())
    }

    /// The daemon's exit status, if it exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    /// Waits until the daemon has every page (it exits 0). Fails when it exits otherwise, was
    /// aborted, or `timeout` passed (it is killed). On failure the restored tasks must be killed:
    /// their missing memory will never come.
    pub fn wait(&self, timeout: Duration) -> Result<LazyPagesReport, CheckpointError> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match lock(&self.child).try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) => {}
                Err(e) => break Err(format!("wait for the daemon: {e}")),
            }
            if Instant::now() >= deadline {
                kill_and_reap(&self.child);
                break Err(format!("not done within {timeout:?}"));
            }
            std::thread::sleep(POLL);
        };
        let wall = self.started.elapsed();
        let message = match status {
            Ok(status) if status.success() => {
                tracing::info!(wall_ms = wall.as_millis() as u64, "every lazy page arrived");
                return Ok(LazyPagesReport { wall });
            }
            Ok(status) => format!("daemon exited with {status}"),
            Err(m) => m,
        };
        let err = CheckpointError::Rpc {
            op: "lazy-pages",
            images_dir: self.images_dir.clone(),
            message: format!(
                "{message}; log: {}",
                log_tail(&self.images_dir.join(LAZY_PAGES_LOG))
            ),
        };
        tracing::warn!(error = %err, "lazy pages did not all arrive");
        Err(err)
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        kill_and_reap(&self.child);
    }
}

impl LazyPagesAbort {
    /// Kills the daemon: the restored tasks then miss their remaining pages.
    pub fn abort(&self) {
        kill(&self.0);
    }
}

/// What came from a lazy dump's CRIU.
enum Answer {
    /// A notification other than `status-ready` (acknowledged).
    Notify,
    /// `status-ready` (acknowledged).
    Ready,
    /// The answer to the dump request.
    Resp(rpc::Resp),
}

/// Sends the dump request and reads until `status-ready` (`None`) or an early answer.
fn wait_ready(
    sock: &OwnedFd,
    req: &rpc::Req,
    deadline: Instant,
    timeout: Duration,
) -> Result<Option<rpc::Resp>, rpc::SwrkError> {
    rpc::send(sock, &req.encode_to_vec())?;
    loop {
        match next_answer(sock, deadline, timeout)? {
            Answer::Notify => {}
            Answer::Ready => return Ok(None),
            Answer::Resp(resp) => return Ok(Some(resp)),
        }
    }
}

fn next_answer(
    sock: &OwnedFd,
    deadline: Instant,
    timeout: Duration,
) -> Result<Answer, rpc::SwrkError> {
    let resp = rpc::Resp::decode(rpc::recv(sock, deadline, timeout)?.as_slice())?;
    if resp.r#type != rpc::ReqType::Notify as i32 {
        if resp.r#type != rpc::ReqType::Dump as i32 && resp.success {
            return Err(rpc::SwrkError::Unexpected {
                want: rpc::ReqType::Dump,
                got: resp.r#type,
            });
        }
        return Ok(Answer::Resp(resp));
    }
    let script = resp
        .notify
        .as_ref()
        .and_then(|n| n.script.clone())
        .unwrap_or_default();
    tracing::debug!(%script, "criu notification");
    let ack = rpc::Req {
        r#type: rpc::ReqType::Notify as i32,
        notify_success: Some(true),
        ..Default::default()
    };
    rpc::send(sock, &ack.encode_to_vec())?;
    Ok(if script == "status-ready" {
        Answer::Ready
    } else {
        Answer::Notify
    })
}

/// Starts `criu swrk 3` with one end of a fresh socket pair at fd 3.
fn spawn_swrk(criu: &Path) -> Result<(Child, OwnedFd), rpc::SwrkError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| rpc::SwrkError::Socket(e.into()))?;
    let sources = [theirs.as_raw_fd()];
    let mut cmd = Command::new(criu);
    cmd.arg("swrk")
        .arg("3")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs in the forked child before exec; `place` only calls fcntl and dup2
    // (async-signal safe) on an fd the parent keeps open until `spawn` returns.
    unsafe {
        cmd.pre_exec(move || rpc::place(&sources));
    }
    let child = cmd.spawn().map_err(|source| rpc::SwrkError::Spawn {
        criu: criu.display().to_string(),
        source,
    })?;
    drop(theirs);
    Ok((child, ours))
}

/// Reads the one byte `--status-fd` gets when the daemon listens; EOF means it exited first.
fn wait_status_byte(fd: &OwnedFd, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            continue;
        }
        let mut byte = [0u8; 1];
        return match nix::unistd::read(fd.as_raw_fd(), &mut byte) {
            Ok(1) => Ok(()),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon exited before it listened",
            )),
            Err(e) => Err(e.into()),
        };
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    std::fs::write(path, bytes).map_err(|source| CheckpointError::Io {
        op: "write",
        path: path.to_owned(),
        source,
    })
}

fn lock(child: &Mutex<Child>) -> MutexGuard<'_, Child> {
    child
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn kill(child: &Mutex<Child>) {
    // `Child` knows whether it was reaped, so a recycled pid is never signalled.
    let mut c = lock(child);
    if let Ok(None) = c.try_wait() {
        let _ = c.kill();
    }
}

fn kill_and_reap(child: &Mutex<Child>) {
    kill(child);
    reap(child);
}

fn reap(child: &Mutex<Child>) {
    if let Err(e) = lock(child).wait() {
        tracing::warn!(error = %e, "cannot wait for criu");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn criu_nowhere() -> Criu {
        Criu::new(PathBuf::from("/nonexistent/criu"))
    }

    fn request(mode: DumpMode, port: u16) -> LazyDumpRequest {
        LazyDumpRequest {
            dump: DumpRequest::new(1, PathBuf::from("/tmp/berth-lazy-x"), mode),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            ready_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn lazy_dumps_that_cannot_work_are_refused_before_criu_runs() {
        let c = criu_nowhere();
        let bad =
            |r: LazyDumpRequest| matches!(c.lazy_dump(&r), Err(CheckpointError::InvalidRequest(_)));
        assert!(bad(request(DumpMode::LeaveRunning, 4000)));
        assert!(bad(request(DumpMode::LeaveStopped, 0)));
        let mut r = request(DumpMode::Kill, 4000);
        r.dump.pid = 0;
        assert!(bad(r));
        let mut r = request(DumpMode::Kill, 4000);
        r.dump.images_dir = PathBuf::from("relative");
        assert!(bad(r));
    }

    #[test]
    fn a_missing_criu_is_an_error_for_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let r = criu_nowhere().start_lazy_pages(&LazyPagesRequest {
            images_dir: dir.path().to_owned(),
            page_server: SocketAddr::from(([127, 0, 0, 1], 1)),
            ready_timeout: Duration::from_secs(1),
        });
        assert!(matches!(r, Err(CheckpointError::Rpc { .. })), "{r:?}");
    }

    #[test]
    fn the_lazy_flag_is_only_set_inside_restore_lazy() {
        assert!(!restoring_lazily());
        let dir = tempfile::tempdir().unwrap();
        let c = criu_nowhere();
        // A daemon that already exited is refused without touching the flag for good.
        let child = Command::new("true").spawn().unwrap();
        let pages = LazyPages {
            child: Arc::new(Mutex::new(child)),
            images_dir: dir.path().to_owned(),
            started: Instant::now(),
        };
        std::thread::sleep(Duration::from_millis(100));
        let req = RestoreRequest {
            images_dir: dir.path().to_owned(),
            rootfs: dir.path().to_owned(),
            netns: None,
            stdio: [None, None, None],
            cgroup_root: None,
            external_mounts: Vec::new(),
            tcp_established: false,
            timeout: Duration::from_secs(1),
        };
        assert!(c.restore_lazy(&req, &pages).is_err());
        assert!(!restoring_lazily());
    }
}
