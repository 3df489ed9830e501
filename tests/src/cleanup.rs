//! Removing what the agents' containers leave behind when agents die: processes, cgroups, mounts.
//!
//! Containers outlive their agent by design, so stopping a cluster's daemons is not enough. Their
//! processes are found two ways: by cgroup (any cgroup directory whose name holds one of the run's node
//! ids, which the agent uses for its `berth-<node>` parents) and by root filesystem (a container's `/`
//! is an overlay whose directories lie under the run's data directory).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Cgroup hierarchies: each v1 controller, the v2 `unified` tree of hybrid hosts, or the root on pure v2.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.is_symlink())
        .collect()
}

/// Every cgroup directory (any depth up to 4) whose name contains one of `tokens`.
pub fn matching_cgroups(tokens: &[String]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for root in cgroup_roots() {
        walk(&root, 0, tokens, &mut found);
    }
    found
}

fn walk(dir: &Path, depth: usize, tokens: &[String], found: &mut Vec<PathBuf>) {
    if depth > 4 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if tokens.iter().any(|t| name.contains(t.as_str())) {
            found.push(p);
        } else {
            walk(&p, depth + 1, tokens, found);
        }
    }
}

/// Pids in a cgroup and all its descendants.
pub fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_pids(&e.path()));
            }
        }
    }
    pids
}

/// What a process's root filesystem is: its `/proc/PID/root` link, or, for a process in another mount
/// namespace (where that link reads just "/"), the mountinfo line of its `/` mount, whose options name
/// the overlay's directories.
pub fn process_root(pid: u32) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/root")).ok()?;
    if link != Path::new("/") {
        return Some(link.to_string_lossy().into_owned());
    }
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    // The last mount on "/" is the one in effect.
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some("/"))
        .map(str::to_string)
}

/// Pids whose root filesystem lives under `dir` (containers whose rootfs is mounted from there).
pub fn pids_rooted_under(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let dir = dir.to_string_lossy();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| process_root(*pid).is_some_and(|root| root.contains(dir.as_ref())))
        .collect()
}

/// Processes whose command line names `dir`: what is left of the run's daemons once they were
/// stopped, e.g. a libcontainer helper cloned from an agent (it keeps the agent's argv) that hung and
/// outlived it. Never this process or its ancestors (`cargo xtask down --state-dir DIR`).
pub fn pids_naming(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let ours = ancestors();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !ours.contains(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| !needle.is_empty() && c.windows(needle.len()).any(|w| w == needle))
        })
        .collect()
}

/// This process and its ancestors up to init.
fn ancestors() -> Vec<u32> {
    let mut chain = vec![std::process::id()];
    while let Some(&pid) = chain.last() {
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s.get(s.rfind(')')? + 1..)?.to_owned();
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        match ppid {
            Some(p) if p > 1 && !chain.contains(&p) => chain.push(p),
            _ => break,
        }
    }
    chain
}

/// SIGKILLs the containers of a run until none is left (or 10 s pass), then removes their cgroups.
/// Returns what could not be removed.
pub fn remove_containers(tokens: &[String], data_dir: &Path) -> Vec<String> {
    let start = Instant::now();
    loop {
        let mut pids = pids_rooted_under(data_dir);
        pids.extend(pids_naming(data_dir));
        for cg in matching_cgroups(tokens) {
            pids.extend(cgroup_pids(&cg));
        }
        pids.retain(|p| *p != std::process::id());
        if pids.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break;
        }
        for pid in pids {
            crate::process::send(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut errors = Vec::new();
    for cg in matching_cgroups(tokens) {
        if let Err(e) = remove_cgroup_tree(&cg) {
            errors.push(format!("removing cgroup {}: {e}", cg.display()));
        }
    }
    errors
}

/// Removes a cgroup and its children, deepest first (a cgroup can only be removed once empty of both).
pub fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    // Emptied cgroups may take a moment to become removable after their last process dies.
    let mut last = Ok(());
    for _ in 0..50 {
        last = std::fs::remove_dir(dir);
        if last.is_ok() || !dir.exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    last
}

/// Mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Lazily unmounts everything under `dir`. Returns what could not be unmounted.
pub fn unmount_under(dir: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    for m in mounts_under(dir) {
        let out = std::process::Command::new("umount")
            .arg("-l")
            .arg(&m)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => errors.push(format!(
                "umount {}: {}",
                m.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => errors.push(format!("umount {}: {e}", m.display())),
        }
    }
    errors
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c));
        if b[i] == b'\\' && octal {
            let v = |k: usize| u32::from(b[i + k] - b'0');
            out.push(u8::try_from(v(1) * 64 + v(2) * 8 + v(3)).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the eBPF pins of these nodes (`/sys/fs/bpf/berth/<node>`: maps and cgroup links, which
/// detaches the programs), left when an agent stopped while its containers still ran, and the shared
/// `/sys/fs/bpf/berth` once empty. Returns what could not be removed.
pub fn remove_bpf_pins(node_ids: &[String]) -> Vec<String> {
    let root = Path::new("/sys/fs/bpf/berth");
    let mut errors = Vec::new();
    for node in node_ids {
        let dir = root.join(node);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("removing {}: {e}", dir.display())),
        }
    }
    // Another run's pins may still be there: only an empty directory goes.
    let _ = std::fs::remove_dir(root);
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_processes_naming_a_dir_but_never_itself_or_its_parents() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("run-marker");
        // `read` is a shell builtin: the shell itself waits, with no child to leak.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("read x")
            .arg(&marker)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Right after the fork the child still shows the test's command line: wait for its exec.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut found = pids_naming(&marker);
        while !found.contains(&child.id()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            found = pids_naming(&marker);
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found.contains(&child.id()), "{found:?}");
        let ours = ancestors();
        assert!(ours.contains(&std::process::id()));
        assert!(found.iter().all(|p| !ours.contains(p)));
    }

    #[test]
    fn unescapes_octal_sequences() {
        assert_eq!(unescape_mount_path(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/end\04"), r"/end\04");
    }
}
