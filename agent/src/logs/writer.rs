//! The size-rotated log file the shim writes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{rotated, LogError};

/// Appends records to `path`, rotating it to `path.1` (and older ones up to `path.keep`, the oldest
/// dropped) before a record would push it past `max_size`. A record is never split across files.
#[derive(Debug)]
pub struct RotatingWriter {
    path: PathBuf,
    max_size: u64,
    keep: u32,
    file: Option<File>,
    size: u64,
    pending: Vec<u8>,
}

impl RotatingWriter {
    /// Opens (or creates) `path` for appending; an existing file's size counts towards rotation.
    pub fn open(path: &Path, max_size: u64, keep: u32) -> Result<Self, LogError> {
        let mut w = Self {
            path: path.to_owned(),
            max_size: max_size.max(1),
            keep,
            file: None,
            size: 0,
            pending: Vec::new(),
        };
        w.reopen()?;
        Ok(w)
    }

    /// Queues one whole record (with its newline); writes what is queued first, and rotates, when
    /// the record would not fit in the current file.
    pub fn push(&mut self, record: &[u8]) -> Result<(), LogError> {
        let queued = self.size + self.pending.len() as u64;
        if queued > 0 && queued + record.len() as u64 > self.max_size {
            self.flush()?;
            self.rotate()?;
        }
        self.pending.extend_from_slice(record);
        Ok(())
    }

    /// Writes the queued records (one `write` for a whole batch, so readers see whole lines).
    pub fn flush(&mut self) -> Result<(), LogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            // An earlier failure (disk full, dir briefly missing): try again rather than give up.
            self.reopen()?;
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let result = file.write_all(&self.pending);
        // On failure the batch is dropped: the shim must keep draining the pipes, or the
        // container would block on a full pipe.
        let written = self.pending.len() as u64;
        self.pending.clear();
        match result {
            Ok(()) => {
                self.size += written;
                Ok(())
            }
            Err(source) => {
                self.file = None;
                Err(LogError::Io {
                    op: "write log",
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    /// Renames `path.{n-1}` to `path.{n}` down to `path` → `path.1`, then starts a new `path`.
    fn rotate(&mut self) -> Result<(), LogError> {
        self.file = None;
        if self.keep == 0 {
            remove_if_exists(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                rename_if_exists(&rotated(&self.path, n), &rotated(&self.path, n + 1))?;
            }
            rename_if_exists(&self.path, &rotated(&self.path, 1))?;
        }
        self.reopen()
    }

    fn reopen(&mut self) -> Result<(), LogError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&self.path)
            .map_err(LogError::io("open log", &self.path))?;
        self.size = file
            .metadata()
            .map_err(LogError::io("stat log", &self.path))?
            .len();
        self.file = Some(file);
        Ok(())
    }
}

fn rename_if_exists(from: &Path, to: &Path) -> Result<(), LogError> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LogError::Io {
            op: "rotate log",
            path: from.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), LogError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LogError::Io {
            op: "remove log",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}
