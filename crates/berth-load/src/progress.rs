//! Where a long phase is: a `\r` line on a terminal, otherwise a line every few seconds.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

pub struct Progress {
    done: Arc<AtomicUsize>,
    ticker: JoinHandle<()>,
    label: String,
    total: usize,
    start: Instant,
}

impl Progress {
    pub fn start(label: impl Into<String>, total: usize) -> Progress {
        let label = label.into();
        let done = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let terminal = std::io::stderr().is_terminal();
        let ticker = tokio::spawn({
            let (done, label) = (done.clone(), label.clone());
            async move {
                // A log gets a line every few seconds rather than a redraw.
                let every = if terminal {
                    Duration::from_millis(200)
                } else {
                    Duration::from_secs(5)
                };
                loop {
                    tokio::time::sleep(every).await;
                    let text = line(&label, done.load(Ordering::Relaxed), total, start.elapsed());
                    if terminal {
                        eprint!("\r{text}\x1b[K");
                    } else {
                        eprintln!("{text}");
                    }
                }
            }
        });
        Progress {
            done,
            ticker,
            label,
            total,
            start,
        }
    }

    pub fn inc(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Stops the ticker and leaves the final count on its own line.
    pub fn finish(self) {
        self.ticker.abort();
        let now = self.done.load(Ordering::Relaxed);
        let text = line(&self.label, now, self.total, self.start.elapsed());
        if std::io::stderr().is_terminal() {
            eprint!("\r{text}\x1b[K\n");
        } else {
            eprintln!("{text}");
        }
        let _ = std::io::stderr().flush();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

/// `label  done/total [#####     ] rate/s  elapsed`
pub fn line(label: &str, done: usize, total: usize, elapsed: Duration) -> String {
    const WIDTH: usize = 24;
    let filled = (done * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    format!(
        "{label:<28} {done:>6}/{total:<6} [{}{}] {rate:>7.1}/s {secs:>6.1} s",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_count_bar_rate_and_time() {
        let text = line("create C=8", 50, 200, Duration::from_secs(2));
        assert_eq!(
            text,
            "create C=8                       50/200    [######                  ]    25.0/s    2.0 s"
        );
        assert!(line("x", 0, 0, Duration::ZERO).contains(&"#".repeat(24)));
    }
}
