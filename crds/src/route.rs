//! The `LLMRoute` resource: which backends serve which requests, and how.
//! Types, defaults and schema only; cross-field checks live in `validate.rs`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Duration, status::Condition};

/// Routes LLM API calls of the selected workloads to weighted backends, with fallbacks,
/// retries, timeouts, circuit breaking, rate limits and caching.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "bulwark.dev",
    version = "v1alpha1",
    kind = "LLMRoute",
    namespaced,
    status = "LLMRouteStatus",
    shortname = "llmr",
    category = "bulwark",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LLMRouteSpec {
    /// Pods whose sidecars take this route. Empty: every sidecar in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<LabelSelector>,
    /// Backends shared by the rules, referenced by name from `fallback`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// Rules are tried most specific first (exact model, then headers, then globs, then paths).
    #[x_kube(validation = Rule::new("size(self) > 0").message("an LLMRoute needs at least one rule"))]
    #[schemars(length(max = 64))]
    pub rules: Vec<RouteRule>,
}

impl LLMRouteSpec {
    /// Every backend the route defines: the shared ones, then each rule's.
    pub fn all_backends(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter().chain(self.rules.iter().flat_map(|r| &r.backends))
    }
}

/// Whether `host` (lowercase, without a port) is one of `patterns`: exact names, or `*.suffix`
/// for any name ending in `.suffix`.
pub fn host_matches(patterns: &[String], host: &str) -> bool {
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1 && host.ends_with(suffix) && host[..host.len() - suffix.len()].ends_with('.')
        }
        None => p == host,
    })
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("(has(self.backends) && size(self.backends) > 0) || (has(self.fallback) && size(self.fallback) > 0)").message("a rule needs at least one backend or fallback"))]
pub struct RouteRule {
    /// A name for metrics and logs; defaults to the rule's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Weighted backends; one is picked per request among those whose circuit is closed.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub backends: Vec<Backend>,
    /// `weighted` (default): a random pick by weight. `leastLoaded`: of two backends drawn by
    /// weight, the one less loaded for its weight (requests in flight times its time to first
    /// token). A rule a ModelRollout shifts splits by the rollout's weights either way.
    #[serde(default, skip_serializing_if = "LoadBalancing::is_weighted")]
    pub load_balancing: LoadBalancing,
    /// Tried in order when the chosen backend fails before the first byte reaches the client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<FallbackRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanner_policy_ref: Option<LocalRef>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancing {
    #[default]
    Weighted,
    LeastLoaded,
}

impl LoadBalancing {
    pub fn is_weighted(&self) -> bool {
        *self == Self::Weighted
    }
}

/// All given conditions must hold; an empty match takes every request.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    /// The hosts the request was addressed to, such as `api.openai.com` or `*.openai.azure.com`
    /// (any one label or more in place of `*`). Captured connections (`--transparent`) to these
    /// hosts are handled as LLM requests; explicit requests to the sidecar name no such host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Request paths, such as `/v1/chat/completions` or `/v1/messages`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Model names the client asks for; `*` and `?` are globs (`gpt-4o*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Request headers that must have exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    #[default]
    Openai,
    AzureOpenai,
    Anthropic,
    /// Any server that speaks the OpenAI API: vLLM, Ollama, llama.cpp, TGI.
    OpenaiCompatible,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::AzureOpenai => "azure-openai",
            Self::Anthropic => "anthropic",
            Self::OpenaiCompatible => "openai-compatible",
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// Unique within the route; used by fallbacks, rollouts and metrics.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[serde(default)]
    pub provider: Provider,
    /// Base URL including the API version path, such as `https://api.openai.com/v1`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// A ModelServer of the route's namespace, instead of `url`: the sidecars reach its ready
    /// replicas directly and pick one by load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_server_ref: Option<LocalRef>,
    /// Model sent upstream, replacing the one the client asked for (the Azure deployment name
    /// for `azure-openai`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Relative share of traffic among the rule's backends.
    #[serde(default = "default_weight")]
    #[schemars(range(max = 10000))]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    /// `api-version` query parameter for `azure-openai`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
}

fn default_weight() -> u32 {
    1
}

/// Where the provider key comes from. The key itself never appears in a resource.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    /// A key of a Secret in the route's namespace, mounted into the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
    /// An environment variable of the sidecar (standalone use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// A file readable by the sidecar (standalone use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackRef {
    /// Name of a backend of this route (in `spec.backends` or any rule's `backends`).
    pub backend: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRef {
    pub name: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Extra attempts on the same backend after the first one fails.
    #[serde(default = "default_attempts")]
    #[schemars(range(max = 10))]
    pub attempts: u32,
    #[serde(default)]
    pub backoff: Backoff,
    /// Causes that are retried (and that move on to the fallback list once retries run out).
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: default_attempts(), backoff: Backoff::default(), retry_on: default_retry_on() }
    }
}

fn default_attempts() -> u32 {
    1
}

pub fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::ConnectFailure, RetryOn::Timeout, RetryOn::TooManyRequests, RetryOn::ServerError]
}

/// Exponential backoff with full jitter: a random wait up to `min(max, base * 2^n)`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    #[serde(default = "default_backoff_base")]
    pub base: Duration,
    #[serde(default = "default_backoff_max")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: default_backoff_base(), max: default_backoff_max() }
    }
}

fn default_backoff_base() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(2)
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    #[serde(rename = "timeout")]
    Timeout,
    #[serde(rename = "429")]
    TooManyRequests,
    #[serde(rename = "5xx")]
    ServerError,
    /// The upstream closed or broke the response before its first byte.
    #[serde(rename = "reset")]
    Reset,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// The whole call, all attempts included. Default 300s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// Until the upstream's first byte, per attempt. Default 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token: Option<Duration>,
    /// Longest silence between two chunks of a streamed response. Default 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Failures in a row that open the circuit.
    #[schemars(range(min = 1))]
    pub consecutive_failures: u32,
    /// How long an open circuit rejects traffic before one probe is let through.
    #[serde(default = "default_cooldown")]
    pub cooldown: Duration,
}

fn default_cooldown() -> Duration {
    Duration::from_secs(30)
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.requestsPerMinute) || has(self.tokensPerMinute)").message("a rateLimit needs requestsPerMinute or tokensPerMinute"))]
pub struct RateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
    /// Who a limit applies to. Default: each client API key (hashed) separately.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateLimitKey>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitKey {
    /// Limit each value of this request header separately.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cache {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<ExactCache>,
}

/// Identical requests (same route, path and normalized body) are answered from memory.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExactCache {
    #[serde(default = "default_cache_ttl")]
    pub ttl: Duration,
    #[serde(default = "default_cache_entries")]
    #[schemars(range(min = 1))]
    pub max_entries: u64,
    /// Upper bound on the cached response bytes of this rule. Default 64 MiB.
    #[serde(default = "default_cache_bytes")]
    #[schemars(range(min = 1))]
    pub max_bytes: u64,
}

impl Default for ExactCache {
    fn default() -> Self {
        Self { ttl: default_cache_ttl(), max_entries: default_cache_entries(), max_bytes: default_cache_bytes() }
    }
}

fn default_cache_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_cache_entries() -> u64 {
    10_000
}
fn default_cache_bytes() -> u64 {
    64 << 20
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LLMRouteStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<SidecarCounts>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SidecarCounts {
    pub total: u32,
    pub up_to_date: u32,
}

#[cfg(test)]
mod tests {
    use super::host_matches;

    #[test]
    fn hosts_match_exactly_or_by_suffix() {
        let p = ["api.openai.com".to_owned(), "*.openai.azure.com".to_owned()];
        assert!(host_matches(&p, "api.openai.com"));
        assert!(host_matches(&p, "team.openai.azure.com"));
        assert!(host_matches(&p, "a.b.openai.azure.com"));
        assert!(!host_matches(&p, "openai.azure.com"), "a wildcard needs a label in its place");
        assert!(!host_matches(&p, "evilopenai.azure.com"));
        assert!(!host_matches(&p, "api.openai.com.evil"));
        assert!(!host_matches(&[], "api.openai.com"));
    }
}
