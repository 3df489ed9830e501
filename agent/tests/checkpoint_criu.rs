//! CRIU checkpoint, resume and restore of real containers (youki runtime, busybox shell keeping a
//! counter in a shell variable). Needs root, CRIU 4.2+ at /usr/local/sbin/criu (`cargo xtask
//! install`), `ip` and `cp`. Every test uses its own container, images dir, netns and cgroups
//! (random suffix) and cleans up in `Drop` even when it fails.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod runtime_support;

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_agent::checkpoint::{
    bind_mount_points, Checkpointer, DumpMode, DumpRequest, RestoreRequest, ResumeRequest,
};
use berth_agent::runtime::cgroup;
use runtime_support::{
    assert_stopped, frozen_counter, images, init_pid, proc_state, require_criu, suffix, wait_for,
    Fixture, Netns, Restored,
};

/// Counts in a shell variable (memory), mirrors it to /tmp/c and says `tick N` every 10.
const COUNTER: &str = "echo ready; i=0; while true; do i=$((i+1)); echo $i > /tmp/c; \
                       [ $((i % 10)) -eq 0 ] && echo tick $i; sleep 0.1; done";

fn counter(rootfs: &Path) -> u64 {
    // The shell rewrites the file every 100 ms: retry a torn read.
    for _ in 0..50 {
        if let Ok(n) = std::fs::read_to_string(rootfs.join("tmp/c"))
            .unwrap_or_default()
            .trim()
            .parse()
        {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no counter in {}", rootfs.display());
}

#[test]
fn leave_running_dump_keeps_the_container_running() {
    let criu = require_criu();
    let features = criu.features().unwrap();
    eprintln!("criu features here: {features:?}");
    let f = Fixture::with_helper();
    let id = f.run_shell(COUNTER);
    let pid = init_pid(&f, &id);
    let dir = images(&f, "round1");

    let mut req = DumpRequest::new(pid, dir.clone(), DumpMode::LeaveRunning);
    req.track_mem = true;
    let report = criu.dump(&req).unwrap();
    eprintln!("leave-running dump: {report:?}");
    assert!(report.images_bytes > 0);
    assert_eq!(report.mem_tracked, features.mem_track);
    let stats = report.stats.expect("stats-dump parsed");
    assert!(
        stats.pages_written > 0 && !stats.frozen.is_zero(),
        "{stats:?}"
    );
    assert!(report.stdio[1].starts_with("pipe:["), "{:?}", report.stdio);
    assert!(dir.join("dump.log").exists());

    let before = counter(&f.rootfs);
    wait_for("the counter to go on", Duration::from_secs(5), || {
        counter(&f.rootfs) > before + 3
    });
    assert_ne!(proc_state(pid), Some('T'));

    // A second round into its own dir works the same (a pre-copy loop).
    let mut again = DumpRequest::new(pid, images(&f, "round2"), DumpMode::LeaveRunning);
    again.parent_images = Some(dir);
    let second = criu.dump(&again).unwrap();
    assert!(second.images_bytes > 0);
    let now = counter(&f.rootfs);
    wait_for("the counter to go on", Duration::from_secs(5), || {
        counter(&f.rootfs) > now + 3
    });
}

#[test]
fn leave_stopped_dump_then_resume_continues() {
    let criu = require_criu();
    let f = Fixture::with_helper();
    let id = f.run_shell(COUNTER);
    let pid = init_pid(&f, &id);

    let report = criu
        .dump(&DumpRequest::new(
            pid,
            images(&f, "final"),
            DumpMode::LeaveStopped,
        ))
        .unwrap();
    eprintln!("leave-stopped dump: {report:?}");
    assert_stopped(pid, "init stopped after the dump");
    let (frozen, frozen_at) = frozen_counter(&f.rootfs);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        frozen_counter(&f.rootfs).0,
        frozen,
        "nothing runs while stopped"
    );

    let resumed = criu
        .resume(&ResumeRequest {
            pid,
            unlock_network: true,
        })
        .unwrap();
    eprintln!("resume: {resumed:?}");
    assert!(resumed.tasks.contains(&pid));
    assert!(resumed.network_unlocked, "criu's iptables lock was found");
    wait_for("the counter to continue", Duration::from_secs(5), || {
        counter(&f.rootfs) > frozen_at + 3
    });
    // It continued from where it was: no reset to 1.
    assert!(counter(&f.rootfs) > frozen_at);
    assert_ne!(proc_state(pid), Some('T'));
    // Resuming twice is harmless (nothing locked, nothing stopped).
    let again = criu
        .resume(&ResumeRequest {
            pid,
            unlock_network: true,
        })
        .unwrap();
    assert!(!again.network_unlocked);
}

#[test]
fn final_dump_restores_into_a_new_rootfs_netns_and_cgroup() {
    let criu = require_criu();
    let f = Fixture::with_helper();
    // With a host file bind-mounted in (as the agent does for /etc/resolv.conf): an external
    // mount the dump must name and the restore must map to the target's file.
    std::fs::write(f.dir.path().join("resolv.src"), "nameserver 10.0.0.1\n").unwrap();
    let mut cfg = f.config(&["sh", "-c", COUNTER]);
    cfg.resolv_conf = Some(f.dir.path().join("resolv.src"));
    f.run(&cfg);
    let id = cfg.id.clone();
    wait_for("ready", Duration::from_secs(10), || {
        f.output(&id).contains("ready")
    });
    let pid = init_pid(&f, &id);
    let dir = images(&f, "final");
    // Other cgroups below a hierarchy root the task sits at (here cgroup2, which only the agent's
    // host code moves containers out of): the restore must not copy them under the new root.
    for mount in cgroup::mount_points().unwrap() {
        let _ = std::fs::create_dir_all(mount.join(&f.parent).join("bystander"));
    }

    let bundle_config = f.runtime.bundle_dir(&id).join("config.json");
    let mut dump = DumpRequest::new(pid, dir.clone(), DumpMode::LeaveStopped);
    dump.external_mounts = bind_mount_points(&bundle_config).unwrap();
    assert_eq!(dump.external_mounts, vec!["/etc/resolv.conf".to_owned()]);
    criu.dump(&dump).unwrap();
    let (_, at_dump) = frozen_counter(&f.rootfs);

    // The target's copy of the files (the rootfs upper dir travels separately in a migration).
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
    let netns = Netns::new();

    // New stdout/stderr pipes, as the target's log shim would hold.
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let (_err_r, err_w) = nix::unistd::pipe().unwrap();
    let output = Arc::new(Mutex::new(String::new()));
    let reader = {
        let output = output.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::File::from(out_r);
            let mut buf = [0u8; 256];
            while let Ok(n) = file.read(&mut buf) {
                if n == 0 {
                    break;
                }
                output
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };

    let cgroup_root = format!("/{}/ins-restored-{}", f.parent, suffix());
    let target_resolv = f.dir.path().join("resolv.target");
    std::fs::write(&target_resolv, "nameserver 10.0.0.2\n").unwrap();
    let report = criu
        .restore(&RestoreRequest {
            images_dir: dir,
            rootfs: rootfs2.clone(),
            netns: Some(netns.path()),
            stdio: [None, Some(out_w.as_fd()), Some(err_w.as_fd())],
            cgroup_root: Some(cgroup_root.clone()),
            external_mounts: vec![("/etc/resolv.conf".into(), target_resolv.clone())],
            tcp_established: true,
            timeout: Duration::from_secs(60),
        })
        .unwrap();
    let restored = Restored(report.pid);
    drop(out_w);
    drop(err_w);
    eprintln!("restore: {report:?}");

    // The source is still stopped (a migration removes it once the target runs).
    assert_eq!(proc_state(pid), Some('T'));
    // The restored init is alive, our child, in the netns and cgroup we gave.
    assert!(matches!(proc_state(restored.0), Some('S' | 'R')));
    let status = std::fs::read_to_string(format!("/proc/{}/status", restored.0)).unwrap();
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap();
    assert_eq!(ppid, std::process::id(), "restored init is our child");
    let ns_ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        ns_ino(&PathBuf::from(format!("/proc/{}/ns/net", restored.0))),
        ns_ino(&netns.path())
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", restored.0)).unwrap();
    assert!(cgroups.contains(&cgroup_root), "{cgroups}");
    for mount in cgroup::mount_points().unwrap() {
        let restored_dir = mount.join(cgroup_root.trim_start_matches('/'));
        let copied: Vec<_> = std::fs::read_dir(&restored_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        assert!(
            copied.is_empty(),
            "cgroups copied under the restored one: {copied:?}"
        );
    }

    // The counter continues from where it was (memory came back), in the new rootfs.
    wait_for("the restored counter", Duration::from_secs(5), || {
        counter(&rootfs2) > at_dump + 3
    });
    let first_tick = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("tick "))
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    wait_for("output on our pipe", Duration::from_secs(5), || {
        first_tick(&output.lock().unwrap()).is_some()
    });
    let tick = first_tick(&output.lock().unwrap()).unwrap();
    assert!(
        tick > at_dump,
        "tick {tick} after dump at {at_dump}: not reset"
    );
    assert_eq!(
        frozen_counter(&f.rootfs).1,
        at_dump,
        "the source did not move"
    );
    // The external mount came from the target's file.
    let resolv =
        std::fs::read_to_string(format!("/proc/{}/root/etc/resolv.conf", restored.0)).unwrap();
    assert!(resolv.contains("10.0.0.2"), "{resolv}");

    drop(restored);
    reader.join().unwrap();
}

/// The last number a file holds (lines of counts), 0 when none yet.
fn last_number(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn resume_after_a_tcp_dump_unlocks_the_connection() {
    let criu = require_criu();
    let f = Fixture::with_helper();
    std::os::unix::fs::symlink("busybox", f.rootfs.join("bin/nc")).unwrap();
    // A TCP connection inside the container (loopback): a counter streamed to a listener that
    // writes what it receives to /tmp/recv. It starts once the host brought `lo` up.
    let id = f.run_shell(
        "echo ready; while ! [ -e /tmp/go ]; do sleep 0.05; done; \
         sleep 100000 | nc -l -p 9000 > /tmp/recv & sleep 0.3; \
         i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done | nc 127.0.0.1 9000 & wait",
    );
    let pid = init_pid(&f, &id);
    let ok = Command::new("nsenter")
        .args([
            "-t",
            &pid.to_string(),
            "-n",
            "ip",
            "link",
            "set",
            "lo",
            "up",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "lo up in the container");
    std::fs::write(f.rootfs.join("tmp/go"), "").unwrap();
    let recv = f.rootfs.join("tmp/recv");
    wait_for("data over tcp", Duration::from_secs(10), || {
        last_number(&recv) > 3
    });

    let report = criu
        .dump(&DumpRequest::new(
            pid,
            images(&f, "tcp"),
            DumpMode::LeaveStopped,
        ))
        .unwrap();
    eprintln!("tcp dump: {report:?}");
    let at_dump = last_number(&recv);
    let resumed = criu
        .resume(&ResumeRequest {
            pid,
            unlock_network: true,
        })
        .unwrap();
    eprintln!("tcp resume: {resumed:?}");
    assert!(resumed.network_unlocked);
    assert!(
        resumed.sockets_unrepaired >= 2,
        "both ends were left in repair mode: {resumed:?}"
    );
    wait_for(
        "the connection to carry data again",
        Duration::from_secs(10),
        || last_number(&recv) > at_dump + 3,
    );
}
