//! Post-copy migration end to end on real pieces: the source and target sessions
//! (`migrate::postcopy`) over a loopback QUIC connection between two node identities, a busybox
//! container keeping a counter and an 8 MB string in memory, CRIU's lazy dump, the lazy-pages
//! daemon reaching the page server through the relay streams, and a lazy restore into a new
//! rootfs, netns and cgroup. Needs root, CRIU 4.2+ at /usr/local/sbin/criu,
//! `fs.pipe-max-size=4194304` (`cargo xtask install`), `ip` and `cp`. Every test uses its own
//! container, dirs, netns and cgroups and cleans up in `Drop` even when it fails.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod lazy_support;
mod runtime_support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_agent::checkpoint::RestoreReport;
use berth_agent::migrate::postcopy::{run_source_postcopy_quic, run_target_postcopy_quic};
use berth_agent::migrate::session::{
    HookError, MigrationProgress, Phase, Received, RestorePlan, SessionError, SourceConfig,
    TargetConfig, TargetHost,
};
use berth_agent::migrate::transport::MigrationEndpoint;
use lazy_support::{
    counter, first_tick, fixture, identities, progress_log, require_lazy_pages, runtime,
    session_configs, LandingSite, PipeReader, COUNTER,
};
use runtime_support::{frozen_counter, init_pid, proc_state, wait_for, Fixture, Netns, Restored};

/// A connection from n1 (source, dialling as an agent does) to n2 (target):
/// (source's, target's, endpoints to keep).
async fn connect() -> (
    quinn::Connection,
    quinn::Connection,
    (MigrationEndpoint, MigrationEndpoint),
) {
    let (n1, n2) = identities();
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    let src = MigrationEndpoint::bind(local, &n1).unwrap();
    let dst = MigrationEndpoint::bind(local, &n2).unwrap();
    let addr = dst.local_addr().unwrap();
    let (dialled, accepted) = tokio::join!(src.connect(addr, "n2"), dst.accept());
    (dialled.unwrap(), accepted.unwrap().unwrap().0, (src, dst))
}

/// The test's target node: a copy of the rootfs, its own netns, cgroup and output pipes.
struct Landing {
    site: LandingSite,
    fail_prepare: bool,
    prepared: Mutex<Option<Received>>,
    adopted: Mutex<Option<i32>>,
    aborted: Mutex<Vec<Option<i32>>>,
}

impl TargetHost for Landing {
    async fn prepare(&self, received: &Received) -> Result<RestorePlan, HookError> {
        *self.prepared.lock().unwrap() = Some(received.clone());
        if self.fail_prepare {
            return Err("no room on this node (test)".into());
        }
        self.site.plan(received)
    }

    async fn adopt(&self, restored: &RestoreReport) -> Result<(), HookError> {
        *self.adopted.lock().unwrap() = Some(restored.pid);
        Ok(())
    }

    async fn abort(&self, restored_pid: Option<i32>) {
        self.aborted.lock().unwrap().push(restored_pid);
        if let Some(pid) = restored_pid {
            drop(Restored(pid));
        }
    }
}

/// A running counter container and the configs to move it.
struct Setup {
    f: Fixture,
    pid: i32,
    source: SourceConfig,
    target: TargetConfig,
    landing: Landing,
    out: PipeReader,
    _err: PipeReader,
    _netns: Netns,
}

fn setup(fail_prepare: bool) -> Setup {
    let f = fixture();
    std::fs::write(f.dir.path().join("resolv.src"), "nameserver 10.0.0.1\n").unwrap();
    let mut cfg = f.config(&["sh", "-c", COUNTER]);
    cfg.resolv_conf = Some(f.dir.path().join("resolv.src"));
    f.run(&cfg);
    let id = cfg.id.clone();
    wait_for("ready", Duration::from_secs(20), || {
        f.output(&id).contains("ready")
    });
    wait_for("a first tick", Duration::from_secs(10), || {
        f.output(&id).contains("len 8000000")
    });
    let pid = init_pid(&f, &id);
    let (source, target) = session_configs(&f, &id, pid);
    let netns = Netns::new();
    let (site, out, err) = LandingSite::new(&f, netns.path(), "pc");
    let landing = Landing {
        site,
        fail_prepare,
        prepared: Mutex::new(None),
        adopted: Mutex::new(None),
        aborted: Mutex::new(Vec::new()),
    };
    Setup {
        f,
        pid,
        source,
        target,
        landing,
        out,
        _err: err,
        _netns: netns,
    }
}

#[test]
fn postcopy_runs_the_container_on_the_target_and_brings_every_page() {
    let criu = Arc::new(require_lazy_pages());
    let s = setup(false);
    let rt = runtime();
    let (source_progress, source_seen) = progress_log();
    let (target_progress, target_seen) = progress_log();
    let at_start = counter(&s.f.rootfs);

    let started = Instant::now();
    let (sent, landed, restored_at) = rt.block_on(async {
        let (src_conn, dst_conn, _endpoints) = connect().await;
        let source = run_source_postcopy_quic(&src_conn, criu.clone(), &s.source, &source_progress);
        let target = async {
            let landed = run_target_postcopy_quic(
                &dst_conn,
                criu.clone(),
                &s.landing,
                &s.target,
                &target_progress,
            )
            .await;
            (landed, started.elapsed())
        };
        let (sent, (landed, restored_at)) = tokio::join!(source, target);
        (sent, landed, restored_at)
    });
    let landed = landed.unwrap();
    let restored = Restored(landed.outcome.pid);
    let sent = sent.unwrap();
    let all_pages = rt.block_on(landed.pages.wait()).unwrap();
    eprintln!(
        "post-copy: downtime {:?} (target running {restored_at:?} after start), every page \
         served {:?} after the freeze, on the target {all_pages:?} after the restore started; \
         images {} bytes, files {} ({} bytes), through the relay {} bytes ({} pages); target \
         timings {:?}",
        sent.downtime,
        sent.pages_done_after,
        sent.images_bytes,
        sent.files,
        sent.file_bytes,
        sent.relay.to_target,
        sent.relay.pages,
        sent.target
    );
    assert_eq!(sent.pages_error, None);
    assert!(sent.pages_done_after.is_some());
    assert!(
        sent.relay.to_target >= 8_000_000,
        "the pages crossed the connection: {:?}",
        sent.relay
    );
    // Every page of CRIU's replies was counted: at least the string's.
    assert_eq!(sent.relay.uncounted, 0, "{:?}", sent.relay);
    assert!(
        sent.relay.pages >= 8_000_000 / 4096,
        "pages counted: {:?}",
        sent.relay
    );
    assert_eq!(sent.relay.page_bytes, sent.relay.pages * 4096);
    assert!(sent.relay.to_target > sent.relay.page_bytes, "headers too");
    assert!(
        sent.images_bytes < 4_000_000,
        "memory stayed out of the images: {}",
        sent.images_bytes
    );
    assert_eq!(*s.landing.adopted.lock().unwrap(), Some(landed.outcome.pid));
    assert!(s.landing.aborted.lock().unwrap().is_empty());
    let received = s.landing.prepared.lock().unwrap().clone().unwrap();
    assert_eq!(received.upper_dir, None);

    // The counter continues in the new rootfs, with the whole string in memory.
    assert!(matches!(proc_state(restored.0), Some('S' | 'R')));
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", restored.0)).unwrap();
    assert!(cgroups.contains(&s.landing.site.cgroup_root), "{cgroups}");
    let (frozen, at_dump) = frozen_counter(&s.f.rootfs);
    // Empty when the freeze fell between the shell's truncate and write.
    assert!(
        at_dump >= at_start || frozen.trim().is_empty(),
        "{frozen:?}"
    );
    wait_for("the restored counter", Duration::from_secs(10), || {
        counter(&s.landing.site.rootfs) > at_dump + 3
    });
    wait_for("a tick on our pipe", Duration::from_secs(10), || {
        first_tick(&s.out.text()).is_some()
    });
    let (tick, len) = first_tick(&s.out.text()).unwrap();
    assert!(tick > at_dump, "tick {tick} after dump at {at_dump}: reset");
    assert_eq!(len, 8_000_000, "the string came back whole");
    // The source stays stopped (the agent removes it once the hub switched the instance).
    assert_eq!(proc_state(s.pid), Some('T'));
    assert_eq!(
        frozen_counter(&s.f.rootfs).1,
        at_dump,
        "the source did not move"
    );
    // The staging dir goes once every page arrived.
    wait_for("the staging dir to go", Duration::from_secs(5), || {
        !s.target.staging_dir.exists()
    });

    let phases = |seen: &Arc<Mutex<Vec<MigrationProgress>>>| {
        let mut v: Vec<Phase> = seen.lock().unwrap().iter().map(|p| p.phase).collect();
        v.dedup();
        v
    };
    let src = phases(&source_seen);
    // The switch while pages flow, then done once every page was served.
    assert!(
        src.contains(&Phase::Freeze)
            && src.contains(&Phase::Switch)
            && src.last() == Some(&Phase::Done),
        "{src:?}"
    );
    let last = source_seen.lock().unwrap().last().copied().unwrap();
    assert_eq!(last.downtime_ms, Some(sent.downtime.as_millis() as u64));
    // The source's report: its one dump, every byte on the connection, the relay's pages.
    assert_eq!(last.rounds, 1, "{last:?}");
    assert_eq!(last.pages_sent, sent.relay.pages, "{last:?}");
    assert_eq!(last.bytes_sent, sent.total_bytes_sent(), "{last:?}");
    assert!(last.bytes_sent > sent.bytes_sent + 8_000_000, "{last:?}");
    let seen = source_seen.lock().unwrap().clone();
    assert!(
        seen.windows(2)
            .all(|w| w[0].pages_sent <= w[1].pages_sent && w[0].bytes_sent <= w[1].bytes_sent),
        "figures only grow: {seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|p| p.phase as u8 >= Phase::Transfer as u8)
            .all(|p| p.rounds == 1),
        "{seen:?}"
    );
    let dst = phases(&target_seen);
    assert_eq!(dst.last(), Some(&Phase::Done), "{dst:?}");
    drop(restored);
}

#[test]
fn a_failed_restore_resumes_the_source_and_leaves_nothing_on_the_target() {
    let criu = Arc::new(require_lazy_pages());
    let s = setup(true);
    let rt = runtime();
    let (progress, _) = progress_log();
    let (sent, landed) = rt.block_on(async {
        let (src_conn, dst_conn, _endpoints) = connect().await;
        tokio::join!(
            run_source_postcopy_quic(&src_conn, criu.clone(), &s.source, &progress),
            run_target_postcopy_quic(&dst_conn, criu.clone(), &s.landing, &s.target, &progress)
        )
    });
    let err = sent.unwrap_err();
    eprintln!("source: {err}");
    assert!(
        matches!(&err, SessionError::Peer { message, .. } if message.contains("no room")),
        "{err}"
    );
    assert!(landed.is_err());
    assert_eq!(*s.landing.aborted.lock().unwrap(), vec![None]);
    assert!(!s.target.staging_dir.exists(), "staging dir removed");
    assert!(
        !s.source.work_dir.join("lazy").exists(),
        "lazy dump removed"
    );
    // The source counts on where it was.
    assert_ne!(proc_state(s.pid), Some('T'));
    let now = counter(&s.f.rootfs);
    wait_for("the source to count again", Duration::from_secs(5), || {
        counter(&s.f.rootfs) > now + 2
    });
}
