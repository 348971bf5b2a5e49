//! `moe generate` and `moe chat`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use super::generate::{generate, GenOptions};
use super::sampler::SamplingParams;
use super::text::{GenerationDefaults, Message, Tokenizer};
use crate::model::Model;
use crate::runtime::{DType, Device};

/// Model, device and sampling options shared by `generate` and `chat`. Options left out take the
/// model's generation_config.json values, as transformers' `generate` does.
#[derive(Args, Clone)]
pub struct CommonArgs {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or a
    /// `moe train` run's `hf/` export.
    #[arg(long)]
    model: PathBuf,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (the checkpoint's dtype on a GPU, f32 on the CPU) | f32 | bf16 | f16
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Maximum tokens to generate (default: generation_config.json's max_new_tokens, else 256).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// 0 = greedy. Default: greedy unless generation_config.json sets do_sample.
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep the k most likely tokens when sampling (0 = off; default: generation_config's, else
    /// 50 as in transformers).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling mass (1 = off).
    #[arg(long)]
    top_p: Option<f32>,
    /// Drop tokens below min_p × the top token's probability (0 = off).
    #[arg(long)]
    min_p: Option<f32>,
    /// Penalise tokens already present (1 = off; transformers' formula).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Random seed (sampling is reproducible for a given seed and batch position).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this string (repeatable); the string is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Prompt text (repeat for a batch).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Treat each prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Print one JSON object per prompt instead of text:
    /// {"prompt_ids": [...], "completion_ids": [...], "text": "..."}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// System message.
    #[arg(long)]
    system: Option<String>,
}

/// A loaded model directory with its tokenizer and defaults.
struct Loaded {
    model: Model,
    tok: Tokenizer,
    opts: GenOptions,
}

/// Loads a model directory on `device` (auto | cpu | cuda | cuda:N) as `dtype` (auto | f32 |
/// bf16 | f16) with its tokenizer and generation_config.json defaults.
pub(crate) fn open_model(
    dir: &Path,
    device: &str,
    dtype: &str,
) -> anyhow::Result<(Model, Tokenizer, GenerationDefaults)> {
    let device = Device::parse(device).with_context(|| format!("--device {device}"))?;
    let dtype = match dtype {
        "auto" => None,
        d => Some(
            d.parse::<DType>()
                .map_err(|e| anyhow::anyhow!("--dtype {d}: {e} (auto | f32 | bf16 | f16)"))?,
        ),
    };
    let tok = Tokenizer::load(dir)?;
    let gen = GenerationDefaults::load(dir)?;
    let t0 = Instant::now();
    let model = Model::load_hf(dir, device, dtype)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    tracing::info!(
        "loaded {} on {} ({}) in {:.1}s",
        dir.display(),
        model.device,
        model.dtype,
        t0.elapsed().as_secs_f64()
    );
    Ok((model, tok, gen))
}

/// End-of-sequence ids: generation_config.json's, else the model config's, else the
/// tokenizer's eos_token.
pub(crate) fn eos_ids(gen: &GenerationDefaults, model: &Model, tok: &Tokenizer) -> Vec<u32> {
    let mut eos = gen.eos_token_ids.clone();
    if eos.is_empty() {
        eos = model.config.eos_token_ids.clone();
    }
    if eos.is_empty() {
        if let Some(id) = tok.eos_token.as_deref().and_then(|t| tok.token_id(t)) {
            eos.push(id);
        }
    }
    eos
}

fn load(a: &CommonArgs) -> anyhow::Result<Loaded> {
    let (model, tok, gen) = open_model(&a.model, &a.device, &a.dtype)?;
    let sample = match a.temperature {
        Some(t) => t > 0.0,
        None => gen.do_sample,
    };
    let sampling = SamplingParams {
        temperature: if sample {
            a.temperature.or(gen.temperature).unwrap_or(1.0)
        } else {
            0.0
        },
        top_k: a.top_k.or(gen.top_k).unwrap_or(50),
        top_p: a.top_p.or(gen.top_p).unwrap_or(1.0),
        min_p: a.min_p.or(gen.min_p).unwrap_or(0.0),
        repetition_penalty: a
            .repetition_penalty
            .or(gen.repetition_penalty)
            .unwrap_or(1.0),
        seed: a.seed,
    };
    sampling.validate().map_err(|e| anyhow::anyhow!("--{e}"))?;
    let eos = eos_ids(&gen, &model, &tok);
    let opts = GenOptions {
        max_new_tokens: a.max_new_tokens.or(gen.max_new_tokens).unwrap_or(256),
        sampling,
        stop: a.stop.clone(),
        eos,
        ignore_eos: a.ignore_eos,
    };
    Ok(Loaded { model, tok, opts })
}

pub(crate) fn chat_prompt(
    tok: &Tokenizer,
    system: Option<&str>,
    history: &[Message],
) -> anyhow::Result<Vec<u32>> {
    let mut msgs = Vec::new();
    if let Some(s) = system {
        msgs.push(Message {
            role: "system".into(),
            content: s.into(),
        });
    }
    msgs.extend(history.iter().cloned());
    let text = tok.apply_chat_template(&msgs)?;
    // The template writes the special tokens itself (transformers: add_special_tokens=False).
    Ok(tok.encode(&text, false)?)
}

pub fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let l = load(&a.common)?;
    let prompts: Vec<Vec<u32>> = a
        .prompt
        .iter()
        .map(|p| {
            if a.chat {
                let user = [Message {
                    role: "user".into(),
                    content: p.clone(),
                }];
                chat_prompt(&l.tok, a.system.as_deref(), &user)
            } else {
                Ok(l.tok.encode(p, true)?)
            }
        })
        .collect::<anyhow::Result<_>>()?;
    let stream = !a.json && prompts.len() == 1;
    let mut stdout = std::io::stdout().lock();
    let (gens, timing) = generate(
        &l.model,
        Some(&l.tok),
        &prompts,
        &l.opts,
        &mut |_, piece| {
            if stream {
                // A closed pipe (e.g. `| head`) must not abort generation with a panic.
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        },
    )?;
    if a.json {
        for g in &gens {
            let obj = serde_json::json!({
                "prompt_ids": g.prompt_ids,
                "completion_ids": g.completion_ids,
                "text": g.text,
            });
            writeln!(stdout, "{obj}")?;
        }
    } else if stream {
        writeln!(stdout)?;
    } else {
        for (i, g) in gens.iter().enumerate() {
            writeln!(stdout, "=== [{i}] {}\n{}", a.prompt[i], g.text)?;
        }
    }
    let n_prompt: usize = prompts.iter().map(Vec::len).sum();
    let n_gen: usize = gens.iter().map(|g| g.completion_ids.len()).sum();
    eprintln!(
        "{} prompt tokens in {:.2}s ({:.0} tok/s); {} generated, decode {:.1} tok/s",
        n_prompt,
        timing.prefill_s,
        n_prompt as f64 / timing.prefill_s.max(1e-9),
        n_gen,
        timing.decode_tokens as f64 / timing.decode_s.max(1e-9)
    );
    Ok(())
}

pub fn run_chat(a: ChatArgs) -> anyhow::Result<()> {
    let l = load(&a.common)?;
    if !l.tok.has_chat_template() {
        anyhow::bail!(
            "{}: the model has no chat template (tokenizer_config.json chat_template or \
             chat_template.jinja); use `moe generate --prompt`",
            a.common.model.display()
        );
    }
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!(
        "chat with {} — /reset clears the conversation, /exit or Ctrl-D quits",
        a.common.model.display()
    );
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.clear();
                continue;
            }
            _ => {}
        }
        history.push(Message {
            role: "user".into(),
            content: line.to_string(),
        });
        let ids = chat_prompt(&l.tok, a.system.as_deref(), &history)?;
        let (gens, _) = generate(&l.model, Some(&l.tok), &[ids], &l.opts, &mut |_, piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        writeln!(out)?;
        let reply = gens.into_iter().next().map(|g| g.text).unwrap_or_default();
        history.push(Message {
            role: "assistant".into(),
            content: reply,
        });
    }
    Ok(())
}
