//! The MoE layer on the CPU against the PyTorch oracle (scripts/oracle/moe_layer.py, float64
//! autograd): outputs, aux/z losses and every gradient, for each router kind; finite-difference
//! gradient checks; and the defined behaviour on bad input.
//!
//! Tolerance: 1e-5 relative L2 — our f32 computation against a float64 reference on the same
//! f32 inputs (observed errors are ~1e-7).

mod common;

use common::{assert_close, fixture_dir, load_safetensors};
use moe::moe::{
    moe_backward, moe_forward, moe_forward_named, route, update_router_bias, Mode, MoeConfig,
    MoeWeights, RouterKind,
};
use moe::runtime::ops;
use moe::runtime::{DType, Device, ParamSet, Tensor};

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

fn load_case(
    name: &str,
) -> (
    MoeConfig,
    MoeWeights,
    std::collections::BTreeMap<String, Tensor>,
) {
    let dir = fixture_dir("moe_layer");
    let cfg: MoeConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let t = load_safetensors(&dir.join(format!("{name}.safetensors")));
    let mut w = MoeWeights::init(&cfg, 0.1, 0.1, 0, DType::F32, Device::Cpu).unwrap();
    w.visit_mut("", &mut |n, p| {
        let src = t
            .get(&format!("w.{n}"))
            .unwrap_or_else(|| panic!("{name}: fixture lacks w.{n}"));
        *p = src.try_clone().unwrap();
    });
    if let Some(b) = t.get("w.router_bias") {
        w.router_bias = Some(b.try_clone().unwrap());
    }
    (cfg, w, t)
}

#[test]
fn matches_pytorch_reference() {
    for &name in CASES {
        let (cfg, w, t) = load_case(name);
        let x = &t["x"];
        let (y, saved, stats) = moe_forward(&cfg, &w, x, Mode::Train { seed: 0 }).unwrap();
        assert_close(&format!("{name} y"), &y, &t["y"], 1e-5);
        assert_close(&format!("{name} aux"), &stats.aux_loss, &t["aux"], 1e-5);
        assert_close(&format!("{name} z"), &stats.z_loss, &t["z"], 1e-5);
        let mut g = w.zeros_like().unwrap();
        let dx = moe_backward(&cfg, &w, x, saved.as_ref().unwrap(), &t["dy"], 1.0, &mut g).unwrap();
        assert_close(&format!("{name} grad x"), &dx, &t["grad.x"], 1e-5);
        g.visit("", &mut |n, got| {
            let want = t
                .get(&format!("grad.{n}"))
                .unwrap_or_else(|| panic!("{name}: fixture lacks grad.{n}"));
            assert_close(&format!("{name} grad {n}"), got, want, 1e-5);
        });
    }
}

#[test]
fn inference_mode_matches_training_forward() {
    for &name in CASES {
        let (cfg, w, t) = load_case(name);
        let (y, saved, _) = moe_forward(&cfg, &w, &t["x"], Mode::Infer).unwrap();
        assert!(saved.is_none());
        assert_close(&format!("{name} infer y"), &y, &t["y"], 1e-5);
    }
}

/// The served router in one op (`ops::router_topk`: on the GPU the router GEMV's last block
/// routes; this is its CPU twin) against the route kernel's twin: the same experts in the same
/// slot order and the same combine weights, with and without renormalisation; bad input named.
#[test]
fn fused_router_matches_route() {
    for name in ["softmax_renorm", "softmax_no_renorm"] {
        let (cfg, w, t) = load_case(name);
        let RouterKind::Softmax { renormalize } = cfg.router else {
            panic!("{name}: not a softmax router");
        };
        let rule = ops::SoftmaxTopK {
            k: cfg.top_k,
            normalize: renormalize,
            add: 0.0,
            clamp_min: 0.0,
            scale: 1.0,
        };
        let (logits, ids, wts) = ops::router_topk(&t["x"], &w.router, &rule)
            .unwrap()
            .expect("the CPU always computes router_topk");
        let want = route(&cfg, &logits, None, None).unwrap();
        assert_eq!(
            ids.as_slice::<i32>().unwrap(),
            want.ids.as_slice::<i32>().unwrap(),
            "{name}: expert ids"
        );
        let g = want.gates.as_slice::<f32>().unwrap();
        let (k, n) = (cfg.top_k, t["x"].dim(0));
        for ti in 0..n {
            let d: f32 = if renormalize {
                (0..k).map(|j| g[j * n + ti]).sum()
            } else {
                1.0
            };
            for j in 0..k {
                let (a, b) = (
                    wts.as_slice::<f32>().unwrap()[j * n + ti],
                    g[j * n + ti] / d,
                );
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{name} weight ({j}, {ti}): {a} vs {b}"
                );
            }
        }
    }
    let (cfg, w, t) = load_case("softmax_renorm");
    let e = cfg.n_experts;
    let rule = |k| ops::SoftmaxTopK {
        k,
        normalize: true,
        add: 0.0,
        clamp_min: 0.0,
        scale: 1.0,
    };
    let err = ops::router_topk(&t["x"], &w.router, &rule(e + 1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("top-{} of {e} experts", e + 1)),
        "{err}"
    );
    let bad = Tensor::zeros(&[e, cfg.d_model - 1], DType::F32, Device::Cpu).unwrap();
    let err = ops::router_topk(&t["x"], &bad, &rule(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("router [E, K]"), "{err}");
}

/// The router folded through the RMSNorm and o projection (`ops::router_fold`, used by a served
/// decode step on the GPU: `ops::o_router_topk` + `ops::moe_serve_swiglu_norm`, CPU twins
/// here) computes what the unfolded block does: o projection, residual add + RMSNorm, router
/// top-k and the served experts — the same experts, the same output and new residual, for
/// softmax routers with and without renormalisation, a routed scaling factor, several rows.
#[test]
fn folded_router_matches_unfolded() {
    use rand::{Rng, SeedableRng};
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for (t, d, c, e, f, k, normalize, scale) in [
        (
            1usize, 64usize, 48usize, 16usize, 24usize, 4usize, false, 1.0f32,
        ),
        (3, 32, 64, 9, 16, 2, true, 1.0),
        (2, 48, 32, 33, 8, 8, true, 2.5),
    ] {
        let mut rand = |shape: &[usize], s: f32| {
            let v: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| r.random_range(-1.0f32..1.0) * s)
                .collect();
            Tensor::from_f32(&v, shape, DType::F32, Device::Cpu).unwrap()
        };
        let x = rand(&[t, d], 1.0);
        let ctx = rand(&[t, c], 1.0);
        let wo = rand(&[d, c], 1.0 / (c as f32).sqrt());
        let g = rand(&[d], 1.0);
        let w = rand(&[e, d], 1.0);
        let w1 = rand(&[e, 2 * f, d], 1.0 / (d as f32).sqrt());
        let w2 = rand(&[e, d, f], 1.0 / (f as f32).sqrt());
        let rule = ops::SoftmaxTopK {
            k,
            normalize,
            add: 0.0,
            clamp_min: 0.0,
            scale,
        };
        let what = format!("t={t} d={d} c={c} e={e} k={k} normalize={normalize}");
        // Unfolded: o, x + o normed, the router on the normed rows, the experts.
        let o = ops::linear(&ctx, &wo, None).unwrap();
        let mut xn = x.try_clone().unwrap();
        let h = ops::add_rmsnorm(&mut xn, &o, &g, 1e-6).unwrap();
        let (_, ids, wts) = ops::router_topk(&h, &w, &rule).unwrap().unwrap();
        let y = ops::moe_serve_swiglu(&h, &w1, &w2, &ids, &wts).unwrap();
        // Folded.
        let wf = ops::router_fold(&w, &g, &wo).unwrap();
        assert_eq!(wf.shape(), &[e, d + c], "{what}: fold shape");
        let (xn2, z, ids2) = ops::o_router_topk(&ctx, &wo, &x, &wf, k).unwrap().unwrap();
        assert_close(&format!("{what} new residual"), &xn2, &xn, 1e-6);
        assert_eq!(
            ids2.as_slice::<i32>().unwrap(),
            ids.as_slice::<i32>().unwrap(),
            "{what}: expert ids"
        );
        assert_eq!(z.shape(), &[t, e]);
        let y2 = ops::moe_serve_swiglu_norm(&xn2, &g, 1e-6, &z, &ids2, &rule, &w1, &w2).unwrap();
        assert_close(&format!("{what} y"), &y2, &y, 1e-5);
    }
    // Bad shapes are named.
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, Device::Cpu).unwrap();
    let err = ops::router_fold(&z(&[4, 8]), &z(&[7]), &z(&[8, 6]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("norm [D]"), "{err}");
    let err = ops::o_router_topk(&z(&[1, 6]), &z(&[8, 6]), &z(&[1, 8]), &z(&[4, 13]), 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("folded router [E, D + C]"), "{err}");
    let err = ops::o_router_topk(&z(&[1, 6]), &z(&[8, 6]), &z(&[1, 8]), &z(&[4, 14]), 5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("top-5 of 4 experts"), "{err}");
}

/// L = Σ y·dy + aux + z, as the oracle defines it.
fn loss(cfg: &MoeConfig, w: &MoeWeights, x: &Tensor, dy: &Tensor) -> (f64, Vec<i32>) {
    let (y, _, s) = moe_forward(cfg, w, x, Mode::Train { seed: 0 }).unwrap();
    let yv = y.to_vec::<f32>().unwrap();
    let dv = dy.to_vec::<f32>().unwrap();
    let l: f64 = yv
        .iter()
        .zip(&dv)
        .map(|(a, b)| (*a as f64) * (*b as f64))
        .sum::<f64>()
        + s.aux_loss.scalar_f32().unwrap() as f64
        + s.z_loss.scalar_f32().unwrap() as f64;
    let mut routing = s.tokens_per_expert.to_vec::<i32>().unwrap();
    routing.extend(s.dropped.to_vec::<f32>().unwrap().iter().map(|&v| v as i32));
    (l, routing)
}

/// Central differences on sampled elements of x and of every weight (f32; eps 1e-2 keeps
/// rounding noise ~1e-5 relative). Samples whose perturbation changes the routing (a
/// discontinuity) are skipped. Tolerance 1e-2 relative over the samples of each tensor.
#[test]
fn gradients_match_finite_differences() {
    for &name in CASES {
        let (cfg, mut w, t) = load_case(name);
        let x = t["x"].try_clone().unwrap();
        check_finite_differences(name, &cfg, &mut w, &x, &t["dy"]);
    }
}

/// `moe_backward` against central differences of `loss` (see `gradients_match_finite_differences`);
/// returns the analytic gradients by name ("x" first).
fn check_finite_differences(
    name: &str,
    cfg: &MoeConfig,
    w: &mut MoeWeights,
    x: &Tensor,
    dy: &Tensor,
) -> Vec<(String, Vec<f32>)> {
    let (_, saved, _) = moe_forward(cfg, w, x, Mode::Train { seed: 0 }).unwrap();
    let mut g = w.zeros_like().unwrap();
    let dx = moe_backward(cfg, w, x, saved.as_ref().unwrap(), dy, 1.0, &mut g).unwrap();
    let mut analytic: Vec<(String, Vec<f32>)> = vec![("x".into(), dx.to_vec().unwrap())];
    g.visit("", &mut |n, gt| {
        analytic.push((n.to_string(), gt.to_vec().unwrap()))
    });
    let eps = 1e-2f32;
    let mut checked = 0;
    for (pname, grad) in &analytic {
        let n = grad.len();
        let (mut num, mut ana) = (vec![], vec![]);
        for s in 0..12usize {
            let i = (s * 7919 + 13) % n;
            let perturb = |w: &mut MoeWeights, x: &mut Tensor, delta: f32| {
                let apply = |p: &mut Tensor| p.as_mut_slice::<f32>().unwrap()[i] += delta;
                if pname == "x" {
                    apply(x);
                } else {
                    w.visit_mut("", &mut |nm, p| {
                        if nm == pname {
                            apply(p);
                        }
                    });
                }
            };
            let mut xx = x.try_clone().unwrap();
            perturb(w, &mut xx, eps);
            let (lp, rp) = loss(cfg, w, &xx, dy);
            perturb(w, &mut xx, -2.0 * eps);
            let (lm, rm) = loss(cfg, w, &xx, dy);
            perturb(w, &mut xx, eps);
            if rp != rm {
                continue;
            }
            num.push(((lp - lm) / (2.0 * eps as f64)) as f32);
            ana.push(grad[i]);
        }
        if num.len() < 4 {
            continue;
        }
        let e = common::rel_err(&ana, &num);
        assert!(e < 1e-2, "{name}: d/d{pname} analytic vs finite differences: relative error {e:.3e}\n{ana:?}\n{num:?}");
        checked += 1;
    }
    assert!(
        checked * 4 >= analytic.len() * 3,
        "{name}: only {checked} of {} tensors had routing-stable samples",
        analytic.len()
    );
    analytic
}

#[test]
fn capacity_drops_are_counted() {
    let (cfg, w, t) = load_case("switch_top2_capacity");
    let (_, _, s) = moe_forward(&cfg, &w, &t["x"], Mode::Infer).unwrap();
    let routed: i32 = s.tokens_per_expert.to_vec::<i32>().unwrap().iter().sum();
    let dropped: f32 = s.dropped.to_vec::<f32>().unwrap().iter().sum();
    assert_eq!(routed, 2 * 24);
    let cap = cfg.capacity(24).unwrap() as f32;
    let kept: f32 = s
        .tokens_per_expert
        .to_vec::<i32>()
        .unwrap()
        .iter()
        .map(|&c| (c as f32).min(cap))
        .sum();
    assert_eq!(
        dropped,
        routed as f32 - kept,
        "drops = routed beyond capacity"
    );
    assert!(dropped > 0.0, "this fixture is built to drop tokens");
}

#[test]
fn bad_configs_are_clear_errors() {
    let (cfg, _, _) = load_case("softmax_renorm");
    let mut c = cfg.clone();
    c.top_k = 9;
    assert!(
        c.validate().unwrap_err().contains("moe.top_k = 9"),
        "{:?}",
        c.validate()
    );
    let (cfg, _, _) = load_case("sigmoid_group");
    let mut c = cfg.clone();
    if let moe::moe::RouterKind::Sigmoid { n_group, .. } = &mut c.router {
        *n_group = 3;
    }
    let e = c.validate().unwrap_err();
    assert!(
        e.contains("router.n_group = 3") && e.contains("must divide n_experts = 8"),
        "{e}"
    );
    assert!(MoeWeights::init(&c, 0.1, 0.1, 0, DType::F32, Device::Cpu).is_err());
}

#[test]
fn nan_router_logits_name_the_layer() {
    let (cfg, w, t) = load_case("softmax_renorm");
    let mut x = t["x"].try_clone().unwrap();
    x.as_mut_slice::<f32>().unwrap()[5] = f32::NAN;
    let err = moe_forward_named(&cfg, &w, &x, Mode::Infer, "model.layers.3.mlp", true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.layers.3.mlp") && err.contains("NaN"),
        "{err}"
    );
}

#[test]
fn empty_batch_gives_empty_output() {
    let (cfg, w, _) = load_case("switch_top2_capacity");
    let x = Tensor::zeros(&[0, cfg.d_model], DType::F32, Device::Cpu).unwrap();
    let (y, saved, s) = moe_forward(&cfg, &w, &x, Mode::Train { seed: 1 }).unwrap();
    assert_eq!(y.shape(), &[0, cfg.d_model]);
    assert_eq!(
        s.tokens_per_expert
            .to_vec::<i32>()
            .unwrap()
            .iter()
            .sum::<i32>(),
        0
    );
    let mut g = w.zeros_like().unwrap();
    let dx = moe_backward(&cfg, &w, &x, saved.as_ref().unwrap(), &y, 1.0, &mut g).unwrap();
    assert_eq!(dx.shape(), &[0, cfg.d_model]);
}

#[test]
fn all_tokens_to_one_expert() {
    let (cfg, mut w, t) = load_case("softmax_renorm");
    let x = ops::activation(&t["x"], ops::Activation::Sigmoid).unwrap(); // all positive
    let mut r = vec![0f32; cfg.n_experts * cfg.d_model];
    r[..cfg.d_model].iter_mut().for_each(|v| *v = 10.0);
    w.router = Tensor::from_vec(r, &[cfg.n_experts, cfg.d_model]).unwrap();
    let (y, saved, s) = moe_forward(&cfg, &w, &x, Mode::Train { seed: 0 }).unwrap();
    assert_eq!(
        s.tokens_per_expert.to_vec::<i32>().unwrap()[0],
        x.dim(0) as i32
    );
    assert!(y.to_f32_vec().unwrap().iter().all(|v| v.is_finite()));
    drop(saved);
    // The backward of the degenerate routing against finite differences; the experts no slot
    // reaches (every token's top 2 are experts 0 and 1: the others' logits tie at 0) get
    // exactly zero weight gradients.
    let grads = check_finite_differences("one expert", &cfg, &mut w, &x, &t["dy"]);
    let slot_experts = cfg.top_k;
    for (n, g) in &grads {
        if n == "w1" || n == "w2" {
            let per = g.len() / cfg.n_experts;
            assert!(g[..slot_experts * per].iter().any(|&v| v != 0.0), "{n}");
            assert!(
                g[slot_experts * per..].iter().all(|&v| v == 0.0),
                "{n}: an expert no token reaches has a gradient"
            );
        }
    }
}

#[test]
fn router_bias_moves_toward_balance() {
    let (cfg, mut w, t) = load_case("sigmoid_group");
    let (_, _, s) = moe_forward(&cfg, &w, &t["x"], Mode::Infer).unwrap();
    let before = w.router_bias.as_ref().unwrap().to_vec::<f32>().unwrap();
    update_router_bias(&cfg, w.router_bias.as_mut().unwrap(), &s.tokens_per_expert).unwrap();
    let after = w.router_bias.as_ref().unwrap().to_vec::<f32>().unwrap();
    let load = s.tokens_per_expert.to_vec::<i32>().unwrap();
    let mean = load.iter().sum::<i32>() as f32 / load.len() as f32;
    for e in 0..load.len() {
        let d = after[e] - before[e];
        assert!(
            (load[e] as f32) < mean && d > 0.0
                || (load[e] as f32) > mean && d < 0.0
                || (load[e] as f32) == mean && d == 0.0
        );
    }
}
