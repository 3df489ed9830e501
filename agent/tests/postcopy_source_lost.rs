//! Post-copy when the source is lost while the target still pulls the container's memory: the
//! target already runs the container (it answered `Restored`), so it must kill its copy (the
//! missing pages will never come), remove its staging dir and fail its pages task within a
//! bounded time, and no CRIU may be left behind on either side.
//!
//! Real pieces as in postcopy.rs: the source and target sessions (`migrate::postcopy`) over
//! loopback QUIC between two node identities, a busybox container holding 200 MB in a shell
//! variable, CRIU's lazy dump and page server, the relay streams and the lazy-pages daemon, a
//! lazy restore into a new rootfs, netns and cgroup. Between the two endpoints sits a UDP hop
//! ([`Link`]) that paces the source → target direction (so pulling the memory takes seconds, not
//! the ~1 s of loopback) and can go silent (a cut link).
//!
//! Needs root, CRIU 4.2+ at /usr/local/sbin/criu, `fs.pipe-max-size=4194304` (`cargo xtask
//! install`), `ip` and `cp`. Every test uses its own container, dirs, netns and cgroups and
//! cleans up in `Drop` even when it fails.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod lazy_support;
mod runtime_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_agent::checkpoint::RestoreReport;
use berth_agent::migrate::postcopy::{run_source_postcopy_quic, run_target_postcopy_quic};
use berth_agent::migrate::session::{
    HookError, Received, RestorePlan, SourceConfig, TargetConfig, TargetHost,
};
use berth_agent::migrate::transport::MigrationEndpoint;
use lazy_support::{
    fixture, identities, progress_log, require_lazy_pages, runtime, session_configs, LandingSite,
    PipeReader,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use runtime_support::{init_pid, proc_state, wait_for, Fixture, Netns};
use tokio::net::UdpSocket;

/// Bytes of memory the container holds (and the target must pull after the restore).
const RESIDENT: u64 = 200_000_000;

/// 200 MB of 'x' in a shell variable, then a counter in /tmp/c every 100 ms.
const BIG: &str = "big=$(head -c 200000000 /dev/zero | tr '\\0' x); echo ready; i=0; \
                   while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.1; done";

/// The hop's pace from source to target: the 200 MB take about 8 s, so the source can be lost
/// well before the last page.
const PACE: u64 = 25 << 20;

/// Bounds of each step, so a hang fails the test instead of stalling it. The pages task must end
/// within `LOST_BOUND` of the loss: the idle timeout (5 s) plus the daemon's exit, with room.
const RESTORE_BOUND: Duration = Duration::from_secs(90);
const LOST_BOUND: Duration = Duration::from_secs(30);

/// How the source goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// The source node dies: its page server CRIU and container are killed, its migration task
    /// aborted and its QUIC endpoint closed.
    Dies,
    /// The link goes silent both ways (a partition): nothing is closed, both sides must notice
    /// by themselves.
    Cut,
}

#[test]
fn a_source_that_dies_while_pages_arrive_fails_the_target_cleanly() {
    lose_the_source_while_pages_arrive(Loss::Dies);
}

#[test]
fn a_link_cut_while_pages_arrive_fails_both_sides_cleanly() {
    lose_the_source_while_pages_arrive(Loss::Cut);
}

fn lose_the_source_while_pages_arrive(loss: Loss) {
    let criu = Arc::new(require_lazy_pages());
    let s = setup();
    let work = s.source.work_dir.parent().unwrap().to_owned();
    // Dropped before the runtime: kills whatever CRIU of this test a failure left running (a
    // page server left serving would hold a blocking thread, and the runtime's shutdown, for
    // minutes).
    let rt = Rt(Some(runtime()));
    let _sweep = CriuSweep(work.clone());
    let (progress, _) = progress_log();

    let (n1, n2) = identities();
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    let (src_ep, dst_ep, link, src_conn, dst_conn) = rt.block_on(async {
        let src_ep = MigrationEndpoint::bind(local, &n1).unwrap();
        let dst_ep = MigrationEndpoint::bind(local, &n2).unwrap();
        let link = Link::start(dst_ep.local_addr().unwrap(), PACE).await;
        let (dialled, accepted) = tokio::join!(src_ep.connect(link.addr, "n2"), dst_ep.accept());
        let (src_conn, dst_conn) = (dialled.unwrap(), accepted.unwrap().unwrap().0);
        (src_ep, dst_ep, link, src_conn, dst_conn)
    });

    let source = {
        let (conn, criu, cfg, progress) = (
            src_conn.clone(),
            criu.clone(),
            s.source.clone(),
            progress.clone(),
        );
        rt.spawn(async move { run_source_postcopy_quic(&conn, criu, &cfg, &progress).await })
    };
    let landed = rt
        .block_on(async {
            let target =
                run_target_postcopy_quic(&dst_conn, criu.clone(), &s.landing, &s.target, &progress);
            tokio::time::timeout(RESTORE_BOUND, target).await
        })
        .expect("the target did not restore in time")
        .expect("the target restored the container");
    let pid = landed.outcome.pid;
    let restored = Reaped::new(pid);
    eprintln!("target runs the container as pid {pid}");

    // The container runs on the target and its memory is still on the way.
    assert!(
        !matches!(proc_state(pid), None | Some('Z')),
        "restored init runs"
    );
    let daemon = criu_under(&s.target.staging_dir);
    assert_eq!(daemon.len(), 1, "one lazy-pages daemon: {daemon:?}");
    let before = link.forwarded();
    std::thread::sleep(Duration::from_millis(500));
    let during = link.forwarded();
    eprintln!("pages on the way: {before} then {during} bytes of {RESIDENT} crossed the link");
    assert!(during > before, "pages are arriving");
    assert!(
        during < RESIDENT,
        "the pages were not all there yet ({during} bytes crossed): the loss would come too late"
    );
    let page_server = criu_under(&s.source.work_dir.join("lazy"));
    assert_eq!(page_server.len(), 1, "one page server: {page_server:?}");

    let lost = Instant::now();
    match loss {
        Loss::Dies => {
            // Everything of the node at once: CRIU, the (frozen) container, the agent's task
            // and its socket.
            kill(Pid::from_raw(page_server[0].0), Signal::SIGKILL).unwrap();
            let _ = kill(Pid::from_raw(s.pid), Signal::SIGKILL);
            source.abort();
            src_ep.close();
        }
        Loss::Cut => link.cut(),
    }

    let pages = rt
        .block_on(async { tokio::time::timeout(LOST_BOUND, landed.pages.wait()).await })
        .expect("the target's pages task hung after the source was lost");
    eprintln!(
        "target's pages task ended {:?} after the loss: {pages:?}",
        lost.elapsed()
    );
    let error = pages.expect_err("the pages cannot all have arrived");
    assert!(!error.is_empty());

    // Its copy is dead: killed, not exited on its own.
    let status = restored.wait(Duration::from_secs(10));
    assert!(
        matches!(status, WaitStatus::Signaled(_, Signal::SIGKILL, _)),
        "restored init: {status:?}"
    );
    assert!(!s.target.staging_dir.exists(), "staging dir removed");
    assert!(
        dst_conn.close_reason().is_some(),
        "the target closed its connection"
    );

    match loss {
        Loss::Dies => {
            let aborted = rt
                .block_on(async { tokio::time::timeout(LOST_BOUND, source).await })
                .unwrap();
            assert!(aborted.unwrap_err().is_cancelled());
        }
        Loss::Cut => {
            // The source notices too (its QUIC idle timeout; the relay then resets the page
            // server's connection, so CRIU fails the transfer and resumes the tasks) and must
            // not keep a live copy: it kills its tasks.
            let sent = rt
                .block_on(async { tokio::time::timeout(LOST_BOUND, source).await })
                .expect("the source hung after the link was cut")
                .unwrap();
            eprintln!("source after the cut: {sent:?}");
            let outcome = sent.expect("the target had restored: the source's job went on");
            assert!(
                outcome.pages_error.is_some(),
                "the source knows its pages were not all served: {outcome:?}"
            );
            wait_for("the source's tasks to die", Duration::from_secs(10), || {
                matches!(proc_state(s.pid), None | Some('Z'))
            });
        }
    }

    wait_for(
        "this test's CRIU processes to go",
        Duration::from_secs(10),
        || criu_under(&work).is_empty(),
    );
    drop((src_conn, dst_conn, link));
    drop((src_ep, dst_ep));
}

// ------------------------------------------------------------------------------------------
// Target host
// ------------------------------------------------------------------------------------------

/// The test's target node: a copy of the rootfs, its own netns, cgroup and output pipes.
struct Landing {
    site: LandingSite,
}

impl TargetHost for Landing {
    async fn prepare(&self, received: &Received) -> Result<RestorePlan, HookError> {
        self.site.plan(received)
    }

    async fn adopt(&self, _restored: &RestoreReport) -> Result<(), HookError> {
        Ok(())
    }

    async fn abort(&self, restored_pid: Option<i32>) {
        if let Some(pid) = restored_pid {
            drop(Reaped::new(pid));
        }
    }
}

/// A running container holding `RESIDENT` bytes and the configs to move it. Fields drop in
/// order: the output readers and netns go before the fixture removes containers, cgroups and
/// dirs.
struct Setup {
    pid: i32,
    source: SourceConfig,
    target: TargetConfig,
    landing: Landing,
    _out: PipeReader,
    _err: PipeReader,
    _netns: Netns,
    _f: Fixture,
}

fn setup() -> Setup {
    let f = fixture();
    std::fs::write(f.dir.path().join("resolv.src"), "nameserver 10.0.0.1\n").unwrap();
    let mut cfg = f.config(&["sh", "-c", BIG]);
    cfg.resolv_conf = Some(f.dir.path().join("resolv.src"));
    // Building the string peaks at twice its size.
    cfg.memory_bytes = 768 << 20;
    f.run(&cfg);
    let id = cfg.id.clone();
    wait_for("ready", Duration::from_secs(60), || {
        f.output(&id).contains("ready")
    });
    let pid = init_pid(&f, &id);
    let (source, target) = session_configs(&f, &id, pid);
    let netns = Netns::new();
    let (site, out, err) = LandingSite::new(&f, netns.path(), "pl");
    let landing = Landing { site };
    Setup {
        pid,
        source,
        target,
        landing,
        _out: out,
        _err: err,
        _netns: netns,
        _f: f,
    }
}

// ------------------------------------------------------------------------------------------
// Guards and probes
// ------------------------------------------------------------------------------------------

/// The test's runtime; shut down with a bound so a blocking thread stuck in CRIU cannot hang
/// the test's end.
struct Rt(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Rt {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().unwrap()
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_timeout(Duration::from_secs(10));
        }
    }
}

/// Kills (on drop) every CRIU process naming something under the dir.
struct CriuSweep(PathBuf);

impl Drop for CriuSweep {
    fn drop(&mut self) {
        for (pid, what) in criu_under(&self.0) {
            eprintln!("killing CRIU {pid} left by the test: {what}");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A restored init (a child of this test process, its subreaper): killed and reaped on drop
/// unless [`Reaped::wait`] saw it end.
struct Reaped(Option<i32>);

impl Reaped {
    fn new(pid: i32) -> Self {
        Self(Some(pid))
    }

    /// Waits (bounded) for the process to end on its own and reaps it.
    fn wait(mut self, timeout: Duration) -> WaitStatus {
        let pid = Pid::from_raw(self.0.unwrap());
        let deadline = Instant::now() + timeout;
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)).unwrap() {
                WaitStatus::StillAlive => {}
                status => {
                    self.0 = None;
                    return status;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the restored init {pid} still runs"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let pid = Pid::from_raw(pid);
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

/// Live CRIU processes whose command line, working dir or open files name something under
/// `dir`, with what named it: (pid, command line).
fn criu_under(dir: &Path) -> Vec<(i32, String)> {
    let dir = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let proc = entry.path();
        let comm = std::fs::read_to_string(proc.join("comm")).unwrap_or_default();
        if comm.trim() != "criu" || matches!(proc_state(pid), None | Some('Z')) {
            continue;
        }
        let cmdline = std::fs::read(proc.join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let mut names = vec![cmdline.clone()];
        names.extend(
            std::fs::read_link(proc.join("cwd"))
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
        );
        if let Ok(fds) = std::fs::read_dir(proc.join("fd")) {
            names.extend(
                fds.flatten()
                    .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                    .map(|p| p.to_string_lossy().into_owned()),
            );
        }
        if names.iter().any(|n| n.contains(&dir)) {
            found.push((pid, cmdline));
        }
    }
    found
}

// ------------------------------------------------------------------------------------------
// The link
// ------------------------------------------------------------------------------------------

/// A UDP hop between the source's endpoint (which dials [`Link::addr`]) and the target's:
/// paces the source → target direction to `pace` bytes a second (datagrams beyond wait in the
/// socket buffer or are dropped there, as at a slow router) and, once cut, drops every datagram
/// both ways. Stops on drop.
struct Link {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Link {
    async fn start(target: SocketAddr, pace: u64) -> Self {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let front = Arc::new(UdpSocket::bind(local).await.unwrap());
        let back = Arc::new(UdpSocket::bind(local).await.unwrap());
        back.connect(target).await.unwrap();
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let peer = Arc::new(Mutex::new(None::<SocketAddr>));
        let up = {
            let (front, back, cut, forwarded, peer) = (
                front.clone(),
                back.clone(),
                cut.clone(),
                forwarded.clone(),
                peer.clone(),
            );
            tokio::spawn(async move {
                // A little credit, so the timer's millisecond steps do not slow the pace.
                const BURST: Duration = Duration::from_millis(5);
                let mut buf = vec![0u8; 65536];
                let mut next = tokio::time::Instant::now();
                loop {
                    let Ok((n, from)) = front.recv_from(&mut buf).await else {
                        continue;
                    };
                    *peer.lock().unwrap() = Some(from);
                    let now = tokio::time::Instant::now();
                    next = next.max(now - BURST) + Duration::from_secs_f64(n as f64 / pace as f64);
                    if next > now {
                        tokio::time::sleep_until(next).await;
                    }
                    if cut.load(Ordering::Relaxed) {
                        continue;
                    }
                    if back.send(&buf[..n]).await.is_ok() {
                        forwarded.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            })
        };
        let down = {
            let cut = cut.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    // A connected socket reports the target's ICMP errors here: keep going.
                    let Ok(n) = back.recv(&mut buf).await else {
                        continue;
                    };
                    let to = *peer.lock().unwrap();
                    if let (Some(to), false) = (to, cut.load(Ordering::Relaxed)) {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            })
        };
        Self {
            addr,
            cut,
            forwarded,
            tasks: vec![up, down],
        }
    }

    /// Bytes forwarded from the source to the target so far.
    fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Drops every datagram from now on, both ways.
    fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
