//! Real-kernel tests of `berth_agent::network` over rtnetlink.
//!
//! Needs root (network namespaces, bridges, veths) and `ip`, `unshare`, `nsenter` and `busybox`
//! (for `ping`). Each test makes its own "host" namespace (where the manager runs, as the agent
//! runs in its node's namespace) and "container" processes with namespaces of their own; Drop
//! guards remove them even when an assertion fails. Nothing is routed outside those namespaces.

use std::fs::File;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_agent::network::{
    bridge_mac, bridge_name, host_veth_name, instance_mac, NetworkError, NetworkManager,
    NetworkPlan, DEFAULT_MTU, VXLAN_MTU,
};
use nix::sched::CloneFlags;

/// The one precondition of every test here.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "network_netlink tests need root: they create network namespaces, bridges and veths"
    );
}

fn random_hex(len: usize) -> String {
    let value: u64 = rand::random();
    format!("{value:016x}")[..len].to_owned()
}

/// A berth-style id, `<kind>-<12 hex>`.
fn random_id(kind: &str) -> String {
    format!("{kind}-{}", random_hex(12))
}

/// A /24 of 10.0.0.0/8 for this test: the namespaces are private, the randomness only makes
/// failures easier to tell apart in logs.
fn random_subnet() -> [u8; 3] {
    let [a, b]: [u8; 2] = rand::random();
    [10, a, b]
}

fn ip_in(subnet: [u8; 3], host: u8) -> Ipv4Addr {
    Ipv4Addr::new(subnet[0], subnet[1], subnet[2], host)
}

fn plan(network_id: &str, gateway: Ipv4Addr, prefix_len: u8, mtu: u32) -> NetworkPlan {
    NetworkPlan {
        network_id: network_id.to_owned(),
        gateway,
        prefix_len,
        mtu,
    }
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

/// A named network namespace playing the node; deleted on drop (taking its bridge and veths).
struct HostNs {
    name: String,
}

impl HostNs {
    fn new() -> Self {
        let name = format!("bnt-{}", random_hex(8));
        let out = run("ip", &["netns", "add", &name]);
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        let host = Self { name };
        let out = host.exec(&["ip", "link", "set", "lo", "up"]);
        assert!(out.status.success(), "lo up in {}: {out:?}", host.name);
        host
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    fn has_link(&self, name: &str) -> bool {
        self.exec(&["ip", "link", "show", "dev", name])
            .status
            .success()
    }
}

impl Drop for HostNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
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
        // unshare execs sleep only after entering the new namespace.
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

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `body` on a fresh thread that has entered `host`'s namespace, on a current-thread tokio
/// runtime (so every task stays on that thread, hence in that namespace).
fn in_host<F, Fut, T>(host: &HostNs, body: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let path = host.path();
    let thread = std::thread::spawn(move || {
        let netns = File::open(&path).expect("open host netns");
        nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET).expect("setns into host netns");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(body())
    });
    match thread.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn this_thread_netns() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").expect("readlink own netns")
}

fn ping(from: Output) -> bool {
    from.status.success()
}

fn assert_pings(host: &HostNs, ip: Ipv4Addr) {
    let ip = ip.to_string();
    let out = host.exec(&["busybox", "ping", "-c1", "-W1", &ip]);
    assert!(ping(out.clone()), "host cannot ping {ip}: {out:?}");
}

#[test]
fn attached_instance_answers_on_its_ip_and_routes_through_the_gateway() {
    require_root();
    let host = HostNs::new();
    let container = Container::spawn();
    let (net, ins) = (random_id("net"), random_id("ins"));
    let subnet = random_subnet();
    let (gateway, ip) = (ip_in(subnet, 1), ip_in(subnet, 2));
    let pid = container.pid();
    let mac_text = bridge_mac(&net).map(|b| format!("{b:02x}")).join(":");

    let (bridge, net_id, ins_id, attached) = in_host(&host, move || async move {
        let manager = NetworkManager::new().await.expect("manager");
        let net_plan = plan(&net, gateway, 24, VXLAN_MTU);
        let bridge = manager
            .ensure_bridge(&net_plan)
            .await
            .expect("ensure_bridge");
        assert_eq!(bridge, bridge_name(&net));
        let again = manager
            .ensure_bridge(&net_plan)
            .await
            .expect("ensure_bridge again");
        assert_eq!(again, bridge);

        let before = this_thread_netns();
        let attached = manager
            .attach(&ins, &net_plan, pid, ip)
            .await
            .expect("attach");
        assert_eq!(
            this_thread_netns(),
            before,
            "attach moved the calling thread"
        );
        (bridge, net, ins, attached)
    });

    let veth = host_veth_name(&ins_id);
    assert_eq!(attached.veth, veth);
    assert_pings(&host, ip);

    let link = stdout_of(&host.exec(&["ip", "-o", "link", "show", "dev", &veth]));
    assert!(
        link.contains(&format!("master {bridge}"))
            && link.contains("state UP")
            && link.contains("mtu 1450"),
        "{link}"
    );
    assert!(
        link.starts_with(&format!("{}: {veth}@", attached.ifindex)),
        "ifindex {} expected: {link}",
        attached.ifindex
    );
    // A bridge takes its lowest port's address unless one was set: ours must stay put.
    let bridge_link = stdout_of(&host.exec(&["ip", "-o", "link", "show", "dev", &bridge]));
    assert!(
        bridge_link.contains(&format!("link/ether {mac_text} ")),
        "bridge mac: {bridge_link}"
    );
    let gw = stdout_of(&host.exec(&["ip", "-4", "-o", "addr", "show", "dev", &bridge]));
    assert!(
        gw.contains(&format!("inet {gateway}/24")),
        "bridge address: {gw}"
    );
    assert!(
        bridge_link.contains("mtu 1450"),
        "bridge mtu: {bridge_link}"
    );

    let addr = stdout_of(&container.exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]));
    assert!(
        addr.contains(&format!("inet {ip}/24")),
        "eth0 address: {addr}"
    );
    let eth0 = stdout_of(&container.exec(&["ip", "-o", "link", "show", "dev", "eth0"]));
    let mac_of_ip = instance_mac(ip).map(|b| format!("{b:02x}")).join(":");
    assert!(
        eth0.contains(&format!("link/ether {mac_of_ip} ")) && eth0.contains("mtu 1450"),
        "eth0: {eth0}"
    );
    assert_eq!(attached.mac, instance_mac(ip));
    let routes = stdout_of(&container.exec(&["ip", "-4", "route", "show"]));
    let routes: Vec<&str> = routes.lines().collect();
    assert_eq!(
        routes.len(),
        2,
        "the default and the connected route expected: {routes:?}"
    );
    assert!(
        routes[0].starts_with(&format!("default via {gateway} dev eth0")),
        "{routes:?}"
    );
    assert!(
        routes[1].starts_with(&format!("{}/24 dev eth0", ip_in(subnet, 0))),
        "{routes:?}"
    );
    let lo = stdout_of(&container.exec(&["ip", "-o", "link", "show", "dev", "lo"]));
    assert!(lo.contains("UP"), "lo: {lo}");

    let (removed_while_used, removed, removed_again) = in_host(&host, move || async move {
        let manager = NetworkManager::new().await.expect("manager");
        let while_used = manager
            .remove_bridge_if_unused(&net_id)
            .await
            .expect("remove while used");
        manager.detach(&ins_id).await.expect("detach");
        manager.detach(&ins_id).await.expect("detach again");
        let removed = manager
            .remove_bridge_if_unused(&net_id)
            .await
            .expect("remove");
        let again = manager
            .remove_bridge_if_unused(&net_id)
            .await
            .expect("remove again");
        (while_used, removed, again)
    });
    assert!(
        !removed_while_used,
        "bridge removed while a veth was attached"
    );
    assert!(!host.has_link(&veth), "host veth still there after detach");
    assert!(
        !container
            .exec(&["ip", "link", "show", "dev", "eth0"])
            .status
            .success(),
        "eth0 outlived detach"
    );
    assert!(removed && !removed_again);
    assert!(!host.has_link(&bridge), "bridge still there");
}

#[test]
fn two_instances_on_one_bridge_reach_each_other() {
    require_root();
    let host = HostNs::new();
    let (a, b) = (Container::spawn(), Container::spawn());
    let net = random_id("net");
    let subnet = random_subnet();
    let (ip_a, ip_b) = (ip_in(subnet, 10), ip_in(subnet, 11));
    let (pid_a, pid_b) = (a.pid(), b.pid());

    in_host(&host, move || async move {
        let manager = NetworkManager::new().await.expect("manager");
        let net_plan = plan(&net, ip_in(subnet, 1), 24, DEFAULT_MTU);
        manager
            .ensure_bridge(&net_plan)
            .await
            .expect("ensure_bridge");
        // Concurrently, as the reconciler does for replicas starting together.
        let ins_a = random_id("ins");
        let ins_b = random_id("ins");
        let (ra, rb) = tokio::join!(
            manager.attach(&ins_a, &net_plan, pid_a, ip_a),
            manager.attach(&ins_b, &net_plan, pid_b, ip_b),
        );
        ra.expect("attach a");
        rb.expect("attach b");
    });

    assert_pings(&host, ip_a);
    assert_pings(&host, ip_b);
    let (sa, sb) = (ip_a.to_string(), ip_b.to_string());
    let out = a.exec(&["busybox", "ping", "-c1", "-W1", &sb]);
    assert!(out.status.success(), "a cannot ping b: {out:?}");
    let out = b.exec(&["busybox", "ping", "-c1", "-W1", &sa]);
    assert!(out.status.success(), "b cannot ping a: {out:?}");
}

#[test]
fn attach_can_be_retried_and_leaves_nothing_when_it_fails() {
    require_root();
    let host = HostNs::new();
    let container = Container::spawn();
    let mut dead = Container::spawn();
    let crowded = Container::spawn();
    // Something already called eth0 in the namespace: creating the pair must fail.
    let out = crowded.exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ]);
    assert!(out.status.success(), "pre-creating eth0: {out:?}");
    let dead_pid = dead.pid();
    dead.kill();

    let net = random_id("net");
    let (ins, ins_dead, ins_crowded) = (random_id("ins"), random_id("ins"), random_id("ins"));
    let subnet = random_subnet();
    let ip = ip_in(subnet, 5);
    let (pid, crowded_pid) = (container.pid(), crowded.pid());
    let (ins2, ins_dead2, ins_crowded2) = (ins.clone(), ins_dead.clone(), ins_crowded.clone());

    let (dead_err, crowded_err) = in_host(&host, move || async move {
        let manager = NetworkManager::new().await.expect("manager");
        let net_plan = plan(&net, ip_in(subnet, 1), 24, DEFAULT_MTU);
        let missing = manager.attach(&ins2, &net_plan, pid, ip).await;
        assert!(
            matches!(missing, Err(NetworkError::BridgeMissing { .. })),
            "{missing:?}"
        );

        manager
            .ensure_bridge(&net_plan)
            .await
            .expect("ensure_bridge");
        manager
            .attach(&ins2, &net_plan, pid, ip)
            .await
            .expect("attach");
        // A retry (e.g. after the agent restarted mid-attach) replaces the pair.
        manager
            .attach(&ins2, &net_plan, pid, ip)
            .await
            .expect("attach again");

        let dead_err = manager
            .attach(&ins_dead2, &net_plan, dead_pid, ip_in(subnet, 6))
            .await
            .expect_err("attach to a dead process");
        let crowded_err = manager
            .attach(&ins_crowded2, &net_plan, crowded_pid, ip_in(subnet, 7))
            .await
            .expect_err("attach where eth0 exists");
        (dead_err.to_string(), crowded_err.to_string())
    });

    assert_pings(&host, ip);
    assert!(dead_err.contains("link_add_veth"), "{dead_err}");
    assert!(crowded_err.contains("link_add_veth"), "{crowded_err}");
    assert!(
        !host.has_link(&host_veth_name(&ins_dead)),
        "stray veth for the dead process"
    );
    assert!(
        !host.has_link(&host_veth_name(&ins_crowded)),
        "stray veth for the crowded namespace"
    );
    let links = stdout_of(&host.exec(&["ip", "-o", "link", "show", "type", "veth"]));
    assert_eq!(
        links.lines().count(),
        1,
        "exactly one veth expected in the host: {links}"
    );
}

/// The namespace a migration restores into: made by the agent's netns holder before any process
/// of the container exists, plugged in like any instance, and still there (with its address) once
/// a process has joined it and the holder is gone.
#[test]
fn a_held_namespace_is_plugged_in_before_its_process_exists() {
    require_root();
    let host = HostNs::new();
    let holder = berth_agent::network::holder::NetnsHolder::spawn(Path::new(env!(
        "CARGO_BIN_EXE_berth-agent"
    )))
    .expect("netns holder");
    assert_ne!(
        std::fs::read_link(holder.netns_path()).unwrap(),
        this_thread_netns(),
        "the holder must have a namespace of its own"
    );
    let net = random_id("net");
    let subnet = random_subnet();
    let ip = ip_in(subnet, 20);
    let pid = holder.pid();
    in_host(&host, move || async move {
        let manager = NetworkManager::new().await.expect("manager");
        let net_plan = plan(&net, ip_in(subnet, 1), 24, DEFAULT_MTU);
        manager
            .ensure_bridge(&net_plan)
            .await
            .expect("ensure_bridge");
        manager
            .attach(&random_id("ins"), &net_plan, pid, ip)
            .await
            .expect("attach into the held namespace");
    });
    assert_pings(&host, ip);

    // A process joins (as CRIU's restored init does), then the holder goes: the namespace stays.
    let netns = holder.netns_path();
    let mut joined = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .expect("nsenter sleep");
    let comm = format!("/proc/{}/comm", joined.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") {
        assert!(Instant::now() < deadline, "nsenter never became sleep");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(holder);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "holder still running"
    );
    assert_pings(&host, ip);
    let _ = joined.kill();
    let _ = joined.wait();
}
