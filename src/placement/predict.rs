//! Next-step expert load from the past steps' counts `[E]`: an exponential moving average with
//! weight 1/2 on the newest step. Routing drifts over a few steps while one step's counts carry
//! batch noise; the EMA halves that noise's weight and still follows a shift within two steps
//! (the last step alone chases noise, a long window lags the drift). Before any step: uniform.

/// EMA of per-expert token counts, one per MoE layer.
#[derive(Clone, Debug)]
pub struct LoadPredictor {
    ema: Vec<f64>,
    seen: bool,
}

/// Weight of the newest step in the average.
const NEWEST: f64 = 0.5;

impl LoadPredictor {
    pub fn new(experts: usize) -> Self {
        LoadPredictor {
            ema: vec![1.0; experts],
            seen: false,
        }
    }

    /// Adds one step's counts (all-reduced over ranks, so every rank predicts the same).
    pub fn observe(&mut self, counts: &[u64]) {
        for (m, &c) in self.ema.iter_mut().zip(counts) {
            *m = if self.seen {
                NEWEST * c as f64 + (1.0 - NEWEST) * *m
            } else {
                c as f64
            };
        }
        self.seen = true;
    }

    /// Predicted tokens per expert for the next step.
    pub fn predict(&self) -> &[f64] {
        &self.ema
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_halves_toward_the_newest_step() {
        let mut p = LoadPredictor::new(2);
        assert_eq!(p.predict(), &[1.0, 1.0]);
        p.observe(&[8, 0]);
        assert_eq!(p.predict(), &[8.0, 0.0]);
        p.observe(&[0, 8]);
        assert_eq!(p.predict(), &[4.0, 4.0]);
        p.observe(&[0, 8]);
        assert_eq!(p.predict(), &[2.0, 6.0]);
    }
}
