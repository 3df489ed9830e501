//! The node's Prometheus metrics: `GET /metrics` on `--listen-metrics`.
//!
//! Nothing is recorded per sample: every value is read at scrape time, from the instances' cgroups
//! (CPU, memory) and from what the agent already keeps (restarts, probe state, the eBPF traffic
//! counters), through [`InstanceSource`]. The agent aggregates on the node and the hub never sees
//! a sample, so a scrape costs a few file reads per instance and etcd nothing. The agent's source
//! is [`BoardSource`] (the reconciler's instance board, the eBPF counters, the prober).
//!
//! Metric names (labels `instance_id`, `container_id`, `container_name`, `node_id` on every
//! `berth_instance_*` series; `node_id` on every `berth_node_*` series):
//!
//! | name | type | source |
//! |---|---|---|
//! | `berth_instance_cpu_seconds_total` | counter | cgroup v1 `cpuacct.usage` / v2 `cpu.stat` `usage_usec` |
//! | `berth_instance_memory_usage_bytes` | gauge | v1 `memory.usage_in_bytes` / v2 `memory.current` |
//! | `berth_instance_memory_limit_bytes` | gauge | v1 `memory.limit_in_bytes` / v2 `memory.max` (absent when unlimited) |
//! | `berth_instance_restarts_total` | counter | [`InstanceSample::restarts`] |
//! | `berth_instance_network_{receive,transmit}_bytes_total` | counter | eBPF counters on the veth |
//! | `berth_instance_network_{receive,transmit}_packets_total` | counter | eBPF counters |
//! | `berth_instance_network_{receive,transmit}_packets_dropped_total` | counter | eBPF policy drops |
//! | `berth_instance_probe_success` (+ `probe`) | gauge | last probe result, 1 or 0 |
//! | `berth_instance_probe_failures_total` (+ `probe`) | counter | failed probe runs |
//! | `berth_node_cpu_capacity_cores`, `berth_node_cpu_allocated_cores` | gauge | offered / sum of requests |
//! | `berth_node_memory_capacity_bytes`, `berth_node_memory_allocated_bytes` | gauge | offered / sum of requests |
//! | `berth_node_instances` (+ `status`) | gauge | instances by status |

pub mod board;
pub mod cgroup;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

pub use crate::ebpf::Counters;
pub use board::{BoardSource, InstanceStats, ProbeStates, TrafficCounters};
pub use cgroup::{CgroupReader, CgroupUsage};

/// Port of `--listen-metrics` when only the address is defaulted (the advertise IP).
pub const DEFAULT_PORT: u16 = 9751;

pub use berth_metrics_text::{Format, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};

/// What the agent knows about its instances, asked once per scrape.
///
/// Called from a blocking thread (`spawn_blocking`), so an implementation may take locks with
/// `blocking_lock`/`blocking_read` and do syscalls (eBPF map lookups).
pub trait InstanceSource: Send + Sync + 'static {
    /// Every instance this node holds now (not those already torn down).
    fn instances(&self) -> Vec<InstanceSample>;
}

/// One instance as the agent sees it at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstanceSample {
    /// Instance id (label `instance_id`).
    pub instance_id: String,
    /// Container id (label `container_id`).
    pub container_id: String,
    /// Container name (label `container_name`).
    pub container_name: String,
    /// Status as reported to the hub, e.g. `RUNNING` (label `status` of `berth_node_instances`).
    pub status: String,
    /// The node's cgroup parent (`berth-<node-id>`); empty: no cgroup is read.
    pub cgroup_parent: String,
    /// The instance's cgroup name under the parent (the instance id).
    pub cgroup_id: String,
    /// Requested CPU in millicores (counts towards the node's allocation).
    pub cpu_millis: u64,
    /// Requested memory in bytes (counts towards the node's allocation).
    pub memory_bytes: u64,
    /// Restarts so far.
    pub restarts: u64,
    /// One entry per configured probe.
    pub probes: Vec<ProbeSample>,
    /// The veth's eBPF counters; `None` while the instance has no veth.
    pub net: Option<Counters>,
}

/// The kind of a health probe (label `probe`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    /// An HTTP GET.
    Http,
    /// A TCP connect.
    Tcp,
    /// A command run inside the container.
    Exec,
}

impl ProbeKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Http => "http",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Exec => "exec",
        }
    }
}

/// One probe's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSample {
    /// Which probe.
    pub kind: ProbeKind,
    /// The last result; `None` before the first run (no `berth_instance_probe_success` series).
    pub last_success: Option<bool>,
    /// Failed runs so far.
    pub failures: u64,
}

/// What the node offers to the scheduler (what it registered with).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCapacity {
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listener could not be bound.
    #[error("bind metrics listener {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("serve metrics on {addr}: {source}")]
    Serve {
        /// The bound address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A metric could not be encoded (a bug, not an input error).
    #[error("encode metrics: {0}")]
    Encode(std::fmt::Error),
}

/// The node's registry: the scrape-time collector over an [`InstanceSource`], plus whatever the
/// agent registers itself through [`NodeMetrics::registry_mut`].
#[derive(Debug)]
pub struct NodeMetrics {
    registry: Registry,
}

impl NodeMetrics {
    /// Metrics of node `node_id`, reading cgroups from the hierarchies mounted here.
    pub fn new(
        node_id: impl Into<String>,
        capacity: NodeCapacity,
        source: Arc<dyn InstanceSource>,
    ) -> Self {
        let cgroups = CgroupReader::from_system().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read mountinfo: no cgroup metrics");
            CgroupReader::default()
        });
        Self::with_cgroups(node_id, capacity, source, cgroups)
    }

    /// Metrics of node `node_id`, reading cgroups where `cgroups` says (tests point it at files).
    pub fn with_cgroups(
        node_id: impl Into<String>,
        capacity: NodeCapacity,
        source: Arc<dyn InstanceSource>,
        cgroups: CgroupReader,
    ) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(NodeCollector {
            node_id: node_id.into(),
            capacity,
            source,
            cgroups,
        }));
        NodeMetrics { registry }
    }

    /// The registry, to add the agent's own metrics before the endpoint starts.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// One scrape: asks the source, reads the cgroups, encodes. Blocking (file reads).
    pub fn render(&self, format: Format) -> Result<String, MetricsError> {
        berth_metrics_text::encode(&self.registry, format).map_err(MetricsError::Encode)
    }
}

/// The `/metrics` router (for embedding in another server).
pub fn router(metrics: Arc<NodeMetrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

/// Serves `GET /metrics` on `addr` until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<NodeMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    serve_listener(listener, metrics, shutdown).await
}

/// Serves `GET /metrics` on a bound listener until `shutdown` completes.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    metrics: Arc<NodeMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MetricsError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%addr, "metrics endpoint listening");
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| MetricsError::Serve { addr, source })
}

async fn scrape(State(metrics): State<Arc<NodeMetrics>>, headers: HeaderMap) -> Response {
    let format = Format::from_accept(headers.get(ACCEPT).and_then(|v| v.to_str().ok()));
    // The source may take blocking locks and the collector reads files.
    match tokio::task::spawn_blocking(move || metrics.render(format)).await {
        Ok(Ok(body)) => ([(CONTENT_TYPE, format.content_type())], body).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics scrape failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics scrape task failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Collects everything at scrape time.
struct NodeCollector {
    node_id: String,
    capacity: NodeCapacity,
    source: Arc<dyn InstanceSource>,
    cgroups: CgroupReader,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector")
            .field("node_id", &self.node_id)
            .field("capacity", &self.capacity)
            .field("cgroups", &self.cgroups)
            .finish_non_exhaustive()
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: its descriptor and a row per label set. A family without rows gets no
/// descriptor either (as prometheus-client's `Family` does): there is nothing to describe, and an
/// empty family between two others trips some parsers.
fn encode_rows<V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    rows: &[(Labels, V)],
) -> Result<(), std::fmt::Error>
where
    V: EncodeCounterValue + EncodeGaugeValue,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut family = enc.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, value) in rows {
        let mut m = family.encode_family(labels)?;
        match metric_type {
            MetricType::Counter => m.encode_counter::<NoLabelSet, V, u64>(value, None)?,
            _ => m.encode_gauge(value)?,
        }
    }
    Ok(())
}

fn instance_labels<'a>(s: &'a InstanceSample, node: &'a str) -> Labels<'a> {
    vec![
        ("instance_id", s.instance_id.as_str()),
        ("container_id", s.container_id.as_str()),
        ("container_name", s.container_name.as_str()),
        ("node_id", node),
    ]
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = self.source.instances();
        let usage: Vec<CgroupUsage> = samples
            .iter()
            .map(|s| self.cgroups.read(&s.cgroup_parent, &s.cgroup_id))
            .collect();
        let node = self.node_id.as_str();
        let labels = |s| instance_labels(s, node);
        // Rows of one per-instance family, skipping instances without a value.
        let rows_f64 = |f: &dyn Fn(&InstanceSample, &CgroupUsage) -> Option<f64>| {
            samples
                .iter()
                .zip(&usage)
                .filter_map(|(s, u)| f(s, u).map(|v| (labels(s), v)))
                .collect::<Vec<_>>()
        };
        let rows_u64 = |f: &dyn Fn(&InstanceSample, &CgroupUsage) -> Option<u64>| {
            samples
                .iter()
                .zip(&usage)
                .filter_map(|(s, u)| f(s, u).map(|v| (labels(s), v)))
                .collect::<Vec<_>>()
        };
        use MetricType::{Counter, Gauge};

        encode_rows(
            &mut enc,
            "berth_instance_cpu",
            "CPU time used by the instance's cgroup.",
            Some(&Unit::Seconds),
            Counter,
            &rows_f64(&|_, u| u.cpu_seconds),
        )?;
        encode_rows(
            &mut enc,
            "berth_instance_memory_usage",
            "Memory in use by the instance's cgroup, page cache included.",
            Some(&Unit::Bytes),
            Gauge,
            &rows_u64(&|_, u| u.memory_bytes),
        )?;
        encode_rows(
            &mut enc,
            "berth_instance_memory_limit",
            "Memory limit of the instance's cgroup (absent when unlimited).",
            Some(&Unit::Bytes),
            Gauge,
            &rows_u64(&|_, u| u.memory_limit_bytes),
        )?;
        encode_rows(
            &mut enc,
            "berth_instance_restarts",
            "Restarts of the instance by the agent.",
            None,
            Counter,
            &rows_u64(&|s, _| Some(s.restarts)),
        )?;
        type Net = fn(&Counters) -> u64;
        let net: [(&str, &str, Option<Unit>, Net); 6] = [
            (
                "berth_instance_network_receive",
                "Bytes received by the instance (L2 length).",
                Some(Unit::Bytes),
                |c| c.rx_bytes,
            ),
            (
                "berth_instance_network_transmit",
                "Bytes sent by the instance (L2 length).",
                Some(Unit::Bytes),
                |c| c.tx_bytes,
            ),
            (
                "berth_instance_network_receive_packets",
                "Packets received by the instance.",
                None,
                |c| c.rx_packets,
            ),
            (
                "berth_instance_network_transmit_packets",
                "Packets sent by the instance.",
                None,
                |c| c.tx_packets,
            ),
            (
                "berth_instance_network_receive_packets_dropped",
                "Packets to the instance dropped by network policy.",
                None,
                |c| c.rx_dropped,
            ),
            (
                "berth_instance_network_transmit_packets_dropped",
                "Packets from the instance dropped by network policy.",
                None,
                |c| c.tx_dropped,
            ),
        ];
        for (name, help, unit, field) in &net {
            encode_rows(
                &mut enc,
                name,
                help,
                unit.as_ref(),
                Counter,
                &rows_u64(&|s, _| s.net.as_ref().map(field)),
            )?;
        }

        let probe_rows = |f: &dyn Fn(&ProbeSample) -> Option<u64>| {
            let mut rows = Vec::new();
            for s in &samples {
                for p in &s.probes {
                    if let Some(v) = f(p) {
                        let mut l = labels(s);
                        l.push(("probe", p.kind.as_str()));
                        rows.push((l, v));
                    }
                }
            }
            rows
        };
        encode_rows(
            &mut enc,
            "berth_instance_probe_success",
            "Whether the instance's last health probe succeeded (1) or failed (0).",
            None,
            Gauge,
            &probe_rows(&|p| p.last_success.map(u64::from)),
        )?;
        encode_rows(
            &mut enc,
            "berth_instance_probe_failures",
            "Failed health probe runs of the instance.",
            None,
            Counter,
            &probe_rows(&|p| Some(p.failures)),
        )?;

        let node_labels: Labels = vec![("node_id", node)];
        let (cpu_millis, memory_bytes) = samples.iter().fold((0u64, 0u64), |(c, m), s| {
            (
                c.saturating_add(s.cpu_millis),
                m.saturating_add(s.memory_bytes),
            )
        });
        let cores = |millis: u64| millis as f64 / 1000.0;
        for (name, help, unit, value) in [
            (
                "berth_node_cpu_capacity_cores",
                "CPU the node offers to the scheduler.",
                None,
                cores(self.capacity.cpu_millis),
            ),
            (
                "berth_node_cpu_allocated_cores",
                "CPU requested by the instances on the node.",
                None,
                cores(cpu_millis),
            ),
            (
                "berth_node_memory_capacity",
                "Memory the node offers to the scheduler.",
                Some(Unit::Bytes),
                self.capacity.memory_bytes as f64,
            ),
            (
                "berth_node_memory_allocated",
                "Memory requested by the instances on the node.",
                Some(Unit::Bytes),
                memory_bytes as f64,
            ),
        ] {
            encode_rows(
                &mut enc,
                name,
                help,
                unit.as_ref(),
                Gauge,
                &[(node_labels.clone(), value)],
            )?;
        }

        let mut by_status: BTreeMap<&str, u64> = BTreeMap::new();
        for s in &samples {
            *by_status.entry(s.status.as_str()).or_default() += 1;
        }
        let status_rows: Vec<(Labels, u64)> = by_status
            .into_iter()
            .map(|(status, n)| (vec![("node_id", node), ("status", status)], n))
            .collect();
        encode_rows(
            &mut enc,
            "berth_node_instances",
            "Instances on the node by status.",
            None,
            Gauge,
            &status_rows,
        )
    }
}

#[cfg(test)]
mod tests;
