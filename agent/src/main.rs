//! `berth-agent`: runs this node's share of the cluster.
//!
//! Exit codes (for systemd and operators):
//! - 0: stopped by SIGTERM/SIGINT. Containers are left running on purpose: a restarted agent adopts them.
//! - 1: invalid configuration (a flag value that parses but makes no sense, e.g. a bad node id).
//! - 2: command-line usage error (from clap).
//! - 3: the node could not be set up (data dir, runtime, netlink).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use berth_agent::api::AgentApi;
use berth_agent::dataplane::{DataPlaneConfig, NodeDataPlane};
use berth_agent::host::NodeHost;
use berth_agent::image::ImageStore;
use berth_agent::metrics::{BoardSource, NodeCapacity, NodeMetrics};
use berth_agent::network::NetworkManager;
use berth_agent::reconcile::Reconciler;
use berth_agent::runtime::Runtime;
use berth_agent::{hub, hub::NodeInfo};
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(name = "berth-agent", version, about = "berth node agent")]
struct Args {
    /// The hub's gRPC URL, e.g. http://10.0.0.1:7081.
    #[arg(long, env = "BERTH_HUB")]
    hub: String,
    /// This node's id: lower-case letters, digits and '-', at most 40 characters.
    #[arg(long)]
    node_id: String,
    /// The address other nodes and the hub reach this node on.
    #[arg(long)]
    advertise_ip: IpAddr,
    /// Where images, instance rootfs and runtime state live (one per agent).
    #[arg(long, default_value = "/var/lib/berth/agent")]
    data_dir: PathBuf,
    /// A registry (HOST:PORT) spoken to over plain HTTP. Repeatable.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// CPU offered to the cluster ("4", "3.5", "1500m"); default: every core of the machine.
    #[arg(long)]
    cpu: Option<String>,
    /// Memory offered to the cluster ("8GB", "512MiB"); default: all of the machine's.
    #[arg(long)]
    memory: Option<String>,
    /// Host name reported to the hub; default: the machine's.
    #[arg(long)]
    hostname: Option<String>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// UDP port of the node's WireGuard device (encrypted networks); the same on every node.
    #[arg(long, default_value_t = berth_agent::network::wireguard::DEFAULT_LISTEN_PORT)]
    wireguard_port: u16,
    /// Port of the DNS server on each network's gateway address.
    #[arg(long, default_value_t = berth_agent::dns::DNS_PORT)]
    dns_port: u16,
    /// Resolver (IP or IP:PORT) for names outside `.berth`. Repeatable; default: the nameservers of
    /// the host's /etc/resolv.conf.
    #[arg(long = "dns-upstream")]
    dns_upstreams: Vec<String>,
    /// Where `GET /metrics` (Prometheus) listens: ADDR:PORT, or `none`; default: the advertise IP,
    /// port 9751.
    #[arg(long, value_name = "ADDR:PORT|none")]
    listen_metrics: Option<String>,
    /// Where the agent API (instance logs and stats, proxied by the hub) listens: ADDR:PORT, or
    /// `none`; default: the advertise IP, port 9750. Registered with the hub (a wildcard address as
    /// the advertise IP).
    #[arg(long, value_name = "ADDR:PORT|none")]
    listen_api: Option<String>,
    /// Where live migrations arrive (QUIC over UDP, mutually authenticated with the node
    /// certificates the hub signs): ADDR:PORT, or `none` (this node then neither sends nor
    /// receives migrations); default: the advertise IP, port 9752. Registered with the hub.
    #[arg(long, value_name = "ADDR:PORT|none")]
    listen_migration: Option<String>,
    /// An `auto` migration leaving this node measures how fast the container rewrites its memory
    /// and moves it by post-copy below this rate (MiB/s); at or above it, by pre-copy if the
    /// container is small (--auto-precopy-max-resident), else still by post-copy.
    #[arg(long, value_name = "MIB_PER_S", default_value_t = 32.0, value_parser = parse_rate)]
    auto_postcopy_below: f64,
    /// The largest resident memory (MiB) an `auto` migration moves by pre-copy (its freeze grows
    /// with the memory without soft-dirty tracking; post-copy's does not).
    #[arg(long, value_name = "MIB", default_value_t = 320)]
    auto_precopy_max_resident: u64,
}

/// A write rate in MiB/s: a finite number ≥ 0.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a rate in MiB/s (a number ≥ 0, e.g. 32)"
        )),
    }
}

/// A `--listen-*` flag: `none` turns the server off, no value means the advertise IP on
/// `default_port`.
fn listen_addr(
    flag: &str,
    value: Option<&str>,
    advertise_ip: IpAddr,
    default_port: u16,
) -> anyhow::Result<Option<SocketAddr>> {
    match value {
        None => Ok(Some(SocketAddr::new(advertise_ip, default_port))),
        Some("none") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .with_context(|| format!("{flag} {v:?}: expected ADDR:PORT or none")),
    }
}

/// Binds a `--listen-*` address (a port in use fails the start, not a background task).
async fn bind(flag: &str, addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(a) => TcpListener::bind(a)
            .await
            .map(Some)
            .with_context(|| format!("{flag}: bind {a}")),
    }
}

/// Starts `/metrics` and the agent API on whichever listener is on; both stop (and answer their
/// last requests) when `stop` turns true.
fn spawn_servers(
    metrics: Option<TcpListener>,
    api: Option<TcpListener>,
    node: &NodeInfo,
    source: Arc<BoardSource>,
    instances_dir: PathBuf,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let until = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();
    if let Some(listener) = metrics {
        let capacity = NodeCapacity {
            cpu_millis: node.cpu_millis,
            memory_bytes: node.memory_bytes,
        };
        let cgroups = source.cgroups().clone();
        let metrics =
            NodeMetrics::with_cgroups(node.node_id.clone(), capacity, source.clone(), cgroups);
        let serve =
            berth_agent::metrics::serve_listener(listener, Arc::new(metrics), until(stop.clone()));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serve.await {
                error!(error = %e, "metrics endpoint stopped");
            }
        }));
    }
    if let Some(listener) = api {
        let serve = AgentApi::new(instances_dir)
            .with_stats(source)
            .serve(listener, until(stop.clone()));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serve.await {
                error!(error = %e, "agent api stopped");
            }
        }));
    }
    tasks
}

fn dns_upstreams(args: &Args) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    if args.dns_upstreams.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        return Ok(berth_agent::dns::upstreams_from_resolv_conf(&text));
    }
    args.dns_upstreams
        .iter()
        .map(|u| {
            u.parse::<std::net::SocketAddr>()
                .or_else(|_| {
                    u.parse::<IpAddr>()
                        .map(|ip| (ip, berth_agent::dns::DNS_PORT).into())
                })
                .with_context(|| format!("--dns-upstream {u:?}: expected IP or IP:PORT"))
        })
        .collect()
}

enum Failure {
    Config(anyhow::Error),
    Setup(anyhow::Error),
}

fn main() -> ExitCode {
    // The agent's own binary doubles as its container-create helper (see `Runtime::with_create_helper`).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv
        .get(1)
        .is_some_and(|a| a == berth_agent::runtime::HELPER_ARG)
    {
        // libcontainer's container init reports why it gave up only through `tracing`: without a
        // subscriber here a failed create would say no more than "init never became ready".
        // Warnings and errors go to stderr, which the agent puts into the create error.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .without_time()
            .init();
        let code = berth_agent::runtime::run_create_helper(&argv[2..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // ... its per-container log shim (see `berth_agent::logs`) ...
    if argv
        .get(1)
        .is_some_and(|a| a == berth_agent::logs::SHIM_ARG)
    {
        let code = berth_agent::logs::run_shim(&argv[2..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // ... and its exec helper (health probes run commands inside containers through it).
    if argv
        .get(1)
        .is_some_and(|a| a == berth_agent::runtime::EXEC_HELPER_ARG)
    {
        let code = berth_agent::runtime::run_exec_helper();
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // ... and the holder of a network namespace made before its process (migration restores).
    if argv
        .get(1)
        .is_some_and(|a| a == berth_agent::network::holder::NETNS_HOLDER_ARG)
    {
        let code = berth_agent::network::holder::run_netns_holder();
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let args = Args::parse();
    init_tracing(&args.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(3);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            error!(error = format!("{e:#}"), "invalid configuration");
            ExitCode::from(1)
        }
        Err(Failure::Setup(e)) => {
            error!(error = format!("{e:#}"), "node setup failed");
            ExitCode::from(3)
        }
    }
}

/// Starts the migration endpoint once the node has its certificate (the first registration brings
/// it; a restarted agent has it on disk), turns migrations on in the host and publishes the
/// endpoint's address for the next registration. Without CRIU or with a port in use, the node
/// runs on without live migration (logged), as a node with `--listen-migration none` does.
async fn serve_migrations(
    addr: SocketAddr,
    advertise_ip: IpAddr,
    tls: Arc<berth_agent::tls::NodeTls>,
    host: Arc<NodeHost>,
    exe: PathBuf,
    auto: berth_agent::migrate::write_rate::AutoPolicy,
    published: watch::Sender<String>,
) {
    use berth_agent::checkpoint::{Checkpointer, Criu};
    use berth_agent::migrate::{link::Links, transport::MigrationEndpoint};
    let identity = loop {
        if let Some(identity) = tls.stored_identity() {
            break identity;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let criu = Arc::new(Criu::locate());
    let checked = criu.clone();
    match tokio::task::spawn_blocking(move || checked.features()).await {
        Ok(Ok(features)) => info!(?features, criu = %criu.path().display(), "CRIU found"),
        Ok(Err(e)) => {
            warn!(error = %e, "CRIU does not work here: live migration is off on this node");
            return;
        }
        Err(e) => {
            warn!(error = %e, "CRIU check failed: live migration is off on this node");
            return;
        }
    }
    let endpoint = match MigrationEndpoint::bind(addr, &identity) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            error!(error = %e, %addr, "cannot bind the migration endpoint: live migration is off on this node");
            return;
        }
    };
    let links = Arc::new(Links::start(endpoint));
    let bound = match links.local_addr() {
        Ok(bound) => bound,
        Err(e) => {
            error!(error = %e, "migration endpoint has no address: live migration is off on this node");
            return;
        }
    };
    host.enable_migration(links.clone(), criu, exe, auto);
    let reachable = hub::reachable_api_addr(bound, advertise_ip);
    info!(addr = %reachable, "migration endpoint listening");
    published.send_replace(reachable);
    // The links (and their accept loop) live as long as the agent.
    published.closed().await;
    drop(links);
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn validate_node_id(id: &str) -> anyhow::Result<()> {
    // The id names cgroups and directories: keep it to a safe, short alphabet.
    let ok = !id.is_empty()
        && id.len() <= 40
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-');
    if !ok {
        bail!("--node-id {id:?}: use 1-40 characters of a-z, 0-9 and '-', not starting with '-'");
    }
    Ok(())
}

fn machine_memory() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
    let kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no MemTotal in /proc/meminfo")?;
    Ok(kb * 1024)
}

async fn run(args: Args) -> Result<(), Failure> {
    validate_node_id(&args.node_id).map_err(Failure::Config)?;
    let metrics_addr = listen_addr(
        "--listen-metrics",
        args.listen_metrics.as_deref(),
        args.advertise_ip,
        berth_agent::metrics::DEFAULT_PORT,
    )
    .map_err(Failure::Config)?;
    let api_addr = listen_addr(
        "--listen-api",
        args.listen_api.as_deref(),
        args.advertise_ip,
        berth_agent::api::DEFAULT_PORT,
    )
    .map_err(Failure::Config)?;
    let migration_addr = listen_addr(
        "--listen-migration",
        args.listen_migration.as_deref(),
        args.advertise_ip,
        berth_agent::migrate::DEFAULT_PORT,
    )
    .map_err(Failure::Config)?;
    let cpu_millis = match &args.cpu {
        Some(c) => berth_proto::units::parse_cpu(c)
            .with_context(|| format!("--cpu {c:?}"))
            .map_err(Failure::Config)?,
        None => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cores as u64 * 1000
        }
    };
    let memory_bytes = match &args.memory {
        Some(m) => berth_proto::units::parse_memory(m)
            .with_context(|| format!("--memory {m:?}"))
            .map_err(Failure::Config)?,
        None => machine_memory().map_err(Failure::Setup)?,
    };
    let hostname = match args.hostname.clone() {
        Some(h) => h,
        None => hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| args.node_id.clone()),
    };
    let client = hub::connect(&args.hub)
        .context("--hub")
        .map_err(Failure::Config)?;

    // Absolute from here on: libcontainer's start changes this process's working directory for a
    // moment, and a relative path used meanwhile by another task would land in a container's state.
    let data = &std::path::absolute(&args.data_dir)
        .with_context(|| format!("--data-dir {}", args.data_dir.display()))
        .map_err(Failure::Config)?;
    std::fs::create_dir_all(data)
        .with_context(|| format!("create {}", data.display()))
        .map_err(Failure::Setup)?;
    let images = ImageStore::new(&data.join("images"), args.insecure_registries.clone())
        .context("image store")
        .map_err(Failure::Setup)?;
    // Derived from the node id so several agents on one machine never share a cgroup parent.
    let helper = std::env::current_exe()
        .context("locating the agent binary for the create helper")
        .map_err(Failure::Setup)?;
    // Containers' inits are orphaned when the create helper exits: as subreaper the agent inherits
    // them, so it can reap them and learn their exit status.
    nix::sys::prctl::set_child_subreaper(true)
        .context("PR_SET_CHILD_SUBREAPER")
        .map_err(Failure::Setup)?;
    let runtime = Runtime::new(&data.join("runtime"), format!("berth-{}", args.node_id))
        .context("runtime")
        .map_err(Failure::Setup)?
        .with_create_helper(helper.clone());
    let cgroup_parent = runtime.cgroup_parent().to_owned();
    let upstreams = dns_upstreams(&args).map_err(Failure::Config)?;
    let IpAddr::V4(advertise_v4) = args.advertise_ip else {
        return Err(Failure::Config(anyhow::anyhow!(
            "--advertise-ip {}: berth's overlays need an IPv4 underlay",
            args.advertise_ip
        )));
    };
    let network = Arc::new(
        NetworkManager::new()
            .await
            .context("netlink")
            .map_err(Failure::Setup)?,
    );
    let plumbing = Arc::new(tokio::sync::Mutex::new(()));
    // Pins and the cgroup2 group are named after the node: agents sharing a machine never collide.
    let cgroup_dir = berth_agent::ebpf::node_cgroup_dir(&args.node_id)
        .context("cgroup2 hierarchy")
        .map_err(Failure::Setup)?;
    let ebpf = berth_agent::ebpf::DataPlane::load(
        &args.node_id,
        &cgroup_dir,
        &berth_agent::ebpf::node_pin_dir(&args.node_id),
    )
    .context("loading the eBPF data plane")
    .map_err(Failure::Setup)?;
    let key = berth_agent::network::wireguard::NodeKey::load_or_create(&data.join("wireguard.key"))
        .context("WireGuard key")
        .map_err(Failure::Setup)?;
    let dataplane = Arc::new(NodeDataPlane::new(
        DataPlaneConfig {
            node_id: args.node_id.clone(),
            advertise_ip: advertise_v4,
            wireguard_port: args.wireguard_port,
            dns_port: args.dns_port,
        },
        network.clone(),
        plumbing.clone(),
        ebpf,
        key,
        berth_agent::dns::DnsServer::new(upstreams),
    ));
    let host = NodeHost::new(images, runtime, network, dataplane.clone(), plumbing, data)
        .context("instance dir")
        .map_err(Failure::Setup)?;
    let host = Arc::new(host);

    let metrics_listener = bind("--listen-metrics", metrics_addr)
        .await
        .map_err(Failure::Setup)?;
    let api_listener = bind("--listen-api", api_addr)
        .await
        .map_err(Failure::Setup)?;
    let node = NodeInfo {
        node_id: args.node_id.clone(),
        hostname,
        advertise_ip: args.advertise_ip.to_string(),
        cpu_millis,
        memory_bytes,
        wireguard_public_key: dataplane.public_key(),
        api_addr: api_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| hub::reachable_api_addr(a, args.advertise_ip))
            .unwrap_or_default(),
        tls: Some(std::sync::Arc::new(
            berth_agent::tls::NodeTls::load_or_create(&data.join("tls"), &args.node_id)
                .context("node key")
                .map_err(Failure::Setup)?,
        )),
        migration_addr: None,
    };
    let mut node = node;
    if let (Some(addr), Some(tls)) = (migration_addr, node.tls.clone()) {
        let (addr_tx, addr_rx) = watch::channel(String::new());
        node.migration_addr = Some(addr_rx);
        tokio::spawn(serve_migrations(
            addr,
            args.advertise_ip,
            tls,
            host.clone(),
            helper.clone(),
            berth_agent::migrate::write_rate::AutoPolicy {
                postcopy_below_mib_s: args.auto_postcopy_below,
                precopy_max_resident_mib: args.auto_precopy_max_resident,
                ..Default::default()
            },
            addr_tx,
        ));
    }
    info!(node_id = %node.node_id, cpu_millis, memory_bytes, hub = %args.hub, "agent starting");

    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let (desired_tx, desired_rx) = watch::channel(None);
    let (children_tx, children_rx) = mpsc::unbounded_channel();
    let mut sigchld = signal(SignalKind::child())
        .context("SIGCHLD handler")
        .map_err(Failure::Setup)?;
    let mut sigterm = signal(SignalKind::terminate())
        .context("SIGTERM handler")
        .map_err(Failure::Setup)?;
    let mut sigint = signal(SignalKind::interrupt())
        .context("SIGINT handler")
        .map_err(Failure::Setup)?;

    let board = berth_agent::status::InstanceBoard::new();
    let prober = Arc::new(berth_agent::health::Prober::new());
    let reconciler = Reconciler::new(host, reports_tx)
        .with_board(board.clone())
        .with_prober(prober.clone());
    let source = Arc::new(
        BoardSource::new(board.clone(), cgroup_parent)
            .with_traffic(dataplane.clone())
            .with_probes(prober.clone(), desired_rx.clone()),
    );
    let (stop_servers, servers_stop) = watch::channel(false);
    let servers = spawn_servers(
        metrics_listener,
        api_listener,
        &node,
        source,
        data.join("instances"),
        &servers_stop,
    );
    tokio::spawn(dataplane.clone().run(desired_rx.clone()));
    tokio::spawn(reconciler.run(desired_rx, children_rx));
    tokio::spawn(hub::run_membership(client.clone(), node.clone()));
    tokio::spawn(hub::run_watch(
        client.clone(),
        node.node_id.clone(),
        desired_tx,
    ));
    let tombstones = hub::Tombstones::open(data.join("removed"))
        .context("removal records")
        .map_err(Failure::Setup)?;
    tokio::spawn(hub::run_reporter(
        client,
        node.node_id.clone(),
        reports_rx,
        tombstones,
    ));
    tokio::spawn(async move {
        while sigchld.recv().await.is_some() {
            if children_tx.send(()).is_err() {
                return;
            }
        }
    });

    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: stopping the agent, containers keep running"),
        _ = sigint.recv() => info!("SIGINT: stopping the agent, containers keep running"),
    }
    let _ = stop_servers.send(true);
    for server in servers {
        if tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .is_err()
        {
            warn!("an HTTP server did not stop within 5 s");
        }
    }
    let instances_left = std::fs::read_dir(data.join("instances"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    dataplane.shutdown(instances_left).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{listen_addr, validate_node_id};

    #[test]
    #[allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
    fn listen_flags_default_to_the_advertise_ip_and_none_turns_them_off() {
        let adv: std::net::IpAddr = "10.1.0.5".parse().unwrap();
        let got = |v| listen_addr("--listen-api", v, adv, 9750).unwrap();
        assert_eq!(got(None), Some("10.1.0.5:9750".parse().unwrap()));
        assert_eq!(got(Some("none")), None);
        assert_eq!(got(Some("0.0.0.0:80")), Some("0.0.0.0:80".parse().unwrap()));
        let err = listen_addr("--listen-api", Some("9750"), adv, 9750).unwrap_err();
        assert!(err.to_string().contains("--listen-api \"9750\""), "{err}");
    }

    #[test]
    fn node_ids_are_restricted_to_a_safe_alphabet() {
        assert!(validate_node_id("node-1").is_ok());
        for bad in ["", "Node1", "a/b", "-x", "a b", &"x".repeat(41)] {
            assert!(validate_node_id(bad).is_err(), "{bad:?}");
        }
    }
}
