//! Where expert parameters, gradients and optimizer state travel each step, as explicit
//! (src, dst, bytes) transfers over one MoE layer. Swift: rank r owns slice r of every expert's
//! flattened parameters (`StateShards` over all ranks) and its optimizer state; gradients
//! reduce-scatter from the replicas to the owners, updated parameters all-gather from the owners
//! to the next step's replicas, optimizer state never moves. Baselines keep state with the
//! replicas (`replica_sync`) and move it when replicas move (`rebalance_moves`).

use std::ops::Range;

use super::Placement;

/// Bytes per element of what the plans move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByteSizes {
    /// Expert weights as the GEMMs read them (bf16: 2).
    pub param: u64,
    /// Expert weight gradients as reduced (f32: 4, bf16: 2).
    pub grad: u64,
    /// Optimizer state per parameter (f32 master + Adam m and v: 12).
    pub optimizer: u64,
}

/// Slices of one expert's `params` flattened parameters over `parts` owners: chunk =
/// ⌈params / parts⌉, owner i holds [i · chunk, min((i + 1) · chunk, params)) — the last
/// non-empty slice may be shorter and trailing owners may hold nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateShards {
    pub params: usize,
    pub parts: usize,
}

impl StateShards {
    pub fn slice(&self, owner: usize) -> Range<usize> {
        let chunk = self.params.div_ceil(self.parts);
        let start = (owner * chunk).min(self.params);
        start..((owner + 1) * chunk).min(self.params)
    }

    pub fn len(&self, owner: usize) -> u64 {
        self.slice(owner).len() as u64
    }

    /// The largest slice (owner 0's).
    pub fn max_len(&self) -> u64 {
        self.len(0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferKind {
    /// Gradient slice from a replica to the slice's owner (summed there).
    GradReduceScatter,
    /// Updated parameter slice from its owner to a replica.
    ParamAllGather,
    /// Reduced gradient slice from its owner to another replica (all-reduce's second half).
    GradAllGather,
    /// A whole expert's parameters to a rank that newly holds it (rebalance).
    ParamMove,
    /// A whole expert's optimizer state to a rank that newly holds it (rebalance).
    OptimizerStateMove,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub src: usize,
    pub dst: usize,
    pub bytes: u64,
    pub kind: TransferKind,
}

/// Where the baselines keep an expert's optimizer state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    /// Sharded over the expert's replicas (ZeRO-1 over its DP group, issue 26): gradients
    /// reduce-scatter over the replicas, updated parameters all-gather back.
    Sharded,
    /// A full copy on every replica (FlexMoE): gradients all-reduced (reduce-scatter +
    /// all-gather of gradients), every replica runs the same update.
    Full,
}

/// Swift's step for one layer: gradients of each expert from its replicas in `current` to the
/// slice owners (all ranks), then updated slices from the owners to the replicas of `next`.
/// Nothing is sent to self; no optimizer state is sent.
pub fn swift_step(
    current: &Placement,
    next: &Placement,
    params: usize,
    sizes: &ByteSizes,
) -> Vec<Transfer> {
    let ranks = current.ranks();
    let shards = StateShards {
        params,
        parts: ranks,
    };
    let mut out = Vec::new();
    for e in 0..current.experts() {
        for &src in current.replicas(e) {
            for dst in (0..ranks).filter(|&o| o != src && shards.len(o) > 0) {
                out.push(Transfer {
                    src,
                    dst,
                    bytes: shards.len(dst) * sizes.grad,
                    kind: TransferKind::GradReduceScatter,
                });
            }
        }
        for src in (0..ranks).filter(|&o| shards.len(o) > 0) {
            for &dst in next.replicas(e).iter().filter(|&&r| r != src) {
                out.push(Transfer {
                    src,
                    dst,
                    bytes: shards.len(src) * sizes.param,
                    kind: TransferKind::ParamAllGather,
                });
            }
        }
    }
    out
}

/// The baselines' step for one layer: each expert's gradients reduced over its replicas (slice
/// i of r owned by the i-th replica), then slices gathered back to every replica: updated
/// parameters (`Sharded`) or reduced gradients (`Full`). A single replica sends nothing.
pub fn replica_sync(
    placement: &Placement,
    params: usize,
    sizes: &ByteSizes,
    state: ReplicaState,
) -> Vec<Transfer> {
    let mut out = Vec::new();
    for e in 0..placement.experts() {
        let reps = placement.replicas(e);
        let shards = StateShards {
            params,
            parts: reps.len(),
        };
        for (i, &src) in reps.iter().enumerate() {
            for (o, &dst) in reps.iter().enumerate().filter(|&(o, _)| o != i) {
                if shards.len(o) > 0 {
                    out.push(Transfer {
                        src,
                        dst,
                        bytes: shards.len(o) * sizes.grad,
                        kind: TransferKind::GradReduceScatter,
                    });
                }
                if shards.len(i) > 0 {
                    let (bytes, kind) = match state {
                        ReplicaState::Sharded => (sizes.param, TransferKind::ParamAllGather),
                        ReplicaState::Full => (sizes.grad, TransferKind::GradAllGather),
                    };
                    out.push(Transfer {
                        src,
                        dst,
                        bytes: shards.len(i) * bytes,
                        kind,
                    });
                }
            }
        }
    }
    out
}

/// Rebalancing from `old` to `new` (state kept whole with each replica): every rank that newly
/// holds an expert receives its parameters and optimizer state from an old replica (the i-th new
/// rank of an expert from old replica i mod r_old).
pub fn rebalance_moves(
    old: &Placement,
    new: &Placement,
    params: usize,
    sizes: &ByteSizes,
) -> Vec<Transfer> {
    let mut out = Vec::new();
    for e in 0..new.experts() {
        let from = old.replicas(e);
        let arriving = new.replicas(e).iter().filter(|r| !from.contains(r));
        for (i, &dst) in arriving.enumerate() {
            let src = from[i % from.len()];
            for (per, kind) in [
                (sizes.param, TransferKind::ParamMove),
                (sizes.optimizer, TransferKind::OptimizerStateMove),
            ] {
                out.push(Transfer {
                    src,
                    dst,
                    bytes: params as u64 * per,
                    kind,
                });
            }
        }
    }
    out
}

/// Bytes each rank sends: `[rank]`.
pub fn bytes_sent_per_rank(transfers: &[Transfer], ranks: usize) -> Vec<u64> {
    let mut sent = vec![0u64; ranks];
    for t in transfers {
        sent[t.src] += t.bytes;
    }
    sent
}

/// Total bytes of one kind.
pub fn bytes_of(transfers: &[Transfer], kind: TransferKind) -> u64 {
    transfers
        .iter()
        .filter(|t| t.kind == kind)
        .map(|t| t.bytes)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_parameters_with_an_uneven_last() {
        let s = StateShards {
            params: 10,
            parts: 4,
        };
        let got: Vec<_> = (0..4).map(|o| s.slice(o)).collect();
        assert_eq!(got, vec![0..3, 3..6, 6..9, 9..10]);
        let s = StateShards {
            params: 9,
            parts: 4,
        };
        assert_eq!(s.slice(3), 9..9);
        assert_eq!(s.max_len(), 3);
    }
}
