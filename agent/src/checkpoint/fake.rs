//! A [`Checkpointer`] that records calls and answers from a script, for the migration logic's
//! unit tests (no root, no CRIU).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{
    CheckpointError, Checkpointer, DumpMode, DumpReport, DumpRequest, Features, RestoreReport,
    RestoreRequest, ResumeReport, ResumeRequest,
};

/// Which operation a scripted failure applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`Checkpointer::features`].
    Features,
    /// [`Checkpointer::dump`].
    Dump,
    /// [`Checkpointer::resume`].
    Resume,
    /// [`Checkpointer::restore`].
    Restore,
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A feature check.
    Features,
    /// A dump of `pid` into `images_dir`.
    Dump {
        /// Init pid.
        pid: i32,
        /// Images dir.
        images_dir: PathBuf,
        /// Mode.
        mode: DumpMode,
        /// Parent images given.
        parent_images: Option<PathBuf>,
    },
    /// A resume.
    Resume(ResumeRequest),
    /// A restore.
    Restore {
        /// Images dir.
        images_dir: PathBuf,
        /// Rootfs.
        rootfs: PathBuf,
        /// Netns path.
        netns: Option<PathBuf>,
        /// Cgroup root.
        cgroup_root: Option<String>,
    },
}

/// Called on every successful fake dump (e.g. to write image files the test then reads).
pub type OnDump = Box<dyn Fn(&DumpRequest) + Send + Sync>;

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    failures: VecDeque<(Op, String)>,
    next_pid: i32,
}

/// Records every call; succeeds unless a failure was scripted with [`FakeCheckpointer::fail`].
pub struct FakeCheckpointer {
    features: Features,
    on_dump: Option<OnDump>,
    state: Mutex<State>,
}

impl std::fmt::Debug for FakeCheckpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCheckpointer")
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

impl FakeCheckpointer {
    /// A fake reporting `features`; restores return pids from 1000 up.
    pub fn new(features: Features) -> Self {
        Self {
            features,
            on_dump: None,
            state: Mutex::new(State {
                next_pid: 1000,
                ..Default::default()
            }),
        }
    }

    /// Runs `f` on every successful dump.
    pub fn with_on_dump(mut self, f: OnDump) -> Self {
        self.on_dump = Some(f);
        self
    }

    /// The next call of `op` fails with a [`CheckpointError::Criu`] carrying `message`.
    pub fn fail(&self, op: Op, message: &str) {
        self.lock().failures.push_back((op, message.to_owned()));
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data: a panicking holder cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, op: Op, call: Call, images_dir: PathBuf) -> Result<(), CheckpointError> {
        let mut st = self.lock();
        st.calls.push(call);
        if let Some(i) = st.failures.iter().position(|(o, _)| *o == op) {
            let (_, message) = st.failures.remove(i).unwrap_or((op, String::new()));
            return Err(CheckpointError::Criu {
                op: match op {
                    Op::Features => "features",
                    Op::Dump => "dump",
                    Op::Resume => "resume",
                    Op::Restore => "restore",
                },
                images_dir,
                errno: 0,
                errmsg: None,
                log_tail: message,
            });
        }
        Ok(())
    }
}

impl Checkpointer for FakeCheckpointer {
    fn features(&self) -> Result<Features, CheckpointError> {
        self.record(Op::Features, Call::Features, PathBuf::new())?;
        Ok(self.features)
    }

    fn dump(&self, req: &DumpRequest) -> Result<DumpReport, CheckpointError> {
        self.record(
            Op::Dump,
            Call::Dump {
                pid: req.pid,
                images_dir: req.images_dir.clone(),
                mode: req.mode,
                parent_images: req.parent_images.clone(),
            },
            req.images_dir.clone(),
        )?;
        if let Some(f) = &self.on_dump {
            f(req);
        }
        Ok(DumpReport {
            wall: Duration::from_millis(1),
            stats: None,
            images_bytes: 0,
            mem_tracked: req.track_mem && self.features.mem_track,
            stdio: vec!["/dev/null".into(), "pipe:[1]".into(), "pipe:[2]".into()],
        })
    }

    fn resume(&self, req: &ResumeRequest) -> Result<ResumeReport, CheckpointError> {
        self.record(Op::Resume, Call::Resume(*req), PathBuf::new())?;
        Ok(ResumeReport {
            tasks: vec![req.pid],
            ..Default::default()
        })
    }

    fn restore(&self, req: &RestoreRequest<'_>) -> Result<RestoreReport, CheckpointError> {
        self.record(
            Op::Restore,
            Call::Restore {
                images_dir: req.images_dir.clone(),
                rootfs: req.rootfs.clone(),
                netns: req.netns.clone(),
                cgroup_root: req.cgroup_root.clone(),
            },
            req.images_dir.clone(),
        )?;
        let mut st = self.lock();
        st.next_pid += 1;
        Ok(RestoreReport {
            pid: st.next_pid,
            wall: Duration::from_millis(1),
            stats: None,
        })
    }
}
