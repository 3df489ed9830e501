use std::collections::BTreeMap;

use super::*;
use crate::store::records::{
    ContainerRecord, InstanceRecord, NetworkRecord, NodeRecord, StatusRecord,
};
use crate::store::{StoredInstance, Versioned};

fn versioned<T>(value: T) -> Versioned<T> {
    Versioned {
        value,
        mod_revision: 1,
        create_revision: 1,
    }
}

struct Builder {
    snap: Snapshot,
}

impl Builder {
    fn new() -> Self {
        Builder {
            snap: Snapshot::default(),
        }
    }

    fn node(mut self, id: &str, ip: &str, alive: bool) -> Self {
        self.snap.nodes.insert(
            id.into(),
            versioned(NodeRecord {
                node_id: id.into(),
                hostname: id.into(),
                ip: ip.into(),
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                lease_id: 1,
                registered_at: String::new(),
                tunnel_ip: format!("10.201.0.{}", &ip[ip.len() - 1..]),
                wireguard_public_key: format!("key-{id}"),
                api_addr: String::new(),
                migration_addr: String::new(),
                unschedulable: false,
            }),
        );
        if alive {
            self.snap.alive.insert(id.into());
        }
        self
    }

    fn network(mut self, id: &str, cidr: &str, vni: u32, links: &[&str]) -> Self {
        self.snap.networks.insert(
            id.into(),
            versioned(NetworkRecord {
                network_id: id.into(),
                name: format!("name-{id}"),
                cidr: cidr.into(),
                gateway: String::new(),
                created_at: String::new(),
                encrypted: false,
                vni,
                links: links.iter().map(|s| s.to_string()).collect(),
            }),
        );
        self
    }

    fn container(mut self, id: &str, name: &str, network: &str, vip: &str) -> Self {
        self.snap.containers.insert(
            id.into(),
            versioned(ContainerRecord {
                container_id: id.into(),
                name: name.into(),
                image: "img".into(),
                network_id: network.into(),
                cpu_millis: 100,
                memory_bytes: 1 << 20,
                replicas: 1,
                command: vec![],
                env: BTreeMap::new(),
                created_at: String::new(),
                deleting: false,
                next_ordinal: 0,
                service_ip: vip.into(),
                restart_policy: String::new(),
                max_restarts: 0,
                ..Default::default()
            }),
        );
        self
    }

    fn instance(mut self, id: &str, container: &str, node: &str, ip: &str, status: &str) -> Self {
        let network = self.snap.containers[container].value.network_id.clone();
        self.snap
            .instances
            .entry(container.into())
            .or_default()
            .insert(
                id.into(),
                StoredInstance {
                    record: versioned(InstanceRecord {
                        instance_id: id.into(),
                        container_id: container.into(),
                        network_id: network,
                        ordinal: 0,
                        node_id: node.into(),
                        ip: ip.into(),
                        reason: String::new(),
                        stopping: false,
                        created_at: String::new(),
                        placed_at: String::new(),
                        ..Default::default()
                    }),
                    status: (!status.is_empty()).then(|| StatusRecord {
                        status: status.into(),
                        reason: String::new(),
                        node_id: node.into(),
                        updated_at: String::new(),
                        phases_ms: BTreeMap::new(),
                        restarts: 0,
                        image_digest: String::new(),
                    }),
                },
            );
        self
    }
}

fn ids<T>(items: &[T], f: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|i| f(i).to_owned()).collect()
}

#[test]
fn nodes_see_only_the_networks_they_host_and_their_links() {
    let snap = Builder::new()
        .node("n1", "192.168.0.1", true)
        .node("n2", "192.168.0.2", true)
        .node("n3", "192.168.0.3", true)
        .network("net-a", "10.1.0.0/24", 4096, &["net-b"])
        .network("net-b", "10.2.0.0/24", 4097, &["net-a"])
        .network("net-c", "10.3.0.0/24", 4098, &[])
        .container("ctr-a", "web", "net-a", "10.96.0.1")
        .container("ctr-b", "", "net-b", "10.96.0.2")
        .container("ctr-c", "db", "net-c", "10.96.0.3")
        .instance("ins-a1", "ctr-a", "n1", "10.1.0.2", "RUNNING")
        .instance("ins-a2", "ctr-a", "n2", "10.1.0.3", "CREATING")
        .instance("ins-b1", "ctr-b", "n3", "10.2.0.2", "RUNNING")
        .instance("ins-c1", "ctr-c", "n3", "10.3.0.2", "RUNNING")
        .instance("ins-c2", "ctr-c", "", "", "")
        .snap;
    let views = compute(&snap, 16);
    assert_eq!(views.len(), 3);

    let n1 = &views["n1"];
    assert_eq!(ids(&n1.networks, |n| &n.network_id), ["net-a", "net-b"]);
    assert_eq!(n1.networks[0].linked_network_ids, ["net-b"]);
    assert_eq!(
        ids(&n1.endpoints, |e| &e.instance_id),
        ["ins-a1", "ins-a2", "ins-b1"]
    );
    let ready: Vec<bool> = n1.endpoints.iter().map(|e| e.ready).collect();
    assert_eq!(ready, [true, false, true]);
    assert_eq!(ids(&n1.services, |s| &s.vip), ["10.96.0.1", "10.96.0.2"]);
    // A container without a name answers to its id.
    assert_eq!(n1.services[1].name, "ctr-b");
    assert_eq!(ids(&n1.peers, |p| &p.node_id), ["n2", "n3"]);
    assert_eq!(n1.tunnel_ip, "10.201.0.1");
    assert_eq!(n1.tunnel_prefix_len, 16);

    // n3 hosts b (linked to a) and c: it sees all three, but c's link list stays empty.
    let n3 = &views["n3"];
    assert_eq!(
        ids(&n3.networks, |n| &n.network_id),
        ["net-a", "net-b", "net-c"]
    );
    assert!(n3.networks[2].linked_network_ids.is_empty());
    // The unplaced replica is no endpoint.
    assert!(!n3.endpoints.iter().any(|e| e.instance_id == "ins-c2"));
}

#[test]
fn a_node_without_instances_gets_an_empty_view_and_links_need_both_sides() {
    let snap = Builder::new()
        .node("n1", "192.168.0.1", true)
        .node("n2", "192.168.0.2", true)
        .network("net-a", "10.1.0.0/24", 4096, &["net-gone"])
        .container("ctr-a", "web", "net-a", "10.96.0.1")
        .instance("ins-a1", "ctr-a", "n1", "10.1.0.2", "RUNNING")
        .snap;
    let views = compute(&snap, 16);
    assert!(views["n2"].networks.is_empty());
    assert!(views["n2"].endpoints.is_empty());
    // A link to a network that no longer exists is left out.
    assert_eq!(ids(&views["n1"].networks, |n| &n.network_id), ["net-a"]);
    assert!(views["n1"].networks[0].linked_network_ids.is_empty());
    assert!(views["n1"].peers.is_empty());
}

#[test]
fn replicas_of_dead_nodes_stopping_or_deleted_are_not_ready() {
    let mut b = Builder::new()
        .node("n1", "192.168.0.1", true)
        .node("n2", "192.168.0.2", false)
        .network("net-a", "10.1.0.0/24", 4096, &[])
        .container("ctr-a", "web", "net-a", "10.96.0.1")
        .instance("ins-1", "ctr-a", "n1", "10.1.0.2", "RUNNING")
        .instance("ins-2", "ctr-a", "n2", "10.1.0.3", "RUNNING")
        .instance("ins-3", "ctr-a", "n1", "10.1.0.4", "RUNNING");
    if let Some(i) = b
        .snap
        .instances
        .get_mut("ctr-a")
        .and_then(|m| m.get_mut("ins-3"))
    {
        i.record.value.stopping = true;
    }
    let views = compute(&b.snap, 16);
    let ready: Vec<(String, bool)> = views["n1"]
        .endpoints
        .iter()
        .map(|e| (e.instance_id.clone(), e.ready))
        .collect();
    assert_eq!(
        ready,
        [
            ("ins-1".to_owned(), true),
            ("ins-2".to_owned(), false),
            ("ins-3".to_owned(), false)
        ]
    );
    if let Some(c) = b.snap.containers.get_mut("ctr-a") {
        c.value.deleting = true;
    }
    let views = compute(&b.snap, 16);
    assert!(views["n1"].endpoints.iter().all(|e| !e.ready));
}

#[test]
fn views_are_deterministic() {
    let snap = Builder::new()
        .node("n1", "192.168.0.1", true)
        .node("n2", "192.168.0.2", true)
        .network("net-a", "10.1.0.0/24", 4096, &[])
        .container("ctr-a", "web", "net-a", "10.96.0.1")
        .instance("ins-a1", "ctr-a", "n1", "10.1.0.2", "RUNNING")
        .instance("ins-a2", "ctr-a", "n2", "10.1.0.3", "RUNNING")
        .snap;
    assert_eq!(compute(&snap, 16), compute(&snap, 16));
}
