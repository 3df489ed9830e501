#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use openmetrics_parser::{
    openmetrics::parse_openmetrics, prometheus::parse_prometheus, OpenMetricsType,
    OpenMetricsValue, PrometheusValue,
};

use super::*;

/// Every series of an exposition: name → (labels, value).
type Series = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

/// Parses an OpenMetrics body with a real parser (the whole text must parse).
fn parse_om(text: &str) -> Series {
    let exp = parse_openmetrics(text).unwrap_or_else(|e| panic!("{e:?} in\n{text}"));
    let mut out = Series::new();
    for (name, family) in exp.families {
        for s in family.iter_samples() {
            let labels: BTreeMap<String, String> = s
                .get_labelset()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let (series, v) = match (&family.family_type, &s.value) {
                (OpenMetricsType::Counter, OpenMetricsValue::Counter(c)) => {
                    (format!("{name}_total"), c.value.as_f64())
                }
                (_, OpenMetricsValue::Gauge(n)) => (name.clone(), n.as_f64()),
                other => panic!("unexpected {other:?}"),
            };
            out.entry(series).or_default().push((labels, v));
        }
    }
    out
}

/// Parses a Prometheus 0.0.4 body with a real parser.
fn parse_prom(text: &str) -> Series {
    let exp = parse_prometheus(text).unwrap_or_else(|e| panic!("{e:?} in\n{text}"));
    let mut out = Series::new();
    for (name, family) in exp.families {
        for s in family.iter_samples() {
            let labels = s
                .get_labelset()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let v = match &s.value {
                PrometheusValue::Counter(c) => c.value.as_f64(),
                PrometheusValue::Gauge(n) => n.as_f64(),
                other => panic!("unexpected {other:?}"),
            };
            out.entry(name.clone()).or_default().push((labels, v));
        }
    }
    out
}

/// The value of the series `name` whose labels include every pair of `want`.
#[track_caller]
fn value(series: &Series, name: &str, want: &[(&str, &str)]) -> f64 {
    let rows = series
        .get(name)
        .unwrap_or_else(|| panic!("no series {name} in {series:#?}"));
    let hits: Vec<f64> = rows
        .iter()
        .filter(|(l, _)| {
            want.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(hits.len(), 1, "{name} {want:?}: {rows:?}");
    hits[0]
}

/// A source the test fills; counts how often it was asked.
#[derive(Default)]
struct FakeSource {
    instances: Mutex<Vec<InstanceSample>>,
    asked: Mutex<u32>,
}

impl InstanceSource for FakeSource {
    fn instances(&self) -> Vec<InstanceSample> {
        *self.asked.lock().unwrap() += 1;
        self.instances.lock().unwrap().clone()
    }
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(file), text).unwrap();
}

fn sample(iid: &str, status: &str) -> InstanceSample {
    InstanceSample {
        instance_id: iid.into(),
        container_id: "ctr-1".into(),
        container_name: "web".into(),
        status: status.into(),
        cgroup_parent: "berth-n1".into(),
        cgroup_id: iid.into(),
        cpu_millis: 250,
        memory_bytes: 64 << 20,
        ..Default::default()
    }
}

/// Two instances, a unified-hierarchy cgroup tree in a temp dir for the first.
fn fixture() -> (tempfile::TempDir, Arc<FakeSource>, NodeMetrics) {
    let t = tempfile::tempdir().unwrap();
    let cg = t.path().join("berth-n1/ins-a");
    write(&cg, "cpu.stat", "usage_usec 1500000\nuser_usec 1000000\n");
    write(&cg, "memory.current", "1048576\n");
    write(&cg, "memory.max", "67108864\n");
    let mut a = sample("ins-a", "RUNNING");
    a.restarts = 3;
    a.net = Some(Counters {
        tx_packets: 10,
        tx_bytes: 1000,
        rx_packets: 20,
        rx_bytes: 2000,
        tx_dropped: 1,
        rx_dropped: 2,
    });
    a.probes = vec![ProbeSample {
        kind: ProbeKind::Http,
        last_success: Some(false),
        failures: 4,
    }];
    let mut b = sample("ins-b", "PULLING");
    // No probe result yet: no success series, but a failure counter at 0.
    b.probes = vec![ProbeSample {
        kind: ProbeKind::Tcp,
        last_success: None,
        failures: 0,
    }];
    let source = Arc::new(FakeSource::default());
    *source.instances.lock().unwrap() = vec![a, b];
    let cgroups = CgroupReader {
        unified: Some(t.path().to_path_buf()),
        ..Default::default()
    };
    let capacity = NodeCapacity {
        cpu_millis: 2000,
        memory_bytes: 1 << 30,
    };
    let m = NodeMetrics::with_cgroups("n1", capacity, source.clone(), cgroups);
    (t, source, m)
}

fn check_fixture(s: &Series) {
    let a = [("instance_id", "ins-a"), ("node_id", "n1")];
    let full = [
        ("instance_id", "ins-a"),
        ("container_id", "ctr-1"),
        ("container_name", "web"),
        ("node_id", "n1"),
    ];
    assert_eq!(value(s, "berth_instance_cpu_seconds_total", &full), 1.5);
    assert_eq!(value(s, "berth_instance_memory_usage_bytes", &a), 1048576.0);
    assert_eq!(
        value(s, "berth_instance_memory_limit_bytes", &a),
        67108864.0
    );
    assert_eq!(value(s, "berth_instance_restarts_total", &a), 3.0);
    let net = [
        ("berth_instance_network_receive_bytes_total", 2000.0),
        ("berth_instance_network_transmit_bytes_total", 1000.0),
        ("berth_instance_network_receive_packets_total", 20.0),
        ("berth_instance_network_transmit_packets_total", 10.0),
        ("berth_instance_network_receive_packets_dropped_total", 2.0),
        ("berth_instance_network_transmit_packets_dropped_total", 1.0),
    ];
    for (name, v) in net {
        assert_eq!(value(s, name, &a), v, "{name}");
        // No veth, no series.
        assert_eq!(s[name].len(), 1, "{name}");
    }
    let http = [("instance_id", "ins-a"), ("probe", "http")];
    assert_eq!(value(s, "berth_instance_probe_success", &http), 0.0);
    assert_eq!(value(s, "berth_instance_probe_failures_total", &http), 4.0);
    assert_eq!(s["berth_instance_probe_success"].len(), 1);
    let tcp = [("instance_id", "ins-b"), ("probe", "tcp")];
    assert_eq!(value(s, "berth_instance_probe_failures_total", &tcp), 0.0);

    // ins-b has no cgroup: no CPU or memory series for it, the rest is there.
    assert_eq!(s["berth_instance_cpu_seconds_total"].len(), 1);
    assert_eq!(s["berth_instance_restarts_total"].len(), 2);

    let n = [("node_id", "n1")];
    assert_eq!(value(s, "berth_node_cpu_capacity_cores", &n), 2.0);
    assert_eq!(value(s, "berth_node_cpu_allocated_cores", &n), 0.5);
    assert_eq!(
        value(s, "berth_node_memory_capacity_bytes", &n),
        (1u64 << 30) as f64
    );
    assert_eq!(
        value(s, "berth_node_memory_allocated_bytes", &n),
        (128u64 << 20) as f64
    );
    assert_eq!(
        value(s, "berth_node_instances", &[("status", "RUNNING")]),
        1.0
    );
    assert_eq!(
        value(s, "berth_node_instances", &[("status", "PULLING")]),
        1.0
    );
}

#[test]
fn openmetrics_scrape_has_every_series_and_parses() {
    let (_t, source, m) = fixture();
    let text = m.render(Format::OpenMetrics).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    check_fixture(&parse_om(&text));
    assert_eq!(
        *source.asked.lock().unwrap(),
        1,
        "one source call per scrape"
    );
}

#[test]
fn prometheus_text_scrape_has_every_series_and_parses() {
    let (_t, _source, m) = fixture();
    let text = m.render(Format::Prometheus).unwrap();
    check_fixture(&parse_prom(&text));
}

#[test]
fn values_are_read_at_scrape_time() {
    let (t, source, m) = fixture();
    let first = parse_om(&m.render(Format::OpenMetrics).unwrap());
    assert_eq!(
        value(
            &first,
            "berth_instance_cpu_seconds_total",
            &[("instance_id", "ins-a")]
        ),
        1.5
    );
    write(
        &t.path().join("berth-n1/ins-a"),
        "cpu.stat",
        "usage_usec 4000000\n",
    );
    source
        .instances
        .lock()
        .unwrap()
        .retain(|s| s.instance_id == "ins-a");
    let second = parse_om(&m.render(Format::OpenMetrics).unwrap());
    assert_eq!(
        value(
            &second,
            "berth_instance_cpu_seconds_total",
            &[("instance_id", "ins-a")]
        ),
        4.0
    );
    // A removed instance leaves no stale series behind.
    assert_eq!(second["berth_instance_restarts_total"].len(), 1);
    assert!(
        !second.contains_key("berth_node_instances") || second["berth_node_instances"].len() == 1
    );
}

#[test]
fn empty_node_still_parses() {
    let m = NodeMetrics::with_cgroups(
        "n1",
        NodeCapacity::default(),
        Arc::new(FakeSource::default()),
        CgroupReader::default(),
    );
    for format in [Format::OpenMetrics, Format::Prometheus] {
        let text = m.render(format).unwrap();
        let s = match format {
            Format::OpenMetrics => parse_om(&text),
            Format::Prometheus => parse_prom(&text),
        };
        assert_eq!(value(&s, "berth_node_cpu_capacity_cores", &[]), 0.0);
        assert!(!s.contains_key("berth_instance_cpu_seconds_total"));
    }
}

#[test]
fn label_values_are_escaped() {
    let source = Arc::new(FakeSource::default());
    let mut odd = sample("ins-q", "RUNNING");
    odd.container_name = "we\"ird\\name\n{x}".into();
    *source.instances.lock().unwrap() = vec![odd];
    let m = NodeMetrics::with_cgroups(
        "n1",
        NodeCapacity::default(),
        source,
        CgroupReader::default(),
    );
    let s = parse_om(&m.render(Format::OpenMetrics).unwrap());
    assert_eq!(
        value(
            &s,
            "berth_instance_restarts_total",
            &[("instance_id", "ins-q")]
        ),
        0.0
    );
}

#[test]
fn accept_header_picks_the_format() {
    let prom =
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    assert_eq!(Format::from_accept(Some(prom)), Format::OpenMetrics);
    assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
    assert_eq!(Format::from_accept(None), Format::Prometheus);
}

#[tokio::test]
async fn serves_metrics_over_http() {
    let (_t, _source, m) = fixture();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_listener(listener, Arc::new(m), async move {
        let _ = stopped.await;
    }));
    for (accept, content_type) in [
        ("application/openmetrics-text", OPENMETRICS_CONTENT_TYPE),
        ("*/*", PROMETHEUS_CONTENT_TYPE),
    ] {
        let (head, body) = http_get(addr, "/metrics", accept).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("content-type: {content_type}")),
            "{head}"
        );
        let s = if content_type == OPENMETRICS_CONTENT_TYPE {
            parse_om(&body)
        } else {
            parse_prom(&body)
        };
        check_fixture(&s);
    }
    let (head, _) = http_get(addr, "/other", "*/*").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A bare HTTP/1.1 GET (no client crate needed): (status line + headers, body).
async fn http_get(addr: std::net::SocketAddr, path: &str, accept: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}
