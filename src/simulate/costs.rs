//! Measured costs the simulator prices a step with, from a TOML file (`COSTS_H100` is the
//! default, `costs-h100.toml`): expert grouped-GEMM rate by rows per expert, and per collective
//! (all-to-all, reduce-scatter, all-gather) latency and bandwidth by message size, inside a node
//! and across nodes. Tables are piecewise-linear in their x, clamped at both ends.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::placement::ByteSizes;

/// The default cost file: one 8 × H100 SXM node; inter-node numbers are assumptions.
pub const COSTS_H100: &str = include_str!("costs-h100.toml");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostModel {
    pub gpus_per_node: usize,
    pub bytes: Bytes,
    pub expert_gemm: GemmCost,
    pub all_to_all: Collective,
    pub reduce_scatter: Collective,
    pub all_gather: Collective,
}

/// Bytes per element.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bytes {
    /// Token rows in the all-to-all.
    pub activation: u64,
    pub param: u64,
    pub grad: u64,
    pub optimizer: u64,
}

/// Forward + backward of one SwiGLU expert (18 · rows · d · F FLOPs) runs at `tflops[i]` with
/// `rows[i]` rows.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GemmCost {
    pub rows: Vec<f64>,
    pub tflops: Vec<f64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Collective {
    pub intra_node: Link,
    pub inter_node: Link,
}

/// One message of b bytes from a GPU takes b / gbps(b); a phase adds `latency_us` once.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub latency_us: f64,
    pub message_bytes: Vec<f64>,
    pub gbps: Vec<f64>,
}

impl CostModel {
    /// Reads `path`, or the default H100 file when `None`.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cost file {}", p.display()))?;
                Self::parse(&text).with_context(|| format!("cost file {}", p.display()))
            }
            None => Self::parse(COSTS_H100).context("built-in cost file costs-h100.toml"),
        }
    }

    /// Parses and checks a cost file (a missing field is named by the TOML error).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let c: CostModel = toml::from_str(text)?;
        if c.gpus_per_node == 0 {
            bail!("gpus_per_node = 0: must be ≥ 1");
        }
        check_table(
            "expert_gemm",
            "rows",
            &c.expert_gemm.rows,
            "tflops",
            &c.expert_gemm.tflops,
        )?;
        for (name, coll) in [
            ("all_to_all", &c.all_to_all),
            ("reduce_scatter", &c.reduce_scatter),
            ("all_gather", &c.all_gather),
        ] {
            for (side, link) in [
                ("intra_node", &coll.intra_node),
                ("inter_node", &coll.inter_node),
            ] {
                let at = format!("{name}.{side}");
                check_table(
                    &at,
                    "message_bytes",
                    &link.message_bytes,
                    "gbps",
                    &link.gbps,
                )?;
                if !(link.latency_us.is_finite() && link.latency_us >= 0.0) {
                    bail!(
                        "{at}.latency_us = {}: expected a finite value ≥ 0",
                        link.latency_us
                    );
                }
            }
        }
        Ok(c)
    }

    pub fn sizes(&self) -> ByteSizes {
        ByteSizes {
            param: self.bytes.param,
            grad: self.bytes.grad,
            optimizer: self.bytes.optimizer,
        }
    }

    /// Seconds for forward + backward of one expert of width (d, f) on `rows` rows.
    pub fn gemm_seconds(&self, rows: u64, d: usize, f: usize) -> f64 {
        if rows == 0 {
            return 0.0;
        }
        let rate = interp(
            &self.expert_gemm.rows,
            &self.expert_gemm.tflops,
            rows as f64,
        );
        18.0 * rows as f64 * d as f64 * f as f64 / (rate * 1e12)
    }
}

impl Link {
    /// Seconds to send one message of `bytes` (latency excluded).
    pub fn seconds(&self, bytes: u64) -> f64 {
        bytes as f64 / (interp(&self.message_bytes, &self.gbps, bytes as f64) * 1e9)
    }
}

/// Same lengths (≥ 1), x strictly ascending, y > 0.
fn check_table(at: &str, xn: &str, xs: &[f64], yn: &str, ys: &[f64]) -> anyhow::Result<()> {
    if xs.is_empty() || xs.len() != ys.len() {
        bail!(
            "{at}: {xn} has {} entries and {yn} {}: expected the same number, at least one",
            xs.len(),
            ys.len()
        );
    }
    if let Some(w) = xs.windows(2).find(|w| !(w[0] < w[1])) {
        bail!(
            "{at}.{xn}: {} then {}: expected strictly ascending values",
            w[0],
            w[1]
        );
    }
    if let Some(y) = ys.iter().find(|y| !(y.is_finite() && **y > 0.0)) {
        bail!("{at}.{yn} = {y}: expected finite values > 0");
    }
    Ok(())
}

/// Piecewise-linear y(x) through the points, constant beyond the first and last.
fn interp(xs: &[f64], ys: &[f64], x: f64) -> f64 {
    let i = xs.partition_point(|&p| p <= x);
    if i == 0 {
        return ys[0];
    }
    if i == xs.len() {
        return ys[xs.len() - 1];
    }
    let t = (x - xs[i - 1]) / (xs[i] - xs[i - 1]);
    ys[i - 1] + t * (ys[i] - ys[i - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_is_piecewise_linear_and_clamped() {
        let (xs, ys) = ([1.0, 3.0, 7.0], [10.0, 20.0, 40.0]);
        assert_eq!(interp(&xs, &ys, 0.0), 10.0);
        assert_eq!(interp(&xs, &ys, 2.0), 15.0);
        assert_eq!(interp(&xs, &ys, 3.0), 20.0);
        assert_eq!(interp(&xs, &ys, 6.0), 35.0);
        assert_eq!(interp(&xs, &ys, 9.0), 40.0);
    }

    #[test]
    fn default_costs_parse() {
        let c = CostModel::load(None).unwrap();
        assert_eq!(c.gpus_per_node, 8);
        // 512 rows of the Qwen3 shape (d 2048, F 768) at the table's 339 TFLOP/s.
        let t = c.gemm_seconds(512, 2048, 768);
        assert!(
            (t - 18.0 * 512.0 * 2048.0 * 768.0 / 339e12).abs() < 1e-12,
            "{t}"
        );
    }
}
