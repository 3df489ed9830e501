#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
use super::*;
use crate::checkpoint::DUMP_LOG;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::Mutex;
use std::task::{Context, Poll};

use tokio::io::ReadBuf;

use crate::checkpoint::fake::{Call, FakeCheckpointer, Op};
use crate::checkpoint::{Features, METADATA_FILE};
use crate::migrate::pages::test_page;
use crate::migrate::pages::{MemoryOwner, Page, PageContent, PageKey};

const PID: MemoryOwner = MemoryOwner::Task(10);
const PID_NEW: MemoryOwner = MemoryOwner::Task(11);
const SHM: MemoryOwner = MemoryOwner::Shmem(3);

/// A synthetic address space: page → content seed.
type Memory = BTreeMap<PageKey, u64>;

fn key(owner: MemoryOwner, index: u64) -> PageKey {
    PageKey {
        owner,
        vaddr: 0x40_0000 + index * PAGE_SIZE as u64,
    }
}

/// `count` pages of `owner`, seeds from `seed`.
fn memory(owner: MemoryOwner, count: u64, seed: u64) -> Memory {
    (0..count).map(|i| (key(owner, i), seed + i)).collect()
}

/// `base` with pages `range` of `owner` given new contents.
fn changed(base: &Memory, owner: MemoryOwner, range: std::ops::Range<u64>, seed: u64) -> Memory {
    let mut out = base.clone();
    for i in range {
        out.insert(key(owner, i), seed + i);
    }
    out
}

/// Writes `memory` into `dir` as CRIU would: valid pagemap/pages images (written through a
/// page store, which writes what `criu restore` reads), other images, the metadata, a log.
fn write_dump(dir: &Path, memory: &Memory, generation: usize) {
    let scratch = tempfile::tempdir().unwrap();
    let mut store = PageStore::create(scratch.path()).unwrap();
    let owners: BTreeSet<MemoryOwner> = memory.keys().map(|k| k.owner).collect();
    for owner in owners {
        store.apply(&Change::OwnerAdded(owner)).unwrap();
    }
    for (key, seed) in memory {
        let page = Page {
            key: *key,
            lazy: false,
            data: test_page(*seed),
        };
        store.apply(&Change::Page(page)).unwrap();
    }
    fs::create_dir_all(dir).unwrap();
    store.write_images(dir).unwrap();
    fs::write(
        dir.join("core-10.img"),
        format!("core of dump {generation}"),
    )
    .unwrap();
    fs::write(dir.join("inventory.img"), b"inventory").unwrap();
    let metadata = Metadata {
        stdio: vec!["/dev/null".into(), "pipe:[1]".into(), "pipe:[2]".into()],
        external_netns: true,
        external_mounts: vec!["/etc/resolv.conf".into()],
        pid: 10,
    };
    fs::write(
        dir.join(METADATA_FILE),
        serde_json::to_vec(&metadata).unwrap(),
    )
    .unwrap();
    fs::write(dir.join(DUMP_LOG), b"criu log: not for the target").unwrap();
}

/// A fake CRIU whose dumps produce `script` in turn (the last one repeats).
fn fake_criu(script: Vec<Memory>) -> Arc<FakeCheckpointer> {
    let state = Mutex::new(0usize);
    Arc::new(
        FakeCheckpointer::new(Features::default()).with_on_dump(Box::new(move |req| {
            let mut next = state.lock().unwrap();
            let index = (*next).min(script.len() - 1);
            *next += 1;
            write_dump(&req.images_dir, &script[index], index);
        })),
    )
}

/// What the fake host saw of the received images.
#[derive(Debug, Default)]
struct Seen {
    pages: BTreeMap<PageKey, Vec<u8>>,
    image_files: BTreeSet<String>,
    metadata: Metadata,
    received: Option<Received>,
}

/// A target host that records its calls and can fail.
#[derive(Debug, Default)]
struct FakeHost {
    rootfs: PathBuf,
    calls: Mutex<Vec<String>>,
    seen: Mutex<Seen>,
    fail_adopt: bool,
}

impl FakeHost {
    fn new(rootfs: &Path) -> Self {
        Self {
            rootfs: rootfs.to_owned(),
            ..Default::default()
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl TargetHost for FakeHost {
    async fn prepare(&self, received: &Received) -> Result<RestorePlan, HookError> {
        self.calls.lock().unwrap().push("prepare".into());
        let mut seen = self.seen.lock().unwrap();
        for page in pages::read_dump(&received.images_dir).unwrap() {
            let page = page.unwrap();
            let PageContent::Bytes(data) = page.content else {
                panic!("written images have a page in a parent");
            };
            seen.pages.insert(page.key, data.to_vec());
        }
        seen.image_files = fs::read_dir(&received.images_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        seen.metadata = received.metadata.clone();
        seen.received = Some(received.clone());
        Ok(RestorePlan {
            rootfs: self.rootfs.clone(),
            netns: Some("/run/netns/test".into()),
            stdio: [None, None, None],
            cgroup_root: Some("/berth-n2/ins-1".into()),
            external_mounts: Vec::new(),
            tcp_established: true,
            timeout: Duration::from_secs(5),
        })
    }

    async fn adopt(&self, restored: &RestoreReport) -> Result<(), HookError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("adopt {}", restored.pid));
        if self.fail_adopt {
            return Err("log shim would not start".into());
        }
        Ok(())
    }

    async fn abort(&self, restored_pid: Option<i32>) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("abort {restored_pid:?}"));
    }
}

fn timeouts() -> Timeouts {
    Timeouts {
        handshake: Duration::from_secs(5),
        peer: Duration::from_secs(5),
        final_phase: Duration::from_secs(10),
        verdict: Duration::from_secs(5),
    }
}

fn source_config(work: &Path, upper: Option<PathBuf>, precopy: PrecopyPolicy) -> SourceConfig {
    SourceConfig {
        migration_id: "mig-1".into(),
        instance_id: "ctr-1-0".into(),
        dump: DumpRequest::new(4242, PathBuf::new(), DumpMode::LeaveRunning),
        work_dir: work.join("source-work"),
        upper_dir: upper,
        precopy,
        timeouts: timeouts(),
        // Small frames: many batches per round, so the streaming is exercised.
        max_payload: 64 * 1024,
    }
}

fn target_config(work: &Path) -> TargetConfig {
    TargetConfig {
        migration_id: "mig-1".into(),
        instance_id: "ctr-1-0".into(),
        staging_dir: work.join("target-staging").join("mig-1"),
        max_bytes: 64 << 20,
        chown: false,
        timeouts: timeouts(),
        max_payload: 64 * 1024,
    }
}

fn policy(max_rounds: u32, min_pages: u64) -> PrecopyPolicy {
    PrecopyPolicy {
        max_rounds,
        shrink_ratio: 0.8,
        min_pages,
    }
}

/// Cuts every wrapped stream once the triggering one has written its budget.
#[derive(Debug)]
struct Cut {
    budget: AtomicI64,
    cut: AtomicBool,
}

struct Cuttable<S> {
    inner: S,
    cut: Arc<Cut>,
    counts: bool,
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cuttable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.cut.cut.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if self.counts {
            let left = self
                .cut
                .budget
                .fetch_sub(buf.len() as i64, Ordering::SeqCst);
            if left <= buf.len() as i64 {
                self.cut.cut.store(true, Ordering::SeqCst);
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Cuttable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Progress reports of one side.
fn recorder() -> (ProgressSink, Arc<Mutex<Vec<MigrationProgress>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink_seen = Arc::clone(&seen);
    let sink: ProgressSink = Arc::new(move |p: &MigrationProgress| {
        sink_seen.lock().unwrap().push(*p);
    });
    (sink, seen)
}

struct Run {
    source: Result<SourceOutcome, SessionError>,
    target: Result<TargetOutcome, SessionError>,
    source_progress: Vec<MigrationProgress>,
    target_progress: Vec<MigrationProgress>,
}

/// Runs both sides against each other over in-memory pipes; `cut` cuts the link once the
/// source's files stream has written that many bytes.
async fn migrate(
    source_criu: Arc<FakeCheckpointer>,
    target_criu: Arc<FakeCheckpointer>,
    host: &FakeHost,
    source: &SourceConfig,
    target: &TargetConfig,
    cut: Option<i64>,
) -> Run {
    let (source_control, target_control) = tokio::io::duplex(32 * 1024);
    let (source_files, target_files) = tokio::io::duplex(32 * 1024);
    let (source_rx, source_tx) = tokio::io::split(source_control);
    let (target_rx, target_tx) = tokio::io::split(target_control);
    let link = Arc::new(Cut {
        budget: AtomicI64::new(cut.unwrap_or(i64::MAX)),
        cut: AtomicBool::new(false),
    });
    let streams = SourceStreams {
        control_rx: source_rx,
        control_tx: Cuttable {
            inner: source_tx,
            cut: Arc::clone(&link),
            counts: false,
        },
        files_tx: Cuttable {
            inner: source_files,
            cut: Arc::clone(&link),
            counts: true,
        },
    };
    let (source_sink, source_seen) = recorder();
    let (target_sink, target_seen) = recorder();
    let source_run = async {
        let result = run_source(source_criu, &NoSourceHooks, source, streams, &source_sink).await;
        // The streams went with the source's future: the target sees the link gone.
        result
    };
    let target_run = run_target(
        target_criu,
        host,
        target,
        TargetStreams {
            control_rx: target_rx,
            control_tx: target_tx,
            files_rx: target_files,
        },
        &target_sink,
    );
    let (source_result, target_result) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(source_run, target_run)
    })
    .await
    .expect("migration hung");
    let source_progress = source_seen.lock().unwrap().clone();
    let target_progress = target_seen.lock().unwrap().clone();
    Run {
        source: source_result,
        target: target_result,
        source_progress,
        target_progress,
    }
}

fn dump_modes(calls: &[Call]) -> Vec<DumpMode> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Dump { mode, .. } => Some(*mode),
            _ => None,
        })
        .collect()
}

fn resumed(calls: &[Call]) -> bool {
    calls.iter().any(|c| matches!(c, Call::Resume(_)))
}

fn expected_pages(memory: &Memory) -> BTreeMap<PageKey, Vec<u8>> {
    memory
        .iter()
        .map(|(key, seed)| (*key, test_page(*seed).to_vec()))
        .collect()
}

#[test]
fn precopy_stops_when_the_delta_stops_shrinking_or_at_the_cap() {
    let p = policy(8, 16);
    assert!(!p.should_stop(1, 1000, None));
    assert!(!p.should_stop(2, 500, Some(1000)));
    assert!(p.should_stop(3, 400, Some(500)), "400 >= 0.8 * 500");
    assert!(p.should_stop(2, 16, Some(1000)), "small enough");
    assert!(p.should_stop(8, 100, Some(1000)), "round cap");
    assert!(policy(0, 0).should_stop(1, 100, None));
}

#[tokio::test]
async fn rounds_send_only_changed_pages_and_the_target_gets_the_last_dump() {
    let work = tempfile::tempdir().unwrap();
    let m1: Memory = memory(PID, 64, 0)
        .into_iter()
        .chain(memory(SHM, 8, 500))
        .collect();
    let m2 = changed(&m1, PID, 0..30, 1000);
    // Round 3: 4 pages change, a process appears with 3 pages, one page is unmapped.
    let mut m3 = changed(&m2, PID, 40..44, 2000);
    m3.extend(memory(PID_NEW, 3, 3000));
    m3.remove(&key(PID, 63));
    // Final: the shared segment goes, 2 more pages change.
    let mut m4 = changed(&m3, PID, 0..2, 4000);
    m4.retain(|k, _| k.owner != SHM);
    let source_criu = fake_criu(vec![m1, m2, m3, m4.clone()]);
    let target_criu = Arc::new(FakeCheckpointer::new(Features::default()));
    let host = FakeHost::new(work.path());
    let source = source_config(work.path(), None, policy(3, 2));
    let target = target_config(work.path());

    let run = migrate(
        source_criu.clone(),
        target_criu.clone(),
        &host,
        &source,
        &target,
        None,
    )
    .await;
    let outcome = run.source.unwrap();
    let landed = run.target.unwrap();

    let sent: Vec<u64> = outcome.rounds.iter().map(|r| r.pages_sent).collect();
    assert_eq!(sent, vec![72, 30, 7, 2], "round 1 all, then only changes");
    assert_eq!(outcome.rounds[2].pages_gone, 1);
    assert_eq!(outcome.rounds[3].pages_gone, 8, "the segment's pages");
    assert_eq!(outcome.pages_sent, 111);
    assert_eq!(landed.rounds, 4);
    assert_eq!(landed.pages_received, 111);
    assert_eq!(outcome.target, landed.timings);
    assert_eq!(landed.timings.pid, 1001);
    assert!(outcome.bytes_sent > 111 * PAGE_SIZE as u64);

    let seen = host.seen.lock().unwrap();
    assert_eq!(
        seen.pages,
        expected_pages(&m4),
        "target images = final dump"
    );
    assert!(seen.image_files.contains("core-10.img"));
    assert!(seen.image_files.contains(METADATA_FILE));
    assert!(
        !seen.image_files.contains(DUMP_LOG),
        "{:?}",
        seen.image_files
    );
    assert_eq!(seen.metadata.pid, 10);
    assert_eq!(seen.received.as_ref().unwrap().pages, m4.len() as u64);
    drop(seen);
    assert_eq!(host.calls(), vec!["prepare", "adopt 1001"]);

    let modes = dump_modes(&source_criu.calls());
    use DumpMode::{LeaveRunning, LeaveStopped};
    assert_eq!(
        modes,
        vec![LeaveRunning, LeaveRunning, LeaveRunning, LeaveStopped]
    );
    assert!(!resumed(&source_criu.calls()));
    let restore = target_criu
        .calls()
        .into_iter()
        .find_map(|c| match c {
            Call::Restore {
                images_dir,
                rootfs,
                netns,
                cgroup_root,
            } => Some((images_dir, rootfs, netns, cgroup_root)),
            _ => None,
        })
        .unwrap();
    assert_eq!(restore.0, target.staging_dir.join("images"));
    assert_eq!(restore.1, work.path());
    assert_eq!(restore.2, Some(PathBuf::from("/run/netns/test")));

    // Spent files are gone on both sides; the staging dir stays for the upper dir.
    assert!(!target.staging_dir.join("images").exists());
    assert!(!target.staging_dir.join("store").exists());
    assert_eq!(fs::read_dir(&source.work_dir).unwrap().count(), 0);

    let last = run.source_progress.last().unwrap();
    assert_eq!(last.phase, Phase::Switch);
    assert_eq!(last.rounds, 4);
    assert_eq!(last.pages_sent, 111);
    assert!(last.downtime_ms.is_some());
    let phases: Vec<Phase> = run.source_progress.iter().map(|p| p.phase).collect();
    for phase in [
        Phase::Prepare,
        Phase::Precopy,
        Phase::Freeze,
        Phase::Transfer,
        Phase::Restore,
    ] {
        assert!(phases.contains(&phase), "{phase} missing from {phases:?}");
    }
    let last = run.target_progress.last().unwrap();
    assert_eq!(last.phase, Phase::Done);
    assert_eq!(last.pages_sent, 111);
}

#[tokio::test]
async fn precopy_ends_when_the_delta_stops_shrinking() {
    let work = tempfile::tempdir().unwrap();
    let m1 = memory(PID, 64, 0);
    let m2 = changed(&m1, PID, 0..20, 1000);
    let m3 = changed(&m2, PID, 20..40, 2000);
    let m4 = changed(&m3, PID, 40..45, 3000);
    let source_criu = fake_criu(vec![m1, m2, m3, m4.clone()]);
    let target_criu = Arc::new(FakeCheckpointer::new(Features::default()));
    let host = FakeHost::new(work.path());
    let source = source_config(work.path(), None, policy(8, 0));

    let run = migrate(
        source_criu.clone(),
        target_criu,
        &host,
        &source,
        &target_config(work.path()),
        None,
    )
    .await;
    let outcome = run.source.unwrap();
    run.target.unwrap();
    let sent: Vec<u64> = outcome.rounds.iter().map(|r| r.pages_sent).collect();
    // 20 after 20 did not shrink: pre-copy stops after round 3, the 4th dump is the final one.
    assert_eq!(sent, vec![64, 20, 20, 5]);
    assert_eq!(
        dump_modes(&source_criu.calls()).last(),
        Some(&DumpMode::LeaveStopped)
    );
    assert_eq!(host.seen.lock().unwrap().pages, expected_pages(&m4));
}

#[tokio::test]
async fn stop_and_copy_sends_everything_in_the_final_round() {
    let work = tempfile::tempdir().unwrap();
    let m1 = memory(PID, 16, 0);
    let source_criu = fake_criu(vec![m1.clone()]);
    let host = FakeHost::new(work.path());
    let run = migrate(
        source_criu.clone(),
        Arc::new(FakeCheckpointer::new(Features::default())),
        &host,
        &source_config(work.path(), None, policy(0, 0)),
        &target_config(work.path()),
        None,
    )
    .await;
    let outcome = run.source.unwrap();
    assert_eq!(outcome.rounds.len(), 1);
    assert_eq!(outcome.rounds[0].pages_sent, 16);
    assert_eq!(
        dump_modes(&source_criu.calls()),
        vec![DumpMode::LeaveStopped]
    );
    assert_eq!(host.seen.lock().unwrap().pages, expected_pages(&m1));
}

#[tokio::test]
async fn a_target_error_resumes_the_source() {
    let work = tempfile::tempdir().unwrap();
    let source_criu = fake_criu(vec![memory(PID, 32, 0)]);
    let target_criu = Arc::new(FakeCheckpointer::new(Features::default()));
    target_criu.fail(Op::Restore, "restore: cannot bind the netns");
    let host = FakeHost::new(work.path());
    let target = target_config(work.path());
    let run = migrate(
        source_criu.clone(),
        target_criu,
        &host,
        &source_config(work.path(), None, policy(2, 0)),
        &target,
        None,
    )
    .await;

    let err = run.source.unwrap_err();
    assert!(
        matches!(&err, SessionError::Peer { message, .. } if message.contains("cannot bind the netns")),
        "{err}"
    );
    assert!(resumed(&source_criu.calls()), "{:?}", source_criu.calls());
    let Call::Resume(req) = source_criu.calls().last().cloned().unwrap() else {
        panic!("resume is not the last call");
    };
    assert_eq!(req.pid, 4242);
    assert!(req.unlock_network);

    let err = run.target.unwrap_err();
    assert!(
        matches!(
            err,
            SessionError::Checkpoint {
                phase: Phase::Restore,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(host.calls(), vec!["prepare", "abort None"]);
    assert!(!target.staging_dir.exists(), "staging dir left behind");
}

#[tokio::test]
async fn a_failed_adopt_kills_the_restored_copy_and_resumes_the_source() {
    let work = tempfile::tempdir().unwrap();
    let source_criu = fake_criu(vec![memory(PID, 8, 0)]);
    let mut host = FakeHost::new(work.path());
    host.fail_adopt = true;
    let target = target_config(work.path());
    let run = migrate(
        source_criu.clone(),
        Arc::new(FakeCheckpointer::new(Features::default())),
        &host,
        &source_config(work.path(), None, policy(1, 0)),
        &target,
        None,
    )
    .await;
    assert!(run.source.unwrap_err().to_string().contains("log shim"));
    assert!(resumed(&source_criu.calls()));
    assert!(matches!(
        run.target.unwrap_err(),
        SessionError::Hook {
            phase: Phase::Switch,
            ..
        }
    ));
    assert_eq!(
        host.calls(),
        vec!["prepare", "adopt 1001", "abort Some(1001)"]
    );
    assert!(!target.staging_dir.exists());
}

#[tokio::test]
async fn a_cut_link_resumes_the_source_and_cleans_the_target() {
    let work = tempfile::tempdir().unwrap();
    let upper = work.path().join("upper");
    fs::create_dir(&upper).unwrap();
    fs::write(upper.join("big"), vec![7u8; 300_000]).unwrap();
    let source_criu = fake_criu(vec![memory(PID, 32, 0), memory(PID, 32, 100)]);
    let host = FakeHost::new(work.path());
    let target = target_config(work.path());
    // The files stream carries only its hello before the freeze: the cut falls in the transfer.
    let run = migrate(
        source_criu.clone(),
        Arc::new(FakeCheckpointer::new(Features::default())),
        &host,
        &source_config(work.path(), Some(upper), policy(1, 0)),
        &target,
        Some(100_000),
    )
    .await;
    let err = run.source.unwrap_err();
    assert_eq!(err.phase(), Phase::Transfer, "{err}");
    assert!(resumed(&source_criu.calls()));
    let err = run.target.unwrap_err();
    assert!(
        matches!(err, SessionError::Wire { .. }),
        "the target sees the link go: {err}"
    );
    assert!(
        host.calls().is_empty(),
        "nothing prepared: {:?}",
        host.calls()
    );
    assert!(!target.staging_dir.exists());
    assert_eq!(
        fs::read_dir(work.path().join("source-work"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn a_hello_for_another_migration_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let source_criu = fake_criu(vec![memory(PID, 8, 0)]);
    let host = FakeHost::new(work.path());
    let mut target = target_config(work.path());
    target.migration_id = "mig-other".into();
    let run = migrate(
        source_criu.clone(),
        Arc::new(FakeCheckpointer::new(Features::default())),
        &host,
        &source_config(work.path(), None, policy(2, 0)),
        &target,
        None,
    )
    .await;
    let err = run.target.unwrap_err();
    assert!(matches!(err, SessionError::Refused { .. }), "{err}");
    let err = run.source.unwrap_err();
    assert!(
        matches!(&err, SessionError::Peer { phase: Phase::Prepare, message } if message.contains("mig-other")),
        "{err}"
    );
    assert!(
        dump_modes(&source_criu.calls()).is_empty(),
        "nothing dumped"
    );
    assert!(!resumed(&source_criu.calls()));
    assert!(!target.staging_dir.exists());
}

#[tokio::test]
async fn a_target_over_its_disk_limit_refuses() {
    let work = tempfile::tempdir().unwrap();
    let source_criu = fake_criu(vec![memory(PID, 64, 0)]);
    let host = FakeHost::new(work.path());
    let mut target = target_config(work.path());
    target.max_bytes = 32 * PAGE_SIZE as u64;
    let run = migrate(
        source_criu.clone(),
        Arc::new(FakeCheckpointer::new(Features::default())),
        &host,
        &source_config(work.path(), None, policy(2, 0)),
        &target,
        None,
    )
    .await;
    let err = run.target.unwrap_err();
    assert!(matches!(err, SessionError::TooLarge { .. }), "{err}");
    assert!(run.source.unwrap_err().to_string().contains("limit"));
    assert!(!target.staging_dir.exists());
}

fn build_upper(root: &Path) {
    fs::create_dir_all(root.join("etc/app")).unwrap();
    fs::create_dir_all(root.join("var/empty")).unwrap();
    fs::create_dir_all(root.join("ro")).unwrap();
    fs::write(root.join("etc/app/config"), b"key = value\n").unwrap();
    fs::write(root.join("etc/app/secret"), b"s3cret").unwrap();
    fs::set_permissions(
        root.join("etc/app/secret"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(root.join("var/big.bin"), big).unwrap();
    std::os::unix::fs::symlink("app/config", root.join("etc/link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", root.join("dangling")).unwrap();
    fs::write(
        root.join("ro/inside"),
        b"written before the dir went read-only",
    )
    .unwrap();
    fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::set_permissions(root.join("var/empty"), fs::Permissions::from_mode(0o1777)).unwrap();
}

/// Every entry below `root`: relative path → (kind, mode, content or link target).
fn tree(root: &Path) -> BTreeMap<String, (String, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.mode() & 0o7777;
            let value = if meta.is_dir() {
                pending.push(path.clone());
                ("dir".to_owned(), mode, Vec::new())
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                (
                    "link".to_owned(),
                    0,
                    target.to_str().unwrap().as_bytes().to_vec(),
                )
            } else {
                ("file".to_owned(), mode, fs::read(&path).unwrap())
            };
            out.insert(rel, value);
        }
    }
    let root_mode = fs::metadata(root).unwrap().mode() & 0o7777;
    out.insert(".".into(), ("dir".into(), root_mode, Vec::new()));
    out
}

#[tokio::test]
async fn the_upper_dir_arrives_identical() {
    let work = tempfile::tempdir().unwrap();
    let upper = work.path().join("upper");
    build_upper(&upper);
    fs::set_permissions(&upper, fs::Permissions::from_mode(0o751)).unwrap();
    let host = FakeHost::new(work.path());
    let target = target_config(work.path());
    let run = migrate(
        fake_criu(vec![memory(PID, 4, 0)]),
        Arc::new(FakeCheckpointer::new(Features::default())),
        &host,
        &source_config(work.path(), Some(upper.clone()), policy(1, 0)),
        &target,
        None,
    )
    .await;
    let outcome = run.source.unwrap();
    let landed = run.target.unwrap();
    let received_upper = landed.upper_dir.unwrap();
    assert_eq!(received_upper, target.staging_dir.join("upper"));
    assert_eq!(tree(&received_upper), tree(&upper));
    // 6 upper files, plus core, inventory and metadata images.
    assert_eq!(outcome.files, 9);
    let received = host.seen.lock().unwrap().received.clone().unwrap();
    assert_eq!(received.files, 9);
    assert_eq!(received.upper_dir, Some(received_upper.clone()));
    // Read-only dirs got their mode after their contents were written.
    fs::set_permissions(received_upper.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(upper.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn a_fifo_in_the_upper_dir_is_refused_before_anything_is_frozen() {
    let work = tempfile::tempdir().unwrap();
    let upper = work.path().join("upper");
    fs::create_dir_all(upper.join("run")).unwrap();
    nix::unistd::mkfifo(
        &upper.join("run/pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let source_criu = fake_criu(vec![memory(PID, 4, 0)]);
    let host = FakeHost::new(work.path());
    let target = target_config(work.path());
    let run = migrate(
        source_criu.clone(),
        Arc::new(FakeCheckpointer::new(Features::default())),
        &host,
        &source_config(work.path(), Some(upper.clone()), policy(1, 0)),
        &target,
        None,
    )
    .await;
    let err = run.source.unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, SessionError::SpecialFile { kind: "fifo", .. }),
        "{message}"
    );
    assert!(
        message.contains(&upper.join("run/pipe").display().to_string()),
        "{message}"
    );
    assert!(dump_modes(&source_criu.calls()).is_empty());
    assert!(!resumed(&source_criu.calls()));
    assert!(run.target.is_err());
    assert!(!target.staging_dir.exists());
}

#[tokio::test]
async fn a_fifo_appearing_before_the_freeze_fails_and_resumes() {
    let work = tempfile::tempdir().unwrap();
    let upper = work.path().join("upper");
    fs::create_dir_all(&upper).unwrap();
    // The container makes a FIFO during pre-copy: found after the final dump.
    let fifo = upper.join("late-pipe");
    let criu = {
        let fifo = fifo.clone();
        let calls = Mutex::new(0);
        Arc::new(
            FakeCheckpointer::new(Features::default()).with_on_dump(Box::new(move |req| {
                write_dump(&req.images_dir, &memory(PID, 4, 0), 0);
                let mut n = calls.lock().unwrap();
                *n += 1;
                if *n == 1 {
                    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
                        .unwrap();
                }
            })),
        )
    };
    let host = FakeHost::new(work.path());
    let target = target_config(work.path());
    let run = migrate(
        criu.clone(),
        Arc::new(FakeCheckpointer::new(Features::default())),
        &host,
        &source_config(work.path(), Some(upper), policy(1, 0)),
        &target,
        None,
    )
    .await;
    let err = run.source.unwrap_err();
    assert!(
        matches!(
            err,
            SessionError::SpecialFile {
                phase: Phase::Transfer,
                ..
            }
        ),
        "{err}"
    );
    assert!(resumed(&criu.calls()));
    assert!(run.target.is_err());
    assert!(!target.staging_dir.exists());
}

#[tokio::test]
async fn entries_outside_the_areas_are_refused() {
    let entry = |kind, path: &str| TreeEntry {
        kind,
        path: path.into(),
        mode: 0o644,
        uid: 0,
        gid: 0,
        link_target: String::new(),
    };
    assert!(!check_entry_path(&entry(TreeEntryKind::File, "images/core-1.img")).unwrap());
    assert!(check_entry_path(&entry(TreeEntryKind::Dir, "upper")).unwrap());
    assert!(check_entry_path(&entry(TreeEntryKind::Symlink, "upper/a/b")).unwrap());
    for (kind, path) in [
        (TreeEntryKind::Dir, "images/x"),
        (TreeEntryKind::File, "images/a/b"),
        (TreeEntryKind::File, "images"),
        (TreeEntryKind::File, "store/pages.data"),
        (TreeEntryKind::File, "uppers/x"),
    ] {
        assert!(check_entry_path(&entry(kind, path)).is_err(), "{path}");
    }
}

#[tokio::test]
async fn migrates_over_quic_between_two_endpoints() {
    use crate::migrate::test_pki::{ca, identity, localhost};
    use crate::migrate::transport::MigrationEndpoint;

    let work = tempfile::tempdir().unwrap();
    let upper = work.path().join("upper");
    build_upper(&upper);
    let ca = ca("test");
    let n1 = MigrationEndpoint::bind(localhost(), &identity(&ca, "n1")).unwrap();
    let n2 = MigrationEndpoint::bind(localhost(), &identity(&ca, "n2")).unwrap();
    let addr = n2.local_addr().unwrap();

    let m1 = memory(PID, 512, 0);
    let m2 = changed(&m1, PID, 0..100, 1000);
    let m3 = changed(&m2, PID, 0..10, 2000);
    let source_criu = fake_criu(vec![m1, m2, m3.clone()]);
    let target_criu = Arc::new(FakeCheckpointer::new(Features::default()));
    let host = FakeHost::new(work.path());
    let mut source = source_config(work.path(), Some(upper.clone()), policy(3, 0));
    source.max_payload = wire::DEFAULT_MAX_PAYLOAD;
    let mut target = target_config(work.path());
    target.max_payload = wire::DEFAULT_MAX_PAYLOAD;
    let (sink, _) = recorder();

    let source_side = async {
        let conn = n1.connect(addr, "n2").await.unwrap();
        run_source_quic(&conn, source_criu.clone(), &NoSourceHooks, &source, &sink).await
    };
    let target_side = async {
        let (conn, peer) = n2.accept().await.unwrap().unwrap();
        assert_eq!(peer, "n1");
        run_target_quic(&conn, target_criu.clone(), &host, &target, &sink).await
    };
    let (outcome, landed) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(source_side, target_side)
    })
    .await
    .expect("quic migration hung");
    let outcome = outcome.unwrap();
    let landed = landed.unwrap();
    let sent: Vec<u64> = outcome.rounds.iter().map(|r| r.pages_sent).collect();
    assert_eq!(sent, vec![512, 100, 10, 0]);
    assert_eq!(host.seen.lock().unwrap().pages, expected_pages(&m3));
    assert_eq!(tree(&landed.upper_dir.unwrap()), tree(&upper));
    fs::set_permissions(upper.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(
        target.staging_dir.join("upper/ro"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
}

#[tokio::test]
async fn whiteouts_and_owners_arrive_when_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: whiteouts (mknod) and chown need root");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let upper = work.path().join("upper");
    fs::create_dir_all(upper.join("home/app")).unwrap();
    fs::write(upper.join("home/app/data"), b"owned").unwrap();
    std::os::unix::fs::symlink("data", upper.join("home/app/link")).unwrap();
    for path in ["home/app", "home/app/data"] {
        std::os::unix::fs::chown(upper.join(path), Some(1000), Some(1001)).unwrap();
    }
    std::os::unix::fs::lchown(upper.join("home/app/link"), Some(1002), Some(1003)).unwrap();
    // After the chown, which clears set-id bits.
    fs::set_permissions(
        upper.join("home/app/data"),
        fs::Permissions::from_mode(0o4750),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &upper.join("home/deleted"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    let host = FakeHost::new(work.path());
    let mut target = target_config(work.path());
    target.chown = true;
    let run = migrate(
        fake_criu(vec![memory(PID, 4, 0)]),
        Arc::new(FakeCheckpointer::new(Features::default())),
        &host,
        &source_config(work.path(), Some(upper.clone()), policy(1, 0)),
        &target,
        None,
    )
    .await;
    run.source.unwrap();
    let got = run.target.unwrap().upper_dir.unwrap();
    let meta = |root: &Path, path: &str| fs::symlink_metadata(root.join(path)).unwrap();
    for path in ["home/app", "home/app/data", "home/app/link", "home/deleted"] {
        let (a, b) = (meta(&upper, path), meta(&got, path));
        assert_eq!(
            (a.uid(), a.gid(), a.mode()),
            (b.uid(), b.gid(), b.mode()),
            "{path}"
        );
    }
    assert_eq!(
        meta(&got, "home/app/data").mode() & 0o7777,
        0o4750,
        "set-uid kept"
    );
    assert_eq!(meta(&got, "home/deleted").rdev(), 0);
}
