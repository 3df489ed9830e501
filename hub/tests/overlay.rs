//! What the data plane needs from the hub: VXLAN ids, encrypted networks, links, service IPs and DNS
//! names, tunnel addresses and node keys, and each node's network view on its desired-state stream.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure points at the line
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use berth_proto::v1;
use berth_proto::v1::agent_service_server::AgentService;
use common::{assert_invalid, wait_for, Hub};
use futures::StreamExt;

#[tokio::test]
async fn networks_get_distinct_vnis_links_and_refuse_reserved_ranges() {
    let hub = Hub::start(false).await;
    let (status, a) = hub
        .post("/v1/networks", r#"{"name":"a","cidr":"10.10.0.0/24"}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{a}");
    let (status, b) = hub
        .post(
            "/v1/networks",
            r#"{"name":"b","cidr":"10.11.0.0/24","encrypted":true}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{b}");
    assert_eq!(a["encrypted"], false);
    assert_eq!(b["encrypted"], true);
    let (va, vb) = (a["vni"].as_u64().unwrap(), b["vni"].as_u64().unwrap());
    assert!(va >= 4096 && vb >= 4096 && va != vb, "{va} {vb}");
    let a_id = a["network_id"].as_str().unwrap().to_owned();
    let b_id = b["network_id"].as_str().unwrap().to_owned();

    // Service and tunnel ranges are not for networks.
    assert_invalid(
        &hub.post("/v1/networks", r#"{"name":"c","cidr":"10.96.4.0/24"}"#)
            .await,
        "cidr",
    );
    assert_invalid(
        &hub.post("/v1/networks", r#"{"name":"c","cidr":"10.200.0.0/15"}"#)
            .await,
        "cidr",
    );
    assert_invalid(
        &hub.post(
            "/v1/networks",
            r#"{"name":"c","cidr":"10.12.0.0/24","encrypted":"yes"}"#,
        )
        .await,
        "encrypted",
    );

    // Links: symmetric, idempotent, by id or name; bad peers are 400, unknown networks 404.
    let (status, linked) = hub
        .post(
            &format!("/v1/networks/{a_id}/links"),
            r#"{"network_id":"b"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{linked}");
    assert_eq!(linked["linked_network_ids"][0], b_id.as_str());
    assert_eq!(
        hub.get("/v1/networks/b").await.1["linked_network_ids"][0],
        a_id.as_str()
    );
    let (status, _) = hub
        .post(
            &format!("/v1/networks/{a_id}/links"),
            r#"{"network_id":"b"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "linking twice is fine");
    assert_invalid(
        &hub.post("/v1/networks/a/links", r#"{"network_id":"a"}"#)
            .await,
        "network_id",
    );
    assert_invalid(
        &hub.post("/v1/networks/a/links", r#"{"network_id":"nope"}"#)
            .await,
        "network_id",
    );
    assert_invalid(
        &hub.post("/v1/networks/a/links", r#"{}"#).await,
        "network_id",
    );
    assert_eq!(
        hub.post("/v1/networks/nope/links", r#"{"network_id":"a"}"#)
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    // Unlink through either form of DELETE.
    let (status, unlinked) = hub
        .call(
            Method::DELETE,
            "/v1/networks/b/links",
            Some(r#"{"network_id":"a"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{unlinked}");
    assert_eq!(unlinked["linked_network_ids"], serde_json::json!([]));
    assert_eq!(
        hub.delete("/v1/networks/a/links/b").await.0,
        StatusCode::NOT_FOUND,
        "not linked any more"
    );

    // Deleting a linked network unlinks it and frees its VNI claim.
    hub.post("/v1/networks/a/links", r#"{"network_id":"b"}"#)
        .await;
    assert_eq!(hub.delete("/v1/networks/b").await.0, StatusCode::NO_CONTENT);
    assert_eq!(
        hub.get("/v1/networks/a").await.1["linked_network_ids"],
        serde_json::json!([])
    );
    assert_eq!(
        hub.keys("/berth/vni/").await,
        vec![format!("/berth/vni/{va}")]
    );
}

#[tokio::test]
async fn containers_get_unique_service_ips_and_dns_names_released_on_delete() {
    let hub = Hub::start(true).await;
    hub.post("/v1/networks", r#"{"name":"shop","cidr":"10.20.0.0/24"}"#)
        .await;
    let mut vips = BTreeSet::new();
    let mut ids = Vec::new();
    for name in ["web", "api", ""] {
        let body = if name.is_empty() {
            r#"{"image":"reg/x:1","network_id":"shop"}"#.to_owned()
        } else {
            format!(r#"{{"image":"reg/x:1","network_id":"shop","name":"{name}"}}"#)
        };
        let (status, created) = hub.post("/v1/containers", &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{created}");
        let id = created["container_id"].as_str().unwrap().to_owned();
        let (_, c) = hub.get(&format!("/v1/containers/{id}")).await;
        let vip: std::net::Ipv4Addr = c["service_ip"].as_str().unwrap().parse().unwrap();
        assert!(
            "10.96.0.0/16"
                .parse::<ipnet::Ipv4Net>()
                .unwrap()
                .contains(&vip),
            "{vip}"
        );
        vips.insert(vip);
        let label = if name.is_empty() { id.as_str() } else { name };
        assert_eq!(c["dns_name"], format!("{label}.shop.berth"));
        ids.push(id);
    }
    assert_eq!(vips.len(), 3, "service IPs are unique");
    assert_eq!(hub.keys("/berth/vips/").await.len(), 3);
    for id in &ids {
        hub.delete(&format!("/v1/containers/{id}")).await;
    }
    wait_for(10, "service IP claims released", || async {
        hub.keys("/berth/vips/").await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn nodes_keep_their_tunnel_address_and_bad_keys_are_refused() {
    let hub = Hub::start(false).await;
    let key = "q0s8OeWN2jd38V6zAU0Qd9p3qE5TAkjg9r8ahiB0Z3s=";
    let register = |node: &str, key: &str| v1::RegisterRequest {
        node_id: node.into(),
        hostname: node.into(),
        advertise_ip: "192.0.2.1".into(),
        cpu_millis: 1000,
        memory_bytes: 1 << 30,
        wireguard_public_key: key.into(),
        ..Default::default()
    };
    hub.grpc
        .register(tonic::Request::new(register("n1", key)))
        .await
        .unwrap();
    hub.grpc
        .register(tonic::Request::new(register("n2", key)))
        .await
        .unwrap();
    let (_, n1) = hub.get("/v1/nodes/n1").await;
    let (_, n2) = hub.get("/v1/nodes/n2").await;
    assert_eq!(n1["wireguard_public_key"], key);
    let t1 = n1["tunnel_ip"].as_str().unwrap().to_owned();
    assert_ne!(t1, n2["tunnel_ip"].as_str().unwrap());
    assert!(t1.starts_with("10.201."), "{t1}");
    // Re-registering keeps the address.
    hub.grpc
        .register(tonic::Request::new(register("n1", key)))
        .await
        .unwrap();
    assert_eq!(hub.get("/v1/nodes/n1").await.1["tunnel_ip"], t1.as_str());
    assert_eq!(hub.keys("/berth/tunnels/").await.len(), 2);

    for bad in [
        "not base64!",
        "AAAA",
        "q0s8OeWN2jd38V6zAU0Qd9p3qE5TAkjg9r8ahiB0Z3sA",
    ] {
        let err = hub
            .grpc
            .register(tonic::Request::new(register("n3", bad)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}: {err}");
        assert!(err.message().contains("wireguard_public_key"), "{err}");
    }
    assert_eq!(hub.get("/v1/nodes/n3").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn each_node_streams_its_network_view_and_it_follows_changes() {
    let hub = Hub::start(true).await;
    hub.register("n1", 4000, 8 << 30).await;
    hub.register("n2", 4000, 8 << 30).await;
    hub.post("/v1/networks", r#"{"name":"app","cidr":"10.30.0.0/24"}"#)
        .await;
    let (_, created) = hub
        .post(
            "/v1/containers",
            r#"{"image":"reg/x:1","network_id":"app","name":"web","replicas":2}"#,
        )
        .await;
    let cid = created["container_id"].as_str().unwrap().to_owned();
    // Replicas spread over both nodes.
    let placed = wait_for(10, "both replicas placed", || async {
        let (_, c) = hub.get(&format!("/v1/containers/{cid}")).await;
        let instances = c["instances"].as_array().unwrap().clone();
        (instances.len() == 2
            && instances
                .iter()
                .all(|i| !i["node_id"].as_str().unwrap().is_empty()))
        .then_some(instances)
    })
    .await;

    let req = v1::WatchAssignmentsRequest {
        node_id: "n1".into(),
    };
    let mut stream = hub
        .grpc
        .watch_assignments(tonic::Request::new(req))
        .await
        .unwrap()
        .into_inner();
    let mut view = next_view(&mut stream).await;
    while view.endpoints.len() < 2 {
        view = next_view(&mut stream).await;
    }
    assert_eq!(view.networks.len(), 1);
    assert_eq!(view.networks[0].name, "app");
    assert!(view.networks[0].vni >= 4096);
    assert_eq!(view.services.len(), 1);
    assert_eq!(view.services[0].name, "web");
    assert!(
        view.endpoints.iter().all(|e| !e.ready),
        "nothing RUNNING yet"
    );
    assert_eq!(view.peers.len(), 1);
    assert_eq!(view.peers[0].node_id, "n2");
    assert_eq!(view.tunnel_prefix_len, 16);

    // The replica on n2 reports RUNNING: n1's view marks it ready, promptly.
    let on_n2 = placed
        .iter()
        .find(|i| i["node_id"] == "n2")
        .unwrap_or_else(|| panic!("no replica on n2: {placed:?}"))["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    hub.report("n2", &[(on_n2.as_str(), v1::InstanceStatus::Running)], &[])
        .await;
    loop {
        view = next_view(&mut stream).await;
        if view
            .endpoints
            .iter()
            .any(|e| e.instance_id == on_n2 && e.ready)
        {
            break;
        }
    }
}

async fn next_view<S>(stream: &mut S) -> v1::NetworkView
where
    S: futures::Stream<Item = Result<v1::DesiredState, tonic::Status>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a desired state within 5 s")
        .unwrap()
        .unwrap()
        .network_view
        .unwrap_or_default()
}
