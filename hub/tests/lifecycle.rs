//! Stop/start/restart, rolling updates, automatic and requested rollbacks, driven through the REST
//! API against a real etcd, with the nodes played by the test (it reads assignments and reports).

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure points at the line
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::StatusCode;
use berth_hub::reconciler::Reconciler;
use berth_proto::v1::{self, InstanceStatus};
use common::Hub;
use serde_json::Value;

const GIB: u64 = 1 << 30;

/// Every assignment in etcd, by instance id.
async fn assignments(hub: &Hub) -> BTreeMap<String, v1::Assignment> {
    hub.assignments()
        .await
        .into_iter()
        .map(|((_, iid), a)| (iid, a))
        .collect()
}

/// The node plays along: every assigned instance that is not stopped reports RUNNING with `digest`
/// for its revision, stopped ones STOPPED; instances it is told to stop are reported removed.
async fn node_reports(hub: &Hub, node: &str, digest_of: impl Fn(&v1::Assignment) -> String) {
    for a in assignments(hub).await.values() {
        let (status, reason) = if a.stopped {
            (InstanceStatus::Stopped, "stopped on request")
        } else {
            (InstanceStatus::Running, "")
        };
        hub.report_one(node, &a.instance_id, status, reason, &digest_of(a))
            .await;
    }
    let desired = hub.desired(node).await;
    let stopping: Vec<&str> = desired.stopping.iter().map(String::as_str).collect();
    hub.report(node, &[], &stopping).await;
}

async fn container(hub: &Hub, id: &str) -> Value {
    let (status, body) = hub.get(&format!("/v1/containers/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn create(hub: &Hub, body: &str) -> String {
    let (status, body) = hub.post("/v1/containers", body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["container_id"].as_str().unwrap().to_owned()
}

/// Passes and node reports until `done` holds (or fails after many rounds).
async fn converge(
    hub: &Hub,
    rec: &mut Reconciler,
    id: &str,
    digest_of: impl Fn(&v1::Assignment) -> String + Copy,
    done: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..40 {
        rec.pass().await.unwrap();
        node_reports(hub, "n1", digest_of).await;
        rec.pass().await.unwrap();
        let c = container(hub, id).await;
        if done(&c) {
            return c;
        }
    }
    panic!("never converged: {}", container(hub, id).await);
}

fn digest_by_image(a: &v1::Assignment) -> String {
    // A stand-in for the manifest digest the node would have pulled: stable per image name.
    let base = a.image.split('@').next().unwrap_or_default();
    format!("sha256:{:0>64}", base.len())
}

#[tokio::test]
async fn stop_start_and_restart_reach_the_assignments_and_show_in_the_status() {
    let hub = Hub::start(false).await;
    hub.register("n1", 4000, 8 * GIB).await;
    let id = create(
        &hub,
        r#"{"image":"demo:1","replicas":2,"stop_signal":"term","stop_timeout":"3s"}"#,
    )
    .await;
    let mut rec = Reconciler::new(hub.store.clone(), Duration::from_secs(60));
    let c = converge(&hub, &mut rec, &id, digest_by_image, |c| {
        c["status"] == "RUNNING"
    })
    .await;
    assert_eq!(c["stop_signal"], "SIGTERM");
    assert_eq!(c["stop_timeout"], "3s");
    let a = assignments(&hub).await;
    assert!(a
        .values()
        .all(|a| a.stop_timeout_ms == 3000 && a.stop_signal == "SIGTERM"));
    let ips: Vec<String> = a.values().map(|a| a.ip.clone()).collect();

    // Stop all: STOPPING until the node says STOPPED; addresses kept.
    let (s, b) = hub.post(&format!("/v1/containers/{id}/stop"), "").await;
    assert_eq!(
        (s, b["status"].as_str()),
        (StatusCode::ACCEPTED, Some("STOPPING"))
    );
    assert_eq!(container(&hub, &id).await["status"], "STOPPING");
    let c = converge(&hub, &mut rec, &id, digest_by_image, |c| {
        c["status"] == "STOPPED"
    })
    .await;
    assert!(c["instances"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["stopped"] == true));
    let a = assignments(&hub).await;
    assert!(a.values().all(|a| a.stopped));
    assert_eq!(a.values().map(|a| a.ip.clone()).collect::<Vec<_>>(), ips);

    // Start one: STARTING for it (the node still says STOPPED), the other stays stopped.
    let one = c["instances"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, _) = hub
        .post(
            &format!("/v1/containers/{id}/start"),
            &format!(r#"{{"instance_id":"{one}"}}"#),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let c = container(&hub, &id).await;
    assert_eq!(c["instances"][0]["status"], "STARTING");
    assert_eq!(c["instances"][1]["status"], "STOPPED");
    // Start all, then restart one: its generation moves, the other's does not.
    assert_eq!(
        hub.post(&format!("/v1/containers/{id}/start"), "{}")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    converge(&hub, &mut rec, &id, digest_by_image, |c| {
        c["status"] == "RUNNING"
    })
    .await;
    let before = assignments(&hub).await;
    hub.post(
        &format!("/v1/containers/{id}/restart"),
        &format!(r#"{{"instance_id":"{one}"}}"#),
    )
    .await;
    rec.pass().await.unwrap();
    let after = assignments(&hub).await;
    for (iid, a) in &after {
        let bumped = a.restart_generation == before[iid].restart_generation + 1;
        assert_eq!(bumped, *iid == one, "{iid}");
    }

    // Bad requests.
    let (s, b) = hub
        .post(
            &format!("/v1/containers/{id}/stop"),
            r#"{"instance_id":"ins-000000000000"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    let (s, b) = hub
        .post(&format!("/v1/containers/{id}/stop"), r#"{"instance":"x"}"#)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, _) = hub.post("/v1/containers/nope/restart", "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_rolling_update_replaces_replicas_within_max_unavailable_and_completes() {
    let hub = Hub::start(false).await;
    hub.register("n1", 8000, 16 * GIB).await;
    let id = create(&hub, r#"{"image":"demo:1","replicas":3}"#).await;
    let mut rec = Reconciler::new(hub.store.clone(), Duration::from_secs(60));
    converge(&hub, &mut rec, &id, digest_by_image, |c| {
        c["status"] == "RUNNING"
    })
    .await;

    let (s, b) = hub
        .post(
            &format!("/v1/containers/{id}/update"),
            r#"{"image":"demo:22","env":{"A":"1"},"max_unavailable":1}"#,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    assert_eq!(
        (b["status"].as_str(), b["revision"].as_u64()),
        (Some("UPDATING"), Some(2))
    );
    // Never more than one replica out of service: each round, at most one is not RUNNING.
    for _ in 0..40 {
        rec.pass().await.unwrap();
        let c = container(&hub, &id).await;
        let running = c["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["status"] == "RUNNING")
            .count();
        assert!(running >= 2, "too many unavailable: {c}");
        if c["status"] == "RUNNING" {
            break;
        }
        node_reports(&hub, "n1", digest_by_image).await;
    }
    let c = container(&hub, &id).await;
    assert_eq!(c["status"], "RUNNING", "{c}");
    assert_eq!(c["revision"], 2);
    assert_eq!(c["last_rollout"]["result"], "COMPLETE");
    assert!(c["rollout"].is_null());
    assert!(c["instances"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["revision"] == 2));
    assert!(
        assignments(&hub)
            .await
            .values()
            .all(|a| a.image.starts_with("demo:22")
                && a.env.get("A").map(String::as_str) == Some("1"))
    );
    // Revisions: 1 then 2, both pinned to the digest their replicas reported.
    let (_, revs) = hub.get(&format!("/v1/containers/{id}/revisions")).await;
    let revs = revs["revisions"].as_array().unwrap().clone();
    assert_eq!(revs.len(), 2);
    assert_eq!(
        (revs[0]["revision"].as_u64(), revs[0]["current"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(
        (revs[1]["revision"].as_u64(), revs[1]["current"].as_bool()),
        (Some(2), Some(true))
    );
    assert!(revs[0]["image_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));

    // The same spec again is no update.
    let (s, b) = hub
        .post(
            &format!("/v1/containers/{id}/update"),
            r#"{"image":"demo:22"}"#,
        )
        .await;
    assert_eq!(
        (s, b["status"].as_str()),
        (StatusCode::ACCEPTED, Some("UNCHANGED"))
    );

    // A requested rollback returns to revision 1 with the image pinned to its digest.
    let (s, b) = hub.post(&format!("/v1/containers/{id}/rollback"), "").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    assert_eq!(
        (b["status"].as_str(), b["revision"].as_u64()),
        (Some("ROLLING_BACK"), Some(1))
    );
    let c = converge(&hub, &mut rec, &id, digest_by_image, |c| {
        c["status"] == "RUNNING"
    })
    .await;
    assert_eq!(c["revision"], 1);
    assert_eq!(c["last_rollout"]["result"], "ROLLED_BACK");
    let pinned = format!("demo:1@{}", revs[0]["image_digest"].as_str().unwrap());
    assert!(assignments(&hub).await.values().all(|a| a.image == pinned));

    // Bad input.
    for (body, field) in [
        ("{}", "image"),
        (r#"{"cpu":"lots"}"#, "cpu"),
        (
            r#"{"image":"demo:3","max_unavailable":-1}"#,
            "max_unavailable",
        ),
        (r#"{"image":"demo:3","replicas":2}"#, "replicas"),
    ] {
        let (s, b) = hub.post(&format!("/v1/containers/{id}/update"), body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {b}");
        assert!(b.to_string().contains(field), "{body}: {b}");
    }
    let (s, _) = hub
        .post(
            &format!("/v1/containers/{id}/rollback"),
            r#"{"revision":9}"#,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_update_whose_replicas_fail_rolls_back_by_itself() {
    let hub = Hub::start(false).await;
    hub.register("n1", 8000, 16 * GIB).await;
    let id = create(&hub, r#"{"image":"demo:1","replicas":2}"#).await;
    let mut rec = Reconciler::new(hub.store.clone(), Duration::from_secs(60));
    converge(&hub, &mut rec, &id, digest_by_image, |c| {
        c["status"] == "RUNNING"
    })
    .await;
    let (s, _) = hub
        .post(
            &format!("/v1/containers/{id}/update"),
            r#"{"image":"demo:broken"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);

    // The node cannot pull the new image: its replicas of revision 2 are FAILED.
    for _ in 0..40 {
        rec.pass().await.unwrap();
        for a in assignments(&hub).await.values() {
            if a.image.starts_with("demo:broken") {
                hub.report_one(
                    "n1",
                    &a.instance_id,
                    InstanceStatus::Failed,
                    "pull demo:broken: manifest unknown",
                    "",
                )
                .await;
            } else {
                hub.report_one(
                    "n1",
                    &a.instance_id,
                    InstanceStatus::Running,
                    "",
                    &digest_by_image(a),
                )
                .await;
            }
        }
        let desired = hub.desired("n1").await;
        let stopping: Vec<&str> = desired.stopping.iter().map(String::as_str).collect();
        hub.report("n1", &[], &stopping).await;
        rec.pass().await.unwrap();
        if container(&hub, &id).await["status"] == "RUNNING" {
            break;
        }
    }
    let c = container(&hub, &id).await;
    assert_eq!(c["status"], "RUNNING", "{c}");
    assert_eq!(c["revision"], 1);
    assert_eq!(c["last_rollout"]["result"], "ROLLED_BACK");
    assert!(
        c["last_rollout"]["reason"]
            .as_str()
            .unwrap()
            .contains("manifest unknown"),
        "{c}"
    );
    assert!(c["instances"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["revision"] == 1 && i["status"] == "RUNNING"));
    // At least one replica of revision 1 served throughout: max_unavailable 1 of 2.
    let (_, events) = hub.get("/v1/events?since=0").await;
    let types: Vec<&str> = events["events"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["type"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        types.contains(&"update") && types.contains(&"rollback") && types.contains(&"rollout_done"),
        "{types:?}"
    );
}
