//! Graceful stops for real: the chosen stop signal reaches the container, its grace is waited
//! only when the container's init handles that signal, SIGKILL follows; and exec probes built the
//! way the node builds them run inside a container through the runtime's helper binary.
//!
//! Needs root (namespaces, cgroups, pivot_root) and /bin/busybox. Every test uses its own runtime
//! root and cgroup parent (random suffix) and cleans up in `Drop` even when it panics.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod runtime_support;

use std::time::{Duration, Instant};

use berth_agent::health::{ProbeCheck, ProbeSpec};
use berth_agent::host::probe_check_for;
use berth_agent::reconcile::InstanceSpec;
use berth_agent::runtime::{cgroup, parse_signal};
use berth_proto::v1::{Assignment, NetworkAttachment};
use nix::sys::signal::Signal;
use runtime_support::Fixture;

/// Removes `id` with `signal` and `grace`; returns how long it took.
fn timed_remove(f: &Fixture, id: &str, signal: Signal, grace: Duration) -> Duration {
    let t = Instant::now();
    f.runtime.remove_with_signal(id, signal, grace).unwrap();
    let took = t.elapsed();
    assert!(f.runtime.state(id).unwrap().is_none(), "{id} left state");
    assert!(
        cgroup::container_dirs(&f.parent, id).is_empty(),
        "{id} left cgroups"
    );
    took
}

#[test]
fn the_chosen_stop_signal_reaches_the_container_and_its_exit_is_waited_for() {
    let f = Fixture::with_helper();
    let id = f
        .run_shell("trap 'echo got-quit; exit 4' QUIT; echo ready; while true; do sleep 0.1; done");
    let took = timed_remove(
        &f,
        &id,
        parse_signal("QUIT").unwrap(),
        Duration::from_secs(10),
    );
    assert!(
        took < Duration::from_secs(5),
        "SIGQUIT not honoured: {took:?}"
    );
    assert!(f.output(&id).contains("got-quit"), "{}", f.output(&id));
}

#[test]
fn an_init_without_a_handler_for_the_signal_is_not_waited_for() {
    // It handles SIGTERM, but the stop signal is SIGUSR1: as pid 1 it ignores that one, so the
    // grace would be dead time.
    let f = Fixture::with_helper();
    let id = f.run_shell("trap 'echo got-term' TERM; echo ready; while true; do sleep 0.1; done");
    let took = timed_remove(&f, &id, Signal::SIGUSR1, Duration::from_secs(30));
    assert!(
        took < Duration::from_secs(12),
        "waited out the grace for a signal the init ignores: {took:?}"
    );
    assert!(!f.output(&id).contains("got-term"), "{}", f.output(&id));
}

#[test]
fn a_container_that_handles_the_signal_but_stays_is_killed_after_the_grace() {
    let f = Fixture::with_helper();
    let id = f.run_shell("trap 'echo staying' TERM; echo ready; while true; do sleep 0.1; done");
    let took = timed_remove(&f, &id, Signal::SIGTERM, Duration::from_secs(2));
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(12),
        "grace then SIGKILL: {took:?}"
    );
    assert!(f.output(&id).contains("staying"), "{}", f.output(&id));
}

#[test]
fn sigkill_as_the_stop_signal_skips_the_grace() {
    let f = Fixture::with_helper();
    let id = f.run_shell("trap 'echo got-term' TERM; echo ready; while true; do sleep 0.1; done");
    let took = timed_remove(&f, &id, Signal::SIGKILL, Duration::from_secs(30));
    assert!(took < Duration::from_secs(12), "{took:?}");
    assert!(!f.output(&id).contains("got-term"));
}

fn spec_for(id: &str) -> InstanceSpec {
    InstanceSpec::try_from(Assignment {
        instance_id: id.into(),
        container_id: "ctr-1".into(),
        image: "reg:5000/demo:1".into(),
        network: Some(NetworkAttachment {
            network_id: "net-1".into(),
            name: "n".into(),
            cidr: "10.200.0.0/24".into(),
            gateway: "10.200.0.1".into(),
            vni: 4096,
            encrypted: false,
        }),
        ip: "10.200.0.2".into(),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_probes_run_in_the_container_through_the_runtime_helper() {
    let f = Fixture::with_helper();
    let id = f.run_shell("echo ready; while true; do sleep 0.1; done");
    let exec = f.runtime.exec_helper().expect("a create helper was set");
    let spec = spec_for(&id);
    let probe = |command: &[&str]| {
        ProbeSpec::new(ProbeCheck::Exec {
            command: command.iter().map(|s| (*s).to_owned()).collect(),
        })
    };
    let state_dir = f.runtime.state_dir(&id);
    let ok = probe_check_for(&spec, &probe(&["cat", "/etc/ok"]), Some(&exec), || {
        state_dir.clone()
    })
    .unwrap();
    let passed = ok.run(Duration::from_secs(5)).await;
    assert_eq!(passed, Ok("exit code 0: fine".to_owned()));
    let bad = probe_check_for(&spec, &probe(&["test", "-e", "/nope"]), Some(&exec), || {
        state_dir.clone()
    })
    .unwrap();
    let failed = bad.run(Duration::from_secs(5)).await;
    assert_eq!(failed, Err("exit code 1".to_owned()));
}
