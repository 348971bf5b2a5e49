//! The server's counters, gauges and latency histograms, rendered as Prometheus text for
//! `GET /metrics`. Written by the HTTP layer (requests by status) and the engine thread
//! (tokens, sequences, KV rows, time to first token, inter-token latency).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    /// Observations at or below each bound of `BUCKETS`.
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, x: f64) {
        for (c, &b) in self.counts.iter_mut().zip(&BUCKETS) {
            if x <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += x;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(&BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Finished HTTP requests by (route, status code).
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    /// KV cache rows (sequence slots) in use, and their cached positions.
    pub kv_rows_used: AtomicU64,
    pub kv_positions_used: AtomicU64,
    pub kv_rows_total: AtomicU64,
    pub kv_positions_total: AtomicU64,
    pub steps: AtomicU64,
    /// Sequences dropped because their client went away.
    pub aborted: AtomicU64,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((route.to_string(), status)).or_default() += 1;
    }

    pub fn time_to_first_token(&self, s: f64) {
        self.ttft
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(s);
    }

    pub fn inter_token_latency(&self, s: f64) {
        self.itl
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(s);
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP moe_requests_total HTTP requests by route and status code.\n\
             # TYPE moe_requests_total counter\n",
        );
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "moe_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let scalars: [(&str, &str, &str, &AtomicU64); 10] = [
            (
                "moe_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled.",
                &self.prompt_tokens,
            ),
            (
                "moe_generation_tokens_total",
                "counter",
                "Tokens generated.",
                &self.generation_tokens,
            ),
            (
                "moe_num_requests_running",
                "gauge",
                "Sequences holding a KV cache row.",
                &self.running,
            ),
            (
                "moe_num_requests_waiting",
                "gauge",
                "Sequences queued for a KV cache row.",
                &self.waiting,
            ),
            (
                "moe_kv_cache_rows_used",
                "gauge",
                "KV cache rows (sequence slots) in use.",
                &self.kv_rows_used,
            ),
            (
                "moe_kv_cache_rows_total",
                "gauge",
                "KV cache rows (--max-num-seqs).",
                &self.kv_rows_total,
            ),
            (
                "moe_kv_cache_positions_used",
                "gauge",
                "Token positions cached in the rows in use.",
                &self.kv_positions_used,
            ),
            (
                "moe_kv_cache_positions_total",
                "gauge",
                "Token positions the cache holds (rows x --max-model-len).",
                &self.kv_positions_total,
            ),
            (
                "moe_engine_steps_total",
                "counter",
                "Forward passes the engine ran.",
                &self.steps,
            ),
            (
                "moe_sequences_aborted_total",
                "counter",
                "Sequences dropped because the client disconnected.",
                &self.aborted,
            ),
        ];
        for (name, kind, help, v) in scalars {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        }
        self.ttft.lock().unwrap_or_else(|p| p.into_inner()).render(
            &mut out,
            "moe_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
        );
        self.itl.lock().unwrap_or_else(|p| p.into_inner()).render(
            &mut out,
            "moe_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 400);
        m.prompt_tokens.store(7, Relaxed);
        m.time_to_first_token(0.003);
        m.time_to_first_token(0.2);
        let t = m.render();
        assert!(t.contains("moe_requests_total{route=\"/v1/completions\",status=\"200\"} 2\n"));
        assert!(t.contains("moe_requests_total{route=\"/v1/completions\",status=\"400\"} 1\n"));
        assert!(t.contains("\nmoe_prompt_tokens_total 7\n"));
        assert!(t.contains("moe_time_to_first_token_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(t.contains("moe_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(t.contains("moe_time_to_first_token_seconds_bucket{le=\"0.25\"} 2\n"));
        assert!(t.contains("moe_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(t.contains("moe_time_to_first_token_seconds_count 2\n"));
        assert!(t.contains("moe_inter_token_latency_seconds_count 0\n"));
    }
}
