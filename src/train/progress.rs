//! What a run shows while it trains: a progress bar on a terminal (indicatif: step, loss,
//! tokens/s, MFU, ETA) and, every `log_every` steps, one log line that stays (printed plainly
//! when stderr is not a terminal, so logs of batch jobs read the same).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::metrics::StepRecord;

pub struct Progress {
    bar: ProgressBar,
    total: u64,
}

/// `1m05s`, `2h03m`, `45s`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// `950`, `12.3k`, `4.56M`.
pub fn human_count(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

impl Progress {
    /// A bar over steps `start+1 ..= total`, drawn on stderr when it is a terminal.
    pub fn new(start: u64, total: u64) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:28.cyan/blue} {pos:>6}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_position(start);
        bar.reset_eta();
        Progress { bar, total }
    }

    /// The one-line summary of a step.
    pub fn line(&self, r: &StepRecord, eta: Option<Duration>) -> String {
        let mut s = format!(
            "step {:>6}/{} | loss {:.4} | lr {:.2e} | grad norm {:.3} | {} tok/s | MFU {:.2}%",
            r.step,
            self.total,
            r.loss,
            r.lr,
            r.grad_norm,
            human_count(r.tokens_per_s),
            100.0 * r.mfu
        );
        if r.aux_loss > 0.0 {
            s += &format!(" | aux {:.4}", r.aux_loss);
        }
        if let Some(eta) = eta {
            s += &format!(" | ETA {}", human_duration(eta));
        }
        if r.skipped {
            s += " | SKIPPED (non-finite)";
        }
        s
    }

    /// Advances the bar to `r.step`; with `log`, also prints the step's line.
    pub fn update(&self, r: &StepRecord, log: bool) {
        self.bar.set_position(r.step);
        self.bar.set_message(format!(
            "loss {:.4} | {} tok/s | MFU {:.2}%",
            r.loss,
            human_count(r.tokens_per_s),
            100.0 * r.mfu
        ));
        if log {
            let eta = (r.step < self.total).then(|| self.bar.eta());
            self.println(&self.line(r, eta));
        }
    }

    /// Prints a line above the bar (or plainly without a terminal).
    pub fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_duration(Duration::from_secs(65)), "1m05s");
        assert_eq!(human_duration(Duration::from_secs(7380)), "2h03m");
        assert_eq!(human_count(12_345.0), "12.3k");
        assert_eq!(human_count(4_560_000.0), "4.56M");
        assert_eq!(human_count(950.0), "950");
    }
}
