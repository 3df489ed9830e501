//! `GET /metrics` on the REST router, against a real etcd: request series by route template,
//! latency histograms, and a body a real Prometheus/OpenMetrics parser accepts line by line.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure points at the line
mod common;

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use berth_hub::metrics::{self, NodeSample};
use common::Hub;
use openmetrics_parser::{
    openmetrics::parse_openmetrics, prometheus::parse_prometheus, HistogramValue, OpenMetricsValue,
    PrometheusValue,
};
use tower::ServiceExt;

/// GET `path` on a fresh router over the hub's service: (status, content type, body).
async fn get_raw(hub: &Hub, path: &str, accept: &str) -> (StatusCode, String, String) {
    let router = berth_hub::api::rest::router(hub.service.clone());
    let req = Request::get(path)
        .header("accept", accept)
        .body(Body::empty())
        .unwrap();
    let resp = router.oneshot(req).await.unwrap();
    let status = resp.status();
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

/// Labels of one sample, sorted.
type Labels = BTreeMap<String, String>;

fn labels_of<V: openmetrics_parser::RenderableMetricValue + Clone>(
    s: &openmetrics_parser::Sample<V>,
) -> Labels {
    s.get_labelset()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn matches(l: &Labels, want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
}

#[tokio::test]
async fn metrics_count_requests_by_route_template_and_parse() {
    let hub = Hub::start(false).await;
    let (status, net) = hub
        .post(
            "/v1/networks",
            r#"{"name":"metrics","cidr":"10.42.0.0/16"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{net}");
    let id = net["network_id"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        assert_eq!(
            hub.get(&format!("/v1/networks/{id}")).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(
        hub.get("/v1/containers/ctr-does-not-exist").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(hub.get("/v1/nodes").await.0, StatusCode::OK);
    assert_eq!(
        hub.get("/no/such/route/abc123").await.0,
        StatusCode::NOT_FOUND
    );
    // The reconciler's hooks, called the way the lead wires them.
    let m = metrics::global();
    m.observe_scheduling(0.042);
    let _: Result<(), ()> = m.time_etcd("get", async { Ok(()) }).await;
    m.set_leader(true);
    m.set_nodes(&[NodeSample {
        node_id: "node-a".into(),
        status: "HEALTHY".into(),
        cpu_capacity_millis: 4000,
        cpu_allocated_millis: 1500,
        memory_capacity_bytes: 8 << 30,
        memory_allocated_bytes: 1 << 30,
    }]);
    m.set_instances([("RUNNING", 2u64)]);

    // OpenMetrics, as Prometheus asks for it.
    let (status, content_type, body) = get_raw(
        &hub,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("application/openmetrics-text"));
    let exp = parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e:?} in\n{body}"));

    let requests = &exp.families["berth_hub_http_requests"];
    let count = |want: &[(&str, &str)]| -> f64 {
        requests
            .iter_samples()
            .filter(|s| matches(&labels_of(s), want))
            .map(|s| match &s.value {
                OpenMetricsValue::Counter(c) => c.value.as_f64(),
                v => panic!("not a counter: {v:?}"),
            })
            .sum()
    };
    let by_id = [
        ("method", "GET"),
        ("route", "/v1/networks/{id}"),
        ("status", "200"),
    ];
    // Other tests of this binary share the global registry: at least ours.
    assert!(count(&by_id) >= 3.0, "{body}");
    assert!(
        count(&[
            ("method", "POST"),
            ("route", "/v1/networks"),
            ("status", "201")
        ]) >= 1.0
    );
    assert!(
        count(&[("route", "/v1/containers/{id}"), ("status", "404")]) >= 1.0,
        "{body}"
    );
    assert!(count(&[("route", metrics::UNMATCHED_ROUTE), ("status", "404")]) >= 1.0);
    // Never a raw path: no id in any label value.
    for s in requests.iter_samples() {
        let l = labels_of(s);
        assert!(!l["route"].contains(&id), "raw path in {l:?}");
        assert!(!l["route"].contains("abc123"), "raw path in {l:?}");
        assert!(
            !l["route"].contains("ctr-does-not-exist"),
            "raw path in {l:?}"
        );
    }

    // The latency histogram of that route has its buckets, up to +Inf.
    let durations = &exp.families["berth_hub_http_request_duration_seconds"];
    let h = durations
        .iter_samples()
        .find(|s| {
            matches(
                &labels_of(s),
                &[("method", "GET"), ("route", "/v1/networks/{id}")],
            )
        })
        .map(|s| match &s.value {
            OpenMetricsValue::Histogram(h) => h.clone(),
            v => panic!("not a histogram: {v:?}"),
        })
        .unwrap_or_else(|| panic!("no histogram for the route in\n{body}"));
    check_histogram(&h, 3);
    assert!(body.contains(
        "berth_hub_http_request_duration_seconds_bucket{le=\"0.005\",method=\"GET\",route=\"/v1/networks/{id}\"}"
    ), "{body}");

    let sched = &exp.families["berth_hub_scheduling_latency_seconds"];
    let h = match &sched.iter_samples().next().unwrap().value {
        OpenMetricsValue::Histogram(h) => h.clone(),
        v => panic!("not a histogram: {v:?}"),
    };
    check_histogram(&h, 1);
    assert!(exp.families["berth_hub_etcd_request_duration_seconds"]
        .iter_samples()
        .any(|s| matches(&labels_of(s), &[("op", "get")])));
    assert!(body.contains("berth_hub_node_cpu_capacity_cores{node_id=\"node-a\"} 4.0"));
    assert!(body.contains("berth_hub_node_status{node_id=\"node-a\",status=\"HEALTHY\"} 1"));
    assert!(body.contains("berth_hub_instances{status=\"RUNNING\"} 2"));

    // Prometheus text 0.0.4 for anyone else (curl), parsed just as strictly.
    let (status, content_type, body) = get_raw(&hub, "/metrics", "*/*").await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/plain; version=0.0.4"));
    let exp = parse_prometheus(&body).unwrap_or_else(|e| panic!("{e:?} in\n{body}"));
    let h = exp.families["berth_hub_http_request_duration_seconds"]
        .iter_samples()
        .find(|s| matches(&labels_of(s), &[("route", "/v1/networks/{id}")]))
        .map(|s| match &s.value {
            PrometheusValue::Histogram(h) => h.clone(),
            v => panic!("not a histogram: {v:?}"),
        })
        .unwrap();
    check_histogram(&h, 3);
    // The scrapes themselves are counted under their own route.
    assert!(body.contains("route=\"/metrics\""), "{body}");
}

/// Cumulative buckets ending at +Inf, a count of at least `min`.
#[track_caller]
fn check_histogram(h: &HistogramValue, min: u64) {
    assert!(h.buckets.len() > 5, "{h:?}");
    let last = h.buckets.last().unwrap();
    assert!(last.upper_bound.is_infinite(), "{h:?}");
    assert!(h.count.unwrap() >= min, "{h:?}");
    let counts: Vec<f64> = h.buckets.iter().map(|b| b.count.as_f64()).collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{h:?}");
    assert_eq!(last.count.as_f64(), h.count.unwrap() as f64);
}
