//! Run metrics: one JSON object per logged step in `<run>/metrics.jsonl`, and the model-FLOPs
//! utilisation estimate shown in the progress bar.
//!
//! FLOPs per trained token: 6·N + 6·L·H·hd·S, with N the active parameters (those a token
//! passes through: attention, the k routed and the shared experts, router, embeddings and LM
//! head, as `ModelConfig::active_params` counts them) and 6·L·H·hd·S the causal attention scores
//! and weighted sums, forward + backward (PaLM's 12·L·H·hd·S halved by the causal mask). The
//! PyTorch peer (`scripts/peers/train_step_torch.py`) uses the same count. MFU = achieved FLOP/s over the device
//! peak: 816 TFLOP/s dense bf16 on an H100/H200-class GPU (measured with `moe bench ops`,
//! BENCHMARKS.md), on the CPU an f32 GEMM measured at the start of the run.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::runtime::ops::{self, Matmul};
use crate::runtime::{DType, Device, Tensor};

/// Dense bf16 tensor-core peak of the GPUs we run on (H200 measured; H100 SXM alike).
pub const GPU_PEAK_FLOPS: f64 = 816e12;

/// One logged step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    /// Mean cross-entropy over supervised tokens (NaN for a skipped step).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f32,
    #[serde(deserialize_with = "nan_if_null")]
    pub aux_loss: f32,
    #[serde(deserialize_with = "nan_if_null")]
    pub z_loss: f32,
    pub lr: f32,
    /// Global gradient norm before clipping.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f32,
    /// Tokens trained on so far.
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub mfu: f64,
    pub elapsed_s: f64,
    /// Set when the step's loss or gradients were not finite and the update was skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// Appends records to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path` for a run starting after step `from_step`: records of later steps (left by
    /// a run that went on past the checkpoint being resumed) are dropped; a fresh run
    /// (`from_step` 0) starts an empty file.
    pub fn open(path: &Path, from_step: u64) -> Result<MetricsLog> {
        let kept = if from_step > 0 && path.exists() {
            read(path)?
                .into_iter()
                .filter(|r| r.step <= from_step)
                .collect()
        } else {
            Vec::new()
        };
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::create(path).map_err(io)?;
        for r in &kept {
            writeln!(file, "{}", json_line(r)).map_err(io)?;
        }
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, r: &StepRecord) -> Result<()> {
        writeln!(self.file, "{}", json_line(r)).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })
    }
}

fn json_line(r: &StepRecord) -> String {
    // Cannot fail: plain fields; non-finite floats become null.
    serde_json::to_string(r).unwrap_or_default()
}

/// All records of a metrics file.
pub fn read(path: &Path) -> Result<Vec<StepRecord>> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let r = serde_json::from_str(&line).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            msg: format!("line {}: {e}", i + 1),
        })?;
        out.push(r);
    }
    Ok(out)
}

/// A float written as `null` (JSON has no NaN) reads back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

/// Training FLOPs per token: 6·`active_params` + 6·layers·heads·head_dim·seq_len.
pub fn flops_per_token(
    active_params: u64,
    layers: usize,
    heads: usize,
    head_dim: usize,
    seq_len: usize,
) -> f64 {
    6.0 * active_params as f64 + 6.0 * (layers * heads * head_dim * seq_len) as f64
}

/// The device's peak FLOP/s and how it was obtained.
pub fn peak_flops(device: Device) -> Result<(f64, String)> {
    match device {
        Device::Cuda(_) => Ok((GPU_PEAK_FLOPS, "816 TFLOP/s bf16 (H100/H200 class)".into())),
        Device::Cpu => {
            let p = measure_cpu_peak()?;
            Ok((p, format!("{:.0} GFLOP/s f32 GEMM measured", p / 1e9)))
        }
    }
}

/// Best of 3 timings of a 384³ f32 GEMM on the CPU (a few tens of milliseconds).
pub fn measure_cpu_peak() -> Result<f64> {
    let n = 384;
    let a = Tensor::randn(&[n, n], 1.0, 1, DType::F32, Device::Cpu)?;
    let b = Tensor::randn(&[n, n], 1.0, 2, DType::F32, Device::Cpu)?;
    let spec = Matmul::default();
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t = Instant::now();
        ops::matmul(&a, &b, spec)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best.max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, loss: f32) -> StepRecord {
        StepRecord {
            step,
            loss,
            aux_loss: 0.01,
            z_loss: 0.0,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens: 64 * step,
            tokens_per_s: 1000.0,
            mfu: 0.1,
            elapsed_s: step as f64,
            skipped: !loss.is_finite(),
        }
    }

    #[test]
    fn jsonl_round_trip_and_resume_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&p, 0).unwrap();
        for s in 1..=5 {
            log.write(&rec(s, if s == 3 { f32::NAN } else { 2.0 }))
                .unwrap();
        }
        drop(log);
        let all = read(&p).unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(all[0], rec(1, 2.0));
        assert!(all[2].skipped && !all[2].loss.is_finite());
        let mut log = MetricsLog::open(&p, 2).unwrap();
        log.write(&rec(3, 1.5)).unwrap();
        drop(log);
        let steps: Vec<u64> = read(&p).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![1, 2, 3]);
    }

    #[test]
    fn flops_and_cpu_peak() {
        assert_eq!(flops_per_token(1000, 2, 4, 8, 16), 6000.0 + 6.0 * 1024.0);
        let p = measure_cpu_peak().unwrap();
        assert!(p > 1e8, "{p}");
    }
}
