//! Container networking on one node: one Linux bridge per berth network, one veth pair per
//! instance.
//!
//! The agent runs inside the node's network namespace ("the host" here). For each network with
//! an instance on this node, [`NetworkManager::ensure_bridge`] keeps a bridge `bn-…` carrying the
//! network's gateway address (the same on every node), through which the node reaches its local
//! instances. [`NetworkManager::attach`] plugs an instance in: a veth pair whose host end `bv…`
//! is a port of the bridge and whose other end is `eth0` in the container's own network
//! namespace (made by the runtime; addressed here by the container's init pid), with the
//! instance's address, a MAC derived from it ([`instance_mac`]) and a default route via the
//! gateway, so linked networks are reached by routing through the node (isolation is enforced by
//! eBPF on the host veth, not by missing routes).
//!
//! Across nodes, `overlay` adds a VXLAN device `bx…` to the bridge and keeps its FDB and
//! neighbour entries equal to the network's remote instances.
//!
//! Every kernel call goes through the [`Netlink`] trait: [`RtNetlink`] speaks rtnetlink, a fake
//! in the unit tests records calls and injects failures.

use std::io;
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, RwLock};
use tracing::{debug, info, instrument, warn};

pub mod holder;
mod netlink;
mod overlay;
pub mod wireguard;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub use netlink::{
    BridgePortFlags, FdbEntry, Link, LinkKind, Neighbour, Netlink, NetlinkError, PeerPlan,
    RtNetlink, VethPlan, VxlanParams,
};
pub use overlay::{vxlan_name, Remote, SyncChanges, VXLAN_PORT};

/// Name of the instance's interface inside its container.
pub const CONTAINER_IFNAME: &str = "eth0";

/// MTU of a network without overlay.
pub const DEFAULT_MTU: u32 = 1500;
/// MTU of a network over VXLAN on a 1500-byte underlay (50 bytes of VXLAN/UDP/IP/Ethernet).
pub const VXLAN_MTU: u32 = 1450;
/// MTU of a network over VXLAN inside WireGuard (1420 minus the VXLAN 50).
pub const VXLAN_OVER_WIREGUARD_MTU: u32 = 1370;

/// One berth network as this node plumbs it: what its bridge, VXLAN device and veths share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPlan {
    /// Hub id of the network.
    pub network_id: String,
    /// Gateway address, the same on every node's bridge.
    pub gateway: Ipv4Addr,
    /// Prefix length of the network's CIDR.
    pub prefix_len: u8,
    /// MTU of the bridge, the VXLAN device and every veth of the network
    /// ([`DEFAULT_MTU`], [`VXLAN_MTU`] or [`VXLAN_OVER_WIREGUARD_MTU`]).
    pub mtu: u32,
}

/// What [`NetworkManager::attach`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// Name of the host-side veth.
    pub veth: String,
    /// Its interface index in the host namespace (where the tc program attaches).
    pub ifindex: u32,
    /// Hardware address of the container's `eth0`.
    pub mac: [u8; 6],
}

/// Errors of container networking.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// No netlink socket could be opened.
    #[error("opening a netlink socket: {0}")]
    Connect(io::Error),
    /// The kernel refused a request.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The container's network namespace could not be entered.
    #[error("network namespace of pid {pid}: {error}")]
    Netns {
        /// The container's init pid.
        pid: i32,
        /// Why.
        error: io::Error,
    },
    /// The thread working inside a container's namespace died without answering.
    #[error("network namespace worker for pid {pid} ended without an answer")]
    NetnsWorker {
        /// The container's init pid.
        pid: i32,
    },
    /// `attach` before `ensure_bridge`.
    #[error("bridge {bridge} of network {network_id} does not exist")]
    BridgeMissing {
        /// The berth network.
        network_id: String,
        /// Its bridge's name on this node.
        bridge: String,
    },
    /// A link with the bridge's name exists but is something else: not ours to touch.
    #[error("link {name} exists but is not a bridge")]
    NotABridge {
        /// The link's name.
        name: String,
    },
    /// A link that must exist (just created, or `lo`) is not there.
    #[error("link {name} not found")]
    LinkMissing {
        /// The link's name.
        name: String,
    },
    /// A prefix length no berth network can have.
    #[error("invalid prefix length {prefix_len}: must be 1..=32")]
    InvalidPrefix {
        /// The rejected value.
        prefix_len: u8,
    },
    /// A VNI VXLAN cannot carry (24 bits, 0 reserved here).
    #[error("invalid vni {vni}: must be 1..=16777215")]
    InvalidVni {
        /// The rejected value.
        vni: u32,
    },
    /// An MTU no berth network can have.
    #[error("invalid mtu {mtu}: must be 1280..=65535")]
    InvalidMtu {
        /// The rejected value.
        mtu: u32,
    },
    /// `sync_remotes` before the network's VXLAN device exists ([`NetworkManager::ensure_vxlan`]).
    #[error("vxlan {name} of network {network_id} does not exist")]
    VxlanMissing {
        /// The berth network.
        network_id: String,
        /// Its VXLAN device's name on this node.
        name: String,
    },
    /// A link with the VXLAN device's name exists but is something else: not ours to touch.
    #[error("link {name} exists but is not a vxlan device")]
    NotAVxlan {
        /// The link's name.
        name: String,
    },
    /// Some FDB or neighbour updates of a sync failed; the others were applied. Calling
    /// `sync_remotes` again retries them.
    #[error("syncing remotes of network {network_id}: {failed} update(s) failed, first: {first}")]
    Sync {
        /// The berth network.
        network_id: String,
        /// How many updates failed.
        failed: usize,
        /// The first failure.
        first: Box<NetlinkError>,
    },
    /// Attach failed, and so did removing what it had made.
    #[error("attaching instance {instance_id}: {error}; removing its veth {veth} afterwards failed too: {cleanup}")]
    AttachRollback {
        /// The instance.
        instance_id: String,
        /// Its host-side veth, possibly left behind.
        veth: String,
        /// The failure of attach.
        error: Box<NetworkError>,
        /// The failure of the cleanup.
        cleanup: Box<NetworkError>,
    },
}

/// Plumbs berth networks and instances into the kernel of this node.
///
/// `Send + Sync`: share it behind an `Arc`. Calls may run concurrently; removing a bridge waits
/// for attaches in progress, so a veth is never plugged into a bridge being deleted.
pub struct NetworkManager<N: Netlink = RtNetlink> {
    netlink: N,
    // Shared by ensure_bridge/attach, exclusive for remove_bridge_if_unused: "no port" must stay
    // true between the check and the delete.
    bridges: RwLock<()>,
    // Serialises the overlay's read-diff-write cycles: two syncs of one network interleaving
    // could leave the older set in place.
    overlay: Mutex<()>,
}

impl NetworkManager<RtNetlink> {
    /// Opens a netlink socket in the calling thread's network namespace, driven on the current
    /// tokio runtime.
    pub async fn new() -> Result<Self, NetworkError> {
        Ok(Self::with_netlink(RtNetlink::connect()?))
    }
}

impl<N: Netlink> NetworkManager<N> {
    /// A manager over any [`Netlink`] implementation (tests use a fake).
    pub fn with_netlink(netlink: N) -> Self {
        Self {
            netlink,
            bridges: RwLock::new(()),
            overlay: Mutex::new(()),
        }
    }

    /// The [`Netlink`] implementation underneath.
    pub fn netlink(&self) -> &N {
        &self.netlink
    }

    /// Makes sure the bridge of `net` exists, carries `gateway/prefix_len`, has the network's
    /// MTU and is up; returns its name. Idempotent, and safe to call concurrently for the same
    /// network.
    ///
    /// Every node's bridge of one network carries the same gateway address (the hub hands it
    /// out): the node reaches its local instances through it.
    #[instrument(skip_all, fields(network_id = %net.network_id), err)]
    pub async fn ensure_bridge(&self, net: &NetworkPlan) -> Result<String, NetworkError> {
        check_plan(net)?;
        let (network_id, gateway, prefix_len) =
            (net.network_id.as_str(), net.gateway, net.prefix_len);
        let _shared = self.bridges.read().await;
        let name = bridge_name(network_id);
        let bridge = match self.netlink.link_get(&name).await? {
            Some(link) => link,
            None => {
                let mac = bridge_mac(network_id);
                match self.netlink.link_add_bridge(&name, mac).await {
                    Ok(()) => info!(bridge = %name, network_id, "created bridge"),
                    // Another call for the same network won the race: use its bridge.
                    Err(e) if e.is(libc::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                self.netlink
                    .link_get(&name)
                    .await?
                    .ok_or_else(|| NetworkError::LinkMissing { name: name.clone() })?
            }
        };
        if bridge.kind != LinkKind::Bridge {
            return Err(NetworkError::NotABridge { name });
        }

        let addresses = self.netlink.addr_list(bridge.index).await?;
        for &(ip, prefix) in &addresses {
            // Same gateway with another prefix: a leftover of an older network with that id.
            if ip == gateway && prefix != prefix_len {
                warn!(bridge = %name, %ip, prefix, "replacing gateway address with a different prefix");
                match self.netlink.addr_del(bridge.index, ip, prefix).await {
                    Ok(()) => {}
                    Err(e) if e.is(libc::EADDRNOTAVAIL) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if !addresses.contains(&(gateway, prefix_len)) {
            match self
                .netlink
                .addr_add(bridge.index, gateway, prefix_len)
                .await
            {
                Ok(()) => debug!(bridge = %name, %gateway, prefix_len, "gateway address added"),
                Err(e) if e.is(libc::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if bridge.mtu != net.mtu {
            // The kernel keeps an MTU set by hand even when ports come and go.
            self.netlink.link_set_mtu(bridge.index, net.mtu).await?;
            debug!(bridge = %name, mtu = net.mtu, "bridge mtu set");
        }
        if !bridge.up {
            self.netlink.link_set_up(bridge.index).await?;
        }
        Ok(name)
    }

    /// Plugs an instance into its network's bridge (which must exist: [`Self::ensure_bridge`]).
    ///
    /// Creates a veth pair with the network's MTU: the host end [`host_veth_name`] becomes a
    /// port of the bridge, up; the other end is created directly in the network namespace of
    /// `pid` as `eth0` with the hardware address [`instance_mac`]`(ip)`, gets `ip/prefix_len`, a
    /// default route via the gateway, and is brought up, along with `lo`. A stale host veth of
    /// the same name (an earlier attempt) is deleted first, so this can be retried; on error,
    /// the veth it made is removed again.
    #[instrument(skip(self, net), fields(network_id = %net.network_id), err)]
    pub async fn attach(
        &self,
        instance_id: &str,
        net: &NetworkPlan,
        pid: i32,
        ip: Ipv4Addr,
    ) -> Result<Attached, NetworkError> {
        check_plan(net)?;
        let (network_id, prefix_len) = (net.network_id.as_str(), net.prefix_len);
        let _shared = self.bridges.read().await;
        let bridge_name = bridge_name(network_id);
        let bridge = self.netlink.link_get(&bridge_name).await?.ok_or_else(|| {
            NetworkError::BridgeMissing {
                network_id: network_id.to_owned(),
                bridge: bridge_name.clone(),
            }
        })?;
        if bridge.kind != LinkKind::Bridge {
            return Err(NetworkError::NotABridge { name: bridge_name });
        }

        let veth = host_veth_name(instance_id);
        if let Some(stale) = self.netlink.link_get(&veth).await? {
            warn!(%veth, "deleting stale host veth left by an earlier attempt");
            self.delete_link(stale.index).await?;
        }
        let mac = instance_mac(ip);
        // Nothing to undo if this fails: a netlink request is all or nothing.
        self.netlink
            .link_add_veth(&VethPlan {
                name: veth.clone(),
                mtu: net.mtu,
                peer: CONTAINER_IFNAME.to_owned(),
                peer_pid: pid,
                peer_mac: mac,
            })
            .await?;
        let plan = PeerPlan {
            ifname: CONTAINER_IFNAME.to_owned(),
            ip,
            prefix_len,
            gateway: net.gateway,
        };
        let ifindex = match self.plug(&veth, bridge.index, pid, plan).await {
            Ok(ifindex) => ifindex,
            Err(error) => return Err(self.undo_veth(instance_id, &veth, error).await),
        };
        info!(%veth, ifindex, bridge = %bridge_name, %ip, prefix_len, mtu = net.mtu, "instance attached");
        Ok(Attached { veth, ifindex, mac })
    }

    /// Removes the instance's host veth, and with it the pair. Ok if it is already gone.
    #[instrument(skip(self), err)]
    pub async fn detach(&self, instance_id: &str) -> Result<(), NetworkError> {
        let veth = host_veth_name(instance_id);
        if let Some(link) = self.netlink.link_get(&veth).await? {
            self.delete_link(link.index).await?;
            info!(%veth, "instance detached");
        }
        Ok(())
    }

    /// Deletes the network's bridge if no link but the network's own VXLAN device is a port of
    /// it any more, and that VXLAN device with it (a node without local instances of a network
    /// has no use for its overlay). Returns whether it deleted the bridge; `Ok(false)` when it
    /// does not exist or is still in use.
    #[instrument(skip(self), err)]
    pub async fn remove_bridge_if_unused(&self, network_id: &str) -> Result<bool, NetworkError> {
        let _exclusive = self.bridges.write().await;
        let _overlay = self.overlay.lock().await;
        let name = bridge_name(network_id);
        let vxlan = vxlan_name(network_id);
        let Some(bridge) = self.netlink.link_get(&name).await? else {
            return Ok(false);
        };
        if bridge.kind != LinkKind::Bridge {
            return Err(NetworkError::NotABridge { name });
        }
        let (overlay, ports): (Vec<Link>, Vec<Link>) = self
            .netlink
            .link_list()
            .await?
            .into_iter()
            .filter(|link| link.master == Some(bridge.index))
            .partition(|link| link.name == vxlan && matches!(link.kind, LinkKind::Vxlan(_)));
        if !ports.is_empty() {
            debug!(bridge = %name, ports = ports.len(), "bridge still in use");
            return Ok(false);
        }
        for link in overlay {
            self.delete_link(link.index).await?;
            info!(vxlan = %link.name, network_id, "deleted vxlan of an unused bridge");
        }
        self.delete_link(bridge.index).await?;
        info!(bridge = %name, network_id, "deleted unused bridge");
        Ok(true)
    }

    /// Removes berth's bridges (`bn-…`) and VXLAN devices (`bx…`) of networks not in `keep` (network
    /// ids), for networks that left this node while no agent was there to remove them; a bridge that
    /// still has an instance's veth stays. Returns the names of the links removed.
    #[instrument(skip(self), err)]
    pub async fn remove_orphans(&self, keep: &[String]) -> Result<Vec<String>, NetworkError> {
        let _exclusive = self.bridges.write().await;
        let _overlay = self.overlay.lock().await;
        let kept: std::collections::HashSet<String> = keep
            .iter()
            .flat_map(|id| [bridge_name(id), vxlan_name(id)])
            .collect();
        let links = self.netlink.link_list().await?;
        let orphan = |l: &Link| {
            !kept.contains(&l.name)
                && ((l.name.starts_with("bn-") && l.kind == LinkKind::Bridge)
                    || (l.name.starts_with("bx") && matches!(l.kind, LinkKind::Vxlan(_))))
        };
        let mut removed = Vec::new();
        // VXLAN devices first: a bridge is unused once only its own VXLAN port is left.
        for link in links
            .iter()
            .filter(|l| orphan(l) && l.kind != LinkKind::Bridge)
        {
            self.delete_link(link.index).await?;
            removed.push(link.name.clone());
        }
        for bridge in links
            .iter()
            .filter(|l| orphan(l) && l.kind == LinkKind::Bridge)
        {
            let in_use = links
                .iter()
                .any(|l| l.master == Some(bridge.index) && !matches!(l.kind, LinkKind::Vxlan(_)));
            if in_use {
                debug!(bridge = %bridge.name, "orphan bridge still has an instance: kept");
                continue;
            }
            self.delete_link(bridge.index).await?;
            removed.push(bridge.name.clone());
        }
        if !removed.is_empty() {
            info!(links = ?removed, "removed links of networks that left this node");
        }
        Ok(removed)
    }

    /// The steps of attach after the veth exists; any error here means the veth must go.
    /// Returns the host end's index.
    async fn plug(
        &self,
        veth: &str,
        bridge_index: u32,
        pid: i32,
        plan: PeerPlan,
    ) -> Result<u32, NetworkError> {
        let host_end =
            self.netlink
                .link_get(veth)
                .await?
                .ok_or_else(|| NetworkError::LinkMissing {
                    name: veth.to_owned(),
                })?;
        self.netlink
            .link_set_master(host_end.index, bridge_index)
            .await?;
        self.netlink.link_set_up(host_end.index).await?;
        self.netlink.configure_netns(pid, plan).await?;
        Ok(host_end.index)
    }

    /// Removes the veth a failed attach made; returns the error to report.
    async fn undo_veth(&self, instance_id: &str, veth: &str, error: NetworkError) -> NetworkError {
        let cleanup = match self.netlink.link_get(veth).await {
            Ok(Some(link)) => self.delete_link(link.index).await,
            Ok(None) => Ok(()),
            Err(e) => Err(e.into()),
        };
        match cleanup {
            Ok(()) => error,
            Err(cleanup) => NetworkError::AttachRollback {
                instance_id: instance_id.to_owned(),
                veth: veth.to_owned(),
                error: Box::new(error),
                cleanup: Box::new(cleanup),
            },
        }
    }

    /// Deletes a link; one that vanished meanwhile (e.g. the container's namespace went away and
    /// took the pair with it) counts as deleted.
    async fn delete_link(&self, index: u32) -> Result<(), NetworkError> {
        match self.netlink.link_del(index).await {
            Ok(()) => Ok(()),
            Err(e) if e.is(libc::ENODEV) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Sets up the container end of a veth from inside the container's namespace: `lo` up, the
/// address on `plan.ifname`, that link up, then the default route via `plan.gateway`.
///
/// `netlink` must be bound to the container's namespace ([`Netlink::configure_netns`] does that).
pub async fn configure_peer<N: Netlink>(netlink: &N, plan: &PeerPlan) -> Result<(), NetworkError> {
    let lo = netlink
        .link_get("lo")
        .await?
        .ok_or_else(|| NetworkError::LinkMissing {
            name: "lo".to_owned(),
        })?;
    if !lo.up {
        netlink.link_set_up(lo.index).await?;
    }
    let eth = netlink
        .link_get(&plan.ifname)
        .await?
        .ok_or_else(|| NetworkError::LinkMissing {
            name: plan.ifname.clone(),
        })?;
    let addresses = netlink.addr_list(eth.index).await?;
    if !addresses.contains(&(plan.ip, plan.prefix_len)) {
        match netlink.addr_add(eth.index, plan.ip, plan.prefix_len).await {
            Ok(()) => {}
            Err(e) if e.is(libc::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    netlink.link_set_up(eth.index).await?;
    // Needs the link up and the subnet route in place: the gateway must be reachable on it.
    netlink
        .route_replace_default(eth.index, plan.gateway)
        .await?;
    Ok(())
}

/// Hardware address of an instance's `eth0`: `0a:58` and its IPv4 address (locally
/// administered, unicast). Every node derives a remote instance's MAC from its IP, so the
/// overlay's FDB and neighbour entries need nothing but the IP and the node.
pub fn instance_mac(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x0a, 0x58, a, b, c, d]
}

/// Name of the bridge of a berth network on every node: `bn-` and 12 hex digits (15 characters,
/// the kernel's limit). Network ids `net-<12 hex>` keep their suffix, so the bridge is easy to
/// recognise; any other id is hashed.
pub fn bridge_name(network_id: &str) -> String {
    format!("bn-{}", short_id(network_id, "net-"))
}

/// Hardware address of the bridge of a berth network: locally administered, unicast, derived
/// from the network id, so the same on every node.
///
/// A bridge without a set address takes the lowest one of its ports and changes it whenever that
/// port leaves, and the instances' ARP entries for the gateway then point nowhere until they
/// expire. A fixed address avoids that; one shared by every node matches the gateway IP they
/// share.
pub fn bridge_mac(network_id: &str) -> [u8; 6] {
    let digest = Sha256::digest(format!("berth bridge {network_id}").as_bytes());
    let mut mac = [0u8; 6];
    mac[1..].copy_from_slice(&digest[..5]);
    // 0x02: locally administered, unicast.
    mac[0] = 0x02;
    mac
}

/// Name of an instance's host-side veth: `bv` and 12 hex digits. Instance ids `ins-<12 hex>` keep
/// their suffix; any other id is hashed.
pub fn host_veth_name(instance_id: &str) -> String {
    format!("bv{}", short_id(instance_id, "ins-"))
}

/// 12 lower-case hex digits standing for `id`: its own suffix when it is `prefix` + 12 hex,
/// otherwise the start of its SHA-256.
fn short_id(id: &str, prefix: &str) -> String {
    if let Some(suffix) = id.strip_prefix(prefix) {
        if suffix.len() == 12
            && suffix
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return suffix.to_owned();
        }
    }
    let digest = Sha256::digest(id.as_bytes());
    hex::encode(&digest[..6])
}

fn check_plan(net: &NetworkPlan) -> Result<(), NetworkError> {
    if !(1..=32).contains(&net.prefix_len) {
        return Err(NetworkError::InvalidPrefix {
            prefix_len: net.prefix_len,
        });
    }
    check_mtu(net.mtu)
}

fn check_mtu(mtu: u32) -> Result<(), NetworkError> {
    // 1280: the IPv6 minimum, a floor no sane overlay goes under.
    if (1280..=65535).contains(&mtu) {
        Ok(())
    } else {
        Err(NetworkError::InvalidMtu { mtu })
    }
}
