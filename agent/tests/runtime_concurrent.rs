//! Many containers through the create helper at once, as a node given a batch of replicas runs
//! them: only helper creates here (as in the agent), so no libcontainer clone happens in this
//! multi-threaded test process.
//!
//! Needs root (namespaces, cgroups, pivot_root) and /bin/busybox.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod runtime_support;

use std::path::PathBuf;
use std::time::Duration;

use berth_agent::runtime::{cgroup, ContainerConfig, Status};
use runtime_support::{wait_for, Fixture};

/// Creates through the helper take only their own id's lock: many at once (as a node given a batch
/// of replicas does) each get their own container, output, exit status and cleanup, and what runs
/// beside them (state of the others, starts, removes) keeps working. Starts reach each init's
/// notify socket through the process's working directory; unguarded, two at once started each
/// other's containers and one of them failed.
#[test]
fn concurrent_creates_through_the_helper_keep_containers_apart() {
    let f = Fixture::with_helper();
    let configs: Vec<ContainerConfig> = (0..16)
        .map(|i| f.config(&["sh", "-c", &format!("echo out-{i}; sleep 1; exit {i}")]))
        .collect();
    let logs: Vec<PathBuf> = configs.iter().map(|c| f.log(&c.id)).collect();
    let runtime = &f.runtime;
    // Every create at once, then every start at once: the starts overlap for sure. Two scoped
    // phases rather than a barrier inside one, so a create that fails fails the test instead of
    // leaving the others waiting for it forever.
    let pids: Vec<i32> = std::thread::scope(|s| {
        let handles: Vec<_> = configs
            .iter()
            .zip(&logs)
            .map(|(cfg, log)| {
                s.spawn(move || {
                    let pid = runtime.create(cfg, log).unwrap();
                    // Other creates are in flight meanwhile: this id answers on its own.
                    let state = runtime.state(&cfg.id).unwrap().unwrap();
                    assert_eq!(state.status, Status::Created, "{}", cfg.id);
                    assert_eq!(state.pid, Some(pid));
                    pid
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    std::thread::scope(|s| {
        for cfg in &configs {
            s.spawn(move || runtime.start(&cfg.id).unwrap());
        }
    });
    let mut unique = pids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), pids.len(), "one init per container: {pids:?}");

    let mut reaped = Vec::new();
    wait_for("every exit", Duration::from_secs(20), || {
        reaped.extend(runtime.reap());
        reaped.len() == configs.len()
    });
    reaped.sort();
    let mut expected: Vec<(String, i32)> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.clone(), i as i32))
        .collect();
    expected.sort();
    assert_eq!(reaped, expected, "each exit status reaches its own id");
    for (i, log) in logs.iter().enumerate() {
        wait_for("log", Duration::from_secs(5), || {
            std::fs::read_to_string(log).is_ok_and(|l| l.contains(&format!("out-{i}\n")))
        });
        assert!(!std::fs::read_to_string(log)
            .unwrap()
            .contains(&format!("out-{}\n", (i + 1) % configs.len())));
    }
    std::thread::scope(|s| {
        for cfg in &configs {
            s.spawn(move || runtime.remove(&cfg.id, Duration::ZERO).unwrap());
        }
    });
    for cfg in &configs {
        assert_eq!(runtime.state(&cfg.id).unwrap(), None);
        assert!(cgroup::container_dirs(&f.parent, &cfg.id).is_empty());
    }
}
