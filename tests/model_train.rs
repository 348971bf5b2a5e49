//! Training forward/backward of the whole model on the CPU: loss and every parameter gradient
//! after one backward against transformers (scripts/oracle/hf_models.py, train_qwen3_moe; f32,
//! 1e-4 relative), and finite-difference gradient checks over every layer kind.

mod common;

use common::{fixture_dir, load_safetensors, rel_err, shifted};
use moe::model::{Model, NativeMoe, NativeSpec, QkNorm, TrainOpts};
use moe::moe::{MoeConfig, RouterKind};
use moe::runtime::{DType, Device, ParamSet, Tensor};

#[test]
fn one_step_matches_transformers() {
    let dir = fixture_dir("hf").join("train_qwen3_moe");
    let m = Model::load_hf(&dir, Device::Cpu, None).unwrap();
    let r = load_safetensors(&dir.join("train_reference.safetensors"));
    let tok = r["tokens"].to_vec::<i32>().unwrap();
    let (b, s) = (r["tokens"].dim(0), r["tokens"].dim(1));
    let (tg, n) = shifted(&tok, b, s);
    let tokens = Tensor::from_vec(tok, &[b, s]).unwrap();
    let targets = Tensor::from_vec(tg, &[b, s]).unwrap();
    for recompute in [false, true] {
        let (out, saved) = m
            .forward_train(
                &tokens,
                &targets,
                n,
                &TrainOpts {
                    recompute,
                    ..Default::default()
                },
            )
            .unwrap();
        let loss = out.loss.scalar_f32().unwrap();
        let want = r["loss0"].scalar_f32().unwrap();
        assert!(((loss - want) / want).abs() < 1e-5, "loss {loss} vs {want}");
        let mut g = m.params.zeros_like(DType::F32).unwrap();
        m.backward(saved, &mut g).unwrap();
        let named = m.hf_named(&g).unwrap();
        assert!(named.len() > 20);
        for (name, got) in &named {
            let want = r
                .get(&format!("grad.{name}"))
                .unwrap_or_else(|| panic!("oracle lacks grad.{name}"));
            let e = rel_err(
                &got.to_vec::<f32>().unwrap(),
                &want.to_vec::<f32>().unwrap(),
            );
            assert!(
                e < 1e-4,
                "grad {name} (recompute {recompute}): relative error {e:.2e}"
            );
        }
    }
}

fn tiny(qk: QkNorm, tied: bool, moe: Option<NativeMoe>, bias: bool) -> Model {
    let spec = NativeSpec {
        vocab_size: 40,
        d_model: 16,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        head_dim: Some(8),
        max_seq_len: 16,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: tied,
        qkv_bias: bias,
        qk_norm: qk,
        ffn_dim: 24,
        moe,
        init_std: 0.3,
    };
    let mut cfg = spec.resolve().unwrap();
    cfg.layers[1].sliding_window = Some(3);
    let mut m = Model::init(cfg, 7, Device::Cpu, DType::F32).unwrap();
    // Non-trivial norms and biases so their gradients are exercised.
    let mut k = 0u64;
    m.params.visit_mut("", &mut |n, p| {
        k += 1;
        if n.contains("norm") || n.contains("bias") {
            *p = Tensor::randn(p.shape(), 0.2, k, DType::F32, Device::Cpu).unwrap();
            if n.contains("norm") {
                for v in p.as_mut_slice::<f32>().unwrap() {
                    *v += 1.0;
                }
            }
        }
    });
    m
}

fn loss_of(m: &Model, tokens: &Tensor, targets: &Tensor, n: usize) -> f64 {
    let (out, _) = m
        .forward_train(tokens, targets, n, &TrainOpts::default())
        .unwrap();
    (out.loss.scalar_f32().unwrap()
        + out.aux_loss.scalar_f32().unwrap()
        + out.z_loss.scalar_f32().unwrap()) as f64
}

/// Central differences (eps 1e-2 in f32: rounding noise ~1e-5 absolute on a loss of ~4,
/// truncation error O(eps²)) on sampled elements of every parameter; 2e-2 relative over each
/// tensor's samples. MoE routing changes inside the
/// step would be a discontinuity: such samples are skipped.
fn check_fd(m: &mut Model, what: &str) {
    let (b, s) = (2, 7);
    let tok: Vec<i32> = (0..b * s).map(|i| ((i * 13 + 5) % 40) as i32).collect();
    let (tg, n) = shifted(&tok, b, s);
    let tokens = Tensor::from_vec(tok, &[b, s]).unwrap();
    let targets = Tensor::from_vec(tg, &[b, s]).unwrap();
    let (_, saved) = m
        .forward_train(&tokens, &targets, n, &TrainOpts::default())
        .unwrap();
    let mut g = m.params.zeros_like(DType::F32).unwrap();
    m.backward(saved, &mut g).unwrap();
    let mut grads: Vec<(String, Vec<f32>)> = vec![];
    g.visit("", &mut |nm, t| {
        grads.push((nm.to_string(), t.to_vec().unwrap()))
    });
    let eps = 1e-2f32;
    for (name, gv) in &grads {
        let (mut num, mut ana) = (vec![], vec![]);
        for smp in 0..6usize {
            let i = (smp * 7919 + 3) % gv.len();
            let bump = |m: &mut Model, d: f32| {
                m.params.visit_mut("", &mut |nm, p| {
                    if nm == name {
                        p.as_mut_slice::<f32>().unwrap()[i] += d;
                    }
                })
            };
            bump(m, eps);
            let lp = loss_of(m, &tokens, &targets, n);
            bump(m, -2.0 * eps);
            let lm = loss_of(m, &tokens, &targets, n);
            bump(m, eps);
            num.push(((lp - lm) / (2.0 * eps as f64)) as f32);
            ana.push(gv[i]);
        }
        let e = rel_err(&ana, &num);
        assert!(
            e < 2e-2,
            "{what}: d/d {name}: relative error {e:.2e}\nanalytic {ana:?}\nnumeric  {num:?}"
        );
    }
}

#[test]
fn gradients_match_finite_differences_dense() {
    check_fd(
        &mut tiny(QkNorm::PerHead, false, None, true),
        "dense, per-head qk norm, biases, untied",
    );
    check_fd(
        &mut tiny(QkNorm::Full, true, None, false),
        "dense, full qk norm, tied",
    );
}

/// One 4-expert top-2 MoE layer after a dense one, with aux and z losses.
fn small_moe(expert_bias: bool) -> NativeMoe {
    NativeMoe {
        every: 1,
        first_dense: 1,
        experts: vec![4],
        layer: MoeConfig {
            d_model: 0,
            n_experts: 0,
            top_k: 2,
            ffn_dim: 12,
            expert: Default::default(),
            expert_bias,
            router: RouterKind::Softmax { renormalize: true },
            shared: None,
            residual: None,
            aux_loss_coeff: 0.01,
            z_loss_coeff: 0.001,
        },
    }
}

#[test]
fn gradients_match_finite_differences_moe() {
    let moe = small_moe(false);
    check_fd(
        &mut tiny(QkNorm::None, true, Some(moe), false),
        "moe layer, aux + z losses",
    );
}

/// The first backward of a step into `grad_buffers` (expert weight gradients written, their
/// buffers never zeroed) gives exactly the gradients of `backward` into zeros, and a second
/// micro-batch accumulates onto them as before. Uninitialised tensors are poisoned (NaN), so
/// a read of the unwritten buffers would show.
#[test]
fn first_backward_overwrites_expert_gradients() {
    moe::runtime::set_poison_outputs(true);
    let moe = small_moe(true);
    let m = tiny(QkNorm::None, true, Some(moe), false);
    let (b, s) = (2, 7);
    let tok: Vec<i32> = (0..b * s).map(|i| ((i * 13 + 5) % 40) as i32).collect();
    let (tg, n) = shifted(&tok, b, s);
    let tokens = Tensor::from_vec(tok, &[b, s]).unwrap();
    let targets = Tensor::from_vec(tg, &[b, s]).unwrap();
    let run = |first: bool, micro: usize| {
        let mut g = if first {
            m.params.grad_buffers(DType::F32).unwrap()
        } else {
            m.params.zeros_like(DType::F32).unwrap()
        };
        for i in 0..micro {
            let (_, saved) = m
                .forward_train(&tokens, &targets, n, &TrainOpts::default())
                .unwrap();
            if first && i == 0 {
                m.backward_first(saved, &mut g).unwrap();
            } else {
                m.backward(saved, &mut g).unwrap();
            }
        }
        let mut v: Vec<(String, Vec<f32>)> = vec![];
        g.visit("", &mut |nm, t| {
            v.push((nm.to_string(), t.to_vec().unwrap()))
        });
        v
    };
    for micro in [1, 2] {
        let (a, z) = (run(true, micro), run(false, micro));
        assert!(
            a.iter().any(|(n, _)| n.contains("w1")),
            "an MoE layer is present"
        );
        for ((na, ga), (_, gz)) in a.iter().zip(&z) {
            assert!(
                ga.iter().all(|x| x.is_finite()),
                "{na}: unwritten gradient read"
            );
            assert_eq!(ga, gz, "{na} with {micro} micro-batches");
        }
    }
}
