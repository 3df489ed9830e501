//! Where the workspace, its target directory and the berth binaries are.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The cargo profile the berth binaries are taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `target/debug` (what `cargo test` builds).
    Debug,
    /// `target/release` (what `xtask up` and `xtask bench` use).
    Release,
}

impl Profile {
    fn dir_name(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// Paths of the three berth executables.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `berth-hub`.
    pub hub: PathBuf,
    /// `berth-agent`.
    pub agent: PathBuf,
    /// `berth` (the CLI).
    pub cli: PathBuf,
}

/// Packages whose binaries the cluster runs.
pub const BIN_PACKAGES: [&str; 3] = ["berth-hub", "berth-agent", "berth-cli"];

impl Binaries {
    /// Binaries in `dir` (no build).
    pub fn in_dir(dir: &Path) -> Binaries {
        Binaries {
            hub: dir.join("berth-hub"),
            agent: dir.join("berth-agent"),
            cli: dir.join("berth"),
        }
    }

    /// The binaries of `profile`, built first so a test never runs stale ones.
    ///
    /// `BERTH_BIN_DIR` (absolute, or relative to the workspace) overrides this (no build): `xtask test` builds once and sets it. Otherwise cargo
    /// runs once per process; when everything is fresh that is a no-op of well under a second.
    pub fn locate(profile: Profile) -> anyhow::Result<Binaries> {
        if let Some(dir) = std::env::var_os("BERTH_BIN_DIR") {
            // Relative to the workspace: tests run in their crate's directory.
            let bins = Binaries::in_dir(&workspace_root().join(dir));
            bins.check()?;
            return Ok(bins);
        }
        static BUILT: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
        let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
        if !built.contains(&profile.dir_name()) {
            build(profile)?;
            built.push(profile.dir_name());
        }
        let bins = Binaries::in_dir(&target_dir().join(profile.dir_name()));
        bins.check()?;
        Ok(bins)
    }

    fn check(&self) -> anyhow::Result<()> {
        for p in [&self.hub, &self.agent, &self.cli] {
            if !p.is_file() {
                bail!("berth binary {} is missing", p.display());
            }
        }
        Ok(())
    }
}

/// `cargo build [--release] -p berth-hub -p berth-agent -p berth-cli` in the workspace.
pub fn build(profile: Profile) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .arg("build")
        .arg("--quiet");
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    for p in BIN_PACKAGES {
        cmd.args(["-p", p]);
    }
    let status = cmd
        .status()
        .context("running cargo build for the berth binaries")?;
    if !status.success() {
        bail!("cargo build of the berth binaries failed ({status})");
    }
    Ok(())
}

/// The workspace root (the directory holding the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => workspace_root().join(d),
        None => workspace_root().join("target"),
    }
}

/// Scratch space of the harness under the target dir (cached images, kept logs).
pub fn harness_dir() -> PathBuf {
    target_dir().join("berth-tests")
}
