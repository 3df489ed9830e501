#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use berth_proto::v1::{Assignment, ExecProbe, HttpProbe, TcpProbe};
use openmetrics_parser::{openmetrics::parse_openmetrics, OpenMetricsValue};

use super::*;
use crate::health::ProbeResult;
use crate::metrics::{Format, NodeCapacity, NodeMetrics};

/// Counters for the instances the test names; none for the others.
#[derive(Default)]
struct FakeTraffic(Mutex<HashMap<String, Counters>>);

impl TrafficCounters for FakeTraffic {
    fn instance_counters(&self, instance_id: &str) -> Option<Counters> {
        self.0.lock().unwrap().get(instance_id).copied()
    }
}

#[derive(Default)]
struct FakeProbes(Mutex<Vec<(String, ProbeSnapshot)>>);

impl ProbeStates for FakeProbes {
    fn probe_snapshots(&self) -> Vec<(String, ProbeSnapshot)> {
        self.0.lock().unwrap().clone()
    }
}

fn entry(id: &str, status: InstanceStatus) -> BoardEntry {
    BoardEntry {
        instance_id: id.into(),
        container_id: "ctr-1".into(),
        container_name: "web".into(),
        status,
        restarts: 2,
        cpu_millis: 250,
        memory_bytes: 64 << 20,
        image_digest: "sha256:ab".into(),
    }
}

fn assignment(id: &str, health: Option<HealthCheck>) -> Assignment {
    Assignment {
        instance_id: id.into(),
        health,
        ..Default::default()
    }
}

fn http() -> HealthCheck {
    HealthCheck {
        http: Some(HttpProbe {
            path: "/healthz".into(),
            port: 8080,
        }),
        ..Default::default()
    }
}

fn snapshot(ok: bool, failures_total: u64) -> ProbeSnapshot {
    ProbeSnapshot {
        healthy: Some(ok),
        last_result: Some(ProbeResult {
            ok,
            reason: "status 500".into(),
            at: SystemTime::now(),
            took: Duration::from_millis(3),
        }),
        consecutive_failures: 0,
        failures_total,
        successes_total: 1,
    }
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(file), text).unwrap();
}

#[test]
fn board_entries_become_samples() {
    let board = InstanceBoard::new();
    board.set(entry("ins-b", InstanceStatus::Pulling));
    board.set(entry("ins-a", InstanceStatus::Running));
    let traffic = Arc::new(FakeTraffic::default());
    let counters = Counters {
        tx_packets: 1,
        tx_bytes: 2,
        rx_packets: 3,
        rx_bytes: 4,
        tx_dropped: 5,
        rx_dropped: 6,
    };
    traffic.0.lock().unwrap().insert("ins-a".into(), counters);
    let source = BoardSource::with_cgroups(board.clone(), "berth-n1", CgroupReader::default())
        .with_traffic(traffic);

    let samples = source.instances();
    assert_eq!(
        samples[0],
        InstanceSample {
            instance_id: "ins-a".into(),
            container_id: "ctr-1".into(),
            container_name: "web".into(),
            status: "RUNNING".into(),
            cgroup_parent: "berth-n1".into(),
            cgroup_id: "ins-a".into(),
            cpu_millis: 250,
            memory_bytes: 64 << 20,
            restarts: 2,
            probes: vec![],
            net: Some(counters),
        }
    );
    assert_eq!(samples[1].instance_id, "ins-b");
    assert_eq!(samples[1].status, "PULLING");
    assert_eq!(samples[1].net, None, "no veth, no counters");

    // The source follows the board: a removed instance is gone at the next scrape.
    board.remove("ins-a");
    let ids: Vec<_> = source
        .instances()
        .into_iter()
        .map(|s| s.instance_id)
        .collect();
    assert_eq!(ids, ["ins-b"]);
}

#[test]
fn probes_take_their_kind_from_the_desired_state() {
    let board = InstanceBoard::new();
    for id in ["ins-a", "ins-b", "ins-c", "ins-d", "ins-e"] {
        board.set(entry(id, InstanceStatus::Running));
    }
    let probes = Arc::new(FakeProbes::default());
    *probes.0.lock().unwrap() = vec![
        ("ins-a".into(), snapshot(false, 4)),
        // Probed, but absent from the desired state (being removed): no kind, no series.
        ("ins-d".into(), snapshot(true, 0)),
    ];
    let tcp = HealthCheck {
        tcp: Some(TcpProbe { port: 80 }),
        ..Default::default()
    };
    let exec = HealthCheck {
        exec: Some(ExecProbe {
            command: vec!["true".into()],
        }),
        ..Default::default()
    };
    let (tx, rx) = watch::channel(None);
    tx.send(Some(DesiredState {
        assignments: vec![
            assignment("ins-a", Some(http())),
            assignment("ins-b", Some(tcp)),
            assignment("ins-c", Some(exec)),
            assignment("ins-e", None),
        ],
        ..Default::default()
    }))
    .unwrap();
    let source = BoardSource::with_cgroups(board, "berth-n1", CgroupReader::default())
        .with_probes(probes, rx);

    let by_id: BTreeMap<String, Vec<ProbeSample>> = source
        .instances()
        .into_iter()
        .map(|s| (s.instance_id, s.probes))
        .collect();
    assert_eq!(
        by_id["ins-a"],
        [ProbeSample {
            kind: ProbeKind::Http,
            last_success: Some(false),
            failures: 4
        }]
    );
    // Declared but not run yet: no result, a failure counter at 0.
    assert_eq!(
        by_id["ins-b"],
        [ProbeSample {
            kind: ProbeKind::Tcp,
            last_success: None,
            failures: 0
        }]
    );
    assert_eq!(by_id["ins-c"][0].kind, ProbeKind::Exec);
    assert!(by_id["ins-d"].is_empty());
    assert!(by_id["ins-e"].is_empty());
}

#[test]
fn no_desired_state_yet_means_no_probe_series() {
    let board = InstanceBoard::new();
    board.set(entry("ins-a", InstanceStatus::Running));
    let probes = Arc::new(FakeProbes::default());
    *probes.0.lock().unwrap() = vec![("ins-a".into(), snapshot(true, 0))];
    let (_tx, rx) = watch::channel(None);
    let source =
        BoardSource::with_cgroups(board, "p", CgroupReader::default()).with_probes(probes, rx);
    assert!(source.instances()[0].probes.is_empty());
}

#[test]
fn cpu_percent_is_of_one_core() {
    let at = |s: f64| CgroupUsage {
        cpu_seconds: Some(s),
        ..Default::default()
    };
    let quarter = Duration::from_millis(250);
    assert!((cpu_percent(&at(1.0), &at(1.125), quarter) - 50.0).abs() < 1e-9);
    assert!((cpu_percent(&at(1.0), &at(1.5), quarter) - 200.0).abs() < 1e-9);
    assert_eq!(cpu_percent(&at(2.0), &at(1.0), quarter), 0.0, "went back");
    assert_eq!(cpu_percent(&at(1.0), &at(2.0), Duration::ZERO), 0.0);
    assert_eq!(cpu_percent(&CgroupUsage::default(), &at(2.0), quarter), 0.0);
}

#[test]
fn status_names_drop_the_enum_prefix() {
    assert_eq!(status_name(InstanceStatus::Running), "RUNNING");
    assert_eq!(status_name(InstanceStatus::Unhealthy), "UNHEALTHY");
    assert_eq!(status_name(InstanceStatus::Unspecified), "UNSPECIFIED");
}

#[tokio::test]
async fn stats_read_cgroup_and_counters_of_a_known_instance() {
    let t = tempfile::tempdir().unwrap();
    let cg = t.path().join("berth-n1/ins-a");
    write(&cg, "cpu.stat", "usage_usec 2500000\n");
    write(&cg, "memory.current", "4096\n");
    write(&cg, "memory.max", "max\n");
    let board = InstanceBoard::new();
    board.set(entry("ins-a", InstanceStatus::Running));
    let traffic = Arc::new(FakeTraffic::default());
    traffic.0.lock().unwrap().insert(
        "ins-a".into(),
        Counters {
            rx_bytes: 10,
            tx_bytes: 20,
            rx_packets: 1,
            tx_packets: 2,
            ..Default::default()
        },
    );
    let cgroups = CgroupReader {
        unified: Some(t.path().to_path_buf()),
        ..Default::default()
    };
    let source =
        Arc::new(BoardSource::with_cgroups(board, "berth-n1", cgroups).with_traffic(traffic));

    assert_eq!(source.stats("ins-zz", Duration::ZERO).await, None);
    let s = source
        .stats("ins-a", Duration::from_millis(20))
        .await
        .unwrap();
    assert_eq!(
        s,
        InstanceStats {
            instance_id: "ins-a".into(),
            status: "RUNNING".into(),
            cpu_percent: 0.0,
            cpu_seconds: 2.5,
            memory_bytes: 4096,
            memory_limit_bytes: 0,
            rx_bytes: 10,
            tx_bytes: 20,
            rx_packets: 1,
            tx_packets: 2,
            restarts: 2,
        }
    );
}

/// The whole chain as a scrape sees it: board → source → collector → text → parser.
#[test]
fn a_scrape_over_the_board_parses() {
    let board = InstanceBoard::new();
    board.set(entry("ins-a", InstanceStatus::Running));
    board.set(entry("ins-b", InstanceStatus::Running));
    let (tx, rx) = watch::channel(None);
    tx.send(Some(DesiredState {
        assignments: vec![assignment("ins-a", Some(http()))],
        ..Default::default()
    }))
    .unwrap();
    let probes = Arc::new(FakeProbes::default());
    *probes.0.lock().unwrap() = vec![("ins-a".into(), snapshot(true, 1))];
    let source = BoardSource::with_cgroups(board, "berth-n1", CgroupReader::default())
        .with_probes(probes, rx);
    let m = NodeMetrics::with_cgroups(
        "n1",
        NodeCapacity {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
        },
        Arc::new(source),
        CgroupReader::default(),
    );
    let text = m.render(Format::OpenMetrics).unwrap();
    let exp = parse_openmetrics(&text).unwrap_or_else(|e| panic!("{e:?} in\n{text}"));
    let gauge = |name: &str| -> f64 {
        let family = &exp.families[name];
        let mut values = family.iter_samples().map(|s| match &s.value {
            OpenMetricsValue::Gauge(g) => g.as_f64(),
            other => panic!("{name}: {other:?}"),
        });
        let v = values.next().unwrap();
        assert!(values.next().is_none(), "{name}: one series");
        v
    };
    assert_eq!(gauge("berth_node_cpu_allocated_cores"), 0.5);
    assert_eq!(
        gauge("berth_node_memory_allocated_bytes"),
        (128u64 << 20) as f64
    );
    assert_eq!(gauge("berth_instance_probe_success"), 1.0);
    assert_eq!(gauge("berth_node_instances"), 2.0);
}
