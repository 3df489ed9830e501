//! Real-kernel tests of the VXLAN overlay of `berth_agent::network` across "nodes".
//!
//! Needs root (network namespaces, bridges, veths, VXLAN) and `ip`, `bridge`, `unshare`,
//! `nsenter` and `busybox` (for `ping`); `tcpdump` is used if present. Each test builds its own
//! underlay: a namespace holding a plain bridge, and one namespace per node plugged into it by a
//! veth with a 10.x.y.0/24 address and no default route. In every node the manager runs as the
//! agent does (in the node's namespace) and plumbs berth bridges, VXLAN devices and "instances"
//! (processes with a network namespace of their own). Drop guards delete the namespaces (and the
//! links in them) and kill the processes even when an assertion fails.

use std::fs::File;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_agent::network::{
    instance_mac, vxlan_name, NetworkManager, NetworkPlan, Remote, SyncChanges, VXLAN_MTU,
};
use nix::sched::CloneFlags;

/// The one precondition of every test here.
fn require_root_and_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "network_overlay tests need root: they create network namespaces, bridges, veths and vxlan devices"
    );
    for tool in ["ip", "bridge", "unshare", "nsenter", "busybox"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(found, "network_overlay tests need `{tool}` on PATH");
    }
}

fn random_hex(len: usize) -> String {
    let value: u64 = rand::random();
    format!("{value:016x}")[..len].to_owned()
}

fn random_id(kind: &str) -> String {
    format!("{kind}-{}", random_hex(12))
}

fn random_vni() -> u32 {
    rand::random::<u32>() % 0x00ff_fff0 + 1
}

fn overlay_ip(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, host)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"))
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A named network namespace; deleted on drop, with every link in it.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Self {
        let out = run("ip", &["netns", "add", &name]);
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        let ns = Self { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(out.status.success(), "{args:?} in {}: {out:?}", self.name);
        stdout_of(&out)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A node: a namespace on the underlay.
struct Node {
    ns: Netns,
    ip: Ipv4Addr,
}

/// The test's machines: nodes on one underlay bridge. Dropping it deletes them all.
struct Cluster {
    nodes: Vec<Node>,
    // Declared last: dropped after the nodes whose veths plug into it.
    _underlay: Netns,
}

impl Cluster {
    fn new(count: u8) -> Self {
        let run_id = random_hex(8);
        let [a, b]: [u8; 2] = rand::random();
        let underlay = Netns::new(format!("bot-{run_id}-u"));
        underlay.ok(&["ip", "link", "add", "ul", "type", "bridge"]);
        underlay.ok(&["ip", "link", "set", "ul", "up"]);
        let mut nodes = Vec::new();
        for i in 1..=count {
            let ns = Netns::new(format!("bot-{run_id}-n{i}"));
            let port = format!("u{i}");
            underlay.ok(&[
                "ip", "link", "add", &port, "type", "veth", "peer", "name", "ul0", "netns",
                &ns.name,
            ]);
            underlay.ok(&["ip", "link", "set", &port, "master", "ul", "up"]);
            let ip = Ipv4Addr::new(10, a, b, i);
            ns.ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "ul0"]);
            ns.ok(&["ip", "link", "set", "ul0", "up"]);
            nodes.push(Node { ns, ip });
        }
        Self {
            nodes,
            _underlay: underlay,
        }
    }
}

/// A process in a network namespace of its own, like a container's init between create and
/// start; killed and reaped on drop (its namespace, and the veth end in it, go with it).
struct Container {
    child: Child,
}

impl Container {
    fn spawn() -> Self {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "1000"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning unshare --net sleep");
        let container = Self { child };
        let comm = format!("/proc/{}/comm", container.pid());
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&comm)
            .map(|c| c.trim() != "sleep")
            .unwrap_or(true)
        {
            assert!(
                Instant::now() < deadline,
                "container process never became sleep"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        container
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    fn exec(&self, args: &[&str]) -> Output {
        let netns = format!("--net=/proc/{}/ns/net", self.pid());
        let mut full = vec![netns.as_str()];
        full.extend_from_slice(args);
        run("nsenter", &full)
    }

    fn ping_once(&self, ip: Ipv4Addr) -> Output {
        self.exec(&["busybox", "ping", "-c1", "-W1", &ip.to_string()])
    }

    /// Pings `ip` until it answers (the first ping also resolves ARP), for up to 5 s.
    fn assert_reaches(&self, ip: Ipv4Addr, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = self.ping_once(ip);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {ip} unreachable: {out:?}"
            );
        }
    }

    fn assert_cannot_reach(&self, ip: Ipv4Addr, what: &str) {
        let out = self.exec(&["busybox", "ping", "-c2", "-W1", &ip.to_string()]);
        assert!(!out.status.success(), "{what}: {ip} answered: {out:?}");
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `body` on a fresh thread that has entered `ns`, on a current-thread tokio runtime (so
/// every task stays on that thread, hence in that namespace), with a manager opened there.
fn on_node<F, Fut, T>(ns: &Netns, body: F) -> T
where
    F: FnOnce(NetworkManager) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let path = ns.path();
    let thread = std::thread::spawn(move || {
        let netns = File::open(&path).expect("open node netns");
        nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET).expect("setns into node netns");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(async move {
            let manager = NetworkManager::new().await.expect("manager");
            body(manager).await
        })
    });
    match thread.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// One instance to plumb on a node.
#[derive(Clone)]
struct Instance {
    id: String,
    pid: i32,
    ip: Ipv4Addr,
}

/// Everything a node does for one overlay network: forwarding, bridge, vxlan, its instance,
/// then the remotes. Returns what the sync changed.
fn plumb(
    node: &Node,
    net: &NetworkPlan,
    vni: u32,
    instance: &Instance,
    remotes: &[Remote],
) -> SyncChanges {
    let (net, local, instance, remotes) =
        (net.clone(), node.ip, instance.clone(), remotes.to_vec());
    on_node(&node.ns, move |manager| async move {
        manager
            .ensure_forwarding()
            .await
            .expect("ensure_forwarding");
        manager.ensure_bridge(&net).await.expect("ensure_bridge");
        let name = manager
            .ensure_vxlan(&net.network_id, vni, local, net.mtu)
            .await
            .expect("ensure_vxlan");
        assert_eq!(name, vxlan_name(&net.network_id));
        manager
            .attach(&instance.id, &net, instance.pid, instance.ip)
            .await
            .expect("attach");
        manager
            .sync_remotes(&net.network_id, &remotes)
            .await
            .expect("sync_remotes")
    })
}

fn sync(node: &Node, network_id: &str, remotes: &[Remote]) -> SyncChanges {
    let (network_id, remotes) = (network_id.to_owned(), remotes.to_vec());
    on_node(&node.ns, move |manager| async move {
        manager
            .sync_remotes(&network_id, &remotes)
            .await
            .expect("sync_remotes")
    })
}

/// Captures on `node`'s underlay interface while `traffic` runs; returns tcpdump's lines, or
/// `None` when tcpdump is not installed.
fn capture_underlay(node: &Node, traffic: impl FnOnce()) -> Option<String> {
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.ns.name,
            "tcpdump",
            "-l",
            "-n",
            "-i",
            "ul0",
            "-c",
            "2",
            "udp",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // tcpdump needs a moment to open its socket; pings repeat anyway.
    std::thread::sleep(Duration::from_millis(500));
    traffic();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcpdump.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = tcpdump.kill();
    let out = tcpdump.wait_with_output().ok()?;
    Some(stdout_of(&out))
}

#[test]
fn instances_on_three_nodes_reach_each_other_over_vxlan() {
    require_root_and_tools();
    let cluster = Cluster::new(3);
    let containers = [Container::spawn(), Container::spawn(), Container::spawn()];
    let net = NetworkPlan {
        network_id: random_id("net"),
        gateway: overlay_ip(1),
        prefix_len: 24,
        mtu: VXLAN_MTU,
    };
    let vni = random_vni();
    let instances: Vec<Instance> = containers
        .iter()
        .zip(11..)
        .map(|(c, host)| Instance {
            id: random_id("ins"),
            pid: c.pid(),
            ip: overlay_ip(host),
        })
        .collect();
    // The hub's view: every instance of the network with its node, this node's own included.
    let all: Vec<Remote> = instances
        .iter()
        .zip(&cluster.nodes)
        .map(|(i, n)| Remote {
            ip: i.ip,
            node_ip: n.ip,
        })
        .collect();

    for (node, instance) in cluster.nodes.iter().zip(&instances) {
        let changes = plumb(node, &net, vni, instance, &all);
        // Two remotes, three entries each; its own instance is skipped.
        assert_eq!(
            changes,
            SyncChanges {
                updated: 6,
                removed: 0
            }
        );
        assert_eq!(
            node.ns.ok(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
            "1"
        );
    }

    let [c1, c2, c3] = &containers;
    let (ip1, ip2, ip3) = (instances[0].ip, instances[1].ip, instances[2].ip);
    c1.assert_reaches(ip2, "node 1 to node 2");
    c1.assert_reaches(ip3, "node 1 to node 3");
    c3.assert_reaches(ip2, "node 3 to node 2");
    c2.assert_reaches(ip1, "node 2 to node 1");

    let node1 = &cluster.nodes[0];
    let vxlan = vxlan_name(&net.network_id);
    let details = node1.ns.ok(&["ip", "-d", "link", "show", "dev", &vxlan]);
    for wanted in [
        format!("vxlan id {vni} local {} ", node1.ip),
        "dstport 4789".to_owned(),
        "nolearning".to_owned(),
        "proxy".to_owned(),
        "mtu 1450".to_owned(),
        "neigh_suppress on".to_owned(),
        "learning off".to_owned(),
    ] {
        assert!(details.contains(&wanted), "{wanted:?} missing: {details}");
    }
    let fdb = node1.ns.ok(&["bridge", "fdb", "show", "dev", &vxlan]);
    let mac2 = mac_text(instance_mac(ip2));
    assert!(
        fdb.lines().any(|l| l.starts_with(&format!(
            "{mac2} dst {} self permanent",
            cluster.nodes[1].ip
        ))),
        "self entry for node 2's instance: {fdb}"
    );
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(&mac2) && l.contains("master") && l.contains("static")),
        "bridge entry for node 2's instance: {fdb}"
    );
    assert!(
        !fdb.contains("00:00:00:00:00:00"),
        "no default destination (no flooding): {fdb}"
    );
    let neighbours = node1.ns.ok(&["ip", "neigh", "show", "dev", &vxlan]);
    assert!(
        neighbours.contains(&format!("{ip2} lladdr {mac2} PERMANENT")),
        "{neighbours}"
    );

    // A restarted agent (a new manager, nothing in memory) finds everything in place.
    assert_eq!(sync(node1, &net.network_id, &all), SyncChanges::default());

    if let Some(captured) = capture_underlay(&cluster.nodes[1], || {
        c1.assert_reaches(ip2, "node 1 to node 2, captured");
    }) {
        assert!(
            captured
                .lines()
                .any(|l| l.contains(".4789:") && l.contains("VXLAN")),
            "expected VXLAN on the underlay: {captured}"
        );
    } else {
        eprintln!("tcpdump not installed: skipping the underlay capture");
    }

    // Node 3's instance leaves node 1's view: node 1 can't reach it any more.
    let without_3 = &all[..2];
    assert_eq!(
        sync(node1, &net.network_id, without_3),
        SyncChanges {
            updated: 0,
            removed: 3
        }
    );
    c1.assert_cannot_reach(ip3, "node 3 removed from node 1");
    c1.assert_reaches(ip2, "node 2 still there");
    let fdb = node1.ns.ok(&["bridge", "fdb", "show", "dev", &vxlan]);
    assert!(
        !fdb.contains(&mac_text(instance_mac(ip3))),
        "node 3's entries left: {fdb}"
    );

    // And back.
    sync(node1, &net.network_id, &all);
    c1.assert_reaches(ip3, "node 3 back in node 1's view");
}

#[test]
fn networks_with_different_vnis_do_not_meet_on_the_overlay() {
    require_root_and_tools();
    let cluster = Cluster::new(2);
    let [node1, node2] = [&cluster.nodes[0], &cluster.nodes[1]];
    let (a1, a2, b1, b2) = (
        Container::spawn(),
        Container::spawn(),
        Container::spawn(),
        Container::spawn(),
    );
    // The same subnet on purpose: B's instances address A's directly, so nothing but the
    // overlay could carry them there (no routing through a gateway).
    let plan = |gateway: u8| NetworkPlan {
        network_id: random_id("net"),
        gateway: overlay_ip(gateway),
        prefix_len: 24,
        mtu: VXLAN_MTU,
    };
    let (net_a, net_b) = (plan(1), plan(254));
    let vni_a = random_vni();
    let vni_b = if vni_a == 1 { 2 } else { vni_a - 1 };
    let instance = |c: &Container, host: u8| Instance {
        id: random_id("ins"),
        pid: c.pid(),
        ip: overlay_ip(host),
    };
    let (ia1, ia2, ib1, ib2) = (
        instance(&a1, 11),
        instance(&a2, 12),
        instance(&b1, 21),
        instance(&b2, 22),
    );
    let at = |i: &Instance, node: &Node| Remote {
        ip: i.ip,
        node_ip: node.ip,
    };

    plumb(node1, &net_a, vni_a, &ia1, &[at(&ia2, node2)]);
    plumb(node2, &net_a, vni_a, &ia2, &[at(&ia1, node1)]);
    // Node 1's B device even claims A's instance on node 2, as a stale or forged view could:
    // its frames still travel with B's VNI and land in B's bridge on node 2.
    plumb(
        node1,
        &net_b,
        vni_b,
        &ib1,
        &[at(&ib2, node2), at(&ia2, node2)],
    );
    plumb(node2, &net_b, vni_b, &ib2, &[at(&ib1, node1)]);

    a1.assert_reaches(ia2.ip, "A across nodes");
    b1.assert_reaches(ib2.ip, "B across nodes");
    b1.assert_cannot_reach(ia2.ip, "B to A's instance over B's VNI");
    a2.assert_cannot_reach(ib1.ip, "A to B's instance");
}
