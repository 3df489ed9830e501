//! The types berth's eBPF programs (`ebpf/`) and the agent (`agent/src/ebpf/`) share: map names,
//! sizes, keys and values.
//!
//! One definition for both halves so they cannot drift. Every type is `#[repr(C)]`, made only of
//! integers, with explicit padding fields (the kernel compares keys byte for byte, so no byte may be
//! left uninitialised). IPv4 addresses and ports are kept as the kernel hands them over: the address
//! bytes in network order read as a native `u32` (`u32::from_ne_bytes(addr.octets())`), a port as a
//! `u32` whose low 16 bits hold the port in network order (`bpf_sock_addr.user_port`).
#![no_std]

/// `SERVICES`: service VIP → [`ServiceValue`].
pub const SERVICES_MAP: &str = "SERVICES";
/// `BACKENDS`: [`BackendKey`] → backend IPv4 address.
pub const BACKENDS_MAP: &str = "BACKENDS";
/// `UDP_REVERSE`: [`ReverseKey`] → [`ReverseValue`], filled on send, read on receive.
pub const UDP_REVERSE_MAP: &str = "UDP_REVERSE";
/// `IFACES`: host-side veth ifindex → [`IfaceValue`].
pub const IFACES_MAP: &str = "IFACES";
/// `NETWORKS`: LPM trie of every berth network CIDR the node knows → network id.
pub const NETWORKS_MAP: &str = "NETWORKS";
/// `LINKS`: [`LinkKey`] → 1 when the two networks may talk.
pub const LINKS_MAP: &str = "LINKS";
/// `COUNTERS`: per-CPU ifindex → [`Counters`].
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Every map, in the order the agent pins and unpins them.
pub const ALL_MAPS: [&str; 7] = [
    SERVICES_MAP,
    BACKENDS_MAP,
    UDP_REVERSE_MAP,
    IFACES_MAP,
    NETWORKS_MAP,
    LINKS_MAP,
    COUNTERS_MAP,
];

/// Program names (the function names in `ebpf/src/`).
pub const CONNECT4_PROG: &str = "berth_connect4";
/// See [`CONNECT4_PROG`].
pub const SENDMSG4_PROG: &str = "berth_sendmsg4";
/// See [`CONNECT4_PROG`].
pub const RECVMSG4_PROG: &str = "berth_recvmsg4";
/// The tc classifier on the clsact ingress of a host-side veth (what the container sends).
pub const TC_INGRESS_PROG: &str = "berth_tc_ingress";
/// The tc classifier on the clsact egress of a host-side veth (what the container receives).
pub const TC_EGRESS_PROG: &str = "berth_tc_egress";

/// Maximum number of services (VIPs) per node.
pub const MAX_SERVICES: u32 = 4096;
/// Maximum number of backends over all services.
pub const MAX_BACKENDS: u32 = 65536;
/// Maximum number of UDP flows remembered for reply rewriting (LRU).
pub const MAX_UDP_FLOWS: u32 = 65536;
/// Maximum number of instance veths per node.
pub const MAX_IFACES: u32 = 4096;
/// Maximum number of berth networks known to a node.
pub const MAX_NETWORKS: u32 = 4096;
/// Maximum number of network links.
pub const MAX_LINKS: u32 = 16384;

/// A service: its id (the key prefix of its backends) and how many backends it has.
///
/// `backend_count == 0` means the VIP exists but has no replica: connections are refused rather
/// than sent to the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Node-local service id, stable while the VIP exists.
    pub service_id: u32,
    /// Backends are at indices `0..backend_count` in `BACKENDS`.
    pub backend_count: u32,
}

/// Key of one backend slot of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// [`ServiceValue::service_id`].
    pub service_id: u32,
    /// Slot, `0..backend_count`.
    pub index: u32,
}

/// A UDP flow after rewriting: which socket sent to which backend address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    /// `bpf_get_socket_cookie` of the sending socket.
    pub cookie: u64,
    /// Backend address (network order).
    pub ip: u32,
    /// Port (network order in the low 16 bits).
    pub port: u32,
}

/// What a reply from a [`ReverseKey`] backend must look like it came from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReverseValue {
    /// The service VIP (network order).
    pub vip: u32,
    /// The port the socket sent to (network order in the low 16 bits).
    pub port: u32,
}

/// One instance's host-side veth.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IfaceValue {
    /// The instance's network (the id the agent assigns, e.g. the VNI).
    pub network_id: u32,
    /// Reserved, 0.
    pub flags: u32,
}

/// An unordered pair of linked networks, stored with `a < b`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkKey {
    /// The smaller network id.
    pub a: u32,
    /// The larger network id.
    pub b: u32,
}

impl LinkKey {
    /// The key of the pair `{x, y}`, whatever their order.
    pub const fn new(x: u32, y: u32) -> Self {
        if x < y {
            Self { a: x, b: y }
        } else {
            Self { a: y, b: x }
        }
    }
}

/// Traffic of one instance veth, from the container's point of view (tx = sent by the container).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counters {
    /// Packets sent by the container and let through.
    pub tx_packets: u64,
    /// Bytes of those packets (as the skb length: L2 header included).
    pub tx_bytes: u64,
    /// Packets to the container let through.
    pub rx_packets: u64,
    /// Bytes of those packets.
    pub rx_bytes: u64,
    /// Packets sent by the container and dropped by policy.
    pub tx_dropped: u64,
    /// Packets to the container dropped by policy.
    pub rx_dropped: u64,
}

impl Counters {
    /// Field-wise sum (used to add up the per-CPU values).
    #[must_use]
    pub const fn add(self, o: Self) -> Self {
        Self {
            tx_packets: self.tx_packets.wrapping_add(o.tx_packets),
            tx_bytes: self.tx_bytes.wrapping_add(o.tx_bytes),
            rx_packets: self.rx_packets.wrapping_add(o.rx_packets),
            rx_bytes: self.rx_bytes.wrapping_add(o.rx_bytes),
            tx_dropped: self.tx_dropped.wrapping_add(o.tx_dropped),
            rx_dropped: self.rx_dropped.wrapping_add(o.rx_dropped),
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        BackendKey, Counters, IfaceValue, LinkKey, ReverseKey, ReverseValue, ServiceValue,
    };

    // SAFETY: each type is `#[repr(C)]`, made only of integers, with no implicit padding (fields
    // are sized so that every byte belongs to a field), so any bit pattern is a valid value and
    // every byte is initialised.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ReverseKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ReverseValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IfaceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LinkKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counters {}
}

// The layouts the kernel side relies on: no hidden padding.
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 8);
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);
const _: () = assert!(core::mem::size_of::<ReverseKey>() == 16);
const _: () = assert!(core::mem::size_of::<ReverseValue>() == 8);
const _: () = assert!(core::mem::size_of::<IfaceValue>() == 8);
const _: () = assert!(core::mem::size_of::<LinkKey>() == 8);
const _: () = assert!(core::mem::size_of::<Counters>() == 48);
