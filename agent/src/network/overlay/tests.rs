//! Unit tests of the overlay on the fake netlink: VXLAN device upkeep and the remote sync diff.

use std::net::Ipv4Addr;

use super::super::fake::{FakeNetlink, Ns};
use super::super::*;
use super::SyncPlan;

const NET: &str = "net-00000000a0b1";
const BRIDGE: &str = "bn-00000000a0b1";
const VXLAN: &str = "bx00000000a0b1";
const VNI: u32 = 4242;
const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const NODE3: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);

fn ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, host)
}

fn remote(host: u8, node_ip: Ipv4Addr) -> Remote {
    Remote {
        ip: ip(host),
        node_ip,
    }
}

async fn manager_with_vxlan() -> NetworkManager<FakeNetlink> {
    let manager = NetworkManager::with_netlink(FakeNetlink::new());
    let net = NetworkPlan {
        network_id: NET.to_owned(),
        gateway: ip(1),
        prefix_len: 24,
        mtu: VXLAN_MTU,
    };
    manager.ensure_bridge(&net).await.expect("ensure_bridge");
    manager
        .ensure_vxlan(NET, VNI, LOCAL, VXLAN_MTU)
        .await
        .expect("ensure_vxlan");
    manager
}

/// Calls that change something.
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

/// What the kernel must hold for `remotes` (all remote, distinct IPs): sorted like the fake's.
fn expected(remotes: &[Remote]) -> (Vec<FdbEntry>, Vec<Neighbour>) {
    let mut fdb = Vec::new();
    let mut neighbours = Vec::new();
    for r in remotes {
        let mac = instance_mac(r.ip);
        fdb.push(FdbEntry {
            mac,
            dst: Some(r.node_ip),
        });
        fdb.push(FdbEntry { mac, dst: None });
        neighbours.push(Neighbour { ip: r.ip, mac });
    }
    fdb.sort();
    neighbours.sort();
    (fdb, neighbours)
}

fn assert_holds(manager: &NetworkManager<FakeNetlink>, remotes: &[Remote]) {
    let fake = manager.netlink();
    let (fdb, neighbours) = expected(remotes);
    assert_eq!(fake.fdb(Ns::Host, VXLAN), fdb, "fdb");
    assert_eq!(fake.neighbours(Ns::Host, VXLAN), neighbours, "neighbours");
}

#[tokio::test]
async fn ensure_vxlan_makes_a_proxying_non_learning_port_of_the_bridge() {
    let manager = manager_with_vxlan().await;
    let fake = manager.netlink();
    let bridge = fake.link(Ns::Host, BRIDGE).expect("bridge");
    let vxlan = fake.link(Ns::Host, VXLAN).expect("vxlan");
    assert_eq!(
        vxlan.kind,
        LinkKind::Vxlan(VxlanParams {
            vni: VNI,
            local: Some(LOCAL),
            port: VXLAN_PORT,
            learning: false,
            proxy: true,
        })
    );
    assert_eq!(vxlan.master, Some(bridge.index));
    assert_eq!(
        vxlan.bridge_port,
        Some(BridgePortFlags {
            learning: false,
            neigh_suppress: true,
        })
    );
    assert_eq!(vxlan.mtu, VXLAN_MTU);
    assert!(vxlan.up);

    let before = fake.calls().len();
    let name = manager
        .ensure_vxlan(NET, VNI, LOCAL, VXLAN_MTU)
        .await
        .expect("again");
    assert_eq!(name, VXLAN);
    let again = mutations(&fake.calls()[before..]);
    assert!(
        again.is_empty(),
        "second ensure_vxlan changed things: {again:?}"
    );
}

#[tokio::test]
async fn ensure_vxlan_needs_the_bridge_and_a_valid_vni() {
    let manager = NetworkManager::with_netlink(FakeNetlink::new());
    let err = manager
        .ensure_vxlan(NET, VNI, LOCAL, VXLAN_MTU)
        .await
        .expect_err("no bridge");
    assert!(matches!(err, NetworkError::BridgeMissing { .. }), "{err}");
    for vni in [0, 1 << 24] {
        let err = manager
            .ensure_vxlan(NET, vni, LOCAL, VXLAN_MTU)
            .await
            .expect_err("bad vni");
        assert!(
            matches!(err, NetworkError::InvalidVni { vni: v } if v == vni),
            "{err}"
        );
    }
    assert!(mutations(&manager.netlink().calls()).is_empty());
}

#[tokio::test]
async fn ensure_vxlan_replaces_a_device_with_another_vni_or_local_and_fixes_mtu() {
    let manager = manager_with_vxlan().await;
    let fake = manager.netlink();
    manager
        .sync_remotes(NET, &[remote(2, NODE2)])
        .await
        .expect("sync");
    let old = fake.link(Ns::Host, VXLAN).expect("vxlan");

    manager
        .ensure_vxlan(NET, VNI, LOCAL, VXLAN_OVER_WIREGUARD_MTU)
        .await
        .expect("mtu change");
    let same = fake.link(Ns::Host, VXLAN).expect("vxlan");
    assert_eq!(same.index, old.index, "an mtu change keeps the device");
    assert_eq!(same.mtu, VXLAN_OVER_WIREGUARD_MTU);

    for (vni, local) in [(VNI + 1, LOCAL), (VNI + 1, NODE3)] {
        let before = fake.link(Ns::Host, VXLAN).expect("vxlan");
        manager
            .ensure_vxlan(NET, vni, local, VXLAN_MTU)
            .await
            .expect("replace");
        let new = fake.link(Ns::Host, VXLAN).expect("vxlan");
        assert_ne!(new.index, before.index, "replaced");
        assert!(matches!(new.kind, LinkKind::Vxlan(p) if p.vni == vni && p.local == Some(local)));
        assert_eq!(new.master, fake.link(Ns::Host, BRIDGE).map(|b| b.index));
        assert!(new.up);
        assert!(
            fake.fdb(Ns::Host, VXLAN).is_empty(),
            "entries went with the device"
        );
    }
}

#[tokio::test]
async fn ensure_vxlan_refuses_a_foreign_link_of_its_name() {
    let manager = manager_with_vxlan().await;
    let fake = manager.netlink();
    let vxlan = fake.link(Ns::Host, VXLAN).expect("vxlan");
    fake.link_del(vxlan.index).await.expect("delete");
    fake.add_link(Ns::Host, VXLAN, LinkKind::Veth);
    let err = manager
        .ensure_vxlan(NET, VNI, LOCAL, VXLAN_MTU)
        .await
        .expect_err("foreign");
    assert!(matches!(err, NetworkError::NotAVxlan { .. }), "{err}");
    let err = manager.sync_remotes(NET, &[]).await.expect_err("foreign");
    assert!(matches!(err, NetworkError::NotAVxlan { .. }), "{err}");
}

#[tokio::test]
async fn sync_adds_then_is_a_no_op() {
    let manager = manager_with_vxlan().await;
    let remotes = [remote(2, NODE2), remote(3, NODE3), remote(4, NODE3)];
    let changes = manager.sync_remotes(NET, &remotes).await.expect("sync");
    assert_eq!(
        changes,
        SyncChanges {
            updated: 9,
            removed: 0
        }
    );
    assert_holds(&manager, &remotes);

    let fake = manager.netlink();
    let before = fake.calls().len();
    let changes = manager.sync_remotes(NET, &remotes).await.expect("again");
    assert_eq!(changes, SyncChanges::default());
    assert!(mutations(&fake.calls()[before..]).is_empty());
}

#[tokio::test]
async fn sync_replaces_moved_instances_and_deletes_gone_ones() {
    let manager = manager_with_vxlan().await;
    manager
        .sync_remotes(NET, &[remote(2, NODE2), remote(3, NODE3), remote(4, NODE3)])
        .await
        .expect("first");
    let fake = manager.netlink();
    let before = fake.calls().len();
    // 3 moved to node 2, 4 is gone, 5 is new.
    let remotes = [remote(2, NODE2), remote(3, NODE2), remote(5, NODE3)];
    let changes = manager.sync_remotes(NET, &remotes).await.expect("second");
    assert_holds(&manager, &remotes);
    assert_eq!(
        changes,
        SyncChanges {
            updated: 4,
            removed: 3
        }
    );
    let calls = mutations(&fake.calls()[before..]);
    let ops: Vec<&str> = calls
        .iter()
        .map(|c| c.split(' ').nth(1).unwrap_or(""))
        .collect();
    // Adds before deletes; neighbours after their FDB entries on add, before them on delete.
    assert_eq!(
        ops,
        [
            "fdb_replace",
            "fdb_replace",
            "fdb_replace",
            "neigh_replace",
            "neigh_del",
            "fdb_del",
            "fdb_del"
        ],
        "{calls:?}"
    );

    manager.sync_remotes(NET, &[]).await.expect("empty");
    assert_holds(&manager, &[]);
}

#[tokio::test]
async fn sync_skips_this_nodes_instances_and_takes_the_last_of_duplicates() {
    let manager = manager_with_vxlan().await;
    let remotes = [remote(2, LOCAL), remote(3, NODE2), remote(3, NODE3)];
    manager.sync_remotes(NET, &remotes).await.expect("sync");
    assert_holds(&manager, &[remote(3, NODE3)]);
}

#[tokio::test]
async fn sync_repairs_what_it_finds_in_the_kernel() {
    let manager = manager_with_vxlan().await;
    let fake = manager.netlink();
    let mac = instance_mac(ip(2));
    // An appended second destination, a neighbour with a wrong MAC, and leftovers.
    fake.push_fdb(
        Ns::Host,
        VXLAN,
        FdbEntry {
            mac,
            dst: Some(NODE3),
        },
    );
    fake.push_fdb(
        Ns::Host,
        VXLAN,
        FdbEntry {
            mac,
            dst: Some(NODE2),
        },
    );
    fake.push_neighbour(
        Ns::Host,
        VXLAN,
        Neighbour {
            ip: ip(2),
            mac: [2; 6],
        },
    );
    let stray = instance_mac(ip(9));
    fake.push_fdb(
        Ns::Host,
        VXLAN,
        FdbEntry {
            mac: stray,
            dst: None,
        },
    );
    fake.push_fdb(
        Ns::Host,
        VXLAN,
        FdbEntry {
            mac: stray,
            dst: Some(NODE2),
        },
    );
    fake.push_neighbour(
        Ns::Host,
        VXLAN,
        Neighbour {
            ip: ip(9),
            mac: stray,
        },
    );

    let remotes = [remote(2, NODE2)];
    manager.sync_remotes(NET, &remotes).await.expect("sync");
    assert_holds(&manager, &remotes);
}

#[tokio::test]
async fn a_sync_failing_midway_applies_the_rest_and_a_retry_converges() {
    for op in [
        "fdb_replace",
        "neigh_replace",
        "neigh_del",
        "fdb_del",
        "fdb_list",
    ] {
        let manager = manager_with_vxlan().await;
        manager
            .sync_remotes(NET, &[remote(2, NODE2), remote(3, NODE3)])
            .await
            .expect("first");
        let fake = manager.netlink();
        fake.fail(op, libc::ENOBUFS);
        let remotes = [remote(3, NODE2), remote(4, NODE2)];
        let err = manager.sync_remotes(NET, &remotes).await.expect_err(op);
        match &err {
            NetworkError::Sync {
                network_id,
                failed,
                first,
            } => {
                assert_eq!((network_id.as_str(), *failed), (NET, 1), "{op}");
                assert!(first.is(libc::ENOBUFS) && first.op == op, "{op}: {err}");
            }
            NetworkError::Netlink(e) if op == "fdb_list" => assert!(e.is(libc::ENOBUFS)),
            other => panic!("{op}: unexpected {other}"),
        }
        manager.sync_remotes(NET, &remotes).await.expect("retry");
        assert_holds(&manager, &remotes);
    }
}

#[tokio::test]
async fn deletes_of_entries_already_gone_count_as_done() {
    let manager = manager_with_vxlan().await;
    manager
        .sync_remotes(NET, &[remote(2, NODE2)])
        .await
        .expect("first");
    manager.netlink().fail("neigh_del", libc::ENOENT);
    manager.netlink().fail("fdb_del", libc::ENOENT);
    manager
        .sync_remotes(NET, &[])
        .await
        .expect("ENOENT is fine");
}

#[tokio::test]
async fn sync_and_removal_need_or_tolerate_a_missing_vxlan() {
    let manager = manager_with_vxlan().await;
    assert!(manager.remove_vxlan(NET).await.expect("remove"));
    assert!(manager.netlink().link(Ns::Host, VXLAN).is_none());
    assert!(!manager.remove_vxlan(NET).await.expect("remove again"));
    let err = manager
        .sync_remotes(NET, &[remote(2, NODE2)])
        .await
        .expect_err("no vxlan");
    assert!(
        matches!(err, NetworkError::VxlanMissing { ref name, .. } if name == VXLAN),
        "{err}"
    );
}

#[tokio::test]
async fn an_unused_bridge_goes_with_its_vxlan_but_not_while_an_instance_is_attached() {
    let manager = manager_with_vxlan().await;
    let net = NetworkPlan {
        network_id: NET.to_owned(),
        gateway: ip(1),
        prefix_len: 24,
        mtu: VXLAN_MTU,
    };
    manager
        .attach("ins-0000000000c1", &net, 4242, ip(7))
        .await
        .expect("attach");
    assert!(!manager.remove_bridge_if_unused(NET).await.expect("in use"));
    assert!(manager.netlink().link(Ns::Host, VXLAN).is_some());
    manager.detach("ins-0000000000c1").await.expect("detach");
    assert!(manager.remove_bridge_if_unused(NET).await.expect("unused"));
    let fake = manager.netlink();
    assert!(fake.link(Ns::Host, VXLAN).is_none() && fake.link(Ns::Host, BRIDGE).is_none());
}

#[tokio::test]
async fn ensure_forwarding_turns_it_on() {
    let manager = NetworkManager::with_netlink(FakeNetlink::new());
    manager.ensure_forwarding().await.expect("forwarding");
    assert!(manager.netlink().forwarding());
}

#[test]
fn the_plan_of_an_unchanged_set_is_empty_and_names_follow_bridges() {
    let mac = instance_mac(ip(2));
    let wanted = [(ip(2), NODE2)].into_iter().collect();
    let fdb = [
        FdbEntry { mac, dst: None },
        FdbEntry {
            mac,
            dst: Some(NODE2),
        },
    ];
    let neighbours = [Neighbour { ip: ip(2), mac }];
    assert_eq!(
        SyncPlan::new(&wanted, &fdb, &neighbours),
        SyncPlan::default()
    );
    assert_eq!(vxlan_name(NET), VXLAN);
    assert!(vxlan_name("some network").len() <= 15);
    assert_eq!(&vxlan_name("x")[2..], &bridge_name("x")[3..]);
}
