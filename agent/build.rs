//! Copies the eBPF object built by `cargo xtask build-ebpf` into OUT_DIR, where
//! `src/ebpf/loader.rs` embeds it with `aya::include_bytes_aligned!`.
//!
//! The object is built by a nightly toolchain this (stable) build cannot drive, so it is not built
//! here: a missing object stops the build with what to run.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=BERTH_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let object = match std::env::var_os("BERTH_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            // As `cargo xtask` resolves it: relative to the workspace root.
            let root = PathBuf::from(env("CARGO_MANIFEST_DIR")).join("..");
            let target = match std::env::var_os("CARGO_TARGET_DIR") {
                Some(dir) => root.join(dir),
                None => root.join("target"),
            };
            target.join("bpfel-unknown-none/release/berth-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        eprintln!(
            "error: the eBPF object {} is missing: run `cargo xtask build-ebpf` first \
             (or point BERTH_EBPF_OBJECT at a built berth-ebpf object)",
            object.display()
        );
        std::process::exit(1);
    }
    let out = PathBuf::from(env("OUT_DIR")).join("berth-ebpf.o");
    if let Err(e) = std::fs::copy(&object, &out) {
        eprintln!(
            "error: copying {} to {}: {e}",
            object.display(),
            out.display()
        );
        std::process::exit(1);
    }
}

fn env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {name} not set by cargo: {e}");
            std::process::exit(1);
        }
    }
}
