//! The KV cache: per-layer K/V [B, Hkv, max_len, hd] and each sequence's length, with its decode
//! state (the step's plan, device input buffers, recorded graphs: `plan.rs`, `graphs.rs`); a pool
//! keeps finished caches so a later request of the same shape reuses their recorded steps.

use super::plan::StepPlan;
use super::{Model, ModelError, Result, PREFILL_TOKENS};
use crate::runtime::{KernelSettings, Tensor};

/// Caches `Model::recycle_kv_cache` keeps (the oldest go first).
const CACHE_POOL: usize = 4;
/// `Model::pooled_kv_cache` rounds lengths up to a multiple of this.
const CACHE_BUCKET: usize = 128;

/// Per-layer K/V caches [B, Hkv, max_len, hd] and each sequence's cached length.
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub lens: Vec<usize>,
    pub max_len: usize,
    /// Decode steps on a GPU through a CUDA graph (default `KernelSettings::cuda_graphs`). While
    /// a step is being recorded no other thread may issue work on the device.
    pub use_graphs: bool,
    /// Most rows one prefill pass runs (default `PREFILL_TOKENS`).
    pub prefill_tokens: usize,
    /// The kernel settings in force when the cache was made: its plans are decided by them.
    pub(super) settings: KernelSettings,
    /// Made at the first decode step and kept, also through `Model::recycle_kv_cache`: its plan
    /// holds what it derived from the weights (folded routers), so caches are recycled only
    /// while the weights stay as they are (generation; training's samples take fresh caches).
    pub(super) decode: Option<Box<DecodeState>>,
}

impl KvCache {
    /// Chained greedy decode steps launched and not yet read (`Model::decode_greedy_wait`).
    pub fn decode_in_flight(&self) -> usize {
        self.decode.as_ref().map_or(0, |st| st.in_flight.len())
    }

    /// The decode plan (kernels per block) once the cache has decoded a step.
    pub fn decode_plan(&self) -> Option<&StepPlan> {
        self.decode.as_ref().map(|st| &st.plan)
    }
}

/// The device inputs of one decode step: token ids, positions, lengths after the step, and
/// the cache row of each sequence, all [B] i32.
pub(super) struct DecodeInputs {
    pub ids: Tensor,
    pub pos: Tensor,
    pub lens: Tensor,
    pub seqs: Tensor,
}

/// A cache's decode step: its plan, its input and output buffers (fixed addresses) and graph.
pub(super) struct DecodeState {
    pub plan: StepPlan,
    pub inputs: DecodeInputs,
    pub out: Tensor,
    pub graph: Option<crate::runtime::cuda::graph::Graph>,
    pub steps: usize,
    /// Chained greedy steps (`Model::decode_greedy_launch`): their own recorded step (logits
    /// → arg-max written into the inputs, positions and lengths advanced), the page-locked
    /// buffers their ids come back through, and the slots of the steps not yet waited for.
    pub greedy_graph: Option<crate::runtime::cuda::graph::Graph>,
    pub readback: Vec<crate::runtime::cuda::HostReadback>,
    pub in_flight: std::collections::VecDeque<usize>,
    /// The device inputs hold the step after the last one launched (a chained step ran last).
    pub chained: bool,
}

/// A decode step's positions (the tokens already cached) and lengths after it, from the
/// cache's lengths.
pub(super) fn step_positions(lens: &[usize]) -> (Vec<i32>, Vec<i32>) {
    (
        lens.iter().map(|&l| l as i32).collect(),
        lens.iter().map(|&l| l as i32 + 1).collect(),
    )
}

impl DecodeInputs {
    /// Uploads one step's ids, positions and lengths.
    pub fn set(&mut self, ids: &[i32], pos: &[i32], lens: &[i32]) -> crate::runtime::Result<()> {
        self.ids.copy_from_host(ids)?;
        self.pos.copy_from_host(pos)?;
        self.lens.copy_from_host(lens)
    }
}

impl Model {
    /// A cache for `batch` sequences of `max_len` positions, decoding by the current settings.
    pub fn new_kv_cache(&self, batch: usize, max_len: usize) -> Result<KvCache> {
        let c = &self.config;
        if max_len > c.max_seq_len {
            return Err(ModelError::Invalid(format!("a cache of {max_len} positions exceeds the model's context of {} (max_position_embeddings)", c.max_seq_len)));
        }
        let settings = KernelSettings::current();
        let shape = [batch, c.n_kv_heads, max_len, c.head_dim];
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..c.n_layers() {
            k.push(Tensor::zeros(&shape, self.dtype, self.device)?);
            v.push(Tensor::zeros(&shape, self.dtype, self.device)?);
        }
        Ok(KvCache {
            k,
            v,
            lens: vec![0; batch],
            max_len,
            use_graphs: settings.cuda_graphs,
            prefill_tokens: PREFILL_TOKENS,
            settings,
            decode: None,
        })
    }

    /// A cache for `batch` sequences of at least `max_len` positions (rounded up to a multiple
    /// of 128 within the context): a recycled one of that shape when there is one — its decode
    /// steps already recorded as CUDA graphs, so a request does not pay for recording them
    /// again — else a new one. Hand it back with `recycle_kv_cache`.
    pub fn pooled_kv_cache(&self, batch: usize, max_len: usize) -> Result<KvCache> {
        let len = max_len
            .div_ceil(CACHE_BUCKET)
            .saturating_mul(CACHE_BUCKET)
            .min(self.config.max_seq_len)
            .max(max_len);
        let settings = KernelSettings::current();
        let mut pool = self.cache_pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pool.iter().position(|c| {
            c.lens.len() == batch
                && c.max_len == len
                && c.use_graphs == settings.cuda_graphs
                && c.settings == settings
        }) {
            let mut c = pool.remove(i);
            c.lens.iter_mut().for_each(|l| *l = 0);
            c.prefill_tokens = PREFILL_TOKENS;
            return Ok(c);
        }
        drop(pool);
        self.new_kv_cache(batch, len)
    }

    /// Keeps `cache` for a later `pooled_kv_cache` of its shape (at most a few are kept; the
    /// oldest is freed first). Steps still in flight are waited for. The cache keeps what it
    /// derived from the weights (its plan's folded routers), so recycle only while they do not change.
    pub fn recycle_kv_cache(&self, mut cache: KvCache) -> Result<()> {
        self.decode_greedy_discard(&mut cache)?;
        if let Some(st) = cache.decode.as_mut() {
            st.chained = false;
        }
        let mut pool = self.cache_pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.push(cache);
        if pool.len() > CACHE_POOL {
            pool.remove(0);
        }
        Ok(())
    }
}
