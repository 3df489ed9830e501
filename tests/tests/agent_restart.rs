//! An agent that crashes and comes back while the hub is down keeps its containers serving, and the
//! hub, once back, finds them RUNNING without starting duplicates.

use berth_tests::api::placements;
use berth_tests::cleanup::{pids_rooted_under, process_root};
use berth_tests::image::DEMO_BODY;
use berth_tests::{wait_for, Cluster};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

fn assert_all_serve(cluster: &Cluster, placed: &[(String, String, String)], when: &str) {
    for (id, node, ip) in placed {
        // Short: these containers were serving a moment ago and must not have stopped.
        let served = cluster.wait_serving(node, ip, DEMO_BODY, Duration::from_secs(3));
        if let Err(e) = served {
            panic!("{when}: {id} at {ip} on {node} does not serve: {e:#}");
        }
    }
}

/// Distinct container root filesystems with a process on host `i`: one per running container.
fn running_roots(cluster: &Cluster, i: usize) -> BTreeSet<String> {
    pids_rooted_under(&cluster.state().node_dir(i))
        .into_iter()
        .filter_map(process_root)
        .collect()
}

#[test]
fn agent_restarted_while_hub_is_down_keeps_containers_serving() {
    let mut cluster = Cluster::start().expect("starting the cluster");
    let api = cluster.api().clone();
    let net = api
        .create_network("payments", "10.10.0.0/16")
        .expect("network create");
    let id = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.5", "memory": "64MB",
            "network_id": net["network_id"], "replicas": 3,
        }))
        .expect("deploy");
    let c = api
        .wait_running(&id, 3, Duration::from_secs(90))
        .expect("3 replicas running");
    let placed = placements(&c);
    assert_all_serve(&cluster, &placed, "after deploy");
    let node0 = cluster.node_ids()[0].clone();
    let on_node0 = placed.iter().filter(|p| p.1 == node0).count();
    assert!(on_node0 > 0, "nothing placed on {node0}: {c}");
    assert_eq!(
        running_roots(&cluster, 0).len(),
        on_node0,
        "containers on {node0}"
    );

    cluster.stop_hub();
    cluster.kill_agent(0);
    assert_all_serve(&cluster, &placed, "agent killed, hub down");

    cluster.start_agent(0).expect("restarting the agent");
    // Let the restarted agent find its containers and fail to reach the hub a few times.
    std::thread::sleep(Duration::from_secs(5));
    assert_all_serve(&cluster, &placed, "agent restarted, hub down");
    assert_eq!(
        running_roots(&cluster, 0).len(),
        on_node0,
        "the restarted agent changed the containers on {node0} while the hub was down"
    );

    cluster.start_hub().expect("restarting the hub");
    cluster
        .wait_nodes_healthy(Duration::from_secs(30))
        .expect("agents re-register");
    let after = wait_for(
        "the container to be RUNNING again",
        Duration::from_secs(30),
        || {
            let c = api
                .container(&id)?
                .ok_or_else(|| anyhow::anyhow!("{id} is gone"))?;
            Ok(if c["status"] == "RUNNING" {
                Ok(c)
            } else {
                Err(c.to_string())
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    // Same instances, same places: nothing was restarted or duplicated.
    assert_eq!(
        placements(&after),
        placed,
        "instances changed across the restart: {after}"
    );
    // And it stays that way (a late reconcile must not start a second copy).
    std::thread::sleep(Duration::from_secs(3));
    let later = api.container(&id).expect("get").expect("exists");
    assert_eq!(
        placements(&later),
        placed,
        "instances changed later: {later}"
    );
    assert_eq!(later["status"], "RUNNING", "{later}");
    assert_eq!(
        running_roots(&cluster, 0).len(),
        on_node0,
        "duplicates on {node0}"
    );
    assert_all_serve(&cluster, &placed, "hub back");
}
