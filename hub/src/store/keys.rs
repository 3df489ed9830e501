//! The etcd key layout. Every key the hub reads or writes is built here, so the layout is in one place.
//!
//! ```text
//! /berth/networks/{network_id}                  NetworkRecord (JSON)
//! /berth/names/networks/{name}                  network_id        (uniqueness of names)
//! /berth/netuse/{network_id}/{container_id}     ""                (a container uses the network)
//! /berth/containers/{container_id}              ContainerRecord (JSON)
//! /berth/names/containers/{name}                container_id
//! /berth/instances/{container_id}/{instance_id} InstanceRecord (JSON): ordinal, placement, stopping
//! /berth/owners/{instance_id}                   container_id      (agents only know instance ids)
//! /berth/status/{container_id}/{instance_id}    StatusRecord (JSON), written from agent reports
//! /berth/ipam/{network_id}/{ip}                 instance_id       (an address claim)
//! /berth/nodes/{node_id}                        NodeRecord (JSON): registration + lease id
//! /berth/alive/{node_id}                        "" bound to the node's lease: present = HEALTHY
//! /berth/assign/{node_id}/{instance_id}         berth.v1.Assignment (protobuf)
//! /berth/stopping/{node_id}/{instance_id}       ""                (stopped, removal not yet reported)
//! /berth/vni/{vni}                              network_id        (a VXLAN id claim)
//! /berth/vips/{ip}                              container_id      (a service IP claim)
//! /berth/tunnels/{ip}                           node_id           (a WireGuard address claim)
//! /berth/netview/{node_id}                      berth.v1.NetworkView (protobuf), written by the leader
//! /berth/down/{node_id}                         ""  the leader declared the node DOWN (its instances moved)
//! /berth/revisions/{container_id}/{rev:010}     RevisionRecord (JSON): one version of a container's spec
//! /berth/election/scheduler                     etcd election: the hub replica that schedules
//! /berth/ca                                     the cluster CA (JSON: certificate and key, PEM)
//! /berth/migrations/{migration_id}              MigrationRecord (JSON): a live migration job
//! ```

/// Everything berth owns lives under this prefix.
pub const ROOT: &str = "/berth/";
/// Prefix of network records.
pub const NETWORKS: &str = "/berth/networks/";
/// Prefix of container records.
pub const CONTAINERS: &str = "/berth/containers/";
/// Prefix of instance records (then `{container_id}/`).
pub const INSTANCES: &str = "/berth/instances/";
/// Prefix of instance-to-container index keys.
pub const OWNERS: &str = "/berth/owners/";
/// Prefix of instance status records (then `{container_id}/`).
pub const STATUS: &str = "/berth/status/";
/// Prefix of IP claims (then `{network_id}/`).
pub const IPAM: &str = "/berth/ipam/";
/// Prefix of node records.
pub const NODES: &str = "/berth/nodes/";
/// Prefix of lease-bound liveness keys.
pub const ALIVE: &str = "/berth/alive/";
/// Prefix of assignments (then `{node_id}/`).
pub const ASSIGN: &str = "/berth/assign/";
/// Prefix of network-in-use markers (then `{network_id}/`).
pub const NETUSE: &str = "/berth/netuse/";
/// Election name of the scheduler leader.
pub const ELECTION: &str = "/berth/election/scheduler";
/// The cluster CA (`crate::ca`), shared by every hub replica.
pub const CA: &str = "/berth/ca";

/// `/berth/networks/{id}`
pub fn network(id: &str) -> String {
    format!("{NETWORKS}{id}")
}

/// `/berth/names/networks/{name}`
pub fn network_name(name: &str) -> String {
    format!("/berth/names/networks/{name}")
}

/// `/berth/netuse/{network_id}/`
pub fn netuse_prefix(network_id: &str) -> String {
    format!("{NETUSE}{network_id}/")
}

/// `/berth/netuse/{network_id}/{container_id}`
pub fn netuse(network_id: &str, container_id: &str) -> String {
    format!("{NETUSE}{network_id}/{container_id}")
}

/// `/berth/containers/{id}`
pub fn container(id: &str) -> String {
    format!("{CONTAINERS}{id}")
}

/// `/berth/names/containers/{name}`
pub fn container_name(name: &str) -> String {
    format!("/berth/names/containers/{name}")
}

/// `/berth/instances/{container_id}/`
pub fn instances_prefix(container_id: &str) -> String {
    format!("{INSTANCES}{container_id}/")
}

/// `/berth/instances/{container_id}/{instance_id}`
pub fn instance(container_id: &str, instance_id: &str) -> String {
    format!("{INSTANCES}{container_id}/{instance_id}")
}

/// `/berth/owners/{instance_id}`
pub fn owner(instance_id: &str) -> String {
    format!("{OWNERS}{instance_id}")
}

/// `/berth/status/{container_id}/`
pub fn status_prefix(container_id: &str) -> String {
    format!("{STATUS}{container_id}/")
}

/// `/berth/status/{container_id}/{instance_id}`
pub fn status(container_id: &str, instance_id: &str) -> String {
    format!("{STATUS}{container_id}/{instance_id}")
}

/// `/berth/ipam/{network_id}/`
pub fn ipam_prefix(network_id: &str) -> String {
    format!("{IPAM}{network_id}/")
}

/// `/berth/ipam/{network_id}/{ip}`
pub fn ipam(network_id: &str, ip: &str) -> String {
    format!("{IPAM}{network_id}/{ip}")
}

/// `/berth/nodes/{node_id}`
pub fn node(node_id: &str) -> String {
    format!("{NODES}{node_id}")
}

/// `/berth/alive/{node_id}`
pub fn alive(node_id: &str) -> String {
    format!("{ALIVE}{node_id}")
}

/// Prefix of stopping markers (then `{node_id}/`).
pub const STOPPING: &str = "/berth/stopping/";

/// `/berth/stopping/{node_id}/`
pub fn stopping_prefix(node_id: &str) -> String {
    format!("{STOPPING}{node_id}/")
}

/// `/berth/stopping/{node_id}/{instance_id}`
pub fn stopping(node_id: &str, instance_id: &str) -> String {
    format!("{STOPPING}{node_id}/{instance_id}")
}

/// `/berth/assign/{node_id}/`
pub fn assign_prefix(node_id: &str) -> String {
    format!("{ASSIGN}{node_id}/")
}

/// `/berth/assign/{node_id}/{instance_id}`
pub fn assign(node_id: &str, instance_id: &str) -> String {
    format!("{ASSIGN}{node_id}/{instance_id}")
}

/// Prefix of VXLAN id claims.
pub const VNI: &str = "/berth/vni/";
/// Prefix of service IP claims.
pub const VIPS: &str = "/berth/vips/";
/// Prefix of WireGuard address claims.
pub const TUNNELS: &str = "/berth/tunnels/";
/// Prefix of the nodes' network views.
pub const NETVIEW: &str = "/berth/netview/";

/// `/berth/vni/{vni}`
pub fn vni(vni: u32) -> String {
    format!("{VNI}{vni}")
}

/// `/berth/vips/{ip}`
pub fn vip(ip: &str) -> String {
    format!("{VIPS}{ip}")
}

/// `/berth/tunnels/{ip}`
pub fn tunnel(ip: &str) -> String {
    format!("{TUNNELS}{ip}")
}

/// `/berth/netview/{node_id}`
pub fn netview(node_id: &str) -> String {
    format!("{NETVIEW}{node_id}")
}

/// Prefix of DOWN markers.
pub const DOWN: &str = "/berth/down/";

/// `/berth/down/{node_id}`
pub fn down(node_id: &str) -> String {
    format!("{DOWN}{node_id}")
}

/// Prefix of revision records (then `{container_id}/`).
pub const REVISIONS: &str = "/berth/revisions/";

/// `/berth/revisions/{container_id}/`
pub fn revisions_prefix(container_id: &str) -> String {
    format!("{REVISIONS}{container_id}/")
}

/// Prefix of migration jobs.
pub const MIGRATIONS: &str = "/berth/migrations/";

/// `/berth/migrations/{migration_id}`
pub fn migration(migration_id: &str) -> String {
    format!("{MIGRATIONS}{migration_id}")
}

/// `/berth/revisions/{container_id}/{revision:010}` (zero-padded so keys sort by revision).
pub fn revision(container_id: &str, revision: u32) -> String {
    format!("{REVISIONS}{container_id}/{revision:010}")
}
