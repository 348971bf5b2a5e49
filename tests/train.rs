//! Training loop tests on the CPU: ten AdamW steps against torch.optim.AdamW through
//! transformers (scripts/oracle/hf_models.py), bit-identical resume, non-finite policies, the
//! HF export read back, resume mismatches named, the default job learning on a short run, and
//! bf16 expert gradients tracking f32 ones.

mod common;

use std::path::Path;

use common::{fixture_dir, load_safetensors};
use moe::model::{Model, TrainOpts};
use moe::runtime::{DType, Device, ParamSet, Tensor};
use moe::train::config::{NanPolicy, TrainConfig};
use moe::train::optimizer::{AdamWOptimizer, OptimizerConfig};
use moe::train::schedule::Decay;
use moe::train::trainer::Trainer;

/// Ten steps of AdamW (lr 1e-2, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on every tensor, no
/// clipping) on one batch: the loss before each step matches transformers + torch.
#[test]
fn ten_adamw_steps_match_torch() {
    let dir = fixture_dir("hf").join("train_qwen3_moe");
    let mut m = Model::load_hf(&dir, Device::Cpu, None).unwrap();
    let r = load_safetensors(&dir.join("train_reference.safetensors"));
    let (b, s) = (r["tokens"].dim(0), r["tokens"].dim(1));
    let tok = r["tokens"].to_vec::<i32>().unwrap();
    let mut tg = vec![-100; b * s];
    for i in 0..b {
        for j in 0..s - 1 {
            tg[i * s + j] = tok[i * s + j + 1];
        }
    }
    let tokens = Tensor::from_vec(tok, &[b, s]).unwrap();
    let targets = Tensor::from_vec(tg, &[b, s]).unwrap();
    let cfg = OptimizerConfig {
        lr: 1e-2,
        min_lr: 1e-2,
        warmup_steps: 0,
        decay: Decay::Constant,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        no_decay: vec![],
        grad_clip: 0.0,
    };
    let mut names: Vec<(String, &Tensor)> = Vec::new();
    m.params
        .visit("", &mut |n, t| names.push((n.to_string(), t)));
    let refs: Vec<(&str, &Tensor)> = names.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let mut opt = AdamWOptimizer::new(cfg, &refs).unwrap();
    let want = r["losses"].to_vec::<f32>().unwrap();
    assert_eq!(want.len(), 10);
    let mut got = Vec::new();
    for _ in 0..10 {
        let (out, saved) = m
            .forward_train(&tokens, &targets, b * (s - 1), &TrainOpts::default())
            .unwrap();
        got.push(out.loss.scalar_f32().unwrap());
        let mut g = m.params.zeros_like(DType::F32).unwrap();
        m.backward(saved, &mut g).unwrap();
        let mut gn: Vec<(String, &Tensor)> = Vec::new();
        g.visit("", &mut |n, t| gn.push((n.to_string(), t)));
        let grefs: Vec<(&str, &Tensor)> = gn.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let mut pn: Vec<(String, &mut Tensor)> = Vec::new();
        m.params
            .visit_mut("", &mut |n, t| pn.push((n.to_string(), t)));
        let mut prefs: Vec<(&str, &mut Tensor)> =
            pn.iter_mut().map(|(n, t)| (n.as_str(), &mut **t)).collect();
        opt.step(&mut prefs, &grefs, 1e-2, 1.0).unwrap();
    }
    for (i, (a, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            ((a - w) / w).abs() < 2e-4,
            "loss before step {}: {a} vs torch {w} (all: {got:?} vs {want:?})",
            i + 1
        );
    }
    assert!(got[9] < got[0] * 0.9, "the ten steps must learn: {got:?}");
}

/// A small config: 2 layers, d 32, sigmoid-routed MoE with selection bias (state that resume
/// must restore) in layer 1, a dense first layer; synthetic data; grad accumulation 2.
fn small(steps: u64) -> TrainConfig {
    let mut c = TrainConfig::parse(&format!(
        r#"
[model]
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = 64
ffn_dim = 64
[model.moe]
every = 1
first_dense = 1
experts = [4]
top_k = 2
ffn_dim = 32
aux_loss_coeff = 0.0
z_loss_coeff = 0.001
[model.moe.router]
kind = "sigmoid"
n_group = 1
topk_group = 1
routed_scaling_factor = 1.0
bias_update_rate = 0.01
[train]
steps = {steps}
batch_size = 4
seq_len = 32
grad_accum = 2
device = "cpu"
log_every = 1000
eval_per_task = 0
[optimizer]
lr = 3e-3
warmup_steps = 2
[checkpoint]
every = 1000
keep = 10
export_hf = false
"#
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    c.train.seed = 7;
    c
}

fn all_params(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    t.model.params.visit("", &mut |n, x| {
        out.push((
            n.to_string(),
            x.to_f32_vec()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
        ))
    });
    t.model.params.visit_state(&mut |n, x| {
        out.push((
            n.to_string(),
            x.to_f32_vec()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
        ))
    });
    out
}

#[test]
fn resume_continues_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Trainer::new(small(6), &dir.path().join("a")).unwrap();
    a.verbose = false;
    let la: Vec<u32> = (0..6).map(|_| a.step().unwrap().loss.to_bits()).collect();

    let mut b = Trainer::new(small(6), &dir.path().join("b")).unwrap();
    b.verbose = false;
    let mut lb: Vec<u32> = (0..3).map(|_| b.step().unwrap().loss.to_bits()).collect();
    let ck = b.save().unwrap();
    drop(b);
    // The resumed run may change the log cadence (a resumable field), not the model.
    let mut cfg = small(6);
    cfg.train.log_every = 5;
    let mut c = Trainer::resume(cfg, &ck, &dir.path().join("b")).unwrap();
    c.verbose = false;
    assert_eq!(c.state.step, 3);
    lb.extend((0..3).map(|_| c.step().unwrap().loss.to_bits()));
    assert_eq!(la, lb, "losses of the resumed run differ");
    let (pa, pc) = (all_params(&a), all_params(&c));
    assert_eq!(pa.len(), pc.len());
    for ((na, va), (_, vc)) in pa.iter().zip(&pc) {
        assert!(va == vc, "parameter {na} differs after resume");
    }
    assert!(pa.iter().any(|(n, _)| n.ends_with("router_bias")));
    assert_eq!(a.state.expert_load, c.state.expert_load);
    assert_eq!(a.state.data_position, c.state.data_position);
}

#[test]
fn resume_names_config_differences_and_broken_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(small(4), dir.path()).unwrap();
    t.verbose = false;
    t.step().unwrap();
    let ck = t.save().unwrap();
    let mut other = small(4);
    other.model.d_model = 64;
    let e = Trainer::resume(other, &ck, dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.d_model") && e.contains("32") && e.contains("64"),
        "{e}"
    );
    let mut other = small(4);
    other.optimizer.lr = 1e-3;
    let e = Trainer::resume(other, &ck, dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("optimizer.lr"), "{e}");
    // Truncated weights: the file is named.
    let w = ck.join("model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&w).unwrap();
    f.set_len(len / 2).unwrap();
    let e = Trainer::resume(small(4), &ck, dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let e = Trainer::resume(small(4), &dir.path().join("nope"), dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

fn poison(t: &mut Trainer) {
    let n = t.model.params.embed.numel();
    let shape = t.model.params.embed.shape().to_vec();
    t.model.params.embed = Tensor::from_vec(vec![f32::NAN; n], &shape).unwrap();
}

#[test]
fn non_finite_steps_skip_or_stop_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small(4);
    cfg.train.on_nan = NanPolicy::Skip;
    let mut t = Trainer::new(cfg, &dir.path().join("skip")).unwrap();
    t.verbose = false;
    poison(&mut t);
    let r = t.step().unwrap();
    assert!(r.skipped && r.loss.is_nan());
    assert_eq!(
        (t.state.step, t.state.skipped_steps, t.state.optimizer_steps),
        (1, 1, 0)
    );

    let mut t = Trainer::new(small(4), &dir.path().join("stop")).unwrap();
    t.verbose = false;
    t.step().unwrap();
    poison(&mut t);
    let e = t.step().unwrap_err().to_string();
    assert!(
        e.contains("step 2") && e.contains("not finite") && e.contains("step-00000001"),
        "{e}"
    );
    assert!(dir
        .path()
        .join("stop/checkpoints/step-00000001/state.json")
        .exists());
}

/// The HF export loads back (Qwen3-MoE layout for this config) with the same logits.
#[test]
fn hf_export_loads_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small(2);
    // Qwen3-MoE's layout: softmax router, every layer MoE.
    cfg.model.moe.as_mut().unwrap().layer.router =
        moe::moe::RouterKind::Softmax { renormalize: true };
    cfg.model.moe.as_mut().unwrap().first_dense = 0;
    let mut t = Trainer::new(cfg, dir.path()).unwrap();
    t.verbose = false;
    t.step().unwrap();
    let out = dir.path().join("hf");
    t.export_hf(&out).unwrap();
    let back = Model::load_hf(&out, Device::Cpu, None).unwrap();
    let prompt: Vec<Vec<u32>> = vec!["rev:abc=".bytes().map(u32::from).collect()];
    let mut c1 = t.model.new_kv_cache(1, 16).unwrap();
    let mut c2 = back.new_kv_cache(1, 16).unwrap();
    let a = t
        .model
        .forward_infer(&prompt, &mut c1, true)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let b = back
        .forward_infer(&prompt, &mut c2, true)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    assert_eq!(a.len(), b.len());
    let err = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-5, "max |Δlogit| {err}");
    assert!(out.join("tokenizer.json").exists());
}

/// The default job, shortened (its model, data and optimizer; fewer steps): the loss on the
/// synthetic tasks falls from ln(256) ≈ 5.5 to below 2.2 in 120 steps (a model of the answer
/// bytes' frequencies alone sits near 3; the full 600-step job reaches ~0.4).
#[test]
fn default_job_learns_on_a_short_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TrainConfig::default();
    cfg.train.steps = 120;
    cfg.train.device = "cpu".into();
    cfg.train.eval_per_task = 4;
    cfg.checkpoint.export_hf = false;
    let mut t = Trainer::new(cfg, dir.path()).unwrap();
    t.verbose = false;
    let s = t.run().unwrap();
    assert_eq!(s.steps, 120);
    assert!(s.final_loss < 2.2, "final loss {}", s.final_loss);
    let first = moe::train::metrics::read(&dir.path().join("metrics.jsonl")).unwrap()[0].loss;
    assert!(
        first > 5.0,
        "the first step's loss {first} should be near ln(256)"
    );
    for f in [
        "metrics.jsonl",
        "loss.png",
        "experts.png",
        "samples.txt",
        "summary.json",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    assert!(Path::new(&s.checkpoint).join("model.safetensors").exists());
    assert_eq!(s.scores.len(), 5);
}

/// Two runs from the same seed give the same bits, even under different thread counts: no
/// reduction may depend on how rayon happens to split the work (this once made resume flaky).
#[test]
fn training_is_deterministic_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let run = |threads: usize, name: &str| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut t = Trainer::new(small(4), &dir.path().join(name)).unwrap();
            t.verbose = false;
            let losses: Vec<u32> = (0..4).map(|_| t.step().unwrap().loss.to_bits()).collect();
            (losses, all_params(&t))
        })
    };
    let (la, pa) = run(1, "one");
    let (lb, pb) = run(3, "three");
    assert_eq!(la, lb, "losses differ between 1 and 3 threads");
    for ((na, va), (_, vb)) in pa.iter().zip(&pb) {
        assert!(va == vb, "parameter {na} differs between 1 and 3 threads");
    }
}

/// `train.expert_grad_dtype = "bf16"` (bf16 parameters): the routed experts' gradient buffers
/// are bf16, every other one f32, and four steps (two micro-batches each: the first backward
/// writes the expert gradients, the second adds into them) track the f32-gradient run: losses
/// within bf16 rounding, and the routed experts' weights moved the same way (their distance
/// from the f32 run's a small part of how far that run moved them). With f32 parameters the
/// setting is refused, naming the field.
#[test]
fn bf16_expert_gradients_track_f32_ones() {
    let dir = tempfile::tempdir().unwrap();
    let experts_of = |t: &Trainer| -> Vec<f32> {
        let p = t.model.params.routed_expert_weights();
        p.iter().flat_map(|x| x.to_f32_vec().unwrap()).collect()
    };
    let mut runs = Vec::new();
    let mut init = Vec::new();
    for experts in [None, Some(DType::BF16)] {
        let mut cfg = small(4);
        cfg.train.dtype = Some(DType::BF16);
        cfg.train.expert_grad_dtype = experts;
        let mut t = Trainer::new(cfg, &dir.path().join(format!("{experts:?}"))).unwrap();
        t.verbose = false;
        init = experts_of(&t);
        if experts.is_some() {
            let g = t.model.params.grad_buffers(DType::BF16).unwrap();
            let routed = g.routed_expert_weights();
            assert!(!routed.is_empty());
            assert!(routed.iter().all(|x| x.dtype() == DType::BF16));
            let mut others = Vec::new();
            g.visit("", &mut |n, x| {
                if !routed.iter().any(|r| std::ptr::eq(*r, x)) {
                    others.push((n.to_string(), x.dtype()));
                }
            });
            assert!(others.iter().all(|(_, d)| *d == DType::F32), "{others:?}");
        }
        let l: Vec<f32> = (0..4).map(|_| t.step().unwrap().loss).collect();
        runs.push((l, experts_of(&t)));
    }
    let ((la, wa), (lb, wb)) = (&runs[0], &runs[1]);
    for (s, (a, b)) in la.iter().zip(lb).enumerate() {
        assert!(a.is_finite() && b.is_finite());
        assert!(
            ((a - b) / a).abs() < 1e-2,
            "step {s}: loss {b} with bf16 expert gradients vs {a} with f32 ({la:?} {lb:?})"
        );
    }
    let dist = |x: &[f32], y: &[f32]| -> f64 {
        x.iter()
            .zip(y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let (moved, apart) = (dist(wa, &init), dist(wa, wb));
    assert!(
        moved > 0.0 && apart < 0.1 * moved,
        "routed experts: the f32-gradient run moved them {moved:.3e}, the bf16 one ends {apart:.3e} from it"
    );
    let mut cfg = small(4);
    cfg.train.expert_grad_dtype = Some(DType::BF16);
    let e = Trainer::new(cfg, &dir.path().join("f32"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("train.expert_grad_dtype") && e.contains("bf16") && e.contains("f32"),
        "{e}"
    );
}

/// `train.trace_routing` writes each step's tokens per expert of every MoE layer, with a header
/// naming the model: every routed slot is counted once (dropless router: tokens × top-k).
#[test]
fn routing_trace_counts_every_routed_slot() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small(3);
    cfg.train.trace_routing = true;
    let mut t = Trainer::new(cfg, dir.path()).unwrap();
    t.verbose = false;
    t.run().unwrap();
    let trace = moe::placement::Trace::read(&dir.path().join("routing.jsonl"), None).unwrap();
    let h = &trace.header;
    assert_eq!((h.layers, h.experts, h.top_k), (1, 4, 2));
    assert_eq!(h.tokens_per_step, 4 * 32 * 2);
    let steps: Vec<u64> = trace.steps.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![1, 2, 3]);
    for (step, layers) in &trace.steps {
        assert_eq!(layers.len(), 1, "step {step}");
        let routed: u64 = layers[0].iter().sum();
        assert_eq!(routed, (h.tokens_per_step * h.top_k) as u64, "step {step}");
    }
    // Another model's trace is refused by name.
    let other = moe::placement::TraceHeader {
        experts: 8,
        ..h.clone()
    };
    let e = moe::placement::Trace::read(&dir.path().join("routing.jsonl"), Some(&other))
        .err()
        .expect("a trace of another model");
    assert!(e.to_string().contains("experts"), "{e}");
}
