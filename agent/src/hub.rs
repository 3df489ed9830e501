//! The agent's link to the hub: register, heartbeat, the desired-state stream and status reports.
//!
//! Every loop here survives the hub going away: it retries with capped backoff and never touches the
//! containers. The reconciler only ever sees the last desired state received, so a hub outage freezes
//! the node's desired state instead of emptying it.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::{
    DesiredState, HeartbeatRequest, InstanceReport, RegisterRequest, RegisterResponse,
    ReportStatusRequest, WatchAssignmentsRequest,
};
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::tls::NodeTls;

/// What the agent offers the cluster.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Stable node id (`--node-id`).
    pub node_id: String,
    /// Host name reported to operators.
    pub hostname: String,
    /// Address other nodes and the hub reach this node on.
    pub advertise_ip: String,
    /// Offered CPU in millicores.
    pub cpu_millis: u64,
    /// Offered memory in bytes.
    pub memory_bytes: u64,
    /// Base64 WireGuard public key (the private key stays in the data dir).
    pub wireguard_public_key: String,
    /// `host:port` of the agent API the hub proxies logs and stats to ("" when none runs).
    pub api_addr: String,
    /// The node's key: each registration asks the hub's CA for a certificate for it.
    pub tls: Option<Arc<NodeTls>>,
    /// `host:port` of the node's migration endpoint ("" until it runs: it needs the certificate of
    /// the first registration); a change registers the node again so the hub learns it.
    pub migration_addr: Option<watch::Receiver<String>>,
}

impl NodeInfo {
    fn current_migration_addr(&self) -> String {
        self.migration_addr
            .as_ref()
            .map(|rx| rx.borrow().clone())
            .unwrap_or_default()
    }
}

/// The `host:port` the hub reaches an agent API bound to `bound` on ([`NodeInfo::api_addr`]): a
/// wildcard bind (`0.0.0.0`, `::`) is reached on the node's advertise IP.
pub fn reachable_api_addr(bound: SocketAddr, advertise_ip: IpAddr) -> String {
    let ip = if bound.ip().is_unspecified() {
        advertise_ip
    } else {
        bound.ip()
    };
    SocketAddr::new(ip, bound.port()).to_string()
}

/// Errors of the hub link.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub URL could not be parsed.
    #[error("invalid hub url {url:?}: {source}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why tonic refused it.
        source: tonic::transport::Error,
    },
}

/// One change the reconciler wants the hub to know about.
// Reports are few (one per instance change) and short-lived in the outbox: boxing the common
// variant would cost an allocation each to save a couple of hundred bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The instance's current status.
    Status(InstanceReport),
    /// Nothing of the instance is left on the node.
    Removed(String),
}

/// A lazily connected gRPC client; tonic reconnects on its own after the hub comes back.
pub fn connect(url: &str) -> Result<AgentServiceClient<Channel>, HubError> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|source| HubError::InvalidUrl {
            url: url.to_string(),
            source,
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(AgentServiceClient::new(endpoint.connect_lazy()))
}

/// Backoff that doubles up to a cap; reset after a success.
#[derive(Debug)]
struct Backoff {
    current: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(200);
    const CAP: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Self {
            current: Self::START,
        }
    }

    fn reset(&mut self) {
        self.current = Self::START;
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.current).await;
        self.current = (self.current * 2).min(Self::CAP);
    }
}

async fn register(client: &mut AgentServiceClient<Channel>, node: &NodeInfo) -> u32 {
    let mut backoff = Backoff::new();
    let csr_pem = match node.tls.as_ref().map(|t| t.csr_pem()) {
        None => String::new(),
        Some(Ok(csr)) => csr,
        Some(Err(e)) => {
            // Registration still works; only what needs a node certificate (migration) will not.
            warn!(error = %e, "cannot make a certificate request; registering without one");
            String::new()
        }
    };
    loop {
        let req = RegisterRequest {
            node_id: node.node_id.clone(),
            hostname: node.hostname.clone(),
            advertise_ip: node.advertise_ip.clone(),
            cpu_millis: node.cpu_millis,
            memory_bytes: node.memory_bytes,
            wireguard_public_key: node.wireguard_public_key.clone(),
            api_addr: node.api_addr.clone(),
            // Empty until the endpoint runs: the hub sends this node no migrations meanwhile.
            migration_addr: node.current_migration_addr(),
            csr_pem: csr_pem.clone(),
        };
        match client.register(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                if let Some(tls) = &node.tls {
                    store_certificate(tls, &resp);
                }
                let interval = resp.heartbeat_interval_secs.clamp(1, 60);
                info!(node_id = %node.node_id, interval, "registered with hub");
                return interval;
            }
            Err(status) => {
                warn!(node_id = %node.node_id, error = %status.message(), code = ?status.code(), "register failed; retrying");
                backoff.wait().await;
            }
        }
    }
}

/// Keeps the certificate the hub signed, after checking it is for this node and key.
fn store_certificate(tls: &NodeTls, resp: &RegisterResponse) {
    if resp.node_cert_pem.is_empty() {
        warn!("the hub sent no node certificate (it has no cluster CA?)");
        return;
    }
    match tls.store(&resp.node_cert_pem, &resp.ca_cert_pem) {
        Ok(identity) => info!(node_id = identity.node_id(), "node certificate stored"),
        Err(e) => warn!(error = %e, "refused the node certificate the hub sent"),
    }
}

/// Registers, then heartbeats forever; registers again whenever the hub has forgotten the node.
pub async fn run_membership(mut client: AgentServiceClient<Channel>, node: NodeInfo) {
    let mut interval = register(&mut client, &node).await;
    let mut migration_addr = node.migration_addr.clone();
    loop {
        let beat = tokio::time::sleep(Duration::from_secs(u64::from(interval)));
        match migration_addr.as_mut() {
            Some(rx) => {
                tokio::select! {
                    () = beat => {}
                    changed = rx.changed() => {
                        if changed.is_ok() {
                            info!(node_id = %node.node_id, addr = %rx.borrow().clone(), "migration endpoint changed; registering again");
                            interval = register(&mut client, &node).await;
                        } else {
                            // The endpoint's owner is gone: nothing will change any more.
                            migration_addr = None;
                        }
                        continue;
                    }
                }
            }
            None => beat.await,
        }
        let req = HeartbeatRequest {
            node_id: node.node_id.clone(),
        };
        match client.heartbeat(req).await {
            Ok(resp) if resp.get_ref().known => {}
            Ok(_) => {
                info!(node_id = %node.node_id, "hub no longer knows this node; registering again");
                interval = register(&mut client, &node).await;
            }
            Err(status) => {
                debug!(error = %status.message(), "heartbeat failed");
            }
        }
    }
}

/// Follows the node's desired state; each full snapshot replaces the previous one in `tx`.
pub async fn run_watch(
    mut client: AgentServiceClient<Channel>,
    node_id: String,
    tx: watch::Sender<Option<DesiredState>>,
) {
    let mut backoff = Backoff::new();
    loop {
        let req = WatchAssignmentsRequest {
            node_id: node_id.clone(),
        };
        match client.watch_assignments(req).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(state)) => {
                            backoff.reset();
                            debug!(
                                revision = state.revision,
                                assignments = state.assignments.len(),
                                "desired state"
                            );
                            if tx.send(Some(state)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            info!("hub closed the desired-state stream");
                            break;
                        }
                        Err(status) => {
                            warn!(error = %status.message(), "desired-state stream broke");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                debug!(error = %status.message(), code = ?status.code(), "watch failed");
            }
        }
        backoff.wait().await;
    }
}

/// Pending reports, latest status per instance; what failed to send is sent again with the next batch.
#[derive(Debug, Default)]
struct Outbox {
    statuses: HashMap<String, InstanceReport>,
    removed: BTreeSet<String>,
}

impl Outbox {
    fn push(&mut self, report: Report) {
        match report {
            Report::Status(mut r) => {
                self.removed.remove(&r.instance_id);
                // A plain status after a migration report keeps that report's migration part: a
                // migration's end (its error, or DONE) must reach the hub even when the status
                // changes again before the batch goes.
                if r.migration.is_none() {
                    r.migration = self
                        .statuses
                        .get_mut(&r.instance_id)
                        .and_then(|old| old.migration.take());
                }
                self.statuses.insert(r.instance_id.clone(), r);
            }
            Report::Removed(id) => {
                // A migration's end still goes: a post-copy source removes its copy right after
                // reporting the last page served, and that report is what completes the job (the
                // hub ignores the status part, the instance being another node's by then).
                if self.statuses.get(&id).is_none_or(|r| r.migration.is_none()) {
                    self.statuses.remove(&id);
                }
                self.removed.insert(id);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.statuses.is_empty() && self.removed.is_empty()
    }

    fn take(&mut self, node_id: &str) -> ReportStatusRequest {
        ReportStatusRequest {
            node_id: node_id.to_string(),
            reports: std::mem::take(&mut self.statuses).into_values().collect(),
            removed: std::mem::take(&mut self.removed).into_iter().collect(),
        }
    }

    /// Puts back a batch that failed, without overwriting anything newer.
    fn restore(&mut self, req: ReportStatusRequest) {
        // Statuses pushed since the batch was taken: an instance started again after its removal.
        let newer: std::collections::HashSet<String> = self.statuses.keys().cloned().collect();
        for r in req.reports {
            if self.removed.contains(&r.instance_id) && r.migration.is_none() {
                continue;
            }
            match self.statuses.get_mut(&r.instance_id) {
                Some(newer) if newer.migration.is_none() => newer.migration = r.migration,
                Some(_) => {}
                None => {
                    self.statuses.insert(r.instance_id.clone(), r);
                }
            }
        }
        for id in req.removed {
            if !newer.contains(&id) {
                self.removed.insert(id);
            }
        }
    }
}

/// Removals the hub has not acknowledged yet, kept on disk: the hub releases an instance's address
/// only on this report, and the agent has nothing else left of the instance to remember it by, so
/// a removal must survive an agent restart until the hub has it.
#[derive(Debug, Clone)]
pub struct Tombstones {
    dir: PathBuf,
}

impl Tombstones {
    /// Tombstones under `dir` (created if missing).
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Instance ids whose removal was never acknowledged.
    pub fn pending(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|id| is_safe_id(id))
            .collect()
    }

    fn add(&self, id: &str) {
        if !is_safe_id(id) {
            return;
        }
        if let Err(e) = std::fs::write(self.dir.join(id), b"") {
            warn!(instance_id = id, error = %e, "cannot record removal; a restart before the hub acknowledges it would lose it");
        }
    }

    fn acknowledged(&self, id: &str) {
        if is_safe_id(id) {
            let _ = std::fs::remove_file(self.dir.join(id));
        }
    }
}

/// Ids come from the hub; only plain names may become file names.
fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Sends the reconciler's reports to the hub in batches; keeps them while the hub is away, and
/// removals across agent restarts.
pub async fn run_reporter(
    mut client: AgentServiceClient<Channel>,
    node_id: String,
    mut rx: mpsc::UnboundedReceiver<Report>,
    tombstones: Tombstones,
) {
    let mut outbox = Outbox::default();
    for id in tombstones.pending() {
        info!(instance_id = %id, "re-sending a removal the hub never acknowledged");
        outbox.push(Report::Removed(id));
    }
    let mut backoff = Backoff::new();
    loop {
        if outbox.is_empty() {
            match rx.recv().await {
                Some(r) => push(&mut outbox, &tombstones, r),
                None => return,
            }
        }
        // Coalesce whatever else is already queued into the same request.
        while let Ok(r) = rx.try_recv() {
            push(&mut outbox, &tombstones, r);
        }
        let req = outbox.take(&node_id);
        match client.report_status(req.clone()).await {
            Ok(_) => {
                backoff.reset();
                for id in &req.removed {
                    tombstones.acknowledged(id);
                }
            }
            Err(status) => {
                debug!(error = %status.message(), "report failed; will retry");
                outbox.restore(req);
                backoff.wait().await;
            }
        }
    }
}

fn push(outbox: &mut Outbox, tombstones: &Tombstones, r: Report) {
    if let Report::Removed(id) = &r {
        tombstones.add(id);
    }
    outbox.push(r);
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::v1::InstanceStatus;

    fn status(id: &str, s: InstanceStatus) -> Report {
        Report::Status(InstanceReport {
            instance_id: id.into(),
            status: s as i32,
            ..Default::default()
        })
    }

    #[test]
    fn outbox_keeps_latest_status_and_removal_wins_over_older_status() {
        let mut o = Outbox::default();
        o.push(status("a", InstanceStatus::Pulling));
        o.push(status("a", InstanceStatus::Running));
        o.push(status("b", InstanceStatus::Running));
        o.push(Report::Removed("b".into()));
        let req = o.take("n1");
        assert_eq!(req.reports.len(), 1);
        assert_eq!(req.reports[0].status, InstanceStatus::Running as i32);
        assert_eq!(req.removed, vec!["b".to_string()]);
        assert!(o.is_empty());
    }

    #[test]
    fn outbox_restore_does_not_overwrite_newer_reports() {
        let mut o = Outbox::default();
        o.push(status("a", InstanceStatus::Creating));
        o.push(Report::Removed("c".into()));
        let failed = o.take("n1");
        o.push(status("a", InstanceStatus::Running));
        o.push(status("c", InstanceStatus::Pulling));
        o.restore(failed);
        let req = o.take("n1");
        assert_eq!(req.reports.len(), 2);
        let a = req.reports.iter().find(|r| r.instance_id == "a");
        assert_eq!(
            a.map(|r| r.status),
            Some(InstanceStatus::Running as i32),
            "newer status kept"
        );
        assert!(
            req.removed.is_empty(),
            "a newer status of c cancels its older removal"
        );
    }

    #[test]
    fn a_migration_report_survives_the_removal_that_follows_it() {
        let done = Some(berth_proto::v1::MigrationProgress {
            migration_id: "mig-1".into(),
            phase: berth_proto::v1::MigrationPhase::Done as i32,
            ..Default::default()
        });
        let mut o = Outbox::default();
        o.push(Report::Status(InstanceReport {
            instance_id: "a".into(),
            status: InstanceStatus::Running as i32,
            migration: done.clone(),
            ..Default::default()
        }));
        o.push(status("b", InstanceStatus::Running));
        o.push(Report::Removed("a".into()));
        o.push(Report::Removed("b".into()));
        let req = o.take("n1");
        assert_eq!(req.reports.len(), 1, "{req:?}");
        assert_eq!(req.reports[0].migration, done);
        let mut removed = req.removed.clone();
        removed.sort();
        assert_eq!(removed, ["a", "b"]);
        // A batch that failed comes back whole, the migration's end included.
        o.restore(req);
        let again = o.take("n1");
        assert_eq!(again.reports.len(), 1);
        assert_eq!(again.reports[0].migration, done);
        assert_eq!(again.removed.len(), 2);
    }

    #[test]
    fn a_migration_report_survives_a_later_plain_status() {
        let migration = |error: &str| {
            Some(berth_proto::v1::MigrationProgress {
                migration_id: "mig-1".into(),
                error: error.into(),
                ..Default::default()
            })
        };
        let mut o = Outbox::default();
        o.push(Report::Status(InstanceReport {
            instance_id: "a".into(),
            status: InstanceStatus::Running as i32,
            migration: migration("target gone"),
            ..Default::default()
        }));
        o.push(status("a", InstanceStatus::Unhealthy));
        let failed = o.take("n1");
        assert_eq!(failed.reports[0].status, InstanceStatus::Unhealthy as i32);
        assert_eq!(failed.reports[0].migration, migration("target gone"));
        // Sent and lost: a newer plain status takes the migration part back on.
        o.push(status("a", InstanceStatus::Running));
        o.restore(failed);
        let req = o.take("n1");
        assert_eq!(req.reports[0].status, InstanceStatus::Running as i32);
        assert_eq!(req.reports[0].migration, migration("target gone"));
        // A newer migration report is not overwritten by an older one.
        o.push(Report::Status(InstanceReport {
            instance_id: "a".into(),
            migration: migration("old"),
            ..Default::default()
        }));
        let old = o.take("n1");
        o.push(Report::Status(InstanceReport {
            instance_id: "a".into(),
            migration: migration("new"),
            ..Default::default()
        }));
        o.restore(old);
        assert_eq!(o.take("n1").reports[0].migration, migration("new"));
    }

    #[test]
    fn api_addr_is_the_bound_one_or_the_advertise_ip() {
        let adv: IpAddr = "10.1.0.5".parse().expect("ip");
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(
            reachable_api_addr(addr("0.0.0.0:9750"), adv),
            "10.1.0.5:9750"
        );
        assert_eq!(
            reachable_api_addr(addr("[::]:41000"), adv),
            "10.1.0.5:41000"
        );
        assert_eq!(
            reachable_api_addr(addr("10.1.0.5:9750"), adv),
            "10.1.0.5:9750"
        );
        assert_eq!(
            reachable_api_addr(addr("[fd00::1]:9750"), adv),
            "[fd00::1]:9750"
        );
    }

    #[test]
    fn tombstones_survive_until_acknowledged_and_refuse_odd_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Tombstones::open(dir.path().join("removed")).expect("open");
        t.add("ins-0123456789ab");
        t.add("../escape");
        let reopened = Tombstones::open(dir.path().join("removed")).expect("reopen");
        assert_eq!(reopened.pending(), vec!["ins-0123456789ab".to_string()]);
        reopened.acknowledged("ins-0123456789ab");
        assert!(t.pending().is_empty());
        assert!(!dir.path().join("escape").exists());
    }
}
