//! JSON shapes of the REST API and strict body parsing: unknown fields, wrong types and missing required
//! fields are 400s naming the field (axum's `Json` extractor would answer 422 without the field).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::service::view::{health_from_proto, status_from_proto};
use crate::service::{CreateContainer, ServiceError, UpdateContainer};
use crate::store::records::{ExecProbeRecord, HealthRecord, HttpProbeRecord, TcpProbeRecord};
use berth_proto::v1;

/// `POST /v1/networks`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNetworkBody {
    /// Unique DNS-1123 label.
    pub name: String,
    /// Network address, e.g. "10.10.0.0/16".
    pub cidr: String,
    /// Node-to-node traffic through WireGuard.
    #[serde(default)]
    pub encrypted: bool,
}

/// `POST /v1/networks/{id}/links`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    /// The network to link with (id or name).
    pub network_id: String,
}

/// `POST /v1/containers`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateContainerBody {
    /// Image reference (required).
    pub image: String,
    /// cpu per replica; default "0.1".
    #[serde(default)]
    pub cpu: Option<String>,
    /// memory per replica; default "64MiB".
    #[serde(default)]
    pub memory: Option<String>,
    /// Network id or name; default: the "default" network.
    #[serde(default)]
    pub network_id: Option<String>,
    /// Desired replicas; default 1.
    #[serde(default)]
    pub replicas: Option<i64>,
    /// Optional unique name.
    #[serde(default)]
    pub name: Option<String>,
    /// Replaces the image's entrypoint and cmd.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Extra environment.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// "always" (default), "on-failure" or "never".
    #[serde(default)]
    pub restart_policy: Option<String>,
    /// With "on-failure": restarts allowed per instance (0: no limit).
    #[serde(default)]
    pub max_restarts: Option<i64>,
    /// Health probe.
    #[serde(default)]
    pub health: Option<HealthBody>,
    /// "SIGTERM", "TERM", "15"; default: the image's StopSignal, else SIGTERM.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// Grace between the stop signal and SIGKILL; default "10s".
    #[serde(default)]
    pub stop_timeout: Option<String>,
}

/// `health` of a create body: exactly one of `http`, `tcp`, `exec`; the rest optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthBody {
    /// `{"path": "/healthz", "port": 8080}`
    #[serde(default)]
    pub http: Option<HttpProbeRecord>,
    /// `{"port": 5432}`
    #[serde(default)]
    pub tcp: Option<TcpProbeRecord>,
    /// `{"command": ["cat", "/ready"]}`
    #[serde(default)]
    pub exec: Option<ExecProbeRecord>,
    /// Default "10s".
    #[serde(default)]
    pub interval: Option<String>,
    /// Default "1s".
    #[serde(default)]
    pub timeout: Option<String>,
    /// Default 3.
    #[serde(default)]
    pub failure_threshold: Option<u32>,
    /// Default "0s".
    #[serde(default)]
    pub start_period: Option<String>,
}

impl From<HealthBody> for HealthRecord {
    fn from(b: HealthBody) -> Self {
        HealthRecord {
            http: b.http,
            tcp: b.tcp,
            exec: b.exec,
            interval: b.interval.unwrap_or_default(),
            timeout: b.timeout.unwrap_or_default(),
            failure_threshold: b.failure_threshold.unwrap_or_default(),
            start_period: b.start_period.unwrap_or_default(),
        }
    }
}

/// `POST /v1/containers/{id}/stop|start|restart` (the body is optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleBody {
    /// One replica; absent: all of them.
    #[serde(default)]
    pub instance_id: Option<String>,
}

/// `POST /v1/containers/{id}/update`: absent fields keep their value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    /// New image.
    #[serde(default)]
    pub image: Option<String>,
    /// New cpu per replica.
    #[serde(default)]
    pub cpu: Option<String>,
    /// New memory per replica.
    #[serde(default)]
    pub memory: Option<String>,
    /// Replaces the environment.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Replaces the command (`[]`: the image's).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Replicas out of service at once; default 1.
    #[serde(default)]
    pub max_unavailable: Option<i64>,
}

impl From<UpdateBody> for UpdateContainer {
    fn from(b: UpdateBody) -> Self {
        UpdateContainer {
            image: b.image,
            cpu: b.cpu,
            memory: b.memory,
            env: b.env,
            command: b.command,
            max_unavailable: b.max_unavailable.unwrap_or(0),
        }
    }
}

/// `POST /v1/containers/{id}/rollback` (the body is optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// The revision to return to; absent: the one before the current one.
    #[serde(default)]
    pub revision: Option<u32>,
}

/// One revision of a container's spec.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct RevisionJson {
    /// 1, 2, ...
    pub revision: u32,
    /// Image as given.
    pub image: String,
    /// `sha256:…` its replicas ran (empty until known); rollbacks pin the image to it.
    pub image_digest: String,
    /// cpu per replica.
    pub cpu: String,
    /// memory per replica.
    pub memory: String,
    /// Entrypoint override.
    pub command: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// RFC 3339.
    pub created_at: String,
    /// "create", "update", ...
    pub cause: String,
    /// The container's current revision.
    pub current: bool,
}

impl From<v1::Revision> for RevisionJson {
    fn from(r: v1::Revision) -> Self {
        RevisionJson {
            revision: r.revision,
            image: r.image,
            image_digest: r.image_digest,
            cpu: r.cpu,
            memory: r.memory,
            command: r.command,
            env: r.env.into_iter().collect(),
            created_at: r.created_at,
            cause: r.cause,
            current: r.current,
        }
    }
}

impl From<CreateContainerBody> for CreateContainer {
    fn from(b: CreateContainerBody) -> Self {
        CreateContainer {
            image: b.image,
            cpu: b.cpu.unwrap_or_default(),
            memory: b.memory.unwrap_or_default(),
            network_id: b.network_id.unwrap_or_default(),
            replicas: b.replicas,
            name: b.name.unwrap_or_default(),
            command: b.command.unwrap_or_default(),
            env: b.env.unwrap_or_default(),
            restart_policy: b.restart_policy.unwrap_or_default(),
            max_restarts: b.max_restarts,
            health: b.health.map(HealthRecord::from),
            stop_signal: b.stop_signal.unwrap_or_default(),
            stop_timeout: b.stop_timeout.unwrap_or_default(),
        }
    }
}

/// `POST /v1/containers/{id}/scale`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleBody {
    /// New desired replica count.
    pub replicas: i64,
}

/// A network.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct NetworkJson {
    /// `net-…`
    pub network_id: String,
    /// Name.
    pub name: String,
    /// CIDR.
    pub cidr: String,
    /// First host address.
    pub gateway: String,
    /// RFC 3339.
    pub created_at: String,
    /// Node-to-node traffic through WireGuard.
    #[serde(default)]
    pub encrypted: bool,
    /// VXLAN id of the overlay.
    #[serde(default)]
    pub vni: u32,
    /// Networks whose instances may reach this one's.
    #[serde(default)]
    pub linked_network_ids: Vec<String>,
}

impl From<v1::Network> for NetworkJson {
    fn from(n: v1::Network) -> Self {
        NetworkJson {
            network_id: n.network_id,
            name: n.name,
            cidr: n.cidr,
            gateway: n.gateway,
            created_at: n.created_at,
            encrypted: n.encrypted,
            vni: n.vni,
            linked_network_ids: n.linked_network_ids,
        }
    }
}

/// One replica.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct InstanceJson {
    /// `ins-…`
    pub instance_id: String,
    /// Empty while unplaced.
    pub node_id: String,
    /// Empty while unplaced.
    pub ip: String,
    /// "PENDING", "RUNNING", …
    pub status: String,
    /// Why it is PENDING or FAILED.
    pub reason: String,
    /// Milliseconds per deploy phase ("schedule", "pull", "rootfs", "create", "network", "start").
    pub phases_ms: BTreeMap<String, f64>,
    /// Times its node restarted it.
    #[serde(default)]
    pub restarts: u32,
    /// RFC 3339: when its node last reported its status.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub updated_at: String,
    /// The container revision it runs.
    #[serde(default)]
    pub revision: u32,
    /// `sha256:…` of the image its node runs it from.
    #[serde(default)]
    pub image_digest: String,
    /// Stopped on request.
    #[serde(default)]
    pub stopped: bool,
}

/// A container.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ContainerJson {
    /// `ctr-…`
    pub container_id: String,
    /// Name (may be empty).
    pub name: String,
    /// Image reference.
    pub image: String,
    /// DEPLOYING, RUNNING, FAILED or DELETING.
    pub status: String,
    /// First running replica's node.
    pub node_id: String,
    /// First running replica's address.
    pub ip: String,
    /// Network.
    pub network_id: String,
    /// cpu per replica, in cores.
    pub cpu: String,
    /// memory per replica.
    pub memory: String,
    /// RFC 3339.
    pub created_at: String,
    /// Desired replicas.
    pub replicas: u32,
    /// The replicas.
    pub instances: Vec<InstanceJson>,
    /// Entrypoint override.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// cpu per replica in millicores.
    pub cpu_millis: u64,
    /// memory per replica in bytes.
    pub memory_bytes: u64,
    /// Virtual IP load-balancing over the running replicas.
    #[serde(default)]
    pub service_ip: String,
    /// `<name>.<network>.berth`, resolving to `service_ip`.
    #[serde(default)]
    pub dns_name: String,
    /// "always", "on-failure" or "never".
    #[serde(default)]
    pub restart_policy: String,
    /// With "on-failure": restarts allowed per instance (0: no limit).
    #[serde(default)]
    pub max_restarts: u32,
    /// The health probe, defaults filled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthRecord>,
    /// Signal a stop sends first ("": the image's, else SIGTERM).
    #[serde(default)]
    pub stop_signal: String,
    /// Grace before SIGKILL.
    #[serde(default)]
    pub stop_timeout: String,
    /// Current revision.
    #[serde(default)]
    pub revision: u32,
    /// The rolling update in progress.
    #[serde(default)]
    pub rollout: Option<RolloutJson>,
    /// How the last rolling update ended.
    #[serde(default)]
    pub last_rollout: Option<RolloutResultJson>,
}

/// A rolling update in progress.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct RolloutJson {
    /// "UPDATING" or "ROLLING_BACK".
    pub state: String,
    /// Target revision.
    pub revision: u32,
    /// The revision it replaces.
    pub from_revision: u32,
    /// Replicas out of service at once.
    pub max_unavailable: u32,
    /// Why a rollback started.
    pub reason: String,
    /// RFC 3339.
    pub started_at: String,
}

/// How the last rolling update ended.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct RolloutResultJson {
    /// The revision the replicas ended on.
    pub revision: u32,
    /// "COMPLETE" or "ROLLED_BACK".
    pub result: String,
    /// Why it was rolled back.
    pub reason: String,
    /// RFC 3339.
    pub finished_at: String,
}

impl From<v1::Container> for ContainerJson {
    fn from(c: v1::Container) -> Self {
        ContainerJson {
            container_id: c.container_id,
            name: c.name,
            image: c.image,
            status: c.status,
            node_id: c.node_id,
            ip: c.ip,
            network_id: c.network_id,
            cpu: c.cpu,
            memory: c.memory,
            created_at: c.created_at,
            replicas: c.replicas,
            instances: c
                .instances
                .into_iter()
                .map(|i| InstanceJson {
                    status: status_from_proto(i.status()).to_owned(),
                    instance_id: i.instance_id,
                    node_id: i.node_id,
                    ip: i.ip,
                    reason: i.reason,
                    phases_ms: i.phases_ms.into_iter().collect(),
                    updated_at: i.updated_at,
                    restarts: i.restarts,
                    revision: i.revision,
                    image_digest: i.image_digest,
                    stopped: i.stopped,
                })
                .collect(),
            command: c.command,
            env: c.env.into_iter().collect(),
            cpu_millis: c.cpu_millis,
            memory_bytes: c.memory_bytes,
            service_ip: c.service_ip,
            dns_name: c.dns_name,
            restart_policy: c.restart_policy,
            max_restarts: c.max_restarts,
            health: c.health.as_ref().map(health_from_proto),
            stop_signal: c.stop_signal,
            stop_timeout: c.stop_timeout,
            revision: c.revision,
            rollout: c.rollout.map(|r| RolloutJson {
                state: r.state,
                revision: r.revision,
                from_revision: r.from_revision,
                max_unavailable: r.max_unavailable,
                reason: r.reason,
                started_at: r.started_at,
            }),
            last_rollout: c.last_rollout.map(|r| RolloutResultJson {
                revision: r.revision,
                result: r.result,
                reason: r.reason,
                finished_at: r.finished_at,
            }),
        }
    }
}

/// A node.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeJson {
    /// Id.
    pub node_id: String,
    /// Host name.
    pub hostname: String,
    /// Address.
    pub ip: String,
    /// Cores offered.
    pub cpu_total: f64,
    /// Cores not yet requested by placed instances.
    pub cpu_available: f64,
    /// Bytes offered.
    pub memory_total: u64,
    /// Bytes not yet requested by placed instances.
    pub memory_available: u64,
    /// HEALTHY or UNHEALTHY.
    pub status: String,
    /// Instances placed on it.
    pub instances: u32,
    /// WireGuard address.
    #[serde(default)]
    pub tunnel_ip: String,
    /// WireGuard public key (base64).
    #[serde(default)]
    pub wireguard_public_key: String,
    /// `host:port` of the node's agent API.
    #[serde(default)]
    pub api_addr: String,
    /// Cordoned: nothing new is placed or migrated there.
    #[serde(default)]
    pub unschedulable: bool,
}

impl From<v1::Node> for NodeJson {
    fn from(n: v1::Node) -> Self {
        NodeJson {
            node_id: n.node_id,
            hostname: n.hostname,
            ip: n.ip,
            cpu_total: n.cpu_total,
            cpu_available: n.cpu_available,
            memory_total: n.memory_total,
            memory_available: n.memory_available,
            status: n.status,
            instances: n.instances,
            tunnel_ip: n.tunnel_ip,
            wireguard_public_key: n.wireguard_public_key,
            api_addr: n.api_addr,
            unschedulable: n.unschedulable,
        }
    }
}

/// Parses a JSON body strictly; errors name the offending field.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ServiceError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ServiceError::invalid("body", "a JSON object is required"));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ServiceError::invalid(
            "body",
            format!("not JSON: {}", strip_position(&e.to_string())),
        )
    })?;
    // serde would also accept an array for a struct; the API takes objects only.
    if !value.is_object() {
        return Err(ServiceError::invalid("body", "a JSON object is required"));
    }
    let value: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let field = if path.is_empty() || path == "." {
            // Missing and unknown fields are reported at the parent: take the name from the message.
            backticked(&message).unwrap_or_else(|| "body".to_owned())
        } else {
            path
        };
        ServiceError::invalid(field, strip_position(&message))
    })?;
    Ok(value)
}

/// `{"error":{"code","message"}}`
pub fn error_body(e: &ServiceError) -> serde_json::Value {
    serde_json::json!({"error": {"code": e.code(), "message": e.to_string()}})
}

/// The first `name` in a serde message like "missing field `image`".
fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

/// serde_json appends " at line 1 column 12"; users of a JSON API do not need it.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
#[path = "rest_types_tests.rs"]
mod tests;
