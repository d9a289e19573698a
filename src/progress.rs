//! Progress of long work, for people: an indicatif bar on a terminal; elsewhere (CI logs, `nohup`,
//! stderr redirected to a file) one plain line every few seconds, as llama.cpp's tools print:
//!
//! ```text
//! convert: 120.0 MiB / 530.0 MiB (23%), 80.1 MiB/s, ETA 5 s, blk.3.ffn_down.weight
//! ```
//!
//! The interval is 5 s; `OURO_QUANT_PROGRESS_SECS` sets another (0: every update, for tests).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What the counts are.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    Bytes,
    /// Things of the named kind ("chunk", "job").
    Items(&'static str),
}

struct Plain {
    start: Instant,
    last: Option<Instant>,
    every: Duration,
}

/// A progress report that draws a bar on a terminal and prints plain lines elsewhere.
pub struct Progress {
    label: String,
    unit: Unit,
    bar: ProgressBar,
    plain: Option<Mutex<Plain>>,
}

impl Progress {
    /// `quiet`: no bar even on a terminal (`--json` runs keep the terminal for their output);
    /// plain lines off a terminal are printed all the same, on stderr.
    pub fn new(label: &str, unit: Unit, quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let template = match unit {
            Unit::Bytes => "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg}".to_string(),
            Unit::Items(what) => format!("{{bar:40}} {what} {{pos}}/{{len}} {{eta}} {{msg}}"),
        };
        let bar = ProgressBar::new(0).with_style(ProgressStyle::with_template(&template).expect("template"));
        if !tty || quiet {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        let every = std::env::var("OURO_QUANT_PROGRESS_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(Duration::from_secs(5), Duration::from_secs_f64);
        let plain = (!tty).then(|| Mutex::new(Plain { start: Instant::now(), last: None, every }));
        Progress { label: label.to_string(), unit, bar, plain }
    }

    /// Reports `done` of `total`, working on `what`.
    pub fn update(&self, done: u64, total: u64, what: &str) {
        self.bar.set_length(total);
        self.bar.set_position(done);
        self.bar.set_message(what.to_string());
        let Some(plain) = &self.plain else {
            return;
        };
        let mut p = plain.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // The first line after one interval, then one per interval.
        let due = match p.last {
            None => now.duration_since(p.start) >= p.every,
            Some(t) => now.duration_since(t) >= p.every,
        };
        if !due {
            return;
        }
        p.last = Some(now);
        eprintln!("{}", self.line(done, total, what, now.duration_since(p.start)));
    }

    fn line(&self, done: u64, total: u64, what: &str, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        let pct = if total > 0 { 100.0 * done as f64 / total as f64 } else { 0.0 };
        let eta = if rate > 0.0 && total >= done { format!("{:.0} s", (total - done) as f64 / rate) } else { "?".into() };
        let counts = match self.unit {
            Unit::Bytes => format!(
                "{} / {} ({pct:.0}%), {}/s",
                crate::inspect::human_bytes(done),
                crate::inspect::human_bytes(total),
                crate::inspect::human_bytes(rate as u64)
            ),
            Unit::Items(kind) => format!("{kind} {done}/{total} ({pct:.0}%), {rate:.2}/s"),
        };
        let what = if what.is_empty() { String::new() } else { format!(", {}", crate::error::printable(what)) };
        format!("{}: {counts}, ETA {eta}{what}", self.label)
    }

    /// Clears the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_say_done_total_rate_and_eta() {
        let p = Progress { label: "convert".into(), unit: Unit::Bytes, bar: ProgressBar::hidden(), plain: None };
        let l = p.line(1 << 20, 4 << 20, "blk.0.ffn_down.weight", Duration::from_secs(2));
        assert!(l.starts_with("convert: 1.00 MiB / 4.00 MiB (25%), 512.00 KiB/s, ETA 6 s, blk.0.ffn_down.weight"), "{l}");
        let p = Progress { label: "validate".into(), unit: Unit::Items("chunk"), bar: ProgressBar::hidden(), plain: None };
        assert_eq!(p.line(3, 12, "", Duration::from_secs(3)), "validate: chunk 3/12 (25%), 1.00/s, ETA 9 s");
    }
}
