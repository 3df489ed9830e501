//! Graceful stops for real: the chosen stop signal reaches the container, its grace is waited
//! only when the container's init handles that signal, SIGKILL follows; and exec probes built the
//! way the node builds them run inside a container through the runtime's helper binary.
//!
//! Needs root (namespaces, cgroups, pivot_root) and /bin/busybox. Every test uses its own runtime
//! root and cgroup parent (random suffix) and cleans up in `Drop` even when it panics.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_agent::health::{ProbeCheck, ProbeSpec};
use berth_agent::host::probe_check_for;
use berth_agent::reconcile::InstanceSpec;
use berth_agent::runtime::{cgroup, parse_signal, ContainerConfig, Runtime};
use berth_proto::v1::{Assignment, NetworkAttachment};
use nix::sys::signal::Signal;

/// States what these tests need, and fails loudly without it rather than skipping.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "runtime_stop tests need root (namespaces, cgroups, pivot_root); run them as root"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "runtime_stop tests need /bin/busybox (apt-get install busybox-static)"
    );
}

fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// One runtime creating through the agent binary (as the agent does), with its own root dir and
/// cgroup parent; removes everything it made on drop.
struct Fixture {
    dir: tempfile::TempDir,
    rootfs: PathBuf,
    parent: String,
    runtime: Runtime,
    ids: std::cell::RefCell<Vec<String>>,
}

impl Fixture {
    fn new() -> Self {
        require_root();
        // The init is the create helper's child; as subreaper this test process inherits it.
        nix::sys::prctl::set_child_subreaper(true).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "sleep", "cat", "echo", "true", "test"] {
            symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::write(rootfs.join("etc/ok"), "fine\n").unwrap();
        let parent = format!("berth-test-{}", suffix());
        let runtime = Runtime::new(&dir.path().join("runtime"), parent.clone())
            .unwrap()
            .with_create_helper(PathBuf::from(env!("CARGO_BIN_EXE_berth-agent")));
        Self {
            dir,
            rootfs,
            parent,
            runtime,
            ids: Default::default(),
        }
    }

    /// Creates and starts `sh -c script`; returns its id once it printed `ready`.
    fn run_shell(&self, script: &str) -> String {
        let id = format!("ins-{}", suffix());
        self.ids.borrow_mut().push(id.clone());
        let cfg = ContainerConfig {
            id: id.clone(),
            rootfs: self.rootfs.clone(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            hostname: "berth-test".into(),
            cpu_millis: 500,
            memory_bytes: 64 * 1024 * 1024,
            resolv_conf: None,
        };
        self.runtime.create(&cfg, &self.log(&id)).unwrap();
        self.runtime.start(&id).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.output(&id).contains("ready") {
            assert!(Instant::now() < deadline, "{id} never said ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        id
    }

    fn log(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("{id}.log"))
    }

    fn output(&self, id: &str) -> String {
        std::fs::read_to_string(self.log(id)).unwrap_or_default()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for id in self.ids.borrow().iter() {
            if let Err(e) = self.runtime.remove(id, Duration::ZERO) {
                eprintln!("cleanup of {id} failed: {e}");
            }
        }
        for parent in cgroup::parent_dirs(&self.parent) {
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        for pid in cgroup::pids(&[e.path()]) {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                Signal::SIGKILL,
                            );
                        }
                        std::thread::sleep(Duration::from_millis(50));
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

/// Removes `id` with `signal` and `grace`; returns how long it took.
fn timed_remove(f: &Fixture, id: &str, signal: Signal, grace: Duration) -> Duration {
    let t = Instant::now();
    f.runtime.remove_with_signal(id, signal, grace).unwrap();
    let took = t.elapsed();
    assert!(f.runtime.state(id).unwrap().is_none(), "{id} left state");
    assert!(
        cgroup::container_dirs(&f.parent, id).is_empty(),
        "{id} left cgroups"
    );
    took
}

#[test]
fn the_chosen_stop_signal_reaches_the_container_and_its_exit_is_waited_for() {
    let f = Fixture::new();
    let id = f
        .run_shell("trap 'echo got-quit; exit 4' QUIT; echo ready; while true; do sleep 0.1; done");
    let took = timed_remove(
        &f,
        &id,
        parse_signal("QUIT").unwrap(),
        Duration::from_secs(10),
    );
    assert!(
        took < Duration::from_secs(5),
        "SIGQUIT not honoured: {took:?}"
    );
    assert!(f.output(&id).contains("got-quit"), "{}", f.output(&id));
}

#[test]
fn an_init_without_a_handler_for_the_signal_is_not_waited_for() {
    // It handles SIGTERM, but the stop signal is SIGUSR1: as pid 1 it ignores that one, so the
    // grace would be dead time.
    let f = Fixture::new();
    let id = f.run_shell("trap 'echo got-term' TERM; echo ready; while true; do sleep 0.1; done");
    let took = timed_remove(&f, &id, Signal::SIGUSR1, Duration::from_secs(30));
    assert!(
        took < Duration::from_secs(12),
        "waited out the grace for a signal the init ignores: {took:?}"
    );
    assert!(!f.output(&id).contains("got-term"), "{}", f.output(&id));
}

#[test]
fn a_container_that_handles_the_signal_but_stays_is_killed_after_the_grace() {
    let f = Fixture::new();
    let id = f.run_shell("trap 'echo staying' TERM; echo ready; while true; do sleep 0.1; done");
    let took = timed_remove(&f, &id, Signal::SIGTERM, Duration::from_secs(2));
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(12),
        "grace then SIGKILL: {took:?}"
    );
    assert!(f.output(&id).contains("staying"), "{}", f.output(&id));
}

#[test]
fn sigkill_as_the_stop_signal_skips_the_grace() {
    let f = Fixture::new();
    let id = f.run_shell("trap 'echo got-term' TERM; echo ready; while true; do sleep 0.1; done");
    let took = timed_remove(&f, &id, Signal::SIGKILL, Duration::from_secs(30));
    assert!(took < Duration::from_secs(12), "{took:?}");
    assert!(!f.output(&id).contains("got-term"));
}

fn spec_for(id: &str) -> InstanceSpec {
    InstanceSpec::try_from(Assignment {
        instance_id: id.into(),
        container_id: "ctr-1".into(),
        image: "reg:5000/demo:1".into(),
        network: Some(NetworkAttachment {
            network_id: "net-1".into(),
            name: "n".into(),
            cidr: "10.200.0.0/24".into(),
            gateway: "10.200.0.1".into(),
            vni: 4096,
            encrypted: false,
        }),
        ip: "10.200.0.2".into(),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_probes_run_in_the_container_through_the_runtime_helper() {
    let f = Fixture::new();
    let id = f.run_shell("echo ready; while true; do sleep 0.1; done");
    let exec = f.runtime.exec_helper().expect("a create helper was set");
    let spec = spec_for(&id);
    let probe = |command: &[&str]| {
        ProbeSpec::new(ProbeCheck::Exec {
            command: command.iter().map(|s| (*s).to_owned()).collect(),
        })
    };
    let state_dir = f.runtime.state_dir(&id);
    let ok = probe_check_for(&spec, &probe(&["cat", "/etc/ok"]), Some(&exec), || {
        state_dir.clone()
    })
    .unwrap();
    let passed = ok.run(Duration::from_secs(5)).await;
    assert_eq!(passed, Ok("exit code 0: fine".to_owned()));
    let bad = probe_check_for(&spec, &probe(&["test", "-e", "/nope"]), Some(&exec), || {
        state_dir.clone()
    })
    .unwrap();
    let failed = bad.run(Duration::from_secs(5)).await;
    assert_eq!(failed, Err("exit code 1".to_owned()));
}
