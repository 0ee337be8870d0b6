//! The `ModelRollout` resource: a staged traffic shift from a stable to a canary backend, judged
//! on LLM signals and rolled back when they degrade. The types live here; `machine` is the pure
//! state machine both drivers (the operator's leader, a standalone sidecar) call, `analysis`
//! judges a window of outcomes, `series` keeps the outcomes so any window can be read.

pub mod analysis;
pub mod control;
pub mod machine;
pub mod run;
pub mod series;

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Duration, route::LocalRef, status::Condition};

/// Shifts a route's traffic from `stable` to `canary` step by step, and back when the
/// canary's errors, latency, time to first token or guardrail blocks degrade.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "bulwark.dev",
    version = "v1alpha1",
    kind = "ModelRollout",
    namespaced,
    status = "ModelRolloutStatus",
    category = "bulwark",
    shortname = "mro",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Step","type":"integer","jsonPath":".status.currentStep"}"#,
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".status.canaryWeight"}"#,
    printcolumn = r#"{"name":"Verdict","type":"string","jsonPath":".status.lastAnalysis.verdict"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("self.stable.backend != self.canary.backend").message("stable and canary must be different backends"))]
#[x_kube(validation = Rule::new("has(self.strategy) && self.strategy == 'blueGreen' ? !has(self.steps) || size(self.steps) == 0 : has(self.steps) && size(self.steps) > 0").message("a canary rollout needs at least one step; a blueGreen rollout takes none (see preview)"))]
pub struct ModelRolloutSpec {
    pub route_ref: LocalRef,
    pub stable: BackendTarget,
    pub canary: BackendTarget,
    /// `canary` (default): traffic moves in `steps`. `blueGreen`: the canary first serves only
    /// requests that carry the preview header, then takes all traffic at once.
    #[serde(default, skip_serializing_if = "Strategy::is_canary")]
    pub strategy: Strategy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub steps: Vec<Step>,
    /// blueGreen only: how the canary is previewed before the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<Preview>,
    #[serde(default)]
    pub analysis: Analysis,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Strategy {
    #[default]
    Canary,
    BlueGreen,
}

impl Strategy {
    pub fn is_canary(&self) -> bool {
        *self == Self::Canary
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendTarget {
    /// A backend name of the referenced route.
    pub backend: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    /// Percent of traffic the canary gets during this step.
    #[schemars(range(max = 100))]
    pub weight: u32,
    /// How long the step holds while analysis passes. Without it, a step before the last waits
    /// for a promote; the last step completes the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Duration>,
    /// Percent of the requests the stable serves that are also copied to the canary; the
    /// copies' answers are discarded and judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub mirror: Option<u32>,
}

/// The preview of a blueGreen rollout: requests with `header: value` go to the canary.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Preview {
    #[serde(default = "default_preview_header")]
    pub header: String,
    #[serde(default = "default_preview_value")]
    pub value: String,
    /// How long the preview holds while analysis passes before the switch; without it, the
    /// switch waits for a promote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Duration>,
    /// Percent of requests also copied to the canary during the preview.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub mirror: Option<u32>,
}

impl Default for Preview {
    fn default() -> Self {
        Self { header: default_preview_header(), value: default_preview_value(), pause: None, mirror: None }
    }
}

pub const PREVIEW_HEADER: &str = "x-bulwark-preview";

fn default_preview_header() -> String {
    PREVIEW_HEADER.into()
}
fn default_preview_value() -> String {
    "true".into()
}

/// How the canary is judged: every `interval`, over the last `window`, against thresholds that
/// are absolute or relative to the stable.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Analysis {
    #[serde(default = "default_interval")]
    pub interval: Duration,
    #[serde(default = "default_window")]
    pub window: Duration,
    /// Fewer canary requests than this in the window: no verdict yet (never a failure, never
    /// a promotion). Relative thresholds need as many stable requests.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Consecutive failed analyses that roll the canary back.
    #[serde(default = "default_failure_limit")]
    pub failure_limit: u32,
    /// Errors: 5xx, timeouts, connection failures, streams broken after the first byte.
    #[serde(default = "default_max_error_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: f64,
    /// The canary's error rate may exceed the stable's by at most this much (0.02: two points).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate_increase: Option<f64>,
    /// Whether upstream 429s count as errors (by default they are the provider's quota, not
    /// the model's fault).
    #[serde(default, rename = "count429", skip_serializing_if = "std::ops::Not::not")]
    pub count_429: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95_latency: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95_latency_increase: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95_first_token: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95_first_token_increase: Option<Duration>,
    /// Share of the canary's answers that output scanners blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_block_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_block_rate_increase: Option<f64>,
    /// Signals read from a Prometheus the user runs, instead of from the sidecars' reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSignals>,
}

/// PromQL queries for some signals, run on the operator against the Prometheus HTTP API (for the
/// canary, and for the stable where a threshold is relative). In each, `$backend` is the backend
/// judged, `$route` and `$namespace` the route's, `$window` the analysis window in seconds
/// (`120s`). The result must be one number (a scalar, or a vector of one sample).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrometheusSignals {
    /// `http://prometheus.monitoring:9090`.
    pub address: String,
    /// By signal: `requests` (requests in the window, for minRequests), `errorRate`,
    /// `p95Latency` and `p95FirstToken` (seconds), `blockRate`.
    pub queries: BTreeMap<String, String>,
    #[serde(default = "default_query_timeout")]
    pub timeout: Duration,
}

/// The signals a Prometheus query may stand for.
pub const PROMETHEUS_SIGNALS: [&str; 5] = ["requests", "errorRate", "p95Latency", "p95FirstToken", "blockRate"];

fn default_query_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for Analysis {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            window: default_window(),
            min_requests: default_min_requests(),
            failure_limit: default_failure_limit(),
            max_error_rate: default_max_error_rate(),
            max_error_rate_increase: None,
            count_429: false,
            max_p95_latency: None,
            max_p95_latency_increase: None,
            max_p95_first_token: None,
            max_p95_first_token_increase: None,
            max_block_rate: None,
            max_block_rate_increase: None,
            prometheus: None,
        }
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(15)
}
fn default_window() -> Duration {
    Duration::from_secs(120)
}
fn default_min_requests() -> u64 {
    50
}
fn default_failure_limit() -> u32 {
    1
}
fn default_max_error_rate() -> f64 {
    0.05
}

/// What the rollout's driver reports, what the operator's status writer adds (conditions,
/// sidecar counts), and the user's controls (`kubectl bulwark rollout`, Argo CD actions).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelRolloutStatus {
    /// The generation the driver acts on; a new one starts the rollout over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,
    /// Index into the steps (for blueGreen: 0 previews, 1 has switched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<u32>,
    /// The canary's share of traffic that sidecars apply now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_weight: Option<u32>,
    /// RFC 3339: when the current step began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<String>,
    /// RFC 3339: when this attempt began; analysis never looks further back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// 1 for the first attempt of a generation, one more for each retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Failed analyses in a row; `failureLimit` of them roll back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_analyses: Option<u32>,
    /// Why the rollout is where it is, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis: Option<AnalysisResult>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Sidecars that take the rollout's route, and how many run the current config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<crate::route::SidecarCounts>,
    /// The user's requests; written by `kubectl bulwark rollout` and Argo CD actions, read by
    /// the driver, never written by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controls: Option<Controls>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RolloutPhase {
    /// Not started: the rollout, its route or its backends are not valid yet.
    Pending,
    Progressing,
    /// Holding: a step waits for a promote, or the user paused it. Analysis goes on.
    Paused,
    /// The last step is reached; the canary keeps its weight.
    Succeeded,
    /// Analysis failed: the canary gets no traffic until the spec changes or a retry.
    RolledBack,
    /// The user aborted: the canary gets no traffic until the spec changes or a retry.
    Aborted,
    /// The signals could not be read: the canary gets no traffic until the spec changes or a retry.
    Failed,
}

impl RolloutPhase {
    pub const ALL: [Self; 7] = [
        Self::Pending,
        Self::Progressing,
        Self::Paused,
        Self::Succeeded,
        Self::RolledBack,
        Self::Aborted,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Progressing => "Progressing",
            Self::Paused => "Paused",
            Self::Succeeded => "Succeeded",
            Self::RolledBack => "RolledBack",
            Self::Aborted => "Aborted",
            Self::Failed => "Failed",
        }
    }

    /// Steps run (traffic may move) in these phases.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Progressing | Self::Paused)
    }
}

/// The verdict of an analysis or of one signal.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// Too few requests to judge.
    Inconclusive,
    /// The signal could not be read (a query failed).
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "Pass",
            Self::Fail => "Fail",
            Self::Inconclusive => "Inconclusive",
            Self::Error => "Error",
        }
    }
}

/// One analysis: each signal against its threshold, over the window's requests.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisResult {
    /// RFC 3339 time of the analysis.
    pub at: String,
    pub verdict: Verdict,
    /// Canary requests in the window (including mirrored copies).
    pub canary_requests: u64,
    pub stable_requests: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<Signal>,
}

/// A signal of an analysis: `errorRate`, `errorRateIncrease`, `p95Latency`,
/// `p95LatencyIncrease`, `p95FirstToken`, `p95FirstTokenIncrease`, `blockRate` or
/// `blockRateIncrease`. Rates are fractions; latencies are seconds.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Signal {
    pub name: String,
    /// `None` when there was nothing to measure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    pub threshold: f64,
    pub verdict: Verdict,
}

/// The user's requests to the driver. Each names the generation and attempt (and for a promote,
/// the step) it is meant for, so it acts once and a stale one never acts on a later state.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Controls {
    /// Hold the current step (analysis goes on); `false` or absent resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Go to the next step, or with `full` to the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote: Option<ControlRequest>,
    /// Send no traffic to the canary until a retry or a new generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<ControlRequest>,
    /// Start a rolled back, aborted or failed rollout over from its first step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<ControlRequest>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ControlRequest {
    pub generation: i64,
    pub attempt: u32,
    /// For a promote: the step it promotes from.
    #[serde(default)]
    pub step: u32,
    /// For a promote: to the last step at once. Always written: a merge patch of a plain
    /// promote must clear a `full` left from an earlier one.
    #[serde(default)]
    pub full: bool,
}
