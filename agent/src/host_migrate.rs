//! The node's side of a live migration, for [`NodeHost`]: `migrate::session` composed with the
//! image store, runtime, network and CRIU.
//!
//! Source ([`NodeHost::send_instance`]): dials the target named by the hub's order and runs the
//! session with every dump made from the container's init (established TCP connections and the
//! bind-mounted `resolv.conf` included) and its overlay upper dir. On success the container is
//! left frozen here until the hub drops the assignment (the stop kills it at once); on failure
//! the session resumed it.
//!
//! Target ([`NodeHost::receive_instance`]): expects the source's connection first thing (the
//! source dials as soon as it has its order), pulls the image while pre-copy runs, and once
//! everything arrived ([`Landing`], the session's [`TargetHost`]) puts the received upper dir
//! under a fresh overlay rootfs, plugs the instance's address into a network namespace held by
//! a `__netns-holder` process, starts the log shim, and lets CRIU restore the container into
//! them; the runtime then adopts it. Any failure removes every piece of the attempt.
//!
//! Per-migration work dirs live in the instance dir: `migrate-out-<migration id>` (the source's
//! round dumps) and `migrate-in-<migration id>` (the target's staging dir).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{ms, write_image_facts, write_record, write_resolv_conf, ImageFacts, NodeHost};
use crate::checkpoint::{
    bind_mount_points, Checkpointer, Criu, DumpMode, DumpRequest, RestoreReport, ResumeRequest,
};
use crate::image::{ImageStore, PulledImage};
use crate::migrate::link::{Links, Transfer};
use crate::migrate::postcopy::{run_source_postcopy_quic, run_target_postcopy_quic};
use crate::migrate::session::{
    run_source_quic, run_target_quic, HookError, MigrationProgress, ModeChoice, NoSourceHooks,
    Phase, PrecopyPolicy, ProgressSink, Received, RestorePlan, SourceConfig, TargetConfig,
    TargetHost, Timeouts,
};
use crate::migrate::wire::DEFAULT_MAX_PAYLOAD;
use crate::migrate::write_rate::{self, AutoPolicy};
use crate::network::holder::NetnsHolder;
use crate::reconcile::{InstanceSpec, MigrationMode, MigrationOrder, SentAway, Started};

/// How long the target waits for the source's connection.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the source keeps dialling a target that does not expect the migration yet (both get
/// their orders in the same pass of the hub, the target may take a moment to expect it).
const NOT_EXPECTED_RETRY: Duration = Duration::from_secs(20);

/// Pause between two such dials.
const REDIAL_PAUSE: Duration = Duration::from_millis(250);

/// What a target says when it closes a connection for a migration it does not expect from the
/// dialling node (see `migrate::link`).
const NOT_EXPECTED_REASON: &[u8] = b"not expected from this node";

/// CRIU restore timeout.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// The container's bind-mounted `resolv.conf`: the only external mount berth's containers have.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Disk a migration may use beyond twice the memory limit (CRIU's other images, the upper dir).
const STAGING_ALLOWANCE: u64 = 4 << 30;

/// Space left free on the data dir's filesystem by a migration's staging.
const DISK_RESERVE: u64 = 512 << 20;

/// What live migrations need, given once the node has its certificate.
pub(super) struct MigrationKit {
    /// The node's migration connections.
    pub(super) links: Arc<Links>,
    /// Checkpoint and restore.
    pub(super) criu: Arc<Criu>,
    /// The agent binary (runs `__netns-holder`).
    pub(super) exe: PathBuf,
    /// How `auto` orders choose their mode.
    pub(super) auto: AutoPolicy,
}

impl NodeHost {
    fn kit(&self) -> Result<&MigrationKit, String> {
        self.migration.get().ok_or_else(|| {
            "live migration is not enabled on this node: no node certificate or CRIU yet".to_owned()
        })
    }

    /// [`crate::reconcile::Host::resume_migrated`]: the copy a migration left frozen here runs on.
    pub(super) async fn resume_sent(&self, spec: &InstanceSpec) -> Result<(), String> {
        let criu = self.kit()?.criu.clone();
        let runtime = self.runtime.clone();
        let id = spec.instance_id.clone();
        off_thread("resume the frozen copy", move || {
            let pid = runtime
                .state(&id)
                .map_err(|e| format!("container state: {e}"))?
                .and_then(|s| s.pid)
                .ok_or_else(|| format!("instance {id} has no container here any more"))?;
            // The final dump held the traffic with CRIU's iptables lock: lifted with it.
            let resumed = criu
                .resume(&ResumeRequest {
                    pid,
                    unlock_network: true,
                })
                .map_err(|e| e.to_string())?;
            info!(instance_id = %id, pid, ?resumed, "frozen copy resumed: the migration failed after all");
            Ok(())
        })
        .await
    }

    /// The source's side of [`crate::reconcile::Host::migrate_out`].
    pub(super) async fn send_instance(
        &self,
        spec: &InstanceSpec,
        order: &MigrationOrder,
        progress: ProgressSink,
    ) -> Result<SentAway, String> {
        let kit = self.kit()?;
        let id = spec.instance_id.clone();
        let mid = order.migration_id.clone();
        check_migration_id(&mid)?;
        let peer = order.peer_node_id.as_str();
        let addr = order.peer_addr.ok_or_else(|| {
            format!("migration {mid}: the order names no address for node {peer}")
        })?;
        let dir = absolute(&self.instance_dir(&id))?;
        let work_dir = dir.join(format!("migrate-out-{mid}"));

        let runtime = self.runtime.clone();
        let (state_id, instance_dir) = (id.clone(), dir.clone());
        let (pid, external_mounts, upper_dir) =
            off_thread("migrate: inspect container", move || {
                let state = runtime
                    .state(&state_id)
                    .map_err(|e| format!("container state: {e}"))?;
                let pid = state
                    .filter(|s| s.status == crate::runtime::Status::Running)
                    .and_then(|s| s.pid)
                    .ok_or_else(|| format!("instance {state_id} has no running container here"))?;
                let mounts = external_mounts_of(&runtime, &state_id, &instance_dir)?;
                let upper = ImageStore::upper_dir(&instance_dir);
                Ok((pid, mounts, upper.is_dir().then_some(upper)))
            })
            .await?;

        let (mode, write_rate) = match order.mode {
            MigrationMode::Auto => self.choose_mode(&id, pid, kit.auto).await,
            explicit => (explicit, None),
        };
        let choice = ModeChoice {
            mode,
            write_rate_mib_s: write_rate.map(|r| r.mib_per_sec()),
        };
        // Every report of this migration says how it goes, the first one at once.
        let progress: ProgressSink = {
            let inner = progress;
            Arc::new(move |p: &MigrationProgress| {
                let mut p = *p;
                p.choice = Some(choice);
                inner(&p)
            })
        };
        progress(&MigrationProgress {
            phase: Phase::Prepare,
            rounds: 0,
            bytes_sent: 0,
            pages_sent: 0,
            downtime_ms: None,
            choice: None,
            memory_complete: false,
        });
        let transfer = match mode {
            MigrationMode::Postcopy => Transfer::Postcopy,
            MigrationMode::Auto | MigrationMode::Precopy | MigrationMode::Stopcopy => {
                Transfer::Precopy
            }
        };

        let mut dump = DumpRequest::new(pid, work_dir.join("dump"), DumpMode::LeaveRunning);
        dump.external_mounts = external_mounts;
        dump.tcp_established = true;
        let config = SourceConfig {
            migration_id: mid.clone(),
            instance_id: id.clone(),
            dump,
            work_dir: work_dir.clone(),
            upper_dir,
            precopy: match mode {
                MigrationMode::Auto | MigrationMode::Precopy | MigrationMode::Postcopy => {
                    PrecopyPolicy::default()
                }
                MigrationMode::Stopcopy => PrecopyPolicy {
                    max_rounds: 0,
                    ..PrecopyPolicy::default()
                },
            },
            timeouts: Timeouts::default(),
            max_payload: DEFAULT_MAX_PAYLOAD,
        };
        info!(
            instance_id = %id,
            migration_id = %mid,
            peer,
            %addr,
            pid,
            transfer = transfer.as_str(),
            stopcopy = mode == MigrationMode::Stopcopy,
            "sending instance"
        );

        let deadline = Instant::now() + NOT_EXPECTED_RETRY;
        let result = loop {
            let conn = kit
                .links
                .dial(addr, peer, &mid, transfer)
                .await
                .map_err(|e| format!("migration {mid}: {e}"))?;
            let result = match transfer {
                Transfer::Postcopy => {
                    run_source_postcopy_quic(&conn, kit.criu.clone(), &config, &progress)
                        .await
                        .map(Sent::Postcopy)
                }
                Transfer::Precopy => {
                    run_source_quic(&conn, kit.criu.clone(), &NoSourceHooks, &config, &progress)
                        .await
                        .map(Sent::Precopy)
                }
            };
            match result {
                // Nothing was dumped before the target's ready: dialling again is safe.
                Err(e)
                    if e.phase() == Phase::Prepare
                        && peer_close_reason(&e).is_some_and(|r| says_not_expected(&r))
                        && Instant::now() < deadline =>
                {
                    info!(migration_id = %mid, peer, "target does not expect the migration yet; dialling again");
                    tokio::time::sleep(REDIAL_PAUSE).await;
                }
                other => break other,
            }
        };
        remove_dir_quietly(work_dir).await;
        match result {
            Ok(Sent::Postcopy(outcome)) => {
                info!(
                    instance_id = %id,
                    migration_id = %mid,
                    downtime_ms = outcome.downtime.as_millis() as u64,
                    pages_done_ms = outcome.pages_done_after.map(|d| d.as_millis() as u64),
                    pages_error = outcome.pages_error.as_deref(),
                    images_bytes = outcome.images_bytes,
                    rounds = 1,
                    pages_sent = outcome.relay.pages,
                    page_bytes = outcome.relay.page_bytes,
                    bytes_sent = outcome.total_bytes_sent(),
                    uncounted_streams = outcome.relay.uncounted,
                    target_prepare_ms = outcome.target.prepare_ms,
                    target_restore_ms = outcome.target.restore_ms,
                    target_adopt_ms = outcome.target.adopt_ms,
                    "instance sent by post-copy: the target runs it"
                );
                // Once the target ran it, the copy here is the target's page source only: it
                // goes whether the pages all arrived (the target has them) or not (the target
                // kills its copy too, its restart policy brings it back, and the job fails).
                Ok(SentAway {
                    pages_failed: outcome.pages_error.map(|e| {
                        format!("post-copy: the memory did not all reach node {peer}: {e}")
                    }),
                })
            }
            Ok(Sent::Precopy(outcome)) => {
                info!(
                    instance_id = %id,
                    migration_id = %mid,
                    rounds = outcome.rounds.len(),
                    pages_sent = outcome.pages_sent,
                    bytes_sent = outcome.bytes_sent,
                    downtime_ms = outcome.downtime.as_millis() as u64,
                    final_dump_ms = outcome.rounds.last().map_or(0, |r| r.dump.as_millis() as u64),
                    target_images_ms = outcome.target.images_ms,
                    target_prepare_ms = outcome.target.prepare_ms,
                    target_restore_ms = outcome.target.restore_ms,
                    target_adopt_ms = outcome.target.adopt_ms,
                    "instance sent: the target runs it, the copy here stays frozen until removed"
                );
                Ok(SentAway::default())
            }
            Err(e) => Err(format!("migration {mid} to node {peer}: {e}")),
        }
    }

    /// What an `auto` order becomes for this container: its processes' write rate measured
    /// (they keep running), then `policy`'s rule. A measurement that fails chooses pre-copy,
    /// which copes with any rate.
    async fn choose_mode(
        &self,
        id: &str,
        pid: i32,
        policy: AutoPolicy,
    ) -> (MigrationMode, Option<write_rate::WriteRate>) {
        let runtime = self.runtime.clone();
        let state_id = id.to_owned();
        let measured = off_thread("migrate: measure the write rate", move || {
            let dirs = crate::runtime::cgroup::container_dirs(runtime.cgroup_parent(), &state_id);
            let mut pids = crate::runtime::cgroup::pids(&dirs);
            if !pids.contains(&pid) {
                pids.push(pid);
            }
            write_rate::measure(&pids, policy.window, policy.max_sample_pages)
                .map_err(|e| e.to_string())
        })
        .await;
        match measured {
            Ok(rate) => {
                let mode = if policy.prefers_postcopy(&rate) {
                    MigrationMode::Postcopy
                } else {
                    MigrationMode::Precopy
                };
                info!(
                    instance_id = %id,
                    write_rate_mib_s = rate.mib_per_sec(),
                    resident_mib = (rate.resident_pages * write_rate::PAGE as u64) >> 20,
                    sampled_pages = rate.sampled_pages,
                    changed_pages = rate.changed_pages,
                    took_ms = rate.took.as_millis() as u64,
                    postcopy_below_mib_s = policy.postcopy_below_mib_s,
                    precopy_max_resident_mib = policy.precopy_max_resident_mib,
                    ?mode,
                    "auto migration: mode chosen by the write rate"
                );
                (mode, Some(rate))
            }
            Err(error) => {
                warn!(instance_id = %id, %error, "auto migration: write rate not measured; pre-copy");
                (MigrationMode::Precopy, None)
            }
        }
    }

    /// The target's side of [`crate::reconcile::Host::migrate_in`].
    pub(super) async fn receive_instance(
        &self,
        spec: &InstanceSpec,
        order: &MigrationOrder,
        progress: ProgressSink,
    ) -> Result<Started, String> {
        let started = Instant::now();
        let kit = self.kit()?;
        let id = spec.instance_id.clone();
        let mid = order.migration_id.clone();
        check_migration_id(&mid)?;
        let peer = order.peer_node_id.as_str();
        // First of all: the source dials as soon as it has its order.
        let expecting = kit
            .links
            .expect(&mid, peer)
            .map_err(|e| format!("migration {mid}: {e}"))?;
        // The image arrives while pre-copy runs, so the restore does not wait for it.
        let pull = {
            let (images, reference) = (self.images.clone(), spec.image.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let image = images
                    .pull(&reference)
                    .await
                    .map_err(|e| format!("pull {reference}: {e}"))?;
                Ok::<_, String>((image, ms(t)))
            })
        };

        let dir = absolute(&self.instance_dir(&id))?;
        if dir.exists() {
            // Whatever an earlier attempt left, as a start does.
            self.teardown(spec, false).await?;
        }
        let staging_dir = dir.join(format!("migrate-in-{mid}"));
        remove_dir_quietly(staging_dir.clone()).await;
        let free = free_disk(&self.instances_dir);
        let config = TargetConfig {
            migration_id: mid.clone(),
            instance_id: id.clone(),
            staging_dir: staging_dir.clone(),
            max_bytes: staging_budget(spec.memory_bytes, free),
            chown: true,
            timeouts: Timeouts::default(),
            max_payload: DEFAULT_MAX_PAYLOAD,
        };
        info!(instance_id = %id, migration_id = %mid, peer, max_bytes = config.max_bytes, "expecting instance");

        let arrived = expecting
            .arrived(ARRIVAL_TIMEOUT)
            .await
            .map_err(|e| format!("migration {mid}: {e}"))
            .and_then(|arrived| {
                let ordered = match order.mode {
                    MigrationMode::Auto => arrived.transfer,
                    MigrationMode::Postcopy => Transfer::Postcopy,
                    MigrationMode::Precopy | MigrationMode::Stopcopy => Transfer::Precopy,
                };
                if arrived.transfer == ordered {
                    Ok(arrived)
                } else {
                    arrived.connection.close(
                        quinn::VarInt::from_u32(crate::migrate::session::CLOSE_FAILED),
                        b"transfer mode differs from the order",
                    );
                    Err(format!(
                        "migration {mid}: node {peer} sends it as {}, the order says {}",
                        arrived.transfer.as_str(),
                        ordered.as_str()
                    ))
                }
            });
        let transfer = arrived.as_ref().map_or(Transfer::Precopy, |a| a.transfer);
        // The target's reports say how it arrives too: an `auto` job's switch must know
        // whether memory is still to come, whichever node's report the hub hears first.
        let progress: ProgressSink = {
            let inner = progress;
            let choice = ModeChoice {
                mode: match transfer {
                    Transfer::Postcopy => MigrationMode::Postcopy,
                    Transfer::Precopy if order.mode == MigrationMode::Stopcopy => {
                        MigrationMode::Stopcopy
                    }
                    Transfer::Precopy => MigrationMode::Precopy,
                },
                write_rate_mib_s: None,
            };
            Arc::new(move |p: &MigrationProgress| {
                let mut p = *p;
                p.choice = Some(choice);
                inner(&p)
            })
        };
        let result = match arrived {
            Ok(crate::migrate::link::Arrived {
                connection: conn, ..
            }) => {
                let landing = Landing {
                    host: self,
                    kit,
                    spec,
                    pull: Mutex::new(Some(pull)),
                    state: Mutex::new(LandingState::default()),
                };
                let result = match transfer {
                    Transfer::Postcopy => {
                        run_target_postcopy_quic(
                            &conn,
                            kit.criu.clone(),
                            &landing,
                            &config,
                            &progress,
                        )
                        .await
                        // The pages keep arriving in the background; that task kills the
                        // container if they do not, and removes the staging dir. Once they
                        // all arrived the hub hears it from here too: with the source's own
                        // report, whichever comes first, it ends the job.
                        .map(|landed| {
                            let (progress, mid) = (progress.clone(), mid.clone());
                            tokio::spawn(async move {
                                match landed.pages.wait().await {
                                    Ok(after) => {
                                        info!(migration_id = %mid, since_restore_ms = after.as_millis() as u64, "memory complete");
                                        progress(&MigrationProgress {
                                            phase: Phase::Done,
                                            rounds: 1,
                                            bytes_sent: 0,
                                            pages_sent: 0,
                                            downtime_ms: None,
                                            choice: None,
                                            memory_complete: true,
                                        });
                                    }
                                    // The task killed the container: its exit and the source's
                                    // report tell the rest.
                                    Err(error) => {
                                        warn!(migration_id = %mid, %error, "post-copy memory incomplete")
                                    }
                                }
                            });
                            landed.outcome
                        })
                    }
                    Transfer::Precopy => {
                        run_target_quic(&conn, kit.criu.clone(), &landing, &config, &progress).await
                    }
                };
                let state = landing.take_state();
                result
                    .map(|outcome| (outcome, state))
                    .map_err(|e| format!("migration {mid} from node {peer}: {e}"))
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((outcome, state)) => {
                // Only the staging dir itself is left (its upper dir became the rootfs's); in
                // post-copy its images serve the daemon until the last page.
                if transfer != Transfer::Postcopy {
                    remove_dir_quietly(staging_dir).await;
                }
                let mut phases = state.phases;
                phases.insert("migrate".into(), ms(started));
                info!(
                    instance_id = %id,
                    migration_id = %mid,
                    pid = outcome.pid,
                    rounds = outcome.rounds,
                    pages_received = outcome.pages_received,
                    restore_ms = outcome.timings.restore_ms,
                    "instance received and running"
                );
                Ok(Started {
                    phases_ms: phases,
                    image_digest: state.digest,
                })
            }
            Err(reason) => {
                // The session cleaned up what it and `prepare` made (abort); this catches an
                // instance dir made before anything arrived, or a failed abort.
                if dir.exists() {
                    if let Err(cleanup) = self.teardown_with(spec, true, true).await {
                        warn!(instance_id = %id, %cleanup, "cleanup after failed migration failed too");
                        return Err(format!("{reason} (cleanup failed: {cleanup})"));
                    }
                }
                Err(reason)
            }
        }
    }
}

/// What a source's session gave.
enum Sent {
    Precopy(crate::migrate::session::SourceOutcome),
    Postcopy(crate::migrate::postcopy::PostcopySourceOutcome),
}

/// The target's [`TargetHost`]: the restore's rootfs, network namespace, log pipes and cgroup.
struct Landing<'a> {
    host: &'a NodeHost,
    kit: &'a MigrationKit,
    spec: &'a InstanceSpec,
    /// The pull started when the migration was expected.
    pull: Mutex<Option<PullTask>>,
    state: Mutex<LandingState>,
}

/// The image pull of a migration target: the image and the pull's milliseconds.
type PullTask = tokio::task::JoinHandle<Result<(PulledImage, f64), String>>;

#[derive(Default)]
struct LandingState {
    /// Holds the network namespace until the restored tree is in it.
    holder: Option<NetnsHolder>,
    /// The image digest, once pulled.
    digest: String,
    /// Milliseconds per phase of the preparation.
    phases: HashMap<String, f64>,
    /// The runtime took the restored container over.
    adopted: bool,
}

impl Landing<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, LandingState> {
        // Plain field updates: a panicking holder cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_state(&self) -> LandingState {
        std::mem::take(&mut *self.lock())
    }

    fn phase(&self, name: &str, t: Instant) {
        self.lock().phases.insert(name.to_owned(), ms(t));
    }

    async fn image(&self) -> Result<PulledImage, String> {
        let pull = self
            .pull
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or("the image pull was already consumed")?;
        let (image, pull_ms) = pull
            .await
            .map_err(|e| format!("pull: task failed: {e}"))??;
        self.lock().phases.insert("pull".into(), pull_ms);
        Ok(image)
    }

    async fn prepare_plan(&self, received: &Received) -> Result<RestorePlan, String> {
        let host = self.host;
        let spec = self.spec;
        let id = spec.instance_id.clone();
        let dir = absolute(&host.instance_dir(&id))?;
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        write_record(&dir, spec)?;

        let image = self.image().await?;
        write_image_facts(
            &dir,
            &ImageFacts {
                digest: image.digest.clone(),
                stop_signal: image.config.stop_signal.clone(),
            },
        )?;
        self.lock().digest = image.digest.clone();

        // The received upper dir becomes the rootfs's writable layer as it is.
        let t = Instant::now();
        let images = host.images.clone();
        let (upper, rootfs_dir) = (received.upper_dir.clone(), dir.clone());
        let rootfs = off_thread("rootfs", move || {
            let target = ImageStore::upper_dir(&rootfs_dir);
            if let Some(received) = upper {
                match std::fs::remove_dir_all(&target) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("remove {}: {e}", target.display())),
                }
                std::fs::rename(&received, &target).map_err(|e| {
                    format!("move {} to {}: {e}", received.display(), target.display())
                })?;
            }
            let rootfs = images
                .mount_rootfs(&image, &rootfs_dir)
                .map_err(|e| e.to_string())?;
            // CRIU wants the root without symlinks.
            rootfs
                .canonicalize()
                .map_err(|e| format!("resolve {}: {e}", rootfs.display()))
        })
        .await?;
        let resolv_conf = write_resolv_conf(&dir, spec)?;
        let external_mounts =
            external_mount_sources(&received.metadata.external_mounts, &resolv_conf)?;
        // A restored container has no bundle: what its next dump must mark external is kept
        // beside its record.
        write_external_mounts(&dir, &received.metadata.external_mounts)?;
        self.phase("rootfs", t);

        let t = Instant::now();
        let exe = self.kit.exe.clone();
        let holder = off_thread("netns holder", move || {
            NetnsHolder::spawn(&exe).map_err(|e| e.to_string())
        })
        .await?;
        let (holder_pid, netns) = (holder.pid(), holder.netns_path());
        // Kept before anything else can fail, so the namespace goes with the attempt.
        self.lock().holder = Some(holder);
        host.plug_in(spec, holder_pid).await?;
        self.phase("network", t);

        let wanted = pipes_to_replace(&received.metadata.stdio);
        let stdio = if wanted.iter().any(|w| *w) {
            let (shim_id, log) = (id.clone(), dir.join("container.log"));
            let (stdout, stderr) = host
                .blocking("log shim", move |rt| rt.spawn_log_shim(&shim_id, &log))
                .await?;
            [
                None,
                wanted[1].then_some(stdout),
                wanted[2].then_some(stderr),
            ]
        } else {
            warn!(instance_id = %id, stdio = ?received.metadata.stdio, "the dumped init's output was no pipe: its output is not logged");
            [None, None, None]
        };
        Ok(RestorePlan {
            rootfs,
            netns: Some(netns),
            stdio,
            cgroup_root: Some(format!("/{}/{}", host.runtime.cgroup_parent(), id)),
            external_mounts,
            tcp_established: true,
            timeout: RESTORE_TIMEOUT,
        })
    }

    async fn adopt_restored(&self, report: &RestoreReport) -> Result<(), String> {
        let host = self.host;
        let spec = self.spec;
        let (id, pid) = (spec.instance_id.clone(), report.pid);
        let (cpu, memory) = (spec.cpu_millis, spec.memory_bytes);
        let cgroup2 = host.cgroup2.clone();
        host.blocking("adopt", move |rt| {
            rt.adopt_restored(&id, pid)?;
            rt.set_limits(&id, cpu, memory)?;
            if let Some(cgroup2) = &cgroup2 {
                // Service routing sees only sockets of processes in the node's cgroup2 subtree;
                // the restored tree is more than its init, so every process joins (CRIU put them
                // there already when the source had them there; this makes sure). A process that
                // exited since it was listed (a shell's short-lived child) needs no moving.
                let dirs = crate::runtime::cgroup::container_dirs(rt.cgroup_parent(), &id);
                let mut pids = crate::runtime::cgroup::pids(&dirs);
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
                for p in pids {
                    match crate::runtime::cgroup::join_cgroup2(cgroup2, rt.cgroup_parent(), &id, p)
                    {
                        Err(crate::runtime::RuntimeError::Io { source, .. })
                            if p != pid && source.raw_os_error() == Some(libc::ESRCH) => {}
                        other => other?,
                    }
                }
            }
            Ok(())
        })
        .await?;
        // The restored tree keeps the namespace now.
        let holder = {
            let mut state = self.lock();
            state.adopted = true;
            state.holder.take()
        };
        if let Some(holder) = holder {
            let _ = tokio::task::spawn_blocking(move || drop(holder)).await;
        }
        Ok(())
    }
}

impl TargetHost for Landing<'_> {
    async fn prepare(&self, received: &Received) -> Result<RestorePlan, HookError> {
        self.prepare_plan(received).await.map_err(HookError::from)
    }

    async fn adopt(&self, restored: &RestoreReport) -> Result<(), HookError> {
        self.adopt_restored(restored).await.map_err(HookError::from)
    }

    async fn abort(&self, restored_pid: Option<i32>) {
        let spec = self.spec;
        let (holder, adopted) = {
            let mut state = self.lock();
            (state.holder.take(), state.adopted)
        };
        if let Some(pid) = restored_pid {
            // Never two live copies: the source resumes, this one goes before anything else.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(holder) = holder {
            let _ = tokio::task::spawn_blocking(move || drop(holder)).await;
        }
        if let Err(error) = self.host.teardown_with(spec, true, true).await {
            warn!(instance_id = %spec.instance_id, %error, "cleaning up a failed migration failed");
        }
        if let (Some(pid), false) = (restored_pid, adopted) {
            // Our child (CRIU restores as a sibling), unknown to the runtime's reaper.
            let _ = tokio::task::spawn_blocking(move || reap(pid, Duration::from_secs(5))).await;
        }
    }
}

/// Waits up to `timeout` for child `pid` (killed) to exit, and collects it.
fn reap(pid: i32, timeout: Duration) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let deadline = Instant::now() + timeout;
    let pid = nix::unistd::Pid::from_raw(pid);
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(WaitStatus::StillAlive) => {
                warn!(pid = pid.as_raw(), "killed restored process did not exit");
                return;
            }
            _ => return,
        }
    }
}

/// Runs `f` on the blocking pool.
async fn off_thread<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("{what}: task failed: {e}"))?
        .map_err(|e| format!("{what}: {e}"))
}

/// Removes `dir` and what it holds, logging failures other than its absence.
async fn remove_dir_quietly(dir: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(error) = std::fs::remove_dir_all(&dir) {
            if error.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %dir.display(), %error, "cannot remove a migration work dir");
            }
        }
    })
    .await;
}

fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("resolve {}: {e}", path.display()))
}

/// Free bytes for unprivileged use on the filesystem of `path`, if it can be asked.
fn free_disk(path: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(path).ok()?;
    // The field types differ between platforms.
    #[allow(clippy::unnecessary_cast)]
    let (blocks, size) = (stat.blocks_available() as u64, stat.fragment_size() as u64);
    Some(blocks.saturating_mul(size))
}

/// Migration ids go into directory names: only what the hub makes (`mig-` + hex) passes.
fn check_migration_id(id: &str) -> Result<(), String> {
    if crate::migrate::link::is_valid_id(id) {
        Ok(())
    } else {
        Err(format!(
            "migration id {id:?} is not one (1-64 characters of a-z, 0-9, '-')"
        ))
    }
}

/// Most bytes a migration may stage on this node: twice the memory limit (the page store, the
/// images written from it) plus room for the other images and the upper dir, and never more
/// than the disk has free beyond a reserve. An unlimited container is bounded by the disk alone.
fn staging_budget(memory_bytes: u64, free_disk: Option<u64>) -> u64 {
    let by_memory = match memory_bytes {
        0 => u64::MAX,
        m => m.saturating_mul(2).saturating_add(STAGING_ALLOWANCE),
    };
    let by_disk = free_disk.map_or(u64::MAX, |free| free.saturating_sub(DISK_RESERVE));
    by_memory.min(by_disk)
}

/// Which of the dumped init's fds 0, 1, 2 get the log shim's pipes: stdout and stderr when they
/// were pipes (the source's shim). stdin never (it reads /dev/null), nor a stderr that was the
/// same pipe as stdout (one replacement per pipe).
fn pipes_to_replace(stdio: &[String]) -> [bool; 3] {
    let pipe = |n: usize| stdio.get(n).filter(|s| s.starts_with("pipe:["));
    let out = pipe(1).is_some();
    let err = pipe(2).is_some_and(|e| pipe(1) != Some(e));
    [false, out, err]
}

/// Host paths for the dump's external mounts: the container's `resolv.conf` is the only kind
/// berth makes; anything else cannot be restored here.
fn external_mount_sources(
    keys: &[String],
    resolv_conf: &Path,
) -> Result<Vec<(String, PathBuf)>, String> {
    keys.iter()
        .map(|key| match key.as_str() {
            RESOLV_CONF => Ok((key.clone(), resolv_conf.to_owned())),
            other => Err(format!(
                "the container has an external mount at {other} this node cannot provide"
            )),
        })
        .collect()
}

/// The reason a peer gave for closing the connection, found in `err`'s chain (quinn's errors,
/// also inside the `io::Error`s of its streams). The connection itself cannot tell once the
/// session closed it too: quinn then reports the local close.
fn peer_close_reason(err: &(dyn std::error::Error + 'static)) -> Option<Vec<u8>> {
    let mut next = Some(err);
    // Chains are short; the bound only guards against a cycle.
    for _ in 0..16 {
        let e = next?;
        if let Some(quinn::ConnectionError::ApplicationClosed(close)) =
            e.downcast_ref::<quinn::ConnectionError>()
        {
            return Some(close.reason.to_vec());
        }
        // An io::Error's `source` skips the error it wraps: look at that one too.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(reason) = peer_close_reason(inner) {
                return Some(reason);
            }
        }
        next = e.source();
    }
    None
}

/// Whether a close reason says the target did not expect this migration from this node (yet).
fn says_not_expected(reason: &[u8]) -> bool {
    reason
        .windows(NOT_EXPECTED_REASON.len())
        .any(|w| w == NOT_EXPECTED_REASON)
}

/// Where a restored container's external mount points are kept (it has no bundle
/// `config.json` to read them from).
const EXTERNAL_MOUNTS_FILE: &str = "external-mounts.json";

/// The bind mounts of container `id` a dump must mark external: from its bundle when the runtime
/// created it, else from what its restore recorded (it came here by migration).
fn external_mounts_of(
    runtime: &crate::runtime::Runtime,
    id: &str,
    instance_dir: &Path,
) -> Result<Vec<String>, String> {
    let config = runtime.bundle_dir(id).join("config.json");
    if config.exists() {
        return bind_mount_points(&config).map_err(|e| e.to_string());
    }
    let recorded = instance_dir.join(EXTERNAL_MOUNTS_FILE);
    let bytes = std::fs::read(&recorded).map_err(|e| {
        format!(
            "instance {id} has neither {} nor {}: {e}",
            config.display(),
            recorded.display()
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", recorded.display()))
}

fn write_external_mounts(instance_dir: &Path, mounts: &[String]) -> Result<(), String> {
    let path = instance_dir.join(EXTERNAL_MOUNTS_FILE);
    let bytes = serde_json::to_vec(mounts).map_err(|e| format!("encode external mounts: {e}"))?;
    std::fs::write(&path, bytes).map_err(|e| format!("write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hub_made_migration_ids_become_paths() {
        assert!(check_migration_id("mig-0123456789ab").is_ok());
        for bad in ["", "../x", "mig/1", "MIG-1", "mig 1", &"a".repeat(65)] {
            assert!(check_migration_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_budget_follows_memory_and_is_capped_by_the_disk() {
        let gib = 1u64 << 30;
        assert_eq!(staging_budget(gib, None), 2 * gib + STAGING_ALLOWANCE);
        assert_eq!(
            staging_budget(gib, Some(100 * gib)),
            2 * gib + STAGING_ALLOWANCE
        );
        assert_eq!(staging_budget(gib, Some(3 * gib)), 3 * gib - DISK_RESERVE);
        assert_eq!(staging_budget(0, Some(10 * gib)), 10 * gib - DISK_RESERVE);
        assert_eq!(staging_budget(0, Some(1)), 0, "a full disk takes nothing");
        assert_eq!(staging_budget(u64::MAX, None), u64::MAX);
    }

    #[test]
    fn stdout_and_stderr_pipes_are_replaced_but_never_stdin() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            pipes_to_replace(&s(&["/dev/null", "pipe:[11]", "pipe:[12]"])),
            [false, true, true]
        );
        assert_eq!(
            pipes_to_replace(&s(&["pipe:[10]", "pipe:[11]", "pipe:[11]"])),
            [false, true, false],
            "one replacement per pipe"
        );
        assert_eq!(
            pipes_to_replace(&s(&["/dev/null", "/var/log/x", "pipe:[12]"])),
            [false, false, true]
        );
        assert_eq!(pipes_to_replace(&[]), [false, false, false]);
    }

    #[test]
    fn resolv_conf_is_the_only_external_mount_mapped() {
        let resolv = Path::new("/data/instances/ins-1/resolv.conf");
        assert_eq!(
            external_mount_sources(&["/etc/resolv.conf".into()], resolv).unwrap(),
            vec![("/etc/resolv.conf".to_owned(), resolv.to_owned())]
        );
        assert!(external_mount_sources(&[], resolv).unwrap().is_empty());
        let err = external_mount_sources(&["/etc/hosts".into()], resolv).unwrap_err();
        assert!(err.contains("/etc/hosts"), "{err}");
    }

    #[test]
    fn only_the_not_expected_close_is_redialled() {
        use crate::migrate::session::SessionError;
        use crate::migrate::wire::WireError;
        let closed = |reason: &'static [u8]| {
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: quinn::VarInt::from_u32(1),
                reason: reason.into(),
            })
        };
        // As the session sees it: a read of the control stream lost the connection.
        let in_stream = |conn: quinn::ConnectionError| SessionError::Wire {
            phase: Phase::Prepare,
            source: WireError::Stream(std::io::Error::from(quinn::ReadError::ConnectionLost(conn))),
        };
        let redial = |e: &SessionError| peer_close_reason(e).is_some_and(|r| says_not_expected(&r));
        assert!(redial(&in_stream(closed(
            b"migration not expected from this node"
        ))));
        assert!(redial(&SessionError::Connection {
            phase: Phase::Prepare,
            source: closed(b"migration not expected from this node"),
        }));
        assert!(!redial(&in_stream(closed(b"migration no longer expected"))));
        assert!(!redial(&in_stream(closed(b"migration failed"))));
        assert!(!redial(&in_stream(quinn::ConnectionError::TimedOut)));
        assert!(!redial(&SessionError::Connection {
            phase: Phase::Prepare,
            source: quinn::ConnectionError::LocallyClosed,
        }));
    }
}
