//! Desired vs actual: drives the node's instances toward the hub's last desired state.
//!
//! The reconciler owns the table of local instances and is the only writer of it; the slow work
//! (pull, create, stop) runs in tasks that report back through one event channel, so the table never
//! needs a lock and a slow pull never blocks a removal. The kernel-facing work sits behind [`Host`] so
//! this logic is tested without root (see the tests at the bottom).
//!
//! Invariants:
//! - Before the first desired state arrives (hub unreachable at start), nothing is stopped: a node that
//!   lost its hub keeps serving.
//! - At most one task works on an instance at a time.
//! - An instance is reported `Removed` only after `Host::stop` succeeded, so the hub never reuses an
//!   address that is still plugged in somewhere.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1::{Assignment, DesiredState, InstanceReport, InstanceStatus};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
// tokio's clock, so backoffs follow a paused test clock too.
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

use crate::hub::Report;

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
        })
    }
}

/// A started instance, as the host reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Started {
    /// Milliseconds per deploy phase ("pull", "rootfs", "create", "network", "start").
    pub phases_ms: HashMap<String, f64>,
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
    /// Removes everything of an instance (process, network plumbing, rootfs, records). Idempotent.
    fn stop(&self, spec: &InstanceSpec) -> impl Future<Output = Result<(), String>> + Send;
    /// Whether the instance's process still runs.
    fn liveness(&self, instance_id: &str) -> Liveness;
    /// Records how often the instance was restarted, so a restarted agent keeps counting.
    fn save_restarts(&self, _instance_id: &str, _restarts: u32) {}
    /// Instances whose processes exited since the last call, with their exit status.
    fn reap(&self) -> Vec<(String, i32)>;
    /// What an earlier agent process left on this node.
    fn recover(&self) -> Vec<Recovered>;
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
    /// A stop task is working on it.
    Stopping,
    /// Its process exited and its restart policy keeps it that way (until it is removed).
    Exited,
}

#[derive(Debug, Clone)]
struct Local {
    spec: InstanceSpec,
    phase: Phase,
    /// Consecutive failed starts or crashes, for backoff.
    failures: u32,
    /// Times its process was restarted after exiting.
    restarts: u32,
    last_report: Option<(InstanceStatus, String)>,
}

#[derive(Debug)]
enum Event {
    Progress(String, InstanceStatus),
    Started(String, Result<Started, String>),
    Stopped(String, Result<(), String>),
    /// A liveness probe's findings: (instance, start of the run that was probed, what was seen).
    Probed(Vec<(String, Instant, Liveness)>),
}

/// Backoff before restarting after `failures` consecutive failures: 1 s doubling to 30 s.
pub fn restart_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(5);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(30))
}

/// A container that ran this long before crashing starts its backoff from scratch.
const STABLE_RUN: Duration = Duration::from_secs(10);

/// Drives local instances toward the desired state.
pub struct Reconciler<H: Host> {
    host: Arc<H>,
    reports: mpsc::UnboundedSender<Report>,
    locals: HashMap<String, Local>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    /// The last desired state; None until the hub has spoken once.
    desired: Option<HashMap<String, InstanceSpec>>,
    /// A liveness probe is in flight (at most one at a time).
    probing: bool,
}

impl<H: Host> Reconciler<H> {
    /// A reconciler that adopts whatever the host recovered from an earlier agent process.
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
                // Restarted (or cleaned up) once the hub says whether it is still wanted.
                Liveness::Exited(_) | Liveness::Unknown => Phase::Backoff { retry_at: now },
            };
            info!(instance_id = %r.spec.instance_id, liveness = ?r.liveness, "recovered instance");
            locals.insert(
                r.spec.instance_id.clone(),
                Local {
                    spec: r.spec,
                    phase,
                    failures: 0,
                    restarts: r.restarts,
                    last_report: None,
                },
            );
        }
        Self {
            host,
            reports,
            locals,
            events_tx,
            events_rx,
            desired: None,
            probing: false,
        }
    }

    /// Runs until `desired` is closed. `children` ticks when a child process changed state (SIGCHLD).
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<DesiredState>>,
        mut children: mpsc::UnboundedReceiver<()>,
    ) {
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
            match InstanceSpec::try_from(a) {
                Ok(spec) => {
                    map.insert(spec.instance_id.clone(), spec);
                }
                Err(e) => {
                    warn!(instance_id = %id, error = %e, "rejecting assignment");
                    self.send(Report::Status(InstanceReport {
                        instance_id: id,
                        status: InstanceStatus::Failed as i32,
                        reason: e.to_string(),
                        phases_ms: HashMap::new(),
                        restarts: 0,
                        image_digest: String::new(),
                    }));
                }
            }
        }
        // Stopped before this node ever saw them (placed and stopped between two states): nothing
        // of them is here, so they are removed as far as this node goes. Said again on every state
        // while the hub still asks, so a lost report cannot strand an address.
        for id in &state.stopping {
            if !self.locals.contains_key(id) {
                self.send(Report::Removed(id.clone()));
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
                        report(&self.reports, l, status, String::new(), HashMap::new());
                    }
                }
            }
            Event::Started(id, result) => {
                let Some(l) = self.locals.get_mut(&id) else {
                    return;
                };
                match result {
                    Ok(started) => {
                        info!(instance_id = %id, phases = ?started.phases_ms, "instance running");
                        l.phase = Phase::Running {
                            since: Instant::now(),
                        };
                        report(
                            &self.reports,
                            l,
                            InstanceStatus::Running,
                            String::new(),
                            started.phases_ms,
                        );
                    }
                    Err(reason) => {
                        l.failures += 1;
                        let delay = restart_delay(l.failures);
                        warn!(instance_id = %id, %reason, retry_in = ?delay, "start failed");
                        l.phase = Phase::Backoff {
                            retry_at: Instant::now() + delay,
                        };
                        let reason = format!("{reason} (retrying in {}s)", delay.as_secs());
                        report(
                            &self.reports,
                            l,
                            InstanceStatus::Failed,
                            reason,
                            HashMap::new(),
                        );
                    }
                }
            }
            Event::Probed(seen) => self.on_probed(seen),
            Event::Stopped(id, result) => match result {
                Ok(()) => {
                    info!(instance_id = %id, "instance removed");
                    self.locals.remove(&id);
                    self.send(Report::Removed(id));
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

    fn exited(&mut self, id: &str, code: i32) {
        let Some(l) = self.locals.get_mut(id) else {
            return;
        };
        let Phase::Running { since } = l.phase else {
            return;
        };
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
            report(&self.reports, l, status, reason, HashMap::new());
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
        report(&self.reports, l, status, reason, HashMap::new());
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

    /// One pass: start what is wanted and missing, stop what runs and is not wanted.
    fn reconcile(&mut self) {
        let Some(desired) = &self.desired else {
            return;
        };
        let now = Instant::now();
        for (id, spec) in desired {
            if !self.locals.contains_key(id) {
                self.locals.insert(
                    id.clone(),
                    Local {
                        spec: spec.clone(),
                        phase: Phase::Backoff { retry_at: now },
                        failures: 0,
                        restarts: 0,
                        last_report: None,
                    },
                );
            }
        }
        let ids: Vec<String> = self.locals.keys().cloned().collect();
        for id in ids {
            let wanted = desired.get(&id);
            let Some(local) = self.locals.get_mut(&id) else {
                continue;
            };
            match (&local.phase, wanted) {
                (Phase::Backoff { retry_at }, Some(spec)) if *retry_at <= now => {
                    local.spec = spec.clone();
                    local.phase = Phase::Starting;
                    spawn_work(Work::Start, &self.host, &self.events_tx, local.spec.clone());
                }
                (Phase::Running { .. } | Phase::Backoff { .. } | Phase::Exited, None) => {
                    local.phase = Phase::Stopping;
                    spawn_work(Work::Stop, &self.host, &self.events_tx, local.spec.clone());
                }
                (Phase::Running { .. }, Some(_)) if local.last_report.is_none() => {
                    report(
                        &self.reports,
                        local,
                        InstanceStatus::Running,
                        String::new(),
                        HashMap::new(),
                    );
                }
                // Starting or Stopping: the task's event moves it on; a Backoff waits for its time.
                _ => {}
            }
        }
    }

    fn send(&self, r: Report) {
        // The reporter only goes away when the agent shuts down.
        let _ = self.reports.send(r);
    }
}

/// The slow work the loop hands to a task; its outcome comes back as an [`Event`].
#[derive(Debug, Clone, Copy)]
enum Work {
    Start,
    Stop,
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
                Work::Stop => Event::Stopped(id, host.stop(&spec).await),
            };
            let _ = events.send(event);
        }
        .instrument(span),
    );
}

/// Sends a status unless it repeats the last one sent for the instance.
fn report(
    reports: &mpsc::UnboundedSender<Report>,
    local: &mut Local,
    status: InstanceStatus,
    reason: String,
    phases_ms: HashMap<String, f64>,
) {
    let key = (status, reason.clone());
    if local.last_report.as_ref() == Some(&key) && phases_ms.is_empty() {
        return;
    }
    local.last_report = Some(key);
    let _ = reports.send(Report::Status(InstanceReport {
        instance_id: local.spec.instance_id.clone(),
        status: status as i32,
        reason,
        phases_ms,
        restarts: local.restarts,
        image_digest: String::new(),
    }));
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
