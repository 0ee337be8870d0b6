//! The protocol between sidecars and the operator on port 15010 (HTTPS, HTTP/2).
//!
//! * `GET /v1/config` opens the config stream: newline-delimited JSON, one complete
//!   [`SidecarConfig`](crate::SidecarConfig) per line, the current one at once and each new
//!   version as it is compiled. Empty lines are keep-alives.
//! * `POST /v1/report` sends a [`Report`] every few seconds on the same connection.
//!
//! Both carry `Authorization: Bearer <projected service-account token>` (audience `bulwark`).
//! The operator maps the token to its pod, so a sidecar only ever gets its own workload's config.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const STREAM_PATH: &str = "/v1/config";
pub const REPORT_PATH: &str = "/v1/report";
pub const DEFAULT_PORT: u16 = 15010;
pub const TOKEN_AUDIENCE: &str = "bulwark";
/// Pods with this label set to `"true"` run a sidecar the operator programs.
pub const SIDECAR_LABEL: &str = "bulwark.dev/inject";

/// Upper bounds (seconds) of the latency and time-to-first-token histograms, so that reports
/// from every sidecar add up bucket by bucket.
pub const LATENCY_BOUNDS: [f64; 14] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// What one sidecar saw since it started. Counters are cumulative per `instance`, so a lost
/// report loses nothing and a restarted sidecar (new instance) starts from zero.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Random per sidecar process.
    pub instance: String,
    /// The config version the sidecar runs.
    pub version: String,
    /// Reports of this instance delivered before this one. An operator that has not seen the
    /// instance yet (it restarted, or took over) counts a first report with `delivered > 0` as
    /// a baseline only: another operator already counted what it holds.
    #[serde(default)]
    pub delivered: u64,
    #[serde(default)]
    pub backends: Vec<BackendOutcome>,
    #[serde(default)]
    pub routes: Vec<RouteOutcome>,
}

/// Upstream attempts of one backend of one route.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackendOutcome {
    /// `namespace/route`.
    pub route: String,
    pub backend: String,
    /// Attempts sent to the backend.
    pub requests: u64,
    /// Failed attempts by class: `timeout`, `connect`, `reset`, `429`, `4xx`, `5xx`, `stream`.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// Request to end of the response, for answered attempts.
    #[serde(default)]
    pub latency: Histogram,
    #[serde(default)]
    pub first_token: Histogram,
    /// Answers of this backend that output scanners blocked.
    #[serde(default)]
    pub output_blocks: u64,
}

/// Requests of one route that were not a backend's doing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteOutcome {
    pub route: String,
    pub scanner_blocks: u64,
}

/// A fixed-bucket histogram over [`LATENCY_BOUNDS`]; `counts` has one more slot for +Inf.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: vec![0; LATENCY_BOUNDS.len() + 1], sum: 0.0 }
    }
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        let slot = LATENCY_BOUNDS.iter().position(|b| seconds <= *b).unwrap_or(LATENCY_BOUNDS.len());
        if let Some(c) = self.counts.get_mut(slot) {
            *c += 1;
        }
        self.sum += seconds;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `self - earlier`, bucket by bucket, or `self` when `earlier` is not a prefix of it.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let grew = self.counts.len() == earlier.counts.len()
            && self.counts.iter().zip(&earlier.counts).all(|(now, then)| now >= then);
        if !grew {
            return self.clone();
        }
        Histogram {
            counts: self.counts.iter().zip(&earlier.counts).map(|(now, then)| now - then).collect(),
            sum: (self.sum - earlier.sum).max(0.0),
        }
    }

    pub fn add(&mut self, other: &Histogram) {
        if self.counts.len() != other.counts.len() {
            return;
        }
        self.counts.iter_mut().zip(&other.counts).for_each(|(a, b)| *a += b);
        self.sum += other.sum;
    }

    /// Quantile `q` (0 to 1), interpolated linearly within its bucket as Prometheus'
    /// `histogram_quantile` does; `None` when empty. In the +Inf bucket it is the highest bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 && (below + c) as f64 >= rank {
                let Some(&upper) = LATENCY_BOUNDS.get(i) else { return LATENCY_BOUNDS.last().copied() };
                let lower = if i == 0 { 0.0 } else { LATENCY_BOUNDS[i - 1] };
                return Some(lower + (upper - lower) * ((rank - below as f64) / c as f64).clamp(0.0, 1.0));
            }
            below += c;
        }
        LATENCY_BOUNDS.last().copied()
    }
}

impl BackendOutcome {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// What happened between `earlier` and `self`, two cumulative counts of the same backend;
    /// `self` whole when the counters went back (a restart).
    pub fn since(&self, earlier: &BackendOutcome) -> BackendOutcome {
        if self.requests < earlier.requests {
            return self.clone();
        }
        let errors = self
            .errors
            .iter()
            .map(|(class, n)| (class.clone(), n.saturating_sub(earlier.errors.get(class).copied().unwrap_or(0))))
            .filter(|(_, n)| *n > 0)
            .collect();
        BackendOutcome {
            route: self.route.clone(),
            backend: self.backend.clone(),
            requests: self.requests - earlier.requests,
            errors,
            latency: self.latency.since(&earlier.latency),
            first_token: self.first_token.since(&earlier.first_token),
            output_blocks: self.output_blocks.saturating_sub(earlier.output_blocks),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_add_up_and_subtract() {
        let mut a = Histogram::default();
        [0.004, 0.02, 0.3, 200.0].into_iter().for_each(|s| a.observe(s));
        assert_eq!(a.count(), 4);
        assert_eq!(a.counts[0], 1);
        assert_eq!(a.counts[LATENCY_BOUNDS.len()], 1);
        let mut b = a.clone();
        b.observe(0.3);
        let d = b.since(&a);
        assert_eq!(d.count(), 1);
        assert_eq!(d.quantile(0.5), Some(0.375), "halfway into (0.25, 0.5]");
        assert_eq!(a.since(&b), a, "a reset counter counts from zero");
        let mut sum = a.clone();
        sum.add(&d);
        assert_eq!(sum.counts, b.counts);
        assert_eq!(a.quantile(0.5), Some(0.025), "the top of (0.01, 0.025], which holds the 2nd of 4");
        assert_eq!(a.quantile(1.0), Some(120.0), "+Inf reads as the highest bound");
        assert_eq!(Histogram::default().quantile(0.9), None);
        let mut even = Histogram::default();
        (0..100).for_each(|i| even.observe(1.0 + f64::from(i) * 0.015));
        let p95 = even.quantile(0.95).unwrap();
        assert!((2.2..2.5).contains(&p95), "{p95}: within (1, 2.5], interpolated");
    }
}
