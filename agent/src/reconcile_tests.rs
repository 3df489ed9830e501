//! Reconciler logic on a fake host: no root, no kernel.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use berth_proto::v1::NetworkAttachment;

use super::*;

#[derive(Default)]
struct FakeState {
    running: HashSet<String>,
    starts: Vec<String>,
    stops: Vec<String>,
    /// Instance ids whose next start fails.
    fail_next_start: HashSet<String>,
    exits: Vec<(String, i32)>,
    recovered: Vec<Recovered>,
}

#[derive(Default)]
struct FakeHost(Mutex<FakeState>);

impl FakeHost {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().expect("fake host lock")
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
        if s.fail_next_start.remove(&spec.instance_id) {
            return Err("pull failed: registry unreachable".into());
        }
        s.running.insert(spec.instance_id.clone());
        Ok(Started {
            phases_ms: HashMap::from([("pull".to_string(), 1.0)]),
        })
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
}

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
}

fn harness(host: FakeHost) -> Harness {
    let host = Arc::new(host);
    let (reports_tx, reports) = mpsc::unbounded_channel();
    let (desired_tx, desired_rx) = watch::channel(None);
    let (children_tx, children_rx) = mpsc::unbounded_channel();
    let rec = Reconciler::new(host.clone(), reports_tx);
    tokio::spawn(rec.run(desired_rx, children_rx));
    Harness {
        host,
        desired_tx,
        children_tx,
        reports,
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
