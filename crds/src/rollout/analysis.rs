//! Judges a window of outcomes: the canary's error rate, p95 latency, p95 time to first token
//! and output-block rate, against absolute thresholds and against the stable. Too few canary
//! requests is inconclusive, never a failure. Pure: outcomes in, an `AnalysisResult` out.

use super::{Analysis, AnalysisResult, Signal, Verdict};
use crate::control::BackendOutcome;

/// Failure classes that are the backend's fault; other 4xx are the client's.
const ERROR_CLASSES: [&str; 5] = ["5xx", "timeout", "connect", "reset", "stream"];

/// Errors of `o` as the analysis counts them.
pub fn errors(a: &Analysis, o: &BackendOutcome) -> u64 {
    o.errors
        .iter()
        .filter(|(class, _)| ERROR_CLASSES.contains(&class.as_str()) || (a.count_429 && class.as_str() == "429"))
        .map(|(_, n)| n)
        .sum()
}

fn rate(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// What one backend showed in a window, signal by signal: from the sidecars' reports
/// ([`Measured::of`]), or from Prometheus queries ([`Measured::set`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    pub requests: u64,
    pub error_rate: Option<f64>,
    pub p95_latency: Option<f64>,
    pub p95_first_token: Option<f64>,
    pub block_rate: Option<f64>,
}

impl Measured {
    pub fn of(a: &Analysis, o: &BackendOutcome) -> Self {
        Self {
            requests: o.requests,
            error_rate: rate(errors(a, o), o.requests),
            p95_latency: o.latency.quantile(0.95),
            p95_first_token: o.first_token.quantile(0.95),
            block_rate: rate(o.output_blocks, o.requests),
        }
    }

    /// Sets a signal by the name a Prometheus query gives it (`requests`, `errorRate`, ...);
    /// `None`: there was nothing to measure.
    pub fn set(&mut self, signal: &str, value: Option<f64>) {
        match signal {
            "requests" => self.requests = value.map_or(0, |v| v.max(0.0).round() as u64),
            "errorRate" => self.error_rate = value,
            "p95Latency" => self.p95_latency = value,
            "p95FirstToken" => self.p95_first_token = value,
            "blockRate" => self.block_rate = value,
            _ => {}
        }
    }
}

/// How one signal is read off what was measured.
#[derive(Clone, Copy)]
enum Measure {
    ErrorRate,
    P95Latency,
    P95FirstToken,
    BlockRate,
}

impl Measure {
    fn of(self, m: &Measured) -> Option<f64> {
        match self {
            Self::ErrorRate => m.error_rate,
            Self::P95Latency => m.p95_latency,
            Self::P95FirstToken => m.p95_first_token,
            Self::BlockRate => m.block_rate,
        }
    }

    /// Seconds print as durations, rates as fractions.
    fn show(self, v: f64) -> String {
        match self {
            Self::P95Latency | Self::P95FirstToken => format!("{v:.3}s"),
            Self::ErrorRate | Self::BlockRate => format!("{v:.3}"),
        }
    }
}

/// Judges the canary's outcomes of the window (`canary`) against the thresholds, and against
/// the stable's outcomes of the same window where a threshold is relative.
pub fn judge(a: &Analysis, canary: &BackendOutcome, stable: &BackendOutcome, at: String) -> AnalysisResult {
    judge_measured(a, &Measured::of(a, canary), &Measured::of(a, stable), at)
}

/// [`judge`], on signals measured already.
pub fn judge_measured(a: &Analysis, canary: &Measured, stable: &Measured, at: String) -> AnalysisResult {
    let secs = |d: Option<crate::Duration>| d.map(|d| d.as_std().as_secs_f64());
    let wanted: [(&str, Measure, Option<f64>, bool); 8] = [
        ("errorRate", Measure::ErrorRate, Some(a.max_error_rate), false),
        ("errorRateIncrease", Measure::ErrorRate, a.max_error_rate_increase, true),
        ("p95Latency", Measure::P95Latency, secs(a.max_p95_latency), false),
        ("p95LatencyIncrease", Measure::P95Latency, secs(a.max_p95_latency_increase), true),
        ("p95FirstToken", Measure::P95FirstToken, secs(a.max_p95_first_token), false),
        ("p95FirstTokenIncrease", Measure::P95FirstToken, secs(a.max_p95_first_token_increase), true),
        ("blockRate", Measure::BlockRate, a.max_block_rate, false),
        ("blockRateIncrease", Measure::BlockRate, a.max_block_rate_increase, true),
    ];
    let enough_canary = canary.requests >= a.min_requests;
    let enough_stable = stable.requests >= a.min_requests;
    let mut signals = vec![];
    let mut failing = vec![];
    let mut unjudged = vec![];
    for (name, measure, threshold, relative) in wanted {
        let Some(threshold) = threshold else { continue };
        let value = match (measure.of(canary), relative) {
            (Some(c), true) => measure.of(stable).map(|s| c - s),
            (v, _) => v,
        };
        let verdict = match value {
            _ if !enough_canary => Verdict::Inconclusive,
            _ if relative && !enough_stable => {
                unjudged.push(format!("{name} needs {} stable requests ({} so far)", a.min_requests, stable.requests));
                Verdict::Inconclusive
            }
            None => {
                unjudged.push(format!("{name} has nothing to measure yet"));
                Verdict::Inconclusive
            }
            Some(v) if v > threshold => {
                failing.push(format!("{name} {} > {}", measure.show(v), measure.show(threshold)));
                Verdict::Fail
            }
            Some(_) => Verdict::Pass,
        };
        signals.push(Signal { name: name.to_owned(), value, threshold, verdict });
    }
    let (verdict, message) = if !enough_canary {
        let m = format!("{} of {} canary requests in the window", canary.requests, a.min_requests);
        (Verdict::Inconclusive, m)
    } else if !failing.is_empty() {
        (Verdict::Fail, failing.join("; "))
    } else if !unjudged.is_empty() {
        (Verdict::Inconclusive, unjudged.join("; "))
    } else {
        (Verdict::Pass, String::new())
    };
    AnalysisResult { at, verdict, canary_requests: canary.requests, stable_requests: stable.requests, message, signals }
}

/// An analysis whose signals could not be read (a query failed).
pub fn unreadable(at: String, why: String) -> AnalysisResult {
    AnalysisResult {
        at,
        verdict: Verdict::Error,
        canary_requests: 0,
        stable_requests: 0,
        message: why,
        signals: vec![],
    }
}
