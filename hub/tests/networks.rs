//! Networks through REST against a real etcd.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure points at the line
mod common;

use axum::http::StatusCode;
use common::{assert_invalid, Hub};

#[tokio::test]
async fn network_lifecycle_and_errors() {
    let hub = Hub::start(false).await;

    let (status, net) = hub
        .post(
            "/v1/networks",
            r#"{"name":"payments","cidr":"10.10.0.0/16"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{net}");
    assert_eq!(net["name"], "payments");
    assert_eq!(net["cidr"], "10.10.0.0/16");
    assert_eq!(net["gateway"], "10.10.0.1");
    let id = net["network_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("net-") && id.len() == 16, "{id}");

    let (status, list) = hub.get("/v1/networks").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["networks"].as_array().unwrap().len(), 1);
    assert_eq!(hub.get(&format!("/v1/networks/{id}")).await.1, net);
    assert_eq!(
        hub.get("/v1/networks/payments").await.1,
        net,
        "names work where ids do"
    );

    let before = hub.keys("/berth/").await;
    assert_invalid(
        &hub.post(
            "/v1/networks",
            r#"{"name":"other","cidr":"10.10.128.0/17"}"#,
        )
        .await,
        "cidr",
    );
    assert_invalid(
        &hub.post("/v1/networks", r#"{"name":"other","cidr":"10.10.0.1/16"}"#)
            .await,
        "cidr",
    );
    assert_invalid(
        &hub.post("/v1/networks", r#"{"name":"other","cidr":"banana"}"#)
            .await,
        "cidr",
    );
    assert_invalid(
        &hub.post(
            "/v1/networks",
            r#"{"name":"Bad_Name","cidr":"10.11.0.0/16"}"#,
        )
        .await,
        "name",
    );
    assert_invalid(
        &hub.post(
            "/v1/networks",
            r#"{"name":"x","cidr":"10.11.0.0/16","mtu":1}"#,
        )
        .await,
        "mtu",
    );
    assert_invalid(
        &hub.post("/v1/networks", r#"{"name":"x","cidr":16}"#).await,
        "cidr",
    );
    assert_invalid(
        &hub.post("/v1/networks", r#"{"cidr":"10.11.0.0/16"}"#).await,
        "name",
    );
    let (status, body) = hub
        .post(
            "/v1/networks",
            r#"{"name":"payments","cidr":"10.11.0.0/16"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        hub.keys("/berth/").await,
        before,
        "a rejected request writes nothing"
    );

    let (status, body) = hub.get("/v1/networks/net-000000000000").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");

    // In use: 409 until the container is gone.
    let (status, ctr) = hub
        .post(
            "/v1/containers",
            r#"{"image":"demo:1","network_id":"payments"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ctr}");
    let (status, body) = hub.delete(&format!("/v1/networks/{id}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "conflict");
    // Without a reconciler nothing is placed: marking for deletion and finalising is all it takes.
    let cid = ctr["container_id"].as_str().unwrap();
    assert_eq!(
        hub.delete(&format!("/v1/containers/{cid}")).await.0,
        StatusCode::ACCEPTED
    );
    assert!(
        berth_hub::service::lifecycle::finalize_container(&hub.store, cid)
            .await
            .unwrap()
    );

    let (status, body) = hub.delete(&format!("/v1/networks/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(
        hub.get(&format!("/v1/networks/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
    // Only the cluster CA stays: it lives as long as the cluster.
    assert_eq!(
        hub.keys("/berth/").await,
        vec![berth_hub::store::keys::CA.to_owned()]
    );
}

#[tokio::test]
async fn default_network_is_created_on_first_use_and_overlap_is_a_conflict() {
    let hub = Hub::start(false).await;
    let (status, body) = hub.post("/v1/containers", r#"{"image":"demo:1"}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (_, nets) = hub.get("/v1/networks").await;
    assert_eq!(nets["networks"][0]["name"], "default");
    assert_eq!(nets["networks"][0]["cidr"], "10.88.0.0/16");

    let hub = Hub::start(false).await;
    let (status, _) = hub
        .post("/v1/networks", r#"{"name":"mine","cidr":"10.88.0.0/24"}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = hub.post("/v1/containers", r#"{"image":"demo:1"}"#).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("mine"),
        "{body}"
    );
}

#[tokio::test]
async fn etcd_down_is_503() {
    let mut hub = Hub::start(false).await;
    assert_eq!(hub.get("/v1/networks").await.0, StatusCode::OK);
    hub.etcd.kill();
    let (status, body) = hub.get("/v1/networks").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
}
