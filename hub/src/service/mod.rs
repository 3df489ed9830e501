//! Domain operations shared by the REST and gRPC edges: one code path, one error type.
//!
//! Requests come in as the small input structs below (each edge converts its wire form into them) and
//! answers go out as `berth_proto::v1` messages, which REST turns into JSON at its edge.

pub mod actions;
mod agent;
mod containers;
mod drain;
pub mod endpoints;
mod error;
pub mod lifecycle;
pub mod migrations;
mod networks;
mod nodes;
pub mod revisions;
pub mod validate;
pub mod view;

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::Ipv4Net;
use rand::RngCore;

use crate::ca::ClusterCa;
use crate::events::{Events, EventsConfig};
use crate::store::records::HealthRecord;
use crate::store::Store;

pub use error::ServiceError;
pub use networks::{network_to_proto, DEFAULT_NETWORK_CIDR, DEFAULT_NETWORK_NAME};
pub use view::{STATUS_DELETING, STATUS_DEPLOYING};

/// Status answered by a scale request.
pub const STATUS_SCALING: &str = "SCALING";

/// Seconds between heartbeats the hub asks agents for.
pub const HEARTBEAT_INTERVAL_SECS: u32 = 1;
/// TTL of a node's liveness lease: a node is UNHEALTHY this long after its last heartbeat (three
/// heartbeats may be lost before that).
pub const NODE_LEASE_TTL_SECS: i64 = 3;
/// How long a node stays UNHEALTHY before it is DOWN and its instances are rescheduled elsewhere:
/// with the lease TTL, a dead node's replicas are placed again about 5 s after its last heartbeat.
pub const NODE_DOWN_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Input of [`Service::create_container`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateContainer {
    /// Image reference (required).
    pub image: String,
    /// cpu quantity; empty: [`validate::DEFAULT_CPU`].
    pub cpu: String,
    /// memory quantity; empty: [`validate::DEFAULT_MEMORY`].
    pub memory: String,
    /// Network id or name; empty: the default network.
    pub network_id: String,
    /// Replica count; `None`: 1.
    pub replicas: Option<i64>,
    /// Optional unique name.
    pub name: String,
    /// Replaces the image's entrypoint and cmd when non-empty.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// "always", "on-failure" or "never"; empty: "always".
    pub restart_policy: String,
    /// With "on-failure": restarts allowed per instance; `None`: no limit.
    pub max_restarts: Option<i64>,
    /// Health probe (defaults not yet filled in).
    pub health: Option<HealthRecord>,
    /// "SIGTERM", "TERM", "15"; empty: the image's.
    pub stop_signal: String,
    /// "10s"; empty: the default.
    pub stop_timeout: String,
}

/// Input of [`Service::update_container`]: `None` keeps a field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateContainer {
    /// New image reference.
    pub image: Option<String>,
    /// New cpu quantity.
    pub cpu: Option<String>,
    /// New memory quantity.
    pub memory: Option<String>,
    /// Replaces the whole environment.
    pub env: Option<BTreeMap<String, String>>,
    /// Replaces the command (empty: the image's).
    pub command: Option<Vec<String>>,
    /// Replicas out of service at once (0: 1).
    pub max_unavailable: i64,
}

/// Input of [`Service::register_node`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterNode {
    /// As the agent calls itself.
    pub node_id: String,
    /// The agent's host name.
    pub hostname: String,
    /// Address the node is reachable on.
    pub advertise_ip: String,
    /// Capacity offered.
    pub cpu_millis: u64,
    /// Capacity offered.
    pub memory_bytes: u64,
    /// Base64 WireGuard public key (may be empty: the node then takes no part in encrypted networks).
    pub wireguard_public_key: String,
    /// `host:port` of the agent API (logs, stats); may be empty.
    pub api_addr: String,
    /// PKCS#10 request (PEM) for the node's key; empty when the node wants no certificate.
    pub csr_pem: String,
    /// `host:port` of the agent's migration endpoint; may be empty.
    pub migration_addr: String,
}

/// Address ranges of the cluster's data plane. Every hub replica must be started with the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// Where service (virtual) IPs come from. They never appear on a wire: the nodes' eBPF rewrites them.
    pub service_cidr: Ipv4Net,
    /// Where the nodes' WireGuard addresses come from.
    pub tunnel_cidr: Ipv4Net,
}

/// Default of `--service-cidr`.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/16";
/// Default of `--tunnel-cidr`.
pub const DEFAULT_TUNNEL_CIDR: &str = "10.201.0.0/16";

impl Default for NetConfig {
    fn default() -> Self {
        // Both constants are valid /16s (a unit test checks they parse).
        NetConfig {
            service_cidr: DEFAULT_SERVICE_CIDR.parse().unwrap_or_default(),
            tunnel_cidr: DEFAULT_TUNNEL_CIDR.parse().unwrap_or_default(),
        }
    }
}

/// The hub's operations over etcd. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Service {
    store: Store,
    net: NetConfig,
    events: Events,
    /// Signs node certificates at registration; `None` in tests that need none.
    ca: Option<Arc<ClusterCa>>,
}

impl Service {
    /// A service over `store` with the default address ranges.
    pub fn new(store: Store) -> Self {
        Self::with_config(store, NetConfig::default())
    }

    /// A service over `store` with the given address ranges.
    pub fn with_config(store: Store, net: NetConfig) -> Self {
        let events = Events::new(store.clone(), EventsConfig::default());
        Service {
            store,
            net,
            events,
            ca: None,
        }
    }

    /// Signs the keys nodes send at registration with the cluster CA.
    pub fn with_ca(mut self, ca: Arc<ClusterCa>) -> Self {
        self.ca = Some(ca);
        self
    }

    /// Records state changes through `events` (shared with the reconciler, `--event-ttl`).
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// The event log writer.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// The address ranges this hub hands out from.
    pub fn net_config(&self) -> NetConfig {
        self.net
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// A fresh random id: `prefix` + `-` + 12 hex digits.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// Now in RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// How many times an optimistic write is retried when a concurrent change wins the race.
const CONFLICT_RETRIES: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_12_hex() {
        let id = new_id("ctr");
        assert_eq!(id.len(), 16);
        assert!(id.starts_with("ctr-"));
        assert!(id[4..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(new_id("ctr"), id);
    }

    #[test]
    fn default_ranges_parse() {
        let net = NetConfig::default();
        assert_eq!(net.service_cidr.to_string(), DEFAULT_SERVICE_CIDR);
        assert_eq!(net.tunnel_cidr.to_string(), DEFAULT_TUNNEL_CIDR);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now_rfc3339();
        time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).unwrap();
    }
}
