//! What the tc classifiers on an instance's host-side veth share: network isolation and counters.
//!
//! On the host side of a veth, *ingress* carries what the container sends and *egress* what it
//! receives. The instance's own network comes from `IFACES[ifindex]`; the other side's from the
//! `NETWORKS` trie. Traffic between two different berth networks passes only if the pair is in
//! `LINKS`; traffic with anything that is not a berth network (the host, the outside) and non-IPv4
//! traffic (ARP) always passes.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use berth_ebpf_common::{Counters, LinkKey};

use crate::maps::{COUNTERS, IFACES, LINKS, NETWORKS};

const ETH_HLEN: usize = 14;
/// `ETH_P_IP` in network order, as read from the packet into a native u16.
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_PROTO_OFFSET: usize = 12;
const IP_SRC_OFFSET: usize = ETH_HLEN + 12;
const IP_DST_OFFSET: usize = ETH_HLEN + 16;

/// Policy and counting for one packet; `from_container` is true on the veth's ingress.
#[inline(always)]
pub fn handle(ctx: &TcContext, from_container: bool) -> i32 {
    // SAFETY: the kernel passes a valid `__sk_buff` for the duration of the call.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let verdict = verdict(ctx, ifindex, from_container);
    count(ifindex, from_container, verdict == TC_ACT_OK, ctx.len());
    verdict
}

#[inline(always)]
fn verdict(ctx: &TcContext, ifindex: u32, from_container: bool) -> i32 {
    let Ok(proto) = ctx.load::<u16>(ETH_PROTO_OFFSET) else {
        return TC_ACT_OK;
    };
    if proto != ETH_P_IP_BE {
        return TC_ACT_OK;
    }
    // SAFETY: the value is copied out at once.
    let Some(own) = (unsafe { IFACES.get(&ifindex) }).map(|v| v.network_id) else {
        return TC_ACT_OK;
    };
    let offset = if from_container {
        IP_DST_OFFSET
    } else {
        IP_SRC_OFFSET
    };
    let Ok(other_ip) = ctx.load::<u32>(offset) else {
        return TC_ACT_OK;
    };
    let Some(other) = NETWORKS.get(&Key::new(32, other_ip)).copied() else {
        return TC_ACT_OK;
    };
    if other == own {
        return TC_ACT_OK;
    }
    // SAFETY: only presence matters.
    if unsafe { LINKS.get(&LinkKey::new(own, other)) }.is_some() {
        return TC_ACT_OK;
    }
    TC_ACT_SHOT
}

#[inline(always)]
fn count(ifindex: u32, from_container: bool, passed: bool, len: u32) {
    let len = u64::from(len);
    match COUNTERS.get_ptr_mut(&ifindex) {
        Some(c) => {
            // SAFETY: a per-CPU value: only this CPU writes it while this program runs.
            let c = unsafe { &mut *c };
            match (from_container, passed) {
                (true, true) => {
                    c.tx_packets += 1;
                    c.tx_bytes += len;
                }
                (false, true) => {
                    c.rx_packets += 1;
                    c.rx_bytes += len;
                }
                (true, false) => c.tx_dropped += 1,
                (false, false) => c.rx_dropped += 1,
            }
        }
        None => {
            // The agent creates the entry when it attaches; this covers a race with that only.
            let mut c = Counters::default();
            match (from_container, passed) {
                (true, true) => {
                    c.tx_packets = 1;
                    c.tx_bytes = len;
                }
                (false, true) => {
                    c.rx_packets = 1;
                    c.rx_bytes = len;
                }
                (true, false) => c.tx_dropped = 1,
                (false, false) => c.rx_dropped = 1,
            }
            let _ = COUNTERS.insert(&ifindex, &c, 0);
        }
    }
}
