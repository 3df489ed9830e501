//! Container logs: a per-container log shim, size-rotated files, and readers that tail and follow them.
//!
//! Like Podman's `conmon`, a tiny process sits between the container and its log file: the agent
//! binary re-executed as `berth-agent __log-shim` ([`run_shim`]). It holds the read ends of two
//! pipes (the container's stdout and stderr, at fds 3 and 4), so the container itself has no host
//! file open (CRIU can checkpoint pipes, not host files), and it runs in its own session, so killing
//! or restarting the agent loses no output. Two pipes rather than one keep each line's stream; the
//! order between stdout and stderr is only as exact as the shim's reads.
//!
//! Files, in the instance dir: `container.log` (the one being written) and `container.log.1` ..
//! `container.log.N` (older, `.N` oldest), rotated by size; `container.log.lock`, which every live
//! shim holds a shared `flock` on (a reader learns that no shim writes any more by taking it
//! exclusively); `container.log.shim-errors`, the shim's own complaints.
//!
//! Each record is one line in the CRI format kubelet and crictl use:
//! `2026-11-26T10:00:00.123456789Z stdout F text` (`F` a full line, `P` a partial one: output that
//! had no newline yet when it was read, or a line longer than one read).

mod reader;
mod shim;
mod writer;

use std::path::PathBuf;

pub use reader::{follow, lines, tail, FollowFrom};
pub(crate) use shim::{place_fds, take_placed_fds};
pub use shim::{run_shim, LogShim, ShimPipes, SHIM_ARG};
pub use writer::RotatingWriter;

/// Name of the log file being written, in the instance dir.
pub const LOG_FILE: &str = "container.log";
/// Default size at which the log rotates.
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024;
/// Default number of rotated files kept (`container.log.1` .. `.3`).
pub const DEFAULT_KEEP: u32 = 3;

/// Which of the container's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// File descriptor 1.
    Stdout,
    /// File descriptor 2.
    Stderr,
}

impl Stream {
    /// The tag written in the log file.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One record of a container's log, as readers return it (and as the agent's API sends it, one
/// JSON object per line).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    /// When the shim read it: RFC 3339, UTC, nanoseconds.
    pub time: String,
    /// stdout or stderr.
    pub stream: Stream,
    /// The text, without its newline (invalid UTF-8 replaced).
    pub line: String,
    /// The output had no newline here: the next record of this stream continues it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// Errors of the log shim, writer and readers.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file or pipe operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The instance dir does not exist.
    #[error("no logs at {path}: no such instance dir")]
    NotFound {
        /// The missing dir.
        path: PathBuf,
    },
    /// The shim could not be started.
    #[error("start log shim {exe}: {source}")]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The shim's command line is wrong.
    #[error("log shim usage: {0}")]
    Usage(String),
}

impl LogError {
    fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LogError {
        let path = path.into();
        move |source| LogError::Io { op, path, source }
    }
}

/// The current time as written in records: fixed width, so the files sort and align.
pub fn now_timestamp() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        // Formatting a UTC time with a fixed description only fails for years past 9999.
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000000000Z".to_owned())
}

/// Appends one record (`<time> <stream> <F|P> <content>\n`) to `buf`. `content` must not contain
/// a newline.
pub fn encode_record(buf: &mut Vec<u8>, time: &str, stream: Stream, partial: bool, content: &[u8]) {
    buf.extend_from_slice(time.as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(stream.as_str().as_bytes());
    buf.extend_from_slice(if partial { b" P " } else { b" F " });
    buf.extend_from_slice(content);
    buf.push(b'\n');
}

/// Parses one record (without its newline); `None` for anything that is not one.
pub fn parse_record(raw: &[u8]) -> Option<LogLine> {
    let mut parts = raw.splitn(4, |&b| b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match parts.next()? {
        b"F" => false,
        b"P" => true,
        _ => return None,
    };
    let line = parts.next().unwrap_or_default();
    if time.is_empty() {
        return None;
    }
    Some(LogLine {
        time: time.to_owned(),
        stream,
        line: String::from_utf8_lossy(line).into_owned(),
        partial,
    })
}

/// The path of rotated file `n` (1 = newest) of `log`.
fn rotated(log: &std::path::Path, n: u32) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// `log` with a suffix (`.lock`, `.shim-errors`).
fn sibling(log: &std::path::Path, suffix: &str) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Whether a shim still holds `log`'s lock (writes, or may still write, to it).
pub fn shim_running(log: &std::path::Path) -> bool {
    let Ok(file) = std::fs::File::open(sibling(log, LOCK_SUFFIX)) else {
        return false;
    };
    shim_holds(file)
}

fn shim_holds(file: std::fs::File) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    // Exclusive succeeds only when no shim holds its shared lock; dropping it unlocks at once.
    Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err()
}

const LOCK_SUFFIX: &str = ".lock";

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut buf = Vec::new();
        let t = now_timestamp();
        assert_eq!(t.len(), "2026-11-26T10:00:00.123456789Z".len(), "{t}");
        encode_record(&mut buf, &t, Stream::Stderr, false, b"hello world");
        encode_record(&mut buf, &t, Stream::Stdout, true, b"");
        let text = String::from_utf8(buf.clone()).unwrap();
        assert_eq!(text, format!("{t} stderr F hello world\n{t} stdout P \n"));
        let lines: Vec<_> = buf
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| parse_record(l).unwrap())
            .collect();
        assert_eq!(lines[0].line, "hello world");
        assert_eq!(lines[0].stream, Stream::Stderr);
        assert!(!lines[0].partial);
        assert_eq!(lines[1].line, "");
        assert!(lines[1].partial);
        assert_eq!(parse_record(b"garbage"), None);
        assert_eq!(parse_record(b"t stdin F x"), None);
        let json = serde_json::to_string(&lines[0]).unwrap();
        assert_eq!(
            json,
            format!(r#"{{"time":"{t}","stream":"stderr","line":"hello world"}}"#)
        );
    }
}
