//! Container runtime: OCI runtime specs and container lifecycles through youki's `libcontainer`.
//!
//! `spec` turns a [`ContainerConfig`] into an OCI runtime spec (pure, unit-tested), `youki` drives
//! libcontainer (create, start, state, kill, delete), `cgroup` finds and removes the cgroup
//! directories berth made on hybrid (v1 + v2) and pure v2 hosts, and `reaper` tracks the init
//! processes this agent is the parent of, so their exit status is collected without ever calling
//! `waitpid(-1)` (tokio's process driver owns the agent's other children). `signal` parses stop
//! signals as users and images name them and tells whether an init handles one.
//!
//! Every call here blocks: run them in `spawn_blocking`.

pub mod cgroup;
pub mod exec;
mod locks;
mod reaper;
mod restored;
pub mod signal;
mod spec;
mod youki;

use std::path::PathBuf;

pub use exec::{run_exec_helper, Exec, EXEC_HELPER_ARG};
pub use signal::parse_signal;
pub use spec::{build_spec, CPU_PERIOD_US, NOFILE_LIMIT};
pub use youki::{run_create_helper, Runtime, HELPER_ARG};

/// What the runtime needs to create one container (one instance of a berth container).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContainerConfig {
    /// Instance id, e.g. `ins-0123456789ab`; also the youki container id and cgroup leaf name.
    pub id: String,
    /// Absolute path of the already-mounted rootfs (the instance's overlay).
    pub rootfs: PathBuf,
    /// Resolved process arguments; must not be empty.
    pub args: Vec<String>,
    /// Environment as `K=V`. A default `PATH` is added when none is given.
    pub env: Vec<String>,
    /// Working directory inside the container (absolute); `/` if the image sets none.
    pub cwd: String,
    /// User id the process runs as (resolved by the caller).
    pub uid: u32,
    /// Group id the process runs as (resolved by the caller).
    pub gid: u32,
    /// Hostname inside the container's UTS namespace; empty leaves the runtime's default.
    pub hostname: String,
    /// CPU limit in millicores (1000 = one core); 0 means no quota.
    pub cpu_millis: u64,
    /// Memory limit in bytes; 0 means no limit.
    pub memory_bytes: u64,
    /// A host file bind-mounted read-only at `/etc/resolv.conf` (the node's DNS for berth names).
    #[serde(default)]
    pub resolv_conf: Option<PathBuf>,
}

/// A container's state as youki records it, refreshed against the live process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    /// Lifecycle status.
    pub status: Status,
    /// Host pid of the container's init process, when one was recorded.
    pub pid: Option<i32>,
}

/// Lifecycle status of a container (the OCI runtime states, plus youki's `Paused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Being created: the init process is not ready yet.
    Creating,
    /// Created and waiting for `start`: namespaces exist, the user process has not been executed.
    Created,
    /// The user process runs.
    Running,
    /// The init process exited (or was never found).
    Stopped,
    /// Frozen.
    Paused,
}

/// Errors of the runtime module.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The container config cannot become a valid spec.
    #[error("invalid container config for {id}: {reason}")]
    InvalidConfig {
        /// Container id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The cgroup parent name is unusable.
    #[error("invalid cgroup parent {parent:?}: {reason}")]
    InvalidCgroupParent {
        /// The rejected name.
        parent: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `create` for an id that already has state.
    #[error("container {id} already exists")]
    AlreadyExists {
        /// Container id.
        id: String,
    },
    /// An operation on an id this runtime has no state for.
    #[error("container {id} not found")]
    NotFound {
        /// Container id.
        id: String,
    },
    /// oci-spec refused to build or save the spec.
    #[error("oci spec for {id}: {source}")]
    Spec {
        /// Container id.
        id: String,
        /// The builder's or serializer's error.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`create dir`, `open log`…).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// libcontainer failed.
    #[error("youki {op} of container {id}: {source}")]
    Youki {
        /// Which operation (`create`, `start`, `kill`, `delete`, `load`).
        op: &'static str,
        /// Container id.
        id: String,
        /// libcontainer's error (with its own source chain).
        #[source]
        source: Box<libcontainer::error::LibcontainerError>,
    },
    /// The create helper process failed or could not be run.
    #[error("create helper for container {id}: {message}")]
    Helper {
        /// Container id.
        id: String,
        /// What the helper said (its stderr) or why it could not run.
        message: String,
    },
    /// The container's log shim could not be started.
    #[error("log shim for container {id}: {source}")]
    LogShim {
        /// Container id.
        id: String,
        /// Why.
        #[source]
        source: crate::logs::LogError,
    },
    /// The container's processes did not exit in time after SIGKILL.
    #[error("container {id} still has processes {waited:?} after SIGKILL")]
    KillTimeout {
        /// Container id.
        id: String,
        /// How long we waited.
        waited: std::time::Duration,
    },
    /// Cleanup after a failure failed too: both are kept.
    #[error("{first}; cleanup also failed: {cleanup}")]
    Cleanup {
        /// The error that triggered the cleanup.
        first: Box<RuntimeError>,
        /// The cleanup error.
        cleanup: Box<RuntimeError>,
    },
}
