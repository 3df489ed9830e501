//! What a user watches a cluster with: `/metrics` of the hub and of an agent (read by an
//! independent Prometheus/OpenMetrics text parser, with the series the issue names), a replica's
//! stats, its logs followed live through the hub, and the event stream of a deploy, scale and delete
//! in order.

use berth_tests::api::placements;
use berth_tests::prom::{Scrape, ACCEPT_OPENMETRICS};
use berth_tests::{wait_for, Cluster};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// The agent's default metrics port (on its advertised address).
const AGENT_METRICS_PORT: u16 = 9751;

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// The hub's `/metrics`, in the format `accept` asks for (None: plain 0.0.4).
fn hub_scrape(cluster: &Cluster, accept: Option<&str>) -> anyhow::Result<Scrape> {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()?;
    let mut req = http.get(format!("{}/metrics", cluster.api().base()));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send()?;
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = resp.text()?;
    anyhow::ensure!(status == 200, "hub /metrics: HTTP {status}: {text}");
    Scrape::parse(&ctype, &text).map_err(|e| e.context(format!("hub /metrics ({ctype})")))
}

/// The agent's `/metrics` on node `node`, fetched from inside its host.
fn agent_scrape(cluster: &Cluster, node: &str, accept: Option<&str>) -> anyhow::Result<Scrape> {
    let url = format!(
        "http://{}:{AGENT_METRICS_PORT}/metrics",
        cluster.host_ip(node)?
    );
    let header = accept.map(|a| format!("Accept: {a}"));
    let extra: Vec<&str> = match &header {
        Some(h) => vec!["-H", h.as_str()],
        None => vec![],
    };
    let (status, ctype, text) = cluster.curl_on_host(node, &url, &extra)?;
    anyhow::ensure!(status == 200, "agent {url}: HTTP {status}: {text}");
    Scrape::parse(&ctype, &text).map_err(|e| e.context(format!("agent {url} ({ctype})")))
}

#[test]
fn metrics_of_hub_and_agent_parse_and_stats_answer() {
    let cluster = Cluster::builder()
        .nodes(1)
        .start()
        .expect("starting the cluster");
    let api = cluster.api().clone();
    api.create_network("obs", "10.80.0.0/24").expect("network");
    let id = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.2", "memory": "32MB", "network_id": "obs",
            "name": "web", "replicas": 1,
            "health": {"tcp": {"port": 80}, "interval": "1s"},
        }))
        .expect("deploy");
    let c = ok(api.wait_running(&id, 1, RUN_TIMEOUT));
    let (iid, node, ip) = placements(&c)[0].clone();
    // Some traffic, so the network counters have something to count.
    for _ in 0..5 {
        ok(cluster.http_get(&node, &ip));
    }

    // Hub: both formats parse; request, scheduling and etcd latencies have observations.
    for accept in [None, Some(ACCEPT_OPENMETRICS)] {
        // The leader refreshes its cluster gauges after its passes (at most once a second, and at
        // least every resync): the nodes may not be in them yet right after the deploy.
        let s = ok(wait_for(
            "hub metrics with every series",
            RUN_TIMEOUT,
            || {
                let s = hub_scrape(&cluster, accept)?;
                Ok(s.require(&[
                    "berth_hub_http_requests_total",
                    "berth_hub_http_request_duration_seconds",
                    "berth_hub_scheduling_latency_seconds",
                    "berth_hub_etcd_request_duration_seconds",
                    "berth_hub_node_cpu_capacity_cores",
                ])
                .map(|()| s)
                .map_err(|e| format!("{e:#}")))
            },
        ));
        assert_eq!(
            s.openmetrics,
            accept.is_some(),
            "format negotiated by Accept"
        );
        for h in [
            "berth_hub_http_request_duration_seconds",
            "berth_hub_scheduling_latency_seconds",
            "berth_hub_etcd_request_duration_seconds",
        ] {
            let n: f64 = s
                .family(h)
                .unwrap_or_default()
                .iter()
                .map(|x| x.value)
                .sum();
            assert!(n > 0.0, "{h} has no observations");
        }
    }

    // Agent: both formats parse and carry the instance's and the node's series; its network
    // counters catch up with the traffic (the agent aggregates on its own schedule).
    let series = [
        "berth_instance_cpu_seconds_total",
        "berth_instance_memory_usage_bytes",
        "berth_instance_restarts_total",
        "berth_instance_network_receive_bytes_total",
        "berth_instance_network_transmit_bytes_total",
        "berth_instance_network_receive_packets_total",
        "berth_instance_probe_success",
        "berth_node_cpu_capacity_cores",
    ];
    let labels = [("instance_id", iid.as_str())];
    let scrape = ok(wait_for(
        "the agent's metrics of the replica",
        Duration::from_secs(30),
        || {
            let s = agent_scrape(&cluster, &node, None)?;
            s.require(&series)?;
            let rx = s.value("berth_instance_network_receive_bytes_total", &labels);
            let mem = s.value("berth_instance_memory_usage_bytes", &labels);
            Ok(
                if rx.is_some_and(|v| v > 0.0) && mem.is_some_and(|v| v > 0.0) {
                    Ok(s)
                } else {
                    Err(format!("rx {rx:?}, memory {mem:?}"))
                },
            )
        },
    ));
    assert_eq!(
        scrape.value("berth_instance_restarts_total", &labels),
        Some(0.0)
    );
    assert_eq!(
        scrape.value("berth_instance_probe_success", &labels),
        Some(1.0),
        "the TCP probe passes"
    );
    assert!(
        scrape
            .value(
                "berth_node_cpu_capacity_cores",
                &[("node_id", node.as_str())]
            )
            .is_some_and(|v| v > 0.0),
        "node capacity"
    );
    let om = ok(agent_scrape(&cluster, &node, Some(ACCEPT_OPENMETRICS)));
    ok(om.require(&series));

    // Stats: numbers for the running replica.
    let st = ok(wait_for(
        "stats of the replica",
        Duration::from_secs(30),
        || {
            let st = api.stats(&id)?;
            let i = st["instances"]
                .as_array()
                .and_then(|a| a.iter().find(|i| i["instance_id"] == iid.as_str()))
                .cloned()
                .unwrap_or_default();
            Ok(if i["memory_bytes"].as_u64().is_some_and(|m| m > 0) {
                Ok(st)
            } else {
                Err(st.to_string())
            })
        },
    ));
    assert_eq!(st["container_id"], id.as_str(), "{st}");
    let i = &st["instances"][0];
    assert_eq!(i["node_id"], node.as_str(), "{st}");
    assert_eq!(i["status"], "RUNNING", "{st}");
    assert!(i.get("error").is_none_or(Value::is_null), "{st}");
    for k in [
        "cpu_percent",
        "cpu_seconds",
        "memory_bytes",
        "memory_limit_bytes",
        "rx_bytes",
        "tx_bytes",
        "rx_packets",
        "tx_packets",
        "restarts",
    ] {
        assert!(i[k].is_number(), "stats field {k}: {st}");
    }
    let limit = i["memory_limit_bytes"].as_u64().unwrap_or_default();
    assert!(
        (30_000_000..=34_000_000).contains(&limit),
        "a 32MB limit: {st}"
    );
    assert!(i["rx_bytes"].as_u64().is_some_and(|v| v > 0), "{st}");
}

/// Ticks every 0.3 s on stdout and serves `/cgi-bin/say?WORD`, which prints `said WORD` on the
/// container's stdout (its PID 1's), so the test decides when a line is printed.
const TALKER: &str = r#"mkdir -p /tmp/w/cgi-bin \
&& printf '#!/bin/sh\necho Content-Type: text/plain\necho\necho "said $QUERY_STRING" > /proc/1/fd/1\necho ok\n' > /tmp/w/cgi-bin/say \
&& chmod +x /tmp/w/cgi-bin/say && httpd -p 80 -h /tmp/w \
&& i=0 && while true; do i=$((i+1)); echo "tick $i"; sleep 0.3; done"#;

/// The text of one line of a logs answer: NDJSON (`{"time", "stream", "line"}`, what the hub
/// proxies from the agent) or plain text.
fn log_text(line: &str) -> String {
    match serde_json::from_str::<Value>(line) {
        Ok(v) if v["line"].is_string() => v["line"].as_str().unwrap_or_default().to_owned(),
        _ => line.to_owned(),
    }
}

fn tick(line: &str) -> Option<u64> {
    log_text(line).trim().strip_prefix("tick ")?.parse().ok()
}

#[test]
fn logs_follow_streams_new_lines_and_events_arrive_in_order() {
    let cluster = Cluster::start().expect("starting the cluster");
    let api = cluster.api().clone();
    api.create_network("talk", "10.81.0.0/24").expect("network");
    let mut events = api
        .stream("/v1/events?watch=true")
        .and_then(|s| s.expect_status(200))
        .expect("watching events");

    let id = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.1", "memory": "32MB", "network_id": "talk",
            "name": "talker", "replicas": 2, "command": ["sh", "-c", TALKER],
        }))
        .expect("deploy");
    let c = ok(api.wait_running(&id, 2, RUN_TIMEOUT));
    let (iid, node, ip) = placements(&c)[0].clone();

    // Logs: what was printed so far, then a follow that sees what is printed after it started.
    let past = ok(wait_for(
        "some ticks in the logs",
        Duration::from_secs(30),
        || {
            let r = api.get(&format!("/v1/containers/{id}/logs?instance_id={iid}"))?;
            let last = r.text.lines().filter_map(tick).max();
            Ok(if r.status == 200 && last.is_some_and(|t| t >= 3) {
                Ok(last.unwrap_or_default())
            } else {
                Err(format!("HTTP {}: {}", r.status, r.text))
            })
        },
    ));
    let mut follow = api
        .stream(&format!(
            "/v1/containers/{id}/logs?instance_id={iid}&follow=true&tail=1"
        ))
        .and_then(|s| s.expect_status(200))
        .expect("following the logs");
    let word = format!("w{:08x}", rand::random::<u32>());
    let url = format!("http://{ip}/cgi-bin/say?{word}");
    let (code, _, body) = ok(cluster.curl_on_host(&node, &url, &[]));
    assert_eq!((code, body.trim()), (200, "ok"), "{url}");
    let lines = ok(follow.read_until(
        "the said line and 5 more ticks",
        Duration::from_secs(30),
        |lines| {
            lines
                .iter()
                .any(|l| log_text(l).trim() == format!("said {word}"))
                && lines.iter().filter_map(|l| tick(l)).any(|t| t >= past + 5)
        },
    ));
    let ticks: Vec<u64> = lines.iter().filter_map(|l| tick(l)).collect();
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks out of order or missing: {ticks:?}"
    );
    assert!(
        ticks.first().is_some_and(|t| *t >= past),
        "follow with tail=1 replayed old lines: {ticks:?} (had {past})"
    );
    drop(follow);

    // Events: scale and delete, then read the whole story in order.
    api.scale(&id, 3).expect("scale");
    ok(api.wait_running(&id, 3, RUN_TIMEOUT));
    api.delete_container(&id).expect("delete");
    ok(api.wait_gone(&id, RUN_TIMEOUT));
    let mut mine: Vec<Value> = Vec::new();
    ok(events
        .read_until(
            "the container's deleted event",
            Duration::from_secs(30),
            |lines| {
                mine = lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .filter(|e| e["id"] == id.as_str() || e["container_id"] == id.as_str())
                    .collect();
                mine.iter()
                    .any(|e| e["kind"] == "container" && e["type"] == "deleted")
            },
        )
        .map(|_| ()));
    // Positions strictly increase.
    let pos: Vec<(u64, String)> = mine
        .iter()
        .map(|e| {
            let id = e["event_id"].as_str().unwrap_or_default();
            let (rev, nonce) = id.split_once('-').unwrap_or((id, ""));
            (rev.parse().unwrap_or_default(), nonce.to_owned())
        })
        .collect();
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]),
        "event ids out of order: {pos:?}"
    );
    let container_types: Vec<&str> = mine
        .iter()
        .filter(|e| e["kind"] == "container")
        .filter_map(|e| e["type"].as_str())
        .collect();
    let order = ["created", "scaled", "deleting", "deleted"];
    let mut it = container_types.iter();
    assert!(
        order.iter().all(|w| it.any(|t| t == w)),
        "container events {container_types:?} should include {order:?} in order"
    );
    // Each replica: placed, then RUNNING, then removed; the scaled-up one after "scaled".
    let at = |pred: &dyn Fn(&Value) -> bool| mine.iter().position(pred);
    let scaled = at(&|e| e["kind"] == "container" && e["type"] == "scaled").unwrap_or_default();
    let mut per_instance: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for e in mine.iter().filter(|e| e["kind"] == "instance") {
        let i = e["id"].as_str().unwrap_or_default().to_owned();
        per_instance.entry(i).or_default();
    }
    assert_eq!(
        per_instance.len(),
        3,
        "three replicas in the events: {mine:?}"
    );
    for (i, v) in per_instance.iter_mut() {
        let of = |t: &str, s: Option<&str>| {
            mine.iter().position(|e| {
                e["kind"] == "instance"
                    && e["id"] == i.as_str()
                    && e["type"] == t
                    && s.is_none_or(|s| e["status"] == s)
            })
        };
        let (Some(p), Some(r), Some(x)) = (
            of("placed", None),
            of("status", Some("RUNNING")),
            of("removed", None),
        ) else {
            panic!("{i}: placed/RUNNING/removed missing in {mine:?}");
        };
        assert!(p < r && r < x, "{i}: placed {p}, RUNNING {r}, removed {x}");
        *v = (p, r, x);
    }
    assert_eq!(
        per_instance
            .values()
            .filter(|(p, _, _)| *p > scaled)
            .count(),
        1,
        "exactly the scaled-up replica is placed after the scaled event: {per_instance:?}"
    );
}
