//! The deploy path without real agents: fake agents registered through the gRPC service functions,
//! the reconciler placing instances against a real etcd.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure points at the line
mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use axum::http::StatusCode;
use berth_proto::v1::InstanceStatus;
use common::{wait_for, Hub};
use serde_json::Value;

const GIB: u64 = 1 << 30;

async fn container(hub: &Hub, id: &str) -> Value {
    let (status, c) = hub.get(&format!("/v1/containers/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    c
}

fn instances(c: &Value) -> Vec<Value> {
    c["instances"].as_array().cloned().unwrap_or_default()
}

/// Waits until the container has `n` instances, all placed.
async fn placed(hub: &Hub, id: &str, n: usize) -> Vec<Value> {
    wait_for(10, &format!("{n} placed instances of {id}"), || async {
        let is = instances(&container(hub, id).await);
        (is.len() == n && is.iter().all(|i| i["node_id"] != "")).then_some(is)
    })
    .await
}

async fn next(s: &mut common::DesiredStream) -> berth_proto::v1::DesiredState {
    let fut = futures::StreamExt::next(s);
    tokio::time::timeout(std::time::Duration::from_secs(10), fut)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

/// Every node reports every instance it is assigned as RUNNING.
async fn all_running(hub: &Hub, nodes: &[&str]) {
    for node in nodes {
        let desired = hub.desired(node).await;
        let reports: Vec<(&str, InstanceStatus)> = desired
            .assignments
            .iter()
            .map(|a| (a.instance_id.as_str(), InstanceStatus::Running))
            .collect();
        hub.report(node, &reports, &[]).await;
    }
}

/// Each node reports removed what is no longer assigned to it (as an agent would after stopping it).
async fn report_removed(hub: &Hub, nodes: &[&str], before: &[String]) {
    for node in nodes {
        let desired = hub.desired(node).await;
        let now: HashSet<&str> = desired
            .assignments
            .iter()
            .map(|a| a.instance_id.as_str())
            .collect();
        let gone: Vec<&str> = before
            .iter()
            .map(String::as_str)
            .filter(|i| !now.contains(i))
            .collect();
        hub.report(node, &[], &gone).await;
    }
}

#[tokio::test]
async fn deploy_scale_delete_over_two_nodes() {
    let hub = Hub::start(true).await;
    hub.register("n1", 4000, 8 * GIB).await;
    hub.register("n2", 4000, 8 * GIB).await;
    let (status, nodes) = hub.get("/v1/nodes").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(nodes["nodes"][0]["status"], "HEALTHY");
    assert_eq!(nodes["nodes"][0]["cpu_total"], 4.0);

    hub.post(
        "/v1/networks",
        r#"{"name":"payments","cidr":"10.10.0.0/16"}"#,
    )
    .await;
    let (status, body) = hub
        .post("/v1/containers", r#"{"image":"demo:1","cpu":"0.5","memory":"64MB","replicas":3,"network_id":"payments"}"#)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["container_id"].as_str().unwrap().to_owned();

    // 3 replicas over 2 nodes: 2 + 1, distinct addresses inside the CIDR.
    let is = placed(&hub, &id, 3).await;
    let mut per_node = BTreeMap::new();
    let mut ips = HashSet::new();
    let net: ipnet::Ipv4Net = "10.10.0.0/16".parse().unwrap();
    for i in &is {
        *per_node
            .entry(i["node_id"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
        let ip: Ipv4Addr = i["ip"].as_str().unwrap().parse().unwrap();
        assert!(
            net.contains(&ip) && ip != net.network() && ip != Ipv4Addr::new(10, 10, 0, 1),
            "{ip}"
        );
        assert!(ips.insert(ip), "duplicate {ip}");
        assert_eq!(i["status"], "PENDING");
    }
    let mut counts: Vec<i32> = per_node.values().copied().collect();
    counts.sort();
    assert_eq!(counts, vec![1, 2], "{per_node:?}");
    assert_eq!(hub.keys("/berth/ipam/").await.len(), 3);

    // Assignments reach the nodes with everything an agent needs.
    let d1 = hub.desired("n1").await;
    let d2 = hub.desired("n2").await;
    assert_eq!(d1.assignments.len() + d2.assignments.len(), 3);
    let a = d1.assignments.first().or(d2.assignments.first()).unwrap();
    assert_eq!(a.container_id, id);
    assert_eq!(a.image, "demo:1");
    assert_eq!(a.cpu_millis, 500);
    assert_eq!(a.memory_bytes, 64_000_000);
    let net_att = a.network.as_ref().unwrap();
    assert_eq!(
        (
            net_att.name.as_str(),
            net_att.cidr.as_str(),
            net_att.gateway.as_str()
        ),
        ("payments", "10.10.0.0/16", "10.10.0.1")
    );
    assert!(ips.contains(&a.ip.parse().unwrap()));

    // Node capacity accounts for placed requests.
    let (_, n1) = hub.get("/v1/nodes/n1").await;
    let on_n1 = d1.assignments.len() as f64;
    assert_eq!(n1["cpu_available"].as_f64().unwrap(), 4.0 - 0.5 * on_n1);

    // A later snapshot follows a change on the stream.
    all_running(&hub, &["n1", "n2"]).await;
    let c = wait_for(5, "RUNNING", || async {
        let c = container(&hub, &id).await;
        (c["status"] == "RUNNING").then_some(c)
    })
    .await;
    assert_ne!(c["ip"], "");
    assert!(instances(&c).iter().all(|i| i["status"] == "RUNNING"));

    // Scale up to 5: new replicas placed, spread 3 + 2.
    let (status, _) = hub
        .post(&format!("/v1/containers/{id}/scale"), r#"{"replicas":5}"#)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let is = placed(&hub, &id, 5).await;
    let on_n1 = is.iter().filter(|i| i["node_id"] == "n1").count();
    assert!(on_n1 == 2 || on_n1 == 3, "{is:?}");
    assert_eq!(container(&hub, &id).await["status"], "DEPLOYING");
    all_running(&hub, &["n1", "n2"]).await;

    // Scale down to 1: the highest ordinals go; their assignments disappear; removal releases them.
    let before: Vec<String> = is
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap().to_owned())
        .collect();
    let (status, _) = hub
        .post(&format!("/v1/containers/{id}/scale"), r#"{"replicas":1}"#)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_for(10, "assignments down to 1", || async {
        (hub.keys("/berth/assign/").await.len() == 1).then_some(())
    })
    .await;
    let kept = instances(&container(&hub, &id).await);
    assert_eq!(kept.len(), 1);
    assert_eq!(
        kept[0]["instance_id"],
        before[0].as_str(),
        "the lowest ordinal stays"
    );
    report_removed(&hub, &["n1", "n2"], &before).await;
    assert_eq!(hub.keys("/berth/ipam/").await.len(), 1);
    assert_eq!(hub.keys("/berth/instances/").await.len(), 1);
    let c = wait_for(5, "RUNNING at 1", || async {
        let c = container(&hub, &id).await;
        (c["status"] == "RUNNING").then_some(c)
    })
    .await;
    assert_eq!(c["replicas"], 1);

    // Delete: marked DELETING, assignments go; once nodes report removed, nothing is left.
    let (status, body) = hub.delete(&format!("/v1/containers/{id}")).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("DELETING"))
    );
    wait_for(10, "assignments gone", || async {
        hub.keys("/berth/assign/").await.is_empty().then_some(())
    })
    .await;
    report_removed(&hub, &["n1", "n2"], &before).await;
    wait_for(10, "container gone", || async {
        (hub.get(&format!("/v1/containers/{id}")).await.0 == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    for prefix in [
        "/berth/instances/",
        "/berth/ipam/",
        "/berth/assign/",
        "/berth/status/",
        "/berth/owners/",
        "/berth/netuse/",
    ] {
        assert_eq!(hub.keys(prefix).await, Vec::<String>::new(), "{prefix}");
    }
    assert_eq!(
        hub.delete("/v1/networks/payments").await.0,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn unplaceable_stays_pending_until_capacity_appears() {
    let hub = Hub::start(true).await;
    hub.register("small", 500, GIB).await;
    let (status, body) = hub
        .post(
            "/v1/containers",
            r#"{"image":"demo:1","cpu":"2","memory":"64MiB"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["container_id"].as_str().unwrap().to_owned();
    let reason = wait_for(10, "a pending reason", || async {
        let is = instances(&container(&hub, &id).await);
        let i = is.first()?;
        assert_eq!(i["status"], "PENDING");
        assert_eq!(i["node_id"], "");
        let r = i["reason"].as_str().unwrap_or_default().to_owned();
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert!(reason.contains("cpu") || reason.contains('2'), "{reason}");
    assert!(hub.keys("/berth/assign/").await.is_empty());

    // The stream of a node that has nothing yet sends an empty state, then the placement.
    let req = berth_proto::v1::WatchAssignmentsRequest {
        node_id: "big".into(),
    };
    let mut stream = {
        use berth_proto::v1::agent_service_server::AgentService;
        hub.grpc
            .watch_assignments(tonic::Request::new(req))
            .await
            .unwrap()
            .into_inner()
    };
    assert!(next(&mut stream).await.assignments.is_empty());
    hub.register("big", 8000, 8 * GIB).await;
    let mut state = next(&mut stream).await;
    while state.assignments.is_empty() {
        state = next(&mut stream).await;
    }
    assert_eq!(state.assignments[0].container_id, id);
    assert!(state.revision > 0);
    let is = placed(&hub, &id, 1).await;
    assert_eq!(is[0]["node_id"], "big");
    assert_eq!(is[0]["reason"], "");
    assert_eq!(hub.desired("big").await.assignments.len(), 1);
}

#[tokio::test]
async fn heartbeat_and_unknown_nodes() {
    let hub = Hub::start(false).await;
    use berth_proto::v1;
    use berth_proto::v1::agent_service_server::AgentService;
    let hb = |n: &str| v1::HeartbeatRequest { node_id: n.into() };
    assert!(
        !hub.grpc
            .heartbeat(tonic::Request::new(hb("ghost")))
            .await
            .unwrap()
            .into_inner()
            .known
    );
    hub.register("n1", 1000, GIB).await;
    assert!(
        hub.grpc
            .heartbeat(tonic::Request::new(hb("n1")))
            .await
            .unwrap()
            .into_inner()
            .known
    );
    let bad = v1::RegisterRequest {
        node_id: "n2".into(),
        advertise_ip: "nope".into(),
        cpu_millis: 1,
        memory_bytes: 1,
        ..Default::default()
    };
    let err = hub
        .grpc
        .register(tonic::Request::new(bad))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("advertise_ip: "),
        "{}",
        err.message()
    );
    // Reports for instances the node does not host are ignored.
    hub.report(
        "n1",
        &[("ins-000000000000", InstanceStatus::Running)],
        &["ins-000000000001"],
    )
    .await;
    assert!(hub.keys("/berth/status/").await.is_empty());
}

#[tokio::test]
async fn stopping_instances_of_a_dead_node_are_released_after_the_grace() {
    use berth_hub::reconciler::Reconciler;
    let hub = Hub::start(false).await;
    hub.register("n1", 4000, 8 * GIB).await;
    let (_, body) = hub
        .post("/v1/containers", r#"{"image":"demo:1","replicas":2}"#)
        .await;
    let id = body["container_id"].as_str().unwrap().to_owned();
    let mut rec = Reconciler::new(hub.store.clone(), std::time::Duration::from_millis(200));
    rec.pass().await.unwrap(); // creates the instances and places them
    assert_eq!(hub.keys("/berth/assign/n1/").await.len(), 2);
    assert_eq!(
        hub.delete(&format!("/v1/containers/{id}")).await.0,
        StatusCode::ACCEPTED
    );
    rec.pass().await.unwrap();
    assert!(hub.keys("/berth/assign/").await.is_empty());
    assert_eq!(
        hub.keys("/berth/ipam/").await.len(),
        2,
        "held until the node reports them removed"
    );

    // The node dies (its liveness key goes with its lease): nothing is released before the grace.
    let mut kv = hub.store.client().kv_client();
    kv.delete("/berth/alive/n1", None).await.unwrap();
    rec.pass().await.unwrap();
    assert_eq!(hub.keys("/berth/ipam/").await.len(), 2);
    assert_eq!(hub.get("/v1/nodes/n1").await.1["status"], "UNHEALTHY");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    rec.pass().await.unwrap();
    rec.pass().await.unwrap();
    for prefix in [
        "/berth/instances/",
        "/berth/ipam/",
        "/berth/containers/",
        "/berth/owners/",
    ] {
        assert_eq!(hub.keys(prefix).await, Vec::<String>::new(), "{prefix}");
    }
}

#[tokio::test]
async fn a_down_node_has_its_instances_moved_and_is_told_to_stop_them_when_back() {
    use berth_hub::reconciler::Reconciler;
    let hub = Hub::start(false).await;
    hub.register("n1", 4000, 8 * GIB).await;
    let (_, body) = hub
        .post("/v1/containers", r#"{"image":"demo:1","replicas":2}"#)
        .await;
    let id = body["container_id"].as_str().unwrap().to_owned();
    let mut rec = Reconciler::new(hub.store.clone(), std::time::Duration::from_secs(60))
        .with_down_after(std::time::Duration::from_millis(200));
    rec.pass().await.unwrap();
    let on_n1 = hub.keys("/berth/assign/n1/").await;
    assert_eq!(on_n1.len(), 2);
    hub.register("n2", 4000, 8 * GIB).await;

    // n1 dies: UNHEALTHY first, nothing moves yet.
    let mut kv = hub.store.client().kv_client();
    kv.delete("/berth/alive/n1", None).await.unwrap();
    rec.pass().await.unwrap();
    assert_eq!(hub.get("/v1/nodes/n1").await.1["status"], "UNHEALTHY");
    assert_eq!(hub.keys("/berth/assign/n1/").await.len(), 2);
    let deadline = rec
        .next_deadline()
        .expect("a deadline for the DOWN transition");
    assert!(deadline <= std::time::Instant::now() + std::time::Duration::from_millis(200));

    // After down_after: DOWN, its instances stopping there, two replacements placed on n2, the
    // old addresses still held (n1 has not confirmed anything).
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    rec.pass().await.unwrap();
    assert_eq!(hub.get("/v1/nodes/n1").await.1["status"], "DOWN");
    assert!(hub.keys("/berth/assign/n1/").await.is_empty());
    assert_eq!(hub.keys("/berth/stopping/n1/").await.len(), 2);
    assert_eq!(hub.keys("/berth/assign/n2/").await.len(), 2);
    assert_eq!(hub.keys("/berth/ipam/").await.len(), 4);
    let (_, c) = hub.get(&format!("/v1/containers/{id}")).await;
    let nodes: Vec<&str> = c["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["n2", "n2"], "{c}");

    // n1 comes back: no longer DOWN, its desired state has nothing to run and both old instances
    // to stop; once it reports them removed their addresses are released.
    hub.register("n1", 4000, 8 * GIB).await;
    rec.pass().await.unwrap();
    assert_eq!(hub.get("/v1/nodes/n1").await.1["status"], "HEALTHY");
    let desired = hub.desired("n1").await;
    assert!(desired.assignments.is_empty());
    assert_eq!(desired.stopping.len(), 2);
    let old: Vec<&str> = desired.stopping.iter().map(String::as_str).collect();
    hub.report("n1", &[], &old).await;
    assert_eq!(hub.keys("/berth/ipam/").await.len(), 2);
    assert!(hub.keys("/berth/stopping/").await.is_empty());
}
