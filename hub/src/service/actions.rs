//! Stop, start and restart on request. The service only flips flags on the records (an instance's
//! `stopped`, its `restart_generation`, the container's `stopped` for replicas to come); the
//! reconciler rewrites the assignments from them and the nodes carry them out, reporting
//! STOPPING/STOPPED/STARTING/RUNNING as they go.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{validate, Service, ServiceError, CONFLICT_RETRIES};
use crate::events::{types, Event};
use crate::store::records::InstanceRecord;
use crate::store::{decode_versioned, keys, to_json, Versioned};

/// Instance records written per transaction (etcd allows 128 operations; two per instance).
const BATCH: usize = 40;

/// What a request asks of the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Stop the process (stop signal, grace, SIGKILL); keep the placement and the address.
    Stop,
    /// Start stopped replicas again.
    Start,
    /// Stop and start again (a stopped replica is just started).
    Restart,
}

impl Action {
    /// The status the request answers with.
    pub fn status(self) -> &'static str {
        match self {
            Action::Stop => "STOPPING",
            Action::Start => "STARTING",
            Action::Restart => "RESTARTING",
        }
    }

    fn event_type(self) -> &'static str {
        match self {
            Action::Stop => types::STOP,
            Action::Start => types::START,
            Action::Restart => types::RESTART,
        }
    }

    /// The instance record after the action, or `None` when it changes nothing.
    fn apply(self, r: &InstanceRecord) -> Option<InstanceRecord> {
        let mut next = r.clone();
        match self {
            Action::Stop => next.stopped = true,
            Action::Start => next.stopped = false,
            Action::Restart => {
                // A replica that never ran anywhere has nothing to restart.
                if !r.node_id.is_empty() && !r.stopped {
                    next.restart_generation = r.restart_generation.wrapping_add(1);
                }
                next.stopped = false;
            }
        }
        (next != *r).then_some(next)
    }
}

impl Service {
    /// Carries out `action` on every replica, or on the one given. Returns the status to answer with.
    pub async fn act(
        &self,
        id_or_name: &str,
        instance_id: Option<&str>,
        action: Action,
    ) -> Result<&'static str, ServiceError> {
        let instance_id = instance_id.filter(|i| !i.is_empty());
        if let Some(iid) = instance_id {
            validate::reference("instance_id", iid)?;
        }
        for _ in 0..CONFLICT_RETRIES {
            let found = self.resolve_container(id_or_name).await?;
            let c = &found.value;
            if c.deleting {
                return Err(ServiceError::Conflict(format!(
                    "container {} is being deleted",
                    c.container_id
                )));
            }
            let (kvs, _) = self
                .store
                .get_prefix(&keys::instances_prefix(&c.container_id))
                .await?;
            let mut active: Vec<Versioned<InstanceRecord>> = Vec::with_capacity(kvs.len());
            for kv in &kvs {
                let inst: Versioned<InstanceRecord> = decode_versioned(kv)?;
                if !inst.value.stopping {
                    active.push(inst);
                }
            }
            if let Some(iid) = instance_id {
                active.retain(|i| i.value.instance_id == iid);
                if active.is_empty() {
                    return Err(ServiceError::NotFound(format!(
                        "instance {iid} of container {} not found",
                        c.container_id
                    )));
                }
            }
            // Without an instance the request is about the container: replicas created later (scale
            // up, replacements) follow it.
            let container_stopped = match (instance_id, action) {
                (Some(_), _) => c.stopped,
                (None, Action::Stop) => true,
                (None, Action::Start | Action::Restart) => false,
            };
            let changes: Vec<(&Versioned<InstanceRecord>, InstanceRecord)> = active
                .iter()
                .filter_map(|i| action.apply(&i.value).map(|next| (i, next)))
                .collect();
            let mut first = true;
            let mut lost = false;
            let mut chunks: Vec<&[(&Versioned<InstanceRecord>, InstanceRecord)]> =
                changes.chunks(BATCH).collect();
            if chunks.is_empty() {
                chunks.push(&[]);
            }
            for chunk in chunks {
                let mut compares = Vec::new();
                let mut ops = Vec::new();
                if first {
                    compares.push(Compare::mod_revision(
                        keys::container(&c.container_id),
                        CompareOp::Equal,
                        found.mod_revision,
                    ));
                    if container_stopped != c.stopped {
                        let mut record = c.clone();
                        record.stopped = container_stopped;
                        ops.push(TxnOp::put(
                            keys::container(&c.container_id),
                            to_json(&record),
                            None,
                        ));
                    }
                }
                for (inst, next) in chunk {
                    let key = keys::instance(&next.container_id, &next.instance_id);
                    compares.push(Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        inst.mod_revision,
                    ));
                    ops.push(TxnOp::put(key, to_json(next), None));
                }
                if ops.is_empty() {
                    continue;
                }
                if !self
                    .store
                    .txn(Txn::new().when(compares).and_then(ops))
                    .await?
                    .succeeded()
                {
                    // Records written by earlier chunks already carry the change: a retry skips them.
                    lost = true;
                    break;
                }
                first = false;
            }
            if lost {
                continue;
            }
            tracing::info!(container_id = %c.container_id, instance_id = instance_id.unwrap_or("*"),
                action = ?action, changed = changes.len(), "replicas asked to {}", action.status().to_lowercase());
            let mut event = Event::container(&c.container_id, action.event_type());
            event = event.with_reason(match instance_id {
                Some(iid) => format!("instance {iid}"),
                None => "all replicas".to_owned(),
            });
            self.events.emit(event);
            return Ok(action.status());
        }
        Err(ServiceError::Conflict(format!(
            "container {id_or_name} changed concurrently, try again"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(stopped: bool, generation: u32) -> InstanceRecord {
        InstanceRecord {
            instance_id: "ins-1".into(),
            node_id: "n1".into(),
            stopped,
            restart_generation: generation,
            ..Default::default()
        }
    }

    #[test]
    fn actions_flip_only_what_they_must() {
        assert!(Action::Stop.apply(&placed(false, 0)).unwrap().stopped);
        assert_eq!(Action::Stop.apply(&placed(true, 0)), None);
        assert!(!Action::Start.apply(&placed(true, 0)).unwrap().stopped);
        assert_eq!(Action::Start.apply(&placed(false, 0)), None);
        let restarted = Action::Restart.apply(&placed(false, 4)).unwrap();
        assert_eq!(
            (restarted.stopped, restarted.restart_generation),
            (false, 5)
        );
        // Restarting a stopped replica starts it; its process was not running, so no new generation.
        let started = Action::Restart.apply(&placed(true, 4)).unwrap();
        assert_eq!((started.stopped, started.restart_generation), (false, 4));
        // Unplaced: nothing runs yet, nothing to restart.
        let unplaced = InstanceRecord::default();
        assert_eq!(Action::Restart.apply(&unplaced), None);
    }
}
