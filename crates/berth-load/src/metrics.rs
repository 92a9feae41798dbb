//! berthd's metrics endpoint (`--metrics-listen`): one scrape over HTTP/1.0, TCP or unix socket,
//! and the sampler's tick time read from the Prometheus text it serves.

use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: String,
    pub value: f64,
}

/// Parses Prometheus text exposition: comments and blank lines are skipped, as are lines whose
/// value is not a number.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let (series, rest) = match line.find('}') {
                Some(close) => (&line[..=close], &line[close + 1..]),
                None => line.split_once(char::is_whitespace)?,
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let value = rest.split_whitespace().next()?.parse().ok()?;
            Some(Sample {
                name: name.to_owned(),
                labels: labels.to_owned(),
                value,
            })
        })
        .collect()
}

/// The sampler's tick time over a window, and the metric it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TickTime {
    pub metric: String,
    pub mean_ms: f64,
    /// Ticks counted in the window, when the metric is a histogram or summary.
    pub ticks: Option<f64>,
}

/// The tick time between two scrapes: the mean of a histogram or summary whose name mentions
/// `tick` (Δsum / Δcount); else the mean of a `…tick…_total` time counter over a `…batches_total`
/// or `…ticks_total` counter (berthd's `berth_sampler_tick_seconds` over
/// `berth_sampler_batches`); else the last value of a gauge mentioning `tick`. Units come from the
/// name's suffix (`_seconds`, `_milliseconds`, `_microseconds`, `_nanoseconds`).
pub fn tick_time(before: &[Sample], after: &[Sample]) -> Option<TickTime> {
    let total = |samples: &[Sample], name: &str| -> Option<f64> {
        let matching: Vec<f64> = samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    };
    let mentions_tick = |name: &str| name.contains("tick");
    let histogram = after.iter().find_map(|s| {
        let base = s.name.strip_suffix("_sum")?;
        (mentions_tick(base) && total(after, &format!("{base}_count")).is_some())
            .then(|| base.to_owned())
    });
    if let Some(base) = histogram {
        let (d_sum, d_count) = histogram_window(before, after, &base, None)?;
        let factor = unit_to_ms(&base)?;
        return (d_count > 0.0).then(|| TickTime {
            mean_ms: d_sum / d_count * factor,
            ticks: Some(d_count),
            metric: base,
        });
    }
    let timer = after.iter().find_map(|s| {
        let base = s.name.strip_suffix("_total")?;
        (mentions_tick(base) && unit_to_ms(base).is_some()).then(|| s.name.clone())
    });
    let ticks = after
        .iter()
        .find(|s| s.name.ends_with("batches_total") || s.name.ends_with("ticks_total"))
        .map(|s| s.name.clone());
    if let (Some(timer), Some(ticks)) = (timer, ticks) {
        let factor = unit_to_ms(timer.trim_end_matches("_total"))?;
        let d_time = total(after, &timer)? - total(before, &timer).unwrap_or(0.0);
        let d_ticks = total(after, &ticks)? - total(before, &ticks).unwrap_or(0.0);
        return (d_ticks > 0.0).then(|| TickTime {
            mean_ms: d_time / d_ticks * factor,
            ticks: Some(d_ticks),
            metric: format!("{timer} / {ticks}"),
        });
    }
    let gauge = after.iter().find(|s| {
        mentions_tick(&s.name) && !s.name.ends_with("_total") && unit_to_ms(&s.name).is_some()
    })?;
    Some(TickTime {
        mean_ms: gauge.value * unit_to_ms(&gauge.name)?,
        ticks: None,
        metric: gauge.name.clone(),
    })
}

/// The mean in milliseconds of histogram `base` (a `_seconds` one, or any unit [`unit_to_ms`]
/// knows) over the series whose labels include `label` (`grpc_method="CreateContainer"`),
/// between two scrapes: Δsum / Δcount. None where nothing was observed between them.
pub fn histogram_mean_ms(
    before: &[Sample],
    after: &[Sample],
    base: &str,
    label: &str,
) -> Option<f64> {
    let (d_sum, d_count) = histogram_window(before, after, base, Some(label))?;
    (d_count > 0.0).then(|| d_sum / d_count * unit_to_ms(base).unwrap_or(1.0))
}

/// How much histogram `base`'s sum and count grew between two scrapes, over its series whose
/// labels include `label` (all of them for None); None where `after` has no such sum or count.
fn histogram_window(
    before: &[Sample],
    after: &[Sample],
    base: &str,
    label: Option<&str>,
) -> Option<(f64, f64)> {
    let total = |samples: &[Sample], suffix: &str| -> Option<f64> {
        let name = format!("{base}{suffix}");
        let matching: Vec<f64> = samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| label.is_none_or(|label| s.labels.split(',').any(|l| l == label)))
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    };
    let growth = |suffix: &str| Some(total(after, suffix)? - total(before, suffix).unwrap_or(0.0));
    Some((growth("_sum")?, growth("_count")?))
}

/// berthd's metrics from `address`, parsed, or why there are none.
pub async fn scrape_samples(address: Option<&str>) -> Result<Vec<Sample>, String> {
    match address {
        None => {
            Err("no metrics endpoint configured (pass --metrics-listen with --address)".to_owned())
        }
        Some(address) => scrape(address).await.map(|t| parse(&t)),
    }
}

fn unit_to_ms(name: &str) -> Option<f64> {
    [
        ("_seconds", 1e3),
        ("_milliseconds", 1.0),
        ("_microseconds", 1e-3),
        ("_nanoseconds", 1e-6),
        ("_nanos", 1e-6),
    ]
    .iter()
    .find(|(suffix, _)| name.ends_with(suffix))
    .map(|&(_, factor)| factor)
}

/// Fetches `/metrics` from `address`: a unix socket path (contains a '/') or a TCP `host:port`.
pub async fn scrape(address: &str) -> Result<String, String> {
    let fetch = async {
        if address.contains('/') {
            get(tokio::net::UnixStream::connect(address).await?).await
        } else {
            get(tokio::net::TcpStream::connect(address).await?).await
        }
    };
    let response = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| format!("metrics endpoint {address} did not answer within 10 s"))?
        .map_err(|e| format!("metrics endpoint {address}: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("metrics endpoint {address}: no HTTP header in the answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("metrics endpoint {address} answered {status:?}"));
    }
    Ok(body.to_owned())
}

async fn get<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> std::io::Result<String> {
    // HTTP/1.0: the server closes the connection after the body, which is neither chunked nor kept.
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: berthd\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HISTOGRAM_BEFORE: &str = "\
# HELP berth_sampler_tick_seconds Time one sampler tick took.
# TYPE berth_sampler_tick_seconds histogram
berth_sampler_tick_seconds_bucket{le=\"0.001\"} 1
berth_sampler_tick_seconds_bucket{le=\"+Inf\"} 10
berth_sampler_tick_seconds_sum 0.02
berth_sampler_tick_seconds_count 10
berth_containers 1000
";

    const HISTOGRAM_AFTER: &str = "\
berth_sampler_tick_seconds_bucket{le=\"0.001\"} 1
berth_sampler_tick_seconds_bucket{le=\"+Inf\"} 20
berth_sampler_tick_seconds_sum 0.07
berth_sampler_tick_seconds_count 20
";

    #[test]
    fn a_histograms_mean_is_taken_over_the_series_with_the_label() {
        let before = parse(
            "h_seconds_sum{op=\"run\"} 1\nh_seconds_count{op=\"run\"} 10\n\
             h_seconds_sum{op=\"delete\"} 5\nh_seconds_count{op=\"delete\"} 5\n",
        );
        let after = parse(
            "h_seconds_sum{op=\"run\"} 1.5\nh_seconds_count{op=\"run\"} 30\n\
             h_seconds_sum{op=\"delete\"} 9\nh_seconds_count{op=\"delete\"} 6\n",
        );
        let mean = histogram_mean_ms(&before, &after, "h_seconds", "op=\"run\"").unwrap();
        assert!((mean - 25.0).abs() < 1e-9, "{mean}");
        assert_eq!(
            histogram_mean_ms(&after, &after, "h_seconds", "op=\"run\""),
            None
        );
    }

    #[test]
    fn parse_reads_names_labels_and_values() {
        let samples = parse(HISTOGRAM_BEFORE);
        assert_eq!(samples.len(), 5);
        assert_eq!(samples[0].name, "berth_sampler_tick_seconds_bucket");
        assert_eq!(samples[0].labels, "le=\"0.001\"");
        assert_eq!(samples[4].value, 1000.0);
        assert!(parse("x{a=\"b\"} not-a-number\n# only comments\n").is_empty());
    }

    #[test]
    fn tick_time_from_a_histogram_is_the_window_mean() {
        let tick = tick_time(&parse(HISTOGRAM_BEFORE), &parse(HISTOGRAM_AFTER)).unwrap();
        assert_eq!(tick.metric, "berth_sampler_tick_seconds");
        assert!((tick.mean_ms - 5.0).abs() < 1e-9, "{tick:?}");
        assert_eq!(tick.ticks, Some(10.0));
    }

    #[test]
    fn tick_time_from_berthds_time_and_batch_counters() {
        let before = parse(
            "berth_sampler_batches_total 4\nberth_sampler_tick_seconds_total 0.01\n\
             berth_sampler_last_tick_seconds 0.002\n# EOF\n",
        );
        let after = parse(
            "berth_sampler_batches_total 14\nberth_sampler_tick_seconds_total 0.04\n\
             berth_sampler_last_tick_seconds 0.009\n# EOF\n",
        );
        let tick = tick_time(&before, &after).unwrap();
        assert_eq!(
            tick.metric,
            "berth_sampler_tick_seconds_total / berth_sampler_batches_total"
        );
        assert!((tick.mean_ms - 3.0).abs() < 1e-9, "{tick:?}");
        assert_eq!(tick.ticks, Some(10.0));
    }

    #[test]
    fn tick_time_from_a_gauge_converts_its_unit() {
        let after = parse("berth_sampler_last_tick_nanoseconds 2500000\nberth_ticks_total 9\n");
        let tick = tick_time(&[], &after).unwrap();
        assert_eq!(tick.metric, "berth_sampler_last_tick_nanoseconds");
        assert!((tick.mean_ms - 2.5).abs() < 1e-9);
        assert_eq!(tick_time(&[], &parse("berth_containers 3\n")), None);
    }
}
