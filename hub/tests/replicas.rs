//! Several hub replicas on one etcd: each has its own etcd connection, API and scheduler loop; the loops
//! campaign for `/berth/election/scheduler` and only the leader places. Fake agents (heartbeats, reports
//! of removed instances) talk to the replicas through the gRPC service functions. Every check reads the
//! whole of `/berth/` at one revision and asserts the placement invariants on it.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure points at the line
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use berth_hub::api::grpc::Grpc;
use berth_hub::reconciler::{Reconciler, LEADER_LEASE_TTL_SECS};
use berth_hub::service::Service;
use berth_hub::store::records::InstanceRecord;
use berth_hub::store::{keys, Store};
use berth_proto::v1;
use berth_proto::v1::agent_service_server::AgentService;
use common::{call_router, wait_for, Hub};
use futures::StreamExt;
use serde_json::Value;
use tokio::task::JoinHandle;

const GIB: u64 = 1 << 30;
const CIDR: &str = "10.10.0.0/16";
/// A stopped or crashed leader is replaced within its lease TTL; the rest is margin for a loaded machine.
const FAILOVER_SECS: u64 = LEADER_LEASE_TTL_SECS as u64 + 15;
const SETTLE_SECS: u64 = 20;

/// A task aborted when dropped, so a failing test leaves nothing running.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One hub replica: its own etcd connection, service, REST router and scheduler loop.
struct Replica {
    name: String,
    grpc: Grpc,
    router: axum::Router,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<Task>,
}

impl Replica {
    async fn start(hub: &Hub, name: &str) -> Replica {
        let store = Store::connect(
            std::slice::from_ref(&hub.etcd.endpoint),
            Duration::from_secs(15),
        )
        .await
        .unwrap();
        let service = Service::new(store.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(berth_hub::reconciler::run(store, name.into(), async move {
            let _ = stopped.await;
        }));
        Replica {
            name: name.into(),
            grpc: Grpc::new(service.clone()),
            router: berth_hub::api::rest::router(service),
            stop: Some(stop),
            task: Some(Task(task)),
        }
    }

    /// Completes the loop's shutdown future and waits for the loop to return (its API keeps serving).
    async fn stop_loop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        let mut task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), &mut task.0)
            .await
            .expect("the scheduler loop returns on shutdown")
            .unwrap();
    }

    async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        call_router(&self.router, Method::POST, path, Some(body)).await
    }

    async fn scale(&self, id: &str, replicas: usize) {
        let (status, body) = self
            .post(
                &format!("/v1/containers/{id}/scale"),
                &format!(r#"{{"replicas":{replicas}}}"#),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
}

/// A replica whose scheduler loop runs on a runtime of its own, with its own etcd connection, so that
/// tearing the runtime down kills it like a crashed process: no resign, no lease revoke, its election key
/// stays until the lease expires.
struct CrashableReplica {
    runtime: Option<tokio::runtime::Runtime>,
}

impl CrashableReplica {
    fn start(hub: &Hub, name: &str) -> CrashableReplica {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let endpoint = hub.etcd.endpoint.clone();
        let name = name.to_owned();
        runtime.spawn(async move {
            let store = Store::connect(&[endpoint], Duration::from_secs(15))
                .await
                .unwrap();
            berth_hub::reconciler::run(store, name, std::future::pending()).await;
        });
        CrashableReplica {
            runtime: Some(runtime),
        }
    }

    fn crash(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for CrashableReplica {
    fn drop(&mut self) {
        self.crash();
    }
}

/// A fake agent: heartbeats every second (node leases outlive the test) and, on every desired state,
/// reports removed whatever is no longer assigned to it, as a real agent does after stopping it.
fn agent(grpc: Grpc, node_id: &str) -> Task {
    let node_id = node_id.to_owned();
    Task(tokio::spawn(async move {
        let watch = || async {
            let req = v1::WatchAssignmentsRequest {
                node_id: node_id.clone(),
            };
            grpc.watch_assignments(tonic::Request::new(req))
                .await
                .unwrap()
                .into_inner()
        };
        let mut stream = watch().await;
        let mut seen: HashSet<String> = HashSet::new();
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    let req = v1::HeartbeatRequest { node_id: node_id.clone() };
                    let _ = grpc.heartbeat(tonic::Request::new(req)).await;
                }
                msg = stream.next() => match msg {
                    Some(Ok(state)) => {
                        let now: HashSet<String> =
                            state.assignments.into_iter().map(|a| a.instance_id).collect();
                        // What went since the last state, and what the hub is stopping here (some
                        // of it may have been placed and stopped between two states).
                        let mut removed: HashSet<String> = seen.difference(&now).cloned().collect();
                        removed.extend(state.stopping.into_iter().filter(|id| !now.contains(id)));
                        let req = v1::ReportStatusRequest {
                            node_id: node_id.clone(),
                            reports: Vec::new(),
                            removed: removed.into_iter().collect(),
                        };
                        // Forget them only once the hub took the report.
                        if grpc.report_status(tonic::Request::new(req)).await.is_ok() {
                            seen = now;
                        }
                    }
                    _ => stream = watch().await,
                },
            }
        }
    }))
}

/// Which candidate holds the scheduler election.
async fn leader(store: &Store) -> Option<String> {
    let resp = store.client().leader(keys::ELECTION).await.ok()?;
    resp.kv()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

/// Waits until `name` holds the election.
async fn wait_leader(store: &Store, name: &str, secs: u64) {
    wait_for(secs, &format!("{name} to lead"), || async {
        (leader(store).await.as_deref() == Some(name)).then_some(())
    })
    .await;
}

/// The instance records of one consistent read of `/berth/`.
#[derive(Debug)]
struct Census {
    /// Not stopping, by instance id.
    active: BTreeMap<String, InstanceRecord>,
    stopping: usize,
}

impl Census {
    fn placed(&self) -> usize {
        self.active
            .values()
            .filter(|i| !i.node_id.is_empty())
            .count()
    }

    /// Settled at `n`: exactly `n` instances, all placed, nothing stopping.
    fn settled(&self, n: usize) -> bool {
        self.active.len() == n && self.placed() == n && self.stopping == 0
    }
}

/// Reads everything under `/berth/` at one revision and asserts the placement invariants: every instance
/// has its owner index; every address claim belongs to the placed instance holding that address (so
/// addresses are distinct and no claim leaks); every assignment belongs to an active instance placed on
/// that node, and every placed active instance has exactly that one assignment.
async fn census(store: &Store) -> Census {
    let (kvs, rev) = store.get_prefix(keys::ROOT).await.unwrap();
    let mut instances: HashMap<String, InstanceRecord> = HashMap::new();
    let mut owners: HashMap<String, String> = HashMap::new();
    let mut claims: HashMap<(String, String), String> = HashMap::new();
    let mut assigns: HashSet<(String, String)> = HashSet::new();
    for kv in &kvs {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let value = String::from_utf8_lossy(kv.value()).into_owned();
        if let Some(rest) = key.strip_prefix(keys::INSTANCES) {
            let r: InstanceRecord = serde_json::from_slice(kv.value()).unwrap();
            assert_eq!(rest, format!("{}/{}", r.container_id, r.instance_id));
            assert!(instances.insert(r.instance_id.clone(), r).is_none());
        } else if let Some(iid) = key.strip_prefix(keys::OWNERS) {
            owners.insert(iid.to_owned(), value);
        } else if let Some(rest) = key.strip_prefix(keys::IPAM) {
            let (net, ip) = rest.split_once('/').unwrap();
            claims.insert((net.to_owned(), ip.to_owned()), value);
        } else if let Some(rest) = key.strip_prefix(keys::ASSIGN) {
            let (node, iid) = rest.split_once('/').unwrap();
            assert!(assigns.insert((node.to_owned(), iid.to_owned())));
        }
    }
    let at = format!("at revision {rev}");
    let by_owner: HashMap<&str, &str> = instances
        .values()
        .map(|i| (i.instance_id.as_str(), i.container_id.as_str()))
        .collect();
    let owners: HashMap<&str, &str> = owners
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(owners, by_owner, "owner index {at}");
    let mut ips = HashSet::new();
    for i in instances.values() {
        if i.ip.is_empty() {
            assert!(i.node_id.is_empty(), "{i:?} placed without address {at}");
            continue;
        }
        assert!(
            ips.insert((i.network_id.clone(), i.ip.clone())),
            "{} given twice {at}",
            i.ip
        );
        assert_eq!(
            claims.get(&(i.network_id.clone(), i.ip.clone())),
            Some(&i.instance_id),
            "claim of {i:?} {at}"
        );
    }
    assert_eq!(
        claims.len(),
        ips.len(),
        "claims without instance {at}: {claims:?}"
    );
    for (node, iid) in &assigns {
        let i = instances
            .get(iid)
            .unwrap_or_else(|| panic!("assignment {node}/{iid} without instance {at}"));
        assert!(
            !i.stopping && &i.node_id == node,
            "assignment {node}/{iid} of {i:?} {at}"
        );
    }
    for i in instances.values() {
        if !i.stopping && !i.node_id.is_empty() {
            assert!(
                assigns.contains(&(i.node_id.clone(), i.instance_id.clone())),
                "{i:?} placed without assignment {at}"
            );
        }
    }
    let stopping = instances.values().filter(|i| i.stopping).count();
    Census {
        active: instances.into_iter().filter(|(_, i)| !i.stopping).collect(),
        stopping,
    }
}

/// Waits (checking the invariants on every read) until exactly `n` instances are placed and nothing is
/// stopping, then checks that no key is left over.
async fn settled(hub: &Hub, n: usize, secs: u64) -> Census {
    let c = wait_for(
        secs,
        &format!("{n} placed instances, none stopping"),
        || async {
            let c = census(&hub.store).await;
            c.settled(n).then_some(c)
        },
    )
    .await;
    for prefix in [keys::INSTANCES, keys::ASSIGN, keys::IPAM, keys::OWNERS] {
        assert_eq!(hub.keys(prefix).await.len(), n, "{prefix}");
    }
    let net: ipnet::Ipv4Net = CIDR.parse().unwrap();
    for i in c.active.values() {
        let ip: Ipv4Addr = i.ip.parse().unwrap();
        assert!(
            net.contains(&ip) && ip != net.network() && ip != Ipv4Addr::new(10, 10, 0, 1),
            "{ip}"
        );
    }
    c
}

/// Two nodes, a network and a container of `replicas` (0.5 cpu each) created through `api`.
async fn deploy(hub: &Hub, api: &Replica, replicas: usize) -> String {
    hub.register("n1", 4000, 8 * GIB).await;
    hub.register("n2", 4000, 8 * GIB).await;
    let (status, body) = api
        .post(
            "/v1/networks",
            &format!(r#"{{"name":"payments","cidr":"{CIDR}"}}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api
        .post(
            "/v1/containers",
            &format!(
                r#"{{"image":"demo:1","cpu":"0.5","memory":"64MB","replicas":{replicas},"network_id":"payments"}}"#
            ),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["container_id"].as_str().unwrap().to_owned()
}

/// (node, ip) of every instance, by instance id.
fn placements(c: &Census) -> BTreeMap<String, (String, String)> {
    c.active
        .iter()
        .map(|(id, i)| (id.clone(), (i.node_id.clone(), i.ip.clone())))
        .collect()
}

#[tokio::test]
async fn two_scheduler_loops_place_each_replica_once() {
    let hub = Hub::start(false).await;
    let a = Replica::start(&hub, "hub-a").await;
    let b = Replica::start(&hub, "hub-b").await;
    let _agents = [agent(a.grpc.clone(), "n1"), agent(b.grpc.clone(), "n2")];
    wait_for(10, "both replicas campaigning", || async {
        (hub.keys(keys::ELECTION).await.len() == 2).then_some(())
    })
    .await;
    let _id = deploy(&hub, &a, 7).await;

    let c = settled(&hub, 7, SETTLE_SECS).await;
    let mut per_node = BTreeMap::new();
    for i in c.active.values() {
        *per_node.entry(i.node_id.clone()).or_insert(0) += 1;
    }
    let mut counts: Vec<i32> = per_node.values().copied().collect();
    counts.sort();
    assert_eq!(counts, vec![3, 4], "{per_node:?}");
    let lead = leader(&hub.store).await.unwrap();
    assert!(lead == a.name || lead == b.name, "{lead}");
    assert_eq!(
        hub.keys(keys::ELECTION).await.len(),
        2,
        "one leader, one waiting"
    );
}

#[tokio::test]
async fn stopping_the_leader_hands_scheduling_over() {
    let hub = Hub::start(false).await;
    let mut replicas = [
        Replica::start(&hub, "hub-a").await,
        Replica::start(&hub, "hub-b").await,
    ];
    let _agents = [
        agent(replicas[0].grpc.clone(), "n1"),
        agent(replicas[1].grpc.clone(), "n2"),
    ];
    let id = deploy(&hub, &replicas[1], 3).await;
    let before = placements(&settled(&hub, 3, SETTLE_SECS).await);

    let lead = leader(&hub.store).await.unwrap();
    let (gone, rest) = if lead == replicas[0].name {
        (0, 1)
    } else {
        (1, 0)
    };
    replicas[gone].stop_loop().await;
    // The stopped replica's API still takes writes; only its scheduling stopped.
    replicas[gone].scale(&id, 6).await;

    let after = placements(&settled(&hub, 6, FAILOVER_SECS).await);
    assert_eq!(
        leader(&hub.store).await.as_deref(),
        Some(replicas[rest].name.as_str())
    );
    for (iid, placement) in &before {
        assert_eq!(after.get(iid), Some(placement), "{iid} moved on fail-over");
    }
}

#[tokio::test]
async fn a_crashed_leader_is_replaced_after_its_lease_expires() {
    let hub = Hub::start(false).await;
    let mut crashing = CrashableReplica::start(&hub, "hub-crash");
    wait_leader(&hub.store, "hub-crash", 10).await;
    let b = Replica::start(&hub, "hub-b").await;
    let _agents = [agent(b.grpc.clone(), "n1"), agent(b.grpc.clone(), "n2")];
    wait_for(10, "both replicas campaigning", || async {
        (hub.keys(keys::ELECTION).await.len() == 2).then_some(())
    })
    .await;
    let id = deploy(&hub, &b, 2).await;
    let before = placements(&settled(&hub, 2, SETTLE_SECS).await);
    assert_eq!(leader(&hub.store).await.as_deref(), Some("hub-crash"));

    crashing.crash();
    b.scale(&id, 5).await;

    let after = placements(&settled(&hub, 5, FAILOVER_SECS).await);
    assert_eq!(leader(&hub.store).await.as_deref(), Some("hub-b"));
    assert_eq!(
        hub.keys(keys::ELECTION).await.len(),
        1,
        "the crashed candidate's key went with its lease"
    );
    for (iid, placement) in &before {
        assert_eq!(after.get(iid), Some(placement), "{iid} moved on fail-over");
    }
}

#[tokio::test]
async fn scaling_up_and_down_under_two_loops_and_a_hand_over_stays_consistent() {
    let hub = Hub::start(false).await;
    let mut replicas = vec![
        Replica::start(&hub, "hub-a").await,
        Replica::start(&hub, "hub-b").await,
    ];
    let _agents = [
        agent(replicas[0].grpc.clone(), "n1"),
        agent(replicas[1].grpc.clone(), "n2"),
    ];
    let id = deploy(&hub, &replicas[0], 4).await;
    settled(&hub, 4, SETTLE_SECS).await;

    // Bursts of scale requests through both APIs, checking the invariants between them.
    for (step, n) in [9, 2, 6, 0, 8, 3, 7, 1, 5].into_iter().enumerate() {
        replicas[step % 2].scale(&id, n).await;
        census(&hub.store).await;
        if step == 4 {
            // Mid-churn hand-over: the leader's loop stops, a third replica joins.
            let lead = leader(&hub.store).await.unwrap();
            let gone = replicas.iter().position(|r| r.name == lead).unwrap();
            replicas[gone].stop_loop().await;
            replicas.remove(gone);
            replicas.push(Replica::start(&hub, "hub-c").await);
        }
        if step % 3 == 2 {
            settled(&hub, n, FAILOVER_SECS).await;
        }
    }
    let c = settled(&hub, 5, FAILOVER_SECS).await;
    let mut ordinals: Vec<u32> = c.active.values().map(|i| i.ordinal).collect();
    ordinals.sort();
    ordinals.dedup();
    assert_eq!(ordinals.len(), 5, "{c:?}");
    let (_, body) = hub.get(&format!("/v1/containers/{id}")).await;
    assert_eq!(body["replicas"], 5);
    assert_eq!(body["instances"].as_array().unwrap().len(), 5, "{body}");
}

/// A deposed leader may still be finishing a pass while the new one runs: three reconcilers passing
/// concurrently with no election at all must still never place a replica twice or share an address.
/// `n` reconcile passes looping at once with no election, as when a replaced leader is still finishing.
fn racing_passes(hub: &Hub, n: usize) -> Vec<Task> {
    (0..n)
        .map(|_| {
            let mut rec = Reconciler::new(hub.store.clone(), Duration::from_secs(60));
            Task(tokio::spawn(async move {
                loop {
                    let _ = rec.pass().await;
                    // Pacing only, so the loops do not starve etcd.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }))
        })
        .collect()
}

#[tokio::test]
async fn concurrent_passes_without_election_never_double_place() {
    let hub = Hub::start(false).await;
    let mut api = Replica::start(&hub, "hub-api").await;
    api.stop_loop().await;
    let _agents = [agent(api.grpc.clone(), "n1"), agent(api.grpc.clone(), "n2")];
    let _passes = racing_passes(&hub, 3);
    let id = deploy(&hub, &api, 6).await;
    settled(&hub, 6, SETTLE_SECS).await;
    for n in [10, 1, 7, 0, 4] {
        api.scale(&id, n).await;
        census(&hub.store).await;
    }
    settled(&hub, 4, SETTLE_SECS).await;
}

#[tokio::test]
async fn concurrent_passes_never_over_commit_a_node() {
    // Nodes take 8 replicas of 0.5 cpu each; asking for more than both hold, with three passes racing,
    // must fill them exactly and leave the rest pending. (The placement transaction's per-node guard
    // closes a window, stale usage in an overlapping pass, that this test hits only by luck: it checks
    // the outcome, not that window.)
    let hub = Hub::start(false).await;
    let mut api = Replica::start(&hub, "hub-api").await;
    api.stop_loop().await;
    let _agents = [agent(api.grpc.clone(), "n1"), agent(api.grpc.clone(), "n2")];
    let _passes = racing_passes(&hub, 3);
    let id = deploy(&hub, &api, 2).await;
    for n in [20, 3, 24, 1, 20] {
        api.scale(&id, n).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(SETTLE_SECS);
        loop {
            let c = census(&hub.store).await;
            let mut per_node: HashMap<&str, usize> = HashMap::new();
            for i in c.active.values().filter(|i| !i.node_id.is_empty()) {
                *per_node.entry(i.node_id.as_str()).or_default() += 1;
            }
            for (node, count) in &per_node {
                assert!(
                    *count <= 8,
                    "node {node} over-committed: {count} replicas of 0.5 cpu on 4 cpu"
                );
            }
            if c.placed() == n.min(16) && c.stopping == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "did not settle at {} placed for {n} replicas: {} placed, {} stopping",
                n.min(16),
                c.placed(),
                c.stopping
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
