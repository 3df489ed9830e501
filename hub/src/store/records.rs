//! The JSON records stored under the keys of [`super::keys`]. They are the hub's domain types; the
//! wire types of `berth_proto::v1` are built from them at the API edge.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `/berth/networks/{id}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// `net-` + 12 hex digits.
    pub network_id: String,
    /// Unique DNS-1123 label.
    pub name: String,
    /// Network address in CIDR form.
    pub cidr: String,
    /// First host address.
    pub gateway: String,
    /// RFC 3339.
    pub created_at: String,
    /// Node-to-node traffic goes through WireGuard.
    #[serde(default)]
    pub encrypted: bool,
    /// VXLAN network identifier, claimed under `/berth/vni/{vni}`.
    #[serde(default)]
    pub vni: u32,
    /// Ids of the networks linked to this one (kept symmetric: both records list each other).
    #[serde(default)]
    pub links: Vec<String>,
}

/// `/berth/containers/{id}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// `ctr-` + 12 hex digits.
    pub container_id: String,
    /// Unique DNS-1123 label, or empty.
    #[serde(default)]
    pub name: String,
    /// Image reference as given.
    pub image: String,
    /// The network every replica joins.
    pub network_id: String,
    /// Requested cpu per replica.
    pub cpu_millis: u64,
    /// Requested memory per replica.
    pub memory_bytes: u64,
    /// Desired replica count.
    pub replicas: u32,
    /// Replaces the image's entrypoint and cmd when non-empty.
    #[serde(default)]
    pub command: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// RFC 3339.
    pub created_at: String,
    /// Set by a delete: replicas are being stopped, then the record goes.
    #[serde(default)]
    pub deleting: bool,
    /// Ordinal the next new instance gets (ordinals are never reused).
    #[serde(default)]
    pub next_ordinal: u32,
    /// Virtual IP of the container's service, claimed under `/berth/vips/{ip}`.
    #[serde(default)]
    pub service_ip: String,
    /// "always", "on-failure" or "never" (empty in older records: "always").
    #[serde(default)]
    pub restart_policy: String,
    /// With "on-failure": restarts allowed per instance (0: no limit).
    #[serde(default)]
    pub max_restarts: u32,
}

/// `/berth/instances/{container_id}/{instance_id}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// `ins-` + 12 hex digits.
    pub instance_id: String,
    /// Owner.
    pub container_id: String,
    /// The owner's network (where the address is claimed).
    pub network_id: String,
    /// Creation order within the container; scale-down removes the highest first.
    pub ordinal: u32,
    /// Empty while unplaced.
    #[serde(default)]
    pub node_id: String,
    /// Empty while unplaced.
    #[serde(default)]
    pub ip: String,
    /// Why the scheduler could not place it (empty otherwise).
    #[serde(default)]
    pub reason: String,
    /// Scaled away or deleted: its assignment is gone and the hub waits for the node to report it removed.
    #[serde(default)]
    pub stopping: bool,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, when it was placed; empty while unplaced.
    #[serde(default)]
    pub placed_at: String,
}

/// `/berth/status/{container_id}/{instance_id}`: the last status its node reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// "PENDING", "PULLING", "CREATING", "RUNNING", "FAILED" or "STOPPED".
    pub status: String,
    /// Why it is FAILED (or PENDING); may be empty.
    #[serde(default)]
    pub reason: String,
    /// Node that reported it.
    pub node_id: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Milliseconds each agent-side deploy phase took (kept from the last report that had them).
    #[serde(default)]
    pub phases_ms: BTreeMap<String, f64>,
    /// Times the node restarted the instance.
    #[serde(default)]
    pub restarts: u32,
}

/// `/berth/nodes/{node_id}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// As the agent calls itself.
    pub node_id: String,
    /// The agent's host name.
    pub hostname: String,
    /// Address the node is reachable on.
    pub ip: String,
    /// Capacity offered.
    pub cpu_millis: u64,
    /// Capacity offered.
    pub memory_bytes: u64,
    /// etcd lease that `/berth/alive/{node_id}` is bound to; any hub replica keeps it alive on heartbeats.
    pub lease_id: i64,
    /// RFC 3339.
    pub registered_at: String,
    /// WireGuard address, claimed under `/berth/tunnels/{ip}`; kept across re-registrations.
    #[serde(default)]
    pub tunnel_ip: String,
    /// Base64 WireGuard public key the agent published.
    #[serde(default)]
    pub wireguard_public_key: String,
}
