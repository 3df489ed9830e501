//! Live migration jobs at the hub, against a real etcd, with the nodes played by the test: the
//! request's checks and statuses, the orders each node gets, progress reports, the switch when the
//! target runs the replica, and the failures that leave it where it was.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure points at the line
mod common;

use std::time::Duration;

use axum::http::StatusCode;
use berth_hub::reconciler::Reconciler;
use berth_proto::v1::agent_service_server::AgentService;
use berth_proto::v1::migration_service_server::MigrationService;
use berth_proto::v1::{self, InstanceStatus, MigrationPhase, MigrationRole};
use common::{assert_invalid, Hub};
use serde_json::Value;

const GIB: u64 = 1 << 30;

async fn register(hub: &Hub, node: &str, memory_bytes: u64, migration_addr: &str) {
    hub.register_migratable(node, memory_bytes, migration_addr)
        .await;
}

async fn report(
    hub: &Hub,
    node: &str,
    iid: &str,
    status: InstanceStatus,
    migration: Option<v1::MigrationProgress>,
) {
    let req = v1::ReportStatusRequest {
        node_id: node.into(),
        reports: vec![v1::InstanceReport {
            instance_id: iid.into(),
            status: status as i32,
            migration,
            ..Default::default()
        }],
        removed: vec![],
    };
    hub.grpc
        .report_status(tonic::Request::new(req))
        .await
        .unwrap();
}

fn progress(mid: &str, phase: MigrationPhase) -> v1::MigrationProgress {
    v1::MigrationProgress {
        migration_id: mid.into(),
        phase: phase as i32,
        ..Default::default()
    }
}

/// A container with `replicas` RUNNING on n1 (the only node registered so far).
async fn running_on_n1(hub: &Hub, rec: &mut Reconciler, replicas: u32) -> (String, Vec<String>) {
    let (status, body) = hub
        .post(
            "/v1/containers",
            &format!(r#"{{"image":"demo:1","replicas":{replicas},"memory":"1GiB"}}"#),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let cid = body["container_id"].as_str().unwrap().to_owned();
    rec.pass().await.unwrap();
    let iids: Vec<String> = hub
        .assignments()
        .await
        .into_keys()
        .filter(|(n, _)| n == "n1")
        .map(|(_, i)| i)
        .collect();
    assert_eq!(iids.len(), replicas as usize);
    for iid in &iids {
        report(hub, "n1", iid, InstanceStatus::Running, None).await;
    }
    (cid, iids)
}

async fn job(hub: &Hub, mid: &str) -> Value {
    let (status, body) = hub.get(&format!("/v1/migrations/{mid}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn a_replica_moves_only_when_the_target_runs_it() {
    let hub = Hub::start(false).await;
    let mut rec = Reconciler::new(hub.store.clone(), Duration::from_secs(60));
    register(&hub, "n1", 8 * GIB, "127.0.0.1:9752").await;
    let alive = hub.keep_alive(&["n1", "n2", "n3"]);
    let (cid, iids) = running_on_n1(&hub, &mut rec, 1).await;
    let iid = &iids[0];
    let ip = hub.assignments().await[&("n1".to_owned(), iid.clone())]
        .ip
        .clone();
    register(&hub, "n2", 8 * GIB, "127.0.0.2:9752").await;
    register(&hub, "n3", 8 * GIB, "").await;

    // No target named: the only other node with a migration endpoint.
    let (status, started) = hub.post(&format!("/v1/containers/{cid}/migrate"), "").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    assert_eq!(started["status"], "IN_PROGRESS");
    assert_eq!(started["phase"], "PREPARE");
    assert_eq!(
        (&started["source_node"], &started["target_node"]),
        (&Value::from("n1"), &Value::from("n2"))
    );
    assert_eq!(started["instance_id"], iid.as_str());
    let mid = started["migration_id"].as_str().unwrap().to_owned();
    let again = hub
        .post(
            &format!("/v1/containers/{cid}/migrate"),
            r#"{"target_node":"n2"}"#,
        )
        .await;
    assert_eq!(again.0, StatusCode::CONFLICT, "{}", again.1);

    // The leader hands out the orders: the source keeps running it, the target gets the same ip.
    rec.pass().await.unwrap();
    let a = hub.assignments().await;
    let source = &a[&("n1".to_owned(), iid.clone())];
    let order = source.migration.as_ref().unwrap();
    assert_eq!(order.role, MigrationRole::Source as i32);
    assert_eq!(
        (order.peer_node_id.as_str(), order.peer_addr.as_str()),
        ("n2", "127.0.0.2:9752")
    );
    let target = &a[&("n2".to_owned(), iid.clone())];
    let order = target.migration.as_ref().unwrap();
    assert_eq!(order.role, MigrationRole::Target as i32);
    assert_eq!(
        (order.peer_node_id.as_str(), order.peer_addr.as_str()),
        ("n1", "127.0.0.1:9752")
    );
    assert_eq!(target.ip, ip);

    // Nothing chosen yet: the job asked for `auto` and says no more.
    let j = job(&hub, &mid).await;
    assert_eq!(
        (&j["mode"], &j["chosen_mode"]),
        (&Value::from("auto"), &Value::from(""))
    );
    assert!(j.get("write_rate_mib_s").is_none(), "{j}");
    // Progress from the source, with what `auto` became and the rate that chose it; the
    // instance is still n1's meanwhile.
    let mut p = progress(&mid, MigrationPhase::Precopy);
    p.rounds = 3;
    p.bytes_sent = 5 << 20;
    p.pages_sent = 1280;
    p.chosen_mode = v1::MigrationMode::Precopy as i32;
    p.write_rate_mib_s = Some(87.5);
    report(&hub, "n1", iid, InstanceStatus::Running, Some(p)).await;
    let j = job(&hub, &mid).await;
    assert_eq!(
        (&j["phase"], &j["rounds"], &j["pages_sent"]),
        (&Value::from("PRECOPY"), &Value::from(3), &Value::from(1280))
    );
    assert_eq!(
        (&j["chosen_mode"], &j["write_rate_mib_s"]),
        (&Value::from("precopy"), &Value::from(87.5))
    );
    // The target's reports carry no choice and change none.
    let target_side = progress(&mid, MigrationPhase::Precopy);
    report(&hub, "n2", iid, InstanceStatus::Starting, Some(target_side)).await;
    let j = job(&hub, &mid).await;
    assert_eq!(j["chosen_mode"], "precopy", "{j}");
    assert_eq!(j["write_rate_mib_s"], 87.5, "{j}");
    // gRPC says the same.
    let g = hub
        .grpc
        .get_migration(tonic::Request::new(v1::GetMigrationRequest {
            migration_id: mid.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.chosen_mode, v1::MigrationMode::Precopy as i32);
    assert_eq!(g.write_rate_mib_s, Some(87.5));
    // A node outside the job is ignored.
    let mut stray = progress(&mid, MigrationPhase::Done);
    stray.error = "not mine".into();
    report(&hub, "n3", iid, InstanceStatus::Running, Some(stray)).await;
    assert_eq!(job(&hub, &mid).await["status"], "IN_PROGRESS");
    let (_, c) = hub.get(&format!("/v1/containers/{cid}")).await;
    assert_eq!(c["instances"][0]["node_id"], "n1");

    // The target runs it: the switch, in one step.
    let done = progress(&mid, MigrationPhase::Done);
    report(&hub, "n2", iid, InstanceStatus::Running, Some(done)).await;
    let j = job(&hub, &mid).await;
    assert_eq!(
        (&j["status"], &j["phase"], &j["downtime_ms"]),
        (
            &Value::from("COMPLETED"),
            &Value::from("DONE"),
            &Value::from(0)
        )
    );
    // The source hears the target's verdict after that and knows the downtime: still recorded,
    // and nothing else of the finished job changes.
    let mut switched = progress(&mid, MigrationPhase::Switch);
    switched.downtime_ms = 42;
    switched.rounds = 99;
    report(&hub, "n1", iid, InstanceStatus::Running, Some(switched)).await;
    let j = job(&hub, &mid).await;
    assert_eq!(
        (&j["status"], &j["phase"], &j["downtime_ms"], &j["rounds"]),
        (
            &Value::from("COMPLETED"),
            &Value::from("DONE"),
            &Value::from(42),
            &Value::from(3)
        )
    );
    assert!(!j["finished_at"].as_str().unwrap().is_empty());
    // Post-copy: the source serves pages after the target runs it, and says how many it sent.
    // Its figures still count, and only ever grow; the target's no longer move the job.
    let late = |bytes_sent: u64, pages_sent: u64| {
        let mut p = progress(&mid, MigrationPhase::Switch);
        p.rounds = 1;
        p.downtime_ms = 7;
        p.bytes_sent = bytes_sent;
        p.pages_sent = pages_sent;
        Some(p)
    };
    let figures = |j: &Value| {
        (
            j["bytes_sent"].as_u64().unwrap(),
            j["pages_sent"].as_u64().unwrap(),
        )
    };
    report(
        &hub,
        "n1",
        iid,
        InstanceStatus::Running,
        late(9 << 20, 2017),
    )
    .await;
    let j = job(&hub, &mid).await;
    assert_eq!(figures(&j), (9 << 20, 2017), "{j}");
    assert_eq!(
        (&j["status"], &j["phase"], &j["downtime_ms"], &j["rounds"]),
        (
            &Value::from("COMPLETED"),
            &Value::from("DONE"),
            &Value::from(42),
            &Value::from(3)
        ),
        "nothing else moves"
    );
    let updated = j["updated_at"].clone();
    report(&hub, "n1", iid, InstanceStatus::Running, late(6 << 20, 100)).await;
    let j = job(&hub, &mid).await;
    assert_eq!(figures(&j), (9 << 20, 2017), "never lower: {j}");
    assert_eq!(j["updated_at"], updated, "no write for nothing new");
    report(
        &hub,
        "n1",
        iid,
        InstanceStatus::Running,
        late(10 << 20, 1900),
    )
    .await;
    assert_eq!(figures(&job(&hub, &mid).await), (10 << 20, 2017));
    report(
        &hub,
        "n2",
        iid,
        InstanceStatus::Running,
        late(64 << 20, 9000),
    )
    .await;
    assert_eq!(
        figures(&job(&hub, &mid).await),
        (10 << 20, 2017),
        "the target's late figures are not taken"
    );
    let a = hub.assignments().await;
    assert!(
        !a.contains_key(&("n1".to_owned(), iid.clone())),
        "source kept it"
    );
    let moved = &a[&("n2".to_owned(), iid.clone())];
    assert!(moved.migration.is_none());
    assert_eq!(moved.ip, ip);
    let (_, c) = hub.get(&format!("/v1/containers/{cid}")).await;
    assert_eq!(c["instances"][0]["node_id"], "n2");
    assert_eq!(c["instances"][0]["ip"], ip.as_str());
    assert_eq!(c["instances"][0]["status"], "RUNNING");
    // Later passes leave it there.
    rec.pass().await.unwrap();
    assert_eq!(hub.assignments().await.len(), 1);

    let (_, list) = hub.get(&format!("/v1/migrations?container={cid}")).await;
    assert_eq!(list["migrations"][0]["migration_id"], mid.as_str());
    alive.stop();
}

#[tokio::test]
async fn requests_that_cannot_be_carried_out_are_refused() {
    let hub = Hub::start(false).await;
    let mut rec = Reconciler::new(hub.store.clone(), Duration::from_secs(60));
    register(&hub, "n1", 8 * GIB, "127.0.0.1:9752").await;
    let alive = hub.keep_alive(&["n1", "n2", "n3", "tiny"]);
    let (status, body) = hub
        .post(
            "/v1/containers",
            r#"{"image":"demo:1","replicas":2,"memory":"1GiB"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let cid = body["container_id"].as_str().unwrap().to_owned();
    rec.pass().await.unwrap();
    let iids: Vec<String> = hub
        .assignments()
        .await
        .into_keys()
        .map(|(_, i)| i)
        .collect();
    register(&hub, "n2", 8 * GIB, "127.0.0.2:9752").await;
    register(&hub, "n3", 8 * GIB, "").await;
    register(&hub, "tiny", 512 << 20, "127.0.0.4:9752").await;
    let migrate = |body: &'static str| {
        let path = format!("/v1/containers/{cid}/migrate");
        let hub = &hub;
        async move { hub.post(&path, body).await }
    };

    assert_eq!(
        hub.post("/v1/containers/nope/migrate", "").await.0,
        StatusCode::NOT_FOUND
    );
    assert_invalid(&migrate("").await, "instance_id");
    assert_eq!(
        migrate(r#"{"instance_id":"ins-000000000000"}"#).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        migrate(r#"{"instance_id":"x","bogus":1}"#).await.0,
        StatusCode::BAD_REQUEST
    );
    let one = |extra: &str| format!(r#"{{"instance_id":"{}"{extra}}}"#, iids[0]);
    let post = |body: String| {
        let path = format!("/v1/containers/{cid}/migrate");
        let hub = &hub;
        async move { hub.post(&path, &body).await }
    };
    // Not running yet (no report): only a running replica moves.
    assert_eq!(post(one("")).await.0, StatusCode::CONFLICT);
    for iid in &iids {
        report(&hub, "n1", iid, InstanceStatus::Running, None).await;
    }
    assert_invalid(&post(one(r#","mode":"teleport""#)).await, "mode");
    assert_eq!(
        post(one(r#","target_node":"n9""#)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_invalid(&post(one(r#","target_node":"n1""#)).await, "target_node");
    assert_invalid(&post(one(r#","target_node":"n3""#)).await, "target_node");
    assert_invalid(&post(one(r#","target_node":"tiny""#)).await, "target_node");
    assert_eq!(
        hub.get("/v1/migrations/mig-000000000000").await.0,
        StatusCode::NOT_FOUND
    );
    // Nothing was recorded by the refused requests.
    assert!(hub.keys("/berth/migrations/").await.is_empty());
    let ok = post(one(r#","target_node":"n2","mode":"precopy""#)).await;
    assert_eq!(ok.0, StatusCode::ACCEPTED, "{}", ok.1);
    assert_eq!(ok.1["mode"], "precopy");
    alive.stop();
}

#[tokio::test]
async fn a_failure_leaves_the_replica_where_it_was() {
    let hub = Hub::start(false).await;
    let mut rec = Reconciler::new(hub.store.clone(), Duration::from_secs(60));
    register(&hub, "n1", 8 * GIB, "127.0.0.1:9752").await;
    let alive = hub.keep_alive(&["n1"]);
    let (cid, iids) = running_on_n1(&hub, &mut rec, 1).await;
    let iid = &iids[0];
    register(&hub, "n2", 8 * GIB, "127.0.0.2:9752").await;
    // n2 heartbeats on its own, so the test can let it die.
    let n2 = hub.keep_alive(&["n2"]);

    // The target gives up: FAILED with its words, the target's assignment goes, the source's
    // order goes (it resumes the replica), the instance never left n1.
    let (_, j) = hub.post(&format!("/v1/containers/{cid}/migrate"), "").await;
    let mid = j["migration_id"].as_str().unwrap().to_owned();
    rec.pass().await.unwrap();
    assert_eq!(hub.assignments().await.len(), 2);
    let mut failed = progress(&mid, MigrationPhase::Restore);
    failed.error = "criu restore: exited 1".into();
    report(&hub, "n2", iid, InstanceStatus::Failed, Some(failed)).await;
    let j = job(&hub, &mid).await;
    assert_eq!(j["status"], "FAILED");
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .contains("criu restore: exited 1"),
        "{j}"
    );
    let a = hub.assignments().await;
    assert_eq!(a.len(), 1);
    assert!(a[&("n1".to_owned(), iid.clone())].migration.is_none());
    let (_, c) = hub.get(&format!("/v1/containers/{cid}")).await;
    assert_eq!(c["instances"][0]["node_id"], "n1");
    assert_eq!(c["instances"][0]["status"], "RUNNING");

    // A target that dies: the leader fails the job once its liveness lapses.
    let (s, j) = hub.post(&format!("/v1/containers/{cid}/migrate"), "").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{j}");
    let mid = j["migration_id"].as_str().unwrap().to_owned();
    rec.pass().await.unwrap();
    n2.stop();
    // The lease is 3 s; give it time to lapse, passing as the leader would.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let j = loop {
        rec.pass().await.unwrap();
        let j = job(&hub, &mid).await;
        if j["status"] == "FAILED" {
            break j;
        }
        assert!(tokio::time::Instant::now() < deadline, "never failed: {j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(j["error"].as_str().unwrap().contains("node n2"), "{j}");
    assert_eq!(hub.assignments().await.len(), 1);
    alive.stop();
}

/// Post-copy: the replica is the target's as soon as the target runs it, but the job runs on
/// until the source served every page; pages that never arrive fail it without moving the
/// replica back (its memory is gone from both nodes); a source whose pages finish before the
/// target's report arrives completes it at that report.
#[tokio::test]
async fn a_postcopy_job_switches_first_and_ends_when_the_memory_arrived() {
    async fn start(hub: &Hub, cid: &str, body: &str) -> String {
        let (s, j) = hub
            .post(&format!("/v1/containers/{cid}/migrate"), body)
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{j}");
        j["migration_id"].as_str().unwrap().to_owned()
    }
    /// `node` says DONE for `mid`, the replica RUNNING.
    async fn report_done(hub: &Hub, node: &str, iid: &str, mid: &str) {
        let done = progress(mid, MigrationPhase::Done);
        report(hub, node, iid, InstanceStatus::Running, Some(done)).await;
    }
    let hub = Hub::start(false).await;
    let mut rec = Reconciler::new(hub.store.clone(), Duration::from_secs(60));
    register(&hub, "n1", 8 * GIB, "127.0.0.1:9752").await;
    let alive = hub.keep_alive(&["n1", "n2"]);
    let (cid, iids) = running_on_n1(&hub, &mut rec, 1).await;
    let iid = &iids[0];
    register(&hub, "n2", 8 * GIB, "127.0.0.2:9752").await;
    let placed_on = |c: &Value| c["instances"][0]["node_id"].as_str().unwrap().to_owned();
    let with_choice = |mid: &str, phase: MigrationPhase| {
        let mut p = progress(mid, phase);
        p.chosen_mode = v1::MigrationMode::Postcopy as i32;
        Some(p)
    };

    // `auto` chose post-copy (the source said so); the target runs it: switched, not done.
    let mid = start(&hub, &cid, "").await;
    rec.pass().await.unwrap();
    report(
        &hub,
        "n1",
        iid,
        InstanceStatus::Running,
        with_choice(&mid, MigrationPhase::Transfer),
    )
    .await;
    report(
        &hub,
        "n2",
        iid,
        InstanceStatus::Running,
        with_choice(&mid, MigrationPhase::Done),
    )
    .await;
    let j = job(&hub, &mid).await;
    assert_eq!(
        (&j["status"], &j["phase"]),
        (&Value::from("IN_PROGRESS"), &Value::from("SWITCH")),
        "{j}"
    );
    assert_eq!(j["switched"], true, "{j}");
    let (_, c) = hub.get(&format!("/v1/containers/{cid}")).await;
    assert_eq!(placed_on(&c), "n2", "the target's now: {c}");
    let a = hub.assignments().await;
    assert_eq!(a.len(), 1, "the source's assignment went");
    assert!(a[&("n2".to_owned(), iid.clone())].migration.is_none());
    // No other move while its memory is still arriving.
    let (s, body) = hub
        .post(
            &format!("/v1/containers/{cid}/migrate"),
            r#"{"target_node":"n1"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    // Passes leave it alone: no orders, no failure, the instance counted once on n2.
    rec.pass().await.unwrap();
    assert_eq!(job(&hub, &mid).await["status"], "IN_PROGRESS");
    assert_eq!(hub.assignments().await.len(), 1);
    // The source served the last page: COMPLETED.
    let mut done = with_choice(&mid, MigrationPhase::Done).unwrap();
    done.pages_sent = 65536;
    done.downtime_ms = 250;
    report(&hub, "n1", iid, InstanceStatus::Running, Some(done)).await;
    let j = job(&hub, &mid).await;
    assert_eq!(
        (&j["status"], &j["phase"]),
        (&Value::from("COMPLETED"), &Value::from("DONE")),
        "{j}"
    );
    assert_eq!(
        (&j["pages_sent"], &j["downtime_ms"]),
        (&Value::from(65536), &Value::from(250))
    );
    assert!(!j["finished_at"].as_str().unwrap().is_empty());

    // Back to n1 as post-copy, whose pages then fail: FAILED, and the replica stays on n1 (its
    // new node), whose agent restarts it per policy; nothing is handed back to n2.
    let mid = start(&hub, &cid, r#"{"target_node":"n1","mode":"postcopy"}"#).await;
    rec.pass().await.unwrap();
    report_done(&hub, "n1", iid, &mid).await;
    assert_eq!(job(&hub, &mid).await["phase"], "SWITCH");
    let mut lost = progress(&mid, MigrationPhase::Switch);
    lost.error = "post-copy: the memory did not all reach node n1: connection lost".into();
    report(&hub, "n2", iid, InstanceStatus::Running, Some(lost)).await;
    let j = job(&hub, &mid).await;
    assert_eq!(j["status"], "FAILED", "{j}");
    assert!(
        j["error"].as_str().unwrap().contains("did not all reach"),
        "{j}"
    );
    let (_, c) = hub.get(&format!("/v1/containers/{cid}")).await;
    assert_eq!(placed_on(&c), "n1", "{c}");
    let a = hub.assignments().await;
    assert_eq!(a.len(), 1, "{:?}", a.keys());
    assert!(a.contains_key(&("n1".to_owned(), iid.clone())));

    // Pages all served before the target's report reached the hub: that report completes it.
    let mid = start(&hub, &cid, r#"{"target_node":"n2","mode":"postcopy"}"#).await;
    rec.pass().await.unwrap();
    report_done(&hub, "n1", iid, &mid).await;
    assert_eq!(job(&hub, &mid).await["status"], "IN_PROGRESS");
    report_done(&hub, "n2", iid, &mid).await;
    let j = job(&hub, &mid).await;
    assert_eq!(j["status"], "COMPLETED", "{j}");
    let (_, c) = hub.get(&format!("/v1/containers/{cid}")).await;
    assert_eq!(placed_on(&c), "n2", "{c}");
    assert_eq!(hub.assignments().await.len(), 1);

    // The source's last report lost (its agent died once it had served): the target's "memory
    // complete" ends the job as well.
    let mid = start(&hub, &cid, r#"{"target_node":"n1","mode":"postcopy"}"#).await;
    rec.pass().await.unwrap();
    report_done(&hub, "n1", iid, &mid).await;
    assert_eq!(job(&hub, &mid).await["phase"], "SWITCH");
    let mut complete = progress(&mid, MigrationPhase::Done);
    complete.memory_complete = true;
    report(
        &hub,
        "n1",
        iid,
        InstanceStatus::Running,
        Some(complete.clone()),
    )
    .await;
    let j = job(&hub, &mid).await;
    assert_eq!(
        (&j["status"], &j["pages_done"]),
        (&Value::from("COMPLETED"), &Value::from(true)),
        "{j}"
    );
    // Both target reports folded into one (the agent keeps the newest): completed at once.
    let mid = start(&hub, &cid, r#"{"target_node":"n2","mode":"postcopy"}"#).await;
    rec.pass().await.unwrap();
    complete.migration_id = mid.clone();
    report(&hub, "n2", iid, InstanceStatus::Running, Some(complete)).await;
    let j = job(&hub, &mid).await;
    assert_eq!(j["status"], "COMPLETED", "{j}");
    let (_, c) = hub.get(&format!("/v1/containers/{cid}")).await;
    assert_eq!(placed_on(&c), "n2", "{c}");
    assert_eq!(hub.assignments().await.len(), 1);
    alive.stop();
}
