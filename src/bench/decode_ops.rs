//! `moe bench decode-ops`: the kernels of one batch-1 decode step in isolation, each recorded
//! 50 times into a CUDA graph and timed as a graph launch (so launch overhead is what a decode
//! graph pays, not what a host loop pays). Shapes: OLMoE-1B-7B (d 2048, 16 heads of 128, 64
//! experts top-8 of 1024) unless overridden. Prints µs per call and the bytes-per-call floor at
//! the HBM bandwidth given.

use clap::Args;
use rand::{Rng, SeedableRng};

use super::median_ms;
use crate::moe::{
    moe_forward, moe_serve, Mode, MoeConfig, MoeServePlan, MoeWeights, RouterKind, ServeInput,
};
use crate::runtime::ops::grouped_cuda::{moe_serve_down, moe_serve_up};
use crate::runtime::ops::{self, RopeTable};
use crate::runtime::{DType, Device, KernelSettings, Tensor};

#[derive(Args)]
pub struct DecodeOpsArgs {
    /// CUDA device: cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    #[arg(long, default_value_t = 2048)]
    d_model: usize,
    #[arg(long, default_value_t = 16)]
    heads: usize,
    #[arg(long, default_value_t = 16)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value_t = 64)]
    experts: usize,
    #[arg(long, default_value_t = 8)]
    top_k: usize,
    #[arg(long, default_value_t = 1024)]
    ffn_dim: usize,
    /// Cached keys the attention reads.
    #[arg(long, default_value_t = 544)]
    context: usize,
    /// LM head rows of the vocabulary GEMV row (its weights do not fit in L2).
    #[arg(long, default_value_t = 50304)]
    vocab: usize,
    /// Tokens of the batched rows (dense x·Wᵀ, router and experts at a decode batch).
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// HBM bandwidth for the floor column, GB/s.
    #[arg(long, default_value_t = 4200.0)]
    hbm_gbs: f64,
}

fn random(shape: &[usize], device: Device, seed: u64) -> anyhow::Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
    Ok(Tensor::from_f32(&v, shape, DType::BF16, device)?)
}

/// x·Wᵀ with an f32 result (router and LM head logits).
fn logits_f32(x: &Tensor, w: &Tensor) -> crate::runtime::Result<()> {
    let spec = ops::Matmul {
        trans_b: true,
        out_dtype: Some(DType::F32),
        ..Default::default()
    };
    ops::matmul(x, w, spec).map(drop)
}

pub fn run(a: DecodeOpsArgs) -> anyhow::Result<()> {
    let device = Device::parse(&a.device)?;
    let Device::Cuda(ordinal) = device else {
        anyhow::bail!("bench decode-ops times CUDA graphs: pass --device cuda");
    };
    let cu = crate::runtime::cuda::device(ordinal)?;
    let (d, h, hkv, hd) = (a.d_model, a.heads, a.kv_heads, a.head_dim);
    const CALLS: usize = 50;
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    let mut time = |name: &str,
                    bytes: f64,
                    f: &mut dyn FnMut() -> crate::runtime::Result<()>|
     -> anyhow::Result<()> {
        f()?; // compile, grow the pool
        let ((), g) = cu.capture(|| {
            for _ in 0..CALLS {
                f()?;
            }
            Ok::<(), crate::runtime::Error>(())
        })?;
        let ms = median_ms(device, 3, 20, || g.launch())?;
        rows.push((name.to_string(), 1e3 * ms / CALLS as f64, bytes));
        Ok(())
    };
    let x = random(&[1, d], device, 1)?;
    let wq = random(&[h * hd, d], device, 2)?;
    time("x·Wqᵀ (gemv)", (h * hd * d * 2) as f64, &mut || {
        ops::linear(&x, &wq, None).map(drop)
    })?;
    let wr = random(&[a.experts, d], device, 3)?;
    time(
        "router x·Wᵀ → f32",
        (a.experts * d * 2) as f64,
        &mut || logits_f32(&x, &wr),
    )?;
    let wv = random(&[a.vocab, d], device, 20)?;
    time(
        "LM head x·Wᵀ → f32 (gemv, cold weights)",
        (a.vocab * d * 2) as f64,
        &mut || logits_f32(&x, &wv),
    )?;
    // The same bytes through the tensor-core small-M kernel (2 rows, one group): its long-lived
    // warps against the CUDA-core GEMV's one-round blocks on weights that do not fit in L2.
    let wv3 = wv.reshape(&[1, a.vocab, d])?;
    let x2 = random(&[2, d], device, 21)?;
    let off2 = Tensor::from_slice(&[0i32, 2], &[2], device)?;
    time(
        "LM head, 2 rows (tensor-core small-M)",
        (a.vocab * d * 2) as f64,
        &mut || ops::grouped_matmul(&x2, &wv3, &off2, true).map(drop),
    )?;
    drop(wv3);
    let mut xr = random(&[1, d], device, 4)?;
    let ar = random(&[1, d], device, 5)?;
    let nw = random(&[d], device, 6)?;
    time("add_rmsnorm", (4 * d * 2) as f64, &mut || {
        ops::add_rmsnorm(&mut xr, &ar, &nw, 1e-5).map(drop)
    })?;
    let l = a.context + 96;
    let mut kc = random(&[1, hkv, l, hd], device, 7)?;
    let mut vc = random(&[1, hkv, l, hd], device, 8)?;
    let q = random(&[1, h * hd], device, 9)?;
    let k = random(&[1, hkv * hd], device, 10)?;
    let v = random(&[1, hkv * hd], device, 11)?;
    let (qn, kn) = (random(&[hd], device, 12)?, random(&[hd], device, 13)?);
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let table = RopeTable::new(&inv, l, 1.0, device)?;
    let pos = Tensor::from_slice(&[(a.context - 1) as i32], &[1], device)?;
    let seqs = Tensor::from_slice(&[0i32], &[1], device)?;
    let lens = Tensor::from_slice(&[a.context as i32], &[1], device)?;
    time(
        "qk norm + rope + kv write",
        ((h + 2 * hkv) * hd * 4) as f64,
        &mut || {
            let norm = Some(ops::QkNormSpec {
                q: &qn,
                k: &kn,
                per_head: true,
                eps: 1e-6,
            });
            ops::qk_rope_kv_write(
                &q, &k, &v, norm, None, &table, &pos, &seqs, &mut kc, &mut vc, h,
            )
            .map(drop)
        },
    )?;
    let q3 = random(&[1, h, hd], device, 14)?;
    time(
        "attention_decode (+ combine)",
        (2 * hkv * a.context * hd * 2) as f64,
        &mut || {
            ops::attention_decode(&q3, &kc, &vc, &lens, 1.0 / (hd as f32).sqrt(), None).map(drop)
        },
    )?;
    let cfg = MoeConfig {
        d_model: d,
        n_experts: a.experts,
        top_k: a.top_k,
        ffn_dim: a.ffn_dim,
        expert: Default::default(),
        expert_bias: false,
        router: RouterKind::Softmax { renormalize: false },
        shared: None,
        residual: None,
        aux_loss_coeff: 0.0,
        z_loss_coeff: 0.0,
    };
    let w = MoeWeights::init(&cfg, 0.02, 0.02, 1, DType::BF16, device)?;
    let xe = random(&[a.top_k, d], device, 15)?;
    let offs: Vec<i32> = (0..=a.experts).map(|e| e.min(a.top_k) as i32).collect();
    let offsets = Tensor::from_slice(&offs, &[a.experts + 1], device)?;
    let expert_bytes = (a.top_k * 3 * d * a.ffn_dim * 2) as f64;
    time(
        "experts gate+up (grouped, 1 row each)",
        expert_bytes * 2.0 / 3.0,
        &mut || ops::grouped_matmul(&xe, &w.w1, &offsets, true).map(drop),
    )?;
    let he = random(&[a.top_k, a.ffn_dim], device, 16)?;
    time(
        "experts down (grouped, 1 row each)",
        expert_bytes / 3.0,
        &mut || ops::grouped_matmul(&he, &w.w2, &offsets, true).map(drop),
    )?;
    let ids = Tensor::from_slice(
        &(0..a.top_k as i32).collect::<Vec<_>>(),
        &[a.top_k, 1],
        device,
    )?;
    let wts = Tensor::from_slice(&vec![1.0 / a.top_k as f32; a.top_k], &[a.top_k, 1], device)?;
    let dev = ops::cuda_dev(&x)?;
    let dims = (a.experts, a.ffn_dim, a.top_k);
    time(
        "slots gate+up+SwiGLU (moe_serve_up)",
        expert_bytes * 2.0 / 3.0,
        &mut || moe_serve_up(&dev, &x, &w.w1, &ids, dims).map(drop),
    )?;
    let sa = moe_serve_up(&dev, &x, &w.w1, &ids, dims)?;
    time(
        "slots down+combine (moe_serve_down)",
        expert_bytes / 3.0,
        &mut || moe_serve_down(&dev, &sa, &w.w2, &ids, &wts, (a.experts, 1, d)).map(drop),
    )?;
    time(
        "experts from slots (moe_serve_swiglu)",
        expert_bytes,
        &mut || ops::moe_serve_swiglu(&x, &w.w1, &w.w2, &ids, &wts).map(drop),
    )?;
    time(
        "whole MoE block (route … combine)",
        expert_bytes + (a.experts * d * 2) as f64,
        &mut || moe_forward(&cfg, &w, &x, Mode::Infer).map(drop),
    )?;
    let served = MoeServePlan::new(
        &cfg,
        &w,
        x.dim(0),
        ServeInput::Normed,
        &KernelSettings::current(),
    )?;
    time(
        "whole MoE block, served (route + slots)",
        expert_bytes + (a.experts * d * 2) as f64,
        &mut || moe_serve(&cfg, &w, &served, &x).map(drop),
    )?;
    // A decode batch of `tokens`: dense x·Wᵀ and router rows, and the experts with the batch's
    // k·T rows spread evenly over the experts (as uniform routing would).
    let t = a.tokens.max(1);
    let xt = random(&[t, d], device, 17)?;
    time(
        &format!("x·Wqᵀ, {t} rows"),
        (h * hd * d * 2) as f64,
        &mut || ops::linear(&xt, &wq, None).map(drop),
    )?;
    time(
        &format!("router, {t} rows → f32"),
        (a.experts * d * 2) as f64,
        &mut || logits_f32(&xt, &wr),
    )?;
    let slots = t * a.top_k;
    let offs: Vec<i32> = (0..=a.experts)
        .map(|e| (e * slots / a.experts) as i32)
        .collect();
    let reached = (0..a.experts).filter(|&e| offs[e + 1] > offs[e]).count();
    let offsets_t = Tensor::from_slice(&offs, &[a.experts + 1], device)?;
    let xe_t = random(&[slots, d], device, 18)?;
    let he_t = random(&[slots, a.ffn_dim], device, 19)?;
    let per_expert = (3 * d * a.ffn_dim * 2) as f64;
    time(
        &format!("experts gate+up, {slots} rows / {reached}"),
        reached as f64 * per_expert * 2.0 / 3.0,
        &mut || ops::grouped_matmul(&xe_t, &w.w1, &offsets_t, true).map(drop),
    )?;
    time(
        &format!("experts down, {slots} rows / {reached}"),
        reached as f64 * per_expert / 3.0,
        &mut || ops::grouped_matmul(&he_t, &w.w2, &offsets_t, true).map(drop),
    )?;
    println!(
        "decode kernels, batch 1 (and {t} tokens where named), bf16, {} calls per graph (d {d}, {h}/{hkv} heads of {hd}, {} experts top-{} of {}, {} keys)",
        CALLS, a.experts, a.top_k, a.ffn_dim, a.context
    );
    println!(
        "{:<40} {:>10} {:>12} {:>10}",
        "kernel(s)", "µs/call", "floor µs", "of floor"
    );
    for (n, us, bytes) in rows {
        let floor = bytes / (a.hbm_gbs * 1e9) * 1e6;
        println!(
            "{n:<40} {us:>10.2} {floor:>12.2} {:>9.0}%",
            100.0 * floor / us
        );
    }
    Ok(())
}
