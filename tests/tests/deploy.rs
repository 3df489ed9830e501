//! Deploy, scale and delete through the REST API and through the CLI, on two netns hosts.

use berth_tests::api::{instances, placements};
use berth_tests::image::DEMO_BODY;
use berth_tests::{in_cidr, wait_for, Cluster};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const CIDR: &str = "10.10.0.0/16";
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
const GONE_TIMEOUT: Duration = Duration::from_secs(60);

/// Every instance RUNNING with a distinct IP in the CIDR, serving the demo page to its own node.
fn assert_serving(cluster: &Cluster, c: &Value) {
    let placed = placements(c);
    let ips: BTreeSet<&str> = placed.iter().map(|(_, _, ip)| ip.as_str()).collect();
    assert_eq!(ips.len(), placed.len(), "two instances share an IP: {c}");
    for (id, node, ip) in &placed {
        assert!(in_cidr(ip, CIDR), "{id} has ip {ip:?}, not in {CIDR}: {c}");
        assert!(
            cluster.node_ids().contains(node),
            "{id} on unknown node {node:?}"
        );
        let served = cluster.wait_serving(node, ip, DEMO_BODY, Duration::from_secs(10));
        if let Err(e) = served {
            panic!("{id} ({ip} on {node}) does not serve the demo page: {e:#}");
        }
    }
}

/// Waits (a few seconds: release is asynchronous) until `check` finds nothing left.
fn assert_no_traces(what: &str, check: impl Fn() -> Vec<String>) {
    let r = wait_for(what, Duration::from_secs(10), || {
        let left = check();
        Ok(if left.is_empty() {
            Ok(())
        } else {
            Err(left.join("; "))
        })
    });
    if let Err(e) = r {
        panic!("{what}: {e:#}");
    }
}

#[test]
fn deploy_scale_and_delete_over_two_nodes() {
    let cluster = Cluster::start().expect("starting the cluster");
    let api = cluster.api();

    let net = api
        .create_network("payments", CIDR)
        .expect("network create");
    assert_eq!(net["name"], "payments", "{net}");
    assert_eq!(net["cidr"], CIDR, "{net}");
    assert_eq!(net["gateway"], "10.10.0.1", "{net}");
    let network_id = net["network_id"].as_str().expect("network_id").to_string();

    let id = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.5", "memory": "64MB",
            "network_id": network_id, "replicas": 3,
        }))
        .expect("deploy");
    let c = api
        .wait_running(&id, 3, RUN_TIMEOUT)
        .expect("3 replicas running");
    assert_eq!(c["container_id"], id.as_str(), "{c}");
    assert_eq!(c["image"], cluster.demo_image().as_str(), "{c}");
    assert_eq!(c["network_id"], network_id.as_str(), "{c}");
    assert_eq!(c["replicas"], 3, "{c}");
    let placed = placements(&c);
    let nodes: BTreeSet<&str> = placed.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(
        nodes.len(),
        2,
        "3 replicas should spread over both nodes: {c}"
    );
    assert!(
        placed
            .iter()
            .any(|(_, n, ip)| c["node_id"] == n.as_str() && c["ip"] == ip.as_str()),
        "top-level node_id/ip should be a running replica's: {c}"
    );
    assert_serving(&cluster, &c);
    let mut seen: BTreeSet<String> = placed.iter().map(|(i, _, _)| i.clone()).collect();
    // The leftover checks below prove something only if they see live containers.
    let ids: Vec<String> = seen.iter().cloned().collect();
    let live = cluster.traces_of(&ids);
    assert!(
        live.iter().any(|t| t.starts_with("cgroup")),
        "no cgroup found for running instances: {live:?}"
    );
    let live = cluster.container_traces();
    for kind in ["process", "mount", "veth"] {
        assert!(
            live.iter().any(|t| t.starts_with(kind)),
            "no {kind} found for running instances: {live:?}"
        );
    }

    api.scale(&id, 5).expect("scale to 5");
    let c = api
        .wait_running(&id, 5, RUN_TIMEOUT)
        .expect("5 replicas running");
    assert_serving(&cluster, &c);
    let five: BTreeSet<String> = placements(&c).into_iter().map(|(i, _, _)| i).collect();
    assert!(
        seen.iter().all(|i| five.contains(i)),
        "scaling up replaced running instances: before {seen:?}, after {five:?}"
    );
    seen.extend(five.iter().cloned());

    api.scale(&id, 2).expect("scale to 2");
    let c = api
        .wait_running(&id, 2, RUN_TIMEOUT)
        .expect("2 replicas running");
    assert_serving(&cluster, &c);
    let two: BTreeSet<String> = placements(&c).into_iter().map(|(i, _, _)| i).collect();
    let removed: Vec<String> = five.difference(&two).cloned().collect();
    assert_eq!(
        removed.len(),
        3,
        "scale to 2 should stop 3 of {five:?}, kept {two:?}"
    );
    assert_no_traces("scaled-down instances released", || {
        cluster.traces_of(&removed)
    });

    api.delete_container(&id).expect("delete");
    api.wait_gone(&id, GONE_TIMEOUT).expect("container gone");
    let all: Vec<String> = seen.into_iter().collect();
    assert_no_traces("deleted container released", || {
        let mut left = cluster.traces_of(&all);
        left.extend(cluster.container_traces());
        left
    });
    let listed = api.containers().expect("list containers");
    assert!(listed.is_empty(), "containers still listed: {listed:?}");
}

#[test]
fn the_cli_deploys_shows_scales_and_removes() {
    let cluster = Cluster::start().expect("starting the cluster");
    let api = cluster.api();
    let berth = |args: &[&str]| -> String {
        match cluster.berth(args) {
            Ok(out) => out,
            Err(e) => panic!("{e:#}"),
        }
    };

    berth(&["network", "create", "payments", "--cidr", CIDR]);
    assert!(berth(&["network", "ls"]).contains("payments"));
    let image = cluster.demo_image();
    let run = berth(&[
        "run",
        &image,
        "--cpu",
        "0.5",
        "--memory",
        "64MB",
        "--replicas",
        "3",
        "--network",
        "payments",
        "--name",
        "web",
    ]);
    let listed = api.containers().expect("list containers");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0]["container_id"].as_str().expect("id").to_string();
    assert_eq!(listed[0]["name"], "web", "{listed:?}");
    assert!(
        run.contains(&id),
        "`berth run` should print the new id {id}: {run}"
    );
    let c = api
        .wait_running(&id, 3, RUN_TIMEOUT)
        .expect("3 replicas running");

    let ps = berth(&["ps"]);
    let row = ps
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("no row for {id} in `berth ps`:\n{ps}"));
    for want in [image.as_str(), "RUNNING", "3/3"] {
        assert!(row.contains(want), "`berth ps` row lacks {want:?}:\n{ps}");
    }

    let inspect = berth(&["inspect", &id]);
    for (inst, node, ip) in placements(&c) {
        for want in [&inst, &node, &ip] {
            assert!(
                inspect.contains(want.as_str()),
                "`berth inspect` lacks {want}:\n{inspect}"
            );
        }
    }
    let raw: Value = serde_json::from_str(&berth(&["inspect", &id, "-o", "json"]))
        .expect("`berth inspect -o json` prints JSON");
    assert_eq!(raw["container_id"], id.as_str(), "{raw}");
    assert_eq!(instances(&raw).len(), 3, "{raw}");

    berth(&["scale", &id, "5"]);
    let c = api
        .wait_running(&id, 5, RUN_TIMEOUT)
        .expect("5 replicas running");
    assert_serving(&cluster, &c);

    let nodes = berth(&["nodes"]);
    for node in cluster.node_ids() {
        let row = nodes
            .lines()
            .find(|l| l.contains(node.as_str()))
            .unwrap_or_else(|| panic!("no row for {node} in `berth nodes`:\n{nodes}"));
        assert!(row.contains("HEALTHY"), "{node} not HEALTHY:\n{nodes}");
    }

    berth(&["rm", &id]);
    api.wait_gone(&id, GONE_TIMEOUT).expect("container gone");
    assert!(
        !berth(&["ps"]).contains(&id),
        "removed container still in `berth ps`"
    );

    let networks = api.networks().expect("list networks");
    let net = networks
        .iter()
        .find(|n| n["name"] == "payments")
        .unwrap_or_else(|| panic!("no payments network: {networks:?}"));
    let net_id = net["network_id"].as_str().expect("network_id");
    berth(&["network", "rm", net_id]);
    assert!(!berth(&["network", "ls"]).contains("payments"));
}
