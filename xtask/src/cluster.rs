//! `cargo xtask up` / `down`: a dev cluster on this machine, built from the e2e harness.

use anyhow::bail;
use berth_tests::{Cluster, ClusterState, Profile};
use std::path::Path;

/// Where `up` keeps data, logs, pids (`state.json`) unless `--state-dir`/`BERTH_DEV_DIR` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth-dev";
/// The dev cluster's bridge (10.250.0.1/24).
const DEV_BRIDGE: &str = "berthdev0";

/// Installs, builds the release binaries, starts the cluster detached and prints what to try.
pub fn up(state_dir: &Path) -> anyhow::Result<()> {
    if state_dir.join("state.json").exists() || berth_tests::netns::link_exists(DEV_BRIDGE) {
        bail!(
            "a dev cluster is already up (state in {}); run `cargo xtask down` first",
            state_dir.display()
        );
    }
    crate::install::run()?;
    println!("up: building the eBPF object and release binaries");
    crate::build_release()?;
    println!("up: starting etcd, registry, hub and two agents");
    let cluster = Cluster::builder()
        .dev(state_dir)
        .profile(Profile::Release)
        .node_capacity("4", "8GB")
        .start()?;
    let state = cluster.detach()?;
    print_welcome(&state);
    Ok(())
}

/// Stops what `up` started and removes everything it made.
pub fn down(state_dir: &Path) -> anyhow::Result<()> {
    let state = match ClusterState::load(state_dir) {
        Ok(s) => s,
        Err(e) if state_dir.exists() || berth_tests::netns::link_exists(DEV_BRIDGE) => {
            // No usable state: still remove the fixed-name parts `up` makes.
            println!("down: {e:#}; removing the dev cluster's fixed-name parts only");
            let state = dev_plan(state_dir)?;
            report(state.teardown());
            return Ok(());
        }
        Err(_) => {
            println!("down: no dev cluster (nothing in {})", state_dir.display());
            return Ok(());
        }
    };
    for p in &state.processes {
        println!("down: stopping {} (pid {})", p.name, p.pid);
    }
    report(state.teardown());
    println!(
        "down: removed {}, its hosts and {}",
        state.topology.bridge,
        state.run_dir.display()
    );
    Ok(())
}

fn report(errors: Vec<String>) {
    for e in errors {
        eprintln!("down: could not clean up: {e}");
    }
}

/// The dev cluster's names without anything running (for `down` without a state file).
fn dev_plan(state_dir: &Path) -> anyhow::Result<ClusterState> {
    let hosts: Vec<(String, String)> = (1..=2)
        .map(|i| (format!("berth-dev-node{i}"), format!("berthdev-n{i}")))
        .collect();
    Ok(ClusterState {
        prefix: "berth-dev".into(),
        run_dir: state_dir.to_path_buf(),
        topology: berth_tests::netns::Topology::plan(DEV_BRIDGE, [10, 250, 0], &hosts),
        node_ids: vec!["dev-node1".into(), "dev-node2".into()],
        etcd_url: String::new(),
        hub_api: String::new(),
        hub_grpc: String::new(),
        registry: String::new(),
        demo_image: None,
        processes: Vec::new(),
    })
}

fn print_welcome(s: &ClusterState) {
    let bin = berth_tests::paths::target_dir().join("release");
    let image = s.demo_image.clone().unwrap_or_default();
    let logs = s.run_dir.join("logs");
    println!();
    println!(
        "berth dev cluster is up (state and data in {})",
        s.run_dir.display()
    );
    println!("  etcd      {}", s.etcd_url);
    println!("  registry  {}   demo image {image}", s.registry);
    println!("  hub       REST {}   gRPC {}", s.hub_api, s.hub_grpc);
    for (id, h) in s.node_ids.iter().zip(&s.topology.hosts) {
        println!("  node      {id} on host netns {} ({})", h.netns, h.ip);
    }
    println!("  logs      {}/*.log", logs.display());
    println!();
    println!("Try:");
    println!("  export PATH={}:$PATH", bin.display());
    println!("  export BERTH_HUB={}", s.hub_api);
    println!("  berth network create payments --cidr 10.10.0.0/16");
    println!("  berth run {image} --cpu 0.5 --memory 64MB --replicas 3 --network payments");
    println!("  berth ps");
    println!("  berth inspect <container_id>          # each replica's node and ip");
    if let (Some(id), Some(h)) = (s.node_ids.first(), s.topology.hosts.first()) {
        println!(
            "  nsenter --net=/run/netns/{} curl -s http://<ip of a replica on {id}>/",
            h.netns
        );
    }
    println!("  berth scale <container_id> 5");
    println!("  berth nodes");
    println!("  berth rm <container_id>");
    println!("(without BERTH_HUB: berth --hub {} ...)", s.hub_api);
    println!();
    println!("Stop and remove everything: cargo xtask down");
}
