//! The SwiftMoE planner: from predicted per-expert loads `[E]`, how many replicas each expert
//! gets (`replica_counts`) and on which ranks (`plan`), for `ranks` ranks of `slots` expert slots.
//!
//! Replica counts, water-filling: every expert starts with one replica; each remaining slot goes
//! to the expert whose per-replica load L_e / r_e is largest (ties: lower id), never beyond one
//! replica per rank. This greedy is optimal for the per-replica load: it minimises
//! w_max = max_e L_e / r_e over all counts with Σ r_e ≤ ranks · slots, 1 ≤ r_e ≤ ranks (exchange
//! argument: any count vector with a smaller w_max gives every expert the greedy's replicas at
//! least, so needs as many slots). All slots are filled: the memory is reserved anyway.
//!
//! Replicas → ranks, longest-processing-time first: experts in order of falling w_e, each expert's
//! r_e replicas on the r_e least-loaded ranks with a free slot (ties: lower rank). While the
//! least-loaded rank has a free slot, Graham's list-scheduling bound holds: max rank load ≤
//! mean + w_max. When the least-loaded choice would leave the remaining experts without enough
//! distinct ranks (Gale–Ryser check on the free slots), the expert goes to the ranks with the most
//! free slots instead, which keeps the rest placeable (Ryser's construction); the bound then
//! no longer applies to that step.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{Error, Placement, Result};

/// Replicas per expert for `loads[e]` (predicted tokens) on `ranks` × `slots` slots.
pub fn replica_counts(loads: &[f64], ranks: usize, slots: usize) -> Result<Vec<usize>> {
    let experts = loads.len();
    check_slots(experts, ranks, slots)?;
    if let Some((e, l)) = loads
        .iter()
        .enumerate()
        .find(|(_, l)| !(l.is_finite() && **l >= 0.0))
    {
        return Err(Error::Config(format!(
            "predicted load of expert {e} = {l}: expected a finite value ≥ 0"
        )));
    }
    let mut counts = vec![1usize; experts];
    let mut heap: BinaryHeap<Candidate> = (0..experts)
        .filter(|_| ranks > 1)
        .map(|e| Candidate {
            weight: loads[e],
            expert: e,
        })
        .collect();
    let mut spare = ranks * slots - experts;
    while spare > 0 {
        let Some(c) = heap.pop() else { break };
        let e = c.expert;
        counts[e] += 1;
        spare -= 1;
        if counts[e] < ranks {
            heap.push(Candidate {
                weight: loads[e] / counts[e] as f64,
                expert: e,
            });
        }
    }
    Ok(counts)
}

/// The swift placement for predicted `loads[e]`: replica counts by water-filling, replicas on
/// ranks by least load (see the module comment for the algorithm and its bound).
pub fn plan(loads: &[f64], ranks: usize, slots: usize) -> Result<Placement> {
    let counts = replica_counts(loads, ranks, slots)?;
    let weight = |e: usize| loads[e] / counts[e] as f64;
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by(|&a, &b| {
        weight(b)
            .total_cmp(&weight(a))
            .then(counts[b].cmp(&counts[a]))
            .then(a.cmp(&b))
    });
    let mut free = vec![slots; ranks];
    let mut rank_load = vec![0.0f64; ranks];
    // Demands of the experts still to place, largest first (for the feasibility check).
    let mut pending: Vec<usize> = order.iter().map(|&e| counts[e]).collect();
    pending.sort_unstable_by(|a, b| b.cmp(a));
    let mut replicas = vec![Vec::new(); loads.len()];
    for &e in &order {
        let r = counts[e];
        let at = pending.iter().position(|&d| d == r).unwrap_or(0);
        pending.remove(at);
        let mut open: Vec<usize> = (0..ranks).filter(|&j| free[j] > 0).collect();
        if open.len() < r {
            return Err(Error::Config(format!(
                "internal: expert {e} needs {r} ranks with a free slot, {} left",
                open.len()
            )));
        }
        open.sort_by(|&a, &b| rank_load[a].total_cmp(&rank_load[b]).then(a.cmp(&b)));
        let mut chosen = open[..r].to_vec();
        if !placeable(&pending, &free, &chosen, slots) {
            open.sort_by(|&a, &b| {
                free[b]
                    .cmp(&free[a])
                    .then(rank_load[a].total_cmp(&rank_load[b]))
                    .then(a.cmp(&b))
            });
            chosen = open[..r].to_vec();
        }
        for &j in &chosen {
            free[j] -= 1;
            rank_load[j] += weight(e);
        }
        replicas[e] = chosen;
    }
    Placement::new(ranks, slots, replicas)
}

/// Refuses fewer slots than ceil(experts / ranks).
pub fn check_slots(experts: usize, ranks: usize, slots: usize) -> Result<()> {
    if ranks == 0 || experts == 0 {
        return Err(Error::Config(format!(
            "{experts} experts on {ranks} ranks: both must be > 0"
        )));
    }
    let needed = experts.div_ceil(ranks);
    if slots < needed {
        return Err(Error::TooFewSlots {
            slots,
            experts,
            ranks,
            needed,
        });
    }
    Ok(())
}

/// Gale–Ryser for a 0-1 expert × rank matrix with row sums `pending` (sorted descending) and
/// column sums at most the free slots after taking one slot on each `chosen` rank: for every k,
/// the k largest demands fit in Σ_j min(free_j, k).
fn placeable(pending: &[usize], free: &[usize], chosen: &[usize], slots: usize) -> bool {
    let mut at_least = vec![0usize; slots + 2];
    for (j, &f) in free.iter().enumerate() {
        let f = f - usize::from(chosen.contains(&j));
        at_least[f] += 1;
    }
    for v in (0..=slots).rev() {
        at_least[v] += at_least[v + 1];
    }
    let (mut need, mut cap) = (0usize, 0usize);
    for (k, &d) in pending.iter().enumerate() {
        need += d;
        cap += at_least.get(k + 1).copied().unwrap_or(0);
        if need > cap {
            return false;
        }
    }
    true
}

/// Heap entry: the largest per-replica load first, then the lower expert id.
struct Candidate {
    weight: f64,
    expert: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.weight
            .total_cmp(&other.weight)
            .then(other.expert.cmp(&self.expert))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn water_filling_gives_hot_experts_the_spare_slots() {
        // 8 ranks × 2 slots, 8 experts: 8 spare slots. Expert 0 reaches one replica per rank
        // (7 spares, 9300 / 8 = 1162.5), the last spare goes to the next largest L/r (expert 1).
        let mut loads = vec![100.0; 8];
        loads[0] = 9300.0;
        assert_eq!(
            replica_counts(&loads, 8, 2).unwrap(),
            vec![8, 2, 1, 1, 1, 1, 1, 1]
        );
        assert_eq!(replica_counts(&[3.0, 1.0], 1, 2).unwrap(), vec![1, 1]);
    }

    #[test]
    fn gale_ryser_check() {
        // Two ranks with one free slot each cannot take an expert needing two after one is used.
        assert!(!placeable(&[2], &[1, 1], &[0], 1));
        assert!(placeable(&[1], &[1, 1], &[0], 1));
        assert!(placeable(&[2, 1], &[2, 2, 1], &[2], 2));
        assert!(!placeable(&[2, 2], &[2, 2, 1], &[0, 1], 2));
    }

    #[test]
    fn every_slot_layout_is_placeable() {
        // Skewed loads on many shapes: the plan always exists and respects the slots.
        for ranks in 1usize..7 {
            for experts in 1usize..10 {
                for slots in experts.div_ceil(ranks)..experts.div_ceil(ranks) + 3 {
                    let loads: Vec<f64> = (0..experts).map(|e| (1 << (e % 5)) as f64).collect();
                    let p = plan(&loads, ranks, slots).unwrap();
                    assert_eq!(p.experts(), experts);
                }
            }
        }
    }
}
