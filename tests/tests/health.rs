//! Health probes as a user sees them: a replica whose HTTP probe fails becomes UNHEALTHY, leaves its
//! service's routing and is restarted; passing exec and TCP probes keep replicas RUNNING (and a
//! failing exec probe is noticed); a replica with a probe is STARTING until the probe passes.
//!
//! The web servers here serve `/healthz` while `/tmp/w/healthz` exists, and have two CGI scripts the
//! test calls to remove (`/cgi-bin/sick`) or recreate (`/cgi-bin/well`) it, so one chosen replica
//! can be made to fail its probe.

use berth_tests::api::{instance, instances, placements};
use berth_tests::{wait_for, Cluster};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the data plane may take to follow a status change (the bench measures it).
const SETTLE: Duration = Duration::from_secs(20);

/// Page = hostname; `/healthz` while the file exists; `/cgi-bin/sick` and `/cgi-bin/well`.
const SWITCHABLE_WEB: &str = r#"mkdir -p /tmp/w/cgi-bin && hostname > /tmp/w/index.html && echo ok > /tmp/w/healthz \
&& printf '#!/bin/sh\necho Content-Type: text/plain\necho\nrm -f /tmp/w/healthz\necho sick\n' > /tmp/w/cgi-bin/sick \
&& printf '#!/bin/sh\necho Content-Type: text/plain\necho\necho ok > /tmp/w/healthz\necho well\n' > /tmp/w/cgi-bin/well \
&& chmod +x /tmp/w/cgi-bin/sick /tmp/w/cgi-bin/well && exec httpd -f -p 80 -h /tmp/w"#;

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

fn http_probe() -> Value {
    json!({
        "http": {"path": "/healthz", "port": 80},
        "interval": "1s", "timeout": "1s", "failure_threshold": 2,
    })
}

fn status_of(c: &Value, iid: &str) -> String {
    instance(c, iid)
        .and_then(|i| i["status"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn restarts_of(c: &Value, iid: &str) -> u64 {
    instance(c, iid)
        .and_then(|i| i["restarts"].as_u64())
        .unwrap_or_default()
}

/// Calls `/cgi-bin/{script}` on a replica; returns its answer.
fn call(cluster: &Cluster, node: &str, ip: &str, script: &str) -> String {
    let url = format!("http://{ip}/cgi-bin/{script}");
    let (code, _, body) = ok(cluster.curl_on_host(node, &url, &[]));
    assert_eq!(code, 200, "{url}: {body}");
    body.trim().to_owned()
}

/// `GET http://IP/healthz` from `node`: its status code.
fn healthz(cluster: &Cluster, node: &str, ip: &str) -> u16 {
    let url = format!("http://{ip}/healthz");
    ok(cluster.curl_on_host(node, &url, &[])).0
}

#[test]
fn a_failing_http_probe_makes_the_replica_unhealthy_and_it_is_restarted() {
    let cluster = Cluster::start().expect("starting the cluster");
    let api = cluster.api().clone();
    api.create_network("probes", "10.75.0.0/24")
        .expect("network");
    let id = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.1", "memory": "32MB", "network_id": "probes",
            "name": "web", "replicas": 2, "command": ["sh", "-c", SWITCHABLE_WEB],
            "health": http_probe(), "stop_timeout": "2s",
        }))
        .expect("deploy");
    let c = ok(api.wait_running(&id, 2, RUN_TIMEOUT));
    assert_eq!(c["health"]["http"]["path"], "/healthz", "{c}");
    let placed = placements(&c);
    let (a, node_a, ip_a) = placed[0].clone();
    let (b, _, _) = placed[1].clone();
    let pid_a = cluster.init_pid(&node_a, &a);
    assert!(pid_a.is_some(), "no process found for {a}");
    assert_eq!(healthz(&cluster, &node_a, &ip_a), 200);

    assert_eq!(call(&cluster, &node_a, &ip_a, "sick"), "sick");
    let mut seen_a: Vec<String> = Vec::new();
    let mut seen_b: BTreeSet<String> = BTreeSet::new();
    let mut reason = String::new();
    ok(wait_for(
        "the sick replica to be restarted and RUNNING again",
        Duration::from_secs(120),
        || {
            let c = api.container(&id)?.unwrap_or_default();
            let s = status_of(&c, &a);
            if seen_a.last() != Some(&s) {
                seen_a.push(s.clone());
            }
            if s == "UNHEALTHY" && reason.is_empty() {
                reason = instance(&c, &a)
                    .and_then(|i| i["reason"].as_str().map(str::to_owned))
                    .unwrap_or_default();
            }
            seen_b.insert(status_of(&c, &b));
            let pid = cluster.init_pid(&node_a, &a);
            Ok(
                if s == "RUNNING" && restarts_of(&c, &a) >= 1 && pid.is_some() && pid != pid_a {
                    Ok(())
                } else {
                    Err(format!("A went {seen_a:?}, pid {pid:?}: {c}"))
                },
            )
        },
    ));
    assert!(
        seen_a.iter().any(|s| s == "UNHEALTHY"),
        "the sick replica was never shown UNHEALTHY: {seen_a:?}"
    );
    assert!(!reason.is_empty(), "UNHEALTHY without a reason");
    assert_eq!(
        seen_b,
        BTreeSet::from(["RUNNING".to_owned()]),
        "the healthy replica must stay RUNNING"
    );
    // The restarted process made its health file again.
    assert_eq!(healthz(&cluster, &node_a, &ip_a), 200);
    let c = api.container(&id).expect("get").expect("exists");
    assert_eq!(restarts_of(&c, &b), 0, "{c}");
    assert_eq!(placements(&c), placed, "restarted in place: {c}");
}

/// Asks the probe container at `probe_ip` (on `node`) to fetch `http://TARGET/`; its answer.
fn fetch(cluster: &Cluster, node: &str, probe_ip: &str, target: &str) -> String {
    let url = format!("http://{probe_ip}/cgi-bin/fetch?{target}");
    let out = cluster
        .on_host(node, "curl", &["-sS", "--max-time", "8", &url])
        .expect("running curl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Waits until `n` fetches of the VIP in a row are answered only by pages in `want`, and (when
/// `all`) by every one of them.
fn wait_vip(
    cluster: &Cluster,
    node: &str,
    probe: &str,
    vip: &str,
    want: &BTreeSet<String>,
    all: bool,
) {
    ok(wait_for(
        &format!("the VIP {vip} to be answered by {want:?}"),
        SETTLE,
        || {
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            for _ in 0..20 {
                *seen.entry(fetch(cluster, node, probe, vip)).or_default() += 1;
            }
            let only = seen.keys().all(|k| want.contains(k));
            let every = !all || want.iter().all(|w| seen.contains_key(w));
            Ok(if only && every {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            })
        },
    ));
}

#[test]
fn an_unhealthy_replica_leaves_the_service_routing_until_it_passes_again() {
    let cluster = Cluster::start().expect("starting the cluster");
    let api = cluster.api().clone();
    api.create_network("route", "10.76.0.0/24")
        .expect("network");
    // Not restarted (policy never): it stays alive and UNHEALTHY, so routing is what changes.
    let id = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.1", "memory": "32MB", "network_id": "route",
            "name": "web", "replicas": 2, "command": ["sh", "-c", SWITCHABLE_WEB],
            "health": http_probe(), "restart_policy": "never",
        }))
        .expect("deploy web");
    let client = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.1", "memory": "32MB", "network_id": "route",
            "name": "client", "replicas": 1,
        }))
        .expect("deploy client");
    let c = ok(api.wait_running(&id, 2, RUN_TIMEOUT));
    let cl = ok(api.wait_running(&client, 1, RUN_TIMEOUT));
    let (_, probe_node, probe_ip) = placements(&cl)[0].clone();
    let vip = c["service_ip"].as_str().expect("service_ip").to_owned();
    let placed = placements(&c);
    let pages: Vec<String> = placed
        .iter()
        .map(|(_, node, ip)| {
            ok(wait_for(
                "a replica's page",
                Duration::from_secs(20),
                || Ok(cluster.http_get(node, ip).map_err(|e| format!("{e:#}"))),
            ))
            .trim()
            .to_owned()
        })
        .collect();
    let both: BTreeSet<String> = pages.iter().cloned().collect();
    assert_eq!(
        both.len(),
        2,
        "replicas should serve distinct pages: {pages:?}"
    );
    wait_vip(&cluster, &probe_node, &probe_ip, &vip, &both, true);

    let (a, node_a, ip_a) = placed[0].clone();
    assert_eq!(call(&cluster, &node_a, &ip_a, "sick"), "sick");
    ok(
        api.wait_container(&id, "replica A UNHEALTHY", Duration::from_secs(60), |c| {
            status_of(c, &a) == "UNHEALTHY"
        }),
    );
    let only_b = BTreeSet::from([pages[1].clone()]);
    wait_vip(&cluster, &probe_node, &probe_ip, &vip, &only_b, true);
    // Still alive (only unrouted): its own address answers.
    assert_eq!(
        ok(cluster.http_get(&node_a, &ip_a)).trim(),
        pages[0],
        "the unhealthy replica's process should still run"
    );

    assert_eq!(call(&cluster, &node_a, &ip_a, "well"), "well");
    let c = ok(api.wait_running(&id, 2, Duration::from_secs(60)));
    assert_eq!(restarts_of(&c, &a), 0, "policy never: not restarted: {c}");
    wait_vip(&cluster, &probe_node, &probe_ip, &vip, &both, true);
}

#[test]
fn exec_and_tcp_probes_that_pass_keep_replicas_running() {
    let cluster = Cluster::builder()
        .nodes(1)
        .start()
        .expect("starting the cluster");
    let api = cluster.api().clone();
    api.create_network("checks", "10.77.0.0/24")
        .expect("network");
    let deploy = |name: &str, health: Value, extra: Value| {
        let mut body = json!({
            "image": cluster.demo_image(), "cpu": "0.1", "memory": "16MB", "network_id": "checks",
            "name": name, "replicas": 1, "health": health,
        });
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        api.create_container(&body).expect("deploy")
    };
    let exec_ok = deploy(
        "exec-ok",
        json!({"exec": {"command": ["cat", "/www/index.html"]}, "interval": "1s"}),
        json!({}),
    );
    let tcp_ok = deploy(
        "tcp-ok",
        json!({"tcp": {"port": 80}, "interval": "1s"}),
        json!({}),
    );
    // Proves the exec probe really runs: this one cannot pass.
    let exec_bad = deploy(
        "exec-bad",
        json!({"exec": {"command": ["cat", "/no/such/file"]}, "interval": "1s", "failure_threshold": 2}),
        json!({"restart_policy": "never"}),
    );
    for id in [&exec_ok, &tcp_ok] {
        ok(api.wait_running(id, 1, RUN_TIMEOUT));
    }
    let bad = ok(api.wait_container(
        &exec_bad,
        "the failing exec probe to make it UNHEALTHY",
        RUN_TIMEOUT,
        |c| {
            instances(c)
                .first()
                .is_some_and(|i| i["status"] == "UNHEALTHY")
        },
    ));
    let reason = instances(&bad)[0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!reason.is_empty(), "UNHEALTHY without a reason: {bad}");

    // Several probe intervals later, the passing ones never left RUNNING.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        for id in [&exec_ok, &tcp_ok] {
            let c = api.container(id).expect("get").expect("exists");
            let i = &instances(&c)[0];
            assert_eq!(i["status"], "RUNNING", "{c}");
            assert_eq!(i["restarts"], 0, "{c}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_replica_is_starting_until_its_probe_passes() {
    let cluster = Cluster::builder()
        .nodes(1)
        .start()
        .expect("starting the cluster");
    let api = cluster.api().clone();
    api.create_network("warmup", "10.78.0.0/24")
        .expect("network");
    // Serves its page at once, its health file after 2 s; the first probe comes after 6 s.
    let script = "mkdir -p /tmp/w; hostname > /tmp/w/index.html; \
                  (sleep 2; echo ok > /tmp/w/healthz) & exec httpd -f -p 80 -h /tmp/w";
    let id = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.1", "memory": "16MB", "network_id": "warmup",
            "name": "slow", "replicas": 1, "command": ["sh", "-c", script],
            "health": {"http": {"path": "/healthz", "port": 80}, "interval": "1s",
                       "start_period": "6s"},
        }))
        .expect("deploy");
    let mut seen: Vec<String> = Vec::new();
    // The process answers while the replica waits for its first probe.
    let status_while_serving = ok(wait_for(
        "the replica's process to answer",
        RUN_TIMEOUT,
        || {
            let c = api.container(&id)?.unwrap_or_default();
            let Some(i) = instances(&c).first().cloned() else {
                return Ok(Err(c.to_string()));
            };
            let s = i["status"].as_str().unwrap_or_default().to_owned();
            if seen.last() != Some(&s) {
                seen.push(s.clone());
            }
            let (Some(node), Some(ip)) = (i["node_id"].as_str(), i["ip"].as_str()) else {
                return Ok(Err(c.to_string()));
            };
            if ip.is_empty() || cluster.http_get(node, ip).is_err() {
                return Ok(Err(c.to_string()));
            }
            // Read again after the answer: the status a user sees while the process serves.
            let c = api.container(&id)?.unwrap_or_default();
            Ok(Ok(instances(&c)[0]["status"]
                .as_str()
                .unwrap_or_default()
                .to_owned()))
        },
    ));
    assert_eq!(
        status_while_serving, "STARTING",
        "a replica whose probe has not passed yet must be STARTING (went {seen:?})"
    );
    assert!(
        !seen.iter().any(|s| s == "RUNNING"),
        "RUNNING before the first probe: {seen:?}"
    );
    let c = ok(api.wait_running(&id, 1, Duration::from_secs(60)));
    assert_eq!(instances(&c)[0]["restarts"], 0, "{c}");
}
