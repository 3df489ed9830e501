//! Checkpoint and restore of a container's process tree with CRIU, driven over CRIU's RPC
//! interface (`criu swrk`, protobuf on a socket pair; see `rpc`), never by parsing its output.
//!
//! [`Criu`] is the real [`Checkpointer`]; [`fake::FakeCheckpointer`] records calls and injects
//! failures so the migration logic above is tested without root.
//!
//! - [`Checkpointer::dump`] writes a running container (its init pid and namespaces) to an images
//!   dir: `LeaveRunning` for pre-copy rounds, `LeaveStopped` for the final round (the tasks stay
//!   stopped so a failed migration can [`Checkpointer::resume`] them). The container's network
//!   namespace is external (only its identity is in the images): the restore puts the tree into a
//!   namespace the caller prepared with the same address. CRIU's log (`dump.log`) stays in the
//!   images dir; its last error lines are quoted in [`CheckpointError::Criu`].
//! - [`Checkpointer::restore`] brings the images back on this node: into a given rootfs, network
//!   namespace and cgroup, with the init's stdout/stderr replaced by the caller's pipes (matched by
//!   the pipe identities the dump recorded in [`METADATA_FILE`]). The restored init becomes a child
//!   of the calling process (CRIU's `rst_sibling`), so the agent reaps it.
//!
//! Every call blocks (CRIU runs for tens to hundreds of milliseconds): use `spawn_blocking`.

#[cfg(test)]
pub(crate) mod fake;
pub mod lazy;
mod resume;
mod rpc;
pub mod stats;

use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use resume::ResumeReport;
pub use stats::{DumpStats, RestoreStats, StatsError};

/// Where `cargo xtask install` puts CRIU.
pub const DEFAULT_CRIU: &str = "/usr/local/sbin/criu";

/// berth's record of a dump, next to CRIU's images: what a restore must reconnect.
pub const METADATA_FILE: &str = "berth-checkpoint.json";

/// CRIU's log of a dump, in the images dir.
pub const DUMP_LOG: &str = "dump.log";

/// CRIU's log of a restore, in the images dir.
pub const RESTORE_LOG: &str = "restore.log";

/// The `--external` key runc and youki use for a container's network namespace.
const NETNS_KEY: &str = "extRootNetNS";

/// CRIU log level 4: debug, what its developers ask for in bug reports.
const LOG_LEVEL: i32 = 4;

/// How many of the log's error lines an error quotes.
const LOG_LINES: usize = 8;

/// What CRIU and this kernel support (asked once per [`Criu`] through an RPC feature check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// Soft-dirty memory tracking: incremental dumps (`track_mem` + parent images).
    pub mem_track: bool,
    /// userfaultfd lazy pages: post-copy restores.
    pub lazy_pages: bool,
    /// pidfd store (pid reuse detection across pre-dumps).
    pub pidfd_store: bool,
}

/// What happens to the tasks after a successful dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpMode {
    /// They keep running (a pre-copy round).
    LeaveRunning,
    /// They stay stopped (final round): [`Checkpointer::resume`] rolls back, or the caller
    /// removes them once the target runs.
    LeaveStopped,
    /// CRIU kills them (plain stop-and-copy).
    Kill,
}

/// How CRIU keeps the container's network quiet while it is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkLock {
    /// CRIU's iptables chain in the container's netns (works here through iptables-nft).
    #[default]
    Iptables,
    /// No lock by CRIU: the caller locks the traffic itself (e.g. tc/eBPF on the host veth).
    Skip,
}

/// One checkpoint of a running container.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    /// Host pid of the container's init (`Runtime::state(id)`).
    pub pid: i32,
    /// Where the images go (created if missing; existing images of the same names are replaced).
    pub images_dir: PathBuf,
    /// What happens to the tasks afterwards.
    pub mode: DumpMode,
    /// Dump established TCP connections (`--tcp-established`); the restore must say it too.
    pub tcp_established: bool,
    /// Track memory changes (soft-dirty) so the next dump can name this one as its parent. Ignored
    /// (see [`DumpReport::mem_tracked`]) when the kernel lacks it, as on these machines.
    pub track_mem: bool,
    /// Images of the previous round: with memory tracking, only pages changed since go here.
    pub parent_images: Option<PathBuf>,
    /// Mount points inside the container whose source is outside it (bind mounts of host
    /// files, e.g. `/etc/resolv.conf`): the restore maps each to a host path again. See
    /// [`bind_mount_points`].
    pub external_mounts: Vec<String>,
    /// Freeze through this cgroup's freezer (v1 freezer dir or v2 dir) instead of stopping each
    /// task with ptrace: no task can fork its way out of the dump.
    pub freeze_cgroup: Option<PathBuf>,
    /// Network lock method.
    pub network_lock: NetworkLock,
    /// CRIU is killed when it has not answered by then (tasks it froze are then left to
    /// [`Checkpointer::resume`]).
    pub timeout: Duration,
}

impl DumpRequest {
    /// A request with berth's defaults: established TCP dumped, iptables lock, 60 s timeout.
    pub fn new(pid: i32, images_dir: PathBuf, mode: DumpMode) -> Self {
        Self {
            pid,
            images_dir,
            mode,
            tcp_established: true,
            track_mem: false,
            parent_images: None,
            external_mounts: Vec::new(),
            freeze_cgroup: None,
            network_lock: NetworkLock::Iptables,
            timeout: Duration::from_secs(60),
        }
    }
}

/// What a dump took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpReport {
    /// From sending the request to CRIU's answer (includes CRIU's start).
    pub wall: Duration,
    /// CRIU's own figures (`stats-dump`), the frozen time among them; `None` if unreadable.
    pub stats: Option<DumpStats>,
    /// Bytes of image files written (logs and berth's metadata excluded).
    pub images_bytes: u64,
    /// Whether memory tracking was on (requested and supported).
    pub mem_tracked: bool,
    /// What the init's fds 0, 1, 2 were (`pipe:[inode]`, `/dev/null`...), as in the metadata.
    pub stdio: Vec<String>,
}

/// Rolls back a [`DumpMode::LeaveStopped`] dump: the container continues where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeRequest {
    /// Host pid of the container's init.
    pub pid: i32,
    /// The dump used [`NetworkLock::Iptables`]: remove CRIU's lock.
    pub unlock_network: bool,
}

/// One restore of dumped images as a container on this node.
#[derive(Debug)]
pub struct RestoreRequest<'a> {
    /// The images (with CRIU's files and [`METADATA_FILE`]).
    pub images_dir: PathBuf,
    /// The container's root filesystem: absolute, no symlinks, and not the source's while the
    /// source is still there.
    pub rootfs: PathBuf,
    /// The network namespace to restore into (e.g. `/run/netns/x` or `/proc/<pid>/ns/net`),
    /// prepared with the container's address. Required when the dump had one (always, for
    /// containers).
    pub netns: Option<PathBuf>,
    /// Replacements for the init's fds 0, 1, 2 when they were pipes (the log shim's write ends).
    /// `None` leaves CRIU to recreate a pipe nobody reads.
    pub stdio: [Option<BorrowedFd<'a>>; 3],
    /// Cgroup path (the same in every hierarchy, e.g. `/berth-n2/ins-…`) the tree goes into;
    /// created here when missing. `None` keeps the dumped path.
    pub cgroup_root: Option<String>,
    /// For each of the dump's external mounts: the host path to bind there.
    pub external_mounts: Vec<(String, PathBuf)>,
    /// Restore established TCP connections (the dump must have had them).
    pub tcp_established: bool,
    /// CRIU is killed when it has not answered by then.
    pub timeout: Duration,
}

/// What a restore gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Host pid of the restored init, a child of the calling process.
    pub pid: i32,
    /// From sending the request to CRIU's answer.
    pub wall: Duration,
    /// CRIU's own figures (`stats-restore`); `None` if unreadable.
    pub stats: Option<RestoreStats>,
}

/// Errors of checkpoint, resume and restore.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The request cannot be carried out as given.
    #[error("invalid checkpoint request: {0}")]
    InvalidRequest(String),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// CRIU could not be run, or its RPC exchange broke down.
    #[error("criu {op} (images {images_dir}): {message}")]
    Rpc {
        /// `dump`, `restore`, `features`.
        op: &'static str,
        /// The images dir (empty for feature checks).
        images_dir: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// CRIU answered that the operation failed.
    #[error("criu {op} failed (images {images_dir}, errno {errno}){}: {log_tail}", errmsg.as_deref().map(|m| format!(" {m}")).unwrap_or_default())]
    Criu {
        /// `dump` or `restore`.
        op: &'static str,
        /// The images dir, which holds CRIU's full log.
        images_dir: PathBuf,
        /// CRIU's errno (0 when it gave none).
        errno: i32,
        /// CRIU's error message, when it sent one.
        errmsg: Option<String>,
        /// The last error lines of CRIU's log.
        log_tail: String,
    },
    /// Resuming stopped tasks failed.
    #[error("resume of container init {pid}: {reason}")]
    Resume {
        /// The init pid.
        pid: i32,
        /// Why.
        reason: String,
    },
}

/// Checkpoint operations, behind a trait so the migration logic can run on a fake.
pub trait Checkpointer: Send + Sync {
    /// What CRIU and the kernel support.
    fn features(&self) -> Result<Features, CheckpointError>;
    /// Checkpoints a running container into `req.images_dir`.
    fn dump(&self, req: &DumpRequest) -> Result<DumpReport, CheckpointError>;
    /// Continues the tasks a [`DumpMode::LeaveStopped`] dump left stopped.
    fn resume(&self, req: &ResumeRequest) -> Result<ResumeReport, CheckpointError>;
    /// Restores images as a running container on this node.
    fn restore(&self, req: &RestoreRequest<'_>) -> Result<RestoreReport, CheckpointError>;
}

/// What [`METADATA_FILE`] holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Metadata {
    /// The init's fds 0, 1, 2 at dump time (`pipe:[inode]`, paths...).
    pub stdio: Vec<String>,
    /// Whether the network namespace was dumped as external ([`NETNS_KEY`]).
    pub external_netns: bool,
    /// The external mounts' keys (their mount points in the container).
    pub external_mounts: Vec<String>,
    /// The dumped init's pid, for the logs.
    pub pid: i32,
}

impl Metadata {
    /// Reads [`METADATA_FILE`] from an images dir.
    pub fn read(images_dir: &Path) -> Result<Self, CheckpointError> {
        let path = images_dir.join(METADATA_FILE);
        let bytes = std::fs::read(&path).map_err(|source| CheckpointError::Io {
            op: "read",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| CheckpointError::InvalidRequest(format!("bad {}: {e}", path.display())))
    }
}

/// The real CRIU, run as `criu swrk` per operation.
#[derive(Debug)]
pub struct Criu {
    path: PathBuf,
    features: OnceLock<Features>,
}

impl Criu {
    /// CRIU at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            features: OnceLock::new(),
        }
    }

    /// CRIU where `cargo xtask install` puts it, else `criu` on `PATH`.
    pub fn locate() -> Self {
        let default = Path::new(DEFAULT_CRIU);
        if default.exists() {
            return Self::new(default.to_owned());
        }
        Self::new(PathBuf::from("criu"))
    }

    /// The CRIU binary used.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks `req`, creates its images dir and reads what the dump records of the task: the CRIU
    /// options every dump (plain or lazy) sends, berth's metadata, and whether CRIU tracks memory
    /// changes for it.
    pub(crate) fn prepare_dump(
        &self,
        req: &DumpRequest,
    ) -> Result<(rpc::Opts, Metadata, bool), CheckpointError> {
        if req.pid <= 0 {
            return Err(CheckpointError::InvalidRequest(format!(
                "pid {} is not a process",
                req.pid
            )));
        }
        check_absolute("images dir", &req.images_dir)?;
        if let Some(parent) = &req.parent_images {
            check_absolute("parent images dir", parent)?;
        }
        for m in &req.external_mounts {
            if !m.starts_with('/') || m.contains(':') {
                return Err(CheckpointError::InvalidRequest(format!(
                    "external mount {m:?} must be an absolute mount point without ':'"
                )));
            }
        }
        std::fs::create_dir_all(&req.images_dir).map_err(|source| CheckpointError::Io {
            op: "create images dir",
            path: req.images_dir.clone(),
            source,
        })?;
        let mem_tracked = req.track_mem && self.features()?.mem_track;

        let netns_path = PathBuf::from(format!("/proc/{}/ns/net", req.pid));
        let netns_ino = std::fs::metadata(&netns_path)
            .map_err(|source| CheckpointError::Io {
                op: "stat netns of",
                path: netns_path,
                source,
            })?
            .ino();
        let stdio: Vec<String> = (0..3)
            .map(|n| {
                std::fs::read_link(format!("/proc/{}/fd/{n}", req.pid))
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let metadata = Metadata {
            stdio: stdio.clone(),
            external_netns: true,
            external_mounts: req.external_mounts.clone(),
            pid: req.pid,
        };

        let own_hierarchies = own_cgroup_hierarchies(req.pid)?;
        let opts = rpc::Opts {
            images_dir_fd: -1,
            images_dir: Some(path_str(&req.images_dir)?),
            pid: Some(req.pid),
            leave_running: Some(req.mode == DumpMode::LeaveRunning),
            leave_stopped: Some(req.mode == DumpMode::LeaveStopped),
            tcp_established: Some(req.tcp_established),
            // A listening socket with connections not yet accepted (a server busy at the freeze)
            // would fail the dump; those clients retry their SYN against the restored copy.
            tcp_skip_in_flight: req.tcp_established.then_some(true),
            file_locks: Some(true),
            log_level: Some(LOG_LEVEL),
            log_file: Some(DUMP_LOG.to_owned()),
            track_mem: mem_tracked.then_some(true),
            parent_img: match (&req.parent_images, mem_tracked) {
                (Some(p), true) => Some(path_str(p)?),
                _ => None,
            },
            external: vec![format!("net[{netns_ino}]:{NETNS_KEY}")],
            ext_mnt: req
                .external_mounts
                .iter()
                .map(|m| rpc::ExtMountMap {
                    key: m.clone(),
                    val: m.clone(),
                })
                .collect(),
            freeze_cgroup: req.freeze_cgroup.as_deref().map(path_str).transpose()?,
            // CRIU walks every directory below each of the task's cgroups to recreate them on
            // restore. A task left at a hierarchy's root (name=systemd on hybrid hosts, cgroup2
            // when nothing moved it) would have the whole host tree walked and copied under the
            // new root at every restore: seen here doubling the host's cgroup2 tree per restore
            // until dumps took minutes. Only the hierarchies where the task has a cgroup of its
            // own travel; in the others the restored task stays where the restorer is.
            cgroup_dump_controller: own_hierarchies.clone(),
            manage_cgroups: own_hierarchies.is_empty().then_some(false),
            network_lock: Some(match req.network_lock {
                NetworkLock::Iptables => rpc::NetworkLockMethod::Iptables,
                NetworkLock::Skip => rpc::NetworkLockMethod::Skip,
            } as i32),
            timeout: Some(req.timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32),
            ..Default::default()
        };
        Ok((opts, metadata, mem_tracked))
    }

    fn call(
        &self,
        op: &'static str,
        images_dir: &Path,
        req: &rpc::Req,
        fds: &[OwnedFd],
        timeout: Duration,
    ) -> Result<rpc::Resp, CheckpointError> {
        rpc::call(&self.path, req, fds, timeout).map_err(|e| CheckpointError::Rpc {
            op,
            images_dir: images_dir.to_owned(),
            message: match e {
                rpc::SwrkError::Timeout(_) | rpc::SwrkError::Hangup(_) => {
                    // CRIU stalled or died: where it was matters more than its earlier
                    // (often harmless) errors, so the last lines, whatever they say.
                    let log = images_dir.join(log_name(op));
                    let tail = match std::fs::read_to_string(&log) {
                        Ok(text) => last_lines(&text),
                        Err(_) => format!("(no log at {})", log.display()),
                    };
                    format!("{e}; log ends: {tail}")
                }
                other => other.to_string(),
            },
        })
    }
}

fn log_name(op: &str) -> &'static str {
    if op == "restore" {
        RESTORE_LOG
    } else {
        DUMP_LOG
    }
}

impl Checkpointer for Criu {
    fn features(&self) -> Result<Features, CheckpointError> {
        if let Some(f) = self.features.get() {
            return Ok(*f);
        }
        let req = rpc::Req {
            r#type: rpc::ReqType::FeatureCheck as i32,
            features: Some(rpc::Features {
                mem_track: Some(true),
                lazy_pages: Some(true),
                pidfd_store: Some(true),
            }),
            ..Default::default()
        };
        let resp = self.call(
            "features",
            Path::new(""),
            &req,
            &[],
            Duration::from_secs(30),
        )?;
        let f = resp.features.unwrap_or_default();
        let features = Features {
            mem_track: f.mem_track.unwrap_or(false),
            lazy_pages: f.lazy_pages.unwrap_or(false),
            pidfd_store: f.pidfd_store.unwrap_or(false),
        };
        tracing::info!(?features, criu = %self.path.display(), "criu features");
        Ok(*self.features.get_or_init(|| features))
    }

    fn dump(&self, req: &DumpRequest) -> Result<DumpReport, CheckpointError> {
        let span = tracing::info_span!("criu_dump", pid = req.pid, images = %req.images_dir.display(), mode = ?req.mode);
        let _span = span.enter();
        let (opts, metadata, mem_tracked) = self.prepare_dump(req)?;
        let stdio = metadata.stdio.clone();
        let rpc_req = rpc::Req {
            r#type: rpc::ReqType::Dump as i32,
            opts: Some(opts),
            ..Default::default()
        };
        let started = Instant::now();
        let resp = self.call("dump", &req.images_dir, &rpc_req, &[], req.timeout)?;
        let wall = started.elapsed();
        if !resp.success {
            return Err(criu_failed("dump", &req.images_dir, &resp));
        }
        let meta_path = req.images_dir.join(METADATA_FILE);
        let json = serde_json::to_vec_pretty(&metadata)
            .map_err(|e| CheckpointError::InvalidRequest(format!("encode metadata: {e}")))?;
        std::fs::write(&meta_path, json).map_err(|source| CheckpointError::Io {
            op: "write",
            path: meta_path,
            source,
        })?;
        let stats = read_stats(&req.images_dir.join("stats-dump"), stats::parse_dump_stats);
        let images_bytes = images_size(&req.images_dir)?;
        tracing::info!(
            wall_ms = wall.as_millis() as u64,
            frozen_ms = stats.map(|s| s.frozen.as_millis() as u64),
            images_bytes,
            "dumped"
        );
        Ok(DumpReport {
            wall,
            stats,
            images_bytes,
            mem_tracked,
            stdio,
        })
    }

    fn resume(&self, req: &ResumeRequest) -> Result<ResumeReport, CheckpointError> {
        if req.pid <= 0 {
            return Err(CheckpointError::InvalidRequest(format!(
                "pid {} is not a process",
                req.pid
            )));
        }
        resume::resume(req.pid, req.unlock_network)
    }

    fn restore(&self, req: &RestoreRequest<'_>) -> Result<RestoreReport, CheckpointError> {
        let span = tracing::info_span!("criu_restore", images = %req.images_dir.display(), rootfs = %req.rootfs.display());
        let _span = span.enter();
        check_absolute("images dir", &req.images_dir)?;
        check_real_dir("rootfs", &req.rootfs)?;
        let metadata = Metadata::read(&req.images_dir)?;

        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut inherit = Vec::new();
        let mut add_fd = |fd: OwnedFd, key: String| {
            inherit.push(rpc::InheritFd {
                key,
                fd: rpc::fd_number(fds.len()),
            });
            fds.push(fd);
        };
        if metadata.external_netns {
            let Some(netns) = &req.netns else {
                return Err(CheckpointError::InvalidRequest(
                    "the images need a network namespace to restore into".to_owned(),
                ));
            };
            let ns = File::open(netns).map_err(|source| CheckpointError::Io {
                op: "open netns",
                path: netns.clone(),
                source,
            })?;
            add_fd(ns.into(), NETNS_KEY.to_owned());
        }
        for (n, fd) in req.stdio.iter().enumerate() {
            let Some(fd) = fd else { continue };
            let key = metadata.stdio.get(n).cloned().unwrap_or_default();
            if !key.starts_with("pipe:[") {
                return Err(CheckpointError::InvalidRequest(format!(
                    "fd {n} of the dumped init was {key:?}, not a pipe: nothing to replace"
                )));
            }
            let owned = fd
                .try_clone_to_owned()
                .map_err(|source| CheckpointError::Io {
                    op: "dup stdio fd for",
                    path: req.images_dir.clone(),
                    source,
                })?;
            add_fd(owned, key);
        }
        let mut ext_mnt = Vec::new();
        for key in &metadata.external_mounts {
            let Some((_, host)) = req.external_mounts.iter().find(|(k, _)| k == key) else {
                return Err(CheckpointError::InvalidRequest(format!(
                    "external mount {key} of the images has no host path"
                )));
            };
            ext_mnt.push(rpc::ExtMountMap {
                key: key.clone(),
                val: path_str(host)?,
            });
        }
        let created_cgroups = match &req.cgroup_root {
            Some(root) => prepare_cgroup(root)?,
            None => Vec::new(),
        };

        let opts = rpc::Opts {
            images_dir_fd: -1,
            images_dir: Some(path_str(&req.images_dir)?),
            root: Some(path_str(&req.rootfs)?),
            rst_sibling: Some(true),
            lazy_pages: lazy::restoring_lazily().then_some(true),
            tcp_established: Some(req.tcp_established),
            file_locks: Some(true),
            log_level: Some(LOG_LEVEL),
            log_file: Some(RESTORE_LOG.to_owned()),
            inherit_fd: inherit,
            ext_mnt,
            manage_cgroups: Some(true),
            // Soft: the cgroups exist (made above), so CRIU moves the tasks in and leaves their
            // settings to the runtime; Full would also rewrite cgroup2's subtree_control,
            // which fails on hybrid hosts.
            manage_cgroups_mode: Some(rpc::CgMode::Soft as i32),
            cg_root: req
                .cgroup_root
                .iter()
                .map(|p| rpc::CgroupRoot {
                    ctrl: None,
                    path: p.clone(),
                })
                .collect(),
            ..Default::default()
        };
        let rpc_req = rpc::Req {
            r#type: rpc::ReqType::Restore as i32,
            opts: Some(opts),
            ..Default::default()
        };
        let started = Instant::now();
        let result = self.call("restore", &req.images_dir, &rpc_req, &fds, req.timeout);
        drop(fds);
        let wall = started.elapsed();
        let resp = match result {
            Ok(resp) if resp.success => resp,
            Ok(resp) => {
                remove_cgroups(&created_cgroups);
                return Err(criu_failed("restore", &req.images_dir, &resp));
            }
            Err(e) => {
                remove_cgroups(&created_cgroups);
                return Err(e);
            }
        };
        let Some(pid) = resp.restore.map(|r| r.pid).filter(|p| *p > 0) else {
            return Err(CheckpointError::Rpc {
                op: "restore",
                images_dir: req.images_dir.clone(),
                message: "criu reported success without a pid".to_owned(),
            });
        };
        let stats = read_stats(
            &req.images_dir.join("stats-restore"),
            stats::parse_restore_stats,
        );
        tracing::info!(pid, wall_ms = wall.as_millis() as u64, "restored");
        Ok(RestoreReport { pid, wall, stats })
    }
}

/// Mount points of `config.json`'s bind mounts (`type: bind` or a `bind`/`rbind` option): the
/// ones whose source is a host path, which a dump must mark external.
pub fn bind_mount_points(config_json: &Path) -> Result<Vec<String>, CheckpointError> {
    let bytes = std::fs::read(config_json).map_err(|source| CheckpointError::Io {
        op: "read",
        path: config_json.to_owned(),
        source,
    })?;
    let spec: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        CheckpointError::InvalidRequest(format!("bad {}: {e}", config_json.display()))
    })?;
    let mut out = Vec::new();
    for m in spec["mounts"].as_array().into_iter().flatten() {
        let is_bind = m["type"].as_str() == Some("bind")
            || m["options"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| matches!(o.as_str(), Some("bind" | "rbind")));
        if let (true, Some(dest)) = (is_bind, m["destination"].as_str()) {
            out.push(dest.to_owned());
        }
    }
    Ok(out)
}

fn criu_failed(op: &'static str, images_dir: &Path, resp: &rpc::Resp) -> CheckpointError {
    let err = CheckpointError::Criu {
        op,
        images_dir: images_dir.to_owned(),
        errno: resp.cr_errno.unwrap_or(0),
        errmsg: resp.cr_errmsg.clone().filter(|m| !m.is_empty()),
        log_tail: log_tail(&images_dir.join(log_name(op))),
    };
    tracing::warn!(error = %err, "criu failed");
    err
}

/// The hierarchies (as `/proc/<pid>/cgroup` names them: `memory`, `name=systemd`, `` for cgroup2)
/// in which `pid` is in a cgroup below the root.
fn own_cgroup_hierarchies(pid: i32) -> Result<Vec<String>, CheckpointError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = std::fs::read_to_string(&path).map_err(|source| CheckpointError::Io {
        op: "read",
        path,
        source,
    })?;
    Ok(hierarchies_below_root(&text))
}

fn hierarchies_below_root(proc_cgroup: &str) -> Vec<String> {
    proc_cgroup
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_id, name, path) = (fields.next()?, fields.next()?, fields.next()?);
            (path != "/").then(|| name.to_owned())
        })
        .collect()
}

/// The last error lines of a CRIU log (or its last lines when it has none), one string.
fn log_tail(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return format!("(no log at {})", log.display());
    };
    tail_of(&text)
}

fn tail_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("Error") || l.contains("FAILED"))
        .collect();
    let pick = if errors.is_empty() { &lines } else { &errors };
    joined(pick)
}

/// The last lines of a log, errors or not.
fn last_lines(text: &str) -> String {
    joined(&text.lines().collect::<Vec<_>>())
}

fn joined(lines: &[&str]) -> String {
    lines[lines.len().saturating_sub(LOG_LINES)..]
        .iter()
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn read_stats<T>(path: &Path, parse: fn(&[u8]) -> Result<T, StatsError>) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    match parse(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable criu stats");
            None
        }
    }
}

/// Bytes of the image files in `dir` (CRIU's logs and berth's metadata excluded).
fn images_size(dir: &Path) -> Result<u64, CheckpointError> {
    let io = |source| CheckpointError::Io {
        op: "read images dir",
        path: dir.to_owned(),
        source,
    };
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|n| n.ends_with(".log") || n == METADATA_FILE)
        {
            continue;
        }
        let meta = entry.metadata().map_err(io)?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

fn check_absolute(what: &str, path: &Path) -> Result<(), CheckpointError> {
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(CheckpointError::InvalidRequest(format!(
            "{what} {} must be absolute without '..'",
            path.display()
        )));
    }
    Ok(())
}

/// Absolute, an existing directory, and no symlink anywhere on the way (CRIU's requirement).
fn check_real_dir(what: &str, path: &Path) -> Result<(), CheckpointError> {
    check_absolute(what, path)?;
    let real = path.canonicalize().map_err(|source| CheckpointError::Io {
        op: "resolve",
        path: path.to_owned(),
        source,
    })?;
    if real != path || !real.is_dir() {
        return Err(CheckpointError::InvalidRequest(format!(
            "{what} {} must be a directory reached without symlinks (it resolves to {})",
            path.display(),
            real.display()
        )));
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<String, CheckpointError> {
    path.to_str().map(str::to_owned).ok_or_else(|| {
        CheckpointError::InvalidRequest(format!("path {} is not UTF-8", path.display()))
    })
}

/// Creates cgroup `root` (e.g. `/berth-n2/ins-x`) in every hierarchy that lacks it, with v1
/// cpuset's cpus and mems copied down (an empty cpuset refuses tasks). Returns the directories
/// created, deepest last.
fn prepare_cgroup(root: &str) -> Result<Vec<PathBuf>, CheckpointError> {
    let rel = Path::new(root);
    let valid = root.starts_with('/')
        && rel.components().skip(1).count() > 0
        && rel.components().skip(1).all(|c| match c {
            Component::Normal(s) => s.to_str().is_some_and(|s| {
                s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'))
            }),
            _ => false,
        });
    if !valid {
        return Err(CheckpointError::InvalidRequest(format!(
            "cgroup root {root:?} must be an absolute path of [A-Za-z0-9_+.-] components"
        )));
    }
    let mounts = crate::runtime::cgroup::mount_points().map_err(|source| CheckpointError::Io {
        op: "read",
        path: PathBuf::from("/proc/self/mountinfo"),
        source,
    })?;
    let mut created = Vec::new();
    for mount in mounts {
        let mut dir = mount.clone();
        for comp in rel.components().skip(1) {
            let parent = dir.clone();
            dir.push(comp);
            if dir.is_dir() {
                continue;
            }
            if let Err(source) = std::fs::create_dir(&dir) {
                remove_cgroups(&created);
                return Err(CheckpointError::Io {
                    op: "create cgroup",
                    path: dir,
                    source,
                });
            }
            created.push(dir.clone());
            // v1 cpuset only (cgroup2 has no clone_children and inherits an empty cpuset).
            if dir.join("cpuset.cpus").exists() && dir.join("cgroup.clone_children").exists() {
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let copied = std::fs::read_to_string(parent.join(file))
                        .and_then(|v| std::fs::write(dir.join(file), v.trim()));
                    if let Err(source) = copied {
                        remove_cgroups(&created);
                        return Err(CheckpointError::Io {
                            op: "copy cpuset to",
                            path: dir.join(file),
                            source,
                        });
                    }
                }
            }
        }
    }
    Ok(created)
}

fn remove_cgroups(created: &[PathBuf]) {
    for dir in created.iter().rev() {
        if let Err(e) = std::fs::remove_dir(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove cgroup made for a restore");
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
