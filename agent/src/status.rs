//! The node's instance board: what the reconciler last decided about each local instance, shared
//! read-only with the metrics endpoint and the agent API.
//!
//! The reconciler stays the only writer of its own table (no lock on its hot path); it mirrors each
//! change here with a short write lock. Readers (a scrape, a stats request) take a cloned snapshot
//! and never hold the lock while they read cgroups or eBPF maps.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use berth_proto::v1::InstanceStatus;

/// One local instance as the reconciler last saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct BoardEntry {
    /// Instance id.
    pub instance_id: String,
    /// The container (replica set) it belongs to.
    pub container_id: String,
    /// The container's user-facing name ("" when none).
    pub container_name: String,
    /// The status last reported to the hub.
    pub status: InstanceStatus,
    /// Times the node restarted it.
    pub restarts: u32,
    /// CPU requested, in millicores (node allocation).
    pub cpu_millis: u64,
    /// Memory requested, in bytes (node allocation).
    pub memory_bytes: u64,
    /// `sha256:…` of the image manifest it runs ("" before the pull).
    pub image_digest: String,
}

/// Shared, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct InstanceBoard {
    inner: Arc<RwLock<HashMap<String, BoardEntry>>>,
}

impl InstanceBoard {
    /// An empty board.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records (or replaces) an instance's entry.
    pub fn set(&self, entry: BoardEntry) {
        // A poisoned lock only means a reader panicked mid-clone; the map itself is intact.
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.insert(entry.instance_id.clone(), entry);
    }

    /// Forgets an instance (it was removed from the node).
    pub fn remove(&self, instance_id: &str) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.remove(instance_id);
    }

    /// One instance's entry.
    pub fn get(&self, instance_id: &str) -> Option<BoardEntry> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.get(instance_id).cloned()
    }

    /// Every entry, sorted by instance id (stable output for scrapes).
    pub fn snapshot(&self) -> Vec<BoardEntry> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<BoardEntry> = map.values().cloned().collect();
        all.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, status: InstanceStatus) -> BoardEntry {
        BoardEntry {
            instance_id: id.into(),
            container_id: "ctr-1".into(),
            container_name: "web".into(),
            status,
            restarts: 0,
            cpu_millis: 100,
            memory_bytes: 1 << 20,
            image_digest: String::new(),
        }
    }

    #[test]
    fn set_replaces_and_remove_forgets() {
        let board = InstanceBoard::new();
        let reader = board.clone();
        board.set(entry("b", InstanceStatus::Running));
        board.set(entry("a", InstanceStatus::Pulling));
        board.set(entry("a", InstanceStatus::Running));
        let ids: Vec<_> = reader
            .snapshot()
            .into_iter()
            .map(|e| e.instance_id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(reader.get("a").unwrap().status, InstanceStatus::Running);
        board.remove("a");
        assert!(reader.get("a").is_none());
        assert_eq!(reader.snapshot().len(), 1);
    }
}
