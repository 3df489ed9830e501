//! Rolling updates, rollbacks and the revision history. An update records a new revision and points
//! the container at it with a rollout; the reconciler then replaces replicas one batch at a time
//! (`max_unavailable`) and undoes the rollout by itself when new replicas fail.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::view::{revision_to_proto, STATUS_ROLLING_BACK, STATUS_UPDATING};
use super::{now_rfc3339, validate, Service, ServiceError, UpdateContainer, CONFLICT_RETRIES};
use crate::events::{types, Event};
use crate::store::records::{ContainerRecord, RevisionRecord, RolloutRecord};
use crate::store::{decode_versioned, keys, to_json, Versioned};
use berth_proto::v1;

/// Revisions kept per container; older ones are pruned by updates.
pub const KEEP_REVISIONS: usize = 10;

/// Status answered when an update changes nothing.
pub const STATUS_UNCHANGED: &str = "UNCHANGED";

/// The revision every replica ran before the rollout in progress (or the current one without one):
/// where an automatic rollback returns.
pub fn stable_revision(c: &ContainerRecord) -> u32 {
    match &c.rollout {
        None => c.revision.max(1),
        Some(r) if r.state == STATUS_UPDATING => r.from_revision,
        // Rolling back: the target is the stable one.
        Some(r) => r.revision,
    }
}

/// Points `c` at revision `rev` (its spec becomes the container's).
pub fn apply_revision(c: &mut ContainerRecord, rev: &RevisionRecord) {
    c.image = rev.image.clone();
    c.cpu_millis = rev.cpu_millis;
    c.memory_bytes = rev.memory_bytes;
    c.command = rev.command.clone();
    c.env = rev.env.clone();
    c.revision = rev.revision;
}

impl Service {
    /// Starts a rolling update to a new revision. Returns the status and the new revision (or the
    /// current one, with [`STATUS_UNCHANGED`], when the spec would not change).
    pub async fn update_container(
        &self,
        id_or_name: &str,
        req: UpdateContainer,
    ) -> Result<(&'static str, u32), ServiceError> {
        if req.image.is_none()
            && req.cpu.is_none()
            && req.memory.is_none()
            && req.env.is_none()
            && req.command.is_none()
        {
            return Err(ServiceError::invalid(
                "image",
                "nothing to update: give at least one of image, cpu, memory, env, command",
            ));
        }
        if let Some(image) = &req.image {
            validate::image(image)?;
        }
        let cpu = req.cpu.as_deref().map(validate::cpu).transpose()?;
        let memory = req.memory.as_deref().map(validate::memory).transpose()?;
        if let Some(env) = &req.env {
            validate::env(env)?;
        }
        if let Some(command) = &req.command {
            validate::command(command)?;
        }
        let max_unavailable = validate::max_unavailable(req.max_unavailable)?;
        for _ in 0..CONFLICT_RETRIES {
            let found = self.resolve_container(id_or_name).await?;
            let c = &found.value;
            refuse_while_unavailable(c)?;
            let history = self.revisions(&c.container_id).await?;
            let mut next = RevisionRecord {
                revision: 0,
                image: req.image.clone().unwrap_or_else(|| c.image.clone()),
                image_digest: String::new(),
                cpu_millis: cpu.unwrap_or(c.cpu_millis),
                memory_bytes: memory.unwrap_or(c.memory_bytes),
                command: req.command.clone().unwrap_or_else(|| c.command.clone()),
                env: req.env.clone().unwrap_or_else(|| c.env.clone()),
                created_at: now_rfc3339(),
                cause: "update".to_owned(),
            };
            let current = crate::store::current_revision(c);
            if same_spec(&next, &current) {
                return Ok((STATUS_UNCHANGED, c.revision.max(1)));
            }
            next.revision = history
                .iter()
                .map(|r| r.value.revision)
                .chain([c.revision])
                .max()
                .unwrap_or(0)
                + 1;
            let mut record = c.clone();
            let from = stable_revision(c);
            apply_revision(&mut record, &next);
            record.rollout = Some(RolloutRecord {
                state: STATUS_UPDATING.to_owned(),
                revision: next.revision,
                from_revision: from,
                max_unavailable,
                reason: String::new(),
                started_at: now_rfc3339(),
            });
            let ops = revision_ops(&record, &next, &history, from);
            if self.commit(&found, ops).await? {
                tracing::info!(container_id = %c.container_id, revision = next.revision, from_revision = from,
                    image = %next.image, max_unavailable, "rolling update started");
                self.events.emit(
                    Event::container(&c.container_id, types::UPDATE)
                        .with_status(STATUS_UPDATING)
                        .with_reason(format!("revision {} ({})", next.revision, next.image)),
                );
                return Ok((STATUS_UPDATING, next.revision));
            }
        }
        Err(ServiceError::Conflict(format!(
            "container {id_or_name} changed concurrently, try again"
        )))
    }

    /// Returns to an earlier revision (the one before the current one when none is given), replacing
    /// replicas like an update. Its image is pinned to the digest its replicas ran.
    pub async fn rollback_container(
        &self,
        id_or_name: &str,
        revision: Option<u32>,
    ) -> Result<(&'static str, u32), ServiceError> {
        for _ in 0..CONFLICT_RETRIES {
            let found = self.resolve_container(id_or_name).await?;
            let c = &found.value;
            refuse_while_unavailable(c)?;
            let current = c.revision.max(1);
            let history = self.revisions(&c.container_id).await?;
            let target = match revision.filter(|r| *r != 0) {
                Some(r) => r,
                None => history
                    .iter()
                    .map(|r| r.value.revision)
                    .filter(|r| *r < current)
                    .max()
                    .ok_or_else(|| {
                        ServiceError::Conflict(format!(
                            "container {} has no revision before {current}; name one",
                            c.container_id
                        ))
                    })?,
            };
            if target == current {
                return Err(ServiceError::Conflict(format!(
                    "container {} already runs revision {current}",
                    c.container_id
                )));
            }
            let Some(rev) = history.iter().find(|r| r.value.revision == target) else {
                return Err(ServiceError::NotFound(format!(
                    "revision {target} of container {} not found (kept: {})",
                    c.container_id,
                    history
                        .iter()
                        .map(|r| r.value.revision.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let mut record = c.clone();
            apply_revision(&mut record, &rev.value);
            let max_unavailable = c.rollout.as_ref().map_or(1, |r| r.max_unavailable);
            record.rollout = Some(RolloutRecord {
                state: STATUS_ROLLING_BACK.to_owned(),
                revision: target,
                from_revision: current,
                max_unavailable,
                reason: format!("rollback to revision {target} requested"),
                started_at: now_rfc3339(),
            });
            let ops = vec![TxnOp::put(
                keys::container(&c.container_id),
                to_json(&record),
                None,
            )];
            if self.commit(&found, ops).await? {
                tracing::info!(container_id = %c.container_id, revision = target, from_revision = current,
                    image = %rev.value.pinned_image(), "rollback started");
                self.events.emit(
                    Event::container(&c.container_id, types::ROLLBACK)
                        .with_status(STATUS_ROLLING_BACK)
                        .with_reason(format!("to revision {target} (requested)")),
                );
                return Ok((STATUS_ROLLING_BACK, target));
            }
        }
        Err(ServiceError::Conflict(format!(
            "container {id_or_name} changed concurrently, try again"
        )))
    }

    /// A container's revisions, oldest first.
    pub async fn list_revisions(
        &self,
        id_or_name: &str,
    ) -> Result<Vec<v1::Revision>, ServiceError> {
        let found = self.resolve_container(id_or_name).await?;
        let c = &found.value;
        let history = self.revisions(&c.container_id).await?;
        let current = c.revision.max(1);
        let mut out: Vec<v1::Revision> = history
            .iter()
            .map(|r| revision_to_proto(&r.value, r.value.revision == current))
            .collect();
        if !history.iter().any(|r| r.value.revision == current) {
            // A record older than revisions: its spec is revision 1.
            out.push(revision_to_proto(&crate::store::current_revision(c), true));
        }
        Ok(out)
    }

    /// The stored revisions of a container, oldest first.
    async fn revisions(
        &self,
        container_id: &str,
    ) -> Result<Vec<Versioned<RevisionRecord>>, ServiceError> {
        let (kvs, _) = self
            .store
            .get_prefix(&keys::revisions_prefix(container_id))
            .await?;
        let mut out = kvs
            .iter()
            .map(decode_versioned)
            .collect::<Result<Vec<Versioned<RevisionRecord>>, _>>()?;
        out.sort_by_key(|r| r.value.revision);
        Ok(out)
    }

    /// Writes the container record with `ops`, if it did not change since it was read.
    async fn commit(
        &self,
        found: &Versioned<ContainerRecord>,
        ops: Vec<TxnOp>,
    ) -> Result<bool, ServiceError> {
        if ops.is_empty() {
            return Ok(false);
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                keys::container(&found.value.container_id),
                CompareOp::Equal,
                found.mod_revision,
            )])
            .and_then(ops);
        Ok(self.store.txn(txn).await?.succeeded())
    }
}

/// Updates and rollbacks need replicas that can run.
fn refuse_while_unavailable(c: &ContainerRecord) -> Result<(), ServiceError> {
    if c.deleting {
        return Err(ServiceError::Conflict(format!(
            "container {} is being deleted",
            c.container_id
        )));
    }
    if c.stopped {
        return Err(ServiceError::Conflict(format!(
            "container {} is stopped: start it before updating it",
            c.container_id
        )));
    }
    Ok(())
}

fn same_spec(a: &RevisionRecord, b: &RevisionRecord) -> bool {
    a.image == b.image
        && a.cpu_millis == b.cpu_millis
        && a.memory_bytes == b.memory_bytes
        && a.command == b.command
        && a.env == b.env
}

/// The writes of an update: the container, the new revision, and the pruning of revisions beyond
/// [`KEEP_REVISIONS`] (never the one a rollback would return to).
fn revision_ops(
    record: &ContainerRecord,
    next: &RevisionRecord,
    history: &[Versioned<RevisionRecord>],
    keep: u32,
) -> Vec<TxnOp> {
    let id = &record.container_id;
    let mut ops = vec![
        TxnOp::put(keys::container(id), to_json(record), None),
        TxnOp::put(keys::revision(id, next.revision), to_json(next), None),
    ];
    let excess = (history.len() + 1).saturating_sub(KEEP_REVISIONS);
    ops.extend(
        history
            .iter()
            .map(|r| r.value.revision)
            .filter(|r| *r != keep)
            .take(excess)
            .map(|r| TxnOp::delete(keys::revision(id, r), None)),
    );
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stable_revision_is_where_a_rollback_returns() {
        let mut c = ContainerRecord {
            revision: 3,
            ..Default::default()
        };
        assert_eq!(stable_revision(&c), 3);
        c.rollout = Some(RolloutRecord {
            state: STATUS_UPDATING.into(),
            revision: 3,
            from_revision: 2,
            max_unavailable: 1,
            reason: String::new(),
            started_at: String::new(),
        });
        assert_eq!(stable_revision(&c), 2);
        c.rollout = Some(RolloutRecord {
            state: STATUS_ROLLING_BACK.into(),
            revision: 2,
            from_revision: 3,
            max_unavailable: 1,
            reason: String::new(),
            started_at: String::new(),
        });
        assert_eq!(stable_revision(&c), 2);
    }

    #[test]
    fn updates_prune_the_oldest_revisions_but_not_the_stable_one() {
        let rev = |n: u32| Versioned {
            value: RevisionRecord {
                revision: n,
                image: format!("img:{n}"),
                image_digest: String::new(),
                cpu_millis: 1,
                memory_bytes: 1,
                command: vec![],
                env: Default::default(),
                created_at: String::new(),
                cause: String::new(),
            },
            mod_revision: 1,
            create_revision: 1,
        };
        let history: Vec<_> = (1..=10).map(rev).collect();
        let record = ContainerRecord {
            container_id: "ctr-1".into(),
            ..Default::default()
        };
        // 10 kept + 1 new: one goes, and it is not revision 1 when 1 is the stable one.
        let ops = revision_ops(&record, &rev(11).value, &history, 1);
        assert_eq!(ops.len(), 3);
        let ops = revision_ops(&record, &rev(3).value, &history[..2], 1);
        assert_eq!(ops.len(), 2);
    }
}
