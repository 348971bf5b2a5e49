//! `moe bench train`: training-step throughput and MFU of an OLMoE-1B-7B-shaped model (d 2048,
//! 16 heads, q/k norm, 64 SwiGLU experts of 1024, top-8, no renormalisation, aux loss 0.01,
//! vocab 50304; `--layers` of them) in bf16 with f32 AdamW masters, beside
//! scripts/peers/train_step_torch.py (same shape, same FLOP count). Prints the time of the
//! forward, backward and optimizer phases (synchronised) so the table says where time goes.

use std::time::Instant;

use clap::Args;

use crate::model::{Model, NativeMoe, NativeSpec, QkNorm, TrainOpts};
use crate::moe::{ExpertKind, MoeConfig, RouterKind};
use crate::runtime::{DType, Device, ParamSet, Tensor};
use crate::train::metrics::{flops_per_token, peak_flops};
use crate::train::optimizer::{clip_factor, grad_norm_sq_with, AdamWOptimizer, OptimizerConfig};

#[derive(Args)]
pub struct TrainBenchArgs {
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value_t = 8)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Recompute block activations in the backward.
    #[arg(long)]
    recompute: bool,
    /// d_model (2048 = OLMoE); smaller values make a quick CPU check possible.
    #[arg(long, default_value_t = 2048)]
    d_model: usize,
    /// The routed experts' gradient buffers: f32 (default) or bf16 (`train.expert_grad_dtype`).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    expert_grad_dtype: String,
}

pub fn olmoe_spec(layers: usize, d: usize, seq: usize) -> NativeSpec {
    NativeSpec {
        vocab_size: 50304,
        d_model: d,
        n_layers: layers,
        n_heads: 16,
        n_kv_heads: None,
        head_dim: None,
        max_seq_len: seq.max(4096),
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        qkv_bias: false,
        qk_norm: QkNorm::Full,
        ffn_dim: d / 2,
        moe: Some(NativeMoe {
            every: 1,
            first_dense: 0,
            experts: vec![64],
            layer: MoeConfig {
                d_model: 0,
                n_experts: 0,
                top_k: 8,
                ffn_dim: d / 2,
                expert: ExpertKind::SwiGlu,
                expert_bias: false,
                router: RouterKind::Softmax { renormalize: false },
                shared: None,
                residual: None,
                aux_loss_coeff: 0.01,
                z_loss_coeff: 0.0,
            },
        }),
        init_std: 0.02,
    }
}

pub fn run(a: TrainBenchArgs) -> anyhow::Result<()> {
    let device = Device::parse(&a.device)?;
    let dtype = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let cfg = olmoe_spec(a.layers, a.d_model, a.seq)
        .resolve()
        .map_err(anyhow::Error::msg)?;
    // bf16 expert gradients take the parameters' dtype (f32 on the CPU).
    let expert_grads = if a.expert_grad_dtype == "bf16" {
        dtype
    } else {
        DType::F32
    };
    let t0 = Instant::now();
    let model = Model::init(cfg, 0, device, dtype)?;
    let (total, active) = model.param_counts();
    let c = &model.config;
    let fpt = flops_per_token(active, c.n_layers(), c.n_heads, c.head_dim, a.seq);
    let (peak, peak_desc) = peak_flops(device)?;
    println!(
        "OLMoE-shaped: {} layers, {:.2}B params ({:.2}B active), batch {} x seq {}, {} on {} (init {:.1}s); peak {}",
        a.layers,
        total as f64 / 1e9,
        active as f64 / 1e9,
        a.batch,
        a.seq,
        dtype,
        device,
        t0.elapsed().as_secs_f64(),
        peak_desc
    );
    let mut names: Vec<(String, &Tensor)> = Vec::new();
    model
        .params
        .visit("", &mut |n, t| names.push((n.to_string(), t)));
    let refs: Vec<(&str, &Tensor)> = names.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let ocfg = OptimizerConfig::default();
    let mut opt = AdamWOptimizer::new(ocfg.clone(), &refs)?;
    drop(refs);
    drop(names);
    let mut model = model;
    let n = a.batch * a.seq;
    let ids: Vec<i32> = (0..n + 1)
        .map(|i| ((i as u64 * 2_654_435_761) % 50304) as i32)
        .collect();
    let tokens = Tensor::from_vec(ids[..n].to_vec(), &[a.batch, a.seq])?.into_device(device)?;
    let targets = Tensor::from_vec(ids[1..].to_vec(), &[a.batch, a.seq])?.into_device(device)?;
    let sync = |d: Device| -> anyhow::Result<()> {
        if let Device::Cuda(i) = d {
            crate::runtime::cuda::device(i)?.synchronize()?;
        }
        Ok(())
    };
    let mut rows = Vec::new();
    for step in 0..a.warmup + a.steps {
        if step == a.warmup && crate::runtime::cuda::profile::enabled() {
            crate::runtime::cuda::profile::reset();
        }
        sync(device)?;
        let t = Instant::now();
        let opts = TrainOpts {
            recompute: a.recompute,
            seed: step as u64,
            loss_scale: 1.0,
        };
        let (out, saved) = model.forward_train(&tokens, &targets, n, &opts)?;
        sync(device)?;
        let tf = t.elapsed().as_secs_f64();
        let mut g = model.params.grad_buffers(expert_grads)?;
        let mut sq = Tensor::zeros(&[1], DType::F32, device)?;
        model.backward_with(saved, &mut g, true, Some(&mut sq))?;
        sync(device)?;
        let tb = t.elapsed().as_secs_f64();
        let mut gn: Vec<(String, &Tensor)> = Vec::new();
        g.visit("", &mut |n, t| gn.push((n.to_string(), t)));
        let grefs: Vec<&Tensor> = gn.iter().map(|(_, t)| *t).collect();
        let norm = grad_norm_sq_with(&grefs, &g.routed_expert_weights(), sq)?
            .scalar_f32()?
            .sqrt();
        let gnamed: Vec<(&str, &Tensor)> = gn.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let mut pn: Vec<(String, &mut Tensor)> = Vec::new();
        model
            .params
            .visit_mut("", &mut |n, t| pn.push((n.to_string(), t)));
        let mut prefs: Vec<(&str, &mut Tensor)> =
            pn.iter_mut().map(|(n, t)| (n.as_str(), &mut **t)).collect();
        opt.step(&mut prefs, &gnamed, 1e-4, clip_factor(norm, ocfg.grad_clip))?;
        drop(prefs);
        drop(pn);
        let loss = out.loss.scalar_f32()?;
        sync(device)?;
        let tt = t.elapsed().as_secs_f64();
        if step >= a.warmup {
            rows.push((tf, tb - tf, tt - tb, tt));
        }
        eprintln!(
            "step {step}: loss {loss:.4} | forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms",
            1e3 * tf,
            1e3 * (tb - tf),
            1e3 * (tt - tb)
        );
    }
    let med = |k: usize| {
        let mut v: Vec<f64> = rows.iter().map(|r| [r.0, r.1, r.2, r.3][k]).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let step_s = med(3);
    let tps = n as f64 / step_s;
    println!(
        "median step {:.1} ms (forward {:.1}, backward {:.1}, optimizer {:.1}) | {:.0} tokens/s | MFU {:.1}% ({:.2} GFLOP/token)",
        1e3 * step_s,
        1e3 * med(0),
        1e3 * med(1),
        1e3 * med(2),
        tps,
        100.0 * tps * fpt / peak,
        fpt / 1e9
    );
    if crate::runtime::cuda::profile::enabled() {
        // MOE_PROFILE=1: per kernel over the timed steps (synchronised, so slower than above).
        println!("profile (MOE_PROFILE=1, synchronised, {} steps):", a.steps);
        print!(
            "{}",
            crate::runtime::cuda::profile::report().unwrap_or_default()
        );
    }
    Ok(())
}
