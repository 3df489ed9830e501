//! A container's life after its deploy, as a user drives it through the REST API: stop, start and
//! restart (all replicas or one), the stop signal and grace period, rolling updates to a new image,
//! a broken update that rolls itself back, a rollback pinned by digest, and a crash loop backing off.

use berth_tests::api::{all_running, available, instance, instances, placements};
use berth_tests::{wait_for, Cluster};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// Generous bound for a rolling update or rollback of a few replicas on a loaded machine.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(240);

/// A web server whose page is its hostname and that, on SIGTERM, takes 1 s to shut down.
const SLOW_STOP_WEB: &str =
    "mkdir -p /tmp/w && hostname > /tmp/w/index.html && httpd -p 80 -h /tmp/w \
     && trap 'sleep 1; exit 0' TERM && while true; do sleep 0.2; done";

fn start_cluster(nodes: usize) -> Cluster {
    Cluster::builder()
        .nodes(nodes)
        .start()
        .expect("starting the cluster")
}

fn ok<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until `http://IP/` from `node` answers (any body); returns the body.
fn wait_answer(cluster: &Cluster, node: &str, ip: &str) -> String {
    ok(wait_for(
        &format!("{ip} to answer from {node}"),
        Duration::from_secs(20),
        || {
            Ok(match cluster.http_get(node, ip) {
                Ok(b) => Ok(b),
                Err(e) => Err(format!("{e:#}")),
            })
        },
    ))
}

/// Waits until `http://IP/` from `node` no longer answers.
fn wait_silent(cluster: &Cluster, node: &str, ip: &str) {
    ok(wait_for(
        &format!("{ip} to stop answering on {node}"),
        Duration::from_secs(20),
        || {
            Ok(match cluster.http_get(node, ip) {
                Ok(b) => Err(format!("still answers {b:?}")),
                Err(_) => Ok(()),
            })
        },
    ))
}

fn status_of(c: &Value, iid: &str) -> String {
    instance(c, iid)
        .and_then(|i| i["status"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Polls a container every 50 ms in the background and keeps what it saw.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Value>>>,
}

impl Sampler {
    fn start(cluster: &Cluster, id: &str) -> Sampler {
        let api = cluster.api().clone();
        let id = id.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // The first sample before returning: the state before the caller's action is always in
        // the record, however late the thread gets going.
        let first = api.container(&id).ok().flatten();
        let handle = std::thread::spawn(move || {
            let mut seen: Vec<Value> = first.into_iter().collect();
            while !flag.load(Ordering::Relaxed) {
                if let Ok(Some(c)) = api.container(&id) {
                    seen.push(c);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        });
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<Value> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Distinct consecutive values of `f` over the samples.
fn transitions(samples: &[Value], f: impl Fn(&Value) -> String) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in samples {
        let v = f(s);
        if out.last() != Some(&v) {
            out.push(v);
        }
    }
    out
}

/// Whether `want` appears in `seq` in this order (not necessarily adjacent).
fn in_order(seq: &[String], want: &[&str]) -> bool {
    let mut it = seq.iter();
    want.iter().all(|w| it.any(|s| s == w))
}

/// Reads the events watch until `done` says yes for the events (as JSON) of this container.
fn container_events(
    stream: &mut berth_tests::stream::LineStream,
    id: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let mut mine: Vec<Value> = Vec::new();
    let r = stream.read_until("the container's events", Duration::from_secs(30), |lines| {
        mine = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["id"] == id || e["container_id"] == id)
            .collect();
        done(&mine)
    });
    if let Err(e) = r {
        panic!("{e:#}");
    }
    mine
}

/// The statuses events gave instance `iid`, in order.
fn instance_statuses(events: &[Value], iid: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["kind"] == "instance" && e["id"] == iid)
        .filter_map(|e| e["status"].as_str().filter(|s| !s.is_empty()))
        .map(str::to_owned)
        .collect()
}

#[test]
fn stop_start_and_restart_all_replicas_or_one() {
    let cluster = start_cluster(2);
    let api = cluster.api().clone();
    api.create_network("life", "10.70.0.0/24").expect("network");
    let mut events = api
        .stream("/v1/events?watch=true")
        .and_then(|s| s.expect_status(200))
        .expect("watching events");
    let id = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.1", "memory": "32MB", "network_id": "life",
            "name": "web", "replicas": 2, "command": ["sh", "-c", SLOW_STOP_WEB],
        }))
        .expect("deploy");
    let c = ok(api.wait_running(&id, 2, RUN_TIMEOUT));
    let placed = placements(&c);
    let (a, node_a, ip_a) = placed[0].clone();
    let (b, node_b, ip_b) = placed[1].clone();
    let page_a = wait_answer(&cluster, &node_a, &ip_a);
    let page_b = wait_answer(&cluster, &node_b, &ip_b);

    // One replica: it stops (through STOPPING, taking its 1 s), keeps its address, the other serves.
    let sampler = Sampler::start(&cluster, &id);
    assert_eq!(ok(api.lifecycle(&id, "stop", Some(&a))), "STOPPING");
    let c = ok(
        api.wait_container(&id, "replica A STOPPED", RUN_TIMEOUT, |c| {
            instance(c, &a).is_some_and(|i| i["status"] == "STOPPED" && i["stopped"] == true)
        }),
    );
    assert_eq!(status_of(&c, &b), "RUNNING", "the other replica: {c}");
    assert_eq!(
        placements(&c),
        placed,
        "a stopped replica keeps its node and address: {c}"
    );
    wait_silent(&cluster, &node_a, &ip_a);
    assert_eq!(wait_answer(&cluster, &node_b, &ip_b), page_b);
    let seen = transitions(&sampler.finish(), |c| status_of(c, &a));
    assert!(
        in_order(&seen, &["RUNNING", "STOPPING", "STOPPED"]),
        "replica A went {seen:?}"
    );

    // ... and starts again, same address, same page.
    assert_eq!(ok(api.lifecycle(&id, "start", Some(&a))), "STARTING");
    let c = ok(api.wait_running(&id, 2, RUN_TIMEOUT));
    assert_eq!(placements(&c), placed, "{c}");
    assert_eq!(instance(&c, &a).expect("A")["stopped"], false, "{c}");
    assert_eq!(wait_answer(&cluster, &node_a, &ip_a), page_a);

    // All replicas: the container goes STOPPING → STOPPED, every replica keeps its address.
    let sampler = Sampler::start(&cluster, &id);
    assert_eq!(ok(api.lifecycle(&id, "stop", None)), "STOPPING");
    let c = ok(
        api.wait_container(&id, "every replica STOPPED", RUN_TIMEOUT, |c| {
            c["status"] == "STOPPED" && instances(c).iter().all(|i| i["status"] == "STOPPED")
        }),
    );
    assert_eq!(placements(&c), placed, "{c}");
    wait_silent(&cluster, &node_a, &ip_a);
    wait_silent(&cluster, &node_b, &ip_b);
    let seen = transitions(&sampler.finish(), |c| {
        c["status"].as_str().unwrap_or_default().to_owned()
    });
    assert!(
        in_order(&seen, &["STOPPING", "STOPPED"]),
        "the container went {seen:?}"
    );

    let sampler = Sampler::start(&cluster, &id);
    assert_eq!(ok(api.lifecycle(&id, "start", None)), "STARTING");
    let c = ok(api.wait_running(&id, 2, RUN_TIMEOUT));
    assert_eq!(placements(&c), placed, "{c}");
    assert_eq!(wait_answer(&cluster, &node_a, &ip_a), page_a);
    assert_eq!(wait_answer(&cluster, &node_b, &ip_b), page_b);
    let seen = transitions(&sampler.finish(), |c| {
        c["status"].as_str().unwrap_or_default().to_owned()
    });
    assert_eq!(
        seen.last().map(String::as_str),
        Some("RUNNING"),
        "the container went {seen:?}"
    );

    // Restart one: a new process for it only.
    let pid = |node: &str, iid: &str| cluster.init_pid(node, iid);
    let (pid_a, pid_b) = (pid(&node_a, &a), pid(&node_b, &b));
    assert!(
        pid_a.is_some() && pid_b.is_some(),
        "no init pids found: {pid_a:?} {pid_b:?}"
    );
    assert_eq!(ok(api.lifecycle(&id, "restart", Some(&a))), "RESTARTING");
    ok(wait_for("replica A restarted", RUN_TIMEOUT, || {
        let c = api.container(&id)?.unwrap_or_default();
        let now = pid(&node_a, &a);
        Ok(
            if status_of(&c, &a) == "RUNNING" && now.is_some() && now != pid_a {
                Ok(())
            } else {
                Err(format!("pid {now:?}, {c}"))
            },
        )
    }));
    assert_eq!(pid(&node_b, &b), pid_b, "restarting A restarted B");
    let c = ok(api.wait_running(&id, 2, RUN_TIMEOUT));
    assert_eq!(placements(&c), placed, "{c}");
    assert_eq!(wait_answer(&cluster, &node_a, &ip_a), page_a);

    // Restart all.
    let before: BTreeMap<String, Option<u32>> = placed
        .iter()
        .map(|(i, n, _)| (i.clone(), pid(n, i)))
        .collect();
    assert_eq!(ok(api.lifecycle(&id, "restart", None)), "RESTARTING");
    ok(wait_for("every replica restarted", RUN_TIMEOUT, || {
        let c = api.container(&id)?.unwrap_or_default();
        let fresh = placed.iter().all(|(i, n, _)| {
            let now = pid(n, i);
            now.is_some() && now != before[i]
        });
        Ok(if fresh && all_running(&c, 2) {
            Ok(())
        } else {
            Err(c.to_string())
        })
    }));
    assert_eq!(wait_answer(&cluster, &node_b, &ip_b), page_b);

    // The event stream told the same story, in order.
    let evs = container_events(&mut events, &id, |evs| {
        let types: Vec<String> = evs
            .iter()
            .filter(|e| e["kind"] == "container")
            .filter_map(|e| e["type"].as_str().map(str::to_owned))
            .collect();
        in_order(
            &types,
            &["stop", "start", "stop", "start", "restart", "restart"],
        )
    });
    let a_statuses = instance_statuses(&evs, &a);
    assert!(
        in_order(
            &a_statuses,
            &["RUNNING", "STOPPING", "STOPPED", "STARTING", "RUNNING"]
        ),
        "events of replica A: {a_statuses:?}"
    );
}

#[test]
fn the_stop_signal_and_grace_period_are_honoured() {
    let cluster = start_cluster(1);
    let api = cluster.api().clone();
    api.create_network("grace", "10.71.0.0/24")
        .expect("network");
    let deploy = |name: &str, script: &str, extra: Value| {
        let mut body = json!({
            "image": cluster.demo_image(), "cpu": "0.1", "memory": "16MB", "network_id": "grace",
            "name": name, "replicas": 1, "command": ["sh", "-c", script],
        });
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        api.create_container(&body).expect("deploy")
    };
    // Exits 1 s after SIGTERM (the default signal); would otherwise wait out 30 s.
    let term = deploy(
        "term",
        "trap 'sleep 1; exit 0' TERM; while true; do sleep 0.2; done",
        json!({"stop_timeout": "30s"}),
    );
    // Ignores SIGTERM, exits 1 s after SIGUSR1, its configured stop signal.
    let usr1 = deploy(
        "usr1",
        "trap '' TERM; trap 'sleep 1; exit 0' USR1; while true; do sleep 0.2; done",
        json!({"stop_signal": "SIGUSR1", "stop_timeout": "30s"}),
    );
    // Catches SIGTERM but carries on: killed when its 3 s grace period ends. (An init that does
    // not catch the signal at all may be killed at once: pid 1 would never act on it.)
    let stubborn = deploy(
        "stubborn",
        "trap 'echo not stopping' TERM; while true; do sleep 0.2; done",
        json!({"stop_timeout": "3s"}),
    );
    for id in [&term, &usr1, &stubborn] {
        ok(api.wait_running(id, 1, RUN_TIMEOUT));
    }
    let c = api.container(&usr1).expect("get").expect("exists");
    assert!(
        c["stop_signal"]
            .as_str()
            .unwrap_or_default()
            .contains("USR1"),
        "{c}"
    );
    assert_eq!(c["stop_timeout"], "30s", "{c}");
    let c = api.container(&stubborn).expect("get").expect("exists");
    assert_eq!(c["stop_timeout"], "3s", "{c}");

    let mut asked: BTreeMap<&str, Instant> = BTreeMap::new();
    for id in [&term, &usr1, &stubborn] {
        asked.insert(id.as_str(), Instant::now());
        assert_eq!(ok(api.lifecycle(id, "stop", None)), "STOPPING");
    }
    let mut took: BTreeMap<&str, Duration> = BTreeMap::new();
    ok(wait_for(
        "all three stopped",
        Duration::from_secs(90),
        || {
            for (id, at) in &asked {
                if took.contains_key(id) {
                    continue;
                }
                let c = api.container(id)?.unwrap_or_default();
                if instances(&c).iter().all(|i| i["status"] == "STOPPED")
                    && !instances(&c).is_empty()
                {
                    took.insert(id, at.elapsed());
                }
            }
            Ok(if took.len() == 3 {
                Ok(())
            } else {
                Err(format!("{took:?}"))
            })
        },
    ));
    let secs = |id: &str| took[id].as_secs_f64();
    // Lower bounds prove the process was given its time; upper bounds that nobody waited out 30 s.
    assert!(
        (0.9..20.0).contains(&secs(&term)),
        "SIGTERM-trapping container stopped after {:.2} s (expected ~1 s)",
        secs(&term)
    );
    assert!(
        (0.9..20.0).contains(&secs(&usr1)),
        "SIGUSR1 container stopped after {:.2} s (expected ~1 s: was SIGUSR1 sent?)",
        secs(&usr1)
    );
    assert!(
        (2.9..25.0).contains(&secs(&stubborn)),
        "container that shrugs SIGTERM off stopped after {:.2} s (expected its 3 s grace, then a kill)",
        secs(&stubborn)
    );
}

/// The variant an `httpd -h /` replica serves at /etc/berth-variant ("" for the demo image itself).
fn variant_of(cluster: &Cluster, node: &str, ip: &str) -> String {
    // RUNNING means its process started, not that httpd listens yet (seen refused 0 ms after).
    wait_answer(cluster, node, ip);
    let url = format!("http://{ip}/etc/berth-variant");
    let (code, _, body) = ok(cluster.curl_on_host(node, &url, &[]));
    match code {
        200 => body.trim().to_owned(),
        404 => String::new(),
        c => panic!("{url}: HTTP {c}: {body}"),
    }
}

/// Serves the whole root filesystem, so a test can read /etc/berth-variant.
const ROOT_HTTPD: [&str; 6] = ["httpd", "-f", "-p", "80", "-h", "/"];

fn digests(c: &Value) -> BTreeSet<String> {
    instances(c)
        .iter()
        .map(|i| i["image_digest"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The largest number of replicas below `replicas` that were not RUNNING at any sample.
fn max_unavailable(samples: &[Value], replicas: usize) -> (usize, String) {
    samples
        .iter()
        .map(|c| (replicas.saturating_sub(available(c)), c.to_string()))
        .max_by_key(|(n, _)| *n)
        .unwrap_or_default()
}

#[test]
fn rolling_update_to_a_new_tag_then_rollback_pinned_by_digest() {
    let cluster = start_cluster(2);
    let api = cluster.api().clone();
    api.create_network("roll", "10.72.0.0/24").expect("network");
    let v1 = cluster.demo_image();
    let v2 = cluster.push_image("2", Some("v2")).expect("pushing v2");
    let id = api
        .create_container(&json!({
            "image": v1, "cpu": "0.1", "memory": "32MB", "network_id": "roll", "name": "app",
            "replicas": 3, "command": ROOT_HTTPD,
        }))
        .expect("deploy");
    let c = ok(api.wait_running(&id, 3, RUN_TIMEOUT));
    assert_eq!(c["revision"], 1, "{c}");
    let d1 = digests(&c);
    assert_eq!(d1.len(), 1, "one digest for all replicas: {c}");
    let d1 = d1.into_iter().next().unwrap_or_default();
    assert!(d1.starts_with("sha256:"), "{c}");
    for (_, node, ip) in placements(&c) {
        assert_eq!(variant_of(&cluster, &node, &ip), "");
    }

    let sampler = Sampler::start(&cluster, &id);
    let rev = ok(api.update(&id, &json!({"image": v2, "max_unavailable": 1})));
    assert_eq!(rev, 2);
    let c = ok(
        api.wait_container(&id, "the update to complete", ROLLOUT_TIMEOUT, |c| {
            c["revision"] == 2
                && c["rollout"].is_null()
                && c["last_rollout"]["result"] == "COMPLETE"
                && all_running(c, 3)
                && instances(c).iter().all(|i| i["revision"] == 2)
        }),
    );
    let samples = sampler.finish();
    let (worst, when) = max_unavailable(&samples, 3);
    assert!(
        worst <= 1,
        "{worst} replicas unavailable at once (max_unavailable 1): {when}"
    );
    let statuses = transitions(&samples, |c| {
        c["status"].as_str().unwrap_or_default().to_owned()
    });
    assert!(
        statuses.iter().any(|s| s == "UPDATING"),
        "never seen UPDATING: {statuses:?}"
    );
    assert_eq!(c["last_rollout"]["revision"], 2, "{c}");
    let d2 = digests(&c);
    assert_eq!(d2.len(), 1, "{c}");
    let d2 = d2.into_iter().next().unwrap_or_default();
    assert_ne!(d2, d1, "v2 has a digest of its own");
    for (_, node, ip) in placements(&c) {
        assert_eq!(variant_of(&cluster, &node, &ip), "v2");
    }

    let revs = ok(api.revisions(&id));
    assert_eq!(revs.len(), 2, "{revs:?}");
    assert_eq!(revs[0]["revision"], 1, "{revs:?}");
    assert_eq!(revs[0]["image"], v1.as_str(), "{revs:?}");
    assert_eq!(revs[0]["image_digest"], d1.as_str(), "{revs:?}");
    assert_eq!(revs[0]["current"], false, "{revs:?}");
    assert_eq!(revs[1]["revision"], 2, "{revs:?}");
    assert_eq!(revs[1]["image"], v2.as_str(), "{revs:?}");
    assert_eq!(revs[1]["image_digest"], d2.as_str(), "{revs:?}");
    assert_eq!(revs[1]["current"], true, "{revs:?}");

    // Tag 1 now names other content: a rollback must still run what revision 1 ran.
    cluster.push_image("1", Some("v3")).expect("moving tag 1");
    let sampler = Sampler::start(&cluster, &id);
    assert_eq!(ok(api.rollback(&id, Some(1))), 1);
    let c = ok(
        api.wait_container(&id, "the rollback to complete", ROLLOUT_TIMEOUT, |c| {
            c["revision"] == 1
                && c["rollout"].is_null()
                && all_running(c, 3)
                && instances(c).iter().all(|i| i["revision"] == 1)
        }),
    );
    let (worst, when) = max_unavailable(&sampler.finish(), 3);
    assert!(worst <= 1, "{worst} replicas unavailable at once: {when}");
    assert_eq!(
        digests(&c),
        BTreeSet::from([d1.clone()]),
        "rolled back by digest: {c}"
    );
    for (_, node, ip) in placements(&c) {
        assert_eq!(
            variant_of(&cluster, &node, &ip),
            "",
            "a replica runs the moved tag, not revision 1's digest"
        );
    }
    let revs = ok(api.revisions(&id));
    let current: Vec<&Value> = revs.iter().filter(|r| r["current"] == true).collect();
    assert_eq!(current.len(), 1, "{revs:?}");
    assert_eq!(current[0]["revision"], 1, "{revs:?}");
    assert_eq!(current[0]["image_digest"], d1.as_str(), "{revs:?}");
}

#[test]
fn a_broken_update_rolls_back_by_itself() {
    let cluster = start_cluster(2);
    let api = cluster.api().clone();
    api.create_network("broken", "10.73.0.0/24")
        .expect("network");
    let v1 = cluster.demo_image();
    let id = api
        .create_container(&json!({
            "image": v1, "cpu": "0.1", "memory": "32MB", "network_id": "broken", "name": "app",
            "replicas": 2,
        }))
        .expect("deploy");
    let c = ok(api.wait_running(&id, 2, RUN_TIMEOUT));
    let d1 = digests(&c);
    let missing = format!(
        "{}/{}:no-such-tag",
        cluster.registry(),
        berth_tests::image::DEMO_REPO
    );

    let sampler = Sampler::start(&cluster, &id);
    assert_eq!(ok(api.update(&id, &json!({"image": missing}))), 2);
    ok(api.wait_container(
        &id,
        "the broken update to roll back",
        ROLLOUT_TIMEOUT,
        |c| c["rollout"].is_null() && c["last_rollout"]["result"] == "ROLLED_BACK",
    ));
    let c = ok(
        api.wait_container(&id, "replicas back on revision 1", RUN_TIMEOUT, |c| {
            all_running(c, 2) && instances(c).iter().all(|i| i["revision"] == 1)
        }),
    );
    let samples = sampler.finish();
    let (worst, when) = max_unavailable(&samples, 2);
    assert!(worst <= 1, "{worst} replicas unavailable at once: {when}");
    let mut statuses = transitions(&samples, |c| {
        c["status"].as_str().unwrap_or_default().to_owned()
    });
    // The sampler may stop just before the status it ends on: the last read counts too.
    statuses.push(c["status"].as_str().unwrap_or_default().to_owned());
    // Either phase of the rollout may be too short to sample: a pull of a missing tag fails at
    // once (the update can turn ROLLING_BACK before the first sample), and undoing a rollout whose
    // new replicas never ran is quick. One of them was seen before RUNNING again; the result and
    // the replicas below are what counts.
    assert!(
        in_order(&statuses, &["UPDATING", "RUNNING"])
            || in_order(&statuses, &["ROLLING_BACK", "RUNNING"]),
        "statuses seen: {statuses:?}"
    );
    assert_eq!(c["revision"], 1, "{c}");
    assert_eq!(c["image"], v1.as_str(), "{c}");
    assert_eq!(digests(&c), d1, "{c}");
    assert!(
        !c["last_rollout"]["reason"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "a rollback says why: {c}"
    );
    for (iid, node, ip) in placements(&c) {
        if let Err(e) = cluster.wait_serving(
            &node,
            &ip,
            berth_tests::image::DEMO_BODY,
            Duration::from_secs(10),
        ) {
            panic!("{iid} does not serve after the rollback: {e:#}");
        }
    }
}

/// The N of "restarting in Ns" in a reason.
fn backoff_secs(reason: &str) -> Option<u64> {
    let rest = reason.split("restarting in ").nth(1)?;
    rest.split('s').next()?.trim().parse().ok()
}

#[test]
fn a_crash_looping_container_backs_off() {
    let cluster = start_cluster(1);
    let api = cluster.api().clone();
    api.create_network("crash", "10.74.0.0/24")
        .expect("network");
    let id = api
        .create_container(&json!({
            "image": cluster.demo_image(), "cpu": "0.1", "memory": "16MB", "network_id": "crash",
            "name": "crasher", "replicas": 1, "command": ["sh", "-c", "echo crashing; exit 3"],
        }))
        .expect("deploy");
    // Backoff 1, 2, 4, 8 s: the fourth delay shows after about 15 s of crashing.
    let mut delays: Vec<u64> = Vec::new();
    let mut restarts: Vec<u64> = Vec::new();
    let r = wait_for(
        "the restart delay to grow to 8 s",
        Duration::from_secs(120),
        || {
            let c = api.container(&id)?.unwrap_or_default();
            if let Some(i) = instances(&c).first() {
                if let Some(n) = backoff_secs(i["reason"].as_str().unwrap_or_default()) {
                    if delays.last() != Some(&n) {
                        delays.push(n);
                    }
                }
                let r = i["restarts"].as_u64().unwrap_or_default();
                if restarts.last() != Some(&r) {
                    restarts.push(r);
                }
            }
            Ok(if delays.last().is_some_and(|n| *n >= 8) {
                Ok(())
            } else {
                Err(format!("delays {delays:?}, restarts {restarts:?}: {c}"))
            })
        },
    );
    ok(r);
    assert!(
        delays.windows(2).all(|w| w[0] < w[1]),
        "the restart delay must grow: {delays:?}"
    );
    assert!(delays.len() >= 3, "delays seen: {delays:?}");
    assert!(
        restarts.windows(2).all(|w| w[0] < w[1]) && restarts.last().is_some_and(|r| *r >= 3),
        "restarts must grow: {restarts:?}"
    );
    let c = api.container(&id).expect("get").expect("exists");
    assert_ne!(
        c["status"], "RUNNING",
        "a crash-looping container is not RUNNING: {c}"
    );
}
