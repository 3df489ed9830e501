//! Reads one instance's CPU and memory use from its cgroup, at scrape time.
//!
//! Containers live at `<mount>/<parent>/<id>` in every hierarchy (see `runtime::cgroup`). On v1
//! and hybrid hosts the accounting that libcgroups configures is in the v1 `cpuacct` and `memory`
//! hierarchies; on unified hosts it is the cgroup2 files. The v1 files win when both exist: on a
//! hybrid host the cgroup2 group has no memory controller and only joined the init after create.

use std::path::{Path, PathBuf};

/// v1 reports "no limit" as `PAGE_COUNTER_MAX` pages in bytes (just under 2^63); anything from
/// 2^62 up is no real limit.
const V1_UNLIMITED: u64 = 1 << 62;

/// Where the hierarchies berth reads are mounted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupReader {
    /// Mount point of the v1 hierarchy carrying `cpuacct` (often `/sys/fs/cgroup/cpu,cpuacct`).
    pub cpuacct_v1: Option<PathBuf>,
    /// Mount point of the v1 `memory` hierarchy.
    pub memory_v1: Option<PathBuf>,
    /// Mount point of the cgroup2 hierarchy.
    pub unified: Option<PathBuf>,
}

/// What one cgroup used; `None` where the file is missing or unreadable (a cgroup that went away
/// between listing and reading is normal during a scrape).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CgroupUsage {
    /// CPU time used since the cgroup was created, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Memory in use (page cache included), in bytes.
    pub memory_bytes: Option<u64>,
    /// The enforced memory limit in bytes; `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
}

impl CgroupReader {
    /// The hierarchies mounted in this process's mount namespace.
    pub fn from_system() -> std::io::Result<Self> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(Self::from_mountinfo(&info))
    }

    /// The hierarchies listed in a `/proc/<pid>/mountinfo` text (the first mount of each wins).
    pub fn from_mountinfo(mountinfo: &str) -> Self {
        let mut out = Self::default();
        for line in mountinfo.lines() {
            // Fields: id parent maj:min root mountpoint options [optional...] - fstype source super.
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let mut post = post.split_whitespace();
            let (Some(fstype), Some(_source), Some(options)) =
                (post.next(), post.next(), post.next())
            else {
                continue;
            };
            let Some(mount_point) = pre.split_whitespace().nth(4).map(PathBuf::from) else {
                continue;
            };
            match fstype {
                "cgroup2" => {
                    out.unified.get_or_insert(mount_point);
                }
                "cgroup" => {
                    let has = |c: &str| options.split(',').any(|o| o == c);
                    if has("cpuacct") {
                        out.cpuacct_v1.get_or_insert(mount_point.clone());
                    }
                    if has("memory") {
                        out.memory_v1.get_or_insert(mount_point);
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Usage of the cgroup `/<parent>/<id>`. Names with a path separator or `..` read nothing.
    pub fn read(&self, parent: &str, id: &str) -> CgroupUsage {
        if !is_plain_name(parent) || !is_plain_name(id) {
            return CgroupUsage::default();
        }
        let dir = |mount: &Option<PathBuf>| mount.as_ref().map(|m| m.join(parent).join(id));
        let (cpuacct, memory, unified) = (
            dir(&self.cpuacct_v1),
            dir(&self.memory_v1),
            dir(&self.unified),
        );

        let cpu_seconds = cpuacct
            .as_deref()
            .and_then(|d| read_u64(&d.join("cpuacct.usage")))
            .map(|ns| ns as f64 / 1e9)
            .or_else(|| {
                unified
                    .as_deref()
                    .and_then(|d| read_stat_field(&d.join("cpu.stat"), "usage_usec"))
                    .map(|us| us as f64 / 1e6)
            });

        let v1_memory = memory
            .as_deref()
            .filter(|d| d.join("memory.usage_in_bytes").exists());
        let (memory_bytes, memory_limit_bytes) = match (v1_memory, unified.as_deref()) {
            (Some(d), _) => (
                read_u64(&d.join("memory.usage_in_bytes")),
                read_u64(&d.join("memory.limit_in_bytes")).filter(|l| *l < V1_UNLIMITED),
            ),
            // "max" does not parse as a number: no limit.
            (None, Some(d)) => (
                read_u64(&d.join("memory.current")),
                read_u64(&d.join("memory.max")),
            ),
            (None, None) => (None, None),
        };

        CgroupUsage {
            cpu_seconds,
            memory_bytes,
            memory_limit_bytes,
        }
    }
}

fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && s != "." && s != ".."
}

fn read_u64(path: &Path) -> Option<u64> {
    match std::fs::read_to_string(path) {
        Ok(s) => s.trim().parse().ok(),
        Err(e) => {
            tracing::trace!(path = %path.display(), error = %e, "cgroup file not readable");
            None
        }
    }
}

/// A `key value` line of a flat-keyed cgroup2 file such as `cpu.stat`.
fn read_stat_field(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_hierarchies() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:6 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:5 - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/net_cls rw,relatime - cgroup cgroup rw,net_cls
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";
        let r = CgroupReader::from_mountinfo(info);
        assert_eq!(
            r.cpuacct_v1.as_deref(),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(
            r.memory_v1.as_deref(),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            r.unified.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_unified_hierarchy() {
        let r = CgroupReader::from_mountinfo(
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        assert_eq!(
            r,
            CgroupReader {
                unified: Some("/sys/fs/cgroup".into()),
                ..Default::default()
            }
        );
    }

    fn write(dir: &Path, file: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(file), text).unwrap();
    }

    #[test]
    fn reads_v1_files_before_v2() {
        let t = tempfile::tempdir().unwrap();
        let r = CgroupReader {
            cpuacct_v1: Some(t.path().join("cpuacct")),
            memory_v1: Some(t.path().join("memory")),
            unified: Some(t.path().join("unified")),
        };
        let v1cpu = t.path().join("cpuacct/berth-n/ins-1");
        let v1mem = t.path().join("memory/berth-n/ins-1");
        let v2 = t.path().join("unified/berth-n/ins-1");
        write(&v1cpu, "cpuacct.usage", "2500000000\n");
        write(&v1mem, "memory.usage_in_bytes", "4096\n");
        write(&v1mem, "memory.limit_in_bytes", "67108864\n");
        write(&v2, "cpu.stat", "usage_usec 7000000\nuser_usec 1\n");
        write(&v2, "memory.current", "1\n");
        let u = r.read("berth-n", "ins-1");
        assert_eq!(u.cpu_seconds, Some(2.5));
        assert_eq!(u.memory_bytes, Some(4096));
        assert_eq!(u.memory_limit_bytes, Some(64 << 20));

        // Unlimited in v1 is no limit at all.
        write(&v1mem, "memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(r.read("berth-n", "ins-1").memory_limit_bytes, None);

        // Without the v1 files, the v2 ones answer.
        std::fs::remove_dir_all(t.path().join("cpuacct")).unwrap();
        std::fs::remove_dir_all(t.path().join("memory")).unwrap();
        write(&v2, "memory.max", "max\n");
        let u = r.read("berth-n", "ins-1");
        assert_eq!(u.cpu_seconds, Some(7.0));
        assert_eq!(u.memory_bytes, Some(1));
        assert_eq!(u.memory_limit_bytes, None);
        write(&v2, "memory.max", "1048576\n");
        assert_eq!(r.read("berth-n", "ins-1").memory_limit_bytes, Some(1 << 20));
    }

    #[test]
    fn missing_cgroup_and_odd_names_read_nothing() {
        let t = tempfile::tempdir().unwrap();
        let r = CgroupReader {
            unified: Some(t.path().to_path_buf()),
            ..Default::default()
        };
        assert_eq!(r.read("berth-n", "gone"), CgroupUsage::default());
        write(t.path(), "cpu.stat", "usage_usec 5\n");
        assert_eq!(r.read("..", "."), CgroupUsage::default());
        assert_eq!(r.read("a/b", "c"), CgroupUsage::default());
    }
}
