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

/// The bound: the next agent process reports the same instances RUNNING within 5 s.
const READOPT_BOUND: Duration = Duration::from_secs(5);

#[test]
fn agent_killed_with_20_containers_restarts_nothing_and_readopts_them_quickly() {
    let mut cluster = Cluster::builder()
        .nodes(1)
        .start()
        .expect("starting the cluster");
    let api = cluster.api().clone();
    api.create_network("many", "10.82.0.0/24").expect("network");
    let id = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.05", "memory": "16MB",
            "network_id": "many", "replicas": 20,
        }))
        .expect("deploy");
    let c = api
        .wait_running(&id, 20, Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let placed = placements(&c);
    assert_all_serve(&cluster, &placed, "after deploy");
    let pids_of = |cluster: &Cluster| -> Vec<Option<u32>> {
        placed
            .iter()
            .map(|(iid, node, _)| cluster.init_pid(node, iid))
            .collect()
    };
    let pids = pids_of(&cluster);
    assert!(pids.iter().all(Option::is_some), "init pids: {pids:?}");

    cluster.kill_agent(0);
    assert_all_serve(&cluster, &placed, "agent killed");

    let restarted_at = std::time::SystemTime::now();
    let started = std::time::Instant::now();
    cluster.start_agent(0).expect("restarting the agent");
    let fresh = |c: &serde_json::Value| {
        let inst = berth_tests::api::instances(c);
        inst.len() == 20
            && inst.iter().all(|i| {
                i["status"] == "RUNNING"
                    && i["updated_at"]
                        .as_str()
                        .and_then(|t| {
                            time::OffsetDateTime::parse(
                                t,
                                &time::format_description::well_known::Rfc3339,
                            )
                            .ok()
                        })
                        .is_some_and(|t| std::time::SystemTime::from(t) >= restarted_at)
            })
    };
    let after = wait_for(
        "every instance reported RUNNING by the new agent",
        Duration::from_secs(60),
        || {
            let c = api
                .container(&id)?
                .ok_or_else(|| anyhow::anyhow!("{id} is gone"))?;
            Ok(if fresh(&c) { Ok(c) } else { Err(c.to_string()) })
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let took = started.elapsed();
    eprintln!("the new agent reported all 20 RUNNING {took:?} after its start");
    assert!(
        took < READOPT_BOUND,
        "the new agent reported all 20 RUNNING after {took:?} (bound {READOPT_BOUND:?})"
    );
    assert_eq!(
        placements(&after),
        placed,
        "same instances and IPs: {after}"
    );
    assert!(
        berth_tests::api::instances(&after)
            .iter()
            .all(|i| i["restarts"] == 0),
        "restarts must stay 0: {after}"
    );
    assert_eq!(pids_of(&cluster), pids, "containers were restarted");
    assert_all_serve(&cluster, &placed, "agent back");
    // A late reconcile must not change anything either.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pids_of(&cluster), pids, "containers restarted later");
    let later = api.container(&id).expect("get").expect("exists");
    assert_eq!(placements(&later), placed, "{later}");
}
