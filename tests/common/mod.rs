//! Helpers shared by the integration tests: the GPU a test runs on, fixture loading and
//! tolerance checks.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use moe::runtime::{set_poison_outputs, DType, Device, Tensor};

/// The first CUDA GPU, with kernel outputs NaN-poisoned before each launch (an element a kernel
/// forgets to write then fails the comparison). Without one the test says that it skipped and
/// why, and returns None; with `MOE_REQUIRE_GPU=1` a missing GPU fails the test instead.
pub fn gpu() -> Option<Device> {
    match moe::runtime::cuda::device_count() {
        Ok(n) if n > 0 => {
            set_poison_outputs(true);
            Some(Device::Cuda(0))
        }
        r => {
            let why = match r {
                Ok(_) => "no CUDA GPU".to_string(),
                Err(e) => e,
            };
            if std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("MOE_REQUIRE_GPU=1 but {why}");
            }
            let test = std::thread::current().name().unwrap_or("test").to_string();
            eprintln!("{test}: skipped ({why})");
            None
        }
    }
}

/// `gpu()` for tests that must not overlap on the device (a CUDA-graph capture records
/// everything issued on the device's compute stream, so a concurrent test's work would join
/// and break it): the device and a guard held for the test's duration.
pub fn gpu_exclusive() -> Option<(Device, MutexGuard<'static, ()>)> {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    gpu().map(|d| (d, guard))
}

/// `tests/fixtures/<name>` of this checkout, or of the current directory when the test binary
/// runs from a copy of the repository elsewhere (the GPU machine).
pub fn fixture_dir(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let root = if built.exists() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    };
    root.join(name)
}

/// All tensors of a safetensors file, as CPU tensors.
pub fn load_safetensors(path: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::I32 => DType::I32,
            d => panic!("{name}: unsupported fixture dtype {d:?}"),
        };
        out.insert(
            name.to_string(),
            Tensor::from_bytes(view.data(), view.shape(), dtype).unwrap(),
        );
    }
    out
}

/// Relative L2 error ‖a − b‖ / max(‖b‖, 1e-6) over f32 values (the floor keeps a reference that
/// is zero up to rounding, e.g. an exactly cancelling gradient, from turning noise into 100%).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    num / den.max(1e-6)
}

#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (g, w) = (got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
    assert!(g.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let e = rel_err(&g, &w);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// targets[t] = tokens[t + 1] within each sequence, the last position ignored (HF's label
/// shift), and the number of supervised positions.
pub fn shifted(tokens: &[i32], b: usize, s: usize) -> (Vec<i32>, usize) {
    let mut t = vec![-100; b * s];
    for i in 0..b {
        for j in 0..s - 1 {
            t[i * s + j] = tokens[i * s + j + 1];
        }
    }
    (t, b * (s - 1))
}

/// Greedy ids for one prompt alone, one `forward_infer` per token (the reference that batched
/// generation and the server must reproduce).
pub fn greedy(model: &moe::model::Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_kv_cache(1, prompt.len() + n).unwrap();
    let mut feed = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let l = model
            .forward_infer(&[feed.clone()], &mut cache, false)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        let id = moe::infer::sampler::argmax(&l);
        out.push(id);
        feed = vec![id];
    }
    out
}

/// A tiny MoE (2 layers, 4 experts top-2, byte-level vocabulary) trained one step on the CPU and
/// exported in HF layout to `dir/hf` (its run in `dir/run`), with a context of `context`
/// positions: the model the CLI and server tests generate from.
pub fn tiny_hf_model(dir: &Path, context: usize) {
    let mut c = moe::train::config::TrainConfig::parse(&format!(
        r#"
[model]
vocab_size = 256
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = {context}
ffn_dim = 64
[model.moe]
experts = [4]
top_k = 2
ffn_dim = 32
[train]
steps = 1
batch_size = 2
seq_len = 32
device = "cpu"
"#
    ))
    .unwrap();
    c.train.seed = 5;
    let mut t = moe::train::trainer::Trainer::new(c, &dir.join("run")).unwrap();
    t.verbose = false;
    t.step().unwrap();
    t.export_hf(&dir.join("hf")).unwrap();
}

/// A TCP port on 127.0.0.1 that was free a moment ago (a rendezvous master's port in
/// multi-process tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
