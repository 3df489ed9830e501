//! Builds the wire objects users see from stored records: derived container status, first running
//! replica, node capacity left. Pure functions, unit-tested here.

use std::collections::BTreeMap;

use berth_proto::units::{format_cpu, format_memory};
use berth_proto::v1;

use crate::store::records::{
    ContainerRecord, ExecProbeRecord, HealthRecord, HttpProbeRecord, NodeRecord, RevisionRecord,
    TcpProbeRecord,
};
use crate::store::StoredInstance;

/// Container status while replicas are on their way.
pub const STATUS_DEPLOYING: &str = "DEPLOYING";
/// Container status when every desired replica runs.
pub const STATUS_RUNNING: &str = "RUNNING";
/// Container status when a replica failed.
pub const STATUS_FAILED: &str = "FAILED";
/// Container status after a delete.
pub const STATUS_DELETING: &str = "DELETING";
/// Container status while replicas are being stopped on request.
pub const STATUS_STOPPING: &str = "STOPPING";
/// Container status when every replica was stopped on request.
pub const STATUS_STOPPED: &str = "STOPPED";
/// Container status while stopped replicas are started again.
pub const STATUS_STARTING: &str = "STARTING";
/// Container status during a rolling update.
pub const STATUS_UPDATING: &str = "UPDATING";
/// Container status while a failed update is undone (or during a requested rollback).
pub const STATUS_ROLLING_BACK: &str = "ROLLING_BACK";
/// Container status when replicas run but some fail their health probe.
pub const STATUS_DEGRADED: &str = "DEGRADED";

/// The reason an agent gives for an instance it stopped on request (what tells a stop from an exit).
pub const STOPPED_ON_REQUEST: &str = "stopped on request";

/// Status of one instance as users see it ("PENDING" until its node reports). A stop or start the
/// node has not carried out yet shows as STOPPING or STARTING, so a replica being stopped leaves the
/// service routing before its process gets the signal.
pub fn instance_status(inst: &StoredInstance) -> (String, String) {
    let r = &inst.record.value;
    let (status, reason) = match &inst.status {
        Some(s) => (s.status.clone(), s.reason.clone()),
        None => ("PENDING".to_owned(), r.reason.clone()),
    };
    if r.stopped && !r.node_id.is_empty() && status != "STOPPED" && status != "PENDING" {
        return ("STOPPING".to_owned(), STOPPED_ON_REQUEST.to_owned());
    }
    if !r.stopped && status == "STOPPED" && reason == STOPPED_ON_REQUEST {
        return ("STARTING".to_owned(), String::new());
    }
    (status, reason)
}

/// Deploy phase durations of an instance: "schedule" (created → placed, measured by the hub) plus what its
/// agent reported.
pub fn phases_ms(inst: &StoredInstance) -> BTreeMap<String, f64> {
    let mut phases = inst
        .status
        .as_ref()
        .map(|s| s.phases_ms.clone())
        .unwrap_or_default();
    let r = &inst.record.value;
    if let (Some(created), Some(placed)) = (parse_time(&r.created_at), parse_time(&r.placed_at)) {
        phases.insert(
            "schedule".to_owned(),
            (placed - created).as_seconds_f64() * 1000.0,
        );
    }
    phases
}

fn parse_time(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// Maps "RUNNING" to the proto enum (UNSPECIFIED for anything unknown).
pub fn status_to_proto(status: &str) -> v1::InstanceStatus {
    v1::InstanceStatus::from_str_name(&format!("INSTANCE_STATUS_{status}"))
        .unwrap_or(v1::InstanceStatus::Unspecified)
}

/// Maps the proto enum to "RUNNING" etc.
pub fn status_from_proto(status: v1::InstanceStatus) -> &'static str {
    status.as_str_name().trim_start_matches("INSTANCE_STATUS_")
}

/// The container-level status, first match wins: DELETING if marked; UPDATING or ROLLING_BACK during a
/// rollout; STOPPED when stopped on request and every replica is, STOPPING until then; RUNNING when
/// `replicas` instances run; FAILED when any failed; DEGRADED when any is UNHEALTHY; STARTING when any
/// is being started again; DEPLOYING otherwise.
pub fn container_status(c: &ContainerRecord, instance_statuses: &[&str]) -> &'static str {
    if c.deleting {
        return STATUS_DELETING;
    }
    if let Some(r) = &c.rollout {
        return if r.state == STATUS_ROLLING_BACK {
            STATUS_ROLLING_BACK
        } else {
            STATUS_UPDATING
        };
    }
    if c.stopped {
        return if instance_statuses.iter().all(|s| *s == "STOPPED") {
            STATUS_STOPPED
        } else {
            STATUS_STOPPING
        };
    }
    let count = |status: &str| instance_statuses.iter().filter(|s| **s == status).count();
    let replicas = c.replicas as usize;
    if count("RUNNING") == replicas && instance_statuses.len() == replicas {
        STATUS_RUNNING
    } else if count("FAILED") > 0 {
        STATUS_FAILED
    } else if count("UNHEALTHY") > 0 {
        STATUS_DEGRADED
    } else if count("STOPPING") > 0 {
        STATUS_STOPPING
    } else if count("STARTING") > 0 {
        STATUS_STARTING
    } else {
        STATUS_DEPLOYING
    }
}

/// The wire form of a container. Lists the desired (non-stopping) instances by ordinal; while the
/// container is being deleted, every remaining instance.
/// `network_name` names the container's network (for its DNS name; empty if it is gone).
pub fn container_to_proto(
    c: &ContainerRecord,
    network_name: &str,
    instances: &[&StoredInstance],
) -> v1::Container {
    let mut shown: Vec<&StoredInstance> = instances
        .iter()
        .copied()
        .filter(|i| c.deleting || !i.record.value.stopping)
        .collect();
    shown.sort_by_key(|i| i.record.value.ordinal);
    let proto_instances: Vec<v1::Instance> = shown
        .iter()
        .map(|i| {
            let (status, reason) = instance_status(i);
            let r = &i.record.value;
            v1::Instance {
                instance_id: r.instance_id.clone(),
                node_id: r.node_id.clone(),
                ip: r.ip.clone(),
                status: status_to_proto(&status) as i32,
                reason,
                phases_ms: phases_ms(i).into_iter().collect(),
                updated_at: i
                    .status
                    .as_ref()
                    .map(|s| s.updated_at.clone())
                    .unwrap_or_default(),
                restarts: i.status.as_ref().map(|s| s.restarts).unwrap_or_default(),
                revision: r.revision,
                image_digest: i
                    .status
                    .as_ref()
                    .map(|s| s.image_digest.clone())
                    .unwrap_or_default(),
                stopped: r.stopped,
            }
        })
        .collect();
    let statuses: Vec<String> = shown.iter().map(|i| instance_status(i).0).collect();
    let status_refs: Vec<&str> = statuses.iter().map(String::as_str).collect();
    let first_running = shown
        .iter()
        .zip(&statuses)
        .find(|(_, s)| *s == "RUNNING")
        .map(|(i, _)| &i.record.value);
    v1::Container {
        container_id: c.container_id.clone(),
        name: c.name.clone(),
        image: c.image.clone(),
        status: container_status(c, &status_refs).to_owned(),
        node_id: first_running.map(|i| i.node_id.clone()).unwrap_or_default(),
        ip: first_running.map(|i| i.ip.clone()).unwrap_or_default(),
        network_id: c.network_id.clone(),
        cpu: format_cpu(c.cpu_millis),
        memory: format_memory(c.memory_bytes),
        created_at: c.created_at.clone(),
        replicas: c.replicas,
        instances: proto_instances,
        command: c.command.clone(),
        env: c.env.clone().into_iter().collect(),
        cpu_millis: c.cpu_millis,
        memory_bytes: c.memory_bytes,
        service_ip: c.service_ip.clone(),
        dns_name: if network_name.is_empty() {
            String::new()
        } else {
            dns_name(dns_label(c), network_name)
        },
        restart_policy: if c.restart_policy.is_empty() {
            "always".to_owned()
        } else {
            c.restart_policy.clone()
        },
        max_restarts: c.max_restarts,
        health: c.health.as_ref().map(health_to_proto),
        stop_signal: c.stop_signal.clone(),
        stop_timeout: berth_proto::duration::format(stop_timeout(c)),
        revision: c.revision.max(1),
        rollout: c.rollout.as_ref().map(|r| v1::Rollout {
            state: r.state.clone(),
            revision: r.revision,
            from_revision: r.from_revision,
            max_unavailable: r.max_unavailable,
            reason: r.reason.clone(),
            started_at: r.started_at.clone(),
        }),
        last_rollout: c.last_rollout.as_ref().map(|r| v1::RolloutResult {
            revision: r.revision,
            result: r.result.clone(),
            reason: r.reason.clone(),
            finished_at: r.finished_at.clone(),
        }),
    }
}

/// The grace a stop of the container's replicas gives (the default for records that predate it).
pub fn stop_timeout(c: &ContainerRecord) -> std::time::Duration {
    if c.stop_timeout_ms == 0 {
        super::validate::DEFAULT_STOP_TIMEOUT
    } else {
        std::time::Duration::from_millis(c.stop_timeout_ms)
    }
}

/// The wire form of a stored probe.
pub fn health_to_proto(h: &HealthRecord) -> v1::HealthCheck {
    v1::HealthCheck {
        http: h.http.as_ref().map(|p| v1::HttpProbe {
            path: p.path.clone(),
            port: p.port,
        }),
        tcp: h.tcp.as_ref().map(|p| v1::TcpProbe { port: p.port }),
        exec: h.exec.as_ref().map(|p| v1::ExecProbe {
            command: p.command.clone(),
        }),
        interval: h.interval.clone(),
        timeout: h.timeout.clone(),
        failure_threshold: h.failure_threshold,
        start_period: h.start_period.clone(),
    }
}

/// A probe from its wire form (not validated yet).
pub fn health_from_proto(h: &v1::HealthCheck) -> HealthRecord {
    HealthRecord {
        http: h.http.as_ref().map(|p| HttpProbeRecord {
            path: p.path.clone(),
            port: p.port,
        }),
        tcp: h.tcp.as_ref().map(|p| TcpProbeRecord { port: p.port }),
        exec: h.exec.as_ref().map(|p| ExecProbeRecord {
            command: p.command.clone(),
        }),
        interval: h.interval.clone(),
        timeout: h.timeout.clone(),
        failure_threshold: h.failure_threshold,
        start_period: h.start_period.clone(),
    }
}

/// A revision's wire form; `current` marks the container's current one.
pub fn revision_to_proto(r: &RevisionRecord, current: bool) -> v1::Revision {
    v1::Revision {
        revision: r.revision,
        image: r.image.clone(),
        image_digest: r.image_digest.clone(),
        cpu: format_cpu(r.cpu_millis),
        memory: format_memory(r.memory_bytes),
        command: r.command.clone(),
        env: r.env.clone().into_iter().collect(),
        created_at: r.created_at.clone(),
        cause: r.cause.clone(),
        current,
    }
}

/// The label a container answers to in DNS: its name, or its id when it has none.
pub fn dns_label(c: &ContainerRecord) -> &str {
    if c.name.is_empty() {
        &c.container_id
    } else {
        &c.name
    }
}

/// `<label>.<network>.berth`, the name every node's DNS resolves to the service IP.
pub fn dns_name(label: &str, network_name: &str) -> String {
    format!("{label}.{network_name}.{DNS_ZONE}")
}

/// The DNS zone berth's nodes are authoritative for.
pub const DNS_ZONE: &str = "berth";

/// A node's health as users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeHealth {
    /// Heartbeats arrive.
    Healthy,
    /// Its lease lapsed; its instances are still placed there.
    Unhealthy,
    /// Unhealthy long enough that its instances were moved to other nodes.
    Down,
}

impl NodeHealth {
    /// "HEALTHY", "UNHEALTHY" or "DOWN".
    pub fn as_str(self) -> &'static str {
        match self {
            NodeHealth::Healthy => "HEALTHY",
            NodeHealth::Unhealthy => "UNHEALTHY",
            NodeHealth::Down => "DOWN",
        }
    }
}

/// The wire form of a node; `placed` are the instances placed on it (their requests use its capacity).
pub fn node_to_proto(
    n: &NodeRecord,
    health: NodeHealth,
    placed: &[(&ContainerRecord, &StoredInstance)],
) -> v1::Node {
    let cpu_used: u64 = placed.iter().map(|(c, _)| c.cpu_millis).sum();
    let mem_used: u64 = placed.iter().map(|(c, _)| c.memory_bytes).sum();
    v1::Node {
        node_id: n.node_id.clone(),
        hostname: n.hostname.clone(),
        ip: n.ip.clone(),
        cpu_total: n.cpu_millis as f64 / 1000.0,
        cpu_available: n.cpu_millis.saturating_sub(cpu_used) as f64 / 1000.0,
        memory_total: n.memory_bytes,
        memory_available: n.memory_bytes.saturating_sub(mem_used),
        status: health.as_str().to_owned(),
        instances: u32::try_from(placed.len()).unwrap_or(u32::MAX),
        tunnel_ip: n.tunnel_ip.clone(),
        wireguard_public_key: n.wireguard_public_key.clone(),
        api_addr: n.api_addr.clone(),
        unschedulable: n.unschedulable,
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
