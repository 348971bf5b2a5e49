//! The `dist` layer across real processes (CPU backend): every collective against a reference
//! built from all ranks' inputs (exact: the CPU backend reduces in rank order), sub-groups
//! (2 x 2), the agreement check, the launcher, and faults (a rank killed mid-collective, a stalled
//! rank, a rank that never arrives, bad environment). Workers are `moe-dist-worker` processes;
//! timeouts are a few seconds so the file stays well under a minute.

mod common;
use common::free_port;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use moe::dist::{BackendKind, DistEnv, Group};

const WORKER: &str = env!("CARGO_BIN_EXE_moe-dist-worker");

/// Starts `ranks` of a world of `world` workers running `scenario` with `timeout_s`;
/// `env(rank)` adds or overrides variables.
fn spawn(
    world: usize,
    ranks: &[usize],
    scenario: &str,
    timeout_s: u64,
    env: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> Vec<(usize, Child)> {
    let port = free_port();
    ranks
        .iter()
        .map(|&rank| {
            let mut cmd = Command::new(WORKER);
            cmd.args(["run", scenario, "--timeout-s", &timeout_s.to_string()])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (k, v) in env(rank) {
                cmd.env(k, v);
            }
            (rank, cmd.spawn().expect("start moe-dist-worker"))
        })
        .collect()
}

struct Finished {
    rank: usize,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn finish(children: Vec<(usize, Child)>) -> Vec<Finished> {
    children
        .into_iter()
        .map(|(rank, c)| {
            let Output {
                status,
                stdout,
                stderr,
            } = c.wait_with_output().unwrap();
            Finished {
                rank,
                code: status.code(),
                stdout: String::from_utf8_lossy(&stdout).into_owned(),
                stderr: String::from_utf8_lossy(&stderr).into_owned(),
            }
        })
        .collect()
}

fn run_world(world: usize, scenario: &str, timeout_s: u64) -> Vec<Finished> {
    finish(spawn(
        world,
        &(0..world).collect::<Vec<_>>(),
        scenario,
        timeout_s,
        |_| vec![],
    ))
}

#[track_caller]
fn assert_all_ok(out: &[Finished], scenario: &str) {
    for f in out {
        assert_eq!(
            f.code,
            Some(0),
            "rank {}: stdout {} stderr {}",
            f.rank,
            f.stdout,
            f.stderr
        );
        assert!(
            f.stdout
                .contains(&format!("rank {}: ok {scenario}", f.rank)),
            "{}",
            f.stdout
        );
    }
}

/// All collectives for f32/bf16/f16/i32 with uneven and zero all-to-all counts, and the
/// expert-parallel exchange round trip, at world size 2.
#[test]
fn collectives_match_reference_world_2() {
    assert_all_ok(&run_world(2, "collectives", 10), "collectives");
}

/// The same at world size 4, plus the EP groups [[0, 1], [2, 3]] and DP groups [[0, 2], [1, 3]].
#[test]
fn collectives_and_subgroups_world_4() {
    assert_all_ok(&run_world(4, "collectives", 10), "collectives");
}

#[test]
fn agreement_mismatch_names_label_and_ranks() {
    for f in run_world(4, "agree-mismatch", 10) {
        assert_eq!(f.code, Some(1), "rank {}: {}", f.rank, f.stderr);
        assert!(
            f.stderr
                .contains("ranks disagree on 'config': ranks 1, 3 differ from rank 0"),
            "rank {}: {}",
            f.rank,
            f.stderr
        );
    }
}

/// Rank 1 exits between two all-reduces: every other rank fails at once naming rank 1 and the
/// operation.
#[test]
fn killed_rank_is_named_by_the_others() {
    let t0 = Instant::now();
    let out = run_world(4, "die", 3);
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    for f in out {
        if f.rank == 1 {
            assert_eq!(f.code, Some(7));
            continue;
        }
        assert_eq!(f.code, Some(1), "rank {}: {}", f.rank, f.stderr);
        assert!(
            f.stderr.contains(&format!(
                "rank {r}: error: all_reduce (#1, rank {r}): rank 1 closed the connection",
                r = f.rank
            )),
            "rank {}: {}",
            f.rank,
            f.stderr
        );
    }
}

/// Rank 1 never enters the all-reduce: the others time out after 2 s naming it.
#[test]
fn stalled_rank_times_out() {
    let t0 = Instant::now();
    let mut children = spawn(3, &[0, 1, 2], "stall", 2, |_| vec![]);
    let (_, mut stalled) = children.remove(1);
    let out = finish(children);
    let waited = t0.elapsed();
    stalled.kill().unwrap();
    stalled.wait().unwrap();
    assert!(waited < Duration::from_secs(20), "{waited:?}");
    for f in out {
        assert_eq!(f.code, Some(1), "rank {}: {}", f.rank, f.stderr);
        assert!(
            f.stderr.contains("all_reduce (#0, rank ")
                && f.stderr
                    .contains("timed out after 2.0 s waiting for rank 1"),
            "rank {}: {}",
            f.rank,
            f.stderr
        );
    }
}

/// Rank 2 of 3 never starts: ranks 0 and 1 give up after the timeout naming it (rank 1 may
/// see rank 0's store go first).
#[test]
fn rendezvous_times_out_naming_the_missing_rank() {
    let t0 = Instant::now();
    let out = finish(spawn(3, &[0, 1], "join", 2, |_| vec![]));
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    for f in out {
        assert_eq!(f.code, Some(1), "rank {}: {}", f.rank, f.stderr);
        assert!(
            f.stderr.contains("rank(s) 2 never arrived within 2.0 s")
                || (f.rank != 0
                    && f.stderr
                        .contains("rank 2 never arrived: the store went away")),
            "rank {}: {}",
            f.rank,
            f.stderr
        );
    }
}

/// A rank started with another WORLD_SIZE is refused, naming the variable and rank 0's value.
#[test]
fn world_size_disagreement_is_refused() {
    let out = finish(spawn(2, &[0, 1], "join", 2, |rank| {
        if rank == 1 {
            vec![("WORLD_SIZE", "3".to_string())]
        } else {
            vec![]
        }
    }));
    let r1 = &out[1];
    assert_eq!(r1.code, Some(1), "{}", r1.stderr);
    assert!(
        r1.stderr
            .contains("WORLD_SIZE=\"3\": the same on every rank (rank 0 has 2)"),
        "{}",
        r1.stderr
    );
    // Rank 0 waits for the rank 1 that never checked in, then gives up.
    assert_eq!(out[0].code, Some(1), "{}", out[0].stderr);
    assert!(
        out[0].stderr.contains("rank(s) 1 never arrived"),
        "{}",
        out[0].stderr
    );
}

fn launch(nproc: usize, scenario: &str) -> Output {
    Command::new(WORKER)
        .args([
            "launch",
            "--nproc",
            &nproc.to_string(),
            "--timeout-s",
            "5",
            "--",
        ])
        .args(["run", scenario, "--timeout-s", "3"])
        .output()
        .unwrap()
}

#[test]
fn launcher_runs_workers_with_rank_prefixes() {
    let out = launch(3, "join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for r in 0..3 {
        assert!(
            stdout.contains(&format!("[rank {r}] rank {r}: ok join")),
            "{stdout}"
        );
    }
}

/// Through the launcher: rank 1 dies, the others fail naming it, the launcher lists every failed
/// rank with its status.
#[test]
fn launcher_names_the_rank_that_died() {
    let t0 = Instant::now();
    let out = launch(3, "die");
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("launch: worker(s) failed, in the order seen: ")
            && stderr.contains("rank 1 (exit status: 7)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "[rank 0] rank 0: error: all_reduce (#1, rank 0): rank 1 closed the connection"
        ),
        "{stderr}"
    );
}

/// Bad input in this process: the store's port is taken, the master cannot be reached.
#[test]
fn port_in_use_and_unreachable_master() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let env = |rank| DistEnv {
        rank,
        world_size: 2,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let e = Group::init(&env(0), BackendKind::Cpu, Duration::from_secs(2))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&format!("rank 0 cannot host the store on port {port}")),
        "{e}"
    );
    drop(taken);
    let t0 = Instant::now();
    let e = Group::init(&env(1), BackendKind::Cpu, Duration::from_secs(1))
        .err()
        .unwrap()
        .to_string();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(
        e.contains(&format!(
            "rendezvous at 127.0.0.1:{port}: could not reach the store within 1.0 s"
        )),
        "{e}"
    );
}
