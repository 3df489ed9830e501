//! Real-kernel tests of `berth_agent::network::wireguard`: WireGuard between two netns hosts.
//!
//! Needs root (network namespaces, veths, a bridge, TUN devices), `/dev/net/tun`, and `ip`,
//! `tcpdump` and `busybox` (for `ping`). Two "hosts" (network namespaces) sit on a test bridge
//! with a private underlay /24 and no default route; each gets one WireGuard device, created
//! by a thread that entered the host's namespace (TUN devices and UDP sockets belong to the
//! namespace of the thread that makes them). Where the kernel has no WireGuard module (these
//! machines) that is the userspace boringtun device, so both devices live in this one test
//! process under distinct names. Drop guards remove namespaces, bridge, devices and child
//! processes even when an assertion fails.

use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_agent::network::wireguard::{
    device_name, Backend, NodeKey, Peer, PeerChanges, WireguardConfig, WireguardDevice,
    WireguardError, DEFAULT_LISTEN_PORT, DEFAULT_MTU,
};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Environment variable that turns [`child_agent`] from a no-op into the child process of the
/// signal and restart tests.
const CHILD_ENV: &str = "BERTH_WG_TEST_CHILD";

/// The one precondition of every test here.
fn require_root_and_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "network_wireguard tests need root: they create network namespaces, veths, a bridge and \
         TUN devices"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "network_wireguard tests need /dev/net/tun"
    );
    for tool in ["ip", "tcpdump", "busybox"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "network_wireguard tests need `{tool}` (apt-get install iproute2 tcpdump busybox)"
        );
    }
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

/// A bridge in the root namespace joining the test hosts; deleted on drop.
struct Bridge {
    name: String,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A network namespace playing one node, plugged into the bridge by a veth (`eth0` inside);
/// deleting the namespace on drop takes the veth pair and anything else in it along.
struct Host {
    netns: String,
    underlay_ip: Ipv4Addr,
    tunnel_ip: Ipv4Addr,
    node_id: String,
}

impl Host {
    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.netns];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    fn has_link(&self, name: &str) -> bool {
        self.exec(&["ip", "link", "show", "dev", name])
            .status
            .success()
    }

    fn config(&self) -> WireguardConfig {
        WireguardConfig::new(device_name(&self.node_id), self.tunnel_ip, 24)
    }

    /// This host as a WireGuard peer of the others.
    fn peer(&self, key: &NodeKey) -> Peer {
        Peer {
            public_key: key.public_key(),
            endpoint: SocketAddr::from((self.underlay_ip, DEFAULT_LISTEN_PORT)),
            tunnel_ip: self.tunnel_ip,
            persistent_keepalive: None,
        }
    }

    /// One ping through whatever route the host has to `ip`.
    fn ping_once(&self, ip: Ipv4Addr) -> bool {
        let ip = ip.to_string();
        self.exec(&["busybox", "ping", "-c1", "-W1", &ip])
            .status
            .success()
    }

    /// Pings until one answer (the first packets wait for the WireGuard handshake).
    fn pings(&self, ip: Ipv4Addr) -> bool {
        (0..10).any(|_| self.ping_once(ip))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
    }
}

/// Two hosts on one bridge: underlay `10.a.b.1/24` and `.2/24`, tunnel `10.c.d.1/24` and `.2/24`,
/// no default route anywhere.
struct Lab {
    // Hosts first: fields drop in order, and the bridge goes last.
    hosts: [Host; 2],
    _bridge: Bridge,
}

impl Lab {
    fn new() -> Self {
        let tag = random_hex(6);
        let bridge = Bridge {
            name: format!("bwtb{tag}"),
        };
        run_ok("ip", &["link", "add", &bridge.name, "type", "bridge"]);
        run_ok("ip", &["link", "set", &bridge.name, "up"]);
        let [a, b, c, d]: [u8; 4] = rand::random();
        // Keep the tunnel /24 apart from the underlay /24.
        let d = if (c, d) == (a, b) {
            d.wrapping_add(1)
        } else {
            d
        };
        let hosts = [1u8, 2].map(|n| {
            let host = Host {
                netns: format!("bwt-{tag}-{n}"),
                underlay_ip: Ipv4Addr::new(10, a, b, n),
                tunnel_ip: Ipv4Addr::new(10, c, d, n),
                node_id: format!("node-{tag}-{n}"),
            };
            run_ok("ip", &["netns", "add", &host.netns]);
            let veth = format!("bwt{tag}{n}");
            run_ok(
                "ip",
                &[
                    "link",
                    "add",
                    &veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &host.netns,
                ],
            );
            run_ok("ip", &["link", "set", &veth, "master", &bridge.name, "up"]);
            let cidr = format!("{}/24", host.underlay_ip);
            for args in [
                vec!["ip", "link", "set", "lo", "up"],
                vec!["ip", "addr", "add", &cidr, "dev", "eth0"],
                vec!["ip", "link", "set", "eth0", "up"],
            ] {
                let out = host.exec(&args);
                assert!(out.status.success(), "{args:?} in {}: {out:?}", host.netns);
            }
            host
        });
        let lab = Self {
            hosts,
            _bridge: bridge,
        };
        let [one, two] = &lab.hosts;
        assert!(
            one.pings(two.underlay_ip),
            "underlay between the hosts works"
        );
        lab
    }
}

/// Runs `body` on a fresh thread that has entered the namespace at `netns`, on a current-thread
/// tokio runtime (every task stays on that thread, hence in that namespace). Threads it starts
/// (boringtun's) inherit the namespace.
fn in_netns<F, Fut, T>(netns: PathBuf, body: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let thread = std::thread::spawn(move || {
        let file = File::open(&netns).expect("open netns");
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
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

fn ensure_on(host: &Host, key: &Arc<NodeKey>) -> Result<WireguardDevice, WireguardError> {
    let (config, key) = (host.config(), Arc::clone(key));
    in_netns(host.path(), move || async move {
        WireguardDevice::ensure(&config, &key).await
    })
}

fn remove_on(host: &Host, device: WireguardDevice) -> Result<(), WireguardError> {
    in_netns(host.path(), move || device.remove())
}

/// Two hosts with a device each, peered with each other.
struct Pair {
    // Devices first: they stop before the lab's namespaces go.
    devices: [WireguardDevice; 2],
    keys: [Arc<NodeKey>; 2],
    lab: Lab,
}

impl Pair {
    fn new() -> Self {
        let lab = Lab::new();
        let keys = [Arc::new(NodeKey::generate()), Arc::new(NodeKey::generate())];
        let devices = [0, 1].map(|i| {
            ensure_on(&lab.hosts[i], &keys[i]).unwrap_or_else(|e| panic!("ensure on host {i}: {e}"))
        });
        for (i, device) in devices.iter().enumerate() {
            let host = &lab.hosts[i];
            assert_eq!(device.name(), device_name(&host.node_id));
            assert!(
                host.has_link(device.name()),
                "device link in {}",
                host.netns
            );
            let show = host.exec(&["ip", "-4", "addr", "show", "dev", device.name()]);
            let show = String::from_utf8_lossy(&show.stdout);
            assert!(show.contains(&format!("{}/24", host.tunnel_ip)), "{show}");
            assert!(show.contains(&format!("mtu {DEFAULT_MTU}")), "{show}");
            eprintln!(
                "host {i}: device {} backend {}",
                device.name(),
                device.backend()
            );
        }
        assert_ne!(devices[0].name(), devices[1].name());
        let pair = Self { devices, keys, lab };
        for i in [0, 1] {
            let changes = pair.devices[i]
                .set_peers(&[pair.peer_of(1 - i)])
                .expect("set_peers");
            assert_eq!(
                changes,
                PeerChanges {
                    added: 1,
                    ..PeerChanges::default()
                }
            );
        }
        pair
    }

    fn host(&self, i: usize) -> &Host {
        &self.lab.hosts[i]
    }

    fn peer_of(&self, i: usize) -> Peer {
        self.host(i).peer(&self.keys[i])
    }
}

/// tcpdump on a host's underlay interface, writing a pcap file; stopped on drop.
struct Capture {
    child: Child,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    fn start(host: &Host, interface: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("underlay.pcap");
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &host.netns,
                "tcpdump",
                "-i",
                interface,
                "-nn",
                "-U",
            ])
            // Stay root: the unprivileged `tcpdump` user cannot write into the temporary dir.
            .args(["-Z", "root"])
            // Hand each packet over at once: a stop signal drops what still waits in the ring.
            .arg("--immediate-mode")
            .arg("-w")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning tcpdump");
        let stderr = child.stderr.take().expect("tcpdump stderr");
        let capture = Self {
            child,
            file,
            _dir: dir,
        };
        let lines = line_channel(stderr);
        let started = wait_for_line(&lines, "listening on", Duration::from_secs(10));
        assert!(started.is_some(), "tcpdump never started listening");
        capture
    }

    /// Stops tcpdump (it writes out what it holds) and returns the pcap bytes and tcpdump's
    /// one-line summary of each IPv4 packet.
    fn finish(mut self) -> (Vec<u8>, Vec<String>) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        // Give the last packets a moment to be written with -U.
        std::thread::sleep(Duration::from_millis(300));
        kill(pid, Signal::SIGTERM).expect("stopping tcpdump");
        let status = self.child.wait().expect("waiting for tcpdump");
        assert!(
            status.success() || status.code().is_none(),
            "tcpdump: {status}"
        );
        let bytes = std::fs::read(&self.file).expect("reading the capture");
        let text = run("tcpdump", &["-nn", "-r", &self.file.to_string_lossy()]);
        let summary = String::from_utf8_lossy(&text.stdout)
            .lines()
            .filter(|line| line.contains(" IP "))
            .map(str::to_owned)
            .collect();
        (bytes, summary)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A background reader sending each line of `source` on a channel.
fn line_channel<R: Read + Send + 'static>(source: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(source).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    needle: &str,
    timeout: Duration,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Sends `payload` over TCP from host `from` to `to_ip:port` in host `to`, which echoes it;
/// returns what came back.
fn tcp_echo(from: &Host, to: &Host, to_ip: Ipv4Addr, payload: Vec<u8>) -> Vec<u8> {
    let addr = SocketAddr::from((to_ip, 7000 + rand::random::<u16>() % 1000));
    let (ready_tx, ready_rx) = mpsc::channel();
    let server_netns = to.path();
    let server = std::thread::spawn(move || {
        let file = File::open(&server_netns).expect("open netns");
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = TcpListener::bind(addr).expect("bind echo server");
        ready_tx.send(()).expect("signal ready");
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut received = Vec::new();
        conn.read_to_end(&mut received).expect("read");
        conn.write_all(&received).expect("echo");
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("echo server ready");
    let client_netns = from.path();
    let client = std::thread::spawn(move || {
        let file = File::open(&client_netns).expect("open netns");
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        assert_eq!(conn.peer_addr().expect("peer address"), addr);
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        conn.write_all(&payload).expect("send");
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut echoed = Vec::new();
        conn.read_to_end(&mut echoed).expect("read echo");
        echoed
    });
    let echoed = client
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    server
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    echoed
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn traffic_between_hosts_goes_through_the_tunnel_encrypted() {
    require_root_and_tools();
    let pair = Pair::new();
    let (one, two) = (pair.host(0), pair.host(1));

    // Applying the same peers again changes nothing.
    let again = pair.devices[0]
        .set_peers(&[pair.peer_of(1)])
        .expect("set_peers again");
    assert_eq!(again, PeerChanges::default());

    let capture = Capture::start(one, "eth0");
    assert!(one.pings(two.tunnel_ip), "ping through the tunnel");
    let marker = format!("BERTH-PLAINTEXT-{}", random_hex(12));
    let payload = marker.repeat(200).into_bytes();
    let echoed = tcp_echo(one, two, two.tunnel_ip, payload.clone());
    assert_eq!(echoed, payload, "tcp echo through the tunnel");
    let (pcap, packets) = capture.finish();

    assert!(
        packets.len() >= 10,
        "the underlay capture saw the tunnel traffic: {packets:?}"
    );
    let port = format!(".{DEFAULT_LISTEN_PORT}");
    // The fresh veths' own IGMP reports are the kernel's link housekeeping, not tunnel traffic.
    for line in packets.iter().filter(|line| !line.contains(": igmp ")) {
        let wireguard = line.contains(&format!("{port} > "))
            && line.contains(&format!("{port}: UDP"))
            && [one.underlay_ip, two.underlay_ip]
                .iter()
                .all(|ip| line.contains(&format!("{ip}{port}")));
        assert!(
            wireguard,
            "only WireGuard UDP between the hosts on the underlay: {line}"
        );
    }
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "plaintext payload visible on the underlay"
    );
    // Control: the same payload over the bare underlay is plainly visible to such a capture.
    let control = Capture::start(one, "eth0");
    let echoed = tcp_echo(one, two, two.underlay_ip, payload.clone());
    assert_eq!(echoed, payload);
    let (pcap, _) = control.finish();
    assert!(
        contains(&pcap, marker.as_bytes()),
        "the capture would have seen plaintext"
    );

    let status = pair.devices[0].peers().expect("peers");
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].public_key, pair.keys[1].public_key());
    assert_eq!(
        status[0].allowed_ips,
        vec![(two.tunnel_ip.into(), 32)],
        "allowed IPs: the peer's tunnel address only"
    );
    assert!(status[0].last_handshake.is_some(), "handshake done");
    assert!(
        status[0].rx_bytes > 0 && status[0].tx_bytes > 0,
        "{status:?}"
    );
}

#[test]
fn set_peers_adds_updates_removes_and_rejects_bad_keys_whole() {
    require_root_and_tools();
    let pair = Pair::new();
    let (one, two) = (pair.host(0), pair.host(1));
    assert!(one.pings(two.tunnel_ip), "ping through the tunnel");

    // A bad key from the wire fails the call and changes nothing.
    let mut bad = pair.peer_of(1);
    bad.public_key = "bm90IGEga2V5".to_owned();
    bad.tunnel_ip = Ipv4Addr::new(10, 255, 255, 254);
    let err = pair.devices[0]
        .set_peers(&[bad])
        .expect_err("a bad key must be refused");
    assert!(
        matches!(err, WireguardError::PeerKeyInvalid { .. }),
        "{err}"
    );
    assert_eq!(pair.devices[0].peers().expect("peers").len(), 1);
    assert!(
        one.ping_once(two.tunnel_ip),
        "still reachable after the refused set"
    );

    // This node in its own list is skipped.
    let with_self = [pair.peer_of(0), pair.peer_of(1)];
    assert_eq!(
        pair.devices[0].set_peers(&with_self).expect("set_peers"),
        PeerChanges::default()
    );

    // An update (userspace: removal and re-addition) keeps the tunnel working.
    let mut keepalive = pair.peer_of(1);
    keepalive.persistent_keepalive = Some(5);
    let changes = pair.devices[0].set_peers(&[keepalive]).expect("update");
    assert_eq!(
        changes,
        PeerChanges {
            updated: 1,
            ..PeerChanges::default()
        }
    );
    let status = pair.devices[0].peers().expect("peers");
    assert_eq!(status[0].persistent_keepalive, Some(5));
    assert!(one.pings(two.tunnel_ip), "ping after the update");

    // Removing the peer stops traffic both ways.
    let changes = pair.devices[0].set_peers(&[]).expect("remove all");
    assert_eq!(
        changes,
        PeerChanges {
            removed: 1,
            ..PeerChanges::default()
        }
    );
    assert!(pair.devices[0].peers().expect("peers").is_empty());
    assert!(
        !one.ping_once(two.tunnel_ip),
        "no traffic after the peer left"
    );
    assert!(
        !two.ping_once(one.tunnel_ip),
        "no traffic after the peer left"
    );

    // And adding it back restores it.
    pair.devices[0]
        .set_peers(&[pair.peer_of(1)])
        .expect("add back");
    assert!(one.pings(two.tunnel_ip), "ping after the peer came back");
}

#[test]
fn remove_leaves_no_link_socket_or_port() {
    require_root_and_tools();
    let lab = Lab::new();
    let host = &lab.hosts[0];
    let key = Arc::new(NodeKey::generate());
    let device = ensure_on(host, &key).expect("ensure");
    let name = device.name().to_owned();
    assert!(host.has_link(&name));

    // A second userspace device of the same name while the first runs is refused, not merged
    // into the first one's TUN device (a kernel device would simply be adopted).
    if device.backend() == Backend::Userspace {
        let err = ensure_on(host, &key).expect_err("second device with the same name");
        assert!(matches!(err, WireguardError::LinkBusy { .. }), "{err}");
        assert!(device.peers().is_ok(), "the first device still runs");
    }

    // A running device follows a new tunnel address (and keeps its port) without a restart.
    let mut moved = host.config();
    moved.tunnel_ip = Ipv4Addr::new(10, 254, 1, 7);
    let device = in_netns(host.path(), move || async move {
        device.reconfigure(&moved).await.map(|()| device)
    })
    .expect("reconfigure");
    let show = host.exec(&["ip", "-4", "addr", "show", "dev", &name]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains("10.254.1.7/24"), "{show}");
    assert!(!show.contains(&host.tunnel_ip.to_string()), "{show}");
    let port = format!("sport = :{DEFAULT_LISTEN_PORT}");
    let listening = host.exec(&["ss", "-Hnlu", &port]);
    assert!(
        !listening.stdout.is_empty(),
        "still listening: {listening:?}"
    );

    remove_on(host, device).expect("remove");
    assert!(!host.has_link(&name), "link {name} left behind");
    for dir in ["/var/run/wireguard", "/run/wireguard"] {
        let socket = Path::new(dir).join(format!("{name}.sock"));
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
    // boringtun's UDP sockets are closed: the port is free again in that namespace (its worker
    // threads drop them as they exit, a moment after the device went; seen taking over 0 ms
    // under CI load).
    let mut bound = Err(std::io::Error::other("not tried"));
    for _ in 0..40 {
        bound = in_netns(host.path(), || async {
            UdpSocket::bind(("0.0.0.0", DEFAULT_LISTEN_PORT)).map(drop)
        });
        if bound.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        bound.is_ok(),
        "port {DEFAULT_LISTEN_PORT} still taken 2 s after the removal: {bound:?}"
    );

    // Dropping a userspace device (the agent exiting) also takes its link away, and ensure
    // makes a fresh one afterwards.
    let device = ensure_on(host, &key).expect("ensure after remove");
    if device.backend() == Backend::Userspace {
        drop(device);
        let deadline = Instant::now() + Duration::from_secs(5);
        while host.has_link(&name) {
            assert!(Instant::now() < deadline, "link {name} outlived its device");
            std::thread::sleep(Duration::from_millis(20));
        }
        let device = ensure_on(host, &key).expect("ensure after drop");
        remove_on(host, device).expect("remove again");
    } else {
        remove_on(host, device).expect("remove kernel device");
    }
    assert!(!host.has_link(&name));
}

/// A process like the agent: a tokio SIGTERM handler, then `ensure` in its (inherited)
/// namespace; killed on drop.
struct ChildAgent {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl ChildAgent {
    fn spawn(host: &Host) -> Self {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &host.netns])
            .arg(exe)
            .args(["child_agent", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .env("BERTH_WG_TEST_NAME", device_name(&host.node_id))
            .env("BERTH_WG_TEST_IP", host.tunnel_ip.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the child agent");
        let stdout: ChildStdout = child.stdout.take().expect("child stdout");
        let stderr = child.stderr.take().expect("child stderr");
        let agent = Self {
            child,
            stdout: line_channel(stdout),
            stderr: line_channel(stderr),
        };
        let ready = wait_for_line(&agent.stdout, "child ready", Duration::from_secs(20));
        assert!(
            ready.is_some(),
            "child agent never became ready; its output:\n{}",
            agent.output()
        );
        agent
    }

    /// What the child printed so far (its panic message, if it failed).
    fn output(&self) -> String {
        let lines: Vec<String> = self
            .stdout
            .try_iter()
            .chain(self.stderr.try_iter())
            .collect();
        lines.join("\n")
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"))
    }
}

impl Drop for ChildAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of the child process of the two tests below; a no-op in a normal test run.
#[test]
fn child_agent() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let name = std::env::var("BERTH_WG_TEST_NAME").expect("device name");
    let ip: Ipv4Addr = std::env::var("BERTH_WG_TEST_IP")
        .expect("tunnel ip")
        .parse()
        .expect("tunnel ip parses");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let key = NodeKey::generate();
        let device = WireguardDevice::ensure(&WireguardConfig::new(name, ip, 24), &key)
            .await
            .expect("ensure in the child");
        let blocking = threads_blocking_term_or_int();
        assert!(
            blocking.is_empty(),
            "threads blocking SIGTERM/SIGINT: {blocking:?}"
        );
        assert_eq!(signalfds(), 0, "a signalfd exists after ensure");
        println!("child ready backend={}", device.backend());
        let received = tokio::time::timeout(Duration::from_secs(20), terminate.recv()).await;
        assert!(
            matches!(received, Ok(Some(()))),
            "SIGTERM never reached the handler"
        );
        device
            .peers()
            .expect("the device still answers after SIGTERM");
        println!("child sigterm handled");
        // Hold the device like a running agent until killed.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

/// Threads of this process that keep SIGTERM or SIGINT blocked. A thread being created has every signal blocked
/// for a moment (glibc blocks them around clone until the new thread sets its own mask), so only
/// a thread seen blocking in every one of several looks counts.
fn threads_blocking_term_or_int() -> Vec<String> {
    let mut lasting = blocking_now();
    for _ in 0..4 {
        if lasting.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        let again = blocking_now();
        lasting.retain(|t| again.contains(t));
    }
    lasting
}

/// Threads of this process whose signal mask holds SIGTERM or SIGINT right now.
fn blocking_now() -> Vec<String> {
    let mask = (1u64 << (libc::SIGTERM - 1)) | (1u64 << (libc::SIGINT - 1));
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("read /proc/self/task") {
        let task = task.expect("task entry").path();
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .expect("SigBlk line");
        if blocked & mask != 0 {
            let name = status.lines().next().unwrap_or_default().to_owned();
            found.push(format!("{} ({name})", task.display()));
        }
    }
    found
}

fn signalfds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("signalfd"))
        .count()
}

#[test]
fn sigterm_handler_still_fires_after_ensure() {
    require_root_and_tools();
    let lab = Lab::new();
    let agent = ChildAgent::spawn(&lab.hosts[0]);
    kill(agent.pid(), Signal::SIGTERM).expect("sending SIGTERM");
    let handled = wait_for_line(
        &agent.stdout,
        "child sigterm handled",
        Duration::from_secs(20),
    );
    assert!(
        handled.is_some(),
        "the child's tokio SIGTERM handler did not fire, or its device died; its output:\n{}",
        agent.output()
    );
}

#[test]
fn ensure_recreates_the_device_after_the_agent_is_killed() {
    require_root_and_tools();
    let lab = Lab::new();
    let host = &lab.hosts[0];
    let mut agent = ChildAgent::spawn(host);
    let name = device_name(&host.node_id);
    assert!(host.has_link(&name), "the child's device exists");
    kill(agent.pid(), Signal::SIGKILL).expect("killing the child");
    agent.child.wait().expect("reaping the child");

    let key = Arc::new(NodeKey::generate());
    let device = ensure_on(host, &key).expect("ensure after the agent died");
    assert_eq!(device.name(), name);
    let show = host.exec(&["ip", "-4", "addr", "show", "dev", &name]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains(&format!("{}/24", host.tunnel_ip)), "{show}");
    assert!(show.contains("UP"), "{show}");
    assert_eq!(device.public_key(), key.public_key());
    remove_on(host, device).expect("remove");
}
