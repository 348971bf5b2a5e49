//! Decode steps as CUDA graphs: a cache's decode state (plan, fixed input/output buffers) is made
//! at its first decode step, the step recorded at its second and replayed after; greedy decoding
//! chains recorded steps on the GPU (arg-max written into the next step's inputs) with at most
//! `GREEDY_IN_FLIGHT` steps waiting to be read.

use super::kv_cache::{step_positions, DecodeInputs, DecodeState, KvCache};
use super::{Model, ModelError, Result};
use crate::runtime::ops;
use crate::runtime::{DType, Device, Tensor};

/// Greedy steps a chain may have launched and not yet waited for.
pub const GREEDY_IN_FLIGHT: usize = 2;

impl Model {
    /// A decode step through a CUDA graph kept in the cache: the first step runs eagerly (kernels
    /// compiled, memory pool grown), the second is recorded, every later one is a single graph
    /// launch after copying the step's ids and positions into the graph's input buffers. If the
    /// capture fails the cache falls back to eager steps (and says so once).
    pub(super) fn decode_graphed(
        &self,
        cache: &mut KvCache,
        ids: &[i32],
        pos: &[i32],
        lens: &[i32],
    ) -> Result<Tensor> {
        let dev = self.device;
        self.decode_state(cache)?;
        let KvCache {
            k,
            v,
            decode,
            use_graphs,
            ..
        } = cache;
        let st = decode.as_mut().expect("decode state was just created");
        st.chained = false;
        st.inputs.set(ids, pos, lens)?;
        if st.graph.is_none() {
            if st.steps == 0 {
                st.steps += 1;
                return self.decode_body(&st.inputs, k, v, &st.plan);
            }
            let Device::Cuda(ordinal) = dev else {
                return self.decode_body(&st.inputs, k, v, &st.plan);
            };
            let cu = crate::runtime::cuda::device(ordinal)?;
            let (inputs, out, plan) = (&st.inputs, &mut st.out, &st.plan);
            let captured = cu.capture(|| {
                let logits = self.decode_body(inputs, k, v, plan)?;
                Ok::<(), ModelError>(ops::write_rows(out, 0, &logits)?)
            });
            match captured {
                Ok(((), g)) => st.graph = Some(g),
                Err(e) => {
                    tracing::warn!("CUDA graph capture of the decode step failed ({e}); decoding without graphs");
                    *use_graphs = false;
                    return self.decode_body(&st.inputs, k, v, &st.plan);
                }
            }
        }
        st.steps += 1;
        st.graph.as_ref().expect("graph captured above").launch()?;
        Ok(st.out.try_clone()?)
    }

    /// Creates the cache's decode state (its decode plan, device input buffers for its batch) if
    /// it has none.
    pub(super) fn decode_state(&self, cache: &mut KvCache) -> Result<()> {
        if cache.decode.is_some() {
            return Ok(());
        }
        let (bsz, dev) = (cache.lens.len(), self.device);
        let plan = self.decode_plan(bsz, &cache.settings)?;
        tracing::info!("decode plan, batch {bsz}, {} on {dev}:\n{plan}", self.dtype);
        let seqs: Vec<i32> = (0..bsz as i32).collect();
        let readback = match dev {
            Device::Cuda(o) => (0..GREEDY_IN_FLIGHT)
                .map(|_| crate::runtime::cuda::HostReadback::new(o, 4 * bsz))
                .collect::<crate::runtime::Result<Vec<_>>>()?,
            Device::Cpu => Vec::new(),
        };
        cache.decode = Some(Box::new(DecodeState {
            plan,
            inputs: DecodeInputs {
                ids: Tensor::zeros(&[bsz], DType::I32, dev)?,
                pos: Tensor::zeros(&[bsz], DType::I32, dev)?,
                lens: Tensor::zeros(&[bsz], DType::I32, dev)?,
                seqs: Tensor::from_slice(&seqs, &[bsz], dev)?,
            },
            out: Tensor::zeros(&[bsz, self.config.vocab_size], DType::F32, dev)?,
            graph: None,
            steps: 0,
            greedy_graph: None,
            readback,
            in_flight: std::collections::VecDeque::new(),
            chained: false,
        }));
        Ok(())
    }

    /// Whether `decode_greedy_launch` applies to this cache: a GPU model decoding through CUDA
    /// graphs.
    pub fn greedy_chain_supported(&self, cache: &KvCache) -> bool {
        self.device.is_cuda() && cache.use_graphs
    }

    /// Queues one greedy decode step for every sequence of the cache and returns without
    /// waiting for it (`decode_greedy_wait` gives its ids, in launch order). The step's inputs
    /// are `ids` (one per sequence), or with None the ids the previous chained step picked: its
    /// arg-max was written on the device into the buffers this step reads, positions and lengths
    /// advanced there too, so chained steps run back to back with no host round trip between
    /// them and the host reads step t's ids while step t + 1 runs. Every sequence needs room for
    /// one more position; at most `GREEDY_IN_FLIGHT` steps may be waiting. A step launched
    /// speculatively and not needed is undone with `decode_greedy_discard`.
    pub fn decode_greedy_launch(&self, cache: &mut KvCache, ids: Option<&[u32]>) -> Result<()> {
        let Device::Cuda(ordinal) = self.device else {
            return Err(ModelError::Invalid(
                "chained greedy decoding needs a CUDA device".into(),
            ));
        };
        let bsz = cache.lens.len();
        if let Some(i) = cache.lens.iter().position(|&l| l >= cache.max_len) {
            return Err(ModelError::Invalid(format!(
                "sequence {i}: the cache of {} positions is full",
                cache.max_len
            )));
        }
        self.decode_state(cache)?;
        let KvCache {
            k,
            v,
            decode,
            lens,
            use_graphs,
            ..
        } = cache;
        let st = decode.as_mut().expect("decode state was just created");
        if st.in_flight.len() >= GREEDY_IN_FLIGHT {
            return Err(ModelError::Invalid(format!(
                "{GREEDY_IN_FLIGHT} chained decode steps are already waiting to be read"
            )));
        }
        match ids {
            Some(ids) => {
                if ids.len() != bsz {
                    return Err(ModelError::Invalid(format!(
                        "{} ids for a cache of {bsz} sequences",
                        ids.len()
                    )));
                }
                if let Some(&bad) = ids
                    .iter()
                    .find(|&&id| id as usize >= self.config.vocab_size)
                {
                    return Err(ModelError::Invalid(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.config.vocab_size
                    )));
                }
                let ids: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
                let (pos, next) = step_positions(lens);
                st.inputs.set(&ids, &pos, &next)?;
            }
            None if st.chained => {}
            None => {
                return Err(ModelError::Invalid(
                    "no chained decode step to continue from: give the first step's ids".into(),
                ))
            }
        }
        let step = |st: &mut DecodeState, k: &mut [Tensor], v: &mut [Tensor]| -> Result<()> {
            let logits = self.decode_body(&st.inputs, k, v, &st.plan)?;
            let DecodeInputs { ids, pos, lens, .. } = &mut st.inputs;
            Ok(ops::argmax_rows_advance(&logits, ids, pos, lens)?)
        };
        // The first step runs eagerly (kernels compiled, memory pool grown), the second is
        // recorded; if recording fails the chain goes on eagerly (and says so once).
        if st.greedy_graph.is_none() && st.steps > 0 && *use_graphs {
            let cu = crate::runtime::cuda::device(ordinal)?;
            match cu.capture(|| step(st, k, v)) {
                Ok(((), g)) => st.greedy_graph = Some(g),
                Err(e) => {
                    tracing::warn!("CUDA graph capture of the greedy decode step failed ({e}); decoding without graphs");
                    *use_graphs = false;
                }
            }
        }
        st.steps += 1;
        match &st.greedy_graph {
            Some(g) => g.launch()?,
            None => step(st, k, v)?,
        }
        let slot = (0..GREEDY_IN_FLIGHT)
            .find(|s| !st.in_flight.contains(s))
            .expect("fewer than GREEDY_IN_FLIGHT steps are in flight");
        st.readback[slot].fetch(&st.inputs.ids)?;
        st.in_flight.push_back(slot);
        st.chained = true;
        for l in lens.iter_mut() {
            *l += 1;
        }
        Ok(())
    }

    /// The ids the oldest chained step not yet read picked, one per sequence (blocks until it
    /// has run).
    pub fn decode_greedy_wait(&self, cache: &mut KvCache) -> Result<Vec<u32>> {
        let st = cache
            .decode
            .as_mut()
            .ok_or_else(|| ModelError::Invalid("no chained decode step was launched".into()))?;
        let slot = st
            .in_flight
            .pop_front()
            .ok_or_else(|| ModelError::Invalid("no chained decode step is waiting".into()))?;
        Ok(st.readback[slot]
            .wait_i32()?
            .into_iter()
            .map(|id| id as u32)
            .collect())
    }

    /// Waits for every chained step not yet read and takes them back: the cache's lengths return
    /// to what they were before those steps (the K/V rows they wrote past that are ignored and
    /// overwritten later). Returns how many steps were discarded.
    pub fn decode_greedy_discard(&self, cache: &mut KvCache) -> Result<usize> {
        let mut n = 0;
        while cache
            .decode
            .as_ref()
            .is_some_and(|st| !st.in_flight.is_empty())
        {
            self.decode_greedy_wait(cache)?;
            n += 1;
        }
        for l in cache.lens.iter_mut() {
            *l -= n;
        }
        if let Some(st) = cache.decode.as_mut() {
            st.chained = st.chained && n == 0;
        }
        Ok(n)
    }
}
