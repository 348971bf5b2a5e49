//! Synthetic routing traces for tests and what-if runs: per step and layer, T·k rows over E
//! experts with Zipf-skewed popularity (expert of popularity rank i gets ∝ 1 / (i + 1)^skew,
//! at most T rows since a token picks k distinct experts), the hot experts drifting by one
//! position every `drift_every` steps and offset per layer. Deterministic: no sampling noise.

use super::trace::{Trace, TraceHeader, TRACE_VERSION};

#[derive(Clone, Debug)]
pub struct ZipfTrace {
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
    pub d_model: usize,
    pub d_ff: usize,
    /// Tokens per step (each routed to `top_k` experts).
    pub tokens: usize,
    pub steps: usize,
    /// Zipf exponent: 0 = uniform; 1.2 puts ~40% of 64 experts' rows on the top 4.
    pub skew: f64,
    /// Steps between one-position shifts of the popularity order (0: no drift).
    pub drift_every: usize,
}

impl ZipfTrace {
    pub fn generate(&self) -> Trace {
        let header = TraceHeader {
            moe_trace: TRACE_VERSION,
            model: "synthetic-zipf".into(),
            config_hash: format!("zipf-skew{}-drift{}", self.skew, self.drift_every),
            layers: self.layers,
            experts: self.experts,
            top_k: self.top_k,
            d_model: self.d_model,
            d_ff: self.d_ff,
            tokens_per_step: self.tokens,
        };
        let steps = (0..self.steps)
            .map(|s| {
                let shift = s.checked_div(self.drift_every).unwrap_or(0);
                let layers = (0..self.layers)
                    .map(|l| self.counts(shift + 3 * l))
                    .collect();
                (s as u64, layers)
            })
            .collect();
        Trace { header, steps }
    }

    /// Rows per expert when expert `shift mod E` is the most popular.
    fn counts(&self, shift: usize) -> Vec<u64> {
        let e_n = self.experts;
        let weight: Vec<f64> = (0..e_n)
            .map(|e| 1.0 / (((e + e_n - shift % e_n) % e_n) as f64 + 1.0).powf(self.skew))
            .collect();
        let cap = self.tokens as f64;
        let total = (self.tokens * self.top_k.min(e_n)) as f64;
        // Water-fill: experts over the cap get exactly T; the rest share what is left by weight.
        let mut capped = vec![false; e_n];
        let mut share = vec![0.0; e_n];
        loop {
            let left = total - cap * capped.iter().filter(|&&c| c).count() as f64;
            let w: f64 = (0..e_n).filter(|&e| !capped[e]).map(|e| weight[e]).sum();
            let mut changed = false;
            for e in 0..e_n {
                share[e] = if capped[e] { cap } else { left * weight[e] / w };
                if !capped[e] && share[e] > cap {
                    capped[e] = true;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        // Largest remainder: integer rows summing to T·k.
        let mut rows: Vec<u64> = share.iter().map(|s| s.floor() as u64).collect();
        let mut short = total as u64 - rows.iter().sum::<u64>();
        let mut by_frac: Vec<usize> = (0..e_n).collect();
        by_frac.sort_by(|&a, &b| {
            (share[b] - share[b].floor())
                .total_cmp(&(share[a] - share[a].floor()))
                .then(a.cmp(&b))
        });
        for e in by_frac {
            if short == 0 {
                break;
            }
            if rows[e] < self.tokens as u64 {
                rows[e] += 1;
                short -= 1;
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_counts_sum_to_t_times_k_and_drift() {
        let z = ZipfTrace {
            layers: 2,
            experts: 8,
            top_k: 2,
            d_model: 16,
            d_ff: 32,
            tokens: 100,
            steps: 4,
            skew: 2.0,
            drift_every: 2,
        };
        let t = z.generate();
        assert_eq!(t.steps.len(), 4);
        for (_, layers) in &t.steps {
            for c in layers {
                assert_eq!(c.iter().sum::<u64>(), 200);
                assert!(c.iter().all(|&n| n <= 100), "{c:?}");
            }
        }
        // skew 2: the hot expert would take 200 / Σ 1/i² ≈ 123 > 100 rows, so it is capped.
        assert_eq!(t.steps[0].1[0][0], 100);
        assert_eq!(t.steps[2].1[0][1], 100);
        assert_eq!(t.steps[0].1[1][3], 100);
        let uniform = ZipfTrace { skew: 0.0, ..z }.generate();
        assert_eq!(uniform.steps[0].1[0], vec![25; 8]);
    }
}
