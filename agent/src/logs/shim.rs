//! The per-container log shim: started by the runtime before the container, it outlives the agent
//! and exits once the container's last process closed its stdout and stderr.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg, OFlag};

use super::{
    encode_record, now_timestamp, shim_running, sibling, LogError, RotatingWriter, Stream,
    DEFAULT_KEEP, DEFAULT_MAX_SIZE, LOCK_SUFFIX,
};

/// The first argument that makes the agent binary act as a log shim.
pub const SHIM_ARG: &str = "__log-shim";

/// Where the shim finds the read ends of the container's stdout and stderr pipes.
const STDOUT_FD: RawFd = 3;
const STDERR_FD: RawFd = 4;
/// One read.
const READ_SIZE: usize = 64 * 1024;
/// Output without a newline is held back this long for the rest of its line...
const PARTIAL_WAIT: Duration = Duration::from_millis(50);
/// ...and at most this much of it: a longer line is written as partial records.
const MAX_HELD: usize = 16 * 1024;
/// How long a new shim waits for the previous one of the same log (a container that was just
/// removed) to finish writing, so two never rotate the same files.
const PREVIOUS_WAIT: Duration = Duration::from_secs(2);

/// How to start log shims: the executable (the agent binary) and the rotation settings.
#[derive(Debug, Clone)]
pub struct LogShim {
    /// The agent binary (it dispatches [`SHIM_ARG`] to [`run_shim`]).
    pub exe: PathBuf,
    /// Rotate before the log would pass this many bytes.
    pub max_size: u64,
    /// Rotated files kept.
    pub keep: u32,
}

/// A started shim: the write ends the container gets as stdout and stderr, and the shim's pid (a
/// child of the caller, who reaps it).
#[derive(Debug)]
pub struct ShimPipes {
    /// Write end of the stdout pipe (close-on-exec).
    pub stdout: OwnedFd,
    /// Write end of the stderr pipe (close-on-exec).
    pub stderr: OwnedFd,
    /// The shim process.
    pub pid: i32,
}

impl LogShim {
    /// Shims run as `exe __log-shim`, with the default rotation (10 MiB, 3 files kept).
    pub fn new(exe: PathBuf) -> Self {
        Self {
            exe,
            max_size: DEFAULT_MAX_SIZE,
            keep: DEFAULT_KEEP,
        }
    }

    /// Starts a shim writing `log` (e.g. `<instance dir>/container.log`) and returns the pipes'
    /// write ends for the container. The shim is in its own session without a controlling
    /// terminal, so signals aimed at the agent's process group or terminal do not reach it.
    pub fn spawn(&self, log: &Path) -> Result<ShimPipes, LogError> {
        let started = Instant::now();
        while shim_running(log) {
            if started.elapsed() > PREVIOUS_WAIT {
                tracing::warn!(log = %log.display(), "an earlier log shim still writes this log");
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let pipe = || {
            nix::unistd::pipe2(OFlag::O_CLOEXEC)
                .map_err(|e| LogError::io("create pipe for", log)(std::io::Error::from(e)))
        };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let errors_path = sibling(log, ".shim-errors");
        let errors = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&errors_path)
            .map_err(LogError::io("open", &errors_path))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg(SHIM_ARG)
            .arg("--log")
            .arg(log)
            .arg("--max-size")
            .arg(self.max_size.to_string())
            .arg("--keep")
            .arg(self.keep.to_string())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errors);
        let fds = [out_r.as_raw_fd(), err_r.as_raw_fd()];
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (fcntl, dup2, close, setsid) on fds it was given.
        unsafe {
            cmd.pre_exec(move || {
                place_fds(fds)?;
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| LogError::Spawn {
            exe: self.exe.clone(),
            source,
        })?;
        // Our copies of the read ends close here: the shim holds the only ones.
        drop((out_r, err_r));
        let pid = child.id() as i32;
        tracing::debug!(pid, log = %log.display(), "log shim started");
        Ok(ShimPipes {
            stdout: out_w,
            stderr: err_w,
            pid,
        })
    }
}

/// In a forked child: puts `fds` at 3 and 4 (not close-on-exec). They are first copied above 9 so
/// that moving one never overwrites the other.
///
/// Only async-signal-safe calls: this runs between fork and exec.
pub(crate) fn place_fds(fds: [RawFd; 2]) -> std::io::Result<()> {
    let mut high = [0; 2];
    for (h, fd) in high.iter_mut().zip(fds) {
        // SAFETY: fcntl(F_DUPFD) on an fd we own; async-signal-safe.
        *h = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        if *h < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (h, target) in high.into_iter().zip([STDOUT_FD, STDERR_FD]) {
        // SAFETY: dup2 onto a fixed number; the result (unlike `h`) is not close-on-exec.
        if unsafe { libc::dup2(h, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Takes ownership of the fds that [`place_fds`] put at 3 and 4 in this process.
pub(crate) fn take_placed_fds() -> Result<(OwnedFd, OwnedFd), LogError> {
    let take = |fd: RawFd| {
        // Refuse a number that is not open rather than own (and later close) a stranger's fd.
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
            .map_err(|e| LogError::Usage(format!("fd {fd} is not open: {e}")))?;
        // SAFETY: fd is open (checked above) and was put there by our parent for us alone;
        // nothing else in this process refers to it.
        Ok::<_, LogError>(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    Ok((take(STDOUT_FD)?, take(STDERR_FD)?))
}

struct Options {
    log: PathBuf,
    max_size: u64,
    keep: u32,
}

fn parse_args(args: &[OsString]) -> Result<Options, LogError> {
    let mut log = None;
    let mut max_size = DEFAULT_MAX_SIZE;
    let mut keep = DEFAULT_KEEP;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| LogError::Usage(format!("{name} needs a value")))
        };
        match flag.to_str() {
            Some("--log") => log = Some(PathBuf::from(value("--log")?)),
            Some("--max-size") => {
                let v = value("--max-size")?.to_string_lossy().into_owned();
                max_size = v
                    .parse::<u64>()
                    .or_else(|_| berth_proto::units::parse_memory(&v))
                    .map_err(|_| LogError::Usage(format!("--max-size {v:?}: not a size")))?;
            }
            Some("--keep") => {
                let v = value("--keep")?.to_string_lossy().into_owned();
                keep = v
                    .parse()
                    .map_err(|_| LogError::Usage(format!("--keep {v:?}: not a count")))?;
            }
            _ => return Err(LogError::Usage(format!("unexpected argument {flag:?}"))),
        }
    }
    let log = log.ok_or_else(|| LogError::Usage("--log PATH is required".into()))?;
    Ok(Options {
        log,
        max_size,
        keep,
    })
}

/// The shim's whole life: `__log-shim --log PATH [--max-size BYTES] [--keep N]`, the container's
/// stdout and stderr read ends at fds 3 and 4. Copies both into the rotated log until both are
/// closed, then exits. Returns the process exit code (0 after a clean EOF, 2 for bad usage).
pub fn run_shim(args: &[OsString]) -> i32 {
    let opts = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "usage: {SHIM_ARG} --log PATH [--max-size BYTES] [--keep N]  (pipes at fds 3, 4)"
            );
            return 2;
        }
    };
    let (stdout, stderr) = match take_placed_fds() {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    // Held (shared) until exit: readers take it exclusively to learn that no shim writes any more.
    let _lock = match lock(&opts.log) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("{e}");
            None
        }
    };
    match pump(&opts, [File::from(stdout), File::from(stderr)]) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn lock(log: &Path) -> Result<Flock<File>, LogError> {
    let path = sibling(log, LOCK_SUFFIX);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o640)
        .open(&path)
        .map_err(LogError::io("open", &path))?;
    // Blocking: a reader holds it exclusively only for the instant of its probe.
    Flock::lock(file, FlockArg::LockShared)
        .map_err(|(_, e)| LogError::io("lock", &path)(std::io::Error::from(e)))
}

/// Copies both pipes into the log until both reach EOF. Write failures are reported and the data
/// dropped, never a reason to stop reading: a container must not block on a full pipe.
fn pump(opts: &Options, mut pipes: [File; 2]) -> Result<(), LogError> {
    let mut open_before = [true; 2];
    let mut writer = loop {
        match RotatingWriter::open(&opts.log, opts.max_size, opts.keep) {
            Ok(w) => break w,
            Err(e) => {
                eprintln!("{e}");
                // Nothing to write to: drain so the container keeps running, retry after a while.
                let deadline = Instant::now() + Duration::from_secs(1);
                let mut sink = vec![0; READ_SIZE];
                while Instant::now() < deadline {
                    let ready =
                        wait_readable(&pipes, &open_before, Some(Duration::from_millis(200)))?;
                    for i in 0..2 {
                        if ready[i] && matches!(pipes[i].read(&mut sink), Ok(0)) {
                            open_before[i] = false;
                        }
                    }
                    if !open_before.iter().any(|o| *o) {
                        return Ok(());
                    }
                }
            }
        }
    };
    let streams = [Stream::Stdout, Stream::Stderr];
    let mut open = open_before;
    let mut buf = vec![0u8; READ_SIZE];
    // Output after the last newline, per stream, held back briefly: programs often write a line
    // in several pieces, and each piece must not become a record of its own.
    let mut pending: [Vec<u8>; 2] = Default::default();
    let mut pending_since: Option<Instant> = None;
    while open.iter().any(|o| *o) {
        let timeout = pending_since.map(|t| PARTIAL_WAIT.saturating_sub(t.elapsed()));
        let ready = wait_readable(&pipes, &open, timeout)?;
        if ready == [false; 2] {
            // Nothing more came: what is held back goes out as partial lines.
            for (i, held) in pending.iter_mut().enumerate() {
                if !held.is_empty() {
                    emit(&mut writer, streams[i], true, held);
                    held.clear();
                }
            }
            pending_since = None;
        }
        for i in 0..2 {
            if !open[i] || !ready[i] {
                continue;
            }
            match pipes[i].read(&mut buf) {
                Ok(0) => {
                    open[i] = false;
                    // Nothing follows: the last piece is a whole line.
                    if !pending[i].is_empty() {
                        emit(&mut writer, streams[i], false, &pending[i]);
                        pending[i].clear();
                    }
                }
                Ok(n) => {
                    let held = &mut pending[i];
                    held.extend_from_slice(&buf[..n]);
                    if let Some(last) = held.iter().rposition(|&b| b == b'\n') {
                        for line in held[..last].split(|&b| b == b'\n') {
                            emit(&mut writer, streams[i], false, line);
                        }
                        held.drain(..=last);
                    }
                    if held.len() >= MAX_HELD {
                        emit(&mut writer, streams[i], true, held);
                        held.clear();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    eprintln!("read {}: {e}", streams[i].as_str());
                    open[i] = false;
                }
            }
        }
        if pending.iter().all(Vec::is_empty) {
            pending_since = None;
        } else {
            pending_since.get_or_insert_with(Instant::now);
        }
        if let Err(e) = writer.flush() {
            eprintln!("{e}");
        }
    }
    writer.flush()
}

/// Queues one record; a failure is reported and the record dropped (see `pump`).
fn emit(writer: &mut RotatingWriter, stream: Stream, partial: bool, content: &[u8]) {
    let mut record = Vec::with_capacity(content.len() + 48);
    encode_record(&mut record, &now_timestamp(), stream, partial, content);
    if let Err(e) = writer.push(&record) {
        eprintln!("{e}");
    }
}

/// Blocks until one of the open pipes is readable or closed (or `timeout` passes); returns which.
fn wait_readable(
    pipes: &[File; 2],
    open: &[bool; 2],
    timeout: Option<Duration>,
) -> Result<[bool; 2], LogError> {
    let mut fds: Vec<libc::pollfd> = pipes
        .iter()
        .zip(open.iter())
        .map(|(p, &o)| libc::pollfd {
            // poll ignores negative fds: closed streams keep their slot.
            fd: if o { p.as_raw_fd() } else { -1 },
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return Ok([fds[0].revents != 0, fds[1].revents != 0]);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(LogError::Io {
                op: "poll",
                path: PathBuf::from("container pipes"),
                source: e,
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let o = parse_args(&args(&["--log", "/x/container.log", "--max-size", "64MiB"])).unwrap();
        assert_eq!(o.log, PathBuf::from("/x/container.log"));
        assert_eq!(o.max_size, 64 << 20);
        assert_eq!(o.keep, DEFAULT_KEEP);
        assert!(parse_args(&args(&["--max-size", "5"])).is_err());
        assert!(parse_args(&args(&["--log"])).is_err());
        assert!(parse_args(&args(&["--log", "x", "--keep", "-1"])).is_err());
        assert!(parse_args(&args(&["--bogus"])).is_err());
    }
}
