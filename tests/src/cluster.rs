//! A whole cluster: etcd, registry, hub and agents on netns hosts; started, driven and torn down.

use crate::api::Api;
use crate::netns::{HostNet, Topology};
use crate::paths::{Binaries, Profile};
use crate::process::{Daemon, ProcRecord, STOP_GRACE};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// REST port of the hub (on the bridge address, which is unique per cluster).
pub const HUB_API_PORT: u16 = 7080;
/// gRPC port of the hub, where agents connect.
pub const HUB_GRPC_PORT: u16 = 7081;
/// Port of the registry (plain HTTP).
pub const REGISTRY_PORT: u16 = 5000;

/// How long each component gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a cluster made, enough to drive it and to tear it down from another process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    /// Per-run prefix of names ("bt1a2b3c", or "berth-dev").
    pub prefix: String,
    /// Directory holding every daemon's data and logs (removed on teardown).
    pub run_dir: PathBuf,
    /// The bridge and the hosts.
    pub topology: Topology,
    /// Node id of each host, in host order.
    pub node_ids: Vec<String>,
    /// etcd client URL.
    pub etcd_url: String,
    /// Hub REST base URL (what `berth --hub` takes).
    pub hub_api: String,
    /// Hub gRPC URL (what `berth-agent --hub` takes).
    pub hub_grpc: String,
    /// Registry `HOST:PORT`, reachable from the hosts.
    pub registry: String,
    /// The demo image's reference, once pushed.
    pub demo_image: Option<String>,
    /// Daemons still running, in start order.
    pub processes: Vec<ProcRecord>,
}

impl ClusterState {
    /// Reads `run_dir/state.json` (written by a detached cluster).
    pub fn load(run_dir: &Path) -> anyhow::Result<ClusterState> {
        let path = run_dir.join("state.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn save(&self) -> anyhow::Result<()> {
        let path = self.run_dir.join("state.json");
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Stops the recorded daemons (agents first, then hub, etcd, registry) and removes everything else.
    /// Returns what could not be removed.
    pub fn teardown(&self) -> Vec<String> {
        let mut procs = self.processes.clone();
        procs.sort_by_key(|p| stop_rank(&p.name));
        for p in &procs {
            crate::process::stop_recorded(p, STOP_GRACE);
        }
        self.release_resources()
    }

    /// Removes containers left by the agents, mounts, hosts, links and the run directory.
    fn release_resources(&self) -> Vec<String> {
        let mut errors = crate::cleanup::remove_containers(&self.node_ids, &self.run_dir);
        errors.extend(crate::cleanup::remove_bpf_pins(&self.node_ids));
        errors.extend(crate::cleanup::unmount_under(&self.run_dir));
        errors.extend(self.topology.destroy());
        if self.run_dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.run_dir) {
                errors.push(format!("removing {}: {e}", self.run_dir.display()));
            }
        }
        errors
    }

    /// The host of `node_id`.
    pub fn host(&self, node_id: &str) -> anyhow::Result<&HostNet> {
        match self.node_ids.iter().position(|n| n == node_id) {
            Some(i) => Ok(&self.topology.hosts[i]),
            None => bail!("no node {node_id} in this cluster ({:?})", self.node_ids),
        }
    }

    /// The agent data directory of host `i`.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.run_dir.join("nodes").join(&self.node_ids[i])
    }
}

/// Agents stop before the hub, the hub before etcd: each keeps its dependencies until it is gone.
fn stop_rank(name: &str) -> u8 {
    match name {
        n if n.starts_with("agent") => 0,
        "hub" => 1,
        "etcd" => 2,
        _ => 3,
    }
}

/// How to name a cluster's parts.
#[derive(Debug, Clone)]
enum Naming {
    /// Random prefix, subnet and temp dir: what tests and benches use.
    Ephemeral,
    /// The fixed names of `xtask up` (`berthdev0`, `berth-dev-node1`…, 10.250.0.0/24) in `run_dir`.
    Dev { run_dir: PathBuf },
}

/// Configures and starts a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    nodes: usize,
    profile: Profile,
    node_cpu: String,
    node_memory: String,
    push_demo: bool,
    infra_only: bool,
    naming: Naming,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            nodes: 2,
            profile: Profile::Debug,
            node_cpu: "4".into(),
            node_memory: "4GB".into(),
            push_demo: true,
            infra_only: false,
            naming: Naming::Ephemeral,
        }
    }
}

impl ClusterBuilder {
    /// Number of hosts, each with an agent (default 2).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Which build of the binaries to run (default debug).
    pub fn profile(mut self, p: Profile) -> Self {
        self.profile = p;
        self
    }

    /// Capacity each agent offers (`--cpu`, `--memory`; default 4 and 4GB).
    pub fn node_capacity(mut self, cpu: &str, memory: &str) -> Self {
        self.node_cpu = cpu.into();
        self.node_memory = memory.into();
        self
    }

    /// Whether to push the demo image to the registry (default yes).
    pub fn demo_image(mut self, push: bool) -> Self {
        self.push_demo = push;
        self
    }

    /// Only the infrastructure: hosts, etcd and the registry (with the demo image), no hub and no
    /// agents. For testing the harness itself.
    pub fn infra_only(mut self) -> Self {
        self.infra_only = true;
        self
    }

    /// The developer cluster of `xtask up`: fixed names, daemons detached, state in `run_dir`.
    pub fn dev(mut self, run_dir: &Path) -> Self {
        self.naming = Naming::Dev {
            run_dir: run_dir.to_path_buf(),
        };
        self
    }

    /// Starts the cluster and waits until every node is HEALTHY.
    ///
    /// On error everything made so far is removed again.
    pub fn start(self) -> anyhow::Result<Cluster> {
        let bins = if self.infra_only {
            Binaries::in_dir(&crate::paths::target_dir().join("debug"))
        } else {
            Binaries::locate(self.profile)?
        };
        let (prefix, run_dir, subnet, detached) = match &self.naming {
            Naming::Ephemeral => {
                let prefix = format!("bt{:06x}", rand::random::<u32>() & 0xff_ffff);
                let dir = std::env::temp_dir().join("berth-tests").join(&prefix);
                (prefix, dir, crate::netns::free_subnet()?, false)
            }
            Naming::Dev { run_dir } => ("berth-dev".into(), run_dir.clone(), [10, 250, 0], true),
        };
        let (bridge, hosts, node_ids) = names(&prefix, self.nodes, detached);
        let topology = Topology::plan(&bridge, subnet, &hosts);
        let br = topology.bridge_ip();
        let etcd_port = free_port()?;
        let state = ClusterState {
            prefix,
            run_dir,
            node_ids,
            etcd_url: format!("http://127.0.0.1:{etcd_port}"),
            hub_api: format!("http://{br}:{HUB_API_PORT}"),
            hub_grpc: format!("http://{br}:{HUB_GRPC_PORT}"),
            registry: format!("{br}:{REGISTRY_PORT}"),
            topology,
            demo_image: None,
            processes: Vec::new(),
        };
        let api = Api::new(&state.hub_api)?;
        let mut cluster = Cluster {
            agents: (0..self.nodes).map(|_| None).collect(),
            state,
            bins,
            api,
            builder: self,
            etcd: None,
            registry: None,
            hub: None,
            detached,
            released: false,
        };
        if let Err(e) = cluster.boot(etcd_port) {
            // The error says what did not come up; the logs say why.
            cluster.keep_logs();
            return Err(e);
        }
        Ok(cluster)
    }
}

/// Bridge, (netns, root veth) per host, and node ids. Interface names stay within 15 characters.
fn names(prefix: &str, n: usize, dev: bool) -> (String, Vec<(String, String)>, Vec<String>) {
    if dev {
        let hosts = (1..=n)
            .map(|i| (format!("berth-dev-node{i}"), format!("berthdev-n{i}")))
            .collect();
        let ids = (1..=n).map(|i| format!("dev-node{i}")).collect();
        return ("berthdev0".into(), hosts, ids);
    }
    let hosts = (1..=n)
        .map(|i| (format!("{prefix}-n{i}"), format!("{prefix}v{i}")))
        .collect();
    let ids = (1..=n).map(|i| format!("{prefix}-n{i}")).collect();
    (format!("{prefix}br"), hosts, ids)
}

/// A free TCP port on loopback (for etcd, which listens there).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running cluster. Dropping it stops every daemon and removes every trace (unless detached).
#[derive(Debug)]
pub struct Cluster {
    state: ClusterState,
    bins: Binaries,
    api: Api,
    builder: ClusterBuilder,
    etcd: Option<Daemon>,
    registry: Option<Daemon>,
    hub: Option<Daemon>,
    agents: Vec<Option<Daemon>>,
    detached: bool,
    /// Set by `detach`: the daemons now belong to the state file, not to this value.
    released: bool,
}

impl Cluster {
    /// A builder with the defaults (2 nodes, debug binaries, demo image pushed).
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Starts the default cluster.
    pub fn start() -> anyhow::Result<Cluster> {
        ClusterBuilder::default().start()
    }

    fn boot(&mut self, etcd_port: u16) -> anyhow::Result<()> {
        for d in ["logs", "etcd", "registry", "hub", "nodes"] {
            std::fs::create_dir_all(self.state.run_dir.join(d))?;
        }
        self.save()?;
        self.state
            .topology
            .create()
            .context("creating the bridge and netns hosts")?;
        self.start_etcd_retrying(etcd_port)?;
        self.start_registry()?;
        if self.builder.push_demo {
            self.push_demo_image()?;
        }
        if self.builder.infra_only {
            return Ok(());
        }
        self.start_hub()?;
        for i in 0..self.agents.len() {
            self.start_agent(i)?;
        }
        self.wait_nodes_healthy(READY_TIMEOUT)?;
        Ok(())
    }

    /// What the cluster is made of.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// REST client of the hub.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// The binaries this cluster runs.
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// Node ids, in host order.
    pub fn node_ids(&self) -> &[String] {
        &self.state.node_ids
    }

    /// Registry `HOST:PORT`.
    pub fn registry(&self) -> &str {
        &self.state.registry
    }

    /// Reference of the demo image in this cluster's registry.
    pub fn demo_image(&self) -> String {
        format!(
            "{}/{}:{}",
            self.state.registry,
            crate::image::DEMO_REPO,
            crate::image::DEMO_TAG
        )
    }

    /// Pushes the cached demo image to this cluster's registry; returns its reference.
    pub fn push_demo_image(&mut self) -> anyhow::Result<String> {
        let layout = crate::image::demo_layout()?;
        let reference = self.demo_image();
        crate::image::push(&layout, crate::image::DEMO_TAG, &reference)?;
        self.state.demo_image = Some(reference.clone());
        self.save()?;
        Ok(reference)
    }

    /// Pushes an image to this cluster's registry as `demo/httpd:TAG`: the demo image itself
    /// (`variant` None) or one of its variants ([`crate::image::variant_layout`]); returns its
    /// reference. Pushing another image under an existing tag moves the tag.
    pub fn push_image(&self, tag: &str, variant: Option<&str>) -> anyhow::Result<String> {
        let layout = match variant {
            Some(v) => crate::image::variant_layout(v)?,
            None => crate::image::demo_layout()?,
        };
        let reference = format!("{}/{}:{tag}", self.state.registry, crate::image::DEMO_REPO);
        crate::image::push(&layout, crate::image::DEMO_TAG, &reference)?;
        Ok(reference)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.state.run_dir.join("logs").join(format!("{name}.log"))
    }

    fn spawn(&mut self, name: &str, cmd: Command) -> anyhow::Result<Daemon> {
        let d = Daemon::spawn(name, cmd, &self.log_path(name), self.detached)?;
        self.state.processes.retain(|p| p.name != name);
        self.state.processes.push(d.record().clone());
        self.save()?;
        Ok(d)
    }

    fn forget(&mut self, name: &str) {
        self.state.processes.retain(|p| p.name != name);
        // The state file is only a convenience for `xtask down`; a stale pid there is checked anyway.
        let _ = self.save();
    }

    fn save(&self) -> anyhow::Result<()> {
        if self.detached {
            self.state.save()?;
        }
        Ok(())
    }

    /// Starts etcd, on other ports when the ones picked were taken meanwhile: a cluster booting at
    /// the same moment can be handed the same free port before either binds it.
    fn start_etcd_retrying(&mut self, mut port: u16) -> anyhow::Result<()> {
        let mut attempt = 1;
        loop {
            match self.start_etcd(port) {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 5 && format!("{e:#}").contains("address already in use") => {
                    eprintln!(
                        "cluster {}: etcd port taken, retrying elsewhere",
                        self.state.prefix
                    );
                    if let Some(mut d) = self.etcd.take() {
                        d.stop(STOP_GRACE);
                    }
                    self.forget("etcd");
                    let data = self.state.run_dir.join("etcd");
                    let _ = std::fs::remove_dir_all(&data);
                    std::fs::create_dir_all(&data)?;
                    port = free_port()?;
                    self.state.etcd_url = format!("http://127.0.0.1:{port}");
                    self.save()?;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start_etcd(&mut self, port: u16) -> anyhow::Result<()> {
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let name = format!("{}-etcd", self.state.prefix);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &name])
            .arg("--data-dir")
            .arg(self.state.run_dir.join("etcd"))
            .args(["--listen-client-urls", &self.state.etcd_url])
            .args(["--advertise-client-urls", &self.state.etcd_url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{name}={peer}")]);
        let mut d = self.spawn("etcd", cmd)?;
        let health = format!("http://127.0.0.1:{port}/health");
        let r = wait_http(&mut d, "etcd", &health, |s, body| {
            s == 200 && body.contains("true")
        });
        self.etcd = Some(d);
        r
    }

    fn start_registry(&mut self) -> anyhow::Result<()> {
        let dir = self.state.run_dir.join("registry");
        let config = dir.join("config.yml");
        std::fs::create_dir_all(dir.join("storage"))?;
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {}\n",
                dir.join("storage").display(),
                self.state.registry
            ),
        )?;
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let mut d = self.spawn("registry", cmd)?;
        let url = format!("http://{}/v2/", self.state.registry);
        let r = wait_http(&mut d, "registry", &url, |s, _| s == 200);
        self.registry = Some(d);
        r
    }

    /// Starts the hub (again) and waits until its REST API answers.
    pub fn start_hub(&mut self) -> anyhow::Result<()> {
        let br = self.state.topology.bridge_ip();
        let mut cmd = Command::new(&self.bins.hub);
        cmd.args(["--etcd", &self.state.etcd_url])
            .args(["--listen-api", &format!("{br}:{HUB_API_PORT}")])
            .args(["--listen-grpc", &format!("{br}:{HUB_GRPC_PORT}")])
            .arg("--data-dir")
            .arg(self.state.run_dir.join("hub"));
        let mut d = self.spawn("hub", cmd)?;
        let url = format!("{}/v1/nodes", self.state.hub_api);
        let r = wait_http(&mut d, "hub", &url, |s, _| s == 200);
        self.hub = Some(d);
        r
    }

    /// Stops the hub (SIGTERM, then SIGKILL).
    pub fn stop_hub(&mut self) {
        if let Some(mut d) = self.hub.take() {
            d.stop(STOP_GRACE);
        }
        self.forget("hub");
    }

    /// Starts the agent of host `i` (again) inside its netns. Does not wait for it to register.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let host = self.state.topology.hosts[i].clone();
        let node_id = self.state.node_ids[i].clone();
        let data = self.state.node_dir(i);
        std::fs::create_dir_all(&data)?;
        let mut cmd = host.command(&self.bins.agent);
        cmd.args(["--hub", &self.state.hub_grpc])
            .args(["--node-id", &node_id])
            .args(["--advertise-ip", &host.ip.to_string()])
            .arg("--data-dir")
            .arg(&data)
            .args(["--insecure-registry", &self.state.registry])
            .args(["--cpu", &self.builder.node_cpu])
            .args(["--memory", &self.builder.node_memory]);
        let d = self.spawn(&format!("agent-{node_id}"), cmd)?;
        self.agents[i] = Some(d);
        Ok(())
    }

    /// Stops the agent of host `i` cleanly (SIGTERM, SIGKILL after the grace).
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut d) = self.agents[i].take() {
            d.stop(STOP_GRACE);
        }
        let name = format!("agent-{}", self.state.node_ids[i]);
        self.forget(&name);
    }

    /// Kills host `i` outright, as a machine dying would: its agent and every container process of its
    /// node (SIGKILL), then its network namespace and link. Records and pins stay, as on a disk.
    pub fn kill_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill_agent(i);
        let node = self.state.node_ids[i].clone();
        let token = [format!("berth-{node}")];
        for _ in 0..50 {
            let pids: Vec<u32> = crate::cleanup::matching_cgroups(&token)
                .iter()
                .flat_map(|cg| crate::cleanup::cgroup_pids(cg))
                .collect();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                crate::process::send(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let errors = crate::netns::destroy_host(&self.state.topology.hosts[i]);
        if !errors.is_empty() {
            anyhow::bail!("destroying host {node}: {}", errors.join("; "));
        }
        Ok(())
    }

    /// Brings host `i` back after [`Cluster::kill_node`]: a fresh network namespace with the same
    /// address, and its agent started again on the same data directory.
    pub fn revive_node(&mut self, i: usize) -> anyhow::Result<()> {
        let host = self.state.topology.hosts[i].clone();
        self.state.topology.create_host(&host)?;
        self.start_agent(i)
    }

    /// Kills the agent of host `i` with SIGKILL, as a crash would.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut d) = self.agents[i].take() {
            d.kill();
        }
        let name = format!("agent-{}", self.state.node_ids[i]);
        self.forget(&name);
    }

    /// Waits until `GET /v1/nodes` lists every node of this cluster as HEALTHY.
    pub fn wait_nodes_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let ids = self.state.node_ids.clone();
        let api = self.api.clone();
        let mut checks = 0u32;
        crate::wait_for("every node to be HEALTHY", timeout, || {
            checks += 1;
            // Every second or so, make sure no agent died meanwhile: its log says why.
            if checks.is_multiple_of(10) {
                for a in self.agents.iter_mut().flatten() {
                    a.ensure_running()?;
                }
            }
            let nodes = match api.nodes() {
                Ok(n) => n,
                Err(e) => return Ok(Err(format!("{e:#}"))),
            };
            let healthy = ids.iter().all(|id| {
                nodes
                    .iter()
                    .any(|n| n["node_id"] == id.as_str() && n["status"] == "HEALTHY")
            });
            if healthy {
                Ok(Ok(()))
            } else {
                Ok(Err(serde_json::Value::Array(nodes).to_string()))
            }
        })
    }

    /// Runs the CLI (`berth --hub URL ARGS…`); returns stdout, or fails with stderr.
    pub fn berth(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bins.cli)
            .args(["--hub", &self.state.hub_api])
            .args(args)
            .output()
            .context("running berth")?;
        ok_stdout(&format!("berth {}", args.join(" ")), out)
    }

    /// Runs `program ARGS…` inside the netns of `node_id`.
    pub fn on_host(&self, node_id: &str, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let host = self.state.host(node_id)?;
        Ok(host.command(program).args(args).output()?)
    }

    /// `GET http://IP/` from the host of `node_id`; returns the body.
    pub fn http_get(&self, node_id: &str, ip: &str) -> anyhow::Result<String> {
        let url = format!("http://{ip}/");
        let out = self.on_host(node_id, "curl", &["-sS", "--max-time", "3", &url])?;
        ok_stdout(&format!("curl {url} from {node_id}"), out)
    }

    /// Waits until `http://IP/` from the host of `node_id` answers with exactly `body`.
    ///
    /// The body is what proves it: the sandbox gateway would answer a bare TCP connect.
    pub fn wait_serving(
        &self,
        node_id: &str,
        ip: &str,
        body: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        crate::wait_for(&format!("{ip} to serve from {node_id}"), timeout, || {
            Ok(match self.http_get(node_id, ip) {
                Ok(b) if b == body => Ok(()),
                Ok(b) => Err(format!("body {b:?}")),
                Err(e) => Err(format!("{e:#}")),
            })
        })
    }

    /// `GET http://IP:PORT/PATH` from the host of `node_id` with extra curl arguments; returns
    /// `(HTTP status, content type, body)`. Fails only when curl cannot connect or times out.
    pub fn curl_on_host(
        &self,
        node_id: &str,
        url: &str,
        extra: &[&str],
    ) -> anyhow::Result<(u16, String, String)> {
        // The last line curl prints (after the body) carries the status and the content type.
        const MARK: &str = "\n@@berth-tests@@ %{http_code} %{content_type}";
        let mut args = vec!["-sS", "--max-time", "5", "-w", MARK];
        args.extend_from_slice(extra);
        args.push(url);
        let out = ok_stdout(
            &format!("curl {url} from {node_id}"),
            self.on_host(node_id, "curl", &args)?,
        )?;
        let Some((body, meta)) = out.rsplit_once("\n@@berth-tests@@ ") else {
            bail!("curl {url}: no status line in {out:?}");
        };
        let (code, ctype) = meta.trim().split_once(' ').unwrap_or((meta.trim(), ""));
        let code = code
            .parse::<u16>()
            .with_context(|| format!("curl {url}: status {code:?}"))?;
        Ok((code, ctype.to_owned(), body.to_owned()))
    }

    /// The address of the host of `node_id` (what its agent advertises).
    pub fn host_ip(&self, node_id: &str) -> anyhow::Result<String> {
        Ok(self.state.host(node_id)?.ip.to_string())
    }

    /// The first process of an instance's cgroup (its init), found in the v1 memory hierarchy or the
    /// cgroup2 one; None when the instance has no process.
    pub fn init_pid(&self, node_id: &str, instance_id: &str) -> Option<u32> {
        [
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup",
        ]
        .iter()
        .find_map(|root| {
            let procs = format!("{root}/berth-{node_id}/{instance_id}/cgroup.procs");
            std::fs::read_to_string(procs)
                .ok()
                .and_then(|t| t.lines().find_map(|l| l.trim().parse::<u32>().ok()))
        })
    }

    /// Traces of these instances anywhere on the machine: cgroups, mounts or named netns whose name
    /// holds an instance id. Empty when all were released.
    pub fn traces_of(&self, instance_ids: &[String]) -> Vec<String> {
        let mut found: Vec<String> = crate::cleanup::matching_cgroups(instance_ids)
            .into_iter()
            .map(|p| format!("cgroup {}", p.display()))
            .collect();
        let holds_id = |s: &str| instance_ids.iter().any(|id| s.contains(id.as_str()));
        found.extend(
            crate::cleanup::mounts_under(Path::new("/"))
                .into_iter()
                .filter(|m| holds_id(&m.to_string_lossy()))
                .map(|m| format!("mount {}", m.display())),
        );
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            found.extend(
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| holds_id(n))
                    .map(|n| format!("netns {n}")),
            );
        }
        found
    }

    /// Traces of any container in this cluster: processes whose root is under the run directory,
    /// mounts there, veths in the hosts besides their own `eth0`, processes in the nodes' cgroups.
    /// Empty when no container exists.
    pub fn container_traces(&self) -> Vec<String> {
        let dir = &self.state.run_dir;
        let mut found: Vec<String> = crate::cleanup::pids_rooted_under(dir)
            .into_iter()
            .map(|pid| format!("process {pid} rooted under {}", dir.display()))
            .collect();
        found.extend(
            crate::cleanup::mounts_under(dir)
                .into_iter()
                .map(|m| format!("mount {}", m.display())),
        );
        for h in &self.state.topology.hosts {
            let links = crate::netns::ip(&["-n", &h.netns, "-o", "link", "show", "type", "veth"])
                .unwrap_or_default();
            for line in links.lines() {
                let name = line.split(':').nth(1).unwrap_or("").trim();
                let name = name.split('@').next().unwrap_or(name);
                if name != "eth0" {
                    found.push(format!("veth {name} in {}", h.netns));
                }
            }
        }
        for cg in crate::cleanup::matching_cgroups(&self.state.node_ids) {
            let pids = crate::cleanup::cgroup_pids(&cg);
            if !pids.is_empty() {
                found.push(format!("processes {pids:?} in cgroup {}", cg.display()));
            }
        }
        found
    }

    /// Stops everything and leaves the daemons running in the background, recorded in
    /// `run_dir/state.json` for [`ClusterState::teardown`].
    pub fn detach(mut self) -> anyhow::Result<ClusterState> {
        if !self.detached {
            bail!("only a dev cluster (started detached) can outlive its process");
        }
        for d in [self.etcd.take(), self.registry.take(), self.hub.take()]
            .into_iter()
            .chain(self.agents.iter_mut().map(Option::take))
            .flatten()
        {
            d.release();
        }
        self.state.save()?;
        self.released = true;
        Ok(self.state.clone())
    }

    /// Copies the logs to `target/berth-tests/logs/PREFIX` and prints their tails (after a failure).
    fn keep_logs(&self) {
        let from = self.state.run_dir.join("logs");
        let to = crate::paths::harness_dir()
            .join("logs")
            .join(&self.state.prefix);
        let _ = std::fs::create_dir_all(&to);
        let Ok(entries) = std::fs::read_dir(&from) else {
            return;
        };
        eprintln!(
            "cluster {}: logs kept in {}",
            self.state.prefix,
            to.display()
        );
        for e in entries.flatten() {
            let _ = std::fs::copy(e.path(), to.join(e.file_name()));
            eprintln!(
                "---- last lines of {} ----\n{}",
                e.file_name().to_string_lossy(),
                crate::process::tail(&e.path(), 25)
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if std::thread::panicking() || std::env::var_os("BERTH_TEST_KEEP_LOGS").is_some() {
            self.keep_logs();
        }
        for a in self.agents.iter_mut() {
            if let Some(mut d) = a.take() {
                d.stop(STOP_GRACE);
            }
        }
        // Hub before etcd before registry; each `Daemon` stops itself when dropped.
        drop(self.hub.take());
        drop(self.etcd.take());
        drop(self.registry.take());
        for e in self.state.release_resources() {
            eprintln!("cluster {} cleanup: {e}", self.state.prefix);
        }
    }
}

fn ok_stdout(what: &str, out: Output) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if stdout.is_empty() {
                String::new()
            } else {
                format!("\nstdout: {stdout}")
            }
        );
    }
    Ok(stdout)
}

/// Polls `url` until `ready(status, body)`; fails early (with its log) if the daemon exits.
fn wait_http(
    d: &mut Daemon,
    what: &str,
    url: &str,
    ready: impl Fn(u16, &str) -> bool,
) -> anyhow::Result<()> {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()?;
    crate::wait_until(
        &format!("{what} at {url}"),
        READY_TIMEOUT,
        Duration::from_millis(50),
        || {
            d.ensure_running()?;
            let Ok(resp) = http.get(url).send() else {
                return Ok(None);
            };
            let status = resp.status().as_u16();
            let body = resp.text().unwrap_or_default();
            Ok(ready(status, &body).then_some(()))
        },
    )
}
