use std::collections::BTreeMap;

use super::*;
use crate::store::records::{InstanceRecord, StatusRecord};
use crate::store::Versioned;

fn container(replicas: u32, deleting: bool) -> ContainerRecord {
    ContainerRecord {
        container_id: "ctr-000000000001".into(),
        name: "web".into(),
        image: "reg/demo:1".into(),
        network_id: "net-000000000001".into(),
        cpu_millis: 500,
        memory_bytes: 64 * 1024 * 1024,
        replicas,
        command: vec![],
        env: BTreeMap::new(),
        created_at: "2026-01-01T00:00:00Z".into(),
        deleting,
        next_ordinal: 0,
        service_ip: "10.96.0.9".into(),
        restart_policy: "on-failure".into(),
        max_restarts: 3,
        ..Default::default()
    }
}

fn instance(
    ordinal: u32,
    node: &str,
    ip: &str,
    status: Option<&str>,
    stopping: bool,
) -> StoredInstance {
    StoredInstance {
        record: Versioned {
            value: InstanceRecord {
                instance_id: format!("ins-00000000000{ordinal}"),
                container_id: "ctr-000000000001".into(),
                network_id: "net-000000000001".into(),
                ordinal,
                node_id: node.into(),
                ip: ip.into(),
                reason: if node.is_empty() {
                    "no node has 0.5 cpu free".into()
                } else {
                    String::new()
                },
                stopping,
                created_at: "2026-01-01T00:00:00Z".into(),
                placed_at: if node.is_empty() {
                    String::new()
                } else {
                    "2026-01-01T00:00:00.25Z".into()
                },
                ..Default::default()
            },
            mod_revision: 1,
            create_revision: 1,
        },
        status: status.map(|s| StatusRecord {
            status: s.into(),
            reason: String::new(),
            node_id: node.into(),
            updated_at: String::new(),
            phases_ms: BTreeMap::from([("pull".to_owned(), 12.5)]),
            restarts: 2,
            image_digest: "sha256:abc".into(),
        }),
    }
}

#[test]
fn status_derivation() {
    let c = |replicas: u32| container(replicas, false);
    assert_eq!(
        container_status(&container(1, true), &["RUNNING"]),
        "DELETING"
    );
    assert_eq!(container_status(&c(2), &["RUNNING", "RUNNING"]), "RUNNING");
    assert_eq!(
        container_status(&c(3), &["RUNNING", "RUNNING"]),
        "DEPLOYING"
    );
    assert_eq!(container_status(&c(2), &["RUNNING", "FAILED"]), "FAILED");
    assert_eq!(
        container_status(&c(2), &["PENDING", "PULLING"]),
        "DEPLOYING"
    );
    assert_eq!(container_status(&c(0), &[]), "RUNNING");
    assert_eq!(
        container_status(&c(2), &["RUNNING", "UNHEALTHY"]),
        "DEGRADED"
    );
    assert_eq!(
        container_status(&c(2), &["RUNNING", "STARTING"]),
        "STARTING"
    );
    let stopped = ContainerRecord {
        stopped: true,
        ..c(2)
    };
    assert_eq!(
        container_status(&stopped, &["STOPPED", "STOPPING"]),
        "STOPPING"
    );
    assert_eq!(
        container_status(&stopped, &["STOPPED", "STOPPED"]),
        "STOPPED"
    );
    let updating = ContainerRecord {
        rollout: Some(crate::store::records::RolloutRecord {
            state: "UPDATING".into(),
            revision: 2,
            from_revision: 1,
            max_unavailable: 1,
            reason: String::new(),
            started_at: String::new(),
        }),
        ..c(2)
    };
    assert_eq!(
        container_status(&updating, &["RUNNING", "RUNNING"]),
        "UPDATING"
    );
}

#[test]
fn stop_and_start_requests_show_until_the_node_carries_them_out() {
    let mut running = instance(0, "n1", "10.0.0.2", Some("RUNNING"), false);
    running.record.value.stopped = true;
    assert_eq!(instance_status(&running).0, "STOPPING");
    let mut halted = instance(1, "n1", "10.0.0.3", Some("STOPPED"), false);
    halted.status.as_mut().unwrap().reason = STOPPED_ON_REQUEST.into();
    assert_eq!(instance_status(&halted).0, "STARTING");
    halted.record.value.stopped = true;
    assert_eq!(instance_status(&halted).0, "STOPPED");
    // An exit under restart policy "never" is a plain STOPPED.
    let exited = instance(2, "n1", "10.0.0.4", Some("STOPPED"), false);
    assert_eq!(instance_status(&exited).0, "STOPPED");
}

#[test]
fn container_view_uses_first_running_and_hides_stopping() {
    let c = container(2, false);
    let a = instance(0, "n1", "10.0.0.2", Some("CREATING"), false);
    let b = instance(1, "n2", "10.0.0.3", Some("RUNNING"), false);
    let gone = instance(2, "n1", "10.0.0.4", Some("RUNNING"), true);
    let p = container_to_proto(&c, "net", &[&gone, &b, &a]);
    assert_eq!(p.instances.len(), 2);
    assert_eq!(p.instances[0].instance_id, a.record.value.instance_id);
    assert_eq!(p.node_id, "n2");
    assert_eq!(p.ip, "10.0.0.3");
    assert_eq!(p.status, "DEPLOYING");
    assert_eq!(p.cpu, format_cpu(500));
    assert_eq!(p.cpu_millis, 500);

    let deleting = container_to_proto(&container(2, true), "net", &[&gone]);
    assert_eq!(deleting.status, "DELETING");
    assert_eq!(deleting.instances.len(), 1);
}

#[test]
fn unplaced_instances_are_pending_with_reason() {
    let c = container(1, false);
    let i = instance(0, "", "", None, false);
    let p = container_to_proto(&c, "net", &[&i]);
    assert_eq!(p.instances[0].status, v1::InstanceStatus::Pending as i32);
    assert_eq!(p.instances[0].reason, "no node has 0.5 cpu free");
    assert_eq!(p.node_id, "");
}

#[test]
fn status_names_round_trip() {
    for s in [
        "PENDING", "PULLING", "CREATING", "RUNNING", "FAILED", "STOPPED",
    ] {
        assert_eq!(status_from_proto(status_to_proto(s)), s);
    }
    assert_eq!(status_to_proto("BOGUS"), v1::InstanceStatus::Unspecified);
}

#[test]
fn node_capacity_left() {
    let n = NodeRecord {
        node_id: "n1".into(),
        hostname: "h".into(),
        ip: "10.1.0.1".into(),
        cpu_millis: 2000,
        memory_bytes: 1 << 30,
        lease_id: 1,
        registered_at: String::new(),
        tunnel_ip: String::new(),
        wireguard_public_key: String::new(),
        api_addr: String::new(),
        migration_addr: String::new(),
        unschedulable: false,
    };
    let c = container(1, false);
    let i = instance(0, "n1", "10.0.0.2", None, false);
    let p = node_to_proto(&n, NodeHealth::Healthy, &[(&c, &i)]);
    assert_eq!(p.cpu_total, 2.0);
    assert_eq!(p.cpu_available, 1.5);
    assert_eq!(p.memory_available, (1 << 30) - 64 * 1024 * 1024);
    assert_eq!(p.status, "HEALTHY");
    assert_eq!(p.instances, 1);
    assert_eq!(
        node_to_proto(&n, NodeHealth::Unhealthy, &[]).status,
        "UNHEALTHY"
    );
    assert_eq!(node_to_proto(&n, NodeHealth::Down, &[]).status, "DOWN");
}

#[test]
fn phases_include_schedule_time() {
    let i = instance(0, "n1", "10.0.0.2", Some("RUNNING"), false);
    let p = phases_ms(&i);
    assert_eq!(p["schedule"], 250.0);
    assert_eq!(p["pull"], 12.5);
    assert!(phases_ms(&instance(0, "", "", None, false)).is_empty());
}

#[test]
fn dns_names_use_the_name_or_the_id() {
    let mut c = container(1, false);
    let p = container_to_proto(&c, "prod", &[]);
    assert_eq!(p.dns_name, "web.prod.berth");
    assert_eq!(p.service_ip, "10.96.0.9");
    c.name.clear();
    assert_eq!(dns_label(&c), "ctr-000000000001");
    assert_eq!(container_to_proto(&c, "", &[]).dns_name, "");
}
