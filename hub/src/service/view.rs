//! Builds the wire objects users see from stored records: derived container status, first running
//! replica, node capacity left. Pure functions, unit-tested here.

use std::collections::BTreeMap;

use berth_proto::units::{format_cpu, format_memory};
use berth_proto::v1;

use crate::store::records::{ContainerRecord, NodeRecord};
use crate::store::StoredInstance;

/// Container status while replicas are on their way.
pub const STATUS_DEPLOYING: &str = "DEPLOYING";
/// Container status when every desired replica runs.
pub const STATUS_RUNNING: &str = "RUNNING";
/// Container status when a replica failed.
pub const STATUS_FAILED: &str = "FAILED";
/// Container status after a delete.
pub const STATUS_DELETING: &str = "DELETING";

/// Status of one instance as users see it ("PENDING" until its node reports).
pub fn instance_status(inst: &StoredInstance) -> (String, String) {
    match &inst.status {
        Some(s) => (s.status.clone(), s.reason.clone()),
        None => ("PENDING".to_owned(), inst.record.value.reason.clone()),
    }
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

/// The container-level status: DELETING if marked; RUNNING when `replicas` instances run; FAILED when any
/// failed; DEPLOYING otherwise.
pub fn container_status(deleting: bool, replicas: u32, instance_statuses: &[&str]) -> &'static str {
    if deleting {
        return STATUS_DELETING;
    }
    let running = instance_statuses
        .iter()
        .filter(|s| **s == "RUNNING")
        .count();
    if running == replicas as usize && instance_statuses.len() == replicas as usize {
        STATUS_RUNNING
    } else if instance_statuses.contains(&"FAILED") {
        STATUS_FAILED
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
                ..Default::default()
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
        status: container_status(c.deleting, c.replicas, &status_refs).to_owned(),
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
        ..Default::default()
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
        api_addr: String::new(),
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
