#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

use berth_proto::v1::{Assignment, DesiredState, HealthCheck, InstanceStatus, TcpProbe};
use openmetrics_parser::{openmetrics::parse_openmetrics, OpenMetricsType};

use super::*;
use crate::health::{ProbeResult, ProbeSnapshot};
use crate::metrics::{
    CgroupReader, Counters, NodeCapacity, NodeMetrics, ProbeStates, TrafficCounters,
    OPENMETRICS_CONTENT_TYPE,
};
use crate::status::{BoardEntry, InstanceBoard};

const IID: &str = "ins-0123456789ab";

#[test]
fn instance_ids_are_checked() {
    assert!(valid_instance_id("ins-0123456789ab"));
    for bad in [
        "ins-0123456789AB",
        "ins-0123456789a",
        "ins-0123456789abc",
        "ins-../../etc/pa",
        "..",
        "",
        "cnt-0123456789ab",
    ] {
        assert!(!valid_instance_id(bad), "{bad:?}");
    }
}

struct FakeTraffic(HashMap<String, Counters>);

impl TrafficCounters for FakeTraffic {
    fn instance_counters(&self, instance_id: &str) -> Option<Counters> {
        self.0.get(instance_id).copied()
    }
}

struct FakeProbes(Mutex<Vec<(String, ProbeSnapshot)>>);

impl ProbeStates for FakeProbes {
    fn probe_snapshots(&self) -> Vec<(String, ProbeSnapshot)> {
        self.0.lock().unwrap().clone()
    }
}

/// The agent's two servers on loopback port 0, as main wires them; stopped on drop.
struct Servers {
    api: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    stop: Option<watch::Sender<bool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Servers {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cg = dir.path().join("cgroup/berth-n1").join(IID);
        std::fs::create_dir_all(&cg).unwrap();
        std::fs::write(cg.join("cpu.stat"), "usage_usec 1500000\n").unwrap();
        std::fs::write(cg.join("memory.current"), "1048576\n").unwrap();
        std::fs::write(cg.join("memory.max"), "67108864\n").unwrap();

        let board = InstanceBoard::new();
        board.set(BoardEntry {
            instance_id: IID.into(),
            container_id: "ctr-1".into(),
            container_name: "web".into(),
            status: InstanceStatus::Running,
            restarts: 1,
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            image_digest: "sha256:ab".into(),
        });
        let traffic = FakeTraffic(HashMap::from([(
            IID.to_owned(),
            Counters {
                tx_packets: 3,
                tx_bytes: 300,
                rx_packets: 4,
                rx_bytes: 400,
                tx_dropped: 1,
                rx_dropped: 2,
            },
        )]));
        let probes = FakeProbes(Mutex::new(vec![(
            IID.to_owned(),
            ProbeSnapshot {
                healthy: Some(true),
                last_result: Some(ProbeResult {
                    ok: true,
                    reason: "connected".into(),
                    at: SystemTime::now(),
                    took: Duration::from_millis(1),
                }),
                consecutive_failures: 0,
                failures_total: 2,
                successes_total: 5,
            },
        )]));
        let (desired_tx, desired_rx) = watch::channel(None);
        desired_tx
            .send(Some(DesiredState {
                assignments: vec![Assignment {
                    instance_id: IID.into(),
                    health: Some(HealthCheck {
                        tcp: Some(TcpProbe { port: 80 }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }))
            .unwrap();
        let cgroups = CgroupReader {
            unified: Some(dir.path().join("cgroup")),
            ..Default::default()
        };
        let source = Arc::new(
            BoardSource::with_cgroups(board, "berth-n1", cgroups)
                .with_traffic(Arc::new(traffic))
                .with_probes(Arc::new(probes), desired_rx),
        );
        let metrics = NodeMetrics::with_cgroups(
            "n1",
            NodeCapacity {
                cpu_millis: 2000,
                memory_bytes: 1 << 30,
            },
            source.clone(),
            source.cgroups().clone(),
        );

        let (stop, stopped) = watch::channel(false);
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = api_listener.local_addr().unwrap();
        let metrics_addr = metrics_listener.local_addr().unwrap();
        let api_server = AgentApi::new(dir.path().join("instances"))
            .with_stats(source)
            .with_cpu_window(Duration::from_millis(50))
            .serve(api_listener, until(stopped.clone()));
        let metrics_server =
            crate::metrics::serve_listener(metrics_listener, Arc::new(metrics), until(stopped));
        let tasks = vec![
            tokio::spawn(async move { api_server.await.unwrap() }),
            tokio::spawn(async move { metrics_server.await.unwrap() }),
        ];
        Servers {
            api,
            metrics: metrics_addr,
            stop: Some(stop),
            tasks,
            _dir: dir,
        }
    }

    /// Stops both servers and waits for them to finish.
    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(true).unwrap();
        }
        for t in std::mem::take(&mut self.tasks) {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("server stops on shutdown")
                .unwrap();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[tokio::test]
async fn serves_stats_and_metrics_of_the_board() {
    let servers = Servers::start().await;
    let http = reqwest::Client::new();

    let url = format!("http://{}/v1/instances/{IID}/stats", servers.api);
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "instance_id": IID,
            "status": "RUNNING",
            "cpu_percent": 0.0,
            "cpu_seconds": 1.5,
            "memory_bytes": 1048576,
            "memory_limit_bytes": 67108864,
            "rx_bytes": 400,
            "tx_bytes": 300,
            "rx_packets": 4,
            "tx_packets": 3,
            "restarts": 1,
        })
    );

    for (id, status, code) in [
        ("ins-ffffffffffff", 404, "not_found"),
        ("ins-nothex", 400, "invalid_argument"),
    ] {
        let url = format!("http://{}/v1/instances/{id}/stats", servers.api);
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), status, "{id}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{id}: {body}");
    }

    let resp = http
        .get(format!("http://{}/metrics", servers.metrics))
        .header("accept", "application/openmetrics-text")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        OPENMETRICS_CONTENT_TYPE
    );
    let text = resp.text().await.unwrap();
    let exp = parse_openmetrics(&text).unwrap_or_else(|e| panic!("{e:?} in\n{text}"));
    let names: BTreeSet<String> = exp
        .families
        .iter()
        .map(|(name, f)| match f.family_type {
            OpenMetricsType::Counter => format!("{name}_total"),
            _ => name.clone(),
        })
        .collect();
    // Every series of the metrics module's doc table.
    let want = [
        "berth_instance_cpu_seconds_total",
        "berth_instance_memory_usage_bytes",
        "berth_instance_memory_limit_bytes",
        "berth_instance_restarts_total",
        "berth_instance_network_receive_bytes_total",
        "berth_instance_network_transmit_bytes_total",
        "berth_instance_network_receive_packets_total",
        "berth_instance_network_transmit_packets_total",
        "berth_instance_network_receive_packets_dropped_total",
        "berth_instance_network_transmit_packets_dropped_total",
        "berth_instance_probe_success",
        "berth_instance_probe_failures_total",
        "berth_node_cpu_capacity_cores",
        "berth_node_cpu_allocated_cores",
        "berth_node_memory_capacity_bytes",
        "berth_node_memory_allocated_bytes",
        "berth_node_instances",
    ];
    for name in want {
        assert!(names.contains(name), "no {name} in\n{text}");
    }
    assert!(
        text.contains(&format!(
            "berth_instance_probe_failures_total{{instance_id=\"{IID}\",container_id=\"ctr-1\",container_name=\"web\",node_id=\"n1\",probe=\"tcp\"}} 2"
        )),
        "{text}"
    );

    servers.shutdown().await;
}

#[tokio::test]
async fn logs_only_api_answers_stats_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_on(listener, dir.path().to_path_buf(), async move {
        let _ = stopped.await;
    }));
    let resp = reqwest::get(format!("http://{addr}/v1/instances/{IID}/stats"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
