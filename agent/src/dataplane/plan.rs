//! The hub's network view of this node, turned into what each kernel-facing module must hold: pure,
//! so the translation is tested without root.
//!
//! Entries that make no sense (an address that does not parse, a peer without a tunnel address for an
//! encrypted network) are left out and named in [`Plan::problems`]; one bad entry never blocks the rest.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use berth_proto::v1;
use ipnet::Ipv4Net;

use crate::network::{VXLAN_MTU, VXLAN_OVER_WIREGUARD_MTU};

/// A remote instance of a network: where its VXLAN frames go.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteEndpoint {
    /// The instance's address.
    pub ip: Ipv4Addr,
    /// Underlay address of its node: the advertise IP, or the tunnel IP on encrypted networks.
    pub node_ip: Ipv4Addr,
}

/// One network this node takes part in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// Hub id.
    pub network_id: String,
    /// User-facing name (DNS).
    pub name: String,
    /// The network's CIDR.
    pub cidr: Ipv4Net,
    /// Gateway, carried by the bridge on every node.
    pub gateway: Ipv4Addr,
    /// VXLAN id, also the network's id in the eBPF maps.
    pub vni: u32,
    /// VXLAN inside WireGuard.
    pub encrypted: bool,
    /// MTU of its bridge, VXLAN device and veths.
    pub mtu: u32,
    /// Source address of its VXLAN device.
    pub local: Ipv4Addr,
    /// Instances on other nodes, sorted.
    pub remotes: Vec<RemoteEndpoint>,
}

/// Another node reached through WireGuard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPeer {
    /// Its id (for logs).
    pub node_id: String,
    /// Base64 public key.
    pub public_key: String,
    /// Its advertise IP (the WireGuard endpoint's address).
    pub endpoint: Ipv4Addr,
    /// Its tunnel address.
    pub tunnel_ip: Ipv4Addr,
}

/// This node's WireGuard device, needed while an encrypted network is in the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPlan {
    /// The device's address.
    pub address: Ipv4Addr,
    /// Prefix length of the tunnel range (its connected route covers every peer).
    pub prefix_len: u8,
    /// Every peer taking part in an encrypted network of the view.
    pub peers: Vec<TunnelPeer>,
}

/// A DNS name for a replica: `<instance>.<container>.<network>.berth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceName {
    /// Instance id.
    pub instance_id: String,
    /// Container label.
    pub container: String,
    /// Network name.
    pub network: String,
    /// Its address.
    pub ip: Ipv4Addr,
}

/// A service: its VIP, its DNS name and the replicas behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    /// Container label.
    pub name: String,
    /// Network name.
    pub network: String,
    /// The virtual IP.
    pub vip: Ipv4Addr,
    /// Ready replicas' addresses, sorted.
    pub backends: Vec<Ipv4Addr>,
}

/// Everything the node's data plane must hold for one view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Networks, by hub id order.
    pub networks: Vec<NetPlan>,
    /// The WireGuard device, when an encrypted network is in the view.
    pub tunnel: Option<TunnelPlan>,
    /// Services, by VIP order.
    pub services: Vec<ServicePlan>,
    /// Linked pairs of network ids (VNIs), each as (smaller, larger).
    pub links: Vec<(u32, u32)>,
    /// Replica names.
    pub instances: Vec<InstanceName>,
    /// What was left out and why.
    pub problems: Vec<String>,
}

impl Plan {
    /// Translates `view` for the node `node_id` whose underlay address is `advertise_ip`.
    pub fn from_view(view: &v1::NetworkView, node_id: &str, advertise_ip: Ipv4Addr) -> Plan {
        let mut plan = Plan::default();
        let tunnel_ip: Option<Ipv4Addr> = view.tunnel_ip.parse().ok();
        let peers: BTreeMap<&str, &v1::Peer> =
            view.peers.iter().map(|p| (p.node_id.as_str(), p)).collect();

        let mut vni_of: BTreeMap<&str, u32> = BTreeMap::new();
        let mut name_of: BTreeMap<&str, &str> = BTreeMap::new();
        let mut encrypted_peers: BTreeMap<String, TunnelPeer> = BTreeMap::new();
        for net in &view.networks {
            let (Ok(cidr), Ok(gateway)) =
                (net.cidr.parse::<Ipv4Net>(), net.gateway.parse::<Ipv4Addr>())
            else {
                plan.problems.push(format!(
                    "network {}: bad cidr {:?} or gateway {:?}",
                    net.network_id, net.cidr, net.gateway
                ));
                continue;
            };
            if net.vni == 0 || net.vni >= 1 << 24 {
                plan.problems
                    .push(format!("network {}: bad VNI {}", net.network_id, net.vni));
                continue;
            }
            let local = if net.encrypted {
                match tunnel_ip {
                    Some(ip) => ip,
                    None => {
                        plan.problems.push(format!(
                            "network {} is encrypted but this node has no tunnel address yet",
                            net.network_id
                        ));
                        continue;
                    }
                }
            } else {
                advertise_ip
            };
            let mut remotes = Vec::new();
            for e in view
                .endpoints
                .iter()
                .filter(|e| e.network_id == net.network_id && e.node_id != node_id)
            {
                let Ok(ip) = e.ip.parse::<Ipv4Addr>() else {
                    plan.problems
                        .push(format!("instance {}: bad ip {:?}", e.instance_id, e.ip));
                    continue;
                };
                let Some(peer) = peers.get(e.node_id.as_str()) else {
                    plan.problems.push(format!(
                        "instance {}: node {} is not among the peers",
                        e.instance_id, e.node_id
                    ));
                    continue;
                };
                let node_ip = if net.encrypted {
                    match tunnel_peer(peer) {
                        Ok(tp) => {
                            let ip = tp.tunnel_ip;
                            encrypted_peers.insert(tp.node_id.clone(), tp);
                            ip
                        }
                        Err(why) => {
                            plan.problems.push(why);
                            continue;
                        }
                    }
                } else {
                    match peer.advertise_ip.parse::<Ipv4Addr>() {
                        Ok(ip) => ip,
                        Err(_) => {
                            plan.problems.push(format!(
                                "node {}: bad advertise ip {:?}",
                                peer.node_id, peer.advertise_ip
                            ));
                            continue;
                        }
                    }
                };
                remotes.push(RemoteEndpoint { ip, node_ip });
            }
            remotes.sort();
            remotes.dedup();
            vni_of.insert(net.network_id.as_str(), net.vni);
            name_of.insert(net.network_id.as_str(), net.name.as_str());
            plan.networks.push(NetPlan {
                network_id: net.network_id.clone(),
                name: net.name.clone(),
                cidr,
                gateway,
                vni: net.vni,
                encrypted: net.encrypted,
                mtu: if net.encrypted {
                    VXLAN_OVER_WIREGUARD_MTU
                } else {
                    VXLAN_MTU
                },
                local,
                remotes,
            });
        }
        plan.networks
            .sort_by(|a, b| a.network_id.cmp(&b.network_id));

        if plan.networks.iter().any(|n| n.encrypted) {
            if let Some(address) = tunnel_ip {
                plan.tunnel = Some(TunnelPlan {
                    address,
                    prefix_len: u8::try_from(view.tunnel_prefix_len)
                        .ok()
                        .filter(|p| (1..=32).contains(p))
                        .unwrap_or(16),
                    peers: encrypted_peers.into_values().collect(),
                });
            }
        }

        for net in &view.networks {
            for linked in &net.linked_network_ids {
                if let (Some(&a), Some(&b)) = (
                    vni_of.get(net.network_id.as_str()),
                    vni_of.get(linked.as_str()),
                ) {
                    plan.links.push((a.min(b), a.max(b)));
                }
            }
        }
        plan.links.sort();
        plan.links.dedup();

        for svc in &view.services {
            let Some(network) = name_of.get(svc.network_id.as_str()) else {
                continue;
            };
            let Ok(vip) = svc.vip.parse::<Ipv4Addr>() else {
                plan.problems.push(format!(
                    "service {}: bad vip {:?}",
                    svc.container_id, svc.vip
                ));
                continue;
            };
            let mut backends: Vec<Ipv4Addr> = view
                .endpoints
                .iter()
                .filter(|e| e.ready && e.container_id == svc.container_id)
                .filter_map(|e| e.ip.parse().ok())
                .collect();
            backends.sort();
            backends.dedup();
            plan.services.push(ServicePlan {
                name: svc.name.clone(),
                network: (*network).to_owned(),
                vip,
                backends,
            });
        }
        plan.services.sort_by_key(|s| s.vip);

        for e in &view.endpoints {
            let (Some(network), Ok(ip)) =
                (name_of.get(e.network_id.as_str()), e.ip.parse::<Ipv4Addr>())
            else {
                continue;
            };
            plan.instances.push(InstanceName {
                instance_id: e.instance_id.clone(),
                container: e.container_name.clone(),
                network: (*network).to_owned(),
                ip,
            });
        }
        plan
    }

    /// The network with this hub id.
    pub fn network(&self, network_id: &str) -> Option<&NetPlan> {
        self.networks.iter().find(|n| n.network_id == network_id)
    }
}

fn tunnel_peer(peer: &v1::Peer) -> Result<TunnelPeer, String> {
    let endpoint = peer.advertise_ip.parse::<Ipv4Addr>().map_err(|_| {
        format!(
            "node {}: bad advertise ip {:?}",
            peer.node_id, peer.advertise_ip
        )
    })?;
    let tunnel_ip = peer.tunnel_ip.parse::<Ipv4Addr>().map_err(|_| {
        format!(
            "node {}: no tunnel address for an encrypted network",
            peer.node_id
        )
    })?;
    if peer.wireguard_public_key.is_empty() {
        return Err(format!(
            "node {}: no WireGuard key for an encrypted network",
            peer.node_id
        ));
    }
    Ok(TunnelPeer {
        node_id: peer.node_id.clone(),
        public_key: peer.wireguard_public_key.clone(),
        endpoint,
        tunnel_ip,
    })
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
