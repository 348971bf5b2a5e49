//! The MoE layer on CUDA against its CPU twin: forward (y, aux, z, counts, drops) and backward
//! (dx and every weight gradient) for every router kind, and the served paths by each plan the
//! kernel settings reach, in f32 (1e-4: grouped GEMM and reductions sum in another order,
//! through several layers of ops) and bf16 (3e-2: bf16 activations between the GEMMs, compared
//! with the f32 CPU run on the same bf16-rounded weights), every element checked (`close`).
//! Skips without a GPU; MOE_REQUIRE_GPU=1 makes a missing GPU fail.

mod common;

use common::{fixture_dir, gpu, load_safetensors};
use moe::moe::{
    moe_backward, moe_forward, moe_serve, moe_serve_block, Mode, MoeConfig, MoeServePlan,
    MoeWeights, ServeInput,
};
use moe::runtime::ops;
use moe::runtime::{DType, Device, KernelSettings, ParamSet, Tensor};

const CASES: &[&str] = &[
    "softmax_renorm",
    "softmax_no_renorm",
    "sigmoid_group",
    "switch_top2_capacity",
    "switch_top1_capacity",
    "shared_gated",
    "gelu_bias",
    "residual",
];

fn load(name: &str, dtype: DType, dev: Device) -> (MoeConfig, MoeWeights, Tensor, Tensor) {
    let dir = fixture_dir("moe_layer");
    let cfg: MoeConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let t = load_safetensors(&dir.join(format!("{name}.safetensors")));
    let mut w = MoeWeights::init(&cfg, 0.1, 0.1, 0, dtype, dev).unwrap();
    w.visit_mut("", &mut |n, p| {
        *p = ops::cast(&t[&format!("w.{n}")], dtype)
            .unwrap()
            .into_device(dev)
            .unwrap()
    });
    if let Some(b) = t.get("w.router_bias") {
        w.router_bias = Some(b.to_device(dev).unwrap());
    }
    let cvt = |x: &Tensor| ops::cast(x, dtype).unwrap().into_device(dev).unwrap();
    (cfg, w, cvt(&t["x"]), cvt(&t["dy"]))
}

/// Every element: |gpu − cpu| <= tol · (|cpu| + rms(cpu)). Relative to the element, with the
/// tensor's RMS as a floor: an element near zero by cancellation carries the rounding of its
/// summands, which are of the tensor's scale. NaN/Inf (an unwritten output) fails.
#[track_caller]
fn close(what: &str, gpu: &Tensor, cpu: &Tensor, tol: f64) {
    assert_eq!(gpu.shape(), cpu.shape(), "{what}");
    let (g, c) = (gpu.to_f32_vec().unwrap(), cpu.to_f32_vec().unwrap());
    let rms = (c.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / c.len().max(1) as f64).sqrt();
    for (i, (gv, cv)) in g.iter().zip(&c).enumerate() {
        let (gv, cv) = (*gv as f64, *cv as f64);
        let bound = tol * (cv.abs() + rms);
        assert!(
            (gv - cv).abs() <= bound,
            "{what}: element {i} of {:?}: GPU {gv:e} vs CPU {cv:e} (bound {bound:.2e}, rms {rms:.2e})",
            gpu.shape()
        );
    }
}

fn run(name: &str, dtype: DType, dev: Device, tol: f64) {
    // CPU reference on the same (dtype-rounded) values, computed in f32.
    let (cfg, wc, xc, dyc) = load(name, dtype, Device::Cpu);
    let to32 = |t: &Tensor| ops::cast(t, DType::F32).unwrap();
    let mut wc32 = MoeWeights::init(&cfg, 0.1, 0.1, 0, DType::F32, Device::Cpu).unwrap();
    let mut src = vec![];
    wc.visit("", &mut |_, p| src.push(to32(p)));
    let mut it = src.into_iter();
    wc32.visit_mut("", &mut |_, p| *p = it.next().unwrap());
    wc32.router_bias = wc.router_bias.as_ref().map(|b| b.try_clone().unwrap());
    let (yc, sc, stc) = moe_forward(&cfg, &wc32, &to32(&xc), Mode::Train { seed: 5 }).unwrap();
    let mut gc = wc32.zeros_like().unwrap();
    let dxc = moe_backward(
        &cfg,
        &wc32,
        &to32(&xc),
        sc.as_ref().unwrap(),
        &to32(&dyc),
        1.0,
        &mut gc,
    )
    .unwrap();

    let (_, wg, xg, dyg) = load(name, dtype, dev);
    let (yg, sg, stg) = moe_forward(&cfg, &wg, &xg, Mode::Train { seed: 5 }).unwrap();
    let mut gg = wg.zeros_like().unwrap();
    let dxg = moe_backward(&cfg, &wg, &xg, sg.as_ref().unwrap(), &dyg, 1.0, &mut gg).unwrap();
    assert_eq!(
        stg.tokens_per_expert.to_vec::<i32>().unwrap(),
        stc.tokens_per_expert.to_vec::<i32>().unwrap(),
        "{name} {dtype}: routing"
    );
    close(
        &format!("{name} {dtype} dropped"),
        &stg.dropped,
        &stc.dropped,
        0.0,
    );
    close(&format!("{name} {dtype} y"), &yg, &yc, tol);
    close(
        &format!("{name} {dtype} aux"),
        &stg.aux_loss,
        &stc.aux_loss,
        tol,
    );
    close(&format!("{name} {dtype} z"), &stg.z_loss, &stc.z_loss, tol);
    close(&format!("{name} {dtype} dx"), &dxg, &dxc, tol);
    // Inference (CUDA: combine weights from the route kernel, no aux statistics), on all
    // tokens and on a decode-sized slice of them (one-kernel dispatch).
    for rows in [xc.dim(0), 3] {
        let xi = ops::slice_rows(&xc, 0, rows).unwrap();
        let (yic, _, _) = moe_forward(&cfg, &wc32, &to32(&xi), Mode::Infer).unwrap();
        let (yig, _, _) = moe_forward(
            &cfg,
            &wg,
            &ops::slice_rows(&xg, 0, rows).unwrap(),
            Mode::Infer,
        )
        .unwrap();
        close(
            &format!("{name} {dtype} inference y ({rows} tokens)"),
            &yig,
            &yic,
            tol,
        );
    }
    // Serving (no statistics; 1 or 2 tokens take the slot-wise experts where the config allows:
    // f32 here, F = 12 is no multiple of bf16's 8-element rows) against the CPU's inference.
    for rows in [1, 2, 3] {
        let xi = ops::slice_rows(&xc, 0, rows).unwrap();
        let (yic, _, _) = moe_forward(&cfg, &wc32, &to32(&xi), Mode::Infer).unwrap();
        let s = KernelSettings::current();
        let plan = MoeServePlan::new(&cfg, &wg, rows, ServeInput::Normed, &s).unwrap();
        let yig = moe_serve(&cfg, &wg, &plan, &ops::slice_rows(&xg, 0, rows).unwrap()).unwrap();
        close(
            &format!(
                "{name} {dtype} served y ({rows} tokens, {:?})",
                plan.labels()
            ),
            &yig,
            &yic,
            tol,
        );
    }
    let mut cpu_grads = vec![];
    gc.visit("", &mut |n, t| {
        cpu_grads.push((n.to_string(), t.try_clone().unwrap()))
    });
    let mut i = 0;
    gg.visit("", &mut |n, t| {
        assert_eq!(n, cpu_grads[i].0);
        close(&format!("{name} {dtype} grad {n}"), t, &cpu_grads[i].1, tol);
        i += 1;
    });
}

#[test]
fn moe_layer_f32_matches_cpu() {
    let Some(dev) = gpu() else { return };
    for name in CASES {
        run(name, DType::F32, dev, 1e-4);
    }
}

#[test]
fn moe_layer_bf16_matches_cpu() {
    let Some(dev) = gpu() else { return };
    for name in CASES {
        run(name, DType::BF16, dev, 3e-2);
    }
}

/// Noisy gates and random token selection are pure functions of the seed: the same seed gives
/// the same routing on both devices.
#[test]
fn noisy_switch_routing_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let (mut cfg, _, _, _) = load("switch_top2_capacity", DType::F32, Device::Cpu);
    cfg.router = moe::moe::RouterKind::Switch {
        capacity_factor: 0.75,
        min_capacity: 1,
        drop_tokens: true,
        use_rts: true,
        noisy_gate_policy: moe::moe::NoisyGate::Rsample,
        second_expert_noise: true,
    };
    let w = MoeWeights::init(&cfg, 0.5, 0.5, 9, DType::F32, Device::Cpu).unwrap();
    let x = Tensor::randn(&[64, cfg.d_model], 1.0, 3, DType::F32, Device::Cpu).unwrap();
    let (yc, _, sc) = moe_forward(&cfg, &w, &x, Mode::Train { seed: 77 }).unwrap();
    let mut wg = MoeWeights::init(&cfg, 0.5, 0.5, 9, DType::F32, dev).unwrap();
    let mut src = vec![];
    w.visit("", &mut |_, p| src.push(p.to_device(dev).unwrap()));
    let mut it = src.into_iter();
    wg.visit_mut("", &mut |_, p| *p = it.next().unwrap());
    let (yg, _, sg) = moe_forward(
        &cfg,
        &wg,
        &x.to_device(dev).unwrap(),
        Mode::Train { seed: 77 },
    )
    .unwrap();
    assert_eq!(
        sg.tokens_per_expert.to_vec::<i32>().unwrap(),
        sc.tokens_per_expert.to_vec::<i32>().unwrap()
    );
    close("noisy switch dropped", &sg.dropped, &sc.dropped, 0.0);
    close("noisy switch y", &yg, &yc, 1e-4);
}

/// Served decode steps in bf16 at shapes whose rows take the slot-wise expert kernels (F and d
/// multiples of 8; 2·k·T <= E for T = 1, 2), with a shared expert, against the CPU's
/// dispatch path in f32 on the same rounded weights.
#[test]
fn served_decode_matches_cpu() {
    let Some(dev) = gpu() else { return };
    for name in [
        "softmax_renorm",
        "softmax_no_renorm",
        "shared_gated",
        "sigmoid_group",
    ] {
        let (mut cfg, _, _, _) = load(name, DType::F32, Device::Cpu);
        cfg.d_model = 64;
        cfg.ffn_dim = 40;
        cfg.n_experts = 16;
        if let Some(sh) = cfg.shared.as_mut() {
            sh.ffn_dim = 24;
        }
        let w32 = MoeWeights::init(&cfg, 0.3, 0.3, 11, DType::F32, Device::Cpu).unwrap();
        let mut wc = MoeWeights::init(&cfg, 0.3, 0.3, 11, DType::F32, Device::Cpu).unwrap();
        let mut wg = MoeWeights::init(&cfg, 0.3, 0.3, 11, DType::BF16, dev).unwrap();
        let (mut cs, mut gs) = (vec![], vec![]);
        w32.visit("", &mut |_, p| {
            let b = ops::cast(p, DType::BF16).unwrap();
            cs.push(ops::cast(&b, DType::F32).unwrap());
            gs.push(b.to_device(dev).unwrap());
        });
        let (mut ci, mut gi) = (cs.into_iter(), gs.into_iter());
        wc.visit_mut("", &mut |_, p| *p = ci.next().unwrap());
        wg.visit_mut("", &mut |_, p| *p = gi.next().unwrap());
        wc.router_bias = w32.router_bias.as_ref().map(|b| b.try_clone().unwrap());
        wg.router_bias = w32.router_bias.as_ref().map(|b| b.to_device(dev).unwrap());
        let base = KernelSettings::current();
        let variants = [
            ("default", base.clone()),
            (
                "no one-launch router",
                KernelSettings {
                    fused_router: false,
                    ..base.clone()
                },
            ),
            (
                "no slots",
                KernelSettings {
                    serve_slots: false,
                    ..base.clone()
                },
            ),
        ];
        for rows in [1, 2] {
            let x = Tensor::randn(&[rows, 64], 1.0, rows as u64, DType::F32, Device::Cpu).unwrap();
            let xb = ops::cast(&x, DType::BF16).unwrap();
            let (yc, _, _) =
                moe_forward(&cfg, &wc, &ops::cast(&xb, DType::F32).unwrap(), Mode::Infer).unwrap();
            for (how, s) in &variants {
                let plan = MoeServePlan::new(&cfg, &wg, rows, ServeInput::Normed, s).unwrap();
                let want = match (*how, name) {
                    ("no slots", _) => "dispatch, grouped GEMM",
                    _ => "slots",
                };
                assert_eq!(plan.labels().1, want, "{name} {how} ({rows} tokens)");
                let yg = moe_serve(&cfg, &wg, &plan, &xb.to_device(dev).unwrap()).unwrap();
                close(
                    &format!(
                        "{name} served bf16 y ({rows} tokens, {how}: {:?})",
                        plan.labels()
                    ),
                    &yg,
                    &yc,
                    3e-2,
                );
            }
        }
        // The decode block's folded entries: from the residual x and the attention output a (or
        // its context before the o projection wo), the new residual and the MoE output of
        // RMSNorm(x + a)·g, against the same steps on the CPU.
        let rb = |shape: &[usize], seed: u64| {
            let t = Tensor::randn(shape, 1.0, seed, DType::F32, Device::Cpu).unwrap();
            let b = ops::cast(&t, DType::BF16).unwrap();
            (
                ops::cast(&b, DType::F32).unwrap(),
                b.to_device(dev).unwrap(),
            )
        };
        let eps = 1e-6;
        let (gc, gg) = rb(&[64], 40);
        let (woc, wog) = rb(&[64, 64], 41);
        for rows in [1, 2] {
            let (xc, xg) = rb(&[rows, 64], 50 + rows as u64);
            let (ac, ag) = rb(&[rows, 64], 60 + rows as u64);
            for oproj in [false, true] {
                let input = if oproj {
                    ServeInput::OProj {
                        wo: &wog,
                        norm: &gg,
                    }
                } else {
                    ServeInput::AddNorm
                };
                let plan = MoeServePlan::new(&cfg, &wg, rows, input, &base).unwrap();
                let (mut sc, mut sg) = (xc.try_clone().unwrap(), xg.try_clone().unwrap());
                let add = if plan.takes_context() {
                    ops::linear(&ac, &woc, None).unwrap()
                } else {
                    ac.try_clone().unwrap()
                };
                let h = ops::add_rmsnorm(&mut sc, &add, &gc, eps).unwrap();
                let (yc, _, _) = moe_forward(&cfg, &wc, &h, Mode::Infer).unwrap();
                let yg = moe_serve_block(&cfg, &wg, &plan, &mut sg, &ag, &wog, &gg, eps).unwrap();
                let what = format!("{name} served block ({rows} tokens, {:?})", plan.labels());
                close(&format!("{what} residual"), &sg, &sc, 3e-2);
                close(&format!("{what} y"), &yg, &yc, 3e-2);
            }
        }
    }
}

/// Decode-sized dropless dispatch (one fused kernel on CUDA) against the CPU plan: counts,
/// offsets, the stable permutation and both maps, exactly; skewed routing included.
#[test]
fn small_dispatch_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let cfg: MoeConfig = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("moe_layer").join("softmax_renorm.json")).unwrap(),
    )
    .unwrap();
    let mut seed = 0x9e37_79b9u64;
    let mut next = |hi: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % hi) as i32
    };
    for (e, k, t) in [
        (64usize, 8usize, 1usize),
        (128, 8, 32),
        (8, 2, 7),
        (256, 8, 128),
        (64, 8, 200),
    ] {
        let mut c = cfg.clone();
        c.n_experts = e;
        c.top_k = k;
        for skew in [false, true] {
            let ids: Vec<i32> = (0..k * t)
                .map(|_| if skew { next(3) } else { next(e as u64) })
                .collect();
            let ic = Tensor::from_vec(ids.clone(), &[k, t]).unwrap();
            let ig = Tensor::from_slice(&ids, &[k, t], dev).unwrap();
            let (a, b) = (
                moe::moe::dispatch(&c, &ic, None).unwrap(),
                moe::moe::dispatch(&c, &ig, None).unwrap(),
            );
            let what = format!("E={e} k={k} T={t} skew={skew}");
            for (name, x, y) in [
                ("counts", &a.counts, &b.counts),
                ("kept", &a.kept, &b.kept),
                ("offsets", &a.offsets, &b.offsets),
                ("perm", &a.perm, &b.perm),
                ("pos", &a.pos, &b.pos),
                ("tok", &a.tok, &b.tok),
            ] {
                assert_eq!(
                    x.to_vec::<i32>().unwrap(),
                    y.to_vec::<i32>().unwrap(),
                    "{what}: {name}"
                );
            }
        }
    }
}

/// Weighted combine and its backward (the scatter of dy into expert order, and the weight
/// gradient) against the CPU, for row widths that take the 8-wide kernels (24) and the scalar
/// ones (12), with dropped slots (capacity) included.
#[test]
fn combine_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut cfg: MoeConfig = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("moe_layer").join("switch_top1_capacity.json"))
            .unwrap(),
    )
    .unwrap();
    cfg.n_experts = 8;
    cfg.top_k = 2;
    let (k, t) = (2usize, 50usize);
    let ids: Vec<i32> = (0..k * t).map(|i| ((i * 7 + i / 3) % 8) as i32).collect();
    let ic = Tensor::from_vec(ids.clone(), &[k, t]).unwrap();
    let ig = Tensor::from_slice(&ids, &[k, t], dev).unwrap();
    let (dc, dg) = (
        moe::moe::dispatch(&cfg, &ic, None).unwrap(),
        moe::moe::dispatch(&cfg, &ig, None).unwrap(),
    );
    for d in [12usize, 24] {
        for dt in [DType::F32, DType::BF16] {
            let what = format!("d={d} {dt}");
            let yc = ops::cast(
                &Tensor::randn(&[k * t, d], 1.0, 5, DType::F32, Device::Cpu).unwrap(),
                dt,
            )
            .unwrap();
            let dyc = ops::cast(
                &Tensor::randn(&[t, d], 1.0, 6, DType::F32, Device::Cpu).unwrap(),
                dt,
            )
            .unwrap();
            let wc = Tensor::randn(&[k, t], 1.0, 7, DType::F32, Device::Cpu).unwrap();
            let (yg, dyg, wg) = (
                yc.to_device(dev).unwrap(),
                dyc.to_device(dev).unwrap(),
                wc.to_device(dev).unwrap(),
            );
            let tol = if dt == DType::F32 { 1e-6 } else { 1e-2 };
            close(
                &format!("combine {what}"),
                &moe::moe::combine(&yg, &dg.pos, Some(&wg)).unwrap(),
                &moe::moe::combine(&yc, &dc.pos, Some(&wc)).unwrap(),
                tol,
            );
            let (pg, wgg) = moe::moe::combine_backward(&dyg, &yg, &dg, &wg).unwrap();
            let (pc, wgc) = moe::moe::combine_backward(&dyc, &yc, &dc, &wc).unwrap();
            close(&format!("combine_backward dy_perm {what}"), &pg, &pc, tol);
            close(&format!("combine_backward dw {what}"), &wgg, &wgc, tol);
        }
    }
}
