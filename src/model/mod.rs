//! The decoder-only transformer: embedding → blocks (RMSNorm → attention → residual → RMSNorm →
//! dense MLP or MoE → residual) → RMSNorm → LM head, for Llama / Qwen2 / Qwen3 / Mixtral /
//! Qwen2-MoE / Qwen3-MoE / OLMoE checkpoints (`hf`) and native training configs. Forward and
//! backward are hand-written per layer (`attention`, `crate::moe`); training fuses the LM head with
//! the cross-entropy in row chunks and computes their gradient in the forward pass.
//!
//! Activation memory per block without recompute (T = B·S tokens, bf16 on GPU): x, the norms'
//! outputs, q/k/v/context (≈ 4·T·H·hd), attention probabilities (H·S·T; with the fused attention
//! on CUDA only their log-sum-exp, H·T), and the FFN's hidden
//! activations (dense: 3·T·F; MoE: h, a, y_perm ≈ T·k·(d + 3F); x is read through the dispatch
//! permutation, not kept, on Hopper). With `recompute` only
//! each block's input (T·d) is kept and the block is re-run in the backward.

mod attention;
pub mod config;
mod hf;
mod weights;

use attention::AttnIn;
pub use attention::{Attention, AttnShape, Span};
pub use config::{Arch, Ffn, LayerConfig, ModelConfig, NativeMoe, NativeSpec, QkNorm, RopeScaling};
pub use weights::{save as save_safetensors, Checkpoint};

use std::path::{Path, PathBuf};

use crate::moe::{self, DenseMlp, DenseSaved, ExpertKind, MoeSaved, MoeWeights};
use crate::param_set;
use crate::runtime::ops::{self, Matmul, RopeTable};
use crate::runtime::{DType, Device, ParamSet, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("{path}: tensor `{name}` {msg}")]
    Tensor {
        path: String,
        name: String,
        msg: String,
    },
    #[error("tensor `{name}` is missing from the checkpoint ({files})")]
    Missing { name: String, files: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
}

impl ModelError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> ModelError {
        ModelError::File {
            path: path.display().to_string(),
            msg: e.to_string(),
        }
    }
    pub(crate) fn file(path: &Path, msg: impl Into<String>) -> ModelError {
        ModelError::File {
            path: path.display().to_string(),
            msg: msg.into(),
        }
    }
    pub(crate) fn tensor(path: &Path, name: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Tensor {
            path: path.display().to_string(),
            name: name.to_string(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub enum FfnWeights {
    Dense(DenseMlp),
    Moe(MoeWeights),
}

impl ParamSet for FfnWeights {
    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(&str, &'a Tensor)) {
        match self {
            FfnWeights::Dense(m) => m.visit(p, f),
            FfnWeights::Moe(m) => m.visit(p, f),
        }
    }
    fn visit_mut<'a>(&'a mut self, p: &str, f: &mut dyn FnMut(&str, &'a mut Tensor)) {
        match self {
            FfnWeights::Dense(m) => m.visit_mut(p, f),
            FfnWeights::Moe(m) => m.visit_mut(p, f),
        }
    }
}

pub struct Block {
    pub attn_norm: Tensor,
    pub attn: Attention,
    pub ffn_norm: Tensor,
    pub ffn: FfnWeights,
}
param_set!(Block { t attn_norm, set attn, t ffn_norm, set ffn });

/// All trained tensors (weights in the model dtype; gradients f32 with the same names).
pub struct Params {
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    pub lm_head: Option<Tensor>,
}

impl ParamSet for Params {
    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(&str, &'a Tensor)) {
        f(&crate::runtime::params::join(p, "embed"), &self.embed);
        for (i, b) in self.blocks.iter().enumerate() {
            b.visit(&crate::runtime::params::join(p, &format!("blocks.{i}")), f);
        }
        f(&crate::runtime::params::join(p, "norm"), &self.norm);
        if let Some(h) = &self.lm_head {
            f(&crate::runtime::params::join(p, "lm_head"), h);
        }
    }
    fn visit_mut<'a>(&'a mut self, p: &str, f: &mut dyn FnMut(&str, &'a mut Tensor)) {
        f(&crate::runtime::params::join(p, "embed"), &mut self.embed);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_mut(&crate::runtime::params::join(p, &format!("blocks.{i}")), f);
        }
        f(&crate::runtime::params::join(p, "norm"), &mut self.norm);
        if let Some(h) = &mut self.lm_head {
            f(&crate::runtime::params::join(p, "lm_head"), h);
        }
    }
}

pub type Grads = Params;

impl Params {
    /// The routed experts' weights (w1 and w2 of every MoE layer): in a gradient set, the
    /// tensors whose squared norm `Model::backward_with` sums in the GEMM epilogues.
    pub fn routed_expert_weights(&self) -> Vec<&Tensor> {
        self.blocks
            .iter()
            .filter_map(|b| match &b.ffn {
                FfnWeights::Moe(m) => Some([&m.w1, &m.w2]),
                FfnWeights::Dense(_) => None,
            })
            .flatten()
            .collect()
    }

    /// Zeros of `dtype` shaped like every parameter (f32: a gradient accumulator).
    pub fn zeros_like(&self, dtype: DType) -> crate::runtime::Result<Params> {
        self.grads_like(dtype, dtype, true)
    }

    /// `zeros_like(f32)` except the routed experts' w1 and w2, which are zeros of `experts`
    /// (`train.expert_grad_dtype`).
    pub fn zero_grads(&self, experts: DType) -> crate::runtime::Result<Grads> {
        self.grads_like(DType::F32, experts, true)
    }

    /// Gradient buffers for one optimizer step: f32 zeros, except the routed experts' weight
    /// gradients (w1, w2 of every MoE layer), of dtype `experts` (f32, or the parameters' dtype
    /// to halve their bytes: `train.expert_grad_dtype`) and left unwritten — the step's first
    /// `Model::backward_first` writes them rather than adding, so neither a memset nor a read
    /// of those bytes (most of an MoE model's) is spent. Use `zero_grads` when no
    /// `backward_first` will run.
    pub fn grad_buffers(&self, experts: DType) -> crate::runtime::Result<Grads> {
        self.grads_like(DType::F32, experts, false)
    }

    fn grads_like(
        &self,
        dtype: DType,
        experts: DType,
        zero_experts: bool,
    ) -> crate::runtime::Result<Params> {
        let z = |t: &Tensor| Tensor::zeros(t.shape(), dtype, t.device());
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(Block {
                    attn_norm: z(&b.attn_norm)?,
                    attn: Attention {
                        q: z(&b.attn.q)?,
                        k: z(&b.attn.k)?,
                        v: z(&b.attn.v)?,
                        o: z(&b.attn.o)?,
                        q_bias: b.attn.q_bias.as_ref().map(z).transpose()?,
                        k_bias: b.attn.k_bias.as_ref().map(z).transpose()?,
                        v_bias: b.attn.v_bias.as_ref().map(z).transpose()?,
                        q_norm: b.attn.q_norm.as_ref().map(z).transpose()?,
                        k_norm: b.attn.k_norm.as_ref().map(z).transpose()?,
                    },
                    ffn_norm: z(&b.ffn_norm)?,
                    ffn: match &b.ffn {
                        FfnWeights::Dense(m) => FfnWeights::Dense(DenseMlp {
                            w1: z(&m.w1)?,
                            b1: m.b1.as_ref().map(z).transpose()?,
                            w2: z(&m.w2)?,
                            b2: m.b2.as_ref().map(z).transpose()?,
                        }),
                        FfnWeights::Moe(m) => {
                            FfnWeights::Moe(m.grads_as(dtype, experts, zero_experts)?)
                        }
                    },
                })
            })
            .collect::<crate::runtime::Result<Vec<_>>>()?;
        Ok(Params {
            embed: z(&self.embed)?,
            blocks,
            norm: z(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(z).transpose()?,
        })
    }

    /// The MoE selection biases (optimizer-free state, saved in checkpoints): (name, tensor).
    pub fn visit_state<'a>(&'a self, f: &mut dyn FnMut(&str, &'a Tensor)) {
        for (i, b) in self.blocks.iter().enumerate() {
            if let FfnWeights::Moe(m) = &b.ffn {
                if let Some(rb) = &m.router_bias {
                    f(&format!("blocks.{i}.ffn.router_bias"), rb);
                }
            }
        }
    }

    /// Mutable `visit_state`.
    pub fn visit_state_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            if let FfnWeights::Moe(m) = &mut b.ffn {
                if let Some(rb) = &mut m.router_bias {
                    f(&format!("blocks.{i}.ffn.router_bias"), rb);
                }
            }
        }
    }
}

pub struct Model {
    pub config: ModelConfig,
    pub params: Params,
    pub device: Device,
    pub dtype: DType,
    rope: RopeTable,
    /// Caches handed back with `recycle_kv_cache`, with their recorded decode steps, for the
    /// next `pooled_kv_cache` of the same batch and length bucket.
    cache_pool: std::sync::Mutex<Vec<KvCache>>,
}

/// Caches `Model::recycle_kv_cache` keeps (the oldest go first).
const CACHE_POOL: usize = 4;
/// `Model::pooled_kv_cache` rounds lengths up to a multiple of this.
const CACHE_BUCKET: usize = 128;

/// Options of one training forward.
#[derive(Clone, Copy, Debug)]
pub struct TrainOpts {
    /// Keep only block inputs; re-run each block in the backward.
    pub recompute: bool,
    /// Seed of the MoE noisy gates / random token selection for this step.
    pub seed: u64,
    /// Factor applied to the loss gradient (e.g. 1 / gradient-accumulation steps).
    pub loss_scale: f32,
}

impl Default for TrainOpts {
    fn default() -> Self {
        TrainOpts {
            recompute: false,
            seed: 0,
            loss_scale: 1.0,
        }
    }
}

pub struct StepOutput {
    /// [1] f32 mean cross-entropy over the non-ignored targets.
    pub loss: Tensor,
    /// [1] f32 sum over MoE layers of the aux / z losses (already times their coefficients).
    pub aux_loss: Tensor,
    pub z_loss: Tensor,
    /// Per MoE layer (layer index, [E] i32 tokens routed, [E] f32 dropped).
    pub expert_load: Vec<(usize, Tensor, Tensor)>,
}

enum FfnSaved {
    Dense(DenseSaved),
    Moe(MoeSaved),
}

enum BlockSaved {
    Full {
        h1: Tensor,
        rstd1: Tensor,
        attn: attention::AttnSaved,
        x_mid: Tensor,
        h2: Tensor,
        rstd2: Tensor,
        ffn: FfnSaved,
    },
    Input,
}

/// What `backward` needs from `forward_train`.
pub struct Saved {
    b: usize,
    s: usize,
    tokens: Tensor,
    pos: Tensor,
    opts: TrainOpts,
    inputs: Vec<Tensor>,
    blocks: Vec<BlockSaved>,
    x_last: Tensor,
    rstd_f: Tensor,
    dx_f: Tensor,
    dhead: Tensor,
}

/// Per-layer K/V caches [B, Hkv, max_len, hd] and each sequence's cached length.
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub lens: Vec<usize>,
    pub max_len: usize,
    /// Decode steps on a GPU through a CUDA graph (default `KernelSettings::cuda_graphs`: on; `MOE_CUDA_GRAPHS=0` turns it
    /// off). While a step is being recorded no other thread may issue work on the device.
    pub use_graphs: bool,
    /// Most rows one prefill pass runs (default `PREFILL_TOKENS`).
    pub prefill_tokens: usize,
    decode: Option<Box<DecodeState>>,
    /// Per block, its router folded through the RMSNorm and o projection before it
    /// (`ops::router_fold`, E·(D + C) weights a layer) where a served decode step can use it;
    /// computed from the weights at the cache's first decode step and kept with it, also through
    /// `Model::recycle_kv_cache` — so caches are recycled only while the weights stay as they are
    /// (generation; training's sample completions take fresh caches).
    folds: Option<Vec<Option<Tensor>>>,
}

impl KvCache {
    /// Chained greedy decode steps launched and not yet read (`Model::decode_greedy_wait`).
    pub fn decode_in_flight(&self) -> usize {
        self.decode.as_ref().map_or(0, |st| st.in_flight.len())
    }
}

/// The device inputs of one decode step: token ids, positions, lengths after the step, and
/// the cache row of each sequence, all [B] i32.
struct DecodeInputs {
    ids: Tensor,
    pos: Tensor,
    lens: Tensor,
    seqs: Tensor,
}

/// A cache's recorded decode step: its input and output buffers (fixed addresses) and graph.
struct DecodeState {
    inputs: DecodeInputs,
    out: Tensor,
    graph: Option<crate::runtime::cuda::graph::Graph>,
    steps: usize,
    /// Chained greedy steps (`Model::decode_greedy_launch`): their own recorded step (logits
    /// → arg-max written into the inputs, positions and lengths advanced), the page-locked
    /// buffers their ids come back through, and the slots of the steps not yet waited for.
    greedy_graph: Option<crate::runtime::cuda::graph::Graph>,
    readback: Vec<crate::runtime::cuda::HostReadback>,
    in_flight: std::collections::VecDeque<usize>,
    /// The device inputs hold the step after the last one launched (a chained step ran last).
    chained: bool,
}

/// Whether a new cache decodes through CUDA graphs (`KernelSettings::cuda_graphs`).
fn graphs_by_default() -> bool {
    crate::runtime::KernelSettings::current().cuda_graphs
}

/// A decode step's positions (the tokens already cached) and lengths after it, from the
/// cache's lengths.
fn step_positions(lens: &[usize]) -> (Vec<i32>, Vec<i32>) {
    (
        lens.iter().map(|&l| l as i32).collect(),
        lens.iter().map(|&l| l as i32 + 1).collect(),
    )
}

impl DecodeInputs {
    /// Uploads one step's ids, positions and lengths.
    fn set(&mut self, ids: &[i32], pos: &[i32], lens: &[i32]) -> crate::runtime::Result<()> {
        self.ids.copy_from_host(ids)?;
        self.pos.copy_from_host(pos)?;
        self.lens.copy_from_host(lens)
    }
}

/// Greedy steps a chain may have launched and not yet waited for.
pub const GREEDY_IN_FLIGHT: usize = 2;

/// Most rows one prefill pass runs (as vLLM's `max_num_batched_tokens`).
pub const PREFILL_TOKENS: usize = 8192;

/// Bytes of f32 attention scores one prefill span may materialise ([heads, len, keys]).
const SPAN_SCORE_BYTES: usize = 1 << 30;

/// Splits every sequence's new tokens (`new_lens[i]` after `cached[i]` already in the cache) into
/// passes of at most `budget` rows, sequences in order, a sequence split across passes where it
/// does not fit (its later pieces attend over the cache). A piece is also kept short enough that
/// its [heads, len, keys] f32 scores stay under 1 GiB (keys: len from position 0, else the
/// cache's `max_len`).
pub fn plan_prefill(
    new_lens: &[usize],
    cached: &[usize],
    budget: usize,
    heads: usize,
    max_len: usize,
) -> Vec<Vec<Span>> {
    let budget = budget.max(1);
    let mut passes: Vec<Vec<Span>> = Vec::new();
    let mut cur: Vec<Span> = Vec::new();
    let mut used = 0;
    for (seq, (&n, &c)) in new_lens.iter().zip(cached).enumerate() {
        let mut done = 0;
        while done < n {
            if used == budget {
                passes.push(std::mem::take(&mut cur));
                used = 0;
            }
            let start = c + done;
            let mut len = (n - done).min(budget - used);
            let per_row = 4 * heads.max(1);
            let keys = |len: usize| if start == 0 { len } else { max_len };
            while len > 1 && per_row * len * keys(len) > SPAN_SCORE_BYTES {
                len = len.div_ceil(2);
            }
            cur.push(Span {
                seq,
                start,
                off: used,
                len,
            });
            used += len;
            done += len;
        }
    }
    if !cur.is_empty() {
        passes.push(cur);
    }
    passes
}

impl Model {
    pub fn shape(&self, layer: usize) -> AttnShape {
        let c = &self.config;
        AttnShape {
            heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            qk_norm: c.qk_norm,
            eps: c.rms_norm_eps as f32,
            window: c.layers[layer].sliding_window,
            clip: c.clip_qkv,
        }
    }

    fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// Wrap `params` (already on `device` in `dtype`) after checking their shapes.
    pub fn from_params(
        config: ModelConfig,
        params: Params,
        device: Device,
        dtype: DType,
    ) -> Result<Model> {
        config.validate().map_err(ModelError::Invalid)?;
        let (inv, att) = config.rope_inv_freq(config.max_seq_len);
        let rope = RopeTable::new(&inv, config.max_seq_len, att, device)?;
        let m = Model {
            config,
            params,
            device,
            dtype,
            rope,
            cache_pool: std::sync::Mutex::new(Vec::new()),
        };
        m.check_shapes()?;
        Ok(m)
    }

    fn check_shapes(&self) -> Result<()> {
        let c = &self.config;
        let (d, v) = (c.d_model, c.vocab_size);
        let want = |name: &str, t: &Tensor, s: &[usize]| -> Result<()> {
            if t.shape() != s {
                return Err(ModelError::Invalid(format!(
                    "parameter {name} has shape {:?}, expected {s:?}",
                    t.shape()
                )));
            }
            Ok(())
        };
        want("embed", &self.params.embed, &[v, d])?;
        if let Some(h) = &self.params.lm_head {
            want("lm_head", h, &[v, d])?;
        }
        if self.params.blocks.len() != c.n_layers() {
            return Err(ModelError::Invalid(format!(
                "{} blocks for {} layers",
                self.params.blocks.len(),
                c.n_layers()
            )));
        }
        for (i, (b, l)) in self.params.blocks.iter().zip(&c.layers).enumerate() {
            if let (FfnWeights::Moe(w), Ffn::Moe(mc)) = (&b.ffn, &l.ffn) {
                w.check(mc, &format!("blocks.{i}.ffn"))?;
            }
        }
        Ok(())
    }

    /// A randomly initialised model (GPT-2 style: N(0, init_std), output projections scaled by
    /// 1/sqrt(2·layers), norms one).
    pub fn init(config: ModelConfig, seed: u64, device: Device, dtype: DType) -> Result<Model> {
        config.validate().map_err(ModelError::Invalid)?;
        let c = &config;
        let std = c.init_std;
        let out_std = std / (2.0 * c.n_layers() as f32).sqrt();
        let d = c.d_model;
        let mut blocks = Vec::with_capacity(c.n_layers());
        for (i, l) in c.layers.iter().enumerate() {
            let s = seed.wrapping_mul(1000).wrapping_add(i as u64 * 17 + 1);
            let sh = AttnShape {
                heads: c.n_heads,
                kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                qk_norm: c.qk_norm,
                eps: c.rms_norm_eps as f32,
                window: l.sliding_window,
                clip: c.clip_qkv,
            };
            let ffn = match &l.ffn {
                Ffn::Dense { ffn_dim } => FfnWeights::Dense(DenseMlp::init(
                    ExpertKind::SwiGlu,
                    d,
                    *ffn_dim,
                    false,
                    std,
                    out_std,
                    s ^ 0xf0,
                    dtype,
                    device,
                )?),
                Ffn::Moe(m) => {
                    FfnWeights::Moe(MoeWeights::init(m, std, out_std, s ^ 0xf1, dtype, device)?)
                }
            };
            blocks.push(Block {
                attn_norm: Tensor::full(&[d], 1.0, dtype, device)?,
                attn: Attention::init(&sh, d, c.qkv_bias, std, out_std, s, dtype, device)?,
                ffn_norm: Tensor::full(&[d], 1.0, dtype, device)?,
                ffn,
            });
        }
        let params = Params {
            embed: Tensor::randn(&[c.vocab_size, d], std, seed ^ 0xe0, dtype, device)?,
            blocks,
            norm: Tensor::full(&[d], 1.0, dtype, device)?,
            lm_head: if c.tie_word_embeddings {
                None
            } else {
                Some(Tensor::randn(
                    &[c.vocab_size, d],
                    std,
                    seed ^ 0xe1,
                    dtype,
                    device,
                )?)
            },
        };
        Model::from_params(config, params, device, dtype)
    }

    pub fn load_hf(dir: &Path, device: Device, dtype: Option<DType>) -> Result<Model> {
        hf::load(dir, device, dtype)
    }

    /// Write config.json + model.safetensors in the HF layout (Mixtral, Qwen3-MoE, or the
    /// checkpoint's own architecture) into `dir`, atomically.
    pub fn save_hf(&self, dir: &Path) -> Result<PathBuf> {
        hf::save(self, dir)
    }

    /// `params` — this model's weights or gradients — under Hugging Face tensor names (the
    /// layout `save_hf` writes).
    pub fn hf_named(&self, params: &Params) -> Result<std::collections::BTreeMap<String, Tensor>> {
        Ok(hf::hf_tensors(&self.config, params)?.1)
    }

    fn head(&self) -> &Tensor {
        self.params.lm_head.as_ref().unwrap_or(&self.params.embed)
    }

    fn ffn_forward(
        &self,
        i: usize,
        h: &Tensor,
        mode: moe::Mode,
    ) -> Result<(Tensor, Option<FfnSaved>, Option<moe::MoeStats>)> {
        let save = matches!(mode, moe::Mode::Train { .. });
        match (&self.params.blocks[i].ffn, &self.config.layers[i].ffn) {
            (FfnWeights::Dense(m), _) => {
                let (y, s) = m.forward(ExpertKind::SwiGlu, h, save)?;
                Ok((y, s.map(FfnSaved::Dense), None))
            }
            (FfnWeights::Moe(w), Ffn::Moe(mc)) => {
                let (y, s, st) =
                    moe::moe_forward_named(mc, w, h, mode, &format!("blocks.{i}.ffn"), false)?;
                Ok((y, s.map(FfnSaved::Moe), st))
            }
            (FfnWeights::Moe(_), Ffn::Dense { .. }) => Err(ModelError::Invalid(format!(
                "layer {i}: MoE weights for a dense layer"
            ))),
        }
    }

    /// One block in training mode: (output, saved, MoE stats).
    fn block_train(
        &self,
        i: usize,
        x: &Tensor,
        b: usize,
        s: usize,
        pos: &Tensor,
        seed: u64,
    ) -> Result<(Tensor, BlockSaved, Option<moe::MoeStats>)> {
        let blk = &self.params.blocks[i];
        let (h1, rstd1) = ops::rmsnorm(x, &blk.attn_norm, self.eps())?;
        let (a, attn) = blk
            .attn
            .forward_train(&self.shape(i), &h1, b, s, &self.rope, pos)?;
        let x_mid = ops::add(x, &a)?;
        let (h2, rstd2) = ops::rmsnorm(&x_mid, &blk.ffn_norm, self.eps())?;
        let (f, ffn, stats) = self.ffn_forward(
            i,
            &h2,
            moe::Mode::Train {
                seed: seed.wrapping_add(i as u64 * 7919),
            },
        )?;
        let y = ops::add(&x_mid, &f)?;
        let ffn =
            ffn.ok_or_else(|| ModelError::Invalid("training forward saved nothing".into()))?;
        Ok((
            y,
            BlockSaved::Full {
                h1,
                rstd1,
                attn,
                x_mid,
                h2,
                rstd2,
                ffn,
            },
            stats,
        ))
    }

    /// Training forward: tokens and targets [B, S] i32 on the model's device (targets −100 are
    /// ignored; `n_valid` counts the others). Computes the loss and, fused with it, the LM head's
    /// gradient, so `backward` only walks the blocks.
    pub fn forward_train(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        n_valid: usize,
        opts: &TrainOpts,
    ) -> Result<(StepOutput, Saved)> {
        let (b, s) = (tokens.dim(0), tokens.dim(-1));
        if tokens.rank() != 2 || targets.shape() != tokens.shape() {
            return Err(ModelError::Invalid(format!(
                "tokens {:?} and targets {:?} must both be [batch, seq]",
                tokens.shape(),
                targets.shape()
            )));
        }
        if s > self.config.max_seq_len {
            return Err(ModelError::Invalid(format!(
                "sequence length {s} exceeds max_seq_len = {}",
                self.config.max_seq_len
            )));
        }
        let t = b * s;
        let dev = self.device;
        let pos: Vec<i32> = (0..t).map(|i| (i % s) as i32).collect();
        let pos = Tensor::from_slice(&pos, &[t], dev)?;
        let ids = tokens.try_clone()?.reshape(&[t])?;
        let mut x = ops::embedding(&ids, &self.params.embed)?;
        let mut inputs = Vec::new();
        let mut blocks = Vec::new();
        let mut aux = Tensor::zeros(&[1], DType::F32, dev)?;
        let mut z = Tensor::zeros(&[1], DType::F32, dev)?;
        let mut load = Vec::new();
        for i in 0..self.config.n_layers() {
            let (y, sv, st) = self.block_train(i, &x, b, s, &pos, opts.seed)?;
            if let Some(st) = st {
                ops::add_assign(&mut aux, &st.aux_loss)?;
                ops::add_assign(&mut z, &st.z_loss)?;
                load.push((i, st.tokens_per_expert, st.dropped));
            }
            if opts.recompute {
                inputs.push(x);
                blocks.push(BlockSaved::Input);
            } else {
                inputs.push(x);
                blocks.push(sv);
            }
            x = y;
        }
        let (xf, rstd_f) = ops::rmsnorm(&x, &self.params.norm, self.eps())?;
        // LM head + cross-entropy in row chunks of <= 256 MiB of f32 logits. Every chunk adds
        // its head gradient into the f32 [V, d] accumulator (a read and a write of V·d·4 bytes:
        // 412 MB at OLMoE's vocab), so chunks are as large as the memory budget allows.
        let v = self.config.vocab_size;
        let chunk = ((256 << 20) / (4 * v)).clamp(1, t.max(1));
        let tg = targets.try_clone()?.reshape(&[t])?;
        let mut losses = Tensor::zeros(&[t], DType::F32, dev)?;
        let mut dx_f = Tensor::zeros(&[t, self.config.d_model], self.dtype, dev)?;
        let mut dhead = Tensor::zeros(&[v, self.config.d_model], DType::F32, dev)?;
        let scale = opts.loss_scale / n_valid.max(1) as f32;
        let mut r0 = 0;
        while r0 < t {
            let n = chunk.min(t - r0);
            let xc = ops::slice_rows(&xf, r0, n)?;
            let tc = ops::slice_rows(&tg, r0, n)?;
            let logits = ops::linear(&xc, self.head(), None)?;
            let (lc, lse) = ops::cross_entropy(&logits, &tc, -100)?;
            ops::write_rows(&mut losses, r0, &lc)?;
            let dl = ops::cross_entropy_backward(&logits, &tc, &lse, -100, scale)?;
            ops::matmul_into(
                &mut dhead,
                &dl,
                &xc,
                Matmul {
                    trans_a: true,
                    out_dtype: Some(DType::F32),
                    ..Default::default()
                },
                1.0,
            )?;
            ops::write_rows(
                &mut dx_f,
                r0,
                &ops::matmul(&dl, self.head(), Matmul::default())?,
            )?;
            r0 += n;
        }
        let loss = ops::scale(&ops::sum_all(&losses)?, 1.0 / n_valid.max(1) as f32)?;
        let out = StepOutput {
            loss,
            aux_loss: aux,
            z_loss: z,
            expert_load: load,
        };
        let saved = Saved {
            b,
            s,
            tokens: ids,
            pos,
            opts: *opts,
            inputs,
            blocks,
            x_last: x,
            rstd_f,
            dx_f,
            dhead,
        };
        Ok((out, saved))
    }

    /// Accumulates f32 gradients of (loss + aux + z) · loss_scale into `g`.
    pub fn backward(&self, saved: Saved, g: &mut Grads) -> Result<()> {
        self.backward_with(saved, g, false, None)
    }

    /// `backward` for the first micro-batch of a step into `Params::grad_buffers`: the same
    /// gradients, with the routed experts' weight gradients written instead of accumulated.
    pub fn backward_first(&self, saved: Saved, g: &mut Grads) -> Result<()> {
        self.backward_with(saved, g, true, None)
    }

    /// `backward` (`backward_first` when `experts_fresh`); with `expert_sumsq` ([1] f32) the
    /// squared L2 norm of the routed experts' weight gradients as this backward leaves them is
    /// added into it by the GEMMs that write them (their share of the global norm without reading
    /// them again; `Params::routed_expert_weights` lists the tensors it covers).
    pub fn backward_with(
        &self,
        saved: Saved,
        g: &mut Grads,
        experts_fresh: bool,
        mut expert_sumsq: Option<&mut Tensor>,
    ) -> Result<()> {
        let Saved {
            b,
            s,
            tokens,
            pos,
            opts,
            inputs,
            blocks,
            x_last,
            rstd_f,
            dx_f,
            dhead,
        } = saved;
        match g.lm_head.as_mut() {
            Some(h) => ops::add_assign(h, &dhead)?,
            None => ops::add_assign(&mut g.embed, &dhead)?,
        }
        let (mut dx, dnorm) = ops::rmsnorm_backward(&x_last, &self.params.norm, &rstd_f, &dx_f)?;
        ops::add_assign(&mut g.norm, &dnorm)?;
        drop(x_last);
        for (i, (x, sv)) in inputs.into_iter().zip(blocks).enumerate().rev() {
            let sv = match sv {
                BlockSaved::Input => self.block_train(i, &x, b, s, &pos, opts.seed)?.1,
                full => full,
            };
            let BlockSaved::Full {
                h1,
                rstd1,
                attn,
                x_mid,
                h2,
                rstd2,
                ffn,
            } = sv
            else {
                unreachable!("recomputed above")
            };
            let blk = &self.params.blocks[i];
            let gb = &mut g.blocks[i];
            // y = x_mid + ffn(norm(x_mid))
            let dh2 = match (&blk.ffn, ffn, &mut gb.ffn, &self.config.layers[i].ffn) {
                (FfnWeights::Dense(m), FfnSaved::Dense(fs), FfnWeights::Dense(gm), _) => {
                    m.backward(ExpertKind::SwiGlu, &h2, &fs, &dx, gm)?
                }
                (FfnWeights::Moe(w), FfnSaved::Moe(ms), FfnWeights::Moe(gm), Ffn::Moe(mc)) => {
                    moe::moe_backward_into(
                        mc,
                        w,
                        &h2,
                        &ms,
                        &dx,
                        opts.loss_scale,
                        gm,
                        experts_fresh,
                        expert_sumsq.as_deref_mut(),
                    )?
                }
                _ => {
                    return Err(ModelError::Invalid(format!(
                        "layer {i}: saved activations do not match the layer kind"
                    )))
                }
            };
            let dw2 = ops::rmsnorm_backward_acc(&x_mid, &blk.ffn_norm, &rstd2, &dh2, &mut dx)?;
            ops::add_assign(&mut gb.ffn_norm, &dw2)?;
            // x_mid = x + attn(norm(x))
            let dh1 = blk.attn.backward(
                &self.shape(i),
                &h1,
                b,
                s,
                &self.rope,
                &pos,
                &attn,
                &dx,
                &mut gb.attn,
            )?;
            let dw1 = ops::rmsnorm_backward_acc(&x, &blk.attn_norm, &rstd1, &dh1, &mut dx)?;
            ops::add_assign(&mut gb.attn_norm, &dw1)?;
        }
        ops::embedding_backward(&tokens, &dx, &mut g.embed)?;
        Ok(())
    }

    pub fn new_kv_cache(&self, batch: usize, max_len: usize) -> Result<KvCache> {
        let c = &self.config;
        if max_len > c.max_seq_len {
            return Err(ModelError::Invalid(format!("a cache of {max_len} positions exceeds the model's context of {} (max_position_embeddings)", c.max_seq_len)));
        }
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
            use_graphs: graphs_by_default(),
            prefill_tokens: PREFILL_TOKENS,
            decode: None,
            folds: None,
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
        let graphs = graphs_by_default();
        let mut pool = self.cache_pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pool
            .iter()
            .position(|c| c.lens.len() == batch && c.max_len == len && c.use_graphs == graphs)
        {
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
    /// derived from the weights (its router folds), so recycle only while they do not change.
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

    /// Appends `tokens[i]` to sequence i of the cache and returns f32 logits: [B, V] for the last
    /// new position of each sequence (sequences given no tokens get zeros), or with `all_logits`
    /// [Σ new tokens, V] for every new position in order.
    pub fn forward_infer(
        &self,
        tokens: &[Vec<u32>],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        let bsz = tokens.len();
        if bsz != cache.lens.len() {
            return Err(ModelError::Invalid(format!(
                "{bsz} token lists for a cache of {} sequences",
                cache.lens.len()
            )));
        }
        for (i, t) in tokens.iter().enumerate() {
            if cache.lens[i] + t.len() > cache.max_len {
                return Err(ModelError::Invalid(format!(
                    "sequence {i}: {} cached + {} new tokens exceed the context of {} positions",
                    cache.lens[i],
                    t.len(),
                    cache.max_len
                )));
            }
            if let Some(&bad) = t.iter().find(|&&id| id as usize >= self.config.vocab_size) {
                return Err(ModelError::Invalid(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
        }
        let v = self.config.vocab_size;
        let decode = !all_logits && bsz > 0 && tokens.iter().all(|t| t.len() == 1);
        if decode {
            let ids: Vec<i32> = tokens.iter().map(|t| t[0] as i32).collect();
            let (pos, lens) = step_positions(&cache.lens);
            let logits = if self.device.is_cuda() && cache.use_graphs {
                self.decode_graphed(cache, &ids, &pos, &lens)?
            } else {
                let dev = self.device;
                let seqs: Vec<i32> = (0..bsz as i32).collect();
                let inputs = DecodeInputs {
                    ids: Tensor::from_slice(&ids, &[bsz], dev)?,
                    pos: Tensor::from_slice(&pos, &[bsz], dev)?,
                    lens: Tensor::from_slice(&lens, &[bsz], dev)?,
                    seqs: Tensor::from_slice(&seqs, &[bsz], dev)?,
                };
                self.ensure_router_folds(cache)?;
                let folds = cache.folds.as_deref().unwrap_or(&[]);
                self.decode_body(&inputs, &mut cache.k, &mut cache.v, folds)?
            };
            for l in cache.lens.iter_mut() {
                *l += 1;
            }
            return Ok(logits);
        }
        if let Some(st) = cache.decode.as_mut() {
            st.chained = false;
        }
        // Prefill in passes of at most PREFILL_TOKENS rows (chunked prefill: bounded activation
        // memory, and many prompts share each pass's GEMMs and expert groups).
        let new_lens: Vec<usize> = tokens.iter().map(|t| t.len()).collect();
        let max_heads = (0..self.config.n_layers())
            .map(|i| self.shape(i).heads)
            .max()
            .unwrap_or(1);
        let passes = plan_prefill(
            &new_lens,
            &cache.lens,
            cache.prefill_tokens,
            max_heads,
            cache.max_len,
        );
        let mut all_rows: Vec<Tensor> = Vec::new();
        let mut last: Vec<Option<Tensor>> = (0..bsz).map(|_| None).collect();
        for spans in passes {
            let n: usize = spans.iter().map(|s| s.len).sum();
            let (mut ids, mut pos, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
            for sp in &spans {
                let from = sp.start - cache.lens[sp.seq];
                ids.extend(
                    tokens[sp.seq][from..from + sp.len]
                        .iter()
                        .map(|&x| x as i32),
                );
                pos.extend((sp.start..sp.start + sp.len).map(|p| p as i32));
                seqs.extend(std::iter::repeat_n(sp.seq as i32, sp.len));
            }
            let dev = self.device;
            let ids = Tensor::from_slice(&ids, &[n], dev)?;
            let pos = Tensor::from_slice(&pos, &[n], dev)?;
            let seqs = Tensor::from_slice(&seqs, &[n], dev)?;
            let x = ops::embedding(&ids, &self.params.embed)?;
            let xf = self.blocks_infer(x, false, &[], |i, attn, inp, _| {
                attn.prefill(
                    &self.shape(i),
                    &inp.resolve()?,
                    &self.rope,
                    &mut cache.k[i],
                    &mut cache.v[i],
                    &spans,
                    &pos,
                    &seqs,
                )
            })?;
            // The rows whose logits are wanted: all of them, or each sequence's last new token.
            let ends: Vec<&Span> = spans
                .iter()
                .filter(|sp| sp.start + sp.len == cache.lens[sp.seq] + new_lens[sp.seq])
                .collect();
            let xs = if all_logits {
                xf
            } else {
                let idx: Vec<i32> = ends.iter().map(|sp| (sp.off + sp.len - 1) as i32).collect();
                if idx.is_empty() {
                    continue;
                }
                ops::gather_rows(&xf, &Tensor::from_slice(&idx, &[idx.len()], dev)?)?
            };
            let logits = self.logits(&xs)?;
            if all_logits {
                all_rows.push(logits);
            } else {
                for (r, sp) in ends.iter().enumerate() {
                    last[sp.seq] = Some(ops::slice_rows(&logits, r, 1)?);
                }
            }
        }
        for (l, n) in cache.lens.iter_mut().zip(&new_lens) {
            *l += n;
        }
        let rows: Vec<Tensor> = if all_logits {
            all_rows
        } else {
            last.into_iter()
                .map(|r| match r {
                    Some(r) => Ok(r),
                    None => Tensor::zeros(&[1, v], DType::F32, self.device),
                })
                .collect::<std::result::Result<_, _>>()?
        };
        let total: usize = rows.iter().map(|r| r.dim(0)).sum();
        let mut out = Tensor::uninit(&[total, v], DType::F32, self.device)?;
        let mut at = 0;
        for r in rows {
            ops::write_rows(&mut out, at, &r)?;
            at += r.dim(0);
        }
        Ok(out)
    }

    /// One decode step for every sequence: logits [B, V] f32. Only stream-ordered device work
    /// (it is what a CUDA graph records).
    fn decode_body(
        &self,
        inp: &DecodeInputs,
        cache_k: &mut [Tensor],
        cache_v: &mut [Tensor],
        folds: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let x = ops::embedding(&inp.ids, &self.params.embed)?;
        let fold = crate::runtime::KernelSettings::current().fold_norms;
        let xf = self.blocks_infer(x, fold, folds, |i, attn, input, project| {
            attn.decode(
                &self.shape(i),
                input,
                &self.rope,
                &mut cache_k[i],
                &mut cache_v[i],
                &inp.pos,
                &inp.lens,
                &inp.seqs,
                project,
            )
        })?;
        self.logits(&xf)
    }

    /// The blocks in inference from embedded tokens `x`, each residual add fused with the RMSNorm
    /// that follows it (the next block's, or the final norm after the last block); `attn(i,
    /// attention, input)` runs block i's attention. With `fold` (decode) the add + norm before a
    /// block's attention is handed to it pending (its q/k/v kernel does it), and a served MoE
    /// block's router kernel does the one before it. Returns the final-normed rows.
    fn blocks_infer(
        &self,
        mut x: Tensor,
        fold: bool,
        router_folds: &[Option<Tensor>],
        mut attn: impl FnMut(usize, &Attention, AttnIn<'_>, bool) -> crate::runtime::Result<Tensor>,
    ) -> Result<Tensor> {
        /// What the next block's attention starts from.
        enum Next {
            Normed(Tensor),
            /// The previous block's output, not yet added to x (fold).
            Pending(Tensor),
        }
        let eps = self.eps();
        let mut next = Next::Normed(match self.params.blocks.first() {
            Some(b) => ops::rmsnorm(&x, &b.attn_norm, eps)?.0,
            None => ops::rmsnorm(&x, &self.params.norm, eps)?.0,
        });
        let n = self.params.blocks.len();
        for (i, blk) in self.params.blocks.iter().enumerate() {
            // With a folded router (decode), a served MoE step takes the attention's context
            // before its o projection and projects it beside the router.
            let oroute = match (&blk.ffn, &self.config.layers[i].ffn, router_folds.get(i)) {
                (FfnWeights::Moe(w), Ffn::Moe(mc), Some(Some(wf))) if fold => {
                    moe::served_oroute_rule(mc, w, &x).map(|rule| (rule, w, wf))
                }
                _ => None,
            };
            let inp = match next {
                Next::Normed(h) => AttnIn::Normed(h),
                Next::Pending(f) => AttnIn::AddNorm {
                    x: &mut x,
                    a: f,
                    g: &blk.attn_norm,
                    eps,
                },
            };
            let mut a = attn(i, &blk.attn, inp, oroute.is_none())?;
            let mut folded = None;
            if let Some((rule, w, wf)) = &oroute {
                folded = moe::moe_forward_served_oroute(
                    rule,
                    w,
                    wf,
                    &x,
                    &a,
                    &blk.attn.o,
                    &blk.ffn_norm,
                    eps,
                )?;
                if folded.is_none() {
                    a = ops::linear(&a, &blk.attn.o, None)?;
                }
            }
            // With `fold`, a served MoE step does the residual add + RMSNorm in its router kernel.
            if folded.is_none() {
                folded = match (&blk.ffn, &self.config.layers[i].ffn) {
                    (FfnWeights::Moe(w), Ffn::Moe(mc)) if fold => moe::moe_forward_served_addnorm(
                        mc,
                        w,
                        &x,
                        &a,
                        &blk.ffn_norm,
                        eps,
                        &format!("blocks.{i}.ffn"),
                    )?,
                    _ => None,
                };
            }
            let f = match folded {
                Some((xn, f)) => {
                    x = xn;
                    f
                }
                None => {
                    let hf = ops::add_rmsnorm(&mut x, &a, &blk.ffn_norm, eps)?;
                    self.ffn_forward(i, &hf, moe::Mode::Serve)?.0
                }
            };
            next = if fold && i + 1 < n {
                Next::Pending(f)
            } else {
                let norm = match self.params.blocks.get(i + 1) {
                    Some(b) => &b.attn_norm,
                    None => &self.params.norm,
                };
                Next::Normed(ops::add_rmsnorm(&mut x, &f, norm, eps)?)
            };
        }
        match next {
            Next::Normed(h) => Ok(h),
            Next::Pending(_) => unreachable!("the last block's output is always added and normed"),
        }
    }

    /// f32 logits [rows, V] of final-normed rows.
    fn logits(&self, xf: &Tensor) -> Result<Tensor> {
        Ok(ops::matmul(
            xf,
            self.head(),
            Matmul {
                trans_b: true,
                out_dtype: Some(DType::F32),
                ..Default::default()
            },
        )?)
    }

    /// A decode step through a CUDA graph kept in the cache: the first step runs eagerly (kernels
    /// compiled, memory pool grown), the second is recorded, every later one is a single graph
    /// launch after copying the step's ids and positions into the graph's input buffers. If the
    /// capture fails the cache falls back to eager steps (and says so once).
    fn decode_graphed(
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
            folds,
            ..
        } = cache;
        let folds = folds.as_deref().unwrap_or(&[]);
        let st = decode.as_mut().expect("decode state was just created");
        st.chained = false;
        st.inputs.set(ids, pos, lens)?;
        if st.graph.is_none() {
            if st.steps == 0 {
                st.steps += 1;
                return self.decode_body(&st.inputs, k, v, folds);
            }
            let Device::Cuda(ordinal) = dev else {
                return self.decode_body(&st.inputs, k, v, folds);
            };
            let cu = crate::runtime::cuda::device(ordinal)?;
            let (inputs, out) = (&st.inputs, &mut st.out);
            let captured = cu.capture(|| {
                let logits = self.decode_body(inputs, k, v, folds)?;
                Ok::<(), ModelError>(ops::write_rows(out, 0, &logits)?)
            });
            match captured {
                Ok(((), g)) => st.graph = Some(g),
                Err(e) => {
                    tracing::warn!("CUDA graph capture of the decode step failed ({e}); decoding without graphs");
                    *use_graphs = false;
                    return self.decode_body(&st.inputs, k, v, folds);
                }
            }
        }
        st.steps += 1;
        st.graph.as_ref().expect("graph captured above").launch()?;
        Ok(st.out.try_clone()?)
    }

    /// Computes the cache's router folds (`KvCache::folds`) if it has none: on a GPU in a 16-bit
    /// dtype, for each MoE block `moe::router_foldable` accepts.
    fn ensure_router_folds(&self, cache: &mut KvCache) -> Result<()> {
        if cache.folds.is_some() {
            return Ok(());
        }
        let on = self.device.is_cuda() && self.dtype.size_in_bytes() == 2;
        let mut folds = Vec::with_capacity(self.params.blocks.len());
        for (i, blk) in self.params.blocks.iter().enumerate() {
            let fold = match (&blk.ffn, &self.config.layers[i].ffn) {
                (FfnWeights::Moe(w), Ffn::Moe(mc)) if on && moe::router_foldable(mc, w) => {
                    Some(ops::router_fold(&w.router, &blk.ffn_norm, &blk.attn.o)?)
                }
                _ => None,
            };
            folds.push(fold);
        }
        cache.folds = Some(folds);
        Ok(())
    }

    /// Creates the cache's decode state (device input buffers for its batch) if it has none.
    fn decode_state(&self, cache: &mut KvCache) -> Result<()> {
        self.ensure_router_folds(cache)?;
        if cache.decode.is_some() {
            return Ok(());
        }
        let (bsz, dev) = (cache.lens.len(), self.device);
        let seqs: Vec<i32> = (0..bsz as i32).collect();
        let readback = match dev {
            Device::Cuda(o) => (0..GREEDY_IN_FLIGHT)
                .map(|_| crate::runtime::cuda::HostReadback::new(o, 4 * bsz))
                .collect::<crate::runtime::Result<Vec<_>>>()?,
            Device::Cpu => Vec::new(),
        };
        cache.decode = Some(Box::new(DecodeState {
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
            folds,
            ..
        } = cache;
        let folds = folds.as_deref().unwrap_or(&[]);
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
            let logits = self.decode_body(&st.inputs, k, v, folds)?;
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

    /// (total, active-per-token) parameter counts.
    pub fn param_counts(&self) -> (u64, u64) {
        self.config.param_counts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(passes: &[Vec<Span>], new_lens: &[usize], cached: &[usize], budget: usize) {
        let mut next: Vec<usize> = cached.to_vec();
        for p in passes {
            let mut off = 0;
            assert!(!p.is_empty());
            for sp in p {
                assert_eq!(sp.off, off, "{passes:?}");
                assert_eq!(sp.start, next[sp.seq], "{passes:?}");
                assert!(sp.len > 0);
                next[sp.seq] += sp.len;
                off += sp.len;
            }
            assert!(off <= budget, "{passes:?}");
        }
        for i in 0..new_lens.len() {
            assert_eq!(next[i], cached[i] + new_lens[i], "{passes:?}");
        }
    }

    #[test]
    fn prefill_plan_packs_sequences_and_splits_long_ones() {
        let (n, c) = ([5, 0, 7, 3], [0, 4, 2, 0]);
        let p = plan_prefill(&n, &c, 8, 4, 64);
        covers(&p, &n, &c, 8);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0],
            vec![
                Span {
                    seq: 0,
                    start: 0,
                    off: 0,
                    len: 5
                },
                Span {
                    seq: 2,
                    start: 2,
                    off: 5,
                    len: 3
                }
            ]
        );
        for (n, c, b) in [
            (vec![1], vec![0], 1),
            (vec![20, 20], vec![0, 3], 7),
            (vec![0, 0], vec![1, 2], 4),
        ] {
            covers(&plan_prefill(&n, &c, b, 2, 64), &n, &c, b);
        }
        assert!(plan_prefill(&[0, 0], &[0, 0], 4, 2, 8).is_empty());
        // 32 heads, 32k keys: pieces shrink so that [heads, len, keys] f32 stays under 1 GiB.
        let p = plan_prefill(&[32768], &[0], 1 << 20, 32, 32768);
        covers(&p, &[32768], &[0], 1 << 20);
        for sp in p.iter().flatten() {
            let keys = if sp.start == 0 { sp.len } else { 32768 };
            assert!(4 * 32 * sp.len * keys <= 1 << 30, "{sp:?}");
        }
    }
}
