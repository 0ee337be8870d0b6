//! The `ModelServer` resource: a self-hosted, OpenAI-compatible model server (vLLM, llama.cpp's
//! server, TGI, SGLang) that the operator runs on the right GPUs and scales on LLM signals. Types
//! and schema only; the operator's `servers` module builds its Deployment, Service, PDB and
//! autoscaler.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvFromSource, EnvVar, LocalObjectReference, ResourceRequirements, SecurityContext, Toleration, Volume,
    VolumeMount,
};
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::{Duration, status::Condition};

/// A model server the operator runs: a Deployment on GPU nodes, a Service, a PodDisruptionBudget,
/// and an autoscaler that owns its replica count.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "bulwark.dev",
    version = "v1alpha1",
    kind = "ModelServer",
    namespaced,
    status = "ModelServerStatus",
    category = "bulwark",
    shortname = "ms",
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Scheduled","type":"string","jsonPath":".status.conditions[?(@.type==\"Scheduled\")].status"}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || !has(self.replicas)").message("an autoscaler owns the replica count: set replicas or autoscaling, not both"))]
pub struct ModelServerSpec {
    /// The server's image, such as `vllm/vllm-openai:v0.11.0`.
    #[schemars(length(min = 1))]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalRefName>,
    /// The entrypoint; the image's own when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The port the server listens on (OpenAI API under `/v1`).
    #[serde(default = "default_port")]
    pub port: u16,
    /// The server's health endpoint, for readiness and startup probes.
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// Where the server serves Prometheus metrics (queue depth, KV-cache use), which sidecars
    /// read to pick a replica and KEDA to scale.
    #[serde(default = "default_metrics_path")]
    pub metrics_path: String,
    /// How long loading the model may take before the container counts as stuck (the startup
    /// probe's budget).
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<Gpu>,
    /// Replicas without an autoscaler (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// CPU and memory (GPUs come from `gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_object")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "preserved_list")]
    pub env: Vec<EnvVar>,
    /// Variables from Secrets or ConfigMaps (a model hub token, say).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "preserved_list")]
    pub env_from: Vec<EnvFromSource>,
    /// Volumes of the pod, such as a model cache; mounted with `volumeMounts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "preserved_list")]
    pub volumes: Vec<Volume>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "preserved_list")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Size of `/dev/shm` (a memory `emptyDir`), which tensor-parallel servers need.
    #[serde(default = "default_shm_size")]
    pub shm_size: String,
    /// Added to the node selection the GPU needs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Added to the toleration of the `nvidia.com/gpu` taint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "preserved_list")]
    pub tolerations: Vec<Toleration>,
    /// Merged with the GPU node affinity (its required terms are combined with the GPU's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_object")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// The container's security context; by default no privilege escalation, no capabilities
    /// and the runtime's seccomp profile (most model server images run as root, so
    /// `runAsNonRoot` is the user's to set where the image allows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_object")]
    pub security_context: Option<SecurityContext>,
    /// Pods that may be down at once in a voluntary disruption (the PodDisruptionBudget).
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: u32,
}

/// The name of a Secret (image pull secrets).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRefName {
    pub name: String,
}

impl From<&LocalRefName> for LocalObjectReference {
    fn from(r: &LocalRefName) -> Self {
        Self { name: r.name.clone() }
    }
}

/// What GPUs a replica needs, by the node labels of NVIDIA's GPU Feature Discovery.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gpu {
    /// GPUs per replica (`nvidia.com/gpu`), or MIG slices of `mig`.
    #[serde(default = "one")]
    pub count: u32,
    /// Accepted `nvidia.com/gpu.product` values, such as `NVIDIA-H100-80GB-HBM3`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub products: Vec<String>,
    /// Least memory per GPU (`nvidia.com/gpu.memory`, which is in MiB).
    #[serde(default, rename = "minMemoryGiB", skip_serializing_if = "Option::is_none")]
    pub min_memory_gib: Option<u32>,
    /// A MIG profile, such as `1g.10gb`: the resource `nvidia.com/mig-<profile>` instead of whole GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Autoscaling {
    /// `hpa` (default): an `autoscaling/v2` HorizontalPodAutoscaler on the pods' metrics (served
    /// by a custom metrics adapter); `keda`: a KEDA ScaledObject with a Prometheus trigger.
    #[serde(default)]
    pub engine: Engine,
    /// 0 scales to zero (KEDA only).
    #[serde(default = "one")]
    pub min_replicas: u32,
    pub max_replicas: u32,
    #[serde(default)]
    pub metric: AutoscalingMetric,
    /// The value per replica to hold: requests waiting or running, a KV-cache fraction (0.8),
    /// or GPU utilization in percent.
    pub target: f64,
    /// KEDA: the Prometheus to query (default: the operator's `--prometheus-address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_address: Option<String>,
    /// KEDA: the value that wakes a server scaled to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_target: Option<f64>,
    /// How long the load must stay low before replicas are removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_stabilization: Option<Duration>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Engine {
    #[default]
    Hpa,
    Keda,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum AutoscalingMetric {
    /// Requests waiting for a slot (`vllm:num_requests_waiting`).
    #[default]
    QueueDepth,
    /// Requests being served (`vllm:num_requests_running`).
    InflightRequests,
    /// KV-cache use, 0 to 1 (`vllm:kv_cache_usage_perc`).
    KvCacheUsage,
    /// GPU utilization in percent (`DCGM_FI_DEV_GPU_UTIL`, from NVIDIA's DCGM exporter).
    GpuUtilization,
}

impl AutoscalingMetric {
    /// The metric's name as the server (or DCGM) exports it.
    pub fn series(self) -> &'static str {
        match self {
            Self::QueueDepth => "vllm:num_requests_waiting",
            Self::InflightRequests => "vllm:num_requests_running",
            Self::KvCacheUsage => "vllm:kv_cache_usage_perc",
            Self::GpuUtilization => "DCGM_FI_DEV_GPU_UTIL",
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelServerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas the Deployment wants now (the autoscaler's choice, when there is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// The Service's base URL, as a route backend reaches it without the sidecar's replica choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `Ready` (replicas serve), `Scheduled` (`InsufficientGPU` when no node offers the GPUs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

fn one() -> u32 {
    1
}
fn default_port() -> u16 {
    8000
}
fn default_health_path() -> String {
    "/health".into()
}
fn default_metrics_path() -> String {
    "/metrics".into()
}
fn default_startup_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_shm_size() -> String {
    "2Gi".into()
}
fn default_max_unavailable() -> u32 {
    1
}

/// Core Kubernetes types embedded here (env, volumes, affinity, ...) are typed in Rust and
/// checked by the API server on the Deployment; in the CRD they are kept as they are written,
/// so the CRD stays small.
fn preserved_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn preserved_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}})
}

impl ModelServerSpec {
    /// The base URL of the server behind its Service (`http://<name>.<ns>.svc:<port>/v1`).
    pub fn service_url(&self, namespace: &str, name: &str) -> String {
        format!("http://{name}.{namespace}.svc:{}/v1", self.port)
    }
}
