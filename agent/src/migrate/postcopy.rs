//! Post-copy migration: the container moves with everything but its memory, runs on the target
//! as soon as CRIU restored it there, and its pages follow through CRIU's lazy pages
//! (userfaultfd) over relay streams of the same QUIC connection (`lazy_relay`).
//!
//! # Order
//!
//! ```text
//! source                                    target
//!   ── Hello (control, files) ─────────────▶  checks migration and instance ids
//!   ◀──────────────────────────── Ready ───   staging dir
//!   freeze: lazy dump (images, page server)   (downtime starts)
//!   SourceRelay → page server
//!   ── Manifest Entry/File… Done (files) ──▶  images (all of them: the dump's pagemaps say
//!                                             which pages are lazy) and the upper dir
//!                                             prepare, TargetRelay, criu lazy-pages, restore
//!                                             (lazily), adopt
//!   ◀─────────────────────────── Restored ─   (or Error)  downtime ends; the target runs it
//!   page server ◀── relay streams ─────────── lazy-pages daemon pulls every page
//!   CRIU answers: every page served           daemon exits 0: every page arrived
//! ```
//!
//! The relay on the source starts right after the lazy dump, before the files are sent: the
//! daemon starts fetching while the restore runs, and the session's own streams are open by
//! then (the source relay accepts every stream the target opens).
//!
//! # Progress
//!
//! The source reports one round (the lazy dump), `bytes_sent` = the session's streams plus
//! every byte the relay carried to the target, and `pages_sent` = the pages in CRIU's replies
//! (counted as they pass, `page_proto`). It reports again every [`PROGRESS_EVERY`] while pages
//! flow, and once more when serving ended: phase DONE if every page was served (that, or the
//! target's `memory_complete` once its daemon has them all, ends the hub's job).
//!
//! # Failure
//!
//! Before the target's `Restored`, any failure on the source kills the page server's CRIU and
//! resumes the frozen container where it was; the target, on any failure, aborts its copy
//! ([`TargetHost::abort`]), sends `Error` and removes its staging dir. After `Restored` the
//! target owns the container: if the pages then fail to arrive (source or link lost, timeout),
//! the target kills its restored tree (its memory is incomplete; the hub restarts it per policy)
//! and the source kills its tasks (CRIU resumed them when serving failed): never two live
//! copies.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use super::lazy_relay::{RelayCounters, RelayWatch, SourceRelay, TargetRelay};
use super::session::{
    accept_hellos_and_stage, adopt_and_answer, blocking, check_upper_dir, flush, framed_reader,
    framed_writer, millis, prepare_restore, read_verdict, receive_files, resume_source, send,
    send_files, send_hellos_and_await_ready, tell_peer_failed, Budget, ImageSet, MigrationProgress,
    Phase, ProgressSink, Received, SessionError, SourceConfig, TargetConfig, TargetHost,
    TargetOutcome, TargetState, Tracker, CLOSE_FAILED, CLOSE_GRACE, CLOSE_OK, ERROR_GRACE,
    IMAGES_AREA,
};
use super::wire::{Frame, FrameReader, FrameWriter, Restored, WireCounters};
use crate::checkpoint::lazy::{LazyDump, LazyDumpRequest, LazyPages, LazyPagesRequest};
use crate::checkpoint::{Criu, DumpMode, Metadata};

/// How long the source serves pages and the target waits for them once the target runs the
/// container (background fetching moves hundreds of MiB a second here).
pub const PAGES_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound of the lazy restore: a dead daemon leaves CRIU's restore waiting until its timeout,
/// and a restore takes well under a second.
const LAZY_RESTORE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound of the lazy dump's freeze and image writing, and of the daemon's start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the source reports while pages flow (each report is a write at the hub).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A post-copy migration, as the source saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostcopySourceOutcome {
    /// From the freeze (lazy dump) to the target's `Restored`.
    pub downtime: Duration,
    /// From the freeze until CRIU had served every page (`None`: serving failed and the
    /// source's tasks were killed; the target kills its copy too).
    pub pages_done_after: Option<Duration>,
    /// Why serving the pages failed, if it did.
    pub pages_error: Option<String>,
    /// Bytes of the images written by the lazy dump (without the lazy memory).
    pub images_bytes: u64,
    /// Files sent (images and upper dir) and their bytes.
    pub files: u64,
    /// Bytes of those files.
    pub file_bytes: u64,
    /// Bytes on the session's streams, framing included (the relay's are in `relay`).
    pub bytes_sent: u64,
    /// What the page relay moved: `relay.pages` are the pages sent after the freeze.
    pub relay: RelayCounters,
    /// The target's timings.
    pub target: Restored,
}

impl PostcopySourceOutcome {
    /// Every byte sent on the connection: the session's streams and the relay's pages (with
    /// CRIU's reply headers). What the progress reports as `bytes_sent`.
    pub fn total_bytes_sent(&self) -> u64 {
        self.bytes_sent + self.relay.to_target
    }
}

/// The source's figures beyond its session's: the dump's round and what the relay carried.
#[derive(Default)]
struct RelayedProgress {
    relay: OnceLock<RelayWatch>,
    rounds: AtomicU32,
}

impl RelayedProgress {
    /// `progress` with this added to every report.
    fn sink(self: &Arc<Self>, progress: &ProgressSink) -> ProgressSink {
        let (this, inner) = (Arc::clone(self), Arc::clone(progress));
        Arc::new(move |p: &MigrationProgress| inner(&this.add_to(*p)))
    }

    fn add_to(&self, mut p: MigrationProgress) -> MigrationProgress {
        p.rounds = p.rounds.max(self.rounds.load(Ordering::Relaxed));
        if let Some(relay) = self.relay.get() {
            let r = relay.counters();
            p.bytes_sent += r.to_target;
            p.pages_sent += r.pages;
        }
        p
    }
}

/// A post-copy migration, as the target saw it once the container runs here; its memory is
/// still arriving ([`PagesInFlight`]).
#[derive(Debug)]
pub struct PostcopyTarget {
    /// The restore (adopted), as in pre-copy.
    pub outcome: TargetOutcome,
    /// The rest of the memory.
    pub pages: PagesInFlight,
}

/// The background task that keeps the relay and the lazy-pages daemon until every page
/// arrived, then removes the staging dir and closes the connection. If the pages do not all
/// arrive it kills the restored tree. Dropping this handle leaves the task running.
#[derive(Debug)]
pub struct PagesInFlight {
    task: tokio::task::JoinHandle<Result<Duration, String>>,
}

impl PagesInFlight {
    /// Waits for the end: `Ok(time from restore start to the last page)`, or why the pages
    /// failed (the restored tree was killed).
    pub async fn wait(self) -> Result<Duration, String> {
        self.task
            .await
            .map_err(|e| format!("lazy pages task failed: {e}"))?
    }
}

/// A free TCP port on loopback for the page server (CRIU needs a fixed port).
fn free_loopback_port() -> std::io::Result<SocketAddr> {
    let probe = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    probe.local_addr()
}

/// Moves the container described by `config` to the target at the other end of `connection`
/// by post-copy; opens the streams and closes the connection when done.
///
/// Returns once the target runs the container and the page server ended (every page served,
/// or serving failed and the tasks here were killed). On `Err` the container was resumed (or
/// never stopped) where it was, unless the error is [`SessionError::ResumeFailed`].
/// `config.precopy` is not used.
pub async fn run_source_postcopy_quic(
    connection: &quinn::Connection,
    criu: Arc<Criu>,
    config: &SourceConfig,
    progress: &ProgressSink,
) -> Result<PostcopySourceOutcome, SessionError> {
    let phase = Phase::Prepare;
    let t = config.timeouts;
    let connection_err = |source| SessionError::Connection { phase, source };
    let streams = async {
        let (control_tx, control_rx) = connection.open_bi().await.map_err(connection_err)?;
        let files_tx = connection.open_uni().await.map_err(connection_err)?;
        Ok::<_, SessionError>((control_rx, control_tx, files_tx))
    };
    let (control_rx, control_tx, files_tx) = match tokio::time::timeout(t.handshake, streams).await
    {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            connection.close(quinn::VarInt::from_u32(CLOSE_FAILED), b"migration failed");
            return Err(e);
        }
        Err(_) => {
            connection.close(quinn::VarInt::from_u32(CLOSE_FAILED), b"migration failed");
            return Err(SessionError::Timeout {
                phase,
                what: "open the migration streams",
                waited: t.handshake,
            });
        }
    };
    let counters = Arc::new(WireCounters::default());
    let relayed = Arc::new(RelayedProgress::default());
    let tracker = Tracker::new(&relayed.sink(progress), &counters, true);
    let mut control_rx = framed_reader(control_rx, config.max_payload, &counters);
    let mut control_tx = framed_writer(control_tx, config.max_payload, &counters);
    let mut files_tx = framed_writer(files_tx, config.max_payload, &counters);
    let mut state = SourceState::default();
    let span = tracing::info_span!(
        "migrate_source_postcopy",
        migration_id = %config.migration_id,
        instance_id = %config.instance_id,
    );
    let result = source_exchange(
        connection,
        &criu,
        config,
        &mut control_rx,
        &mut control_tx,
        &mut files_tx,
        &mut state,
        &tracker,
        &relayed,
    )
    .instrument(span.clone())
    .await;

    let result = match result {
        Ok(restored) => {
            let downtime = state.freeze_start.map(|s| s.elapsed()).unwrap_or_default();
            tracker
                .downtime_ms
                .store(millis(downtime), Ordering::Relaxed);
            tracker.enter(Phase::Switch);
            tracing::info!(parent: &span, downtime_ms = millis(downtime), "target runs the container: serving its pages");
            let (pages_done_after, pages_error) = match state.lazy.take() {
                Some(lazy) => {
                    let serving = tokio::task::spawn_blocking(move || lazy.finish(PAGES_TIMEOUT));
                    let served = report_while_serving(serving, relayed.relay.get(), &tracker).await;
                    match served {
                        Ok(_) => (state.freeze_start.map(|s| s.elapsed()), None),
                        Err(error) => {
                            // CRIU resumed the tasks when serving failed; the target runs
                            // (and, missing pages, kills) its copy: this one must not live.
                            tracing::error!(parent: &span, %error, pid = config.dump.pid, "serving lazy pages failed: killing the source's tasks");
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(config.dump.pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                            (None, Some(error))
                        }
                    }
                }
                None => (None, Some("no lazy dump".to_owned())),
            };
            let relay = state
                .relay
                .take()
                .map(SourceRelay::stop)
                .unwrap_or_default();
            // The final figures: every page CRIU served went through the relay by now. Done
            // only when every page was served: that ends the job at the hub.
            tracker.enter(if pages_error.is_none() {
                Phase::Done
            } else {
                Phase::Switch
            });
            tracing::info!(
                parent: &span,
                downtime_ms = millis(downtime),
                pages_done_ms = pages_done_after.map(millis),
                pages_sent = relay.pages,
                page_bytes = relay.page_bytes,
                relay_to_target = relay.to_target,
                bytes_sent = counters.snapshot().bytes_sent + relay.to_target,
                uncounted_streams = relay.uncounted,
                "post-copy migration source done"
            );
            Ok(PostcopySourceOutcome {
                downtime,
                pages_done_after,
                pages_error,
                images_bytes: state.images_bytes,
                files: state.files,
                file_bytes: state.file_bytes,
                bytes_sent: counters.snapshot().bytes_sent,
                relay,
                target: restored,
            })
        }
        Err(cause) => {
            tracing::warn!(parent: &span, error = %cause, "post-copy migration source failed");
            tell_peer_failed(&mut control_tx, &cause).await;
            drop(state.relay.take());
            if let Some(lazy) = state.lazy.take() {
                // Kills the page server; the tasks stay stopped for the resume.
                let _ = tokio::task::spawn_blocking(move || drop(lazy)).await;
            }
            Err(rollback(&criu, config, state.needs_resume, cause).await)
        }
    };
    match &result {
        Ok(_) => connection.close(quinn::VarInt::from_u32(CLOSE_OK), b"migrated"),
        Err(_) => connection.close(quinn::VarInt::from_u32(CLOSE_FAILED), b"migration failed"),
    }
    let dir = config.work_dir.join("lazy");
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    result
}

/// Waits for CRIU to serve every page (`serving`), reporting progress every
/// [`PROGRESS_EVERY`] while the relay carries pages.
async fn report_while_serving<T, E: ToString>(
    serving: tokio::task::JoinHandle<Result<T, E>>,
    relay: Option<&RelayWatch>,
    tracker: &Tracker,
) -> Result<T, String> {
    tokio::pin!(serving);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = relay.map(|r| r.counters().to_target);
    let served = loop {
        tokio::select! {
            served = &mut serving => break served,
            _ = tick.tick() => {
                let now = relay.map(|r| r.counters().to_target);
                if now != last {
                    last = now;
                    tracker.enter(Phase::Switch);
                }
            }
        }
    };
    served
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
}

/// What the source did so far.
#[derive(Default)]
struct SourceState {
    needs_resume: bool,
    freeze_start: Option<Instant>,
    lazy: Option<LazyDump>,
    relay: Option<SourceRelay>,
    images_bytes: u64,
    files: u64,
    file_bytes: u64,
}

/// Hellos, lazy dump, files, verdict.
#[allow(clippy::too_many_arguments)]
async fn source_exchange<R, W, F>(
    connection: &quinn::Connection,
    criu: &Arc<Criu>,
    config: &SourceConfig,
    control_rx: &mut FrameReader<R>,
    control_tx: &mut FrameWriter<W>,
    files_tx: &mut FrameWriter<F>,
    state: &mut SourceState,
    tracker: &Tracker,
    relayed: &RelayedProgress,
) -> Result<Restored, SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    F: AsyncWrite + Unpin + Send,
{
    let t = config.timeouts;
    tracker.enter(Phase::Prepare);
    check_upper_dir(config).await?;
    send_hellos_and_await_ready(config, control_rx, control_tx, files_tx).await?;

    // Freeze: images without the lazy memory, and the page server.
    tracker.enter(Phase::Freeze);
    let dir = config.work_dir.join("lazy");
    let listen = free_loopback_port().map_err(SessionError::io(
        Phase::Freeze,
        "find a free loopback port for",
        &dir,
    ))?;
    let mut dump = config.dump.clone();
    dump.images_dir = dir.clone();
    dump.mode = DumpMode::LeaveStopped;
    dump.track_mem = false;
    dump.parent_images = None;
    state.freeze_start = Some(Instant::now());
    state.needs_resume = true;
    let lazy = {
        let criu = Arc::clone(criu);
        blocking(Phase::Freeze, move || {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(SessionError::io(Phase::Freeze, "remove stale dump", &dir)(
                        e,
                    ))
                }
            }
            criu.lazy_dump(&LazyDumpRequest {
                dump,
                listen,
                ready_timeout: READY_TIMEOUT,
            })
            .map_err(|source| SessionError::Checkpoint {
                phase: Phase::Freeze,
                op: "lazy dump",
                source,
            })
        })
        .await?
    };
    let images_dir = lazy.images_dir().to_owned();
    state.images_bytes = lazy.images_bytes();
    tracing::info!(
        ready_ms = millis(lazy.ready_after()),
        images_bytes = state.images_bytes,
        %listen,
        "container frozen, lazy dump serving pages"
    );
    state.lazy = Some(lazy);
    relayed.rounds.store(1, Ordering::Relaxed);
    // Before anything reaches the target: its daemon fetches while the restore runs.
    let relay = SourceRelay::start(connection.clone(), listen);
    let _ = relayed.relay.set(relay.watch());
    state.relay = Some(relay);

    tracker.enter(Phase::Transfer);
    let transfer = send_files(
        files_tx,
        &images_dir,
        ImageSet::All,
        config.upper_dir.as_deref(),
        t.peer,
    );
    let verdict = read_verdict(control_rx, tracker);
    tokio::pin!(transfer, verdict);
    tokio::select! {
        biased;
        sent = &mut transfer => match sent {
            Ok((files, bytes)) => {
                state.files = files;
                state.file_bytes = bytes;
            }
            // A target that gives up sends why, then drops its streams.
            Err(e) => {
                return match tokio::time::timeout(ERROR_GRACE, &mut verdict).await {
                    Ok(Err(peer @ SessionError::Peer { .. })) => Err(peer),
                    _ => Err(e),
                };
            }
        },
        early = &mut verdict => {
            // The target restores only after the files stream's `Done`.
            let restored = early?;
            return Err(SessionError::protocol(
                Phase::Transfer,
                format!("the target answered restored (pid {}) before the files were sent", restored.pid),
            ));
        }
    }
    tracker.enter(Phase::Restore);
    match tokio::time::timeout(t.verdict, &mut verdict).await {
        Ok(verdict) => verdict,
        Err(_) => Err(SessionError::Timeout {
            phase: Phase::Restore,
            what: "report the restore",
            waited: t.verdict,
        }),
    }
}

/// Resumes the frozen container after a failure before the target ran it.
async fn rollback(
    criu: &Arc<Criu>,
    config: &SourceConfig,
    needs_resume: bool,
    cause: SessionError,
) -> SessionError {
    if !needs_resume {
        return cause;
    }
    match resume_source(criu, config, cause.phase()).await {
        Ok(()) => cause,
        Err(resume) => {
            tracing::error!(error = %resume, "resuming the source container failed");
            SessionError::ResumeFailed {
                cause: Box::new(cause),
                resume: Box::new(resume),
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Target
// ------------------------------------------------------------------------------------------

/// Receives the post-copy migration the hub ordered (`config`) on `connection`, restores it
/// lazily as `host` prepares, and answers the source. Returns once the container runs here
/// (adopted); its memory keeps arriving in the background ([`PagesInFlight`]), which also
/// closes the connection at the end.
///
/// On `Err` nothing of the migration is left on this node: [`TargetHost::abort`] was called if
/// `prepare` was, and the staging dir is gone.
pub async fn run_target_postcopy_quic<H: TargetHost>(
    connection: &quinn::Connection,
    criu: Arc<Criu>,
    host: &H,
    config: &TargetConfig,
    progress: &ProgressSink,
) -> Result<PostcopyTarget, SessionError> {
    let phase = Phase::Prepare;
    let t = config.timeouts;
    let connection_err = |source| SessionError::Connection { phase, source };
    let streams = async {
        let (control_tx, control_rx) = connection.accept_bi().await.map_err(connection_err)?;
        let files_rx = connection.accept_uni().await.map_err(connection_err)?;
        Ok::<_, SessionError>((control_rx, control_tx, files_rx))
    };
    let fail_close = || {
        connection.close(quinn::VarInt::from_u32(CLOSE_FAILED), b"migration failed");
    };
    let (control_rx, control_tx, files_rx) = match tokio::time::timeout(t.handshake, streams).await
    {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            fail_close();
            return Err(e);
        }
        Err(_) => {
            fail_close();
            return Err(SessionError::Timeout {
                phase,
                what: "open the migration streams",
                waited: t.handshake,
            });
        }
    };
    let counters = Arc::new(WireCounters::default());
    let tracker = Tracker::new(progress, &counters, false);
    let mut control_rx = framed_reader(control_rx, config.max_payload, &counters);
    let mut control_tx = framed_writer(control_tx, config.max_payload, &counters);
    let mut files_rx = framed_reader(files_rx, config.max_payload, &counters);
    let mut state = TargetState::default();
    let span = tracing::info_span!(
        "migrate_target_postcopy",
        migration_id = %config.migration_id,
        instance_id = %config.instance_id,
    );
    let result = target_exchange(
        connection,
        &criu,
        host,
        config,
        &mut control_rx,
        &mut control_tx,
        &mut files_rx,
        &mut state,
        &tracker,
    )
    .instrument(span.clone())
    .await;
    match result {
        Ok((outcome, pages, relay, restore_started)) => {
            tracker.enter(Phase::Done);
            let staging = state.staging.take();
            let connection = connection.clone();
            let pid = outcome.pid;
            let task = tokio::spawn(
                async move {
                    let waited = tokio::task::spawn_blocking(move || pages.wait(PAGES_TIMEOUT))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    let relay = relay.stop();
                    let result = match waited {
                        Ok(report) => {
                            tracing::info!(
                                pages_ms = millis(report.wall),
                                since_restore_ms = millis(restore_started.elapsed()),
                                pages = relay.pages,
                                page_bytes = relay.page_bytes,
                                relay_to_target = relay.to_target,
                                "every lazy page arrived"
                            );
                            // The source closes once CRIU answered; give it the moment.
                            let _ =
                                tokio::time::timeout(CLOSE_GRACE, connection.closed()).await;
                            connection.close(quinn::VarInt::from_u32(CLOSE_OK), b"pages done");
                            Ok(restore_started.elapsed())
                        }
                        Err(error) => {
                            // Its missing memory will never come.
                            tracing::error!(%error, pid, "lazy pages failed: killing the restored container");
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                            connection
                                .close(quinn::VarInt::from_u32(CLOSE_FAILED), b"pages failed");
                            Err(error)
                        }
                    };
                    if let Some(staging) = staging {
                        // Armed: removes the images and what else is left.
                        let _ = tokio::task::spawn_blocking(move || drop(staging)).await;
                    }
                    result
                }
                .instrument(span),
            );
            Ok(PostcopyTarget {
                outcome,
                pages: PagesInFlight { task },
            })
        }
        Err(err) => {
            tracing::warn!(parent: &span, error = %err, "post-copy migration target failed");
            state.undo(host, &mut control_tx, &err).await;
            fail_close();
            Err(err)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn target_exchange<H, R, W, F>(
    connection: &quinn::Connection,
    criu: &Arc<Criu>,
    host: &H,
    config: &TargetConfig,
    control_rx: &mut FrameReader<R>,
    control_tx: &mut FrameWriter<W>,
    files_rx: &mut FrameReader<F>,
    state: &mut TargetState,
    tracker: &Tracker,
) -> Result<(TargetOutcome, LazyPages, TargetRelay, Instant), SessionError>
where
    H: TargetHost,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    F: AsyncRead + Unpin + Send,
{
    let t = config.timeouts;
    tracker.enter(Phase::Prepare);
    state.staging = Some(accept_hellos_and_stage(config, control_rx, files_rx).await?);
    let images_dir = config.staging_dir.join(IMAGES_AREA);

    send(control_tx, &Frame::Ready, Phase::Prepare, t.handshake).await?;
    flush(control_tx, Phase::Prepare, t.handshake).await?;
    tracing::debug!("post-copy migration accepted");

    let budget = Budget {
        limit: config.max_bytes,
        pages: AtomicU64::new(0),
        files: AtomicU64::new(0),
    };
    let files = receive_files(files_rx, config, &budget, tracker).await?;

    tracker.enter(Phase::Restore);
    let metadata = {
        let images_dir = images_dir.clone();
        blocking(Phase::Restore, move || {
            Metadata::read(&images_dir).map_err(|source| SessionError::Checkpoint {
                phase: Phase::Restore,
                op: "read metadata",
                source,
            })
        })
        .await?
    };
    let received = Received {
        images_dir: images_dir.clone(),
        upper_dir: files
            .upper
            .then(|| config.staging_dir.join(super::session::UPPER_AREA)),
        metadata,
        pages: 0,
        files: files.files,
        file_bytes: files.bytes,
    };
    let (plan, prepare_ms) = prepare_restore(host, &received, &mut state.prepared).await?;

    let relay = TargetRelay::start(connection.clone())
        .await
        .map_err(|e| SessionError::Io {
            phase: Phase::Restore,
            op: "start the lazy-pages relay",
            path: PathBuf::from("127.0.0.1:0"),
            source: std::io::Error::other(e),
        })?;
    let restore_started = Instant::now();
    let (pages, report) = {
        let criu = Arc::clone(criu);
        let images_dir = images_dir.clone();
        let page_server = relay.local_addr();
        blocking(Phase::Restore, move || {
            let checkpoint = |op| {
                move |source| SessionError::Checkpoint {
                    phase: Phase::Restore,
                    op,
                    source,
                }
            };
            let pages = criu
                .start_lazy_pages(&LazyPagesRequest {
                    images_dir: images_dir.clone(),
                    page_server,
                    ready_timeout: READY_TIMEOUT,
                })
                .map_err(checkpoint("lazy-pages"))?;
            let mut req = plan.request(images_dir);
            req.timeout = req.timeout.min(LAZY_RESTORE_TIMEOUT);
            let report = criu
                .restore_lazy(&req, &pages)
                .map_err(checkpoint("restore"))?;
            Ok((pages, report))
        })
        .await?
    };
    state.pid = Some(report.pid);
    let restore_ms = millis(restore_started.elapsed());

    tracker.enter(Phase::Switch);
    let timings = Restored {
        pid: u32::try_from(report.pid).unwrap_or(0),
        images_ms: 0,
        prepare_ms,
        restore_ms,
        adopt_ms: 0,
    };
    let timings = adopt_and_answer(host, &report, timings, control_tx, t.peer).await?;
    tracing::info!(
        pid = report.pid,
        prepare_ms,
        restore_ms,
        "migrated container running; its memory follows"
    );
    Ok((
        TargetOutcome {
            pid: report.pid,
            rounds: 1,
            pages_received: 0,
            bytes_received: tracker.counters.snapshot().bytes_received,
            upper_dir: received.upper_dir,
            timings,
        },
        pages,
        relay,
        restore_started,
    ))
}

#[cfg(test)]
#[path = "postcopy_tests.rs"]
mod tests;
