//! What the real-runtime tests share: a busybox rootfs, a runtime with its own root and cgroup
//! parent, and a cleanup that leaves nothing behind even when the test panicked.
//!
//! Needs root (namespaces, cgroups, pivot_root) and /bin/busybox; fails loudly without them.
#![allow(dead_code)] // each test binary uses its own part
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::cell::RefCell;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_agent::logs::LogShim;
use berth_agent::runtime::{cgroup, ContainerConfig, Runtime};

/// The agent binary: create helper and log shim, as in the agent.
pub const AGENT: &str = env!("CARGO_BIN_EXE_berth-agent");

/// States what these tests need, and fails loudly without it rather than skipping.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "runtime tests need root (namespaces, cgroups, pivot_root); run them as root"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "runtime tests need /bin/busybox (apt-get install busybox-static)"
    );
}

/// CRIU as the agent finds it, for the checkpoint and migration tests; fails loudly without it
/// (and without root).
pub fn require_criu() -> berth_agent::checkpoint::Criu {
    require_root();
    let criu = berth_agent::checkpoint::Criu::locate();
    assert!(
        criu.path().exists(),
        "checkpoint and migration tests need CRIU at /usr/local/sbin/criu (cargo xtask install)"
    );
    criu
}

/// A random suffix for ids and cgroup parents, so concurrent runs never collide.
pub fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A busybox rootfs under `dir`: bin/busybox with applet symlinks, the usual empty mount points,
/// and `/etc/ok` (for probes) holding "fine".
pub fn make_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "sleep", "cat", "echo", "httpd", "true", "test", "ls", "id", "hostname",
    ] {
        symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/ok"), "fine\n").unwrap();
    root
}

/// One runtime with its own root dir and cgroup parent; removes everything it made on drop.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub parent: String,
    pub runtime: Runtime,
    ids: RefCell<Vec<String>>,
}

impl Fixture {
    /// Creates in this process, output through pipes to a log shim (as in the agent).
    pub fn in_process() -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let rootfs = make_rootfs(dir.path());
        let parent = format!("berth-test-{}", suffix());
        let runtime = Runtime::new(&dir.path().join("runtime"), parent.clone())
            .unwrap()
            .with_log_shim(LogShim::new(PathBuf::from(AGENT)));
        Self {
            dir,
            rootfs,
            parent,
            runtime,
            ids: RefCell::default(),
        }
    }

    /// Creates through the agent binary as a helper process, as the agent does.
    pub fn with_helper() -> Self {
        // The init is the helper's child; as subreaper this test process inherits it.
        nix::sys::prctl::set_child_subreaper(true).unwrap();
        let mut f = Self::in_process();
        f.runtime = Runtime::new(&f.dir.path().join("runtime"), f.parent.clone())
            .unwrap()
            .with_create_helper(PathBuf::from(AGENT));
        f
    }

    /// A config for a new id (removed on drop) running `args`.
    pub fn config(&self, args: &[&str]) -> ContainerConfig {
        let id = format!("ins-{}", suffix());
        self.ids.borrow_mut().push(id.clone());
        ContainerConfig {
            id,
            rootfs: self.rootfs.clone(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            env: vec!["GREETING=hello".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            hostname: "berth-test".into(),
            cpu_millis: 500,
            memory_bytes: 64 * 1024 * 1024,
            resolv_conf: None,
        }
    }

    pub fn log(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("{id}.log"))
    }

    /// What the container wrote so far (empty before its log exists).
    pub fn output(&self, id: &str) -> String {
        std::fs::read_to_string(self.log(id)).unwrap_or_default()
    }

    /// Creates and starts, returning the init pid.
    pub fn run(&self, cfg: &ContainerConfig) -> i32 {
        let pid = self.runtime.create(cfg, &self.log(&cfg.id)).unwrap();
        self.runtime.start(&cfg.id).unwrap();
        pid
    }

    /// Creates and starts `sh -c script`; returns its id once it printed `ready`.
    pub fn run_shell(&self, script: &str) -> String {
        let cfg = self.config(&["sh", "-c", script]);
        self.run(&cfg);
        wait_for(
            &format!("{} to say ready", cfg.id),
            Duration::from_secs(10),
            || self.output(&cfg.id).contains("ready"),
        );
        cfg.id
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for id in self.ids.borrow().iter() {
            if let Err(e) = self.runtime.remove(id, Duration::ZERO) {
                eprintln!("cleanup of {id} failed: {e}");
            }
        }
        // Whatever a failed test left in our parent's cgroups, at any depth: kill, then rmdir
        // leaves first. A tree left behind here is a tree the next CRIU dump may walk.
        for parent in cgroup::parent_dirs(&self.parent) {
            remove_cgroup_tree(&parent);
        }
    }
}

/// Kills every process in `dir` and its sub-cgroups and removes them all, deepest first.
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let pids = cgroup::pids(&[dir.to_owned()]);
    for pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if !pids.is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir(dir);
}

/// Polls `cond` every 10 ms; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The host pid of container `id`'s init.
pub fn init_pid(f: &Fixture, id: &str) -> i32 {
    f.runtime.state(id).unwrap().unwrap().pid.unwrap()
}

/// A fresh images dir `name` in the fixture's dir (canonical: CRIU wants no symlinks).
pub fn images(f: &Fixture, name: &str) -> PathBuf {
    let dir = f.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

/// A process's state letter from /proc (`T` stopped, `S` sleeping...), `None` once it is gone.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Asserts that `pid` is stopped (`T`) right after a leave-stopped dump. CRIU detaches from a
/// dumped task with SIGSTOP pending, which takes effect when the task is next scheduled: on a
/// busy machine it can read `R` for a moment, so the state gets 2 s to settle.
pub fn assert_stopped(pid: i32, what: &str) {
    wait_for(what, Duration::from_secs(2), || {
        proc_state(pid) == Some('T')
    });
}

/// A network namespace of our own (as a migration target has), deleted on drop.
pub struct Netns(String);

impl Netns {
    /// `ip netns add` under a unique name.
    pub fn new() -> Self {
        let name = format!("berth-ck-{}", suffix());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Self(name)
    }

    /// Where CRIU finds it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// A restored init (our child): SIGKILLed and reaped on drop.
pub struct Restored(pub i32);

impl Drop for Restored {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}

/// The counter of a container CRIU left stopped: read once, since nothing rewrites it. The freeze
/// may have caught the shell between truncating the file and writing it: then 0, a lower bound.
pub fn frozen_counter(rootfs: &Path) -> (String, u64) {
    let raw = std::fs::read_to_string(rootfs.join("tmp/c")).unwrap_or_default();
    let n = raw.trim().parse().unwrap_or(0);
    (raw, n)
}
