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

/// Mount points of every cgroup (v1) and cgroup2 hierarchy visible to this process: one per
/// hierarchy, where it is mounted first (the host's). Other mounts of a hierarchy come and go:
/// CRIU mounts each one again in a "cgroup yard" of its own for every restore, and creating a
/// cgroup through a yard that is being unmounted fails.
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mount_points(&info))
}

fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    // A hierarchy is one superblock: its device number names it.
    let mut seen: Vec<&str> = Vec::new();
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
        let fields: Vec<&str> = pre.split_whitespace().collect();
        let (Some(device), Some(root), Some(mount_point)) =
            (fields.get(2), fields.get(3), fields.get(4))
        else {
            continue;
        };
        // A bind mount of a cgroup below the root is no place to make cgroups from the root.
        if *root != "/" || seen.contains(device) {
            continue;
        }
        seen.push(device);
        let p = PathBuf::from(mount_point);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Mount point of the cgroup2 hierarchy (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified`
/// on hybrid ones), where cgroup-attached eBPF programs live.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    parse_cgroup2_mount(&info).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 hierarchy is mounted (needed for service routing)",
        )
    })
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Whether libcgroups manages containers in the cgroup2 hierarchy itself (a unified host). On hybrid
/// hosts it uses the v1 hierarchies only, and berth adds each container to cgroup2 on its own.
pub fn is_unified(cgroup2: &Path) -> bool {
    cgroup2 == Path::new("/sys/fs/cgroup")
}

/// Puts `pid` into the cgroup2 group `/<parent>/<id>` (created if missing) so the eBPF programs
/// attached to `/<parent>` see its sockets. Only needed on hybrid hosts; children forked later
/// inherit it.
pub fn join_cgroup2(cgroup2: &Path, parent: &str, id: &str, pid: i32) -> Result<(), RuntimeError> {
    let dir = cgroup2.join(parent).join(id);
    let err = |op: &'static str, e: io::Error| RuntimeError::Io {
        op,
        path: dir.clone(),
        source: e,
    };
    std::fs::create_dir_all(&dir).map_err(|e| err("create cgroup2 group", e))?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
        .map_err(|e| err("join cgroup2 group", e))
}

/// Sets container `id`'s cpu quota and memory limit in whichever of its cgroup directories has
/// the controller (v1 `cpu`/`memory` hierarchies, or a v2 group with those controllers): what
/// libcontainer does at create, for containers it did not create (restored by CRIU, which moves
/// the tasks in but cannot write the limits on hybrid hosts). 0 leaves a resource unlimited. Fails
/// when a limit is asked for and no directory takes it.
pub fn set_limits(
    parent: &str,
    id: &str,
    cpu_millis: u64,
    memory_bytes: u64,
) -> Result<(), RuntimeError> {
    let dirs = container_dirs(parent, id);
    let period = super::CPU_PERIOD_US;
    let quota = cpu_millis.saturating_mul(period) / 1000;
    let mut wrote_cpu = cpu_millis == 0;
    let mut wrote_memory = memory_bytes == 0;
    for dir in &dirs {
        let write = |name: &str, value: String| -> Result<bool, RuntimeError> {
            let file = dir.join(name);
            if !file.exists() {
                return Ok(false);
            }
            std::fs::write(&file, value)
                .map(|()| true)
                .map_err(|source| RuntimeError::Io {
                    op: "set cgroup limit",
                    path: file,
                    source,
                })
        };
        if cpu_millis > 0 {
            // v1: the period first, so the quota is never judged against the old one.
            if write("cpu.cfs_period_us", period.to_string())? {
                wrote_cpu |= write("cpu.cfs_quota_us", quota.to_string())?;
            }
            wrote_cpu |= write("cpu.max", format!("{quota} {period}"))?;
        }
        if memory_bytes > 0 {
            wrote_memory |= write("memory.limit_in_bytes", memory_bytes.to_string())?;
            wrote_memory |= write("memory.max", memory_bytes.to_string())?;
        }
    }
    let missing = match (wrote_cpu, wrote_memory) {
        (true, true) => return Ok(()),
        (false, _) => "cpu",
        (_, false) => "memory",
    };
    Err(RuntimeError::Io {
        op: "set cgroup limit",
        path: Path::new(parent).join(id),
        source: io::Error::new(
            io::ErrorKind::NotFound,
            format!("no {missing} controller in any of the container's cgroups"),
        ),
    })
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

/// Removes `/<parent>` in every hierarchy where it has no child cgroup and no process left, except
/// in the cgroup2 hierarchy: there the parent carries the node's eBPF programs (service routing)
/// and belongs to the data plane, which removes it when it unloads.
pub(crate) fn remove_parent_if_empty(parent: &str) {
    let cgroup2 = cgroup2_mount().ok();
    for dir in parent_dirs(parent) {
        if cgroup2.as_deref().is_some_and(|m| dir.parent() == Some(m)) {
            continue;
        }
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
mod cgroup2_tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      40 31 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let found = parse_cgroup2_mount(hybrid).unwrap();
        assert_eq!(found, PathBuf::from("/sys/fs/cgroup/unified"));
        assert!(!is_unified(&found));
        let unified = "31 23 0:28 / /sys/fs/cgroup rw,relatime shared:4 - cgroup2 cgroup2 rw\n";
        let found = parse_cgroup2_mount(unified).unwrap();
        assert!(is_unified(&found));
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
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
90 23 0:32 / /var/lib/x/images/.criu.cgyard.Ab12/memory rw - cgroup none rw,memory
91 23 0:38 / /var/lib/x/images/.criu.cgyard.Ab12/unified rw - cgroup2 none rw
92 23 0:29 /berth-n1/ins-1 /run/somewhere rw - cgroup cgroup rw,cpu
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
