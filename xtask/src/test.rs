//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use berth_tests::paths::target_dir;
use std::process::Command;

/// Install, fmt, clippy, build, then every test of the workspace (unit, integration, end-to-end).
pub fn run() -> anyhow::Result<()> {
    crate::install::run()?;
    // The agent embeds the eBPF object: build it before anything compiles the agent.
    println!("==> cargo xtask build-ebpf");
    crate::ebpf::build()?;
    step(
        "cargo fmt --check",
        crate::cargo().args(["fmt", "--all", "--check"]),
    )?;
    step(
        "cargo clippy",
        crate::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // `--all-targets` includes the berth binaries the e2e harness runs; BERTH_BIN_DIR below tells the
    // harness they are fresh, so it need not call cargo itself.
    step(
        "cargo build",
        crate::cargo().args(["build", "--workspace", "--all-targets"]),
    )?;
    let bin_dir = target_dir().join("debug");
    if nextest_present() {
        // nextest does not run doctests; they go first so that the run's closing summary is
        // nextest's, which counts every test.
        step(
            "cargo test --doc",
            crate::cargo()
                .args(["test", "--workspace", "--doc"])
                .env("BERTH_BIN_DIR", &bin_dir),
        )?;
        let mut t = crate::cargo();
        t.args(["nextest", "run", "--workspace", "--no-fail-fast"])
            .env("BERTH_BIN_DIR", &bin_dir);
        if crate::ci() {
            t.args(["--color", "never"]);
        }
        step("cargo nextest run", &mut t)?;
    } else {
        step(
            "cargo test",
            crate::cargo()
                .args(["test", "--workspace", "--no-fail-fast"])
                .env("BERTH_BIN_DIR", &bin_dir),
        )?;
    }
    println!("xtask test: all passed");
    Ok(())
}

fn step(name: &str, cmd: &mut Command) -> anyhow::Result<()> {
    println!("==> {name}");
    crate::run(cmd)
}

fn nextest_present() -> bool {
    crate::cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}
