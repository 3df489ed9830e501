//! Placement of instances on nodes: pure, no I/O, deterministic for the same input.
//!
//! The reconciler hands in every node's capacity, what is already placed and what is pending; it gets back
//! one decision per pending request, in order. Each request goes to a healthy node that is not cordoned
//! (`unschedulable`) with enough free cpu and memory, preferring, in order:
//! 1. the node with the fewest replicas of the same container (spreading, so losing a node loses few),
//! 2. the node with the most free resources, as the sum of its free cpu and free memory fractions (so
//!    neither resource is exhausted first and load stays balanced),
//! 3. the smallest node id, so that ties never depend on input order.
//!
//! Cost: healthy nodes are kept in an ordered set by free resources and each container's replicas per node
//! in a map, so the common case (a free node without that container's replicas near the top) is a few
//! set steps; the worst case is one scan of the nodes per request. A request shape that found no node is
//! remembered until the next placement, so a full cluster answers a long queue in constant time each.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use berth_proto::units::{format_cpu, format_memory};

/// What a node offers, in total, and whether it may receive new instances.
#[derive(Debug, Clone)]
pub struct NodeCapacity {
    /// The node's id.
    pub node_id: String,
    /// Total cpu the node offers, in millicores.
    pub cpu_millis: u64,
    /// Total memory the node offers, in bytes.
    pub memory_bytes: u64,
    /// Whether heartbeats arrive; unhealthy nodes get nothing new.
    pub healthy: bool,
    /// Cordoned by an operator (drain): gets nothing new, keeps what it has.
    pub unschedulable: bool,
}

/// An instance already placed on a node; it holds its resources there.
#[derive(Debug, Clone)]
pub struct Placed {
    /// Where it is placed.
    pub node_id: String,
    /// The container it is a replica of.
    pub container_id: String,
    /// Cpu it holds, in millicores.
    pub cpu_millis: u64,
    /// Memory it holds, in bytes.
    pub memory_bytes: u64,
}

/// An instance waiting for a node.
#[derive(Debug, Clone)]
pub struct Request {
    /// The instance to place.
    pub instance_id: String,
    /// The container it is a replica of.
    pub container_id: String,
    /// Cpu it needs, in millicores.
    pub cpu_millis: u64,
    /// Memory it needs, in bytes.
    pub memory_bytes: u64,
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run the instance on this node.
    Place {
        /// The request's instance.
        instance_id: String,
        /// The chosen node.
        node_id: String,
    },
    /// No node fits now; the instance stays pending with this reason.
    Unschedulable {
        /// The request's instance.
        instance_id: String,
        /// Why nothing fits, for users.
        reason: String,
    },
}

/// Resolution of the free-fraction score; a full fraction is worth this much.
const SCORE_SCALE: u128 = 1_000_000;

/// A node's state during one `schedule` call.
struct Node<'a> {
    id: &'a str,
    healthy: bool,
    unschedulable: bool,
    cpu_total: u64,
    memory_total: u64,
    cpu_free: u64,
    memory_free: u64,
    /// `free_score()` as of the last change of free resources; read in every comparison, so kept.
    score: u64,
}

impl Node<'_> {
    fn has_cpu(&self, r: &Request) -> bool {
        self.cpu_free >= r.cpu_millis
    }

    fn has_memory(&self, r: &Request) -> bool {
        self.memory_free >= r.memory_bytes
    }

    /// Whether it may receive new instances at all.
    fn open(&self) -> bool {
        self.healthy && !self.unschedulable
    }

    fn fits(&self, r: &Request) -> bool {
        self.open() && self.has_cpu(r) && self.has_memory(r)
    }

    /// Takes an instance's resources off the node's free resources.
    fn take(&mut self, cpu_millis: u64, memory_bytes: u64) {
        self.cpu_free = self.cpu_free.saturating_sub(cpu_millis);
        self.memory_free = self.memory_free.saturating_sub(memory_bytes);
        self.score = self.free_score();
    }

    /// Free cpu fraction plus free memory fraction, scaled: higher is emptier.
    fn free_score(&self) -> u64 {
        let fraction = |free: u64, total: u64| {
            if total == 0 {
                0
            } else {
                u128::from(free) * SCORE_SCALE / u128::from(total)
            }
        };
        // Each fraction is at most SCORE_SCALE (free never exceeds total), so the sum fits in u64.
        (fraction(self.cpu_free, self.cpu_total) + fraction(self.memory_free, self.memory_total))
            as u64
    }
}

/// Where one container's replicas are, during one `schedule` call.
#[derive(Default)]
struct Spread {
    /// (node index, replicas there); a vector because the fallback choice scans all of it.
    counts: Vec<(usize, u32)>,
    /// Position in `counts` of each node index.
    position: HashMap<usize, usize>,
    /// How many of those nodes may receive new instances.
    healthy_nodes: usize,
}

impl Spread {
    fn on(&self, node: usize) -> bool {
        self.position.contains_key(&node)
    }

    fn add(&mut self, node: usize, healthy: bool) {
        if let Some(&p) = self.position.get(&node) {
            self.counts[p].1 += 1;
        } else {
            self.position.insert(node, self.counts.len());
            self.counts.push((node, 1));
            self.healthy_nodes += usize::from(healthy);
        }
    }
}

/// Order of preference among nodes with equally few replicas: most free first, then node id (nodes are
/// indexed in node id order).
type Rank = (Reverse<u64>, usize);

/// Places each request on a healthy node with enough free cpu and memory (capacity minus everything already
/// placed, including earlier decisions of the same call), spreading replicas of one container: prefer the node
/// with the fewest replicas of that container, then the most free resources (balanced), then node_id for
/// determinism. The reason says why nothing fits, e.g.
/// "no node has 0.5 cpu and 64MiB free (3 nodes: 2 lack memory, 1 unhealthy)".
///
/// Requests are decided in the order given. Placed instances on unknown nodes hold nothing; a node id listed
/// twice counts once (its first entry).
pub fn schedule(nodes: &[NodeCapacity], placed: &[Placed], pending: &[Request]) -> Vec<Decision> {
    let mut sorted: Vec<&NodeCapacity> = nodes.iter().collect();
    // Stable sort: among duplicates the first entry stays first and survives dedup.
    sorted.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    sorted.dedup_by(|later, earlier| later.node_id == earlier.node_id);
    let mut state: Vec<Node<'_>> = sorted
        .iter()
        .map(|n| Node {
            id: &n.node_id,
            healthy: n.healthy,
            unschedulable: n.unschedulable,
            cpu_total: n.cpu_millis,
            memory_total: n.memory_bytes,
            cpu_free: n.cpu_millis,
            memory_free: n.memory_bytes,
            // Set once the placed instances are taken off.
            score: 0,
        })
        .collect();
    let index: HashMap<&str, usize> = state.iter().enumerate().map(|(i, n)| (n.id, i)).collect();

    let mut spreads: HashMap<&str, Spread> = HashMap::new();
    for p in placed {
        let Some(&i) = index.get(p.node_id.as_str()) else {
            continue;
        };
        state[i].take(p.cpu_millis, p.memory_bytes);
        spreads
            .entry(p.container_id.as_str())
            .or_default()
            .add(i, state[i].open());
    }

    for n in &mut state {
        n.score = n.free_score();
    }
    let mut ranked: BTreeSet<Rank> = state
        .iter()
        .enumerate()
        .filter(|(_, n)| n.open())
        .map(|(i, n)| (Reverse(n.score), i))
        .collect();
    // Shapes (cpu, memory) that fit nowhere, with their reason; valid until the next placement.
    let mut unfit: HashMap<(u64, u64), String> = HashMap::new();

    let mut decisions = Vec::with_capacity(pending.len());
    for r in pending {
        let shape = (r.cpu_millis, r.memory_bytes);
        if let Some(reason) = unfit.get(&shape) {
            decisions.push(Decision::Unschedulable {
                instance_id: r.instance_id.clone(),
                reason: reason.clone(),
            });
            continue;
        }
        let spread = spreads.get(r.container_id.as_str());
        // Once every healthy node holds a replica, walking the ranking for one without is wasted.
        let everywhere = spread.is_some_and(|s| s.healthy_nodes == ranked.len());
        // Best node without a replica of this container, else the best among those with the fewest.
        let choice = (!everywhere)
            .then(|| {
                ranked
                    .iter()
                    .map(|&(_, i)| i)
                    .find(|&i| !spread.is_some_and(|s| s.on(i)) && state[i].fits(r))
            })
            .flatten()
            .or_else(|| {
                spread?
                    .counts
                    .iter()
                    .filter(|&&(i, _)| state[i].fits(r))
                    .min_by_key(|&&(i, n)| (n, Reverse(state[i].score), i))
                    .map(|&(i, _)| i)
            });
        let Some(i) = choice else {
            let reason = unschedulable_reason(&state, r);
            unfit.insert(shape, reason.clone());
            decisions.push(Decision::Unschedulable {
                instance_id: r.instance_id.clone(),
                reason,
            });
            continue;
        };
        let node = &mut state[i];
        ranked.remove(&(Reverse(node.score), i));
        node.take(r.cpu_millis, r.memory_bytes);
        ranked.insert((Reverse(node.score), i));
        spreads
            .entry(r.container_id.as_str())
            .or_default()
            .add(i, node.open());
        unfit.clear();
        decisions.push(Decision::Place {
            instance_id: r.instance_id.clone(),
            node_id: node.id.to_owned(),
        });
    }
    decisions
}

/// Says why no node fits `r`, counting nodes by what they lack.
fn unschedulable_reason(nodes: &[Node<'_>], r: &Request) -> String {
    let (mut unhealthy, mut cordoned, mut lack_both, mut lack_cpu, mut lack_memory) =
        (0, 0, 0, 0, 0);
    for n in nodes {
        match (n.healthy, n.has_cpu(r), n.has_memory(r)) {
            (false, _, _) => unhealthy += 1,
            (true, _, _) if n.unschedulable => cordoned += 1,
            (true, false, false) => lack_both += 1,
            (true, false, true) => lack_cpu += 1,
            (true, true, false) => lack_memory += 1,
            // Unreachable when nothing fits; counted nowhere rather than mislabelled.
            (true, true, true) => {}
        }
    }
    let lack = |n: usize, what: &str| {
        let verb = if n == 1 { "lacks" } else { "lack" };
        format!("{n} {verb} {what}")
    };
    let parts: Vec<String> = [
        (lack_cpu, lack(lack_cpu, "cpu")),
        (lack_memory, lack(lack_memory, "memory")),
        (lack_both, lack(lack_both, "cpu and memory")),
        (unhealthy, format!("{unhealthy} unhealthy")),
        (cordoned, format!("{cordoned} unschedulable")),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(_, part)| part)
    .collect();
    let wanted = format!(
        "no node has {} cpu and {} free",
        format_cpu(r.cpu_millis),
        format_memory(r.memory_bytes)
    );
    match nodes.len() {
        0 => format!("{wanted} (no nodes registered)"),
        1 => format!("{wanted} (1 node: {})", parts.join(", ")),
        n => format!("{wanted} ({n} nodes: {})", parts.join(", ")),
    }
}

#[cfg(test)]
mod tests;
