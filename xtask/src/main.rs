//! berth's developer commands: `cargo xtask install | up | down | test | build-ebpf | bench deploy | bench net | bench heal | bench migrate`.

mod bench;
mod bench_heal;
mod bench_migrate;
mod bench_net;
mod cluster;
mod criu;
mod ebpf;
mod image;
mod install;
mod test;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "berth's developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what berth needs on Debian 12 (apt packages, toolchain components, CRIU); idempotent.
    Install,
    /// Start a dev cluster: etcd, registry, hub and two agents on netns hosts, demo image pushed.
    Up {
        /// Where the cluster keeps its data, logs and pids.
        #[arg(long, env = "BERTH_DEV_DIR", default_value = cluster::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Stop the dev cluster and remove everything `up` made.
    Down {
        /// The state directory `up` used.
        #[arg(long, env = "BERTH_DEV_DIR", default_value = cluster::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Install, check formatting and lints, build, and run every test (what CI runs).
    Test,
    /// Build the eBPF programs (`ebpf/`) into `target/bpfel-unknown-none/release/berth-ebpf`,
    /// installing the nightly and bpf-linker first if missing; the agent embeds that object.
    BuildEbpf,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        bench: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Deploy latency (POST → every replica RUNNING), cached image and cold pulls.
    Deploy(bench::DeployArgs),
    /// TCP throughput and HTTP rate over hosts, VXLAN and WireGuard paths; service VIP vs replica IP.
    Net(bench_net::NetArgs),
    /// Healing: node death → replicas RUNNING elsewhere; agent restart → containers adopted.
    Heal(bench_heal::HealArgs),
    /// Live migration: rounds, bytes, total time, downtime (hub and client) per size, write rate, mode.
    Migrate(bench_migrate::MigrateArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Install => install::run(),
        Cmd::Up { state_dir } => cluster::up(&state_dir),
        Cmd::Down { state_dir } => cluster::down(&state_dir),
        Cmd::Test => test::run(),
        Cmd::BuildEbpf => ebpf::build(),
        Cmd::Bench {
            bench: BenchCmd::Deploy(args),
        } => bench::deploy(&args),
        Cmd::Bench {
            bench: BenchCmd::Net(args),
        } => bench_net::net(&args),
        Cmd::Bench {
            bench: BenchCmd::Heal(args),
        } => bench_heal::heal(&args),
        Cmd::Bench {
            bench: BenchCmd::Migrate(args),
        } => bench_migrate::migrate(&args),
    }
}

/// Runs a command with inherited stdio, failing with its name when it fails.
fn run(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("running {cmd:?}: {e}"))?;
    if !status.success() {
        anyhow::bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// A `cargo` command run in the workspace root with the toolchain that runs xtask.
fn cargo() -> std::process::Command {
    let mut cmd =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(berth_tests::paths::workspace_root());
    if ci() {
        cmd.env("CARGO_TERM_COLOR", "never");
        // A fresh clone builds once: incremental caches would only double the disk it needs.
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

/// Builds the eBPF object (the agent embeds it), then the release binaries.
fn build_release() -> anyhow::Result<()> {
    ebpf::build()?;
    let mut cmd = cargo();
    cmd.args(["build", "--release"]);
    for p in berth_tests::paths::BIN_PACKAGES {
        cmd.args(["-p", p]);
    }
    run(&mut cmd)
}

/// Whether we run in CI (`CI=true`): no colours, no prompts.
fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
