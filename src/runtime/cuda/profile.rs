//! `MOE_PROFILE=1` (the `profile` kernel setting, per thread): every kernel launch and cuBLAS
//! call is bracketed by stream synchronisations and timed, and the host time spent issuing it is
//! measured too, into one table for the process. `report()` prints it per kernel (calls,
//! device+launch time, host issue time). Diagnosis only: the synchronisations slow everything
//! down; totals say whether a phase is bound by kernels or by the host.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

#[derive(Default, Clone, Copy)]
struct Entry {
    calls: u64,
    synced_s: f64,
    issue_s: f64,
}

fn table() -> &'static Mutex<HashMap<String, Entry>> {
    static T: OnceLock<Mutex<HashMap<String, Entry>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

pub fn enabled() -> bool {
    crate::runtime::KernelSettings::read(|s| s.profile)
}

/// Runs `issue` (which enqueues work on `stream`) timed as described above.
pub(crate) fn timed<T>(
    name: &str,
    stream: &cudarc::driver::CudaStream,
    issue: impl FnOnce() -> T,
) -> T {
    if !enabled() {
        return issue();
    }
    let _ = stream.synchronize();
    let t0 = Instant::now();
    let r = issue();
    let t1 = Instant::now();
    let _ = stream.synchronize();
    let t2 = Instant::now();
    if let Ok(mut t) = table().lock() {
        let e = t.entry(name.to_string()).or_default();
        e.calls += 1;
        e.synced_s += (t2 - t0).as_secs_f64();
        e.issue_s += (t1 - t0).as_secs_f64();
    }
    r
}

/// Calls of `kernel` recorded so far (launches while profiling was on; tests check with it that
/// the kernel they force ran).
pub fn calls(kernel: &str) -> u64 {
    table()
        .lock()
        .map_or(0, |t| t.get(kernel).map_or(0, |e| e.calls))
}

/// Clears the counters.
pub fn reset() {
    if let Ok(mut t) = table().lock() {
        t.clear();
    }
}

/// The table, most time first; None when profiling is off.
pub fn report() -> Option<String> {
    if !enabled() {
        return None;
    }
    let t = table().lock().ok()?;
    let mut rows: Vec<(&String, &Entry)> = t.iter().collect();
    rows.sort_by(|a, b| b.1.synced_s.total_cmp(&a.1.synced_s));
    let total: f64 = rows.iter().map(|r| r.1.synced_s).sum();
    let issue: f64 = rows.iter().map(|r| r.1.issue_s).sum();
    let mut s = format!(
        "{:<44} {:>8} {:>12} {:>10} {:>12}\n",
        "kernel", "calls", "synced ms", "share", "issue us/call"
    );
    for (k, e) in rows {
        s += &format!(
            "{:<44} {:>8} {:>12.3} {:>9.1}% {:>12.2}\n",
            k,
            e.calls,
            1e3 * e.synced_s,
            100.0 * e.synced_s / total.max(1e-12),
            1e6 * e.issue_s / e.calls.max(1) as f64
        );
    }
    s += &format!(
        "total synced {:.3} ms, host issue {:.3} ms\n",
        1e3 * total,
        1e3 * issue
    );
    Some(s)
}
