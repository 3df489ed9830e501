//! `cargo xtask bench heal`: how fast berth heals around a dead node, and how fast a restarted agent
//! adopts the containers it left running.
//!
//! Node death: a private 3-node cluster (release binaries) runs N replicas; one node is killed outright
//! (agent, containers and network namespace gone, as a machine dying); timed from the kill to every
//! replica RUNNING on the other nodes, with the moments the node was shown DOWN, every replica had a
//! place off it, and the first moved one ran (where the time goes: detection, placement, start). The
//! figure includes the liveness lease running out and the DOWN delay.
//!
//! Agent restart: one node runs M containers; its agent is killed with SIGKILL and started again;
//! timed from the new process's start to every instance reported RUNNING by it (each instance's
//! `updated_at` after the restart), and checked that no container was restarted (same init pids).

use anyhow::{bail, Context};
use berth_tests::api::{all_running, instances, placements};
use berth_tests::{Cluster, Profile};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Options of `bench heal`.
#[derive(clap::Args)]
pub struct HealArgs {
    /// Replica counts for the node-death measurement (one cluster each).
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    replicas: Vec<usize>,
    /// Containers the restarted agent must adopt (0: skip).
    #[arg(long, default_value_t = 100)]
    adopt: usize,
}

/// How long a deploy or a heal may take before the bench gives up.
const TIMEOUT: Duration = Duration::from_secs(600);

/// Runs the benchmark and prints the figures.
pub fn heal(args: &HealArgs) -> anyhow::Result<()> {
    crate::install::run()?;
    println!("bench: building release binaries");
    crate::build_release()?;
    let mut lines = Vec::new();
    for &n in &args.replicas {
        lines.push(node_death(n)?);
        println!("{}", lines[lines.len() - 1]);
    }
    if args.adopt > 0 {
        lines.push(agent_restart(args.adopt)?);
        println!("{}", lines[lines.len() - 1]);
    }
    println!(
        "\nheal figures (release build; hub, etcd and every agent share this machine's CPUs):"
    );
    for l in &lines {
        println!("  {l}");
    }
    Ok(())
}

fn cluster(nodes: usize) -> anyhow::Result<Cluster> {
    Cluster::builder()
        .nodes(nodes)
        .profile(Profile::Release)
        .node_capacity("64", "64GB")
        .start()
}

fn deploy(cluster: &Cluster, replicas: usize) -> anyhow::Result<(String, Value)> {
    let api = cluster.api();
    api.create_network("heal", "10.60.0.0/22")?;
    let id = api.create_container(&json!({
        "image": cluster.demo_image(), "cpu": "0.01", "memory": "16MB",
        "network_id": "heal", "replicas": replicas,
    }))?;
    let c = api.wait_running(&id, replicas, TIMEOUT)?;
    Ok((id, c))
}

/// Polls every 20 ms until `done` says yes; returns the elapsed time since `since`.
fn time_until(
    since: Instant,
    what: &str,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    loop {
        if done()? {
            return Ok(since.elapsed());
        }
        if since.elapsed() > TIMEOUT {
            bail!("timed out after {TIMEOUT:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn node_death(replicas: usize) -> anyhow::Result<String> {
    println!("bench: node death with {replicas} replicas over 3 nodes");
    let mut cluster = cluster(3)?;
    let (id, c) = deploy(&cluster, replicas)?;
    let victim = 2;
    let victim_id = cluster.node_ids()[victim].clone();
    let on_victim = placements(&c)
        .iter()
        .filter(|(_, n, _)| *n == victim_id)
        .count();
    let before: std::collections::BTreeSet<String> =
        placements(&c).into_iter().map(|(iid, _, _)| iid).collect();
    let api = cluster.api().clone();
    let killed = Instant::now();
    cluster.kill_node(victim)?;
    let mut down_at = None;
    let mut placed_at = None;
    let mut first_running_at = None;
    let healed = time_until(killed, "every replica RUNNING elsewhere", || {
        if down_at.is_none() {
            let down = api
                .nodes()?
                .iter()
                .any(|n| n["node_id"] == victim_id.as_str() && n["status"] == "DOWN");
            if down {
                down_at = Some(killed.elapsed());
            }
        }
        let Some(c) = api.container(&id)? else {
            bail!("container {id} vanished");
        };
        let insts = instances(&c);
        let away: Vec<&Value> = insts
            .iter()
            .filter(|i| i["node_id"] != victim_id.as_str())
            .collect();
        // The moved replicas: every replica has a place off the dead node, and some of the new ones run.
        if placed_at.is_none() && away.len() >= replicas {
            placed_at = Some(killed.elapsed());
        }
        let running = away.iter().filter(|i| i["status"] == "RUNNING").count();
        if first_running_at.is_none() && running > replicas - on_victim {
            first_running_at = Some(killed.elapsed());
        }
        Ok(all_running(&c, replicas) && placements(&c).iter().all(|(_, n, _)| *n != victim_id))
    })?;
    // Where a moved replica's start went (the slowest moved replica per phase).
    let Some(c) = api.container(&id)? else {
        bail!("container {id} vanished");
    };
    let moved = json!({
        "instances": instances(&c)
            .into_iter()
            .filter(|i| !before.contains(i["instance_id"].as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
    });
    let phases = crate::bench::phase_breakdown(&moved)
        .iter()
        .map(|(p, ms)| format!("{p} {ms:.0} ms"))
        .collect::<Vec<_>>()
        .join(", ");
    let at = |d: Option<Duration>| {
        d.map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| "not seen".into())
    };
    Ok(format!(
        "node killed with {on_victim} of {replicas} replicas on it: all {replicas} RUNNING elsewhere \
         after {:.2} s (node shown DOWN at {}, all replicas placed off it at {}, first moved one \
         RUNNING at {}; lease 3 s + DOWN delay 2 s by default; slowest moved replica per phase: {})",
        healed.as_secs_f64(),
        at(down_at),
        at(placed_at),
        at(first_running_at),
        phases,
    ))
}

fn agent_restart(containers: usize) -> anyhow::Result<String> {
    println!("bench: agent restart adopting {containers} containers on one node");
    let mut cluster = cluster(1)?;
    let (id, c) = deploy(&cluster, containers)?;
    let node = cluster.node_ids()[0].clone();
    let pids_before = init_pids(&cluster, &node, &c)?;
    let api = cluster.api().clone();
    cluster.kill_agent(0);
    let started = Instant::now();
    let restart_wall = time::OffsetDateTime::now_utc();
    cluster.start_agent(0)?;
    let adopted = time_until(started, "every instance reported RUNNING again", || {
        let Some(c) = api.container(&id)? else {
            bail!("container {id} vanished");
        };
        let fresh = instances(&c).iter().all(|i| {
            i["status"] == "RUNNING"
                && i["updated_at"]
                    .as_str()
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .is_some_and(|t| t >= restart_wall)
        });
        Ok(instances(&c).len() == containers && fresh)
    })?;
    let c = api
        .container(&id)?
        .context("container vanished after the restart")?;
    let pids_after = init_pids(&cluster, &node, &c)?;
    let restarted = pids_before
        .iter()
        .filter(|(iid, pid)| pids_after.get(*iid) != Some(pid))
        .count();
    if restarted > 0 {
        bail!("{restarted} of {containers} containers were restarted by the agent restart");
    }
    Ok(format!(
        "agent killed (SIGKILL) and started again with {containers} containers: all reported RUNNING \
         by the new process {:.2} s after its start; 0 restarted (same init pids)",
        adopted.as_secs_f64()
    ))
}

/// Instance id → init pid (the first process of its cgroup).
fn init_pids(cluster: &Cluster, node: &str, c: &Value) -> anyhow::Result<BTreeMap<String, u32>> {
    placements(c)
        .into_iter()
        .map(|(iid, _, _)| {
            let pid = cluster
                .init_pid(node, &iid)
                .with_context(|| format!("no process in the cgroup of {iid}"))?;
            Ok((iid, pid))
        })
        .collect()
}
