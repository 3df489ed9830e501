//! The real [`Host`]: one instance's life on this node, composed from `image`, `runtime` and
//! `network`.
//!
//! Start order matters: the runtime creates the container (its init waits, in a fresh network
//! namespace), the network module plugs a veth into that namespace through the init's pid, and only
//! then does the process start, so an application never sees its network missing.
//!
//! Per-instance files live in `<data>/instances/<id>/`: `instance.json` (the spec, for recovery after
//! an agent restart), `image.json` (the manifest digest it runs and the image's stop signal, so an
//! adopted instance reports its digest and is stopped the image's way without a pull),
//! `restarts`, `container.log` (stdout and stderr), and the overlay rootfs with its upper and work
//! dirs.
//!
//! Stops are graceful: the instance's stop signal (the user's `stop_signal`, else the image's
//! `StopSignal`, else SIGTERM), up to its stop timeout, then SIGKILL. A halt (stop on request,
//! restart) stops the process and releases the container, network plumbing and rootfs like a
//! removal, but keeps the instance dir's records; a start rebuilds the rest. A container a live
//! migration left frozen (stopped by CRIU) is killed at once: it cannot act on a stop signal.
//!
//! Live migration (`host_migrate.rs`, once [`NodeHost::enable_migration`] was called) composes
//! `migrate::session` with this node's modules: the source dumps the running container and sends
//! it with its overlay upper dir; the target pulls the image, mounts the received upper dir under
//! a fresh rootfs, plugs the same IP into a network namespace held for the restore, and has CRIU
//! restore the container there.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use berth_proto::v1::InstanceStatus;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::dataplane::{network_mtu, NodeDataPlane};
use crate::health::{Check, ExecCheck, HttpCheck, ProbeCheck, ProbeSpec, TcpCheck};
use crate::image::{ImageConfig, ImageStore};
use crate::migrate::session::ProgressSink;
use crate::network::{host_veth_name, NetworkManager, NetworkPlan};
use crate::reconcile::{Host, InstanceSpec, Liveness, MigrationOrder, Recovered, Started};
use crate::runtime::{parse_signal, ContainerConfig, Exec, Runtime, Status};

#[path = "host_migrate.rs"]
mod migration;

/// What an instance runs from, recorded at its start in `image.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFacts {
    /// `sha256:…` of the image manifest.
    pub digest: String,
    /// The image config's `StopSignal`, as written.
    #[serde(default)]
    pub stop_signal: Option<String>,
}

/// The node's real host operations.
pub struct NodeHost {
    images: Arc<ImageStore>,
    runtime: Arc<Runtime>,
    network: Arc<NetworkManager>,
    dataplane: Arc<NodeDataPlane>,
    instances_dir: PathBuf,
    /// Serialises bridge creation/removal with veth plumbing (shared with the data plane, which
    /// removes bridges), so a bridge is never deleted under an instance being attached to it.
    plumbing: Arc<Mutex<()>>,
    /// Where containers join the cgroup2 hierarchy themselves (hybrid hosts only; on unified
    /// hosts libcgroups already puts them there).
    cgroup2: Option<PathBuf>,
    /// Runs exec probes inside containers (the runtime's helper binary).
    exec: Option<Exec>,
    /// What live migrations need; set once the node has its certificate.
    migration: OnceLock<migration::MigrationKit>,
}

impl NodeHost {
    /// Composes the node's modules; `data_dir` is the agent's `--data-dir`.
    pub fn new(
        images: ImageStore,
        runtime: Runtime,
        network: Arc<NetworkManager>,
        dataplane: Arc<NodeDataPlane>,
        plumbing: Arc<Mutex<()>>,
        data_dir: &Path,
    ) -> std::io::Result<Self> {
        let instances_dir = data_dir.join("instances");
        std::fs::create_dir_all(&instances_dir)?;
        let cgroup2 = crate::runtime::cgroup::cgroup2_mount()?;
        let cgroup2 = (!crate::runtime::cgroup::is_unified(&cgroup2)).then_some(cgroup2);
        let exec = runtime.exec_helper();
        Ok(Self {
            exec,
            images: Arc::new(images),
            runtime: Arc::new(runtime),
            network,
            dataplane,
            instances_dir,
            plumbing,
            cgroup2,
            migration: OnceLock::new(),
        })
    }

    /// Turns on live migration: `links` are the node's migration connections (started once the
    /// node has its certificate), `criu` checkpoints and restores, `exe` is the agent binary
    /// (it runs the network namespace holder of a restore). Until this is called both
    /// [`Host::migrate_out`] and [`Host::migrate_in`] fail; a second call changes nothing.
    pub fn enable_migration(
        &self,
        links: Arc<crate::migrate::link::Links>,
        criu: Arc<crate::checkpoint::Criu>,
        exe: PathBuf,
        auto: crate::migrate::write_rate::AutoPolicy,
    ) {
        let kit = migration::MigrationKit {
            links,
            criu,
            exe,
            auto,
        };
        if self.migration.set(kit).is_err() {
            warn!("live migration was already enabled; keeping the first setup");
        } else {
            info!("live migration enabled");
        }
    }

    /// Runs exec probes through `exec` instead of the runtime's create helper binary.
    pub fn with_exec(mut self, exec: Exec) -> Self {
        self.exec = Some(exec);
        self
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.instances_dir.join(id)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Runtime) -> Result<T, crate::runtime::RuntimeError> + Send + 'static,
    ) -> Result<T, String> {
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || f(&rt))
            .await
            .map_err(|e| format!("{what}: task failed: {e}"))?
            .map_err(|e| format!("{what}: {e}"))
    }

    async fn try_start(
        &self,
        spec: &InstanceSpec,
        progress: &(dyn Fn(InstanceStatus) + Send + Sync),
        phases: &mut HashMap<String, f64>,
    ) -> Result<String, String> {
        let id = spec.instance_id.clone();
        let dir = self.instance_dir(&id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        write_record(&dir, spec)?;

        progress(InstanceStatus::Pulling);
        let t = Instant::now();
        let image = self
            .images
            .pull(&spec.image)
            .await
            .map_err(|e| format!("pull {}: {e}", spec.image))?;
        phases.insert("pull".into(), ms(t));
        write_image_facts(
            &dir,
            &ImageFacts {
                digest: image.digest.clone(),
                stop_signal: image.config.stop_signal.clone(),
            },
        )?;

        progress(InstanceStatus::Creating);
        let t = Instant::now();
        let images = self.images.clone();
        let (img, rootfs_dir) = (image.clone(), dir.clone());
        let rootfs = tokio::task::spawn_blocking(move || images.mount_rootfs(&img, &rootfs_dir))
            .await
            .map_err(|e| format!("rootfs: task failed: {e}"))?
            .map_err(|e| format!("rootfs: {e}"))?;
        phases.insert("rootfs".into(), ms(t));

        let process = resolve_process(&image.config, spec, &rootfs)?;
        let cfg = ContainerConfig {
            id: id.clone(),
            rootfs,
            args: process.args,
            env: process.env,
            cwd: process.cwd,
            uid: process.uid,
            gid: process.gid,
            hostname: hostname_for(spec),
            cpu_millis: spec.cpu_millis,
            memory_bytes: spec.memory_bytes,
            resolv_conf: Some(write_resolv_conf(&dir, spec)?),
        };
        let t = Instant::now();
        let log = dir.join("container.log");
        let pid = self
            .blocking("create", move |rt| rt.create(&cfg, &log))
            .await?;
        phases.insert("create".into(), ms(t));

        let t = Instant::now();
        if let Some(cgroup2) = &self.cgroup2 {
            // Service routing (cgroup/connect4) sees only sockets of processes in the node's cgroup2
            // subtree; children forked after start inherit the group.
            crate::runtime::cgroup::join_cgroup2(cgroup2, self.runtime.cgroup_parent(), &id, pid)
                .map_err(|e| format!("cgroup2: {e}"))?;
        }
        self.plug_in(spec, pid).await?;
        phases.insert("network".into(), ms(t));

        let t = Instant::now();
        let start_id = id.clone();
        self.blocking("start", move |rt| rt.start(&start_id))
            .await?;
        phases.insert("start".into(), ms(t));
        Ok(image.digest)
    }

    /// Plugs the network namespace of process `pid` into the instance's network with its address
    /// (bridge, veth, routes) and hands the veth to the data plane.
    pub(crate) async fn plug_in(&self, spec: &InstanceSpec, pid: i32) -> Result<(), String> {
        let net = &spec.network;
        let plan = NetworkPlan {
            network_id: net.network_id.clone(),
            gateway: net.gateway,
            prefix_len: net.cidr.prefix_len(),
            mtu: network_mtu(net.encrypted),
        };
        let attached = {
            let _guard = self.plumbing.lock().await;
            self.network
                .ensure_bridge(&plan)
                .await
                .map_err(|e| format!("network: {e}"))?;
            self.network
                .attach(&spec.instance_id, &plan, pid, spec.ip)
                .await
                .map_err(|e| format!("network: {e}"))?
        };
        self.dataplane
            .attach_instance(&attached.veth, spec.network.vni)
            .map(|_| ())
            .map_err(|e| format!("network policy: {e}"))
    }

    /// Removes every piece of an instance, continuing past failures so one stuck piece does not
    /// pin the rest; returns all the failures together.
    async fn teardown(&self, spec: &InstanceSpec, remove_record: bool) -> Result<(), String> {
        self.teardown_with(spec, remove_record, false).await
    }

    /// [`Self::teardown`]; `kill_now` skips the stop signal and its grace (a failed migration's
    /// restored copy: nobody must see it stop gracefully).
    async fn teardown_with(
        &self,
        spec: &InstanceSpec,
        remove_record: bool,
        kill_now: bool,
    ) -> Result<(), String> {
        let id = spec.instance_id.clone();
        let mut errors = Vec::new();
        let rm_id = id.clone();
        let signal = stop_signal_for(spec, &self.instance_dir(&id));
        let grace = spec.stop_timeout;
        if let Err(e) = self
            .blocking("remove container", move |rt| {
                // A container a migration left frozen holds a stop signal pending until SIGCONT:
                // waiting out its grace would only delay the SIGKILL, which works on it at once.
                let frozen = || {
                    rt.state(&rm_id)
                        .ok()
                        .flatten()
                        .and_then(|s| s.pid)
                        .is_some_and(is_stopped)
                };
                let grace = if kill_now || frozen() {
                    Duration::ZERO
                } else {
                    grace
                };
                rt.remove_with_signal(&rm_id, signal, grace)
            })
            .await
        {
            errors.push(e);
        }
        if let Err(e) = self.dataplane.detach_instance(&host_veth_name(&id)) {
            errors.push(format!("network policy: {e}"));
        }
        {
            // The bridge stays: the data plane removes it once the network leaves this node's view.
            let _guard = self.plumbing.lock().await;
            if let Err(e) = self.network.detach(&id).await {
                errors.push(format!("detach: {e}"));
            }
        }
        let dir = self.instance_dir(&id);
        let images = self.images.clone();
        let rootfs_dir = dir.clone();
        match tokio::task::spawn_blocking(move || images.release_rootfs(&rootfs_dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("rootfs: {e}")),
            Err(e) => errors.push(format!("rootfs: task failed: {e}")),
        }
        if remove_record && errors.is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errors.push(format!("remove {}: {e}", dir.display()));
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Whether process `pid` is stopped (by a signal or a tracer): what CRIU leaves a container's
/// tasks in after the final dump of a live migration.
fn is_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat_state(&stat))
        .is_some_and(|state| matches!(state, 'T' | 't'))
}

/// The state letter of a `/proc/<pid>/stat` line (the comm before it may hold spaces and
/// parentheses).
fn stat_state(stat: &str) -> Option<char> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().next()?.chars().next()
}

/// The container's `/etc/resolv.conf`: the node's DNS on the network's gateway.
fn write_resolv_conf(dir: &Path, spec: &InstanceSpec) -> Result<PathBuf, String> {
    let path = dir.join("resolv.conf");
    let text = crate::dns::resolv_conf(spec.network.gateway, &spec.network.name);
    std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(path)
}

/// The signal that stops `spec`'s process first: the user's, else the image's (recorded at start
/// in `dir`'s `image.json`), else SIGTERM. An image signal that does not parse falls back to
/// SIGTERM with a warning.
pub fn stop_signal_for(spec: &InstanceSpec, dir: &Path) -> Signal {
    if let Some(sig) = parse_signal(&spec.stop_signal) {
        return sig;
    }
    match read_image_facts(dir).and_then(|f| f.stop_signal) {
        Some(text) => parse_signal(&text).unwrap_or_else(|| {
            warn!(instance_id = %spec.instance_id, stop_signal = %text,
                "image stop signal not understood; using SIGTERM");
            Signal::SIGTERM
        }),
        None => Signal::SIGTERM,
    }
}

fn write_record(dir: &Path, spec: &InstanceSpec) -> Result<(), String> {
    write_json(dir, "instance.json", spec)
}

fn write_image_facts(dir: &Path, facts: &ImageFacts) -> Result<(), String> {
    write_json(dir, "image.json", facts)
}

/// What `image.json` says; `None` when absent or unreadable (instances of older agents).
fn read_image_facts(dir: &Path) -> Option<ImageFacts> {
    let bytes = std::fs::read(dir.join("image.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes `name` in `dir` through a temp file and a rename: readers see the old or the new one.
fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| format!("encode {name}: {e}"))?;
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, json).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(|e| format!("write {}: {e}", path.display()))
}

fn hostname_for(spec: &InstanceSpec) -> String {
    // Host names are at most 64 bytes; instance ids are short and unique, names may repeat.
    spec.instance_id.chars().take(63).collect()
}

impl Host for NodeHost {
    async fn start(
        &self,
        spec: &InstanceSpec,
        progress: Box<dyn Fn(InstanceStatus) + Send + Sync>,
    ) -> Result<Started, String> {
        // Whatever an earlier attempt or agent left goes first; start is always from clean. The
        // instance dir is the first thing an attempt makes and the last a stop removes, so without
        // it there is nothing to clean and a fresh deploy skips the teardown's syscalls.
        if self.instance_dir(&spec.instance_id).exists() {
            self.teardown(spec, false).await?;
        }
        let mut phases = HashMap::new();
        match self.try_start(spec, progress.as_ref(), &mut phases).await {
            Ok(image_digest) => Ok(Started {
                phases_ms: phases,
                image_digest,
            }),
            Err(reason) => {
                if let Err(cleanup) = self.teardown(spec, false).await {
                    warn!(instance_id = %spec.instance_id, %cleanup, "cleanup after failed start failed too");
                    return Err(format!("{reason} (cleanup failed: {cleanup})"));
                }
                Err(reason)
            }
        }
    }

    async fn halt(&self, spec: &InstanceSpec) -> Result<(), String> {
        // Never started here (placed already stopped): nothing to stop.
        if !self.instance_dir(&spec.instance_id).exists() {
            return Ok(());
        }
        self.teardown(spec, false).await
    }

    async fn stop(&self, spec: &InstanceSpec) -> Result<(), String> {
        self.teardown(spec, true).await
    }

    async fn migrate_out(
        &self,
        spec: &InstanceSpec,
        order: &MigrationOrder,
        progress: ProgressSink,
    ) -> Result<crate::reconcile::SentAway, String> {
        self.send_instance(spec, order, progress).await
    }

    async fn migrate_in(
        &self,
        spec: &InstanceSpec,
        order: &MigrationOrder,
        progress: ProgressSink,
    ) -> Result<Started, String> {
        self.receive_instance(spec, order, progress).await
    }

    async fn resume_migrated(&self, spec: &InstanceSpec) -> Result<(), String> {
        self.resume_sent(spec).await
    }

    fn probe_check(
        &self,
        spec: &InstanceSpec,
        probe: &ProbeSpec,
    ) -> Result<Arc<dyn Check>, String> {
        probe_check_for(spec, probe, self.exec.as_ref(), || {
            self.runtime.state_dir(&spec.instance_id)
        })
    }

    fn liveness(&self, instance_id: &str) -> Liveness {
        match self.runtime.state(instance_id) {
            Ok(Some(s)) if s.status == Status::Running || s.status == Status::Paused => {
                Liveness::Running
            }
            Ok(Some(_)) => Liveness::Exited(-1),
            Ok(None) => Liveness::Unknown,
            Err(e) => {
                warn!(instance_id, error = %e, "cannot read container state");
                Liveness::Unknown
            }
        }
    }

    fn reap(&self) -> Vec<(String, i32)> {
        self.runtime.reap()
    }

    fn save_restarts(&self, instance_id: &str, restarts: u32) {
        let path = self.instance_dir(instance_id).join("restarts");
        if let Err(e) = std::fs::write(&path, restarts.to_string()) {
            warn!(instance_id, path = %path.display(), error = %e, "cannot record the restart count");
        }
    }

    fn recover(&self) -> Vec<Recovered> {
        let mut found = Vec::new();
        let entries = match std::fs::read_dir(&self.instances_dir) {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %self.instances_dir.display(), error = %e, "cannot list instances");
                return found;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path().join("instance.json");
            let spec: InstanceSpec = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable instance record; skipping");
                    continue;
                }
            };
            let liveness = self.liveness(&spec.instance_id);
            let restarts = std::fs::read_to_string(entry.path().join("restarts"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            let image_digest = read_image_facts(&entry.path())
                .map(|f| f.digest)
                .unwrap_or_default();
            info!(instance_id = %spec.instance_id, ?liveness, restarts, "found instance from an earlier run");
            // Its tc filters still run the previous agent's program: swap in this one's (in place,
            // counters kept), so policy and counting never stop.
            if liveness == Liveness::Running {
                let veth = host_veth_name(&spec.instance_id);
                if let Err(e) = self.dataplane.attach_instance(&veth, spec.network.vni) {
                    warn!(instance_id = %spec.instance_id, %veth, error = %e, "cannot re-attach network policy");
                }
            }
            found.push(Recovered {
                spec,
                liveness,
                restarts,
                image_digest,
            });
        }
        found
    }
}

/// The check carrying out `probe` for `spec`'s instance: HTTP and TCP to its IP (the node reaches
/// it over its network's bridge), exec inside its container through `exec` and the container's
/// youki state dir.
pub fn probe_check_for(
    spec: &InstanceSpec,
    probe: &ProbeSpec,
    exec: Option<&Exec>,
    state_dir: impl FnOnce() -> PathBuf,
) -> Result<Arc<dyn Check>, String> {
    // Ports are validated to 1..=65535 with the assignment.
    let addr = |port: u32| {
        u16::try_from(port)
            .map(|p| SocketAddr::new(IpAddr::V4(spec.ip), p))
            .map_err(|_| format!("probe port {port} out of range"))
    };
    Ok(match &probe.check {
        ProbeCheck::Http { path, port } => Arc::new(HttpCheck::new(addr(*port)?, path.clone())),
        ProbeCheck::Tcp { port } => Arc::new(TcpCheck::new(addr(*port)?)),
        ProbeCheck::Exec { command } => {
            let exec = exec.ok_or("exec probes need the runtime's helper binary")?;
            Arc::new(ExecCheck::new(exec.clone(), state_dir(), command.clone()))
        }
    })
}

/// The process an instance runs: Kubernetes semantics, where `command` replaces both the image's
/// entrypoint and cmd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// argv.
    pub args: Vec<String>,
    /// "K=V" list: the image's, overridden by the spec's.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Resolves what to run from the image config and the instance's overrides. `rootfs` is read for
/// user and group names.
pub fn resolve_process(
    image: &ImageConfig,
    spec: &InstanceSpec,
    rootfs: &Path,
) -> Result<Process, String> {
    let args: Vec<String> = if spec.command.is_empty() {
        image
            .entrypoint
            .iter()
            .chain(image.cmd.iter())
            .cloned()
            .collect()
    } else {
        spec.command.clone()
    };
    if args.is_empty() {
        return Err(format!(
            "image {} has no entrypoint or cmd and no command was given",
            spec.image
        ));
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for kv in &image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        env.insert(k.to_string(), v.to_string());
    }
    for (k, v) in &spec.env {
        env.insert(k.clone(), v.clone());
    }
    let mut env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !env.iter().any(|kv| kv.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
    }
    let (uid, gid) = resolve_user(image.user.as_deref().unwrap_or(""), rootfs)?;
    let cwd = match image.working_dir.as_deref() {
        Some(d) if d.starts_with('/') => d.to_string(),
        _ => "/".to_string(),
    };
    Ok(Process {
        args,
        env,
        cwd,
        uid,
        gid,
    })
}

/// Resolves an image's `user` ("", "1000", "1000:1000", "www", "www:staff") against the rootfs's
/// /etc/passwd and /etc/group.
pub fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => {
            let gid =
                lookup(&passwd, |f| f.get(2) == Some(&u)).and_then(|f| f.get(3)?.parse().ok());
            (uid, gid.unwrap_or(0))
        }
        Err(_) => {
            let fields = lookup(&passwd, |f| f.first() == Some(&u))
                .ok_or_else(|| format!("image user {u:?} not found in /etc/passwd"))?;
            let uid = fields.get(2).and_then(|s| s.parse().ok());
            let gid = fields.get(3).and_then(|s| s.parse().ok());
            match (uid, gid) {
                (Some(uid), Some(gid)) => (uid, gid),
                _ => {
                    return Err(format!(
                        "image user {u:?} has a malformed /etc/passwd entry"
                    ))
                }
            }
        }
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
                lookup(&group, |f| f.first() == Some(&g))
                    .and_then(|f| f.get(2)?.parse().ok())
                    .ok_or_else(|| format!("image group {g:?} not found in /etc/group"))?
            }
        },
    };
    Ok((uid, gid))
}

fn lookup<'a>(file: &'a str, pred: impl Fn(&[&'a str]) -> bool) -> Option<Vec<&'a str>> {
    file.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| pred(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::NetworkSpec;

    fn spec(command: &[&str]) -> InstanceSpec {
        InstanceSpec {
            instance_id: "ins-1".into(),
            container_id: "ctr-1".into(),
            container_name: String::new(),
            image: "r/demo:1".into(),
            cpu_millis: 100,
            memory_bytes: 64 << 20,
            command: command.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::from([("MODE".into(), "prod".into())]),
            network: NetworkSpec {
                network_id: "net-1".into(),
                name: "n".into(),
                cidr: "10.1.0.0/24".parse().expect("cidr"),
                gateway: "10.1.0.1".parse().expect("ip"),
                vni: 4096,
                encrypted: false,
            },
            ip: "10.1.0.2".parse().expect("ip"),
            restart_policy: Default::default(),
            health: None,
            stop_signal: String::new(),
            stop_timeout: crate::reconcile::DEFAULT_STOP_TIMEOUT,
            stopped: false,
            restart_generation: 0,
            revision: 0,
            migration: None,
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/bin/httpd".into()],
            cmd: vec!["-f".into()],
            env: vec!["MODE=dev".into(), "PATH=/bin".into()],
            working_dir: Some("/www".into()),
            user: None,
            stop_signal: None,
        }
    }

    #[test]
    fn image_entrypoint_and_cmd_are_used_without_command() {
        let p = resolve_process(&image(), &spec(&[]), Path::new("/nonexistent")).expect("ok");
        assert_eq!(p.args, vec!["/bin/httpd", "-f"]);
        assert_eq!(p.cwd, "/www");
        assert_eq!(
            p.env,
            vec!["MODE=prod", "PATH=/bin"],
            "spec env overrides the image's"
        );
    }

    #[test]
    fn command_replaces_entrypoint_and_cmd() {
        let p =
            resolve_process(&image(), &spec(&["sh", "-c", "true"]), Path::new("/x")).expect("ok");
        assert_eq!(p.args, vec!["sh", "-c", "true"]);
    }

    #[test]
    fn nothing_to_run_is_an_error_and_path_gets_a_default() {
        let img = ImageConfig::default();
        assert!(resolve_process(&img, &spec(&[]), Path::new("/x"))
            .unwrap_err()
            .contains("no entrypoint"));
        let p = resolve_process(&img, &spec(&["true"]), Path::new("/x")).expect("ok");
        assert!(p.env.iter().any(|e| e == DEFAULT_PATH));
    }

    #[test]
    fn the_stop_signal_is_the_users_then_the_images_then_sigterm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = spec(&[]);
        assert_eq!(
            stop_signal_for(&s, dir.path()),
            Signal::SIGTERM,
            "nothing recorded"
        );
        write_image_facts(
            dir.path(),
            &ImageFacts {
                digest: "sha256:aa".into(),
                stop_signal: Some("SIGQUIT".into()),
            },
        )
        .expect("write");
        assert_eq!(
            stop_signal_for(&s, dir.path()),
            Signal::SIGQUIT,
            "the image's"
        );
        s.stop_signal = "INT".into();
        assert_eq!(
            stop_signal_for(&s, dir.path()),
            Signal::SIGINT,
            "the user's wins"
        );
        s.stop_signal = String::new();
        write_image_facts(
            dir.path(),
            &ImageFacts {
                digest: "sha256:aa".into(),
                stop_signal: Some("SIGRTMIN+3".into()),
            },
        )
        .expect("write");
        assert_eq!(
            stop_signal_for(&s, dir.path()),
            Signal::SIGTERM,
            "unknown: SIGTERM"
        );
        assert_eq!(
            read_image_facts(dir.path()).map(|f| f.digest).as_deref(),
            Some("sha256:aa")
        );
    }

    #[test]
    fn probe_checks_target_the_instance_ip_or_its_container() {
        let s = spec(&[]);
        let http = ProbeSpec::new(ProbeCheck::Http {
            path: "/healthz".into(),
            port: 8080,
        });
        let check = probe_check_for(&s, &http, None, || PathBuf::from("/x")).expect("http");
        assert_eq!(check.describe(), "http GET 10.1.0.2:8080/healthz");
        let tcp = ProbeSpec::new(ProbeCheck::Tcp { port: 53 });
        let check = probe_check_for(&s, &tcp, None, || PathBuf::from("/x")).expect("tcp");
        assert_eq!(check.describe(), "tcp 10.1.0.2:53");
        let exec = ProbeSpec::new(ProbeCheck::Exec {
            command: vec!["cat".into(), "/ok".into()],
        });
        assert!(probe_check_for(&s, &exec, None, || PathBuf::from("/x")).is_err());
        let helper = Exec::new(PathBuf::from("/usr/bin/berth-agent"));
        let check = probe_check_for(&s, &exec, Some(&helper), || PathBuf::from("/state/ins-1"))
            .expect("exec");
        assert!(check.describe().contains("cat"), "{}", check.describe());
    }

    #[test]
    fn stopped_processes_are_told_from_their_stat_line() {
        let line = |state: &str| format!("42 (sh (odd) name) {state} 1 42 42 0 -1 4194560");
        assert_eq!(stat_state(&line("T")), Some('T'));
        assert_eq!(stat_state(&line("S")), Some('S'));
        assert_eq!(stat_state("garbage"), None);
        assert_eq!(stat_state("1 (x)"), None);
        assert!(!is_stopped(std::process::id() as i32), "this test runs");
        assert!(!is_stopped(i32::MAX), "no such process");
    }

    #[test]
    fn users_resolve_numerically_and_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("etc")).expect("mkdir");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").expect("write");
        assert_eq!(resolve_user("", dir.path()), Ok((0, 0)));
        assert_eq!(resolve_user("1000", dir.path()), Ok((1000, 0)));
        assert_eq!(resolve_user("33", dir.path()), Ok((33, 34)));
        assert_eq!(resolve_user("www", dir.path()), Ok((33, 34)));
        assert_eq!(resolve_user("www:staff", dir.path()), Ok((33, 50)));
        assert_eq!(resolve_user("1:2", dir.path()), Ok((1, 2)));
        assert!(resolve_user("nobody", dir.path()).is_err());
        assert!(resolve_user("www:wheel", dir.path()).is_err());
    }
}
