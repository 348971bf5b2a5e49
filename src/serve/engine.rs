//! The engine thread: owns the model and one contiguous KV cache of `max_num_seqs` rows
//! ([rows, Hkv, max_model_len, hd] per layer), takes requests from a channel, and each step
//! admits waiting sequences into free rows, runs one `Model::forward_infer` over the
//! scheduler's per-row token lists (prompt chunks and decode tokens together), samples each row
//! that completed its input and streams the new text to the request's channel. Stop rules are
//! `infer::Progress`, as in `moe generate`.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use super::scheduler::{Scheduler, SeqId};
use crate::infer::{Finish, Progress, Sampler, SamplingParams, Tokenizer};
use crate::model::{KvCache, Model};
use crate::runtime::{ops, Device};

/// One API request: `n` completions of each prompt, prompt i's of at most `max_tokens[i]` tokens.
pub struct Request {
    pub prompts: Vec<Vec<u32>>,
    pub max_tokens: Vec<usize>,
    pub n: usize,
    pub sampling: SamplingParams,
    /// OpenAI's penalties on tokens already generated: `frequency` × their count, `presence`
    /// once each, subtracted from the logits before sampling.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Log-probabilities of each chosen token and of this many most likely alternatives.
    pub logprobs: Option<usize>,
    pub arrived: Instant,
    pub events: UnboundedSender<Event>,
}

/// A generated token's log-probability (of the raw logits' softmax) and its top alternatives.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What the engine sends back; `choice` = prompt index × n + completion index.
#[derive(Debug)]
pub enum Event {
    /// One generated token: the text it made safe to show (possibly empty).
    Token {
        choice: usize,
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        choice: usize,
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The step serving this request failed; the request ends.
    Failed(String),
}

/// Engine settings (`moe serve`'s flags).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub eos: Vec<u32>,
}

struct Shared {
    stop: Vec<String>,
    ignore_eos: bool,
    logprobs: Option<usize>,
    frequency_penalty: f32,
    presence_penalty: f32,
    arrived: Instant,
    events: UnboundedSender<Event>,
}

struct Seq {
    req: Arc<Shared>,
    choice: usize,
    prompt_len: usize,
    /// Prompt and generated ids.
    ids: Vec<u32>,
    progress: Progress,
    sampler: Sampler,
    last_token: Option<Instant>,
}

/// The engine's state between steps.
pub struct Engine {
    model: Model,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    cache: KvCache,
    sched: Scheduler,
    seqs: HashMap<SeqId, Seq>,
    next_id: SeqId,
    host: Vec<f32>,
}

impl Engine {
    pub fn new(
        model: Model,
        tok: Arc<Tokenizer>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Engine> {
        let sched = Scheduler::new(cfg.max_num_seqs, cfg.max_num_batched_tokens)
            .map_err(anyhow::Error::msg)?;
        let cache = model.new_kv_cache(cfg.max_num_seqs, cfg.max_model_len)?;
        metrics
            .kv_rows_total
            .store(cfg.max_num_seqs as u64, Relaxed);
        metrics
            .kv_positions_total
            .store((cfg.max_num_seqs * cfg.max_model_len) as u64, Relaxed);
        Ok(Engine {
            model,
            tok,
            cfg,
            metrics,
            cache,
            sched,
            seqs: HashMap::new(),
            next_id: 0,
            host: Vec::new(),
        })
    }

    /// Serves requests until every sender of `rx` is gone.
    pub fn run(mut self, rx: mpsc::Receiver<Request>) {
        loop {
            if self.seqs.is_empty() {
                match rx.recv() {
                    Ok(r) => self.submit(r),
                    Err(_) => return,
                }
            }
            while let Ok(r) = rx.try_recv() {
                self.submit(r);
            }
            if let Err(e) = self.step() {
                tracing::error!("engine step failed: {e:#}");
                let msg = format!("{e:#}");
                for id in self
                    .sched
                    .slots()
                    .iter()
                    .flatten()
                    .copied()
                    .collect::<Vec<_>>()
                {
                    if let Some(s) = self.seqs.get(&id) {
                        let _ = s.req.events.send(Event::Failed(msg.clone()));
                    }
                    self.drop_seq(id);
                }
            }
        }
    }

    /// Queues a request's sequences. A prompt that leaves no room in a cache row, or a
    /// request whose lists disagree, fails at once (the HTTP side checks these first).
    pub fn submit(&mut self, r: Request) {
        let ctx = self.cfg.max_model_len;
        if let Some(p) = r.prompts.iter().find(|p| p.is_empty() || p.len() >= ctx) {
            let _ = r.events.send(Event::Failed(format!(
                "a prompt of {} tokens does not fit a context of {ctx}",
                p.len()
            )));
            return;
        }
        if r.max_tokens.len() != r.prompts.len() {
            let _ = r.events.send(Event::Failed(format!(
                "{} max_tokens for {} prompts",
                r.max_tokens.len(),
                r.prompts.len()
            )));
            return;
        }
        let shared = Arc::new(Shared {
            stop: r.stop,
            ignore_eos: r.ignore_eos,
            logprobs: r.logprobs,
            frequency_penalty: r.frequency_penalty,
            presence_penalty: r.presence_penalty,
            arrived: r.arrived,
            events: r.events,
        });
        for (p, (prompt, max)) in r.prompts.into_iter().zip(r.max_tokens).enumerate() {
            let budget = max.min(ctx - prompt.len());
            for k in 0..r.n {
                let choice = p * r.n + k;
                let id = self.next_id;
                self.next_id += 1;
                self.seqs.insert(
                    id,
                    Seq {
                        req: shared.clone(),
                        choice,
                        prompt_len: prompt.len(),
                        ids: prompt.clone(),
                        progress: Progress::new(budget),
                        sampler: Sampler::new(r.sampling.clone(), choice as u64),
                        last_token: None,
                    },
                );
                self.sched.enqueue(id);
            }
        }
        self.publish();
    }

    /// Sequences in the engine (running or waiting).
    pub fn pending(&self) -> usize {
        self.seqs.len()
    }

    fn drop_seq(&mut self, id: SeqId) {
        if let Some(slot) = self.sched.release(id) {
            self.cache.lens[slot] = 0;
        }
        self.seqs.remove(&id);
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.running.store(self.sched.running() as u64, Relaxed);
        m.waiting.store(self.sched.waiting() as u64, Relaxed);
        m.kv_rows_used.store(self.sched.running() as u64, Relaxed);
        let used: usize = self
            .sched
            .slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| self.cache.lens[i])
            .sum();
        m.kv_positions_used.store(used as u64, Relaxed);
    }

    /// One forward pass: drops sequences whose client left, admits waiting ones, feeds every
    /// running row its planned tokens and samples the rows whose input is all in the cache.
    pub fn step(&mut self) -> anyhow::Result<()> {
        let gone: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.req.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.metrics.aborted.fetch_add(1, Relaxed);
            self.drop_seq(id);
        }
        for (_, slot) in self.sched.admit() {
            self.cache.lens[slot] = 0;
        }
        let rows = self.cfg.max_num_seqs;
        let slots: Vec<Option<SeqId>> = self.sched.slots().to_vec();
        let lens = self.cache.lens.clone();
        let pending = |id: SeqId| {
            let slot = slots.iter().position(|&s| s == Some(id)).unwrap_or(0);
            self.seqs.get(&id).map_or(0, |s| s.ids.len() - lens[slot])
        };
        let plan = self.sched.plan(pending);
        let mut feed: Vec<Vec<u32>> = vec![Vec::new(); rows];
        for (slot, id) in slots.iter().enumerate() {
            if let (Some(id), n) = (id, plan[slot]) {
                let s = &self.seqs[id];
                let from = lens[slot];
                feed[slot] = s.ids[from..from + n].to_vec();
            }
        }
        if feed.iter().all(Vec::is_empty) {
            self.publish();
            return Ok(());
        }
        // Every running row decoding: idle rows get a filler token (their row of the cache is
        // written at position 0 and its length reset after), so the step takes the batched
        // decode path (and its CUDA graph) instead of a prefill pass.
        let decode = slots
            .iter()
            .zip(&feed)
            .all(|(s, f)| s.is_none() || f.len() == 1);
        let idle: Vec<usize> = (0..rows).filter(|&i| slots[i].is_none()).collect();
        if decode {
            for &i in &idle {
                feed[i].push(0);
            }
        }
        let t = Instant::now();
        let logits = self.model.forward_infer(&feed, &mut self.cache, false)?;
        for &i in &idle {
            self.cache.lens[i] = 0;
        }
        self.metrics.steps.fetch_add(1, Relaxed);
        // Rows whose input is now all cached produce a token.
        let ready: Vec<(usize, SeqId)> = slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| s.map(|id| (slot, id)))
            .filter(|&(slot, id)| {
                plan[slot] > 0 && self.cache.lens[slot] == self.seqs[&id].ids.len()
            })
            .collect();
        let prompt_tokens: usize = slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| s.map(|id| (slot, id)))
            .map(|(slot, id)| {
                let p = self.seqs[&id].prompt_len;
                self.cache.lens[slot].min(p) - lens[slot].min(p)
            })
            .sum();
        self.metrics
            .prompt_tokens
            .fetch_add(prompt_tokens as u64, Relaxed);
        let picks = self.sample(&logits, &ready)?;
        let now = Instant::now();
        for ((_, id), (pick, lp)) in ready.into_iter().zip(picks) {
            let tok = self.tok.clone();
            let s = self
                .seqs
                .get_mut(&id)
                .expect("ready rows are running sequences");
            s.ids.push(pick);
            let eos = &self.cfg.eos;
            let text = s
                .progress
                .push(pick, Some(&tok), &s.req.stop, eos, s.req.ignore_eos)?
                .to_string();
            match s.last_token {
                None => self
                    .metrics
                    .time_to_first_token(now.duration_since(s.req.arrived).as_secs_f64()),
                Some(t) => self
                    .metrics
                    .inter_token_latency(now.duration_since(t).as_secs_f64()),
            }
            s.last_token = Some(now);
            self.metrics.generation_tokens.fetch_add(1, Relaxed);
            let _ = s.req.events.send(Event::Token {
                choice: s.choice,
                id: pick,
                text,
                logprob: lp,
            });
            if let Some(finish) = s.progress.finish {
                let _ = s.req.events.send(Event::Done {
                    choice: s.choice,
                    finish,
                    prompt_tokens: s.prompt_len,
                    completion_tokens: s.progress.out.len(),
                });
                self.drop_seq(id);
            }
        }
        tracing::debug!(
            "step: {} rows fed, {:.1} ms",
            feed.iter().filter(|f| !f.is_empty()).count(),
            t.elapsed().as_secs_f64() * 1e3
        );
        self.publish();
        Ok(())
    }

    /// Each ready row's next token (and its log-probabilities where asked). Plain greedy rows
    /// on a GPU take the arg-max there when no row needs the logits on the host.
    fn sample(
        &mut self,
        logits: &crate::runtime::Tensor,
        ready: &[(usize, SeqId)],
    ) -> anyhow::Result<Vec<(u32, Option<TokenLogprob>)>> {
        let host_needed = ready.iter().any(|(_, id)| {
            let s = &self.seqs[id];
            !s.sampler.params.is_plain_greedy()
                || s.req.logprobs.is_some()
                || s.req.frequency_penalty != 0.0
                || s.req.presence_penalty != 0.0
        });
        if !host_needed && logits.device() != Device::Cpu {
            let ids = ops::argmax_rows(logits)?.to_vec::<i32>()?;
            return Ok(ready
                .iter()
                .map(|&(slot, _)| (ids[slot] as u32, None))
                .collect());
        }
        logits.read_f32_into(&mut self.host)?;
        let v = logits.dim(1);
        let mut out = Vec::with_capacity(ready.len());
        for &(slot, id) in ready {
            let row = &self.host[slot * v..(slot + 1) * v];
            let s = self
                .seqs
                .get_mut(&id)
                .expect("ready rows are running sequences");
            let (fp, pp) = (s.req.frequency_penalty, s.req.presence_penalty);
            let pick = if fp != 0.0 || pp != 0.0 {
                let mut l = row.to_vec();
                let mut counts: HashMap<u32, u32> = HashMap::new();
                for &t in &s.progress.out {
                    *counts.entry(t).or_default() += 1;
                }
                for (&t, &c) in &counts {
                    if let Some(x) = l.get_mut(t as usize) {
                        *x -= fp * c as f32 + pp;
                    }
                }
                s.sampler.sample(&l, &s.ids)
            } else {
                s.sampler.sample(row, &s.ids)
            };
            let lp = match s.req.logprobs {
                Some(k) => Some(token_logprobs(&self.tok, row, pick, k)?),
                None => None,
            };
            out.push((pick, lp));
        }
        Ok(out)
    }
}

/// `pick`'s log-probability under the softmax of `row`, and the `k` most likely tokens'.
fn token_logprobs(
    tok: &Tokenizer,
    row: &[f32],
    pick: u32,
    k: usize,
) -> anyhow::Result<TokenLogprob> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + row
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let k = k.min(row.len());
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b))
        });
    }
    idx.truncate(k);
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    let top = idx
        .iter()
        .map(|&i| Ok((tok.decode(&[i])?, row[i as usize] - lse)))
        .collect::<crate::infer::Result<Vec<_>>>()?;
    Ok(TokenLogprob {
        token: tok.decode(&[pick])?,
        logprob: row[pick as usize] - lse,
        top,
    })
}
