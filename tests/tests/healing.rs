//! Self-healing as a user sees it: a node dies outright (its agent, its containers and its network
//! namespace gone), its replicas come back RUNNING on the other nodes, the node is shown DOWN; when it
//! returns, the replicas that moved away are stopped there, so nothing runs twice and no address is
//! used twice.

use berth_tests::api::placements;
use berth_tests::image::DEMO_BODY;
use berth_tests::{wait_for, Cluster};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// Generous deadline for waits; the heal itself is held to [`HEAL_BOUND`].
const HEAL_TIMEOUT: Duration = Duration::from_secs(60);
/// The bound: a killed node's replicas RUNNING elsewhere in under 10 s with default
/// settings (`cargo xtask bench heal` measures it on release builds).
const HEAL_BOUND: Duration = Duration::from_secs(10);

#[test]
fn a_killed_node_is_healed_around_and_does_not_duplicate_when_back() {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .start()
        .expect("starting the cluster");
    let nodes = cluster.node_ids().to_vec();
    let api = cluster.api().clone();
    api.create_network("heal", "10.50.0.0/24").expect("network");
    let id = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.1", "memory": "32MB",
            "network_id": "heal", "name": "web", "replicas": 4,
        }))
        .expect("deploy");
    let before = api.wait_running(&id, 4, RUN_TIMEOUT).expect("4 running");
    let victim = 2;
    let victim_id = nodes[victim].clone();
    let moved: Vec<(String, String, String)> = placements(&before)
        .into_iter()
        .filter(|(_, node, _)| *node == victim_id)
        .collect();
    assert!(
        !moved.is_empty(),
        "a replica should run on {victim_id}: {before}"
    );

    let killed = Instant::now();
    cluster.kill_node(victim).expect("killing the node");

    // The replicas come back on the other nodes and serve there.
    let healed = wait_for(
        "4 replicas RUNNING away from the dead node",
        HEAL_TIMEOUT,
        || {
            let Some(c) = api.container(&id)? else {
                anyhow::bail!("container {id} vanished");
            };
            let placed = placements(&c);
            let ok = berth_tests::api::all_running(&c, 4)
                && placed.iter().all(|(_, node, _)| *node != victim_id);
            Ok(if ok { Ok(c) } else { Err(c.to_string()) })
        },
    )
    .expect("healed");
    let took = killed.elapsed();
    assert!(
        took < HEAL_BOUND,
        "replicas RUNNING elsewhere {took:?} after the kill (bound {HEAL_BOUND:?})"
    );
    let placed = placements(&healed);
    for (iid, node, ip) in &placed {
        if let Err(e) = cluster.wait_serving(node, ip, DEMO_BODY, Duration::from_secs(10)) {
            panic!("{iid} ({ip} on {node}) does not serve: {e:#}");
        }
    }
    let ips: BTreeSet<&str> = placed.iter().map(|(_, _, ip)| ip.as_str()).collect();
    assert_eq!(ips.len(), 4, "addresses must be unique: {healed}");
    for (_, _, old_ip) in &moved {
        assert!(
            !ips.contains(old_ip.as_str()),
            "{old_ip} is still held by the dead node's replica and must not be reused yet"
        );
    }
    let status = wait_for(&format!("{victim_id} shown DOWN"), HEAL_TIMEOUT, || {
        let nodes = api.nodes()?;
        let s = nodes
            .iter()
            .find(|n| n["node_id"] == victim_id.as_str())
            .map(|n| n["status"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        Ok(if s == "DOWN" { Ok(s) } else { Err(s) })
    });
    if let Err(e) = status {
        panic!("{e:#}");
    }

    // The node comes back: it stops what moved away and the cluster keeps exactly 4 replicas.
    cluster.revive_node(victim).expect("reviving the node");
    cluster
        .wait_nodes_healthy(RUN_TIMEOUT)
        .expect("all nodes healthy again");
    let old_ids: Vec<String> = moved.iter().map(|(iid, _, _)| iid.clone()).collect();
    let r = wait_for(
        "the moved replicas gone from the revived node",
        HEAL_TIMEOUT,
        || {
            let left = cluster.traces_of(&old_ids);
            Ok(if left.is_empty() {
                Ok(())
            } else {
                Err(left.join("; "))
            })
        },
    );
    if let Err(e) = r {
        panic!("{e:#}");
    }
    let after = api
        .wait_running(&id, 4, RUN_TIMEOUT)
        .expect("still 4 running");
    assert_eq!(
        placements(&after),
        placed,
        "the replicas that took over stay where they are"
    );
    // Scaling up now may reuse the addresses the revived node released: still no duplicate.
    api.scale(&id, 6).expect("scale to 6");
    let bigger = api.wait_running(&id, 6, RUN_TIMEOUT).expect("6 running");
    let ips: BTreeSet<String> = placements(&bigger)
        .into_iter()
        .map(|(_, _, ip)| ip)
        .collect();
    assert_eq!(ips.len(), 6, "addresses must be unique: {bigger}");
}
