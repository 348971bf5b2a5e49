//! `moe serve`: an OpenAI-compatible HTTP server (completions, chat completions, streaming,
//! metrics) over one engine thread that batches requests continuously into a contiguous KV cache
//! of `--max-num-seqs` rows. `http` speaks the protocol, `api` the schema, `engine` and
//! `scheduler` run the model; the model is only reached through `infer`'s engine API.

pub mod api;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod scheduler;

use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use anyhow::Context;
use clap::Args;

use engine::{Engine, EngineConfig};

/// Default cap on `--max-model-len` when it is not given: a contiguous cache holds
/// max_num_seqs × max_model_len positions, so the model's whole context would be costly.
const DEFAULT_MAX_MODEL_LEN: usize = 4096;

/// `moe serve` (flag names as vLLM's where the meaning is the same).
#[derive(Args, Clone)]
pub struct ServeArgs {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Address to bind (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the address is printed once listening).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long)]
    api_key: Option<String>,
    /// The model name clients send (default: --model as given).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Sequences decoded together: KV cache rows (more requests wait in a queue).
    #[arg(long, default_value_t = 16)]
    max_num_seqs: usize,
    /// Most tokens one forward pass feeds (decode tokens plus prompt chunks).
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Positions per sequence (prompt + completion); default the model's context, at most 4096.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (the checkpoint's dtype on a GPU, f32 on the CPU) | f32 | bf16 | f16
    #[arg(long, default_value = "auto")]
    dtype: String,
}

/// What the HTTP side needs from the loaded model.
struct Loaded {
    tok: Arc<crate::infer::Tokenizer>,
    gen: crate::infer::GenerationDefaults,
    vocab: usize,
    max_model_len: usize,
}

/// Loads the model and builds the engine on its own thread (the model and its KV cache hold
/// device state that stays on one thread); reports back what the HTTP side needs.
fn start_engine(
    a: &ServeArgs,
    metrics: Arc<metrics::Metrics>,
) -> anyhow::Result<(Loaded, mpsc::Sender<engine::Request>)> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let a = a.clone();
    std::thread::Builder::new()
        .name("moe-engine".into())
        .spawn(move || {
            let built = (|| {
                let (model, tok, gen) = crate::infer::open_model(&a.model, &a.device, &a.dtype)?;
                let context = model.config.max_seq_len;
                let max_model_len = a
                    .max_model_len
                    .unwrap_or(context.min(DEFAULT_MAX_MODEL_LEN));
                anyhow::ensure!(
                    (1..=context).contains(&max_model_len),
                    "--max-model-len {max_model_len}: must be between 1 and the model's \
                     context of {context}"
                );
                let cfg = EngineConfig {
                    max_num_seqs: a.max_num_seqs,
                    max_num_batched_tokens: a.max_num_batched_tokens,
                    max_model_len,
                    eos: crate::infer::eos_ids(&gen, &model, &tok),
                };
                let vocab = model.config.vocab_size;
                let tok = Arc::new(tok);
                let engine = Engine::new(model, tok.clone(), cfg, metrics)?;
                let loaded = Loaded {
                    tok,
                    gen,
                    vocab,
                    max_model_len,
                };
                Ok((engine, loaded))
            })();
            match built {
                Ok((engine, loaded)) => {
                    if ready_tx.send(Ok(loaded)).is_ok() {
                        engine.run(rx);
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .context("starting the engine thread")?;
    let loaded = ready_rx
        .recv()
        .context("the engine thread ended while loading the model")??;
    Ok((loaded, tx))
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    let (loaded, tx) = start_engine(&a, metrics.clone())?;
    let max_model_len = loaded.max_model_len;
    let served = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| a.model.display().to_string());
    let state = Arc::new(http::AppState {
        engine: Mutex::new(tx),
        tok: loaded.tok,
        limits: api::Limits {
            served_model: served.clone(),
            max_model_len,
            vocab: loaded.vocab,
            defaults: loaded.gen,
        },
        api_key: a.api_key.clone(),
        metrics,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "moe serve: {served} on http://{local} (max_num_seqs {}, max_model_len \
             {max_model_len})",
            a.max_num_seqs
        );
        axum::serve(listener, http::router(state))
            .await
            .context("serving HTTP")
    })
}
