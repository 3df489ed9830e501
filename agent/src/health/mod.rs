//! Health probes the agent runs against its own instances (Kubernetes liveness-like).
//!
//! `spec` is what users declare (`http`/`tcp`/`exec`, interval, timeout, failure threshold, start
//! period) with its parsing and validation; `check` performs one probe (HTTP and TCP from the node
//! to the instance's IP over the bridge, exec inside the container through the runtime's exec
//! helper); `prober` runs one task per instance on tokio's clock and reports each transition
//! between healthy and unhealthy once.

mod check;
mod prober;
mod spec;

use std::time::SystemTime;

pub use check::{BoxCheckFuture, Check, ExecCheck, HttpCheck, TcpCheck};
pub use prober::{ProbeResult, ProbeSnapshot, ProbeTarget, Prober};
pub use spec::{
    format_duration, parse_duration, ProbeCheck, ProbeSpec, DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_INTERVAL, DEFAULT_START_PERIOD, DEFAULT_TIMEOUT,
};

/// A change of an instance's health: sent once per transition (unknown or unhealthy → healthy,
/// unknown or healthy → unhealthy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    /// The instance probed.
    pub instance_id: String,
    /// The new state.
    pub healthy: bool,
    /// Why: the last probe's result (`"http GET :8080/healthz: status 500"`, `"3 consecutive
    /// failures, last: connect: connection refused"`).
    pub reason: String,
    /// When the probe that caused it finished (wall clock).
    pub at: SystemTime,
}

/// A probe spec that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthSpecError {
    /// A field's value is out of range or malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, e.g. `health.http.port`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A duration that does not parse.
    #[error("{field}: {text:?} is not a duration: {reason}")]
    Duration {
        /// The field, e.g. `health.interval`.
        field: &'static str,
        /// What the user wrote.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a probe cannot be started for an instance.
#[derive(Debug, thiserror::Error)]
pub enum ProberError {
    /// The spec is invalid.
    #[error("health probe of instance {instance_id}: {source}")]
    Spec {
        /// The instance.
        instance_id: String,
        /// What is wrong with the spec.
        #[source]
        source: HealthSpecError,
    },
    /// The probe needs something the target lacks (an IP for http/tcp, an exec handle for exec).
    #[error("health probe of instance {instance_id}: {what}")]
    Target {
        /// The instance.
        instance_id: String,
        /// What is missing.
        what: &'static str,
    },
}
