//! Tests of the cluster logic: the assignment (determinism, exclusivity, balance, bounded
//! movement) and the lease protocol (`next_step` case by case, then a model of nodes, a shared
//! compare-and-set lease store, heartbeats, time, lagging membership views and the nodes' real
//! write path, the time-based fence, driven by random interleavings and checked after every
//! single operation).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn live(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_string()).collect()
}

fn lease(owner: Option<&str>, epoch: u64) -> Lease {
    Lease {
        owner: owner.map(str::to_string),
        epoch,
    }
}

/// Makes the `i`-th node id of a scheme.
type IdScheme = fn(usize) -> String;

/// Node-id schemes seen in deployments: numbered nodes, pod hostnames, addresses, names, uuids.
fn id_schemes() -> Vec<(&'static str, IdScheme)> {
    vec![
        ("node-1..", |i| format!("node-{}", i + 1)),
        ("node-0..", |i| format!("node-{i}")),
        ("hostname", |i| {
            format!("sagaflow-{i}.sagaflow.default.svc.cluster.local")
        }),
        ("address", |i| format!("10.0.0.{}:7000", i + 11)),
        ("names", |i| {
            [
                "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
            ][i]
                .to_string()
        }),
        ("uuid", |i| {
            format!(
                "{:08x}-7d2c-4e1a-9b3f-{:012x}",
                0x5f3a_0000 + i * 7919,
                0x1234_5678_9abc + i * 104_729
            )
        }),
    ]
}

fn loads(ids: &[String], partitions: u32) -> Vec<usize> {
    let members: BTreeSet<String> = ids.iter().cloned().collect();
    let mut loads = vec![0; ids.len()];
    for o in assignment(partitions, &members) {
        loads[ids.iter().position(|id| Some(id.as_str()) == o).unwrap()] += 1;
    }
    loads
}

/// The owner of one partition (the whole assignment computed for it: fine in tests).
fn owner(partition: u32, partitions: u32, live: &BTreeSet<String>) -> Option<&str> {
    assignment(partitions, live)
        .get(partition as usize)
        .copied()
        .flatten()
}

/// Plain rendezvous hashing: the heaviest live node of `partition` (ties to the greater id).
fn heaviest(partition: u32, live: &BTreeSet<String>) -> Option<&str> {
    live.iter()
        .max_by_key(|n| (weight(n, partition), n.as_str()))
        .map(String::as_str)
}

/// The loads plain rendezvous hashing would give.
fn heaviest_loads(ids: &[String], partitions: u32) -> Vec<usize> {
    let members: BTreeSet<String> = ids.iter().cloned().collect();
    let mut loads = vec![0; ids.len()];
    for p in 0..partitions {
        let o = heaviest(p, &members).unwrap();
        loads[ids.iter().position(|id| id == o).unwrap()] += 1;
    }
    loads
}

/// The assignment's rule, written independently and slowly: again and again, of the pairs
/// (node, free partition) whose node may still take one, give the heaviest pair's partition
/// to its node. A node may take one while it holds fewer than ⌊P/N⌋, or exactly ⌊P/N⌋ while
/// fewer than P mod N nodes hold more.
fn assignment_by_rounds(partitions: u32, live: &BTreeSet<String>) -> Vec<Option<String>> {
    let mut owners: Vec<Option<String>> = vec![None; partitions as usize];
    if live.is_empty() {
        return owners;
    }
    let n = live.len();
    let (floor, extra) = (partitions as usize / n, partitions as usize % n);
    let mut load: BTreeMap<&str, usize> = live.iter().map(|id| (id.as_str(), 0)).collect();
    loop {
        let above = load.values().filter(|&&l| l > floor).count();
        let best = live
            .iter()
            .filter(|id| {
                let l = load[id.as_str()];
                l < floor || (l == floor && above < extra)
            })
            .flat_map(|id| {
                (0..partitions)
                    .filter(|&p| owners[p as usize].is_none())
                    .map(move |p| (weight(id, p), id.as_str(), p))
            })
            .max();
        let Some((_, id, p)) = best else {
            return owners;
        };
        owners[p as usize] = Some(id.to_string());
        *load.get_mut(id).unwrap() += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Assignment
// ---------------------------------------------------------------------------------------------

#[test]
fn weight_is_pinned_across_builds() {
    // Every node must compute the same assignment, whatever its build: a change of these values
    // is a change of the cluster's wire behaviour (mixed-version clusters would disagree).
    assert_eq!(weight("node-1", 0), weight("node-1", 0));
    let pinned = [
        weight("node-1", 0),
        weight("node-1", 1),
        weight("node-2", 0),
    ];
    assert_eq!(pinned, PINNED_WEIGHTS);
    // The node id and the partition both matter, and the separator keeps ("a1", p) apart from
    // ("a", p') when the bytes would otherwise run together.
    assert_ne!(weight("node-1", 0), weight("node-1", 1));
    assert_ne!(weight("node-1", 0), weight("node-2", 0));
    assert_ne!(weight("", 0), weight("", 1));
}

/// `weight("node-1", 0)`, `weight("node-1", 1)`, `weight("node-2", 0)`: 64-bit FNV-1a of
/// `id ++ 0x00 ++ partition (u32 LE)`, then the murmur3 `fmix64` finaliser (checked against an
/// independent implementation).
const PINNED_WEIGHTS: [u64; 3] = [
    9_645_991_681_553_995_565,
    10_093_731_446_334_721_176,
    3_787_157_296_535_702_006,
];

#[test]
fn no_live_node_owns_nothing() {
    let empty = BTreeSet::new();
    assert_eq!(owner(0, 8, &empty), None);
    assert_eq!(assignment(8, &empty), vec![None; 8]);
    assert_eq!(owner(8, 8, &live(&["node-1"])), None, "no such partition");
    assert!(owned_by("node-1", 8, &empty).is_empty());
    assert!(owned_by("node-1", 0, &live(&["node-1"])).is_empty());
    // A single node owns everything.
    assert_eq!(
        owned_by("node-1", 8, &live(&["node-1"])),
        (0..8).collect::<Vec<_>>()
    );
}

#[test]
fn owner_is_deterministic_and_independent_of_insertion_order() {
    let ids = [
        "node-3",
        "node-1",
        "sagaflow-0.sagaflow",
        "10.0.0.7:7000",
        "node-2",
    ];
    let orders: [[usize; 5]; 4] = [
        [0, 1, 2, 3, 4],
        [4, 3, 2, 1, 0],
        [2, 0, 4, 1, 3],
        [1, 4, 0, 3, 2],
    ];
    let sets: Vec<BTreeSet<String>> = orders
        .iter()
        .map(|order| {
            let mut s = BTreeSet::new();
            for &i in order {
                s.insert(ids[i].to_string());
            }
            s
        })
        .collect();
    for partitions in [1u32, 2, 3, 7, 8, 32, 100] {
        let expected = assignment(partitions, &sets[0]);
        for s in &sets {
            assert_eq!(assignment(partitions, s), expected);
            for p in 0..partitions {
                assert_eq!(owner(p, partitions, s), expected[p as usize]);
            }
        }
        // It is the rule, computed independently of the set's ordering.
        let by_rounds = assignment_by_rounds(partitions, &sets[0]);
        let expected: Vec<Option<String>> = expected
            .into_iter()
            .map(|o| o.map(str::to_string))
            .collect();
        assert_eq!(expected, by_rounds, "{partitions} partitions");
    }
}

#[test]
fn every_partition_has_exactly_one_owner_among_live_nodes() {
    for (_, scheme) in id_schemes() {
        for n in 1..=8 {
            let ids: Vec<String> = (0..n).map(scheme).collect();
            let members: BTreeSet<String> = ids.iter().cloned().collect();
            let partitions = 97;
            let owned: Vec<Vec<u32>> = ids
                .iter()
                .map(|id| owned_by(id, partitions, &members))
                .collect();
            for p in 0..partitions {
                let holders: Vec<&String> = ids
                    .iter()
                    .zip(&owned)
                    .filter(|(_, o)| o.contains(&p))
                    .map(|(id, _)| id)
                    .collect();
                assert_eq!(holders.len(), 1, "partition {p} among {ids:?}");
                assert_eq!(owner(p, partitions, &members), Some(holders[0].as_str()));
            }
            assert_eq!(
                owned.iter().map(Vec::len).sum::<usize>(),
                partitions as usize
            );
        }
    }
}

#[test]
fn every_node_holds_its_share_to_within_one() {
    for (name, scheme) in id_schemes() {
        for n in 1..=8usize {
            let ids: Vec<String> = (0..n).map(scheme).collect();
            for partitions in [1u32, 2, 3, 5, 8, 16, 32, 97, 256, 1024] {
                let l = loads(&ids, partitions);
                assert_eq!(l.iter().sum::<usize>(), partitions as usize);
                let floor = partitions as usize / n;
                assert!(
                    l.iter().all(|&x| x == floor || x == floor + 1),
                    "{name} n={n} p={partitions}: {l:?}"
                );
            }
        }
    }
}

#[test]
fn bounded_loads_fix_what_plain_rendezvous_leaves_to_chance() {
    // Plain rendezvous hashing, 8 partitions on 3 nodes, measured: node-1.. [2, 3, 3],
    // node-0.. [3, 3, 2], hostname [1, 2, 5], address [4, 3, 1], names [4, 0, 4] (a node with
    // nothing to do), uuid [4, 3, 1]; with 32 partitions node-1.. [9, 15, 8] and hostname
    // [8, 14, 10]. With bounded loads every scheme gets 3, 3 and 2 (and 11, 11 and 10).
    let mut unbalanced = 0;
    for (name, scheme) in id_schemes() {
        let ids: Vec<String> = (0..3).map(scheme).collect();
        let mut plain = heaviest_loads(&ids, 8);
        plain.sort_unstable();
        unbalanced += usize::from(plain != [2, 3, 3]);
        let mut bounded = loads(&ids, 8);
        bounded.sort_unstable();
        assert_eq!(bounded, [2, 3, 3], "{name}: {ids:?}");
        let mut bounded = loads(&ids, 32);
        bounded.sort_unstable();
        assert_eq!(bounded, [10, 11, 11], "{name}: {ids:?}");
    }
    assert!(
        unbalanced >= 4,
        "plain rendezvous balanced {unbalanced} of 6 schemes"
    );
}

/// Chi-square statistic of the loads against a uniform split.
fn chi2(loads: &[usize], partitions: u32) -> f64 {
    let fair = f64::from(partitions) / loads.len() as f64;
    loads
        .iter()
        .map(|&x| (x as f64 - fair).powi(2) / fair)
        .sum()
}

#[test]
fn hash_is_as_good_as_random() {
    // The weights decide which partitions a node prefers, so they must spread like random
    // numbers: over many node sets, the chi-square statistic of the loads plain rendezvous
    // hashing would give (n - 1 degrees of freedom)
    // averages n - 1 for an ideal random assignment; a hash that clusters would be far above.
    // Measured: mean chi2 / df between 0.98 and 1.03 for every n, like a seeded ideal RNG.
    for n in [3usize, 5, 8] {
        for partitions in [32u32, 64, 256] {
            let sets = 300;
            let total: f64 = (0..sets)
                .map(|s| {
                    let ids: Vec<String> = (0..n).map(|i| format!("n{s}-{i}")).collect();
                    chi2(&heaviest_loads(&ids, partitions), partitions)
                })
                .sum();
            let ratio = total / f64::from(sets) / (n - 1) as f64;
            assert!(
                (0.8..=1.2).contains(&ratio),
                "n={n} p={partitions}: chi2/df = {ratio:.3}"
            );
        }
    }
}

fn node_ids() -> impl Strategy<Value = BTreeSet<String>> {
    prop::collection::btree_set("[a-z0-9.:-]{1,12}", 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_join_moves_the_newcomers_share_and_a_few_more(
        members in node_ids(),
        newcomer in "[a-z0-9.:-]{1,12}",
        partitions in 1u32..400,
    ) {
        prop_assume!(!members.contains(&newcomer));
        let mut after = members.clone();
        after.insert(newcomer.clone());
        let (old, new) = (assignment(partitions, &members), assignment(partitions, &after));
        let share = owned_by(&newcomer, partitions, &after).len();
        let floor = partitions as usize / after.len();
        prop_assert!(share == floor || share == floor + 1, "newcomer holds {}", share);
        let moved = old.iter().zip(&new).filter(|(o, n)| o != n).count();
        // Measured over random sets: never more than twice the share plus one per other node.
        prop_assert!(
            moved <= 2 * share + members.len(),
            "{} moved for a share of {} among {} nodes", moved, share, members.len()
        );
        prop_assert!(new.iter().all(|o| o.is_some_and(|o| after.contains(o))));
    }

    #[test]
    fn a_leave_moves_the_leavers_share_and_a_few_more(
        members in node_ids(),
        leaver_index in any::<prop::sample::Index>(),
        partitions in 1u32..400,
    ) {
        let leaver = leaver_index.get(&members.iter().cloned().collect::<Vec<_>>()).clone();
        let mut after = members.clone();
        after.remove(&leaver);
        let share = owned_by(&leaver, partitions, &members).len();
        let (old, new) = (assignment(partitions, &members), assignment(partitions, &after));
        if after.is_empty() {
            prop_assert!(new.iter().all(Option::is_none));
        } else {
            for (p, (o, n)) in old.iter().zip(&new).enumerate() {
                // The leaver's partitions all move, to nodes that stay.
                prop_assert!(n.is_some_and(|n| n != leaver && after.contains(n)));
                if *o == Some(leaver.as_str()) {
                    prop_assert_ne!(o, n, "partition {} stayed with the leaver", p);
                }
            }
            let moved = old.iter().zip(&new).filter(|(o, n)| o != n).count();
            prop_assert!(
                moved <= 2 * share + after.len(),
                "{} moved for a share of {} among {} nodes", moved, share, after.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// next_step, case by case
// ---------------------------------------------------------------------------------------------

#[test]
fn next_step_covers_every_case() {
    let members = live(&["me", "other"]);
    let me = "me";
    let cases: Vec<(&str, bool, Option<Lease>, LeaseStep)> = vec![
        // Assigned to me.
        (
            "assigned, never leased",
            true,
            None,
            LeaseStep::Acquire(lease(Some(me), 1)),
        ),
        (
            "assigned, released",
            true,
            Some(lease(None, 7)),
            LeaseStep::Acquire(lease(Some(me), 8)),
        ),
        (
            "assigned, mine",
            true,
            Some(lease(Some(me), 7)),
            LeaseStep::Hold,
        ),
        (
            "assigned, held by a live node",
            true,
            Some(lease(Some("other"), 7)),
            LeaseStep::Wait,
        ),
        (
            "assigned, held by a dead node",
            true,
            Some(lease(Some("gone"), 7)),
            LeaseStep::Acquire(lease(Some(me), 8)),
        ),
        // Not assigned to me.
        (
            "not assigned, mine",
            false,
            Some(lease(Some(me), 7)),
            LeaseStep::Release(lease(None, 7)),
        ),
        ("not assigned, never leased", false, None, LeaseStep::Wait),
        (
            "not assigned, released",
            false,
            Some(lease(None, 7)),
            LeaseStep::Wait,
        ),
        (
            "not assigned, held by a live node",
            false,
            Some(lease(Some("other"), 7)),
            LeaseStep::Wait,
        ),
        (
            "not assigned, held by a dead node",
            false,
            Some(lease(Some("gone"), 7)),
            LeaseStep::Wait,
        ),
    ];
    for (what, assigned, stored, expected) in cases {
        assert_eq!(
            next_step(me, assigned, stored.as_ref(), &members),
            expected,
            "{what}"
        );
    }
    // Whether `me` itself is in the view does not matter for its own lease.
    let without_me = live(&["other"]);
    assert_eq!(
        next_step(me, true, Some(&lease(Some(me), 3)), &without_me),
        LeaseStep::Hold
    );
    assert_eq!(
        next_step(me, false, Some(&lease(Some(me), 3)), &without_me),
        LeaseStep::Release(lease(None, 3))
    );
    // With an empty view, every holder is dead.
    assert_eq!(
        next_step(me, true, Some(&lease(Some("other"), 3)), &BTreeSet::new()),
        LeaseStep::Acquire(lease(Some(me), 4))
    );
    // Epochs: acquisition raises by exactly one, release keeps the epoch.
    assert_eq!(
        next_step(me, true, Some(&lease(None, 0)), &members),
        LeaseStep::Acquire(lease(Some(me), 1))
    );
}

// ---------------------------------------------------------------------------------------------
// The lease protocol, modelled
// ---------------------------------------------------------------------------------------------
//
// Nodes, a shared compare-and-set lease store, heartbeats and time. What the code does, and
// only that:
//
// - a node is live to another if its last heartbeat is younger than `TTL` when that other
//   takes its view (`Op::ViewSync`); views lag, since they are used long after they were taken;
// - a consumer's writes (snapshots, commands) are **not** checked against the lease's epoch:
//   they pass the node's time-based fence (`src/fence.rs`), which is open until its last
//   heartbeat plus `TTL − MARGIN`, and which a late heartbeat suspends until a membership round
//   started after it has read every lease;
// - snapshot writes are compare-and-set on the saga's revision: that, not the lease, is what
//   makes an overlap of two writers safe (`docs/cluster.md`), so the model counts overlaps and
//   checks they arise only the one way they can.

/// `cluster.node_ttl` in the model's milliseconds.
const TTL: u64 = 3_000;
/// The fence's margin: one `heartbeat_interval`.
const MARGIN: u64 = 1_000;

/// One stored lease entry: the value and its revision (bumped by every successful write).
#[derive(Debug, Clone, Default)]
struct Entry {
    lease: Option<Lease>,
    revision: u64,
}

#[derive(Debug, Clone)]
struct Node {
    id: String,
    joined: bool,
    /// Taking steps. A paused node keeps all its local state, stale or not.
    up: bool,
    /// Its own, possibly lagging, view of the live nodes, and when it was taken (event
    /// sequence).
    view: BTreeSet<String>,
    view_seq: u64,
    /// Partition → epoch of the lease it believes it holds.
    held: BTreeMap<u32, u64>,
    consuming: BTreeSet<u32>,
    /// Decided but not yet written: partition → (revision read, step, the view decided on). A
    /// read and its compare-and-set are two separate moves, so that anything can happen in
    /// between (the node may even take a newer view meanwhile).
    pending: BTreeMap<u32, (u64, LeaseStep, u64)>,
    /// When its last heartbeat was stored (time, event sequence).
    beat: Option<(u64, u64)>,
    /// Its fence: writes pass until this time (0: no heartbeat yet) unless suspended.
    alive_until: u64,
    suspended: bool,
    suspensions: u64,
    /// A membership round in progress: the suspensions counted at its start and the
    /// partitions whose lease it has read since.
    round: Option<(u64, BTreeSet<u32>)>,
    /// Partition → when it last read the partition's lease (event sequence).
    read_seq: BTreeMap<u32, u64>,
}

impl Node {
    fn fence_open(&self, now: u64) -> bool {
        !self.suspended && self.alive_until != 0 && now <= self.alive_until
    }
}

/// How often the interesting things happened (for the coverage test).
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    acquired: usize,
    released: usize,
    cas_lost: usize,
    /// Takeovers of a lease whose holder was in fact running (its heartbeat lapsed, or the
    /// taker's view was old).
    stolen_from_running: usize,
    /// Stale consumers stopped by the fencing check at their next reconcile step.
    fenced: usize,
    /// Writes refused by the fence of a consumer whose lease had moved on.
    stale_writes_refused: usize,
    /// Heartbeats that came too late and suspended their node.
    suspended: usize,
    /// Writes accepted while another node held the lease: a taker that acted on a view older
    /// than the writer's last heartbeat, and wrote after the writer had last checked.
    overlaps: usize,
    max_rounds: usize,
}

/// When a lease was acquired, and when the view the taker decided on was taken (event
/// sequences).
#[derive(Debug, Clone, Copy)]
struct Acquisition {
    seq: u64,
    view_seq: u64,
}

struct World {
    partitions: u32,
    now: u64,
    /// Orders the events that happen at the same time.
    seq: u64,
    nodes: Vec<Node>,
    store: Vec<Entry>,
    /// Per partition, the highest epoch ever stored.
    high: Vec<u64>,
    /// Per partition: epoch → its acquisition.
    acquisitions: Vec<BTreeMap<u64, Acquisition>>,
    /// Per partition, accepted writes by consumers (node index, epoch), in order.
    writes: Vec<Vec<(usize, u64)>>,
    stats: Stats,
}

impl World {
    fn new(initial: usize, joiners: usize, partitions: u32) -> World {
        let ids: Vec<String> = (0..initial + joiners)
            .map(|i| format!("node-{i}"))
            .collect();
        let nodes = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Node {
                id: id.clone(),
                joined: i < initial,
                up: i < initial,
                view: BTreeSet::new(),
                view_seq: 0,
                held: BTreeMap::new(),
                consuming: BTreeSet::new(),
                pending: BTreeMap::new(),
                beat: None,
                alive_until: 0,
                suspended: false,
                suspensions: 0,
                round: None,
                read_seq: BTreeMap::new(),
            })
            .collect();
        let mut w = World {
            partitions,
            now: 0,
            seq: 0,
            nodes,
            store: vec![Entry::default(); partitions as usize],
            high: vec![0; partitions as usize],
            acquisitions: vec![BTreeMap::new(); partitions as usize],
            writes: vec![Vec::new(); partitions as usize],
            stats: Stats::default(),
        };
        // The first nodes start together: each writes its heartbeat, then looks.
        for i in 0..initial {
            w.beat(i);
        }
        for i in 0..initial {
            w.view_sync(i);
        }
        w
    }

    fn index(&self, id: &str) -> usize {
        self.nodes.iter().position(|n| n.id == id).unwrap()
    }

    fn running(&self) -> BTreeSet<String> {
        self.nodes
            .iter()
            .filter(|n| n.up)
            .map(|n| n.id.clone())
            .collect()
    }

    /// Node `i` writes its heartbeat now (`heartbeat_stored` of the fence).
    fn beat(&mut self, i: usize) {
        let now = self.now;
        self.seq += 1;
        let seq = self.seq;
        let node = &mut self.nodes[i];
        if !(node.up && node.joined) {
            return;
        }
        if node.alive_until != 0 && now > node.alive_until {
            node.suspensions += 1;
            node.suspended = true;
            self.stats.suspended += 1;
        }
        node.alive_until = node.alive_until.max(now + TTL - MARGIN);
        node.beat = Some((now, seq));
    }

    /// Node `i` takes its view: the joined nodes whose heartbeat is younger than `TTL`, and
    /// itself.
    fn view_sync(&mut self, i: usize) {
        let now = self.now;
        let mut view: BTreeSet<String> = self
            .nodes
            .iter()
            .filter(|n| n.joined && n.beat.is_some_and(|(b, _)| now < b + TTL))
            .map(|n| n.id.clone())
            .collect();
        view.insert(self.nodes[i].id.clone());
        self.seq += 1;
        let node = &mut self.nodes[i];
        node.view = view;
        node.view_seq = self.seq;
    }

    /// Compare-and-set of partition `p`'s lease: succeeds only if `revision` is still current.
    fn cas(&mut self, p: u32, revision: u64, new: Lease) -> bool {
        let entry = &mut self.store[p as usize];
        if entry.revision != revision {
            self.stats.cas_lost += 1;
            return false;
        }
        entry.lease = Some(new);
        entry.revision += 1;
        true
    }

    /// One reconcile move of node `i` for partition `p`: the compare-and-set of a decision taken
    /// earlier if there is one, else a read, the fencing check and a decision.
    fn step(&mut self, i: usize, p: u32) {
        if !self.nodes[i].up {
            return;
        }
        if let Some((revision, step, decided_on)) = self.nodes[i].pending.remove(&p) {
            let before = self.store[p as usize].lease.clone();
            match step {
                LeaseStep::Acquire(l) => {
                    let epoch = l.epoch;
                    let was = before.as_ref().and_then(|b| b.owner.clone());
                    if self.cas(p, revision, l) {
                        self.stats.acquired += 1;
                        if was.is_some_and(|h| self.nodes[self.index(&h)].up) {
                            self.stats.stolen_from_running += 1;
                        }
                        self.seq += 1;
                        self.acquisitions[p as usize].insert(
                            epoch,
                            Acquisition {
                                seq: self.seq,
                                view_seq: decided_on,
                            },
                        );
                        let node = &mut self.nodes[i];
                        assert!(!node.held.contains_key(&p) && !node.consuming.contains(&p));
                        node.held.insert(p, epoch);
                        node.consuming.insert(p);
                    }
                }
                LeaseStep::Release(l) => {
                    // It stopped consuming when it decided; only now is the lease written free.
                    assert!(!self.nodes[i].consuming.contains(&p));
                    if self.cas(p, revision, l) {
                        self.stats.released += 1;
                        self.nodes[i].held.remove(&p);
                    }
                }
                other => panic!("nothing to write for {other:?}"),
            }
            return;
        }

        let Entry {
            lease: stored,
            revision,
        } = self.store[p as usize].clone();
        let partitions = self.partitions;
        self.seq += 1;
        let seq = self.seq;
        let node = &mut self.nodes[i];
        node.read_seq.insert(p, seq);
        // Fencing: a belief that does not match the stored lease is dropped on the spot.
        if let Some(&e) = node.held.get(&p) {
            let current = stored
                .as_ref()
                .is_some_and(|l| l.owner.as_deref() == Some(node.id.as_str()) && l.epoch == e);
            if !current {
                node.held.remove(&p);
                if node.consuming.remove(&p) {
                    self.stats.fenced += 1;
                }
            }
        }
        let assigned = owner(p, partitions, &node.view) == Some(node.id.as_str());
        let step = next_step(&node.id, assigned, stored.as_ref(), &node.view);
        let stored_epoch = stored.as_ref().map_or(0, |l| l.epoch);
        match step {
            LeaseStep::Acquire(ref l) => {
                assert_eq!(l.owner.as_deref(), Some(node.id.as_str()));
                assert_eq!(l.epoch, stored_epoch + 1);
                node.pending.insert(p, (revision, step, node.view_seq));
            }
            LeaseStep::Release(ref l) => {
                assert_eq!(l.owner, None);
                assert_eq!(l.epoch, stored_epoch);
                node.consuming.remove(&p);
                node.pending.insert(p, (revision, step, node.view_seq));
            }
            LeaseStep::Hold => {
                // `Hold` is only ever said to the node that wrote the stored lease, and it is
                // consuming at exactly that epoch.
                assert_eq!(
                    node.held.get(&p),
                    Some(&stored_epoch),
                    "{} told to hold {p} it does not hold",
                    node.id
                );
                assert!(node.consuming.contains(&p));
            }
            LeaseStep::Wait => {}
        }
        // A round that has now read every lease lifts a suspension that began before it.
        if let Some((seen, read)) = node.round.as_mut() {
            read.insert(p);
            if read.len() == partitions as usize {
                if node.suspensions == *seen {
                    node.suspended = false;
                }
                node.round = None;
            }
        }
        // (c) Whatever it decided, a node that went through a reconcile step for `p` consumes it
        // only if the stored lease names it at the epoch it believes in.
        let node = &self.nodes[i];
        if node.consuming.contains(&p) {
            let l = self.store[p as usize].lease.as_ref().unwrap();
            assert_eq!(l.owner.as_deref(), Some(node.id.as_str()));
            assert_eq!(Some(&l.epoch), node.held.get(&p));
        }
    }

    /// Time passes: every running consumer writes (a snapshot, say) through its fence, as the
    /// code does: the lease is not consulted.
    fn tick(&mut self) {
        let now = self.now;
        for (i, node) in self.nodes.iter().enumerate().filter(|(_, n)| n.up) {
            for &p in &node.consuming {
                let e = node.held[&p];
                let l = self.store[p as usize].lease.as_ref().unwrap();
                let ours = l.owner.as_deref() == Some(node.id.as_str()) && l.epoch == e;
                if !node.fence_open(now) {
                    if !ours {
                        self.stats.stale_writes_refused += 1;
                    }
                    continue;
                }
                if !ours {
                    // (e) An overlap: someone took the lease over while this node may still
                    // write. Only possible if the taker decided on a view older than this
                    // node's last heartbeat (so no fresh view ever judged it dead while its
                    // fence was open) and its write landed after this node last checked the
                    // lease (so the suspension after a lapse did its job).
                    let taken = *self.acquisitions[p as usize]
                        .get(&(e + 1))
                        .expect("the lease moved on by an acquisition");
                    let (_, beat) = node.beat.unwrap();
                    let read = node.read_seq[&p];
                    // The time fence: a view can only exclude a node whose fence had closed,
                    // so this node heartbeat again since.
                    assert!(
                        taken.view_seq < beat,
                        "{} writes {p} at epoch {e} although the view #{} that judged it dead came after its last heartbeat #{beat}",
                        node.id,
                        taken.view_seq
                    );
                    // The suspension: after a lapse, the lease is read again before any write.
                    assert!(
                        read > taken.view_seq,
                        "{} writes {p} at epoch {e}: its lease was last read (#{read}) before the view #{} that judged it dead",
                        node.id,
                        taken.view_seq
                    );
                    // The read-time fencing: a holder that saw the lease taken stops.
                    assert!(taken.seq > read);
                    self.stats.overlaps += 1;
                }
                self.writes[p as usize].push((i, e));
            }
        }
    }

    fn check(&mut self) {
        for p in 0..self.partitions {
            let entry = &self.store[p as usize];
            let epoch = entry.lease.as_ref().map_or(0, |l| l.epoch);
            // (a) The epoch never goes down, and a held lease has an epoch.
            assert!(
                epoch >= self.high[p as usize],
                "partition {p}: epoch went down"
            );
            self.high[p as usize] = epoch;
            if entry.lease.as_ref().is_some_and(|l| l.owner.is_some()) {
                assert!(epoch >= 1);
            }
            // (b) At most one node believes in the current epoch, and it is the one the lease
            // names; every other belief is at an older epoch; no two nodes ever believed in the
            // same epoch.
            let believers: Vec<(&str, u64)> = self
                .nodes
                .iter()
                .filter_map(|n| n.held.get(&p).map(|&e| (n.id.as_str(), e)))
                .collect();
            let current: Vec<&str> = believers
                .iter()
                .filter(|(_, e)| *e == epoch)
                .map(|(id, _)| *id)
                .collect();
            assert!(
                current.len() <= 1,
                "partition {p}: {current:?} all hold epoch {epoch}"
            );
            if let Some(id) = current.first() {
                assert_eq!(entry.lease.as_ref().unwrap().owner.as_deref(), Some(*id));
            }
            assert!(believers.iter().all(|(_, e)| *e <= epoch));
            let epochs: BTreeSet<u64> = believers.iter().map(|(_, e)| *e).collect();
            assert_eq!(
                epochs.len(),
                believers.len(),
                "partition {p}: shared epoch in {believers:?}"
            );
            // Accepted writes: one writer per epoch.
            let mut writer_of: BTreeMap<u64, usize> = BTreeMap::new();
            for &(i, e) in &self.writes[p as usize] {
                assert_eq!(*writer_of.entry(e).or_insert(i), i);
            }
        }
        for n in &self.nodes {
            assert!(
                n.consuming.iter().all(|p| n.held.contains_key(p)),
                "{} consumes without a lease",
                n.id
            );
        }
    }

    fn apply(&mut self, op: &Op) {
        let count = self.nodes.len();
        match *op {
            Op::Step { node, partition } => self.step(node % count, partition % self.partitions),
            Op::Pause { node } => self.nodes[node % count].up = false,
            Op::Resume { node } => {
                let n = &mut self.nodes[node % count];
                n.up = n.joined;
            }
            Op::Join { node } => {
                let i = node % count;
                if !self.nodes[i].joined {
                    let n = &mut self.nodes[i];
                    n.joined = true;
                    n.up = true;
                    self.beat(i);
                    self.view_sync(i);
                }
            }
            Op::Beat { node } => self.beat(node % count),
            Op::Advance { ms } => self.now += ms,
            Op::RoundStart { node } => {
                let n = &mut self.nodes[node % count];
                if n.up {
                    n.round = Some((n.suspensions, BTreeSet::new()));
                }
            }
            Op::ViewSync { at } => {
                if self.nodes[at % count].up {
                    self.view_sync(at % count);
                }
            }
            Op::Tick => self.tick(),
        }
        self.check();
    }

    /// Whether every partition is held by its assigned owner among `members`, which consumes
    /// it, no other running node consumes it and no write is pending.
    fn settled(&self, members: &BTreeSet<String>) -> bool {
        let owners = assignment(self.partitions, members);
        (0..self.partitions).all(|p| {
            let o = owners[p as usize].unwrap();
            let l = self.store[p as usize].lease.as_ref();
            let holder = &self.nodes[self.index(o)];
            l.is_some_and(|l| {
                l.owner.as_deref() == Some(o) && holder.held.get(&p) == Some(&l.epoch)
            }) && holder.consuming.contains(&p)
                && self
                    .nodes
                    .iter()
                    .filter(|n| n.up)
                    .all(|n| n.id == o || !n.consuming.contains(&p))
                && self
                    .nodes
                    .iter()
                    .filter(|n| n.up)
                    .all(|n| n.pending.is_empty())
        })
    }

    /// One membership round of every running node: a heartbeat, a fresh view, a read (and
    /// decision, or pending write) of every partition.
    fn round_of_all(&mut self, running: &[usize]) {
        for &i in running {
            self.beat(i);
        }
        for &i in running {
            self.view_sync(i);
            self.nodes[i].round = Some((self.nodes[i].suspensions, BTreeSet::new()));
            for p in 0..self.partitions {
                self.step(i, p);
                self.check();
            }
        }
    }

    /// (d) Paused nodes' heartbeats expire, the running nodes heartbeat and reconcile
    /// round-robin: every partition ends with its assigned owner, and stays there; every
    /// running node's fence is open again and every paused node's closed.
    fn converge(&mut self) {
        self.now += TTL;
        let members = self.running();
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up)
            .collect();
        // The first round makes the views agree; then `MAX_ROUNDS` suffice.
        let mut rounds = 0;
        while rounds == 0 || !self.settled(&members) {
            rounds += 1;
            assert!(
                rounds <= MAX_ROUNDS + 1,
                "not settled after {MAX_ROUNDS} rounds"
            );
            self.round_of_all(&running);
        }
        self.stats.max_rounds = self.stats.max_rounds.max(rounds);
        // Settled is stable: another round changes nothing.
        let before: Vec<Option<Lease>> = self.store.iter().map(|e| e.lease.clone()).collect();
        self.round_of_all(&running);
        assert!(self.settled(&members));
        assert_eq!(
            before,
            self.store
                .iter()
                .map(|e| e.lease.clone())
                .collect::<Vec<_>>()
        );
        for &i in &running {
            assert!(self.nodes[i].fence_open(self.now), "{}", self.nodes[i].id);
        }
        // Nodes left paused are fenced out: their fence is closed, and whatever they believe
        // is older than the stored epoch.
        for n in self.nodes.iter().filter(|n| !n.up) {
            assert!(!n.fence_open(self.now), "{}", n.id);
            for (&p, &e) in &n.held {
                assert!(e < self.store[p as usize].lease.as_ref().unwrap().epoch);
            }
        }
    }
}

/// Rounds of round-robin reconciliation that suffice once views agree: a stale pending
/// acquisition may land (1), its holder then decides and writes the release (2, 3), the owner
/// decides and writes its acquisition (4 when it comes before the holder in the round, then 5).
const MAX_ROUNDS: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    Step { node: usize, partition: u32 },
    Pause { node: usize },
    Resume { node: usize },
    Join { node: usize },
    Beat { node: usize },
    Advance { ms: u64 },
    RoundStart { node: usize },
    ViewSync { at: usize },
    Tick,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0..16usize, 0..8u32).prop_map(|(node, partition)| Op::Step { node, partition }),
        1 => (0..16usize).prop_map(|node| Op::Pause { node }),
        2 => (0..16usize).prop_map(|node| Op::Resume { node }),
        1 => (0..16usize).prop_map(|node| Op::Join { node }),
        4 => (0..16usize).prop_map(|node| Op::Beat { node }),
        3 => (0..=TTL).prop_map(|ms| Op::Advance { ms }),
        2 => (0..16usize).prop_map(|node| Op::RoundStart { node }),
        3 => (0..16usize).prop_map(|at| Op::ViewSync { at }),
        3 => Just(Op::Tick),
    ]
}

#[derive(Debug, Clone)]
struct Scenario {
    nodes: usize,
    joiners: usize,
    partitions: u32,
    ops: Vec<Op>,
    resume_all: bool,
}

fn scenario_strategy() -> impl Strategy<Value = Scenario> {
    (
        2..=5usize,
        0..=2usize,
        1..=8u32,
        prop::collection::vec(op_strategy(), 0..200),
        any::<bool>(),
    )
        .prop_map(|(nodes, joiners, partitions, ops, resume_all)| Scenario {
            nodes,
            joiners,
            partitions,
            ops,
            resume_all,
        })
}

fn simulate(s: &Scenario) -> Stats {
    let mut w = World::new(s.nodes, s.joiners, s.partitions);
    w.check();
    for op in &s.ops {
        w.apply(op);
    }
    if s.resume_all {
        for n in w.nodes.iter_mut() {
            n.up = n.joined;
        }
    }
    if w.nodes.iter().all(|n| !n.up) {
        w.nodes[0].up = true;
    }
    w.converge();
    w.stats
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn lease_protocol_is_safe_under_any_interleaving_and_converges(s in scenario_strategy()) {
        simulate(&s);
    }
}

/// The random scenarios do reach the interesting situations, often.
#[test]
fn random_scenarios_reach_every_situation() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(Config::default().rng_algorithm),
    );
    let mut total = Stats::default();
    for _ in 0..400 {
        let s = scenario_strategy().new_tree(&mut runner).unwrap().current();
        let st = simulate(&s);
        total.acquired += st.acquired;
        total.released += st.released;
        total.cas_lost += st.cas_lost;
        total.stolen_from_running += st.stolen_from_running;
        total.fenced += st.fenced;
        total.stale_writes_refused += st.stale_writes_refused;
        total.suspended += st.suspended;
        total.overlaps += st.overlaps;
        total.max_rounds = total.max_rounds.max(st.max_rounds);
    }
    println!("{total:?}");
    assert!(total.released >= 50, "{total:?}");
    assert!(total.cas_lost >= 50, "{total:?}");
    assert!(total.stolen_from_running >= 20, "{total:?}");
    assert!(total.fenced >= 20, "{total:?}");
    assert!(total.stale_writes_refused >= 20, "{total:?}");
    assert!(total.suspended >= 20, "{total:?}");
}

/// A partition `node-0` owns when both `node-0` and `node-1` are live.
fn partition_of_node0(w: &World) -> u32 {
    let both = live(&["node-0", "node-1"]);
    (0..w.partitions)
        .find(|&p| owner(p, w.partitions, &both) == Some("node-0"))
        .unwrap()
}

/// `node-0` acquires partition `p` (read, then write) and consumes it.
fn node0_acquires(w: &mut World, p: u32) {
    for _ in 0..2 {
        w.apply(&Op::Step {
            node: 0,
            partition: p,
        });
    }
    assert_eq!(w.store[p as usize].lease, Some(lease(Some("node-0"), 1)));
    assert!(w.nodes[0].consuming.contains(&p));
}

/// `node-1` takes `p` over (read, then write) at `epoch`.
fn node1_takes(w: &mut World, p: u32, epoch: u64) {
    for _ in 0..2 {
        w.apply(&Op::Step {
            node: 1,
            partition: p,
        });
    }
    assert_eq!(
        w.store[p as usize].lease,
        Some(lease(Some("node-1"), epoch))
    );
}

#[test]
fn a_holder_whose_heartbeat_lapses_stops_writing_before_anyone_can_take_over() {
    let mut w = World::new(2, 0, 8);
    let p = partition_of_node0(&w);
    node0_acquires(&mut w, p);
    w.apply(&Op::Tick);
    assert_eq!(w.writes[p as usize], vec![(0, 1)]);
    // node-0 is stalled: node-1 heartbeats, node-0 does not, for a whole TTL.
    for _ in 0..3 {
        w.apply(&Op::Advance { ms: MARGIN });
        w.apply(&Op::Beat { node: 1 });
    }
    // Its fence closed before anyone could judge it dead: writes refused, nothing taken yet.
    w.apply(&Op::Tick);
    assert_eq!(w.writes[p as usize].len(), 1);
    w.apply(&Op::ViewSync { at: 1 });
    assert!(!w.nodes[1].view.contains("node-0"));
    node1_takes(&mut w, p, 2);
    assert_eq!(w.stats.stolen_from_running, 1);
    w.apply(&Op::Tick);
    assert_eq!(w.writes[p as usize], vec![(0, 1), (1, 2)]);
    assert_eq!(w.stats.stale_writes_refused, 1);
    // node-0 comes back: its late heartbeat suspends it, so its writes stay refused...
    w.apply(&Op::Beat { node: 0 });
    assert!(w.nodes[0].suspended);
    w.apply(&Op::Tick);
    assert_eq!(w.stats.stale_writes_refused, 2);
    // ... until a round begun after the lapse has read every lease: it drops `p` on the way.
    w.apply(&Op::ViewSync { at: 0 });
    w.apply(&Op::RoundStart { node: 0 });
    for partition in 0..8 {
        w.apply(&Op::Step { node: 0, partition });
    }
    assert!(!w.nodes[0].suspended);
    assert!(!w.nodes[0].consuming.contains(&p) && !w.nodes[0].held.contains_key(&p));
    assert_eq!(w.stats.fenced, 1);
    assert_eq!(w.stats.overlaps, 0);
    w.converge();
    assert_eq!(w.store[p as usize].lease, Some(lease(Some("node-0"), 3)));
}

#[test]
fn a_taker_paused_between_its_read_and_its_write_can_only_overlap_a_checked_holder() {
    let mut w = World::new(2, 0, 8);
    let p = partition_of_node0(&w);
    node0_acquires(&mut w, p);
    // node-0 stalls past its TTL; node-1 judges it dead and decides to take `p`, then is paused
    // before its compare-and-set.
    for _ in 0..3 {
        w.apply(&Op::Advance { ms: MARGIN });
        w.apply(&Op::Beat { node: 1 });
    }
    w.apply(&Op::ViewSync { at: 1 });
    w.apply(&Op::Step {
        node: 1,
        partition: p,
    });
    w.apply(&Op::Pause { node: 1 });
    // node-0 comes back, is suspended, and its round finds the lease still its own.
    w.apply(&Op::Advance { ms: 1 });
    w.apply(&Op::Beat { node: 0 });
    w.apply(&Op::RoundStart { node: 0 });
    for partition in 0..8 {
        w.apply(&Op::Step { node: 0, partition });
    }
    assert!(!w.nodes[0].suspended && w.nodes[0].consuming.contains(&p));
    // node-1 resumes and its stale decision lands: the lease was not written since it read it.
    w.apply(&Op::Resume { node: 1 });
    w.apply(&Op::Step {
        node: 1,
        partition: p,
    });
    assert_eq!(w.store[p as usize].lease, Some(lease(Some("node-1"), 2)));
    // Both fences are open: the overlap that the snapshots' compare-and-set serializes (each
    // saga's writes are ordered by its revision, whoever makes them)...
    let before = w.writes[p as usize].len();
    w.apply(&Op::Tick);
    assert_eq!(w.stats.overlaps, 1);
    let mut both = w.writes[p as usize][before..].to_vec();
    both.sort();
    assert_eq!(both, vec![(0, 1), (1, 2)]);
    // ... until node-0's next read of the lease.
    w.apply(&Op::Step {
        node: 0,
        partition: p,
    });
    assert!(!w.nodes[0].consuming.contains(&p));
    w.converge();
    assert_eq!(w.store[p as usize].lease, Some(lease(Some("node-0"), 3)));
}

#[test]
fn node_paused_between_read_and_write_loses_the_compare_and_set() {
    let mut w = World::new(2, 0, 8);
    let p = partition_of_node0(&w);
    // node-0 reads the free lease and decides to acquire, then pauses before writing.
    w.apply(&Op::Step {
        node: 0,
        partition: p,
    });
    w.apply(&Op::Pause { node: 0 });
    // node-1 sees node-0 gone (its heartbeat expired) and acquires.
    for _ in 0..3 {
        w.apply(&Op::Advance { ms: MARGIN });
        w.apply(&Op::Beat { node: 1 });
    }
    w.apply(&Op::ViewSync { at: 1 });
    node1_takes(&mut w, p, 1);
    // node-0 resumes and writes its stale decision: refused.
    w.apply(&Op::Resume { node: 0 });
    w.apply(&Op::Step {
        node: 0,
        partition: p,
    });
    assert_eq!(w.stats.cas_lost, 1);
    assert_eq!(w.store[p as usize].lease, Some(lease(Some("node-1"), 1)));
    assert!(w.nodes[0].held.is_empty() && w.nodes[0].consuming.is_empty());
    // Both heartbeat again: node-1 hands over, node-0 ends up holding at epoch 2.
    w.converge();
    assert_eq!(w.store[p as usize].lease, Some(lease(Some("node-0"), 2)));
}

#[test]
fn paused_holder_resumes_with_a_stale_belief_and_writes_nothing() {
    let mut w = World::new(2, 0, 8);
    let p = partition_of_node0(&w);
    node0_acquires(&mut w, p);
    w.apply(&Op::Pause { node: 0 });
    for _ in 0..3 {
        w.apply(&Op::Advance { ms: MARGIN });
        w.apply(&Op::Beat { node: 1 });
    }
    w.apply(&Op::ViewSync { at: 1 });
    node1_takes(&mut w, p, 2);
    // node-0 comes back believing in epoch 1; its fence closed while it was paused.
    w.apply(&Op::Resume { node: 0 });
    assert_eq!(w.nodes[0].held.get(&p), Some(&1));
    w.apply(&Op::Tick);
    assert_eq!(w.stats.stale_writes_refused, 1);
    w.apply(&Op::Beat { node: 0 });
    w.apply(&Op::Tick);
    assert_eq!(w.stats.stale_writes_refused, 2, "suspended");
    // Its next reconcile step of `p` fences it, whatever its view.
    w.apply(&Op::Step {
        node: 0,
        partition: p,
    });
    assert!(w.nodes[0].consuming.is_empty());
    w.converge();
    assert_eq!(w.store[p as usize].lease, Some(lease(Some("node-0"), 3)));
    assert_eq!(w.stats.overlaps, 0);
}

/// Found by the property test: a taker decides on an old view, takes a newer view (in which the
/// holder is alive again) before its compare-and-set lands. The overlap that follows is judged
/// by the view the taker decided on, which predates the holder's heartbeat.
#[test]
fn a_decision_is_judged_by_the_view_it_was_taken_on() {
    let ops = [
        Op::Step {
            node: 1,
            partition: 2,
        },
        Op::Step {
            node: 1,
            partition: 1,
        },
        Op::Advance { ms: 1202 },
        Op::Advance { ms: 1798 },
        Op::Step {
            node: 1,
            partition: 2,
        },
        Op::ViewSync { at: 0 },
        Op::Step {
            node: 0,
            partition: 2,
        },
        Op::Step {
            node: 1,
            partition: 1,
        },
        Op::Beat { node: 1 },
        Op::RoundStart { node: 1 },
        Op::Step {
            node: 1,
            partition: 1,
        },
        Op::Step {
            node: 1,
            partition: 2,
        },
        Op::ViewSync { at: 0 },
        Op::Step {
            node: 1,
            partition: 0,
        },
        Op::Step {
            node: 0,
            partition: 2,
        },
        Op::Tick,
    ];
    let stats = simulate(&Scenario {
        nodes: 2,
        joiners: 0,
        partitions: 3,
        ops: ops.to_vec(),
        resume_all: false,
    });
    assert_eq!(stats.overlaps, 1, "{stats:?}");
}
