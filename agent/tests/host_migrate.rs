//! The target end of a live migration as the node host composes it, on real pieces: a container
//! frozen by a final CRIU dump on one runtime is restored under another runtime (another cgroup
//! parent, as another node would have) into a network namespace held by the agent's
//! `__netns-holder`, with its output going to a log shim that runtime started
//! (`Runtime::spawn_log_shim`); the runtime adopts it, the holder goes, and the container runs on
//! with its memory, logs through the new shim, and is removed like any other. The frozen source
//! is removed at once.
//!
//! Needs root, CRIU 4.2+ at /usr/local/sbin/criu (`cargo xtask install`), /bin/busybox and `cp`.
//! Every container, cgroup and namespace is per run (random suffix) and removed on drop.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod runtime_support;

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_agent::checkpoint::{
    bind_mount_points, Checkpointer, DumpMode, DumpRequest, RestoreRequest,
};
use berth_agent::network::holder::NetnsHolder;
use berth_agent::runtime::{cgroup, Runtime, Status};
use runtime_support::{
    assert_stopped, proc_state, remove_cgroup_tree, require_criu, suffix, wait_for, Fixture, AGENT,
};

/// Counts in a shell variable (memory) and says `tick N` every 10.
const COUNTER: &str = "echo ready; i=0; while true; do i=$((i+1)); \
                       [ $((i % 10)) -eq 0 ] && echo tick $i; sleep 0.1; done";

/// The "target node's" runtime: its own root and cgroup parent; removes its container and
/// cgroups on drop.
struct Target {
    runtime: Runtime,
    parent: String,
    id: String,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Err(e) = self.runtime.remove(&self.id, Duration::ZERO) {
            eprintln!("cleanup of the restored {} failed: {e}", self.id);
        }
        for dir in cgroup::parent_dirs(&self.parent) {
            remove_cgroup_tree(&dir);
        }
    }
}

/// The highest `tick N` in `text`.
fn last_tick(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.split("tick ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .max()
}

fn ns_ino(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn a_restored_container_logs_through_its_own_shim_and_is_adopted() {
    let criu = require_criu();
    let f = Fixture::with_helper();
    std::fs::write(f.dir.path().join("resolv.src"), "nameserver 10.0.0.1\n").unwrap();
    let mut cfg = f.config(&["sh", "-c", COUNTER]);
    cfg.resolv_conf = Some(f.dir.path().join("resolv.src"));
    f.run(&cfg);
    let id = cfg.id.clone();
    wait_for("ready", Duration::from_secs(10), || {
        last_tick(&f.output(&id)).is_some_and(|t| t >= 10)
    });
    let pid = f.runtime.state(&id).unwrap().unwrap().pid.unwrap();

    // The source's final dump, as the session makes it.
    let images = f.dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let images = images.canonicalize().unwrap();
    let mut dump = DumpRequest::new(pid, images.clone(), DumpMode::LeaveStopped);
    dump.external_mounts =
        bind_mount_points(&f.runtime.bundle_dir(&id).join("config.json")).unwrap();
    let report = criu.dump(&dump).unwrap();
    assert!(report.stdio[1].starts_with("pipe:["), "{:?}", report.stdio);
    assert!(report.stdio[2].starts_with("pipe:["), "{:?}", report.stdio);
    assert_stopped(pid, "left frozen");
    let at_dump = last_tick(&f.output(&id)).unwrap();

    // The target's rootfs (the upper dir travels in a migration; a copy does here).
    let rootfs2 = f.dir.path().join("rootfs2");
    let ok = Command::new("cp")
        .arg("-a")
        .arg(&f.rootfs)
        .arg(&rootfs2)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a rootfs");
    let rootfs2 = rootfs2.canonicalize().unwrap();

    // The target node's runtime, with its log shims.
    let parent2 = format!("berth-test-{}", suffix());
    let target = Target {
        runtime: Runtime::new(&f.dir.path().join("runtime2"), parent2.clone())
            .unwrap()
            .with_create_helper(PathBuf::from(AGENT)),
        parent: parent2.clone(),
        id: id.clone(),
    };
    let holder = NetnsHolder::spawn(Path::new(AGENT)).unwrap();
    let netns_ino = ns_ino(&holder.netns_path());
    let log2 = f.dir.path().join("restored.log");
    let (stdout, stderr) = target.runtime.spawn_log_shim(&id, &log2).unwrap();
    let resolv2 = f.dir.path().join("resolv.target");
    std::fs::write(&resolv2, "nameserver 10.0.0.2\n").unwrap();
    let restored = criu
        .restore(&RestoreRequest {
            images_dir: images,
            rootfs: rootfs2,
            netns: Some(holder.netns_path()),
            stdio: [None, Some(stdout.as_fd()), Some(stderr.as_fd())],
            cgroup_root: Some(format!("/{parent2}/{id}")),
            external_mounts: vec![("/etc/resolv.conf".into(), resolv2)],
            tcp_established: true,
            timeout: Duration::from_secs(60),
        })
        .unwrap();
    drop((stdout, stderr));
    target.runtime.adopt_restored(&id, restored.pid).unwrap();
    target.runtime.set_limits(&id, 500, 64 << 20).unwrap();
    // The restored tree holds the namespace now.
    drop(holder);
    assert_eq!(
        ns_ino(&PathBuf::from(format!("/proc/{}/ns/net", restored.pid))),
        netns_ino,
        "restored into the holder's namespace, which outlived the holder"
    );
    let state = target.runtime.state(&id).unwrap().unwrap();
    assert_eq!(state.status, Status::Running);
    assert_eq!(state.pid, Some(restored.pid));

    // It counts on from where it was, and its output reaches the new shim's log.
    wait_for("ticks in the restored log", Duration::from_secs(10), || {
        last_tick(&std::fs::read_to_string(&log2).unwrap_or_default()).is_some()
    });
    let first = last_tick(&std::fs::read_to_string(&log2).unwrap()).unwrap();
    assert!(
        first > at_dump,
        "tick {first} after a dump at {at_dump}: reset"
    );

    // The frozen source goes at once (a stop signal would stay pending while it is stopped).
    let started = Instant::now();
    f.runtime.remove(&id, Duration::ZERO).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(f.runtime.state(&id).unwrap().is_none());
    assert!(
        proc_state(restored.pid).is_some_and(|s| s != 'Z'),
        "the restored copy runs on"
    );

    // Removed like any container: processes, cgroups, and the shim after the last output.
    target.runtime.remove(&id, Duration::from_secs(5)).unwrap();
    assert!(target.runtime.state(&id).unwrap().is_none());
    assert!(cgroup::container_dirs(&parent2, &id).is_empty());
    let log = std::fs::read_to_string(&log2).unwrap();
    assert!(last_tick(&log).unwrap() >= first, "{log}");
}
