//! `cargo xtask bench deploy`: how long a deploy takes, from the POST to every replica RUNNING.
//!
//! A private cluster like the e2e tests' (release binaries), deploys run one after another, each
//! deleted before the next so every deploy meets the same idle cluster.

use anyhow::bail;
use berth_tests::api::all_running;
use berth_tests::{Api, Cluster, Profile};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Options of `bench deploy`.
#[derive(clap::Args)]
pub struct DeployArgs {
    /// Deploys with the image already cached on the nodes.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Deploys that each pull an image no node has (0: skip).
    #[arg(long, default_value_t = 50)]
    cold_runs: usize,
    /// Replicas per deploy.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

/// How long one deploy may take before the bench gives up.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(60);

/// One measured deploy.
struct Sample {
    total: Duration,
    phases: BTreeMap<String, f64>,
    /// DELETE → 404 (not part of the deploy figure).
    delete: Duration,
}

/// Deploy phases in the order they happen (how `phases_ms` names them).
const PHASE_ORDER: [&str; 6] = ["schedule", "pull", "rootfs", "create", "network", "start"];

/// Runs the benchmark and prints the figures.
pub fn deploy(args: &DeployArgs) -> anyhow::Result<()> {
    if args.runs == 0 || args.replicas == 0 {
        bail!("--runs and --replicas must be at least 1");
    }
    crate::install::run()?;
    println!("bench: building release binaries");
    crate::build_release()?;
    println!("bench: starting a private cluster");
    let cluster = Cluster::builder()
        .profile(Profile::Release)
        .node_capacity("64", "64GB")
        .start()?;
    let api = cluster.api();
    let net = api.create_network("bench", "10.77.0.0/16")?;
    let network_id = net["network_id"].as_str().unwrap_or_default().to_string();
    let image = cluster.demo_image();

    // One unmeasured deploy puts the image in every node's cache.
    deploy_once(api, &image, &network_id, 2)?;
    let mut cached = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        cached.push(deploy_once(api, &image, &network_id, args.replicas)?);
    }
    report(
        &format!("cached image, {} replica(s)", args.replicas),
        &cached,
    );

    if args.cold_runs > 0 {
        println!(
            "bench: pushing {} image variants for cold pulls",
            args.cold_runs
        );
        let images = crate::image::push_cold_variants(&cluster, args.cold_runs)?;
        let mut cold = Vec::with_capacity(images.len());
        for image in &images {
            cold.push(deploy_once(api, image, &network_id, args.replicas)?);
        }
        report(&format!("cold pull, {} replica(s)", args.replicas), &cold);
    }
    Ok(())
}

/// POST, poll until every replica runs, then delete and wait until it is gone (not measured).
fn deploy_once(
    api: &Api,
    image: &str,
    network_id: &str,
    replicas: usize,
) -> anyhow::Result<Sample> {
    let body = json!({
        "image": image, "cpu": "0.1", "memory": "32MB",
        "network_id": network_id, "replicas": replicas,
    });
    let start = Instant::now();
    let id = api.create_container(&body)?;
    let container = loop {
        let c = api.container(&id)?;
        if let Some(c) = c.filter(|c| all_running(c, replicas)) {
            break c;
        }
        if start.elapsed() > DEPLOY_TIMEOUT {
            bail!("{id} not running after {DEPLOY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let total = start.elapsed();
    let deleting = Instant::now();
    api.delete_container(&id)?;
    api.wait_gone(&id, DEPLOY_TIMEOUT)?;
    Ok(Sample {
        total,
        phases: phase_breakdown(&container),
        delete: deleting.elapsed(),
    })
}

/// HOOK for the per-phase breakdown: milliseconds per deploy phase of one deploy, read from
/// `instances[].phases_ms` (proto `Instance.phases_ms`: "schedule" from the hub; "pull", "rootfs",
/// "create", "network", "start" from the agent). Replicas start in parallel, so a phase counts with its
/// slowest replica. Empty while the hub does not expose the field.
pub(crate) fn phase_breakdown(container: &Value) -> BTreeMap<String, f64> {
    let mut phases = BTreeMap::new();
    for inst in container["instances"].as_array().into_iter().flatten() {
        let Some(map) = inst["phases_ms"].as_object() else {
            continue;
        };
        for (phase, ms) in map {
            if let Some(ms) = ms.as_f64() {
                let slot = phases.entry(phase.clone()).or_insert(0.0f64);
                *slot = slot.max(ms);
            }
        }
    }
    phases
}

fn report(title: &str, samples: &[Sample]) {
    let ms: Vec<f64> = samples
        .iter()
        .map(|s| s.total.as_secs_f64() * 1e3)
        .collect();
    println!();
    println!(
        "deploy latency, POST -> every replica RUNNING ({title}, n={}):",
        ms.len()
    );
    println!("  {:<10} {}", "total", figures(ms));
    let mut by_phase: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for s in samples {
        for (phase, v) in &s.phases {
            by_phase.entry(phase.as_str()).or_default().push(*v);
        }
    }
    if by_phase.is_empty() {
        println!("  (no per-phase breakdown: the hub does not report instances[].phases_ms yet)");
    }
    for phase in PHASE_ORDER {
        if let Some(v) = by_phase.remove(phase) {
            println!("  {phase:<10} {}", figures(v));
        }
    }
    // Phases this list does not know yet, so a new one shows up without a change here.
    for (phase, v) in by_phase {
        println!("  {phase:<10} {}", figures(v));
    }
    let deletes = samples
        .iter()
        .map(|s| s.delete.as_secs_f64() * 1e3)
        .collect();
    println!("then DELETE -> 404 (polled every 100 ms):");
    println!("  {:<10} {}", "delete", figures(deletes));
}

/// "p50 X ms  p99 Y ms  max Z ms" (nearest-rank percentiles).
fn figures(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    format!(
        "p50 {:8.1} ms   p99 {:8.1} ms   max {:8.1} ms",
        rank(0.50),
        rank(0.99),
        v[v.len() - 1]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(
            figures(v),
            "p50     50.0 ms   p99     99.0 ms   max    100.0 ms"
        );
        assert_eq!(
            figures(vec![7.0]),
            "p50      7.0 ms   p99      7.0 ms   max      7.0 ms"
        );
    }

    #[test]
    fn phases_take_the_slowest_replica() {
        let c = json!({"instances": [
            {"phases_ms": {"pull": 3.0, "start": 1.0}},
            {"phases_ms": {"pull": 5.0}},
            {}
        ]});
        let p = phase_breakdown(&c);
        assert_eq!(p["pull"], 5.0);
        assert_eq!(p["start"], 1.0);
    }
}
