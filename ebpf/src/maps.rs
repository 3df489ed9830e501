//! Every map, pinned by name so that an agent restart finds the same maps (and the programs already
//! attached keep using them).

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuHashMap},
};
use berth_ebpf_common::{
    BackendKey, Counters, IfaceValue, LinkKey, ReverseKey, ReverseValue, ServiceValue,
    MAX_BACKENDS, MAX_IFACES, MAX_LINKS, MAX_NETWORKS, MAX_SERVICES, MAX_UDP_FLOWS,
};

/// Service VIP → service id and backend count.
#[map]
pub static SERVICES: HashMap<u32, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);

/// (service id, slot) → backend address.
#[map]
pub static BACKENDS: HashMap<BackendKey, u32> = HashMap::pinned(MAX_BACKENDS, 0);

/// UDP flows rewritten on send, so the reply's source can be turned back into the VIP.
#[map]
pub static UDP_REVERSE: LruHashMap<ReverseKey, ReverseValue> = LruHashMap::pinned(MAX_UDP_FLOWS, 0);

/// Host-side veth ifindex → the instance's network.
#[map]
pub static IFACES: HashMap<u32, IfaceValue> = HashMap::pinned(MAX_IFACES, 0);

/// Every berth network CIDR → network id.
#[map]
pub static NETWORKS: LpmTrie<u32, u32> = LpmTrie::pinned(MAX_NETWORKS, 0);

/// Linked network pairs.
#[map]
pub static LINKS: HashMap<LinkKey, u32> = HashMap::pinned(MAX_LINKS, 0);

/// Per-instance packet and byte counters.
#[map]
pub static COUNTERS: PerCpuHashMap<u32, Counters> = PerCpuHashMap::pinned(MAX_IFACES, 0);
