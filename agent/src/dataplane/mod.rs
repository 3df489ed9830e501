//! The node's data plane as a whole: applies the hub's network view to the overlays (`network`), the
//! WireGuard device (`network::wireguard`), the eBPF maps (`ebpf`) and the DNS server (`dns`).
//!
//! The view arrives with every desired state; [`NodeDataPlane::run`] applies the newest one at once
//! and again every [`RESYNC`] (so a failed step is retried and a kernel object removed behind the
//! agent's back comes back). Each step converges from what the kernel holds, not from memory, so a
//! restarted agent picks up where the last one stopped. Bridges and VXLAN devices of networks that
//! left the view are removed here, and only here, under the same lock as instance plumbing: a veth
//! is never plugged into a bridge being deleted.
//!
//! Instances meet the data plane twice: [`NodeDataPlane::attach_instance`] puts the policy/counter
//! filters on a new veth before its process starts, [`NodeDataPlane::detach_instance`] takes them off.

pub mod plan;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1;
use tokio::sync::{watch, Mutex};
use tracing::{debug, info, warn};

use crate::dns::{DnsServer, Records};
use crate::ebpf::{DataPlane as Ebpf, EbpfError};
use crate::network::wireguard::{self, NodeKey, WireguardConfig, WireguardDevice};
use crate::network::{NetworkManager, NetworkPlan, Remote, VXLAN_MTU, VXLAN_OVER_WIREGUARD_MTU};
use plan::Plan;

/// How often the last view is applied again without a change.
pub const RESYNC: Duration = Duration::from_secs(10);

/// Static settings of the node's data plane.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// This node's id.
    pub node_id: String,
    /// Underlay address (VXLAN source for plain networks, WireGuard endpoint).
    pub advertise_ip: Ipv4Addr,
    /// UDP port of the WireGuard device (every node uses the same).
    pub wireguard_port: u16,
    /// Port the DNS server listens on at each network's gateway.
    pub dns_port: u16,
}

/// What the last apply left in place.
#[derive(Debug, Default)]
struct Applied {
    /// Networks whose bridge and VXLAN device this node holds.
    networks: BTreeSet<String>,
    /// Whether the last apply had no error.
    clean: bool,
}

/// The node's data plane. Shared (`Arc`) by the view loop and the instance host.
pub struct NodeDataPlane {
    cfg: DataPlaneConfig,
    network: Arc<NetworkManager>,
    /// Held across bridge creation + veth plumbing (host) and bridge removal (here).
    plumbing: Arc<Mutex<()>>,
    ebpf: std::sync::Mutex<Option<Ebpf>>,
    key: NodeKey,
    wireguard: Mutex<Option<WireguardDevice>>,
    dns: DnsServer,
    applied: Mutex<Applied>,
}

impl std::fmt::Debug for NodeDataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDataPlane")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// The MTU of an instance's network: VXLAN, or VXLAN inside WireGuard.
pub fn network_mtu(encrypted: bool) -> u32 {
    if encrypted {
        VXLAN_OVER_WIREGUARD_MTU
    } else {
        VXLAN_MTU
    }
}

impl NodeDataPlane {
    /// Assembles the data plane from its loaded parts.
    pub fn new(
        cfg: DataPlaneConfig,
        network: Arc<NetworkManager>,
        plumbing: Arc<Mutex<()>>,
        ebpf: Ebpf,
        key: NodeKey,
        dns: DnsServer,
    ) -> Self {
        Self {
            cfg,
            network,
            plumbing,
            ebpf: std::sync::Mutex::new(Some(ebpf)),
            key,
            wireguard: Mutex::new(None),
            dns,
            applied: Mutex::new(Applied::default()),
        }
    }

    /// The node's WireGuard public key (published at registration).
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    fn with_ebpf<T>(&self, f: impl FnOnce(&mut Ebpf) -> Result<T, EbpfError>) -> Result<T, String> {
        let mut guard = self
            .ebpf
            .lock()
            .map_err(|_| "ebpf state poisoned by an earlier panic".to_owned())?;
        match guard.as_mut() {
            Some(ebpf) => f(ebpf).map_err(|e| e.to_string()),
            None => Err("the eBPF data plane was unloaded".to_owned()),
        }
    }

    /// Puts the policy and counter filters on an instance's host-side veth (before its process
    /// starts, so its first packet is judged).
    pub fn attach_instance(&self, veth: &str, network_vni: u32) -> Result<u32, String> {
        self.with_ebpf(|e| e.attach_iface(veth, network_vni))
    }

    /// Takes the filters off an instance's veth (if it still exists) and forgets its counters.
    pub fn detach_instance(&self, veth: &str) -> Result<(), String> {
        match crate::ebpf::sys::if_index(veth) {
            Ok(ifindex) => self.with_ebpf(|e| e.detach_iface(ifindex)),
            // Gone already: the periodic sweep drops its map entries.
            Err(_) => Ok(()),
        }
    }

    /// Packet and byte counters of an instance's veth.
    pub fn counters(&self, veth: &str) -> Result<crate::ebpf::Counters, String> {
        let ifindex = crate::ebpf::sys::if_index(veth).map_err(|e| e.to_string())?;
        self.with_ebpf(|e| e.counters(ifindex))
    }

    /// Applies the newest view whenever it changes, and every [`RESYNC`]; ends when the sender goes.
    pub async fn run(self: Arc<Self>, mut desired: watch::Receiver<Option<v1::DesiredState>>) {
        let mut last: Option<v1::NetworkView> = None;
        loop {
            let view = desired
                .borrow_and_update()
                .as_ref()
                .map(|d| d.network_view.clone().unwrap_or_default());
            if let Some(view) = view {
                let changed = last.as_ref() != Some(&view);
                let started = std::time::Instant::now();
                let result = self.apply(&view).await;
                match &result {
                    Ok(()) if changed => {
                        info!(
                            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                            networks = view.networks.len(),
                            services = view.services.len(),
                            endpoints = view.endpoints.len(),
                            "network view applied"
                        )
                    }
                    Ok(()) => {}
                    Err(errors) => {
                        warn!(errors = %errors.join("; "), "network view partly applied; retrying")
                    }
                }
                last = Some(view);
            }
            let retry = if self.applied.lock().await.clean {
                RESYNC
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(retry) => {}
            }
        }
    }

    /// Makes the node's data plane match `view`. Every step runs even when an earlier one failed;
    /// the errors come back together.
    pub async fn apply(&self, view: &v1::NetworkView) -> Result<(), Vec<String>> {
        let plan = Plan::from_view(view, &self.cfg.node_id, self.cfg.advertise_ip);
        for problem in &plan.problems {
            warn!(problem = %problem, "left out of the network view");
        }
        let mut errors = Vec::new();
        if let Err(e) = self.apply_tunnel(&plan).await {
            errors.push(e);
        }
        let mut applied = self.applied.lock().await;
        if let Err(e) = self.network.ensure_forwarding().await {
            errors.push(format!("ip forwarding: {e}"));
        }
        for net in &plan.networks {
            let result = async {
                let spec = NetworkPlan {
                    network_id: net.network_id.clone(),
                    gateway: net.gateway,
                    prefix_len: net.cidr.prefix_len(),
                    mtu: net.mtu,
                };
                {
                    let _plumbing = self.plumbing.lock().await;
                    self.network.ensure_bridge(&spec).await?;
                    self.network
                        .ensure_vxlan(&net.network_id, net.vni, net.local, net.mtu)
                        .await?;
                }
                let remotes: Vec<Remote> = net
                    .remotes
                    .iter()
                    .map(|r| Remote {
                        ip: r.ip,
                        node_ip: r.node_ip,
                    })
                    .collect();
                self.network.sync_remotes(&net.network_id, &remotes).await
            }
            .await;
            match result {
                Ok(changes) => {
                    applied.networks.insert(net.network_id.clone());
                    if changes.updated + changes.removed > 0 {
                        debug!(network_id = %net.network_id, ?changes, "overlay entries synced");
                    }
                }
                Err(e) => errors.push(format!("network {}: {e}", net.network_id)),
            }
        }
        // Networks that left the view: their overlay goes, their bridge too once no veth is left.
        let wanted: BTreeSet<String> = plan.networks.iter().map(|n| n.network_id.clone()).collect();
        let stale: Vec<String> = applied.networks.difference(&wanted).cloned().collect();
        for network_id in stale {
            let _plumbing = self.plumbing.lock().await;
            let result = async {
                self.network.remove_vxlan(&network_id).await?;
                self.network.remove_bridge_if_unused(&network_id).await
            }
            .await;
            match result {
                Ok(removed) => {
                    if removed {
                        info!(network_id = %network_id, "network left this node");
                    }
                    applied.networks.remove(&network_id);
                }
                Err(e) => errors.push(format!("removing network {network_id}: {e}")),
            }
        }

        // Left by an earlier agent process for networks that went while it was away.
        {
            let keep: Vec<String> = wanted.iter().cloned().collect();
            let _plumbing = self.plumbing.lock().await;
            if let Err(e) = self.network.remove_orphans(&keep).await {
                errors.push(format!("removing orphan links: {e}"));
            }
        }

        let cidrs: Vec<(ipnet::Ipv4Net, u32)> =
            plan.networks.iter().map(|n| (n.cidr, n.vni)).collect();
        let services: Vec<(Ipv4Addr, Vec<Ipv4Addr>)> = plan
            .services
            .iter()
            .map(|s| (s.vip, s.backends.clone()))
            .collect();
        if let Err(e) = self.with_ebpf(|ebpf| {
            ebpf.set_networks(&cidrs)?;
            ebpf.set_links(&plan.links)?;
            ebpf.set_services(&services)?;
            sweep_ifaces(ebpf)
        }) {
            errors.push(format!("ebpf: {e}"));
        }

        let mut records = Records::new();
        for s in &plan.services {
            if let Err(e) = records.add_service(&s.name, &s.network, s.vip) {
                warn!(error = %e, "service left out of DNS");
            }
        }
        for i in &plan.instances {
            if let Err(e) = records.add_instance(&i.instance_id, &i.container, &i.network, i.ip) {
                warn!(error = %e, "instance left out of DNS");
            }
        }
        self.dns.set_records(records);
        let listeners: Vec<SocketAddr> = plan
            .networks
            .iter()
            .filter(|n| applied.networks.contains(&n.network_id))
            .map(|n| SocketAddr::from((n.gateway, self.cfg.dns_port)))
            .collect();
        if let Err(e) = self.dns.ensure_listeners(&listeners).await {
            errors.push(format!("dns: {e}"));
        }
        applied.clean = errors.is_empty();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    async fn apply_tunnel(&self, plan: &Plan) -> Result<(), String> {
        let mut device = self.wireguard.lock().await;
        let Some(tunnel) = &plan.tunnel else {
            if let Some(dev) = device.take() {
                dev.remove()
                    .await
                    .map_err(|e| format!("removing the WireGuard device: {e}"))?;
                info!("WireGuard device removed: no encrypted network left");
            }
            return Ok(());
        };
        let mut config = WireguardConfig::new(
            wireguard::device_name(&self.cfg.node_id),
            tunnel.address,
            tunnel.prefix_len,
        );
        config.listen_port = self.cfg.wireguard_port;
        match device.as_ref() {
            None => {
                let dev = WireguardDevice::ensure(&config, &self.key)
                    .await
                    .map_err(|e| format!("WireGuard device: {e}"))?;
                info!(name = %dev.name(), backend = %dev.backend(), address = %tunnel.address,
                    "WireGuard device up");
                *device = Some(dev);
            }
            // Re-applied every time: a changed tunnel address or port reaches the running device,
            // and an address removed behind our back comes back.
            Some(dev) => dev
                .reconfigure(&config)
                .await
                .map_err(|e| format!("WireGuard device: {e}"))?,
        }
        let peers: Vec<wireguard::Peer> = tunnel
            .peers
            .iter()
            .map(|p| wireguard::Peer {
                public_key: p.public_key.clone(),
                endpoint: SocketAddr::from((p.endpoint, self.cfg.wireguard_port)),
                tunnel_ip: p.tunnel_ip,
                persistent_keepalive: None,
            })
            .collect();
        if let Some(dev) = device.as_ref() {
            dev.set_peers(&peers)
                .map_err(|e| format!("WireGuard peers: {e}"))?;
        }
        Ok(())
    }

    /// Stops the data plane. With no instance left on the node everything goes (filters, cgroup
    /// programs, pins, the WireGuard device, the DNS listeners); otherwise the eBPF programs and
    /// maps stay pinned so the running containers keep their service routing and policy until the
    /// next agent process adopts them.
    pub async fn shutdown(&self, instances_left: bool) {
        self.dns.shutdown().await;
        if let Some(dev) = self.wireguard.lock().await.take() {
            if let Err(e) = dev.remove().await {
                warn!(error = %e, "removing the WireGuard device");
            }
        }
        if instances_left {
            info!("instances still run: eBPF programs stay attached for them");
            return;
        }
        let ebpf = match self.ebpf.lock() {
            Ok(mut guard) => guard.take(),
            Err(_) => None,
        };
        if let Some(ebpf) = ebpf {
            let cgroup: PathBuf = ebpf.cgroup_dir().to_owned();
            match ebpf.unload() {
                Ok(()) => info!("eBPF data plane unloaded"),
                Err(e) => warn!(error = %e, "unloading the eBPF data plane"),
            }
            match std::fs::remove_dir(&cgroup) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %cgroup.display(), error = %e, "removing the node's cgroup2 group")
                }
            }
        }
        // Bridges and VXLAN devices have no instance left on them: remove them too.
        let networks: Vec<String> = self.applied.lock().await.networks.iter().cloned().collect();
        for network_id in networks {
            let _plumbing = self.plumbing.lock().await;
            if let Err(e) = self.network.remove_vxlan(&network_id).await {
                warn!(network_id, error = %e, "removing a VXLAN device");
            }
            if let Err(e) = self.network.remove_bridge_if_unused(&network_id).await {
                warn!(network_id, error = %e, "removing a bridge");
            }
        }
    }
}

/// Drops the map entries of veths that no longer exist (an instance removed while the agent was
/// down, or whose detach failed).
fn sweep_ifaces(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    for (ifindex, _) in ebpf.ifaces()? {
        if crate::ebpf::sys::if_name(ifindex).is_none() {
            ebpf.detach_iface(ifindex)?;
        }
    }
    Ok(())
}
