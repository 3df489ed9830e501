//! IPv4 address management for berth networks: validating the CIDR a user asks for and picking free
//! instance addresses in it. Pure functions; the hub keeps the set of used addresses in etcd.
//!
//! In every network the first host address is the gateway (the bridge on each node), and neither the
//! network address nor the broadcast address is ever handed out.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Shortest prefix accepted: a /8 already holds 16M addresses.
pub const MIN_PREFIX: u8 = 8;
/// Longest prefix accepted: a /28 leaves 13 instance addresses after network, gateway and broadcast.
pub const MAX_PREFIX: u8 = 28;

/// Why a network CIDR was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    /// Nothing was given.
    #[error("cidr is empty; expected an IPv4 network like 10.10.0.0/16")]
    Empty,
    /// An IPv6 network; berth networks are IPv4 only for now.
    #[error("cidr {0:?} is IPv6; only IPv4 networks are supported, like 10.10.0.0/16")]
    Ipv6(String),
    /// No `/prefix` part.
    #[error("cidr {0:?} has no prefix length; expected an IPv4 network like 10.10.0.0/16")]
    MissingPrefix(String),
    /// Not an IPv4 address, or a prefix that is not a number from 0 to 32.
    #[error("cidr {0:?} is not an IPv4 network; expected one like 10.10.0.0/16")]
    Malformed(String),
    /// A prefix outside what berth accepts.
    #[error(
        "cidr {input:?}: prefix /{prefix} is out of range; expected /{MIN_PREFIX} to /{MAX_PREFIX}"
    )]
    PrefixOutOfRange {
        /// What the user typed.
        input: String,
        /// Its prefix length.
        prefix: u8,
    },
    /// Host bits are set: the address is inside the network, not the network itself.
    #[error("cidr {input:?} is not a network address (did you mean {suggestion}?)")]
    NotNetworkAddress {
        /// What the user typed.
        input: String,
        /// The network that contains it.
        suggestion: Ipv4Net,
    },
}

/// Parses and validates the CIDR of a new network: IPv4, prefix from /8 to /28, no host bits set.
pub fn parse_network_cidr(s: &str) -> Result<Ipv4Net, IpamError> {
    if s.is_empty() {
        return Err(IpamError::Empty);
    }
    if s.contains(':') {
        return Err(IpamError::Ipv6(s.to_owned()));
    }
    let Some((addr, prefix)) = s.split_once('/') else {
        return Err(IpamError::MissingPrefix(s.to_owned()));
    };
    let malformed = || IpamError::Malformed(s.to_owned());
    // u8's parser takes a leading '+'; only plain digits are a prefix length.
    if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    let prefix: u8 = prefix.parse().map_err(|_| malformed())?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| malformed())?;
    let net = Ipv4Net::new(addr, prefix).map_err(|_| malformed())?;
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
        return Err(IpamError::PrefixOutOfRange {
            input: s.to_owned(),
            prefix,
        });
    }
    if net.addr() != net.network() {
        return Err(IpamError::NotNetworkAddress {
            input: s.to_owned(),
            suggestion: net.trunc(),
        });
    }
    Ok(net)
}

/// The gateway of a network: its first host address. Meaningful for prefixes up to /30.
pub fn gateway(net: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).saturating_add(1))
}

/// Whether two networks share any address.
pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Picks a free instance address: never the network address, the gateway, or the broadcast; not in `used`.
/// `start` is a hint offset (hosts scanned from there, wrapping) so concurrent allocators don't all race for
/// the same address. `None` when the network is full.
pub fn allocate(net: &Ipv4Net, used: &HashSet<Ipv4Addr>, start: u32) -> Option<Ipv4Addr> {
    // Instance addresses run from network+2 (after the gateway) to broadcast-1.
    let first = u64::from(u32::from(net.network())) + 2;
    let last = u64::from(u32::from(net.broadcast())).checked_sub(1)?;
    let count = last.checked_sub(first)? + 1;
    let start = u64::from(start) % count;
    (0..count)
        .map(|i| first + (start + i) % count)
        // `first + offset` stays within the network, so it fits in u32.
        .filter_map(|a| u32::try_from(a).ok())
        .map(Ipv4Addr::from)
        .find(|a| !used.contains(a))
}

/// Picks a free host address of a range that has no gateway (service and tunnel ranges): anything but the
/// network and broadcast addresses, not in `used`, scanning from the hint `start`. `None` when full.
pub fn allocate_host(net: &Ipv4Net, used: &HashSet<Ipv4Addr>, start: u32) -> Option<Ipv4Addr> {
    let first = u64::from(u32::from(net.network())) + 1;
    let last = u64::from(u32::from(net.broadcast())).checked_sub(1)?;
    let count = last.checked_sub(first)? + 1;
    let start = u64::from(start) % count;
    (0..count)
        .map(|i| first + (start + i) % count)
        .filter_map(|a| u32::try_from(a).ok())
        .map(Ipv4Addr::from)
        .find(|a| !used.contains(a))
}

/// Smallest VXLAN id not in `used`, from [`FIRST_VNI`] up to the 24-bit maximum.
pub fn allocate_vni(used: &HashSet<u32>) -> Option<u32> {
    (FIRST_VNI..=MAX_VNI).find(|v| !used.contains(v))
}

/// VXLAN ids below this are left to the operator's own overlays.
pub const FIRST_VNI: u32 = 4096;
/// VXLAN ids are 24 bits.
pub const MAX_VNI: u32 = (1 << 24) - 1;

#[cfg(test)]
mod tests;
