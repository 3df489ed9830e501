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
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::AddressFamily;
use nix::sched::CloneFlags;
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth,
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
}

/// The link kinds `network` tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A Linux bridge.
    Bridge,
    /// One end of a veth pair.
    Veth,
    /// Anything else (loopback, physical, dummy...).
    Other,
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
    /// Creates a veth pair `name` here and `peer` directly in the network namespace of
    /// `peer_pid`, both with `mtu`. The peer never shows up in this namespace, so its name
    /// cannot collide with anything here.
    fn link_add_veth(
        &self,
        name: &str,
        mtu: u32,
        peer: &str,
        peer_pid: i32,
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

    async fn link_add_veth(
        &self,
        name: &str,
        mtu: u32,
        peer: &str,
        peer_pid: i32,
    ) -> Result<(), NetlinkError> {
        let target = format!("{name} (peer {peer} in pid {peer_pid})");
        let pid = u32::try_from(peer_pid)
            .map_err(|_| NetlinkError::from_errno("link_add_veth", &target, libc::ESRCH))?;
        let peer_message = LinkUnspec::new_with_name(peer)
            .mtu(mtu)
            .setns_by_pid(pid)
            .build();
        let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message)))
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("link_add_veth", target, e))
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
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn ipv4_of(message: &AddressMessage) -> Option<(Ipv4Addr, u8)> {
    if message.header.family != AddressFamily::Inet {
        return None;
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on point-to-point links.
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
