//! Container requests through REST against a real etcd: validation, ids and names.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure points at the line
mod common;

use axum::http::StatusCode;
use common::{assert_invalid, Hub};

#[tokio::test]
async fn bad_container_requests_are_400_naming_the_field_and_write_nothing() {
    let hub = Hub::start(false).await;
    let (status, _) = hub
        .post(
            "/v1/networks",
            r#"{"name":"payments","cidr":"10.10.0.0/16"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let before = hub.keys("/berth/").await;

    let cases: &[(&str, &str)] = &[
        (r#"{"cpu":"1"}"#, "image"),
        (r#"{"image":""}"#, "image"),
        (r#"{"image":"demo:1","cpu":"lots"}"#, "cpu"),
        (r#"{"image":"demo:1","cpu":"-1"}"#, "cpu"),
        (r#"{"image":"demo:1","cpu":0.5}"#, "cpu"),
        (r#"{"image":"demo:1","memory":"4GBs"}"#, "memory"),
        (r#"{"image":"demo:1","memory":"12"}"#, "memory"),
        (r#"{"image":"demo:1","replicas":-1}"#, "replicas"),
        (r#"{"image":"demo:1","replicas":100000}"#, "replicas"),
        (r#"{"image":"demo:1","replicas":"3"}"#, "replicas"),
        (r#"{"image":"demo:1","replicas":1.5}"#, "replicas"),
        (r#"{"image":"demo:1","network_id":"nope"}"#, "network_id"),
        (r#"{"image":"demo:1","network_id":7}"#, "network_id"),
        (r#"{"image":"demo:1","name":"Not_DNS"}"#, "name"),
        (r#"{"image":"demo:1","command":"httpd -f"}"#, "command"),
        (r#"{"image":"demo:1","command":["httpd",""]}"#, "command[1]"),
        (r#"{"image":"demo:1","env":{"A=B":"1"}}"#, "env.A=B"),
        (r#"{"image":"demo:1","env":{"A":1}}"#, "env.A"),
        (r#"{"image":"demo:1","env":["A=1"]}"#, "env"),
        (r#"{"image":"demo:1","cpus":"1"}"#, "cpus"),
        ("not json", "body"),
        ("", "body"),
    ];
    for (body, field) in cases {
        let resp = hub.post("/v1/containers", body).await;
        assert_invalid(&resp, field);
    }
    assert_eq!(
        hub.keys("/berth/").await,
        before,
        "rejected requests wrote something"
    );

    assert_invalid(
        &hub.post(
            "/v1/containers/ctr-000000000000/scale",
            r#"{"replicas":"2"}"#,
        )
        .await,
        "replicas",
    );
    for path in ["/v1/containers/ctr-000000000000", "/v1/containers/nothing"] {
        let (status, body) = hub.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
        assert_eq!(hub.delete(path).await.0, StatusCode::NOT_FOUND);
    }
    let (status, _) = hub
        .post("/v1/containers/ctr-000000000000/scale", r#"{"replicas":2}"#)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(hub.get("/v1/nodes/n9").await.0, StatusCode::NOT_FOUND);
    assert_eq!(hub.keys("/berth/").await, before);
}

#[tokio::test]
async fn create_get_list_by_id_and_name() {
    let hub = Hub::start(false).await;
    hub.post(
        "/v1/networks",
        r#"{"name":"payments","cidr":"10.10.0.0/16"}"#,
    )
    .await;
    let (status, body) = hub
        .post(
            "/v1/containers",
            r#"{"image":"reg:5000/demo/httpd:1","cpu":"500m","memory":"64MB","replicas":3,
                "network_id":"payments","name":"web","command":["httpd","-f"],"env":{"A":"1"}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "DEPLOYING");
    let id = body["container_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ctr-") && id.len() == 16);

    let (status, c) = hub.get(&format!("/v1/containers/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(c["name"], "web");
    assert_eq!(c["image"], "reg:5000/demo/httpd:1");
    assert_eq!(c["status"], "DEPLOYING");
    assert_eq!(c["replicas"], 3);
    assert_eq!(c["cpu"], "0.5");
    assert_eq!(c["cpu_millis"], 500);
    assert_eq!(c["memory_bytes"], 64_000_000);
    assert_eq!(c["command"], serde_json::json!(["httpd", "-f"]));
    assert_eq!(c["env"]["A"], "1");
    time::OffsetDateTime::parse(
        c["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(
        hub.get("/v1/containers/web").await.1["container_id"],
        id.as_str()
    );

    let (status, body) = hub
        .post(
            "/v1/containers",
            r#"{"image":"demo:1","name":"web","network_id":"payments"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    let (_, list) = hub.get("/v1/containers").await;
    assert_eq!(list["containers"].as_array().unwrap().len(), 1);
    let (status, body) = hub
        .post("/v1/containers/web/scale", r#"{"replicas":5}"#)
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("SCALING"))
    );
    assert_eq!(hub.get("/v1/containers/web").await.1["replicas"], 5);
    let (status, body) = hub.delete("/v1/containers/web").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("DELETING"))
    );
    assert_eq!(hub.get("/v1/containers/web").await.1["status"], "DELETING");
    let (status, _) = hub
        .post("/v1/containers/web/scale", r#"{"replicas":1}"#)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "no scaling while deleting");
}
