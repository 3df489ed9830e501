//! All of berth's state read at one etcd revision, indexed for the reconciler and the list views.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use etcd_client::KeyValue;

use super::keys;
use super::records::{
    ContainerRecord, InstanceRecord, MigrationRecord, NetworkRecord, NodeRecord, RevisionRecord,
    StatusRecord,
};
use super::{decode_string, decode_versioned, StoreError, Versioned};

/// An instance with its reported status.
#[derive(Debug, Clone)]
pub struct StoredInstance {
    /// The record and its revisions.
    pub record: Versioned<InstanceRecord>,
    /// What its node last reported, if anything.
    pub status: Option<StatusRecord>,
}

/// Everything under `/berth/` at `revision`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Revision of the read.
    pub revision: i64,
    /// By network id.
    pub networks: BTreeMap<String, Versioned<NetworkRecord>>,
    /// By container id.
    pub containers: BTreeMap<String, Versioned<ContainerRecord>>,
    /// By container id, then instance id.
    pub instances: BTreeMap<String, BTreeMap<String, StoredInstance>>,
    /// By node id.
    pub nodes: BTreeMap<String, Versioned<NodeRecord>>,
    /// Node ids whose liveness key exists.
    pub alive: BTreeSet<String>,
    /// By network id: claimed addresses → instance id.
    pub ipam: HashMap<String, BTreeMap<String, String>>,
    /// (node id, instance id) of every assignment → its encoded `berth.v1.Assignment`.
    pub assignments: BTreeMap<(String, String), Vec<u8>>,
    /// By container id, then revision number.
    pub revisions: BTreeMap<String, BTreeMap<u32, RevisionRecord>>,
    /// By node id: the encoded network view last published.
    pub netviews: BTreeMap<String, Vec<u8>>,
    /// Nodes the leader declared DOWN (and moved the instances of).
    pub down: BTreeSet<String>,
    /// By migration id.
    pub migrations: BTreeMap<String, Versioned<MigrationRecord>>,
}

impl Snapshot {
    /// Indexes the key-values of a prefix read of `/berth/`.
    pub fn from_kvs(kvs: &[KeyValue], revision: i64) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot {
            revision,
            ..Snapshot::default()
        };
        let mut statuses: HashMap<(String, String), StatusRecord> = HashMap::new();
        for kv in kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if let Some(id) = key.strip_prefix(keys::NETWORKS) {
                snap.networks.insert(id.to_owned(), decode_versioned(kv)?);
            } else if let Some(id) = key.strip_prefix(keys::CONTAINERS) {
                snap.containers.insert(id.to_owned(), decode_versioned(kv)?);
            } else if let Some(rest) = key.strip_prefix(keys::INSTANCES) {
                if let Some((cid, iid)) = rest.split_once('/') {
                    let record = decode_versioned(kv)?;
                    snap.instances.entry(cid.to_owned()).or_default().insert(
                        iid.to_owned(),
                        StoredInstance {
                            record,
                            status: None,
                        },
                    );
                }
            } else if let Some(rest) = key.strip_prefix(keys::STATUS) {
                if let Some((cid, iid)) = rest.split_once('/') {
                    let status: Versioned<StatusRecord> = decode_versioned(kv)?;
                    statuses.insert((cid.to_owned(), iid.to_owned()), status.value);
                }
            } else if let Some(id) = key.strip_prefix(keys::NODES) {
                snap.nodes.insert(id.to_owned(), decode_versioned(kv)?);
            } else if let Some(id) = key.strip_prefix(keys::ALIVE) {
                snap.alive.insert(id.to_owned());
            } else if let Some(rest) = key.strip_prefix(keys::IPAM) {
                if let Some((nid, ip)) = rest.split_once('/') {
                    snap.ipam
                        .entry(nid.to_owned())
                        .or_default()
                        .insert(ip.to_owned(), decode_string(kv)?);
                }
            } else if let Some(id) = key.strip_prefix(keys::MIGRATIONS) {
                snap.migrations.insert(id.to_owned(), decode_versioned(kv)?);
            } else if let Some(node) = key.strip_prefix(keys::DOWN) {
                snap.down.insert(node.to_owned());
            } else if let Some(node) = key.strip_prefix(keys::NETVIEW) {
                snap.netviews.insert(node.to_owned(), kv.value().to_vec());
            } else if let Some(rest) = key.strip_prefix(keys::ASSIGN) {
                if let Some((node, iid)) = rest.split_once('/') {
                    snap.assignments
                        .insert((node.to_owned(), iid.to_owned()), kv.value().to_vec());
                }
            } else if let Some(rest) = key.strip_prefix(keys::REVISIONS) {
                if let Some((cid, _)) = rest.split_once('/') {
                    let rev: Versioned<RevisionRecord> = decode_versioned(kv)?;
                    snap.revisions
                        .entry(cid.to_owned())
                        .or_default()
                        .insert(rev.value.revision, rev.value);
                }
            }
        }
        for ((cid, iid), status) in statuses {
            if let Some(inst) = snap.instances.get_mut(&cid).and_then(|m| m.get_mut(&iid)) {
                inst.status = Some(status);
            }
        }
        Ok(snap)
    }

    /// Every instance of every container.
    pub fn all_instances(&self) -> impl Iterator<Item = &StoredInstance> {
        self.instances.values().flat_map(|m| m.values())
    }

    /// Instances of one container (empty when it has none).
    pub fn instances_of(&self, container_id: &str) -> Vec<&StoredInstance> {
        self.instances
            .get(container_id)
            .map(|m| m.values().collect())
            .unwrap_or_default()
    }

    /// The spec revision `revision` of a container: its record, or (pruned, or a record older than
    /// revisions) the container's current spec.
    pub fn revision_of(&self, c: &ContainerRecord, revision: u32) -> RevisionRecord {
        self.revisions
            .get(&c.container_id)
            .and_then(|m| m.get(&revision))
            .cloned()
            .unwrap_or_else(|| current_revision(c))
    }
}

/// The container's current spec as a revision record (no digest known).
pub fn current_revision(c: &ContainerRecord) -> RevisionRecord {
    RevisionRecord {
        revision: c.revision.max(1),
        image: c.image.clone(),
        image_digest: String::new(),
        cpu_millis: c.cpu_millis,
        memory_bytes: c.memory_bytes,
        command: c.command.clone(),
        env: c.env.clone(),
        created_at: c.created_at.clone(),
        cause: String::new(),
    }
}
