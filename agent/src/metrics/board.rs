//! The agent's own [`InstanceSource`]: the instance board (what the reconciler last decided), the
//! eBPF traffic counters of each instance's veth and the prober's results, joined at scrape time.
//!
//! The same join answers the agent API's `GET /v1/instances/{id}/stats` ([`BoardSource::stats`]),
//! so a scrape and a stats request never disagree on where a number comes from.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::v1::{DesiredState, HealthCheck, InstanceStatus};
use serde::Serialize;
use tokio::sync::watch;

use super::{
    CgroupReader, CgroupUsage, Counters, InstanceSample, InstanceSource, ProbeKind, ProbeSample,
};
use crate::dataplane::NodeDataPlane;
use crate::health::{ProbeSnapshot, Prober};
use crate::status::{BoardEntry, InstanceBoard};

/// How long [`BoardSource::stats`] watches the CPU counter by default to compute `cpu_percent`.
pub const DEFAULT_CPU_WINDOW: Duration = Duration::from_millis(250);

/// Traffic counters of an instance's veth (the eBPF data plane; a fake in tests).
pub trait TrafficCounters: Send + Sync + 'static {
    /// The instance's counters; `None` while it has no attached veth (or it is gone).
    fn instance_counters(&self, instance_id: &str) -> Option<Counters>;
}

impl TrafficCounters for NodeDataPlane {
    fn instance_counters(&self, instance_id: &str) -> Option<Counters> {
        let veth = crate::network::host_veth_name(instance_id);
        match self.counters(&veth) {
            Ok(c) => Some(c),
            Err(e) => {
                // Normal before the veth exists and after it is gone: not worth more than a trace.
                tracing::trace!(instance_id, veth, error = %e, "no traffic counters");
                None
            }
        }
    }
}

/// The probes' running results (the [`Prober`]; a fake in tests).
pub trait ProbeStates: Send + Sync + 'static {
    /// Every probed instance's results so far.
    fn probe_snapshots(&self) -> Vec<(String, ProbeSnapshot)>;
}

impl ProbeStates for Prober {
    fn probe_snapshots(&self) -> Vec<(String, ProbeSnapshot)> {
        self.snapshots()
    }
}

/// One instance's quick look, the agent API's `GET /v1/instances/{id}/stats` body.
///
/// Numbers the node could not read are 0 (`memory_limit_bytes` 0: no limit).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InstanceStats {
    /// The instance.
    pub instance_id: String,
    /// Its status as reported to the hub (`RUNNING`, `PULLING`, ...).
    pub status: String,
    /// CPU use over the measuring window, in percent of one core (200 = two cores busy).
    pub cpu_percent: f64,
    /// CPU time used since the cgroup was created.
    pub cpu_seconds: f64,
    /// Memory in use (page cache included).
    pub memory_bytes: u64,
    /// The enforced memory limit; 0 when unlimited or unknown.
    pub memory_limit_bytes: u64,
    /// Bytes received by the instance.
    pub rx_bytes: u64,
    /// Bytes sent by the instance.
    pub tx_bytes: u64,
    /// Packets received by the instance.
    pub rx_packets: u64,
    /// Packets sent by the instance.
    pub tx_packets: u64,
    /// Restarts by the node so far.
    pub restarts: u32,
}

/// The board joined with cgroups, traffic counters and probe results.
pub struct BoardSource {
    board: InstanceBoard,
    cgroup_parent: String,
    cgroups: CgroupReader,
    traffic: Option<Arc<dyn TrafficCounters>>,
    probes: Option<Arc<dyn ProbeStates>>,
    /// The probe kind of each instance comes from its assignment: the prober only knows timings.
    desired: Option<watch::Receiver<Option<DesiredState>>>,
}

impl std::fmt::Debug for BoardSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoardSource")
            .field("cgroup_parent", &self.cgroup_parent)
            .field("cgroups", &self.cgroups)
            .field("traffic", &self.traffic.is_some())
            .field("probes", &self.probes.is_some())
            .finish_non_exhaustive()
    }
}

impl BoardSource {
    /// The instances of `board`, whose cgroups are `/<cgroup_parent>/<instance id>` in the
    /// hierarchies mounted here (see `runtime::Runtime::cgroup_parent`).
    pub fn new(board: InstanceBoard, cgroup_parent: impl Into<String>) -> Self {
        let cgroups = CgroupReader::from_system().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read mountinfo: no cgroup stats");
            CgroupReader::default()
        });
        Self::with_cgroups(board, cgroup_parent, cgroups)
    }

    /// Like [`BoardSource::new`], reading cgroups where `cgroups` says (tests point it at files).
    pub fn with_cgroups(
        board: InstanceBoard,
        cgroup_parent: impl Into<String>,
        cgroups: CgroupReader,
    ) -> Self {
        Self {
            board,
            cgroup_parent: cgroup_parent.into(),
            cgroups,
            traffic: None,
            probes: None,
            desired: None,
        }
    }

    /// Adds the instances' traffic counters.
    pub fn with_traffic(mut self, traffic: Arc<dyn TrafficCounters>) -> Self {
        self.traffic = Some(traffic);
        self
    }

    /// Adds probe results; `desired` (the node's desired state) says which kind each probe is.
    pub fn with_probes(
        mut self,
        probes: Arc<dyn ProbeStates>,
        desired: watch::Receiver<Option<DesiredState>>,
    ) -> Self {
        self.probes = Some(probes);
        self.desired = Some(desired);
        self
    }

    /// The hierarchies read (hand the same to `NodeMetrics::with_cgroups`).
    pub fn cgroups(&self) -> &CgroupReader {
        &self.cgroups
    }

    /// `instance_id`'s cgroup usage now. Blocking (file reads).
    pub fn usage(&self, instance_id: &str) -> CgroupUsage {
        self.cgroups.read(&self.cgroup_parent, instance_id)
    }

    /// The stats of `instance_id`, `cpu_percent` measured over `window`; `None` when the board
    /// does not know the instance.
    pub async fn stats(
        self: &Arc<Self>,
        instance_id: &str,
        window: Duration,
    ) -> Option<InstanceStats> {
        let entry = self.board.get(instance_id)?;
        let read = |this: Arc<Self>, id: String| async move {
            // Reads cgroup files and the eBPF map: off the async workers.
            let done = tokio::task::spawn_blocking(move || (this.usage(&id), Instant::now()));
            done.await.ok()
        };
        let before = read(self.clone(), instance_id.to_owned()).await;
        tokio::time::sleep(window).await;
        let after = read(self.clone(), instance_id.to_owned()).await;
        let traffic = self.traffic.clone();
        let id = instance_id.to_owned();
        let net = tokio::task::spawn_blocking(move || traffic?.instance_counters(&id))
            .await
            .ok()
            .flatten();
        let (usage, percent) = match (before, after) {
            (Some((u1, t1)), Some((u2, t2))) => (u2, cpu_percent(&u1, &u2, t2 - t1)),
            (_, Some((u2, _))) => (u2, 0.0),
            _ => (CgroupUsage::default(), 0.0),
        };
        Some(instance_stats(&entry, &usage, percent, net))
    }

    /// Which kind of probe each instance of the desired state has.
    fn probe_kinds(&self) -> HashMap<String, ProbeKind> {
        let Some(desired) = &self.desired else {
            return HashMap::new();
        };
        let state = desired.borrow();
        let Some(state) = state.as_ref() else {
            return HashMap::new();
        };
        state
            .assignments
            .iter()
            .filter_map(|a| {
                let kind = probe_kind(a.health.as_ref()?)?;
                Some((a.instance_id.clone(), kind))
            })
            .collect()
    }
}

impl InstanceSource for BoardSource {
    fn instances(&self) -> Vec<InstanceSample> {
        let entries = self.board.snapshot();
        let kinds = self.probe_kinds();
        let mut probes: HashMap<String, ProbeSnapshot> = self
            .probes
            .as_ref()
            .map(|p| p.probe_snapshots().into_iter().collect())
            .unwrap_or_default();
        entries
            .into_iter()
            .map(|e| {
                let net = self
                    .traffic
                    .as_ref()
                    .and_then(|t| t.instance_counters(&e.instance_id));
                let probe = kinds
                    .get(&e.instance_id)
                    .map(|kind| probe_sample(*kind, probes.remove(&e.instance_id)));
                sample(e, &self.cgroup_parent, probe, net)
            })
            .collect()
    }
}

/// The status name users see: `RUNNING` for `INSTANCE_STATUS_RUNNING`.
pub fn status_name(status: InstanceStatus) -> &'static str {
    let name = status.as_str_name();
    name.strip_prefix("INSTANCE_STATUS_").unwrap_or(name)
}

/// The kind of a declared probe; `None` when it names none (the hub refuses such specs).
fn probe_kind(health: &HealthCheck) -> Option<ProbeKind> {
    match (&health.http, &health.tcp, &health.exec) {
        (Some(_), _, _) => Some(ProbeKind::Http),
        (None, Some(_), _) => Some(ProbeKind::Tcp),
        (None, None, Some(_)) => Some(ProbeKind::Exec),
        (None, None, None) => None,
    }
}

/// A declared probe's state; before the prober's first run (or while it is not running) it has
/// no result and no failures yet, so its failure counter still starts at 0.
fn probe_sample(kind: ProbeKind, snapshot: Option<ProbeSnapshot>) -> ProbeSample {
    let snapshot = snapshot.unwrap_or_default();
    ProbeSample {
        kind,
        last_success: snapshot.last_result.as_ref().map(|r| r.ok),
        failures: snapshot.failures_total,
    }
}

fn sample(
    e: BoardEntry,
    cgroup_parent: &str,
    probe: Option<ProbeSample>,
    net: Option<Counters>,
) -> InstanceSample {
    InstanceSample {
        status: status_name(e.status).to_owned(),
        cgroup_parent: cgroup_parent.to_owned(),
        cgroup_id: e.instance_id.clone(),
        instance_id: e.instance_id,
        container_id: e.container_id,
        container_name: e.container_name,
        cpu_millis: e.cpu_millis,
        memory_bytes: e.memory_bytes,
        restarts: u64::from(e.restarts),
        probes: probe.into_iter().collect(),
        net,
    }
}

/// CPU use between two reads `elapsed` apart, in percent of one core; 0 when either read failed,
/// the counter went backwards (a new cgroup under the same name) or no time passed.
pub fn cpu_percent(before: &CgroupUsage, after: &CgroupUsage, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    match (before.cpu_seconds, after.cpu_seconds) {
        (Some(b), Some(a)) if a >= b && secs > 0.0 => (a - b) / secs * 100.0,
        _ => 0.0,
    }
}

fn instance_stats(
    e: &BoardEntry,
    usage: &CgroupUsage,
    cpu_percent: f64,
    net: Option<Counters>,
) -> InstanceStats {
    let net = net.unwrap_or_default();
    InstanceStats {
        instance_id: e.instance_id.clone(),
        status: status_name(e.status).to_owned(),
        cpu_percent,
        cpu_seconds: usage.cpu_seconds.unwrap_or(0.0),
        memory_bytes: usage.memory_bytes.unwrap_or(0),
        memory_limit_bytes: usage.memory_limit_bytes.unwrap_or(0),
        rx_bytes: net.rx_bytes,
        tx_bytes: net.tx_bytes,
        rx_packets: net.rx_packets,
        tx_packets: net.tx_packets,
        restarts: e.restarts,
    }
}

#[cfg(test)]
#[path = "board_tests.rs"]
mod tests;
