//! `moe bench generate`: prefill and decode throughput of a model directory (a real checkpoint
//! or a random-weight one saved by scripts/peers/make_checkpoints.py), greedy, EOS ignored,
//! random prompt ids. Reports decode against the HBM roofline: the bytes of the weights one step
//! reads (attention, router, the experts its tokens route to, shared experts, LM head) over the
//! device's memory bandwidth. At batch 1 those are the k active experts per layer; at batch b the
//! distinct experts b tokens are expected to reach under uniform routing, E·(1 − (1 − k/E)^b)
//! (the KV cache's reads are not counted).

use std::path::PathBuf;

use clap::Args;
use rand::{Rng, SeedableRng};

use crate::infer::{generate, GenOptions, SamplingParams};
use crate::model::{Ffn, Model, ModelConfig};
use crate::runtime::{DType, Device, KernelSettings};

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
    /// Memory bandwidth for the roofline, GB/s (H200: 4200 as the issue states; H100 SXM 3350).
    #[arg(long, default_value_t = 4200.0)]
    hbm_gbs: f64,
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
        let roof_ms = 1e3 * active_weight_bytes(&model.config, model.dtype, b) / (a.hbm_gbs * 1e9);
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
