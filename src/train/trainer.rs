//! The training loop: a `Trainer` owns the model, the AdamW state, the data stream and the run
//! state, and does one optimizer step at a time (micro-batches accumulated, gradients clipped,
//! router biases updated); `run` loops to the configured step count with logging, checkpoints,
//! evaluation on held-out synthetic tasks, plots and the HF export.
//!
//! Resuming loads everything a step depends on (weights, moments, masters, router biases, step,
//! data position, RNG), so a resumed run is bit-identical to an uninterrupted one on the same
//! device.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{self, Snapshot, TrainState};
use super::config::{NanPolicy, TrainConfig, RESUMABLE_CHANGES};
use super::data::{DataConfig, DataSource};
use super::metrics::{self, MetricsLog, StepRecord};
use super::optimizer::{clip_factor, grad_norm_sq, grad_norm_sq_with, AdamWOptimizer};
use super::progress::Progress;
use super::schedule::Schedule;
use super::synthetic::{score, Example, SyntheticCorpus, TaskScore};
use super::{plots, Error, Result};
use crate::model::{Ffn, Model, ModelConfig, TrainOpts};
use crate::moe::MoeConfig;
use crate::placement::{TraceHeader, TraceWriter};
use crate::runtime::{DType, Device, ParamSet, Tensor};

/// Where a run writes: `run_dir/checkpoints/step-N`, `metrics.jsonl`, `loss.png`,
/// `experts.png`, `samples.txt`, `hf/`.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub model: Model,
    opt: AdamWOptimizer,
    data: DataSource,
    pub state: TrainState,
    run_dir: PathBuf,
    schedule: Schedule,
    /// (index into `state.expert_load`, layer, its MoE config) for every MoE layer.
    moe_layers: Vec<(usize, MoeConfig)>,
    flops_per_token: f64,
    peak_flops: f64,
    /// The routed experts' gradient dtype (`train.expert_grad_dtype`).
    expert_grads: DType,
    /// Print progress and log lines.
    pub verbose: bool,
    /// The routing trace being written (`train.trace_routing`), opened by `run`.
    trace: Option<TraceWriter>,
}

/// What `run` reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunSummary {
    pub steps: u64,
    pub final_loss: f32,
    pub tokens_seen: u64,
    pub tokens_per_s: f64,
    pub mfu: f64,
    pub checkpoint: PathBuf,
    /// Held-out accuracy per synthetic task (synthetic data only).
    pub scores: Vec<TaskScore>,
}

fn moe_layers(cfg: &ModelConfig) -> Vec<(usize, MoeConfig)> {
    cfg.layers
        .iter()
        .filter_map(|l| match &l.ffn {
            Ffn::Moe(m) => Some(m.clone()),
            Ffn::Dense { .. } => None,
        })
        .enumerate()
        .collect()
}

impl Trainer {
    /// A fresh run of `cfg` writing into `run_dir`.
    pub fn new(cfg: TrainConfig, run_dir: &Path) -> Result<Trainer> {
        let model_cfg = cfg.validate()?;
        let device = Device::parse(&cfg.train.device)
            .map_err(|e| Error::Config(format!("train.device = {:?}: {e}", cfg.train.device)))?;
        let dtype = cfg.train.dtype.unwrap_or(match device {
            Device::Cpu => DType::F32,
            Device::Cuda(_) => DType::BF16,
        });
        let model = Model::init(model_cfg, cfg.train.seed, device, dtype)?;
        let layers = moe_layers(&model.config);
        let state = TrainState {
            step: 0,
            optimizer_steps: 0,
            data_position: 0,
            rng: ChaCha8Rng::seed_from_u64(cfg.train.seed ^ 0x7261_6e64),
            tokens_seen: 0,
            skipped_steps: 0,
            elapsed_s: 0.0,
            expert_load: layers.iter().map(|(_, m)| vec![0; m.n_experts]).collect(),
        };
        Self::assemble(cfg, model, state, run_dir)
    }

    fn assemble(
        cfg: TrainConfig,
        model: Model,
        state: TrainState,
        run_dir: &Path,
    ) -> Result<Trainer> {
        let mut named: Vec<(String, &Tensor)> = Vec::new();
        model
            .params
            .visit("", &mut |n, t| named.push((n.to_string(), t)));
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let opt = AdamWOptimizer::new(cfg.optimizer.clone(), &refs)?;
        let data = DataSource::open(
            &cfg.data,
            cfg.train.seq_len,
            cfg.train.seed,
            model.config.vocab_size,
        )?;
        let (_, active) = model.param_counts();
        let c = &model.config;
        let flops_per_token = metrics::flops_per_token(
            active,
            c.n_layers(),
            c.n_heads,
            c.head_dim,
            cfg.train.seq_len,
        );
        let (peak_flops, _) = metrics::peak_flops(model.device)?;
        let expert_grads = cfg.train.expert_grads(model.dtype)?;
        Ok(Trainer {
            expert_grads,
            schedule: cfg.optimizer.schedule(cfg.train.steps),
            moe_layers: moe_layers(&model.config),
            cfg,
            model,
            opt,
            data,
            state,
            run_dir: run_dir.to_path_buf(),
            flops_per_token,
            peak_flops,
            verbose: true,
            trace: None,
        })
    }

    /// Continues the run saved in `ckpt` (a `step-N` directory) with `cfg`, which may differ
    /// from the saved config only in `RESUMABLE_CHANGES` (the first other difference is named).
    pub fn resume(cfg: TrainConfig, ckpt: &Path, run_dir: &Path) -> Result<Trainer> {
        let loaded = checkpoint::load(ckpt)?;
        let fresh = Trainer::new(cfg, run_dir)?;
        let current = fresh.cfg.resolved_json(fresh.model.dtype);
        if let Some(diff) =
            checkpoint::config_difference(&loaded.config, &current, RESUMABLE_CHANGES)
        {
            return Err(Error::Checkpoint {
                path: ckpt.to_path_buf(),
                msg: format!(
                    "was saved with a different config: {diff} (only {} may change on resume)",
                    RESUMABLE_CHANGES.join(", ")
                ),
            });
        }
        let mut t = fresh;
        let device = t.model.device;
        let bad = |msg: String| Error::Checkpoint {
            path: ckpt.to_path_buf(),
            msg,
        };
        let mut err: Option<Error> = None;
        let mut restore = |name: &str, p: &mut Tensor| {
            if err.is_some() {
                return;
            }
            let r = loaded.model.get(name).and_then(|s| {
                if s.shape() != p.shape() || s.dtype() != p.dtype() {
                    return Err(bad(format!(
                        "model tensor {name} is {:?} {}, the model needs {:?} {}",
                        s.shape(),
                        s.dtype(),
                        p.shape(),
                        p.dtype()
                    )));
                }
                *p = s.into_device(device)?;
                Ok(())
            });
            if let Err(e) = r {
                err = Some(e);
            }
        };
        t.model.params.visit_mut("", &mut restore);
        t.model.params.visit_state_mut(&mut restore);
        if let Some(e) = err {
            return Err(e);
        }
        t.opt.load_state(loaded.state.optimizer_steps, &mut |n| {
            loaded.optimizer.get(n)
        })?;
        if loaded.state.expert_load.len() != t.moe_layers.len() {
            return Err(bad(format!(
                "state.json has expert loads of {} MoE layers, the model has {}",
                loaded.state.expert_load.len(),
                t.moe_layers.len()
            )));
        }
        t.state = loaded.state;
        Ok(t)
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.run_dir.join("checkpoints")
    }

    /// One optimizer step (`grad_accum` micro-batches). A non-finite loss or gradient norm
    /// skips the update or stops, as `train.on_nan` says.
    pub fn step(&mut self) -> Result<StepRecord> {
        let t0 = Instant::now();
        let step = self.state.step + 1;
        let lr = self.schedule.lr_at(step);
        let accum = self.cfg.train.grad_accum;
        let device = self.model.device;
        // Expert weight gradients are written by the first backward, added by later ones.
        let mut grads = self.model.params.grad_buffers(self.expert_grads)?;
        let mut first = true;
        let mut expert_sq: Option<Tensor> = None;
        let (mut loss, mut aux, mut z) = (0f64, 0f64, 0f64);
        let mut tokens = 0u64;
        let mut counts: Vec<Vec<i64>> = self
            .moe_layers
            .iter()
            .map(|(_, m)| vec![0; m.n_experts])
            .collect();
        for _ in 0..accum {
            let batch = self
                .data
                .next_batch(&mut self.state.data_position, self.cfg.train.batch_size);
            tokens += (batch.batch * batch.seq_len) as u64;
            let n_valid = batch.supervised();
            let seed = self.state.rng.next_u64();
            if n_valid == 0 {
                continue;
            }
            let shape = [batch.batch, batch.seq_len];
            let tok = Tensor::from_vec(batch.tokens, &shape)?.into_device(device)?;
            let tgt = Tensor::from_vec(batch.targets, &shape)?.into_device(device)?;
            let opts = TrainOpts {
                recompute: self.cfg.train.recompute,
                seed,
                loss_scale: 1.0 / accum as f32,
            };
            let (out, saved) = self.model.forward_train(&tok, &tgt, n_valid, &opts)?;
            loss += out.loss.scalar_f32()? as f64 / accum as f64;
            aux += out.aux_loss.scalar_f32()? as f64 / accum as f64;
            z += out.z_loss.scalar_f32()? as f64 / accum as f64;
            for (i, (_, c, _dropped)) in out.expert_load.iter().enumerate() {
                for (acc, x) in counts[i].iter_mut().zip(c.to_vec::<i32>()?) {
                    *acc += x as i64;
                }
            }
            // Each backward also sums the squares of the expert weight gradients it leaves
            // (in the GEMM epilogues); the last one's sum is their share of the norm.
            let mut sq = Tensor::zeros(&[1], DType::F32, device)?;
            self.model
                .backward_with(saved, &mut grads, first, Some(&mut sq))?;
            first = false;
            expert_sq = Some(sq);
        }
        if let Some(trace) = &mut self.trace {
            for (layer, c) in counts.iter().enumerate() {
                let c: Vec<u64> = c.iter().map(|&x| x.max(0) as u64).collect();
                trace.record(step, layer, &c).map_err(trace_error)?;
            }
        }
        if first {
            // No micro-batch had a supervised token: nothing wrote the expert gradients.
            grads = self.model.params.zero_grads(self.expert_grads)?;
        }
        let mut named: Vec<(String, &Tensor)> = Vec::new();
        grads.visit("", &mut |n, t| named.push((n.to_string(), t)));
        let grad_refs: Vec<&Tensor> = named.iter().map(|(_, t)| *t).collect();
        let norm_sq = match expert_sq {
            Some(sq) => grad_norm_sq_with(&grad_refs, &grads.routed_expert_weights(), sq)?,
            None => grad_norm_sq(&grad_refs)?,
        };
        let norm = norm_sq.scalar_f32()?.sqrt();
        let finite = loss.is_finite() && norm.is_finite();
        if finite {
            let scale = clip_factor(norm, self.cfg.optimizer.grad_clip);
            let grads_named: Vec<(&str, &Tensor)> =
                named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
            let mut pnamed: Vec<(String, &mut Tensor)> = Vec::new();
            self.model
                .params
                .visit_mut("", &mut |n, t| pnamed.push((n.to_string(), t)));
            let mut prefs: Vec<(&str, &mut Tensor)> = pnamed
                .iter_mut()
                .map(|(n, t)| (n.as_str(), &mut **t))
                .collect();
            self.opt.step(&mut prefs, &grads_named, lr, scale)?;
            self.update_router_biases(&counts)?;
            for (acc, c) in self.state.expert_load.iter_mut().zip(&counts) {
                for (a, &x) in acc.iter_mut().zip(c) {
                    *a += x as u64;
                }
            }
            self.state.optimizer_steps = self.opt.steps();
        } else {
            match self.cfg.train.on_nan {
                NanPolicy::Skip => self.state.skipped_steps += 1,
                NanPolicy::Stop => {
                    let what = if loss.is_finite() {
                        format!("the gradient norm ({norm})")
                    } else {
                        format!("the loss ({loss})")
                    };
                    let saved = self.save()?;
                    return Err(Error::NonFinite { step, what, saved });
                }
            }
        }
        self.state.step = step;
        self.state.tokens_seen += tokens;
        let dt = t0.elapsed().as_secs_f64();
        self.state.elapsed_s += dt;
        let tokens_per_s = tokens as f64 / dt.max(1e-9);
        Ok(StepRecord {
            step,
            loss: if finite { loss as f32 } else { f32::NAN },
            aux_loss: aux as f32,
            z_loss: z as f32,
            lr,
            grad_norm: norm,
            tokens: self.state.tokens_seen,
            tokens_per_s,
            mfu: tokens_per_s * self.flops_per_token / self.peak_flops,
            elapsed_s: self.state.elapsed_s,
            skipped: !finite,
        })
    }

    /// Aux-loss-free balancing: each sigmoid router's selection bias moves toward under-loaded
    /// experts (DeepSeek-V3); other routers ignore it.
    fn update_router_biases(&mut self, counts: &[Vec<i64>]) -> Result<()> {
        let device = self.model.device;
        let mut moe_index = 0;
        for b in self.model.params.blocks.iter_mut() {
            if let crate::model::FfnWeights::Moe(w) = &mut b.ffn {
                let (_, cfg) = &self.moe_layers[moe_index];
                if let Some(bias) = &mut w.router_bias {
                    let c: Vec<i32> = counts[moe_index]
                        .iter()
                        .map(|&x| x.min(i32::MAX as i64) as i32)
                        .collect();
                    let n = c.len();
                    let c = Tensor::from_vec(c, &[n])?.into_device(device)?;
                    crate::moe::update_router_bias(cfg, bias, &c)
                        .map_err(crate::model::ModelError::from)?;
                }
                moe_index += 1;
            }
        }
        Ok(())
    }

    /// Writes a checkpoint of the current state (atomically; keeps the newest
    /// `checkpoint.keep`).
    pub fn save(&self) -> Result<PathBuf> {
        let mut model: Vec<(String, &Tensor)> = Vec::new();
        self.model
            .params
            .visit("", &mut |n, t| model.push((n.to_string(), t)));
        self.model
            .params
            .visit_state(&mut |n, t| model.push((n.to_string(), t)));
        let model_refs: Vec<(&str, &Tensor)> =
            model.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let opt = self.opt.state();
        let opt_refs: Vec<(&str, &Tensor)> = opt.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let toml = self.cfg.to_toml();
        checkpoint::save(
            &self.checkpoint_dir(),
            self.cfg.checkpoint.keep,
            &Snapshot {
                model: &model_refs,
                optimizer: &opt_refs,
                state: &self.state,
                config: self.cfg.resolved_json(self.model.dtype),
                config_toml: &toml,
            },
        )
    }

    fn say(&self, progress: Option<&Progress>, line: &str) {
        if self.verbose {
            match progress {
                Some(p) => p.println(line),
                None => eprintln!("{line}"),
            }
        }
    }

    /// Trains to `train.steps`, then evaluates, plots and exports. Returns what happened.
    /// The routing trace of this run: `routing.jsonl`, or `routing-from-step-N.jsonl` when
    /// continuing after step N. Its header names the model by a hash of the resolved config's
    /// `model` table, so `moe simulate` can refuse a trace of another model.
    fn open_trace(&self) -> Result<TraceWriter> {
        let first = self.moe_layers.first().map(|(_, m)| m).ok_or_else(|| {
            Error::Config("train.trace_routing: the model has no MoE layer to trace".into())
        })?;
        if let Some((i, m)) = self.moe_layers.iter().find(|(_, m)| {
            (m.n_experts, m.top_k, m.ffn_dim) != (first.n_experts, first.top_k, first.ffn_dim)
        }) {
            return Err(Error::Config(format!(
                "train.trace_routing: MoE layer {i} has {} experts top-{} of width {}, layer 0 {} \
                 top-{} of {}; a routing trace needs the same experts in every MoE layer",
                m.n_experts, m.top_k, m.ffn_dim, first.n_experts, first.top_k, first.ffn_dim
            )));
        }
        use sha2::{Digest, Sha256};
        let model_json = self.cfg.resolved_json(self.model.dtype)["model"].to_string();
        let hash = Sha256::digest(model_json.as_bytes());
        let header = TraceHeader {
            moe_trace: crate::placement::trace::TRACE_VERSION,
            model: "moe-native".into(),
            config_hash: hash[..8].iter().map(|b| format!("{b:02x}")).collect(),
            layers: self.moe_layers.len(),
            experts: first.n_experts,
            top_k: first.top_k,
            d_model: first.d_model,
            d_ff: first.ffn_dim,
            tokens_per_step: self.cfg.train.batch_size
                * self.cfg.train.seq_len
                * self.cfg.train.grad_accum,
        };
        let name = match self.state.step {
            0 => "routing.jsonl".to_string(),
            n => format!("routing-from-step-{n}.jsonl"),
        };
        TraceWriter::create(&self.run_dir.join(name), header).map_err(trace_error)
    }

    pub fn run(&mut self) -> Result<RunSummary> {
        std::fs::create_dir_all(&self.run_dir).map_err(|source| Error::Io {
            path: self.run_dir.clone(),
            source,
        })?;
        let total = self.cfg.train.steps;
        if self.cfg.train.trace_routing && self.trace.is_none() {
            self.trace = Some(self.open_trace()?);
        }
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let mut log = MetricsLog::open(&metrics_path, self.state.step)?;
        let progress = self
            .verbose
            .then(|| Progress::new(self.state.step, total.max(self.state.step)));
        let (params, active) = self.model.param_counts();
        self.say(
            progress.as_ref(),
            &format!(
                "training {} parameters ({} active per token) on {} in {}; {} tokens per step; run dir {}",
                super::progress::human_count(params as f64),
                super::progress::human_count(active as f64),
                self.model.device,
                self.model.dtype,
                self.cfg.train.batch_size * self.cfg.train.seq_len * self.cfg.train.grad_accum,
                self.run_dir.display()
            ),
        );
        let mut last: Option<StepRecord> = None;
        let mut rate = (0f64, 0f64);
        while self.state.step < total {
            let r = self.step()?;
            log.write(&r)?;
            if let Some(p) = &progress {
                p.update(
                    &r,
                    r.step % self.cfg.train.log_every == 0 || r.step == total,
                );
            }
            rate.0 += r.tokens_per_s;
            rate.1 += 1.0;
            if r.step % self.cfg.checkpoint.every == 0 && r.step != total {
                self.save()?;
            }
            last = Some(r);
        }
        if let Some(p) = &progress {
            p.finish();
        }
        if let Some(trace) = self.trace.take() {
            trace.finish().map_err(trace_error)?;
        }
        let ckpt = self.save()?;
        self.say(None, &format!("checkpoint: {}", ckpt.display()));

        let scores = self.report_samples()?;
        self.write_plots(&metrics_path)?;
        if self.cfg.checkpoint.export_hf {
            let dir = self.run_dir.join("hf");
            match self.export_hf(&dir) {
                Ok(()) => self.say(
                    None,
                    &format!("exported (Hugging Face layout): {}", dir.display()),
                ),
                Err(e) => self.say(None, &format!("note: no HF export: {e}")),
            }
        }
        let (tokens_per_s, final_loss, mfu) = match &last {
            Some(r) => (rate.0 / rate.1, r.loss, r.mfu),
            None => (0.0, f32::NAN, 0.0),
        };
        let summary = RunSummary {
            steps: self.state.step,
            final_loss,
            tokens_seen: self.state.tokens_seen,
            tokens_per_s,
            mfu,
            checkpoint: ckpt,
            scores,
        };
        let path = self.run_dir.join("summary.json");
        let json = serde_json::to_vec_pretty(&summary).unwrap_or_default();
        std::fs::write(&path, json).map_err(|source| Error::Io { path, source })?;
        Ok(summary)
    }

    /// The HF export (`checkpoint.export_hf`): config.json + model.safetensors, and for the
    /// byte-level synthetic vocabulary a tokenizer.json so `moe generate` runs on it.
    pub fn export_hf(&self, dir: &Path) -> Result<()> {
        self.model.save_hf(dir)?;
        match &self.cfg.data {
            DataConfig::Synthetic(_) => {
                super::prepare::write_byte_tokenizer(&dir.join("tokenizer.json"))?
            }
            // The tokenizer `moe data prepare` kept with the shards.
            DataConfig::Shards(s) => {
                for name in super::prepare::TOKENIZER_FILES {
                    let from = s.dir.join(name);
                    if from.is_file() {
                        super::prepare::copy_atomic(&from, &dir.join(name))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn write_plots(&self, metrics_path: &Path) -> Result<()> {
        let points: Vec<(u64, f32)> = metrics::read(metrics_path)?
            .into_iter()
            .filter(|r| r.loss.is_finite())
            .map(|r| (r.step, r.loss))
            .collect();
        if points.len() >= 2 {
            let p = self.run_dir.join("loss.png");
            plots::loss_curve(&p, &points, "training loss")?;
            self.say(None, &format!("loss curve: {}", p.display()));
        }
        if !self.state.expert_load.is_empty() {
            let p = self.run_dir.join("experts.png");
            plots::expert_heatmap(
                &p,
                &self.state.expert_load,
                "expert load: tokens routed / layer mean (1.00 = balanced)",
            )?;
            self.say(None, &format!("expert load heatmap: {}", p.display()));
        }
        Ok(())
    }

    /// On synthetic data: greedy completions of held-out prompts, accuracy per task, a few
    /// samples printed and all written to `samples.txt`.
    fn report_samples(&self) -> Result<Vec<TaskScore>> {
        let DataConfig::Synthetic(s) = &self.cfg.data else {
            return Ok(Vec::new());
        };
        if self.cfg.train.eval_per_task == 0 {
            return Ok(Vec::new());
        }
        let corpus = SyntheticCorpus::new(s.clone(), self.cfg.train.seed, self.cfg.train.seq_len)
            .map_err(Error::Config)?;
        let examples = corpus.held_out(self.cfg.train.eval_per_task);
        let completions = complete(&self.model, &examples, 2 * s.max_len + 4)?;
        let scores = score(&examples, &completions);
        let mut text = String::from("held-out prompts (never trained on), greedy completions:\n");
        for (e, c) in examples.iter().zip(&completions) {
            let got = c.split('\n').next().unwrap_or("");
            let ok = format!("{got}\n") == e.answer;
            text += &format!(
                "  {} {}{}  (want {})\n",
                if ok { "ok " } else { "bad" },
                e.prompt,
                got,
                e.answer.trim_end()
            );
        }
        let path = self.run_dir.join("samples.txt");
        std::fs::write(&path, &text).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        if self.verbose {
            eprintln!("held-out samples (the model never saw these prompts):");
            for sc in &scores {
                let shown: Vec<_> = examples
                    .iter()
                    .zip(&completions)
                    .filter(|(e, _)| e.task == sc.task)
                    .take(2)
                    .collect();
                for (e, c) in shown {
                    let got = c.split('\n').next().unwrap_or("");
                    let mark = if format!("{got}\n") == e.answer {
                        "ok "
                    } else {
                        "bad"
                    };
                    eprintln!("  {mark} {}{got}", e.prompt);
                }
            }
            eprintln!("accuracy on held-out prompts:");
            for sc in &scores {
                eprintln!(
                    "  {:<8} {:>3}/{:<3} ({:.0}%)",
                    sc.task.name(),
                    sc.correct,
                    sc.total,
                    100.0 * sc.correct as f64 / sc.total.max(1) as f64
                );
            }
            eprintln!("all samples: {}", path.display());
        }
        Ok(scores)
    }
}

/// Greedy completions (byte vocabulary) of each example's prompt, up to `max_new` bytes or a
/// newline, all prompts in one batch with a KV cache.
pub fn complete(model: &Model, examples: &[Example], max_new: usize) -> Result<Vec<String>> {
    if examples.is_empty() {
        return Ok(Vec::new());
    }
    let prompts: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| e.prompt.bytes().map(u32::from).collect())
        .collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_len = (longest + max_new).min(model.config.max_seq_len);
    let mut cache = model.new_kv_cache(prompts.len(), max_len)?;
    let mut out: Vec<Vec<u8>> = vec![Vec::new(); prompts.len()];
    let mut done = vec![false; prompts.len()];
    let mut next = prompts;
    for _ in 0..max_new {
        let logits = model.forward_infer(&next, &mut cache, false)?;
        let v = logits.dim(-1);
        let host = logits.to_f32_vec()?;
        let mut feed = vec![Vec::new(); next.len()];
        for (i, row) in host.chunks(v).enumerate() {
            if done[i] || next[i].is_empty() {
                continue;
            }
            let id = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (j, &x)| if x > b.1 { (j, x) } else { b },
                )
                .0;
            out[i].push(id.min(255) as u8);
            if id == b'\n' as usize || cache.lens[i] + 1 >= max_len {
                done[i] = true;
            } else {
                feed[i] = vec![id as u32];
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        next = feed;
    }
    Ok(out
        .into_iter()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect())
}

fn trace_error(e: crate::placement::Error) -> Error {
    Error::Config(format!("routing trace: {e}"))
}
