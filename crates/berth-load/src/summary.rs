//! Latency samples and what the report says about them: nearest-rank percentiles, mean and max.

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of latency samples, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// The percentiles of `samples`, None when there are none.
    pub fn of(samples: &[Duration]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let total: Duration = sorted.iter().sum();
        Some(Percentiles {
            count: sorted.len(),
            p50_ms: millis(nearest_rank(&sorted, 50.0)),
            p90_ms: millis(nearest_rank(&sorted, 90.0)),
            p99_ms: millis(nearest_rank(&sorted, 99.0)),
            mean_ms: millis(total) / sorted.len() as f64,
            max_ms: millis(sorted[sorted.len() - 1]),
        })
    }

    /// The p50 of the first and of the last 100 of `samples`, in the order they were taken, when
    /// there are at least 200: does a create get slower with more running?
    pub fn p50_first_and_last_100(samples: &[Duration]) -> Option<(f64, f64)> {
        if samples.len() < 200 {
            return None;
        }
        let first = Percentiles::of(&samples[..100])?;
        let last = Percentiles::of(&samples[samples.len() - 100..])?;
        Some((first.p50_ms, last.p50_ms))
    }

    /// "p50 / p90 / p99" with one decimal.
    pub fn triple(&self) -> String {
        format!(
            "{:.1} / {:.1} / {:.1}",
            self.p50_ms, self.p90_ms, self.p99_ms
        )
    }
}

/// The smallest sample that at least `percent` % of the samples do not exceed.
fn nearest_rank(sorted: &[Duration], percent: f64) -> Duration {
    let rank = (percent / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_hundred() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let p = Percentiles::of(&samples).unwrap();
        assert_eq!(p.count, 100);
        assert_eq!(p.p50_ms, 50.0);
        assert_eq!(p.p90_ms, 90.0);
        assert_eq!(p.p99_ms, 99.0);
        assert_eq!(p.max_ms, 100.0);
        assert_eq!(p.mean_ms, 50.5);
    }

    #[test]
    fn small_sets_take_the_sample_at_or_above_the_rank() {
        let p = Percentiles::of(&ms(&[30, 10, 20])).unwrap();
        assert_eq!((p.p50_ms, p.p90_ms, p.p99_ms), (20.0, 30.0, 30.0));
        let one = Percentiles::of(&ms(&[7])).unwrap();
        assert_eq!((one.p50_ms, one.p99_ms, one.max_ms), (7.0, 7.0, 7.0));
        assert_eq!(one.triple(), "7.0 / 7.0 / 7.0");
    }

    #[test]
    fn no_samples_no_percentiles() {
        assert_eq!(Percentiles::of(&[]), None);
    }
}
