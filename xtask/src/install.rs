//! `cargo xtask install`: what a fresh Debian 12 machine needs to build, run and test berth.

use anyhow::{bail, Context};
use std::process::Command;

/// Debian packages berth needs, and why.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    ("etcd-server", "the hub's store"),
    ("etcd-client", "etcdctl, to look at the store"),
    ("docker-registry", "local OCI registry"),
    ("skopeo", "pushes the demo image"),
    ("umoci", "builds the demo image"),
    ("busybox-static", "the demo image's only binary"),
    ("protobuf-compiler", "protoc, for proto/"),
    ("libseccomp-dev", "youki's seccomp support"),
    ("pkg-config", "finds libseccomp and CRIU's libraries"),
    ("gcc", "links Rust binaries and C deps"),
    ("libc6-dev", "static libc for bench migrate's test program"),
    ("make", "C deps' builds"),
    ("iproute2", "bridges, veths, netns"),
    ("iputils-ping", "debugging reachability"),
    ("util-linux", "nsenter, umount"),
    ("curl", "HTTP to instances from a host"),
    ("tcpdump", "networking tests: capture on the underlay"),
    ("bpftool", "eBPF tests: lists cgroup attachments"),
    ("iperf3", "bench net: TCP throughput"),
    ("wrk", "bench net: HTTP request rate"),
    ("ca-certificates", "TLS for the package registries"),
    ("libprotobuf-dev", "CRIU build (from source: criu.rs)"),
    ("libprotobuf-c-dev", "CRIU build: protobuf-c"),
    ("protobuf-c-compiler", "CRIU build: protoc-c"),
    ("python3-protobuf", "CRIU build (ENVIRONMENT.md recipe)"),
    ("libnl-3-dev", "CRIU build: libnl"),
    ("libnet1-dev", "CRIU build: libnet"),
    ("libcap-dev", "CRIU build: libcap"),
    ("libbsd-dev", "CRIU build: libbsd"),
    ("libgnutls28-dev", "CRIU build: TLS for the page server"),
    ("libaio-dev", "CRIU build: libaio"),
    ("uuid-dev", "CRIU build: libuuid"),
    ("xz-utils", "unpacks CRIU's source tarball"),
    ("iptables", "CRIU's network lock (--tcp-established)"),
];

/// Installs what is missing; prints what it did.
pub fn run() -> anyhow::Result<()> {
    require_root()?;
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !apt_installed(p))
        .collect();
    if missing.is_empty() {
        println!("install: all {} apt packages present", APT_PACKAGES.len());
    } else {
        println!("install: apt packages missing: {}", missing.join(" "));
        crate::run(apt().arg("update").arg("-q"))?;
        crate::run(
            apt()
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )?;
        println!("install: installed {}", missing.join(" "));
    }
    crate::criu::install()?;
    toolchain()?;
    crate::ebpf::install_toolchain()?;
    crate::ebpf::install_bpf_linker()
}

fn require_root() -> anyhow::Result<()> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!("berth's install, dev cluster and tests need root (network namespaces, cgroups, mounts)");
    }
    Ok(())
}

fn apt() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn apt_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The toolchain itself comes from `rust-toolchain.toml` (rustup installed it to build this xtask);
/// make sure its clippy and rustfmt components answer too.
fn toolchain() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for (component, sub) in [("clippy", "clippy"), ("rustfmt", "fmt")] {
        let ok = crate::cargo()
            .args([sub, "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            missing.push(component);
        }
    }
    if missing.is_empty() {
        println!("install: toolchain components clippy, rustfmt present");
        return Ok(());
    }
    let mut cmd = Command::new("rustup");
    cmd.current_dir(berth_tests::paths::workspace_root())
        .args(["component", "add"])
        .args(&missing);
    crate::run(&mut cmd)?;
    println!("install: added toolchain components {}", missing.join(" "));
    Ok(())
}
