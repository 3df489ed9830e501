//! The `berth` binary against a stub hub (axum on loopback) that speaks the issue-5 REST shapes: the
//! requests it sends (paths, bodies), what it prints and its exit status. No cluster needed.
#![allow(clippy::unwrap_used)] // a failing test should point at the line

use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// What the stub saw, and how far the rollout it plays has gone.
#[derive(Default)]
struct Stub {
    requests: Mutex<Vec<String>>,
    polls: AtomicUsize,
}

type Shared = Arc<Stub>;

impl Stub {
    fn record(&self, line: String) {
        self.requests.lock().unwrap().push(line);
    }
}

fn container(rev: u64, rollout: Value, last: Value) -> Value {
    json!({
        "container_id": "ctr-1", "name": "web", "image": "reg/app:v1", "status": "UPDATING",
        "replicas": 2, "revision": rev, "rollout": rollout, "last_rollout": last,
        "instances": [
            {"instance_id": "ins-a", "status": "RUNNING", "revision": 4},
            {"instance_id": "ins-b", "status": "RUNNING", "revision": 3}
        ]
    })
}

async fn list(State(s): State<Shared>) -> Json<Value> {
    s.record("GET /v1/containers".into());
    Json(json!({"containers": [
        {"container_id": "ctr-1", "name": "web", "instances": []},
        {"container_id": "ctr-2", "name": "", "instances": []}
    ]}))
}

/// Plays an update to revision 4 that fails and rolls back: under way, rolling back, rolled back.
async fn get_container(State(s): State<Shared>, Path(id): Path<String>) -> Json<Value> {
    s.record(format!("GET /v1/containers/{id}"));
    let n = s.polls.fetch_add(1, Ordering::SeqCst);
    Json(match n {
        0 => container(
            4,
            json!({"state": "UPDATING", "revision": 4, "from_revision": 3, "max_unavailable": 1}),
            Value::Null,
        ),
        1 => container(
            3,
            json!({"state": "ROLLING_BACK", "revision": 3, "from_revision": 4, "max_unavailable": 1,
                   "reason": "ins-a failed its probe"}),
            Value::Null,
        ),
        _ => container(
            3,
            Value::Null,
            // As the hub records it: the revision it went back to, and the reason of the rollback.
            json!({"revision": 3, "result": "ROLLED_BACK", "reason": "ins-a failed its probe 3 times",
                   "finished_at": "2026-11-26T10:00:00Z"}),
        ),
    })
}

async fn action(
    State(s): State<Shared>,
    Path((id, verb)): Path<(String, String)>,
    body: String,
) -> (StatusCode, Json<Value>) {
    s.record(format!("POST /v1/containers/{id}/{verb} {body}"));
    match verb.as_str() {
        "stop" => (StatusCode::ACCEPTED, Json(json!({"status": "STOPPING"}))),
        "start" => (
            StatusCode::CONFLICT,
            Json(json!({"error": {"code": "conflict", "message": "ctr-1 is deleting"}})),
        ),
        "update" => (
            StatusCode::ACCEPTED,
            Json(json!({"status": "UPDATING", "revision": 4})),
        ),
        "rollback" => (
            StatusCode::ACCEPTED,
            Json(json!({"status": "ROLLING_BACK", "revision": 2})),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such action"})),
        ),
    }
}

async fn revisions(State(s): State<Shared>, Path(id): Path<String>) -> Json<Value> {
    s.record(format!("GET /v1/containers/{id}/revisions"));
    Json(json!({"revisions": [
        {"revision": 1, "image": "reg/app:v1", "image_digest": "sha256:aaaaaaaaaaaaaaaa", "cpu": "0.1",
         "memory": "64MiB", "cause": "create", "created_at": "2026-11-26T10:00:00Z", "current": false},
        {"revision": 2, "image": "reg/app:v2", "image_digest": "sha256:bbbbbbbbbbbbbbbb", "cpu": "0.1",
         "memory": "64MiB", "cause": "update", "created_at": "2026-11-26T10:00:00Z", "current": true}
    ]}))
}

async fn stats(State(s): State<Shared>, Path(id): Path<String>) -> (StatusCode, Json<Value>) {
    s.record(format!("GET /v1/containers/{id}/stats"));
    if id == "ctr-2" {
        return (
            StatusCode::BAD_GATEWAY,
            Json(json!({"error": {"code": "unavailable", "message": "node-b unreachable"}})),
        );
    }
    (
        StatusCode::OK,
        Json(json!({"container_id": id, "instances": [
            {"instance_id": "ins-a", "node_id": "node-a", "status": "RUNNING", "cpu_percent": 2.5,
             "memory_bytes": 1048576, "memory_limit_bytes": 67108864, "rx_bytes": 2048, "tx_bytes": 1024,
             "restarts": 3}
        ]})),
    )
}

async fn events(State(s): State<Shared>, RawQuery(q): RawQuery) -> Json<Value> {
    s.record(format!("GET /v1/events?{}", q.unwrap_or_default()));
    Json(json!({"events": [
        {"event_id": "5-00aa", "time": "2026-11-26T10:00:00Z", "kind": "container", "id": "ctr-1",
         "container_id": "ctr-1", "type": "status", "status": "STOPPING", "reason": "stop requested"}
    ], "more": false, "next": "6"}))
}

/// Starts the stub on an ephemeral loopback port.
async fn stub() -> (String, Shared) {
    let state: Shared = Arc::default();
    let app = Router::new()
        .route("/v1/containers", get(list))
        .route("/v1/containers/{id}", get(get_container))
        .route("/v1/containers/{id}/revisions", get(revisions))
        .route("/v1/containers/{id}/stats", get(stats))
        .route("/v1/containers/{id}/{verb}", post(action))
        .route("/v1/events", get(events))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

async fn berth(hub: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("--hub")
        .arg(hub)
        .args(args)
        .output()
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn update_wait_reports_the_rollback_and_fails() {
    let (hub, state) = stub().await;
    let out = berth(
        &hub,
        &[
            "update",
            "web",
            "--image",
            "reg/app:v2",
            "--env",
            "A=1",
            "--wait",
        ],
    )
    .await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}");
    assert_eq!(
        stdout,
        "ctr-1 UPDATING revision 4\nROLLED_BACK revision 4: ins-a failed its probe 3 times\n"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("UPDATING to revision 4: 1/2 replicas ready"),
        "{stderr}"
    );
    assert!(stderr.contains("ROLLING_BACK to revision 3"), "{stderr}");
    let requests = state.requests.lock().unwrap().clone();
    assert_eq!(requests[0], "GET /v1/containers");
    let update: Value = serde_json::from_str(
        requests[1]
            .strip_prefix("POST /v1/containers/ctr-1/update ")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(update, json!({"image": "reg/app:v2", "env": {"A": "1"}}));
}

#[tokio::test]
async fn actions_errors_and_tables() {
    let (hub, state) = stub().await;

    let out = berth(&hub, &["stop", "ctr-1", "--instance", "ins-a"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ctr-1 ins-a STOPPING\n");

    let out = berth(&hub, &["start", "web"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "error: ctr-1 is deleting\n");

    let out = berth(&hub, &["rollback", "web"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ctr-1 ROLLING_BACK revision 2\n");

    let out = berth(&hub, &["revisions", "web"]).await;
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("REVISION   IMAGE"), "{stdout}");
    assert!(
        stdout.contains("\n2 *        reg/app:v2   bbbbbbbbbbbb   0.1"),
        "{stdout}"
    );

    let out = berth(&hub, &["stats", "web"]).await;
    assert_eq!(
        text(&out.stdout),
        "INSTANCE   NODE     STATUS    CPU%    MEM/LIMIT    NET RX/TX   RESTARTS\n\
         ins-a      node-a   RUNNING   2.50%   1MiB/64MiB   2KiB/1KiB   3\n"
    );

    let out = berth(&hub, &["top", "--once"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "CONTAINER   INSTANCE   NODE     STATUS    CPU%    MEM/LIMIT    NET RX/TX   RESTARTS\n\
         web         ins-a      node-a   RUNNING   2.50%   1MiB/64MiB   2KiB/1KiB   3\n\
         ctr-2: no stats: node-b unreachable\n"
    );

    let out = berth(&hub, &["events", "--since", "4"]).await;
    assert_eq!(
        text(&out.stdout),
        "2026-11-26T10:00:00Z container ctr-1 status STOPPING reason=\"stop requested\"\n"
    );

    // Refused locally: the stub sees nothing of these.
    let before = state.requests.lock().unwrap().len();
    let out = berth(&hub, &["update", "web", "--env", "FOO"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("invalid --env \"FOO\""));
    let out = berth(&hub, &["run", "img", "--health-http", "bad"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(state.requests.lock().unwrap().len(), before);

    let requests = state.requests.lock().unwrap().clone();
    for want in [
        r#"POST /v1/containers/ctr-1/stop {"instance_id":"ins-a"}"#,
        "POST /v1/containers/ctr-1/rollback {}",
        "GET /v1/events?since=4",
    ] {
        assert!(
            requests.iter().any(|r| r == want),
            "{want} not in {requests:#?}"
        );
    }
}
