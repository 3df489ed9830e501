//! Unit tests of `spec` (pure: no root needed).
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::path::PathBuf;

use oci_spec::runtime::{Capability, LinuxNamespaceType, PosixRlimitType, Spec};

use super::*;

fn cfg() -> ContainerConfig {
    ContainerConfig {
        id: "ins-0123456789ab".into(),
        rootfs: PathBuf::from("/var/lib/berth/rootfs/ins-0123456789ab"),
        args: vec!["/bin/httpd".into(), "-f".into()],
        env: vec!["FOO=bar".into()],
        cwd: "/srv".into(),
        uid: 1000,
        gid: 100,
        hostname: "web-1".into(),
        cpu_millis: 500,
        memory_bytes: 64 * 1024 * 1024,
        resolv_conf: None,
    }
}

fn resources(spec: &Spec) -> &oci_spec::runtime::LinuxResources {
    spec.linux().as_ref().unwrap().resources().as_ref().unwrap()
}

#[test]
fn public_types_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<super::super::Runtime>();
    send_sync::<RuntimeError>();
}

#[test]
fn cpu_and_memory_limits() {
    let spec = build_spec(&cfg(), "berth-node1").unwrap();
    let cpu = resources(&spec).cpu().as_ref().unwrap();
    assert_eq!(cpu.period(), Some(100_000));
    assert_eq!(cpu.quota(), Some(50_000));
    assert_eq!(cpu.shares(), Some(512));
    let mem = resources(&spec).memory().as_ref().unwrap();
    assert_eq!(mem.limit(), Some(64 * 1024 * 1024));
    assert_eq!(mem.swap(), None);
}

#[test]
fn cpu_math_edges() {
    assert_eq!(cpu_quota_us(1000), 100_000);
    assert_eq!(cpu_quota_us(2500), 250_000);
    assert_eq!(cpu_quota_us(1), MIN_CPU_QUOTA_US);
    assert_eq!(
        cpu_quota_us(u64::MAX),
        i64::try_from(u64::MAX / 1000).unwrap()
    );
    assert_eq!(cpu_shares(1), 2);
    assert_eq!(cpu_shares(2000), 2048);
}

#[test]
fn zero_limits_mean_unlimited() {
    let mut c = cfg();
    c.cpu_millis = 0;
    c.memory_bytes = 0;
    let spec = build_spec(&c, "berth-node1").unwrap();
    assert!(resources(&spec).cpu().is_none());
    assert!(resources(&spec).memory().is_none());
}

#[test]
fn huge_memory_is_rejected() {
    let mut c = cfg();
    c.memory_bytes = u64::MAX;
    assert!(matches!(
        build_spec(&c, "p"),
        Err(RuntimeError::InvalidConfig { .. })
    ));
}

#[test]
fn namespaces_include_a_new_network_namespace() {
    let spec = build_spec(&cfg(), "berth-node1").unwrap();
    let ns = spec
        .linux()
        .as_ref()
        .unwrap()
        .namespaces()
        .as_ref()
        .unwrap();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Cgroup,
    ] {
        let n = ns
            .iter()
            .find(|n| n.typ() == typ)
            .unwrap_or_else(|| panic!("{typ:?} missing"));
        assert!(n.path().is_none(), "{typ:?} must be a new namespace");
    }
    assert!(!ns.iter().any(|n| n.typ() == LinuxNamespaceType::User));
}

#[test]
fn cgroups_path_is_under_the_parent() {
    let spec = build_spec(&cfg(), "berth-node1").unwrap();
    assert_eq!(
        spec.linux().as_ref().unwrap().cgroups_path().as_deref(),
        Some(std::path::Path::new("/berth-node1/ins-0123456789ab"))
    );
}

#[test]
fn process_fields() {
    let spec = build_spec(&cfg(), "berth-node1").unwrap();
    let p = spec.process().as_ref().unwrap();
    assert_eq!(p.args().as_ref().unwrap(), &["/bin/httpd", "-f"]);
    let env = p.env().as_ref().unwrap();
    assert!(env.contains(&"FOO=bar".to_owned()));
    assert!(env.iter().any(|e| e.starts_with("PATH=")));
    assert_eq!(p.cwd(), std::path::Path::new("/srv"));
    assert_eq!(p.user().uid(), 1000);
    assert_eq!(p.user().gid(), 100);
    assert_eq!(p.terminal(), Some(false));
    let caps = p.capabilities().as_ref().unwrap();
    let bounding = caps.bounding().as_ref().unwrap();
    assert!(bounding.contains(&Capability::NetBindService));
    assert!(!bounding.contains(&Capability::SysAdmin));
    let rl = &p.rlimits().as_ref().unwrap()[0];
    assert_eq!(rl.typ(), PosixRlimitType::RlimitNofile);
    assert_eq!(rl.hard(), NOFILE_LIMIT);
    assert_eq!(
        p.oom_score_adj(),
        None,
        "libcontainer would write the agent's own"
    );
    assert_eq!(spec.hostname().as_deref(), Some("web-1"));
    let root = spec.root().as_ref().unwrap();
    assert_eq!(root.path(), &cfg().rootfs);
    assert_eq!(root.readonly(), Some(false));
    assert!(spec.linux().as_ref().unwrap().seccomp().is_none());
}

#[test]
fn caller_path_is_kept() {
    let mut c = cfg();
    c.env = vec!["PATH=/opt/bin".into()];
    let spec = build_spec(&c, "p").unwrap();
    let env = spec.process().as_ref().unwrap().env().as_ref().unwrap();
    assert_eq!(env, &["PATH=/opt/bin"]);
}

#[test]
fn mounts_and_masks() {
    let spec = build_spec(&cfg(), "p").unwrap();
    let dests: Vec<_> = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.destination().to_str().unwrap().to_owned())
        .collect();
    for d in [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/shm",
        "/dev/mqueue",
        "/sys",
        "/sys/fs/cgroup",
    ] {
        assert!(dests.contains(&d.to_owned()), "{d} missing");
    }
    let linux = spec.linux().as_ref().unwrap();
    assert!(linux
        .masked_paths()
        .as_ref()
        .unwrap()
        .contains(&"/proc/kcore".to_owned()));
    assert!(linux
        .readonly_paths()
        .as_ref()
        .unwrap()
        .contains(&"/proc/sys".to_owned()));
}

#[test]
fn spec_round_trips_through_json() {
    let spec = build_spec(&cfg(), "p").unwrap();
    let json = serde_json::to_string(&spec).unwrap();
    let back: Spec = serde_json::from_str(&json).unwrap();
    assert_eq!(back, spec);
    assert!(json.contains("\"cgroupsPath\":\"/p/ins-0123456789ab\""));
}

#[test]
fn invalid_configs_are_rejected() {
    type Mutate = Box<dyn Fn(&mut ContainerConfig)>;
    let cases: Vec<(&str, Mutate)> = vec![
        ("empty args", Box::new(|c| c.args.clear())),
        ("bad id", Box::new(|c| c.id = "../etc".into())),
        ("empty id", Box::new(|c| c.id.clear())),
        ("relative rootfs", Box::new(|c| c.rootfs = "rootfs".into())),
        ("relative cwd", Box::new(|c| c.cwd = "srv".into())),
        ("bad env", Box::new(|c| c.env = vec!["NOEQUALS".into()])),
    ];
    for (what, mutate) in cases {
        let mut c = cfg();
        mutate(&mut c);
        assert!(
            matches!(build_spec(&c, "p"), Err(RuntimeError::InvalidConfig { .. })),
            "{what} accepted"
        );
    }
    for parent in ["", "a/b", "..", "x y"] {
        assert!(matches!(
            build_spec(&cfg(), parent),
            Err(RuntimeError::InvalidCgroupParent { .. })
        ));
    }
}

#[test]
fn resolv_conf_is_bind_mounted_read_only() {
    let spec = build_spec(&cfg(), "berth-n1").unwrap();
    assert!(!spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .any(|m| m.destination() == std::path::Path::new("/etc/resolv.conf")));
    let mut with = cfg();
    with.resolv_conf = Some(PathBuf::from("/var/lib/berth/instances/x/resolv.conf"));
    let spec = build_spec(&with, "berth-n1").unwrap();
    let m = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination() == std::path::Path::new("/etc/resolv.conf"))
        .expect("a resolv.conf mount");
    assert_eq!(m.typ().as_deref(), Some("bind"));
    assert_eq!(
        m.source().as_deref(),
        Some(std::path::Path::new(
            "/var/lib/berth/instances/x/resolv.conf"
        ))
    );
    assert!(m.options().as_ref().unwrap().contains(&"ro".to_owned()));
}
