//! Pure translation of a [`ContainerConfig`] into an OCI runtime spec.
//!
//! The defaults follow what runc/containerd give a container that asks for nothing special:
//! the same mounts, masked and read-only paths, capability set and a deny-all device cgroup
//! (libcgroups then allows the standard devices). No seccomp profile is set yet: containers get
//! the default capability set as their only syscall restriction (a default profile is future work).

use std::collections::HashSet;
use std::path::PathBuf;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount,
    MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec,
    SpecBuilder, UserBuilder,
};

use super::{ContainerConfig, RuntimeError};

/// CFS period used for every container, in microseconds (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// `RLIMIT_NOFILE` (soft and hard) of container processes: runc's default. It must stay at or below
/// the agent's own hard limit because root may lack `CAP_SYS_RESOURCE` (it does on the CI hosts).
pub const NOFILE_LIMIT: u64 = 1024;

/// The kernel refuses CFS quotas below 1 ms.
const MIN_CPU_QUOTA_US: i64 = 1_000;

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// containerd's default capability set (what `docker run` grants without `--cap-add`).
const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Builds the OCI runtime spec for `cfg`, with its cgroup at `/<cgroup_parent>/<id>`.
///
/// Namespaces: pid, mount, ipc, uts, cgroup and a new network namespace (no path) that the agent
/// wires up between create and start through `/proc/<pid>/ns/net`. CPU: quota = millicores × 100
/// over a 100 ms period (at least 1 ms), shares proportional to millicores; memory: a hard limit
/// without a separate swap setting. Zero cpu/memory means unlimited.
pub fn build_spec(cfg: &ContainerConfig, cgroup_parent: &str) -> Result<Spec, RuntimeError> {
    validate(cfg, cgroup_parent)?;
    let spec_err = |source| RuntimeError::Spec {
        id: cfg.id.clone(),
        source,
    };

    let mut env = cfg.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_owned());
    }

    let caps: HashSet<Capability> = DEFAULT_CAPABILITIES.iter().copied().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(spec_err)?;

    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(cfg.uid)
                .gid(cfg.gid)
                .build()
                .map_err(spec_err)?,
        )
        .args(cfg.args.clone())
        .env(env)
        .cwd(PathBuf::from(&cfg.cwd))
        .capabilities(capabilities)
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(NOFILE_LIMIT)
            .hard(NOFILE_LIMIT)
            .build()
            .map_err(spec_err)?])
        .no_new_privileges(true)
        .build()
        .map_err(spec_err)?;

    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Cgroup,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .collect::<Result<Vec<_>, _>>()
    .map_err(spec_err)?;

    let mut resources = LinuxResourcesBuilder::default().devices(vec![
        // Deny everything first; libcgroups then allows the standard devices (null, zero, tty…).
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(spec_err)?,
    ]);
    if cfg.cpu_millis > 0 {
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .period(CPU_PERIOD_US)
                .quota(cpu_quota_us(cfg.cpu_millis))
                .shares(cpu_shares(cfg.cpu_millis))
                .build()
                .map_err(spec_err)?,
        );
    }
    if cfg.memory_bytes > 0 {
        let limit = i64::try_from(cfg.memory_bytes).map_err(|_| RuntimeError::InvalidConfig {
            id: cfg.id.clone(),
            reason: format!("memory limit {} bytes is too large", cfg.memory_bytes),
        })?;
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                .build()
                .map_err(spec_err)?,
        );
    }

    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build().map_err(spec_err)?)
        .cgroups_path(cgroups_path(cgroup_parent, &cfg.id))
        .masked_paths(
            MASKED_PATHS
                .iter()
                .map(|p| (*p).to_owned())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            READONLY_PATHS
                .iter()
                .map(|p| (*p).to_owned())
                .collect::<Vec<_>>(),
        )
        .build()
        .map_err(spec_err)?;

    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(cfg.rootfs.clone())
                .readonly(false)
                .build()
                .map_err(spec_err)?,
        )
        .process(process)
        .mounts(mounts(cfg).map_err(spec_err)?)
        .linux(linux)
        .build()
        .map_err(spec_err)?;
    if !cfg.hostname.is_empty() {
        spec.set_hostname(Some(cfg.hostname.clone()));
    }
    Ok(spec)
}

/// The cgroup path (relative to each hierarchy's root) of container `id` under `cgroup_parent`.
pub(crate) fn cgroups_path(cgroup_parent: &str, id: &str) -> PathBuf {
    PathBuf::from(format!("/{cgroup_parent}/{id}"))
}

fn cpu_quota_us(millis: u64) -> i64 {
    // millis * period / 1000 = millis * 100 for the 100 ms period.
    let quota = millis.saturating_mul(CPU_PERIOD_US) / 1000;
    i64::try_from(quota)
        .unwrap_or(i64::MAX)
        .max(MIN_CPU_QUOTA_US)
}

/// Shares like Kubernetes computes them from requests (1024 per core, minimum 2), so cores split
/// in proportion under contention as well as being capped by the quota.
fn cpu_shares(millis: u64) -> u64 {
    (millis.saturating_mul(1024) / 1000).max(2)
}

/// True when `s` is a safe single path component for youki ids and cgroup names.
pub(crate) fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'))
}

fn validate(cfg: &ContainerConfig, cgroup_parent: &str) -> Result<(), RuntimeError> {
    let invalid = |reason: String| RuntimeError::InvalidConfig {
        id: cfg.id.clone(),
        reason,
    };
    if !is_valid_name(&cfg.id) {
        return Err(invalid(format!(
            "id {:?} must be 1-128 characters of [A-Za-z0-9_+.-]",
            cfg.id
        )));
    }
    if !is_valid_name(cgroup_parent) {
        return Err(RuntimeError::InvalidCgroupParent {
            parent: cgroup_parent.to_owned(),
            reason: "must be 1-128 characters of [A-Za-z0-9_+.-]",
        });
    }
    if cfg.args.is_empty() {
        return Err(invalid("no process args".to_owned()));
    }
    if !cfg.rootfs.is_absolute() {
        return Err(invalid(format!(
            "rootfs {} is not absolute",
            cfg.rootfs.display()
        )));
    }
    if !cfg.cwd.starts_with('/') {
        return Err(invalid(format!("cwd {:?} is not absolute", cfg.cwd)));
    }
    if let Some(bad) = cfg.env.iter().find(|e| !e.contains('=')) {
        return Err(invalid(format!("env entry {bad:?} is not K=V")));
    }
    Ok(())
}

fn mount(
    dest: &str,
    typ: &str,
    source: &str,
    options: &[&str],
) -> Result<Mount, oci_spec::OciSpecError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|o| (*o).to_owned()).collect::<Vec<_>>())
        .build()
}

/// runc's default mounts, then the instance's own.
fn mounts(cfg: &ContainerConfig) -> Result<Vec<Mount>, oci_spec::OciSpecError> {
    let mut mounts = default_mounts()?;
    if let Some(resolv) = &cfg.resolv_conf {
        mounts.push(
            MountBuilder::default()
                .destination("/etc/resolv.conf")
                .typ("bind")
                .source(resolv.clone())
                .options(vec!["rbind".to_owned(), "ro".to_owned()])
                .build()?,
        );
    }
    Ok(mounts)
}

/// runc's default mounts.
fn default_mounts() -> Result<Vec<Mount>, oci_spec::OciSpecError> {
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
    ])
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
