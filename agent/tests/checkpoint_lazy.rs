//! Post-copy with CRIU lazy pages on real containers (youki runtime, busybox shell keeping a
//! counter and an 8 MB string in memory): a lazy dump whose page server listens on loopback, a
//! `criu lazy-pages` daemon and a lazy restore into a new rootfs, netns and cgroup. Needs root,
//! CRIU 4.2+ at /usr/local/sbin/criu and `fs.pipe-max-size=4194304` (`cargo xtask install`),
//! `ip` and `cp`. Every test uses its own container, images dirs, netns, cgroups and port, and
//! cleans up in `Drop` even when it fails.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod lazy_support;
mod runtime_support;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_agent::checkpoint::lazy::{LazyDumpRequest, LazyPagesRequest};
use berth_agent::checkpoint::{
    bind_mount_points, Checkpointer, DumpMode, DumpRequest, RestoreRequest, ResumeRequest,
};
use berth_agent::migrate::lazy_relay::{SourceRelay, TargetRelay};
use berth_agent::migrate::transport::MigrationEndpoint;
use lazy_support::{
    copy_rootfs, counter, first_tick, fixture, identities, require_lazy_pages, PipeReader, COUNTER,
};
use runtime_support::{images, init_pid, proc_state, suffix, wait_for, Fixture, Netns, Restored};

/// A loopback port nobody listens on right now.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Copies the image files of `from` into a fresh dir, as the target receives them.
fn receive_images(f: &Fixture, from: &Path, name: &str) -> PathBuf {
    let to = images(f, name);
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let name = entry.file_name();
        let name = name.to_str().unwrap();
        if entry.file_type().unwrap().is_file() && !name.ends_with(".log") {
            std::fs::copy(entry.path(), to.join(name)).unwrap();
        }
    }
    to
}

/// The two halves of a QUIC relay on loopback between two node identities, and the runtime
/// their tasks run on.
struct Quic {
    rt: tokio::runtime::Runtime,
    target: Option<TargetRelay>,
    source: Option<SourceRelay>,
    _endpoints: (MigrationEndpoint, MigrationEndpoint),
}

impl Quic {
    /// Connects n2 (target) to n1 (source) and bridges to `page_server` on the source.
    fn relay_to(page_server: SocketAddr) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (n1, n2) = identities();
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let (target, source, endpoints) = rt.block_on(async {
            let src = MigrationEndpoint::bind(local, &n1).unwrap();
            let dst = MigrationEndpoint::bind(local, &n2).unwrap();
            let addr = src.local_addr().unwrap();
            let (accepted, dialled) = tokio::join!(src.accept(), dst.connect(addr, "n1"));
            let source = SourceRelay::start(accepted.unwrap().unwrap().0, page_server);
            let target = TargetRelay::start(dialled.unwrap()).await.unwrap();
            (target, source, (src, dst))
        });
        Self {
            rt,
            target: Some(target),
            source: Some(source),
            _endpoints: endpoints,
        }
    }
}

impl Drop for Quic {
    fn drop(&mut self) {
        let _guard = self.rt.enter();
        drop(self.target.take());
        drop(self.source.take());
    }
}

#[test]
fn lazy_dump_restores_on_demand_and_serves_every_page() {
    lazy_move(false);
}

#[test]
fn lazy_pages_cross_the_migration_connection() {
    lazy_move(true);
}

/// A lazy dump, then a lazy restore on the same machine into a new rootfs, netns and cgroup;
/// the daemon reaches the page server directly or through the QUIC relay.
fn lazy_move(through_quic: bool) {
    let criu = require_lazy_pages();
    let f = fixture();
    std::fs::write(f.dir.path().join("resolv.src"), "nameserver 10.0.0.1\n").unwrap();
    let mut cfg = f.config(&["sh", "-c", COUNTER]);
    cfg.resolv_conf = Some(f.dir.path().join("resolv.src"));
    f.run(&cfg);
    let id = cfg.id.clone();
    wait_for("ready", Duration::from_secs(20), || {
        f.output(&id).contains("ready")
    });
    // (The log shim prefixes each line: look for the text only.)
    wait_for("a first tick", Duration::from_secs(10), || {
        f.output(&id).contains("len 8000000")
    });
    let pid = init_pid(&f, &id);
    let src_images = images(&f, "lazy");
    let listen = free_port();

    let mut dump = DumpRequest::new(pid, src_images.clone(), DumpMode::LeaveStopped);
    dump.external_mounts =
        bind_mount_points(&f.runtime.bundle_dir(&id).join("config.json")).unwrap();
    let started = Instant::now();
    let lazy = criu
        .lazy_dump(&LazyDumpRequest {
            dump,
            listen,
            ready_timeout: Duration::from_secs(30),
        })
        .unwrap();
    let dump_ready = started.elapsed();
    // Held by CRIU (ptrace stop) while it serves.
    assert_eq!(proc_state(pid), Some('t'), "source frozen while serving");
    let at_dump = counter(&f.rootfs);
    // Only the page server answers there, and only on the address asked for.
    let listening = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let want = format!("0100007F:{:04X}", listen.port());
    assert!(
        listening.contains(&want),
        "page server not on {listen}: {listening}"
    );

    // The target: images as received, its own rootfs copy, netns, cgroup and log pipes.
    let dst_images = receive_images(&f, &src_images, "received");
    let image_bytes: u64 = std::fs::read_dir(&dst_images)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let rootfs2 = copy_rootfs(&f, "rootfs2");
    let netns = Netns::new();
    let (out, out_w) = PipeReader::new();
    let (_err, err_w) = PipeReader::new();
    let cgroup_root = format!("/{}/ins-lazy-{}", f.parent, suffix());
    let target_resolv = f.dir.path().join("resolv.target");
    std::fs::write(&target_resolv, "nameserver 10.0.0.2\n").unwrap();

    let quic = through_quic.then(|| Quic::relay_to(listen));
    let daemon_to = match &quic {
        Some(q) => q.target.as_ref().unwrap().local_addr(),
        None => listen,
    };
    let source = std::thread::spawn(move || lazy.finish(Duration::from_secs(60)));
    let restore_started = Instant::now();
    let pages = criu
        .start_lazy_pages(&LazyPagesRequest {
            images_dir: dst_images.clone(),
            page_server: daemon_to,
            ready_timeout: Duration::from_secs(10),
        })
        .unwrap();
    let daemon_ready = restore_started.elapsed();
    let report = criu
        .restore_lazy(
            &RestoreRequest {
                images_dir: dst_images.clone(),
                rootfs: rootfs2.clone(),
                netns: Some(netns.path()),
                stdio: [None, Some(out_w.as_fd()), Some(err_w.as_fd())],
                cgroup_root: Some(cgroup_root.clone()),
                external_mounts: vec![("/etc/resolv.conf".into(), target_resolv)],
                tcp_established: true,
                timeout: Duration::from_secs(30),
            },
            &pages,
        )
        .unwrap();
    let running_after = restore_started.elapsed();
    let restored = Restored(report.pid);
    drop(out_w);
    drop(err_w);
    let all_pages = pages.wait(Duration::from_secs(60)).unwrap();
    let pages_after = restore_started.elapsed();
    let served = source.join().unwrap().unwrap();

    if let Some(q) = &quic {
        let t = q.target.as_ref().unwrap().counters();
        let s = q.source.as_ref().unwrap().counters();
        eprintln!("relay: target {t:?}, source {s:?}");
        assert_eq!((t.connections, t.failed), (1, 0), "{t:?}");
        assert_eq!((s.connections, s.failed), (1, 0), "{s:?}");
        assert!(
            s.to_target >= 8_000_000,
            "the pages crossed the relay: {s:?}"
        );
    }
    eprintln!(
        "through quic: {through_quic}; lazy dump ready (images written, page server up) {dump_ready:?}, images {image_bytes} \
         bytes; target: lazy-pages daemon up {daemon_ready:?}, container running \
         {running_after:?} after restore start, every page there {pages_after:?} after \
         (daemon {:?}); source criu answered after {:?} (ready after {:?})",
        all_pages.wall, served.wall, served.ready_after
    );
    assert!(
        image_bytes < 4_000_000,
        "memory stayed out of the images: {image_bytes} bytes"
    );

    // The counter continues from where it was, in the new rootfs, with the whole string.
    assert!(matches!(proc_state(restored.0), Some('S' | 'R')));
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", restored.0)).unwrap();
    assert!(cgroups.contains(&cgroup_root), "{cgroups}");
    wait_for("the restored counter", Duration::from_secs(10), || {
        counter(&rootfs2) > at_dump + 3
    });
    wait_for("a tick on our pipe", Duration::from_secs(10), || {
        first_tick(&out.text()).is_some()
    });
    let (tick, len) = first_tick(&out.text()).unwrap();
    assert!(tick > at_dump, "tick {tick} after dump at {at_dump}: reset");
    assert_eq!(len, 8_000_000, "the string came back whole");
    // The source stays stopped (a migration removes it once the target runs).
    assert_eq!(proc_state(pid), Some('T'));
    assert_eq!(counter(&f.rootfs), at_dump, "the source did not move");
    assert!(
        !dst_images.join("lazy-pages.socket").exists() || pages.exited().is_some(),
        "daemon gone"
    );
    drop(restored);
}

#[test]
fn an_unreached_page_server_times_out_and_a_gone_one_fails_the_restore() {
    let criu = require_lazy_pages();
    let f = fixture();
    let id = f.run_shell(COUNTER);
    let pid = init_pid(&f, &id);
    let src_images = images(&f, "lazy");
    let listen = free_port();

    // No daemon ever comes: the page server's wait is bounded by `finish`, and the source
    // resumes where it was.
    let lazy = criu
        .lazy_dump(&LazyDumpRequest {
            dump: DumpRequest::new(pid, src_images.clone(), DumpMode::LeaveStopped),
            listen,
            ready_timeout: Duration::from_secs(30),
        })
        .unwrap();
    let at_dump = counter(&f.rootfs);
    let t = Instant::now();
    let err = lazy.finish(Duration::from_secs(2)).unwrap_err();
    let waited = t.elapsed();
    eprintln!("unreached page server: {err} after {waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    criu.resume(&ResumeRequest {
        pid,
        unlock_network: true,
    })
    .unwrap();
    wait_for("the source to count again", Duration::from_secs(5), || {
        counter(&f.rootfs) > at_dump + 3
    });
    assert!(
        TcpListener::bind(listen).is_ok(),
        "the page server's port is free again"
    );

    // The target then finds no page server: it fails within a bounded time, and nothing of its
    // half-restored copy stays.
    let dst_images = receive_images(&f, &src_images, "received");
    let rootfs2 = copy_rootfs(&f, "rootfs2");
    let netns = Netns::new();
    let cgroup_root = format!("/{}/ins-gone-{}", f.parent, suffix());
    let t = Instant::now();
    let pages = criu
        .start_lazy_pages(&LazyPagesRequest {
            images_dir: dst_images.clone(),
            page_server: listen,
            ready_timeout: Duration::from_secs(10),
        })
        .unwrap();
    let restored = criu.restore_lazy(
        &RestoreRequest {
            images_dir: dst_images.clone(),
            rootfs: rootfs2.clone(),
            netns: Some(netns.path()),
            stdio: [None, None, None],
            cgroup_root: Some(cgroup_root.clone()),
            external_mounts: Vec::new(),
            tcp_established: true,
            // CRIU's restore does not end when the daemon dies under it (it killed its tasks
            // and waits): its timeout is what bounds it. A restore takes well under a second.
            timeout: Duration::from_secs(5),
        },
        &pages,
    );
    let restore_took = t.elapsed();
    let guard = restored.as_ref().ok().map(|r| Restored(r.pid));
    let waited = pages.wait(Duration::from_secs(10));
    let failed_after = t.elapsed();
    eprintln!(
        "gone page server: restore {:?} after {restore_took:?}; daemon {waited:?} after \
         {failed_after:?}",
        restored.as_ref().map(|r| r.pid)
    );
    assert!(
        restored.is_err() || waited.is_err(),
        "a restore without its pages must fail"
    );
    assert!(
        failed_after < Duration::from_secs(30),
        "bounded: {failed_after:?}"
    );
    assert!(pages.exited().is_some(), "the daemon is gone");
    for mount in berth_agent::runtime::cgroup::mount_points().unwrap() {
        let dir = mount.join(cgroup_root.trim_start_matches('/'));
        let left = berth_agent::runtime::cgroup::pids(&[dir]);
        assert!(
            left.is_empty(),
            "tasks of the failed restore left: {left:?}"
        );
    }
    // The caller's cleanup on failure: the half-restored tree goes.
    if let Some(g) = guard {
        let pid = g.0;
        drop(g);
        assert_eq!(proc_state(pid), None, "half-restored copy killed");
    }
    // The source kept running all along.
    let now = counter(&f.rootfs);
    wait_for(
        "the source to keep counting",
        Duration::from_secs(5),
        || counter(&f.rootfs) > now + 2,
    );
    assert_ne!(proc_state(pid), Some('T'));
}
