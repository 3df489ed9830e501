//! Live migration as a user sees it, on netns hosts: a container whose shell keeps a counter in
//! memory moves to another node with its memory, files, address and an open TCP connection.

use berth_tests::api::{instances, placements};
use berth_tests::{wait_for, Cluster};
use serde_json::{json, Value};
use std::time::Duration;

/// A counter kept in a shell variable (memory, not a file it reads back), written out every 50 ms
/// and served by httpd; and everything that arrives on TCP port 7000 appended to `/www/received`
/// (busybox nc ends the connection when its stdin ends: the sleep keeps it open).
const COUNTER: &str = "mkdir -p /www; i=0; \
     (while true; do i=$((i+1)); echo $i > /www/count; sleep 0.05; done) & \
     (sleep 1000000 | nc -l -p 7000 > /www/received) & \
     exec httpd -f -p 80 -h /www";

/// A client that holds one TCP connection to `ip:7000` open and sends a number down it every
/// 100 ms. If the connection breaks, nc exits and the container with it (and is restarted).
fn client(ip: &str) -> String {
    format!("i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done | nc {ip} 7000")
}

/// The last number of a text of lines of numbers.
fn last_number(text: &str) -> Option<u64> {
    text.lines().rev().find_map(|l| l.trim().parse().ok())
}

fn get_number(cluster: &Cluster, node: &str, ip: &str, path: &str) -> anyhow::Result<u64> {
    let url = format!("http://{ip}/{path}");
    let out = cluster.on_host(node, "curl", &["-sS", "--max-time", "3", &url])?;
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    last_number(&body).ok_or_else(|| anyhow::anyhow!("{url} from {node}: {body:?}"))
}

/// The counter served at `ip` from `node`. The shells rewrite the file (truncate, then write): a
/// read between the two finds it empty, so a few tries.
fn count_on(cluster: &Cluster, node: &str, ip: &str) -> anyhow::Result<u64> {
    let mut last = None;
    for _ in 0..10 {
        match get_number(cluster, node, ip, "count") {
            Ok(n) => return Ok(n),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no count")))
}

fn the_instance(c: &Value) -> Value {
    let all = instances(c);
    assert_eq!(all.len(), 1, "one replica: {c}");
    all[0].clone()
}

/// A counter container with a client container holding a TCP connection to it, and the node it
/// is to move to (a third one when the client does not share the counter's node).
struct Moving {
    id: String,
    iid: String,
    source: String,
    ip: String,
    client_id: String,
    target: String,
}

/// Deploys the counter and its client on `network` and waits until data crosses the connection.
fn counter_with_a_client(cluster: &Cluster, network: &str, cidr: &str) -> Moving {
    let api = cluster.api();
    let net = api.create_network(network, cidr).expect("network create");
    let id = api
        .create_container(&json!({
            "name": "counter", "image": cluster.demo_image(), "cpu": "0.2", "memory": "64MB",
            "network_id": net["network_id"], "command": ["sh", "-c", COUNTER],
        }))
        .expect("deploy the counter");
    let c = api
        .wait_running(&id, 1, Duration::from_secs(90))
        .expect("the counter runs");
    let (iid, source, ip) = placements(&c)[0].clone();
    let client_id = api
        .create_container(&json!({
            "name": "client", "image": cluster.demo_image(), "cpu": "0.1", "memory": "32MB",
            "network_id": net["network_id"], "command": ["sh", "-c", client(&ip)],
        }))
        .expect("deploy the client");
    let cc = api
        .wait_running(&client_id, 1, Duration::from_secs(90))
        .expect("the client runs");
    let client_node = placements(&cc)[0].1.clone();
    let target = cluster
        .node_ids()
        .iter()
        .find(|n| **n != source && **n != client_node)
        .or_else(|| cluster.node_ids().iter().find(|n| **n != source))
        .cloned()
        .expect("another node");
    let moving = Moving {
        id,
        iid,
        source,
        ip,
        client_id,
        target,
    };
    let source = moving.source.clone();
    wait_for(
        "data over the client's connection",
        Duration::from_secs(20),
        || {
            Ok(match moving.received(cluster, &source) {
                Ok(n) if n > 5 => Ok(n),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .expect("the client's connection carries data");
    moving
}

impl Moving {
    fn count(&self, cluster: &Cluster, node: &str) -> anyhow::Result<u64> {
        count_on(cluster, node, &self.ip)
    }

    fn received(&self, cluster: &Cluster, node: &str) -> anyhow::Result<u64> {
        get_number(cluster, node, &self.ip, "received")
    }

    /// After a move to `node`: the same replica with the same address runs there, never restarted;
    /// its counter went on from at least `before` and goes on; the client's connection carries data
    /// and the client never reconnected. Returns the counter seen there.
    fn check_moved(&self, cluster: &Cluster, node: &str, before: u64) -> u64 {
        let api = cluster.api();
        let c = api
            .wait_running(&self.id, 1, Duration::from_secs(30))
            .expect("still running");
        let inst = the_instance(&c);
        assert_eq!(inst["instance_id"], self.iid.as_str());
        assert_eq!(inst["node_id"], node, "{c}");
        assert_eq!(inst["ip"], self.ip.as_str());
        assert_eq!(inst["restarts"], 0, "{c}");
        let after = wait_for(
            "the counter where it moved",
            Duration::from_secs(10),
            || Ok(self.count(cluster, node).map_err(|e| format!("{e:#}"))),
        )
        .expect("the counter is served where it moved");
        assert!(
            after >= before,
            "counter reset: {before} before, {after} after"
        );
        wait_for("the counter to go on", Duration::from_secs(10), || {
            let n = self.count(cluster, node)?;
            Ok(if n > after {
                Ok(())
            } else {
                Err(n.to_string())
            })
        })
        .expect("the counter goes on");
        let got = self.received(cluster, node).expect("received");
        wait_for(
            "more data over the same connection",
            Duration::from_secs(15),
            || {
                let n = self.received(cluster, node)?;
                Ok(if n > got + 5 {
                    Ok(())
                } else {
                    Err(n.to_string())
                })
            },
        )
        .expect("the connection carries data after the move");
        let cc = api
            .container(&self.client_id)
            .expect("client")
            .expect("exists");
        assert_eq!(the_instance(&cc)["restarts"], 0, "client reconnected: {cc}");
        after
    }

    /// Waits until nothing of the replica runs on `node` any more.
    fn wait_gone_from(&self, cluster: &Cluster, node: &str) {
        wait_for("the old copy to go", Duration::from_secs(30), || {
            let pid = cluster.init_pid(node, &self.iid);
            Ok(if pid.is_none() {
                Ok(())
            } else {
                Err(format!("{pid:?}"))
            })
        })
        .expect("the old, frozen copy is removed");
    }
}

#[test]
fn a_running_container_moves_with_its_memory_files_address_and_connections() {
    let cluster = Cluster::builder()
        .nodes(3)
        .start()
        .expect("starting the cluster");
    let api = cluster.api().clone();
    let m = counter_with_a_client(&cluster, "moving", "10.30.0.0/16");
    let count_before = m.count(&cluster, &m.source).expect("count");

    let mid = migrate(
        &api,
        &m.id,
        json!({ "target_node": m.target, "mode": "precopy" }),
    );
    // A second request for the same replica while it moves is a conflict.
    let again = api
        .post(
            &format!("/v1/containers/{}/migrate", m.id),
            &json!({ "target_node": m.target }),
        )
        .expect("second migrate request");
    assert_eq!(again.status, 409, "second request: {}", again.text);

    let job = wait_completed(&api, &mid);
    eprintln!("migration: {job}");
    assert_eq!(job["status"], "COMPLETED");
    assert_eq!(job["source_node"], m.source.as_str());
    assert_eq!(job["target_node"], m.target.as_str());
    assert_eq!(job["instance_id"], m.iid.as_str());
    assert_eq!(job["phase"], "DONE");
    assert!(job["rounds"].as_u64().unwrap_or(0) >= 1, "{job}");
    assert!(job["bytes_sent"].as_u64().unwrap_or(0) > 0, "{job}");
    // An explicit mode is what the source runs; nothing was measured to choose it.
    assert_eq!(job["chosen_mode"], "precopy", "{job}");
    assert!(job.get("write_rate_mib_s").is_none(), "{job}");
    let count_after = m.check_moved(&cluster, &m.target, count_before);
    m.wait_gone_from(&cluster, &m.source);

    // And back, as stop-and-copy (one dump of the frozen container, nothing ahead of it): the
    // same guarantees, in one round.
    let back = migrate(
        &api,
        &m.id,
        json!({ "target_node": m.source, "mode": "stopcopy" }),
    );
    let job = wait_completed(&api, &back);
    eprintln!("stop-and-copy back: {job}");
    assert_eq!(
        (job["mode"].as_str(), job["rounds"].as_u64()),
        (Some("stopcopy"), Some(1))
    );
    m.check_moved(&cluster, &m.source, count_after);

    // Both jobs are listed for the container.
    let list = api
        .get(&format!("/v1/migrations?container={}", m.id))
        .expect("list")
        .body;
    let ids: Vec<&str> = list["migrations"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|m| m["migration_id"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        ids.contains(&mid.as_str()) && ids.contains(&back.as_str()),
        "{list}"
    );
}

/// `POST /v1/containers/{id}/migrate` with `body`; the job id.
fn migrate(api: &berth_tests::api::Api, id: &str, body: Value) -> String {
    let r = api
        .post(&format!("/v1/containers/{id}/migrate"), &body)
        .expect("migrate request")
        .expect_status(202, "migrate")
        .expect("202");
    r.body["migration_id"]
        .as_str()
        .expect("migration_id")
        .to_owned()
}

/// Waits for job `mid` to complete with its downtime known; its JSON.
fn wait_completed(api: &berth_tests::api::Api, mid: &str) -> Value {
    wait_for("the migration to complete", Duration::from_secs(90), || {
        let j = api.get(&format!("/v1/migrations/{mid}"))?.body;
        Ok(match j["status"].as_str() {
            Some("COMPLETED") if j["downtime_ms"].as_u64().unwrap_or(0) > 0 => Ok(j),
            Some("FAILED") => anyhow::bail!("migration failed: {j}"),
            _ => Err(j.to_string()),
        })
    })
    .expect("the job completes with its downtime")
}

/// Keeps ~48 MB of shell memory changing all the time, so pre-copy has rounds to run, and counts
/// its passes (served at /count).
const CHURN: &str = "mkdir -p /www; x=$(head -c 48000000 /dev/zero | tr '\\0' a); i=0; \
     (while true; do x=\"${x%?}b\"; i=$((i+1)); echo $i > /www/count; done) & \
     exec httpd -f -p 80 -h /www";

#[test]
fn killing_the_target_agent_midway_leaves_the_source_serving_and_the_job_failed() {
    let mut cluster = Cluster::builder()
        .nodes(2)
        .start()
        .expect("starting the cluster");
    let api = cluster.api().clone();
    let net = api
        .create_network("churn", "10.32.0.0/16")
        .expect("network create");
    let id = api
        .create_container(&json!({
            "name": "churn", "image": cluster.demo_image(), "cpu": "0.5", "memory": "256MB",
            "network_id": net["network_id"], "command": ["sh", "-c", CHURN],
        }))
        .expect("deploy");
    let c = api
        .wait_running(&id, 1, Duration::from_secs(90))
        .expect("running");
    let (iid, source, ip) = placements(&c)[0].clone();
    wait_for("the churn to count", Duration::from_secs(30), || {
        Ok(count_on(&cluster, &source, &ip).map_err(|e| format!("{e:#}")))
    })
    .expect("the container counts");
    let nodes = cluster.node_ids().to_vec();
    let target_index = nodes
        .iter()
        .position(|n| *n != source)
        .expect("another node");
    let target = nodes[target_index].clone();

    let mid = migrate(
        &api,
        &id,
        json!({ "target_node": target, "mode": "precopy" }),
    );
    // Under way: memory is being copied while the container runs on.
    wait_for("pre-copy to begin", Duration::from_secs(30), || {
        let j = api.get(&format!("/v1/migrations/{mid}"))?.body;
        Ok(match (j["status"].as_str(), j["phase"].as_str()) {
            (Some("IN_PROGRESS"), Some("PRECOPY" | "FREEZE" | "TRANSFER")) => Ok(()),
            (Some("IN_PROGRESS"), _) => Err(j.to_string()),
            _ => anyhow::bail!("the job ended before the target could be killed: {j}"),
        })
    })
    .expect("the migration is under way");
    cluster.kill_agent(target_index);

    let job = wait_for("the job to fail", Duration::from_secs(90), || {
        let j = api.get(&format!("/v1/migrations/{mid}"))?.body;
        Ok(match j["status"].as_str() {
            Some("FAILED") => Ok(j),
            Some("COMPLETED") => anyhow::bail!("completed without its target: {j}"),
            _ => Err(j.to_string()),
        })
    })
    .expect("the job fails");
    eprintln!("failed job: {job}");
    assert!(
        !job["error"].as_str().unwrap_or_default().is_empty(),
        "{job}"
    );

    // The replica is where it was, running, never restarted, and serving; its counter goes on.
    let c = api
        .wait_running(&id, 1, Duration::from_secs(30))
        .expect("still running");
    let inst = the_instance(&c);
    assert_eq!(
        (inst["instance_id"].as_str(), inst["node_id"].as_str()),
        (Some(iid.as_str()), Some(source.as_str())),
        "{c}"
    );
    assert_eq!(inst["restarts"], 0, "{c}");
    let before = count_on(&cluster, &source, &ip).expect("count");
    wait_for(
        "the source to go on counting",
        Duration::from_secs(15),
        || {
            let n = count_on(&cluster, &source, &ip)?;
            Ok(if n > before {
                Ok(())
            } else {
                Err(n.to_string())
            })
        },
    )
    .expect("the source runs on (resumed if it was frozen)");

    // The target's agent comes back and keeps nothing of the failed attempt.
    cluster
        .start_agent(target_index)
        .expect("restart the target agent");
    cluster
        .wait_nodes_healthy(Duration::from_secs(30))
        .expect("the target is back");
    wait_for(
        "the target to hold no copy",
        Duration::from_secs(30),
        || {
            let pid = cluster.init_pid(&target, &iid);
            Ok(if pid.is_none() {
                Ok(())
            } else {
                Err(format!("{pid:?}"))
            })
        },
    )
    .expect("nothing left on the target");
    let c = api.container(&id).expect("get").expect("exists");
    assert_eq!(the_instance(&c)["node_id"], source.as_str());
}

#[test]
fn migrations_to_unknown_or_unfit_nodes_are_refused() {
    // Each node has room for one of these containers only.
    let cluster = Cluster::builder()
        .nodes(2)
        .node_capacity("1", "256MB")
        .start()
        .expect("starting the cluster");
    let api = cluster.api().clone();
    let net = api
        .create_network("stay", "10.31.0.0/16")
        .expect("network create");
    let deploy = |name: &str| {
        let id = api
            .create_container(&json!({
                "name": name, "image": cluster.demo_image(), "cpu": "0.2", "memory": "160MB",
                "network_id": net["network_id"],
            }))
            .expect("deploy");
        let c = api
            .wait_running(&id, 1, Duration::from_secs(90))
            .expect("running");
        (id, placements(&c)[0].1.clone())
    };
    let (id, source) = deploy("big-a");
    let (_, other) = deploy("big-b");
    assert_ne!(source, other, "the second one had to go to the other node");
    let path = format!("/v1/containers/{id}/migrate");
    let refused = |body: Value, status: u16| {
        let r = api.post(&path, &body).expect("request");
        assert_eq!(r.status, status, "{body}: {}", r.text);
    };
    refused(json!({"target_node": "no-such-node"}), 404);
    refused(json!({"target_node": source}), 400);
    refused(json!({"target_node": other}), 400);
    refused(json!({"target_node": 7}), 400);
    refused(json!({"mode": "teleport"}), 400);
    // Without a target the scheduler finds no node with room either.
    let r = api.post(&path, &json!({})).expect("request");
    assert!(r.status == 400 || r.status == 409, "{}", r.text);
    // Nothing moved, nothing is in flight.
    let after = api.container(&id).expect("get").expect("exists");
    assert_eq!(placements(&after)[0].1, source);
    let list = api
        .get(&format!("/v1/migrations?container={id}"))
        .expect("list")
        .body;
    assert_eq!(
        list["migrations"].as_array().map(Vec::len),
        Some(0),
        "{list}"
    );
}

#[test]
fn a_live_drain_moves_every_instance_away_without_a_restart() {
    let cluster = Cluster::builder()
        .nodes(2)
        .start()
        .expect("starting the cluster");
    let api = cluster.api().clone();
    let nodes = cluster.node_ids().to_vec();
    let (busy, spare) = (nodes[0].clone(), nodes[1].clone());
    // Everything lands on `busy` while `spare` is cordoned (a drain of an empty node).
    let cordon = api
        .post(&format!("/v1/nodes/{spare}/drain"), &json!({}))
        .expect("drain")
        .expect_status(202, "cordon the spare node")
        .expect("202");
    assert_eq!(cordon.body["unschedulable"], true, "{}", cordon.text);
    let net = api
        .create_network("drained", "10.33.0.0/16")
        .expect("network create");
    let id = api
        .create_container(&json!({
            "name": "five", "image": cluster.demo_image(), "cpu": "0.1", "memory": "32MB",
            "network_id": net["network_id"], "command": ["sh", "-c", COUNTER], "replicas": 5,
        }))
        .expect("deploy");
    let c = api
        .wait_running(&id, 5, Duration::from_secs(120))
        .expect("five running");
    let before = placements(&c);
    assert!(before.iter().all(|p| p.1 == busy), "{c}");
    let uncordoned = api
        .post(&format!("/v1/nodes/{spare}/uncordon"), &json!({}))
        .expect("uncordon")
        .expect_status(200, "uncordon")
        .expect("200");
    assert_eq!(
        uncordoned.body["unschedulable"], false,
        "{}",
        uncordoned.text
    );

    let drain = api
        .post(&format!("/v1/nodes/{busy}/drain"), &json!({"live": true}))
        .expect("drain")
        .expect_status(202, "live drain")
        .expect("202");
    let jobs: Vec<String> = drain.body["migrations"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|j| j["migration_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(jobs.len(), 5, "{}", drain.text);
    for mid in &jobs {
        let job = wait_completed(&api, mid);
        assert_eq!(job["target_node"], spare.as_str(), "{job}");
    }
    let c = api
        .wait_running(&id, 5, Duration::from_secs(30))
        .expect("five still running");
    let after = placements(&c);
    // The same instances with the same addresses, all on the spare node, none restarted.
    let key = |p: &Vec<(String, String, String)>| -> Vec<(String, String)> {
        p.iter().map(|(i, _, ip)| (i.clone(), ip.clone())).collect()
    };
    assert_eq!(key(&after), key(&before));
    assert!(after.iter().all(|p| p.1 == spare), "{c}");
    for inst in instances(&c) {
        assert_eq!(inst["restarts"], 0, "{inst}");
    }
    for (_, _, ip) in &after {
        wait_for(
            "the counter on the spare node",
            Duration::from_secs(10),
            || Ok(count_on(&cluster, &spare, ip).map_err(|e| format!("{e:#}"))),
        )
        .expect("each moved instance serves its counter");
    }
    let node = api.get(&format!("/v1/nodes/{busy}")).expect("node").body;
    assert_eq!(node["unschedulable"], true, "{node}");
    api.post(&format!("/v1/nodes/{busy}/uncordon"), &json!({}))
        .expect("uncordon")
        .expect_status(200, "uncordon the drained node")
        .expect("200");
}

#[test]
fn a_postcopy_migration_runs_the_container_on_the_target_before_its_memory_arrives() {
    let cluster = Cluster::builder()
        .nodes(3)
        .start()
        .expect("starting the cluster");
    let api = cluster.api().clone();
    let m = counter_with_a_client(&cluster, "lazy", "10.31.0.0/16");
    let count_before = m.count(&cluster, &m.source).expect("count");

    let mid = migrate(
        &api,
        &m.id,
        json!({ "target_node": m.target, "mode": "postcopy" }),
    );
    let job = wait_completed(&api, &mid);
    eprintln!("post-copy migration: {job}");
    assert_eq!(job["status"], "COMPLETED");
    assert_eq!(job["mode"], "postcopy");
    assert_eq!(job["target_node"], m.target.as_str());
    // It switched to the target first and completed once the source served the last page;
    // those pages count in the job.
    assert_eq!(
        (&job["switched"], &job["pages_done"]),
        (&json!(true), &json!(true)),
        "{job}"
    );
    let pages = job["pages_sent"].as_u64().unwrap_or(0);
    assert!(pages > 0, "{job}");
    assert!(
        job["bytes_sent"].as_u64().unwrap_or(0) > pages * 4096,
        "{job}"
    );
    assert_eq!(job["phase"], "DONE");
    m.check_moved(&cluster, &m.target, count_before);
    // Every page arrived (else the target would have killed its copy) and the source's frozen
    // copy, the page server's, is gone.
    m.wait_gone_from(&cluster, &m.source);
    std::thread::sleep(Duration::from_secs(2));
    let c = api.container(&m.id).expect("get").expect("exists");
    let inst = the_instance(&c);
    assert_eq!(inst["restarts"], 0, "{c}");
    assert_eq!(inst["node_id"], m.target.as_str(), "{c}");
    let cc = api
        .container(&m.client_id)
        .expect("client")
        .expect("exists");
    assert_eq!(the_instance(&cc)["restarts"], 0, "client reconnected: {cc}");

    // Back with `auto`: the source measures the counter's writes (a few bytes every 50 ms) and
    // takes post-copy, saying so and the rate it saw.
    let count_there = m.count(&cluster, &m.target).expect("count on the target");
    let back = migrate(&api, &m.id, json!({ "target_node": m.source }));
    let job = wait_completed(&api, &back);
    eprintln!("auto migration back: {job}");
    assert_eq!(job["mode"], "auto", "{job}");
    assert_eq!(job["chosen_mode"], "postcopy", "{job}");
    let rate = job["write_rate_mib_s"].as_f64();
    assert!(rate.is_some_and(|r| (0.0..32.0).contains(&r)), "{job}");
    m.check_moved(&cluster, &m.source, count_there);
}
