//! Node drain and uncordon at the hub, against a real etcd, with the nodes played by the test: a
//! live drain starts one migration per running replica towards other nodes and cordons the node;
//! nothing new lands on a cordoned node until it is uncordoned; a plain drain stops the replicas
//! there and the replica counts bring them back elsewhere; what cannot move is reported, not fatal.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure points at the line
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::StatusCode;
use berth_hub::reconciler::Reconciler;
use berth_proto::v1::node_service_server::NodeService;
use berth_proto::v1::{self, InstanceStatus};
use common::{assert_invalid, wait_for, Hub};
use serde_json::Value;

const GIB: u64 = 1 << 30;

/// Registers a node that can send and receive live migrations.
async fn register(hub: &Hub, node: &str, memory_bytes: u64) {
    let addr = format!("127.0.0.1:{}", 9752 + node.len());
    hub.register_migratable(node, memory_bytes, &addr).await;
}

async fn running(hub: &Hub, node: &str, iid: &str) {
    hub.report(node, &[(iid, InstanceStatus::Running)], &[])
        .await;
}

/// Creates a container and returns its id.
async fn create(hub: &Hub, replicas: u32, memory: &str) -> String {
    let (status, body) = hub
        .post(
            "/v1/containers",
            &format!(r#"{{"image":"demo:1","replicas":{replicas},"memory":"{memory}"}}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["container_id"].as_str().unwrap().to_owned()
}

/// (instance id, node id) of a container's replicas that are not stopping.
async fn placement(hub: &Hub, cid: &str) -> Vec<(String, String)> {
    let (status, c) = hub.get(&format!("/v1/containers/{cid}")).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    c["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["instance_id"].as_str().unwrap().to_owned(),
                i["node_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn node(hub: &Hub, id: &str) -> Value {
    let (status, n) = hub.get(&format!("/v1/nodes/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{n}");
    n
}

/// Waits until the hub's event log holds a node event of this type for this node.
async fn node_event(hub: &Hub, id: &str, event_type: &str) -> Value {
    wait_for(10, event_type, || async {
        let (_, body) = hub.get("/v1/events?since=0&limit=1000").await;
        body["events"]
            .as_array()?
            .iter()
            .find(|e| e["kind"] == "node" && e["id"] == id && e["type"] == event_type)
            .cloned()
    })
    .await
}

#[tokio::test]
async fn a_live_drain_migrates_every_replica_away_and_cordons_until_uncordoned() {
    let hub = Hub::start(false).await;
    let mut rec = Reconciler::new(hub.store.clone(), Duration::from_secs(60));
    let _alive = hub.keep_alive(&["n1", "n2", "n3"]);
    register(&hub, "n1", 8 * GIB).await;
    let cid = create(&hub, 3, "1GiB").await;
    rec.pass().await.unwrap();
    let replicas = placement(&hub, &cid).await;
    assert_eq!(replicas.len(), 3);
    for (iid, n) in &replicas {
        assert_eq!(n, "n1");
        running(&hub, "n1", iid).await;
    }
    register(&hub, "n2", 8 * GIB).await;
    register(&hub, "n3", 8 * GIB).await;
    assert_eq!(node(&hub, "n1").await["unschedulable"], false);

    let (status, drained) = hub.post("/v1/nodes/n1/drain", r#"{"live":true}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{drained}");
    assert_eq!(drained["node_id"], "n1");
    assert_eq!(drained["unschedulable"], true);
    assert_eq!(drained["skipped"], serde_json::json!([]), "{drained}");
    assert_eq!(drained["replaced"], serde_json::json!([]), "{drained}");
    let started = drained["migrations"].as_array().unwrap();
    assert_eq!(started.len(), 3, "{drained}");
    let mut moved = BTreeSet::new();
    for m in started {
        assert_eq!(m["container_id"], cid.as_str());
        let (status, job) = hub
            .get(&format!(
                "/v1/migrations/{}",
                m["migration_id"].as_str().unwrap()
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{job}");
        assert_eq!(job["status"], "IN_PROGRESS");
        assert_eq!(job["instance_id"], m["instance_id"]);
        assert_eq!(job["source_node"], "n1");
        assert_ne!(job["target_node"], "n1", "{job}");
        moved.insert(m["instance_id"].as_str().unwrap().to_owned());
    }
    let all: BTreeSet<String> = replicas.into_iter().map(|(i, _)| i).collect();
    assert_eq!(moved, all, "one job per replica");
    node_event(&hub, "n1", "drained").await;

    // Cordoned, as every view says, and an agent restart does not lift it.
    assert_eq!(node(&hub, "n1").await["unschedulable"], true);
    let (_, list) = hub.get("/v1/nodes").await;
    let n1 = list["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == "n1")
        .unwrap();
    assert_eq!(n1["unschedulable"], true);
    register(&hub, "n1", 8 * GIB).await;
    assert_eq!(node(&hub, "n1").await["unschedulable"], true);

    // A drain again starts nothing twice: every replica is already migrating.
    let (status, again) = hub.post("/v1/nodes/n1/drain", r#"{"live":true}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["migrations"], serde_json::json!([]));
    let skipped = again["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 3, "{again}");
    assert!(
        skipped
            .iter()
            .all(|s| s["reason"].as_str().unwrap().contains("already migrating")),
        "{again}"
    );

    // New replicas avoid it, and so do migrations.
    let web = create(&hub, 3, "256MiB").await;
    rec.pass().await.unwrap();
    let placed = placement(&hub, &web).await;
    assert_eq!(placed.len(), 3);
    assert!(
        placed.iter().all(|(_, n)| n == "n2" || n == "n3"),
        "{placed:?}"
    );
    running(&hub, &placed[0].1, &placed[0].0).await;
    let to_n1 = hub
        .post(
            &format!("/v1/containers/{web}/migrate"),
            &format!(r#"{{"instance_id":"{}","target_node":"n1"}}"#, placed[0].0),
        )
        .await;
    assert_invalid(&to_n1, "target_node");
    assert!(
        to_n1.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unschedulable"),
        "{}",
        to_n1.1
    );

    // Uncordoned (twice: the same answer): schedulable again.
    for _ in 0..2 {
        let (status, n) = hub.post("/v1/nodes/n1/uncordon", "").await;
        assert_eq!(status, StatusCode::OK, "{n}");
        assert_eq!(
            (&n["node_id"], &n["unschedulable"]),
            (&"n1".into(), &false.into())
        );
    }
    node_event(&hub, "n1", "uncordoned").await;
    let api = create(&hub, 3, "256MiB").await;
    rec.pass().await.unwrap();
    let nodes: BTreeSet<String> = placement(&hub, &api)
        .await
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    assert!(
        nodes.contains("n1"),
        "spreading puts one replica on n1 again: {nodes:?}"
    );
}

#[tokio::test]
async fn a_plain_drain_restarts_the_replicas_elsewhere() {
    let hub = Hub::start(false).await;
    let mut rec = Reconciler::new(hub.store.clone(), Duration::from_secs(60));
    let _alive = hub.keep_alive(&["n1", "n2"]);
    register(&hub, "n1", 8 * GIB).await;
    let cid = create(&hub, 2, "1GiB").await;
    rec.pass().await.unwrap();
    let before = placement(&hub, &cid).await;
    for (iid, _) in &before {
        running(&hub, "n1", iid).await;
    }
    register(&hub, "n2", 8 * GIB).await;

    // No body: not live.
    let (status, drained) = hub.post("/v1/nodes/n1/drain", "").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{drained}");
    assert_eq!(drained["unschedulable"], true);
    assert_eq!(drained["migrations"], serde_json::json!([]));
    assert_eq!(drained["skipped"], serde_json::json!([]));
    let replaced: BTreeSet<&str> = drained["replaced"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["instance_id"].as_str().unwrap())
        .collect();
    let old: BTreeSet<&str> = before.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(replaced, old);
    assert!(hub.keys("/berth/migrations/").await.is_empty());

    // n1 is told to stop them (stopping markers, no assignment); replacements land on n2.
    assert_eq!(hub.keys("/berth/stopping/n1/").await.len(), 2);
    rec.pass().await.unwrap();
    let a = hub.assignments().await;
    assert!(a.keys().all(|(n, _)| n == "n2"), "{:?}", a.keys());
    let now = placement(&hub, &cid).await;
    let fresh: Vec<&(String, String)> = now
        .iter()
        .filter(|(i, _)| !old.contains(i.as_str()))
        .collect();
    assert_eq!(fresh.len(), 2, "{now:?}");
    assert!(fresh.iter().all(|(_, n)| n == "n2"), "{now:?}");

    // Once n1 reports them removed, only the replacements are left.
    let old_ids: Vec<&str> = old.iter().copied().collect();
    hub.report("n1", &[], &old_ids).await;
    wait_for(10, "old replicas released", || async {
        (node(&hub, "n1").await["instances"] == 0).then_some(())
    })
    .await;
    let left = placement(&hub, &cid).await;
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|(_, n)| n == "n2"), "{left:?}");
}

#[tokio::test]
async fn what_cannot_move_is_reported_and_the_node_is_cordoned_anyway() {
    let hub = Hub::start(false).await;
    let mut rec = Reconciler::new(hub.store.clone(), Duration::from_secs(60));
    let _alive = hub.keep_alive(&["n1", "n2"]);
    register(&hub, "n1", 8 * GIB).await;
    let big = create(&hub, 1, "4GiB").await;
    let small = create(&hub, 1, "256MiB").await;
    let idle = create(&hub, 1, "256MiB").await;
    rec.pass().await.unwrap();
    let big_iid = placement(&hub, &big).await[0].0.clone();
    let small_iid = placement(&hub, &small).await[0].0.clone();
    let idle_iid = placement(&hub, &idle).await[0].0.clone();
    running(&hub, "n1", &big_iid).await;
    running(&hub, "n1", &small_iid).await;
    // `idle` has not reported running yet.
    register(&hub, "n2", 2 * GIB).await;

    let (status, drained) = hub.post("/v1/nodes/n1/drain", r#"{"live":true}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{drained}");
    assert_eq!(drained["unschedulable"], true);
    let migrations = drained["migrations"].as_array().unwrap();
    assert_eq!(migrations.len(), 1, "{drained}");
    assert_eq!(migrations[0]["instance_id"], small_iid.as_str());
    let skipped = drained["skipped"].as_array().unwrap();
    let reason = |iid: &str| {
        skipped
            .iter()
            .find(|s| s["instance_id"] == iid)
            .unwrap_or_else(|| panic!("{iid} not skipped: {drained}"))["reason"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(skipped.len(), 2, "{drained}");
    assert!(
        reason(&big_iid).contains("no node has"),
        "{}",
        reason(&big_iid)
    );
    assert!(
        reason(&idle_iid).contains("only a running replica"),
        "{}",
        reason(&idle_iid)
    );
    assert_eq!(node(&hub, "n1").await["unschedulable"], true);
    // They keep running where they are.
    assert_eq!(placement(&hub, &big).await[0].1, "n1");
}

#[tokio::test]
async fn unknown_nodes_and_bad_bodies_are_refused() {
    let hub = Hub::start(false).await;
    register(&hub, "n1", 8 * GIB).await;
    for path in ["/v1/nodes/nope/drain", "/v1/nodes/nope/uncordon"] {
        let (status, body) = hub.post(path, "").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    assert_eq!(
        hub.post("/v1/nodes/nope/drain", r#"{"live":true}"#).await.0,
        StatusCode::NOT_FOUND
    );
    assert_invalid(
        &hub.post("/v1/nodes/n1/drain", r#"{"live":"yes"}"#).await,
        "live",
    );
    assert_invalid(
        &hub.post("/v1/nodes/n1/drain", r#"{"live":1}"#).await,
        "live",
    );
    assert_invalid(
        &hub.post("/v1/nodes/n1/drain", r#"{"live":true,"force":true}"#)
            .await,
        "force",
    );
    assert_invalid(&hub.post("/v1/nodes/n1/drain", "[true]").await, "body");
    assert_invalid(&hub.post("/v1/nodes/n1/drain", "{live").await, "body");
    // None of those cordoned it.
    assert_eq!(node(&hub, "n1").await["unschedulable"], false);
    // A node with nothing on it drains to an empty answer.
    let (status, drained) = hub.post("/v1/nodes/n1/drain", r#"{"live":false}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{drained}");
    assert_eq!(
        drained,
        serde_json::json!({"node_id": "n1", "unschedulable": true, "migrations": [],
                           "skipped": [], "replaced": []})
    );

    // The same over gRPC.
    let unknown = hub
        .grpc
        .uncordon(tonic::Request::new(v1::UncordonNodeRequest {
            node_id: "nope".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let n = hub
        .grpc
        .uncordon(tonic::Request::new(v1::UncordonNodeRequest {
            node_id: "n1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!n.unschedulable);
    let drained = hub
        .grpc
        .drain(tonic::Request::new(v1::DrainNodeRequest {
            node_id: "n1".into(),
            live: true,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(drained.unschedulable && drained.migrations.is_empty());
    assert!(
        hub.grpc
            .get_node(tonic::Request::new(v1::GetNodeRequest {
                node_id: "n1".into()
            }))
            .await
            .unwrap()
            .into_inner()
            .unschedulable
    );
}
