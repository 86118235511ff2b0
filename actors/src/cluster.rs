//! Cluster logic, pure: which live node owns which partition, and what a node must do about a
//! partition's lease. The `sagaflow` crate runs it against the membership and lease buckets.
//!
//! **Assignment** is rendezvous (highest-random-weight) hashing with bounded loads: every pair
//! of a live node and a partition has a weight `hash(node, p)`, and going through the pairs
//! from the heaviest down, a partition goes to the node of the pair unless it is already taken
//! or the node already holds its share. Each node ends with ⌊P/N⌋ or ⌈P/N⌉ of the P
//! partitions (N live nodes), and every node computes the same answer from the same member
//! list. Plain rendezvous hashing (each partition to its heaviest node) moves only the
//! partitions that must move, but leaves the load to chance: with 8 partitions on 3 nodes the
//! busiest node holds on average 1.5 times its fair share, and the busiest node is what limits
//! a cluster. The bound keeps most of the minimal movement: a join or a leave moves the
//! newcomer's share (or the leaver's) and, where the shares change, a few partitions more.
//!
//! **Leases** make ownership exclusive. A lease is `(owner, epoch)`, stored per partition and
//! only ever changed by compare-and-set on the entry's revision, so two nodes can never both
//! win the same transition. A node starts consuming a partition only after it wrote a lease
//! naming itself with a higher epoch; it stops consuming, and only then writes the lease free,
//! before a hand-over. A node that finds a lease held by a node that is no longer live takes it
//! over with a higher epoch: the old holder, if it is in fact alive but cut off, learns at its
//! next check that the epoch moved on and drops the partition (and any snapshot it writes
//! meanwhile loses its compare-and-set against the new owner's writes).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::hash::fnv1a;

/// The weight of `node` for `partition` in rendezvous hashing.
pub fn weight(node: &str, partition: u32) -> u64 {
    let mut key = Vec::with_capacity(node.len() + 5);
    key.extend_from_slice(node.as_bytes());
    key.push(0);
    key.extend_from_slice(&partition.to_le_bytes());
    // FNV alone mixes the last bytes weakly; a final avalanche step spreads partitions evenly.
    let mut h = fnv1a(&key);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The owner of each of `0..partitions` among `live` (`None` when no node is live): each
/// node holds ⌊P/N⌋ or ⌈P/N⌉ partitions, those of its heaviest pairs that were still free (see
/// the module's documentation). Ties of weight are broken by node id, so the answer depends
/// only on the set.
pub fn assignment(partitions: u32, live: &BTreeSet<String>) -> Vec<Option<&str>> {
    let mut owners: Vec<Option<&str>> = vec![None; partitions as usize];
    let n = live.len();
    if n == 0 {
        return owners;
    }
    let floor = partitions as usize / n;
    // How many nodes may hold one partition more than `floor`.
    let mut above = partitions as usize % n;
    let mut pairs: Vec<(u64, usize, u32)> = Vec::with_capacity(partitions as usize * n);
    for (i, node) in live.iter().enumerate() {
        pairs.extend((0..partitions).map(|p| (weight(node, p), i, p)));
    }
    // Heaviest first; among equal weights the greater node id first (`live` is sorted).
    pairs.sort_unstable_by(|a, b| b.cmp(a));
    let nodes: Vec<&str> = live.iter().map(String::as_str).collect();
    let mut load = vec![0usize; n];
    let mut left = partitions as usize;
    for (_, i, p) in pairs {
        if left == 0 {
            break;
        }
        let slot = &mut owners[p as usize];
        if slot.is_some() {
            continue;
        }
        if load[i] < floor || (load[i] == floor && above > 0) {
            if load[i] == floor {
                above -= 1;
            }
            load[i] += 1;
            *slot = Some(nodes[i]);
            left -= 1;
        }
    }
    owners
}

/// The partitions (of `0..partitions`) that `node` owns among `live`.
pub fn owned_by(node: &str, partitions: u32, live: &BTreeSet<String>) -> Vec<u32> {
    (0..partitions)
        .zip(assignment(partitions, live))
        .filter(|(_, o)| *o == Some(node))
        .map(|(p, _)| p)
        .collect()
}

/// A partition lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Holder, or `None` when released.
    pub owner: Option<String>,
    /// Rises by one with every acquisition.
    pub epoch: u64,
}

/// What a node must do about one partition's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseStep {
    /// Write this lease (compare-and-set), then start consuming.
    Acquire(Lease),
    /// Stop consuming, then write this lease (compare-and-set).
    Release(Lease),
    /// We hold it and should: keep consuming.
    Hold,
    /// Not ours, or not ours yet (its holder is live and will release it): nothing to do.
    Wait,
}

/// Decides what `me` does about a partition whose stored lease is `lease`, given whether the
/// assignment gives it to `me` and which nodes are live.
pub fn next_step(
    me: &str,
    assigned_to_me: bool,
    lease: Option<&Lease>,
    live: &BTreeSet<String>,
) -> LeaseStep {
    let epoch = lease.map_or(0, |l| l.epoch);
    let holder = lease.and_then(|l| l.owner.as_deref());
    match (assigned_to_me, holder) {
        (true, Some(h)) if h == me => LeaseStep::Hold,
        (true, None) => LeaseStep::Acquire(Lease {
            owner: Some(me.to_string()),
            epoch: epoch + 1,
        }),
        (true, Some(h)) if !live.contains(h) => LeaseStep::Acquire(Lease {
            owner: Some(me.to_string()),
            epoch: epoch + 1,
        }),
        (true, Some(_)) => LeaseStep::Wait,
        (false, Some(h)) if h == me => LeaseStep::Release(Lease { owner: None, epoch }),
        (false, _) => LeaseStep::Wait,
    }
}

#[cfg(test)]
mod tests;
