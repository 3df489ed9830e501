//! The harness itself: hosts reach the bridge and the registry serves the demo image to them, and
//! dropping the cluster leaves nothing behind, even when the test fails.

use berth_tests::{netns::link_exists, Cluster};

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

#[test]
fn hosts_reach_the_registry_and_teardown_leaves_nothing() {
    let cluster = Cluster::builder()
        .infra_only()
        .start()
        .expect("starting hosts, etcd and registry");
    let state = cluster.state().clone();
    let node = &state.node_ids[1];

    // The agents pull from inside their host: the manifest must be reachable from there.
    let url = format!(
        "http://{}/v2/{}/manifests/{}",
        cluster.registry(),
        berth_tests::image::DEMO_REPO,
        berth_tests::image::DEMO_TAG
    );
    let out = cluster
        .on_host(
            node,
            "curl",
            &[
                "-sS",
                "--max-time",
                "3",
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
                &url,
            ],
        )
        .expect("curl from a host");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains("layers"),
        "manifest not served to {node}: {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No default route: an outside address must fail at once instead of reaching the sandbox gateway.
    let out = cluster
        .on_host(node, "ip", &["route", "get", "1.1.1.1"])
        .expect("ip route from a host");
    assert!(!out.status.success(), "host {node} has a route out");

    drop(cluster);
    assert!(!link_exists(&state.topology.bridge), "bridge left behind");
    for h in &state.topology.hosts {
        assert!(!netns_exists(&h.netns), "netns {} left behind", h.netns);
        assert!(!link_exists(&h.veth), "veth {} left behind", h.veth);
    }
    assert!(!state.run_dir.exists(), "run dir left behind");
    for p in &state.processes {
        assert!(
            !berth_tests::process::same_process(p),
            "{} (pid {}) still runs",
            p.name,
            p.pid
        );
    }
}

#[test]
fn teardown_runs_when_a_test_panics() {
    let mut state = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::builder()
            .infra_only()
            .demo_image(false)
            .start()
            .expect("starting hosts, etcd and registry");
        state = Some(cluster.state().clone());
        panic!("deliberate failure");
    }));
    assert!(result.is_err());
    let state = state.expect("cluster started");
    assert!(!link_exists(&state.topology.bridge), "bridge left behind");
    assert!(!state.run_dir.exists(), "run dir left behind");
    // A failing test keeps its logs; this failure was on purpose.
    let kept = berth_tests::paths::harness_dir()
        .join("logs")
        .join(&state.prefix);
    assert!(kept.exists(), "logs of the failed test not kept");
    std::fs::remove_dir_all(kept).expect("removing kept logs");
}
