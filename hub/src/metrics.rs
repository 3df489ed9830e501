//! The hub's Prometheus metrics, served as `GET /metrics` on the REST listener.
//!
//! One process-wide registry ([`global`]): the REST middleware, the reconciler and the store
//! wrappers record into it without the registry travelling through [`crate::service::Service`].
//! Request series are labelled by the route *template* (`/v1/containers/{id}`), never by the raw
//! path, so ids cannot blow up the number of series. Cluster gauges (nodes, instances) are a
//! snapshot the scheduling leader replaces after each pass; they are rendered at scrape time, so a
//! node that left the snapshot leaves no stale series.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `berth_hub_http_requests_total` | counter | `method`, `route`, `status` |
//! | `berth_hub_http_request_duration_seconds` | histogram | `method`, `route` |
//! | `berth_hub_grpc_requests_total` | counter | `method` |
//! | `berth_hub_grpc_request_duration_seconds` | histogram | `method` |
//! | `berth_hub_scheduling_latency_seconds` | histogram | — (instance created → placed) |
//! | `berth_hub_etcd_request_duration_seconds` | histogram | `op` |
//! | `berth_hub_etcd_failures_total` | counter | `op` |
//! | `berth_hub_leader` | gauge | — (1 on the replica running the reconciler) |
//! | `berth_hub_node_cpu_capacity_cores`, `berth_hub_node_cpu_allocated_cores` | gauge | `node_id` |
//! | `berth_hub_node_memory_capacity_bytes`, `berth_hub_node_memory_allocated_bytes` | gauge | `node_id` |
//! | `berth_hub_node_status` | gauge (1) | `node_id`, `status` |
//! | `berth_hub_instances` | gauge | `status` |
//! | `berth_alert_deliveries_total` | counter | `result`: `delivered`, `failed`, `dropped` |
//! | `berth_alerts_firing` | gauge | `alertname` (on the leader) |

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

pub use berth_metrics_text::{Format, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};

/// The route label of requests no route matched (404s), so scanners add one series, not many.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Request latency buckets (seconds): Prometheus' defaults.
const HTTP_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

type HttpLabels = [(&'static str, String); 3];
type RouteLabels = [(&'static str, String); 2];
type OpLabels = [(&'static str, &'static str); 1];
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// One node as the reconciler's snapshot sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSample {
    /// Node id (label `node_id`).
    pub node_id: String,
    /// Status, e.g. `HEALTHY`, `UNHEALTHY`, `DOWN` (label `status` of `berth_hub_node_status`).
    pub status: String,
    /// CPU the node offers, in millicores.
    pub cpu_capacity_millis: u64,
    /// CPU requested by the instances placed on it, in millicores.
    pub cpu_allocated_millis: u64,
    /// Memory the node offers, in bytes.
    pub memory_capacity_bytes: u64,
    /// Memory requested by the instances placed on it, in bytes.
    pub memory_allocated_bytes: u64,
}

/// The hub's registry and its metrics.
#[derive(Debug)]
pub struct HubMetrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: HistogramFamily<RouteLabels>,
    grpc_requests: Family<[(&'static str, String); 1], Counter>,
    grpc_duration: HistogramFamily<[(&'static str, String); 1]>,
    scheduling: Histogram,
    etcd_duration: HistogramFamily<OpLabels>,
    etcd_failures: Family<OpLabels, Counter>,
    leader: Gauge,
    alert_deliveries: Family<[(&'static str, &'static str); 1], Counter>,
    alerts_firing: Family<[(&'static str, &'static str); 1], Gauge>,
    cluster: Arc<Mutex<ClusterSnapshot>>,
}

/// What the leader saw in its last pass.
#[derive(Debug, Default)]
struct ClusterSnapshot {
    nodes: Vec<NodeSample>,
    instances: BTreeMap<String, u64>,
}

static GLOBAL: LazyLock<HubMetrics> = LazyLock::new(HubMetrics::new);

/// The process-wide registry the REST middleware and `/metrics` use.
pub fn global() -> &'static HubMetrics {
    &GLOBAL
}

impl Default for HubMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl HubMetrics {
    // Histograms carry the unit in their name but no `# UNIT` line: the metadata is optional, and
    // some strict OpenMetrics parsers (openmetrics-parser 0.5) refuse units on histograms.

    /// A fresh registry (tests; the hub itself uses [`global`]).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "berth_hub_http_requests",
            "REST requests by method, route template and status",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(|| Histogram::new(HTTP_BUCKETS));
        registry.register(
            "berth_hub_http_request_duration_seconds",
            "REST request latency until the response head, by method and route template",
            http_duration.clone(),
        );
        let grpc_requests = Family::default();
        registry.register(
            "berth_hub_grpc_requests",
            "gRPC requests by method",
            grpc_requests.clone(),
        );
        let grpc_duration: HistogramFamily<[(&'static str, String); 1]> =
            Family::new_with_constructor(|| Histogram::new(HTTP_BUCKETS));
        registry.register(
            "berth_hub_grpc_request_duration_seconds",
            "gRPC latency until the response head (a stream's start, not its end), by method",
            grpc_duration.clone(),
        );
        // 5 ms .. ~82 s.
        let scheduling = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        registry.register(
            "berth_hub_scheduling_latency_seconds",
            "Time from an instance's creation to its placement on a node",
            scheduling.clone(),
        );
        // 0.5 ms .. ~4 s.
        let etcd_duration: HistogramFamily<OpLabels> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 14)));
        registry.register(
            "berth_hub_etcd_request_duration_seconds",
            "etcd request latency by operation",
            etcd_duration.clone(),
        );
        let etcd_failures = Family::default();
        registry.register(
            "berth_hub_etcd_failures",
            "Failed etcd requests by operation",
            etcd_failures.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "berth_hub_leader",
            "1 on the hub replica that holds the scheduler election, else 0",
            leader.clone(),
        );
        let alert_deliveries = Family::default();
        registry.register(
            "berth_alert_deliveries",
            "Alert webhook messages by outcome (delivered, failed after retries, dropped on a full queue)",
            alert_deliveries.clone(),
        );
        let alerts_firing = Family::default();
        registry.register(
            "berth_alerts_firing",
            "Alerts firing by name, as the scheduling leader evaluates them",
            alerts_firing.clone(),
        );
        let cluster = Arc::new(Mutex::new(ClusterSnapshot::default()));
        registry.register_collector(Box::new(ClusterCollector(cluster.clone())));
        HubMetrics {
            registry,
            http_requests,
            http_duration,
            grpc_requests,
            grpc_duration,
            scheduling,
            etcd_duration,
            etcd_failures,
            leader,
            alert_deliveries,
            alerts_firing,
            cluster,
        }
    }

    /// Records one REST request. `route` must be a template or [`UNMATCHED_ROUTE`].
    pub fn observe_http(&self, method: &Method, route: &str, status: u16, seconds: f64) {
        let method = method_label(method);
        self.http_requests
            .get_or_create(&[
                ("method", method.to_owned()),
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
        self.http_duration
            .get_or_create(&[("method", method.to_owned()), ("route", route.to_owned())])
            .observe(seconds);
    }

    /// Records one gRPC call (`method` is the path `/berth.v1.AgentService/Register`).
    pub fn observe_grpc(&self, method: &str, seconds: f64) {
        let labels = [("method", method.to_owned())];
        self.grpc_requests.get_or_create(&labels).inc();
        self.grpc_duration.get_or_create(&labels).observe(seconds);
    }

    /// Records how long one instance waited from creation to placement.
    pub fn observe_scheduling(&self, seconds: f64) {
        self.scheduling.observe(seconds);
    }

    /// Records one etcd request of kind `op` (a fixed name: `get`, `txn`, `watch`...).
    pub fn observe_etcd(&self, op: &'static str, seconds: f64, ok: bool) {
        self.etcd_duration
            .get_or_create(&[("op", op)])
            .observe(seconds);
        if !ok {
            self.etcd_failures.get_or_create(&[("op", op)]).inc();
        }
    }

    /// Runs one etcd request and records its latency (and failure) under `op`.
    pub async fn time_etcd<T, E>(
        &self,
        op: &'static str,
        request: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let out = request.await;
        self.observe_etcd(op, started.elapsed().as_secs_f64(), out.is_ok());
        out
    }

    /// Counts one alert webhook message by outcome (`delivered`, `failed`, `dropped`).
    pub fn observe_alert_delivery(&self, result: &'static str) {
        self.alert_deliveries
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Sets the number of firing alerts per alert name (a fixed set of names).
    pub fn set_alerts_firing(&self, counts: impl IntoIterator<Item = (&'static str, u64)>) {
        for (name, n) in counts {
            self.alerts_firing
                .get_or_create(&[("alertname", name)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Whether this replica runs the reconciler. Losing the election also drops the cluster
    /// snapshot, so only the leader exports node and instance gauges.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
        if !leader {
            *self.snapshot() = ClusterSnapshot::default();
            // Only the leader evaluates alerts: a follower reports none firing.
            self.alerts_firing.clear();
        }
    }

    /// Replaces the node gauges with the reconciler's latest view.
    pub fn set_nodes(&self, nodes: &[NodeSample]) {
        self.snapshot().nodes = nodes.to_vec();
    }

    /// Replaces the instance counts by status (statuses left out are no longer exported).
    pub fn set_instances<S: Into<String>>(&self, counts: impl IntoIterator<Item = (S, u64)>) {
        self.snapshot().instances = counts.into_iter().map(|(s, n)| (s.into(), n)).collect();
    }

    fn snapshot(&self) -> std::sync::MutexGuard<'_, ClusterSnapshot> {
        // A panic while holding the lock leaves plain data behind: still usable.
        self.cluster.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One scrape in `format`.
    pub fn render(&self, format: Format) -> Result<String, std::fmt::Error> {
        berth_metrics_text::encode(&self.registry, format)
    }
}

/// Method label: the standard methods, anything else as `other` (clients choose the method).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Axum middleware counting and timing each REST request into [`global`]. Apply it with
/// `Router::layer` so it runs after routing and sees the matched route template.
pub async fn track_request(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
    let method = req.method().clone();
    let started = Instant::now();
    let resp = next.run(req).await;
    global().observe_http(
        &method,
        &route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// `GET /metrics`: the [`global`] registry, in the format the `Accept` header asks for.
pub async fn scrape(headers: HeaderMap) -> Response {
    let format = Format::from_accept(headers.get(ACCEPT).and_then(|v| v.to_str().ok()));
    match global().render(format) {
        Ok(body) => ([(CONTENT_TYPE, format.content_type())], body).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics encoding failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// A tower layer for the tonic server (`Server::builder().layer(GrpcMetricsLayer)`) that counts
/// and times each gRPC call into [`global`] by its path, a fixed set of method names.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the gRPC router.
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B> tower::Service<axum::http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<axum::http::Request<B>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let out = fut.await;
            global().observe_grpc(&method, started.elapsed().as_secs_f64());
            out
        })
    }
}

/// Renders the cluster snapshot at scrape time.
#[derive(Debug)]
struct ClusterCollector(Arc<Mutex<ClusterSnapshot>>);

impl Collector for ClusterCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Families without a sample get no descriptor either (as `Family` does): an empty family
        // between two others trips some parsers, and there is nothing to describe.
        if !snap.nodes.is_empty() {
            encode_nodes(&mut enc, &snap.nodes)?;
        }
        if !snap.instances.is_empty() {
            let mut family = enc.encode_descriptor(
                "berth_hub_instances",
                "Instances in the cluster by status.",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (status, n) in &snap.instances {
                ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&[("status", status.as_str())])?)?;
            }
        }
        Ok(())
    }
}

/// The per-node gauges of the snapshot.
fn encode_nodes(enc: &mut DescriptorEncoder, nodes: &[NodeSample]) -> Result<(), std::fmt::Error> {
    type Field = fn(&NodeSample) -> f64;
    let gauges: [(&str, &str, Option<Unit>, Field); 4] = [
        (
            "berth_hub_node_cpu_capacity_cores",
            "CPU a node offers to the scheduler.",
            None,
            |n| n.cpu_capacity_millis as f64 / 1000.0,
        ),
        (
            "berth_hub_node_cpu_allocated_cores",
            "CPU requested by the instances placed on a node.",
            None,
            |n| n.cpu_allocated_millis as f64 / 1000.0,
        ),
        (
            "berth_hub_node_memory_capacity",
            "Memory a node offers to the scheduler.",
            Some(Unit::Bytes),
            |n| n.memory_capacity_bytes as f64,
        ),
        (
            "berth_hub_node_memory_allocated",
            "Memory requested by the instances placed on a node.",
            Some(Unit::Bytes),
            |n| n.memory_allocated_bytes as f64,
        ),
    ];
    for (name, help, unit, field) in &gauges {
        let g = ConstGauge::new(0.0f64);
        let mut family = enc.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?;
        for n in nodes {
            ConstGauge::new(field(n))
                .encode(family.encode_family(&[("node_id", n.node_id.as_str())])?)?;
        }
    }
    let mut family = enc.encode_descriptor(
        "berth_hub_node_status",
        "1 for each node's current status.",
        None,
        ConstGauge::new(1i64).metric_type(),
    )?;
    for n in nodes {
        ConstGauge::new(1i64).encode(family.encode_family(&[
            ("node_id", n.node_id.as_str()),
            ("status", n.status.as_str()),
        ])?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_replaces_series_and_leadership_loss_clears_them() {
        let m = HubMetrics::new();
        let node = |id: &str, status: &str| NodeSample {
            node_id: id.into(),
            status: status.into(),
            cpu_capacity_millis: 2000,
            cpu_allocated_millis: 500,
            memory_capacity_bytes: 1 << 30,
            memory_allocated_bytes: 1 << 20,
        };
        m.set_leader(true);
        m.set_nodes(&[node("n1", "HEALTHY"), node("n2", "DOWN")]);
        m.set_instances([("RUNNING", 3), ("PENDING", 1)]);
        let text = m.render(Format::OpenMetrics).unwrap();
        let exp = openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap();
        assert_eq!(
            exp.families["berth_hub_node_cpu_allocated_cores"]
                .iter_samples()
                .count(),
            2
        );
        assert!(text.contains("berth_hub_node_status{node_id=\"n2\",status=\"DOWN\"} 1\n"));
        assert!(text.contains("berth_hub_instances{status=\"RUNNING\"} 3"));
        assert!(text.contains("berth_hub_leader 1\n"));

        m.set_nodes(&[node("n1", "HEALTHY")]);
        let text = m.render(Format::Prometheus).unwrap();
        openmetrics_parser::prometheus::parse_prometheus(&text).unwrap();
        assert!(!text.contains("n2"), "{text}");

        m.set_leader(false);
        let text = m.render(Format::OpenMetrics).unwrap();
        assert!(!text.contains("node_id="), "{text}");
        assert!(text.contains("berth_hub_leader 0\n"));
    }

    #[tokio::test]
    async fn etcd_timer_counts_failures() {
        let m = HubMetrics::new();
        let ok: Result<u8, ()> = m.time_etcd("get", async { Ok(1) }).await;
        assert_eq!(ok, Ok(1));
        let _ = m.time_etcd("txn", async { Err::<(), _>("boom") }).await;
        let text = m.render(Format::OpenMetrics).unwrap();
        openmetrics_parser::openmetrics::parse_openmetrics(&text).unwrap();
        assert!(text.contains("berth_hub_etcd_request_duration_seconds_count{op=\"get\"} 1"));
        assert!(text.contains("berth_hub_etcd_failures_total{op=\"txn\"} 1"));
        assert!(!text.contains("berth_hub_etcd_failures_total{op=\"get\"}"));
    }

    #[test]
    fn odd_methods_share_one_label() {
        let m = HubMetrics::new();
        let odd = Method::from_bytes(b"BREW").unwrap();
        m.observe_http(&odd, UNMATCHED_ROUTE, 404, 0.001);
        let text = m.render(Format::OpenMetrics).unwrap();
        assert!(text.contains("method=\"other\""), "{text}");
    }
}
