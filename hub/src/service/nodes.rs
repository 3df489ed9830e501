//! Nodes as clients see them: registration, health, capacity left.

use super::view::{node_to_proto, NodeHealth};
use super::{validate, Service, ServiceError};
use crate::store::Snapshot;
use berth_proto::v1;

impl Service {
    /// Every registered node, by id.
    pub async fn list_nodes(&self) -> Result<Vec<v1::Node>, ServiceError> {
        let snap = self.store.snapshot().await?;
        Ok(snap
            .nodes
            .keys()
            .map(|id| node_view(&snap, id))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default())
    }

    /// One node by id.
    pub async fn get_node(&self, node_id: &str) -> Result<v1::Node, ServiceError> {
        validate::reference("node_id", node_id)?;
        let snap = self.store.snapshot().await?;
        node_view(&snap, node_id)
            .ok_or_else(|| ServiceError::NotFound(format!("node {node_id} not found")))
    }
}

fn node_view(snap: &Snapshot, node_id: &str) -> Option<v1::Node> {
    let node = snap.nodes.get(node_id)?;
    let placed: Vec<_> = snap
        .all_instances()
        .filter(|i| i.record.value.node_id == node_id)
        .filter_map(|i| {
            snap.containers
                .get(&i.record.value.container_id)
                .map(|c| (&c.value, i))
        })
        .collect();
    let health = if snap.alive.contains(node_id) {
        NodeHealth::Healthy
    } else if snap.down.contains(node_id) {
        NodeHealth::Down
    } else {
        NodeHealth::Unhealthy
    };
    Some(node_to_proto(&node.value, health, &placed))
}
