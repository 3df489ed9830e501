//! One reconcile pass over a snapshot of etcd. Every write is a transaction guarded by the mod_revision
//! of what the decision was based on; a lost race is simply retried by the next pass.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use prost::Message;

use crate::events::{types, Event, Events, EventsConfig};
use crate::ipam;
use crate::netview;
use crate::scheduler::{self, Decision, NodeCapacity, Placed, Request};
use crate::service::lifecycle::{finalize_container_record, release_instance};
use crate::service::migrations::{
    finish as finish_migration, order_for, Outcome as MigrationOutcome,
};
use crate::service::revisions::{apply_revision, stable_revision};
use crate::service::view::{instance_status, STATUS_ROLLING_BACK, STATUS_UPDATING};
use crate::service::NetConfig;
use crate::service::{new_id, now_rfc3339};
use crate::store::records::{
    ContainerRecord, InstanceRecord, NetworkRecord, RevisionRecord, RolloutResultRecord,
};
use crate::store::{keys, to_json, Snapshot, Store, StoreError, StoredInstance, Versioned};
use berth_proto::v1;

/// Instances created or stopped per transaction (etcd 3.4 allows 128 operations per transaction).
const BATCH: usize = 40;

/// A migration whose nodes report nothing for this long has failed (a stuck CRIU, a lost link the
/// nodes did not notice); the source resumes the replica.
pub const MIGRATION_STALL: time::Duration = time::Duration::seconds(120);

/// Every node's capacity and what holds resources on it: each placed instance (at its revision's
/// size: during a rolling update older replicas still hold what their revision asked for), and an
/// instance arriving by migration on its target too, so nothing else takes its room meanwhile.
pub(crate) fn capacity(snap: &Snapshot) -> (Vec<NodeCapacity>, Vec<Placed>) {
    let nodes = snap
        .nodes
        .values()
        .map(|n| NodeCapacity {
            node_id: n.value.node_id.clone(),
            cpu_millis: n.value.cpu_millis,
            memory_bytes: n.value.memory_bytes,
            healthy: snap.alive.contains(&n.value.node_id),
            unschedulable: n.value.unschedulable,
        })
        .collect();
    let arriving: HashMap<&str, &str> = snap
        .migrations
        .values()
        // A switched post-copy job's instance is placed on its target already.
        .filter(|j| j.value.in_progress() && !j.value.switched)
        .map(|j| (j.value.instance_id.as_str(), j.value.target_node.as_str()))
        .collect();
    let mut placed = Vec::new();
    for i in snap.all_instances() {
        let r = &i.record.value;
        if r.node_id.is_empty() {
            continue;
        }
        let Some(c) = snap.containers.get(&r.container_id) else {
            continue;
        };
        let (cpu_millis, memory_bytes) = if r.revision.max(1) == c.value.revision.max(1) {
            (c.value.cpu_millis, c.value.memory_bytes)
        } else {
            let rev = snap.revision_of(&c.value, r.revision.max(1));
            (rev.cpu_millis, rev.memory_bytes)
        };
        let target = arriving.get(r.instance_id.as_str()).copied();
        for node in std::iter::once(r.node_id.as_str()).chain(target) {
            placed.push(Placed {
                node_id: node.to_owned(),
                container_id: c.value.container_id.clone(),
                cpu_millis,
                memory_bytes,
            });
        }
    }
    (nodes, placed)
}

/// The node a running job's instance is placed on: the source, or the target once a post-copy
/// job switched.
fn holder(j: &crate::store::records::MigrationRecord) -> &String {
    if j.switched {
        &j.target_node
    } else {
        &j.source_node
    }
}

/// The job moving `r`, while it runs.
fn running_job<'a>(
    snap: &'a Snapshot,
    r: &InstanceRecord,
) -> Option<&'a crate::store::records::MigrationRecord> {
    if r.migration_id.is_empty() {
        return None;
    }
    snap.migrations
        .get(&r.migration_id)
        .map(|j| &j.value)
        .filter(|j| j.in_progress() && j.source_node == r.node_id)
}

/// How one placement attempt ended.
enum Outcome {
    /// Committed with this address, at this etcd revision.
    Placed(Ipv4Addr, i64),
    /// Something changed since the snapshot; the next pass retries.
    Lost,
    /// The network is full (or gone): the instance stays pending with this reason.
    NoAddress(String),
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// Instance records created for new replicas.
    pub created: usize,
    /// Instances stopped (placed) or deleted (unplaced) by scale-down or delete.
    pub stopped: usize,
    /// Instances released after their node's liveness lapsed beyond the grace.
    pub released: usize,
    /// Containers whose deletion completed.
    pub finalized: usize,
    /// Instances placed.
    pub placed: usize,
    /// Instances left pending.
    pub unschedulable: usize,
    /// Node network views written or removed.
    pub views: usize,
    /// Instances moved off DOWN nodes (stopped there; replacements are created and placed).
    pub evacuated: usize,
    /// Instances of an older revision stopped by a rolling update (their replacements follow).
    pub replaced: usize,
    /// Rollouts that started a rollback, or finished.
    pub rollouts: usize,
    /// Assignments rewritten because their instance's desired state changed (stop, start, restart).
    pub resynced: usize,
    /// Migration jobs moved on (target assigned, or failed).
    pub migrations: usize,
}

impl PassReport {
    /// Whether the pass wrote anything.
    pub fn changed(&self) -> bool {
        self.created
            + self.stopped
            + self.released
            + self.finalized
            + self.placed
            + self.evacuated
            + self.replaced
            + self.rollouts
            > 0
    }
}

/// The leader's reconcile state: only soft state (when nodes were last seen unhealthy).
#[derive(Debug)]
pub struct Reconciler {
    store: Store,
    grace: Duration,
    down_after: Duration,
    unhealthy_since: HashMap<String, Instant>,
    net: NetConfig,
    events: Events,
}

impl Reconciler {
    /// A reconciler releasing instances of dead nodes `grace` after their liveness lapsed.
    pub fn new(store: Store, grace: Duration) -> Self {
        let events = Events::new(store.clone(), EventsConfig::default());
        Reconciler {
            store,
            grace,
            down_after: crate::service::NODE_DOWN_AFTER,
            unhealthy_since: HashMap::new(),
            net: NetConfig::default(),
            events,
        }
    }

    /// Records what the passes do through `events` (the hub's writer, `--event-ttl`).
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// Declares a node DOWN (and moves its instances) this long after its liveness lapsed.
    pub fn with_down_after(mut self, down_after: Duration) -> Self {
        self.down_after = down_after;
        self
    }

    /// When the next pass is due for a deadline of its own (a node becoming DOWN, a release grace
    /// ending), even if nothing changes in etcd meanwhile.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.unhealthy_since
            .values()
            .flat_map(|since| [*since + self.down_after, *since + self.grace])
            .filter(|t| *t > Instant::now())
            .min()
    }

    /// Uses the cluster's address ranges (the tunnel prefix goes into the nodes' views).
    pub fn with_net_config(mut self, net: NetConfig) -> Self {
        self.net = net;
        self
    }

    /// One pass: instance lifecycle, then scheduling.
    pub async fn pass(&mut self) -> Result<PassReport, StoreError> {
        let mut report = PassReport::default();
        let snap = self.store.snapshot().await?;
        self.track_health(&snap);
        self.evacuate(&snap, &mut report).await?;
        self.rollouts(&snap, &mut report).await?;
        let snap = if report.evacuated + report.replaced + report.rollouts > 0 {
            self.store.snapshot().await?
        } else {
            snap
        };
        self.lifecycle(&snap, &mut report).await?;
        let snap = if report.changed() {
            self.store.snapshot().await?
        } else {
            snap
        };
        let placed_before = report.placed;
        self.place(&snap, &mut report).await?;
        let snap = if report.placed > placed_before {
            self.store.snapshot().await?
        } else {
            snap
        };
        self.migrations(&snap, &mut report).await?;
        self.sync_assignments(&snap, &mut report).await?;
        self.learn_digests(&snap).await?;
        self.publish_views(&snap, &mut report).await?;
        Ok(report)
    }

    /// Drives rolling updates: replaces instances of older revisions while at most `max_unavailable`
    /// replicas are out of service, rolls back by itself when a replica of the new revision fails
    /// (FAILED, UNHEALTHY), and closes the rollout once every replica runs the current revision.
    async fn rollouts(&self, snap: &Snapshot, report: &mut PassReport) -> Result<(), StoreError> {
        for container in snap.containers.values() {
            let c = &container.value;
            let Some(rollout) = &c.rollout else { continue };
            if c.deleting {
                continue;
            }
            let target = c.revision.max(1);
            let active: Vec<&StoredInstance> = snap
                .instances_of(&c.container_id)
                .into_iter()
                .filter(|i| !i.record.value.stopping)
                .collect();
            let placed = |i: &&&StoredInstance| !i.record.value.node_id.is_empty();
            let status = |i: &StoredInstance| instance_status(i).0;
            if rollout.state == STATUS_UPDATING {
                let failed = active
                    .iter()
                    .filter(placed)
                    .filter(|i| i.record.value.revision == target)
                    .find(|i| matches!(status(i).as_str(), "FAILED" | "UNHEALTHY"));
                if let Some(bad) = failed {
                    let (s, why) = instance_status(bad);
                    let reason = format!(
                        "instance {} of revision {target} is {s}{}",
                        bad.record.value.instance_id,
                        if why.is_empty() {
                            String::new()
                        } else {
                            format!(": {why}")
                        }
                    );
                    if self.start_rollback(snap, container, &reason).await? {
                        report.rollouts += 1;
                    }
                    continue;
                }
            }
            let outdated: Vec<&StoredInstance> = active
                .iter()
                .filter(placed)
                .copied()
                .filter(|i| i.record.value.revision != target)
                .collect();
            let running = active.iter().filter(|i| status(i) == "RUNNING").count();
            if outdated.is_empty() {
                let current_running = active
                    .iter()
                    .filter(placed)
                    .filter(|i| i.record.value.revision == target && status(i) == "RUNNING")
                    .count();
                if active.len() == c.replicas as usize
                    && current_running == c.replicas as usize
                    && self.finish_rollout(container).await?
                {
                    report.rollouts += 1;
                }
                continue;
            }
            // Replicas that do not serve anyway go first and cost nothing; serving ones go while the
            // budget of unavailable replicas allows.
            let unavailable = (c.replicas as usize).saturating_sub(running);
            let budget = (rollout.max_unavailable.max(1) as usize).saturating_sub(unavailable);
            let (serving, idle): (Vec<&StoredInstance>, Vec<&StoredInstance>) =
                outdated.into_iter().partition(|i| status(i) == "RUNNING");
            let mut victims = idle;
            let mut serving = serving;
            serving.sort_by_key(|i| std::cmp::Reverse(i.record.value.ordinal));
            victims.extend(serving.into_iter().take(budget));
            if !victims.is_empty() {
                let replaced = self.stop(container, &victims).await?;
                if replaced > 0 {
                    tracing::info!(container_id = %c.container_id, revision = target, replaced,
                        unavailable, "rolling update: replacing instances");
                }
                report.replaced += replaced;
            }
        }
        Ok(())
    }

    /// Points the container back at the revision that ran before the update.
    async fn start_rollback(
        &self,
        snap: &Snapshot,
        container: &Versioned<ContainerRecord>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let c = &container.value;
        let Some(rollout) = &c.rollout else {
            return Ok(false);
        };
        let back_to = stable_revision(c);
        let rev = snap.revision_of(c, back_to);
        let mut record = c.clone();
        apply_revision(&mut record, &rev);
        record.rollout = Some(crate::store::records::RolloutRecord {
            state: STATUS_ROLLING_BACK.to_owned(),
            revision: back_to,
            from_revision: rollout.revision,
            max_unavailable: rollout.max_unavailable,
            reason: reason.to_owned(),
            started_at: now_rfc3339(),
        });
        let done = self.put_container(container, &record).await?;
        if done {
            tracing::warn!(container_id = %c.container_id, from_revision = rollout.revision,
                revision = back_to, reason, "rolling update failed: rolling back");
            self.events.emit(
                Event::container(&c.container_id, types::ROLLBACK)
                    .with_status(STATUS_ROLLING_BACK)
                    .with_reason(format!("to revision {back_to}: {reason}")),
            );
        }
        Ok(done)
    }

    /// Every replica runs the current revision: the rollout is over.
    async fn finish_rollout(
        &self,
        container: &Versioned<ContainerRecord>,
    ) -> Result<bool, StoreError> {
        let c = &container.value;
        let Some(rollout) = &c.rollout else {
            return Ok(false);
        };
        let result = if rollout.state == STATUS_UPDATING {
            "COMPLETE"
        } else {
            "ROLLED_BACK"
        };
        let mut record = c.clone();
        record.rollout = None;
        record.last_rollout = Some(RolloutResultRecord {
            revision: c.revision.max(1),
            result: result.to_owned(),
            reason: rollout.reason.clone(),
            finished_at: now_rfc3339(),
        });
        let done = self.put_container(container, &record).await?;
        if done {
            tracing::info!(container_id = %c.container_id, revision = c.revision, result, "rollout finished");
            self.events.emit(
                Event::container(&c.container_id, types::ROLLOUT_DONE)
                    .with_status(result)
                    .with_reason(format!("revision {}", c.revision.max(1))),
            );
        }
        Ok(done)
    }

    /// Writes a container record if it did not change since it was read.
    async fn put_container(
        &self,
        found: &Versioned<ContainerRecord>,
        record: &ContainerRecord,
    ) -> Result<bool, StoreError> {
        let key = keys::container(&record.container_id);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                found.mod_revision,
            )])
            .and_then([TxnOp::put(key, to_json(record), None)]);
        Ok(self.store.txn(txn).await?.succeeded())
    }

    /// Rewrites the assignments whose instance's desired state changed since they were written (stop,
    /// start, restart, a digest learnt for its revision). Comparing decoded messages, not bytes: the
    /// env map encodes in no fixed order.
    async fn sync_assignments(
        &self,
        snap: &Snapshot,
        report: &mut PassReport,
    ) -> Result<(), StoreError> {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        for inst in snap.all_instances() {
            let r = &inst.record.value;
            if r.stopping || r.node_id.is_empty() {
                continue;
            }
            let key = (r.node_id.clone(), r.instance_id.clone());
            let Some(stored) = snap.assignments.get(&key) else {
                continue;
            };
            let Some(mut want) = assignment_in(snap, r) else {
                continue;
            };
            want.migration =
                running_job(snap, r).and_then(|j| order_for(snap, j, v1::MigrationRole::Source));
            if v1::Assignment::decode(stored.as_slice()).ok().as_ref() == Some(&want) {
                continue;
            }
            let akey = keys::assign(&r.node_id, &r.instance_id);
            compares.push(Compare::mod_revision(
                keys::instance(&r.container_id, &r.instance_id),
                CompareOp::Equal,
                inst.record.mod_revision,
            ));
            // Never recreate an assignment a concurrent stop just deleted.
            compares.push(Compare::version(akey.clone(), CompareOp::Greater, 0));
            ops.push(TxnOp::put(akey, want.encode_to_vec(), None));
            if ops.len() >= BATCH {
                report.resynced += self.commit_resync(&mut compares, &mut ops).await?;
            }
        }
        report.resynced += self.commit_resync(&mut compares, &mut ops).await?;
        Ok(())
    }

    /// Drives migration jobs: gives the target node its assignment of the moving instance (with a
    /// TARGET order; the source's gets its SOURCE order in `sync_assignments`), and fails jobs whose
    /// instance went away, whose nodes are not healthy, or that reported nothing for
    /// [`MIGRATION_STALL`]. The switch itself happens when the target reports done
    /// (`service::migrations`); a post-copy job that switched runs on until its source served
    /// every page, and fails (the instance staying the target's) if a node goes or it stalls.
    async fn migrations(&self, snap: &Snapshot, report: &mut PassReport) -> Result<(), StoreError> {
        let now = time::OffsetDateTime::now_utc();
        for job in snap.migrations.values().filter(|j| j.value.in_progress()) {
            let j = &job.value;
            let inst = snap
                .instances
                .get(&j.container_id)
                .and_then(|m| m.get(&j.instance_id));
            let stalled = time::OffsetDateTime::parse(
                &j.updated_at,
                &time::format_description::well_known::Rfc3339,
            )
            .is_ok_and(|t| now - t > MIGRATION_STALL);
            let failure = match inst.map(|i| &i.record.value) {
                None => Some("the instance was deleted".to_owned()),
                Some(r) if r.stopping => Some("the instance is being removed".to_owned()),
                Some(r) if r.migration_id != j.migration_id || r.node_id != *holder(j) => {
                    Some(format!("the instance moved to {} meanwhile", r.node_id))
                }
                Some(_) => [&j.source_node, &j.target_node]
                    .into_iter()
                    .find(|n| !snap.alive.contains(*n) || snap.down.contains(*n))
                    .map(|n| format!("node {n} is not healthy"))
                    .or_else(|| {
                        stalled.then(|| {
                            format!(
                                "no progress reported for {} s",
                                MIGRATION_STALL.whole_seconds()
                            )
                        })
                    }),
            };
            if let Some(reason) = failure {
                if finish_migration(
                    &self.store,
                    &self.events,
                    job,
                    MigrationOutcome::Failed(reason),
                )
                .await?
                {
                    report.migrations += 1;
                }
                continue;
            }
            let Some(inst) = inst else { continue };
            let r = &inst.record.value;
            if snap
                .assignments
                .contains_key(&(j.target_node.clone(), r.instance_id.clone()))
            {
                continue;
            }
            let Some(mut want) = assignment_in(snap, r) else {
                continue;
            };
            want.migration = order_for(snap, j, v1::MigrationRole::Target);
            let akey = keys::assign(&j.target_node, &r.instance_id);
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(
                        keys::migration(&j.migration_id),
                        CompareOp::Equal,
                        job.mod_revision,
                    ),
                    Compare::version(akey.clone(), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::put(akey, want.encode_to_vec(), None)]);
            if self.store.txn(txn).await?.succeeded() {
                tracing::info!(migration_id = %j.migration_id, target = %j.target_node,
                    instance_id = %r.instance_id, "migration target assigned");
                report.migrations += 1;
            }
        }
        Ok(())
    }

    async fn commit_resync(
        &self,
        compares: &mut Vec<Compare>,
        ops: &mut Vec<TxnOp>,
    ) -> Result<usize, StoreError> {
        if ops.is_empty() {
            return Ok(0);
        }
        let n = ops.len();
        let txn = Txn::new()
            .when(std::mem::take(compares))
            .and_then(std::mem::take(ops));
        // A lost race is retried by the next pass, which sees the change that won.
        let done = if self.store.txn(txn).await?.succeeded() {
            n
        } else {
            0
        };
        if done > 0 {
            tracing::debug!(assignments = done, "assignments rewritten");
        }
        Ok(done)
    }

    /// Records the manifest digest a revision's replicas pulled, so that a rollback to it gets the
    /// very image that ran, even if its tag has moved since.
    async fn learn_digests(&self, snap: &Snapshot) -> Result<(), StoreError> {
        for (cid, revisions) in &snap.revisions {
            for rev in revisions.values().filter(|r| r.image_digest.is_empty()) {
                let digest = snap
                    .instances_of(cid)
                    .into_iter()
                    .filter(|i| i.record.value.revision == rev.revision)
                    .filter_map(|i| i.status.as_ref())
                    .find(|s| s.status == "RUNNING" && !s.image_digest.is_empty())
                    .map(|s| s.image_digest.clone());
                let Some(digest) = digest else { continue };
                let learnt = RevisionRecord {
                    image_digest: digest.clone(),
                    ..rev.clone()
                };
                let key = keys::revision(cid, rev.revision);
                let txn = Txn::new()
                    .when([Compare::version(key.clone(), CompareOp::Greater, 0)])
                    .and_then([TxnOp::put(key, to_json(&learnt), None)]);
                self.store.txn(txn).await?;
                tracing::info!(container_id = %cid, revision = rev.revision, %digest, "revision pinned to its digest");
            }
        }
        Ok(())
    }

    /// Writes each node's network view where it changed, and removes the views of nodes gone.
    async fn publish_views(
        &self,
        snap: &Snapshot,
        report: &mut PassReport,
    ) -> Result<(), StoreError> {
        let views = netview::compute(snap, self.net.tunnel_cidr.prefix_len());
        let mut ops = Vec::new();
        for (node_id, view) in &views {
            let bytes = view.encode_to_vec();
            if snap.netviews.get(node_id) != Some(&bytes) {
                ops.push(TxnOp::put(keys::netview(node_id), bytes, None));
            }
        }
        for node_id in snap.netviews.keys() {
            if !views.contains_key(node_id) {
                ops.push(TxnOp::delete(keys::netview(node_id), None));
            }
        }
        for chunk in ops.chunks(BATCH) {
            self.store.txn(Txn::new().and_then(chunk.to_vec())).await?;
            report.views += chunk.len();
        }
        if !ops.is_empty() {
            tracing::debug!(views = ops.len(), "network views published");
        }
        Ok(())
    }

    fn track_health(&mut self, snap: &Snapshot) {
        let now = Instant::now();
        let mut referenced: HashSet<&str> = snap.nodes.keys().map(String::as_str).collect();
        referenced.extend(
            snap.all_instances()
                .map(|i| i.record.value.node_id.as_str())
                .filter(|n| !n.is_empty()),
        );
        let events = &self.events;
        self.unhealthy_since.retain(|n, _| {
            let back = snap.alive.contains(n);
            if back {
                events.emit(Event::node(n, types::HEALTHY).with_status("HEALTHY"));
            }
            referenced.contains(n.as_str()) && !back
        });
        for node in referenced {
            if !snap.alive.contains(node) && !self.unhealthy_since.contains_key(node) {
                tracing::warn!(node_id = node, "node liveness lapsed");
                self.unhealthy_since.insert(node.to_owned(), now);
                self.events.emit(
                    Event::node(node, types::UNHEALTHY)
                        .with_status("UNHEALTHY")
                        .with_reason("heartbeats stopped"),
                );
            }
        }
    }

    fn is_down(&self, node_id: &str) -> bool {
        self.unhealthy_since
            .get(node_id)
            .is_some_and(|since| since.elapsed() >= self.down_after)
    }

    /// Moves the instances of DOWN nodes: each is stopped there (its assignment replaced by a stopping
    /// marker, its address kept until the node reports it removed or the release grace ends) and the
    /// replica count brings a replacement, placed on a healthy node. A node that comes back is told to
    /// stop them, so no replica runs twice and no address is used twice.
    async fn evacuate(&self, snap: &Snapshot, report: &mut PassReport) -> Result<(), StoreError> {
        for node in self.unhealthy_since.keys() {
            if self.is_down(node) && !snap.down.contains(node) {
                tracing::warn!(node_id = %node, "node is DOWN: moving its instances");
                self.store
                    .txn(Txn::new().and_then([TxnOp::put(keys::down(node), "", None)]))
                    .await?;
                self.events.emit(
                    Event::node(node, types::DOWN)
                        .with_status("DOWN")
                        .with_reason(format!("no heartbeat for {:?}", self.down_after)),
                );
            }
        }
        for container in snap.containers.values() {
            let victims: Vec<&StoredInstance> = snap
                .instances_of(&container.value.container_id)
                .into_iter()
                .filter(|i| {
                    let r = &i.record.value;
                    !r.stopping && !r.node_id.is_empty() && self.is_down(&r.node_id)
                })
                .collect();
            if !victims.is_empty() {
                let moved = self.stop(container, &victims).await?;
                if moved > 0 {
                    tracing::warn!(container_id = %container.value.container_id, moved,
                        "instances of a DOWN node moved");
                }
                report.evacuated += moved;
            }
        }
        Ok(())
    }

    fn dead_beyond_grace(&self, node_id: &str) -> bool {
        self.unhealthy_since
            .get(node_id)
            .is_some_and(|since| since.elapsed() >= self.grace)
    }

    async fn lifecycle(&self, snap: &Snapshot, report: &mut PassReport) -> Result<(), StoreError> {
        for container in snap.containers.values() {
            let c = &container.value;
            let instances = snap.instances_of(&c.container_id);
            let mut active: Vec<&StoredInstance> = instances
                .iter()
                .copied()
                .filter(|i| !i.record.value.stopping)
                .collect();
            active.sort_by_key(|i| i.record.value.ordinal);
            let desired = if c.deleting { 0 } else { c.replicas as usize };
            if active.len() > desired {
                report.stopped += self.stop(container, &active[desired..]).await?;
            } else if active.len() < desired {
                report.created += self.create(container, desired - active.len()).await?;
            } else if c.deleting
                && instances.is_empty()
                && finalize_container_record(&self.store, container).await?
            {
                report.finalized += 1;
                self.events
                    .emit(Event::container(&c.container_id, types::DELETED));
            }
        }
        for inst in snap.all_instances().filter(|i| i.record.value.stopping) {
            let node = &inst.record.value.node_id;
            if node.is_empty() || self.dead_beyond_grace(node) {
                if !node.is_empty() {
                    tracing::warn!(instance_id = %inst.record.value.instance_id, node_id = %node,
                        "releasing an instance of a node that stopped heartbeating");
                }
                if release_instance(&self.store, &inst.record).await? {
                    report.released += 1;
                    let r = &inst.record.value;
                    self.events.emit(
                        Event::instance(&r.container_id, &r.instance_id, types::REMOVED)
                            .with_node(r.node_id.clone())
                            .with_reason("released without the node's confirmation"),
                    );
                }
            }
        }
        Ok(())
    }

    /// Stops the given instances: unplaced ones are deleted, placed ones lose their assignment and wait
    /// for their node to report them removed.
    async fn stop(
        &self,
        container: &Versioned<ContainerRecord>,
        victims: &[&StoredInstance],
    ) -> Result<usize, StoreError> {
        let c = &container.value;
        let mut done = 0;
        for chunk in victims.chunks(BATCH) {
            let mut compares = vec![Compare::mod_revision(
                keys::container(&c.container_id),
                CompareOp::Equal,
                container.mod_revision,
            )];
            let mut ops = Vec::new();
            for inst in chunk {
                let r = &inst.record.value;
                let key = keys::instance(&r.container_id, &r.instance_id);
                compares.push(Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    inst.record.mod_revision,
                ));
                if r.node_id.is_empty() {
                    ops.push(TxnOp::delete(key, None));
                    ops.push(TxnOp::delete(keys::owner(&r.instance_id), None));
                    ops.push(TxnOp::delete(
                        keys::status(&r.container_id, &r.instance_id),
                        None,
                    ));
                } else {
                    let stopping = InstanceRecord {
                        stopping: true,
                        ..r.clone()
                    };
                    ops.push(TxnOp::put(key, to_json(&stopping), None));
                    ops.push(TxnOp::delete(
                        keys::assign(&r.node_id, &r.instance_id),
                        None,
                    ));
                    // Streamed to the node until it reports the removal, so a node that never saw
                    // the assignment still answers for it.
                    ops.push(TxnOp::put(
                        keys::stopping(&r.node_id, &r.instance_id),
                        "",
                        None,
                    ));
                }
            }
            if !self
                .store
                .txn(Txn::new().when(compares).and_then(ops))
                .await?
                .succeeded()
            {
                break;
            }
            tracing::info!(container_id = %c.container_id, count = chunk.len(), "instances stopping");
            for inst in chunk {
                let r = &inst.record.value;
                self.events.emit(
                    Event::instance(&r.container_id, &r.instance_id, types::STOPPING)
                        .with_node(r.node_id.clone()),
                );
            }
            done += chunk.len();
            // The container record did not change, so its mod_revision still guards the next chunk.
        }
        Ok(done)
    }

    /// Creates `count` new unplaced instances, bumping the container's next ordinal in the same txn.
    async fn create(
        &self,
        container: &Versioned<ContainerRecord>,
        count: usize,
    ) -> Result<usize, StoreError> {
        let mut record = container.value.clone();
        let mut mod_revision = container.mod_revision;
        let mut done = 0;
        while done < count {
            let n = (count - done).min(BATCH);
            let key = keys::container(&record.container_id);
            let mut ops = Vec::with_capacity(2 * n + 1);
            let mut created = Vec::with_capacity(n);
            let now = now_rfc3339();
            for _ in 0..n {
                let inst = InstanceRecord {
                    instance_id: new_id("ins"),
                    container_id: record.container_id.clone(),
                    network_id: record.network_id.clone(),
                    ordinal: record.next_ordinal,
                    node_id: String::new(),
                    ip: String::new(),
                    reason: String::new(),
                    stopping: false,
                    created_at: now.clone(),
                    placed_at: String::new(),
                    revision: record.revision.max(1),
                    stopped: record.stopped,
                    restart_generation: 0,
                    migration_id: String::new(),
                };
                record.next_ordinal += 1;
                created.push(inst.instance_id.clone());
                ops.push(TxnOp::put(
                    keys::instance(&inst.container_id, &inst.instance_id),
                    to_json(&inst),
                    None,
                ));
                ops.push(TxnOp::put(
                    keys::owner(&inst.instance_id),
                    inst.container_id.clone(),
                    None,
                ));
            }
            ops.push(TxnOp::put(key.clone(), to_json(&record), None));
            let txn = Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
                .and_then(ops);
            let resp = self.store.txn(txn).await?;
            if !resp.succeeded() {
                break;
            }
            mod_revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            done += n;
            for iid in created {
                self.events.emit(
                    Event::instance(&record.container_id, iid, types::CREATED)
                        .with_status("PENDING")
                        .with_reason(format!("revision {}", record.revision.max(1))),
                );
            }
        }
        if done > 0 {
            tracing::info!(container_id = %record.container_id, count = done, "instances created");
        }
        Ok(done)
    }

    async fn place(&self, snap: &Snapshot, report: &mut PassReport) -> Result<(), StoreError> {
        let (nodes, placed) = capacity(snap);
        let container_of = |i: &StoredInstance| snap.containers.get(&i.record.value.container_id);
        let mut pending: Vec<(&Versioned<ContainerRecord>, &StoredInstance)> = snap
            .all_instances()
            .filter(|i| i.record.value.node_id.is_empty() && !i.record.value.stopping)
            .filter_map(|i| {
                container_of(i)
                    .filter(|c| !c.value.deleting)
                    .map(|c| (c, i))
            })
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        // Oldest containers first, replicas in ordinal order.
        pending.sort_by(|(ca, ia), (cb, ib)| {
            (
                &ca.value.created_at,
                &ca.value.container_id,
                ia.record.value.ordinal,
            )
                .cmp(&(
                    &cb.value.created_at,
                    &cb.value.container_id,
                    ib.record.value.ordinal,
                ))
        });
        let requests: Vec<Request> = pending
            .iter()
            .map(|(c, i)| Request {
                instance_id: i.record.value.instance_id.clone(),
                container_id: c.value.container_id.clone(),
                cpu_millis: c.value.cpu_millis,
                memory_bytes: c.value.memory_bytes,
            })
            .collect();
        let by_id: HashMap<&str, (&Versioned<ContainerRecord>, &StoredInstance)> = pending
            .iter()
            .map(|(c, i)| (i.record.value.instance_id.as_str(), (*c, *i)))
            .collect();
        let mut used: HashMap<String, HashSet<Ipv4Addr>> = snap
            .ipam
            .iter()
            .map(|(nid, claims)| {
                (
                    nid.clone(),
                    claims.keys().filter_map(|ip| ip.parse().ok()).collect(),
                )
            })
            .collect();
        // The revision up to which this pass knows each node's assignments: placements compare against
        // it, so a placement decided on a stale view of a node's usage (another pass placed there since)
        // loses instead of over-committing the node.
        let mut seen_rev: HashMap<String, i64> = HashMap::new();
        for decision in scheduler::schedule(&nodes, &placed, &requests) {
            match decision {
                Decision::Place {
                    instance_id,
                    node_id,
                } => {
                    let Some((c, i)) = by_id.get(instance_id.as_str()) else {
                        continue;
                    };
                    let used = used.entry(c.value.network_id.clone()).or_default();
                    let node_rev = seen_rev.get(&node_id).copied().unwrap_or(snap.revision);
                    match self.place_one(snap, c, i, &node_id, used, node_rev).await? {
                        Outcome::Placed(ip, revision) => {
                            seen_rev.insert(node_id.clone(), revision);
                            used.insert(ip);
                            report.placed += 1;
                        }
                        Outcome::Lost => {}
                        Outcome::NoAddress(reason) => {
                            report.unschedulable += 1;
                            self.set_reason(i, &reason).await?;
                        }
                    }
                }
                Decision::Unschedulable {
                    instance_id,
                    reason,
                } => {
                    let Some((_, i)) = by_id.get(instance_id.as_str()) else {
                        continue;
                    };
                    report.unschedulable += 1;
                    self.set_reason(i, &reason).await?;
                }
            }
        }
        Ok(())
    }

    /// Commits one placement: address claim, instance record, node assignment, in one transaction.
    async fn place_one(
        &self,
        snap: &Snapshot,
        container: &Versioned<ContainerRecord>,
        inst: &StoredInstance,
        node_id: &str,
        used: &HashSet<Ipv4Addr>,
        node_rev: i64,
    ) -> Result<Outcome, StoreError> {
        let c = &container.value;
        let Some(network) = snap.networks.get(&c.network_id) else {
            return Ok(Outcome::NoAddress(format!(
                "network {} does not exist",
                c.network_id
            )));
        };
        let net = match ipam::parse_network_cidr(&network.value.cidr) {
            Ok(net) => net,
            Err(e) => {
                return Ok(Outcome::NoAddress(format!(
                    "network {} has a bad cidr: {e}",
                    c.network_id
                )))
            }
        };
        let Some(ip) = ipam::allocate(&net, used, 0) else {
            return Ok(Outcome::NoAddress(format!(
                "network {} ({}) has no free address",
                network.value.name, network.value.cidr
            )));
        };
        let r = &inst.record.value;
        // Whatever revision it was created for, it starts with the container's current spec.
        let placed = InstanceRecord {
            node_id: node_id.to_owned(),
            ip: ip.to_string(),
            reason: String::new(),
            placed_at: now_rfc3339(),
            revision: c.revision.max(1),
            ..r.clone()
        };
        let rev = snap.revision_of(c, placed.revision);
        let assignment = assignment(c, &rev, &network.value, &placed);
        let instance_key = keys::instance(&r.container_id, &r.instance_id);
        let claim_key = keys::ipam(&c.network_id, &placed.ip);
        let txn = Txn::new()
            .when([
                Compare::mod_revision(
                    instance_key.clone(),
                    CompareOp::Equal,
                    inst.record.mod_revision,
                ),
                Compare::mod_revision(
                    keys::container(&c.container_id),
                    CompareOp::Equal,
                    container.mod_revision,
                ),
                Compare::create_revision(claim_key.clone(), CompareOp::Equal, 0),
                Compare::version(keys::alive(node_id), CompareOp::Greater, 0),
                Compare::mod_revision(keys::assign_prefix(node_id), CompareOp::Less, node_rev + 1)
                    .with_prefix(),
            ])
            .and_then([
                TxnOp::put(instance_key, to_json(&placed), None),
                TxnOp::put(claim_key, r.instance_id.clone(), None),
                TxnOp::put(
                    keys::assign(node_id, &r.instance_id),
                    assignment.encode_to_vec(),
                    None,
                ),
            ]);
        let resp = self.store.txn(txn).await?;
        if resp.succeeded() {
            tracing::info!(instance_id = %r.instance_id, container_id = %c.container_id, node_id, %ip, "instance placed");
            self.events.emit(
                Event::instance(&c.container_id, &r.instance_id, types::PLACED)
                    .with_node(node_id)
                    .with_reason(format!("ip {ip}")),
            );
            let revision = resp.header().map_or(node_rev, |h| h.revision());
            Ok(Outcome::Placed(ip, revision))
        } else {
            tracing::debug!(instance_id = %r.instance_id, "placement lost a race; next pass retries");
            Ok(Outcome::Lost)
        }
    }

    /// Stores why an instance is still pending (when it changed).
    async fn set_reason(&self, inst: &StoredInstance, reason: &str) -> Result<(), StoreError> {
        let r = &inst.record.value;
        if r.reason == reason {
            return Ok(());
        }
        tracing::info!(instance_id = %r.instance_id, container_id = %r.container_id, reason, "instance unschedulable");
        self.events.emit(
            Event::instance(&r.container_id, &r.instance_id, types::PENDING)
                .with_status("PENDING")
                .with_reason(reason),
        );
        let key = keys::instance(&r.container_id, &r.instance_id);
        let record = InstanceRecord {
            reason: reason.to_owned(),
            ..r.clone()
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                inst.record.mod_revision,
            )])
            .and_then([TxnOp::put(key, to_json(&record), None)]);
        self.store.txn(txn).await?;
        Ok(())
    }
}

/// [`assignment`] of `r` with its container, revision and network as `snap` has them; `None` when
/// the container or its network is gone.
fn assignment_in(snap: &Snapshot, r: &InstanceRecord) -> Option<v1::Assignment> {
    let c = snap.containers.get(&r.container_id)?;
    let network = snap.networks.get(&c.value.network_id)?;
    let rev = snap.revision_of(&c.value, r.revision.max(1));
    Some(assignment(&c.value, &rev, &network.value, r))
}

/// What the node of `inst` must run: the spec of its revision (image pinned to the revision's digest
/// once known), the container's probe and stop settings, and the instance's own desired state.
pub fn assignment(
    c: &ContainerRecord,
    rev: &RevisionRecord,
    network: &NetworkRecord,
    inst: &InstanceRecord,
) -> v1::Assignment {
    v1::Assignment {
        instance_id: inst.instance_id.clone(),
        container_id: c.container_id.clone(),
        container_name: c.name.clone(),
        image: rev.pinned_image(),
        cpu_millis: rev.cpu_millis,
        memory_bytes: rev.memory_bytes,
        command: rev.command.clone(),
        env: rev.env.clone().into_iter().collect(),
        network: Some(v1::NetworkAttachment {
            network_id: network.network_id.clone(),
            name: network.name.clone(),
            cidr: network.cidr.clone(),
            gateway: network.gateway.clone(),
            vni: network.vni,
            encrypted: network.encrypted,
        }),
        ip: inst.ip.clone(),
        restart_policy: c.restart_policy.clone(),
        max_restarts: c.max_restarts,
        health: c.health.as_ref().map(crate::service::view::health_to_proto),
        stop_signal: c.stop_signal.clone(),
        stop_timeout_ms: crate::service::view::stop_timeout(c).as_millis() as u64,
        stopped: inst.stopped,
        restart_generation: inst.restart_generation,
        revision: rev.revision,
        migration: None,
    }
}
