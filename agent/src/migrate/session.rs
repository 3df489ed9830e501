//! One live migration, end to end: the source agent's side ([`run_source`]) and the target
//! agent's side ([`run_target`]) of the pre-copy protocol, over the streams of one QUIC
//! connection ([`run_source_quic`], [`run_target_quic`]) or any pair of byte streams (tests use
//! `tokio::io::duplex`).
//!
//! # Streams
//!
//! The source opens both streams and writes a `Hello` on each before waiting for anything, so the
//! target can accept them in order (`accept_bi`, then `accept_uni`) without a deadlock:
//!
//! - **control** (bidirectional): source → target `Hello`, then every round's page changes as
//!   `Changes` frames (batches of [`pages::Change::encode`] records: the one page encoding this
//!   session uses; wire's `PageDelta`/`PagesGone` cannot say that a process appeared or went) and
//!   a `RoundEnd`; after the final round's `RoundEnd`, `Done`. Target → source: `Ready` (or
//!   `Error`) after the hellos, then the verdict: `Restored` with the target's timings, or `Error`.
//! - **files** (unidirectional, source → target): `Hello`, then nothing until the container is
//!   frozen; then `Manifest` (entry count, file bytes), one `Entry` per item in pre-order (for a
//!   regular file, its `FileStart`, chunks and `FileEnd` follow), `Done`. Entries under `images/`
//!   are the final dump's CRIU images other than page images (and `berth-checkpoint.json`);
//!   entries under `upper/` are the container's overlay upper dir: directories, regular files,
//!   symlinks and whiteouts, with modes and owners. Any other file type is refused.
//!
//! ```text
//! source                                   target
//!   ── Hello (control, files) ──────────────▶  checks migration and instance ids
//!   ◀───────────────────────────── Ready ───   (or Error, and the connection closes)
//!   dump --leave-running, delta vs previous round
//!   ── Changes… RoundEnd ───────────────────▶  PageStore::apply       (× rounds)
//!   lock traffic, dump --leave-stopped         (downtime starts)
//!   ── Changes… RoundEnd Done (control) ────▶  PageStore::apply
//!   ── Manifest Entry/File… Done (files) ───▶  staging dir, bounded
//!                                               write_images, prepare, criu restore, adopt
//!   ◀──────────────────────────── Restored ─   (or Error)  downtime ends on the source
//! ```
//!
//! # Pre-copy
//!
//! Every round dumps into a fresh directory of the source's work dir and streams the delta
//! against the previous round's page hashes ([`pages::delta`]) from a blocking task through a
//! bounded channel ([`DELTA_QUEUE`] batches of at most one frame each), so memory stays bounded
//! and a slow target slows the hashing down. Rounds stop when [`PrecopyPolicy::should_stop`] says
//! so: the delta did not shrink enough, is small, or the round cap was reached. Where the kernel
//! tracks soft-dirty pages, dumps name the previous round as their parent and CRIU writes only
//! the pages that changed; the delta does the rest either way.
//!
//! # Failure
//!
//! Every wait for the peer is bounded ([`Timeouts`]). On the source, any failure after a dump
//! that may have left the container stopped (the final dump, or a failed dump) resumes it
//! ([`Checkpointer::resume`], then [`SourceHooks::after_resume`]) before the error is returned;
//! the peer gets an `Error` frame when the stream still works. On the target, any failure calls
//! [`TargetHost::abort`] (killing the restored copy if there is one), sends `Error`, and removes
//! the staging dir.
//!
//! Known window: if the link fails after the target sent `Restored` but before the source read
//! it, the target runs the container and the source resumes it too; the hub, which hears RUNNING
//! from the target, settles it by removing the source's copy. No protocol over one link can
//! close that window; the hub is the arbiter.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::pages::{self, Change, DeltaOutcome, PageHashes, PageStore, PagesError, PAGE_SIZE};
use super::wire::{
    self, ChangeBatch, Frame, FrameReader, FrameWriter, Hello, Manifest, Restored, RoundEnd,
    TreeEntry, TreeEntryKind, WireCounters, WireError,
};
use crate::checkpoint::{
    CheckpointError, Checkpointer, DumpMode, DumpRequest, Metadata, NetworkLock, RestoreReport,
    RestoreRequest, ResumeRequest,
};

/// Batches of page changes queued between the hashing task and the stream (each at most one
/// frame's payload): bounds the source's memory to a few MiB whatever the dump's size.
pub const DELTA_QUEUE: usize = 4;

/// Batches queued between the control stream and the target's page store.
const APPLY_QUEUE: usize = 4;

/// How long a failing side tries to tell the peer why before giving up on it.
pub(crate) const ERROR_GRACE: Duration = Duration::from_secs(2);

/// How long the target waits for the source to close the connection after the verdict, so the
/// verdict is delivered before the target's side of the connection goes.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Every this many bytes of a file add one [`Timeouts::peer`] to the time it may take.
const FILE_TIMEOUT_UNIT: u64 = 64 << 20;

/// Top directory of the CRIU images on the files stream.
pub(crate) const IMAGES_AREA: &str = "images";
/// Top directory of the overlay upper dir on the files stream.
pub(crate) const UPPER_AREA: &str = "upper";
/// The target's page store, below its staging dir.
const STORE_DIR: &str = "store";

/// QUIC application close codes.
pub(crate) const CLOSE_OK: u32 = 0;
pub(crate) const CLOSE_FAILED: u32 = 1;

/// Where a migration stands, as the hub's `MigrationPhase` (the agent converts at the edge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Phase {
    /// Connection, hellos, staging.
    Prepare = 1,
    /// Pre-copy rounds while the container runs.
    Precopy = 2,
    /// The container is being frozen and dumped (source only).
    Freeze = 3,
    /// The last delta and the files cross.
    Transfer = 4,
    /// The target restores.
    Restore = 5,
    /// The target runs it; the source's copy is to be removed.
    Switch = 6,
    /// Finished (target).
    Done = 7,
}

/// A progress report, sent to the hub by the agent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MigrationProgress {
    /// Current phase.
    pub phase: Phase,
    /// Rounds completed (pre-copy rounds plus the final one).
    pub rounds: u32,
    /// Bytes on the wire so far (framing included): sent by the source, received by the target.
    pub bytes_sent: u64,
    /// Memory pages sent so far, over all rounds.
    pub pages_sent: u64,
    /// Downtime, once known (source, at [`Phase::Switch`]).
    pub downtime_ms: Option<u64>,
    /// How the source carries the migration, once it chose (the agent fills it in around the
    /// session, which runs one protocol and does not know why).
    pub choice: Option<ModeChoice>,
    /// Post-copy target: the last lazy page arrived (reported once, after the session).
    pub memory_complete: bool,
}

/// The mode a source runs a migration in, and the measurement an `auto` order chose it by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModeChoice {
    /// Never `Auto`: what it became.
    pub mode: crate::reconcile::MigrationMode,
    /// The write rate measured to choose (`auto` only).
    pub write_rate_mib_s: Option<f64>,
}

/// Where progress reports go; called from async code, so it must not block.
pub type ProgressSink = Arc<dyn Fn(&MigrationProgress) + Send + Sync>;

/// What a hook of the agent returns on failure.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// How long each side waits for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The hellos and the target's `Ready`.
    pub handshake: Duration,
    /// Any one frame read or written once the migration is under way (each file gets one more
    /// per 64 MiB). Also bounds the target's wait between two rounds, so it must exceed a
    /// round's dump and hashing time.
    pub peer: Duration,
    /// The target's wait for the source's final phase on the files stream (pre-copy may run
    /// many rounds first; a dead source is still noticed through the control stream).
    pub final_phase: Duration,
    /// The source's wait for the verdict once everything is sent (the target writes images,
    /// prepares and restores meanwhile).
    pub verdict: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            peer: Duration::from_secs(60),
            final_phase: Duration::from_secs(600),
            verdict: Duration::from_secs(120),
        }
    }
}

/// When pre-copy stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrecopyPolicy {
    /// Pre-copy rounds at most (0: stop-and-copy, the final dump sends everything).
    pub max_rounds: u32,
    /// Stop when a round sends at least this fraction of the previous round's pages.
    pub shrink_ratio: f64,
    /// Stop when a round sends at most this many pages.
    pub min_pages: u64,
}

impl Default for PrecopyPolicy {
    fn default() -> Self {
        Self {
            max_rounds: 8,
            shrink_ratio: 0.8,
            // 1 MiB: less than a millisecond on the wire, not worth another dump.
            min_pages: 256,
        }
    }
}

impl PrecopyPolicy {
    /// Whether pre-copy ends after round `round` (from 1), which sent `sent` pages, the round
    /// before having sent `previous` (none for round 1).
    pub fn should_stop(&self, round: u32, sent: u64, previous: Option<u64>) -> bool {
        if round >= self.max_rounds || sent <= self.min_pages {
            return true;
        }
        // Exact enough: page counts stay far below 2^53.
        previous.is_some_and(|previous| sent as f64 >= self.shrink_ratio * previous as f64)
    }
}

/// The source's side of one migration.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The hub's migration id.
    pub migration_id: String,
    /// The instance moving.
    pub instance_id: String,
    /// Template of every dump: pid, TCP, external mounts, freezer cgroup, network lock, CRIU
    /// timeout. `images_dir`, `mode`, `track_mem` and `parent_images` are set per round.
    pub dump: DumpRequest,
    /// Where the round dumps go (created if missing; the session removes what it creates).
    pub work_dir: PathBuf,
    /// The container's overlay upper dir, sent after the freeze (`None`: no writable layer).
    pub upper_dir: Option<PathBuf>,
    /// When pre-copy stops.
    pub precopy: PrecopyPolicy,
    /// Waits for the target.
    pub timeouts: Timeouts,
    /// Largest frame payload sent (the target must accept as much).
    pub max_payload: u32,
}

/// The target's side of one migration, from the hub's order.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// The migration the hub told this node to expect.
    pub migration_id: String,
    /// Its instance.
    pub instance_id: String,
    /// Staging dir for this migration: created here (its parent too); it must not exist.
    /// Removed on failure; on success only `upper/` is left in it (see [`Received`]).
    pub staging_dir: PathBuf,
    /// Most bytes this migration may put on disk here (page store plus files).
    pub max_bytes: u64,
    /// Give received upper-dir entries their owners (needs root).
    pub chown: bool,
    /// Waits for the source.
    pub timeouts: Timeouts,
    /// Largest frame payload accepted.
    pub max_payload: u32,
}

/// The source's ends of the streams.
#[derive(Debug)]
pub struct SourceStreams<R, W, F> {
    /// Control stream, target → source.
    pub control_rx: R,
    /// Control stream, source → target.
    pub control_tx: W,
    /// Files stream, source → target.
    pub files_tx: F,
}

/// The target's ends of the streams.
#[derive(Debug)]
pub struct TargetStreams<R, W, F> {
    /// Control stream, source → target.
    pub control_rx: R,
    /// Control stream, target → source.
    pub control_tx: W,
    /// Files stream, source → target.
    pub files_rx: F,
}

/// What the source's agent does around the freeze.
pub trait SourceHooks: Send + Sync {
    /// Just before the final dump: e.g. hold the instance's traffic (tc/eBPF on its veth) when
    /// the dump template says [`NetworkLock::Skip`].
    fn before_freeze(&self) -> impl Future<Output = Result<(), HookError>> + Send {
        async { Ok(()) }
    }

    /// After a failed migration resumed the container (or the final dump failed): undo
    /// [`before_freeze`](Self::before_freeze). Called only if that was called.
    fn after_resume(&self) -> impl Future<Output = Result<(), HookError>> + Send {
        async { Ok(()) }
    }
}

/// Hooks that do nothing (CRIU's own network lock).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSourceHooks;

impl SourceHooks for NoSourceHooks {}

/// What the target received, handed to [`TargetHost::prepare`].
#[derive(Debug, Clone)]
pub struct Received {
    /// The CRIU images, ready for `criu restore`.
    pub images_dir: PathBuf,
    /// The container's upper dir as it was at the freeze, if the source sent one. It stays
    /// where it is after a successful migration (move it away in `prepare`, or use it there).
    pub upper_dir: Option<PathBuf>,
    /// berth's record of the dump.
    pub metadata: Metadata,
    /// Memory pages in the images.
    pub pages: u64,
    /// Files received (images and upper dir).
    pub files: u64,
    /// Their bytes.
    pub file_bytes: u64,
}

/// How to restore, from [`TargetHost::prepare`]: the fields of a [`RestoreRequest`].
#[derive(Debug)]
pub struct RestorePlan {
    /// The container's rootfs (absolute, no symlinks): an overlay over the image with the
    /// received upper dir.
    pub rootfs: PathBuf,
    /// The network namespace, prepared with the instance's address.
    pub netns: Option<PathBuf>,
    /// Write ends of the log shim's pipes for fds 0, 1, 2 (closed here after the restore).
    pub stdio: [Option<OwnedFd>; 3],
    /// Cgroup path for the restored tree.
    pub cgroup_root: Option<String>,
    /// Host paths for the dump's external mounts.
    pub external_mounts: Vec<(String, PathBuf)>,
    /// Restore established TCP connections (as the dump did).
    pub tcp_established: bool,
    /// CRIU restore timeout.
    pub timeout: Duration,
}

/// What the target's agent does around the restore.
pub trait TargetHost: Send + Sync {
    /// Prepares the restore from what arrived: rootfs (overlay with the upper dir), network
    /// namespace with the instance's address, log pipes, cgroup.
    fn prepare(
        &self,
        received: &Received,
    ) -> impl Future<Output = Result<RestorePlan, HookError>> + Send;

    /// Takes over the restored container (reaping, log shim, status board) once CRIU restored
    /// it; its init is a child of this process.
    fn adopt(&self, restored: &RestoreReport)
        -> impl Future<Output = Result<(), HookError>> + Send;

    /// The migration failed after [`prepare`](Self::prepare) was called (whatever it returned):
    /// undo it, and kill the restored tree if `restored_pid` is given. Must not fail; log instead.
    fn abort(&self, restored_pid: Option<i32>) -> impl Future<Output = ()> + Send;
}

/// The figures of one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoundFigures {
    /// Round number, from 1; the final round is the last one.
    pub round: u32,
    /// Pages in the dump.
    pub pages_total: u64,
    /// Pages sent (new or changed).
    pub pages_sent: u64,
    /// Pages gone since the previous round.
    pub pages_gone: u64,
    /// The dump's wall time.
    pub dump: Duration,
}

/// A successful migration, as the source saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOutcome {
    /// Every round, the final one last.
    pub rounds: Vec<RoundFigures>,
    /// Pages sent over all rounds.
    pub pages_sent: u64,
    /// Bytes on the wire, both streams, framing included.
    pub bytes_sent: u64,
    /// From the freeze (traffic lock, final dump) to the target's `Restored`.
    pub downtime: Duration,
    /// Files sent after the freeze, and their bytes.
    pub files: u64,
    /// Bytes of those files.
    pub file_bytes: u64,
    /// The target's timings.
    pub target: Restored,
}

/// A successful migration, as the target saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetOutcome {
    /// Host pid of the restored init (adopted).
    pub pid: i32,
    /// Rounds received, the final one included.
    pub rounds: u32,
    /// Pages received over all rounds.
    pub pages_received: u64,
    /// Bytes received on both streams, framing included.
    pub bytes_received: u64,
    /// Where the upper dir is (if one came).
    pub upper_dir: Option<PathBuf>,
    /// The timings sent to the source.
    pub timings: Restored,
}

/// Why a migration failed, with the phase it failed in.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The framing failed: stream i/o, corruption, a stream cut.
    #[error("{phase}: migration stream: {source}")]
    Wire {
        /// Phase.
        phase: Phase,
        /// What the framing said.
        #[source]
        source: WireError,
    },
    /// The QUIC connection failed before the streams were up.
    #[error("{phase}: migration connection: {source}")]
    Connection {
        /// Phase.
        phase: Phase,
        /// What quinn said.
        #[source]
        source: quinn::ConnectionError,
    },
    /// The peer did not answer in time.
    #[error("{phase}: peer did not {what} within {waited:?}")]
    Timeout {
        /// Phase.
        phase: Phase,
        /// What was awaited.
        what: &'static str,
        /// How long.
        waited: Duration,
    },
    /// The peer gave up and said why.
    #[error("{phase}: peer reported: {message}")]
    Peer {
        /// Phase.
        phase: Phase,
        /// The peer's reason.
        message: String,
    },
    /// The peer broke the protocol.
    #[error("{phase}: protocol violation: {reason}")]
    Protocol {
        /// Phase.
        phase: Phase,
        /// What happened.
        reason: String,
    },
    /// The target was not expecting this migration.
    #[error(
        "prepare: refused migration {got_migration} of instance {got_instance}: this node expects migration {expected_migration} of instance {expected_instance}"
    )]
    Refused {
        /// The migration announced.
        got_migration: String,
        /// The instance announced.
        got_instance: String,
        /// The migration expected.
        expected_migration: String,
        /// The instance expected.
        expected_instance: String,
    },
    /// CRIU failed.
    #[error("{phase}: criu {op}: {source}")]
    Checkpoint {
        /// Phase.
        phase: Phase,
        /// `dump`, `restore`.
        op: &'static str,
        /// What the checkpoint layer said.
        #[source]
        source: CheckpointError,
    },
    /// Page images could not be read, diffed, applied or written.
    #[error("{phase}: page images: {source}")]
    Pages {
        /// Phase.
        phase: Phase,
        /// What the page layer said.
        #[source]
        source: PagesError,
    },
    /// A local file operation failed.
    #[error("{phase}: {op} {}: {source}", path.display())]
    Io {
        /// Phase.
        phase: Phase,
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file that cannot move (FIFO, socket, device).
    #[error("{phase}: {} is a {kind}: only regular files, directories, symlinks and overlay whiteouts can be migrated", path.display())]
    SpecialFile {
        /// Phase.
        phase: Phase,
        /// The file.
        path: PathBuf,
        /// Its type.
        kind: &'static str,
    },
    /// A file name the wire cannot carry.
    #[error("{phase}: {} is not valid utf-8 and cannot be migrated", path.display())]
    NonUtf8Path {
        /// Phase.
        phase: Phase,
        /// The file.
        path: PathBuf,
    },
    /// More data than this node accepts for a migration.
    #[error("{phase}: migration needs {needed} bytes on this node, over its {limit}-byte limit")]
    TooLarge {
        /// Phase.
        phase: Phase,
        /// Bytes needed so far.
        needed: u64,
        /// The limit.
        limit: u64,
    },
    /// A hook of the agent failed.
    #[error("{phase}: {hook}: {source}")]
    Hook {
        /// Phase.
        phase: Phase,
        /// Which hook.
        hook: &'static str,
        /// Its error.
        #[source]
        source: HookError,
    },
    /// A blocking task panicked or was cancelled.
    #[error("{phase}: blocking task failed: {source}")]
    Task {
        /// Phase.
        phase: Phase,
        /// Tokio's error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The migration failed and resuming the frozen source failed too.
    #[error("{cause}; resuming the source container also failed: {resume}")]
    ResumeFailed {
        /// Why the migration failed.
        cause: Box<SessionError>,
        /// Why the resume failed.
        resume: Box<SessionError>,
    },
}

impl Phase {
    /// Lower-case name, as in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::Precopy => "precopy",
            Phase::Freeze => "freeze",
            Phase::Transfer => "transfer",
            Phase::Restore => "restore",
            Phase::Switch => "switch",
            Phase::Done => "done",
        }
    }

    fn from_u8(value: u8) -> Phase {
        match value {
            2 => Phase::Precopy,
            3 => Phase::Freeze,
            4 => Phase::Transfer,
            5 => Phase::Restore,
            6 => Phase::Switch,
            7 => Phase::Done,
            _ => Phase::Prepare,
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl SessionError {
    /// The phase the migration failed in.
    pub fn phase(&self) -> Phase {
        match self {
            SessionError::Wire { phase, .. }
            | SessionError::Connection { phase, .. }
            | SessionError::Timeout { phase, .. }
            | SessionError::Peer { phase, .. }
            | SessionError::Protocol { phase, .. }
            | SessionError::Checkpoint { phase, .. }
            | SessionError::Pages { phase, .. }
            | SessionError::Io { phase, .. }
            | SessionError::SpecialFile { phase, .. }
            | SessionError::NonUtf8Path { phase, .. }
            | SessionError::TooLarge { phase, .. }
            | SessionError::Hook { phase, .. }
            | SessionError::Task { phase, .. } => *phase,
            SessionError::Refused { .. } => Phase::Prepare,
            SessionError::ResumeFailed { cause, .. } => cause.phase(),
        }
    }

    fn wire(phase: Phase, source: WireError) -> Self {
        match source {
            WireError::Peer { message } => SessionError::Peer { phase, message },
            source => SessionError::Wire { phase, source },
        }
    }

    pub(crate) fn protocol(phase: Phase, reason: impl Into<String>) -> Self {
        SessionError::Protocol {
            phase,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(
        phase: Phase,
        op: &'static str,
        path: &Path,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| SessionError::Io {
            phase,
            op,
            path,
            source,
        }
    }
}

/// Progress of one side, shared by its concurrent parts.
pub(crate) struct Tracker {
    sink: ProgressSink,
    pub(crate) counters: Arc<WireCounters>,
    source_side: bool,
    phase: AtomicU8,
    rounds: AtomicU32,
    pages: AtomicU64,
    pub(crate) downtime_ms: AtomicU64,
}

impl Tracker {
    pub(crate) fn new(
        sink: &ProgressSink,
        counters: &Arc<WireCounters>,
        source_side: bool,
    ) -> Self {
        Self {
            sink: Arc::clone(sink),
            counters: Arc::clone(counters),
            source_side,
            phase: AtomicU8::new(Phase::Prepare as u8),
            rounds: AtomicU32::new(0),
            pages: AtomicU64::new(0),
            downtime_ms: AtomicU64::new(u64::MAX),
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    pub(crate) fn enter(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.report();
    }

    fn round_done(&self, round: u32, pages: u64) {
        self.rounds.store(round, Ordering::Relaxed);
        self.pages.fetch_add(pages, Ordering::Relaxed);
        self.report();
    }

    fn snapshot(&self) -> MigrationProgress {
        let wire = self.counters.snapshot();
        let downtime = self.downtime_ms.load(Ordering::Relaxed);
        MigrationProgress {
            phase: self.phase(),
            rounds: self.rounds.load(Ordering::Relaxed),
            bytes_sent: if self.source_side {
                wire.bytes_sent
            } else {
                wire.bytes_received
            },
            pages_sent: self.pages.load(Ordering::Relaxed),
            downtime_ms: (downtime != u64::MAX).then_some(downtime),
            choice: None,
            memory_complete: false,
        }
    }

    fn report(&self) {
        (self.sink)(&self.snapshot());
    }
}

/// Runs blocking work off the async threads.
pub(crate) async fn blocking<T, F>(phase: Phase, f: F) -> Result<T, SessionError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, SessionError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| SessionError::Task { phase, source })?
}

pub(crate) async fn timed<T>(
    phase: Phase,
    what: &'static str,
    limit: Duration,
    fut: impl Future<Output = Result<T, WireError>>,
) -> Result<T, SessionError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result.map_err(|e| SessionError::wire(phase, e)),
        Err(_) => Err(SessionError::Timeout {
            phase,
            what,
            waited: limit,
        }),
    }
}

pub(crate) async fn send<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    frame: &Frame,
    phase: Phase,
    limit: Duration,
) -> Result<(), SessionError> {
    timed(phase, "take data", limit, writer.send(frame)).await
}

pub(crate) async fn flush<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    phase: Phase,
    limit: Duration,
) -> Result<(), SessionError> {
    timed(phase, "take data", limit, writer.flush()).await
}

/// The next frame; a clean end of the stream is an error (`what` is what was awaited), and so
/// is an `Error` frame.
pub(crate) async fn recv<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    phase: Phase,
    what: &'static str,
    limit: Duration,
) -> Result<Frame, SessionError> {
    match timed(phase, what, limit, reader.next()).await? {
        Some(Frame::Error { message }) => Err(SessionError::Peer { phase, message }),
        Some(frame) => Ok(frame),
        None => Err(SessionError::Wire {
            phase,
            source: WireError::UnexpectedEnd { expected: what },
        }),
    }
}

/// Time a file of `bytes` may take on the wire.
pub(crate) fn file_timeout(peer: Duration, bytes: u64) -> Duration {
    peer.saturating_mul(u32::try_from(1 + bytes / FILE_TIMEOUT_UNIT).unwrap_or(u32::MAX))
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ------------------------------------------------------------------------------------------
// Source
// ------------------------------------------------------------------------------------------

/// What the source did so far, read after a failure to undo it.
#[derive(Default)]
struct SourceState {
    rounds: Vec<RoundFigures>,
    /// A dump may have left the container stopped: resume it on failure.
    needs_resume: bool,
    /// `before_freeze` was called: call `after_resume` on failure.
    hooked: bool,
    freeze_start: Option<Instant>,
    dirs: Vec<PathBuf>,
    files: u64,
    file_bytes: u64,
}

/// One file or tree entry to send after the freeze.
pub(crate) struct Outgoing {
    pub(crate) entry: TreeEntry,
    pub(crate) local: PathBuf,
    pub(crate) size: u64,
}

/// Moves the container described by `config` to the target at the other end of `streams`.
///
/// Returns once the target runs it: the caller then removes the stopped source container. On
/// `Err` the container was resumed (or never stopped) where it was, unless the error is
/// [`SessionError::ResumeFailed`].
pub async fn run_source<C, H, R, W, F>(
    checkpointer: Arc<C>,
    hooks: &H,
    config: &SourceConfig,
    streams: SourceStreams<R, W, F>,
    progress: &ProgressSink,
) -> Result<SourceOutcome, SessionError>
where
    C: Checkpointer + ?Sized + 'static,
    H: SourceHooks,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    F: AsyncWrite + Unpin + Send,
{
    let counters = Arc::new(WireCounters::default());
    let tracker = Tracker::new(progress, &counters, true);
    let mut control_rx = framed_reader(streams.control_rx, config.max_payload, &counters);
    let mut control_tx = framed_writer(streams.control_tx, config.max_payload, &counters);
    let mut files_tx = framed_writer(streams.files_tx, config.max_payload, &counters);
    let mut state = SourceState::default();
    let span = tracing::info_span!(
        "migrate_source",
        migration_id = %config.migration_id,
        instance_id = %config.instance_id,
    );
    let result = source_exchange(
        &checkpointer,
        hooks,
        config,
        &mut control_rx,
        &mut control_tx,
        &mut files_tx,
        &mut state,
        &tracker,
    )
    .instrument(span)
    .await;

    let result = match result {
        Ok(target) => {
            let downtime = state
                .freeze_start
                .map(|start| start.elapsed())
                .unwrap_or_default();
            tracker
                .downtime_ms
                .store(millis(downtime), Ordering::Relaxed);
            tracker.enter(Phase::Switch);
            let pages_sent = state.rounds.iter().map(|r| r.pages_sent).sum();
            tracing::info!(
                migration_id = %config.migration_id,
                rounds = state.rounds.len(),
                pages_sent,
                downtime_ms = millis(downtime),
                "migration source done: the target runs the container"
            );
            Ok(SourceOutcome {
                rounds: std::mem::take(&mut state.rounds),
                pages_sent,
                bytes_sent: counters.snapshot().bytes_sent,
                downtime,
                files: state.files,
                file_bytes: state.file_bytes,
                target,
            })
        }
        Err(cause) => {
            tracing::warn!(migration_id = %config.migration_id, error = %cause, "migration source failed");
            tell_peer_failed(&mut control_tx, &cause).await;
            Err(source_rollback(&checkpointer, hooks, config, &state, cause).await)
        }
    };
    remove_dirs(std::mem::take(&mut state.dirs)).await;
    result
}

/// Refuses an upper dir that cannot move, before anything is frozen or sent (either mode).
pub(crate) async fn check_upper_dir(config: &SourceConfig) -> Result<(), SessionError> {
    if let Some(upper) = &config.upper_dir {
        let upper = upper.clone();
        blocking(Phase::Prepare, move || scan_tree(&upper, Phase::Prepare)).await?;
    }
    Ok(())
}

/// One end of a migration stream as frames of at most `max_payload`, counted in `counters`.
pub(crate) fn framed_reader<R: AsyncRead + Unpin>(
    stream: R,
    max_payload: u32,
    counters: &Arc<WireCounters>,
) -> FrameReader<R> {
    FrameReader::new(stream)
        .with_max_payload(max_payload)
        .with_counters(Arc::clone(counters))
}

/// See [`framed_reader`].
pub(crate) fn framed_writer<W: AsyncWrite + Unpin>(
    stream: W,
    max_payload: u32,
    counters: &Arc<WireCounters>,
) -> FrameWriter<W> {
    FrameWriter::new(stream)
        .with_max_payload(max_payload)
        .with_counters(Arc::clone(counters))
}

/// The target's host prepares the restore from what arrived (either mode); `prepared` is set
/// first, since from then on a failure must call the host's `abort`. The plan and its time (ms).
pub(crate) async fn prepare_restore<H: TargetHost>(
    host: &H,
    received: &Received,
    prepared: &mut bool,
) -> Result<(RestorePlan, u64), SessionError> {
    let started = Instant::now();
    *prepared = true;
    let plan = host
        .prepare(received)
        .await
        .map_err(|source| SessionError::Hook {
            phase: Phase::Restore,
            hook: "prepare",
            source,
        })?;
    Ok((plan, millis(started.elapsed())))
}

/// The source's opening, in either mode: a `Hello` on both streams, then the target's `Ready`.
pub(crate) async fn send_hellos_and_await_ready<R, W, F>(
    config: &SourceConfig,
    control_rx: &mut FrameReader<R>,
    control_tx: &mut FrameWriter<W>,
    files_tx: &mut FrameWriter<F>,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    F: AsyncWrite + Unpin + Send,
{
    let t = config.timeouts;
    let hello = Frame::Hello(Hello {
        migration_id: config.migration_id.clone(),
        instance_id: config.instance_id.clone(),
        round: 0,
    });
    send(control_tx, &hello, Phase::Prepare, t.handshake).await?;
    flush(control_tx, Phase::Prepare, t.handshake).await?;
    send(files_tx, &hello, Phase::Prepare, t.handshake).await?;
    flush(files_tx, Phase::Prepare, t.handshake).await?;
    match recv(control_rx, Phase::Prepare, "answer the hello", t.handshake).await? {
        Frame::Ready => Ok(()),
        other => Err(SessionError::protocol(
            Phase::Prepare,
            format!("expected ready, got {}", other.kind()),
        )),
    }
}

/// The target's verdict, in either mode: `Restored`, or its error.
pub(crate) async fn read_verdict<R: AsyncRead + Unpin>(
    control_rx: &mut FrameReader<R>,
    tracker: &Tracker,
) -> Result<Restored, SessionError> {
    match control_rx.next().await {
        Ok(Some(Frame::Restored(restored))) => Ok(restored),
        Ok(Some(Frame::Error { message })) => Err(SessionError::Peer {
            phase: tracker.phase(),
            message,
        }),
        Ok(Some(other)) => Err(SessionError::protocol(
            tracker.phase(),
            format!("expected the verdict, got {}", other.kind()),
        )),
        Ok(None) => Err(SessionError::Wire {
            phase: tracker.phase(),
            source: WireError::UnexpectedEnd {
                expected: "verdict",
            },
        }),
        Err(e) => Err(SessionError::wire(tracker.phase(), e)),
    }
}

/// Hellos, rounds, freeze, transfer, verdict.
#[allow(clippy::too_many_arguments)]
async fn source_exchange<C, H, R, W, F>(
    checkpointer: &Arc<C>,
    hooks: &H,
    config: &SourceConfig,
    control_rx: &mut FrameReader<R>,
    control_tx: &mut FrameWriter<W>,
    files_tx: &mut FrameWriter<F>,
    state: &mut SourceState,
    tracker: &Tracker,
) -> Result<Restored, SessionError>
where
    C: Checkpointer + ?Sized + 'static,
    H: SourceHooks,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    F: AsyncWrite + Unpin + Send,
{
    let t = config.timeouts;
    tracker.enter(Phase::Prepare);
    check_upper_dir(config).await?;
    let work_dir = config.work_dir.clone();
    blocking(Phase::Prepare, move || {
        std::fs::create_dir_all(&work_dir).map_err(SessionError::io(
            Phase::Prepare,
            "create",
            &work_dir,
        ))
    })
    .await?;
    let features = {
        let checkpointer = Arc::clone(checkpointer);
        match tokio::task::spawn_blocking(move || checkpointer.features()).await {
            Ok(Ok(features)) => features,
            Ok(Err(error)) => {
                tracing::warn!(%error, "criu feature check failed: dumping without memory tracking");
                Default::default()
            }
            Err(error) => {
                tracing::warn!(%error, "criu feature check failed: dumping without memory tracking");
                Default::default()
            }
        }
    };

    send_hellos_and_await_ready(config, control_rx, control_tx, files_tx).await?;
    tracing::debug!("migration target ready");

    // The verdict may come early (an error from the target); watch for it during the transfer.
    let verdict = read_verdict(control_rx, tracker);
    tokio::pin!(verdict);
    {
        let transfer = source_transfer(
            checkpointer,
            hooks,
            config,
            features.mem_track,
            control_tx,
            files_tx,
            state,
            tracker,
        );
        tokio::pin!(transfer);
        let early = tokio::select! {
            biased;
            result = &mut transfer => match result {
                Ok(()) => None,
                // A target that gives up sends why, then drops its streams: our write may fail
                // before its reason is read. The reason is what the job must say.
                Err(e @ SessionError::Wire { .. }) => {
                    return match tokio::time::timeout(ERROR_GRACE, &mut verdict).await {
                        Ok(Err(peer @ SessionError::Peer { .. })) => Err(peer),
                        _ => Err(e),
                    };
                }
                Err(e) => return Err(e),
            },
            early = &mut verdict => Some(early?),
        };
        if let Some(restored) = early {
            // The target restores only after both streams' `Done`: everything arrived, and
            // what is left of the transfer here is returning from its last flush.
            match tokio::time::timeout(t.peer, &mut transfer).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(SessionError::protocol(
                        Phase::Transfer,
                        "the target answered restored before the transfer ended",
                    ))
                }
            }
            tracker.enter(Phase::Restore);
            return Ok(restored);
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

/// Pre-copy rounds, freeze, last delta and files.
#[allow(clippy::too_many_arguments)]
async fn source_transfer<C, H, W, F>(
    checkpointer: &Arc<C>,
    hooks: &H,
    config: &SourceConfig,
    mem_track: bool,
    control_tx: &mut FrameWriter<W>,
    files_tx: &mut FrameWriter<F>,
    state: &mut SourceState,
    tracker: &Tracker,
) -> Result<(), SessionError>
where
    C: Checkpointer + ?Sized + 'static,
    H: SourceHooks,
    W: AsyncWrite + Unpin + Send,
    F: AsyncWrite + Unpin + Send,
{
    let t = config.timeouts;
    let mut previous = PageHashes::new();
    let mut previous_dir: Option<PathBuf> = None;
    let mut previous_sent = None;
    if config.precopy.max_rounds > 0 {
        tracker.enter(Phase::Precopy);
        for round in 1.. {
            let dir = config.work_dir.join(format!("round-{round}"));
            let mut req = config.dump.clone();
            req.images_dir = dir.clone();
            req.mode = DumpMode::LeaveRunning;
            req.track_mem = mem_track;
            req.parent_images = if mem_track {
                previous_dir.clone()
            } else {
                None
            };
            let dump = dump(checkpointer, req, Phase::Precopy, state).await?;
            let outcome =
                stream_delta(previous, dir.clone(), control_tx, Phase::Precopy, t.peer).await?;
            let sent = outcome.stats.pages_sent;
            send(
                control_tx,
                &Frame::RoundEnd(RoundEnd {
                    round,
                    pages: sent,
                    bytes: outcome.stats.bytes_sent,
                }),
                Phase::Precopy,
                t.peer,
            )
            .await?;
            flush(control_tx, Phase::Precopy, t.peer).await?;
            state.rounds.push(figures(round, &outcome, dump));
            tracker.round_done(round, sent);
            tracing::info!(
                round,
                pages_total = outcome.stats.pages_total,
                pages_sent = sent,
                pages_gone = outcome.stats.pages_gone,
                dump_ms = millis(dump),
                "pre-copy round sent"
            );
            // The round before is no parent of anything any more.
            if let Some(old) = previous_dir.replace(dir) {
                remove_dirs(vec![old]).await;
            }
            previous = outcome.hashes;
            let stop = config.precopy.should_stop(round, sent, previous_sent);
            previous_sent = Some(sent);
            if stop {
                break;
            }
        }
    }

    // Final round: from here the container is frozen.
    tracker.enter(Phase::Freeze);
    let round = u32::try_from(state.rounds.len() + 1).unwrap_or(u32::MAX);
    state.freeze_start = Some(Instant::now());
    state.hooked = true;
    hooks
        .before_freeze()
        .await
        .map_err(|source| SessionError::Hook {
            phase: Phase::Freeze,
            hook: "before freeze",
            source,
        })?;
    let dir = config.work_dir.join("final");
    let mut req = config.dump.clone();
    req.images_dir = dir.clone();
    req.mode = DumpMode::LeaveStopped;
    req.track_mem = false;
    req.parent_images = if mem_track {
        previous_dir.clone()
    } else {
        None
    };
    state.needs_resume = true;
    let dump_wall = dump(checkpointer, req, Phase::Freeze, state).await?;
    tracing::info!(dump_ms = millis(dump_wall), "container frozen and dumped");

    tracker.enter(Phase::Transfer);
    let pages = async {
        let outcome =
            stream_delta(previous, dir.clone(), control_tx, Phase::Transfer, t.peer).await?;
        let frame = Frame::RoundEnd(RoundEnd {
            round,
            pages: outcome.stats.pages_sent,
            bytes: outcome.stats.bytes_sent,
        });
        send(control_tx, &frame, Phase::Transfer, t.peer).await?;
        send(control_tx, &Frame::Done, Phase::Transfer, t.peer).await?;
        flush(control_tx, Phase::Transfer, t.peer).await?;
        Ok::<_, SessionError>(outcome)
    };
    let files = send_files(
        files_tx,
        &dir,
        ImageSet::WithoutPages,
        config.upper_dir.as_deref(),
        t.peer,
    );
    let (outcome, (files, file_bytes)) = tokio::try_join!(pages, files)?;
    state.files = files;
    state.file_bytes = file_bytes;
    state.rounds.push(figures(round, &outcome, dump_wall));
    tracker.round_done(round, outcome.stats.pages_sent);
    tracing::info!(
        pages_sent = outcome.stats.pages_sent,
        files,
        file_bytes,
        "final round sent"
    );
    if let Some(old) = previous_dir {
        remove_dirs(vec![old]).await;
    }
    Ok(())
}

fn figures(round: u32, outcome: &DeltaOutcome, dump: Duration) -> RoundFigures {
    RoundFigures {
        round,
        pages_total: outcome.stats.pages_total,
        pages_sent: outcome.stats.pages_sent,
        pages_gone: outcome.stats.pages_gone,
        dump,
    }
}

/// One CRIU dump into a fresh `req.images_dir`; returns its wall time.
async fn dump<C: Checkpointer + ?Sized + 'static>(
    checkpointer: &Arc<C>,
    req: DumpRequest,
    phase: Phase,
    state: &mut SourceState,
) -> Result<Duration, SessionError> {
    state.dirs.push(req.images_dir.clone());
    let checkpointer = Arc::clone(checkpointer);
    let started = Instant::now();
    let result = blocking(phase, move || {
        let dir = &req.images_dir;
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SessionError::io(phase, "remove stale dump", dir)(e)),
        }
        std::fs::create_dir_all(dir).map_err(SessionError::io(phase, "create", dir))?;
        checkpointer
            .dump(&req)
            .map_err(|source| SessionError::Checkpoint {
                phase,
                op: "dump",
                source,
            })
    })
    .await;
    if let Err(SessionError::Checkpoint { .. }) = &result {
        // A dump that failed or timed out may leave the tasks stopped.
        state.needs_resume = true;
    }
    result?;
    Ok(started.elapsed())
}

/// Streams the delta of the dump in `dir` against `previous` as `Changes` frames.
async fn stream_delta<W: AsyncWrite + Unpin>(
    previous: PageHashes,
    dir: PathBuf,
    writer: &mut FrameWriter<W>,
    phase: Phase,
    limit: Duration,
) -> Result<DeltaOutcome, SessionError> {
    let (batches, mut queue) = mpsc::channel::<ChangeBatch>(DELTA_QUEUE);
    let max_payload = writer.max_payload();
    let task =
        tokio::task::spawn_blocking(move || -> Result<Option<DeltaOutcome>, SessionError> {
            let pages_err = |source| SessionError::Pages { phase, source };
            let wire_err = |source| SessionError::Wire { phase, source };
            let mut delta = pages::delta(&previous, &dir).map_err(pages_err)?;
            let mut batch = ChangeBatch::new();
            let mut record = Vec::with_capacity(Change::MAX_ENCODED_LEN);
            for change in delta.by_ref() {
                let change = change.map_err(pages_err)?;
                record.clear();
                change.encode(&mut record);
                if !batch.fits(record.len(), max_payload)
                    && batches.blocking_send(std::mem::take(&mut batch)).is_err()
                {
                    // The stream side gave up; its error is the one to report.
                    return Ok(None);
                }
                batch.push(&record).map_err(wire_err)?;
            }
            if !batch.is_empty() && batches.blocking_send(batch).is_err() {
                return Ok(None);
            }
            delta.finish().map(Some).map_err(pages_err)
        });
    while let Some(batch) = queue.recv().await {
        send(writer, &Frame::Changes(batch), phase, limit).await?;
    }
    match task.await {
        Ok(Ok(Some(outcome))) => Ok(outcome),
        Ok(Ok(None)) => Err(SessionError::protocol(phase, "page delta stream stopped")),
        Ok(Err(e)) => Err(e),
        Err(source) => Err(SessionError::Task { phase, source }),
    }
}

/// Which of a dump's images travel on the files stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ImageSet {
    /// All but the page images (pre-copy: the pages went as deltas).
    WithoutPages,
    /// All of them (a lazy dump: its page images hold the pages that are not lazy, and the
    /// pagemaps say which are).
    All,
}

/// Sends the dump's images (`set`) and the upper dir; returns (files, bytes).
pub(crate) async fn send_files<F: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<F>,
    images_dir: &Path,
    set: ImageSet,
    upper_dir: Option<&Path>,
    peer: Duration,
) -> Result<(u64, u64), SessionError> {
    let phase = Phase::Transfer;
    let outgoing = {
        let images_dir = images_dir.to_owned();
        let upper_dir = upper_dir.map(Path::to_owned);
        blocking(phase, move || {
            let mut outgoing = scan_images(&images_dir, set, phase)?;
            if let Some(upper) = upper_dir {
                outgoing.extend(scan_tree(&upper, phase)?);
            }
            Ok(outgoing)
        })
        .await?
    };
    let files = outgoing
        .iter()
        .filter(|o| o.entry.kind == TreeEntryKind::File)
        .count() as u64;
    let bytes = outgoing.iter().map(|o| o.size).sum();
    let manifest = Frame::Manifest(Manifest {
        entries: outgoing.len() as u64,
        bytes,
    });
    send(writer, &manifest, phase, peer).await?;
    for item in outgoing {
        let kind = item.entry.kind;
        let path = item.entry.path.clone();
        send(writer, &Frame::Entry(item.entry), phase, peer).await?;
        if kind == TreeEntryKind::File {
            timed(
                phase,
                "take a file",
                file_timeout(peer, item.size),
                writer.send_file(&item.local, &path),
            )
            .await?;
        }
    }
    send(writer, &Frame::Done, phase, peer).await?;
    flush(writer, phase, peer).await?;
    Ok((files, bytes))
}

/// The dump's images (`set`; never CRIU's logs), as `images/<name>`.
pub(crate) fn scan_images(
    dir: &Path,
    set: ImageSet,
    phase: Phase,
) -> Result<Vec<Outgoing>, SessionError> {
    let read = std::fs::read_dir(dir).map_err(SessionError::io(phase, "list", dir))?;
    let mut names = Vec::new();
    for entry in read {
        let entry = entry.map_err(SessionError::io(phase, "list", dir))?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| SessionError::NonUtf8Path {
                phase,
                path: path.clone(),
            })?;
        if (set == ImageSet::WithoutPages && pages::is_page_image(&name)) || name.ends_with(".log")
        {
            continue;
        }
        names.push((name, path));
    }
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for (name, path) in names {
        let meta =
            std::fs::symlink_metadata(&path).map_err(SessionError::io(phase, "stat", &path))?;
        if !meta.is_file() {
            // CRIU's own sockets and directories are no images.
            continue;
        }
        out.push(Outgoing {
            entry: TreeEntry {
                kind: TreeEntryKind::File,
                path: format!("{IMAGES_AREA}/{name}"),
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                link_target: String::new(),
            },
            local: path,
            size: meta.len(),
        });
    }
    Ok(out)
}

/// Every entry of the tree at `root` as `upper/…`, parents before children, names sorted.
pub(crate) fn scan_tree(root: &Path, phase: Phase) -> Result<Vec<Outgoing>, SessionError> {
    let meta = std::fs::symlink_metadata(root).map_err(SessionError::io(phase, "stat", root))?;
    if !meta.is_dir() {
        return Err(SessionError::SpecialFile {
            phase,
            path: root.to_owned(),
            kind: "non-directory upper dir",
        });
    }
    let mut out = vec![Outgoing {
        entry: tree_entry(
            TreeEntryKind::Dir,
            UPPER_AREA.to_owned(),
            &meta,
            String::new(),
        ),
        local: root.to_owned(),
        size: 0,
    }];
    let mut pending = vec![(root.to_owned(), UPPER_AREA.to_owned())];
    while let Some((dir, remote)) = pending.pop() {
        let read = std::fs::read_dir(&dir).map_err(SessionError::io(phase, "list", &dir))?;
        let mut children = Vec::new();
        for entry in read {
            let entry = entry.map_err(SessionError::io(phase, "list", &dir))?;
            let path = entry.path();
            let name = entry
                .file_name()
                .into_string()
                .map_err(|_| SessionError::NonUtf8Path {
                    phase,
                    path: path.clone(),
                })?;
            children.push((name, path));
        }
        children.sort();
        for (name, path) in children {
            let remote = format!("{remote}/{name}");
            let meta =
                std::fs::symlink_metadata(&path).map_err(SessionError::io(phase, "stat", &path))?;
            let ft = meta.file_type();
            let (kind, target, size) = if ft.is_dir() {
                pending.push((path.clone(), remote.clone()));
                (TreeEntryKind::Dir, String::new(), 0)
            } else if ft.is_file() {
                (TreeEntryKind::File, String::new(), meta.len())
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(SessionError::io(
                    phase,
                    "read link",
                    &path,
                ))?;
                let target = target.into_os_string().into_string().map_err(|_| {
                    SessionError::NonUtf8Path {
                        phase,
                        path: path.clone(),
                    }
                })?;
                (TreeEntryKind::Symlink, target, 0)
            } else if ft.is_char_device() && meta.rdev() == 0 {
                (TreeEntryKind::Whiteout, String::new(), 0)
            } else {
                return Err(SessionError::SpecialFile {
                    phase,
                    path,
                    kind: file_kind(&meta),
                });
            };
            out.push(Outgoing {
                entry: tree_entry(kind, remote, &meta, target),
                local: path,
                size,
            });
        }
    }
    Ok(out)
}

fn tree_entry(
    kind: TreeEntryKind,
    path: String,
    meta: &std::fs::Metadata,
    link_target: String,
) -> TreeEntry {
    TreeEntry {
        kind,
        path,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        link_target,
    }
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        "file of unknown type"
    }
}

/// Resumes the source's container that a dump left stopped (and its traffic lock), in either
/// mode, after the migration failed before the target ran it.
pub(crate) async fn resume_source<C: Checkpointer + ?Sized + 'static>(
    checkpointer: &Arc<C>,
    config: &SourceConfig,
    phase: Phase,
) -> Result<(), SessionError> {
    let req = ResumeRequest {
        pid: config.dump.pid,
        unlock_network: config.dump.network_lock == NetworkLock::Iptables,
    };
    let checkpointer = Arc::clone(checkpointer);
    let report = blocking(phase, move || {
        checkpointer
            .resume(&req)
            .map_err(|source| SessionError::Checkpoint {
                phase,
                op: "resume",
                source,
            })
    })
    .await?;
    tracing::info!(
        pid = config.dump.pid,
        tasks = report.tasks.len(),
        "source container resumed after the failed migration"
    );
    Ok(())
}

/// Resumes the container after a failure (when a dump may have stopped it); keeps both errors
/// when that fails too.
async fn source_rollback<C: Checkpointer + ?Sized + 'static, H: SourceHooks>(
    checkpointer: &Arc<C>,
    hooks: &H,
    config: &SourceConfig,
    state: &SourceState,
    cause: SessionError,
) -> SessionError {
    let phase = cause.phase();
    let mut failure = None;
    if state.needs_resume {
        if let Err(e) = resume_source(checkpointer, config, phase).await {
            failure = Some(e);
        }
    }
    if state.hooked {
        if let Err(source) = hooks.after_resume().await {
            let e = SessionError::Hook {
                phase,
                hook: "after resume",
                source,
            };
            failure.get_or_insert(e);
        }
    }
    match failure {
        None => cause,
        Some(resume) => {
            tracing::error!(error = %resume, "resuming the source container failed");
            SessionError::ResumeFailed {
                cause: Box::new(cause),
                resume: Box::new(resume),
            }
        }
    }
}

async fn remove_dirs(dirs: Vec<PathBuf>) {
    let _ = tokio::task::spawn_blocking(move || {
        for dir in dirs {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "removing a migration dump failed")
                }
            }
        }
    })
    .await;
}

// ------------------------------------------------------------------------------------------
// Target
// ------------------------------------------------------------------------------------------

/// Disk the migration may use on the target.
pub(crate) struct Budget {
    pub(crate) limit: u64,
    pub(crate) pages: AtomicU64,
    pub(crate) files: AtomicU64,
}

impl Budget {
    fn check(&self, phase: Phase) -> Result<(), SessionError> {
        let needed = self
            .pages
            .load(Ordering::Relaxed)
            .saturating_add(self.files.load(Ordering::Relaxed));
        if needed > self.limit {
            return Err(SessionError::TooLarge {
                phase,
                needed,
                limit: self.limit,
            });
        }
        Ok(())
    }
}

/// The staging dir, removed on drop (failure or cancellation) unless kept.
pub(crate) struct Staging {
    pub(crate) dir: PathBuf,
    pub(crate) armed: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), %error, "removing the migration staging dir failed");
            }
        }
    }
}

/// What the target did so far, in either mode, read after a failure to undo it.
#[derive(Default)]
pub(crate) struct TargetState {
    pub(crate) staging: Option<Staging>,
    pub(crate) prepared: bool,
    pub(crate) pid: Option<i32>,
}

impl TargetState {
    /// After a failure: the host's part undone, the source told why, the staging dir removed.
    pub(crate) async fn undo<H, W>(
        &mut self,
        host: &H,
        control_tx: &mut FrameWriter<W>,
        err: &SessionError,
    ) where
        H: TargetHost,
        W: AsyncWrite + Unpin + Send,
    {
        if self.prepared {
            host.abort(self.pid).await;
        }
        tell_peer_failed(control_tx, err).await;
        if let Some(staging) = self.staging.take() {
            let _ = tokio::task::spawn_blocking(move || drop(staging)).await;
        }
    }
}

/// Sends the peer an `Error` frame saying why this side failed. Best effort: a cancelled send
/// leaves the writer broken, and the link may be gone.
pub(crate) async fn tell_peer_failed<W: AsyncWrite + Unpin + Send>(
    control_tx: &mut FrameWriter<W>,
    err: &SessionError,
) {
    let message = err.to_string();
    let _ = tokio::time::timeout(ERROR_GRACE, async {
        control_tx.send(&Frame::Error { message }).await?;
        control_tx.flush().await
    })
    .await;
}

/// What the files stream brought.
#[derive(Default)]
pub(crate) struct FilesReceived {
    pub(crate) files: u64,
    pub(crate) bytes: u64,
    pub(crate) upper: bool,
}

/// Receives the migration the hub ordered (`config`) from the source at the other end of
/// `streams`, restores it through `checkpointer` as `host` prepares, and answers the source.
///
/// On `Err` nothing of the migration is left on this node: [`TargetHost::abort`] was called if
/// `prepare` was, and the staging dir is gone.
pub async fn run_target<C, H, R, W, F>(
    checkpointer: Arc<C>,
    host: &H,
    config: &TargetConfig,
    streams: TargetStreams<R, W, F>,
    progress: &ProgressSink,
) -> Result<TargetOutcome, SessionError>
where
    C: Checkpointer + ?Sized + 'static,
    H: TargetHost,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    F: AsyncRead + Unpin + Send,
{
    let counters = Arc::new(WireCounters::default());
    let tracker = Tracker::new(progress, &counters, false);
    let mut control_rx = framed_reader(streams.control_rx, config.max_payload, &counters);
    let mut control_tx = framed_writer(streams.control_tx, config.max_payload, &counters);
    let mut files_rx = framed_reader(streams.files_rx, config.max_payload, &counters);
    let mut state = TargetState::default();
    let span = tracing::info_span!(
        "migrate_target",
        migration_id = %config.migration_id,
        instance_id = %config.instance_id,
    );
    let result = target_exchange(
        &checkpointer,
        host,
        config,
        &mut control_rx,
        &mut control_tx,
        &mut files_rx,
        &mut state,
        &tracker,
    )
    .instrument(span)
    .await;
    match result {
        Ok(outcome) => {
            tracker.enter(Phase::Done);
            Ok(outcome)
        }
        Err(err) => {
            tracing::warn!(migration_id = %config.migration_id, error = %err, "migration target failed");
            state.undo(host, &mut control_tx, &err).await;
            Err(err)
        }
    }
}

impl RestorePlan {
    /// The CRIU restore this plan asks for, from the images in `images_dir`.
    pub(crate) fn request(&self, images_dir: PathBuf) -> RestoreRequest<'_> {
        let [a, b, c] = &self.stdio;
        RestoreRequest {
            images_dir,
            rootfs: self.rootfs.clone(),
            netns: self.netns.clone(),
            stdio: [
                a.as_ref().map(AsFd::as_fd),
                b.as_ref().map(AsFd::as_fd),
                c.as_ref().map(AsFd::as_fd),
            ],
            cgroup_root: self.cgroup_root.clone(),
            external_mounts: self.external_mounts.clone(),
            tcp_established: self.tcp_established,
            timeout: self.timeout,
        }
    }
}

/// The target's close, in either mode: the host adopts the restored container, then the source
/// hears `Restored` with `timings` (their adoption time filled in here).
pub(crate) async fn adopt_and_answer<H, W>(
    host: &H,
    report: &RestoreReport,
    mut timings: Restored,
    control_tx: &mut FrameWriter<W>,
    peer: Duration,
) -> Result<Restored, SessionError>
where
    H: TargetHost,
    W: AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    host.adopt(report)
        .await
        .map_err(|source| SessionError::Hook {
            phase: Phase::Switch,
            hook: "adopt",
            source,
        })?;
    timings.adopt_ms = millis(started.elapsed());
    send(control_tx, &Frame::Restored(timings), Phase::Switch, peer).await?;
    flush(control_tx, Phase::Switch, peer).await?;
    Ok(timings)
}

/// The target's opening, in either mode: both hellos checked against the order, then the staging
/// dir (and its images area) made; removed again when the returned guard is dropped armed.
pub(crate) async fn accept_hellos_and_stage<R, F>(
    config: &TargetConfig,
    control_rx: &mut FrameReader<R>,
    files_rx: &mut FrameReader<F>,
) -> Result<Staging, SessionError>
where
    R: AsyncRead + Unpin + Send,
    F: AsyncRead + Unpin + Send,
{
    let t = config.timeouts;
    let frame = recv(control_rx, Phase::Prepare, "send its hello", t.handshake).await?;
    check_hello(config, frame)?;
    let frame = recv(files_rx, Phase::Prepare, "send its hello", t.handshake).await?;
    check_hello(config, frame)?;
    let staging_dir = config.staging_dir.clone();
    blocking(Phase::Prepare, move || {
        let phase = Phase::Prepare;
        if let Some(parent) = staging_dir.parent() {
            std::fs::create_dir_all(parent).map_err(SessionError::io(phase, "create", parent))?;
        }
        std::fs::create_dir(&staging_dir).map_err(SessionError::io(
            phase,
            "create staging dir",
            &staging_dir,
        ))?;
        let staging = Staging {
            dir: staging_dir.clone(),
            armed: true,
        };
        let images = staging_dir.join(IMAGES_AREA);
        std::fs::create_dir(&images).map_err(SessionError::io(phase, "create", &images))?;
        Ok(staging)
    })
    .await
}

#[allow(clippy::too_many_arguments)]
async fn target_exchange<C, H, R, W, F>(
    checkpointer: &Arc<C>,
    host: &H,
    config: &TargetConfig,
    control_rx: &mut FrameReader<R>,
    control_tx: &mut FrameWriter<W>,
    files_rx: &mut FrameReader<F>,
    state: &mut TargetState,
    tracker: &Tracker,
) -> Result<TargetOutcome, SessionError>
where
    C: Checkpointer + ?Sized + 'static,
    H: TargetHost,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    F: AsyncRead + Unpin + Send,
{
    let t = config.timeouts;
    tracker.enter(Phase::Prepare);
    state.staging = Some(accept_hellos_and_stage(config, control_rx, files_rx).await?);
    let staging_dir = config.staging_dir.clone();
    let store = blocking(Phase::Prepare, move || {
        PageStore::create(&staging_dir.join(STORE_DIR)).map_err(|source| SessionError::Pages {
            phase: Phase::Prepare,
            source,
        })
    })
    .await?;
    let images_dir = config.staging_dir.join(IMAGES_AREA);

    send(control_tx, &Frame::Ready, Phase::Prepare, t.handshake).await?;
    flush(control_tx, Phase::Prepare, t.handshake).await?;
    tracker.enter(Phase::Precopy);
    tracing::debug!(migration_id = %config.migration_id, "migration accepted");

    let budget = Arc::new(Budget {
        limit: config.max_bytes,
        pages: AtomicU64::new(0),
        files: AtomicU64::new(0),
    });
    let pages = receive_pages(control_rx, store, &budget, tracker, t.peer);
    let files = receive_files(files_rx, config, &budget, tracker);
    let ((store, rounds, pages_received), files) = tokio::try_join!(pages, files)?;

    // Images, then the host's preparation, then CRIU.
    tracker.enter(Phase::Restore);
    let started = Instant::now();
    let written = {
        let images_dir = images_dir.clone();
        blocking(Phase::Restore, move || {
            let written =
                store
                    .write_images(&images_dir)
                    .map_err(|source| SessionError::Pages {
                        phase: Phase::Restore,
                        source,
                    })?;
            drop(store);
            let metadata =
                Metadata::read(&images_dir).map_err(|source| SessionError::Checkpoint {
                    phase: Phase::Restore,
                    op: "read metadata",
                    source,
                })?;
            Ok((written, metadata))
        })
        .await?
    };
    let (written, metadata) = written;
    let images_ms = millis(started.elapsed());
    let received = Received {
        images_dir: images_dir.clone(),
        upper_dir: files.upper.then(|| config.staging_dir.join(UPPER_AREA)),
        metadata,
        pages: written.pages,
        files: files.files,
        file_bytes: files.bytes,
    };

    let (plan, prepare_ms) = prepare_restore(host, &received, &mut state.prepared).await?;

    let started = Instant::now();
    let report = {
        let checkpointer = Arc::clone(checkpointer);
        let images_dir = images_dir.clone();
        blocking(Phase::Restore, move || {
            checkpointer
                .restore(&plan.request(images_dir))
                .map_err(|source| SessionError::Checkpoint {
                    phase: Phase::Restore,
                    op: "restore",
                    source,
                })
        })
        .await?
    };
    state.pid = Some(report.pid);
    let restore_ms = millis(started.elapsed());

    tracker.enter(Phase::Switch);
    let timings = Restored {
        pid: u32::try_from(report.pid).unwrap_or(0),
        images_ms,
        prepare_ms,
        restore_ms,
        adopt_ms: 0,
    };
    let timings = adopt_and_answer(host, &report, timings, control_tx, t.peer).await?;
    tracing::info!(
        migration_id = %config.migration_id,
        pid = report.pid,
        images_ms,
        prepare_ms,
        restore_ms,
        "migrated container restored and running"
    );

    // The images and the page store are spent; the upper dir is the container's now.
    if let Some(mut staging) = state.staging.take() {
        staging.armed = false;
        let dir = staging.dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for sub in [IMAGES_AREA, STORE_DIR] {
                if let Err(error) = std::fs::remove_dir_all(dir.join(sub)) {
                    tracing::warn!(dir = %dir.display(), %error, "removing spent migration files failed");
                }
            }
        })
        .await;
    }
    Ok(TargetOutcome {
        pid: report.pid,
        rounds,
        pages_received,
        bytes_received: tracker.counters.snapshot().bytes_received,
        upper_dir: received.upper_dir,
        timings,
    })
}

pub(crate) fn check_hello(config: &TargetConfig, frame: Frame) -> Result<(), SessionError> {
    let Frame::Hello(hello) = frame else {
        return Err(SessionError::protocol(
            Phase::Prepare,
            format!("expected hello, got {}", frame.kind()),
        ));
    };
    if hello.migration_id != config.migration_id || hello.instance_id != config.instance_id {
        return Err(SessionError::Refused {
            got_migration: hello.migration_id,
            got_instance: hello.instance_id,
            expected_migration: config.migration_id.clone(),
            expected_instance: config.instance_id.clone(),
        });
    }
    Ok(())
}

/// Applies the control stream's rounds to the store until `Done`; returns the store, the
/// rounds and the pages received.
async fn receive_pages<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    store: PageStore,
    budget: &Arc<Budget>,
    tracker: &Tracker,
    peer: Duration,
) -> Result<(PageStore, u32, u64), SessionError> {
    let (batches, mut queue) = mpsc::channel::<(Phase, ChangeBatch)>(APPLY_QUEUE);
    let apply = {
        let budget = Arc::clone(budget);
        tokio::task::spawn_blocking(move || -> Result<PageStore, SessionError> {
            let mut store = store;
            while let Some((phase, batch)) = queue.blocking_recv() {
                let pages_err = |source| SessionError::Pages { phase, source };
                for record in batch.records() {
                    let change = Change::decode(record).map_err(pages_err)?;
                    store.apply(&change).map_err(pages_err)?;
                }
                budget
                    .pages
                    .store(store.page_count() * PAGE_SIZE as u64, Ordering::Relaxed);
                budget.check(phase)?;
            }
            Ok(store)
        })
    };
    let mut rounds = 0;
    let mut pages = 0;
    let mut next_round = 1;
    let result = loop {
        let phase = tracker.phase();
        let frame = match recv(reader, phase, "send the next round", peer).await {
            Ok(frame) => frame,
            Err(e) => break Err(e),
        };
        match frame {
            Frame::Changes(batch) => {
                if batches.send((phase, batch)).await.is_err() {
                    // The store stopped: its error is the one to report.
                    break Ok(());
                }
            }
            Frame::RoundEnd(end) => {
                if end.round != next_round {
                    break Err(SessionError::protocol(
                        phase,
                        format!("round {} ended, expected round {next_round}", end.round),
                    ));
                }
                next_round += 1;
                rounds = end.round;
                pages += end.pages;
                tracker.round_done(end.round, end.pages);
            }
            Frame::Done => break Ok(()),
            other => {
                break Err(SessionError::protocol(
                    phase,
                    format!("unexpected {} frame on the control stream", other.kind()),
                ))
            }
        }
    };
    drop(batches);
    result?;
    let store = apply.await.map_err(|source| SessionError::Task {
        phase: tracker.phase(),
        source,
    })??;
    Ok((store, rounds, pages))
}

/// Receives the files stream's entries into the staging dir.
pub(crate) async fn receive_files<F: AsyncRead + Unpin>(
    reader: &mut FrameReader<F>,
    config: &TargetConfig,
    budget: &Budget,
    tracker: &Tracker,
) -> Result<FilesReceived, SessionError> {
    let t = config.timeouts;
    let phase = Phase::Transfer;
    let manifest = match recv(reader, phase, "start the transfer", t.final_phase).await? {
        Frame::Manifest(manifest) => manifest,
        other => {
            return Err(SessionError::protocol(
                phase,
                format!("expected manifest, got {}", other.kind()),
            ))
        }
    };
    tracker.enter(Phase::Transfer);
    budget.files.store(manifest.bytes, Ordering::Relaxed);
    budget.check(phase)?;

    let staging = config.staging_dir.clone();
    let owner = |entry: &TreeEntry| config.chown.then_some((entry.uid, entry.gid));
    let mut received = FilesReceived::default();
    // Directories stay writable until everything is in; their modes are set last, deepest
    // first.
    let mut dirs = Vec::new();
    for _ in 0..manifest.entries {
        let entry = match recv(reader, phase, "send the next entry", t.peer).await? {
            Frame::Entry(entry) => entry,
            other => {
                return Err(SessionError::protocol(
                    phase,
                    format!("expected entry, got {}", other.kind()),
                ))
            }
        };
        let upper = check_entry_path(&entry)?;
        received.upper |= upper && entry.path == UPPER_AREA;
        match entry.kind {
            TreeEntryKind::File => {
                let start = match recv(reader, phase, "send a file", t.peer).await? {
                    Frame::FileStart(start) if start.path == entry.path => start,
                    other => {
                        return Err(SessionError::protocol(
                            phase,
                            format!(
                                "expected the file-start of {}, got {}",
                                entry.path,
                                other.kind()
                            ),
                        ))
                    }
                };
                let total = received.bytes.saturating_add(start.size);
                if total > manifest.bytes {
                    return Err(SessionError::protocol(
                        phase,
                        format!(
                            "files exceed the announced {} bytes at {}",
                            manifest.bytes, entry.path
                        ),
                    ));
                }
                let size = start.size;
                timed(
                    phase,
                    "send a file",
                    file_timeout(t.peer, size),
                    reader.receive_announced_file(start, &staging),
                )
                .await?;
                received.files += 1;
                received.bytes = total;
                if upper {
                    let (staging, entry) = (staging.clone(), entry.clone());
                    let owner = owner(&entry);
                    blocking(phase, move || {
                        wire::set_attrs_below(&staging, &entry.path, Some(entry.mode), owner)
                            .map_err(|e| SessionError::wire(phase, e))
                    })
                    .await?;
                }
            }
            kind => {
                let (staging, entry) = (staging.clone(), entry.clone());
                let owner = owner(&entry);
                let dir = blocking(phase, move || {
                    let wire_err = |e| SessionError::wire(phase, e);
                    match kind {
                        TreeEntryKind::Dir => {
                            wire::create_dir_below(&staging, &entry.path, 0o700)
                                .map_err(wire_err)?;
                            return Ok(Some(entry));
                        }
                        TreeEntryKind::Symlink => {
                            wire::create_symlink_below(&staging, &entry.path, &entry.link_target)
                                .map_err(wire_err)?
                        }
                        _ => {
                            wire::create_whiteout_below(&staging, &entry.path).map_err(wire_err)?
                        }
                    }
                    if owner.is_some() {
                        wire::set_attrs_below(&staging, &entry.path, None, owner)
                            .map_err(wire_err)?;
                    }
                    Ok(None)
                })
                .await?;
                dirs.extend(dir);
            }
        }
    }
    match recv(reader, phase, "end the transfer", t.peer).await? {
        Frame::Done => {}
        other => {
            return Err(SessionError::protocol(
                phase,
                format!(
                    "expected done after {} entries, got {}",
                    manifest.entries,
                    other.kind()
                ),
            ))
        }
    }
    let chown = config.chown;
    blocking(phase, move || {
        for entry in dirs.iter().rev() {
            let owner = chown.then_some((entry.uid, entry.gid));
            wire::set_attrs_below(&staging, &entry.path, Some(entry.mode), owner)
                .map_err(|e| SessionError::wire(phase, e))?;
        }
        Ok(())
    })
    .await?;
    Ok(received)
}

/// Checks an entry's area: `images/<name>` (files only) or `upper[/…]`; says whether it is in
/// the upper dir.
fn check_entry_path(entry: &TreeEntry) -> Result<bool, SessionError> {
    let mut parts = entry.path.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(IMAGES_AREA), Some(_), None) if entry.kind == TreeEntryKind::File => Ok(false),
        (Some(UPPER_AREA), _, _) => Ok(true),
        _ => Err(SessionError::protocol(
            Phase::Transfer,
            format!(
                "{} entry {:?} is outside images/ and upper/",
                entry.kind, entry.path
            ),
        )),
    }
}

// ------------------------------------------------------------------------------------------
// QUIC
// ------------------------------------------------------------------------------------------

/// [`run_source`] over a dialled migration connection: opens the control and files streams,
/// and closes the connection when done.
pub async fn run_source_quic<C, H>(
    connection: &quinn::Connection,
    checkpointer: Arc<C>,
    hooks: &H,
    config: &SourceConfig,
    progress: &ProgressSink,
) -> Result<SourceOutcome, SessionError>
where
    C: Checkpointer + ?Sized + 'static,
    H: SourceHooks,
{
    let phase = Phase::Prepare;
    let connection_err = |source| SessionError::Connection { phase, source };
    let streams = async {
        let (control_tx, control_rx) = connection.open_bi().await.map_err(connection_err)?;
        let files_tx = connection.open_uni().await.map_err(connection_err)?;
        Ok::<_, SessionError>(SourceStreams {
            control_rx,
            control_tx,
            files_tx,
        })
    };
    let streams = match tokio::time::timeout(config.timeouts.handshake, streams).await {
        Ok(streams) => streams,
        Err(_) => Err(SessionError::Timeout {
            phase,
            what: "open the migration streams",
            waited: config.timeouts.handshake,
        }),
    };
    let result = match streams {
        Ok(streams) => run_source(checkpointer, hooks, config, streams, progress).await,
        Err(e) => Err(e),
    };
    match &result {
        Ok(_) => connection.close(quinn::VarInt::from_u32(CLOSE_OK), b"migrated"),
        Err(_) => connection.close(quinn::VarInt::from_u32(CLOSE_FAILED), b"migration failed"),
    }
    result
}

/// [`run_target`] over an accepted migration connection: accepts the control and files
/// streams, and lets the source close the connection once it has the verdict.
pub async fn run_target_quic<C, H>(
    connection: &quinn::Connection,
    checkpointer: Arc<C>,
    host: &H,
    config: &TargetConfig,
    progress: &ProgressSink,
) -> Result<TargetOutcome, SessionError>
where
    C: Checkpointer + ?Sized + 'static,
    H: TargetHost,
{
    let phase = Phase::Prepare;
    let connection_err = |source| SessionError::Connection { phase, source };
    let streams = async {
        let (control_tx, control_rx) = connection.accept_bi().await.map_err(connection_err)?;
        let files_rx = connection.accept_uni().await.map_err(connection_err)?;
        Ok::<_, SessionError>(TargetStreams {
            control_rx,
            control_tx,
            files_rx,
        })
    };
    let streams = match tokio::time::timeout(config.timeouts.handshake, streams).await {
        Ok(streams) => streams,
        Err(_) => Err(SessionError::Timeout {
            phase,
            what: "open the migration streams",
            waited: config.timeouts.handshake,
        }),
    };
    let result = match streams {
        Ok(streams) => run_target(checkpointer, host, config, streams, progress).await,
        Err(e) => Err(e),
    };
    // The streams are finished (dropped); the source closes once it has read the verdict.
    let _ = tokio::time::timeout(CLOSE_GRACE, connection.closed()).await;
    match &result {
        Ok(_) => connection.close(quinn::VarInt::from_u32(CLOSE_OK), b"restored"),
        Err(_) => connection.close(quinn::VarInt::from_u32(CLOSE_FAILED), b"migration failed"),
    }
    result
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
