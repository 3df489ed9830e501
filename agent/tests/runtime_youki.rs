//! Real container lifecycles through youki's libcontainer (needs root: namespaces, cgroups, mounts).
//!
//! Rootfs: busybox-static copied into a temp dir, no registry involved. Every test uses its own
//! cgroup parent and runtime root (random suffix) and cleans up in `Drop` even when it panics.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod runtime_support;

use std::path::Path;
use std::time::{Duration, Instant};

use berth_agent::runtime::{cgroup, Runtime, RuntimeError, Status};
use runtime_support::{wait_for, Fixture};

fn read_cgroup_file(parent: &str, id: &str, names: &[&str]) -> Option<String> {
    cgroup::container_dirs(parent, id)
        .into_iter()
        .find_map(|d| {
            names
                .iter()
                .find_map(|n| std::fs::read_to_string(d.join(n)).ok())
                .map(|s| s.trim().to_owned())
        })
}

fn proc_alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; a reaped process has none.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn full_lifecycle_with_limits_log_and_cleanup() {
    let f = Fixture::in_process();
    let cfg = f.config(&["sh", "-c", "echo $GREETING; sleep 1000"]);
    let id = cfg.id.clone();

    let pid = f.runtime.create(&cfg, &f.log(&id)).unwrap();
    assert!(pid > 0);
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let st = f.runtime.state(&id).unwrap().unwrap();
    assert_eq!(st.status, Status::Created);
    assert_eq!(st.pid, Some(pid));
    assert!(f.runtime.list().unwrap().contains(&id));

    // build() made the process non-dumpable; the runtime must have given it back.
    assert!(nix::sys::prctl::get_dumpable().unwrap());
    // A new network namespace, reachable for the agent between create and start.
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(ours, theirs, "container must get its own netns");

    // Limits: v1 files on hybrid hosts, v2 files on unified ones.
    let mem = read_cgroup_file(&f.parent, &id, &["memory.limit_in_bytes", "memory.max"])
        .expect("no memory limit file for the container");
    assert_eq!(mem, (64 * 1024 * 1024).to_string());
    match read_cgroup_file(&f.parent, &id, &["cpu.cfs_quota_us"]) {
        Some(q) => assert_eq!(q, "50000"),
        None => assert_eq!(
            read_cgroup_file(&f.parent, &id, &["cpu.max"]).expect("no cpu limit file"),
            "50000 100000"
        ),
    }

    f.runtime.start(&id).unwrap();
    assert_eq!(
        f.runtime.state(&id).unwrap().unwrap().status,
        Status::Running
    );
    wait_for("hello in the log", Duration::from_secs(5), || {
        std::fs::read_to_string(f.log(&id)).is_ok_and(|l| l.contains("hello"))
    });
    assert!(f.runtime.reap().is_empty(), "nothing exited yet");

    f.runtime.remove(&id, Duration::ZERO).unwrap();
    assert!(!proc_alive(pid), "init {pid} survived remove");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "init {pid} not reaped"
    );
    assert!(
        cgroup::container_dirs(&f.parent, &id).is_empty(),
        "container cgroup left"
    );
    assert!(
        cgroup::parent_dirs(&f.parent).is_empty(),
        "empty parent cgroup left"
    );
    assert!(!f.runtime.state_dir(&id).exists());
    assert!(!f.runtime.bundle_dir(&id).exists());
    assert_eq!(f.runtime.state(&id).unwrap(), None);
    assert!(!f.runtime.list().unwrap().contains(&id));

    // Idempotent.
    f.runtime.remove(&id, Duration::ZERO).unwrap();
    f.runtime
        .remove("ins-never-created", Duration::ZERO)
        .unwrap();
}

#[test]
fn exited_container_is_stopped_and_reaped() {
    let f = Fixture::in_process();
    let cfg = f.config(&["sh", "-c", "echo bye; exit 7"]);
    let id = cfg.id.clone();
    let pid = f.run(&cfg);

    let mut reaped = Vec::new();
    wait_for("reap", Duration::from_secs(5), || {
        reaped.extend(f.runtime.reap());
        !reaped.is_empty()
    });
    assert_eq!(reaped, vec![(id.clone(), 7)]);
    assert!(f.runtime.reap().is_empty(), "reaped twice");
    assert_eq!(f.runtime.exit_code(&id), Some(7));
    let st = f.runtime.state(&id).unwrap().unwrap();
    assert_eq!(st.status, Status::Stopped);
    assert_eq!(st.pid, Some(pid));
    assert!(std::fs::read_to_string(f.log(&id)).unwrap().contains("bye"));

    f.runtime.remove(&id, Duration::from_secs(1)).unwrap();
    assert!(cgroup::container_dirs(&f.parent, &id).is_empty());
    assert_eq!(f.runtime.state(&id).unwrap(), None);
}

#[test]
fn killed_container_reports_signal() {
    let f = Fixture::in_process();
    let cfg = f.config(&["sleep", "1000"]);
    let id = cfg.id.clone();
    let pid = f.run(&cfg);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // `state` sees the exit first (and reaps the zombie); `reap` must still report it, once.
    wait_for("stopped", Duration::from_secs(5), || {
        f.runtime.state(&id).unwrap().unwrap().status == Status::Stopped
    });
    assert_eq!(f.runtime.reap(), vec![(id.clone(), 128 + 9)]);
    assert!(f.runtime.reap().is_empty());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "zombie left");
}

#[test]
fn create_twice_is_already_exists() {
    let f = Fixture::in_process();
    let cfg = f.config(&["sleep", "1000"]);
    f.runtime.create(&cfg, &f.log(&cfg.id)).unwrap();
    match f.runtime.create(&cfg, &f.log(&cfg.id)) {
        Err(RuntimeError::AlreadyExists { id }) => assert_eq!(id, cfg.id),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    // The original is untouched.
    assert_eq!(
        f.runtime.state(&cfg.id).unwrap().unwrap().status,
        Status::Created
    );
    // Removing a created (never started) container works too.
    f.runtime.remove(&cfg.id, Duration::from_secs(1)).unwrap();
    assert!(cgroup::parent_dirs(&f.parent).is_empty());
}

#[test]
fn sigterm_grace_lets_the_process_exit() {
    let f = Fixture::in_process();
    let cfg = f.config(&[
        "sh",
        "-c",
        "trap 'echo term; exit 3' TERM; echo ready; while true; do sleep 0.1; done",
    ]);
    let id = cfg.id.clone();
    f.run(&cfg);
    wait_for("ready", Duration::from_secs(5), || {
        std::fs::read_to_string(f.log(&id)).is_ok_and(|l| l.contains("ready"))
    });
    let t = Instant::now();
    f.runtime.remove(&id, Duration::from_secs(10)).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "SIGTERM not honoured: {:?}",
        t.elapsed()
    );
    assert!(std::fs::read_to_string(f.log(&id))
        .unwrap()
        .contains("term"));
    assert!(cgroup::parent_dirs(&f.parent).is_empty());
}

#[test]
fn init_without_a_sigterm_handler_is_not_waited_for() {
    // pid 1 of a namespace ignores SIGTERM unless it installs a handler: the grace would be dead time.
    let f = Fixture::in_process();
    let cfg = f.config(&["sleep", "1000"]);
    let id = cfg.id.clone();
    f.run(&cfg);
    let t = Instant::now();
    f.runtime.remove(&id, Duration::from_secs(30)).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "waited out the grace for an init that ignores SIGTERM: {:?}",
        t.elapsed()
    );
    assert!(f.runtime.state(&id).unwrap().is_none());
}

#[test]
fn parent_cgroup_stays_while_another_container_lives() {
    let f = Fixture::in_process();
    let a = f.config(&["sleep", "1000"]);
    let b = f.config(&["sleep", "1000"]);
    f.run(&a);
    f.run(&b);
    f.runtime.remove(&a.id, Duration::ZERO).unwrap();
    assert!(cgroup::container_dirs(&f.parent, &a.id).is_empty());
    assert!(
        !cgroup::parent_dirs(&f.parent).is_empty(),
        "parent removed too early"
    );
    assert_eq!(
        f.runtime.state(&b.id).unwrap().unwrap().status,
        Status::Running
    );
    f.runtime.remove(&b.id, Duration::ZERO).unwrap();
    assert!(cgroup::parent_dirs(&f.parent).is_empty());
}

#[test]
fn two_runtimes_do_not_interfere() {
    let f1 = Fixture::in_process();
    let f2 = Fixture::in_process();
    let a = f1.config(&["sleep", "1000"]);
    let b = f2.config(&["sleep", "1000"]);
    f1.run(&a);
    let pid_b = f2.run(&b);

    assert_eq!(f1.runtime.list().unwrap(), vec![a.id.clone()]);
    assert_eq!(f2.runtime.list().unwrap(), vec![b.id.clone()]);
    assert_eq!(f1.runtime.state(&b.id).unwrap(), None);

    f1.runtime.remove(&a.id, Duration::ZERO).unwrap();
    assert!(cgroup::parent_dirs(&f1.parent).is_empty());
    assert!(!cgroup::container_dirs(&f2.parent, &b.id).is_empty());
    assert!(proc_alive(pid_b));
    assert_eq!(
        f2.runtime.state(&b.id).unwrap().unwrap().status,
        Status::Running
    );
    assert!(f1.runtime.reap().is_empty());
    assert!(f2.runtime.reap().is_empty());
}

#[test]
fn half_deleted_container_is_removed() {
    let f = Fixture::in_process();
    let cfg = f.config(&["sleep", "1000"]);
    let id = cfg.id.clone();
    let pid = f.run(&cfg);
    // As if an earlier delete died midway: state file gone, process and cgroup still there.
    std::fs::remove_file(f.runtime.state_dir(&id).join("state.json")).unwrap();
    assert_eq!(
        f.runtime.state(&id).unwrap().unwrap().status,
        Status::Stopped
    );
    assert!(f.runtime.list().unwrap().contains(&id));
    f.runtime.remove(&id, Duration::ZERO).unwrap();
    wait_for("init gone", Duration::from_secs(5), || {
        f.runtime.reap();
        !proc_alive(pid)
    });
    assert!(cgroup::container_dirs(&f.parent, &id).is_empty());
    assert!(cgroup::parent_dirs(&f.parent).is_empty());
    assert!(!f.runtime.state_dir(&id).exists());
    assert!(!f.runtime.bundle_dir(&id).exists());
}

#[test]
fn failed_create_leaves_nothing() {
    let f = Fixture::in_process();
    let cfg = f.config(&["/bin/does-not-exist"]);
    let id = cfg.id.clone();
    // youki checks the executable before reporting the init ready, so create itself fails.
    let err = f.runtime.create(&cfg, &f.log(&id)).unwrap_err();
    assert!(
        err.to_string().contains("not found"),
        "the reason should reach the error message: {err}"
    );
    assert!(!f.runtime.state_dir(&id).exists());
    assert!(!f.runtime.bundle_dir(&id).exists());
    assert!(cgroup::container_dirs(&f.parent, &id).is_empty());
    assert!(cgroup::parent_dirs(&f.parent).is_empty());
    // youki's intermediate and init processes must not stay as our zombies.
    wait_for("stray youki zombies reaped", Duration::from_secs(5), || {
        f.runtime.reap();
        !our_youki_children()
    });
}

fn our_youki_children() -> bool {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read_to_string(e.path().join("stat")).is_ok_and(|stat| {
            let Some((comm, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            comm.contains("(youki:") && rest.split_whitespace().nth(1) == Some(me.as_str())
        })
    })
}

#[test]
fn new_runtime_on_the_same_root_recovers_containers() {
    let f = Fixture::in_process();
    let cfg = f.config(&["sleep", "1000"]);
    let id = cfg.id.clone();
    let pid = f.run(&cfg);

    // As after an agent restart: a fresh runtime that did not create the container.
    let again = Runtime::new(&f.dir.path().join("runtime"), f.parent.clone()).unwrap();
    assert_eq!(again.list().unwrap(), vec![id.clone()]);
    let st = again.state(&id).unwrap().unwrap();
    assert_eq!(st.status, Status::Running);
    assert_eq!(st.pid, Some(pid));
    assert!(again.reap().is_empty(), "not its child to report");

    again.remove(&id, Duration::ZERO).unwrap();
    assert!(!proc_alive(pid));
    assert!(cgroup::container_dirs(&f.parent, &id).is_empty());
    assert!(cgroup::parent_dirs(&f.parent).is_empty());
    assert!(again.list().unwrap().is_empty());
    // The first runtime still tracks the pid (same test process) and collects the zombie.
    wait_for("zombie reaped", Duration::from_secs(5), || {
        f.runtime.reap();
        !Path::new(&format!("/proc/{pid}")).exists()
    });
}

#[test]
fn process_runs_as_configured() {
    let f = Fixture::in_process();
    let mut cfg = f.config(&[
        "sh",
        "-c",
        "echo uid=$(id -u) gid=$(id -g) cwd=$(pwd) host=$(hostname) env=$GREETING",
    ]);
    cfg.uid = 1000;
    cfg.gid = 1000;
    cfg.cwd = "/tmp".into();
    let id = cfg.id.clone();
    f.run(&cfg);
    wait_for("output", Duration::from_secs(5), || {
        std::fs::read_to_string(f.log(&id)).is_ok_and(|l| l.contains("env="))
    });
    let log = std::fs::read_to_string(f.log(&id)).unwrap();
    assert!(
        log.contains("uid=1000 gid=1000 cwd=/tmp host=berth-test env=hello"),
        "{log}"
    );
}

#[test]
fn creates_through_the_helper_process_run_log_and_are_reaped() {
    let f = Fixture::with_helper();
    let cfg = f.config(&["sh", "-c", "echo via-helper; exit 5"]);
    let id = cfg.id.clone();
    let pid = f.run(&cfg);
    assert!(pid > 1);
    let mut reaped = Vec::new();
    wait_for("reap", Duration::from_secs(5), || {
        reaped.extend(f.runtime.reap());
        !reaped.is_empty()
    });
    assert_eq!(
        reaped,
        vec![(id.clone(), 5)],
        "the orphaned init is ours to reap"
    );
    assert!(std::fs::read_to_string(f.log(&id))
        .unwrap()
        .contains("via-helper"));
    f.runtime.remove(&id, Duration::from_secs(1)).unwrap();
    assert!(cgroup::container_dirs(&f.parent, &id).is_empty());

    // A create the helper refuses comes back as an error with its words, and leaves nothing.
    let mut bad = f.config(&["/bin/does-not-exist"]);
    bad.rootfs = f.dir.path().join("no-such-rootfs");
    let err = f.runtime.create(&bad, &f.log(&bad.id)).unwrap_err();
    assert!(err.to_string().contains("create helper"), "{err}");
    assert_eq!(f.runtime.state(&bad.id).unwrap(), None);
}
