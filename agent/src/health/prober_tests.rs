//! The prober's timing and state machine on a scripted fake check, under tokio's paused clock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;
use crate::health::check::BoxCheckFuture;

/// What the fake's next probe does.
#[derive(Debug, Clone, Copy)]
enum Step {
    Pass,
    Fail,
    /// Takes this long, then passes.
    Slow(Duration),
}

/// A check that follows a script (the last step repeats) and records when each probe started,
/// how many ran at once, and how many were dropped unfinished.
struct Fake {
    script: Mutex<VecDeque<Step>>,
    starts: Mutex<Vec<Duration>>,
    origin: Instant,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    grace: Duration,
}

impl Fake {
    fn new(script: &[Step]) -> Arc<Self> {
        Self::with_grace(script, Duration::ZERO)
    }

    fn with_grace(script: &[Step], grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            script: Mutex::new(script.iter().copied().collect()),
            starts: Mutex::new(Vec::new()),
            origin: Instant::now(),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
            dropped: Arc::default(),
            grace,
        })
    }

    /// Start times of the probes so far, in whole seconds since the fake was made.
    fn starts(&self) -> Vec<u64> {
        self.starts
            .lock()
            .unwrap()
            .iter()
            .map(|d| d.as_secs())
            .collect()
    }
}

/// Counts a probe in flight; a drop before `finish` counts as abandoned.
struct Flight {
    in_flight: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    finished: bool,
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Check for Fake {
    fn run(&self, _timeout: Duration) -> BoxCheckFuture {
        let step = {
            let mut script = self.script.lock().unwrap();
            if script.len() > 1 {
                script.pop_front().unwrap()
            } else {
                *script.front().unwrap()
            }
        };
        self.starts.lock().unwrap().push(self.origin.elapsed());
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let flight = Flight {
            in_flight: self.in_flight.clone(),
            dropped: self.dropped.clone(),
            finished: false,
        };
        Box::pin(async move {
            // Moves the whole guard in (a closure would capture only the field it assigns).
            let mut flight = flight;
            let out = match step {
                Step::Pass => Ok("fine".to_owned()),
                Step::Fail => Err("broken".to_owned()),
                Step::Slow(d) => {
                    tokio::time::sleep(d).await;
                    Ok("slow but fine".to_owned())
                }
            };
            flight.finished = true;
            out
        })
    }

    fn grace(&self) -> Duration {
        self.grace
    }

    fn describe(&self) -> String {
        "fake".to_owned()
    }
}

fn spec(interval: u64, timeout: u64, threshold: u32, start_period: u64) -> ProbeSpec {
    ProbeSpec {
        check: ProbeCheck::Tcp { port: 1 },
        interval: Duration::from_secs(interval),
        timeout: Duration::from_secs(timeout),
        failure_threshold: threshold,
        start_period: Duration::from_secs(start_period),
    }
}

/// Lets time run for `secs` seconds (the paused clock auto-advances while every task waits).
async fn run_for(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

fn drain(rx: &mut mpsc::UnboundedReceiver<HealthEvent>) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        assert_eq!(e.instance_id, "ins-1");
        out.push((e.healthy, e.reason));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn unhealthy_after_threshold_failures_reported_once() {
    let prober = Prober::new();
    let fake = Fake::new(&[Step::Fail]);
    let (tx, mut rx) = mpsc::unbounded_channel();
    prober.start_check("ins-1", fake.clone(), &spec(10, 1, 3, 0), tx);

    run_for(15).await; // probes at 0 and 10
    assert!(
        drain(&mut rx).is_empty(),
        "two failures are below the threshold"
    );
    let snap = prober.snapshot("ins-1").unwrap();
    assert_eq!(snap.consecutive_failures, 2);
    assert_eq!(snap.healthy, None);

    run_for(10).await; // probe at 20: the third failure
    let events = drain(&mut rx);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(!events[0].0);
    assert_eq!(events[0].1, "fake: broken (3 consecutive failures)");

    run_for(30).await; // more failures: no second event
    assert!(drain(&mut rx).is_empty());
    assert_eq!(fake.starts(), vec![0, 10, 20, 30, 40, 50]);
    let snap = prober.snapshot("ins-1").unwrap();
    assert_eq!(snap.healthy, Some(false));
    assert_eq!(snap.consecutive_failures, 6);
    assert_eq!(snap.failures_total, 6);
    assert_eq!(snap.successes_total, 0);
    let last = snap.last_result.unwrap();
    assert!(!last.ok);
    assert_eq!(last.reason, "broken");
}

#[tokio::test(start_paused = true)]
async fn first_probe_waits_for_the_start_period() {
    let prober = Prober::new();
    let fake = Fake::new(&[Step::Pass]);
    let (tx, mut rx) = mpsc::unbounded_channel();
    prober.start_check("ins-1", fake.clone(), &spec(10, 1, 3, 30), tx);

    run_for(29).await;
    assert!(fake.starts().is_empty());
    assert_eq!(prober.snapshot("ins-1").unwrap(), ProbeSnapshot::default());
    run_for(2).await;
    assert_eq!(fake.starts(), vec![30]);
    // The first success is a transition (unknown → healthy), later ones are not.
    assert_eq!(drain(&mut rx), vec![(true, "fake: fine".to_owned())]);
    run_for(20).await;
    assert_eq!(fake.starts(), vec![30, 40, 50]);
    assert!(drain(&mut rx).is_empty());
    assert_eq!(prober.snapshot("ins-1").unwrap().successes_total, 3);
}

#[tokio::test(start_paused = true)]
async fn one_success_resets_and_makes_it_healthy_again() {
    use Step::*;
    let prober = Prober::new();
    let script = [Fail, Fail, Pass, Fail, Fail, Fail, Pass, Fail, Pass];
    let fake = Fake::new(&script);
    let (tx, mut rx) = mpsc::unbounded_channel();
    prober.start_check("ins-1", fake.clone(), &spec(5, 1, 3, 0), tx);

    run_for(5 * script.len() as u64 - 1).await;
    assert_eq!(fake.starts().len(), script.len());
    let events: Vec<bool> = drain(&mut rx).into_iter().map(|(h, _)| h).collect();
    // F F (below threshold) P → healthy; F F F → unhealthy; P → healthy; F P → nothing.
    assert_eq!(events, vec![true, false, true]);
    let snap = prober.snapshot("ins-1").unwrap();
    assert_eq!(snap.healthy, Some(true));
    assert_eq!(snap.consecutive_failures, 0);
    assert_eq!(snap.failures_total, 6);
    assert_eq!(snap.successes_total, 3);
}

#[tokio::test(start_paused = true)]
async fn a_probe_past_its_timeout_fails() {
    let prober = Prober::new();
    let fake = Fake::new(&[Step::Slow(Duration::from_secs(3))]);
    let (tx, mut rx) = mpsc::unbounded_channel();
    prober.start_check("ins-1", fake.clone(), &spec(10, 2, 1, 0), tx);

    run_for(5).await;
    let events = drain(&mut rx);
    assert_eq!(
        events,
        vec![(
            false,
            "fake: timed out after 2s (1 consecutive failures)".to_owned()
        )]
    );
    assert_eq!(fake.dropped.load(Ordering::SeqCst), 1, "abandoned at 2s");
    let last = prober.snapshot("ins-1").unwrap().last_result.unwrap();
    assert_eq!(last.took, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn probes_never_overlap_even_when_slower_than_the_interval() {
    let prober = Prober::new();
    // Grace lets the probe run 18s although interval = timeout = 10s (like an exec's cleanup).
    let fake = Fake::with_grace(
        &[Step::Slow(Duration::from_secs(18))],
        Duration::from_secs(15),
    );
    let (tx, _rx) = mpsc::unbounded_channel();
    prober.start_check("ins-1", fake.clone(), &spec(10, 10, 3, 0), tx);

    run_for(100).await;
    assert_eq!(fake.max_in_flight.load(Ordering::SeqCst), 1);
    let starts = fake.starts();
    assert!(starts.len() >= 5, "{starts:?}");
    for pair in starts.windows(2) {
        assert!(pair[1] - pair[0] >= 18, "{starts:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn stop_ends_probing_at_once_and_drops_the_probe_in_flight() {
    let prober = Prober::new();
    let fake = Fake::with_grace(&[Step::Slow(Duration::from_secs(8))], Duration::ZERO);
    let (tx, mut rx) = mpsc::unbounded_channel();
    prober.start_check("ins-1", fake.clone(), &spec(10, 10, 1, 0), tx);

    run_for(3).await;
    assert_eq!(fake.in_flight.load(Ordering::SeqCst), 1);
    assert!(prober.is_probing("ins-1"));
    assert!(prober.stop("ins-1"));
    // Aborted tasks are dropped at the runtime's next turn.
    tokio::task::yield_now().await;
    assert_eq!(fake.in_flight.load(Ordering::SeqCst), 0);
    assert_eq!(fake.dropped.load(Ordering::SeqCst), 1);
    assert!(!prober.is_probing("ins-1"));
    assert_eq!(prober.snapshot("ins-1"), None);
    assert!(!prober.stop("ins-1"), "already stopped");

    run_for(60).await;
    assert_eq!(fake.starts(), vec![0], "no probe after stop");
    assert!(drain(&mut rx).is_empty());
    // The sender went with the task.
    assert!(rx.recv().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn restarting_replaces_the_old_prober() {
    let prober = Prober::new();
    let old = Fake::new(&[Step::Fail]);
    let new = Fake::new(&[Step::Pass]);
    let (tx, mut rx) = mpsc::unbounded_channel();
    prober.start_check("ins-1", old.clone(), &spec(10, 1, 1, 0), tx.clone());
    run_for(5).await;
    prober.start_check("ins-1", new.clone(), &spec(10, 1, 1, 0), tx);
    run_for(31).await;
    assert_eq!(old.starts(), vec![0]);
    assert_eq!(new.starts(), vec![5, 15, 25, 35]);
    let events: Vec<bool> = drain(&mut rx).into_iter().map(|(h, _)| h).collect();
    assert_eq!(events, vec![false, true]);
    assert_eq!(prober.snapshots().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_closed_event_channel_ends_probing() {
    let prober = Prober::new();
    let fake = Fake::new(&[Step::Pass]);
    let (tx, rx) = mpsc::unbounded_channel();
    drop(rx);
    prober.start_check("ins-1", fake.clone(), &spec(10, 1, 1, 0), tx);
    run_for(30).await;
    assert_eq!(fake.starts(), vec![0]);
    assert!(!prober.is_probing("ins-1"));
}

#[tokio::test]
async fn start_refuses_invalid_specs_and_missing_targets() {
    let prober = Prober::new();
    let (tx, _rx) = mpsc::unbounded_channel();
    let bad = ProbeSpec::new(ProbeCheck::Tcp { port: 0 });
    let e = prober
        .start("ins-1", ProbeTarget::default(), &bad, tx.clone())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "health probe of instance ins-1: health.tcp.port: 0 is not a port (1-65535)"
    );
    let no_ip = ProbeSpec::new(ProbeCheck::Http {
        path: "/".into(),
        port: 80,
    });
    let e = prober
        .start("ins-1", ProbeTarget::default(), &no_ip, tx.clone())
        .unwrap_err();
    assert!(e.to_string().contains("needs an ip"), "{e}");
    let exec = ProbeSpec::new(ProbeCheck::Exec {
        command: vec!["true".into()],
    });
    let e = prober
        .start("ins-1", ProbeTarget::default(), &exec, tx)
        .unwrap_err();
    assert!(e.to_string().contains("runtime"), "{e}");
    assert!(!prober.is_probing("ins-1"));
}
