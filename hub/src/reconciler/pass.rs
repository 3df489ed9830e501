//! One reconcile pass over a snapshot of etcd. Every write is a transaction guarded by the mod_revision
//! of what the decision was based on; a lost race is simply retried by the next pass.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use prost::Message;

use crate::ipam;
use crate::netview;
use crate::scheduler::{self, Decision, NodeCapacity, Placed, Request};
use crate::service::lifecycle::{finalize_container_record, release_instance};
use crate::service::NetConfig;
use crate::service::{new_id, now_rfc3339};
use crate::store::records::{ContainerRecord, InstanceRecord};
use crate::store::{keys, to_json, Snapshot, Store, StoreError, StoredInstance, Versioned};
use berth_proto::v1;

/// Instances created or stopped per transaction (etcd 3.4 allows 128 operations per transaction).
const BATCH: usize = 40;

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
}

impl PassReport {
    /// Whether the pass wrote anything.
    pub fn changed(&self) -> bool {
        self.created + self.stopped + self.released + self.finalized + self.placed + self.evacuated
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
}

impl Reconciler {
    /// A reconciler releasing instances of dead nodes `grace` after their liveness lapsed.
    pub fn new(store: Store, grace: Duration) -> Self {
        Reconciler {
            store,
            grace,
            down_after: crate::service::NODE_DOWN_AFTER,
            unhealthy_since: HashMap::new(),
            net: NetConfig::default(),
        }
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
        let snap = if report.evacuated > 0 {
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
        self.publish_views(&snap, &mut report).await?;
        Ok(report)
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
        self.unhealthy_since
            .retain(|n, _| referenced.contains(n.as_str()) && !snap.alive.contains(n));
        for node in referenced {
            if !snap.alive.contains(node) && !self.unhealthy_since.contains_key(node) {
                tracing::warn!(node_id = node, "node liveness lapsed");
                self.unhealthy_since.insert(node.to_owned(), now);
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
                };
                record.next_ordinal += 1;
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
        }
        if done > 0 {
            tracing::info!(container_id = %record.container_id, count = done, "instances created");
        }
        Ok(done)
    }

    async fn place(&self, snap: &Snapshot, report: &mut PassReport) -> Result<(), StoreError> {
        let nodes: Vec<NodeCapacity> = snap
            .nodes
            .values()
            .map(|n| NodeCapacity {
                node_id: n.value.node_id.clone(),
                cpu_millis: n.value.cpu_millis,
                memory_bytes: n.value.memory_bytes,
                healthy: snap.alive.contains(&n.value.node_id),
            })
            .collect();
        let container_of = |i: &StoredInstance| snap.containers.get(&i.record.value.container_id);
        let placed: Vec<Placed> = snap
            .all_instances()
            .filter(|i| !i.record.value.node_id.is_empty())
            .filter_map(|i| {
                let c = container_of(i)?;
                Some(Placed {
                    node_id: i.record.value.node_id.clone(),
                    container_id: c.value.container_id.clone(),
                    cpu_millis: c.value.cpu_millis,
                    memory_bytes: c.value.memory_bytes,
                })
            })
            .collect();
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
        let placed = InstanceRecord {
            node_id: node_id.to_owned(),
            ip: ip.to_string(),
            reason: String::new(),
            placed_at: now_rfc3339(),
            ..r.clone()
        };
        let assignment = v1::Assignment {
            instance_id: r.instance_id.clone(),
            container_id: c.container_id.clone(),
            container_name: c.name.clone(),
            image: c.image.clone(),
            cpu_millis: c.cpu_millis,
            memory_bytes: c.memory_bytes,
            command: c.command.clone(),
            env: c.env.clone().into_iter().collect(),
            network: Some(v1::NetworkAttachment {
                network_id: network.value.network_id.clone(),
                name: network.value.name.clone(),
                cidr: network.value.cidr.clone(),
                gateway: network.value.gateway.clone(),
                vni: network.value.vni,
                encrypted: network.value.encrypted,
            }),
            ip: ip.to_string(),
            restart_policy: c.restart_policy.clone(),
            max_restarts: c.max_restarts,
            ..Default::default()
        };
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
