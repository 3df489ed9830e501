//! The cgroup directories berth's containers live in, found generically on every hierarchy.
//!
//! libcgroups places a container at `<mount>/<parent>/<id>` in each v1 controller hierarchy
//! (hybrid and legacy hosts) or under the single cgroup2 mount (unified hosts). Rather than
//! guessing which applies, these helpers look at every cgroup and cgroup2 mount of this process,
//! so cleanup and tests work the same on both kinds of host.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::RuntimeError;

/// How long a container's cgroup directory may stay busy (processes still exiting) on removal.
const RMDIR_TIMEOUT: Duration = Duration::from_secs(5);

/// Mount points of every cgroup (v1) and cgroup2 hierarchy visible to this process.
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mount_points(&info))
}

fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in mountinfo.lines() {
        // Fields: id parent maj:min root mountpoint options [optional...] - fstype source super.
        let mut halves = line.splitn(2, " - ");
        let (Some(pre), Some(post)) = (halves.next(), halves.next()) else {
            continue;
        };
        let fstype = post.split_whitespace().next().unwrap_or_default();
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let Some(mount_point) = pre.split_whitespace().nth(4) else {
            continue;
        };
        let p = PathBuf::from(mount_point);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Existing directories of the cgroup `/<parent>/<id>` across all hierarchies.
pub fn container_dirs(parent: &str, id: &str) -> Vec<PathBuf> {
    existing_under(&Path::new(parent).join(id))
}

/// Existing directories of the cgroup `/<parent>` across all hierarchies.
pub fn parent_dirs(parent: &str) -> Vec<PathBuf> {
    existing_under(Path::new(parent))
}

fn existing_under(rel: &Path) -> Vec<PathBuf> {
    mount_points()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.join(rel))
        .filter(|p| p.is_dir())
        .collect()
}

/// Pids listed in the `cgroup.procs` of `dirs` (deduplicated).
pub fn pids(dirs: &[PathBuf]) -> Vec<i32> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if !out.contains(&pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// Removes what is left of container `id`'s cgroups (killing any process still in them), then
/// the parent's directories that became empty. Directories still holding other containers stay.
pub(crate) fn remove_container(parent: &str, id: &str) -> Result<(), RuntimeError> {
    let dirs = container_dirs(parent, id);
    let deadline = Instant::now() + RMDIR_TIMEOUT;
    for dir in &dirs {
        loop {
            for pid in pids(std::slice::from_ref(dir)) {
                // Only processes inside this container's own cgroup are signalled.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline && is_busy(&e) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(RuntimeError::Io {
                        op: "remove cgroup",
                        path: dir.clone(),
                        source,
                    })
                }
            }
        }
    }
    remove_parent_if_empty(parent);
    Ok(())
}

/// Removes `/<parent>` in every hierarchy where it has no child cgroup and no process left.
pub(crate) fn remove_parent_if_empty(parent: &str) {
    for dir in parent_dirs(parent) {
        match std::fs::remove_dir(&dir) {
            Ok(()) => tracing::debug!(path = %dir.display(), "removed empty cgroup parent"),
            // Busy or not empty: another container of this node still lives there.
            Err(e) if is_busy(&e) || e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove cgroup parent")
            }
        }
    }
}

fn is_busy(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBUSY) | Some(libc::ENOTEMPTY) | Some(libc::EEXIST)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
mod tests {
    use super::*;

    #[test]
    fn finds_v1_and_v2_mounts() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:5 - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /proc rw - proc proc rw
";
        assert_eq!(
            parse_mount_points(info),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/sys/fs/cgroup/memory"),
                PathBuf::from("/sys/fs/cgroup/unified"),
            ]
        );
    }

    #[test]
    fn finds_pure_v2_mount() {
        let info = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_mount_points(info),
            vec![PathBuf::from("/sys/fs/cgroup")]
        );
    }
}
