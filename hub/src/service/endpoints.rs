//! Where a container's replicas can be asked about directly: their node's agent API (logs, stats).

use super::view::instance_status;
use super::{Service, ServiceError};
use crate::store::records::{InstanceRecord, NodeRecord, StatusRecord};
use crate::store::{decode_versioned, keys, StoredInstance, Versioned};

/// One placed replica and the agent API of its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEndpoint {
    /// The replica.
    pub instance_id: String,
    /// Its node.
    pub node_id: String,
    /// Its status as users see it.
    pub status: String,
    /// `host:port` of the node's agent API; empty when the node serves none.
    pub api_addr: String,
}

impl Service {
    /// The container's id and its replicas (desired ones, by ordinal) with their nodes' agent APIs.
    pub async fn instance_endpoints(
        &self,
        id_or_name: &str,
    ) -> Result<(String, Vec<InstanceEndpoint>), ServiceError> {
        let found = self.resolve_container(id_or_name).await?;
        let cid = found.value.container_id.clone();
        let (kvs, _) = self.store.get_prefix(&keys::instances_prefix(&cid)).await?;
        let mut instances: Vec<Versioned<InstanceRecord>> =
            kvs.iter().map(decode_versioned).collect::<Result<_, _>>()?;
        instances.retain(|i| !i.value.stopping || found.value.deleting);
        instances.sort_by_key(|i| i.value.ordinal);
        let mut out = Vec::with_capacity(instances.len());
        for inst in instances {
            let r = &inst.value;
            let status = self
                .store
                .get_json::<StatusRecord>(&keys::status(&cid, &r.instance_id))
                .await?
                .map(|s| s.value);
            let api_addr = if r.node_id.is_empty() {
                String::new()
            } else {
                self.store
                    .get_json::<NodeRecord>(&keys::node(&r.node_id))
                    .await?
                    .map(|n| n.value.api_addr)
                    .unwrap_or_default()
            };
            let stored = StoredInstance {
                record: inst.clone(),
                status,
            };
            out.push(InstanceEndpoint {
                instance_id: r.instance_id.clone(),
                node_id: r.node_id.clone(),
                status: instance_status(&stored).0,
                api_addr,
            });
        }
        Ok((cid, out))
    }

    /// The replica a per-replica request is about: the one named, or the container's only (or first
    /// running) one when none is named.
    pub async fn instance_endpoint(
        &self,
        id_or_name: &str,
        instance_id: Option<&str>,
    ) -> Result<InstanceEndpoint, ServiceError> {
        let (cid, all) = self.instance_endpoints(id_or_name).await?;
        let chosen = match instance_id.filter(|i| !i.is_empty()) {
            Some(iid) => all
                .into_iter()
                .find(|e| e.instance_id == iid)
                .ok_or_else(|| {
                    ServiceError::NotFound(format!("instance {iid} of container {cid} not found"))
                })?,
            None => {
                let running = all.iter().position(|e| e.status == "RUNNING");
                match (all.len(), running) {
                    (0, _) => {
                        return Err(ServiceError::NotFound(format!(
                            "container {cid} has no replica"
                        )))
                    }
                    (_, Some(i)) => all[i].clone(),
                    _ => all[0].clone(),
                }
            }
        };
        if chosen.node_id.is_empty() {
            return Err(ServiceError::Unavailable(format!(
                "instance {} is not placed on a node yet",
                chosen.instance_id
            )));
        }
        if chosen.api_addr.is_empty() {
            return Err(ServiceError::Unavailable(format!(
                "node {} of instance {} serves no agent API (--listen-api)",
                chosen.node_id, chosen.instance_id
            )));
        }
        Ok(chosen)
    }
}
