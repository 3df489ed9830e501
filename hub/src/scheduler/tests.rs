use std::collections::HashMap;

use super::*;

const MI: u64 = 1 << 20;
const GI: u64 = 1 << 30;

fn node(id: &str, cpu_millis: u64, memory_bytes: u64) -> NodeCapacity {
    NodeCapacity {
        node_id: id.to_owned(),
        cpu_millis,
        memory_bytes,
        healthy: true,
        unschedulable: false,
    }
}

fn cordoned(mut n: NodeCapacity) -> NodeCapacity {
    n.unschedulable = true;
    n
}

fn down(mut n: NodeCapacity) -> NodeCapacity {
    n.healthy = false;
    n
}

fn req(instance: &str, container: &str, cpu_millis: u64, memory_bytes: u64) -> Request {
    Request {
        instance_id: instance.to_owned(),
        container_id: container.to_owned(),
        cpu_millis,
        memory_bytes,
    }
}

/// `n` replicas of one container, instance ids `<container>-<i>`.
fn replicas(container: &str, n: usize, cpu_millis: u64, memory_bytes: u64) -> Vec<Request> {
    (0..n)
        .map(|i| {
            req(
                &format!("{container}-{i}"),
                container,
                cpu_millis,
                memory_bytes,
            )
        })
        .collect()
}

fn placed(node_id: &str, container: &str, cpu_millis: u64, memory_bytes: u64) -> Placed {
    Placed {
        node_id: node_id.to_owned(),
        container_id: container.to_owned(),
        cpu_millis,
        memory_bytes,
    }
}

fn place(instance: &str, node: &str) -> Decision {
    Decision::Place {
        instance_id: instance.to_owned(),
        node_id: node.to_owned(),
    }
}

/// Node chosen per decision; `None` when unschedulable.
fn nodes_of(decisions: &[Decision]) -> Vec<Option<&str>> {
    decisions
        .iter()
        .map(|d| match d {
            Decision::Place { node_id, .. } => Some(node_id.as_str()),
            Decision::Unschedulable { .. } => None,
        })
        .collect()
}

fn reason(d: &Decision) -> &str {
    match d {
        Decision::Unschedulable { reason, .. } => reason,
        Decision::Place { .. } => panic!("expected unschedulable, got {d:?}"),
    }
}

/// Turns placements back into `Placed` entries, as the next reconcile round would see them.
fn as_placed(pending: &[Request], decisions: &[Decision]) -> Vec<Placed> {
    pending
        .iter()
        .zip(decisions)
        .filter_map(|(r, d)| match d {
            Decision::Place { node_id, .. } => Some(placed(
                node_id,
                &r.container_id,
                r.cpu_millis,
                r.memory_bytes,
            )),
            Decision::Unschedulable { .. } => None,
        })
        .collect()
}

/// Panics if any node holds more than it offers.
fn assert_within_capacity(nodes: &[NodeCapacity], placed: &[Placed]) {
    let mut used: HashMap<&str, (u64, u64)> = HashMap::new();
    for p in placed {
        let u = used.entry(p.node_id.as_str()).or_default();
        u.0 += p.cpu_millis;
        u.1 += p.memory_bytes;
    }
    for n in nodes {
        let (cpu, memory) = used.get(n.node_id.as_str()).copied().unwrap_or_default();
        assert!(
            cpu <= n.cpu_millis,
            "{} cpu {cpu} > {}",
            n.node_id,
            n.cpu_millis
        );
        assert!(
            memory <= n.memory_bytes,
            "{} memory {memory} > {}",
            n.node_id,
            n.memory_bytes
        );
    }
}

/// Replicas per node of each container.
fn spread(placed: &[Placed]) -> HashMap<&str, HashMap<&str, u32>> {
    let mut out: HashMap<&str, HashMap<&str, u32>> = HashMap::new();
    for p in placed {
        *out.entry(p.container_id.as_str())
            .or_default()
            .entry(p.node_id.as_str())
            .or_default() += 1;
    }
    out
}

#[test]
fn three_replicas_over_two_nodes_spread_two_and_one() {
    let nodes = [node("a", 4000, 8 * GI), node("b", 4000, 8 * GI)];
    let pending = replicas("ctr-1", 3, 500, 64 * MI);
    let d = schedule(&nodes, &[], &pending);
    assert_eq!(
        d,
        [
            place("ctr-1-0", "a"),
            place("ctr-1-1", "b"),
            place("ctr-1-2", "a")
        ]
    );
}

#[test]
fn spreading_beats_free_resources() {
    // "big" is emptier, but already runs a replica of ctr-1.
    let nodes = [node("big", 64_000, 256 * GI), node("small", 2000, 4 * GI)];
    let already = [
        placed("big", "ctr-1", 100, 64 * MI),
        placed("small", "ctr-2", 1000, GI),
    ];
    let d = schedule(&nodes, &already, &[req("i", "ctr-1", 100, 64 * MI)]);
    assert_eq!(d, [place("i", "small")]);
}

#[test]
fn most_free_resources_wins_among_equal_spread() {
    let nodes = [
        node("a", 4000, 8 * GI),
        node("b", 4000, 8 * GI),
        node("c", 4000, 8 * GI),
    ];
    let already = [
        placed("a", "other", 2000, GI),
        placed("b", "other", 1000, GI),
        placed("c", "other", 1000, 4 * GI),
    ];
    // b: 75% cpu + 87.5% memory free beats a (50% + 87.5%) and c (75% + 50%).
    let d = schedule(&nodes, &already, &[req("i", "ctr-1", 100, 64 * MI)]);
    assert_eq!(d, [place("i", "b")]);
}

#[test]
fn balanced_score_weighs_cpu_and_memory_alike() {
    // a has more cpu free, b more memory: the sum of free fractions decides (a: 0.9 + 0.2, b: 0.3 + 0.9).
    let nodes = [node("a", 10_000, 10 * GI), node("b", 10_000, 10 * GI)];
    let already = [placed("a", "x", 1000, 8 * GI), placed("b", "x", 7000, GI)];
    let d = schedule(&nodes, &already, &[req("i", "ctr-1", 100, 64 * MI)]);
    assert_eq!(d, [place("i", "b")]);
}

#[test]
fn ties_break_on_node_id_whatever_the_input_order() {
    let mut nodes: Vec<NodeCapacity> = ["n3", "n1", "n2"]
        .iter()
        .map(|id| node(id, 1000, GI))
        .collect();
    let d = schedule(&nodes, &[], &[req("i", "ctr-1", 100, 64 * MI)]);
    assert_eq!(d, [place("i", "n1")]);
    let pending = replicas("ctr-1", 7, 100, 64 * MI);
    let first = schedule(&nodes, &[], &pending);
    nodes.reverse();
    assert_eq!(schedule(&nodes, &[], &pending), first);
    nodes.rotate_left(1);
    assert_eq!(schedule(&nodes, &[], &pending), first);
}

#[test]
fn accounts_for_placed_and_earlier_decisions() {
    let nodes = [node("a", 1000, GI)];
    let already = [placed("a", "ctr-0", 600, 64 * MI)];
    let pending = [
        req("i1", "ctr-1", 300, 64 * MI),
        req("i2", "ctr-1", 200, 64 * MI),
        req("i3", "ctr-1", 100, 64 * MI),
    ];
    let d = schedule(&nodes, &already, &pending);
    // 400m free: i1 takes 300m, leaving 100m: i2 (200m) waits, i3 (100m) fits.
    assert_eq!(nodes_of(&d), [Some("a"), None, Some("a")]);
    assert_eq!(
        reason(&d[1]),
        "no node has 0.2 cpu and 64MiB free (1 node: 1 lacks cpu)"
    );
}

#[test]
fn memory_is_accounted_like_cpu() {
    let nodes = [node("a", 8000, 256 * MI), node("b", 8000, 256 * MI)];
    let pending = replicas("ctr-1", 9, 100, 64 * MI);
    let d = schedule(&nodes, &[], &pending);
    let on: Vec<_> = nodes_of(&d);
    assert_eq!(on.iter().filter(|n| n.is_some()).count(), 8);
    assert_eq!(on[8], None);
    assert_eq!(
        reason(&d[8]),
        "no node has 0.1 cpu and 64MiB free (2 nodes: 2 lack memory)"
    );
}

#[test]
fn unhealthy_nodes_are_skipped() {
    let nodes = [
        down(node("a", 64_000, 64 * GI)),
        node("b", 1000, GI),
        down(node("c", 64_000, 64 * GI)),
    ];
    let d = schedule(&nodes, &[], &replicas("ctr-1", 3, 400, 64 * MI));
    assert_eq!(nodes_of(&d), [Some("b"), Some("b"), None]);
    assert_eq!(
        reason(&d[2]),
        "no node has 0.4 cpu and 64MiB free (3 nodes: 1 lacks cpu, 2 unhealthy)"
    );
}

#[test]
fn reason_counts_every_kind_of_shortage() {
    let nodes = [
        node("a", 1000, 32 * MI),
        node("b", 1000, 32 * MI),
        down(node("c", 8000, 8 * GI)),
    ];
    let d = schedule(&nodes, &[], &[req("i", "ctr-1", 500, 64 * MI)]);
    assert_eq!(
        reason(&d[0]),
        "no node has 0.5 cpu and 64MiB free (3 nodes: 2 lack memory, 1 unhealthy)"
    );
    let nodes = [
        node("a", 100, 32 * MI),
        node("b", 100, 8 * GI),
        node("c", 4000, 8 * MI),
    ];
    let d = schedule(&nodes, &[], &[req("i", "ctr-1", 1500, 64_000_000)]);
    assert_eq!(
        reason(&d[0]),
        "no node has 1.5 cpu and 64MB free (3 nodes: 1 lacks cpu, 1 lacks memory, 1 lacks cpu and memory)"
    );
    let d = schedule(&[], &[], &[req("i", "ctr-1", 500, 64 * MI)]);
    assert_eq!(
        reason(&d[0]),
        "no node has 0.5 cpu and 64MiB free (no nodes registered)"
    );
}

#[test]
fn nodes_coming_back_get_pending_work() {
    let pending = replicas("ctr-1", 2, 500, 64 * MI);
    let d = schedule(&[down(node("a", 4000, GI))], &[], &pending);
    assert_eq!(nodes_of(&d), [None, None]);
    assert!(reason(&d[0]).contains("1 unhealthy"), "{}", reason(&d[0]));
    let d = schedule(&[node("a", 4000, GI)], &[], &pending);
    assert_eq!(d, [place("ctr-1-0", "a"), place("ctr-1-1", "a")]);
    // A second node joining later receives the next replica, not the first node.
    let nodes = [node("a", 4000, GI), node("b", 4000, GI)];
    let already = as_placed(&pending, &d);
    let d = schedule(&nodes, &already, &[req("ctr-1-2", "ctr-1", 500, 64 * MI)]);
    assert_eq!(d, [place("ctr-1-2", "b")]);
}

#[test]
fn capacity_freed_between_rounds_is_reused() {
    let nodes = [node("a", 1000, GI)];
    let pending = replicas("ctr-1", 3, 500, 64 * MI);
    let d = schedule(&nodes, &[], &pending);
    assert_eq!(nodes_of(&d), [Some("a"), Some("a"), None]);
    // One replica was removed: the third fits now.
    let mut already = as_placed(&pending, &d);
    already.pop();
    let d = schedule(&nodes, &already, &pending[2..]);
    assert_eq!(d, [place("ctr-1-2", "a")]);
}

#[test]
fn unknown_nodes_and_duplicates_are_harmless() {
    let nodes = [node("a", 1000, GI), node("a", 64_000, 64 * GI)];
    let already = [placed("gone", "ctr-1", 900, 900 * MI)];
    let d = schedule(&nodes, &already, &replicas("ctr-1", 3, 500, 64 * MI));
    // "a" counts once, with its first entry's 1 cpu; "gone" holds nothing.
    assert_eq!(nodes_of(&d), [Some("a"), Some("a"), None]);
    assert!(
        reason(&d[2]).contains("(1 node: 1 lacks cpu)"),
        "{}",
        reason(&d[2])
    );
}

#[test]
fn overcommitted_nodes_fit_nothing() {
    // Capacity shrank below what is placed: free is zero, not negative.
    let nodes = [node("a", 1000, GI)];
    let already = [placed("a", "ctr-0", 3000, 2 * GI)];
    let d = schedule(&nodes, &already, &[req("i", "ctr-1", 1, 4 * MI)]);
    assert_eq!(nodes_of(&d), [None]);
}

#[test]
fn thousand_nodes_five_thousand_replicas() {
    let nodes: Vec<NodeCapacity> = (0..1000)
        .map(|i| node(&format!("node-{i:04}"), 4000, 8 * GI))
        .collect();
    let mut pending = replicas("ctr-big", 3000, 250, 256 * MI);
    for c in 0..100 {
        pending.extend(replicas(&format!("ctr-{c}"), 20, 100, 64 * MI));
    }
    assert_eq!(pending.len(), 5000);
    let d = schedule(&nodes, &[], &pending);
    assert!(nodes_of(&d).iter().all(Option::is_some), "everything fits");
    let all = as_placed(&pending, &d);
    assert_within_capacity(&nodes, &all);
    // Identical nodes with room to spare: every container is spread evenly.
    let by_container = spread(&all);
    let big = &by_container["ctr-big"];
    assert_eq!(big.len(), 1000);
    assert!(
        big.values().all(|&n| n == 3),
        "3000 replicas on 1000 nodes: 3 each"
    );
    for c in 0..100 {
        let per_node = &by_container[format!("ctr-{c}").as_str()];
        assert_eq!(
            per_node.len(),
            20,
            "ctr-{c}: 20 replicas on 20 distinct nodes"
        );
    }
    // Same input, same answer.
    assert_eq!(schedule(&nodes, &[], &pending), d);
}

#[test]
fn mixed_cluster_fills_up_without_overcommit() {
    // Nodes of varied sizes, some down; far more requests than room.
    let nodes: Vec<NodeCapacity> = (0..1000u64)
        .map(|i| {
            let n = node(&format!("n{i}"), 1000 + (i % 7) * 500, GI + (i % 5) * GI);
            if i % 10 == 3 {
                down(n)
            } else {
                n
            }
        })
        .collect();
    let mut pending = Vec::new();
    for c in 0..500 {
        let (cpu, memory) = [(100, 64 * MI), (500, 256 * MI), (250, 512 * MI)][c % 3];
        pending.extend(replicas(&format!("ctr-{c}"), 30, cpu, memory));
    }
    let d = schedule(&nodes, &[], &pending);
    let all = as_placed(&pending, &d);
    assert_within_capacity(&nodes, &all);
    assert!(
        all.len() > 1000 && all.len() < pending.len(),
        "{} placed",
        all.len()
    );
    let healthy: std::collections::HashSet<&str> = nodes
        .iter()
        .filter(|n| n.healthy)
        .map(|n| n.node_id.as_str())
        .collect();
    assert!(all.iter().all(|p| healthy.contains(p.node_id.as_str())));
    for dec in &d {
        if let Decision::Unschedulable { reason, .. } = dec {
            assert!(reason.starts_with("no node has "), "{reason}");
            assert!(reason.contains("(1000 nodes: "), "{reason}");
            assert!(reason.contains("100 unhealthy"), "{reason}");
        }
    }
    // Next round with everything placed: only what still fits is placed, never beyond capacity.
    let rest: Vec<Request> = pending
        .iter()
        .zip(&d)
        .filter(|(_, d)| matches!(d, Decision::Unschedulable { .. }))
        .map(|(r, _)| r.clone())
        .collect();
    let again = schedule(&nodes, &all, &rest);
    let mut both = all.clone();
    both.extend(as_placed(&rest, &again));
    assert_within_capacity(&nodes, &both);
}

#[test]
fn large_cluster_many_small_containers() {
    // 10,000 nodes and 20,000 pending replicas; must stay quick even in a debug build.
    let nodes: Vec<NodeCapacity> = (0..10_000)
        .map(|i| node(&format!("node-{i:05}"), 8000, 16 * GI))
        .collect();
    let mut pending = Vec::new();
    for c in 0..2000 {
        pending.extend(replicas(&format!("ctr-{c}"), 10, 100, 64 * MI));
    }
    let d = schedule(&nodes, &[], &pending);
    let all = as_placed(&pending, &d);
    assert_eq!(all.len(), 20_000);
    for (c, per_node) in spread(&all) {
        assert_eq!(per_node.len(), 10, "{c} spread over 10 nodes");
    }
    // A full cluster answers a long queue of one shape without rescanning.
    let huge = replicas("ctr-huge", 20_000, 9000, GI);
    let d = schedule(&nodes, &all, &huge);
    assert!(nodes_of(&d).iter().all(Option::is_none));
    assert_eq!(
        reason(&d[19_999]),
        "no node has 9 cpu and 1GiB free (10000 nodes: 10000 lack cpu)"
    );
}

#[test]
fn cordoned_nodes_get_nothing_new_but_keep_what_they_hold() {
    let nodes = [
        cordoned(node("a", 4000, 8 * GI)),
        node("b", 1000, GI),
        down(node("c", 4000, 8 * GI)),
    ];
    // What runs on the cordoned node still holds its resources there.
    let placed = [Placed {
        node_id: "a".into(),
        container_id: "web".into(),
        cpu_millis: 500,
        memory_bytes: 256 * MI,
    }];
    let d = schedule(
        &nodes,
        &placed,
        &[
            req("i1", "web", 500, 256 * MI),
            req("i2", "web", 500, 256 * MI),
            req("i3", "web", 500, 256 * MI),
        ],
    );
    // Spreading would prefer "a" (emptiest) or a node without a replica; only "b" is open.
    assert_eq!(
        d[..2],
        [
            Decision::Place {
                instance_id: "i1".into(),
                node_id: "b".into()
            },
            Decision::Place {
                instance_id: "i2".into(),
                node_id: "b".into()
            }
        ]
    );
    assert_eq!(
        reason(&d[2]),
        "no node has 0.5 cpu and 256MiB free (3 nodes: 1 lacks cpu, 1 unhealthy, 1 unschedulable)"
    );
}
