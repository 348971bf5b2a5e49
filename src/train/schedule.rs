//! Learning-rate schedule: linear warmup from 0 to `lr` over `warmup_steps`, then a cosine or
//! linear decay to `min_lr` at the last step (or a constant `lr`). Steps count from 1.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate of step `step` (1-based).
    pub fn lr_at(&self, step: u64) -> f32 {
        if step <= self.warmup_steps {
            return self.lr * step as f32 / self.warmup_steps as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let p = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let (lr, min) = (self.lr as f64, self.min_lr as f64);
        let v = match self.decay {
            Decay::Constant => lr,
            Decay::Linear => lr + (min - lr) * p,
            Decay::Cosine => min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        };
        v as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            total_steps: 110,
            decay: Decay::Cosine,
        };
        assert_eq!(s.lr_at(1), 0.1);
        assert_eq!(s.lr_at(10), 1.0);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-6);
        assert!((s.lr_at(110) - 0.1).abs() < 1e-6);
        assert!((s.lr_at(500) - 0.1).abs() < 1e-6);
        let l = Schedule {
            decay: Decay::Linear,
            ..s
        };
        assert!((l.lr_at(35) - 0.775).abs() < 1e-6);
        let c = Schedule {
            decay: Decay::Constant,
            warmup_steps: 0,
            ..s
        };
        assert_eq!(c.lr_at(1), 1.0);
        assert_eq!(c.lr_at(1000), 1.0);
    }
}
