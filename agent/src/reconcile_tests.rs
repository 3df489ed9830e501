//! Reconciler logic on a fake host: no root, no kernel.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use berth_proto::v1::{ExecProbe, HttpProbe, NetworkAttachment, TcpProbe};

use super::*;

#[derive(Default)]
struct FakeState {
    running: HashSet<String>,
    starts: Vec<String>,
    /// Specs of every start, in order (restart generation, stop settings).
    started_specs: Vec<InstanceSpec>,
    halts: Vec<String>,
    stops: Vec<String>,
    /// Instance ids whose next start fails.
    fail_next_start: HashSet<String>,
    /// Instance ids whose next halt fails.
    fail_next_halt: HashSet<String>,
    exits: Vec<(String, i32)>,
    recovered: Vec<Recovered>,
    saved_restarts: Vec<(String, u32)>,
    /// Migrations carried out: (instance, migration id), each side.
    migrated_out: Vec<(String, String)>,
    migrated_in: Vec<(String, String)>,
    /// Instance ids whose next migration (either side) fails.
    fail_next_migration: HashSet<String>,
    /// Instance ids whose next send succeeds but whose post-copy memory then does not arrive.
    pages_fail_next: HashSet<String>,
    /// Frozen copies taken back.
    resumed: Vec<String>,
}

/// Whether each instance's (fake) probe passes; absent = passes.
type ProbeVerdicts = Arc<Mutex<HashMap<String, bool>>>;

#[derive(Default)]
struct FakeHost {
    state: Mutex<FakeState>,
    probes: ProbeVerdicts,
}

impl FakeHost {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake host lock")
    }

    fn set_probe(&self, id: &str, passes: bool) {
        self.probes
            .lock()
            .expect("probe lock")
            .insert(id.into(), passes);
    }
}

/// A probe that passes or fails as the test says, at once.
struct FakeCheck {
    id: String,
    verdicts: ProbeVerdicts,
}

impl Check for FakeCheck {
    fn run(&self, _timeout: Duration) -> crate::health::BoxCheckFuture {
        let passes = self
            .verdicts
            .lock()
            .expect("probe lock")
            .get(&self.id)
            .copied()
            .unwrap_or(true);
        Box::pin(async move {
            if passes {
                Ok("status 200".to_owned())
            } else {
                Err("status 500".to_owned())
            }
        })
    }

    fn describe(&self) -> String {
        format!("fake probe of {}", self.id)
    }
}

impl Host for FakeHost {
    async fn start(
        &self,
        spec: &InstanceSpec,
        progress: Box<dyn Fn(InstanceStatus) + Send + Sync>,
    ) -> Result<Started, String> {
        progress(InstanceStatus::Pulling);
        progress(InstanceStatus::Creating);
        let mut s = self.state();
        s.starts.push(spec.instance_id.clone());
        s.started_specs.push(spec.clone());
        if s.fail_next_start.remove(&spec.instance_id) {
            return Err("pull failed: registry unreachable".into());
        }
        s.running.insert(spec.instance_id.clone());
        Ok(Started {
            phases_ms: HashMap::from([("pull".to_string(), 1.0)]),
            image_digest: DIGEST.into(),
        })
    }

    async fn halt(&self, spec: &InstanceSpec) -> Result<(), String> {
        let mut s = self.state();
        s.halts.push(spec.instance_id.clone());
        if s.fail_next_halt.remove(&spec.instance_id) {
            return Err("kill: container still has processes".into());
        }
        s.running.remove(&spec.instance_id);
        Ok(())
    }

    async fn stop(&self, spec: &InstanceSpec) -> Result<(), String> {
        let mut s = self.state();
        s.stops.push(spec.instance_id.clone());
        s.running.remove(&spec.instance_id);
        Ok(())
    }

    fn liveness(&self, id: &str) -> Liveness {
        if self.state().running.contains(id) {
            Liveness::Running
        } else {
            Liveness::Unknown
        }
    }

    fn save_restarts(&self, id: &str, restarts: u32) {
        self.state().saved_restarts.push((id.into(), restarts));
    }

    fn reap(&self) -> Vec<(String, i32)> {
        let mut s = self.state();
        let exits = std::mem::take(&mut s.exits);
        for (id, _) in &exits {
            s.running.remove(id);
        }
        exits
    }

    fn recover(&self) -> Vec<Recovered> {
        std::mem::take(&mut self.state().recovered)
    }

    async fn migrate_out(
        &self,
        spec: &InstanceSpec,
        order: &MigrationOrder,
        progress: ProgressSink,
    ) -> Result<crate::reconcile::SentAway, String> {
        progress(&fake_progress(crate::migrate::session::Phase::Precopy));
        let mut s = self.state();
        let id = spec.instance_id.clone();
        s.migrated_out
            .push((id.clone(), order.migration_id.clone()));
        if s.fail_next_migration.remove(&id) {
            return Err("target gone".into());
        }
        // Frozen, not gone: the stop removes it.
        Ok(crate::reconcile::SentAway {
            pages_failed: s
                .pages_fail_next
                .remove(&id)
                .then(|| "pages lost".to_owned()),
        })
    }

    async fn resume_migrated(&self, spec: &InstanceSpec) -> Result<(), String> {
        self.state().resumed.push(spec.instance_id.clone());
        Ok(())
    }

    async fn migrate_in(
        &self,
        spec: &InstanceSpec,
        order: &MigrationOrder,
        progress: ProgressSink,
    ) -> Result<Started, String> {
        progress(&fake_progress(crate::migrate::session::Phase::Restore));
        let mut s = self.state();
        let id = spec.instance_id.clone();
        s.migrated_in.push((id.clone(), order.migration_id.clone()));
        if s.fail_next_migration.remove(&id) {
            return Err("restore failed".into());
        }
        s.running.insert(id);
        Ok(Started {
            phases_ms: HashMap::from([("migrate".to_string(), 2.0)]),
            image_digest: DIGEST.into(),
        })
    }

    fn probe_check(
        &self,
        spec: &InstanceSpec,
        _probe: &ProbeSpec,
    ) -> Result<Arc<dyn Check>, String> {
        Ok(Arc::new(FakeCheck {
            id: spec.instance_id.clone(),
            verdicts: self.probes.clone(),
        }))
    }
}

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn assignment(id: &str) -> Assignment {
    Assignment {
        instance_id: id.into(),
        container_id: "ctr-1".into(),
        image: "reg:5000/demo/httpd:1".into(),
        cpu_millis: 500,
        memory_bytes: 64 << 20,
        network: Some(NetworkAttachment {
            vni: 4096,
            encrypted: false,
            network_id: "net-1".into(),
            name: "payments".into(),
            cidr: "10.10.0.0/16".into(),
            gateway: "10.10.0.1".into(),
        }),
        ip: "10.10.0.2".into(),
        ..Default::default()
    }
}

fn desired(ids: &[&str]) -> DesiredState {
    DesiredState {
        network_view: None,
        assignments: ids.iter().map(|id| assignment(id)).collect(),
        revision: 1,
        stopping: Vec::new(),
    }
}

struct Harness {
    host: Arc<FakeHost>,
    desired_tx: watch::Sender<Option<DesiredState>>,
    children_tx: mpsc::UnboundedSender<()>,
    reports: mpsc::UnboundedReceiver<Report>,
    board: InstanceBoard,
    prober: Arc<Prober>,
}

fn harness(host: FakeHost) -> Harness {
    let host = Arc::new(host);
    let (reports_tx, reports) = mpsc::unbounded_channel();
    let (desired_tx, desired_rx) = watch::channel(None);
    let (children_tx, children_rx) = mpsc::unbounded_channel();
    let board = InstanceBoard::new();
    let prober = Arc::new(Prober::new());
    let rec = Reconciler::new(host.clone(), reports_tx)
        .with_board(board.clone())
        .with_prober(prober.clone());
    tokio::spawn(rec.run(desired_rx, children_rx));
    Harness {
        host,
        desired_tx,
        children_tx,
        reports,
        board,
        prober,
    }
}

impl Harness {
    /// Collects reports until `pred` holds for the collected list (bounded by a paused-clock timeout).
    async fn until(&mut self, mut pred: impl FnMut(&[Report]) -> bool) -> Vec<Report> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !pred(&seen) {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some(r)) => seen.push(r),
                _ => panic!("condition not reached; reports so far: {seen:?}"),
            }
        }
        seen
    }
}

fn is_status(r: &Report, id: &str, status: InstanceStatus) -> bool {
    matches!(r, Report::Status(s) if s.instance_id == id && s.status == status as i32)
}

/// A reconciler with `id` desired and reported RUNNING.
async fn running(id: &str) -> Harness {
    let mut h = harness(FakeHost::default());
    h.desired_tx.send_replace(Some(desired(&[id])));
    h.until(|rs| rs.iter().any(|r| is_status(r, id, InstanceStatus::Running)))
        .await;
    h
}

/// `id` was reported FAILED and, later, RUNNING again.
fn failed_then_running(rs: &[Report], id: &str) -> bool {
    let failed = rs
        .iter()
        .position(|r| is_status(r, id, InstanceStatus::Failed));
    failed.is_some_and(|f| {
        rs[f..]
            .iter()
            .any(|r| is_status(r, id, InstanceStatus::Running))
    })
}

#[tokio::test(start_paused = true)]
async fn starts_what_is_desired_and_reports_progress_then_running() {
    let mut h = harness(FakeHost::default());
    h.desired_tx
        .send_replace(Some(desired(&["ins-a", "ins-b"])));
    let seen = h
        .until(|rs| {
            ["ins-a", "ins-b"]
                .iter()
                .all(|id| rs.iter().any(|r| is_status(r, id, InstanceStatus::Running)))
        })
        .await;
    let pulling = seen
        .iter()
        .position(|r| is_status(r, "ins-a", InstanceStatus::Pulling));
    let running = seen
        .iter()
        .position(|r| is_status(r, "ins-a", InstanceStatus::Running));
    assert!(
        pulling < running && pulling.is_some(),
        "PULLING precedes RUNNING: {seen:?}"
    );
    let phases = seen.iter().find_map(|r| match r {
        Report::Status(s) if s.status == InstanceStatus::Running as i32 => {
            Some(s.phases_ms.clone())
        }
        _ => None,
    });
    assert_eq!(phases.and_then(|p| p.get("pull").copied()), Some(1.0));
    assert_eq!(h.host.state().starts.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn stops_what_is_no_longer_desired_and_reports_removed() {
    let mut h = harness(FakeHost::default());
    h.desired_tx
        .send_replace(Some(desired(&["ins-a", "ins-b"])));
    h.until(|rs| {
        rs.iter()
            .filter(
                |r| matches!(r, Report::Status(s) if s.status == InstanceStatus::Running as i32),
            )
            .count()
            == 2
    })
    .await;
    h.desired_tx.send_replace(Some(desired(&["ins-a"])));
    h.until(|rs| rs.contains(&Report::Removed("ins-b".into())))
        .await;
    let s = h.host.state();
    assert_eq!(s.stops, vec!["ins-b".to_string()]);
    assert!(s.running.contains("ins-a"));
}

#[tokio::test(start_paused = true)]
async fn nothing_is_stopped_before_the_hub_has_spoken() {
    let host = FakeHost::default();
    host.state().running.insert("ins-old".into());
    host.state().recovered.push(Recovered {
        spec: InstanceSpec::try_from(assignment("ins-old")).expect("valid"),
        liveness: Liveness::Running,
        restarts: 0,
        image_digest: String::new(),
    });
    let h = harness(host);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(h.host.state().stops.is_empty());
    assert!(h.host.state().running.contains("ins-old"));
    drop(h.desired_tx);
}

#[tokio::test(start_paused = true)]
async fn recovered_running_instance_is_adopted_not_restarted() {
    let host = FakeHost::default();
    host.state().running.insert("ins-a".into());
    host.state().recovered.push(Recovered {
        spec: InstanceSpec::try_from(assignment("ins-a")).expect("valid"),
        liveness: Liveness::Running,
        restarts: 0,
        image_digest: String::new(),
    });
    let mut h = harness(host);
    h.desired_tx.send_replace(Some(desired(&["ins-a"])));
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
    })
    .await;
    assert!(
        h.host.state().starts.is_empty(),
        "adopted, not started again"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_start_is_reported_and_retried_with_backoff() {
    let host = FakeHost::default();
    host.state().fail_next_start.insert("ins-a".into());
    let mut h = harness(host);
    h.desired_tx.send_replace(Some(desired(&["ins-a"])));
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
        })
        .await;
    let failed = seen.iter().find_map(|r| match r {
        Report::Status(s) if s.status == InstanceStatus::Failed as i32 => Some(s.reason.clone()),
        _ => None,
    });
    assert!(
        failed
            .as_deref()
            .is_some_and(|r| r.contains("registry unreachable")),
        "{seen:?}"
    );
    assert_eq!(h.host.state().starts.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn exited_instance_is_reported_and_restarted() {
    let mut h = running("ins-a").await;
    h.host.state().exits.push(("ins-a".into(), 3));
    h.children_tx.send(()).expect("reconciler alive");
    let seen = h.until(|rs| failed_then_running(rs, "ins-a")).await;
    assert!(
        seen.iter()
            .any(|r| matches!(r, Report::Status(s) if s.reason.contains("exited with status 3"))),
        "{seen:?}"
    );
    assert_eq!(h.host.state().starts.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn invalid_assignment_is_reported_failed_and_not_started() {
    let mut h = harness(FakeHost::default());
    let mut bad = assignment("ins-bad");
    bad.ip = "10.99.0.5".into(); // outside the network
    h.desired_tx.send_replace(Some(DesiredState {
        network_view: None,
        assignments: vec![bad],
        revision: 1,
        stopping: Vec::new(),
    }));
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-bad", InstanceStatus::Failed))
        })
        .await;
    assert!(format!("{seen:?}").contains("ip"));
    assert!(h.host.state().starts.is_empty());
}

#[test]
fn restart_delay_doubles_and_caps() {
    assert_eq!(restart_delay(1), Duration::from_secs(1));
    assert_eq!(restart_delay(2), Duration::from_secs(2));
    assert_eq!(restart_delay(4), Duration::from_secs(8));
    assert_eq!(restart_delay(50), Duration::from_secs(30));
}

#[test]
fn assignment_validation_names_the_field() {
    let mut a = assignment("ins-a");
    a.network = None;
    assert!(InstanceSpec::try_from(a)
        .expect_err("must be rejected")
        .to_string()
        .contains("network"));
    let mut a = assignment("ins-a");
    a.ip = "10.10.0.1".into(); // the gateway
    assert!(InstanceSpec::try_from(a)
        .expect_err("must be rejected")
        .to_string()
        .contains("ip"));
}

#[tokio::test(start_paused = true)]
async fn a_vanished_process_is_found_by_the_probe_and_restarted() {
    // Not our child (adopted after an agent restart): no reap event, only the periodic probe sees it.
    let mut h = running("ins-a").await;
    h.host.state().running.remove("ins-a");
    let seen = h.until(|rs| failed_then_running(rs, "ins-a")).await;
    assert!(
        seen.iter()
            .any(|r| matches!(r, Report::Status(s) if s.reason.contains("exited with status -1"))),
        "{seen:?}"
    );
    assert_eq!(h.host.state().starts.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn stopping_instances_never_seen_are_reported_removed_at_once() {
    let mut h = running("ins-a").await;
    let mut state = desired(&["ins-a"]);
    state.stopping = vec!["ins-ghost".into(), "ins-a".into()];
    h.desired_tx.send_replace(Some(state));
    h.until(|rs| rs.contains(&Report::Removed("ins-ghost".into())))
        .await;
    let s = h.host.state();
    assert!(
        s.stops.is_empty(),
        "nothing to tear down for an unknown instance"
    );
    assert!(
        s.running.contains("ins-a"),
        "a stopping id that is also desired is left to the hub's next state"
    );
}

/// A harness running `id` with this restart policy.
async fn running_with(id: &str, policy: &str, max_restarts: u32) -> Harness {
    let mut h = harness(FakeHost::default());
    let mut a = assignment(id);
    a.restart_policy = policy.into();
    a.max_restarts = max_restarts;
    h.desired_tx.send_replace(Some(DesiredState {
        assignments: vec![a],
        ..desired(&[])
    }));
    h.until(|rs| rs.iter().any(|r| is_status(r, id, InstanceStatus::Running)))
        .await;
    h
}

fn reported_restarts(rs: &[Report]) -> Vec<u32> {
    rs.iter()
        .filter_map(|r| match r {
            Report::Status(s) => Some(s.restarts),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn restarts_are_counted_and_reported() {
    let mut h = running("ins-a").await;
    for round in 1..=2u32 {
        h.host.state().exits.push(("ins-a".into(), 0));
        h.children_tx.send(()).expect("reconciler alive");
        let seen = h
            .until(|rs| {
                rs.iter().any(|r| {
                    matches!(r, Report::Status(s) if s.status == InstanceStatus::Running as i32
                        && s.restarts == round)
                })
            })
            .await;
        assert!(reported_restarts(&seen).contains(&round), "{seen:?}");
    }
    assert_eq!(
        h.host.state().starts.len(),
        3,
        "always restarts, even after status 0"
    );
}

#[tokio::test(start_paused = true)]
async fn never_leaves_an_exited_instance_alone() {
    let mut h = running_with("ins-a", "never", 0).await;
    h.host.state().exits.push(("ins-a".into(), 1));
    h.children_tx.send(()).expect("reconciler alive");
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Failed))
        })
        .await;
    assert!(
        seen.iter()
            .any(|r| matches!(r, Report::Status(s) if s.reason == "exited with status 1")),
        "{seen:?}"
    );
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(h.host.state().starts.len(), 1, "never restarted");
    // Removing it still cleans it up.
    h.desired_tx.send_replace(Some(desired(&[])));
    h.until(|rs| {
        rs.iter()
            .any(|r| matches!(r, Report::Removed(id) if id == "ins-a"))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn on_failure_restarts_failures_up_to_the_limit_and_not_clean_exits() {
    let mut h = running_with("ins-a", "on-failure", 2).await;
    for round in 1..=2u32 {
        h.host.state().exits.push(("ins-a".into(), 7));
        h.children_tx.send(()).expect("reconciler alive");
        h.until(|rs| {
            rs.iter().any(|r| {
                matches!(r, Report::Status(s) if s.status == InstanceStatus::Running as i32
                    && s.restarts == round)
            })
        })
        .await;
    }
    h.host.state().exits.push(("ins-a".into(), 7));
    h.children_tx.send(()).expect("reconciler alive");
    let seen = h
        .until(|rs| {
            rs.iter().any(
                |r| matches!(r, Report::Status(s) if s.reason.contains("gave up after 2 restarts")),
            )
        })
        .await;
    assert!(!seen.is_empty());
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(h.host.state().starts.len(), 3);

    let mut h = running_with("ins-b", "on-failure", 0).await;
    h.host.state().exits.push(("ins-b".into(), 0));
    h.children_tx.send(()).expect("reconciler alive");
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-b", InstanceStatus::Stopped))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        h.host.state().starts.len(),
        1,
        "a clean exit is not a failure"
    );
}

#[test]
fn restart_policies_parse_and_decide() {
    assert_eq!(RestartPolicy::parse("", 0), Some(RestartPolicy::Always));
    assert_eq!(RestartPolicy::parse("bogus", 0), None);
    let on_failure = RestartPolicy::parse("on-failure", 3).unwrap();
    assert!(on_failure.restarts_after(1, 2));
    assert!(!on_failure.restarts_after(1, 3));
    assert!(!on_failure.restarts_after(0, 0));
    assert!(RestartPolicy::OnFailure { max_restarts: 0 }.restarts_after(1, 1000));
    assert!(!RestartPolicy::Never.restarts_after(1, 0));
    assert!(RestartPolicy::Always.restarts_after(0, 99));
    let mut a = assignment("ins-x");
    a.restart_policy = "sometimes".into();
    assert!(InstanceSpec::try_from(a).is_err());
}

#[tokio::test(start_paused = true)]
async fn a_recovered_instance_its_policy_left_exited_is_not_restarted() {
    let host = FakeHost::default();
    let mut a = assignment("ins-a");
    a.restart_policy = "never".into();
    host.state().recovered.push(Recovered {
        spec: InstanceSpec::try_from(a.clone()).expect("valid"),
        liveness: Liveness::Exited(1),
        restarts: 0,
        image_digest: String::new(),
    });
    let h = harness(host);
    h.desired_tx.send_replace(Some(DesiredState {
        assignments: vec![a],
        ..desired(&[])
    }));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        h.host.state().starts.is_empty(),
        "never restarted after adoption"
    );
}

// ---------------------------------------------------------------------------------------------
// Lifecycle: stop/start/restart on request, health probes, digests, the board
// ---------------------------------------------------------------------------------------------

fn send(h: &Harness, assignments: Vec<Assignment>) {
    h.desired_tx.send_replace(Some(DesiredState {
        assignments,
        ..desired(&[])
    }));
}

/// The statuses reported for `id`, in order.
fn statuses(rs: &[Report], id: &str) -> Vec<InstanceStatus> {
    rs.iter()
        .filter_map(|r| match r {
            Report::Status(s) if s.instance_id == id => InstanceStatus::try_from(s.status).ok(),
            _ => None,
        })
        .collect()
}

/// Whether `want` appears in `seen` in this order (other statuses may come between).
fn in_order(seen: &[InstanceStatus], want: &[InstanceStatus]) -> bool {
    let mut it = seen.iter();
    want.iter().all(|w| it.any(|s| s == w))
}

fn with_http_probe(mut a: Assignment, threshold: u32) -> Assignment {
    a.health = Some(HealthCheck {
        http: Some(HttpProbe {
            path: "/healthz".into(),
            port: 8080,
        }),
        interval: "2s".into(),
        timeout: "1s".into(),
        failure_threshold: threshold,
        ..Default::default()
    });
    a
}

#[test]
fn health_stop_signal_and_timeout_convert_with_defaults() {
    let spec = InstanceSpec::try_from(assignment("ins-a")).expect("valid");
    assert_eq!(spec.health, None);
    assert_eq!(spec.stop_signal, "");
    assert_eq!(spec.stop_timeout, Duration::from_secs(10), "0 means 10 s");
    assert!(!spec.stopped);

    let mut a = assignment("ins-a");
    a.health = Some(HealthCheck {
        tcp: Some(TcpProbe { port: 80 }),
        ..Default::default()
    });
    a.stop_signal = "QUIT".into();
    a.stop_timeout_ms = 2500;
    a.stopped = true;
    a.restart_generation = 4;
    a.revision = 7;
    let spec = InstanceSpec::try_from(a).expect("valid");
    let probe = spec.health.expect("probe");
    assert_eq!(probe.check, ProbeCheck::Tcp { port: 80 });
    assert_eq!(
        (
            probe.interval,
            probe.timeout,
            probe.failure_threshold,
            probe.start_period
        ),
        (
            Duration::from_secs(10),
            Duration::from_secs(1),
            3,
            Duration::ZERO
        ),
        "empty durations and a 0 threshold take the defaults"
    );
    assert_eq!(spec.stop_signal, "QUIT");
    assert_eq!(spec.stop_timeout, Duration::from_millis(2500));
    assert!(spec.stopped);
    assert_eq!((spec.restart_generation, spec.revision), (4, 7));

    let mut a = assignment("ins-a");
    a.health = Some(HealthCheck {
        exec: Some(ExecProbe {
            command: vec!["cat".into(), "/ok".into()],
        }),
        interval: "500ms".into(),
        timeout: "500ms".into(),
        start_period: "1m".into(),
        failure_threshold: 1,
        ..Default::default()
    });
    let probe = InstanceSpec::try_from(a)
        .expect("valid")
        .health
        .expect("probe");
    assert_eq!(probe.start_period, Duration::from_secs(60));
    assert_eq!(probe.interval, Duration::from_millis(500));
}

#[test]
fn invalid_health_or_stop_signal_is_rejected_naming_the_field() {
    type Change = Box<dyn Fn(&mut Assignment)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|a| {
                a.health = Some(HealthCheck::default());
            }),
            "exactly one of http, tcp, exec",
        ),
        (
            Box::new(|a| {
                a.health = Some(HealthCheck {
                    tcp: Some(TcpProbe { port: 0 }),
                    ..Default::default()
                });
            }),
            "health.tcp.port",
        ),
        (
            Box::new(|a| {
                a.health = Some(HealthCheck {
                    tcp: Some(TcpProbe { port: 80 }),
                    interval: "10".into(),
                    ..Default::default()
                });
            }),
            "health.interval",
        ),
        (
            Box::new(|a| {
                a.health = Some(HealthCheck {
                    http: Some(HttpProbe {
                        path: "healthz".into(),
                        port: 80,
                    }),
                    ..Default::default()
                });
            }),
            "health.http.path",
        ),
        (
            Box::new(|a| a.stop_signal = "SIGNOPE".into()),
            "stop_signal",
        ),
    ];
    for (change, field) in cases {
        let mut a = assignment("ins-a");
        change(&mut a);
        let e = InstanceSpec::try_from(a).expect_err(field).to_string();
        assert!(e.contains(field) && e.contains("ins-a"), "{field}: {e}");
    }
    for ok in ["SIGTERM", "TERM", "15"] {
        let mut a = assignment("ins-a");
        a.stop_signal = ok.into();
        InstanceSpec::try_from(a).expect(ok);
    }
}

#[test]
fn records_of_older_agents_load_with_defaults() {
    let spec = InstanceSpec::try_from(assignment("ins-a")).expect("valid");
    let mut json = serde_json::to_value(&spec).expect("encode");
    let obj = json.as_object_mut().expect("object");
    for new in [
        "health",
        "stop_signal",
        "stop_timeout",
        "stopped",
        "restart_generation",
        "revision",
    ] {
        assert!(obj.remove(new).is_some(), "{new} is recorded");
    }
    let old: InstanceSpec = serde_json::from_value(json).expect("old record loads");
    assert_eq!(old, spec);
    assert_eq!(old.stop_timeout, Duration::from_secs(10));

    let mut probed = assignment("ins-b");
    probed = with_http_probe(probed, 2);
    let spec = InstanceSpec::try_from(probed).expect("valid");
    let back: InstanceSpec =
        serde_json::from_slice(&serde_json::to_vec(&spec).expect("encode")).expect("decode");
    assert_eq!(back, spec, "the probe survives instance.json");
}

#[tokio::test(start_paused = true)]
async fn stop_on_request_halts_keeps_it_placed_and_start_brings_it_back() {
    let mut h = running("ins-a").await;
    let mut a = assignment("ins-a");
    a.stopped = true;
    send(&h, vec![a.clone()]);
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Stopped))
        })
        .await;
    assert!(
        in_order(
            &statuses(&seen, "ins-a"),
            &[InstanceStatus::Stopping, InstanceStatus::Stopped]
        ),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|r| matches!(r, Report::Status(s) if s.reason == STOPPED_ON_REQUEST)),
        "{seen:?}"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    {
        let s = h.host.state();
        assert_eq!(s.halts, ["ins-a"]);
        assert!(s.stops.is_empty(), "halted, not removed");
        assert!(!s.running.contains("ins-a"));
        assert_eq!(s.starts.len(), 1, "not restarted while stopped");
    }
    assert_eq!(
        h.board.get("ins-a").map(|e| e.status),
        Some(InstanceStatus::Stopped)
    );
    // Still placed: a new desired state gets STOPPED again, never Removed.
    send(&h, vec![a.clone()]);
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Stopped))
        })
        .await;
    assert!(!seen.iter().any(|r| matches!(r, Report::Removed(_))));

    a.stopped = false;
    send(&h, vec![a]);
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
        })
        .await;
    assert!(
        in_order(
            &statuses(&seen, "ins-a"),
            &[
                InstanceStatus::Starting,
                InstanceStatus::Pulling,
                InstanceStatus::Creating,
                InstanceStatus::Running
            ]
        ),
        "{seen:?}"
    );
    let s = h.host.state();
    assert_eq!(s.starts.len(), 2);
    assert!(s.running.contains("ins-a"));
    assert!(
        seen.iter()
            .all(|r| !matches!(r, Report::Status(s) if s.restarts != 0)),
        "a stop and start on request is not a restart: {seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_halted_instance_is_removed_when_its_assignment_goes() {
    let mut h = running("ins-a").await;
    let mut a = assignment("ins-a");
    a.stopped = true;
    send(&h, vec![a]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Stopped))
    })
    .await;
    send(&h, vec![]);
    h.until(|rs| rs.contains(&Report::Removed("ins-a".into())))
        .await;
    assert_eq!(h.host.state().stops, ["ins-a"], "everything cleaned");
    assert_eq!(h.board.get("ins-a"), None);
}

#[tokio::test(start_paused = true)]
async fn a_recovered_instance_wanted_stopped_is_halted_without_starting() {
    let host = FakeHost::default();
    let mut a = assignment("ins-a");
    a.stopped = true;
    host.state().recovered.push(Recovered {
        spec: InstanceSpec::try_from(a.clone()).expect("valid"),
        liveness: Liveness::Unknown,
        restarts: 2,
        image_digest: DIGEST.into(),
    });
    let mut h = harness(host);
    send(&h, vec![a]);
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Stopped))
        })
        .await;
    assert!(
        !statuses(&seen, "ins-a").contains(&InstanceStatus::Stopping),
        "nothing ran, so nothing was being stopped: {seen:?}"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(h.host.state().starts.is_empty(), "never started");
    assert!(seen.iter().any(|r| matches!(r, Report::Status(s)
        if s.restarts == 2 && s.image_digest == DIGEST)));
}

#[tokio::test(start_paused = true)]
async fn a_recovered_running_instance_wanted_stopped_is_stopped() {
    let host = FakeHost::default();
    host.state().running.insert("ins-a".into());
    host.state().recovered.push(Recovered {
        spec: InstanceSpec::try_from(assignment("ins-a")).expect("valid"),
        liveness: Liveness::Running,
        restarts: 0,
        image_digest: DIGEST.into(),
    });
    let mut h = harness(host);
    let mut a = assignment("ins-a");
    a.stopped = true;
    send(&h, vec![a]);
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Stopped))
        })
        .await;
    assert!(
        in_order(
            &statuses(&seen, "ins-a"),
            &[InstanceStatus::Stopping, InstanceStatus::Stopped]
        ),
        "{seen:?}"
    );
    assert_eq!(h.host.state().halts, ["ins-a"]);
    assert!(h.host.state().starts.is_empty());
}

#[tokio::test(start_paused = true)]
async fn restart_on_request_stops_then_starts_without_counting_a_restart() {
    let mut h = running("ins-a").await;
    let mut a = assignment("ins-a");
    a.restart_generation = 1;
    send(&h, vec![a.clone()]);
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
        })
        .await;
    assert!(
        in_order(
            &statuses(&seen, "ins-a"),
            &[
                InstanceStatus::Stopping,
                InstanceStatus::Starting,
                InstanceStatus::Running
            ]
        ),
        "{seen:?}"
    );
    assert!(reported_restarts(&seen).iter().all(|&n| n == 0), "{seen:?}");
    {
        let s = h.host.state();
        assert_eq!(s.halts, ["ins-a"]);
        assert_eq!(s.starts.len(), 2);
        assert_eq!(
            s.started_specs.last().map(|sp| sp.restart_generation),
            Some(1),
            "started with the new generation"
        );
        assert!(s.saved_restarts.is_empty());
    }
    // The same generation again restarts nothing.
    send(&h, vec![a]);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(h.host.state().starts.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_recovered_instance_keeps_its_restart_generation_and_is_not_restarted() {
    let host = FakeHost::default();
    let mut a = assignment("ins-a");
    a.restart_generation = 3;
    host.state().running.insert("ins-a".into());
    host.state().recovered.push(Recovered {
        spec: InstanceSpec::try_from(a.clone()).expect("valid"),
        liveness: Liveness::Running,
        restarts: 0,
        image_digest: DIGEST.into(),
    });
    let mut h = harness(host);
    send(&h, vec![a.clone()]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(h.host.state().halts.is_empty());
    assert!(h.host.state().starts.is_empty());
    // A restart asked while the agent was away is carried out.
    a.restart_generation = 4;
    send(&h, vec![a]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
    })
    .await;
    assert_eq!(h.host.state().halts, ["ins-a"]);
    assert_eq!(h.host.state().starts.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_probed_instance_is_starting_until_its_probe_passes() {
    let host = FakeHost::default();
    host.set_probe("ins-a", false);
    let mut h = harness(host);
    send(&h, vec![with_http_probe(assignment("ins-a"), 3)]);
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Starting))
        })
        .await;
    assert!(h.prober.is_probing("ins-a"));
    // Two failures (below the threshold of 3): still STARTING, never RUNNING.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut more = Vec::new();
    while let Ok(r) = h.reports.try_recv() {
        more.push(r);
    }
    assert!(
        !statuses(&more, "ins-a").contains(&InstanceStatus::Running)
            && !statuses(&seen, "ins-a").contains(&InstanceStatus::Running),
        "{seen:?} {more:?}"
    );
    assert_eq!(
        h.board.get("ins-a").map(|e| e.status),
        Some(InstanceStatus::Starting)
    );
    h.host.set_probe("ins-a", true);
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
        })
        .await;
    let phases = seen.iter().find_map(|r| match r {
        Report::Status(s) if s.status == InstanceStatus::Running as i32 => {
            Some(s.phases_ms.clone())
        }
        _ => None,
    });
    assert_eq!(
        phases.and_then(|p| p.get("pull").copied()),
        Some(1.0),
        "the deploy timings come with RUNNING"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_probe_marks_unhealthy_and_restarts_per_policy() {
    let mut h = harness(FakeHost::default());
    send(&h, vec![with_http_probe(assignment("ins-a"), 2)]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
    })
    .await;
    h.host.set_probe("ins-a", false);
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Unhealthy))
        })
        .await;
    let unhealthy = seen.iter().find_map(|r| match r {
        Report::Status(s) if s.status == InstanceStatus::Unhealthy as i32 => Some(s.reason.clone()),
        _ => None,
    });
    assert!(
        unhealthy
            .as_deref()
            .is_some_and(|r| r.contains("status 500") && r.contains("2 consecutive failures")),
        "{seen:?}"
    );
    h.host.set_probe("ins-a", true);
    let seen = h
        .until(|rs| {
            rs.iter().any(|r| {
                matches!(r, Report::Status(s) if s.status == InstanceStatus::Running as i32
                    && s.restarts == 1)
            })
        })
        .await;
    assert!(
        seen.iter().any(|r| matches!(r, Report::Status(s)
            if s.status == InstanceStatus::Unhealthy as i32
                && s.reason.starts_with("unhealthy: ")
                && s.reason.ends_with("restarting in 1s"))),
        "{seen:?}"
    );
    let s = h.host.state();
    assert_eq!(s.halts, ["ins-a"], "stopped gracefully before the restart");
    assert_eq!(s.starts.len(), 2);
    assert_eq!(s.saved_restarts, [("ins-a".to_string(), 1)]);
    assert_eq!(h.board.get("ins-a").map(|e| e.restarts), Some(1));
}

#[tokio::test(start_paused = true)]
async fn probe_restarts_count_toward_on_failure_limits() {
    let host = FakeHost::default();
    let mut h = harness(host);
    let mut a = with_http_probe(assignment("ins-a"), 1);
    a.restart_policy = "on-failure".into();
    a.max_restarts = 1;
    send(&h, vec![a]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
    })
    .await;
    h.host.set_probe("ins-a", false);
    // One restart allowed; the second failure leaves it UNHEALTHY, still running.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let s = h.host.state();
    assert_eq!(s.starts.len(), 2, "{:?}", s.starts);
    assert_eq!(s.halts.len(), 1);
    assert!(s.running.contains("ins-a"));
    drop(s);
    assert_eq!(
        h.board.get("ins-a").map(|e| (e.status, e.restarts)),
        Some((InstanceStatus::Unhealthy, 1))
    );
}

#[tokio::test(start_paused = true)]
async fn with_never_an_unhealthy_instance_stays_and_recovers_when_the_probe_passes() {
    let mut h = harness(FakeHost::default());
    let mut a = with_http_probe(assignment("ins-a"), 2);
    a.restart_policy = "never".into();
    send(&h, vec![a]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
    })
    .await;
    h.host.set_probe("ins-a", false);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Unhealthy))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(h.host.state().halts.is_empty(), "never restarted");
    assert!(h.prober.is_probing("ins-a"), "still probed");
    h.host.set_probe("ins-a", true);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
    })
    .await;
    assert_eq!(h.host.state().starts.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_adopted_probed_instance_stays_running_and_is_probed() {
    let host = FakeHost::default();
    let a = with_http_probe(assignment("ins-a"), 2);
    host.state().running.insert("ins-a".into());
    host.state().recovered.push(Recovered {
        spec: InstanceSpec::try_from(a.clone()).expect("valid"),
        liveness: Liveness::Running,
        restarts: 1,
        image_digest: DIGEST.into(),
    });
    let mut h = harness(host);
    send(&h, vec![a]);
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
        })
        .await;
    assert!(
        !statuses(&seen, "ins-a").contains(&InstanceStatus::Starting),
        "an agent restart takes nothing out of routing: {seen:?}"
    );
    assert!(seen.iter().any(|r| matches!(r, Report::Status(s)
        if s.image_digest == DIGEST && s.restarts == 1)));
    assert!(h.prober.is_probing("ins-a"));
    assert!(h.host.state().starts.is_empty());
}

#[tokio::test(start_paused = true)]
async fn probing_stops_before_a_stop_or_removal() {
    let mut h = harness(FakeHost::default());
    let a = with_http_probe(assignment("ins-a"), 2);
    send(&h, vec![a.clone()]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
    })
    .await;
    assert!(h.prober.is_probing("ins-a"));
    let mut stopped = a.clone();
    stopped.stopped = true;
    send(&h, vec![stopped]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Stopped))
    })
    .await;
    assert!(!h.prober.is_probing("ins-a"));
    send(&h, vec![a]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
    })
    .await;
    assert!(h.prober.is_probing("ins-a"), "probed again after the start");
    send(&h, vec![]);
    h.until(|rs| rs.contains(&Report::Removed("ins-a".into())))
        .await;
    assert!(!h.prober.is_probing("ins-a"));
    assert!(h.prober.snapshot("ins-a").is_none());
}

#[tokio::test(start_paused = true)]
async fn image_digest_is_reported_and_mirrored_on_the_board() {
    let mut h = harness(FakeHost::default());
    h.desired_tx.send_replace(Some(desired(&["ins-a"])));
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
        })
        .await;
    let running = seen.iter().find_map(|r| match r {
        Report::Status(s) if s.status == InstanceStatus::Running as i32 => Some(s.clone()),
        _ => None,
    });
    assert_eq!(running.map(|s| s.image_digest).as_deref(), Some(DIGEST));
    let entry = h.board.get("ins-a").expect("on the board");
    assert_eq!(entry.image_digest, DIGEST);
    assert_eq!(entry.status, InstanceStatus::Running);
    assert_eq!(
        (entry.container_id.as_str(), entry.cpu_millis),
        ("ctr-1", 500)
    );
    // A crash: the later reports keep the digest, the board counts the restart.
    h.host.state().exits.push(("ins-a".into(), 2));
    h.children_tx.send(()).expect("reconciler alive");
    let seen = h.until(|rs| failed_then_running(rs, "ins-a")).await;
    assert!(seen
        .iter()
        .all(|r| matches!(r, Report::Status(s) if s.image_digest == DIGEST)));
    assert_eq!(h.board.get("ins-a").map(|e| e.restarts), Some(1));
}

#[tokio::test(start_paused = true)]
async fn a_failed_halt_is_reported_and_retried() {
    let mut h = running("ins-a").await;
    h.host.state().fail_next_halt.insert("ins-a".into());
    let mut a = assignment("ins-a");
    a.stopped = true;
    send(&h, vec![a]);
    let seen = h
        .until(|rs| {
            rs.iter()
                .any(|r| is_status(r, "ins-a", InstanceStatus::Stopped))
        })
        .await;
    assert!(
        seen.iter().any(|r| matches!(r, Report::Status(s)
            if s.status == InstanceStatus::Failed as i32 && s.reason.starts_with("stop failed:"))),
        "{seen:?}"
    );
    assert_eq!(h.host.state().halts.len(), 2);
    assert_eq!(h.host.state().starts.len(), 1);
}

fn fake_progress(
    phase: crate::migrate::session::Phase,
) -> crate::migrate::session::MigrationProgress {
    crate::migrate::session::MigrationProgress {
        phase,
        rounds: 2,
        bytes_sent: 4096,
        pages_sent: 1,
        downtime_ms: None,
        choice: None,
        memory_complete: false,
    }
}

fn with_order(id: &str, role: berth_proto::v1::MigrationRole) -> Assignment {
    let mut a = assignment(id);
    a.migration = Some(berth_proto::v1::MigrationOrder {
        migration_id: "mig-1".into(),
        role: role as i32,
        peer_node_id: "n1".into(),
        peer_addr: "10.0.0.1:9752".into(),
        mode: 0,
    });
    a
}

/// The migration part of the reports about `id`.
fn migration_reports(rs: &[Report], id: &str) -> Vec<MigrationProgress> {
    rs.iter()
        .filter_map(|r| match r {
            Report::Status(s) if s.instance_id == id => s.migration.clone(),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_source_sends_its_running_instance_once_and_removes_it_when_the_hub_drops_it() {
    use berth_proto::v1::{MigrationPhase, MigrationRole};
    let mut h = running("ins-a").await;
    send(&h, vec![with_order("ins-a", MigrationRole::Source)]);
    let seen = h
        .until(|rs| !migration_reports(rs, "ins-a").is_empty())
        .await;
    let progress = &migration_reports(&seen, "ins-a")[0];
    assert_eq!(progress.migration_id, "mig-1");
    assert_eq!(progress.phase, MigrationPhase::Precopy as i32);
    assert_eq!((progress.rounds, progress.pages_sent), (2, 1));
    assert!(seen.iter().all(|r| !matches!(r, Report::Removed(_))));
    // The same order again (every desired state repeats it) is not carried out twice, and the
    // frozen copy is neither restarted nor reported gone while the hub still lists it.
    send(&h, vec![with_order("ins-a", MigrationRole::Source)]);
    tokio::time::sleep(Duration::from_secs(30)).await;
    {
        let s = h.host.state();
        assert_eq!(s.migrated_out, [("ins-a".to_owned(), "mig-1".to_owned())]);
        assert_eq!(s.starts, ["ins-a".to_owned()]);
        assert!(s.stops.is_empty());
    }
    send(&h, vec![]);
    h.until(|rs| {
        rs.iter()
            .any(|r| matches!(r, Report::Removed(id) if id == "ins-a"))
    })
    .await;
    assert_eq!(h.host.state().stops, ["ins-a".to_owned()]);
}

#[tokio::test(start_paused = true)]
async fn a_sent_away_copy_runs_on_when_the_hub_fails_the_migration_after_all() {
    // The target answered Restored, then died before telling the hub: the hub fails the job and
    // keeps the instance here, without the order. The frozen copy must run on: it is the only one.
    use berth_proto::v1::MigrationRole;
    let mut h = running("ins-a").await;
    send(&h, vec![with_order("ins-a", MigrationRole::Source)]);
    h.until(|rs| !migration_reports(rs, "ins-a").is_empty())
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        h.host.state().resumed.is_empty(),
        "resumed while the order stands"
    );
    send(&h, vec![assignment("ins-a")]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-a", InstanceStatus::Running))
    })
    .await;
    let s = h.host.state();
    assert_eq!(s.resumed, ["ins-a".to_owned()]);
    assert_eq!(s.starts, ["ins-a".to_owned()], "resumed, not started again");
    assert!(s.stops.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_target_receives_the_instance_instead_of_starting_it_and_reports_it_done() {
    use berth_proto::v1::{MigrationPhase, MigrationRole};
    let mut h = harness(FakeHost::default());
    send(&h, vec![with_order("ins-in", MigrationRole::Target)]);
    let seen = h
        .until(|rs| {
            migration_reports(rs, "ins-in")
                .iter()
                .any(|m| m.phase == MigrationPhase::Done as i32)
        })
        .await;
    let done = seen.iter().find_map(|r| match r {
        Report::Status(s)
            if s.migration
                .as_ref()
                .is_some_and(|m| m.phase == MigrationPhase::Done as i32) =>
        {
            Some(s.clone())
        }
        _ => None,
    });
    // DONE comes with RUNNING: that pair is what completes the job at the hub.
    assert_eq!(done.map(|s| s.status), Some(InstanceStatus::Running as i32));
    assert!(migration_reports(&seen, "ins-in")
        .iter()
        .any(|m| m.phase == MigrationPhase::Restore as i32));
    let s = h.host.state();
    assert_eq!(s.migrated_in, [("ins-in".to_owned(), "mig-1".to_owned())]);
    assert!(s.starts.is_empty(), "never started from its image");
}

#[tokio::test(start_paused = true)]
async fn failed_migrations_keep_the_source_running_and_never_start_the_target_from_scratch() {
    use berth_proto::v1::MigrationRole;
    let host = FakeHost::default();
    host.state().fail_next_migration = HashSet::from(["ins-out".to_owned(), "ins-in".to_owned()]);
    let mut h = harness(host);
    send(&h, vec![assignment("ins-out")]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-out", InstanceStatus::Running))
    })
    .await;
    send(
        &h,
        vec![
            with_order("ins-out", MigrationRole::Source),
            with_order("ins-in", MigrationRole::Target),
        ],
    );
    let failed = |rs: &[Report], id: &str| {
        migration_reports(rs, id)
            .iter()
            .any(|m| m.migration_id == "mig-1" && !m.error.is_empty())
    };
    let seen = h
        .until(|rs| failed(rs, "ins-out") && failed(rs, "ins-in"))
        .await;
    assert!(seen
        .iter()
        .any(|r| is_status(r, "ins-in", InstanceStatus::Failed)));
    // Long after: the source still runs (no restart), the target was never started.
    tokio::time::sleep(Duration::from_secs(120)).await;
    {
        let s = h.host.state();
        assert_eq!(s.starts, ["ins-out".to_owned()]);
        assert_eq!(s.migrated_in.len(), 1);
        assert_eq!(s.migrated_out.len(), 1);
        assert!(s.running.contains("ins-out"));
    }
    // The hub drops the failed target's assignment: it is cleaned up and reported gone.
    send(&h, vec![assignment("ins-out")]);
    h.until(|rs| {
        rs.iter()
            .any(|r| matches!(r, Report::Removed(id) if id == "ins-in"))
    })
    .await;
    assert_eq!(h.host.state().stops, ["ins-in".to_owned()]);
}

#[tokio::test(start_paused = true)]
async fn post_copy_memory_lost_after_the_switch_fails_the_job_without_resuming_here() {
    use berth_proto::v1::MigrationRole;
    let host = FakeHost::default();
    host.state().pages_fail_next = HashSet::from(["ins-out".to_owned()]);
    let mut h = harness(host);
    send(&h, vec![assignment("ins-out")]);
    h.until(|rs| {
        rs.iter()
            .any(|r| is_status(r, "ins-out", InstanceStatus::Running))
    })
    .await;
    send(&h, vec![with_order("ins-out", MigrationRole::Source)]);
    let seen = h
        .until(|rs| {
            migration_reports(rs, "ins-out")
                .iter()
                .any(|m| m.migration_id == "mig-1" && m.error.contains("pages lost"))
        })
        .await;
    assert!(!seen.is_empty());
    // The target ran it: nothing here is resumed or restarted, and the hub's removal of the
    // assignment (it switched the instance) removes what is left.
    tokio::time::sleep(Duration::from_secs(60)).await;
    {
        let s = h.host.state();
        assert!(s.resumed.is_empty(), "{:?}", s.resumed);
        assert_eq!(s.starts, ["ins-out".to_owned()]);
    }
    send(&h, vec![]);
    h.until(|rs| {
        rs.iter()
            .any(|r| matches!(r, Report::Removed(id) if id == "ins-out"))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_source_order_for_an_instance_that_does_not_run_fails_at_once() {
    use berth_proto::v1::MigrationRole;
    let mut h = harness(FakeHost::default());
    let mut a = with_order("ins-a", MigrationRole::Source);
    a.stopped = true;
    send(&h, vec![a]);
    let seen = h
        .until(|rs| !migration_reports(rs, "ins-a").is_empty())
        .await;
    assert!(migration_reports(&seen, "ins-a")[0]
        .error
        .contains("not running"));
    assert!(h.host.state().migrated_out.is_empty());
}

#[test]
fn migration_orders_are_validated_by_field() {
    use berth_proto::v1::MigrationRole;
    let spec = InstanceSpec::try_from(with_order("ins-a", MigrationRole::Source)).expect("valid");
    let order = spec.migration.expect("order kept");
    assert_eq!(order.role, crate::reconcile::MigrationRole::Source);
    assert_eq!(
        order.peer_addr,
        Some("10.0.0.1:9752".parse().expect("addr"))
    );
    assert_eq!(order.mode, crate::reconcile::MigrationMode::Auto);
    let mut a = with_order("ins-a", MigrationRole::Source);
    if let Some(m) = a.migration.as_mut() {
        m.mode = berth_proto::v1::MigrationMode::Stopcopy as i32;
    }
    let stopcopy = InstanceSpec::try_from(a).expect("valid").migration;
    assert_eq!(
        stopcopy.map(|o| o.mode),
        Some(crate::reconcile::MigrationMode::Stopcopy)
    );
    // A target needs no address (the source dials it).
    let mut a = with_order("ins-a", MigrationRole::Target);
    if let Some(m) = a.migration.as_mut() {
        m.peer_addr.clear();
    }
    assert!(InstanceSpec::try_from(a).is_ok());
    type Spoil = fn(&mut berth_proto::v1::MigrationOrder);
    let cases: [(&str, Spoil); 5] = [
        ("migration.role", |m| m.role = 0),
        ("migration.mode", |m| {
            m.mode = 99;
        }),
        ("migration.peer_addr", |m| m.peer_addr = "nowhere".into()),
        ("migration.peer_node_id", |m| m.peer_node_id.clear()),
        ("migration.migration_id", |m| m.migration_id.clear()),
    ];
    for (field, spoil) in cases {
        let mut a = with_order("ins-a", MigrationRole::Source);
        if let Some(m) = a.migration.as_mut() {
            spoil(m);
        }
        let err = InstanceSpec::try_from(a).expect_err(field).to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
}
