//! Node drain and uncordon: `POST /v1/nodes/{id}/drain {"live"}` cordons a node (nothing new is
//! placed or migrated there, what runs there keeps running) and sends its instances away: with
//! `live`, one live migration per running instance through [`Service::migrate`] (the scheduler
//! picks each target); without, each is stopped there and the replica count brings a replacement
//! on another node, as for a DOWN node (a restart elsewhere, like Kubernetes' drain). Instances
//! that cannot go now are reported with the reason instead of failing the drain. `/uncordon` lifts
//! the cordon; nothing moves back by itself.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::migrations::MigrateSpec;
use super::{validate, Service, ServiceError, CONFLICT_RETRIES};
use crate::events::{types, Event};
use crate::store::records::{InstanceRecord, NodeRecord};
use crate::store::{keys, to_json, Snapshot, StoredInstance};
use berth_proto::v1;

/// Reason given for an instance stopped by a non-live drain.
const DRAIN_REASON: &str = "node drained";

impl Service {
    /// Cordons `node_id` and moves its instances away (see the module docs). 404 for an unknown
    /// node. The answer lists the migrations started (live), the instances stopped for a
    /// replacement elsewhere (not live) and the instances left where they are, with the reason.
    pub async fn drain_node(
        &self,
        node_id: &str,
        live: bool,
    ) -> Result<v1::DrainNodeResponse, ServiceError> {
        validate::reference("node_id", node_id)?;
        // Cordon first: every target chosen below, and every replacement placed later, avoids it.
        self.set_unschedulable(node_id, true).await?;
        let snap = self.store.snapshot().await?;
        let plan = plan(&snap, node_id);
        let mut answer = v1::DrainNodeResponse {
            node_id: node_id.to_owned(),
            unschedulable: true,
            skipped: plan.skipped,
            ..Default::default()
        };
        for r in plan.movable {
            if live {
                let started = self
                    .migrate(MigrateSpec {
                        container: r.container_id.clone(),
                        instance_id: r.instance_id.clone(),
                        ..MigrateSpec::default()
                    })
                    .await;
                match started {
                    Ok(job) => answer.migrations.push(v1::DrainStarted {
                        instance_id: r.instance_id,
                        container_id: r.container_id,
                        migration_id: job.migration_id,
                    }),
                    Err(e) => answer.skipped.push(v1::DrainSkipped {
                        instance_id: r.instance_id,
                        reason: skip_reason(e)?,
                    }),
                }
            } else {
                match self.stop_for_drain(node_id, &r).await? {
                    None => answer.replaced.push(v1::DrainStarted {
                        instance_id: r.instance_id,
                        container_id: r.container_id,
                        migration_id: String::new(),
                    }),
                    Some(reason) => answer.skipped.push(v1::DrainSkipped {
                        instance_id: r.instance_id,
                        reason,
                    }),
                }
            }
        }
        let summary = format!(
            "{}: {} migrating, {} replaced, {} skipped",
            if live { "live" } else { "restart elsewhere" },
            answer.migrations.len(),
            answer.replaced.len(),
            answer.skipped.len()
        );
        tracing::info!(
            node_id,
            live,
            migrations = answer.migrations.len(),
            replaced = answer.replaced.len(),
            skipped = answer.skipped.len(),
            "node drained"
        );
        self.events.emit(
            Event::node(node_id, types::DRAINED)
                .with_status("SCHEDULING_DISABLED")
                .with_reason(summary),
        );
        Ok(answer)
    }

    /// Lets `node_id` receive instances again. Idempotent; 404 for an unknown node.
    pub async fn uncordon_node(&self, node_id: &str) -> Result<v1::Node, ServiceError> {
        validate::reference("node_id", node_id)?;
        if self.set_unschedulable(node_id, false).await? {
            tracing::info!(node_id, "node uncordoned");
            self.events
                .emit(Event::node(node_id, types::UNCORDONED).with_status("SCHEDULABLE"));
        }
        self.get_node(node_id).await
    }

    /// Sets the node's cordon; `true` when the record changed.
    async fn set_unschedulable(&self, node_id: &str, value: bool) -> Result<bool, ServiceError> {
        let key = keys::node(node_id);
        for _ in 0..CONFLICT_RETRIES {
            let Some(node) = self.store.get_json::<NodeRecord>(&key).await? else {
                return Err(ServiceError::NotFound(format!("node {node_id} not found")));
            };
            if node.value.unschedulable == value {
                return Ok(false);
            }
            let next = NodeRecord {
                unschedulable: value,
                ..node.value
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    node.mod_revision,
                )])
                .and_then([TxnOp::put(key.clone(), to_json(&next), None)]);
            if self.store.txn(txn).await?.succeeded() {
                return Ok(true);
            }
        }
        Err(ServiceError::Conflict(format!(
            "node {node_id} changed concurrently, try again"
        )))
    }

    /// Stops one instance on the drained node, as the leader does for a DOWN node: its assignment
    /// becomes a stopping marker (the node stops it and reports it removed; its address stays
    /// claimed until then) and the replica count brings a replacement elsewhere. `Some(reason)`
    /// when it is no longer there to stop.
    async fn stop_for_drain(
        &self,
        node_id: &str,
        seen: &InstanceRecord,
    ) -> Result<Option<String>, ServiceError> {
        let key = keys::instance(&seen.container_id, &seen.instance_id);
        for _ in 0..CONFLICT_RETRIES {
            let Some(inst) = self.store.get_json::<InstanceRecord>(&key).await? else {
                return Ok(Some("removed meanwhile".to_owned()));
            };
            let r = &inst.value;
            if r.node_id != node_id || r.stopping {
                return Ok(Some(format!(
                    "changed meanwhile (now {})",
                    if r.stopping { "stopping" } else { "elsewhere" }
                )));
            }
            if !r.migration_id.is_empty() {
                // A job started meanwhile moves it; let it finish rather than cut it off.
                return Ok(Some(format!("migrating ({})", r.migration_id)));
            }
            let stopping = InstanceRecord {
                stopping: true,
                ..r.clone()
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    inst.mod_revision,
                )])
                .and_then([
                    TxnOp::put(key.clone(), to_json(&stopping), None),
                    TxnOp::delete(keys::assign(node_id, &r.instance_id), None),
                    // Streamed to the node until it reports the removal (as for a scale-down).
                    TxnOp::put(keys::stopping(node_id, &r.instance_id), "", None),
                ]);
            if self.store.txn(txn).await?.succeeded() {
                self.events.emit(
                    Event::instance(&r.container_id, &r.instance_id, types::STOPPING)
                        .with_node(node_id)
                        .with_reason(DRAIN_REASON),
                );
                return Ok(None);
            }
        }
        Ok(Some("changed concurrently; drain again".to_owned()))
    }
}

/// What a drain does with a node's instances, decided on one snapshot.
#[derive(Debug, Default)]
struct Plan {
    /// Instances to send away, by container then ordinal.
    movable: Vec<InstanceRecord>,
    /// Instances a migration already moves (away, or here), with the reason.
    skipped: Vec<v1::DrainSkipped>,
}

/// Sorts the node's instances: those already stopping are going anyway (not listed); those a
/// running job moves are skipped (whether it moves them away or here); the rest move.
fn plan(snap: &Snapshot, node_id: &str) -> Plan {
    let mut here: Vec<&StoredInstance> = snap
        .all_instances()
        .filter(|i| !i.record.value.stopping)
        .filter(|i| {
            let r = &i.record.value;
            r.node_id == node_id || arriving_job(snap, r).is_some_and(|j| j.0 == node_id)
        })
        .collect();
    here.sort_by(|a, b| {
        let (a, b) = (&a.record.value, &b.record.value);
        (&a.container_id, a.ordinal, &a.instance_id).cmp(&(
            &b.container_id,
            b.ordinal,
            &b.instance_id,
        ))
    });
    let mut plan = Plan::default();
    for i in here {
        let r = &i.record.value;
        match arriving_job(snap, r) {
            Some((target, job)) if target == node_id => plan.skipped.push(v1::DrainSkipped {
                instance_id: r.instance_id.clone(),
                reason: format!(
                    "migrating here from {} ({job}): drain again once it ends",
                    r.node_id
                ),
            }),
            Some((target, job)) => plan.skipped.push(v1::DrainSkipped {
                instance_id: r.instance_id.clone(),
                reason: format!("already migrating to {target} ({job})"),
            }),
            None => plan.movable.push(r.clone()),
        }
    }
    plan
}

/// The target node and id of the job moving `r`, while it runs.
fn arriving_job<'a>(snap: &'a Snapshot, r: &'a InstanceRecord) -> Option<(&'a str, &'a str)> {
    if r.migration_id.is_empty() {
        return None;
    }
    snap.migrations
        .get(&r.migration_id)
        .map(|j| &j.value)
        .filter(|j| j.in_progress())
        .map(|j| (j.target_node.as_str(), j.migration_id.as_str()))
}

/// Why one instance's migration was refused, for the drain's answer; errors that are not about the
/// instance (etcd unreachable, a bug) fail the drain instead.
fn skip_reason(e: ServiceError) -> Result<String, ServiceError> {
    match e {
        // The field is the migrate request's, which a drain never sent: keep the words only.
        ServiceError::InvalidArgument { message, .. } => Ok(message),
        ServiceError::NotFound(m) | ServiceError::Conflict(m) => Ok(m),
        other @ (ServiceError::Unavailable(_) | ServiceError::Internal(_)) => Err(other),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::records::MigrationRecord;
    use crate::store::Versioned;

    fn versioned<T>(value: T) -> Versioned<T> {
        Versioned {
            value,
            mod_revision: 1,
            create_revision: 1,
        }
    }

    fn instance(cid: &str, iid: &str, ordinal: u32, node: &str) -> InstanceRecord {
        InstanceRecord {
            instance_id: iid.into(),
            container_id: cid.into(),
            ordinal,
            node_id: node.into(),
            ..InstanceRecord::default()
        }
    }

    fn add(snap: &mut Snapshot, r: InstanceRecord) {
        snap.instances
            .entry(r.container_id.clone())
            .or_default()
            .insert(
                r.instance_id.clone(),
                StoredInstance {
                    record: versioned(r),
                    status: None,
                },
            );
    }

    fn job(mid: &str, iid: &str, source: &str, target: &str, status: &str) -> MigrationRecord {
        MigrationRecord {
            migration_id: mid.into(),
            instance_id: iid.into(),
            source_node: source.into(),
            target_node: target.into(),
            status: status.into(),
            ..MigrationRecord::default()
        }
    }

    #[test]
    fn the_plan_moves_what_no_job_moves_and_says_why_for_the_rest() {
        let mut snap = Snapshot::default();
        add(&mut snap, instance("ctr-b", "ins-b0", 0, "n1"));
        add(&mut snap, instance("ctr-a", "ins-a1", 1, "n1"));
        add(&mut snap, instance("ctr-a", "ins-a0", 0, "n1"));
        // Elsewhere, or already going: not the drain's business.
        add(&mut snap, instance("ctr-a", "ins-a2", 2, "n2"));
        let mut stopping = instance("ctr-a", "ins-a3", 3, "n1");
        stopping.stopping = true;
        add(&mut snap, stopping);
        // Leaving n1 by a running job; a finished job's id left on a record does not count.
        let mut leaving = instance("ctr-c", "ins-c0", 0, "n1");
        leaving.migration_id = "mig-out".into();
        add(&mut snap, leaving);
        let mut old_job = instance("ctr-c", "ins-c1", 1, "n1");
        old_job.migration_id = "mig-old".into();
        add(&mut snap, old_job);
        // Arriving on n1 from n3.
        let mut arriving = instance("ctr-d", "ins-d0", 0, "n3");
        arriving.migration_id = "mig-in".into();
        add(&mut snap, arriving);
        for j in [
            job("mig-out", "ins-c0", "n1", "n2", "IN_PROGRESS"),
            job("mig-old", "ins-c1", "n3", "n1", "COMPLETED"),
            job("mig-in", "ins-d0", "n3", "n1", "IN_PROGRESS"),
        ] {
            snap.migrations.insert(j.migration_id.clone(), versioned(j));
        }

        let p = plan(&snap, "n1");
        let moved: Vec<&str> = p.movable.iter().map(|r| r.instance_id.as_str()).collect();
        assert_eq!(moved, ["ins-a0", "ins-a1", "ins-b0", "ins-c1"]);
        let skipped: Vec<(&str, &str)> = p
            .skipped
            .iter()
            .map(|s| (s.instance_id.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(
            skipped,
            [
                ("ins-c0", "already migrating to n2 (mig-out)"),
                (
                    "ins-d0",
                    "migrating here from n3 (mig-in): drain again once it ends"
                ),
            ]
        );
        // Another node's plan does not see n1's instances.
        assert!(plan(&snap, "n4").movable.is_empty());
    }

    #[test]
    fn refusals_about_the_instance_are_reasons_other_errors_fail_the_drain() {
        assert_eq!(
            skip_reason(ServiceError::invalid(
                "target_node",
                "no node has 1 cpu free"
            ))
            .unwrap(),
            "no node has 1 cpu free"
        );
        assert_eq!(
            skip_reason(ServiceError::Conflict("instance i is PENDING".into())).unwrap(),
            "instance i is PENDING"
        );
        assert!(skip_reason(ServiceError::NotFound("gone".into())).is_ok());
        assert!(matches!(
            skip_reason(ServiceError::Unavailable("etcd".into())),
            Err(ServiceError::Unavailable(_))
        ));
        assert!(skip_reason(ServiceError::Internal("bug".into())).is_err());
    }
}
