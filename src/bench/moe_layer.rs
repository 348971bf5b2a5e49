//! `moe bench moe-layer`: the MoE layer's forward and forward+backward in bf16 on the issue's
//! shapes (d, ffn, experts, top-k, tokens), with TFLOP/s and the floor:
//!   FLOPs fwd = 2·T·k·d·(H1 + F) + 2·T·d·E (router), fwd+bwd = 3 × fwd;
//!   bytes ≥ the routed experts' weights read once (E·(H1 + F)·d·2) — what bounds decode.
//! Floor = max(FLOPs / 816 TFLOP/s, bytes / 4.2 TB/s) (DEVICE.md's measured H200 ceilings).

use clap::Args;

use super::{median_ms, random_tensor};
use crate::moe::{
    moe_backward_into, moe_forward, ExpertKind, Mode, MoeConfig, MoeWeights, RouterKind,
};
use crate::runtime::{DType, Device, ParamSet, Tensor};

#[derive(Args)]
pub struct MoeLayerArgs {
    #[arg(long, default_value = "auto")]
    device: String,
    /// Shapes as d:ffn:experts:topk:tokens, comma separated (default: the five).
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Write the routed experts' weight gradients instead of adding into them (a step's
    /// first micro-batch; the peer's `--set-to-none`). Default: accumulate, as the peer's
    /// autograd does into existing `.grad`s.
    #[arg(long)]
    write_grads: bool,
    /// The routed experts' weight-gradient buffers: f32 (the trainer's) or bf16 (the layer's
    /// dtype, as the peer's autograd keeps `.grad` for bf16 parameters); the router's stay f32.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    grad_dtype: String,
}

const DEFAULT: &[&str] = &[
    "4096:14336:8:2:8192",
    "2048:768:128:8:8192",
    "2048:1024:64:8:8192",
    "2048:8192:128:1:8192",
    "2048:768:128:8:16",
];
pub const PEAK_TFLOPS: f64 = 816.0;
pub const PEAK_TBS: f64 = 4.2;

pub fn run(a: MoeLayerArgs) -> anyhow::Result<()> {
    let device = Device::parse(&a.device)?;
    let dtype = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let shapes: Vec<String> = if a.shapes.is_empty() {
        DEFAULT.iter().map(|s| s.to_string()).collect()
    } else {
        a.shapes.clone()
    };
    println!(
        "{:<28} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}",
        "shape d:F:E:k:T", "fwd ms", "f+b ms", "fwd TF/s", "f+b TF/s", "floor ms", "f+b/floor"
    );
    for s in shapes {
        let v: Vec<usize> = s
            .split(':')
            .map(|x| x.parse())
            .collect::<Result<_, _>>()
            .map_err(|_| anyhow::anyhow!("shape '{s}': expected d:ffn:experts:topk:tokens"))?;
        anyhow::ensure!(
            v.len() == 5,
            "shape '{s}': expected d:ffn:experts:topk:tokens"
        );
        let (d, f, e, k, t) = (v[0], v[1], v[2], v[3], v[4]);
        let cfg = MoeConfig {
            d_model: d,
            n_experts: e,
            top_k: k,
            ffn_dim: f,
            expert: ExpertKind::SwiGlu,
            expert_bias: false,
            router: RouterKind::Softmax { renormalize: true },
            shared: None,
            residual: None,
            aux_loss_coeff: 0.01,
            z_loss_coeff: 0.0,
        };
        cfg.validate().map_err(anyhow::Error::msg)?;
        // Shapes from a tiny init, then device-filled random values (host RNG for billions of
        // weights would dominate the run).
        let tiny = MoeConfig {
            d_model: 8,
            ffn_dim: 8,
            ..cfg.clone()
        };
        let mut w = MoeWeights::init(&tiny, 0.02, 0.02, 1, dtype, Device::Cpu)?.zeros_as(dtype)?;
        w.router = Tensor::zeros(&[e, d], dtype, device)?;
        w.w1 = Tensor::zeros(&[e, 2 * f, d], dtype, device)?;
        w.w2 = Tensor::zeros(&[e, d, f], dtype, device)?;
        let mut seed = 10;
        w.visit_mut("", &mut |_, p| {
            seed += 1;
            *p = random_tensor(p.shape(), 0.02, seed, dtype, device).expect("random weights");
        });
        let x = random_tensor(&[t, d], 1.0, 3, dtype, device)?;
        let dy = random_tensor(&[t, d], 1.0, 4, dtype, device)?;
        let mut g = w.zeros_like()?;
        if a.grad_dtype == "bf16" {
            g.w1 = Tensor::zeros(w.w1.shape(), dtype, device)?;
            g.w2 = Tensor::zeros(w.w2.shape(), dtype, device)?;
        }
        let fwd = median_ms(device, 2, a.reps, || {
            moe_forward(&cfg, &w, &x, Mode::Train { seed: 0 }).map(drop)
        })?;
        let mut fwd_bwd = || {
            let (_, saved, _) = moe_forward(&cfg, &w, &x, Mode::Train { seed: 0 })?;
            moe_backward_into(
                &cfg,
                &w,
                &x,
                saved.as_ref().expect("train mode saves"),
                &dy,
                1.0,
                &mut g,
                a.write_grads,
                None,
            )
            .map(drop)
        };
        let fb = median_ms(device, 2, a.reps, &mut fwd_bwd)?;
        let profile = if crate::runtime::cuda::profile::enabled() {
            // MOE_PROFILE=1: per kernel over 3 more fwd+bwd runs (synchronised per launch).
            crate::runtime::cuda::profile::reset();
            for _ in 0..3 {
                fwd_bwd()?;
            }
            crate::runtime::cuda::profile::report()
        } else {
            None
        };
        let h1 = 2 * f;
        let flops = 2.0 * (t * k * d * (h1 + f)) as f64 + 2.0 * (t * d * e) as f64;
        // Experts that receive tokens: all of them unless T·k < E.
        let active = e.min(t * k);
        let bytes = (active * (h1 + f) * d * 2) as f64;
        let floor_fb =
            (3.0 * flops / (PEAK_TFLOPS * 1e12)).max(3.0 * bytes / (PEAK_TBS * 1e12)) * 1e3;
        println!(
            "{:<28} {:>9.3} {:>9.3} {:>10.1} {:>10.1} {:>9.3} {:>9.2}",
            s,
            fwd,
            fb,
            flops / (fwd * 1e-3) / 1e12,
            3.0 * flops / (fb * 1e-3) / 1e12,
            floor_fb,
            fb / floor_fb
        );
        if let Some(report) = profile {
            println!("profile of {s} (MOE_PROFILE=1, 3 fwd+bwd, synchronised):\n{report}");
        }
    }
    Ok(())
}
