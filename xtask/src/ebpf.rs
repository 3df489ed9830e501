//! `cargo xtask build-ebpf`: builds `ebpf/` (berth's eBPF programs) into
//! `target/bpfel-unknown-none/release/berth-ebpf`, where `agent/build.rs` picks it up.
//!
//! The eBPF crate needs a nightly (`-Z build-std=core`) with `rust-src`, and `bpf-linker` built
//! against **that nightly's own LLVM**: rustc hands bpf-linker LLVM bitcode, and LLVM only reads
//! bitcode from its own or older versions. nightly-2026-08-20 ships LLVM 23, Debian 12 packages only
//! LLVM 22, so bpf-linker is built with `llvm-23,no-llvm-linking` and linked to the
//! `libLLVM-23-rust-*.so` inside the toolchain (rpath), into a directory of its own so that it
//! never shadows another `bpf-linker`.

use anyhow::{bail, Context};
use berth_tests::paths::{target_dir, workspace_root};
use std::path::PathBuf;
use std::process::Command;

/// The nightly that builds the eBPF programs (also named in `ebpf/rust-toolchain.toml`).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-08-20";
/// The bpf-linker release installed for it.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM major version of [`EBPF_TOOLCHAIN`] (`rustc -vV`), selecting bpf-linker's feature.
const EBPF_LLVM_MAJOR: &str = "23";

/// Where `build()` leaves the object (`aya` loads this ELF file as is).
pub fn object_path() -> PathBuf {
    target_dir()
        .join("bpfel-unknown-none")
        .join("release")
        .join("berth-ebpf")
}

/// Installs what is missing (nightly + rust-src, bpf-linker) then builds the object.
pub fn build() -> anyhow::Result<()> {
    install_toolchain()?;
    install_bpf_linker()?;
    let mut cmd = rustup_run();
    cmd.args([
        "cargo",
        "build",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
    ])
    .arg(target_dir())
    .current_dir(workspace_root().join("ebpf"))
    .env("PATH", path_with_linker()?);
    if crate::ci() {
        cmd.env("CARGO_TERM_COLOR", "never");
    }
    crate::run(&mut cmd)?;
    let object = object_path();
    if !object.is_file() {
        bail!("build-ebpf: {} missing after the build", object.display());
    }
    println!("build-ebpf: {}", object.display());
    Ok(())
}

/// `rustup run <nightly>`, with what the outer `cargo xtask` (stable) put in the environment removed
/// so that it cannot leak into the nightly build.
fn rustup_run() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", EBPF_TOOLCHAIN]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// `rustup toolchain install <nightly> --profile minimal --component rust-src` when missing.
pub fn install_toolchain() -> anyhow::Result<()> {
    let present = rustup_run()
        .args(["rustc", "--print", "sysroot"])
        .output()
        .is_ok_and(|o| o.status.success())
        && rust_src_present()?;
    if present {
        println!("install: {EBPF_TOOLCHAIN} with rust-src present");
        return Ok(());
    }
    crate::run(Command::new("rustup").args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    // `toolchain install` of an already present toolchain does not add the component.
    crate::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))?;
    println!("install: installed {EBPF_TOOLCHAIN} with rust-src");
    Ok(())
}

fn rust_src_present() -> anyhow::Result<bool> {
    Ok(sysroot()?
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file())
}

fn sysroot() -> anyhow::Result<PathBuf> {
    let out = rustup_run()
        .args(["rustc", "--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    if !out.status.success() {
        bail!("{EBPF_TOOLCHAIN} is not installed (rustc --print sysroot failed)");
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

/// Root of the bpf-linker install for [`EBPF_TOOLCHAIN`] (`$CARGO_HOME/berth/bpf-linker-<nightly>`).
fn linker_root() -> anyhow::Result<PathBuf> {
    let cargo_home = match std::env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cargo"),
    };
    Ok(cargo_home
        .join("berth")
        .join(format!("bpf-linker-{EBPF_TOOLCHAIN}")))
}

fn path_with_linker() -> anyhow::Result<std::ffi::OsString> {
    let mut dirs = vec![linker_root()?.join("bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).context("joining PATH")
}

/// Builds bpf-linker against the nightly's libLLVM when `<root>/bin/bpf-linker --version` does not
/// answer (about 2 minutes).
pub fn install_bpf_linker() -> anyhow::Result<()> {
    let root = linker_root()?;
    let linker = root.join("bin").join("bpf-linker");
    if Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("install: {} present", linker.display());
        return Ok(());
    }
    install_toolchain()?;
    let lib_dir = sysroot()?.join("lib");
    let llvm_lib = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with(&format!("libLLVM-{EBPF_LLVM_MAJOR}")) && n.ends_with(".so"))
        .with_context(|| {
            format!(
                "no libLLVM-{EBPF_LLVM_MAJOR}-*.so in {} (has {EBPF_TOOLCHAIN} changed LLVM?)",
                lib_dir.display()
            )
        })?;
    let llvm_lib = llvm_lib
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_owned();
    let rustflags = format!(
        "-L native={dir} -l dylib={llvm_lib} -C link-arg=-Wl,-rpath,{dir}",
        dir = lib_dir.display()
    );
    println!("install: building bpf-linker {BPF_LINKER_VERSION} against {llvm_lib}");
    let mut cmd = crate::cargo();
    cmd.args([
        "install",
        "bpf-linker",
        "--locked",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        &format!("llvm-{EBPF_LLVM_MAJOR},no-llvm-linking"),
        "--root",
    ])
    .arg(&root)
    .env("RUSTFLAGS", rustflags)
    .env_remove("CARGO_TARGET_DIR");
    crate::run(&mut cmd)?;
    println!("install: installed {}", linker.display());
    Ok(())
}
