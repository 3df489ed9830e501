//! Reading an instance's logs: the last N lines, everything so far, or a stream that follows the
//! files through rotation like `tail -F`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::Stream;

use super::{parse_record, rotated, shim_holds, sibling, LogError, LogLine, LOCK_SUFFIX, LOG_FILE};

/// How often a follower looks for new output when it has caught up.
const POLL: Duration = Duration::from_millis(100);
/// Rotated files looked at, at most (the shim keeps fewer).
const MAX_ROTATED: u32 = 100;

/// Where a stream of lines starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowFrom {
    /// The oldest line still on disk.
    Beginning,
    /// The last `n` lines (0: only what comes next).
    Tail(usize),
}

/// The last `n` lines of the instance's logs in `dir` (oldest first), across rotated files.
pub fn tail(dir: &Path, n: usize) -> Result<Vec<LogLine>, LogError> {
    if !dir.is_dir() {
        return Err(LogError::NotFound {
            path: dir.to_owned(),
        });
    }
    let log = dir.join(LOG_FILE);
    let mut out = VecDeque::new();
    for path in std::iter::once(log.clone()).chain((1..=MAX_ROTATED).map(|i| rotated(&log, i))) {
        if out.len() >= n {
            break;
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == log => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(source) => {
                return Err(LogError::Io {
                    op: "read log",
                    path,
                    source,
                })
            }
        };
        prepend_last(&mut out, parse_all(&bytes), n);
    }
    Ok(out.into())
}

/// Everything on disk from `from` on, then ends (no following).
pub async fn lines(
    dir: PathBuf,
    from: FollowFrom,
) -> Result<impl Stream<Item = LogLine> + Send + 'static, LogError> {
    open_stream(dir, from, false).await
}

/// Lines from `from` on, then new lines as the shim writes them, across rotations (and restarts
/// of the container, which write the same file). Ends once the instance dir is gone and no shim
/// writes its log any more; a read error ends it too (logged).
pub async fn follow(
    dir: PathBuf,
    from: FollowFrom,
) -> Result<impl Stream<Item = LogLine> + Send + 'static, LogError> {
    open_stream(dir, from, true).await
}

async fn open_stream(
    dir: PathBuf,
    from: FollowFrom,
    follow: bool,
) -> Result<impl Stream<Item = LogLine> + Send + 'static, LogError> {
    let opened = tokio::task::spawn_blocking(move || Follower::open(dir, from))
        .await
        .map_err(|e| LogError::Io {
            op: "open logs",
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })?;
    let (follower, first) = opened?;
    let state = (Some(follower), VecDeque::from(first), false);
    Ok(futures::stream::unfold(
        state,
        move |(mut follower, mut queue, mut idle)| async move {
            loop {
                if let Some(line) = queue.pop_front() {
                    return Some((line, (follower, queue, false)));
                }
                let f = follower.take()?;
                if idle {
                    tokio::time::sleep(POLL).await;
                }
                let polled = tokio::task::spawn_blocking(move || {
                    let mut f = f;
                    let r = f.poll();
                    (f, r)
                })
                .await;
                let (f, result) = match polled {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, "log reader task failed");
                        return None;
                    }
                };
                match result {
                    Ok(Polled {
                        lines,
                        caught_up,
                        done,
                    }) => {
                        idle = lines.is_empty();
                        queue.extend(lines);
                        let finished = done || (caught_up && !follow);
                        if !finished {
                            follower = Some(f);
                        } else if queue.is_empty() {
                            return None;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading logs failed");
                        if queue.is_empty() {
                            return None;
                        }
                    }
                }
            }
        },
    ))
}

/// Reads the log files of one instance in order, remembering where it is.
struct Follower {
    dir: PathBuf,
    log: PathBuf,
    /// Rotated files still to read whole before `current` (oldest first).
    older: VecDeque<PathBuf>,
    /// The file being read and its inode.
    current: Option<(File, u64)>,
    /// Bytes after the last newline read (a record being written).
    pending: Vec<u8>,
    /// The lock file, opened while the dir existed, so the probe still works once it is removed.
    lock: Option<File>,
}

struct Polled {
    lines: Vec<LogLine>,
    /// Nothing more to read right now.
    caught_up: bool,
    /// Nothing more will ever come.
    done: bool,
}

impl Follower {
    /// Positions the reader per `from`; returns the lines already due (the tail).
    fn open(dir: PathBuf, from: FollowFrom) -> Result<(Self, Vec<LogLine>), LogError> {
        if !dir.is_dir() {
            return Err(LogError::NotFound { path: dir });
        }
        let log = dir.join(LOG_FILE);
        let lock = File::open(sibling(&log, LOCK_SUFFIX)).ok();
        let mut f = Follower {
            dir,
            log,
            older: VecDeque::new(),
            current: None,
            pending: Vec::new(),
            lock,
        };
        match from {
            FollowFrom::Beginning => {
                for i in 1..=MAX_ROTATED {
                    let p = rotated(&f.log, i);
                    if !p.exists() {
                        break;
                    }
                    f.older.push_front(p);
                }
                Ok((f, Vec::new()))
            }
            FollowFrom::Tail(n) => {
                // Read the current file to its end first, so the tail and what follows meet
                // exactly at that offset.
                let mut lines = Vec::new();
                if f.open_current()? {
                    lines = f.read_current()?;
                }
                let mut out = VecDeque::new();
                prepend_last(&mut out, lines, n);
                for i in 1..=MAX_ROTATED {
                    if out.len() >= n {
                        break;
                    }
                    let p = rotated(&f.log, i);
                    match std::fs::read(&p) {
                        Ok(bytes) => prepend_last(&mut out, parse_all(&bytes), n),
                        Err(_) => break,
                    }
                }
                Ok((f, out.into()))
            }
        }
    }

    /// Opens `log` as the current file; false when it does not exist (yet).
    fn open_current(&mut self) -> Result<bool, LogError> {
        match File::open(&self.log) {
            Ok(file) => {
                let ino = file
                    .metadata()
                    .map_err(LogError::io("stat log", &self.log))?
                    .ino();
                self.current = Some((file, ino));
                self.pending.clear();
                if self.lock.is_none() {
                    self.lock = File::open(sibling(&self.log, LOCK_SUFFIX)).ok();
                }
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(LogError::Io {
                op: "open log",
                path: self.log.clone(),
                source,
            }),
        }
    }

    /// Whole records read from the current file up to its end.
    fn read_current(&mut self) -> Result<Vec<LogLine>, LogError> {
        let Some((file, _)) = self.current.as_mut() else {
            return Ok(Vec::new());
        };
        let start = self.pending.len();
        file.read_to_end(&mut self.pending)
            .map_err(LogError::io("read log", &self.log))?;
        if self.pending.len() == start {
            return Ok(Vec::new());
        }
        let Some(last_nl) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let rest = self.pending.split_off(last_nl + 1);
        let lines = parse_all(&self.pending);
        self.pending = rest;
        Ok(lines)
    }

    fn poll(&mut self) -> Result<Polled, LogError> {
        let mut lines = Vec::new();
        // Whole older files first (reading from the beginning).
        while let Some(p) = self.older.pop_front() {
            match std::fs::read(&p) {
                Ok(bytes) => lines.extend(parse_all(&bytes)),
                // Rotated away meanwhile: its lines moved on to a file we read later, or were
                // dropped as the oldest.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(LogError::Io {
                        op: "read log",
                        path: p,
                        source,
                    })
                }
            }
        }
        if self.current.is_none() && !self.open_current()? {
            let done = !self.dir.exists() && !self.shim_alive();
            return Ok(Polled {
                lines,
                caught_up: true,
                done,
            });
        }
        loop {
            lines.extend(self.read_current()?);
            let ino = self.current.as_ref().map(|(_, ino)| *ino);
            let now = std::fs::metadata(&self.log).ok().map(|m| m.ino());
            if now.is_some() && now != ino {
                // Rotated: the shim wrote the old file to its end before renaming it, so what we
                // just read is all of it; go on with the new one.
                lines.extend(self.read_current()?);
                self.current = None;
                // Rotated more than once since we looked: the files between ours and the new
                // one are complete; read them whole first. (Lagging past `keep` loses lines.)
                if let Some(ours) = ino {
                    lines.extend(self.read_skipped(ours)?);
                }
                if self.open_current()? {
                    continue;
                }
            }
            let done = now.is_none() && !self.dir.exists() && !self.shim_alive() && {
                // The last writes may have landed after our read.
                lines.extend(self.read_current()?);
                true
            };
            return Ok(Polled {
                lines,
                caught_up: true,
                done,
            });
        }
    }

    /// The lines of `log.k-1` .. `log.1` when our old file (inode `ours`) is now `log.k`.
    fn read_skipped(&self, ours: u64) -> Result<Vec<LogLine>, LogError> {
        let ino_of = |i| {
            std::fs::metadata(rotated(&self.log, i))
                .ok()
                .map(|m| m.ino())
        };
        let Some(k) = (1..=MAX_ROTATED)
            .map_while(|i| ino_of(i).map(|ino| (i, ino)))
            .find_map(|(i, ino)| (ino == ours).then_some(i))
        else {
            return Ok(Vec::new());
        };
        let mut lines = Vec::new();
        for i in (1..k).rev() {
            let path = rotated(&self.log, i);
            match std::fs::read(&path) {
                Ok(bytes) => lines.extend(parse_all(&bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(LogError::Io {
                        op: "read log",
                        path,
                        source,
                    })
                }
            }
        }
        Ok(lines)
    }

    fn shim_alive(&self) -> bool {
        match &self.lock {
            Some(file) => file.try_clone().map(shim_holds).unwrap_or(false),
            None => false,
        }
    }
}

/// Puts the last `n - out.len()` of `lines` in front of `out`.
fn prepend_last(out: &mut VecDeque<LogLine>, lines: Vec<LogLine>, n: usize) {
    let want = n.saturating_sub(out.len());
    let skip = lines.len().saturating_sub(want);
    for line in lines.into_iter().skip(skip).rev() {
        out.push_front(line);
    }
}

fn parse_all(bytes: &[u8]) -> Vec<LogLine> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(parse_record)
        .collect()
}
