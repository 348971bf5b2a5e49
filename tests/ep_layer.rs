//! The expert-parallel MoE layer across real processes (CPU backend): each rank runs the layer's
//! forward and backward on its own token shard with its share of the experts, reduces gradients
//! (`reduce_gradients`), and checks y, dx and every gradient against the single-process layer
//! (`moe-ep-worker` holds the reference). EP 2 and EP 4 at world 2 and 4, and DP 2 × EP 2 at
//! world 4, for softmax top-k (+ gated shared experts), sigmoid + bias group-limited, and switch
//! capacity routing with drops (capacity per expert from the local batch, DeepSpeed's meaning).
//!
//! Tolerance (worker's `close`): |got − want| <= 1e-4 · max|want| + 1e-6. The same f32 products
//! are summed in another order, nothing else: expert weight gradients sum an expert's rows grouped
//! by source rank first (and, with DP, as partial sums added by the all-reduce); router and
//! shared-expert gradients are per-rank partial sums added in rank order; y and dx rows are the
//! same row-wise products. A reordered sum of n terms differs by at most ~2n·ε·Σ|terms|; with
//! n <= 64 slots and ε = 6e-8 that is < 1e-5 of the terms' magnitude, well inside the bound.

mod common;
use common::free_port;
use std::process::{Command, Stdio};

const WORKER: &str = env!("CARGO_BIN_EXE_moe-ep-worker");

/// Runs `world` workers for `router` with expert-parallel size `ep`; every rank must report ok.
fn run_world(world: usize, ep: usize, router: &str) {
    let port = free_port();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(WORKER)
                .args([router, "--ep", &ep.to_string(), "--timeout-s", "20"])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RAYON_NUM_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start moe-ep-worker")
        })
        .collect();
    for (rank, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && stdout.contains(&format!("rank {rank}: ok {router}")),
            "world {world}, ep {ep}, {router}: rank {rank} failed ({:?})\nstdout: {stdout}\nstderr: {stderr}",
            out.status.code()
        );
    }
}

#[test]
fn ep2_matches_single_process() {
    for router in ["softmax", "sigmoid", "switch"] {
        run_world(2, 2, router);
    }
}

#[test]
fn ep4_matches_single_process() {
    for router in ["softmax", "sigmoid", "switch"] {
        run_world(4, 4, router);
    }
}

#[test]
fn dp2_x_ep2_matches_single_process() {
    for router in ["softmax", "sigmoid", "switch"] {
        run_world(4, 2, router);
    }
}

#[test]
fn ep_size_must_divide_world_and_experts() {
    let out = Command::new(WORKER)
        .args(["softmax", "--ep", "3", "--timeout-s", "5"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("ep_size = 3 does not divide the world size 1"),
        "{stderr}"
    );
}
