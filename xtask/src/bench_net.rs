//! `cargo xtask bench net`: TCP throughput and HTTP request rate over each network path, side by side,
//! and the connect rate to a service VIP against the replica's own IP.
//!
//! A private three-node cluster (release binaries). Paths measured, node 1 → node 2 each time:
//! the bare netns hosts (bridge), instance to instance over a plain (VXLAN) network, and over an
//! encrypted one (VXLAN inside WireGuard). `iperf3` and `wrk` are host binaries run inside the
//! instances' network namespaces (`nsenter --net=/proc/PID/ns/net`), so the packets take the
//! instance's path: veth, bridge, VXLAN, (WireGuard,) underlay. The HTTP server is the demo image's
//! busybox httpd, which closes every connection: its request rate is also a connect rate.
//!
//! Service routing rewrites `connect()` in an eBPF program attached to the agent's cgroup2 subtree,
//! so the VIP client also joins the instance's cgroup2 group before entering its netns.

use anyhow::{bail, Context};
use berth_tests::api::placements;
use berth_tests::image::DEMO_BODY;
use berth_tests::{wait_for, Cluster, Profile};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// Options of `bench net`.
#[derive(clap::Args)]
pub struct NetArgs {
    /// Seconds each iperf3 and wrk run lasts.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Parallel TCP streams of iperf3 (`-P`).
    #[arg(long, default_value_t = 1)]
    streams: u32,
    /// wrk threads (`-t`).
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// wrk connections kept open at once (`-c`).
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Rounds of the VIP/direct comparison (alternating; the median of each side counts).
    #[arg(long, default_value_t = 3)]
    vip_rounds: usize,
    /// Replicas created and deleted to time how fast the other nodes' data planes follow.
    #[arg(long, default_value_t = 10)]
    follow_rounds: usize,
    /// Keep the cluster up after measuring until stdin reaches a newline or its end (to look around).
    #[arg(long)]
    hold: bool,
}

/// How long instances may take to run, and a path to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Port of the iperf3 servers.
const IPERF_PORT: u16 = 5201;
/// Port of the busybox httpd started on node 2's host (the demo image's serves on 80).
const HOST_HTTP_PORT: u16 = 8080;
/// Above this share of socket errors a wrk run counts as failed rather than as a figure.
const MAX_SOCKET_ERROR_SHARE: f64 = 0.01;
/// What the VIP/direct ratio should reach (the issue's goal).
const VIP_GOAL: f64 = 0.95;

/// Runs the benchmark and prints the figures.
pub fn net(args: &NetArgs) -> anyhow::Result<()> {
    if args.seconds == 0 || args.streams == 0 || args.vip_rounds == 0 {
        bail!("--seconds, --streams and --vip-rounds must be at least 1");
    }
    if args.threads == 0 || args.connections < args.threads {
        bail!("wrk needs at least one thread and at least as many connections as threads");
    }
    crate::install::run()?;
    println!("bench: building release binaries");
    crate::build_release()?;
    println!("bench: starting a private 3-node cluster");
    let cluster = Cluster::builder()
        .nodes(3)
        .profile(Profile::Release)
        .node_capacity("64", "64GB")
        .start()?;
    let nodes = cluster.node_ids().to_vec();
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let work = tempfile::tempdir().context("making a scratch directory")?;
    let bench = Bench {
        cluster: &cluster,
        args,
        logs: work.path(),
    };

    let mut rows = Vec::new();
    println!("bench: hosts {n1} -> {n2}");
    rows.push(bench.hosts(n1, n2)?);
    println!("{}", rows[0].line());
    let plain = bench.network("benchvxlan", "10.93.0.0/24", false)?;
    let encrypted = bench.network("benchwg", "10.94.0.0/24", true)?;
    for (net, label, name) in [
        (&plain, "VXLAN", "web-vxlan"),
        (&encrypted, "WireGuard", "web-wg"),
    ] {
        println!("bench: instances {n1} -> {n2} over {label}");
        let web = bench.deploy(net, name, 3)?;
        let (client, server) = (pick(&web, n1)?, pick(&web, n2)?);
        let path = format!("instances {}, {label}", arrow(&nodes, n1, n2));
        let row = bench.instances(&path, client, server)?;
        println!("{}", row.line());
        rows.push(row);
    }
    println!("bench: connect rate, service VIP vs replica IP");
    let vip = bench.vip_vs_direct(&plain)?;
    println!("bench: how fast other nodes follow a replica coming and going");
    let follow = bench.propagation(&plain, args.follow_rounds)?;

    println!("{}", table(&rows, args));
    println!("{}", vip.report(&nodes));
    println!("{}", follow.report());
    if vip.ratio() < VIP_GOAL {
        println!("  note: the VIP is below the goal of {VIP_GOAL}x the direct rate");
    }
    if args.hold {
        println!(
            "bench: holding cluster {} (hub {}); VIP client {:?}, replica {:?}; press Enter to tear down",
            cluster.state().prefix,
            cluster.state().hub_api,
            vip.client,
            vip.replica
        );
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    Ok(())
}

/// One row of the path table.
struct Row {
    path: String,
    bits_per_second: f64,
    requests_per_second: f64,
    notes: Vec<String>,
}

/// What the VIP comparison measured.
struct VipFigures {
    client: Instance,
    replica: Instance,
    vip: String,
    direct: Vec<f64>,
    via_vip: Vec<f64>,
}

impl VipFigures {
    fn ratio(&self) -> f64 {
        median(&self.via_vip) / median(&self.direct)
    }

    fn report(&self, nodes: &[String]) -> String {
        let mut s = format!(
            "connect rate to a 1-replica service, instance {} (wrk -c as above, median of {} rounds):\n",
            arrow(nodes, &self.client.node, &self.replica.node),
            self.direct.len()
        );
        let rates = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            s,
            "  {:<28} {:>10.0} req/s   (rounds: {})",
            format!("replica IP {}", self.replica.ip),
            median(&self.direct),
            rates(&self.direct)
        );
        let _ = writeln!(
            s,
            "  {:<28} {:>10.0} req/s   (rounds: {})",
            format!("service VIP {}", self.vip),
            median(&self.via_vip),
            rates(&self.via_vip)
        );
        // Each round's own ratio shows how much of the difference is the machine's noise.
        let paired: Vec<String> = self
            .via_vip
            .iter()
            .zip(&self.direct)
            .map(|(v, d)| format!("{:.2}", v / d))
            .collect();
        let _ = write!(
            s,
            "  {:<28} {:>10.3}         (goal >= {VIP_GOAL}; per round: {})",
            "VIP / direct",
            self.ratio(),
            paired.join(" ")
        );
        s
    }
}

/// An instance as the bench uses it: where it runs and a pid inside its network namespace.
#[derive(Debug, Clone)]
struct Instance {
    id: String,
    node: String,
    ip: String,
    /// The first pid of its cgroup: the container's init.
    pid: u32,
}

impl Instance {
    fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.pid)
    }
}

/// Where a measuring process runs: a network namespace, and optionally a cgroup2 group to join
/// first (so the instance's eBPF service routing applies to it).
#[derive(Debug, Clone)]
struct Place {
    what: String,
    netns: String,
    cgroup2: Option<PathBuf>,
}

impl Place {
    fn host(cluster: &Cluster, node: &str) -> anyhow::Result<Place> {
        Ok(Place {
            what: format!("host {node}"),
            netns: cluster.state().host(node)?.netns_path(),
            cgroup2: None,
        })
    }

    fn instance(i: &Instance) -> Place {
        Place {
            what: format!("instance {} on {}", i.id, i.node),
            netns: i.netns(),
            cgroup2: None,
        }
    }

    /// Like [`Place::instance`], inside the instance's cgroup2 group.
    fn instance_cgroup(i: &Instance) -> anyhow::Result<Place> {
        let group = cgroup2_mount()
            .join(format!("berth-{}", i.node))
            .join(&i.id);
        if !group.is_dir() {
            bail!(
                "instance {} has no cgroup2 group {} (the agent puts every instance there for \
                 service routing)",
                i.id,
                group.display()
            );
        }
        Ok(Place {
            what: format!("instance {} on {} (in its cgroup2 group)", i.id, i.node),
            cgroup2: Some(group),
            ..Place::instance(i)
        })
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd;
        match &self.cgroup2 {
            // The shell moves itself into the group, then becomes nsenter, then the program: one
            // process, in the group from its first connect on.
            Some(group) => {
                cmd = Command::new("sh");
                cmd.args([
                    "-c",
                    r#"cg=$1; ns=$2; shift 2; echo $$ > "$cg" && exec nsenter --net="$ns" -- "$@""#,
                    "sh",
                ])
                .arg(group.join("cgroup.procs"))
                .arg(&self.netns)
                .arg(program);
            }
            None => {
                cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", self.netns))
                    .arg("--")
                    .arg(program);
            }
        }
        cmd.args(args);
        cmd
    }

    /// Lets connects from this netns reuse ports still in TIME_WAIT (`tcp_tw_reuse=1`, a load
    /// generator's usual setting). Without it the connect rate measures the ephemeral-port search:
    /// over the overlays the client often closes first, so its netns piles up TIME_WAIT sockets to
    /// the one server address, and a second 5 s run fell from ~6000 to ~600 req/s here.
    fn tune_client(&self) -> anyhow::Result<()> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.netns))
            .args(["--", "sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse"])
            .output()
            .context("running nsenter")?;
        if !out.status.success() {
            bail!(
                "setting tcp_tw_reuse in {} ({}): {}",
                self.what,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.command(program, args)
            .output()
            .with_context(|| format!("running {program} in {}", self.what))
    }
}

/// A server started for one measurement; killed when dropped.
struct Server {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Server {
    fn start(
        place: &Place,
        program: &str,
        args: &[&str],
        logs: &Path,
        tag: &str,
    ) -> anyhow::Result<Server> {
        let log = logs.join(format!("{tag}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = place
            .command(program, args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {program} in {}", place.what))?;
        Ok(Server {
            what: format!("{program} in {}", place.what),
            child,
            log,
        })
    }

    /// Fails (with the server's output) if it has exited.
    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}): {}",
                self.what,
                std::fs::read_to_string(&self.log)
                    .unwrap_or_default()
                    .trim()
            );
        }
        Ok(())
    }

    /// Waits until something listens on TCP `port` in the server's netns.
    fn wait_listening(&mut self, place: &Place, port: u16) -> anyhow::Result<()> {
        let filter = format!(":{port}");
        wait_for(
            &format!("{} to listen on {port}", self.what),
            Duration::from_secs(10),
            || {
                self.ensure_running()?;
                let out = place.run("ss", &["-Hltn", "sport", "=", &filter])?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                Ok(if out.status.success() && !stdout.trim().is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "ss: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                })
            },
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The measurements, sharing the cluster and the options.
struct Bench<'a> {
    cluster: &'a Cluster,
    args: &'a NetArgs,
    logs: &'a Path,
}

impl Bench<'_> {
    /// Node 1's host to node 2's host: the bare underlay the overlays run on.
    fn hosts(&self, n1: &str, n2: &str) -> anyhow::Result<Row> {
        let (client, server) = (
            Place::host(self.cluster, n1)?,
            Place::host(self.cluster, n2)?,
        );
        let server_ip = self.cluster.state().host(n2)?.ip.to_string();
        let www = self.logs.join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join("index.html"), DEMO_BODY)?;
        let listen = format!("{server_ip}:{HOST_HTTP_PORT}");
        let www = www.to_string_lossy();
        let mut httpd = Server::start(
            &server,
            "busybox",
            &["httpd", "-f", "-p", &listen, "-h", &www],
            self.logs,
            "host-httpd",
        )?;
        httpd.wait_listening(&server, HOST_HTTP_PORT)?;
        let path = format!("hosts {} (bridge)", arrow(self.cluster.node_ids(), n1, n2));
        let row = self.measure(
            &path,
            &client,
            &server,
            &server_ip,
            &format!("http://{listen}/"),
        )?;
        httpd.ensure_running()?;
        Ok(row)
    }

    /// Instance `client` to instance `server` (the demo image's httpd), over the network they share.
    fn instances(&self, path: &str, client: &Instance, server: &Instance) -> anyhow::Result<Row> {
        let (c, s) = (Place::instance(client), Place::instance(server));
        let url = format!("http://{}/", server.ip);
        self.measure(path, &c, &s, &server.ip, &url)
            .with_context(|| format!("{path}: from {} to {}", client.id, server.id))
    }

    /// iperf3 and wrk from `client` to `server` (reached at `server_ip`, serving HTTP at `url`).
    fn measure(
        &self,
        path: &str,
        client: &Place,
        server: &Place,
        server_ip: &str,
        url: &str,
    ) -> anyhow::Result<Row> {
        client.tune_client()?;
        wait_http(client, url).with_context(|| format!("{path}: no HTTP answer"))?;
        let mut iperf = Server::start(
            server,
            "iperf3",
            &["-s", "-p", &IPERF_PORT.to_string()],
            self.logs,
            &format!("iperf3-{server_ip}"),
        )?;
        iperf.wait_listening(server, IPERF_PORT)?;
        let tcp = self.iperf3(client, server_ip, &mut iperf)?;
        let http = wrk(client, url, self.args)?;
        Ok(row(path, tcp, http))
    }

    fn iperf3(&self, client: &Place, ip: &str, server: &mut Server) -> anyhow::Result<f64> {
        let out = client.run(
            "iperf3",
            &[
                "-c",
                ip,
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &self.args.seconds.to_string(),
                "-P",
                &self.args.streams.to_string(),
                "-J",
            ],
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let bps = parse_iperf3(&stdout).with_context(|| {
            format!(
                "iperf3 from {} to {ip} ({}; stderr: {})",
                client.what,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        if !out.status.success() {
            bail!(
                "iperf3 from {} to {ip} failed ({})",
                client.what,
                out.status
            );
        }
        server.ensure_running()?;
        Ok(bps)
    }

    fn network(&self, name: &str, cidr: &str, encrypted: bool) -> anyhow::Result<String> {
        let r = self
            .cluster
            .api()
            .post(
                "/v1/networks",
                &json!({"name": name, "cidr": cidr, "encrypted": encrypted}),
            )?
            .expect_status(201, &format!("creating network {name}"))?;
        match r.body["network_id"].as_str() {
            Some(id) => Ok(id.to_string()),
            None => bail!("no network_id in {}", r.text),
        }
    }

    /// Deploys `replicas` replicas of the demo image (the scheduler spreads them over the nodes).
    fn deploy(&self, network: &str, name: &str, replicas: usize) -> anyhow::Result<Deployed> {
        let api = self.cluster.api();
        // cpu "2" is the whole machine: the replicas' httpd must not be throttled by its quota, nor a
        // client that joins its cgroup on a pure cgroup v2 host.
        let id = api.create_container(&json!({
            "image": self.cluster.demo_image(), "cpu": "2", "memory": "128MB",
            "network_id": network, "name": name, "replicas": replicas,
        }))?;
        let c = api.wait_running(&id, replicas, READY_TIMEOUT)?;
        let instances = placements(&c)
            .into_iter()
            .map(|(id, node, ip)| {
                let pid = init_pid(&node, &id)?;
                Ok(Instance { id, node, ip, pid })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Deployed {
            id,
            container: c,
            instances,
        })
    }

    /// A 1-replica service on `network`, reached from an instance of another node:
    /// by its VIP and by its IP, alternating, from the same process placement.
    fn vip_vs_direct(&self, network: &str) -> anyhow::Result<VipFigures> {
        let svc = self.deploy(network, "benchsvc", 1)?;
        let replica = svc
            .instances
            .first()
            .cloned()
            .with_context(|| format!("no instance in {}", svc.container))?;
        let svc_id = svc.id.clone();
        let vip = wait_for(
            &format!("a service_ip on {svc_id}"),
            Duration::from_secs(10),
            || {
                let c = self.cluster.api().container(&svc_id)?;
                let ip = c.as_ref().and_then(|c| c["service_ip"].as_str());
                Ok(match ip {
                    Some(ip) if !ip.is_empty() => Ok(ip.to_string()),
                    _ => Err(c.map(|c| c.to_string()).unwrap_or_default()),
                })
            },
        )?;
        let clients = self.deploy(network, "benchclient", 3)?;
        let client = clients
            .instances
            .iter()
            .find(|i| i.node != replica.node)
            .cloned()
            .with_context(|| {
                format!(
                    "no client instance on another node than {}: {}",
                    replica.node, clients.container
                )
            })?;
        let place = Place::instance_cgroup(&client)?;
        place.tune_client()?;
        let direct_url = format!("http://{}/", replica.ip);
        let vip_url = format!("http://{vip}/");
        wait_http(&place, &direct_url)
            .with_context(|| format!("replica {} unreachable from {}", replica.ip, place.what))?;
        wait_http(&place, &vip_url).with_context(|| {
            format!(
                "service VIP {vip} (replica {} on {}) unreachable from {}",
                replica.ip, replica.node, place.what
            )
        })?;
        let mut figures = VipFigures {
            client,
            replica,
            vip,
            direct: Vec::new(),
            via_vip: Vec::new(),
        };
        // Alternating which side goes first, so a drift (the machine's other load) hits both.
        for round in 0..self.args.vip_rounds {
            let (d, v) = if round % 2 == 0 {
                let d = wrk(&place, &direct_url, self.args)?;
                (d, wrk(&place, &vip_url, self.args)?)
            } else {
                let v = wrk(&place, &vip_url, self.args)?;
                (wrk(&place, &direct_url, self.args)?, v)
            };
            figures.direct.push(d.requests_per_second);
            figures.via_vip.push(v.requests_per_second);
        }
        Ok(figures)
    }
}

/// How fast the other nodes' data planes follow a replica (ms per round).
struct Follow {
    /// Replica placed in the API → its FDB entry on another node's VXLAN device.
    comes: Vec<f64>,
    /// Replica gone from the API → its FDB entry gone from another node's VXLAN device.
    goes: Vec<f64>,
}

impl Follow {
    fn report(&self) -> String {
        let line = |what: &str, v: &[f64]| {
            let mut sorted = v.to_vec();
            sorted.sort_by(f64::total_cmp);
            format!(
                "  {what}: n={} p50 {:.0} ms, max {:.0} ms",
                v.len(),
                median(v),
                sorted.last().copied().unwrap_or(0.0)
            )
        };
        format!(
            "data plane following a replica (polled every 5 ms; a curl or bridge run adds a few ms):\n{}\n{}",
            line(
                "comes: placed in the API -> FDB entry on another node",
                &self.comes
            ),
            line(
                "goes: gone from the API -> FDB entry gone on another node",
                &self.goes
            )
        )
    }
}

impl Bench<'_> {
    /// Creates and deletes 1-replica containers, timing how long the other nodes take to follow:
    /// the hub's view to the node, the agent's overlay entries, the path itself.
    fn propagation(&self, network: &str, rounds: usize) -> anyhow::Result<Follow> {
        let clients = self.deploy(network, "followclient", 3)?;
        let api = self.cluster.api();
        let mut follow = Follow {
            comes: Vec::new(),
            goes: Vec::new(),
        };
        for round in 0..rounds {
            let id = api.create_container(&json!({
                "image": self.cluster.demo_image(), "cpu": "0.1", "memory": "32MB",
                "network_id": network, "name": format!("follow{round}"),
            }))?;
            // t0: the first poll that sees the replica placed (node and address known to the hub).
            let (placed, at) = poll_fast(&format!("{id} placed"), READY_TIMEOUT, || {
                let c = api.container(&id)?;
                let inst = c.as_ref().map(placements).unwrap_or_default();
                Ok(match inst.into_iter().next() {
                    Some(i) if !i.1.is_empty() && !i.2.is_empty() => {
                        Ok((i, std::time::Instant::now()))
                    }
                    _ => Err(format!("{c:?}")),
                })
            })?;
            let (iid, node, ip) = placed;
            let client = clients
                .instances
                .iter()
                .find(|i| i.node != node)
                .with_context(|| format!("no client away from {node}"))?;
            let mac = ip
                .parse::<std::net::Ipv4Addr>()
                .map(|a| {
                    let [a, b, c, d] = a.octets();
                    format!("0a:58:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
                })
                .with_context(|| format!("{iid} has ip {ip:?}"))?;
            let host = Place::host(self.cluster, &client.node)?;
            let fdb_has = || -> anyhow::Result<bool> {
                let out = host.run("bridge", &["fdb", "show"])?;
                Ok(String::from_utf8_lossy(&out.stdout).contains(&mac))
            };
            poll_fast(
                &format!("{}'s FDB entry for {iid}", client.node),
                READY_TIMEOUT,
                || Ok(if fdb_has()? { Ok(()) } else { Err(mac.clone()) }),
            )?;
            follow.comes.push(at.elapsed().as_secs_f64() * 1000.0);
            // And the path works once it runs: from an instance on that other node.
            api.wait_running(&id, 1, READY_TIMEOUT)?;
            let place = Place::instance(client);
            let url = format!("http://{ip}/");
            wait_http(&place, &url)?;
            if !fdb_has()? {
                bail!(
                    "{}'s FDB has no entry for {iid} ({mac}) while it is reachable",
                    client.node
                );
            }
            api.delete_container(&id)?;
            let gone_at = poll_fast(&format!("{id} gone"), READY_TIMEOUT, || {
                Ok(match api.container(&id)? {
                    None => Ok(std::time::Instant::now()),
                    Some(c) => Err(c.to_string()),
                })
            })?;
            poll_fast(
                &format!("{}'s FDB entry for {iid} to go", client.node),
                READY_TIMEOUT,
                || Ok(if fdb_has()? { Err(mac.clone()) } else { Ok(()) }),
            )?;
            follow.goes.push(gone_at.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(follow)
    }
}

/// Like `wait_for`, polling every 5 ms (its 100 ms would be the resolution of what is timed).
fn poll_fast<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match probe()? {
            Ok(v) => return Ok(v),
            Err(seen) if std::time::Instant::now() >= deadline => {
                bail!("timed out after {timeout:?} waiting for {what} (last: {seen})")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A deployed container: its JSON and its instances.
struct Deployed {
    id: String,
    container: Value,
    instances: Vec<Instance>,
}

/// The instance of `d` on `node`.
fn pick<'a>(d: &'a Deployed, node: &str) -> anyhow::Result<&'a Instance> {
    d.instances
        .iter()
        .find(|i| i.node == node)
        .with_context(|| {
            format!(
                "no replica on {node} (replicas should spread): {}",
                d.container
            )
        })
}

/// Waits until `url` fetched from `place` answers the demo body.
fn wait_http(place: &Place, url: &str) -> anyhow::Result<()> {
    wait_for(&format!("{url} from {}", place.what), READY_TIMEOUT, || {
        let out = place.run("curl", &["-sS", "--max-time", "2", url])?;
        let body = String::from_utf8_lossy(&out.stdout);
        Ok(if out.status.success() && body == DEMO_BODY {
            Ok(())
        } else {
            Err(format!(
                "{}: body {body:?}, {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })
    })
}

/// One wrk run from `place` against `url`.
fn wrk(place: &Place, url: &str, args: &NetArgs) -> anyhow::Result<WrkFigures> {
    let out = place.run(
        "wrk",
        &[
            "-t",
            &args.threads.to_string(),
            "-c",
            &args.connections.to_string(),
            "-d",
            &format!("{}s", args.seconds),
            url,
        ],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let context = || {
        format!(
            "wrk from {} to {url} ({}); stdout: {}; stderr: {}",
            place.what,
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    if !out.status.success() {
        bail!("{}", context());
    }
    parse_wrk(&stdout).with_context(context)
}

/// What one wrk run gives.
#[derive(Debug, Clone, PartialEq)]
struct WrkFigures {
    requests: u64,
    requests_per_second: f64,
    /// connect + read + write + timeout errors.
    socket_errors: u64,
}

/// Parses wrk's report; a run with non-2xx answers, no requests or many socket errors is an error.
fn parse_wrk(out: &str) -> anyhow::Result<WrkFigures> {
    let mut requests = None;
    let mut rps = None;
    let mut socket_errors = 0u64;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = Some(
                v.trim()
                    .parse::<f64>()
                    .with_context(|| format!("bad Requests/sec line {line:?}"))?,
            );
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            requests = Some(
                n.trim()
                    .parse::<u64>()
                    .with_context(|| format!("bad request count line {line:?}"))?,
            );
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 12, write 0, timeout 0"
            for part in v.split(',') {
                let n = part.split_whitespace().nth(1).unwrap_or_default();
                socket_errors += n
                    .parse::<u64>()
                    .with_context(|| format!("bad socket errors line {line:?}"))?;
            }
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            bail!("wrk got {} non-2xx/3xx responses", v.trim());
        }
    }
    let (Some(requests), Some(rps)) = (requests, rps) else {
        bail!("wrk output has no request count or no Requests/sec line");
    };
    if requests == 0 || rps <= 0.0 {
        bail!("wrk completed no request");
    }
    if socket_errors as f64 > MAX_SOCKET_ERROR_SHARE * requests as f64 {
        bail!("wrk saw {socket_errors} socket errors in {requests} requests");
    }
    Ok(WrkFigures {
        requests,
        requests_per_second: rps,
        socket_errors,
    })
}

/// Bits per second the iperf3 receiver counted, from `iperf3 -J` (which reports its errors in the
/// JSON, with exit status 0 in some versions).
fn parse_iperf3(out: &str) -> anyhow::Result<f64> {
    let v: Value = serde_json::from_str(out).context("iperf3 -J output is not JSON")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 error: {}", e.as_str().unwrap_or(&e.to_string()));
    }
    match v["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(bps) if bps > 0.0 => Ok(bps),
        Some(bps) => bail!("iperf3 measured {bps} bit/s"),
        None => bail!("iperf3 -J output has no end.sum_received.bits_per_second"),
    }
}

fn row(path: &str, bits_per_second: f64, http: WrkFigures) -> Row {
    let mut notes = Vec::new();
    if http.socket_errors > 0 {
        notes.push(format!(
            "{} socket errors in {} requests",
            http.socket_errors, http.requests
        ));
    }
    Row {
        path: path.to_string(),
        bits_per_second,
        requests_per_second: http.requests_per_second,
        notes,
    }
}

fn table(rows: &[Row], args: &NetArgs) -> String {
    let mut s = format!(
        "\nnetwork paths ({} s per run; iperf3 -P {}; wrk -t{} -c{} against busybox httpd, which \
         closes every connection):\n",
        args.seconds, args.streams, args.threads, args.connections
    );
    let _ = writeln!(
        s,
        "  {:<40} {:>11} {:>11}",
        "path", "TCP Gbit/s", "HTTP req/s"
    );
    for r in rows {
        let _ = writeln!(s, "{}", r.line());
    }
    s
}

impl Row {
    /// The row as the table prints it.
    fn line(&self) -> String {
        let mut s = format!(
            "  {:<40} {:>11.2} {:>11.0}",
            self.path,
            self.bits_per_second / 1e9,
            self.requests_per_second
        );
        if !self.notes.is_empty() {
            let _ = write!(s, "   ({})", self.notes.join("; "));
        }
        s
    }
}

/// "n1 -> n2", naming nodes by their position in the cluster.
fn arrow(nodes: &[String], from: &str, to: &str) -> String {
    let short = |n: &str| match nodes.iter().position(|x| x == n) {
        Some(i) => format!("n{}", i + 1),
        None => n.to_string(),
    };
    format!("{} -> {}", short(from), short(to))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The cgroup2 hierarchy: the root on pure v2 hosts, `unified` on hybrid ones.
fn cgroup2_mount() -> PathBuf {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        root.to_path_buf()
    } else {
        root.join("unified")
    }
}

/// The first pid of instance `id`'s cgroup `berth-<node>/<id>`: the container's init. The v1 memory
/// hierarchy first (hybrid hosts), then cgroup2, then any other hierarchy.
fn init_pid(node: &str, id: &str) -> anyhow::Result<u32> {
    let rel = Path::new(&format!("berth-{node}")).join(id);
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup/memory"), cgroup2_mount()];
    roots.extend(berth_tests::cleanup::cgroup_roots());
    for root in &roots {
        let procs = root.join(&rel).join("cgroup.procs");
        let Ok(text) = std::fs::read_to_string(&procs) else {
            continue;
        };
        if let Some(pid) = text.lines().find_map(|l| l.trim().parse::<u32>().ok()) {
            return Ok(pid);
        }
    }
    bail!(
        "no process in cgroup {} under any of {roots:?}",
        rel.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OK: &str = "Running 5s test @ http://10.0.0.2/\n  2 threads and 8 connections\n  \
        Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.37ms    1.09ms  \
        14.94ms   83.31%\n    Req/Sec     3.20k   551.72     4.39k    73.33%\n  19138 requests \
        in 3.00s, 4.33MB read\nRequests/sec:   6374.83\nTransfer/sec:      1.44MB\n";

    #[test]
    fn wrk_report_parses() {
        let f = parse_wrk(WRK_OK).unwrap();
        assert_eq!(f.requests, 19138);
        assert_eq!(f.requests_per_second, 6374.83);
        assert_eq!(f.socket_errors, 0);
        let few = WRK_OK.replace(
            "Requests/sec",
            "  Socket errors: connect 0, read 3, write 0, timeout 1\nRequests/sec",
        );
        assert_eq!(parse_wrk(&few).unwrap().socket_errors, 4);
    }

    #[test]
    fn bad_wrk_runs_are_errors() {
        let many = WRK_OK.replace(
            "Requests/sec",
            "  Socket errors: connect 500, read 0, write 0, timeout 0\nRequests/sec",
        );
        assert!(parse_wrk(&many).is_err());
        let non2xx = WRK_OK.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 7\nRequests/sec",
        );
        assert!(parse_wrk(&non2xx).is_err());
        let zero = WRK_OK
            .replace("19138 requests", "0 requests")
            .replace("6374.83", "0.00");
        assert!(parse_wrk(&zero).is_err());
        assert!(parse_wrk("unable to connect to 10.0.0.2:80 Connection refused").is_err());
    }

    #[test]
    fn iperf3_json_parses_and_errors_surface() {
        let ok = r#"{"end": {"sum_sent": {"bits_per_second": 2.2e10},
                     "sum_received": {"bits_per_second": 2.1e10}}}"#;
        assert_eq!(parse_iperf3(ok).unwrap(), 2.1e10);
        let err = r#"{"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"}"#;
        let e = format!("{:#}", parse_iperf3(err).unwrap_err());
        assert!(e.contains("Connection refused"), "{e}");
        assert!(parse_iperf3(r#"{"end": {}}"#).is_err());
        assert!(parse_iperf3("iperf3: error").is_err());
    }

    #[test]
    fn medians_and_arrows() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        let nodes = vec!["a".to_string(), "b".to_string()];
        assert_eq!(arrow(&nodes, "a", "b"), "n1 -> n2");
    }
}
