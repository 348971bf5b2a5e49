//! A worker for the expert-parallel MoE layer's multi-process tests (tests/ep_layer.rs): joins the
//! world from the torchrun-style environment on the CPU backend, splits it into DP × EP
//! (`--ep`), runs one MoE layer's forward and backward on its token shard with its experts, reduces
//! the gradients, and checks everything against the single-process layer computed here from the
//! same seeded weights and every rank's tokens. `moe-ep-worker <softmax|sigmoid|switch> --ep N`.
//! Prints `rank R: ok <router>` or `rank R: error: ...` (exit 1).

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use moe::dist::{BackendKind, DistEnv, Group, ReduceOp};
use moe::moe::{
    ep_backward, ep_forward, keep_local_experts, moe_backward, moe_forward, reduce_gradients,
    ExpertKind, Mode, MoeConfig, MoeWeights, ParallelGroups, RouterKind, SharedExperts,
};
use moe::runtime::ops::Activation;
use moe::runtime::{DType, Device, ParamSet, Tensor};

#[derive(Parser)]
struct Args {
    /// softmax | sigmoid | switch
    router: String,
    /// Expert-parallel size (divides the world size).
    #[arg(long)]
    ep: usize,
    #[arg(long, default_value_t = 20)]
    timeout_s: u64,
}

/// Tokens per rank.
const T: usize = 8;
const SEED: u64 = 11;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    let args = Args::parse();
    let rank = DistEnv::from_env().map_or(usize::MAX, |e| e.rank);
    let code = match run(&args) {
        Ok(()) => {
            println!("rank {rank}: ok {}", args.router);
            0
        }
        Err(e) => {
            eprintln!("rank {rank}: error: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// The layer under test: 8 experts, top-2, d = 16. Softmax has gated shared experts (replicated
/// parameters beside the router); switch has MLP experts with biases, capacity 1 per expert from
/// the local batch of 8 tokens (so slots drop) and non-zero aux and z losses.
fn config(router: &str) -> Res<MoeConfig> {
    let base = MoeConfig {
        d_model: 16,
        n_experts: 8,
        top_k: 2,
        ffn_dim: 12,
        expert: ExpertKind::SwiGlu,
        expert_bias: false,
        router: RouterKind::Softmax { renormalize: true },
        shared: None,
        residual: None,
        aux_loss_coeff: 0.0,
        z_loss_coeff: 0.0,
    };
    Ok(match router {
        "softmax" => MoeConfig {
            shared: Some(SharedExperts {
                ffn_dim: 8,
                count: 1,
                gated: true,
            }),
            ..base
        },
        "sigmoid" => MoeConfig {
            router: RouterKind::Sigmoid {
                n_group: 4,
                topk_group: 2,
                renormalize: true,
                routed_scaling_factor: 2.5,
                bias_update_rate: 0.0,
            },
            ..base
        },
        "switch" => MoeConfig {
            expert: ExpertKind::Mlp(Activation::Gelu),
            expert_bias: true,
            router: RouterKind::Switch {
                capacity_factor: 0.5,
                min_capacity: 1,
                drop_tokens: true,
                use_rts: true,
                noisy_gate_policy: Default::default(),
                second_expert_noise: true,
            },
            aux_loss_coeff: 0.01,
            z_loss_coeff: 0.001,
            ..base
        },
        _ => return Err(format!("unknown router '{router}' (softmax | sigmoid | switch)").into()),
    })
}

fn weights(cfg: &MoeConfig) -> Res<MoeWeights> {
    let mut w = MoeWeights::init(cfg, 0.3, 0.2, SEED, DType::F32, Device::Cpu)?;
    if w.router_bias.is_some() {
        let b: Vec<f32> = (0..cfg.n_experts).map(|e| 0.05 * e as f32 - 0.2).collect();
        w.router_bias = Some(Tensor::from_vec(b, &[cfg.n_experts])?);
    }
    // Non-zero expert biases, so their gradients and the bias-add on received rows matter.
    for (i, b) in [w.b1.as_mut(), w.b2.as_mut()]
        .into_iter()
        .flatten()
        .enumerate()
    {
        *b = Tensor::randn(b.shape(), 0.1, SEED + 1 + i as u64, DType::F32, Device::Cpu)?;
    }
    Ok(w)
}

/// All ranks' tokens (or output gradients) [world·T, d], rank r's rows r·T..(r+1)·T.
fn all_rows(world: usize, d: usize, salt: u64) -> Res<Tensor> {
    Ok(Tensor::randn(
        &[world * T, d],
        1.0,
        salt,
        DType::F32,
        Device::Cpu,
    )?)
}

fn rows(t: &Tensor, start: usize, len: usize) -> Res<Vec<f32>> {
    let d = t.dim(1);
    Ok(t.to_f32_vec()?[start * d..(start + len) * d].to_vec())
}

fn named(g: &MoeWeights) -> Res<BTreeMap<String, Vec<f32>>> {
    let mut out = BTreeMap::new();
    let mut err = None;
    g.visit("", &mut |name, t| match t.to_f32_vec() {
        Ok(v) => {
            out.insert(name.to_string(), v);
        }
        Err(e) => err = Some(e),
    });
    match err {
        Some(e) => Err(e.into()),
        None => Ok(out),
    }
}

/// Equal up to f32 summation order: |got − want| <= 1e-4 · max|want| + 1e-6 for every element
/// (see tests/ep_layer.rs for why the order is the only difference).
fn close(what: &str, got: &[f32], want: &[f32]) -> Res<()> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()).into());
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = 1e-4 * scale + 1e-6;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if (g - w).abs() > tol || !g.is_finite() {
            return Err(format!("{what}[{i}] = {g}, expected {w} (tolerance {tol:e})").into());
        }
    }
    Ok(())
}

fn run(args: &Args) -> Res<()> {
    let world = Group::init(
        &DistEnv::from_env()?,
        BackendKind::Cpu,
        Duration::from_secs(args.timeout_s),
    )?;
    let n = world.size();
    let me = world.rank();
    let groups = ParallelGroups::new(world, args.ep)?;
    let cfg = config(&args.router)?;
    let d = cfg.d_model;
    let x_all = all_rows(n, d, 101)?;
    let dy_all = all_rows(n, d, 202)?;
    let mode = Mode::Train { seed: 5 };

    // This rank: its tokens, its experts.
    let x = Tensor::from_vec(rows(&x_all, me * T, T)?, &[T, d])?;
    let dy = Tensor::from_vec(rows(&dy_all, me * T, T)?, &[T, d])?;
    let mut w = weights(&cfg)?;
    keep_local_experts(&mut w, groups.ep.rank(), groups.ep.size())?;
    let mut grads = w.zeros_like()?;
    let (y, saved, stats) = ep_forward(&cfg, &w, &x, mode, "ep", &groups.ep)?;
    let saved = saved.ok_or("training forward saved nothing")?;
    let dx = ep_backward(&cfg, &w, &x, &saved, &dy, 1.0, &mut grads, &groups.ep)?;
    reduce_gradients(&mut grads, &groups, ReduceOp::Sum)?;

    // The single-process layer. Dropless routers: one run on every rank's tokens. Capacity
    // (switch): capacity and the aux/z losses are of each rank's local batch, so the reference is
    // the single-process layer run on each shard, gradients summed over shards.
    let full = weights(&cfg)?;
    let mut ref_grads = full.zeros_like()?;
    let (ref_y, ref_dx) = if cfg.capacity(T).is_some() {
        let dropped: f32 = stats.dropped.to_f32_vec()?.iter().sum();
        if dropped == 0.0 {
            return Err(
                "capacity routing dropped no slot on this rank; the test needs drops".into(),
            );
        }
        let (mut ys, mut dxs) = (Vec::new(), Vec::new());
        for r in 0..n {
            let xs = Tensor::from_vec(rows(&x_all, r * T, T)?, &[T, d])?;
            let dys = Tensor::from_vec(rows(&dy_all, r * T, T)?, &[T, d])?;
            let (ys_r, s, _) = moe_forward(&cfg, &full, &xs, mode)?;
            let s = s.ok_or("reference saved nothing")?;
            let dx_r = moe_backward(&cfg, &full, &xs, &s, &dys, 1.0, &mut ref_grads)?;
            ys.push(ys_r);
            dxs.push(dx_r);
        }
        (ys.swap_remove(me), dxs.swap_remove(me))
    } else {
        let (y_all, s, _) = moe_forward(&cfg, &full, &x_all, mode)?;
        let s = s.ok_or("reference saved nothing")?;
        let dx_all = moe_backward(&cfg, &full, &x_all, &s, &dy_all, 1.0, &mut ref_grads)?;
        (
            Tensor::from_vec(rows(&y_all, me * T, T)?, &[T, d])?,
            Tensor::from_vec(rows(&dx_all, me * T, T)?, &[T, d])?,
        )
    };
    close("y", &y.to_f32_vec()?, &ref_y.to_f32_vec()?)?;
    close("dx", &dx.to_f32_vec()?, &ref_dx.to_f32_vec()?)?;
    keep_local_experts(&mut ref_grads, groups.ep.rank(), groups.ep.size())?;
    let (got, want) = (named(&grads)?, named(&ref_grads)?);
    if got.keys().collect::<Vec<_>>() != want.keys().collect::<Vec<_>>() {
        return Err(format!(
            "gradient names {:?}, expected {:?}",
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        )
        .into());
    }
    for (name, g) in &got {
        close(&format!("grad {name}"), g, &want[name])?;
    }
    Ok(())
}
