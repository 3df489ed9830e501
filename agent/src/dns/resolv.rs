//! `resolv.conf`: the one berth writes into containers, and the host's, read for upstreams.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use super::records::ZONE;

/// The port every `nameserver` line of `resolv.conf` implies.
const DNS_PORT: u16 = 53;

/// The `/etc/resolv.conf` of a container on `network_name`, whose node serves DNS on the
/// network's gateway address `nameserver`.
///
/// The search list makes `web` and `ins-1.web` resolve within the container's own network and
/// `web.other-net` across networks: with `ndots:2`, names with fewer than two dots try the
/// search list first. For outside names such as `example.com` that costs two misses, but the
/// node answers those at once (NXDOMAIN) without going upstream.
pub fn resolv_conf(nameserver: Ipv4Addr, network_name: &str) -> String {
    format!(
        "# Written by berth: the node's agent answers *.{ZONE} and forwards other names.\n\
         nameserver {nameserver}\n\
         search {network}.{ZONE} {ZONE}\n\
         options ndots:2 timeout:2 attempts:2\n",
        network = network_name.to_ascii_lowercase(),
    )
}

/// The upstream resolvers named by a `resolv.conf` text, in order, each once, on port 53.
///
/// Loopback stub resolvers (`127.0.0.53` of systemd-resolved, a local dnsmasq) are kept: the
/// agent runs in the host's network namespace, where they answer. Lines that are not
/// `nameserver <address>` and addresses that do not parse are skipped. A link-local IPv6
/// address may carry its interface as `%<index>` or `%<name>`.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut upstreams = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else {
            continue;
        };
        let Some(addr) = parse_nameserver(word) else {
            tracing::warn!(
                nameserver = word,
                "unusable nameserver in resolv.conf skipped"
            );
            continue;
        };
        if !upstreams.contains(&addr) {
            upstreams.push(addr);
        }
    }
    upstreams
}

fn parse_nameserver(word: &str) -> Option<SocketAddr> {
    if let Ok(ip) = word.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, DNS_PORT));
    }
    let (ip, scope) = word.split_once('%')?;
    let ip: Ipv6Addr = ip.parse().ok()?;
    let scope_id = match scope.parse::<u32>() {
        Ok(index) => index,
        Err(_) => nix::net::if_::if_nametoindex(scope).ok()?,
    };
    Some(SocketAddr::V6(SocketAddrV6::new(ip, DNS_PORT, 0, scope_id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_resolv_conf_points_at_the_gateway() {
        let text = resolv_conf(Ipv4Addr::new(10, 1, 0, 1), "Front");
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "nameserver 10.1.0.1",
                "search front.berth berth",
                "options ndots:2 timeout:2 attempts:2"
            ]
        );
        assert!(text.ends_with('\n'));
        assert_eq!(
            upstreams_from_resolv_conf(&text),
            ["10.1.0.1:53".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn nameservers_are_read_in_order_with_stubs_kept() {
        let text = "# comment\n\
                    ; nameserver 9.9.9.9\n\
                    search example.com\n\
                    nameserver 127.0.0.53\n\
                    nameserver\t192.0.2.1   # trailing comment\n\
                    nameserver 2001:db8::1\n\
                    nameserver fe80::1%3\n\
                    nameserver 127.0.0.53\n\
                    nameserver not-an-address\n\
                    nameserver\n\
                    options edns0 trust-ad\n";
        let expected: Vec<SocketAddr> = vec![
            "127.0.0.53:53".parse().unwrap(),
            "192.0.2.1:53".parse().unwrap(),
            "[2001:db8::1]:53".parse().unwrap(),
            SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 53, 0, 3)),
        ];
        assert_eq!(upstreams_from_resolv_conf(text), expected);
    }

    #[test]
    fn scope_names_resolve_through_the_kernel() {
        // `lo` exists in every network namespace.
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        assert_eq!(
            upstreams_from_resolv_conf("nameserver fe80::2%lo\nnameserver fe80::3%no-such-if0\n"),
            [SocketAddr::V6(SocketAddrV6::new(
                "fe80::2".parse().unwrap(),
                53,
                0,
                lo
            ))]
        );
    }

    #[test]
    fn empty_or_commented_files_have_no_upstream() {
        assert!(upstreams_from_resolv_conf("").is_empty());
        assert!(upstreams_from_resolv_conf("#nameserver 1.1.1.1\n  \nsearch x\n").is_empty());
        assert!(upstreams_from_resolv_conf("nameservers 1.1.1.1\n").is_empty());
    }
}
