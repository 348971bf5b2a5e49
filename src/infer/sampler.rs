//! Next-token choice from a row of logits, in transformers' order: repetition penalty, then
//! temperature, top-k, top-p, min-p, then a draw (or the arg-max when greedy). A seeded
//! ChaCha8 stream per sequence makes sampling reproducible.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// How to choose tokens. `temperature` 0 is greedy (the other fields then only matter for
/// `repetition_penalty`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one's probability (0: off).
    pub min_p: f32,
    /// HF's CTRL-style penalty on tokens already in the prompt or completion (1: off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Errors name the option, the value and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(format!(
                "temperature = {t}: must be a finite value >= 0 (0 = greedy)"
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p = {}: must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p = {}: must be in [0, 1]", self.min_p));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(format!(
                "repetition_penalty = {r}: must be a finite value > 0 (1 = off)"
            ));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Greedy with no repetition penalty: the pick is the arg-max of the raw logits (which the
    /// GPU can take without the logits leaving it).
    pub fn is_plain_greedy(&self) -> bool {
        self.is_greedy() && self.repetition_penalty == 1.0
    }
}

/// One sequence's sampler: the parameters and its random stream.
pub struct Sampler {
    pub params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// Sequence `index` of a batch draws from stream `index` of the seed, so a prompt's
    /// completion does not depend on what else is in the batch.
    pub fn new(params: SamplingParams, index: u64) -> Sampler {
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        rng.set_stream(index);
        Sampler { params, rng }
    }

    /// The next token given `logits` (one row, vocabulary order) and the ids so far (prompt
    /// and completion) for the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.is_plain_greedy() {
            return argmax(logits); // nothing to adjust: no copy of the row
        }
        let mut l: Vec<f32> = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; l.len()];
            for &id in history {
                if let Some(s) = seen.get_mut(id as usize) {
                    *s = true;
                }
            }
            for (x, s) in l.iter_mut().zip(seen) {
                if s {
                    *x = if *x < 0.0 {
                        *x * p.repetition_penalty
                    } else {
                        *x / p.repetition_penalty
                    };
                }
            }
        }
        if p.is_greedy() {
            return argmax(&l);
        }
        for x in l.iter_mut() {
            *x /= p.temperature;
        }
        // Candidates sorted by logit, descending (ties: lower id first, deterministic).
        let mut idx: Vec<u32> = (0..l.len() as u32)
            .filter(|&i| l[i as usize].is_finite())
            .collect();
        if idx.is_empty() {
            return argmax(logits);
        }
        idx.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.truncate(p.top_k);
        }
        let max = l[idx[0] as usize];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((l[i as usize] - max) as f64).exp())
            .collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= z);
        if p.top_p < 1.0 {
            // Keep tokens until the mass before them reaches top_p (the top one always stays).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (j, &q) in probs.iter().enumerate() {
                if mass >= p.top_p as f64 {
                    keep = j;
                    break;
                }
                mass += q;
            }
            idx.truncate(keep.max(1));
            probs.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            idx.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (j, &q) in probs.iter().enumerate() {
            if u < q {
                return idx[j];
            }
            u -= q;
        }
        idx[idx.len() - 1]
    }
}

/// Index of the largest value (the first one on ties, like torch.argmax); NaN never wins
/// (`ops::argmax_row`, which `ops::argmax_rows` applies per row on the CPU).
pub fn argmax(x: &[f32]) -> u32 {
    crate::runtime::ops::argmax_row(x) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(p: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(p, 0);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits, &[]) as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_and_penalty_follow_transformers() {
        let mut s = Sampler::new(SamplingParams::default(), 0);
        assert_eq!(s.sample(&[0.1, 2.0, 2.0, -1.0], &[]), 1);
        // HF RepetitionPenaltyLogitsProcessor: positive logits divided, negative multiplied.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..Default::default()
            },
            0,
        );
        // 3.0 -> 1.5 < 2.0; -0.5 -> -1.0.
        assert_eq!(s.sample(&[3.0, 2.0, -0.5], &[0, 0, 2]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, 0.5]), 2);
    }

    #[test]
    fn filters_restrict_the_support() {
        let logits = [2.0, 1.0, 0.0, -1.0, -2.0];
        let t1 = SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        };
        let c = draws(
            SamplingParams {
                top_k: 2,
                ..t1.clone()
            },
            &logits,
            4000,
        );
        assert!(
            c[2..].iter().all(|&x| x == 0) && c[0] > c[1] && c[1] > 0,
            "{c:?}"
        );
        // softmax: .636 .234 .086 .032 .012 — top_p 0.8 keeps the first two (mass .636 < .8).
        let c = draws(
            SamplingParams {
                top_p: 0.8,
                ..t1.clone()
            },
            &logits,
            4000,
        );
        assert!(c[2..].iter().all(|&x| x == 0) && c[1] > 0, "{c:?}");
        // min_p 0.1: floor .0636 keeps .636 .234 .086.
        let c = draws(
            SamplingParams {
                min_p: 0.1,
                ..t1.clone()
            },
            &logits,
            4000,
        );
        assert!(c[3..].iter().all(|&x| x == 0) && c[2] > 0, "{c:?}");
        // Unfiltered: frequencies near softmax (4000 draws: ±0.03).
        let c = draws(t1.clone(), &logits, 4000);
        assert!((c[0] as f64 / 4000.0 - 0.636).abs() < 0.03, "{c:?}");
        // Low temperature sharpens toward the arg-max.
        let c = draws(
            SamplingParams {
                temperature: 0.05,
                ..t1
            },
            &logits,
            500,
        );
        assert_eq!(c[0], 500);
    }

    #[test]
    fn seeded_streams_reproduce_and_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            seed: 11,
            ..Default::default()
        };
        let run = |idx: u64| {
            let mut s = Sampler::new(p.clone(), idx);
            (0..32).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(0), run(0));
        assert_ne!(run(0), run(1));
    }

    #[test]
    fn bad_values_are_named() {
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("top_p = 0"), "{e}");
        let e = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("temperature = -1"), "{e}");
    }
}
