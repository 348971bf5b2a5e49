//! `moe bench generate`: prefill and decode throughput of a model directory (a real checkpoint
//! or a random-weight one saved by scripts/peers/make_checkpoints.py), greedy, EOS ignored,
//! random prompt ids. Reports decode against the HBM roofline: the bytes of the weights one step
//! reads (attention, router, the experts its tokens route to, shared experts, LM head) over the
//! memory bandwidth measured at the start of the run (a 1 GiB device-to-device copy, bytes read +
//! written, best of 5: scripts/peers/ceilings.py measures the same for the peers) or given by
//! `--bandwidth-tbs`. At batch 1 those are the k active experts per layer; at batch b the distinct
//! experts b tokens are expected to reach under uniform routing, E·(1 − (1 − k/E)^b) (the KV
//! cache's reads are not counted).

use std::path::PathBuf;

use clap::Args;
use rand::{Rng, SeedableRng};

use super::Timer;
use crate::infer::{generate, GenOptions, SamplingParams};
use crate::model::{Ffn, Model, ModelConfig};
use crate::runtime::ops::write_rows;
use crate::runtime::{DType, Device, KernelSettings, Tensor};

#[derive(Args)]
pub struct GenerateBenchArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto | f32 | bf16 | f16
    #[arg(long, default_value = "auto")]
    dtype: String,
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Batch sizes for decode, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Run each batch size with decode steps eager and through CUDA graphs.
    #[arg(long)]
    compare_graphs: bool,
    /// Batch size of the per-kernel profile run (`MOE_PROFILE=1`).
    #[arg(long, default_value_t = 1)]
    profile_batch: usize,
    /// Memory bandwidth for the roofline, TB/s (bytes read + written); default: measured now by a
    /// device-to-device copy of 1 GiB.
    #[arg(long)]
    bandwidth_tbs: Option<f64>,
}

/// Bytes of the buffer the bandwidth is measured with on the GPU (far beyond any L2); 256 MiB on
/// the CPU.
const COPY_BYTES_GPU: usize = 1 << 30;
const COPY_BYTES_CPU: usize = 1 << 28;

/// Bandwidth in GB/s of copying `bytes` (read once, written once) in `ms`.
pub fn copy_gbs(bytes: usize, ms: f64) -> f64 {
    2.0 * bytes as f64 / (ms * 1e-3) / 1e9
}

/// Milliseconds a step reading `bytes` takes at `gbs` GB/s.
pub fn roofline_ms(bytes: f64, gbs: f64) -> f64 {
    1e3 * bytes / (gbs * 1e9)
}

/// The device's copy bandwidth, GB/s (bytes read + written): the best of 5 timed copies of a
/// buffer into another after one untimed copy.
fn measured_copy_gbs(device: Device) -> anyhow::Result<f64> {
    let bytes = if device.is_cuda() {
        COPY_BYTES_GPU
    } else {
        COPY_BYTES_CPU
    };
    let src = Tensor::zeros(&[bytes / 2], DType::BF16, device)?;
    let mut dst = Tensor::uninit(&[bytes / 2], DType::BF16, device)?;
    write_rows(&mut dst, 0, &src)?;
    let mut timer = Timer::new(device)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        best = best.min(timer.time(|| write_rows(&mut dst, 0, &src))?);
    }
    Ok(copy_gbs(bytes, best))
}

/// Bytes of weights one decode step of `batch` tokens reads: per MoE layer the distinct experts
/// `batch` uniformly routed tokens are expected to reach (exactly top_k at batch 1).
pub fn active_weight_bytes(c: &ModelConfig, dtype: DType, batch: usize) -> f64 {
    let d = c.d_model as f64;
    let (hq, hk) = (
        (c.n_heads * c.head_dim) as f64,
        (c.n_kv_heads * c.head_dim) as f64,
    );
    let mut params = c.vocab_size as f64 * d; // LM head (tied or not, it is read once)
    for l in &c.layers {
        params += d * (hq + 2.0 * hk) + hq * d;
        params += match &l.ffn {
            Ffn::Dense { ffn_dim } => 3.0 * d * *ffn_dim as f64,
            Ffn::Moe(m) => {
                let mats = if matches!(m.expert, crate::moe::ExpertKind::SwiGlu) {
                    3.0
                } else {
                    2.0
                };
                let shared = m
                    .shared
                    .as_ref()
                    .map_or(0.0, |s| 3.0 * d * (s.ffn_dim * s.count) as f64);
                let e = m.n_experts as f64;
                let reached = if batch <= 1 {
                    m.top_k as f64
                } else {
                    e * (1.0 - (1.0 - m.top_k as f64 / e).powi(batch as i32))
                };
                d * e + reached * mats * d * m.ffn_dim as f64 + shared
            }
        };
    }
    params * dtype.size_in_bytes() as f64
}

pub fn run(a: GenerateBenchArgs) -> anyhow::Result<()> {
    let device = Device::parse(&a.device)?;
    let dtype = match a.dtype.as_str() {
        "auto" => None,
        d => Some(
            d.parse::<DType>()
                .map_err(|e| anyhow::anyhow!("--dtype {d}: {e}"))?,
        ),
    };
    let t0 = std::time::Instant::now();
    let model = Model::load_hf(&a.model, device, dtype)?;
    let bytes = active_weight_bytes(&model.config, model.dtype, 1);
    let (total, active) = model.param_counts();
    println!(
        "model {} ({:.2}B params, {:.2}B active) on {} in {}, loaded in {:.1}s; {:.2} GB of weights per decoded token",
        a.model.display(),
        total as f64 / 1e9,
        active as f64 / 1e9,
        model.device,
        model.dtype,
        t0.elapsed().as_secs_f64(),
        bytes / 1e9
    );
    let gbs = match a.bandwidth_tbs {
        Some(tbs) => {
            anyhow::ensure!(
                tbs.is_finite() && tbs > 0.0,
                "--bandwidth-tbs {tbs}: expected a bandwidth in TB/s > 0"
            );
            println!("roofline bandwidth {tbs:.3} TB/s (read + written), from --bandwidth-tbs");
            tbs * 1e3
        }
        None => {
            let gbs = measured_copy_gbs(model.device)?;
            println!(
                "roofline bandwidth {:.3} TB/s (read + written), measured: best of 5 device copies of {} MiB",
                gbs / 1e3,
                if model.device.is_cuda() {
                    COPY_BYTES_GPU
                } else {
                    COPY_BYTES_CPU
                } >> 20
            );
            gbs
        }
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = model.config.vocab_size as u32;
    let mut prompts = |b: usize, len: usize| -> Vec<Vec<u32>> {
        (0..b)
            .map(|_| (0..len).map(|_| rng.random_range(0..vocab)).collect())
            .collect()
    };
    let opts = |n: usize| GenOptions {
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        stop: vec![],
        eos: vec![],
        ignore_eos: true,
    };
    // Warm-up at every batch size: kernels compiled, cuBLAS heuristics and the memory pool
    // settled for each shape that is timed.
    for &b in &a.batch {
        generate(
            &model,
            None,
            &prompts(b, a.prompt_len),
            &opts(4),
            &mut |_, _| {},
        )?;
    }
    println!(
        "{:>6} {:>8} {:>12} {:>14} {:>12} {:>12} {:>10}",
        "batch", "prompt", "prefill tok/s", "decode tok/s", "ms/step", "roofline ms", "of roofline"
    );
    let modes: &[bool] = if a.compare_graphs {
        &[false, true]
    } else {
        &[true]
    };
    for (&b, &graphs) in a
        .batch
        .iter()
        .flat_map(|b| modes.iter().map(move |g| (b, g)))
    {
        if a.compare_graphs {
            print!("{:>8} ", if graphs { "graphs" } else { "eager" });
        }
        // The caches this run takes decode with or without graphs (`KvCache::use_graphs`).
        let settings = KernelSettings {
            cuda_graphs: graphs,
            ..KernelSettings::current()
        };
        let (_, t) = settings.scoped(|| {
            generate(
                &model,
                None,
                &prompts(b, a.prompt_len),
                &opts(a.new_tokens),
                &mut |_, _| {},
            )
        })?;
        let step_ms = 1e3 * t.decode_s / t.decode_steps.max(1) as f64;
        // Batch b reads the weights once per step (experts: the distinct ones its tokens reach).
        let roof_ms = roofline_ms(active_weight_bytes(&model.config, model.dtype, b), gbs);
        println!(
            "{:>6} {:>8} {:>12.0} {:>14.1} {:>12.3} {:>12.3} {:>9.1}%",
            b,
            a.prompt_len,
            (b * a.prompt_len) as f64 / t.prefill_s,
            t.decode_tokens as f64 / t.decode_s,
            step_ms,
            roof_ms,
            100.0 * roof_ms / step_ms
        );
    }
    if crate::runtime::cuda::profile::enabled() {
        // MOE_PROFILE=1: one batch-1 run of 33 tokens (1 prefill + 32 decode steps), per kernel.
        crate::runtime::cuda::profile::reset();
        let t = std::time::Instant::now();
        generate(
            &model,
            None,
            &prompts(a.profile_batch, a.prompt_len),
            &opts(33),
            &mut |_, _| {},
        )?;
        println!(
            "profile (MOE_PROFILE=1, synchronised; batch {}: 1 prefill of {} + 32 decode steps, {:.1} ms wall):",
            a.profile_batch,
            a.prompt_len,
            1e3 * t.elapsed().as_secs_f64()
        );
        print!(
            "{}",
            crate::runtime::cuda::profile::report().unwrap_or_default()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_bandwidth_counts_read_and_write() {
        // 1 GiB copied in 0.5 ms: 2 GiB moved, 4.295 TB/s.
        assert_eq!(
            copy_gbs(1 << 30, 0.5),
            2.0 * (1u64 << 30) as f64 / 0.5e-3 / 1e9
        );
        assert_eq!(roofline_ms(3.0e9, 3000.0), 1.0);
        assert_eq!(roofline_ms(6.0e9, 1500.0), 4.0);
    }

    #[test]
    fn active_weight_bytes_of_an_olmoe_layer() {
        let c = super::super::train::olmoe_spec(2, 2048, 4096)
            .resolve()
            .unwrap();
        let (d, v, e, k, f) = (2048.0, 50304.0, 64.0, 8.0, 1024.0);
        // q, k, v, o projections, router, the experts reached (3 matrices each), per layer; LM head once.
        let per_layer = |reached: f64| 4.0 * d * d + d * e + reached * 3.0 * d * f;
        let bf16 = |params: f64| 2.0 * params;
        assert_eq!(
            active_weight_bytes(&c, DType::BF16, 1),
            bf16(v * d + 2.0 * per_layer(k))
        );
        let reached = e * (1.0 - (1.0 - k / e).powi(32));
        let want = bf16(v * d + 2.0 * per_layer(reached));
        let got = active_weight_bytes(&c, DType::BF16, 32);
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        assert_eq!(
            active_weight_bytes(&c, DType::F32, 1),
            2.0 * active_weight_bytes(&c, DType::BF16, 1)
        );
    }
}
