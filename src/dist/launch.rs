//! `moe launch --nproc N -- <moe command>`: starts N worker processes of this binary on this host
//! with torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR=127.0.0.1`, a free `MASTER_PORT`), prefixes their output with `[rank N]`, and when
//! a worker fails, gives the others `timeout_s` to finish (they fail on their own once a peer is
//! gone), terminates the rest and fails naming every rank that failed, with its exit status.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Error, Result, DEFAULT_TIMEOUT_S};

#[derive(clap::Args, Clone, Debug)]
pub struct LaunchArgs {
    /// Worker processes to start on this host (one per GPU with --device cuda).
    #[arg(long)]
    pub nproc: usize,
    /// Seconds the other workers get to finish after one fails, before they are terminated.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_S)]
    pub timeout_s: u64,
    /// The moe command every worker runs, e.g. `train --config run.toml`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

/// Runs `args.command` in `args.nproc` processes of the current executable.
pub fn run_launch(args: &LaunchArgs) -> Result<()> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Launch(format!("cannot find this program's path: {e}")))?;
    launch(&exe, args)
}

/// Runs `program args.command` in `args.nproc` processes (see the module comment).
pub fn launch(program: &Path, args: &LaunchArgs) -> Result<()> {
    if args.nproc == 0 {
        return Err(Error::Launch("--nproc must be at least 1".into()));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| Error::Launch(format!("cannot find a free port for the store: {e}")))?
        .port();
    let (tx, rx) = mpsc::channel();
    let mut pids = Vec::with_capacity(args.nproc);
    let mut forwarders = Vec::new();
    for rank in 0..args.nproc {
        let spawned = Command::new(program)
            .args(&args.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", args.nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                pids.iter().for_each(|&pid| kill(pid));
                return Err(Error::Launch(format!(
                    "cannot start rank {rank} ({}): {e}",
                    program.display()
                )));
            }
        };
        if let Some(out) = child.stdout.take() {
            forwarders.push(forward(out, rank, false));
        }
        if let Some(err) = child.stderr.take() {
            forwarders.push(forward(err, rank, true));
        }
        pids.push(child.id());
        // A blocking wait per worker: exits arrive in the order they happen.
        let tx = tx.clone();
        std::thread::spawn(move || {
            let status = child.wait().map_err(|e| e.to_string());
            let _ = tx.send((rank, status));
        });
    }
    drop(tx);

    let timeout = Duration::from_secs(args.timeout_s);
    let mut statuses: Vec<Option<String>> = vec![None; args.nproc];
    let mut failed = Vec::new();
    let mut deadline: Option<Instant> = None;
    let mut terminated = Vec::new();
    while statuses.iter().any(Option::is_none) {
        let wait = deadline.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok((rank, status)) => {
                if !matches!(&status, Ok(s) if s.success()) {
                    failed.push(rank);
                    deadline.get_or_insert(Instant::now() + timeout);
                }
                statuses[rank] = Some(match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                for rank in (0..args.nproc).filter(|&r| statuses[r].is_none()) {
                    kill(pids[rank]);
                    terminated.push(rank);
                }
                deadline = None;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for f in forwarders {
        let _ = f.join();
    }
    if failed.is_empty() {
        return Ok(());
    }
    // The order seen is only a hint (a rank's peers may fail before its own exit is reported);
    // the workers' own messages above name the rank they lost.
    let status = |r: usize| {
        statuses[r]
            .clone()
            .unwrap_or_else(|| "unknown status".into())
    };
    let list: Vec<String> = failed
        .iter()
        .filter(|r| !terminated.contains(r))
        .map(|&r| format!("rank {r} ({})", status(r)))
        .collect();
    let mut msg = format!("worker(s) failed, in the order seen: {}", list.join(", "));
    if !terminated.is_empty() {
        let list: Vec<String> = terminated.iter().map(|r| r.to_string()).collect();
        msg += &format!(
            "; rank(s) {} terminated {} s after the first failure",
            list.join(", "),
            args.timeout_s
        );
    }
    Err(Error::Launch(msg))
}

/// Ends a worker that outlived the timeout (SIGKILL: it may be stuck in a wait).
fn kill(pid: u32) {
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Copies a worker's output to ours line by line with a `[rank N] ` prefix.
fn forward(
    pipe: impl Read + Send + 'static,
    rank: usize,
    stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches('\n');
            let _ = if stderr {
                writeln!(std::io::stderr().lock(), "[rank {rank}] {text}")
            } else {
                writeln!(std::io::stdout().lock(), "[rank {rank}] {text}")
            };
            line.clear();
        }
    })
}
