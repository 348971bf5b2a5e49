//! `moe simulate`: replays a routing trace (per step and layer, rows per expert `[E]`) through
//! the placement planners on G GPUs and prices each step with measured costs (`costs`): expert
//! GEMMs of the slowest rank + all-to-all + expert gradient/parameter collectives (+ moves),
//! per MoE layer, phases not overlapped. Weak scaling: every GPU routes the trace's
//! `tokens_per_step` tokens with the trace's per-expert counts. Non-expert work is left out (the
//! same for every placement). Prints a table, optionally writes PNGs (`plots`).

pub mod costs;
pub mod plots;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::placement::sharding::{self, ReplicaState};
use crate::placement::{
    imbalance, split, Placement, PlacementKind, Planner, PlannerConfig, Trace, Transfer,
    TransferKind,
};
use costs::Collective;
pub use costs::CostModel;

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Routing trace (JSONL: `moe train --trace-routing`).
    #[arg(long)]
    trace: PathBuf,
    /// GPU counts to simulate, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "8,16,64,256")]
    gpus: Vec<usize>,
    /// Placements to compare, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "static,capacity,rebalance,swift"
    )]
    placement: Vec<PlacementKind>,
    /// Cost file (TOML); default: the built-in 8 × H100 node file (src/simulate/costs-h100.toml).
    #[arg(long)]
    costs: Option<PathBuf>,
    /// Expert slots per GPU per layer for swift and rebalance (default: static's experts per GPU + 1).
    #[arg(long)]
    expert_slots: Option<usize>,
    /// Capacity factor of the `capacity` placement.
    #[arg(long, default_value_t = 1.25)]
    capacity_factor: f64,
    /// Steps between re-plans of the `rebalance` placement.
    #[arg(long, default_value_t = 10)]
    rebalance_every: usize,
    /// Step time by GPU count (PNG); the swift replica heat map of the first GPU count goes next
    /// to it as <stem>-replicas.png.
    #[arg(long)]
    png: Option<PathBuf>,
}

/// Settings of one simulation besides the trace, costs and GPU count.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub expert_slots: Option<usize>,
    pub capacity_factor: f64,
    pub rebalance_every: usize,
}

/// Bytes per GPU for the experts of all MoE layers (the most loaded GPU).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Memory {
    pub params: u64,
    pub grads: u64,
    pub optimizer: u64,
}

/// One placement on one GPU count; times in seconds, means over the trace's steps.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub gpus: usize,
    pub kind: PlacementKind,
    pub step_s: f64,
    pub compute_s: f64,
    pub all_to_all_s: f64,
    pub sync_s: f64,
    /// Mean over steps and layers of max / mean rows per GPU (real rows, not padding).
    pub load_imbalance: f64,
    /// The same per step (mean over layers).
    pub imbalance_by_step: Vec<f64>,
    /// Share of routed rows dropped (capacity only).
    pub dropped: f64,
    pub memory: Memory,
    /// Mean over steps of the most bytes any GPU sends in a step.
    pub max_sent_per_step: f64,
    /// Optimizer-state bytes moved over the whole trace.
    pub optimizer_moved: u64,
    /// Replicas `[step][layer][expert]` each step ran with.
    pub replicas: Vec<Vec<Vec<usize>>>,
}

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let trace = Trace::read(&args.trace, None)?;
    let costs = CostModel::load(args.costs.as_deref())?;
    let opts = Options {
        expert_slots: args.expert_slots,
        capacity_factor: args.capacity_factor,
        rebalance_every: args.rebalance_every,
    };
    let h = &trace.header;
    println!(
        "trace {}: model {} ({} layers, {} experts, top-{}, d {}, d_ff {}), {} tokens per GPU per \
         step, {} steps; costs {}",
        args.trace.display(),
        h.model,
        h.layers,
        h.experts,
        h.top_k,
        h.d_model,
        h.d_ff,
        h.tokens_per_step,
        trace.steps.len(),
        args.costs
            .as_deref()
            .map_or("built-in 8 x H100".into(), |p| p.display().to_string())
    );
    println!(
        "{:>5} {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>22} {:>11} {:>10}",
        "gpus",
        "placement",
        "step ms",
        "experts",
        "a2a ms",
        "sync ms",
        "load m/m",
        "dropped",
        "GiB/GPU p+g+opt",
        "MB sent/GPU",
        "opt moved"
    );
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut outcomes = Vec::new();
    for &g in &args.gpus {
        for &kind in &args.placement {
            let o = simulate(&trace, &costs, kind, g, &opts)
                .with_context(|| format!("{} placement on {g} GPUs", kind.name()))?;
            println!(
                "{:>5} {:<10} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7.2}% {:>22} {:>11.1} {:>7.2} GB",
                g,
                kind.name(),
                o.step_s * 1e3,
                o.compute_s * 1e3,
                o.all_to_all_s * 1e3,
                o.sync_s * 1e3,
                o.load_imbalance,
                o.dropped * 100.0,
                format!(
                    "{:.2}+{:.2}+{:.2}",
                    gib(o.memory.params),
                    gib(o.memory.grads),
                    gib(o.memory.optimizer)
                ),
                o.max_sent_per_step / 1e6,
                o.optimizer_moved as f64 / 1e9
            );
            outcomes.push(o);
        }
    }
    if let Some(png) = &args.png {
        plots::step_times(png, &outcomes, &h.model)?;
        println!("wrote {}", png.display());
        let first = args.gpus.first().copied();
        if let Some(o) = outcomes
            .iter()
            .find(|o| o.kind == PlacementKind::Swift && Some(o.gpus) == first)
        {
            let heat = replicas_png(png);
            plots::replica_heatmap(
                &heat,
                &o.replicas,
                &format!("swift replicas, {} GPUs", o.gpus),
            )?;
            println!("wrote {}", heat.display());
        }
    }
    Ok(())
}

/// `<stem>-replicas.png` beside `png`.
fn replicas_png(png: &Path) -> PathBuf {
    let stem = png
        .file_stem()
        .map_or("simulate".into(), |s| s.to_string_lossy());
    png.with_file_name(format!("{stem}-replicas.png"))
}

/// Replays `trace` with one placement on `gpus` GPUs (see the module comment for the model).
pub fn simulate(
    trace: &Trace,
    costs: &CostModel,
    kind: PlacementKind,
    gpus: usize,
    opts: &Options,
) -> anyhow::Result<Outcome> {
    let h = &trace.header;
    let (experts, d, f) = (h.experts, h.d_model, h.d_ff);
    let params = 3 * d * f;
    let ep = experts.min(gpus).max(1);
    let slots = opts.expert_slots.unwrap_or(experts.div_ceil(gpus) + 1);
    let mut planner = Planner::new(
        PlannerConfig {
            kind,
            ranks: gpus,
            expert_slots: slots,
            rebalance_every: opts.rebalance_every,
        },
        h.layers,
        experts,
    )?;
    // DeepSpeed's capacity: rows one source may send to one expert, padded to it.
    let capacity = (kind == PlacementKind::Capacity).then(|| {
        ((h.top_k * h.tokens_per_step) as f64 / experts as f64 * opts.capacity_factor).ceil() as u64
    });
    let sizes = costs.sizes();
    let row_bytes = d as u64 * costs.bytes.activation;
    let (mut compute, mut a2a, mut sync) = (0.0, 0.0, 0.0);
    let (mut imbalance_by_step, mut routed, mut dropped) = (Vec::new(), 0u64, 0u64);
    let (mut max_sent, mut optimizer_moved) = (0.0, 0u64);
    let mut replicas = Vec::with_capacity(trace.steps.len());
    let mut rows = vec![0u64; gpus * gpus];
    for (_, counts) in &trace.steps {
        let mut sent = vec![0u64; gpus];
        let mut step_imbalance = 0.0;
        for (l, c) in counts.iter().enumerate() {
            let placement = planner.placement(l);
            rows.fill(0);
            let mut real = vec![0u64; gpus];
            let mut busy = vec![0.0f64; gpus];
            for (e, &n) in c.iter().enumerate() {
                let reps = placement.replicas(e);
                let kept = capacity.map_or(n, |cap| n.min(cap));
                routed += n * gpus as u64;
                dropped += (n - kept) * gpus as u64;
                let sends = match kind {
                    PlacementKind::Static | PlacementKind::Capacity => {
                        split::within_group(reps, &vec![capacity.unwrap_or(n); gpus], ep)
                    }
                    PlacementKind::Rebalance | PlacementKind::Swift => {
                        split::balanced(reps, &vec![n; gpus])
                    }
                };
                for (dst, m) in split::received(&sends, gpus).into_iter().enumerate() {
                    if m > 0 {
                        busy[dst] += costs.gemm_seconds(m, d, f);
                    }
                }
                for (src, to) in sends.iter().enumerate() {
                    for &(dst, m) in to {
                        let m_real = if capacity.is_some() { kept } else { m };
                        real[dst] += m_real;
                        if dst != src {
                            rows[src * gpus + dst] += m;
                        }
                    }
                }
            }
            compute += busy.iter().copied().fold(0.0, f64::max);
            step_imbalance += imbalance(&real.iter().map(|&r| r as f64).collect::<Vec<_>>());
            let messages = (0..gpus * gpus)
                .filter(|&i| rows[i] > 0)
                .map(|i| (i / gpus, i % gpus, rows[i] * row_bytes));
            let (t, bytes) = phase(messages, gpus, &costs.all_to_all, costs.gpus_per_node);
            // Dispatch and combine, forward and backward: four exchanges of the same size.
            a2a += 4.0 * t;
            for (s, b) in sent.iter_mut().zip(bytes) {
                *s += 4 * b;
            }
        }
        imbalance_by_step.push(step_imbalance / h.layers as f64);
        let ran = planner.advance(counts)?;
        replicas.push(
            ran.iter()
                .map(|p| (0..experts).map(|e| p.replicas(e).len()).collect())
                .collect(),
        );
        for (l, before) in ran.iter().enumerate() {
            let after = planner.placement(l);
            let transfers = match kind {
                PlacementKind::Swift => sharding::swift_step(before, after, params, &sizes),
                PlacementKind::Static | PlacementKind::Capacity => {
                    sharding::replica_sync(before, params, &sizes, ReplicaState::Sharded)
                }
                PlacementKind::Rebalance => {
                    let mut t = sharding::replica_sync(before, params, &sizes, ReplicaState::Full);
                    t.extend(sharding::rebalance_moves(before, after, params, &sizes));
                    t
                }
            };
            optimizer_moved += sharding::bytes_of(&transfers, TransferKind::OptimizerStateMove);
            for (s, b) in sent
                .iter_mut()
                .zip(sharding::bytes_sent_per_rank(&transfers, gpus))
            {
                *s += b;
            }
            sync += sync_seconds(&transfers, gpus, costs);
        }
        max_sent += sent.iter().copied().max().unwrap_or(0) as f64;
    }
    let steps = trace.steps.len() as f64;
    let memory = memory(kind, planner.placement(0), experts, params, gpus, costs);
    let layers = h.layers as u64;
    Ok(Outcome {
        gpus,
        kind,
        step_s: (compute + a2a + sync) / steps,
        compute_s: compute / steps,
        all_to_all_s: a2a / steps,
        sync_s: sync / steps,
        load_imbalance: imbalance_by_step.iter().sum::<f64>() / steps,
        imbalance_by_step,
        dropped: if routed > 0 {
            dropped as f64 / routed as f64
        } else {
            0.0
        },
        memory: Memory {
            params: memory.params * layers,
            grads: memory.grads * layers,
            optimizer: memory.optimizer * layers,
        },
        max_sent_per_step: max_sent / steps,
        optimizer_moved,
        replicas,
    })
}

/// Expert memory of one layer on the most loaded GPU: static keeps E / ep experts with their
/// state sharded over the DP group (issue 26's ZeRO-1); rebalance a full state per slot; swift
/// `slots` experts' parameters and gradients and 1 / G of every expert's state.
fn memory(
    kind: PlacementKind,
    placement: &Placement,
    experts: usize,
    params: usize,
    gpus: usize,
    costs: &CostModel,
) -> Memory {
    let b = &costs.bytes;
    let p = params as u64;
    let slots = placement.slots() as u64;
    let state_per_slot = match kind {
        PlacementKind::Static | PlacementKind::Capacity => {
            let dp = placement.replicas(0).len();
            sharding::StateShards { params, parts: dp }.max_len() * slots
        }
        PlacementKind::Rebalance => p * slots,
        PlacementKind::Swift => {
            sharding::StateShards {
                params,
                parts: gpus,
            }
            .max_len()
                * experts as u64
        }
    };
    Memory {
        params: slots * p * b.param,
        grads: slots * p * b.grad,
        optimizer: state_per_slot * b.optimizer,
    }
}

/// Seconds of one layer's gradient / parameter transfers: reduce-scatter, then all-gather,
/// then moves (priced as all-to-all messages), one after the other.
fn sync_seconds(transfers: &[Transfer], gpus: usize, costs: &CostModel) -> f64 {
    let n = costs.gpus_per_node;
    [
        (
            &[TransferKind::GradReduceScatter][..],
            &costs.reduce_scatter,
        ),
        (
            &[TransferKind::ParamAllGather, TransferKind::GradAllGather][..],
            &costs.all_gather,
        ),
        (
            &[TransferKind::ParamMove, TransferKind::OptimizerStateMove][..],
            &costs.all_to_all,
        ),
    ]
    .into_iter()
    .map(|(kinds, cost)| {
        let messages = transfers
            .iter()
            .filter(|t| kinds.contains(&t.kind))
            .map(|t| (t.src, t.dst, t.bytes));
        phase(messages, gpus, cost, n).0
    })
    .sum()
}

/// One communication phase of concurrent messages (src, dst, bytes): each GPU sends and receives
/// its messages one after another; the phase lasts as long as the busiest GPU's sending or
/// receiving, plus the largest latency of a link used. Returns (seconds, bytes sent per GPU).
fn phase(
    messages: impl Iterator<Item = (usize, usize, u64)>,
    gpus: usize,
    cost: &Collective,
    gpus_per_node: usize,
) -> (f64, Vec<u64>) {
    let mut send = vec![0.0f64; gpus];
    let mut recv = vec![0.0f64; gpus];
    let mut bytes = vec![0u64; gpus];
    let mut latency: f64 = 0.0;
    for (src, dst, b) in messages {
        let link = if src / gpus_per_node == dst / gpus_per_node {
            &cost.intra_node
        } else {
            &cost.inter_node
        };
        let t = link.seconds(b);
        send[src] += t;
        recv[dst] += t;
        bytes[src] += b;
        latency = latency.max(link.latency_us * 1e-6);
    }
    let busiest = send.iter().chain(&recv).copied().fold(0.0, f64::max);
    (
        if busiest > 0.0 {
            busiest + latency
        } else {
            0.0
        },
        bytes,
    )
}
