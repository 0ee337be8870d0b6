//! `SidecarConfig`: the compiled, versioned contract between the control plane and the sidecar.
//! Plain serde; never holds a secret value, only where to read one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    Duration,
    policy::ScannerPolicySpec,
    route::{CircuitBreaker, ExactCache, LoadBalancing, Provider, RateLimit, RetryPolicy, RouteMatch},
};

pub const CONFIG_API_VERSION: &str = "bulwark.dev/sidecar-config/v1";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    pub api_version: String,
    /// A hash of the content: equal configs have equal versions.
    #[serde(default)]
    pub version: String,
    /// Rules in the order they are tried: most specific first.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Scanner policies by `namespace/name`, as routes reference them.
    #[serde(default)]
    pub scanner_policies: BTreeMap<String, ScannerPolicySpec>,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        Self {
            api_version: CONFIG_API_VERSION.into(),
            version: String::new(),
            routes: vec![],
            scanner_policies: BTreeMap::new(),
        }
    }
}

/// One rule of one `LLMRoute`, self-contained.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// `namespace/route/rule`, unique in a config; keys state that outlives reloads.
    pub id: String,
    /// `namespace/route`, the metric label.
    pub route: String,
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    #[serde(default, skip_serializing_if = "LoadBalancing::is_weighted")]
    pub load_balancing: LoadBalancing,
    #[serde(default)]
    pub fallback: Vec<BackendConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default)]
    pub timeouts: ResolvedTimeouts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ExactCache>,
    /// `namespace/name` of a policy in `scannerPolicies`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanner_policy: Option<String>,
    /// A rollout step's mirror: a copy of this share of requests also goes to a canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

/// Where mirrored copies go and how many: `percent` of the requests this rule serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub backend: BackendConfig,
    pub percent: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResolvedTimeouts {
    pub request: Duration,
    pub first_token: Duration,
    pub idle: Duration,
}

impl Default for ResolvedTimeouts {
    fn default() -> Self {
        Self { request: Duration::from_secs(300), first_token: Duration::from_secs(60), idle: Duration::from_secs(60) }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    pub provider: Provider,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// A ModelServer's ready replicas, when the operator knows them: the sidecar calls one of
    /// them directly (by load) instead of `url`, its Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Replicas>,
}

/// The replicas of a self-hosted backend and where each serves its metrics.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Replicas {
    /// Base URLs including `/v1`, such as `http://10.0.3.7:8000/v1`, sorted.
    pub endpoints: Vec<String>,
    /// The path of each replica's Prometheus metrics (queue depth, KV-cache use), or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_path: Option<String>,
}

fn one() -> u32 {
    1
}

/// Where the sidecar reads a provider key at request time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum CredentialSource {
    File { path: String },
    Env { name: String },
}
