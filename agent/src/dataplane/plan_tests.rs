use super::*;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(
    id: &str,
    name: &str,
    cidr: &str,
    vni: u32,
    encrypted: bool,
    links: &[&str],
) -> v1::OverlayNetwork {
    let gw = cidr.replace(".0/24", ".1");
    v1::OverlayNetwork {
        network_id: id.into(),
        name: name.into(),
        cidr: cidr.into(),
        gateway: gw,
        vni,
        encrypted,
        linked_network_ids: links.iter().map(|s| s.to_string()).collect(),
    }
}

fn endpoint(
    iid: &str,
    cid: &str,
    name: &str,
    net: &str,
    ip: &str,
    node: &str,
    ready: bool,
) -> v1::Endpoint {
    v1::Endpoint {
        instance_id: iid.into(),
        container_id: cid.into(),
        container_name: name.into(),
        network_id: net.into(),
        ip: ip.into(),
        node_id: node.into(),
        ready,
    }
}

fn peer(node: &str, ip: &str, tunnel: &str, key: &str) -> v1::Peer {
    v1::Peer {
        node_id: node.into(),
        advertise_ip: ip.into(),
        tunnel_ip: tunnel.into(),
        wireguard_public_key: key.into(),
    }
}

fn view() -> v1::NetworkView {
    v1::NetworkView {
        networks: vec![
            net("net-a", "app", "10.1.0.0/24", 4096, false, &["net-s"]),
            net("net-s", "secret", "10.2.0.0/24", 4097, true, &["net-a"]),
        ],
        endpoints: vec![
            endpoint("ins-1", "ctr-web", "web", "net-a", "10.1.0.2", "n1", true),
            endpoint("ins-2", "ctr-web", "web", "net-a", "10.1.0.3", "n2", true),
            endpoint("ins-3", "ctr-web", "web", "net-a", "10.1.0.4", "n3", false),
            endpoint("ins-4", "ctr-db", "db", "net-s", "10.2.0.2", "n2", true),
        ],
        services: vec![
            v1::Service {
                container_id: "ctr-web".into(),
                name: "web".into(),
                network_id: "net-a".into(),
                vip: "10.96.0.5".into(),
            },
            v1::Service {
                container_id: "ctr-db".into(),
                name: "db".into(),
                network_id: "net-s".into(),
                vip: "10.96.0.2".into(),
            },
        ],
        peers: vec![
            peer("n2", "192.168.1.2", "10.201.0.2", "key2"),
            peer("n3", "192.168.1.3", "10.201.0.3", "key3"),
        ],
        tunnel_ip: "10.201.0.1".into(),
        tunnel_prefix_len: 16,
    }
}

#[test]
fn plain_networks_use_the_underlay_and_encrypted_ones_the_tunnel() {
    let plan = Plan::from_view(&view(), "n1", ip("192.168.1.1"));
    assert!(plan.problems.is_empty(), "{:?}", plan.problems);
    let a = plan.network("net-a").unwrap();
    assert_eq!(a.local, ip("192.168.1.1"));
    assert_eq!(a.mtu, VXLAN_MTU);
    assert_eq!(a.gateway, ip("10.1.0.1"));
    // Local instances are not remotes; not-ready ones still are (they are being started).
    assert_eq!(
        a.remotes,
        [
            RemoteEndpoint {
                ip: ip("10.1.0.3"),
                node_ip: ip("192.168.1.2")
            },
            RemoteEndpoint {
                ip: ip("10.1.0.4"),
                node_ip: ip("192.168.1.3")
            },
        ]
    );
    let s = plan.network("net-s").unwrap();
    assert_eq!(s.local, ip("10.201.0.1"));
    assert_eq!(s.mtu, VXLAN_OVER_WIREGUARD_MTU);
    assert_eq!(
        s.remotes,
        [RemoteEndpoint {
            ip: ip("10.2.0.2"),
            node_ip: ip("10.201.0.2")
        }]
    );
    // Only peers of encrypted networks are WireGuard peers.
    let tunnel = plan.tunnel.unwrap();
    assert_eq!(tunnel.address, ip("10.201.0.1"));
    assert_eq!(tunnel.prefix_len, 16);
    assert_eq!(tunnel.peers.len(), 1);
    assert_eq!(tunnel.peers[0].node_id, "n2");
    assert_eq!(tunnel.peers[0].endpoint, ip("192.168.1.2"));
    assert_eq!(plan.links, [(4096, 4097)]);
}

#[test]
fn services_get_ready_backends_and_names() {
    let plan = Plan::from_view(&view(), "n1", ip("192.168.1.1"));
    assert_eq!(plan.services.len(), 2);
    let db = &plan.services[0];
    assert_eq!((db.name.as_str(), db.network.as_str()), ("db", "secret"));
    assert_eq!(db.vip, ip("10.96.0.2"));
    assert_eq!(db.backends, [ip("10.2.0.2")]);
    let web = &plan.services[1];
    assert_eq!(web.backends, [ip("10.1.0.2"), ip("10.1.0.3")]);
    assert_eq!(plan.instances.len(), 4);
    assert_eq!(plan.instances[0].container, "web");
    assert_eq!(plan.instances[0].network, "app");
}

#[test]
fn bad_entries_are_left_out_and_named() {
    let mut v = view();
    v.networks
        .push(net("net-bad", "bad", "banana", 4098, false, &[]));
    v.networks
        .push(net("net-zero", "zero", "10.9.0.0/24", 0, false, &[]));
    v.endpoints.push(endpoint(
        "ins-9",
        "ctr-web",
        "web",
        "net-a",
        "not-an-ip",
        "n2",
        true,
    ));
    v.endpoints.push(endpoint(
        "ins-8",
        "ctr-web",
        "web",
        "net-a",
        "10.1.0.9",
        "n-unknown",
        true,
    ));
    v.peers[0].wireguard_public_key.clear();
    let plan = Plan::from_view(&v, "n1", ip("192.168.1.1"));
    assert_eq!(plan.networks.len(), 2);
    assert_eq!(plan.problems.len(), 5, "{:?}", plan.problems);
    // The encrypted network lost its only remote (peer without key): no WireGuard peer either.
    assert!(plan.network("net-s").unwrap().remotes.is_empty());
    assert!(plan.tunnel.unwrap().peers.is_empty());
}

#[test]
fn without_a_tunnel_address_encrypted_networks_wait() {
    let mut v = view();
    v.tunnel_ip.clear();
    let plan = Plan::from_view(&v, "n1", ip("192.168.1.1"));
    assert!(plan.network("net-s").is_none());
    assert!(plan.tunnel.is_none());
    // A link to a network not in the plan is no link.
    assert!(plan.links.is_empty());
    assert_eq!(plan.problems.len(), 1);
}

#[test]
fn an_empty_view_is_an_empty_plan() {
    let plan = Plan::from_view(&v1::NetworkView::default(), "n1", ip("192.168.1.1"));
    assert_eq!(plan, Plan::default());
}
