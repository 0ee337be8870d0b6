//! The `ModelRollout` resource: a staged traffic shift from a stable to a canary backend,
//! judged on LLM signals. Types and schema only; the operator drives the steps.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Duration, route::LocalRef, status::Condition};

/// Shifts a route's traffic from `stable` to `canary` step by step, and back when the
/// canary's error rate or time to first token degrade.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "bulwark.dev",
    version = "v1alpha1",
    kind = "ModelRollout",
    namespaced,
    status = "ModelRolloutStatus",
    category = "bulwark",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".status.canaryWeight"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("self.stable.backend != self.canary.backend").message("stable and canary must be different backends"))]
pub struct ModelRolloutSpec {
    pub route_ref: LocalRef,
    pub stable: BackendTarget,
    pub canary: BackendTarget,
    #[x_kube(validation = Rule::new("size(self) > 0").message("a rollout needs at least one step"))]
    #[schemars(length(max = 32))]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub analysis: Analysis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_server: Option<ModelServer>,
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
    /// How long the step lasts while analysis passes. None on the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Duration>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Analysis {
    #[serde(default = "default_interval")]
    pub interval: Duration,
    #[serde(default = "default_window")]
    pub window: Duration,
    /// Fewer canary requests than this in the window: no verdict yet.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    #[serde(default = "default_max_error_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95_first_token: Option<Duration>,
}

impl Default for Analysis {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            window: default_window(),
            min_requests: default_min_requests(),
            max_error_rate: default_max_error_rate(),
            max_p95_first_token: None,
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
fn default_max_error_rate() -> f64 {
    0.05
}

/// A self-hosted model server the operator runs for the canary.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelServer {
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<Gpu>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
}

fn default_port() -> u16 {
    8000
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gpu {
    #[serde(default = "one")]
    pub count: u32,
    /// Accepted `nvidia.com/gpu.product` node label values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub products: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory_gi_b: Option<u32>,
}

fn one() -> u32 {
    1
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
pub struct Autoscaling {
    #[serde(default = "one")]
    pub min_replicas: u32,
    pub max_replicas: u32,
    #[serde(default)]
    pub metric: AutoscalingMetric,
    /// Per-replica target of `metric`.
    pub target: u32,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum AutoscalingMetric {
    #[default]
    InflightRequests,
    QueueDepth,
    GpuUtilization,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelRolloutStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<u32>,
    /// The canary's share of traffic that sidecars apply now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis: Option<AnalysisResult>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Sidecars that take the rollout's route, and how many run the current config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<crate::route::SidecarCounts>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutPhase {
    Pending,
    Progressing,
    Paused,
    Succeeded,
    RolledBack,
    Failed,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisResult {
    pub requests: u64,
    pub error_rate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_first_token_ms: Option<u64>,
}
