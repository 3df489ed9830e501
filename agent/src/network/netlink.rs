//! The kernel boundary of `network`: every rtnetlink call goes through [`Netlink`], so the
//! plumbing above it ([`super::NetworkManager`]) is tested on a fake without root, and
//! [`RtNetlink`] is tested for real in `agent/tests/network_netlink.rs`.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVeth, InfoVxlan, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::AddressFamily;
use nix::sched::CloneFlags;
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec,
    LinkVeth, LinkVxlan, RouteMessageBuilder,
};
use tokio::sync::oneshot;

use super::{configure_peer, NetworkError};

/// What `network` needs to know about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index in its network namespace.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Bridge, veth or anything else.
    pub kind: LinkKind,
    /// MTU in bytes.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Index of the bridge this link is a port of.
    pub master: Option<u32>,
    /// The port settings berth cares about, when the link is a bridge port.
    pub bridge_port: Option<BridgePortFlags>,
}

/// The link kinds `network` tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A Linux bridge.
    Bridge,
    /// One end of a veth pair.
    Veth,
    /// A VXLAN device, with the settings berth compares.
    Vxlan(VxlanParams),
    /// Anything else (loopback, physical, dummy...).
    Other,
}

/// The settings of a VXLAN device that decide whether an existing one can be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanParams {
    /// The VXLAN network identifier.
    pub vni: u32,
    /// Source address of the encapsulated packets (the node's underlay address).
    pub local: Option<Ipv4Addr>,
    /// UDP destination port.
    pub port: u16,
    /// Whether the device learns remote MACs from received packets.
    pub learning: bool,
    /// Whether the device answers ARP requests from its own neighbour table.
    pub proxy: bool,
}

/// Settings of a link as a bridge port (`IFLA_BRPORT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgePortFlags {
    /// The bridge learns source MACs of frames coming in on this port.
    pub learning: bool,
    /// The bridge answers ARP for this port's neighbours and keeps requests it answered away
    /// from the port.
    pub neigh_suppress: bool,
}

/// A veth pair to create: one end here, the other directly in a process's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPlan {
    /// Name of the end that stays here.
    pub name: String,
    /// MTU of both ends.
    pub mtu: u32,
    /// Name of the end in the process's namespace.
    pub peer: String,
    /// The process whose namespace receives the peer.
    pub peer_pid: i32,
    /// Hardware address of the peer.
    pub peer_mac: [u8; 6],
}

/// How the container end of a veth pair is set up from inside the container's netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    /// Name of the veth end inside the container (`eth0`).
    pub ifname: String,
    /// The instance's address.
    pub ip: Ipv4Addr,
    /// Prefix length of the network.
    pub prefix_len: u8,
    /// The network's gateway: the container's default route goes through it.
    pub gateway: Ipv4Addr,
}

/// One forwarding database entry berth manages on a VXLAN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    /// The remote MAC.
    pub mac: [u8; 6],
    /// `None`: a static entry of the bridge the device is a port of (`NTF_MASTER`, frames to
    /// `mac` go to this port). `Some(node)`: a permanent entry of the VXLAN device itself
    /// (`NTF_SELF`, frames to `mac` are sent to the VTEP at `node`).
    pub dst: Option<Ipv4Addr>,
}

/// A permanent IPv4 neighbour entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    /// The neighbour's address.
    pub ip: Ipv4Addr,
    /// Its hardware address.
    pub mac: [u8; 6],
}

/// A failed netlink request: which operation, on what, and the kernel's errno when it gave one.
#[derive(Debug, thiserror::Error)]
#[error("netlink {op} {target}: {message}")]
pub struct NetlinkError {
    /// The operation, e.g. `link_add_veth`.
    pub op: &'static str,
    /// The link or address it was about.
    pub target: String,
    /// Positive errno from the kernel, if the kernel answered with one.
    pub errno: Option<i32>,
    /// Human-readable reason.
    pub message: String,
}

impl NetlinkError {
    /// An error carrying a kernel errno (also what the fake injects).
    pub fn from_errno(op: &'static str, target: impl Into<String>, errno: i32) -> Self {
        Self {
            op,
            target: target.into(),
            errno: Some(errno),
            message: io::Error::from_raw_os_error(errno).to_string(),
        }
    }

    fn from_rtnetlink(op: &'static str, target: impl Into<String>, err: rtnetlink::Error) -> Self {
        match errno_of(&err) {
            Some(errno) => Self::from_errno(op, target, errno),
            None => Self {
                op,
                target: target.into(),
                errno: None,
                message: err.to_string(),
            },
        }
    }

    /// Whether the kernel answered with `errno`.
    pub fn is(&self, errno: i32) -> bool {
        self.errno == Some(errno)
    }
}

/// The rtnetlink operations `network` uses, on one network namespace.
///
/// Every method acts in the namespace the implementation is bound to, except
/// [`Netlink::configure_netns`], which reaches into the namespace of a process.
pub trait Netlink: Send + Sync + 'static {
    /// The link called `name`, or `None` if there is none.
    fn link_get(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Link>, NetlinkError>> + Send;
    /// Every link of the namespace.
    fn link_list(&self) -> impl Future<Output = Result<Vec<Link>, NetlinkError>> + Send;
    /// Creates a bridge with hardware address `mac` (down, no IP address).
    fn link_add_bridge(
        &self,
        name: &str,
        mac: [u8; 6],
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Creates the veth pair of `plan`: `name` here and `peer` directly in the network
    /// namespace of `peer_pid`, both with `mtu`. The peer never shows up in this namespace, so
    /// its name cannot collide with anything here.
    fn link_add_veth(
        &self,
        plan: &VethPlan,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Creates a VXLAN device (down, no master) with `params` and `mtu`, without a default
    /// remote: it sends only to the destinations of its FDB entries.
    fn link_add_vxlan(
        &self,
        name: &str,
        params: VxlanParams,
        mtu: u32,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Sets the MTU of link `index`.
    fn link_set_mtu(
        &self,
        index: u32,
        mtu: u32,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Sets the bridge port settings of link `index` (which must be a bridge port).
    fn link_set_bridge_port(
        &self,
        index: u32,
        flags: BridgePortFlags,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Makes link `index` a port of bridge `master`.
    fn link_set_master(
        &self,
        index: u32,
        master: u32,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Sets link `index` administratively up.
    fn link_set_up(&self, index: u32) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Deletes link `index` (for a veth: the pair).
    fn link_del(&self, index: u32) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// IPv4 addresses on link `index`, with prefix lengths.
    fn addr_list(
        &self,
        index: u32,
    ) -> impl Future<Output = Result<Vec<(Ipv4Addr, u8)>, NetlinkError>> + Send;
    /// Adds `ip/prefix_len` to link `index`.
    fn addr_add(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Removes `ip/prefix_len` from link `index`.
    fn addr_del(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Adds or replaces the default route: via `gateway` on link `index`.
    fn route_replace_default(
        &self,
        index: u32,
        gateway: Ipv4Addr,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// The FDB entries berth manages on link `index`: the device's own permanent entries with
    /// their destination, and the bridge's static entries pointing at the port. Others (the
    /// bridge's local entry for the port's own address, learned ones) are left out.
    fn fdb_list(
        &self,
        index: u32,
    ) -> impl Future<Output = Result<Vec<FdbEntry>, NetlinkError>> + Send;
    /// Adds `entry` on link `index`, replacing one for the same MAC (and kind).
    fn fdb_replace(
        &self,
        index: u32,
        entry: FdbEntry,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Deletes the entry for `entry.mac` (of `entry`'s kind) on link `index`.
    fn fdb_del(
        &self,
        index: u32,
        entry: FdbEntry,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// The permanent IPv4 neighbour entries of link `index`.
    fn neigh_list(
        &self,
        index: u32,
    ) -> impl Future<Output = Result<Vec<Neighbour>, NetlinkError>> + Send;
    /// Adds or replaces a permanent neighbour entry on link `index`.
    fn neigh_replace(
        &self,
        index: u32,
        neighbour: Neighbour,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Deletes the neighbour entry of `ip` on link `index`.
    fn neigh_del(
        &self,
        index: u32,
        ip: Ipv4Addr,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Turns on IPv4 forwarding (`net.ipv4.ip_forward`) in the calling thread's network
    /// namespace.
    fn enable_ipv4_forwarding(&self) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Runs [`configure_peer`] with `plan` on a netlink handle bound to the network namespace
    /// of process `pid`.
    fn configure_netns(
        &self,
        pid: i32,
        plan: PeerPlan,
    ) -> impl Future<Output = Result<(), NetworkError>> + Send;
}

/// [`Netlink`] over a real rtnetlink socket.
#[derive(Clone)]
pub struct RtNetlink {
    handle: Handle,
}

impl RtNetlink {
    /// Opens a netlink socket in the calling thread's network namespace (a socket stays in the
    /// namespace it was created in) and drives it on the current tokio runtime.
    ///
    /// Must be called from within a tokio runtime.
    pub fn connect() -> Result<Self, NetworkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    async fn change(
        &self,
        op: &'static str,
        index: u32,
        message: LinkMessage,
    ) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .change(message)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(op, format!("link #{index}"), e))
    }
}

impl Netlink for RtNetlink {
    async fn link_get(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut replies = self.handle.link().get().match_name(name).execute();
        match replies.try_next().await {
            Ok(Some(message)) => Ok(Some(link_from_message(&message))),
            Ok(None) => Ok(None),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(NetlinkError::from_rtnetlink("link_get", name, e)),
        }
    }

    async fn link_list(&self) -> Result<Vec<Link>, NetlinkError> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(|message| link_from_message(&message))
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("link_list", "all links", e))
    }

    async fn link_add_bridge(&self, name: &str, mac: [u8; 6]) -> Result<(), NetlinkError> {
        // Created down (LinkBridge::new would ask for up): ensure_bridge addresses it, then brings
        // it up, the same path as for a bridge found down.
        let message = LinkMessageBuilder::<LinkBridge>::new(name)
            .address(mac.to_vec())
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("link_add_bridge", name, e))
    }

    async fn link_add_veth(&self, plan: &VethPlan) -> Result<(), NetlinkError> {
        let target = format!(
            "{} (peer {} in pid {})",
            plan.name, plan.peer, plan.peer_pid
        );
        let pid = u32::try_from(plan.peer_pid)
            .map_err(|_| NetlinkError::from_errno("link_add_veth", &target, libc::ESRCH))?;
        let peer_message = LinkUnspec::new_with_name(&plan.peer)
            .mtu(plan.mtu)
            .address(plan.peer_mac.to_vec())
            .setns_by_pid(pid)
            .build();
        let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(plan.name.clone())
            .mtu(plan.mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message)))
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("link_add_veth", target, e))
    }

    async fn link_add_vxlan(
        &self,
        name: &str,
        params: VxlanParams,
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        let mut builder = LinkVxlan::new(name, params.vni)
            .port(params.port)
            .learning(params.learning)
            .proxy(params.proxy)
            .mtu(mtu);
        if let Some(local) = params.local {
            builder = builder.local(local);
        }
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("link_add_vxlan", name, e))
    }

    async fn link_set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.change("link_set_mtu", index, message).await
    }

    async fn link_set_bridge_port(
        &self,
        index: u32,
        flags: BridgePortFlags,
    ) -> Result<(), NetlinkError> {
        let message = LinkBridgePort::new(index)
            .learning(flags.learning)
            .neigh_suppress(flags.neigh_suppress)
            .build();
        self.handle
            .link()
            .set_port(message)
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::from_rtnetlink("link_set_bridge_port", format!("link #{index}"), e)
            })
    }

    async fn link_set_master(&self, index: u32, master: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(index).controller(master).build();
        self.change("link_set_master", index, message).await
    }

    async fn link_set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(index).up().build();
        self.change("link_set_up", index, message).await
    }

    async fn link_del(&self, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("link_del", format!("link #{index}"), e))
    }

    async fn addr_list(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("addr_list", format!("link #{index}"), e))?;
        Ok(messages.iter().filter_map(ipv4_of).collect())
    }

    async fn addr_add(&self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<(), NetlinkError> {
        self.handle
            .address()
            .add(index, IpAddr::V4(ip), prefix_len)
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::from_rtnetlink(
                    "addr_add",
                    format!("{ip}/{prefix_len} on link #{index}"),
                    e,
                )
            })
    }

    async fn addr_del(&self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<(), NetlinkError> {
        let message = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(ip, prefix_len)
            .build();
        self.handle
            .address()
            .del(message)
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::from_rtnetlink(
                    "addr_del",
                    format!("{ip}/{prefix_len} on link #{index}"),
                    e,
                )
            })
    }

    async fn route_replace_default(
        &self,
        index: u32,
        gateway: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(index)
            .gateway(gateway)
            .build();
        self.handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::from_rtnetlink(
                    "route_replace_default",
                    format!("default via {gateway} on link #{index}"),
                    e,
                )
            })
    }

    async fn fdb_list(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        // The kernel filters bridge dumps by port only with strict checking on: filter here.
        let messages: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("fdb_list", format!("link #{index}"), e))?;
        Ok(messages
            .iter()
            .filter(|m| m.header.ifindex == index)
            .filter_map(fdb_of)
            .collect())
    }

    async fn fdb_replace(&self, index: u32, entry: FdbEntry) -> Result<(), NetlinkError> {
        let mut request = self
            .handle
            .neighbours()
            .add_bridge(index, &entry.mac)
            .replace();
        let message = request.message_mut();
        fill_fdb_header(message, entry);
        if let Some(dst) = entry.dst {
            message
                .attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        }
        request
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("fdb_replace", fdb_target(index, entry), e))
    }

    async fn fdb_del(&self, index: u32, entry: FdbEntry) -> Result<(), NetlinkError> {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        message.header.ifindex = index;
        fill_fdb_header(&mut message, entry);
        // No destination: the whole entry for the MAC goes, whatever VTEP it pointed at.
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(entry.mac.to_vec()));
        self.handle
            .neighbours()
            .del(message)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("fdb_del", fdb_target(index, entry), e))
    }

    async fn neigh_list(&self, index: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        let messages: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("neigh_list", format!("link #{index}"), e))?;
        Ok(messages
            .iter()
            .filter(|m| m.header.ifindex == index && m.header.state == NeighbourState::Permanent)
            .filter_map(neighbour_of)
            .collect())
    }

    async fn neigh_replace(&self, index: u32, neighbour: Neighbour) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(neighbour.ip))
            .link_layer_address(&neighbour.mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::from_rtnetlink(
                    "neigh_replace",
                    format!(
                        "{} lladdr {} on link #{index}",
                        neighbour.ip,
                        mac_text(&neighbour.mac)
                    ),
                    e,
                )
            })
    }

    async fn neigh_del(&self, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.ifindex = index;
        message
            .attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        self.handle
            .neighbours()
            .del(message)
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::from_rtnetlink("neigh_del", format!("{ip} on link #{index}"), e)
            })
    }

    async fn enable_ipv4_forwarding(&self) -> Result<(), NetlinkError> {
        // A one-byte write to procfs: done right here, on the calling thread, because
        // /proc/sys/net follows the namespace of the thread that opens it.
        std::fs::write(IP_FORWARD, b"1").map_err(|e| NetlinkError {
            op: "enable_ipv4_forwarding",
            target: IP_FORWARD.to_owned(),
            errno: e.raw_os_error(),
            message: e.to_string(),
        })
    }

    async fn configure_netns(&self, pid: i32, plan: PeerPlan) -> Result<(), NetworkError> {
        let path = format!("/proc/{pid}/ns/net");
        let netns = File::open(&path).map_err(|error| NetworkError::Netns { pid, error })?;
        let (tx, rx) = oneshot::channel();
        // setns changes the namespace of the calling thread only, and a netlink socket stays in
        // the namespace it was created in: so a fresh thread enters the container's namespace,
        // opens its own socket there, does the work and ends. Never a tokio worker, which would
        // stay in the container's namespace for every task it runs afterwards.
        std::thread::Builder::new()
            .name(format!("netns-{pid}"))
            .spawn(move || {
                let result = configure_in_thread(pid, netns, &plan);
                // The receiver is gone only if the caller was cancelled; nothing to tell then.
                let _ = tx.send(result);
            })
            .map_err(|error| NetworkError::Netns { pid, error })?;
        rx.await.map_err(|_| NetworkError::NetnsWorker { pid })?
    }
}

/// Body of the per-container thread of [`RtNetlink::configure_netns`].
fn configure_in_thread(pid: i32, netns: File, plan: &PeerPlan) -> Result<(), NetworkError> {
    nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET).map_err(|errno| NetworkError::Netns {
        pid,
        error: io::Error::from(errno),
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|error| NetworkError::Netns { pid, error })?;
    runtime.block_on(async {
        let netlink = RtNetlink::connect()?;
        configure_peer(&netlink, plan).await
    })
}

/// Where the IPv4 forwarding switch of the caller's network namespace lives.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// `aa:bb:cc:dd:ee:ff`.
pub(crate) fn mac_text(mac: &[u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn fdb_target(index: u32, entry: FdbEntry) -> String {
    match entry.dst {
        Some(dst) => format!("{} dst {dst} self on link #{index}", mac_text(&entry.mac)),
        None => format!("{} master static on link #{index}", mac_text(&entry.mac)),
    }
}

/// Flags and state of an FDB request for `entry`'s kind.
fn fill_fdb_header(message: &mut NeighbourMessage, entry: FdbEntry) {
    if entry.dst.is_some() {
        // The VXLAN driver takes only permanent or reachable entries.
        message.header.flags = NeighbourFlags::Own;
        message.header.state = NeighbourState::Permanent;
    } else {
        // For the bridge, "permanent" means local (frames to it are delivered to the host):
        // a remote MAC must be static, which the bridge calls NOARP.
        message.header.flags = NeighbourFlags::Controller;
        message.header.state = NeighbourState::Noarp;
    }
}

fn mac_of(bytes: &[u8]) -> Option<[u8; 6]> {
    bytes.try_into().ok()
}

/// An FDB entry berth manages, from a dump message already filtered by link.
fn fdb_of(message: &NeighbourMessage) -> Option<FdbEntry> {
    let mut mac = None;
    let mut dst = None;
    let mut controller = false;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::LinkLayerAddress(bytes) => mac = mac_of(bytes),
            // Bridge-family messages carry the address undecoded.
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
            NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
                dst = <[u8; 4]>::try_from(bytes.as_slice())
                    .ok()
                    .map(Ipv4Addr::from);
            }
            NeighbourAttribute::Controller(_) => controller = true,
            _ => {}
        }
    }
    let mac = mac?;
    let state = message.header.state;
    if controller || message.header.flags.contains(NeighbourFlags::Controller) {
        (state == NeighbourState::Noarp).then_some(FdbEntry { mac, dst: None })
    } else if message.header.flags.contains(NeighbourFlags::Own) {
        (state == NeighbourState::Permanent && dst.is_some()).then_some(FdbEntry { mac, dst })
    } else {
        None
    }
}

fn neighbour_of(message: &NeighbourMessage) -> Option<Neighbour> {
    let mut ip = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(addr)) => ip = Some(*addr),
            NeighbourAttribute::LinkLayerAddress(bytes) => mac = mac_of(bytes),
            _ => {}
        }
    }
    Some(Neighbour { ip: ip?, mac: mac? })
}

fn errno_of(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| code.get().abs()),
        _ => None,
    }
}

fn link_from_message(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        kind: LinkKind::Other,
        mtu: 0,
        up: message.header.flags.contains(LinkFlags::Up),
        master: None,
        bridge_port: None,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Controller(master) if *master != 0 => link.master = Some(*master),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Bridge) => link.kind = LinkKind::Bridge,
                        LinkInfo::Kind(InfoKind::Veth) => link.kind = LinkKind::Veth,
                        LinkInfo::Data(InfoData::Vxlan(infos)) => {
                            link.kind = LinkKind::Vxlan(vxlan_params_of(infos));
                        }
                        LinkInfo::PortData(InfoPortData::BridgePort(infos)) => {
                            link.bridge_port = Some(bridge_port_of(infos));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn vxlan_params_of(infos: &[InfoVxlan]) -> VxlanParams {
    // Kernel defaults, for attributes a dump leaves out.
    let mut params = VxlanParams {
        vni: 0,
        local: None,
        port: 0,
        learning: true,
        proxy: false,
    };
    for info in infos {
        match info {
            InfoVxlan::Id(vni) => params.vni = *vni,
            InfoVxlan::Local(ip) => params.local = Some(*ip),
            InfoVxlan::Port(port) => params.port = *port,
            InfoVxlan::Learning(on) => params.learning = *on,
            InfoVxlan::Proxy(on) => params.proxy = *on,
            _ => {}
        }
    }
    params
}

fn bridge_port_of(infos: &[InfoBridgePort]) -> BridgePortFlags {
    let mut flags = BridgePortFlags {
        learning: true,
        neigh_suppress: false,
    };
    for info in infos {
        match info {
            InfoBridgePort::Learning(on) => flags.learning = *on,
            InfoBridgePort::NeighSupress(on) => flags.neigh_suppress = *on,
            _ => {}
        }
    }
    flags
}

/// The IPv4 address and prefix an address message carries (the interface's own: IFA_LOCAL when set).
pub(super) fn ipv4_of(message: &AddressMessage) -> Option<(Ipv4Addr, u8)> {
    if message.header.family != AddressFamily::Inet {
        return None;
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on point-to-point links
    // (a TUN device is one).
    let mut local = None;
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(IpAddr::V4(ip)) => local = Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
            _ => {}
        }
    }
    local.or(address).map(|ip| (ip, message.header.prefix_len))
}
