//! Unit tests of the manager's logic on the fake netlink (no root needed).

use std::net::Ipv4Addr;

use super::fake::{FakeNetlink, Ns};
use super::*;

const NET: &str = "net-00000000a0b1";
const BRIDGE: &str = "bn-00000000a0b1";
const INS: &str = "ins-0000000000c1";
const VETH: &str = "bv0000000000c1";
const PID: i32 = 4242;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 7);

fn plan() -> NetworkPlan {
    plan_with(16, VXLAN_MTU)
}

fn plan_with(prefix_len: u8, mtu: u32) -> NetworkPlan {
    NetworkPlan {
        network_id: NET.to_owned(),
        gateway: GATEWAY,
        prefix_len,
        mtu,
    }
}

fn manager() -> NetworkManager<FakeNetlink> {
    NetworkManager::with_netlink(FakeNetlink::new())
}

async fn manager_with_bridge() -> NetworkManager<FakeNetlink> {
    let manager = manager();
    manager.ensure_bridge(&plan()).await.expect("ensure_bridge");
    manager
}

/// Operations that change something (everything but reads).
fn mutations(calls: &[String]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| {
            ![
                " link_get ",
                " link_list",
                " addr_list ",
                " fdb_list ",
                " neigh_list ",
            ]
            .iter()
            .any(|read| c.contains(read))
        })
        .cloned()
        .collect()
}

/// Only `lo` is left in the container's namespace and no veth in the host's.
fn assert_no_veth(fake: &FakeNetlink) {
    assert!(
        fake.link(Ns::Host, VETH).is_none(),
        "host veth left behind: {:?}",
        fake.links(Ns::Host)
    );
    let inside: Vec<String> = fake
        .links(Ns::Pid(PID))
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert!(
        inside.iter().all(|n| n == "lo"),
        "container links left behind: {inside:?}"
    );
}

#[test]
fn the_real_manager_and_its_futures_are_send() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<NetworkManager>();
    // Never called: only has to type-check, so the reconciler can tokio::spawn these calls.
    let _check = |m: &'static NetworkManager, net: &'static NetworkPlan| {
        send(&m.ensure_bridge(net));
        send(&m.attach(INS, net, PID, IP));
        send(&m.detach(INS));
        send(&m.remove_bridge_if_unused(NET));
        send(&m.ensure_vxlan(NET, 7, IP, VXLAN_MTU));
        send(&m.sync_remotes(NET, &[]));
        send(&m.remove_vxlan(NET));
        send(&m.ensure_forwarding());
    };
}

#[test]
fn names_keep_id_suffixes_and_fit_ifnamsiz() {
    assert_eq!(bridge_name("net-0123456789ab"), "bn-0123456789ab");
    assert_eq!(host_veth_name("ins-0123456789ab"), "bv0123456789ab");
    for id in [
        "",
        "payments",
        "net-0123456789AB",
        "net-0123456789abc",
        "ins-xyz",
        "net-0123456789ab",
    ] {
        let (b, v) = (bridge_name(id), host_veth_name(id));
        assert!(b.len() <= 15 && v.len() <= 15, "{id}: {b} {v}");
        assert!(b.starts_with("bn-") && v.starts_with("bv"));
        assert_eq!(b, bridge_name(id), "stable");
    }
    // Anything that is not prefix + 12 lower-case hex is hashed, so it differs from the suffix.
    assert_ne!(bridge_name("net-0123456789AB"), "bn-0123456789AB");
    assert_ne!(bridge_name("a"), bridge_name("b"));
    assert_ne!(host_veth_name("net-0123456789ab"), "bv0123456789ab");
}

#[test]
fn bridge_macs_are_stable_local_unicast_and_per_network() {
    let mac = bridge_mac(NET);
    assert_eq!(mac, bridge_mac(NET));
    assert_eq!(
        mac[0] & 0b11,
        0b10,
        "locally administered, unicast: {mac:02x?}"
    );
    assert_ne!(mac, bridge_mac("net-00000000a0b2"));
}

#[tokio::test]
async fn ensure_bridge_creates_addresses_and_ups_then_is_a_no_op() {
    let manager = manager();
    let name = manager.ensure_bridge(&plan()).await.expect("first");
    assert_eq!(name, BRIDGE);
    let fake = manager.netlink();
    let bridge = fake.link(Ns::Host, BRIDGE).expect("bridge exists");
    assert_eq!(bridge.kind, LinkKind::Bridge);
    assert!(bridge.up);
    assert_eq!(bridge.mtu, VXLAN_MTU);
    assert_eq!(fake.addresses(Ns::Host, BRIDGE), vec![(GATEWAY, 16)]);
    let mac = bridge_mac(NET).map(|b| format!("{b:02x}")).join(":");
    assert!(fake
        .calls()
        .contains(&format!("host link_add_bridge {BRIDGE} mac {mac}")));

    let before = fake.calls().len();
    manager.ensure_bridge(&plan()).await.expect("second");
    let again = mutations(&fake.calls()[before..]);
    assert!(
        again.is_empty(),
        "second ensure_bridge changed things: {again:?}"
    );
}

#[tokio::test]
async fn ensure_bridge_fixes_a_bridge_found_down_and_a_stale_prefix() {
    let manager = manager();
    let fake = manager.netlink();
    let index = fake.add_link(Ns::Host, BRIDGE, LinkKind::Bridge);
    fake.addr_add(index, GATEWAY, 24)
        .await
        .expect("seed address");
    manager.ensure_bridge(&plan()).await.expect("ensure");
    assert_eq!(fake.addresses(Ns::Host, BRIDGE), vec![(GATEWAY, 16)]);
    assert!(fake.link(Ns::Host, BRIDGE).expect("bridge").up);
}

#[tokio::test]
async fn ensure_bridge_refuses_a_link_that_is_not_a_bridge() {
    let manager = manager();
    manager.netlink().add_link(Ns::Host, BRIDGE, LinkKind::Veth);
    let err = manager
        .ensure_bridge(&plan())
        .await
        .expect_err("not a bridge");
    assert!(
        matches!(err, NetworkError::NotABridge { ref name } if name == BRIDGE),
        "{err}"
    );
}

#[tokio::test]
async fn ensure_bridge_reports_kernel_errors_with_the_operation() {
    let manager = manager();
    manager.netlink().fail("addr_add", libc::EPERM);
    let err = manager
        .ensure_bridge(&plan())
        .await
        .expect_err("addr_add fails");
    let message = err.to_string();
    assert!(
        message.contains("addr_add") && message.contains("10.10.0.1/16"),
        "{message}"
    );
    assert!(matches!(err, NetworkError::Netlink(ref e) if e.is(libc::EPERM)));
}

#[tokio::test]
async fn invalid_prefixes_are_refused_before_touching_the_kernel() {
    let manager = manager();
    for prefix in [0, 33] {
        let err = manager
            .ensure_bridge(&plan_with(prefix, DEFAULT_MTU))
            .await
            .expect_err("bad prefix");
        assert!(matches!(err, NetworkError::InvalidPrefix { prefix_len } if prefix_len == prefix));
        let err = manager
            .attach(INS, &plan_with(prefix, DEFAULT_MTU), PID, IP)
            .await
            .expect_err("bad prefix");
        assert!(matches!(err, NetworkError::InvalidPrefix { .. }));
    }
    for mtu in [0, 1279, 65536] {
        let err = manager
            .ensure_bridge(&plan_with(16, mtu))
            .await
            .expect_err("bad mtu");
        assert!(matches!(err, NetworkError::InvalidMtu { mtu: m } if m == mtu));
        let err = manager
            .attach(INS, &plan_with(16, mtu), PID, IP)
            .await
            .expect_err("bad mtu");
        assert!(matches!(err, NetworkError::InvalidMtu { .. }));
    }
    assert!(manager.netlink().calls().is_empty());
}

#[tokio::test]
async fn attach_plugs_a_veth_into_the_bridge_and_configures_eth0() {
    let manager = manager_with_bridge().await;
    let attached = manager.attach(INS, &plan(), PID, IP).await.expect("attach");
    let fake = manager.netlink();

    let bridge = fake.link(Ns::Host, BRIDGE).expect("bridge");
    let host_end = fake.link(Ns::Host, VETH).expect("host veth");
    assert_eq!(host_end.master, Some(bridge.index));
    assert!(host_end.up);
    assert_eq!(host_end.mtu, VXLAN_MTU);
    assert_eq!(
        attached,
        Attached {
            veth: VETH.to_owned(),
            ifindex: host_end.index,
            mac: [0x0a, 0x58, 10, 10, 0, 7],
        }
    );
    assert!(
        fake.link(Ns::Host, CONTAINER_IFNAME).is_none(),
        "peer must never live in the host"
    );

    let eth0 = fake
        .link(Ns::Pid(PID), CONTAINER_IFNAME)
        .expect("eth0 in the container");
    assert!(eth0.up);
    assert_eq!(eth0.mtu, VXLAN_MTU);
    assert_eq!(
        fake.mac(Ns::Pid(PID), CONTAINER_IFNAME),
        Some(instance_mac(IP))
    );
    assert_eq!(
        fake.addresses(Ns::Pid(PID), CONTAINER_IFNAME),
        vec![(IP, 16)]
    );
    assert!(fake.link(Ns::Pid(PID), "lo").expect("lo").up);
    assert_eq!(
        fake.default_gateway(Ns::Pid(PID), CONTAINER_IFNAME),
        Some(GATEWAY)
    );
    // The only route berth adds, and only inside the container.
    let routes: Vec<String> = fake
        .calls()
        .into_iter()
        .filter(|c| c.contains("route"))
        .collect();
    assert_eq!(
        routes,
        vec![format!(
            "pid{PID} route_replace_default #{} via {GATEWAY}",
            eth0.index
        )]
    );
}

#[test]
fn instance_macs_embed_the_ip_and_are_local_unicast() {
    let mac = instance_mac(Ipv4Addr::new(10, 77, 0, 9));
    assert_eq!(mac, [0x0a, 0x58, 10, 77, 0, 9]);
    assert_eq!(mac[0] & 0b11, 0b10, "locally administered, unicast");
    assert_ne!(mac, instance_mac(Ipv4Addr::new(10, 77, 0, 10)));
}

#[tokio::test]
async fn ensure_bridge_follows_a_changed_mtu() {
    let manager = manager_with_bridge().await;
    manager
        .ensure_bridge(&plan_with(16, VXLAN_OVER_WIREGUARD_MTU))
        .await
        .expect("new mtu");
    let bridge = manager.netlink().link(Ns::Host, BRIDGE).expect("bridge");
    assert_eq!(bridge.mtu, VXLAN_OVER_WIREGUARD_MTU);
}

#[tokio::test]
async fn attach_without_bridge_fails_and_makes_nothing() {
    let manager = manager();
    let err = manager
        .attach(INS, &plan(), PID, IP)
        .await
        .expect_err("no bridge");
    assert!(
        matches!(err, NetworkError::BridgeMissing { ref bridge, .. } if bridge == BRIDGE),
        "{err}"
    );
    assert!(mutations(&manager.netlink().calls()).is_empty());
}

#[tokio::test]
async fn attach_to_a_vanished_process_leaves_no_veth() {
    let manager = manager_with_bridge().await;
    manager.netlink().kill(PID);
    let err = manager
        .attach(INS, &plan(), PID, IP)
        .await
        .expect_err("dead pid");
    assert!(
        matches!(err, NetworkError::Netlink(ref e) if e.is(libc::ESRCH)),
        "{err}"
    );
    assert_no_veth(manager.netlink());
}

#[tokio::test]
async fn attach_removes_its_veth_when_any_later_step_fails() {
    let cases: [(Option<Ns>, &'static str); 7] = [
        (Some(Ns::Host), "link_set_master"),
        (Some(Ns::Host), "link_set_up"),
        (None, "configure_netns"),
        (Some(Ns::Pid(PID)), "link_get"),
        (Some(Ns::Pid(PID)), "addr_add"),
        (Some(Ns::Pid(PID)), "link_set_up"),
        (Some(Ns::Pid(PID)), "route_replace_default"),
    ];
    for (ns, op) in cases {
        let manager = manager_with_bridge().await;
        let fake = manager.netlink();
        match ns {
            Some(ns) => fake.fail_in(ns, op, libc::EBUSY),
            None => fake.fail(op, libc::EBUSY),
        }
        let err = manager.attach(INS, &plan(), PID, IP).await.expect_err(op);
        assert!(
            matches!(err, NetworkError::Netlink(ref e) if e.is(libc::EBUSY) && e.op == op),
            "{op}: {err}"
        );
        assert_no_veth(fake);
        // And a retry then works.
        manager.attach(INS, &plan(), PID, IP).await.expect("retry");
        assert!(
            fake.link(Ns::Host, VETH).is_some(),
            "{op}: retry made no veth"
        );
    }
}

#[tokio::test]
async fn attach_reports_both_errors_when_the_cleanup_fails_too() {
    let manager = manager_with_bridge().await;
    let fake = manager.netlink();
    fake.fail_in(Ns::Pid(PID), "addr_add", libc::EBUSY);
    fake.fail("link_del", libc::EPERM);
    let err = manager
        .attach(INS, &plan(), PID, IP)
        .await
        .expect_err("both fail");
    match &err {
        NetworkError::AttachRollback {
            instance_id,
            veth,
            error,
            cleanup,
        } => {
            assert_eq!((instance_id.as_str(), veth.as_str()), (INS, VETH));
            assert!(matches!(**error, NetworkError::Netlink(ref e) if e.is(libc::EBUSY)));
            assert!(matches!(**cleanup, NetworkError::Netlink(ref e) if e.is(libc::EPERM)));
        }
        other => panic!("expected AttachRollback, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(INS) && message.contains("addr_add") && message.contains("link_del"),
        "{message}"
    );
}

#[tokio::test]
async fn attach_deletes_a_stale_veth_of_the_same_instance_first() {
    let manager = manager_with_bridge().await;
    let fake = manager.netlink();
    let stale = fake.add_link(Ns::Host, VETH, LinkKind::Veth);
    manager.attach(INS, &plan(), PID, IP).await.expect("attach");
    let host_end = fake.link(Ns::Host, VETH).expect("new veth");
    assert_ne!(host_end.index, stale);
    assert!(fake.calls().contains(&format!("host link_del #{stale}")));
}

#[tokio::test]
async fn detach_removes_the_pair_and_is_idempotent() {
    let manager = manager_with_bridge().await;
    manager.attach(INS, &plan(), PID, IP).await.expect("attach");
    manager.detach(INS).await.expect("detach");
    assert_no_veth(manager.netlink());
    manager.detach(INS).await.expect("second detach");
}

#[tokio::test]
async fn detach_tolerates_a_veth_vanishing_under_it() {
    let manager = manager_with_bridge().await;
    manager.attach(INS, &plan(), PID, IP).await.expect("attach");
    manager.netlink().fail("link_del", libc::ENODEV);
    manager.detach(INS).await.expect("ENODEV counts as gone");
}

#[tokio::test]
async fn remove_bridge_only_when_no_port_is_left() {
    let manager = manager_with_bridge().await;
    manager.attach(INS, &plan(), PID, IP).await.expect("attach");
    assert!(!manager.remove_bridge_if_unused(NET).await.expect("in use"));
    assert!(manager.netlink().link(Ns::Host, BRIDGE).is_some());

    manager.detach(INS).await.expect("detach");
    assert!(manager.remove_bridge_if_unused(NET).await.expect("unused"));
    assert!(manager.netlink().link(Ns::Host, BRIDGE).is_none());
    assert!(!manager
        .remove_bridge_if_unused(NET)
        .await
        .expect("already gone"));
}

#[tokio::test]
async fn orphans_go_unless_kept_or_still_holding_an_instance() {
    let manager = manager_with_bridge().await;
    manager.attach(INS, &plan(), PID, IP).await.expect("attach");
    let other = "net-0000000000bb";
    let other_plan = NetworkPlan {
        network_id: other.into(),
        ..plan()
    };
    manager.ensure_bridge(&other_plan).await.expect("bridge");
    manager
        .ensure_vxlan(other, 4097, Ipv4Addr::new(192, 0, 2, 1), 1450)
        .await
        .expect("vxlan");
    manager
        .netlink()
        .add_link(Ns::Host, "eth0", LinkKind::Other);
    // NET still has an instance: only the other network's links go; eth0 is not berth's.
    let removed = manager.remove_orphans(&[]).await.expect("sweep");
    assert_eq!(removed, vec![vxlan_name(other), bridge_name(other)]);
    assert!(manager.netlink().link(Ns::Host, BRIDGE).is_some());
    assert!(manager.netlink().link(Ns::Host, "eth0").is_some());
    // Kept networks stay even when empty.
    manager.detach(INS).await.expect("detach");
    assert!(manager
        .remove_orphans(&[NET.to_owned()])
        .await
        .expect("sweep")
        .is_empty());
    assert_eq!(
        manager.remove_orphans(&[]).await.expect("sweep"),
        vec![BRIDGE.to_owned()]
    );
}

#[tokio::test]
async fn remove_bridge_refuses_a_link_that_is_not_a_bridge() {
    let manager = manager();
    manager
        .netlink()
        .add_link(Ns::Host, BRIDGE, LinkKind::Other);
    let err = manager
        .remove_bridge_if_unused(NET)
        .await
        .expect_err("not ours");
    assert!(matches!(err, NetworkError::NotABridge { .. }));
    assert!(manager.netlink().link(Ns::Host, BRIDGE).is_some());
}
