//! What each node's data plane must know, computed from one snapshot: the networks it takes part in,
//! where their instances live, the services (virtual IPs) it routes, and the peers it tunnels to.
//!
//! A node takes part in the networks it hosts instances of, and in the networks linked to those (so
//! routed traffic between linked networks finds the other network's overlay on every node that needs
//! it). The leader writes each node's view under `/berth/netview/{node}` when it changes; the node's
//! desired-state stream carries it. Pure functions, unit-tested here.

use std::collections::{BTreeMap, BTreeSet};

use berth_proto::v1;

use crate::service::view::{dns_label, instance_status};
use crate::store::Snapshot;

/// The view of every registered node, by node id. Deterministic (sorted) so that an unchanged view
/// encodes to the same bytes and is not rewritten.
pub fn compute(snap: &Snapshot, tunnel_prefix_len: u8) -> BTreeMap<String, v1::NetworkView> {
    // Networks each node hosts instances of (stopping ones still run until their node removes them).
    let mut hosted: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for inst in snap.all_instances() {
        let r = &inst.record.value;
        if !r.node_id.is_empty() {
            hosted
                .entry(r.node_id.as_str())
                .or_default()
                .insert(r.network_id.as_str());
        }
    }
    snap.nodes
        .keys()
        .map(|node_id| {
            let local = hosted.get(node_id.as_str()).cloned().unwrap_or_default();
            (
                node_id.clone(),
                view_of(snap, node_id, &local, tunnel_prefix_len),
            )
        })
        .collect()
}

fn view_of(
    snap: &Snapshot,
    node_id: &str,
    local: &BTreeSet<&str>,
    tunnel_prefix_len: u8,
) -> v1::NetworkView {
    let mut in_view: BTreeSet<&str> = BTreeSet::new();
    for net_id in local {
        if let Some(net) = snap.networks.get(*net_id) {
            in_view.insert(net_id);
            in_view.extend(
                net.value
                    .links
                    .iter()
                    .map(String::as_str)
                    .filter(|l| snap.networks.contains_key(*l)),
            );
        }
    }
    let networks: Vec<v1::OverlayNetwork> = in_view
        .iter()
        .filter_map(|id| snap.networks.get(*id))
        .map(|n| {
            let n = &n.value;
            v1::OverlayNetwork {
                network_id: n.network_id.clone(),
                name: n.name.clone(),
                cidr: n.cidr.clone(),
                gateway: n.gateway.clone(),
                vni: n.vni,
                encrypted: n.encrypted,
                // Only links the node can act on: the other side is in its view too.
                linked_network_ids: n
                    .links
                    .iter()
                    .filter(|l| in_view.contains(l.as_str()))
                    .cloned()
                    .collect(),
            }
        })
        .collect();

    let mut endpoints = Vec::new();
    let mut peer_ids: BTreeSet<&str> = BTreeSet::new();
    let mut services = Vec::new();
    for container in snap.containers.values() {
        let c = &container.value;
        if !in_view.contains(c.network_id.as_str()) {
            continue;
        }
        let label = dns_label(c).to_owned();
        if !c.service_ip.is_empty() {
            services.push(v1::Service {
                container_id: c.container_id.clone(),
                name: label.clone(),
                network_id: c.network_id.clone(),
                vip: c.service_ip.clone(),
            });
        }
        for inst in snap.instances_of(&c.container_id) {
            let r = &inst.record.value;
            if r.node_id.is_empty() || r.ip.is_empty() {
                continue;
            }
            let (status, _) = instance_status(inst);
            let ready = status == "RUNNING"
                && !r.stopping
                && !c.deleting
                && snap.alive.contains(&r.node_id);
            if r.node_id != node_id {
                peer_ids.insert(r.node_id.as_str());
            }
            endpoints.push(v1::Endpoint {
                instance_id: r.instance_id.clone(),
                container_id: c.container_id.clone(),
                container_name: label.clone(),
                network_id: r.network_id.clone(),
                ip: r.ip.clone(),
                node_id: r.node_id.clone(),
                ready,
            });
        }
    }
    endpoints.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    services.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    let peers = peer_ids
        .iter()
        .filter_map(|id| snap.nodes.get(*id))
        .map(|n| v1::Peer {
            node_id: n.value.node_id.clone(),
            advertise_ip: n.value.ip.clone(),
            tunnel_ip: n.value.tunnel_ip.clone(),
            wireguard_public_key: n.value.wireguard_public_key.clone(),
        })
        .collect();
    v1::NetworkView {
        networks,
        endpoints,
        services,
        peers,
        tunnel_ip: snap
            .nodes
            .get(node_id)
            .map(|n| n.value.tunnel_ip.clone())
            .unwrap_or_default(),
        tunnel_prefix_len: u32::from(tunnel_prefix_len),
    }
}

#[cfg(test)]
#[path = "netview_tests.rs"]
mod tests;
