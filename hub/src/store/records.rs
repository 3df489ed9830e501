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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The health probe, defaults filled in (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthRecord>,
    /// Signal a stop sends first (empty: the image's, else SIGTERM).
    #[serde(default)]
    pub stop_signal: String,
    /// Milliseconds between the stop signal and SIGKILL (0 in older records: the default).
    #[serde(default)]
    pub stop_timeout_ms: u64,
    /// Every replica was stopped on request (POST .../stop without an instance): new replicas are
    /// placed stopped too, until a start.
    #[serde(default)]
    pub stopped: bool,
    /// Current revision of the spec; image, cpu, memory, command and env above are its values.
    /// 0 in records older than revisions (treated as revision 1 without a revision record).
    #[serde(default)]
    pub revision: u32,
    /// The rolling update in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutRecord>,
    /// How the last rolling update ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rollout: Option<RolloutResultRecord>,
}

/// A health probe as stored: exactly one of `http`, `tcp`, `exec`, durations in the user's notation
/// with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthRecord {
    /// `GET http://<ip>:<port><path>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbeRecord>,
    /// A TCP connect to `<ip>:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbeRecord>,
    /// A command inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbeRecord>,
    /// Time between probes ("10s").
    pub interval: String,
    /// Time one probe may take ("1s").
    pub timeout: String,
    /// Consecutive failures that make a replica UNHEALTHY.
    pub failure_threshold: u32,
    /// Grace after start before failures count ("0s").
    pub start_period: String,
}

/// HTTP probe target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbeRecord {
    /// Absolute path, e.g. "/healthz".
    pub path: String,
    /// 1..=65535.
    pub port: u32,
}

/// TCP probe target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbeRecord {
    /// 1..=65535.
    pub port: u32,
}

/// Exec probe command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecProbeRecord {
    /// argv, non-empty.
    pub command: Vec<String>,
}

/// A rolling update in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// "UPDATING" or "ROLLING_BACK".
    pub state: String,
    /// The revision replicas are moved to (the container's current one).
    pub revision: u32,
    /// The last revision that ran everywhere; an automatic rollback returns to it.
    pub from_revision: u32,
    /// Replicas allowed out of service at once.
    pub max_unavailable: u32,
    /// Why a rollback started.
    #[serde(default)]
    pub reason: String,
    /// RFC 3339.
    pub started_at: String,
}

/// How a rolling update ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutResultRecord {
    /// The revision the replicas ended on.
    pub revision: u32,
    /// "COMPLETE" or "ROLLED_BACK".
    pub result: String,
    /// Why it was rolled back (empty when complete).
    #[serde(default)]
    pub reason: String,
    /// RFC 3339.
    pub finished_at: String,
}

/// `/berth/revisions/{container_id}/{revision:010}`: one version of a container's spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionRecord {
    /// 1, 2, ...
    pub revision: u32,
    /// Image reference as given.
    pub image: String,
    /// `sha256:…` of the manifest its replicas pulled (learnt from their nodes' reports).
    #[serde(default)]
    pub image_digest: String,
    /// cpu per replica.
    pub cpu_millis: u64,
    /// memory per replica.
    pub memory_bytes: u64,
    /// Entrypoint override.
    #[serde(default)]
    pub command: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// RFC 3339.
    pub created_at: String,
    /// "create", "update", "rollback to N", ...
    #[serde(default)]
    pub cause: String,
}

impl RevisionRecord {
    /// The image reference replicas of this revision run: pinned to the digest once one is known, so
    /// a rollback gets the bytes that ran before even if the tag moved since.
    pub fn pinned_image(&self) -> String {
        pin_image(&self.image, &self.image_digest)
    }
}

/// `image@digest` (replacing a digest the reference already carries); the image as is without one.
pub fn pin_image(image: &str, digest: &str) -> String {
    if digest.is_empty() {
        return image.to_owned();
    }
    let base = image.split_once('@').map_or(image, |(b, _)| b);
    format!("{base}@{digest}")
}

/// `/berth/instances/{container_id}/{instance_id}`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The container revision it runs (set when it is placed; 0 in older records).
    #[serde(default)]
    pub revision: u32,
    /// Stopped on request: placed (address and resources kept) but not running.
    #[serde(default)]
    pub stopped: bool,
    /// Bumped by each restart request; its node restarts the process when it changes.
    #[serde(default)]
    pub restart_generation: u32,
    /// The migration moving it, while one is in progress (at most one at a time).
    #[serde(default)]
    pub migration_id: String,
}

/// `/berth/migrations/{migration_id}`: a live migration of one instance to another node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// `mig-` + 12 hex digits.
    pub migration_id: String,
    pub container_id: String,
    pub instance_id: String,
    pub source_node: String,
    pub target_node: String,
    /// "IN_PROGRESS", "COMPLETED" or "FAILED".
    pub status: String,
    /// "PREPARE", "PRECOPY", "FREEZE", "TRANSFER", "RESTORE", "SWITCH" or "DONE".
    pub phase: String,
    /// "auto", "precopy", "stopcopy" or "postcopy": what was asked.
    pub mode: String,
    /// What the source runs it as: `mode` itself, or what `auto` chose by measurement; empty
    /// until the source says.
    #[serde(default)]
    pub chosen_mode: String,
    /// The write rate (MiB/s) the source measured to choose; absent unless `auto` measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_rate_mib_s: Option<f64>,
    /// Post-copy: the target runs the replica (it is the target's now) while its memory still
    /// arrives from the source; the job ends when the source has served every page.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub switched: bool,
    /// Post-copy: every page reached the target, as the source (last page served) or the target
    /// (memory complete) reported, possibly before the target's report that it runs the replica
    /// reached the hub.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pages_done: bool,
    #[serde(default)]
    pub rounds: u32,
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub pages_sent: u64,
    #[serde(default)]
    pub downtime_ms: u64,
    /// Why it failed (empty otherwise).
    #[serde(default)]
    pub error: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339: the last progress a node reported (the leader fails a job silent for too long).
    pub updated_at: String,
    /// RFC 3339; empty while in progress.
    #[serde(default)]
    pub finished_at: String,
}

impl MigrationRecord {
    /// Whether the job still runs.
    pub fn in_progress(&self) -> bool {
        self.status == "IN_PROGRESS"
    }
}

/// `/berth/status/{container_id}/{instance_id}`: the last status its node reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// `sha256:…` of the image manifest the node runs it from.
    #[serde(default)]
    pub image_digest: String,
}

/// `/berth/nodes/{node_id}`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// `host:port` of the agent API (logs, stats); empty when it serves none.
    #[serde(default)]
    pub api_addr: String,
    /// `host:port` of the agent's migration endpoint; empty: it takes part in no migration.
    #[serde(default)]
    pub migration_addr: String,
    /// Cordoned (`POST /v1/nodes/{id}/drain`): nothing new is placed or migrated here; what runs
    /// here keeps running. Kept across re-registrations; cleared by `/uncordon`.
    #[serde(default)]
    pub unschedulable: bool,
}
