//! Batched generation: prefill every prompt into a per-layer KV cache, then decode one token per
//! live sequence per step, each sequence with its own sampler, stop rules and streaming text.

use std::time::Instant;

use rayon::prelude::*;

use super::sampler::{Sampler, SamplingParams};
use super::text::{StreamDecoder, Tokenizer};
use super::{Error, Result};
use crate::model::Model;
use crate::runtime::{ops, Device};

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these (it is cut before the stop string).
    pub stop: Vec<String>,
    /// End-of-sequence ids (generation_config.json's, or the config's).
    pub eos: Vec<u32>,
    pub ignore_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Eos,
    Stop,
    Length,
}

/// One finished sequence.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// Generated ids, an ending EOS included (as transformers returns it).
    pub completion_ids: Vec<u32>,
    /// The completion's text (special tokens skipped; cut at a stop string).
    pub text: String,
    pub finish: Finish,
}

/// Wall-clock split of a `generate` call.
#[derive(Clone, Copy, Debug, Default)]
pub struct GenTiming {
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Decode forward passes (each advances every live sequence by one token).
    pub decode_steps: usize,
    /// Tokens produced after the first (the first comes from the prefill).
    pub decode_tokens: usize,
}

/// Per-sequence progress.
struct Seq {
    ids: Vec<u32>,
    sampler: Sampler,
    p: Progress,
}

/// One sequence's completion so far: its ids, text, stop rules and what of the text was shown
/// (shared by `generate` and the server's engine).
pub struct Progress {
    /// Generated ids, an ending EOS included.
    pub out: Vec<u32>,
    /// The completion's text (cut at a stop string once one appears).
    pub text: String,
    /// Bytes of `text` already handed to the caller.
    emitted: usize,
    stream: StreamDecoder,
    /// Most ids to generate.
    pub budget: usize,
    pub finish: Option<Finish>,
}

impl Progress {
    pub fn new(budget: usize) -> Progress {
        Progress {
            out: Vec::new(),
            text: String::new(),
            emitted: 0,
            stream: StreamDecoder::new(),
            budget,
            finish: (budget == 0).then_some(Finish::Length),
        }
    }

    /// Takes the next generated id: extends the text, applies EOS, stop strings and the token
    /// budget, and returns the text newly safe to show (valid UTF-8, never part of a stop
    /// string; all that is left once the sequence has finished).
    pub fn push(
        &mut self,
        id: u32,
        tok: Option<&Tokenizer>,
        stop: &[String],
        eos: &[u32],
        ignore_eos: bool,
    ) -> Result<&str> {
        self.out.push(id);
        let is_eos = !ignore_eos && eos.contains(&id);
        if let (false, Some(tok)) = (is_eos, tok) {
            self.text += &self.stream.push(tok, id)?;
        }
        if let Some(pos) = stop
            .iter()
            .filter_map(|st| self.text.find(st.as_str()))
            .min()
        {
            self.text.truncate(pos);
            self.finish = Some(Finish::Stop);
        } else if is_eos {
            self.finish = Some(Finish::Eos);
        } else if self.out.len() >= self.budget {
            self.finish = Some(Finish::Length);
        }
        if let (Some(f), Some(tok)) = (self.finish, tok) {
            if f != Finish::Stop {
                self.text += &self.stream.finish(tok)?;
            }
        }
        let show = if self.finish.is_some() {
            self.text.len()
        } else {
            safe_len(&self.text, stop)
        };
        let from = self.emitted.min(show);
        self.emitted = self.emitted.max(show);
        Ok(&self.text[from..show])
    }
}

/// Longest prefix of `text` that cannot be the start of a stop string (what is safe to show).
fn safe_len(text: &str, stop: &[String]) -> usize {
    let mut cut = text.len();
    for s in stop {
        for k in (1..s.len()).rev() {
            if text.len() >= k && s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                cut = cut.min(text.len() - k);
                break;
            }
        }
    }
    cut
}

/// Generates a completion for each prompt. `on_text(i, piece)` receives sequence i's text as it
/// completes (valid UTF-8, never part of a stop string). Without a tokenizer (benchmarks on
/// random ids) there is no text and stop strings do not apply.
pub fn generate(
    model: &Model,
    tok: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    opts: &GenOptions,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<(Vec<Generation>, GenTiming)> {
    opts.sampling.validate().map_err(Error::Invalid)?;
    if prompts.is_empty() {
        return Ok((Vec::new(), GenTiming::default()));
    }
    let context = model.config.max_seq_len;
    let vocab = model.config.vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::Invalid(format!(
                "prompt {i} is empty (no tokens to start from)"
            )));
        }
        if p.len() >= context {
            return Err(Error::Invalid(format!(
                "prompt {i} has {} tokens; the model's context is {context} positions \
                 (max_position_embeddings), leaving no room to generate",
                p.len()
            )));
        }
        if let Some(&bad) = p.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Invalid(format!(
                "prompt {i}: token id {bad} is outside the model's vocabulary of {vocab} (does \
                 tokenizer.json belong to this model?)"
            )));
        }
    }
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let budget = opts.max_new_tokens.min(context - p.len());
            if budget < opts.max_new_tokens {
                tracing::warn!(
                    "prompt {i}: {} tokens + {} new exceed the context of {context}; generating \
                     at most {budget}",
                    p.len(),
                    opts.max_new_tokens
                );
            }
            Seq {
                ids: p.clone(),
                sampler: Sampler::new(opts.sampling.clone(), i as u64),
                p: Progress::new(budget),
            }
        })
        .collect();
    // Room for every sequence to take max_new_tokens steps (within the context), so finished
    // sequences can keep being fed while others decode: the step stays one batched decode.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let cache_len = (longest + opts.max_new_tokens).min(context).max(1);
    let mut cache = model.pooled_kv_cache(prompts.len(), cache_len)?;
    let mut timing = GenTiming::default();
    let t0 = Instant::now();
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    let mut first = true;
    let device_greedy = opts.sampling.is_plain_greedy();
    // The step's logits on the host, reused across steps.
    let mut host: Vec<f32> = Vec::new();
    // Chained greedy steps (GPU, CUDA graphs): each step's arg-max feeds the next on the device,
    // and step t + 1 is launched before step t's ids are read, so the GPU never waits for the
    // host. Only a step that may be needed is launched ahead: one whose sequences are not all
    // at their token budget (an EOS or stop string can still end them first: that one step is
    // then discarded). The chain is running while a launched step waits to be read.
    loop {
        let picks: Vec<Option<u32>> = if cache.decode_in_flight() > 0 {
            let ahead = seqs
                .iter()
                .any(|s| s.p.finish.is_none() && s.p.out.len() + 1 < s.p.budget);
            if ahead && cache.lens.iter().all(|&l| l < cache.max_len) {
                model.decode_greedy_launch(&mut cache, None)?;
            }
            let ids = model.decode_greedy_wait(&mut cache)?;
            seqs.iter()
                .zip(ids)
                .map(|(s, id)| s.p.finish.is_none().then_some(id))
                .collect()
        } else {
            step_picks(
                model,
                &feed,
                &mut cache,
                &mut seqs,
                device_greedy,
                &mut host,
            )?
        };
        if first {
            timing.prefill_s = t0.elapsed().as_secs_f64();
            first = false;
        } else {
            timing.decode_steps += 1;
        }
        for (i, (s, pick)) in seqs.iter_mut().zip(picks).enumerate() {
            feed[i].clear();
            let Some(id) = pick else {
                continue;
            };
            s.ids.push(id);
            let piece = s.p.push(id, tok, &opts.stop, &opts.eos, opts.ignore_eos)?;
            if !piece.is_empty() {
                on_text(i, piece);
            }
            if s.p.finish.is_none() {
                feed[i].push(id);
            }
        }
        // Finished sequences get a filler token (its output is ignored) while there is room, so
        // the step stays a batched decode (and its CUDA graph) instead of per-sequence passes.
        for (i, s) in seqs.iter().enumerate() {
            if s.p.finish.is_some() && cache.lens[i] + 1 < cache.max_len {
                feed[i].push(*s.ids.last().unwrap_or(&0));
            }
        }
        if seqs.iter().all(|s| s.p.finish.is_some()) {
            break;
        }
        // Start the chain once every sequence is fed one token (its first step takes them
        // from the host) and every cache row has room; it ends when a step is not launched
        // (for want of room, which a new start would miss too).
        if cache.decode_in_flight() == 0
            && device_greedy
            && chain_enabled()
            && cache.lens.iter().all(|&l| l < cache.max_len)
            && model.greedy_chain_supported(&cache)
            && feed.iter().all(|f| f.len() == 1)
        {
            let ids: Vec<u32> = feed.iter().map(|f| f[0]).collect();
            model.decode_greedy_launch(&mut cache, Some(&ids))?;
        }
    }
    // A step launched ahead that no sequence needed (they ended by EOS or a stop string).
    model.decode_greedy_discard(&mut cache)?;
    timing.decode_s = t0.elapsed().as_secs_f64() - timing.prefill_s;
    model.recycle_kv_cache(cache)?;
    timing.decode_tokens = seqs.iter().map(|s| s.p.out.len().saturating_sub(1)).sum();
    let out = seqs
        .into_iter()
        .zip(prompts)
        .map(|(s, p)| Generation {
            prompt_ids: p.clone(),
            completion_ids: s.p.out,
            text: s.p.text,
            finish: s.p.finish.unwrap_or(Finish::Length),
        })
        .collect();
    Ok((out, timing))
}

/// Chained greedy steps unless `KernelSettings::greedy_chain` is off (A/B comparisons).
fn chain_enabled() -> bool {
    crate::runtime::KernelSettings::current().greedy_chain
}

/// One step through `Model::forward_infer` (prefill, or a decode step fed from the host): each
/// live sequence's next id. Greedy without a penalty on the GPU takes the arg-max there and only
/// the ids come back; otherwise each live sequence samples its row on the host, in parallel.
fn step_picks(
    model: &Model,
    feed: &[Vec<u32>],
    cache: &mut crate::model::KvCache,
    seqs: &mut [Seq],
    device_greedy: bool,
    host: &mut Vec<f32>,
) -> Result<Vec<Option<u32>>> {
    let logits = model.forward_infer(feed, cache, false)?;
    if logits.rank() != 2 || logits.dim(0) != seqs.len() {
        return Err(Error::Invalid(format!(
            "the model returned logits {:?} for {} sequences",
            logits.shape(),
            seqs.len()
        )));
    }
    if device_greedy && logits.device() != Device::Cpu {
        let ids = ops::argmax_rows(&logits)?.to_vec::<i32>()?;
        return Ok(seqs
            .iter()
            .zip(ids)
            .map(|(s, id)| s.p.finish.is_none().then_some(id as u32))
            .collect());
    }
    logits.read_f32_into(host)?;
    let v = logits.dim(1);
    Ok(seqs
        .par_iter_mut()
        .zip(host.par_chunks(v.max(1)))
        .map(|(s, row)| match s.p.finish {
            None => Some(s.sampler.sample(row, &s.ids)),
            Some(_) => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_prefixes_are_held_back() {
        let stop = vec!["</end>".to_string()];
        assert_eq!(safe_len("abc</e", &stop), 3);
        assert_eq!(safe_len("abc", &stop), 3);
        assert_eq!(safe_len("abc<", &stop), 3);
        assert_eq!(safe_len("ab", &[]), 2);
    }
}
