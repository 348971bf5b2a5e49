//! The per-step planner a trainer (or the simulator) holds: one placement per MoE layer, advanced
//! after every step from that step's all-reduced counts `[layer][expert]`. Static and capacity
//! never move; rebalance re-plans every `rebalance_every` steps; swift re-plans every step. All
//! re-plans use the swift planner on the `LoadPredictor`'s EMA, so every rank gets the same plan.

use super::{swift, Error, LoadPredictor, Placement, PlacementKind, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannerConfig {
    pub kind: PlacementKind,
    pub ranks: usize,
    /// Expert slots per rank per layer (swift and rebalance; static uses E / ep).
    pub expert_slots: usize,
    /// Steps between re-plans for `rebalance`.
    pub rebalance_every: usize,
}

pub struct Planner {
    config: PlannerConfig,
    predictors: Vec<LoadPredictor>,
    placements: Vec<Placement>,
    steps: u64,
}

impl Planner {
    /// Placements for step 0: static EP, or swift's plan for uniform load.
    pub fn new(config: PlannerConfig, layers: usize, experts: usize) -> Result<Self> {
        let predictors = vec![LoadPredictor::new(experts); layers];
        let placements = match config.kind {
            PlacementKind::Static | PlacementKind::Capacity => {
                vec![Placement::static_ep(experts, config.ranks)?; layers]
            }
            PlacementKind::Rebalance | PlacementKind::Swift => {
                if config.kind == PlacementKind::Rebalance && config.rebalance_every == 0 {
                    return Err(Error::Config("rebalance_every = 0: must be ≥ 1".into()));
                }
                let first = swift::plan(&vec![1.0; experts], config.ranks, config.expert_slots)?;
                vec![first; layers]
            }
        };
        Ok(Planner {
            config,
            predictors,
            placements,
            steps: 0,
        })
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// The placement of `layer` for the coming step.
    pub fn placement(&self, layer: usize) -> &Placement {
        &self.placements[layer]
    }

    /// Observes one step's counts `[layer][expert]` and plans the next step; returns the
    /// placements that step ran with (for its gradient / parameter transfers).
    pub fn advance(&mut self, counts: &[Vec<u64>]) -> Result<Vec<Placement>> {
        if counts.len() != self.placements.len() {
            return Err(Error::Config(format!(
                "counts for {} layers, the planner has {}",
                counts.len(),
                self.placements.len()
            )));
        }
        for (p, c) in self.predictors.iter_mut().zip(counts) {
            p.observe(c);
        }
        self.steps += 1;
        let replan = match self.config.kind {
            PlacementKind::Static | PlacementKind::Capacity => false,
            PlacementKind::Rebalance => self.steps % self.config.rebalance_every as u64 == 0,
            PlacementKind::Swift => true,
        };
        if !replan {
            return Ok(self.placements.clone());
        }
        let next = self
            .predictors
            .iter()
            .map(|p| swift::plan(p.predict(), self.config.ranks, self.config.expert_slots))
            .collect::<Result<Vec<_>>>()?;
        Ok(std::mem::replace(&mut self.placements, next))
    }
}
