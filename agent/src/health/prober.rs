//! One probing task per instance, on tokio's clock (so tests run on a paused one).
//!
//! Timeline: the first probe starts `start_period` after [`Prober::start`], then one every
//! `interval` (a probe that takes longer delays the next; two never overlap). Each failure (an
//! error or `timeout`) adds one to the consecutive failures; at `failure_threshold` the instance
//! becomes unhealthy; one success makes it healthy again and resets the count. Only transitions
//! are sent as [`HealthEvent`]s, the first success included (unknown → healthy).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tracing::Instrument;

use crate::runtime::exec::Exec;

use super::check::{Check, ExecCheck, HttpCheck, TcpCheck};
use super::spec::{format_duration, ProbeCheck, ProbeSpec};
use super::{HealthEvent, ProberError};

/// Where an instance's probes go.
#[derive(Debug, Clone, Default)]
pub struct ProbeTarget {
    /// The instance's IP (HTTP and TCP probes connect to it from the node).
    pub ip: Option<IpAddr>,
    /// How to run commands in the instance's container (exec probes): the runtime's exec helper
    /// and the container's youki state dir (`Runtime::state_dir(id)`).
    pub exec: Option<(Exec, PathBuf)>,
}

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Whether it succeeded.
    pub ok: bool,
    /// What it saw (`status 200`, `connect: connection refused`, `timed out after 1s`).
    pub reason: String,
    /// When it finished (wall clock).
    pub at: SystemTime,
    /// How long it took.
    pub took: Duration,
}

/// An instance's probing so far, for metrics and `inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeSnapshot {
    /// `None` until the first success or the first `failure_threshold` failures.
    pub healthy: Option<bool>,
    /// The latest probe's outcome.
    pub last_result: Option<ProbeResult>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Every failure since the prober started.
    pub failures_total: u64,
    /// Every success since the prober started.
    pub successes_total: u64,
}

/// Runs the probes of this node's instances: one task each. Dropping it stops them all.
#[derive(Debug, Default)]
pub struct Prober {
    instances: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    task: JoinHandle<()>,
    stats: Arc<Mutex<ProbeSnapshot>>,
}

impl Prober {
    /// A prober with no instances.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates `spec` and starts probing `instance_id` at `target`, replacing any prober it
    /// had. Transitions go to `events`; probing ends when [`Prober::stop`] is called or `events`
    /// is closed. Must be called within a tokio runtime.
    pub fn start(
        &self,
        instance_id: &str,
        target: ProbeTarget,
        spec: &ProbeSpec,
        events: UnboundedSender<HealthEvent>,
    ) -> Result<(), ProberError> {
        spec.validate().map_err(|source| ProberError::Spec {
            instance_id: instance_id.to_owned(),
            source,
        })?;
        let missing = |what| ProberError::Target {
            instance_id: instance_id.to_owned(),
            what,
        };
        // Ports are validated to 1..=65535 above.
        let port = |p: u32| u16::try_from(p).unwrap_or_default();
        let check: Arc<dyn Check> = match &spec.check {
            ProbeCheck::Http { path, port: p } => {
                let ip = target.ip.ok_or_else(|| missing("http probe needs an ip"))?;
                Arc::new(HttpCheck::new(SocketAddr::new(ip, port(*p)), path.clone()))
            }
            ProbeCheck::Tcp { port: p } => {
                let ip = target.ip.ok_or_else(|| missing("tcp probe needs an ip"))?;
                Arc::new(TcpCheck::new(SocketAddr::new(ip, port(*p))))
            }
            ProbeCheck::Exec { command } => {
                let (exec, state_dir) = target
                    .exec
                    .ok_or_else(|| missing("exec probe needs the container runtime"))?;
                Arc::new(ExecCheck::new(exec, state_dir, command.clone()))
            }
        };
        self.start_check(instance_id, check, spec, events);
        Ok(())
    }

    /// Starts probing `instance_id` with any [`Check`], on `spec`'s timing (its `check` is
    /// ignored; `spec` should be valid). Replaces any prober the instance had.
    pub fn start_check(
        &self,
        instance_id: &str,
        check: Arc<dyn Check>,
        spec: &ProbeSpec,
        events: UnboundedSender<HealthEvent>,
    ) {
        let stats = Arc::new(Mutex::new(ProbeSnapshot::default()));
        let timing = Timing {
            interval: spec.interval,
            timeout: spec.timeout,
            failure_threshold: spec.failure_threshold.max(1),
            start_period: spec.start_period,
        };
        let task = tokio::spawn(probe_loop(
            instance_id.to_owned(),
            check,
            timing,
            stats.clone(),
            events,
        ));
        let old = self
            .lock()
            .insert(instance_id.to_owned(), Entry { task, stats });
        if let Some(old) = old {
            old.task.abort();
        }
    }

    /// Stops probing `instance_id` at once: a probe in flight is dropped (an exec'd command is
    /// killed). Returns whether it was being probed.
    pub fn stop(&self, instance_id: &str) -> bool {
        match self.lock().remove(instance_id) {
            Some(entry) => {
                entry.task.abort();
                tracing::debug!(instance_id, "health probe stopped");
                true
            }
            None => false,
        }
    }

    /// Whether `instance_id` is being probed.
    pub fn is_probing(&self, instance_id: &str) -> bool {
        self.lock()
            .get(instance_id)
            .is_some_and(|e| !e.task.is_finished())
    }

    /// `instance_id`'s probing so far; `None` when it is not probed.
    pub fn snapshot(&self, instance_id: &str) -> Option<ProbeSnapshot> {
        self.lock().get(instance_id).map(|e| lock(&e.stats).clone())
    }

    /// Every probed instance's snapshot, sorted by id (for metrics).
    pub fn snapshots(&self) -> Vec<(String, ProbeSnapshot)> {
        let mut all: Vec<_> = self
            .lock()
            .iter()
            .map(|(id, e)| (id.clone(), lock(&e.stats).clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        lock(&self.instances)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        for (_, entry) in self.lock().drain() {
            entry.task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single assignment: a panicking holder leaves no
    // half-updated state.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    interval: Duration,
    timeout: Duration,
    failure_threshold: u32,
    start_period: Duration,
}

async fn probe_loop(
    instance_id: String,
    check: Arc<dyn Check>,
    timing: Timing,
    stats: Arc<Mutex<ProbeSnapshot>>,
    events: UnboundedSender<HealthEvent>,
) {
    let what = check.describe();
    let span = tracing::info_span!("health_probe", instance_id = %instance_id, probe = %what);
    async {
        tokio::time::sleep(timing.start_period).await;
        // Ticks are due every interval from the first probe; a probe that overruns its tick
        // delays the next one instead of making them bunch up.
        let mut ticker = tokio::time::interval(timing.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let abandon_after = timing.timeout.saturating_add(check.grace());
        loop {
            ticker.tick().await;
            let started = tokio::time::Instant::now();
            let outcome = match tokio::time::timeout(abandon_after, check.run(timing.timeout)).await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(format!(
                    "timed out after {}",
                    format_duration(timing.timeout)
                )),
            };
            let result = ProbeResult {
                ok: outcome.is_ok(),
                reason: match outcome {
                    Ok(detail) | Err(detail) => detail,
                },
                at: SystemTime::now(),
                took: started.elapsed(),
            };
            if let Some(event) = record(&instance_id, &what, &stats, timing, result) {
                tracing::info!(healthy = event.healthy, reason = %event.reason, "health changed");
                if events.send(event).is_err() {
                    tracing::debug!("health events receiver gone: probing ends");
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// Folds one probe result into `stats`; returns the event when the health changed.
fn record(
    instance_id: &str,
    what: &str,
    stats: &Mutex<ProbeSnapshot>,
    timing: Timing,
    result: ProbeResult,
) -> Option<HealthEvent> {
    let mut s = lock(stats);
    let at = result.at;
    let changed = if result.ok {
        s.successes_total += 1;
        s.consecutive_failures = 0;
        (s.healthy != Some(true)).then(|| (true, format!("{what}: {}", result.reason)))
    } else {
        s.failures_total += 1;
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        tracing::debug!(
            consecutive = s.consecutive_failures,
            reason = %result.reason,
            "probe failed"
        );
        (s.consecutive_failures >= timing.failure_threshold && s.healthy != Some(false)).then(
            || {
                (
                    false,
                    format!(
                        "{what}: {} ({} consecutive failures)",
                        result.reason, s.consecutive_failures
                    ),
                )
            },
        )
    };
    s.last_result = Some(result);
    let (healthy, reason) = changed?;
    s.healthy = Some(healthy);
    Some(HealthEvent {
        instance_id: instance_id.to_owned(),
        healthy,
        reason,
        at,
    })
}

#[cfg(test)]
#[path = "prober_tests.rs"]
mod tests;
