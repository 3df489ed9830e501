//! The scheduler loop. One hub replica at a time (elected in etcd) turns desired state into placements:
//! it materialises instance records from container replica counts, places them with
//! [`crate::scheduler::schedule`] and [`crate::ipam::allocate`], stops what was scaled away and releases
//! what nodes removed. It runs after every change under `/berth/` (coalescing what arrives together) and every
//! [`RESYNC_INTERVAL`].
//!
//! After its passes the leader also looks at the cluster as a whole (`Observer`): it feeds the
//! cluster gauges and the scheduling latency of [`crate::metrics`], and evaluates the alert rules of
//! [`crate::alerts`], posting what changed to the webhooks.

mod pass;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::{Client, LeaderKey, ResignOptions, WatchOptions};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::alerts::{self, AlertRules, AlertState, AlertStatus, Notifier};
use crate::metrics::{self, NodeSample};
use crate::service::view::{instance_status, NodeHealth};
use crate::service::NetConfig;
use crate::store::{keys, Snapshot, Store, StoreError};

pub(crate) use pass::capacity;
pub use pass::{PassReport, Reconciler};

/// Periodic pass even without changes (catches lapsed liveness, release grace, missed events).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Changes already queued within this window after the first one are handled by the same pass.
/// Kept tiny on purpose: a pass starts at once (deploy latency), and bursts still coalesce because
/// whatever arrives while a pass runs is handled by the next one.
pub const COALESCE: Duration = Duration::from_millis(1);
/// TTL of the leader's election lease; a dead leader is replaced after at most this long.
pub const LEADER_LEASE_TTL_SECS: i64 = 5;
/// The leader observes the cluster (metrics, alerts) after a pass at most this often: passes follow
/// every change, and each observation reads the whole of `/berth/`. With [`RESYNC_INTERVAL`] this
/// keeps alerts evaluated at least every [`alerts::EVALUATE_EVERY`].
pub const OBSERVE_MIN_INTERVAL: Duration = Duration::from_secs(1);
const _: () = assert!(
    RESYNC_INTERVAL.as_millis() + OBSERVE_MIN_INTERVAL.as_millis()
        <= alerts::EVALUATE_EVERY.as_millis()
);

/// Statuses always exported by `berth_hub_instances` (0 when none), so alerting rules on them see
/// a series rather than nothing.
const INSTANCE_STATUSES: [&str; 9] = [
    "PENDING",
    "PULLING",
    "CREATING",
    "STARTING",
    "RUNNING",
    "UNHEALTHY",
    "STOPPING",
    "STOPPED",
    "FAILED",
];

/// How the leader alerts: the rules' thresholds and where changes are posted.
#[derive(Debug, Clone, Default)]
pub struct Alerting {
    /// Thresholds of the rules.
    pub rules: AlertRules,
    /// The webhooks (none: alerts are only logged and counted in `berth_alerts_firing`).
    pub notifier: Notifier,
    /// The event writer the leader's passes record through (the hub's, with `--event-ttl`); none: a
    /// writer with the default TTL.
    pub events: Option<crate::events::Events>,
}

/// Runs the scheduler loop until `shutdown` completes: campaigns for leadership, then reconciles while
/// leader; re-campaigns when the leadership lease is lost (etcd unreachable).
pub async fn run(store: Store, candidate: String, shutdown: impl Future<Output = ()> + Send) {
    run_with_config(store, candidate, NetConfig::default(), shutdown).await;
}

/// [`run`] with the cluster's address ranges (those the hub's flags set).
pub async fn run_with_config(
    store: Store,
    candidate: String,
    net: NetConfig,
    shutdown: impl Future<Output = ()> + Send,
) {
    run_with_alerting(store, candidate, net, Alerting::default(), shutdown).await;
}

/// [`run_with_config`] posting alerts as `alerting` says.
pub async fn run_with_alerting(
    store: Store,
    candidate: String,
    net: NetConfig,
    alerting: Alerting,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let mut reconciler = Reconciler::new(store.clone(), crate::service::lifecycle::RELEASE_GRACE)
        .with_net_config(net);
    if let Some(events) = &alerting.events {
        reconciler = reconciler.with_events(events.clone());
    }
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            result = lead_once(&store, &candidate, &mut reconciler, &alerting) => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "scheduler leadership lost, campaigning again");
                }
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// One term: lease, campaign, reconcile until the lease is lost. Dropping the future (shutdown) leaves
/// the lease to expire; [`run`] callers that want a quick hand-over call [`resign`].
async fn lead_once(
    store: &Store,
    candidate: &str,
    reconciler: &mut Reconciler,
    alerting: &Alerting,
) -> Result<(), StoreError> {
    let mut client = store.client();
    let lease = metrics::global()
        .time_etcd(
            "lease_grant",
            client.lease_grant(LEADER_LEASE_TTL_SECS, None),
        )
        .await?
        .id();
    let guard = LeaseGuard {
        client: client.clone(),
        lease,
    };
    let keepalive = keep_lease_alive(client.clone(), lease);
    tokio::pin!(keepalive);
    let leader = tokio::select! {
        e = &mut keepalive => return Err(e),
        resp = client.campaign(keys::ELECTION, candidate, lease) => resp?.take_leader(),
    };
    tracing::info!(candidate, "elected scheduler leader");
    let gauge = LeaderGauge::raise();
    let result = tokio::select! {
        e = &mut keepalive => Err(e),
        e = reconcile_while_leader(store, reconciler, alerting) => Err(e),
    };
    drop(gauge);
    if let Some(leader) = leader {
        resign(&mut client, leader).await;
    }
    drop(guard);
    result
}

async fn reconcile_while_leader(
    store: &Store,
    reconciler: &mut Reconciler,
    alerting: &Alerting,
) -> StoreError {
    let mut watch = match store
        .watch(keys::ROOT, Some(WatchOptions::new().with_prefix()))
        .await
    {
        Ok(w) => w,
        Err(e) => return e,
    };
    // Per term: a new leader re-posts what fires and times only the placements it made.
    let mut observer = Observer::new(alerting, OffsetDateTime::now_utc());
    let mut tick = tokio::time::interval(RESYNC_INTERVAL);
    loop {
        // A node turning DOWN must not wait for the next resync: wake at the reconciler's deadline.
        let deadline = reconciler
            .next_deadline()
            .map(tokio::time::Instant::from_std);
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            () = until_deadline => {}
            msg = watch.message() => match msg {
                Ok(Some(_)) => {
                    while let Ok(Ok(Some(_))) =
                        tokio::time::timeout(COALESCE, watch.message()).await {}
                }
                Ok(None) => return StoreError::Unavailable("watch on /berth/ ended".into()),
                Err(e) => return e.into(),
            },
        }
        match reconciler.pass().await {
            Ok(report) if report.changed() => tracing::debug!(?report, "reconciled"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconcile pass failed"),
        }
        observer.after_pass(store).await;
    }
}

/// Sets `berth_hub_leader` while alive; back to 0 (dropping the cluster gauges) however the term
/// ends, shutdown included.
struct LeaderGauge;

impl LeaderGauge {
    fn raise() -> Self {
        metrics::global().set_leader(true);
        LeaderGauge
    }
}

impl Drop for LeaderGauge {
    fn drop(&mut self) {
        metrics::global().set_leader(false);
    }
}

/// What the leader derives from whole snapshots during one term: cluster gauges, scheduling
/// latency, alerts.
struct Observer<'a> {
    alerting: &'a Alerting,
    alerts: AlertState,
    placements: PlacementTimer,
    last: Option<Instant>,
}

impl<'a> Observer<'a> {
    /// A fresh observer for a term that started at `term_start` (nothing firing yet).
    fn new(alerting: &'a Alerting, term_start: OffsetDateTime) -> Self {
        Observer {
            alerting,
            alerts: AlertState::new(alerting.rules),
            placements: PlacementTimer::new(term_start),
            last: None,
        }
    }

    /// Reads a snapshot and observes it, unless the last observation is under
    /// [`OBSERVE_MIN_INTERVAL`] old.
    async fn after_pass(&mut self, store: &Store) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < OBSERVE_MIN_INTERVAL)
        {
            return;
        }
        self.last = Some(Instant::now());
        match store.snapshot().await {
            Ok(snap) => self.observe(&snap, OffsetDateTime::now_utc()),
            Err(e) => tracing::debug!(error = %e, "no snapshot for metrics and alerts"),
        }
    }

    /// Updates the cluster metrics from `snap`, evaluates the alert rules at `now` and queues what
    /// changed for the webhooks.
    fn observe(&mut self, snap: &Snapshot, now: OffsetDateTime) {
        let m = metrics::global();
        m.set_nodes(&node_samples(snap));
        m.set_instances(instance_counts(snap));
        for seconds in self.placements.newly_placed(snap) {
            m.observe_scheduling(seconds);
        }
        let changes = alerts::evaluate(snap, now, &mut self.alerts);
        for a in &changes {
            let label = |k: &str| a.labels.get(k).map_or("", String::as_str);
            let summary = a.annotations.get("summary").map_or("", String::as_str);
            match a.status {
                AlertStatus::Firing => tracing::warn!(alertname = label("alertname"),
                    severity = label("severity"), fingerprint = %a.fingerprint, summary, "alert firing"),
                AlertStatus::Resolved => tracing::info!(alertname = label("alertname"),
                    fingerprint = %a.fingerprint, summary, "alert resolved"),
            }
        }
        self.alerting.notifier.notify(&changes);
        m.set_alerts_firing(self.alerts.firing_counts());
    }
}

/// Times instance creation → placement for the placements of this term (placements seen in a
/// snapshot for the first time, made after the term started).
struct PlacementTimer {
    since: OffsetDateTime,
    seen: HashSet<String>,
}

impl PlacementTimer {
    fn new(since: OffsetDateTime) -> Self {
        PlacementTimer {
            since,
            seen: HashSet::new(),
        }
    }

    /// Seconds from creation to placement of each instance placed since the last call.
    fn newly_placed(&mut self, snap: &Snapshot) -> Vec<f64> {
        let mut out = Vec::new();
        let mut placed = HashSet::new();
        for inst in snap.all_instances() {
            let r = &inst.record.value;
            if r.placed_at.is_empty() {
                continue;
            }
            placed.insert(r.instance_id.as_str());
            if self.seen.contains(&r.instance_id) {
                continue;
            }
            self.seen.insert(r.instance_id.clone());
            let parse = |s: &str| OffsetDateTime::parse(s, &Rfc3339).ok();
            if let (Some(created), Some(at)) = (parse(&r.created_at), parse(&r.placed_at)) {
                if at >= self.since {
                    out.push((at - created).as_seconds_f64().max(0.0));
                }
            }
        }
        self.seen.retain(|id| placed.contains(id.as_str()));
        out
    }
}

/// Each node's status, capacity and what the instances placed on it request.
fn node_samples(snap: &Snapshot) -> Vec<NodeSample> {
    let mut used: HashMap<&str, (u64, u64)> = HashMap::new();
    for inst in snap.all_instances() {
        let r = &inst.record.value;
        if r.node_id.is_empty() {
            continue;
        }
        if let Some(c) = snap.containers.get(&r.container_id) {
            let u = used.entry(r.node_id.as_str()).or_default();
            u.0 += c.value.cpu_millis;
            u.1 += c.value.memory_bytes;
        }
    }
    snap.nodes
        .values()
        .map(|n| {
            let id = n.value.node_id.as_str();
            let health = if snap.alive.contains(id) {
                NodeHealth::Healthy
            } else if snap.down.contains(id) {
                NodeHealth::Down
            } else {
                NodeHealth::Unhealthy
            };
            let (cpu, memory) = used.get(id).copied().unwrap_or_default();
            NodeSample {
                node_id: id.to_owned(),
                status: health.as_str().to_owned(),
                cpu_capacity_millis: n.value.cpu_millis,
                cpu_allocated_millis: cpu,
                memory_capacity_bytes: n.value.memory_bytes,
                memory_allocated_bytes: memory,
            }
        })
        .collect()
}

/// Instances by the status users see, every status of [`INSTANCE_STATUSES`] included.
fn instance_counts(snap: &Snapshot) -> BTreeMap<String, u64> {
    let mut counts: BTreeMap<String, u64> = INSTANCE_STATUSES
        .iter()
        .map(|s| ((*s).to_owned(), 0))
        .collect();
    for inst in snap.all_instances() {
        *counts.entry(instance_status(inst).0).or_default() += 1;
    }
    counts
}

/// Keeps the lease alive; returns only when it is lost.
async fn keep_lease_alive(mut client: Client, lease: i64) -> StoreError {
    let interval = Duration::from_millis((LEADER_LEASE_TTL_SECS as u64 * 1000) / 3);
    let (mut keeper, mut responses) = match client.lease_keep_alive(lease).await {
        Ok(pair) => pair,
        Err(e) => return e.into(),
    };
    loop {
        if let Err(e) = keeper.keep_alive().await {
            return e.into();
        }
        match responses.message().await {
            Ok(Some(r)) if r.ttl() > 0 => {}
            Ok(_) => return StoreError::Unavailable(format!("leader lease {lease} expired")),
            Err(e) => return e.into(),
        }
        tokio::time::sleep(interval).await;
    }
}

async fn resign(client: &mut Client, leader: LeaderKey) {
    if let Err(e) = client
        .resign(Some(ResignOptions::new().with_leader(leader)))
        .await
    {
        tracing::debug!(error = %e, "resign failed");
    }
}

/// Revokes the leadership lease when a term ends, so another replica takes over at once.
struct LeaseGuard {
    client: Client,
    lease: i64,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let mut client = self.client.clone();
        let lease = self.lease;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = client.lease_revoke(lease).await;
            });
        }
    }
}
