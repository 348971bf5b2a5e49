//! Expert placement for expert-parallel training: which ranks hold a replica of each expert of
//! a MoE layer (`Placement`: expert → distinct ranks, at most `slots` experts per rank), planned
//! from the predicted per-expert token load (`swift`, every step) or fixed (`static` EP, `capacity`,
//! `rebalance` every K steps). Pure bookkeeping on the CPU: every rank computes the same plan from
//! the same all-reduced counts; the expert-parallel exchange (`dist`, issue 26) executes it, and
//! `moe simulate` replays routing traces (`trace`) through the same planners.

pub mod planner;
pub mod predict;
pub mod sharding;
pub mod split;
pub mod swift;
pub mod synthetic;
pub mod trace;

use std::path::PathBuf;

pub use planner::{Planner, PlannerConfig};
pub use predict::LoadPredictor;
pub use sharding::{ByteSizes, StateShards, Transfer, TransferKind};
pub use trace::{Trace, TraceHeader, TraceWriter};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "expert_slots = {slots} per rank is too few: {experts} experts over {ranks} ranks need at \
         least {needed} slots per rank (every expert needs a replica)"
    )]
    TooFewSlots {
        slots: usize,
        experts: usize,
        ranks: usize,
        needed: usize,
    },
    /// A setting out of range: "what = value: constraint".
    #[error("invalid placement setting: {0}")]
    Config(String),
    #[error("{}: line {line}: {msg}", path.display())]
    Trace {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// How experts are placed on the ranks of the expert-parallel group.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum PlacementKind {
    /// DeepSpeed-MoE EP: expert e on EP rank e / (E / ep), the same on every DP replica; dropless.
    Static,
    /// `Static` with a capacity per expert and source rank (`capacity_factor`): tokens beyond it
    /// are dropped, every expert computes its full (padded) capacity.
    Capacity,
    /// FlexMoE / EPLB-like: replicas re-planned every K steps from the predicted load; parameters
    /// and optimizer state move with them.
    Rebalance,
    /// SwiftMoE: replicas re-planned every step; optimizer state sharded over all ranks, never moved.
    Swift,
}

impl PlacementKind {
    pub fn name(self) -> &'static str {
        match self {
            PlacementKind::Static => "static",
            PlacementKind::Capacity => "capacity",
            PlacementKind::Rebalance => "rebalance",
            PlacementKind::Swift => "swift",
        }
    }
}

/// The replicas of every expert of one MoE layer: `replicas[e]` = the ranks holding expert e,
/// ascending and distinct; rank r holds at most `slots` experts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    ranks: usize,
    slots: usize,
    replicas: Vec<Vec<usize>>,
}

impl Placement {
    /// Checks every expert has ≥ 1 replica, replicas sit on distinct ranks below `ranks`, and no
    /// rank holds more than `slots` experts.
    pub fn new(ranks: usize, slots: usize, mut replicas: Vec<Vec<usize>>) -> Result<Self> {
        let mut used = vec![0usize; ranks];
        for (e, reps) in replicas.iter_mut().enumerate() {
            reps.sort_unstable();
            if reps.is_empty() {
                return Err(Error::Config(format!("expert {e} has no replica")));
            }
            if reps.windows(2).any(|w| w[0] == w[1]) {
                return Err(Error::Config(format!(
                    "expert {e}: two replicas on one rank ({reps:?})"
                )));
            }
            for &r in reps.iter() {
                if r >= ranks {
                    return Err(Error::Config(format!(
                        "expert {e}: replica on rank {r}, only {ranks} ranks"
                    )));
                }
                used[r] += 1;
            }
        }
        if let Some((r, n)) = used.iter().enumerate().find(|(_, &n)| n > slots) {
            return Err(Error::Config(format!(
                "rank {r} holds {n} experts, more than its {slots} slots"
            )));
        }
        Ok(Placement {
            ranks,
            slots,
            replicas,
        })
    }

    /// Static expert parallelism over `ranks` = DP × EP with ep = min(experts, ranks): expert e on
    /// EP rank e / (E / ep) of every DP group, rank = dp_rank · ep + ep_rank (issue 26's layout).
    pub fn static_ep(experts: usize, ranks: usize) -> Result<Self> {
        let ep = experts.min(ranks);
        if experts == 0 || ranks == 0 || experts % ep != 0 || ranks % ep != 0 {
            return Err(Error::Config(format!(
                "static placement of {experts} experts on {ranks} ranks: the expert count must \
                 divide the rank count or be a multiple of it"
            )));
        }
        let per_rank = experts / ep;
        let replicas = (0..experts)
            .map(|e| (0..ranks / ep).map(|dp| dp * ep + e / per_rank).collect())
            .collect();
        Placement::new(ranks, per_rank, replicas)
    }

    pub fn experts(&self) -> usize {
        self.replicas.len()
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Expert slots per rank (the memory reserved for expert parameters).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Ranks holding expert `e`, ascending.
    pub fn replicas(&self, e: usize) -> &[usize] {
        &self.replicas[e]
    }

    /// Experts held by each rank: `[rank]` → expert ids, ascending.
    pub fn experts_by_rank(&self) -> Vec<Vec<usize>> {
        let mut by_rank = vec![Vec::new(); self.ranks];
        for (e, reps) in self.replicas.iter().enumerate() {
            for &r in reps {
                by_rank[r].push(e);
            }
        }
        by_rank
    }

    /// Per-rank load when each expert's `loads[e]` is split evenly over its replicas.
    pub fn rank_loads(&self, loads: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.ranks];
        for (reps, &l) in self.replicas.iter().zip(loads) {
            for &r in reps {
                out[r] += l / reps.len() as f64;
            }
        }
        out
    }
}

/// max / mean of per-rank loads (1.0 = perfectly balanced; 1.0 for all-zero loads).
pub fn imbalance(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    let max = loads.iter().copied().fold(0.0, f64::max);
    if mean > 0.0 {
        max / mean
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_layout_follows_dp_times_ep() {
        let p = Placement::static_ep(8, 4).unwrap();
        assert_eq!(p.slots(), 2);
        assert_eq!(p.replicas(0), &[0]);
        assert_eq!(p.replicas(3), &[1]);
        assert_eq!(p.replicas(7), &[3]);
        let p = Placement::static_ep(4, 8).unwrap();
        assert_eq!(p.slots(), 1);
        assert_eq!(p.replicas(1), &[1, 5]);
        assert_eq!(p.experts_by_rank()[5], vec![1]);
        assert!(Placement::static_ep(6, 4).is_err());
    }

    #[test]
    fn bad_placements_are_named() {
        let e = Placement::new(2, 1, vec![vec![0], vec![0]]).unwrap_err();
        assert!(e.to_string().contains("rank 0 holds 2 experts"), "{e}");
        let e = Placement::new(2, 2, vec![vec![1, 1]]).unwrap_err();
        assert!(e.to_string().contains("two replicas on one rank"), "{e}");
        let e = Placement::new(2, 2, vec![vec![]]).unwrap_err();
        assert!(e.to_string().contains("expert 0 has no replica"), "{e}");
        let e = Placement::new(2, 2, vec![vec![2]]).unwrap_err();
        assert!(e.to_string().contains("only 2 ranks"), "{e}");
    }
}
