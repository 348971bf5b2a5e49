//! HF checkpoints on the CPU against transformers (scripts/oracle/hf_models.py): logits of every
//! prompt position within 1e-4 relative (f32 both sides; summation order differs), greedy
//! continuations identical, alone and batched; and the errors for broken checkpoints.

mod common;

use common::{fixture_dir, load_safetensors, rel_err};
use moe::model::{Model, ModelError};
use moe::runtime::Device;

const CASES: &[&str] = &[
    "llama_gqa_llama3rope",
    "qwen2_bias_tied",
    "qwen3_qknorm_linear_rope",
    "mixtral",
    "qwen2_moe_shared",
    "qwen3_moe_renorm",
    "olmoe",
    "olmoe_clip",
];

struct Reference {
    prompts: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
}

fn reference(case: &str) -> Reference {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("hf").join(case).join("reference.json")).unwrap(),
    )
    .unwrap();
    let ids = |k: &str| -> Vec<Vec<u32>> { serde_json::from_value(v[k].clone()).unwrap() };
    Reference {
        prompts: ids("prompts"),
        greedy: ids("greedy"),
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy continuation of every prompt, all sequences in one batch (prefill each, then decode
/// them together).
fn greedy(m: &Model, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let v = m.config.vocab_size;
    let mut cache = m.new_kv_cache(prompts.len(), 32).unwrap();
    let logits = m
        .forward_infer(prompts, &mut cache, false)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let mut next: Vec<u32> = (0..prompts.len())
        .map(|i| argmax(&logits[i * v..(i + 1) * v]))
        .collect();
    let mut out: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
    for _ in 1..n {
        let step: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        let logits = m
            .forward_infer(&step, &mut cache, false)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        next = (0..prompts.len())
            .map(|i| argmax(&logits[i * v..(i + 1) * v]))
            .collect();
        for (o, &t) in out.iter_mut().zip(&next) {
            o.push(t);
        }
    }
    out
}

#[test]
fn logits_match_transformers() {
    for case in CASES {
        let dir = fixture_dir("hf").join(case);
        let m = Model::load_hf(&dir, Device::Cpu, None).unwrap_or_else(|e| panic!("{case}: {e}"));
        let r = reference(case);
        let want = load_safetensors(&dir.join("reference.safetensors"));
        for (i, p) in r.prompts.iter().enumerate() {
            let mut cache = m.new_kv_cache(1, 32).unwrap();
            let got = m
                .forward_infer(std::slice::from_ref(p), &mut cache, true)
                .unwrap();
            let e = rel_err(
                &got.to_vec::<f32>().unwrap(),
                &want[&format!("logits.{i}")].to_vec::<f32>().unwrap(),
            );
            assert!(e < 1e-4, "{case} prompt {i}: logits relative error {e:.2e}");
        }
    }
}

/// All prompts prefilled together, in passes of a few rows (pieces of one prompt in different
/// passes attend over the cache): every position's logits still match transformers.
#[test]
fn batched_chunked_prefill_matches_transformers() {
    for case in CASES {
        let dir = fixture_dir("hf").join(case);
        let m = Model::load_hf(&dir, Device::Cpu, None).unwrap();
        let r = reference(case);
        let want = load_safetensors(&dir.join("reference.safetensors"));
        for budget in [3, 5, 1000] {
            let mut cache = m.new_kv_cache(r.prompts.len(), 32).unwrap();
            cache.prefill_tokens = budget;
            let got = m
                .forward_infer(&r.prompts, &mut cache, true)
                .unwrap()
                .to_vec::<f32>()
                .unwrap();
            let v = m.config.vocab_size;
            let mut at = 0;
            for (i, p) in r.prompts.iter().enumerate() {
                let w = want[&format!("logits.{i}")].to_vec::<f32>().unwrap();
                let e = rel_err(&got[at * v..(at + p.len()) * v], &w);
                assert!(
                    e < 1e-4,
                    "{case} prompt {i}, {budget}-row passes: logits relative error {e:.2e}"
                );
                at += p.len();
            }
            assert_eq!(at * v, got.len());
            let lens: Vec<usize> = r.prompts.iter().map(|p| p.len()).collect();
            assert_eq!(cache.lens, lens);
        }
    }
}

#[test]
fn greedy_tokens_match_transformers() {
    for case in CASES {
        let dir = fixture_dir("hf").join(case);
        let m = Model::load_hf(&dir, Device::Cpu, None).unwrap();
        let r = reference(case);
        for (i, p) in r.prompts.iter().enumerate() {
            assert_eq!(
                greedy(&m, std::slice::from_ref(p), r.greedy[i].len())[0],
                r.greedy[i],
                "{case} prompt {i} alone"
            );
        }
        assert_eq!(
            greedy(&m, &r.prompts, r.greedy[0].len()),
            r.greedy,
            "{case} batched"
        );
    }
}

fn copy_fixture(case: &str) -> tempfile::TempDir {
    let src = fixture_dir("hf").join(case);
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

#[test]
fn broken_checkpoints_are_named() {
    // Truncated safetensors file.
    let t = copy_fixture("mixtral");
    let p = t.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = Model::load_hf(t.path(), Device::Cpu, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // Missing weights file.
    let t = copy_fixture("mixtral");
    std::fs::remove_file(t.path().join("model.safetensors")).unwrap();
    let e = Model::load_hf(t.path(), Device::Cpu, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no model.safetensors"), "{e}");
    // A tensor of the wrong shape (config says more experts than stored).
    let t = copy_fixture("mixtral");
    let cp = t.path().join("config.json");
    let cfg = std::fs::read_to_string(&cp)
        .unwrap()
        .replace("\"num_local_experts\": 4", "\"num_local_experts\": 5");
    std::fs::write(&cp, cfg).unwrap();
    let e = Model::load_hf(t.path(), Device::Cpu, None).err().unwrap();
    assert!(
        matches!(&e, ModelError::Tensor { .. } | ModelError::Missing { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("block_sparse_moe"), "{e}");
    // Unknown architecture lists the supported ones.
    let t = copy_fixture("mixtral");
    let cfg = std::fs::read_to_string(&cp_of(&t))
        .unwrap()
        .replace("MixtralForCausalLM", "GPT2LMHeadModel");
    std::fs::write(cp_of(&t), cfg).unwrap();
    let e = Model::load_hf(t.path(), Device::Cpu, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("GPT2LMHeadModel") && e.contains("Qwen3MoeForCausalLM"),
        "{e}"
    );
    // Missing config.json.
    let t = copy_fixture("mixtral");
    std::fs::remove_file(cp_of(&t)).unwrap();
    let e = Model::load_hf(t.path(), Device::Cpu, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
}

fn cp_of(t: &tempfile::TempDir) -> std::path::PathBuf {
    t.path().join("config.json")
}

#[test]
fn prompt_longer_than_context_is_an_error() {
    let m = Model::load_hf(&fixture_dir("hf").join("mixtral"), Device::Cpu, None).unwrap();
    let mut cache = m.new_kv_cache(1, 8).unwrap();
    let e = m
        .forward_infer(&[vec![1; 9]], &mut cache, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("exceed the context of 8"), "{e}");
    assert!(m.new_kv_cache(1, 100_000).is_err());
}

/// OLMoE's clip_qkv is honoured in inference (the `olmoe_clip` case above) and refused, with a
/// clear error, for training (the clamp has no backward here).
#[test]
fn clip_qkv_training_is_refused() {
    let m = Model::load_hf(&fixture_dir("hf").join("olmoe_clip"), Device::Cpu, None).unwrap();
    let tokens = moe::runtime::Tensor::from_vec(vec![1i32, 2, 3, 4], &[1, 4]).unwrap();
    let targets = moe::runtime::Tensor::from_vec(vec![2i32, 3, 4, -100], &[1, 4]).unwrap();
    let err = match m.forward_train(&tokens, &targets, 3, &moe::model::TrainOpts::default()) {
        Ok(_) => panic!("training with clip_qkv must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("clip_qkv"), "{err}");
}

/// A recycled cache comes back for the same batch and length bucket with its lengths emptied,
/// and decodes exactly as a fresh one (stale rows past the lengths are never read); a longer
/// request than the bucket, or another batch, gets a cache of its own shape.
#[test]
fn recycled_kv_caches_decode_as_fresh_ones() {
    let m = Model::load_hf(
        &fixture_dir("hf").join("qwen3_moe_renorm"),
        Device::Cpu,
        None,
    )
    .unwrap();
    let ctx = m.config.max_seq_len;
    let run = |c: &mut moe::model::KvCache, p: &[Vec<u32>]| -> Vec<f32> {
        let mut l = m.forward_infer(p, c, false).unwrap();
        for step in 0..3u32 {
            let feed: Vec<Vec<u32>> = p.iter().map(|_| vec![1 + step]).collect();
            l = m.forward_infer(&feed, c, false).unwrap();
        }
        l.to_f32_vec().unwrap()
    };
    let mut c = m.pooled_kv_cache(2, 9).unwrap();
    assert!(
        c.max_len >= 9 && c.max_len <= ctx,
        "{} positions",
        c.max_len
    );
    let bucket = c.max_len;
    let first = run(&mut c, &[vec![5, 6, 7, 8], vec![9, 10]]);
    m.recycle_kv_cache(c).unwrap();
    let mut again = m.pooled_kv_cache(2, 7).unwrap();
    assert_eq!((again.lens.clone(), again.max_len), (vec![0, 0], bucket));
    // Different prompts first (other rows written), then the first run's again.
    run(&mut again, &[vec![11, 12, 13, 14, 15, 16], vec![17]]);
    m.recycle_kv_cache(again).unwrap();
    let mut reused = m.pooled_kv_cache(2, 9).unwrap();
    assert_eq!(reused.lens, vec![0, 0]);
    assert_eq!(run(&mut reused, &[vec![5, 6, 7, 8], vec![9, 10]]), first);
    m.recycle_kv_cache(reused).unwrap();
    assert_eq!(m.pooled_kv_cache(3, 9).unwrap().lens, vec![0; 3]);
    if bucket < ctx {
        assert!(m.pooled_kv_cache(2, bucket + 1).unwrap().max_len > bucket);
    }
}
