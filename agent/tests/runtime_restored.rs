//! Containers the runtime did not create but takes over (what a CRIU restore leaves: a process in
//! the container's cgroups): state, limits, stop and cleanup work like for its own.
//!
//! Needs root (cgroups). The stand-in "restored" process is a `sleep` this test starts and moves
//! into the cgroups itself, as the checkpoint module's restore does.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod runtime_support;

use std::time::Duration;

use berth_agent::runtime::{cgroup, RuntimeError, Status};
use nix::sys::signal::Signal;
use runtime_support::{suffix, wait_for, Fixture};

/// A process in `/<parent>/<id>` of every hierarchy, like a restored container's init.
fn restored_process(f: &Fixture, id: &str) -> i32 {
    restored_command(f, id, &["sleep", "1000"])
}

/// [`restored_process`] running `argv`.
fn restored_command(f: &Fixture, id: &str, argv: &[&str]) -> i32 {
    let child = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // Reaped by the runtime from now on, never by a `Child` handle.
    std::mem::forget(child);
    for mount in cgroup::mount_points().unwrap() {
        let dir = mount.join(&f.parent).join(id);
        if std::fs::create_dir_all(&dir).is_err() {
            continue;
        }
        // cpuset groups start empty: give them their parent's cpus and mems first.
        for knob in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(dir.parent().unwrap().join(knob)) {
                if v.trim().is_empty() {
                    let top = std::fs::read_to_string(mount.join(knob)).unwrap();
                    let _ = std::fs::write(dir.parent().unwrap().join(knob), top.trim());
                }
                let up = std::fs::read_to_string(dir.parent().unwrap().join(knob)).unwrap();
                let _ = std::fs::write(dir.join(knob), up.trim());
            }
        }
        let _ = std::fs::write(dir.join("cgroup.procs"), pid.to_string());
    }
    pid
}

#[test]
fn an_adopted_process_is_managed_like_a_created_container() {
    let f = Fixture::with_helper();
    let cfg = f.config(&["true"]); // only for its id (and its cleanup on drop)
    let id = cfg.id.clone();
    let pid = restored_process(&f, &id);
    assert!(cgroup::pids(&cgroup::container_dirs(&f.parent, &id)).contains(&pid));

    f.runtime.adopt_restored(&id, pid).unwrap();
    let state = f.runtime.state(&id).unwrap().unwrap();
    assert_eq!((state.status, state.pid), (Status::Running, Some(pid)));
    assert!(f.runtime.list().unwrap().contains(&id));
    assert!(matches!(
        f.runtime.adopt_restored(&id, pid),
        Err(RuntimeError::AlreadyExists { .. })
    ));

    // The limits CRIU leaves unset.
    f.runtime.set_limits(&id, 500, 64 << 20).unwrap();
    let read = |names: &[&str]| {
        cgroup::container_dirs(&f.parent, &id)
            .into_iter()
            .find_map(|d| {
                names
                    .iter()
                    .find_map(|n| std::fs::read_to_string(d.join(n)).ok())
            })
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(read(&["memory.limit_in_bytes", "memory.max"]), "67108864");
    let cpu = read(&["cpu.cfs_quota_us", "cpu.max"]);
    assert!(cpu == "50000" || cpu == "50000 100000", "{cpu}");

    // Stop: gone, reaped, cgroups and state removed.
    f.runtime
        .remove_with_signal(&id, Signal::SIGTERM, Duration::from_secs(5))
        .unwrap();
    assert_eq!(f.runtime.state(&id).unwrap(), None);
    assert!(cgroup::container_dirs(&f.parent, &id).is_empty());
    wait_for("the process to be gone", Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
}

#[test]
fn an_adopted_process_that_exits_reads_as_stopped_and_nothing_else_is_adopted() {
    let f = Fixture::with_helper();
    let id = f.config(&["true"]).id;
    let pid = restored_process(&f, &id);
    f.runtime.adopt_restored(&id, pid).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let mut reaped = Vec::new();
    wait_for("its exit", Duration::from_secs(5), || {
        reaped.extend(f.runtime.reap());
        !reaped.is_empty()
    });
    assert_eq!(reaped, vec![(id.clone(), 128 + 9)]);
    assert_eq!(
        f.runtime.state(&id).unwrap().unwrap().status,
        Status::Stopped
    );
    f.runtime.remove(&id, Duration::ZERO).unwrap();

    // A pid that does not exist, or a bad id, is refused and leaves nothing.
    let other = format!("ins-{}", suffix());
    assert!(f.runtime.adopt_restored(&other, i32::MAX).is_err());
    assert_eq!(f.runtime.state(&other).unwrap(), None);
    assert!(f.runtime.adopt_restored("../x", 1).is_err());
}

#[test]
fn an_adopted_init_that_handles_the_stop_signal_gets_it_and_its_grace() {
    let f = Fixture::with_helper();
    let id = f.config(&["true"]).id;
    let marker = f.dir.path().join("got-term");
    let script = format!(
        "trap 'touch {}; exit 0' TERM; while :; do sleep 0.1; done",
        marker.display()
    );
    let pid = restored_command(&f, &id, &["sh", "-c", &script]);
    f.runtime.adopt_restored(&id, pid).unwrap();
    // The shell installs its trap right away; give it a moment to have done so.
    wait_for("the trap", Duration::from_secs(5), || {
        // SigCgt bit 14 is SIGTERM (15).
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            })
            .is_some_and(|mask| mask & (1 << 14) != 0)
    });
    let t = std::time::Instant::now();
    f.runtime
        .remove_with_signal(&id, Signal::SIGTERM, Duration::from_secs(20))
        .unwrap();
    assert!(marker.exists(), "the init never saw SIGTERM");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(f.runtime.state(&id).unwrap(), None);
}
