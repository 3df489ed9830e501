//! Live migration jobs: `POST /v1/containers/{id}/migrate` checks and records a job; the leader
//! hands the two nodes their orders (`reconciler::pass::migrations`); the nodes' progress reports
//! move the job on, and the target's "done" switches the instance over in one transaction.
//!
//! Invariant: never two live copies, never none. The instance record names one node at a time;
//! it changes to the target only once the target reported the replica running there, and in the
//! same transaction the source loses its assignment. Any failure leaves the instance where it was
//! (the source resumes it) and takes the target's assignment away.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use prost::Message;

use super::{new_id, now_rfc3339, validate, Service, ServiceError, CONFLICT_RETRIES};
use crate::events::{types, Event, Events};
use crate::scheduler::{schedule, Decision, Request};
use crate::store::records::{InstanceRecord, MigrationRecord};
use crate::store::{keys, to_json, Snapshot, Store, StoreError, StoredInstance, Versioned};
use berth_proto::v1;

/// What `POST /v1/containers/{id}/migrate` asks.
#[derive(Debug, Clone, Default)]
pub struct MigrateSpec {
    /// Container id or name.
    pub container: String,
    /// The replica; may be empty when the container has one.
    pub instance_id: String,
    /// Empty: the scheduler picks a node that fits.
    pub target_node: String,
    /// "auto" (or empty), "precopy", "postcopy" or "stopcopy".
    pub mode: String,
}

/// Job status names (REST and records).
pub mod status {
    pub const IN_PROGRESS: &str = "IN_PROGRESS";
    pub const COMPLETED: &str = "COMPLETED";
    pub const FAILED: &str = "FAILED";
}

/// How a job ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The target runs the replica.
    Completed,
    /// Post-copy: the target runs the replica, which moves to it now, but its memory is still
    /// arriving from the source; the job runs on (phase SWITCH) until the source has served
    /// every page, and fails, without moving anything back, if it cannot.
    Switched,
    /// It stays (or goes back) where it was, for this reason.
    Failed(String),
}

impl Service {
    /// Validates a migration request and records the job (IN_PROGRESS, PREPARE). 404 for an
    /// unknown container, replica or node; 400 when the target cannot take it (itself, unhealthy,
    /// no migration endpoint, does not fit) or the request is malformed; 409 when the replica is
    /// not running or already migrating.
    pub async fn migrate(&self, spec: MigrateSpec) -> Result<MigrationRecord, ServiceError> {
        let mode = parse_mode(&spec.mode)?;
        if !spec.target_node.is_empty() {
            validate::reference("target_node", &spec.target_node)?;
        }
        let container = self.resolve_container(&spec.container).await?;
        let cid = container.value.container_id.clone();
        for _ in 0..CONFLICT_RETRIES {
            let snap = self.store.snapshot().await?;
            let inst = pick_instance(&snap, &cid, &spec.instance_id)?;
            let r = &inst.record.value;
            check_movable(&snap, inst)?;
            let source = r.node_id.clone();
            if !has_endpoint(&snap, &source) {
                return Err(ServiceError::invalid(
                    "instance_id",
                    format!(
                        "node {source}, where {} runs, cannot send live migrations (its agent \
                         advertises no migration endpoint)",
                        r.instance_id
                    ),
                ));
            }
            let target = choose_target(&snap, inst, &spec.target_node)?;
            let now = now_rfc3339();
            let job = MigrationRecord {
                migration_id: new_id("mig"),
                container_id: cid.clone(),
                instance_id: r.instance_id.clone(),
                source_node: source.clone(),
                target_node: target.clone(),
                status: status::IN_PROGRESS.to_owned(),
                phase: phase_name(v1::MigrationPhase::Prepare).to_owned(),
                mode: mode.to_owned(),
                created_at: now.clone(),
                updated_at: now,
                ..MigrationRecord::default()
            };
            let mut moved = r.clone();
            moved.migration_id = job.migration_id.clone();
            let ikey = keys::instance(&cid, &r.instance_id);
            let jkey = keys::migration(&job.migration_id);
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(ikey.clone(), CompareOp::Equal, inst.record.mod_revision),
                    Compare::version(jkey.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(jkey, to_json(&job), None),
                    TxnOp::put(ikey, to_json(&moved), None),
                ]);
            if self.store.txn(txn).await?.succeeded() {
                tracing::info!(migration_id = %job.migration_id, container_id = %cid,
                    instance_id = %job.instance_id, source = %source, target = %target, mode,
                    "migration started");
                self.events.emit(
                    Event::migration(&job.migration_id, types::STARTED)
                        .with_container(&cid)
                        .with_node(&target)
                        .with_reason(format!("{} from {source} to {target}", job.instance_id)),
                );
                return Ok(job);
            }
        }
        Err(ServiceError::Conflict(format!(
            "container {cid} changed concurrently, try again"
        )))
    }

    /// One job.
    pub async fn get_migration(&self, migration_id: &str) -> Result<MigrationRecord, ServiceError> {
        validate::reference("migration_id", migration_id)?;
        self.store
            .get_json::<MigrationRecord>(&keys::migration(migration_id))
            .await?
            .map(|v| v.value)
            .ok_or_else(|| ServiceError::NotFound(format!("migration {migration_id} not found")))
    }

    /// Every job (of one container when `container` is not empty), newest first.
    pub async fn list_migrations(
        &self,
        container: &str,
    ) -> Result<Vec<MigrationRecord>, ServiceError> {
        let only = if container.is_empty() {
            None
        } else {
            Some(self.resolve_container(container).await?.value.container_id)
        };
        let mut jobs: Vec<MigrationRecord> = self
            .store
            .list_json::<MigrationRecord>(keys::MIGRATIONS)
            .await?
            .into_iter()
            .map(|v| v.value)
            .filter(|j| only.as_ref().is_none_or(|c| &j.container_id == c))
            .collect();
        jobs.sort_by(|a, b| {
            (&b.created_at, &b.migration_id).cmp(&(&a.created_at, &a.migration_id))
        });
        Ok(jobs)
    }

    /// Applies a node's report about a migration it takes part in. Reports about jobs that ended,
    /// or from nodes not in the job, change nothing.
    pub(crate) async fn migration_progress(
        &self,
        node_id: &str,
        report: &v1::InstanceReport,
        p: &v1::MigrationProgress,
    ) -> Result<(), ServiceError> {
        if p.migration_id.is_empty() || p.migration_id.contains('/') {
            return Ok(());
        }
        for _ in 0..CONFLICT_RETRIES {
            let Some(job) = self
                .store
                .get_json::<MigrationRecord>(&keys::migration(&p.migration_id))
                .await?
            else {
                return Ok(());
            };
            let j = &job.value;
            let from_target = node_id == j.target_node;
            if j.instance_id != report.instance_id || (node_id != j.source_node && !from_target) {
                return Ok(());
            }
            if !j.in_progress() {
                // The source learns the downtime when the target's verdict reaches it, and in
                // post-copy keeps sending pages after the target runs the replica: both can come
                // after the target's RUNNING completed the job. Late, but still its figures; only
                // the source's, and the counts only grow (nothing else of a finished job moves).
                if j.status != status::COMPLETED || from_target {
                    return Ok(());
                }
                let mut next = j.clone();
                if p.downtime_ms > 0 && j.downtime_ms == 0 {
                    next.downtime_ms = p.downtime_ms;
                }
                next.bytes_sent = j.bytes_sent.max(p.bytes_sent);
                next.pages_sent = j.pages_sent.max(p.pages_sent);
                if next == *j {
                    return Ok(());
                }
                if self.put_if_unchanged(&job, next).await? {
                    return Ok(());
                }
                continue;
            }
            if !p.error.is_empty() {
                let reason = format!("node {node_id}: {}", p.error);
                if finish(&self.store, &self.events, &job, Outcome::Failed(reason)).await? {
                    return Ok(());
                }
                // The job changed meanwhile (another report): read it again.
                continue;
            }
            let phase = v1::MigrationPhase::try_from(p.phase).unwrap_or_default();
            let running = report.status == v1::InstanceStatus::Running as i32;
            // Post-copy's memory is all on the target: the source served the last page, or the
            // target has it (either report may be the one that arrives).
            let memory_moved =
                phase == v1::MigrationPhase::Done && (!from_target || p.memory_complete);
            let ending =
                if from_target && phase == v1::MigrationPhase::Done && running && !j.switched {
                    // Post-copy's memory may still be arriving: the replica is the target's now,
                    // but the job ends once the last page arrived.
                    let mut absorbed = j.clone();
                    absorb(&mut absorbed, p);
                    Some(
                        if postcopy(&absorbed) && !absorbed.pages_done && !memory_moved {
                            Outcome::Switched
                        } else {
                            Outcome::Completed
                        },
                    )
                } else if memory_moved && j.switched {
                    Some(Outcome::Completed)
                } else {
                    None
                };
            if let Some(outcome) = ending {
                let mut done = job.clone();
                absorb(&mut done.value, p);
                done.value.pages_done |= memory_moved;
                if finish(&self.store, &self.events, &done, outcome).await? {
                    return Ok(());
                }
                continue;
            }
            let mut next = j.clone();
            absorb(&mut next, p);
            // Every page served before the target's report arrived: that report completes it.
            next.pages_done |= memory_moved;
            if next == *j {
                return Ok(());
            }
            if self.put_if_unchanged(&job, next).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Writes `next` (stamped now) over `job` unless the record changed since it was read; false
    /// when it did (the caller reads again).
    async fn put_if_unchanged(
        &self,
        job: &Versioned<MigrationRecord>,
        mut next: MigrationRecord,
    ) -> Result<bool, ServiceError> {
        next.updated_at = now_rfc3339();
        let key = keys::migration(&next.migration_id);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                job.mod_revision,
            )])
            .and_then([TxnOp::put(key, to_json(&next), None)]);
        Ok(self.store.txn(txn).await?.succeeded())
    }
}

/// Whether the job moves memory by post-copy (asked for, or what `auto` chose).
fn postcopy(j: &MigrationRecord) -> bool {
    j.mode == "postcopy" || j.chosen_mode == "postcopy"
}

/// Takes the figures a node reported; the larger wins, since the source counts what it sent and
/// the target what it received.
fn absorb(j: &mut MigrationRecord, p: &v1::MigrationProgress) {
    let phase = v1::MigrationPhase::try_from(p.phase).unwrap_or_default();
    if phase != v1::MigrationPhase::Unspecified && phase_rank(phase) >= phase_rank_of(&j.phase) {
        j.phase = phase_name(phase).to_owned();
    }
    j.rounds = j.rounds.max(p.rounds);
    j.bytes_sent = j.bytes_sent.max(p.bytes_sent);
    j.pages_sent = j.pages_sent.max(p.pages_sent);
    if p.downtime_ms > 0 {
        j.downtime_ms = p.downtime_ms;
    }
    // The source chooses and says so; the target says how the migration arrived (the same),
    // so the switch knows it is post-copy whichever report the hub hears first.
    let chosen = v1::MigrationMode::try_from(p.chosen_mode).unwrap_or_default();
    if !matches!(
        chosen,
        v1::MigrationMode::Unspecified | v1::MigrationMode::Auto
    ) {
        j.chosen_mode = mode_from_proto(p.chosen_mode).to_owned();
    }
    if let Some(rate) = p.write_rate_mib_s.filter(|r| r.is_finite() && *r >= 0.0) {
        j.write_rate_mib_s = Some(rate);
    }
}

/// Ends a job in one transaction. Completed: the instance moves to the target and the source loses
/// its assignment (it removes its frozen copy); the target's assignment loses its order. Failed:
/// the instance stays, the target loses its assignment (it cleans up), the source's loses its order
/// (it resumes the replica if it had frozen it). Returns false when the records changed meanwhile
/// (the caller reads again).
pub(crate) async fn finish(
    store: &Store,
    events: &Events,
    job: &Versioned<MigrationRecord>,
    outcome: Outcome,
) -> Result<bool, StoreError> {
    let j = &job.value;
    let jkey = keys::migration(&j.migration_id);
    let ikey = keys::instance(&j.container_id, &j.instance_id);
    let inst = store.get_json::<InstanceRecord>(&ikey).await?;
    let mut done = j.clone();
    let now = now_rfc3339();
    done.updated_at = now.clone();
    done.finished_at = now.clone();
    let mut compares = vec![Compare::mod_revision(
        jkey.clone(),
        CompareOp::Equal,
        job.mod_revision,
    )];
    let mut ops = Vec::new();
    let source_key = keys::assign(&j.source_node, &j.instance_id);
    let target_key = keys::assign(&j.target_node, &j.instance_id);
    match &outcome {
        Outcome::Completed => {
            done.status = status::COMPLETED.to_owned();
            done.phase = phase_name(v1::MigrationPhase::Done).to_owned();
        }
        Outcome::Switched => {
            done.switched = true;
            done.phase = phase_name(v1::MigrationPhase::Switch).to_owned();
            done.finished_at.clear();
        }
        Outcome::Failed(reason) => {
            done.status = status::FAILED.to_owned();
            done.error = reason.clone();
        }
    }
    // The instance still belongs to this job: move it (or just release it from the job).
    if let Some(inst) = inst.filter(|i| i.value.migration_id == j.migration_id) {
        let mut next = inst.value.clone();
        // While post-copy pages flow the instance stays the job's: no other move may start
        // from a copy whose memory is not all there.
        if !matches!(outcome, Outcome::Switched) {
            next.migration_id.clear();
        }
        compares.push(Compare::mod_revision(
            ikey.clone(),
            CompareOp::Equal,
            inst.mod_revision,
        ));
        match &outcome {
            // Switched earlier: already the target's, its assignments already final.
            Outcome::Completed | Outcome::Failed(_) if j.switched => {}
            Outcome::Completed | Outcome::Switched => {
                next.node_id = j.target_node.clone();
                next.placed_at = now;
                ops.push(TxnOp::delete(source_key.clone(), None));
                if let Some(a) = without_order(store, &target_key).await? {
                    ops.push(TxnOp::put(target_key.clone(), a, None));
                }
            }
            Outcome::Failed(_) => {
                ops.push(TxnOp::delete(target_key.clone(), None));
                if let Some(a) = without_order(store, &source_key).await? {
                    ops.push(TxnOp::put(source_key.clone(), a, None));
                }
            }
        }
        ops.push(TxnOp::put(ikey, to_json(&next), None));
    } else if matches!(outcome, Outcome::Failed(_)) && !j.switched {
        // The instance went away (deleted, moved by a node failure): only the target's leftovers.
        ops.push(TxnOp::delete(target_key, None));
    }
    ops.push(TxnOp::put(jkey, to_json(&done), None));
    if !store
        .txn(Txn::new().when(compares).and_then(ops))
        .await?
        .succeeded()
    {
        return Ok(false);
    }
    match &outcome {
        Outcome::Switched => {
            tracing::info!(migration_id = %j.migration_id, instance_id = %j.instance_id,
                target = %j.target_node, "post-copy migration switched: the target runs it, its memory follows");
            events.emit(
                Event::migration(&j.migration_id, types::SWITCHED)
                    .with_container(&j.container_id)
                    .with_node(&j.target_node)
                    .with_reason("the target runs it; memory still arriving".to_owned()),
            );
        }
        Outcome::Completed => {
            tracing::info!(migration_id = %j.migration_id, instance_id = %j.instance_id,
                target = %j.target_node, downtime_ms = done.downtime_ms, "migration completed");
            events.emit(
                Event::migration(&j.migration_id, types::COMPLETED)
                    .with_container(&j.container_id)
                    .with_node(&j.target_node)
                    .with_reason(format!("downtime {} ms", done.downtime_ms)),
            );
        }
        Outcome::Failed(reason) => {
            tracing::warn!(migration_id = %j.migration_id, instance_id = %j.instance_id,
                %reason, "migration failed");
            events.emit(
                Event::migration(&j.migration_id, types::FAILED)
                    .with_container(&j.container_id)
                    .with_node(&j.source_node)
                    .with_reason(reason.clone()),
            );
        }
    }
    Ok(true)
}

/// The stored assignment at `key` with its migration order removed, encoded; `None` if absent or
/// unreadable (then the reconciler writes it afresh).
async fn without_order(store: &Store, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(kv) = store.get_raw(key).await? else {
        return Ok(None);
    };
    Ok(v1::Assignment::decode(kv.value()).ok().map(|mut a| {
        a.migration = None;
        a.encode_to_vec()
    }))
}

/// The order a node's assignment of `inst` carries while `job` runs.
pub fn order_for(
    snap: &Snapshot,
    job: &MigrationRecord,
    role: v1::MigrationRole,
) -> Option<v1::MigrationOrder> {
    let peer = match role {
        v1::MigrationRole::Source => &job.target_node,
        v1::MigrationRole::Target => &job.source_node,
        v1::MigrationRole::Unspecified => return None,
    };
    let peer_addr = snap.nodes.get(peer)?.value.migration_addr.clone();
    Some(v1::MigrationOrder {
        migration_id: job.migration_id.clone(),
        role: role as i32,
        peer_node_id: peer.clone(),
        peer_addr,
        mode: mode_to_proto(&job.mode) as i32,
    })
}

/// The replica a request names: `instance_id`, or the only one.
fn pick_instance<'a>(
    snap: &'a Snapshot,
    cid: &str,
    instance_id: &str,
) -> Result<&'a StoredInstance, ServiceError> {
    let live: Vec<_> = snap
        .instances_of(cid)
        .into_iter()
        .filter(|i| !i.record.value.stopping)
        .collect();
    if instance_id.is_empty() {
        return match live.as_slice() {
            [one] => Ok(one),
            [] => Err(ServiceError::Conflict(format!(
                "container {cid} has no replica to migrate"
            ))),
            many => Err(ServiceError::invalid(
                "instance_id",
                format!(
                    "container {cid} has {} replicas: say which one to migrate",
                    many.len()
                ),
            )),
        };
    }
    live.into_iter()
        .find(|i| i.record.value.instance_id == instance_id)
        .ok_or_else(|| {
            ServiceError::NotFound(format!(
                "instance {instance_id} of container {cid} not found"
            ))
        })
}

/// Only a running replica that no other job moves can go.
fn check_movable(snap: &Snapshot, inst: &StoredInstance) -> Result<(), ServiceError> {
    let r = &inst.record.value;
    if !r.migration_id.is_empty()
        && snap
            .migrations
            .get(&r.migration_id)
            .is_some_and(|j| j.value.in_progress())
    {
        return Err(ServiceError::Conflict(format!(
            "instance {} is already migrating ({})",
            r.instance_id, r.migration_id
        )));
    }
    let running = inst.status.as_ref().is_some_and(|s| s.status == "RUNNING");
    if r.node_id.is_empty() || r.stopped || !running {
        let now = inst
            .status
            .as_ref()
            .map_or("PENDING", |s| s.status.as_str());
        return Err(ServiceError::Conflict(format!(
            "instance {} is {}{}: only a running replica can migrate",
            r.instance_id,
            if r.stopped { "stopped, " } else { "" },
            now
        )));
    }
    Ok(())
}

fn has_endpoint(snap: &Snapshot, node: &str) -> bool {
    snap.nodes
        .get(node)
        .is_some_and(|n| !n.value.migration_addr.is_empty())
}

/// The named target after checking it can take the replica, or the scheduler's choice among the
/// nodes that can.
fn choose_target(
    snap: &Snapshot,
    inst: &StoredInstance,
    named: &str,
) -> Result<String, ServiceError> {
    let r = &inst.record.value;
    let source = r.node_id.as_str();
    let candidates: Vec<&str> = if named.is_empty() {
        snap.nodes
            .keys()
            .map(String::as_str)
            .filter(|n| *n != source && has_endpoint(snap, n) && !snap.down.contains(*n))
            .collect()
    } else {
        if !snap.nodes.contains_key(named) {
            return Err(ServiceError::NotFound(format!("node {named} not found")));
        }
        let unfit = |why: String| ServiceError::invalid("target_node", why);
        if named == source {
            return Err(unfit(format!("{} already runs on {named}", r.instance_id)));
        }
        if !snap.alive.contains(named) || snap.down.contains(named) {
            return Err(unfit(format!("node {named} is not healthy")));
        }
        if !has_endpoint(snap, named) {
            return Err(unfit(format!(
                "node {named} cannot receive live migrations (its agent advertises no migration \
                 endpoint)"
            )));
        }
        vec![named]
    };
    let (mut nodes, placed) = crate::reconciler::capacity(snap);
    nodes.retain(|n| candidates.contains(&n.node_id.as_str()));
    let Some(c) = snap.containers.get(&r.container_id) else {
        return Err(ServiceError::NotFound(format!(
            "container {} not found",
            r.container_id
        )));
    };
    let rev = snap.revision_of(&c.value, r.revision.max(1));
    let request = Request {
        instance_id: r.instance_id.clone(),
        container_id: r.container_id.clone(),
        cpu_millis: rev.cpu_millis,
        memory_bytes: rev.memory_bytes,
    };
    if nodes.is_empty() {
        return Err(ServiceError::invalid(
            "target_node",
            "no other node can receive live migrations",
        ));
    }
    match schedule(&nodes, &placed, &[request]).pop() {
        Some(Decision::Place { node_id, .. }) => Ok(node_id),
        Some(Decision::Unschedulable { reason, .. }) => {
            Err(ServiceError::invalid("target_node", reason))
        }
        None => Err(ServiceError::Internal(
            "the scheduler answered nothing".to_owned(),
        )),
    }
}

fn parse_mode(mode: &str) -> Result<&'static str, ServiceError> {
    match mode {
        "" | "auto" => Ok("auto"),
        "precopy" => Ok("precopy"),
        "stopcopy" => Ok("stopcopy"),
        "postcopy" => Ok("postcopy"),
        other => Err(ServiceError::invalid(
            "mode",
            format!("{other:?} is not one of auto, precopy, postcopy, stopcopy"),
        )),
    }
}

fn mode_to_proto(mode: &str) -> v1::MigrationMode {
    match mode {
        "precopy" => v1::MigrationMode::Precopy,
        "postcopy" => v1::MigrationMode::Postcopy,
        "stopcopy" => v1::MigrationMode::Stopcopy,
        _ => v1::MigrationMode::Auto,
    }
}

/// The mode name for a proto value (`UNSPECIFIED` is "auto").
pub fn mode_from_proto(mode: i32) -> &'static str {
    match v1::MigrationMode::try_from(mode).unwrap_or_default() {
        v1::MigrationMode::Precopy => "precopy",
        v1::MigrationMode::Postcopy => "postcopy",
        v1::MigrationMode::Stopcopy => "stopcopy",
        v1::MigrationMode::Auto | v1::MigrationMode::Unspecified => "auto",
    }
}

const PHASES: [(v1::MigrationPhase, &str); 7] = [
    (v1::MigrationPhase::Prepare, "PREPARE"),
    (v1::MigrationPhase::Precopy, "PRECOPY"),
    (v1::MigrationPhase::Freeze, "FREEZE"),
    (v1::MigrationPhase::Transfer, "TRANSFER"),
    (v1::MigrationPhase::Restore, "RESTORE"),
    (v1::MigrationPhase::Switch, "SWITCH"),
    (v1::MigrationPhase::Done, "DONE"),
];

fn phase_name(p: v1::MigrationPhase) -> &'static str {
    PHASES
        .iter()
        .find(|(q, _)| *q == p)
        .map_or("PREPARE", |(_, n)| n)
}

fn phase_rank(p: v1::MigrationPhase) -> usize {
    PHASES.iter().position(|(q, _)| *q == p).unwrap_or(0)
}

fn phase_rank_of(name: &str) -> usize {
    PHASES.iter().position(|(_, n)| *n == name).unwrap_or(0)
}

/// The wire form of a job.
pub fn migration_to_proto(j: &MigrationRecord) -> v1::Migration {
    let status = match j.status.as_str() {
        status::IN_PROGRESS => v1::MigrationStatus::InProgress,
        status::COMPLETED => v1::MigrationStatus::Completed,
        status::FAILED => v1::MigrationStatus::Failed,
        _ => v1::MigrationStatus::Unspecified,
    };
    let phase = PHASES
        .iter()
        .find(|(_, n)| *n == j.phase)
        .map_or(v1::MigrationPhase::Unspecified, |(p, _)| *p);
    v1::Migration {
        migration_id: j.migration_id.clone(),
        container_id: j.container_id.clone(),
        instance_id: j.instance_id.clone(),
        source_node: j.source_node.clone(),
        target_node: j.target_node.clone(),
        status: status as i32,
        phase: phase as i32,
        mode: mode_to_proto(&j.mode) as i32,
        rounds: j.rounds,
        bytes_sent: j.bytes_sent,
        pages_sent: j.pages_sent,
        downtime_ms: j.downtime_ms,
        error: j.error.clone(),
        created_at: j.created_at.clone(),
        updated_at: j.updated_at.clone(),
        finished_at: j.finished_at.clone(),
        chosen_mode: if j.chosen_mode.is_empty() {
            v1::MigrationMode::Unspecified
        } else {
            mode_to_proto(&j.chosen_mode)
        } as i32,
        write_rate_mib_s: j.write_rate_mib_s,
    }
}
