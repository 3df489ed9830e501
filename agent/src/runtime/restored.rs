//! Containers CRIU restored on this node (the target end of a live migration). libcontainer did
//! not create them and has no state for them, so the runtime keeps a record of its own in the
//! container's state dir (where youki's would be) and answers `state` and `remove` for them from
//! the process and its cgroups.
//!
//! The record holds the init's pid and its start time (field 22 of `/proc/<pid>/stat`), so a pid
//! reused after the init died (an agent restarted meanwhile, the exit reaped by someone else) is
//! never taken for the container.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::RuntimeError;

/// The record's file name in the container's state dir.
pub(crate) const RECORD: &str = "berth-restored.json";

/// What the runtime knows of a restored container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Restored {
    pub pid: i32,
    pub start_time: u64,
}

impl Restored {
    /// The record for live process `pid`, or `None` if it is gone.
    pub fn of(pid: i32) -> Option<Self> {
        Some(Self {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// Whether the recorded process still runs (same pid, same start, not a zombie).
    pub fn alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let Some((state, start)) = parse_stat(&stat) else {
            return false;
        };
        state != 'Z' && state != 'X' && start == self.start_time
    }
}

/// Reads the record in `state_dir`, if there is one.
pub(crate) fn read(state_dir: &Path) -> Option<Restored> {
    let bytes = std::fs::read(state_dir.join(RECORD)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes the record into `state_dir` (created), through a temp file and a rename.
pub(crate) fn write(state_dir: &Path, r: &Restored) -> Result<(), RuntimeError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| RuntimeError::Io { op, path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(io("create state dir", state_dir))?;
    let path = state_dir.join(RECORD);
    let tmp = state_dir.join(format!("{RECORD}.tmp"));
    let bytes = serde_json::to_vec(r).map_err(|e| RuntimeError::Io {
        op: "encode restored record",
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&tmp, bytes).map_err(io("write restored record", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename restored record", &path))
}

fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, start)| start)
}

/// `(state, start time)` from a `/proc/<pid>/stat` line; comm may hold spaces and parentheses.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3) comes field 4; the start time is field 22.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000000 100 18446744073709551615";
        assert_eq!(parse_stat(line), Some(('S', 987_654)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1"), None);
    }

    #[test]
    fn our_own_process_is_alive_and_a_changed_start_is_not() {
        let me = Restored::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        let reused = Restored {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.alive());
        assert!(Restored::of(i32::MAX).is_none());
    }

    #[test]
    fn records_round_trip_and_absent_ones_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let r = Restored {
            pid: 42,
            start_time: 7,
        };
        write(&dir.path().join("ins-1"), &r).unwrap();
        assert_eq!(read(&dir.path().join("ins-1")), Some(r));
    }
}
