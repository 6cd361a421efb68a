//! Progress of transfers: a bar on a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Plain progress lines are printed at most this often.
const LINE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    last_line: Option<Instant>,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        Progress {
            bar,
            label: label.to_string(),
            last_line: None,
        }
    }

    /// Updates the position; `peers` and `rate` come from the node when it knows them.
    pub fn update(&mut self, done: u64, total: u64, peers: Option<usize>, rate: Option<f64>) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
            if let Some(p) = peers {
                bar.set_message(format!("{} ({p} peers)", self.label));
            }
            return;
        }
        let due = self.last_line.is_none_or(|t| t.elapsed() >= LINE_INTERVAL);
        if due || done == total {
            self.last_line = Some(Instant::now());
            let pct = if total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / total as f64
            };
            let mut line = format!("{} {done}/{total} bytes ({pct:.1}%)", self.label);
            if let Some(r) = rate {
                line.push_str(&format!(" {:.2} MiB/s", r / (1024.0 * 1024.0)));
                if r > 0.0 && done < total {
                    line.push_str(&format!(" eta {:.0}s", (total - done) as f64 / r));
                }
            }
            if let Some(p) = peers {
                line.push_str(&format!(" peers {p}"));
            }
            println!("{line}");
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }
}
