//! A worker for the `dist` layer's multi-process tests (tests/dist.rs): joins the world from the
//! torchrun-style environment on the CPU backend and runs one scenario, checking every
//! collective against a reference computed here from every rank's (deterministic) inputs.
//! `moe-dist-worker run <scenario> [--timeout-s N]`, or `moe-dist-worker launch --nproc N -- run ...`
//! to go through the launcher. Prints `rank R: ok <scenario>` or `rank R: error: ...` (exit 1).

use std::time::Duration;

use clap::Parser;
use moe::dist::exchange::exchange;
use moe::dist::launch::{run_launch, LaunchArgs};
use moe::dist::{BackendKind, DistEnv, Group, ReduceOp};
use moe::runtime::{DType, Device, Tensor};

#[derive(Parser)]
enum Cmd {
    /// Join the world from the environment and run a scenario.
    Run {
        /// collectives | agree-mismatch | die | stall | join
        scenario: String,
        #[arg(long, default_value_t = 10)]
        timeout_s: u64,
    },
    /// Start workers through the launcher.
    Launch(LaunchArgs),
}

fn main() {
    let code = match Cmd::parse() {
        Cmd::Launch(args) => match run_launch(&args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("launch error: {e}");
                1
            }
        },
        Cmd::Run {
            scenario,
            timeout_s,
        } => {
            let rank = DistEnv::from_env().map_or(usize::MAX, |e| e.rank);
            match run(&scenario, Duration::from_secs(timeout_s)) {
                Ok(()) => {
                    println!("rank {rank}: ok {scenario}");
                    0
                }
                Err(e) => {
                    eprintln!("rank {rank}: error: {e}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn run(scenario: &str, timeout: Duration) -> Res<()> {
    let world = Group::init(&DistEnv::from_env()?, BackendKind::Cpu, timeout)?;
    let me = world.world_ranks()[world.rank()];
    match scenario {
        "join" => world.barrier()?,
        "collectives" => {
            check_group(&world, 0)?;
            world.agree("config", b"same everywhere")?;
            if world.size() == 4 {
                // 2 (data-parallel) x 2 (expert-parallel).
                let ep = world.split(&[vec![0, 1], vec![2, 3]])?;
                let dp = world.split(&[vec![0, 2], vec![1, 3]])?;
                check_group(&ep, 1)?;
                check_group(&dp, 2)?;
                check_group(&world, 3)?;
            }
        }
        "agree-mismatch" => {
            let config: &[u8] = if me % 2 == 1 {
                b"lr = 2e-4"
            } else {
                b"lr = 1e-4"
            };
            world.agree("config", config)?;
        }
        "die" => {
            world.all_reduce(
                &Tensor::full(&[4], 1.0, DType::F32, Device::Cpu)?,
                ReduceOp::Sum,
            )?;
            if me == 1 {
                std::process::exit(7);
            }
            for _ in 0..3 {
                world.all_reduce(
                    &Tensor::full(&[4], 1.0, DType::F32, Device::Cpu)?,
                    ReduceOp::Sum,
                )?;
            }
        }
        "stall" => {
            if me == 1 {
                std::thread::sleep(Duration::from_secs(120));
            }
            world.all_reduce(
                &Tensor::full(&[4], 1.0, DType::F32, Device::Cpu)?,
                ReduceOp::Sum,
            )?;
        }
        _ => return Err(format!("unknown scenario '{scenario}'").into()),
    }
    Ok(())
}

/// Deterministic inputs: `n` values in [-4, 4) with full f32 mantissas (integers in [-500, 500)
/// for i32), different for every (world rank, salt), rounded to `dtype`, returned as f32.
fn values(rank: usize, salt: u64, n: usize, dtype: DType) -> Vec<f32> {
    let mut s = (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let raw: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as u32;
            match dtype {
                DType::I32 => (u % 1000) as f32 - 500.0,
                _ => u as f32 / (1u32 << 24) as f32 * 8.0 - 4.0,
            }
        })
        .collect();
    round(&raw, dtype)
}

/// f32 values rounded to `dtype` and widened back.
fn round(v: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::I32 => v.iter().map(|x| *x as i32 as f32).collect(),
        _ => Tensor::from_f32(v, &[v.len()], dtype, Device::Cpu)
            .and_then(|t| t.to_f32_vec())
            .expect("rounding a CPU vector"),
    }
}

fn tensor(v: &[f32], shape: &[usize], dtype: DType) -> Res<Tensor> {
    Ok(match dtype {
        DType::I32 => Tensor::from_vec(v.iter().map(|x| *x as i32).collect::<Vec<_>>(), shape)?,
        _ => Tensor::from_f32(v, shape, dtype, Device::Cpu)?,
    })
}

fn read(t: &Tensor) -> Res<Vec<f32>> {
    Ok(match t.dtype() {
        DType::I32 => t.to_vec::<i32>()?.into_iter().map(|x| x as f32).collect(),
        _ => t.to_f32_vec()?,
    })
}

/// Exact comparison (bit patterns), naming the first differing element.
fn expect(what: &str, got: &Tensor, shape: &[usize], want: &[f32]) -> Res<()> {
    if got.shape() != shape {
        return Err(format!("{what}: shape {:?}, expected {shape:?}", got.shape()).into());
    }
    let g = read(got)?;
    if let Some(i) = (0..want.len()).find(|&i| g[i].to_bits() != want[i].to_bits()) {
        return Err(format!("{what}: element {i} is {}, expected {}", g[i], want[i]).into());
    }
    Ok(())
}

/// Sum in member order in f32 (i32: exact integers here), optionally divided, rounded to dtype.
fn reference_sum(parts: &[Vec<f32>], dtype: DType, avg: bool) -> Vec<f32> {
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        for (a, x) in acc.iter_mut().zip(p) {
            *a += x;
        }
    }
    if avg {
        let k = parts.len() as f32;
        acc.iter_mut().for_each(|a| *a /= k);
    }
    round(&acc, dtype)
}

/// Rows member `src` sends to member `dst` in the all-to-all (uneven, some zero).
fn a2a_rows(src: usize, dst: usize) -> usize {
    (src * 2 + dst * 3 + 1) % 4
}

/// Every collective on `g` against the reference built from all members' inputs.
fn check_group(g: &Group, salt: u64) -> Res<()> {
    let members = g.world_ranks().to_vec();
    let (n, me) = (members.len(), g.rank());
    for (di, dtype) in [DType::F32, DType::BF16, DType::F16, DType::I32]
        .into_iter()
        .enumerate()
    {
        let salt = salt * 16 + di as u64 * 4;
        let inputs = |s: u64, len: usize| -> Vec<Vec<f32>> {
            members
                .iter()
                .map(|&r| values(r, salt + s, len, dtype))
                .collect()
        };
        let what = |op: &str| format!("{op} {dtype} in group {members:?}");

        let x = inputs(0, 15);
        let t = tensor(&x[me], &[3, 5], dtype)?;
        expect(
            &what("all_reduce sum"),
            &g.all_reduce(&t, ReduceOp::Sum)?,
            &[3, 5],
            &reference_sum(&x, dtype, false),
        )?;
        if dtype != DType::I32 {
            expect(
                &what("all_reduce avg"),
                &g.all_reduce(&t, ReduceOp::Avg)?,
                &[3, 5],
                &reference_sum(&x, dtype, true),
            )?;
        }

        let x = inputs(1, n * 2 * 3);
        let t = tensor(&x[me], &[n * 2, 3], dtype)?;
        let chunks: Vec<Vec<f32>> = x.iter().map(|v| v[me * 6..(me + 1) * 6].to_vec()).collect();
        expect(
            &what("reduce_scatter"),
            &g.reduce_scatter(&t, ReduceOp::Sum)?,
            &[2, 3],
            &reference_sum(&chunks, dtype, false),
        )?;

        let x = inputs(2, 6);
        let t = tensor(&x[me], &[2, 3], dtype)?;
        expect(
            &what("all_gather"),
            &g.all_gather(&t)?,
            &[n * 2, 3],
            &x.concat(),
        )?;

        let root = n - 1;
        expect(
            &what("broadcast"),
            &g.broadcast(&t, root)?,
            &[2, 3],
            &x[root],
        )?;

        // Variable all-to-all: member s sends a2a_rows(s, d) rows of width 3 to member d.
        let send: Vec<usize> = (0..n).map(|d| a2a_rows(me, d)).collect();
        let recv: Vec<usize> = (0..n).map(|s| a2a_rows(s, me)).collect();
        if g.all_to_all_counts(&send)? != recv {
            return Err(format!("{}: counts {recv:?} expected", what("all_to_all_counts")).into());
        }
        let totals: Vec<usize> = (0..n)
            .map(|s| (0..n).map(|d| a2a_rows(s, d)).sum())
            .collect();
        let x: Vec<Vec<f32>> = members
            .iter()
            .enumerate()
            .map(|(s, &r)| values(r, salt + 3, totals[s] * 3, dtype))
            .collect();
        let t = tensor(&x[me], &[totals[me], 3], dtype)?;
        let mut want = Vec::new();
        for (s, xs) in x.iter().enumerate() {
            let start: usize = (0..me).map(|d| a2a_rows(s, d)).sum();
            want.extend_from_slice(&xs[start * 3..(start + a2a_rows(s, me)) * 3]);
        }
        let got = g.all_to_all(&t, &send, &recv)?;
        expect(&what("all_to_all"), &got, &[recv.iter().sum(), 3], &want)?;

        // The expert-parallel exchange with two local experts per member, and its way back.
        let counts: Vec<usize> = (0..n * 2).map(|i| (me + i) % 3).collect();
        let rows: usize = counts.iter().sum();
        let x = tensor(
            &values(members[me], salt + 5, rows * 4, dtype),
            &[rows, 4],
            dtype,
        )?;
        let (got, plan) = exchange(g, &x, &counts)?;
        let want_counts: Vec<usize> = (0..n)
            .flat_map(|s| (0..2).map(move |e| (s + me * 2 + e) % 3))
            .collect();
        if plan.recv_counts() != want_counts {
            return Err(format!(
                "{}: {:?}, expected {want_counts:?}",
                what("exchange counts"),
                plan.recv_counts()
            )
            .into());
        }
        let back = plan.reverse(g, &got)?;
        expect(&what("exchange round trip"), &back, &[rows, 4], &read(&x)?)?;
        g.barrier()?;
    }
    Ok(())
}
