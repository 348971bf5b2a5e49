//! `moe serve` on a tiny exported checkpoint (Qwen3-MoE layout, byte tokenizer), CPU only: the
//! engine in-process (continuous batching under a small token budget, slot reuse, a disconnected
//! client) against plain greedy decodes, then the binary on 127.0.0.1 driven by the real `openai`
//! Python client (tests/serve_openai.py) against `moe generate`'s outputs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{greedy, tiny_hf_model};
use moe::infer::{Finish, SamplingParams, Tokenizer};
use moe::model::Model;
use moe::runtime::Device;
use moe::serve::engine::{Engine, EngineConfig, Event, Request};
use moe::serve::metrics::Metrics;

const TEMPLATE: &str = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

fn tiny_model(dir: &Path, context: usize) {
    tiny_hf_model(dir, context);
    let cfg = serde_json::json!({ "chat_template": TEMPLATE });
    std::fs::write(dir.join("hf/tokenizer_config.json"), cfg.to_string()).unwrap();
}

fn bin() -> String {
    // MOE_BIN: the binary staged beside the test binaries on the GPU machine.
    std::env::var("MOE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moe").to_string())
}

type Events = tokio::sync::mpsc::UnboundedReceiver<Event>;

fn request(prompt: &[u32], n: usize, max_tokens: usize) -> (Request, Events) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let r = Request {
        prompts: vec![prompt.to_vec()],
        max_tokens: vec![max_tokens],
        n,
        sampling: SamplingParams::default(),
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
        stop: Vec::new(),
        ignore_eos: true,
        logprobs: None,
        arrived: Instant::now(),
        events: tx,
    };
    (r, rx)
}

/// Each choice's ids (every choice must have finished by length).
fn drain(rx: &mut Events, choices: usize) -> Vec<Vec<u32>> {
    let mut ids = vec![Vec::new(); choices];
    let mut done = 0;
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Token { choice, id, .. } => ids[choice].push(id),
            Event::Done { finish, .. } => {
                assert_eq!(finish, Finish::Length);
                done += 1;
            }
            Event::Failed(m) => panic!("engine failed: {m}"),
        }
    }
    assert_eq!(done, choices, "not every choice finished");
    ids
}

/// Two KV rows, a budget of 5 tokens a step: long prompts are prefilled in chunks beside
/// running decodes, a third request waits for a row and takes a freed one, n = 2 takes two
/// rows; every output equals its prompt's greedy decode alone. A request whose receiver is
/// dropped leaves at the next step.
#[test]
fn engine_batches_continuously_like_single_greedy() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path(), 64);
    engine_case(&tmp.path().join("hf"), Device::Cpu, None);
}

/// The same on the GPU (skipped without one; MOE_REQUIRE_GPU=1 makes that a failure), in the
/// checkpoint's dtype and in bf16: decode-only steps take the CUDA-graph decode path, mixed
/// steps the prefill path.
#[test]
fn engine_batches_continuously_on_the_gpu() {
    let gpu = match moe::runtime::cuda::device_count() {
        Ok(n) if n > 0 => Device::Cuda(0),
        r if std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("MOE_REQUIRE_GPU=1 but no usable GPU: {r:?}")
        }
        _ => {
            eprintln!("skipped: no CUDA GPU");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path(), 64);
    let hf = tmp.path().join("hf");
    engine_case(&hf, gpu, None);
    engine_case(&hf, gpu, Some(moe::runtime::DType::BF16));
}

fn engine_case(hf: &Path, device: Device, dtype: Option<moe::runtime::DType>) {
    let model = Model::load_hf(hf, device, dtype).unwrap();
    let tok = Arc::new(Tokenizer::load(hf).unwrap());
    let prompts: Vec<Vec<u32>> = ["rev:abcdefghij=", "cp:xy=", "sum:1234567="]
        .iter()
        .map(|p| p.bytes().map(u32::from).collect())
        .collect();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| greedy(&model, p, 10)).collect();
    let metrics = Arc::new(Metrics::default());
    let cfg = EngineConfig {
        max_num_seqs: 2,
        max_num_batched_tokens: 5,
        max_model_len: 64,
        eos: Vec::new(),
    };
    let mut engine = Engine::new(model, tok, cfg, metrics.clone()).unwrap();
    let mut rxs = Vec::new();
    for p in &prompts {
        let (r, rx) = request(p, 1, 10);
        engine.submit(r);
        rxs.push(rx);
    }
    let (r, rx_n) = request(&prompts[1], 2, 10);
    engine.submit(r);
    let mut steps = 0;
    while engine.pending() > 0 {
        engine.step().unwrap();
        steps += 1;
        assert!(steps < 200, "the engine does not finish");
    }
    for (i, rx) in rxs.iter_mut().enumerate() {
        assert_eq!(drain(rx, 1), vec![want[i].clone()], "prompt {i}");
    }
    let mut rx_n = rx_n;
    assert_eq!(drain(&mut rx_n, 2), vec![want[1].clone(), want[1].clone()]);
    let m = metrics.render();
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum::<usize>() + 2 * prompts[1].len();
    assert!(
        m.contains(&format!("\nmoe_prompt_tokens_total {prompt_tokens}\n")),
        "{m}"
    );
    assert!(m.contains("\nmoe_generation_tokens_total 50\n"), "{m}");
    assert!(m.contains("\nmoe_num_requests_running 0\n"), "{m}");

    // A disconnected client: its sequence is dropped before the next step runs it.
    let (r, rx) = request(&prompts[0], 1, 10);
    engine.submit(r);
    engine.step().unwrap();
    drop(rx);
    engine.step().unwrap();
    assert_eq!(engine.pending(), 0);
    assert!(metrics
        .render()
        .contains("\nmoe_sequences_aborted_total 1\n"));
    // Its row is reused, from position 0.
    let (r, mut rx) = request(&prompts[2], 1, 10);
    engine.submit(r);
    while engine.pending() > 0 {
        engine.step().unwrap();
    }
    assert_eq!(drain(&mut rx, 1), vec![want[2].clone()]);
}

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn generate_json(hf: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "generate",
        "--model",
        hf,
        "--device",
        "cpu",
        "--ignore-eos",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(bin())
        .args(&args)
        .env("MOE_DISABLE_CUDA", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn openai_client_against_moe_serve() {
    let py = Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    match py {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the Python package `openai` is missing (python3 -m pip install openai; .ci/run \
             installs it): {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("python3 is needed for the openai client test: {e}"),
    }
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(tmp.path(), 512);
    let hf = tmp.path().join("hf");
    let hf_s = hf.to_str().unwrap();

    // References: `moe generate`, one prompt per process.
    let max_tokens = 12;
    let prompts = [
        "rev:abc=",
        "cp:xy=",
        "sum:12+34=",
        "sort:dcba=",
        "a longer prompt, rev:hello world=",
    ];
    let mut completions = serde_json::Map::new();
    for p in prompts {
        let v = generate_json(
            hf_s,
            &["--prompt", p, "--max-new-tokens", &max_tokens.to_string()],
        );
        completions.insert(p.to_string(), v["text"].clone());
    }
    let chat = generate_json(
        hf_s,
        &["--prompt", "hi there", "--chat", "--max-new-tokens", "6"],
    );
    let reference = serde_json::json!({
        "max_tokens": max_tokens,
        "completions": completions,
        "chat": {"prompt": "hi there", "max_tokens": 6, "text": chat["text"]},
    });
    let ref_path = tmp.path().join("reference.json");
    std::fs::write(&ref_path, reference.to_string()).unwrap();

    // The server on a free loopback port; it prints its address once listening.
    let mut child = Command::new(bin())
        .args([
            "serve",
            "--model",
            hf_s,
            "--device",
            "cpu",
            "--port",
            "0",
            "--api-key",
            "test-key",
            "--served-model-name",
            "tiny",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "16",
        ])
        .env("MOE_DISABLE_CUDA", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[serve] {line}");
            if let Some(at) = line.find("http://") {
                let _ = tx.send(
                    line[at..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string(),
                );
            }
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("moe serve did not print its address within 60 s");
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");

    let t = Instant::now();
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_openai.py"))
        .args([&base, "test-key", "tiny", ref_path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "{stdout}{stderr}python client: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "serve_openai.py failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    drop(server);
}
