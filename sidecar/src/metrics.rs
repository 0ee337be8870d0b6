//! Prometheus metrics of the sidecar, with labels bounded by the config (route, backend,
//! model, status class, error code), never by client input. GenAI names follow OpenTelemetry.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub backend: String,
    pub model: String,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub route: String,
    pub backend: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub route: String,
    pub backend: String,
    pub model: String,
    pub gen_ai_token_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub route: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CircuitLabels {
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub route: String,
    pub backend: String,
    /// A replica's base URL, from the config (bounded by its replica count).
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabels {
    pub rollout: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutPhaseLabels {
    pub rollout: String,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaptureLabels {
    /// `http`, `tls` or `other`.
    pub protocol: &'static str,
    /// `routed` (handled as LLM requests), `passthrough`, `rerouted` (passed through until a
    /// request named a routed host), or why it was closed: `timeout`, `oversized`, `malformed`.
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `upstream` (from the app) or `downstream` (to the app).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScannerLabels {
    pub policy: String,
    pub scanner: &'static str,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub policy: String,
    pub scanner: &'static str,
    pub direction: &'static str,
    pub outcome: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

fn scan_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.00001, 3.0, 12))
}

fn tokens() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 12))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histograms<BackendLabels>,
    pub time_to_first_token: Histograms<BackendLabels>,
    pub token_usage: Histograms<TokenLabels>,
    pub retries: Family<CircuitLabels, Counter>,
    pub fallbacks: Family<CircuitLabels, Counter>,
    pub circuit_state: Family<CircuitLabels, Gauge>,
    pub cache: Family<CacheLabels, Counter>,
    pub rate_limited: Family<RouteLabels, Counter>,
    pub stream_errors: Family<CircuitLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub config_info: Family<VersionLabels, Gauge>,
    pub scanner_duration: Histograms<ScannerLabels>,
    pub scanner_verdicts: Family<VerdictLabels, Counter>,
    pub mirrored: Family<RequestLabels, Counter>,
    pub mirror_skipped: Family<CircuitLabels, Counter>,
    pub rollout_canary_weight: Family<RolloutLabels, Gauge>,
    pub rollout_phase: Family<RolloutPhaseLabels, Gauge>,
    pub replica_requests: Family<ReplicaLabels, Counter>,
    pub replica_ejections: Family<CircuitLabels, Counter>,
    pub replica_scrapes: Family<ReloadLabels, Counter>,
    pub captured: Family<CaptureLabels, Counter>,
    pub passthrough_bytes: Family<DirectionLabels, Counter>,
    /// What the sidecar reports to the operator.
    pub outcomes: crate::outcomes::Outcomes,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        registry.register(
            "bulwark_requests",
            "Requests answered, by route, backend, model and status class",
            requests.clone(),
        );
        let duration: Histograms<BackendLabels> = Family::new_with_constructor(seconds);
        registry.register_with_unit(
            "gen_ai_server_request_duration",
            "Time from the request to the end of the response",
            Unit::Seconds,
            duration.clone(),
        );
        let time_to_first_token: Histograms<BackendLabels> = Family::new_with_constructor(seconds);
        registry.register_with_unit(
            "gen_ai_server_time_to_first_token",
            "Time from the request to the first byte of the upstream's response body",
            Unit::Seconds,
            time_to_first_token.clone(),
        );
        let token_usage: Histograms<TokenLabels> = Family::new_with_constructor(tokens);
        registry.register(
            "gen_ai_client_token_usage",
            "Tokens per request, by gen_ai_token_type (input or output)",
            token_usage.clone(),
        );
        let retries = Family::default();
        registry.register("bulwark_retries", "Attempts repeated on the same backend", retries.clone());
        let fallbacks = Family::default();
        registry.register("bulwark_fallbacks", "Requests moved on to this fallback backend", fallbacks.clone());
        let circuit_state = Family::default();
        registry.register(
            "bulwark_circuit_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        let cache = Family::default();
        registry.register("bulwark_cache_lookups", "Response cache lookups by result (hit, miss)", cache.clone());
        let rate_limited = Family::default();
        registry.register("bulwark_rate_limited", "Requests refused by a rate limit", rate_limited.clone());
        let stream_errors = Family::default();
        registry.register(
            "bulwark_stream_errors",
            "Streams that broke after the first byte and ended with an error event",
            stream_errors.clone(),
        );
        let errors = Family::default();
        registry.register("bulwark_request_errors", "Requests answered with an error, by code", errors.clone());
        let reloads = Family::default();
        registry.register("bulwark_config_reloads", "Config loads by result (success, error)", reloads.clone());
        let config_info = Family::default();
        registry.register("bulwark_config_info", "The config version being served", config_info.clone());
        let scanner_duration: Histograms<ScannerLabels> = Family::new_with_constructor(scan_seconds);
        registry.register_with_unit(
            "bulwark_scanner_duration",
            "Time a scanner took on one request or stream window",
            Unit::Seconds,
            scanner_duration.clone(),
        );
        let scanner_verdicts = Family::default();
        registry.register(
            "bulwark_scanner_verdicts",
            "Scanner outcomes: pass, block, redact, audit, error",
            scanner_verdicts.clone(),
        );
        let mirrored = Family::default();
        registry.register(
            "bulwark_mirrored_requests",
            "Mirrored copies of requests sent to a rollout's canary, by status class; their answers are discarded",
            mirrored.clone(),
        );
        let mirror_skipped = Family::default();
        registry.register(
            "bulwark_mirror_skipped",
            "Requests not mirrored because too many mirrored copies were in flight",
            mirror_skipped.clone(),
        );
        let rollout_canary_weight = Family::default();
        registry.register(
            "bulwark_rollout_canary_weight",
            "Percent of the route's traffic a rollout gives its canary now (standalone driver)",
            rollout_canary_weight.clone(),
        );
        let rollout_phase = Family::default();
        registry.register(
            "bulwark_rollout_phase",
            "1 for the phase a rollout is in, 0 for the others (standalone driver)",
            rollout_phase.clone(),
        );
        let replica_requests = Family::default();
        registry.register(
            "bulwark_replica_requests",
            "Attempts sent to each replica of a self-hosted backend, as its load picked them",
            replica_requests.clone(),
        );
        let replica_ejections = Family::default();
        registry.register(
            "bulwark_replica_ejections",
            "Replicas ejected for a cooldown after failing in a row",
            replica_ejections.clone(),
        );
        let replica_scrapes = Family::default();
        registry.register(
            "bulwark_replica_scrapes",
            "Reads of replicas' metrics (queue depth, KV-cache use) by result: success, error",
            replica_scrapes.clone(),
        );
        let captured = Family::default();
        registry.register(
            "bulwark_transparent_connections",
            "Captured connections (--transparent) by protocol (http, tls, other) and action (routed, passthrough)",
            captured.clone(),
        );
        let passthrough_bytes = Family::default();
        registry.register(
            "bulwark_transparent_passthrough_bytes",
            "Bytes of captured connections passed through unchanged, by direction (upstream, downstream)",
            passthrough_bytes.clone(),
        );
        Self {
            registry,
            captured,
            passthrough_bytes,
            replica_scrapes,
            replica_requests,
            replica_ejections,
            mirrored,
            mirror_skipped,
            rollout_canary_weight,
            rollout_phase,
            scanner_duration,
            scanner_verdicts,
            requests,
            duration,
            time_to_first_token,
            token_usage,
            retries,
            fallbacks,
            circuit_state,
            cache,
            rate_limited,
            stream_errors,
            errors,
            reloads,
            config_info,
            outcomes: crate::outcomes::Outcomes::default(),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a config load (from a file, a directory or the operator).
    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// A rollout's phase and canary weight, as the standalone driver holds them.
    pub fn rollout(&self, rollout: &str, phase: bulwark_api::rollout::RolloutPhase, weight: u32) {
        self.rollout_canary_weight.get_or_create(&RolloutLabels { rollout: rollout.to_owned() }).set(i64::from(weight));
        for p in bulwark_api::rollout::RolloutPhase::ALL {
            let labels = RolloutPhaseLabels { rollout: rollout.to_owned(), phase: p.as_str() };
            self.rollout_phase.get_or_create(&labels).set(i64::from(p == phase));
        }
    }

    /// A rollout that is gone from the directory.
    pub fn forget_rollout(&self, rollout: &str) {
        self.rollout_canary_weight.remove(&RolloutLabels { rollout: rollout.to_owned() });
        for p in bulwark_api::rollout::RolloutPhase::ALL {
            self.rollout_phase.remove(&RolloutPhaseLabels { rollout: rollout.to_owned(), phase: p.as_str() });
        }
    }

    pub fn set_version(&self, version: &str) {
        self.config_info.clear();
        self.config_info.get_or_create(&VersionLabels { version: version.to_owned() }).set(1);
    }
}

pub fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
