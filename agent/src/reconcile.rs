//! Desired vs actual: drives the node's instances toward the hub's last desired state.
//!
//! The reconciler owns the table of local instances and is the only writer of it; the slow work
//! (pull, create, stop) runs in tasks that report back through one event channel, so the table never
//! needs a lock and a slow pull never blocks a removal. The kernel-facing work sits behind [`Host`] so
//! this logic is tested without root (see the tests at the bottom).
//!
//! Life of one instance (phases of its table entry):
//!
//! ```text
//!            start ok                       exit / probe restart        retry time
//! Backoff ──────────▶ Starting ──────────▶ Running ──────────────────▶ Backoff ───▶ Starting …
//!    ▲                   │ start failed       │ stopped=true or a new restart_generation
//!    └───────────────────┘                    ▼
//!                                          Halting ──▶ Halted (stopped on request, kept placed)
//!                                                  └─▶ Backoff (restart: at once; probe: backoff)
//! any phase but Starting/Halting, assignment gone ──▶ Stopping ──▶ removed from the table
//!
//! Live migration (each hub order carried out once):
//!   source: Running ──order──▶ MigratingOut ──sent──▶ MigratedAway (frozen; stopped once the hub
//!           drops the assignment, resumed if the hub keeps it without the order)
//!                                    └──failed──▶ Running (resumed where it was)
//!   target: (new) ──order──▶ Starting (receiving) ──▶ Running, or Exited when it failed (never
//!           started from its image instead: that would be a second copy)
//! ```
//!
//! Reports: PULLING/CREATING while starting; STARTING while its health probe has not passed yet (or
//! right before a start on request), then RUNNING; UNHEALTHY once the probe failed its threshold;
//! STOPPING while a stop on request or a restart on request stops the process; STOPPED once halted.
//! Every report is mirrored into the [`InstanceBoard`] for the metrics and the agent API.
//!
//! Invariants:
//! - Before the first desired state arrives (hub unreachable at start), nothing is stopped: a node that
//!   lost its hub keeps serving.
//! - At most one task works on an instance at a time.
//! - An instance is reported `Removed` only after `Host::stop` succeeded, so the hub never reuses an
//!   address that is still plugged in somewhere. A halted instance keeps its address: it is still
//!   placed, only its process is stopped.
//! - An instance's probing stops before any stop of its process begins, so a probe never reports
//!   on a process that is going away on purpose.
//! - Probe events carry the start of the run they are about; events of an earlier run are dropped.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1::{
    Assignment, DesiredState, HealthCheck, InstanceReport, InstanceStatus, MigrationProgress,
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
// tokio's clock, so backoffs follow a paused test clock too.
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

use crate::health::{
    parse_duration, Check, HealthEvent, HealthSpecError, ProbeCheck, ProbeSpec, Prober,
    DEFAULT_FAILURE_THRESHOLD, DEFAULT_INTERVAL, DEFAULT_START_PERIOD, DEFAULT_TIMEOUT,
};
use crate::hub::Report;
use crate::migrate::session::ProgressSink;
use crate::status::{BoardEntry, InstanceBoard};

/// The network an instance is plugged into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Hub id of the network.
    pub network_id: String,
    /// User-facing name.
    pub name: String,
    /// The whole network's CIDR.
    pub cidr: Ipv4Net,
    /// Gateway address every node's bridge carries.
    pub gateway: Ipv4Addr,
    /// VXLAN id of the network's overlay (also its id in the eBPF maps).
    #[serde(default)]
    pub vni: u32,
    /// The overlay runs inside WireGuard.
    #[serde(default)]
    pub encrypted: bool,
}

/// One instance as the agent runs it: the validated form of a hub `Assignment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Instance id (unique cluster-wide).
    pub instance_id: String,
    /// The container (replica set) it belongs to.
    pub container_id: String,
    /// The container's user-facing name, if any.
    pub container_name: String,
    /// Image reference.
    pub image: String,
    /// CPU limit in millicores.
    pub cpu_millis: u64,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// Replaces the image's entrypoint and cmd when non-empty.
    pub command: Vec<String>,
    /// Environment overrides.
    pub env: BTreeMap<String, String>,
    /// Where it is plugged in.
    pub network: NetworkSpec,
    /// Its address in `network.cidr`.
    pub ip: Ipv4Addr,
    /// What to do when its process exits.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Its health probe; `None` for none. Validated.
    #[serde(default)]
    pub health: Option<ProbeSpec>,
    /// The signal a stop sends first, as the user wrote it (`"SIGTERM"`, `"TERM"`, `"15"`);
    /// `""` for the image's `StopSignal`, else SIGTERM. Validated.
    #[serde(default)]
    pub stop_signal: String,
    /// Time between the stop signal and SIGKILL.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: Duration,
    /// Placed but kept not running (`POST .../stop`).
    #[serde(default)]
    pub stopped: bool,
    /// Bumped by each `POST .../restart`; the generation a running process was started with is
    /// the one in the spec it runs, persisted in `instance.json`.
    #[serde(default)]
    pub restart_generation: u32,
    /// The container revision this instance runs.
    #[serde(default)]
    pub revision: u32,
    /// The hub's live-migration order for this instance, if one is under way. Not persisted: a
    /// restarted agent learns it again from the hub (and a migration it was in has failed).
    #[serde(skip)]
    pub migration: Option<MigrationOrder>,
}

/// This node's part in a live migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationRole {
    /// Sends the running instance away.
    Source,
    /// Receives it and runs it on.
    Target,
}

/// A validated `MigrationOrder` of the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationOrder {
    /// The hub's migration job.
    pub migration_id: String,
    /// What this node does.
    pub role: MigrationRole,
    /// The other node: the only certificate the migration's connection is accepted from/to.
    pub peer_node_id: String,
    /// The other node's migration endpoint (dialled by the source; unused by the target).
    pub peer_addr: Option<std::net::SocketAddr>,
    /// How memory moves.
    pub mode: MigrationMode,
}

/// How a migration moves memory (both orders carry it: a post-copy target restores lazily).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationMode {
    /// The source measures the container's write rate and picks post-copy or pre-copy; the
    /// target runs whichever the source names on the connection.
    Auto,
    /// Pre-copy rounds while the delta shrinks.
    Precopy,
    /// No pre-copy: one dump of the frozen container, sent whole.
    Stopcopy,
    /// CRIU lazy pages: the container runs on the target once its non-memory state moved; its
    /// pages follow over the same connection (the target must know: it restores lazily).
    Postcopy,
}

/// How a successful [`Host::migrate_out`] ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentAway {
    /// Post-copy: the peer ran the instance but its memory did not all arrive (both copies are
    /// killed, and the peer's restart policy brings it back); the job fails with this reason.
    pub pages_failed: Option<String>,
}

/// Stop timeout when the hub gives none (and in records written before it existed).
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn default_stop_timeout() -> Duration {
    DEFAULT_STOP_TIMEOUT
}

/// What the agent does when an instance's process exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "policy")]
pub enum RestartPolicy {
    /// Restart it, whatever its exit status.
    #[default]
    Always,
    /// Restart it when it failed (status != 0), at most `max_restarts` times (0: no limit).
    OnFailure {
        /// Restarts allowed; 0 for no limit.
        max_restarts: u32,
    },
    /// Leave it exited.
    Never,
}

impl RestartPolicy {
    /// Parses the hub's form (`""` is "always").
    pub fn parse(policy: &str, max_restarts: u32) -> Option<Self> {
        match policy {
            "" | "always" => Some(RestartPolicy::Always),
            "on-failure" => Some(RestartPolicy::OnFailure { max_restarts }),
            "never" => Some(RestartPolicy::Never),
            _ => None,
        }
    }

    /// Whether an instance that exited with `code` after `restarts` restarts is started again.
    pub fn restarts_after(self, code: i32, restarts: u32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure { max_restarts } => {
                code != 0 && (max_restarts == 0 || restarts < max_restarts)
            }
        }
    }
}

/// Why an assignment from the hub cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssignmentError {
    /// A required field is empty.
    #[error("assignment {instance_id}: {field} is missing")]
    Missing {
        /// The instance concerned.
        instance_id: String,
        /// The empty field.
        field: &'static str,
    },
    /// A field does not parse.
    #[error("assignment {instance_id}: {field} {value:?} is invalid")]
    Invalid {
        /// The instance concerned.
        instance_id: String,
        /// The bad field.
        field: &'static str,
        /// What it held.
        value: String,
    },
    /// The health probe is unusable.
    #[error("assignment {instance_id}: {source}")]
    Health {
        /// The instance concerned.
        instance_id: String,
        /// What is wrong with the probe (names the field, e.g. `health.http.port`).
        #[source]
        source: HealthSpecError,
    },
}

/// The agent's probe from the hub's form: `""` durations and a 0 threshold take the defaults.
pub fn probe_from_proto(h: HealthCheck) -> Result<ProbeSpec, HealthSpecError> {
    let check = match (h.http, h.tcp, h.exec) {
        (Some(http), None, None) => ProbeCheck::Http {
            path: http.path,
            port: http.port,
        },
        (None, Some(tcp), None) => ProbeCheck::Tcp { port: tcp.port },
        (None, None, Some(exec)) => ProbeCheck::Exec {
            command: exec.command,
        },
        _ => {
            return Err(HealthSpecError::Invalid {
                field: "health",
                reason: "needs exactly one of http, tcp, exec".to_owned(),
            })
        }
    };
    let duration = |field, text: &str, default| {
        if text.is_empty() {
            Ok(default)
        } else {
            parse_duration(field, text)
        }
    };
    let spec = ProbeSpec {
        check,
        interval: duration("health.interval", &h.interval, DEFAULT_INTERVAL)?,
        timeout: duration("health.timeout", &h.timeout, DEFAULT_TIMEOUT)?,
        failure_threshold: match h.failure_threshold {
            0 => DEFAULT_FAILURE_THRESHOLD,
            n => n,
        },
        start_period: duration("health.start_period", &h.start_period, DEFAULT_START_PERIOD)?,
    };
    spec.validate()?;
    Ok(spec)
}

impl TryFrom<Assignment> for InstanceSpec {
    type Error = AssignmentError;

    fn try_from(a: Assignment) -> Result<Self, Self::Error> {
        let id = a.instance_id.clone();
        let invalid = |field: &'static str, value: &str| AssignmentError::Invalid {
            instance_id: id.clone(),
            field,
            value: value.to_string(),
        };
        if a.instance_id.is_empty() {
            return Err(AssignmentError::Missing {
                instance_id: String::new(),
                field: "instance_id",
            });
        }
        let migration = match &a.migration {
            None => None,
            Some(m) => Some(migration_order(m).map_err(|(field, value)| invalid(field, &value))?),
        };
        if a.image.is_empty() {
            return Err(AssignmentError::Missing {
                instance_id: id,
                field: "image",
            });
        }
        let Some(net) = a.network else {
            return Err(AssignmentError::Missing {
                instance_id: id,
                field: "network",
            });
        };
        let cidr: Ipv4Net = net.cidr.parse().map_err(|_| invalid("cidr", &net.cidr))?;
        let gateway: Ipv4Addr = net
            .gateway
            .parse()
            .map_err(|_| invalid("gateway", &net.gateway))?;
        let ip: Ipv4Addr = a.ip.parse().map_err(|_| invalid("ip", &a.ip))?;
        let restart_policy = RestartPolicy::parse(&a.restart_policy, a.max_restarts)
            .ok_or_else(|| invalid("restart_policy", &a.restart_policy))?;
        if !cidr.contains(&ip) || ip == gateway {
            return Err(invalid("ip", &a.ip));
        }
        if !cidr.contains(&gateway) {
            return Err(invalid("gateway", &net.gateway));
        }
        let health = match a.health {
            Some(h) => Some(
                probe_from_proto(h).map_err(|source| AssignmentError::Health {
                    instance_id: id.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        if !a.stop_signal.is_empty() && crate::runtime::parse_signal(&a.stop_signal).is_none() {
            return Err(invalid("stop_signal", &a.stop_signal));
        }
        let stop_timeout = match a.stop_timeout_ms {
            0 => DEFAULT_STOP_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        Ok(Self {
            instance_id: a.instance_id,
            container_id: a.container_id,
            container_name: a.container_name,
            image: a.image,
            cpu_millis: a.cpu_millis,
            memory_bytes: a.memory_bytes,
            command: a.command,
            env: a.env.into_iter().collect(),
            network: NetworkSpec {
                network_id: net.network_id,
                name: net.name,
                cidr,
                gateway,
                vni: net.vni,
                encrypted: net.encrypted,
            },
            ip,
            restart_policy,
            health,
            stop_signal: a.stop_signal,
            stop_timeout,
            stopped: a.stopped,
            restart_generation: a.restart_generation,
            revision: a.revision,
            migration,
        })
    }
}

/// The agent's form of a hub order, or the offending field and value.
fn migration_order(
    m: &berth_proto::v1::MigrationOrder,
) -> Result<MigrationOrder, (&'static str, String)> {
    use berth_proto::v1::MigrationRole as Wire;
    if m.migration_id.is_empty() {
        return Err(("migration.migration_id", String::new()));
    }
    let role = match Wire::try_from(m.role) {
        Ok(Wire::Source) => MigrationRole::Source,
        Ok(Wire::Target) => MigrationRole::Target,
        _ => return Err(("migration.role", m.role.to_string())),
    };
    if m.peer_node_id.is_empty() {
        return Err(("migration.peer_node_id", String::new()));
    }
    let peer_addr = match (role, m.peer_addr.as_str()) {
        (MigrationRole::Target, "") => None,
        (_, addr) => Some(
            addr.parse()
                .map_err(|_| ("migration.peer_addr", addr.to_owned()))?,
        ),
    };
    use berth_proto::v1::MigrationMode as WireMode;
    let mode = match WireMode::try_from(m.mode) {
        Ok(WireMode::Unspecified | WireMode::Auto) => MigrationMode::Auto,
        Ok(WireMode::Precopy) => MigrationMode::Precopy,
        Ok(WireMode::Stopcopy) => MigrationMode::Stopcopy,
        Ok(WireMode::Postcopy) => MigrationMode::Postcopy,
        Err(_) => return Err(("migration.mode", m.mode.to_string())),
    };
    Ok(MigrationOrder {
        migration_id: m.migration_id.clone(),
        role,
        peer_node_id: m.peer_node_id.clone(),
        peer_addr,
        mode,
    })
}

/// A started instance, as the host reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Started {
    /// Milliseconds per deploy phase ("pull", "rootfs", "create", "network", "start").
    pub phases_ms: HashMap<String, f64>,
    /// `sha256:…` of the image manifest it runs.
    pub image_digest: String,
}

/// What the host knows of an instance it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Its process runs.
    Running,
    /// Its process ended with this status (or -1 when unknown).
    Exited(i32),
    /// The host has no container for it.
    Unknown,
}

/// Something found on the node at start-up, left by an earlier agent process.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The spec it was started with.
    pub spec: InstanceSpec,
    /// Whether it still runs.
    pub liveness: Liveness,
    /// Times it was restarted so far (kept across agent restarts).
    pub restarts: u32,
    /// `sha256:…` of the image manifest it was started from ("" when unknown).
    pub image_digest: String,
}

/// The node-side operations the reconciler needs. The real one composes `image`, `runtime` and
/// `network`; tests use a fake.
pub trait Host: Send + Sync + 'static {
    /// Brings an instance to running from whatever state it is in (cleaning leftovers first), calling
    /// `progress` as it enters each phase. On error nothing of the attempt is left behind.
    fn start(
        &self,
        spec: &InstanceSpec,
        progress: Box<dyn Fn(InstanceStatus) + Send + Sync>,
    ) -> impl Future<Output = Result<Started, String>> + Send;
    /// Stops an instance's process gracefully (its stop signal, up to its stop timeout, then
    /// SIGKILL) and releases what a start makes again (container, network plumbing, rootfs), but
    /// keeps its records (spec, restart count, image digest, logs): it stays placed and can be
    /// started again or adopted. Idempotent.
    fn halt(&self, spec: &InstanceSpec) -> impl Future<Output = Result<(), String>> + Send;
    /// Removes everything of an instance (process, stopped gracefully like [`Host::halt`], network
    /// plumbing, rootfs, records). Idempotent.
    fn stop(&self, spec: &InstanceSpec) -> impl Future<Output = Result<(), String>> + Send;
    /// Whether the instance's process still runs.
    fn liveness(&self, instance_id: &str) -> Liveness;
    /// Records how often the instance was restarted, so a restarted agent keeps counting.
    fn save_restarts(&self, _instance_id: &str, _restarts: u32) {}
    /// Instances whose processes exited since the last call, with their exit status.
    fn reap(&self) -> Vec<(String, i32)>;
    /// What an earlier agent process left on this node.
    fn recover(&self) -> Vec<Recovered>;
    /// The check that carries out `probe` against the instance (HTTP/TCP to its IP, exec inside
    /// its container).
    fn probe_check(&self, spec: &InstanceSpec, probe: &ProbeSpec)
        -> Result<Arc<dyn Check>, String>;
    /// Live-migrates the running instance to `order`'s peer (source side). It keeps running here
    /// through the pre-copy rounds. `Ok`: the peer runs it now and the copy here is frozen (or,
    /// post-copy, served its memory and is dead), to be removed once the hub drops the
    /// assignment. `Err`: the copy here was resumed and runs on as before (the error says why
    /// the migration failed). `progress` must not block.
    fn migrate_out(
        &self,
        _spec: &InstanceSpec,
        _order: &MigrationOrder,
        _progress: ProgressSink,
    ) -> impl Future<Output = Result<SentAway, String>> + Send {
        async { Err("this node cannot send live migrations".to_owned()) }
    }
    /// Runs on the copy a successful [`Host::migrate_out`] left frozen here: the hub failed the
    /// migration after all (the target never reported the instance running) and keeps it here.
    fn resume_migrated(
        &self,
        _spec: &InstanceSpec,
    ) -> impl Future<Output = Result<(), String>> + Send {
        async { Err("this node cannot send live migrations".to_owned()) }
    }
    /// Receives the instance from `order`'s peer and runs it on (target side), with the spec's
    /// address. On error nothing of the attempt is left behind.
    fn migrate_in(
        &self,
        _spec: &InstanceSpec,
        _order: &MigrationOrder,
        _progress: ProgressSink,
    ) -> impl Future<Output = Result<Started, String>> + Send {
        async { Err("this node cannot receive live migrations".to_owned()) }
    }
}

#[derive(Debug, Clone)]
enum Phase {
    /// A start task is working on it.
    Starting,
    Running {
        since: Instant,
    },
    /// Waiting to be (re)started at `retry_at`.
    Backoff {
        retry_at: Instant,
    },
    /// A stop task is removing it.
    Stopping,
    /// A halt task is stopping its process; then it goes on as `then` says.
    Halting {
        then: AfterHalt,
    },
    /// A halt failed: tried again (or started, if no longer stopped) at `retry_at`.
    HaltFailed {
        retry_at: Instant,
    },
    /// Stopped on request: placed, not running, until the assignment says otherwise.
    Halted,
    /// Its process exited and its restart policy keeps it that way (until it is removed).
    Exited,
    /// A migrate-out task is sending it to another node; it runs here until the final freeze.
    MigratingOut {
        since: Instant,
    },
    /// Sent away: the target runs it, and the frozen copy here waits for the hub to drop the
    /// assignment.
    MigratedAway,
}

/// Where an instance goes once its halt is done.
#[derive(Debug, Clone, PartialEq)]
enum AfterHalt {
    /// Stopped on request: stays halted.
    Stay,
    /// Restart on request: started again at once.
    Restart,
    /// Its probe failed: started again after `delay`, reported FAILED with `reason` meanwhile.
    Recover { delay: Duration, reason: String },
}

/// What the instance's health probe said about its current run.
#[derive(Debug, Clone, PartialEq)]
enum Health {
    /// No probe (or it could not be started): running is ready.
    Unprobed,
    /// Probed, no pass yet: reported STARTING.
    Waiting,
    /// The last transition was a pass.
    Healthy,
    /// The last transition was `failure_threshold` failures; the probe's words.
    Unhealthy(String),
}

#[derive(Debug, Clone)]
struct Local {
    spec: InstanceSpec,
    phase: Phase,
    /// Consecutive failed starts, crashes or probe restarts, for backoff.
    failures: u32,
    /// Times its process was restarted after exiting or failing its probe.
    restarts: u32,
    last_report: Option<(InstanceStatus, String)>,
    /// The image manifest its current (or last) run came from.
    image_digest: String,
    /// Its probe's verdict on the current run.
    health: Health,
    /// The last start's phase timings, held back for the RUNNING report (after the probe passed).
    phases_ms: HashMap<String, f64>,
    /// The last migration this node took part in for it: each order is carried out once, and a
    /// failed target never falls back to starting the instance from scratch.
    migration_tried: Option<String>,
}

impl Local {
    fn new(spec: InstanceSpec, phase: Phase, restarts: u32, image_digest: String) -> Self {
        Self {
            spec,
            phase,
            failures: 0,
            restarts,
            last_report: None,
            image_digest,
            health: Health::Unprobed,
            phases_ms: HashMap::new(),
            migration_tried: None,
        }
    }

    /// The spec's migration order, unless it was carried out already.
    fn new_order<'a>(&self, spec: &'a InstanceSpec) -> Option<&'a MigrationOrder> {
        spec.migration
            .as_ref()
            .filter(|o| self.migration_tried.as_deref() != Some(o.migration_id.as_str()))
    }

    /// What a running instance is reported as, per its probe.
    fn running_status(&self) -> (InstanceStatus, String) {
        match &self.health {
            Health::Unprobed | Health::Healthy => (InstanceStatus::Running, String::new()),
            Health::Waiting => (
                InstanceStatus::Starting,
                "waiting for the health probe to pass".to_owned(),
            ),
            Health::Unhealthy(reason) => (InstanceStatus::Unhealthy, reason.clone()),
        }
    }

    /// The status to show for this entry before anything was reported (adoption).
    fn board_status(&self) -> InstanceStatus {
        if let Some((status, _)) = &self.last_report {
            return *status;
        }
        match self.phase {
            Phase::Running { .. } | Phase::MigratingOut { .. } | Phase::MigratedAway => {
                self.running_status().0
            }
            Phase::Halted => InstanceStatus::Stopped,
            Phase::Halting { .. } | Phase::Stopping => InstanceStatus::Stopping,
            Phase::Exited => InstanceStatus::Stopped,
            Phase::Starting | Phase::Backoff { .. } | Phase::HaltFailed { .. } => {
                InstanceStatus::Pending
            }
        }
    }
}

#[derive(Debug)]
enum Event {
    Progress(String, InstanceStatus),
    Started(String, Result<Started, String>),
    Stopped(String, Result<(), String>),
    Halted(String, Result<(), String>),
    /// A liveness probe's findings: (instance, start of the run that was probed, what was seen).
    Probed(Vec<(String, Instant, Liveness)>),
    /// A health probe's transition, with the start of the run it probed.
    Health(Instant, HealthEvent),
    /// How a migration of an instance goes.
    Migration(String, MigrationProgress),
    /// A migrate-out task ended: (instance, migration, outcome).
    MigratedOut(String, String, Result<SentAway, String>),
    /// A migrate-in task ended: (instance, migration, outcome).
    MigratedIn(String, String, Result<Started, String>),
    /// A frozen, sent-away copy was taken back (the hub failed its migration).
    ResumedMigrated(String, Result<(), String>),
}

/// Backoff before restarting after `failures` consecutive failures: 1 s doubling to 30 s.
pub fn restart_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(5);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(30))
}

/// A container that ran this long before crashing starts its backoff from scratch.
const STABLE_RUN: Duration = Duration::from_secs(10);

/// The reason a halted instance is reported STOPPED with.
pub const STOPPED_ON_REQUEST: &str = "stopped on request";

/// Where reports go: the hub (deduplicated) and the node's board (always).
struct Out {
    reports: mpsc::UnboundedSender<Report>,
    board: InstanceBoard,
}

impl Out {
    /// Sends a status unless it repeats the last one sent for the instance; mirrors it into the
    /// board either way (restarts and digest may have changed under the same status).
    fn report(
        &self,
        local: &mut Local,
        status: InstanceStatus,
        reason: String,
        phases_ms: HashMap<String, f64>,
    ) {
        self.board.set(board_entry(local, status));
        let key = (status, reason.clone());
        if local.last_report.as_ref() == Some(&key) && phases_ms.is_empty() {
            return;
        }
        local.last_report = Some(key);
        // The reporter only goes away when the agent shuts down.
        let _ = self.reports.send(Report::Status(InstanceReport {
            instance_id: local.spec.instance_id.clone(),
            status: status as i32,
            reason,
            phases_ms,
            restarts: local.restarts,
            image_digest: local.image_digest.clone(),
            migration: None,
        }));
    }

    fn send(&self, r: Report) {
        let _ = self.reports.send(r);
    }

    /// Sends where a migration of `local` stands, with its current status (RUNNING when it has
    /// not reported one yet: a source runs while it migrates).
    fn migration(&self, local: &Local, progress: MigrationProgress) {
        let status = local
            .last_report
            .as_ref()
            .map_or(InstanceStatus::Running, |(s, _)| *s);
        self.send(Report::Status(InstanceReport {
            instance_id: local.spec.instance_id.clone(),
            status: status as i32,
            reason: local
                .last_report
                .as_ref()
                .map(|(_, r)| r.clone())
                .unwrap_or_default(),
            phases_ms: HashMap::new(),
            restarts: local.restarts,
            image_digest: local.image_digest.clone(),
            migration: Some(progress),
        }));
    }
}

/// A migration's failure as the hub hears it.
fn migration_failed(migration_id: &str, error: String) -> MigrationProgress {
    MigrationProgress {
        migration_id: migration_id.to_owned(),
        error,
        ..MigrationProgress::default()
    }
}

/// The hub's form of a session's progress report.
fn progress_to_proto(
    migration_id: &str,
    p: &crate::migrate::session::MigrationProgress,
) -> MigrationProgress {
    use crate::migrate::session::Phase as P;
    use berth_proto::v1::MigrationPhase as W;
    let phase = match p.phase {
        P::Prepare => W::Prepare,
        P::Precopy => W::Precopy,
        P::Freeze => W::Freeze,
        P::Transfer => W::Transfer,
        P::Restore => W::Restore,
        P::Switch => W::Switch,
        P::Done => W::Done,
    };
    MigrationProgress {
        migration_id: migration_id.to_owned(),
        phase: phase as i32,
        rounds: p.rounds,
        bytes_sent: p.bytes_sent,
        pages_sent: p.pages_sent,
        downtime_ms: p.downtime_ms.unwrap_or(0),
        error: String::new(),
        chosen_mode: match p.choice.map(|c| c.mode) {
            None => berth_proto::v1::MigrationMode::Unspecified,
            Some(MigrationMode::Auto) => berth_proto::v1::MigrationMode::Auto,
            Some(MigrationMode::Precopy) => berth_proto::v1::MigrationMode::Precopy,
            Some(MigrationMode::Stopcopy) => berth_proto::v1::MigrationMode::Stopcopy,
            Some(MigrationMode::Postcopy) => berth_proto::v1::MigrationMode::Postcopy,
        } as i32,
        write_rate_mib_s: p.choice.and_then(|c| c.write_rate_mib_s),
        memory_complete: p.memory_complete,
    }
}

fn board_entry(local: &Local, status: InstanceStatus) -> BoardEntry {
    BoardEntry {
        instance_id: local.spec.instance_id.clone(),
        container_id: local.spec.container_id.clone(),
        container_name: local.spec.container_name.clone(),
        status,
        restarts: local.restarts,
        cpu_millis: local.spec.cpu_millis,
        memory_bytes: local.spec.memory_bytes,
        image_digest: local.image_digest.clone(),
    }
}

/// Drives local instances toward the desired state.
pub struct Reconciler<H: Host> {
    host: Arc<H>,
    out: Out,
    prober: Arc<Prober>,
    locals: HashMap<String, Local>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    /// The last desired state; None until the hub has spoken once.
    desired: Option<HashMap<String, InstanceSpec>>,
    /// A liveness probe is in flight (at most one at a time).
    probing: bool,
}

impl<H: Host> Reconciler<H> {
    /// A reconciler that adopts whatever the host recovered from an earlier agent process, with
    /// its own board and prober (see [`Reconciler::with_board`], [`Reconciler::with_prober`]).
    pub fn new(host: Arc<H>, reports: mpsc::UnboundedSender<Report>) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut locals = HashMap::new();
        let now = Instant::now();
        for r in host.recover() {
            let phase = match r.liveness {
                Liveness::Running => Phase::Running { since: now },
                // Its policy already said no: a new agent process must not restart it either.
                Liveness::Exited(code)
                    if !r.spec.restart_policy.restarts_after(code, r.restarts) =>
                {
                    Phase::Exited
                }
                // Restarted (or cleaned up, or halted) once the hub says what it wants.
                Liveness::Exited(_) | Liveness::Unknown => Phase::Backoff { retry_at: now },
            };
            info!(instance_id = %r.spec.instance_id, liveness = ?r.liveness, "recovered instance");
            let mut local = Local::new(r.spec, phase, r.restarts, r.image_digest);
            if matches!(local.phase, Phase::Running { .. }) && local.spec.health.is_some() {
                // It served before this agent started: ready until its probe says otherwise, so
                // an agent restart takes nothing out of the service routing.
                local.health = Health::Healthy;
            }
            locals.insert(local.spec.instance_id.clone(), local);
        }
        let this = Self {
            host,
            out: Out {
                reports,
                board: InstanceBoard::new(),
            },
            prober: Arc::new(Prober::new()),
            locals,
            events_tx,
            events_rx,
            desired: None,
            probing: false,
        };
        this.mirror_all();
        this
    }

    /// Mirrors every status, restart count and digest into `board` (shared with the metrics
    /// endpoint and the agent API) instead of a private one.
    pub fn with_board(mut self, board: InstanceBoard) -> Self {
        self.out.board = board;
        self.mirror_all();
        self
    }

    /// Runs health probes on `prober` (shared with the metrics endpoint) instead of a private one.
    pub fn with_prober(mut self, prober: Arc<Prober>) -> Self {
        self.prober = prober;
        self
    }

    /// The prober running this node's health probes (its snapshots feed the metrics).
    pub fn prober(&self) -> Arc<Prober> {
        self.prober.clone()
    }

    /// The board the reconciler mirrors its table into.
    pub fn board(&self) -> InstanceBoard {
        self.out.board.clone()
    }

    fn mirror_all(&self) {
        for local in self.locals.values() {
            self.out.board.set(board_entry(local, local.board_status()));
        }
    }

    /// Runs until `desired` is closed. `children` ticks when a child process changed state (SIGCHLD).
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<DesiredState>>,
        mut children: mpsc::UnboundedReceiver<()>,
    ) {
        // Adopted instances are probed again from now on (their start period is long past).
        for local in self.locals.values_mut() {
            if let Phase::Running { since } = local.phase {
                if !start_probe(
                    &self.host,
                    &self.prober,
                    &self.events_tx,
                    local,
                    since,
                    true,
                ) {
                    local.health = Health::Unprobed;
                }
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let state = desired.borrow_and_update().clone();
                    if let Some(state) = state {
                        self.set_desired(state);
                    }
                }
                Some(ev) = self.events_rx.recv() => self.on_event(ev),
                Some(()) = children.recv() => self.check_exits(),
                _ = tick.tick() => self.check_liveness(),
            }
            self.reconcile();
        }
    }

    fn set_desired(&mut self, state: DesiredState) {
        let mut map = HashMap::new();
        for a in state.assignments {
            let id = a.instance_id.clone();
            let migration_id = a.migration.as_ref().map(|m| m.migration_id.clone());
            match InstanceSpec::try_from(a) {
                Ok(spec) => {
                    map.insert(spec.instance_id.clone(), spec);
                }
                Err(e) => {
                    warn!(instance_id = %id, error = %e, "rejecting assignment");
                    // A migration this node cannot take part in fails now, not at the hub's stall
                    // timeout.
                    let migration = migration_id.map(|migration_id| MigrationProgress {
                        migration_id,
                        error: e.to_string(),
                        ..MigrationProgress::default()
                    });
                    self.out.send(Report::Status(InstanceReport {
                        instance_id: id,
                        status: InstanceStatus::Failed as i32,
                        reason: e.to_string(),
                        phases_ms: HashMap::new(),
                        restarts: 0,
                        image_digest: String::new(),
                        migration,
                    }));
                }
            }
        }
        // Stopped before this node ever saw them (placed and stopped between two states): nothing
        // of them is here, so they are removed as far as this node goes. Said again on every state
        // while the hub still asks, so a lost report cannot strand an address.
        for id in &state.stopping {
            if !self.locals.contains_key(id) {
                self.out.send(Report::Removed(id.clone()));
            }
        }
        // The hub may have restarted or missed reports: tell it again where every wanted instance is.
        for (id, local) in &mut self.locals {
            if map.contains_key(id) {
                local.last_report = None;
            }
        }
        self.desired = Some(map);
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Progress(id, status) => {
                if let Some(l) = self.locals.get_mut(&id) {
                    if matches!(l.phase, Phase::Starting) {
                        self.out.report(l, status, String::new(), HashMap::new());
                    }
                }
            }
            Event::Started(id, result) => self.on_started(&id, result),
            Event::Probed(seen) => self.on_probed(seen),
            Event::Health(since, ev) => self.on_health(since, ev),
            Event::Halted(id, result) => self.on_halted(&id, result),
            Event::Migration(id, progress) => {
                if let Some(l) = self.locals.get(&id) {
                    self.out.migration(l, progress);
                }
            }
            Event::MigratedOut(id, mid, result) => self.on_migrated_out(&id, &mid, result),
            Event::MigratedIn(id, mid, result) => self.on_migrated_in(&id, &mid, result),
            Event::ResumedMigrated(id, result) => self.on_resumed_migrated(&id, result),
            Event::Stopped(id, result) => match result {
                Ok(()) => {
                    info!(instance_id = %id, "instance removed");
                    self.locals.remove(&id);
                    self.prober.stop(&id);
                    self.out.board.remove(&id);
                    self.out.send(Report::Removed(id));
                }
                Err(reason) => {
                    // Stays in the table; the next pass tries again after a pause.
                    warn!(instance_id = %id, %reason, "stop failed");
                    if let Some(l) = self.locals.get_mut(&id) {
                        l.failures += 1;
                        l.phase = Phase::Backoff {
                            retry_at: Instant::now() + restart_delay(l.failures),
                        };
                    }
                }
            },
        }
    }

    fn on_started(&mut self, id: &str, result: Result<Started, String>) {
        let Some(l) = self.locals.get_mut(id) else {
            return;
        };
        match result {
            Ok(started) => {
                info!(instance_id = %id, phases = ?started.phases_ms, "instance running");
                let since = Instant::now();
                l.phase = Phase::Running { since };
                if !started.image_digest.is_empty() {
                    l.image_digest = started.image_digest;
                }
                l.health = Health::Unprobed;
                if start_probe(&self.host, &self.prober, &self.events_tx, l, since, false) {
                    // Not ready before its probe passed: the hub routes to RUNNING only.
                    l.health = Health::Waiting;
                    l.phases_ms = started.phases_ms;
                    let (status, reason) = l.running_status();
                    self.out.report(l, status, reason, HashMap::new());
                } else {
                    self.out
                        .report(l, InstanceStatus::Running, String::new(), started.phases_ms);
                }
            }
            Err(reason) => {
                l.failures += 1;
                let delay = restart_delay(l.failures);
                warn!(instance_id = %id, %reason, retry_in = ?delay, "start failed");
                l.phase = Phase::Backoff {
                    retry_at: Instant::now() + delay,
                };
                let reason = format!("{reason} (retrying in {}s)", delay.as_secs());
                self.out
                    .report(l, InstanceStatus::Failed, reason, HashMap::new());
            }
        }
    }

    fn on_migrated_out(&mut self, id: &str, migration_id: &str, result: Result<SentAway, String>) {
        let Some(l) = self.locals.get_mut(id) else {
            return;
        };
        let Phase::MigratingOut { since } = l.phase else {
            return;
        };
        match result {
            Ok(sent) => {
                // The target runs it; what is left here is frozen. Nothing probes or restarts it:
                // the hub drops the assignment and the stop removes it.
                info!(instance_id = %id, migration_id, "instance migrated away");
                self.prober.stop(id);
                l.phase = Phase::MigratedAway;
                if let Some(reason) = sent.pages_failed {
                    warn!(instance_id = %id, migration_id, %reason, "post-copy memory did not all arrive");
                    self.out
                        .migration(l, migration_failed(migration_id, reason));
                }
            }
            Err(error) => {
                warn!(instance_id = %id, migration_id, %error, "migration failed; the instance runs on here");
                l.phase = Phase::Running { since };
                self.out.migration(l, migration_failed(migration_id, error));
            }
        }
    }

    fn on_resumed_migrated(&mut self, id: &str, result: Result<(), String>) {
        let Some(l) = self.locals.get_mut(id) else {
            return;
        };
        if !matches!(l.phase, Phase::Starting) {
            return;
        }
        let since = Instant::now();
        l.phase = Phase::Running { since };
        match result {
            Ok(()) => {
                info!(instance_id = %id, "frozen copy runs on");
                l.health = Health::Unprobed;
                start_probe(&self.host, &self.prober, &self.events_tx, l, since, true);
                l.last_report = None;
                self.out
                    .report(l, InstanceStatus::Running, String::new(), HashMap::new());
            }
            Err(reason) => {
                // It cannot run on (gone, or CRIU failed): as if its process had died, so the
                // restart policy brings it back from its image rather than leaving none.
                warn!(instance_id = %id, %reason, "resuming the frozen copy failed");
                self.exited(id, -1);
            }
        }
    }

    fn on_migrated_in(&mut self, id: &str, migration_id: &str, result: Result<Started, String>) {
        let Some(l) = self.locals.get_mut(id) else {
            return;
        };
        if !matches!(l.phase, Phase::Starting) {
            return;
        }
        match result {
            Ok(started) => {
                info!(instance_id = %id, migration_id, phases = ?started.phases_ms, "instance migrated in");
                let since = Instant::now();
                l.phase = Phase::Running { since };
                if !started.image_digest.is_empty() {
                    l.image_digest = started.image_digest;
                }
                // It was ready on the source a moment ago: probed as an adopted process (no start
                // period) and RUNNING at once, which is what completes the migration at the hub.
                l.health = Health::Unprobed;
                start_probe(&self.host, &self.prober, &self.events_tx, l, since, true);
                self.out
                    .report(l, InstanceStatus::Running, String::new(), started.phases_ms);
                let done = MigrationProgress {
                    migration_id: migration_id.to_owned(),
                    phase: berth_proto::v1::MigrationPhase::Done as i32,
                    ..MigrationProgress::default()
                };
                self.out.migration(l, done);
            }
            Err(error) => {
                // Never started from scratch instead: the source still runs it. It stays here,
                // failed, until the hub drops the assignment (the stop then cleans up).
                warn!(instance_id = %id, migration_id, %error, "receiving the migration failed");
                l.phase = Phase::Exited;
                self.out
                    .report(l, InstanceStatus::Failed, error.clone(), HashMap::new());
                self.out.migration(l, migration_failed(migration_id, error));
            }
        }
    }

    fn on_halted(&mut self, id: &str, result: Result<(), String>) {
        let Some(l) = self.locals.get_mut(id) else {
            return;
        };
        let Phase::Halting { then } = &l.phase else {
            return;
        };
        let then = then.clone();
        let now = Instant::now();
        match result {
            Ok(()) => match then {
                AfterHalt::Stay => {
                    info!(instance_id = %id, "instance stopped on request");
                    l.phase = Phase::Halted;
                    self.out.report(
                        l,
                        InstanceStatus::Stopped,
                        STOPPED_ON_REQUEST.to_owned(),
                        HashMap::new(),
                    );
                }
                AfterHalt::Restart => {
                    info!(instance_id = %id, "instance stopped for a restart on request");
                    // The pass right after this event starts it (or halts it, if it was stopped
                    // meanwhile).
                    l.phase = Phase::Backoff { retry_at: now };
                    self.out
                        .report(l, InstanceStatus::Starting, String::new(), HashMap::new());
                }
                AfterHalt::Recover { delay, reason } => {
                    l.phase = Phase::Backoff {
                        retry_at: now + delay,
                    };
                    // Still UNHEALTHY (with the restart in the reason), not FAILED: the reporter
                    // keeps only the latest status per instance, and a quick halt must not hide
                    // from the hub why the replica is being restarted.
                    self.out
                        .report(l, InstanceStatus::Unhealthy, reason, HashMap::new());
                }
            },
            Err(reason) => {
                l.failures += 1;
                let delay = restart_delay(l.failures);
                warn!(instance_id = %id, %reason, retry_in = ?delay, "stop failed");
                l.phase = Phase::HaltFailed {
                    retry_at: now + delay,
                };
                let reason = format!("stop failed: {reason} (retrying in {}s)", delay.as_secs());
                self.out
                    .report(l, InstanceStatus::Failed, reason, HashMap::new());
            }
        }
    }

    fn on_health(&mut self, since: Instant, ev: HealthEvent) {
        let id = ev.instance_id.as_str();
        let Some(l) = self.locals.get_mut(id) else {
            return;
        };
        // About an earlier run (restarted or stopped since): stale.
        if !matches!(l.phase, Phase::Running { since: s } if s == since) {
            return;
        }
        if ev.healthy {
            if l.health != Health::Healthy {
                info!(instance_id = %id, reason = %ev.reason, "instance healthy");
            }
            l.health = Health::Healthy;
            let phases = std::mem::take(&mut l.phases_ms);
            self.out
                .report(l, InstanceStatus::Running, String::new(), phases);
            return;
        }
        warn!(instance_id = %id, reason = %ev.reason, "instance unhealthy");
        l.health = Health::Unhealthy(ev.reason.clone());
        // Reported on its own before the stop begins, so the hub sees it (its reporter keeps only
        // the latest status per instance): no STOPPING report on this path.
        self.out.report(
            l,
            InstanceStatus::Unhealthy,
            ev.reason.clone(),
            HashMap::new(),
        );
        // A failing probe counts as a failure (exit status != 0) for the restart policy.
        if !l.spec.restart_policy.restarts_after(1, l.restarts) {
            // Stays probed: a pass makes it RUNNING again.
            return;
        }
        if since.elapsed() >= STABLE_RUN {
            l.failures = 0;
        }
        l.failures += 1;
        l.restarts += 1;
        self.host.save_restarts(id, l.restarts);
        let delay = restart_delay(l.failures);
        self.prober.stop(id);
        let reason = format!(
            "unhealthy: {}; restarting in {}s",
            ev.reason,
            delay.as_secs()
        );
        l.phase = Phase::Halting {
            then: AfterHalt::Recover { delay, reason },
        };
        spawn_work(Work::Halt, &self.host, &self.events_tx, l.spec.clone());
    }

    fn exited(&mut self, id: &str, code: i32) {
        let Some(l) = self.locals.get_mut(id) else {
            return;
        };
        let Phase::Running { since } = l.phase else {
            return;
        };
        self.prober.stop(id);
        if since.elapsed() >= STABLE_RUN {
            l.failures = 0;
        }
        let status = if code == 0 {
            InstanceStatus::Stopped
        } else {
            InstanceStatus::Failed
        };
        if !l.spec.restart_policy.restarts_after(code, l.restarts) {
            warn!(instance_id = %id, code, restarts = l.restarts, policy = ?l.spec.restart_policy,
                "instance exited; not restarted");
            l.phase = Phase::Exited;
            let reason = match l.spec.restart_policy {
                RestartPolicy::OnFailure { max_restarts } if code != 0 => {
                    format!("exited with status {code}; gave up after {max_restarts} restarts")
                }
                _ => format!("exited with status {code}"),
            };
            self.out.report(l, status, reason, HashMap::new());
            return;
        }
        l.failures += 1;
        l.restarts += 1;
        self.host.save_restarts(id, l.restarts);
        let delay = restart_delay(l.failures);
        warn!(instance_id = %id, code, restart_in = ?delay, restarts = l.restarts, "instance exited");
        l.phase = Phase::Backoff {
            retry_at: Instant::now() + delay,
        };
        let reason = format!(
            "exited with status {code}; restarting in {}s",
            delay.as_secs()
        );
        self.out.report(l, status, reason, HashMap::new());
    }

    fn check_exits(&mut self) {
        for (id, code) in self.host.reap() {
            self.exited(&id, code);
        }
    }

    /// Probes every running instance off the loop: reading container state can wait behind the
    /// runtime's lock (held through a create or a kill), and the loop must keep serving the hub.
    fn check_liveness(&mut self) {
        self.check_exits();
        if self.probing {
            return;
        }
        let running: Vec<(String, Instant)> = self
            .locals
            .iter()
            .filter_map(|(id, l)| match l.phase {
                Phase::Running { since } => Some((id.clone(), since)),
                _ => None,
            })
            .collect();
        if running.is_empty() {
            return;
        }
        self.probing = true;
        let host = self.host.clone();
        let events = self.events_tx.clone();
        tokio::task::spawn_blocking(move || {
            let seen = running
                .into_iter()
                .map(|(id, since)| {
                    let l = host.liveness(&id);
                    (id, since, l)
                })
                .collect();
            let _ = events.send(Event::Probed(seen));
        });
    }

    fn on_probed(&mut self, seen: Vec<(String, Instant, Liveness)>) {
        self.probing = false;
        for (id, since, liveness) in seen {
            // A result about an earlier run (restarted or stopped since the probe began) is stale.
            let current = self.locals.get(&id).map(|l| &l.phase);
            if !matches!(current, Some(Phase::Running { since: s }) if *s == since) {
                continue;
            }
            match liveness {
                Liveness::Running => {}
                Liveness::Exited(code) => self.exited(&id, code),
                Liveness::Unknown => self.exited(&id, -1),
            }
        }
    }

    /// One pass: start what is wanted and missing, stop what runs and is not wanted, halt what is
    /// wanted stopped, restart what was asked to.
    fn reconcile(&mut self) {
        let Some(desired) = &self.desired else {
            return;
        };
        let now = Instant::now();
        for (id, spec) in desired {
            if !self.locals.contains_key(id) {
                self.locals.insert(
                    id.clone(),
                    Local::new(
                        spec.clone(),
                        Phase::Backoff { retry_at: now },
                        0,
                        String::new(),
                    ),
                );
            }
        }
        let ids: Vec<String> = self.locals.keys().cloned().collect();
        for id in ids {
            let wanted = desired.get(&id);
            let Some(local) = self.locals.get_mut(&id) else {
                continue;
            };
            let busy = matches!(
                local.phase,
                Phase::Starting
                    | Phase::Stopping
                    | Phase::Halting { .. }
                    | Phase::MigratingOut { .. }
                    | Phase::MigratedAway
            );
            let source_order = wanted
                .and_then(|spec| local.new_order(spec))
                .filter(|o| o.role == MigrationRole::Source)
                .cloned();
            if let (false, Some(spec), Some(order)) = (busy, wanted, source_order) {
                local.migration_tried = Some(order.migration_id.clone());
                match local.phase {
                    Phase::Running { since } if !spec.stopped => {
                        info!(instance_id = %id, migration_id = %order.migration_id, to = %order.peer_node_id, "migrating away");
                        local.phase = Phase::MigratingOut { since };
                        let work = Work::MigrateOut(order);
                        spawn_work(work, &self.host, &self.events_tx, local.spec.clone());
                    }
                    _ => {
                        let error = "the instance is not running on the source".to_owned();
                        self.out
                            .migration(local, migration_failed(&order.migration_id, error));
                    }
                }
                continue;
            }
            let work = match (&local.phase, wanted) {
                // A task is on it; its event moves it on.
                (
                    Phase::Starting
                    | Phase::Stopping
                    | Phase::Halting { .. }
                    | Phase::MigratingOut { .. },
                    _,
                ) => None,
                (_, None) => {
                    self.prober.stop(&id);
                    local.phase = Phase::Stopping;
                    Some(Work::Stop)
                }
                // Sent away, but the hub dropped the order and kept the assignment: it failed the
                // job (the target never reported the instance running), so the frozen copy here
                // must run on, or no copy would.
                (Phase::MigratedAway, Some(spec)) if spec.migration.is_none() => {
                    warn!(instance_id = %id, "the hub failed a migration this node completed; resuming the frozen copy");
                    local.phase = Phase::Starting;
                    Some(Work::ResumeMigrated)
                }
                (Phase::MigratedAway, Some(_)) => None,
                // Receiving a migration: only from the source, never a fresh start (that would be
                // a second copy of a running replica).
                (Phase::Backoff { .. }, Some(spec))
                    if spec
                        .migration
                        .as_ref()
                        .is_some_and(|o| o.role == MigrationRole::Target) =>
                {
                    match local.new_order(spec).cloned() {
                        Some(order) => {
                            info!(instance_id = %id, migration_id = %order.migration_id, "receiving a migration");
                            local.migration_tried = Some(order.migration_id.clone());
                            local.spec = spec.clone();
                            local.phase = Phase::Starting;
                            Some(Work::MigrateIn(order))
                        }
                        None => None,
                    }
                }
                (Phase::Halted, Some(spec)) => {
                    local.spec = spec.clone();
                    if spec.stopped {
                        if local.last_report.is_none() {
                            let reason = STOPPED_ON_REQUEST.to_owned();
                            self.out
                                .report(local, InstanceStatus::Stopped, reason, HashMap::new());
                        }
                        None
                    } else {
                        info!(instance_id = %id, "starting a stopped instance on request");
                        local.failures = 0;
                        self.out.report(
                            local,
                            InstanceStatus::Starting,
                            String::new(),
                            HashMap::new(),
                        );
                        local.phase = Phase::Starting;
                        Some(Work::Start)
                    }
                }
                (Phase::Running { .. }, Some(spec)) if spec.stopped => {
                    info!(instance_id = %id, "stopping on request");
                    self.prober.stop(&id);
                    self.out.report(
                        local,
                        InstanceStatus::Stopping,
                        String::new(),
                        HashMap::new(),
                    );
                    local.phase = Phase::Halting {
                        then: AfterHalt::Stay,
                    };
                    Some(Work::Halt)
                }
                // Nothing runs (waiting to start, given up, or adopted without a process): clean
                // whatever is left and call it stopped, without starting it first.
                (Phase::Backoff { .. } | Phase::Exited, Some(spec)) if spec.stopped => {
                    local.spec = spec.clone();
                    local.phase = Phase::Halting {
                        then: AfterHalt::Stay,
                    };
                    Some(Work::Halt)
                }
                (Phase::HaltFailed { retry_at }, Some(spec)) if *retry_at <= now => {
                    if spec.stopped {
                        local.phase = Phase::Halting {
                            then: AfterHalt::Stay,
                        };
                        Some(Work::Halt)
                    } else {
                        // A start cleans up whatever the failed stop left.
                        local.spec = spec.clone();
                        local.phase = Phase::Starting;
                        Some(Work::Start)
                    }
                }
                (Phase::Running { .. }, Some(spec))
                    if spec.restart_generation != local.spec.restart_generation =>
                {
                    info!(instance_id = %id, generation = spec.restart_generation, "restarting on request");
                    self.prober.stop(&id);
                    self.out.report(
                        local,
                        InstanceStatus::Stopping,
                        "restarting on request".to_owned(),
                        HashMap::new(),
                    );
                    // Halted with the spec it runs (its stop signal and timeout); started with
                    // the new one.
                    local.phase = Phase::Halting {
                        then: AfterHalt::Restart,
                    };
                    Some(Work::Halt)
                }
                (Phase::Exited, Some(spec))
                    if spec.restart_generation != local.spec.restart_generation =>
                {
                    info!(instance_id = %id, "starting an exited instance on request");
                    local.spec = spec.clone();
                    local.failures = 0;
                    self.out.report(
                        local,
                        InstanceStatus::Starting,
                        String::new(),
                        HashMap::new(),
                    );
                    local.phase = Phase::Starting;
                    Some(Work::Start)
                }
                (Phase::Backoff { retry_at }, Some(spec)) if *retry_at <= now => {
                    local.spec = spec.clone();
                    local.phase = Phase::Starting;
                    Some(Work::Start)
                }
                (Phase::Running { .. }, Some(_)) if local.last_report.is_none() => {
                    let (status, reason) = local.running_status();
                    self.out.report(local, status, reason, HashMap::new());
                    None
                }
                // A Backoff or a failed halt waits for its time; Exited stays.
                _ => None,
            };
            if let Some(work) = work {
                spawn_work(work, &self.host, &self.events_tx, local.spec.clone());
            }
        }
    }
}

/// Starts probing `local`'s current run (begun at `since`) when its spec has a probe; `adopted`
/// probes at once (the process has run for a while already). Returns whether probing started.
fn start_probe<H: Host>(
    host: &Arc<H>,
    prober: &Prober,
    events: &mpsc::UnboundedSender<Event>,
    local: &Local,
    since: Instant,
    adopted: bool,
) -> bool {
    let Some(probe) = &local.spec.health else {
        return false;
    };
    let id = &local.spec.instance_id;
    let mut probe = probe.clone();
    if adopted {
        probe.start_period = Duration::ZERO;
    }
    let check = match host.probe_check(&local.spec, &probe) {
        Ok(check) => check,
        Err(reason) => {
            // Never probed rather than never ready: it runs, and the hub routes to it.
            warn!(instance_id = %id, %reason, "cannot probe instance; treating it as ready");
            return false;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    prober.start_check(id, check, &probe, tx);
    // Tags each transition with the run it is about; ends when the prober task goes (stop or
    // replacement drops its sender).
    let events = events.clone();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if events.send(Event::Health(since, ev)).is_err() {
                return;
            }
        }
    });
    true
}

/// The slow work the loop hands to a task; its outcome comes back as an [`Event`].
#[derive(Debug, Clone)]
enum Work {
    Start,
    Halt,
    Stop,
    MigrateOut(MigrationOrder),
    MigrateIn(MigrationOrder),
    ResumeMigrated,
}

/// Progress of a migration task, into the loop's events (never blocks: the channel is unbounded).
fn progress_sink(
    events: &mpsc::UnboundedSender<Event>,
    instance_id: &str,
    migration_id: &str,
) -> ProgressSink {
    let (events, id, mid) = (
        events.clone(),
        instance_id.to_owned(),
        migration_id.to_owned(),
    );
    Arc::new(move |p| {
        let _ = events.send(Event::Migration(id.clone(), progress_to_proto(&mid, p)));
    })
}

fn spawn_work<H: Host>(
    work: Work,
    host: &Arc<H>,
    events: &mpsc::UnboundedSender<Event>,
    spec: InstanceSpec,
) {
    let host = host.clone();
    let events = events.clone();
    let id = spec.instance_id.clone();
    let span = info_span!("instance", instance_id = %id, container_id = %spec.container_id);
    tokio::spawn(
        async move {
            let event = match work {
                Work::Start => {
                    let (progress_events, progress_id) = (events.clone(), id.clone());
                    let progress = Box::new(move |s: InstanceStatus| {
                        let _ = progress_events.send(Event::Progress(progress_id.clone(), s));
                    });
                    Event::Started(id, host.start(&spec, progress).await)
                }
                Work::Halt => Event::Halted(id, host.halt(&spec).await),
                Work::Stop => Event::Stopped(id, host.stop(&spec).await),
                Work::MigrateOut(order) => {
                    let progress = progress_sink(&events, &id, &order.migration_id);
                    let result = host.migrate_out(&spec, &order, progress).await;
                    Event::MigratedOut(id, order.migration_id, result)
                }
                Work::ResumeMigrated => {
                    Event::ResumedMigrated(id, host.resume_migrated(&spec).await)
                }
                Work::MigrateIn(order) => {
                    let progress = progress_sink(&events, &id, &order.migration_id);
                    let result = host.migrate_in(&spec, &order, progress).await;
                    Event::MigratedIn(id, order.migration_id, result)
                }
            };
            let _ = events.send(event);
        }
        .instrument(span),
    );
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
