//! The VXLAN overlay of a berth network across nodes.
//!
//! Each node with an instance of an overlay network adds a VXLAN device `bx…` (one VNI per
//! network, UDP 4789, sourced from the node's underlay address) as a port of the network's
//! bridge. The device has no default remote and learns nothing: it sends a frame only where an
//! FDB entry says, and answers ARP itself (`proxy`) from its neighbour table. Both tables are
//! programmed from the hub's view of the network's remote instances by
//! [`NetworkManager::sync_remotes`], which needs nothing but each instance's IP and node,
//! because an instance's MAC follows from its IP ([`instance_mac`]). So there is no multicast
//! and no flooding across nodes.
//!
//! Per remote instance, three kernel entries:
//! - on the VXLAN device, FDB `mac → dst node` (`NTF_SELF`, permanent): where to tunnel to;
//! - on the bridge, FDB `mac → the VXLAN port` (`NTF_MASTER`, static): the bridge port has
//!   learning off, so without it every frame to a remote instance would be flooded to every
//!   local veth too;
//! - on the VXLAN device, neighbour `ip → mac` (permanent): what the ARP proxy answers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use tracing::{debug, info, instrument, warn};

use super::{
    bridge_name, check_mtu, instance_mac, short_id, BridgePortFlags, FdbEntry, Link, LinkKind,
    Neighbour, Netlink, NetworkError, NetworkManager, VxlanParams,
};

#[cfg(test)]
mod tests;

/// The IANA VXLAN port every berth VXLAN device sends to and listens on.
pub const VXLAN_PORT: u16 = 4789;

/// How the VXLAN device sits in the bridge: no learning (the bridge gets static entries
/// instead) and ARP for remote instances kept off the port when the bridge can answer it.
const PORT_FLAGS: BridgePortFlags = BridgePortFlags {
    learning: false,
    neigh_suppress: true,
};

/// An instance of the network on another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    /// The instance's address in the network.
    pub ip: Ipv4Addr,
    /// The underlay (advertise) address of its node.
    pub node_ip: Ipv4Addr,
}

/// What one [`NetworkManager::sync_remotes`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncChanges {
    /// Entries added or replaced (FDB and neighbour).
    pub updated: usize,
    /// Entries deleted.
    pub removed: usize,
}

/// Name of the VXLAN device of a berth network on every node: `bx` and the same 12 hex digits as
/// its bridge.
pub fn vxlan_name(network_id: &str) -> String {
    format!("bx{}", short_id(network_id, "net-"))
}

/// The kernel changes that make a VXLAN device's entries equal to a set of remotes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SyncPlan {
    /// The device's own FDB entries to delete whole before adding them back (MACs with several
    /// destinations, which a replace would only partly rewrite).
    pub fdb_reset: Vec<FdbEntry>,
    /// FDB entries to add or replace, the device's own before the bridge's.
    pub fdb_replace: Vec<FdbEntry>,
    /// Neighbour entries to add or replace.
    pub neigh_replace: Vec<Neighbour>,
    /// Neighbour entries to delete, by IP.
    pub neigh_del: Vec<Ipv4Addr>,
    /// FDB entries to delete (the whole entry of the MAC, of the entry's kind).
    pub fdb_del: Vec<FdbEntry>,
}

impl SyncPlan {
    /// Computes the changes from the wanted `remotes` (IP → node, local ones already left out)
    /// and what the kernel holds now.
    pub(crate) fn new(
        remotes: &BTreeMap<Ipv4Addr, Ipv4Addr>,
        fdb: &[FdbEntry],
        neighbours: &[Neighbour],
    ) -> Self {
        let mut plan = Self::default();
        // The device's own entries by MAC: several destinations for one MAC can exist (an
        // `append` by someone), and a replace would only rewrite the first.
        let mut tunnels: BTreeMap<[u8; 6], Vec<Ipv4Addr>> = BTreeMap::new();
        let mut ported: BTreeSet<[u8; 6]> = BTreeSet::new();
        for entry in fdb {
            match entry.dst {
                Some(dst) => tunnels.entry(entry.mac).or_default().push(dst),
                None => {
                    ported.insert(entry.mac);
                }
            }
        }
        let current_neighbours: BTreeMap<Ipv4Addr, Vec<[u8; 6]>> =
            neighbours.iter().fold(BTreeMap::new(), |mut map, n| {
                map.entry(n.ip).or_insert_with(Vec::new).push(n.mac);
                map
            });

        let mut wanted_macs = BTreeSet::new();
        for (&ip, &node) in remotes {
            let mac = instance_mac(ip);
            wanted_macs.insert(mac);
            match tunnels.get(&mac).map(Vec::as_slice) {
                Some([dst]) if *dst == node => {}
                Some([_]) | None => plan.fdb_replace.push(FdbEntry {
                    mac,
                    dst: Some(node),
                }),
                Some(_) => {
                    let entry = FdbEntry {
                        mac,
                        dst: Some(node),
                    };
                    plan.fdb_reset.push(entry);
                    plan.fdb_replace.push(entry);
                }
            }
            if !ported.contains(&mac) {
                plan.fdb_replace.push(FdbEntry { mac, dst: None });
            }
            if current_neighbours.get(&ip).map(Vec::as_slice) != Some(&[mac]) {
                plan.neigh_replace.push(Neighbour { ip, mac });
            }
        }
        // Self entries first: a bridge entry must not send frames to a port that cannot
        // tunnel them yet.
        plan.fdb_replace.sort_by_key(|e| e.dst.is_none());

        plan.neigh_del = current_neighbours
            .keys()
            .filter(|ip| !remotes.contains_key(ip))
            .copied()
            .collect();
        // Bridge entries first, the reverse of adding.
        plan.fdb_del.extend(
            ported
                .iter()
                .filter(|mac| !wanted_macs.contains(*mac))
                .map(|&mac| FdbEntry { mac, dst: None }),
        );
        plan.fdb_del.extend(
            tunnels
                .iter()
                .filter(|(mac, _)| !wanted_macs.contains(*mac))
                .filter_map(|(&mac, dsts)| {
                    dsts.first().map(|&dst| FdbEntry {
                        mac,
                        dst: Some(dst),
                    })
                }),
        );
        plan
    }

    fn is_empty(&self) -> bool {
        self.fdb_reset.is_empty()
            && self.fdb_replace.is_empty()
            && self.neigh_replace.is_empty()
            && self.neigh_del.is_empty()
            && self.fdb_del.is_empty()
    }
}

impl<N: Netlink> NetworkManager<N> {
    /// Makes sure the network's VXLAN device exists with `vni`, source address `local`,
    /// destination port [`VXLAN_PORT`], learning off and ARP proxy on, has `mtu` (the network's:
    /// the bridge and veths have the same), is a port of the network's bridge (learning off,
    /// neigh_suppress on) and is up; returns its name.
    ///
    /// The bridge must exist ([`Self::ensure_bridge`]). Idempotent. A device of that name with
    /// another VNI, local address, port or learning/proxy setting is deleted and made again, and
    /// its entries go with it: call [`Self::sync_remotes`] after this, always.
    #[instrument(skip(self), err)]
    pub async fn ensure_vxlan(
        &self,
        network_id: &str,
        vni: u32,
        local: Ipv4Addr,
        mtu: u32,
    ) -> Result<String, NetworkError> {
        if !(1..=0x00ff_ffff).contains(&vni) {
            return Err(NetworkError::InvalidVni { vni });
        }
        check_mtu(mtu)?;
        let _shared = self.bridges.read().await;
        let _overlay = self.overlay.lock().await;
        let bridge = self.existing_bridge(network_id).await?;
        let name = vxlan_name(network_id);
        let params = VxlanParams {
            vni,
            local: Some(local),
            port: VXLAN_PORT,
            learning: false,
            proxy: true,
        };

        let existing = match self.netlink.link_get(&name).await? {
            Some(link) => match link.kind {
                LinkKind::Vxlan(found) if found == params => Some(link),
                LinkKind::Vxlan(found) => {
                    warn!(vxlan = %name, ?found, wanted = ?params, "replacing vxlan with other settings");
                    self.delete_link(link.index).await?;
                    None
                }
                _ => return Err(NetworkError::NotAVxlan { name }),
            },
            None => None,
        };
        let vxlan = match existing {
            Some(link) => link,
            None => {
                self.netlink.link_add_vxlan(&name, params, mtu).await?;
                info!(vxlan = %name, network_id, vni, %local, "created vxlan");
                self.netlink
                    .link_get(&name)
                    .await?
                    .ok_or_else(|| NetworkError::LinkMissing { name: name.clone() })?
            }
        };

        if vxlan.mtu != mtu {
            self.netlink.link_set_mtu(vxlan.index, mtu).await?;
        }
        if vxlan.master != Some(bridge.index) {
            self.netlink
                .link_set_master(vxlan.index, bridge.index)
                .await?;
        }
        if vxlan.master != Some(bridge.index) || vxlan.bridge_port != Some(PORT_FLAGS) {
            self.netlink
                .link_set_bridge_port(vxlan.index, PORT_FLAGS)
                .await?;
        }
        if !vxlan.up {
            self.netlink.link_set_up(vxlan.index).await?;
        }
        Ok(name)
    }

    /// Makes the network's VXLAN device's FDB and neighbour entries (and the bridge's static
    /// entries for its port) exactly those of `remotes`: adds the missing, replaces the
    /// changed (an instance that moved to another node), deletes the others.
    ///
    /// Meant to be called with the network's full set of instances on other nodes on every
    /// change of it: it reads the current entries from the kernel, so it converges from any
    /// state (an agent restart, an earlier sync that failed halfway). Remotes whose node is
    /// this node (the device's local address) are ignored; for an IP listed twice the last
    /// one wins. On failures, the other updates are still applied and the error counts them.
    #[instrument(skip(self, remotes), fields(remotes = remotes.len()), err)]
    pub async fn sync_remotes(
        &self,
        network_id: &str,
        remotes: &[Remote],
    ) -> Result<SyncChanges, NetworkError> {
        let _overlay = self.overlay.lock().await;
        let (vxlan, local) = self.existing_vxlan(network_id).await?;
        let mut wanted = BTreeMap::new();
        for remote in remotes {
            if Some(remote.node_ip) == local {
                debug!(ip = %remote.ip, "skipping an instance of this node");
                continue;
            }
            if let Some(previous) = wanted.insert(remote.ip, remote.node_ip) {
                if previous != remote.node_ip {
                    warn!(ip = %remote.ip, %previous, node = %remote.node_ip, "instance listed on two nodes; the last wins");
                }
            }
        }
        let fdb = self.netlink.fdb_list(vxlan.index).await?;
        let neighbours = self.netlink.neigh_list(vxlan.index).await?;
        let plan = SyncPlan::new(&wanted, &fdb, &neighbours);
        if plan.is_empty() {
            return Ok(SyncChanges::default());
        }
        self.apply(network_id, vxlan.index, plan).await
    }

    /// Deletes the network's VXLAN device (its entries go with it). Returns whether it existed.
    #[instrument(skip(self), err)]
    pub async fn remove_vxlan(&self, network_id: &str) -> Result<bool, NetworkError> {
        let _overlay = self.overlay.lock().await;
        let name = vxlan_name(network_id);
        let Some(link) = self.netlink.link_get(&name).await? else {
            return Ok(false);
        };
        if !matches!(link.kind, LinkKind::Vxlan(_)) {
            return Err(NetworkError::NotAVxlan { name });
        }
        self.delete_link(link.index).await?;
        info!(vxlan = %name, network_id, "deleted vxlan");
        Ok(true)
    }

    /// Turns on IPv4 forwarding in the node's namespace (the calling thread's): routing
    /// between the bridges of linked networks needs it. Idempotent.
    #[instrument(skip(self), err)]
    pub async fn ensure_forwarding(&self) -> Result<(), NetworkError> {
        Ok(self.netlink.enable_ipv4_forwarding().await?)
    }

    async fn existing_bridge(&self, network_id: &str) -> Result<Link, NetworkError> {
        let name = bridge_name(network_id);
        match self.netlink.link_get(&name).await? {
            Some(link) if link.kind == LinkKind::Bridge => Ok(link),
            Some(_) => Err(NetworkError::NotABridge { name }),
            None => Err(NetworkError::BridgeMissing {
                network_id: network_id.to_owned(),
                bridge: name,
            }),
        }
    }

    /// The network's VXLAN device and its local address.
    async fn existing_vxlan(
        &self,
        network_id: &str,
    ) -> Result<(Link, Option<Ipv4Addr>), NetworkError> {
        let name = vxlan_name(network_id);
        match self.netlink.link_get(&name).await? {
            Some(link) => match link.kind {
                LinkKind::Vxlan(params) => Ok((link, params.local)),
                _ => Err(NetworkError::NotAVxlan { name }),
            },
            None => Err(NetworkError::VxlanMissing {
                network_id: network_id.to_owned(),
                name,
            }),
        }
    }

    /// Applies `plan` in its order, carrying on past failures.
    async fn apply(
        &self,
        network_id: &str,
        index: u32,
        plan: SyncPlan,
    ) -> Result<SyncChanges, NetworkError> {
        let mut changes = SyncChanges::default();
        let mut failures = Vec::new();
        let mut tally = |result: Result<(), super::NetlinkError>, counter: &mut usize| match result
        {
            Ok(()) => *counter += 1,
            // Already gone: what a delete wanted.
            Err(e) if e.is(libc::ENOENT) => {}
            Err(e) => failures.push(e),
        };
        for &entry in &plan.fdb_reset {
            tally(
                self.netlink.fdb_del(index, entry).await,
                &mut changes.removed,
            );
        }
        for &entry in &plan.fdb_replace {
            tally(
                self.netlink.fdb_replace(index, entry).await,
                &mut changes.updated,
            );
        }
        for &neighbour in &plan.neigh_replace {
            tally(
                self.netlink.neigh_replace(index, neighbour).await,
                &mut changes.updated,
            );
        }
        for &ip in &plan.neigh_del {
            tally(
                self.netlink.neigh_del(index, ip).await,
                &mut changes.removed,
            );
        }
        for &entry in &plan.fdb_del {
            tally(
                self.netlink.fdb_del(index, entry).await,
                &mut changes.removed,
            );
        }
        let failed = failures.len();
        match failures.into_iter().next() {
            None => {
                debug!(network_id, ?changes, "remotes synced");
                Ok(changes)
            }
            Some(first) => Err(NetworkError::Sync {
                network_id: network_id.to_owned(),
                failed,
                first: Box::new(first),
            }),
        }
    }
}
