//! Real-kernel tests of `berth_agent::ebpf`: the embedded programs loaded, attached and driven
//! through the typed API.
//!
//! Needs root (BPF, cgroup2, bpffs, network namespaces), `ip`, `ping` and `bpftool`. Clients run in
//! a fresh cgroup2 directory: the test binary re-runs itself (`client_helper`) after moving into
//! it. Listeners are on 127.0.0.2/127.0.0.3; VIPs are in 10.253.0.0/16, which nothing answers
//! for, and every assertion is on what the listener answered or the address the client saw (the
//! sandbox gateway accepts any TCP connection, so a bare connect proves nothing). Drop guards
//! remove cgroups, pins, namespaces and bridges even when an assertion fails.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_agent::ebpf::{cgroup2_mount, node_pin_dir, DataPlane};

/// The one precondition of every test here.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "ebpf_dataplane tests need root: they load BPF programs, make cgroups, pin to bpffs and \
         create network namespaces"
    );
}

fn random_hex(len: usize) -> String {
    let value: u64 = rand::random();
    format!("{value:016x}")[..len].to_owned()
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"))
}

fn run_ok(program: &str, args: &[&str]) {
    let out = run(program, args);
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
}

/// A node's worth of places: a fresh cgroup2 directory and a pin directory, removed on drop
/// (pins first, which detaches whatever the test left attached).
struct Node {
    id: String,
    cgroup: PathBuf,
    pins: PathBuf,
}

impl Node {
    fn new() -> Self {
        let id = format!("test-{}", random_hex(10));
        let cgroup = cgroup2_mount()
            .expect("cgroup2 mount")
            .join(format!("berth-{id}"));
        let pins = node_pin_dir(&id);
        Self { id, cgroup, pins }
    }

    fn load(&self) -> DataPlane {
        DataPlane::load(&self.id, &self.cgroup, &self.pins).expect("load data plane")
    }

    /// Rows of `bpftool cgroup show` for this node's cgroup: (attach type, program name).
    fn attachments(&self) -> Vec<String> {
        let out = run(
            "bpftool",
            &["cgroup", "show", self.cgroup.to_str().unwrap()],
        );
        assert!(out.status.success(), "bpftool cgroup show: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip_while(|l| !l.starts_with("ID"))
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Runs the client helper inside the node's cgroup.
    fn client(&self, mode: &str, target: SocketAddrV4) -> String {
        let procs = File::options()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let fd = procs.as_raw_fd();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "client_helper",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("BERTH_EBPF_CLIENT", format!("{mode} {target}"))
        .stdin(Stdio::null());
        // SAFETY: only write(2) on an fd opened before the fork, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let out = cmd.output().expect("run client helper");
        drop(procs);
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("client printed no RESULT: {out:?}"))
            .to_owned()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.pins) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pins);
        for _ in 0..50 {
            match std::fs::remove_dir(&self.cgroup) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // Exited clients may take a moment to leave the cgroup.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Not a test of its own: the client the tests above run inside their cgroup. Without
/// `BERTH_EBPF_CLIENT` it does nothing.
#[test]
fn client_helper() {
    let Ok(spec) = std::env::var("BERTH_EBPF_CLIENT") else {
        return;
    };
    let (mode, target) = spec.split_once(' ').unwrap();
    let target: SocketAddr = target.parse().unwrap();
    let result = match mode {
        "tcp" => match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.write_all(b"hello\n").unwrap();
                let mut reply = String::new();
                let _ = s.read_to_string(&mut reply);
                format!("peer={} reply={}", s.peer_addr().unwrap(), reply.trim())
            }
            Err(e) => format!("error={e}"),
        },
        "udp" => {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            match s.send_to(b"ping", target) {
                Ok(_) => {
                    let mut buf = [0u8; 64];
                    match s.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            format!("from={from} reply={}", String::from_utf8_lossy(&buf[..n]))
                        }
                        Err(e) => format!("error={e}"),
                    }
                }
                Err(e) => format!("error={e}"),
            }
        }
        other => panic!("unknown mode {other}"),
    };
    // libtest prints "test client_helper ... " on the same line first.
    println!("\nRESULT {result}");
}

/// TCP listeners on the same port of several loopback addresses, each answering its own name and
/// counting connections.
struct Backends {
    port: u16,
    hits: Vec<(Ipv4Addr, Arc<AtomicUsize>)>,
}

impl Backends {
    fn start(ips: &[Ipv4Addr]) -> Self {
        'retry: for _ in 0..20 {
            let first = TcpListener::bind((ips[0], 0)).unwrap();
            let port = first.local_addr().unwrap().port();
            let mut listeners = vec![first];
            for ip in &ips[1..] {
                match TcpListener::bind((*ip, port)) {
                    Ok(l) => listeners.push(l),
                    Err(_) => continue 'retry,
                }
            }
            let mut hits = Vec::new();
            for (ip, listener) in ips.iter().zip(listeners) {
                let count = Arc::new(AtomicUsize::new(0));
                hits.push((*ip, Arc::clone(&count)));
                let name = ip.to_string();
                std::thread::spawn(move || {
                    for stream in listener.incoming() {
                        let Ok(mut stream) = stream else { continue };
                        count.fetch_add(1, Ordering::SeqCst);
                        let mut line = String::new();
                        let _ = BufReader::new(&stream).read_line(&mut line);
                        let _ = stream.write_all(format!("{name}\n").as_bytes());
                    }
                });
            }
            return Self { port, hits };
        }
        panic!("no common free port on {ips:?}");
    }

    fn hits(&self, ip: Ipv4Addr) -> usize {
        self.hits
            .iter()
            .find(|(i, _)| *i == ip)
            .map_or(0, |(_, c)| c.load(Ordering::SeqCst))
    }
}

fn random_vip() -> Ipv4Addr {
    let [a, b]: [u8; 2] = rand::random();
    Ipv4Addr::new(10, 253, a, b.max(1))
}

#[test]
fn routes_tcp_and_udp_through_a_vip_to_backends() {
    require_root();
    let node = Node::new();
    let mut dp = node.load();
    let b2 = Ipv4Addr::new(127, 0, 0, 2);
    let b3 = Ipv4Addr::new(127, 0, 0, 3);
    let backends = Backends::start(&[b2, b3]);
    let vip = random_vip();
    let target = SocketAddrV4::new(vip, backends.port);

    dp.set_services(&[(vip, vec![b2, b3])]).unwrap();
    for _ in 0..20 {
        let r = node.client("tcp", target);
        let ok2 = r == format!("peer={b2}:{p} reply={b2}", p = backends.port);
        let ok3 = r == format!("peer={b3}:{p} reply={b3}", p = backends.port);
        assert!(ok2 || ok3, "client through {target}: {r}");
    }
    let (h2, h3) = (backends.hits(b2), backends.hits(b3));
    assert_eq!(h2 + h3, 20);
    assert!(h2 > 0 && h3 > 0, "connections not spread: {h2} vs {h3}");

    // A removed backend gets no new connection.
    dp.set_services(&[(vip, vec![b3])]).unwrap();
    for _ in 0..10 {
        let r = node.client("tcp", target);
        assert_eq!(r, format!("peer={b3}:{p} reply={b3}", p = backends.port));
    }
    assert_eq!(backends.hits(b2), h2);

    // No backend: refused, never sent to the VIP.
    dp.set_services(&[(vip, vec![])]).unwrap();
    let r = node.client("tcp", target);
    assert!(
        r.starts_with("error="),
        "connect to a VIP without backends: {r}"
    );

    // UDP: the reply is seen as coming from the VIP.
    let echo = UdpSocket::bind((b2, 0)).unwrap();
    let udp_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let mut reply = b"pong:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = echo.send_to(&reply, from);
        }
    });
    let udp_vip = random_vip();
    dp.set_services(&[(vip, vec![b3]), (udp_vip, vec![b2])])
        .unwrap();
    let r = node.client("udp", SocketAddrV4::new(udp_vip, udp_port));
    assert_eq!(r, format!("from={udp_vip}:{udp_port} reply=pong:ping"));

    dp.unload().unwrap();
    assert!(!node.pins.exists(), "pin dir left: {}", node.pins.display());
    assert!(node.attachments().is_empty(), "{:?}", node.attachments());
}

#[test]
fn restart_reuses_pins_without_a_gap_or_a_second_attachment() {
    require_root();
    let node = Node::new();
    let b2 = Ipv4Addr::new(127, 0, 0, 2);
    let backends = Backends::start(&[b2]);
    let vip = random_vip();
    let target = SocketAddrV4::new(vip, backends.port);
    let expected = format!("peer={b2}:{p} reply={b2}", p = backends.port);

    let mut dp = node.load();
    dp.set_services(&[(vip, vec![b2])]).unwrap();
    assert_eq!(node.client("tcp", target), expected);
    let first = node.attachments();
    assert_eq!(first.len(), 3, "{first:?}");

    for round in 0..3 {
        // What an agent killed with -9 leaves behind: nothing is unloaded.
        drop(dp);
        assert_eq!(
            node.client("tcp", target),
            expected,
            "round {round}, agent gone"
        );
        dp = node.load();
        assert_eq!(
            node.client("tcp", target),
            expected,
            "round {round}, agent back"
        );
        // The maps came back with their content: nothing to write.
        let changes = dp.set_services(&[(vip, vec![b2])]).unwrap();
        assert_eq!(changes, Default::default(), "round {round}");
        let rows = node.attachments();
        assert_eq!(rows.len(), 3, "round {round}: {rows:?}");
        for kind in ["connect4", "sendmsg4", "recvmsg4"] {
            assert_eq!(
                rows.iter().filter(|r| r.contains(kind)).count(),
                1,
                "round {round}: {rows:?}"
            );
        }
    }

    dp.unload().unwrap();
    assert!(!node.pins.exists());
    assert!(node.attachments().is_empty(), "{:?}", node.attachments());
    // Unloaded: the VIP is no longer routed.
    let r = node.client("tcp", target);
    assert_ne!(r, expected);
}

/// Two netns hosts on one bridge, on two different berth networks, routed to each other on-link
/// (bridged: no IP forwarding, no default route).
struct TwoHosts {
    bridge: String,
    ns: [String; 2],
    host_veth: [String; 2],
    addr: [Ipv4Addr; 2],
    nets: [ipnet::Ipv4Net; 2],
}

impl TwoHosts {
    fn new() -> Self {
        let tag = random_hex(6);
        let [x, y]: [u8; 2] = rand::random();
        let y = y & 0x7f;
        let nets = [
            format!("10.{x}.{}.0/24", y * 2).parse().unwrap(),
            format!("10.{x}.{}.0/24", y * 2 + 1).parse().unwrap(),
        ];
        let me = Self {
            bridge: format!("bb{tag}"),
            ns: [format!("bn{tag}a"), format!("bn{tag}b")],
            host_veth: [format!("bh{tag}a"), format!("bh{tag}b")],
            addr: [
                Ipv4Addr::new(10, x, y * 2, 2),
                Ipv4Addr::new(10, x, y * 2 + 1, 2),
            ],
            nets,
        };
        run_ok("ip", &["link", "add", &me.bridge, "type", "bridge"]);
        run_ok("ip", &["link", "set", &me.bridge, "up"]);
        for i in 0..2 {
            let peer = format!("bc{tag}{i}");
            run_ok("ip", &["netns", "add", &me.ns[i]]);
            run_ok(
                "ip",
                &[
                    "link",
                    "add",
                    &me.host_veth[i],
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &peer,
                ],
            );
            run_ok("ip", &["link", "set", &peer, "netns", &me.ns[i]]);
            run_ok(
                "ip",
                &["link", "set", &me.host_veth[i], "master", &me.bridge, "up"],
            );
            let addr = format!("{}/24", me.addr[i]);
            let other = me.nets[1 - i].to_string();
            for args in [
                vec!["ip", "link", "set", "lo", "up"],
                vec!["ip", "link", "set", &peer, "up"],
                vec!["ip", "addr", "add", &addr, "dev", &peer],
                vec!["ip", "route", "add", &other, "dev", &peer],
            ] {
                let mut full = vec!["netns", "exec", &me.ns[i]];
                full.extend(args);
                run_ok("ip", &full);
            }
        }
        me
    }

    /// Whether host 0 gets a ping answer from host 1.
    fn ping(&self) -> bool {
        let dst = self.addr[1].to_string();
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns[0],
                "ping",
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "1",
                &dst,
            ],
        )
        .status
        .success()
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = run("ip", &["netns", "del", ns]);
        }
        for veth in &self.host_veth {
            let _ = run("ip", &["link", "del", veth]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}

#[test]
fn tc_policy_isolates_networks_until_linked_and_counts() {
    require_root();
    let node = Node::new();
    let hosts = TwoHosts::new();
    assert!(
        hosts.ping(),
        "hosts do not reach each other before any filter"
    );
    let mut dp = node.load();
    dp.set_networks(&[(hosts.nets[0], 1), (hosts.nets[1], 2)])
        .unwrap();
    let a = dp.attach_iface(&hosts.host_veth[0], 1).unwrap();
    let b = dp.attach_iface(&hosts.host_veth[1], 2).unwrap();

    assert!(!hosts.ping(), "networks 1 and 2 talk without a link");
    let c = dp.counters(a).unwrap();
    assert!(c.tx_dropped > 0, "{c:?}");

    dp.set_links(&[(2, 1)]).unwrap();
    assert!(hosts.ping(), "linked networks do not talk");
    let ca = dp.counters(a).unwrap();
    let cb = dp.counters(b).unwrap();
    assert!(ca.tx_packets >= 2 && ca.rx_packets >= 2, "{ca:?}");
    assert!(ca.tx_bytes >= 2 * 98 && ca.rx_bytes >= 2 * 98, "{ca:?}");
    assert!(cb.rx_packets >= 2 && cb.tx_packets >= 2, "{cb:?}");

    dp.set_links(&[]).unwrap();
    assert!(!hosts.ping(), "unlinked networks still talk");

    // Re-attaching (as a restarted agent does) keeps the counters and the policy.
    let before = dp.counters(a).unwrap();
    drop(dp);
    let mut dp = node.load();
    assert_eq!(dp.attach_iface(&hosts.host_veth[0], 1).unwrap(), a);
    assert!(dp.counters(a).unwrap().tx_packets >= before.tx_packets);
    assert!(!hosts.ping(), "policy lost over a restart");
    dp.set_links(&[(1, 2)]).unwrap();
    assert!(hosts.ping());

    dp.detach_iface(a).unwrap();
    dp.detach_iface(b).unwrap();
    assert!(dp.counters(a).is_err());
    let filters = run(
        "tc",
        &["filter", "show", "dev", &hosts.host_veth[0], "ingress"],
    );
    assert!(
        String::from_utf8_lossy(&filters.stdout).trim().is_empty(),
        "{filters:?}"
    );
    dp.unload().unwrap();
    assert!(!node.pins.exists());
}

#[test]
fn unload_after_a_fresh_load_leaves_nothing() {
    require_root();
    let node = Node::new();
    let dp = node.load();
    assert_eq!(node.attachments().len(), 3);
    assert!(Path::new(&node.pins).join("SERVICES").exists());
    dp.unload().unwrap();
    assert!(!node.pins.exists());
    assert!(node.attachments().is_empty());
}
