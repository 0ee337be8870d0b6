//! A `SidecarConfig` turned into what the request path uses: glob matchers, backends with
//! their circuit breakers, rate limiters and caches. State that must outlive a reload
//! (breakers, buckets, cached responses) is kept in `Shared` and reused by id.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bulwark_api::{
    SidecarConfig,
    config::{BackendConfig, Route},
    route::Provider,
};
use globset::{Glob, GlobSet, GlobSetBuilder};
use parking_lot::Mutex;

use crate::{
    cache::Cache,
    circuit::Circuit,
    credentials::Credential,
    ratelimit::RateLimiter,
    replicas::{self, Endpoint},
    request::Api,
    scan::PolicyRuntime,
};

/// Everything one request needs, immutable once built; swapped whole on reload.
pub struct Runtime {
    pub config: Arc<SidecarConfig>,
    pub routes: Vec<Arc<RouteRuntime>>,
}

pub struct RouteRuntime {
    pub cfg: Route,
    models: Option<GlobSet>,
    pub exact_models: Vec<String>,
    pub backends: Vec<Arc<BackendRuntime>>,
    pub fallback: Vec<Arc<BackendRuntime>>,
    pub limiter: Option<Arc<RateLimiter>>,
    pub cache: Option<Arc<Cache>>,
    pub policy: Option<Arc<PolicyRuntime>>,
    /// Mirrored copies: to this backend, this percent of requests.
    pub mirror: Option<(Arc<BackendRuntime>, u32)>,
}

pub struct BackendRuntime {
    pub cfg: BackendConfig,
    pub circuit: Arc<Circuit>,
    pub credential: Option<Arc<Credential>>,
    /// Where its requests go: a ModelServer's ready replicas, or its one URL.
    pub endpoints: Vec<Arc<Endpoint>>,
}

impl BackendRuntime {
    /// The replica (or URL) for the next attempt, by load; a retry avoids the one that just
    /// failed it when there is another.
    pub fn endpoint(&self, now: tokio::time::Instant, avoid: Option<&str>) -> Option<Arc<Endpoint>> {
        match self.endpoints.as_slice() {
            [one] => Some(one.clone()),
            many => {
                let others: Vec<Arc<Endpoint>> =
                    many.iter().filter(|e| Some(e.url.as_str()) != avoid).cloned().collect();
                let from = if others.is_empty() { many } else { &others };
                replicas::pick(from, now, &mut rand::rng())
            }
        }
    }

    /// What another request would cost it: its cheapest replica's cost, of those not ejected.
    pub fn cost(&self, now: tokio::time::Instant) -> f64 {
        self.endpoints.iter().filter(|e| !e.ejected(now)).map(|e| e.cost(now)).fold(f64::INFINITY, f64::min)
    }

    /// Whether this backend can serve `api` as the client sent it.
    pub fn speaks(&self, api: Api) -> bool {
        match self.cfg.provider {
            Provider::Anthropic => api == Api::Messages,
            Provider::Openai | Provider::AzureOpenai | Provider::OpenaiCompatible => api != Api::Messages,
        }
    }
}

/// State kept across reloads, keyed by route id and backend name.
#[derive(Default)]
pub struct Shared {
    /// Loaded models, by directory.
    pub models: crate::scan::model::ModelHub,
    circuits: Mutex<HashMap<String, Arc<Circuit>>>,
    limiters: Mutex<HashMap<String, Arc<RateLimiter>>>,
    caches: Mutex<HashMap<String, Arc<Cache>>>,
    credentials: Mutex<HashMap<bulwark_api::config::CredentialSource, Arc<Credential>>>,
    /// Replicas' load and history, kept across reloads; their metrics are scraped from here.
    pub replicas: Arc<replicas::Registry>,
}

/// The state kept under `key`, or a new one when there is none or its settings changed.
fn reuse<T>(
    map: &Mutex<HashMap<String, Arc<T>>>,
    key: &str,
    same: impl Fn(&T) -> bool,
    new: impl FnOnce() -> T,
) -> Arc<T> {
    let mut m = map.lock();
    match m.get(key) {
        Some(v) if same(v) => v.clone(),
        _ => {
            let v = Arc::new(new());
            m.insert(key.to_owned(), v.clone());
            v
        }
    }
}

impl Shared {
    pub fn with_models(settings: crate::scan::model::ModelSettings) -> Self {
        Self { models: crate::scan::model::ModelHub::new(settings), ..Self::default() }
    }
}

impl Runtime {
    pub fn empty() -> Self {
        Self { config: Arc::new(SidecarConfig::default()), routes: vec![] }
    }

    pub fn build(config: SidecarConfig, shared: &Shared) -> Result<Self, String> {
        if config.api_version != bulwark_api::config::CONFIG_API_VERSION {
            return Err(format!(
                "unsupported config apiVersion {:?}; this sidecar reads {}",
                config.api_version,
                bulwark_api::config::CONFIG_API_VERSION
            ));
        }
        let mut policies = HashMap::new();
        for (name, spec) in &config.scanner_policies {
            policies.insert(name.clone(), Arc::new(PolicyRuntime::build(name, spec, &shared.models)?));
        }
        let mut routes = Vec::with_capacity(config.routes.len());
        let mut live_ids = vec![];
        for r in &config.routes {
            if r.backends.is_empty() && r.fallback.is_empty() {
                return Err(format!("route {}: no backends", r.id));
            }
            let models = if r.matches.models.is_empty() {
                None
            } else {
                let mut b = GlobSetBuilder::new();
                for m in &r.matches.models {
                    b.add(Glob::new(m).map_err(|e| format!("route {}: model pattern {m:?}: {e}", r.id))?);
                }
                Some(b.build().map_err(|e| format!("route {}: {e}", r.id))?)
            };
            let exact_models = r.matches.models.iter().filter(|m| !m.contains(['*', '?', '['])).cloned().collect();
            let mut backend = |b: &BackendConfig| {
                b.url
                    .parse::<http::Uri>()
                    .map_err(|e| format!("route {}: backend {}: url {:?}: {e}", r.id, b.name, b.url))?;
                let key = format!("{}\u{0}{}\u{0}{}", r.id, b.name, b.url);
                let (threshold, cooldown) = r
                    .circuit_breaker
                    .as_ref()
                    .map_or((0, Duration::from_secs(30)), |c| (c.consecutive_failures, c.cooldown.as_std()));
                let circuit = reuse(
                    &shared.circuits,
                    &key,
                    |c| c.settings() == (threshold, cooldown),
                    || Circuit::new(threshold, cooldown),
                );
                live_ids.push(key);
                let credential = b.credential.as_ref().map(|src| {
                    shared
                        .credentials
                        .lock()
                        .entry(src.clone())
                        .or_insert_with(|| Arc::new(Credential::new(src.clone())))
                        .clone()
                });
                let endpoints = endpoints(&shared.replicas, b)?;
                Ok::<_, String>(Arc::new(BackendRuntime { cfg: b.clone(), circuit, credential, endpoints }))
            };
            let backends = r.backends.iter().map(&mut backend).collect::<Result<Vec<_>, _>>()?;
            let fallback = r.fallback.iter().map(&mut backend).collect::<Result<Vec<_>, _>>()?;
            let mirror = r.mirror.as_ref().map(|m| Ok::<_, String>((backend(&m.backend)?, m.percent))).transpose()?;
            let limiter = r.rate_limit.as_ref().map(|rl| {
                let (rpm, tpm) = (rl.requests_per_minute, rl.tokens_per_minute);
                let header = rl.key.as_ref().and_then(|k| k.header.as_deref());
                reuse(
                    &shared.limiters,
                    &r.id,
                    |l| l.same_settings(rpm, tpm, header),
                    || RateLimiter::new(rpm, tpm, header),
                )
            });
            let cache = r.cache.as_ref().map(|c| {
                let (ttl, entries, bytes) = (c.ttl.as_std(), c.max_entries, c.max_bytes);
                reuse(
                    &shared.caches,
                    &r.id,
                    |x| x.same_settings(ttl, entries, bytes),
                    || Cache::new(ttl, entries, bytes),
                )
            });
            let policy = match &r.scanner_policy {
                Some(name) => Some(
                    policies
                        .get(name)
                        .cloned()
                        .ok_or_else(|| format!("route {}: scanner policy {name} is not in the config", r.id))?,
                ),
                None => None,
            };
            routes.push(Arc::new(RouteRuntime {
                cfg: r.clone(),
                models,
                exact_models,
                backends,
                fallback,
                limiter,
                cache,
                policy,
                mirror,
            }));
        }
        // Drop state of routes that are gone, so memory follows the config.
        let ids: std::collections::HashSet<&str> = config.routes.iter().map(|r| r.id.as_str()).collect();
        shared.limiters.lock().retain(|k, _| ids.contains(k.as_str()));
        shared.caches.lock().retain(|k, _| ids.contains(k.as_str()));
        shared.circuits.lock().retain(|k, _| live_ids.contains(k));
        Ok(Self { config: Arc::new(config), routes })
    }

    /// The first route (most specific first) that takes this request.
    pub fn select(&self, api: Api, model: &str, headers: &http::HeaderMap) -> Option<&Arc<RouteRuntime>> {
        self.routes.iter().find(|r| r.matches(api, model, headers))
    }
}

/// The host a request was addressed to: its `Host` header, lowercase, without the port.
pub fn host(headers: &http::HeaderMap) -> Option<String> {
    let h = headers.get(http::header::HOST)?.to_str().ok()?;
    let name = match h.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => h.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(h, |(n, _)| n),
    };
    let name = name.trim_end_matches('.');
    // An empty Host (or one that is only a port) names no host.
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

/// A backend's endpoints: its replicas with where each serves metrics, or its URL.
fn endpoints(registry: &replicas::Registry, b: &BackendConfig) -> Result<Vec<Arc<Endpoint>>, String> {
    let Some(r) = b.replicas.as_ref().filter(|r| !r.endpoints.is_empty()) else {
        return Ok(vec![registry.get(&b.url, None)]);
    };
    r.endpoints
        .iter()
        .map(|url| {
            let uri: http::Uri = url.parse().map_err(|e| format!("backend {}: replica {url:?}: {e}", b.name))?;
            let metrics = r
                .metrics_path
                .as_ref()
                .and_then(|path| Some(format!("{}://{}{path}", uri.scheme_str()?, uri.authority()?)));
            Ok(registry.get(url.trim_end_matches('/'), metrics))
        })
        .collect()
}

impl RouteRuntime {
    fn matches(&self, api: Api, model: &str, headers: &http::HeaderMap) -> bool {
        // A rule none of whose backends speaks this API cannot take the request.
        if !self.backends.iter().chain(&self.fallback).any(|b| b.speaks(api)) {
            return false;
        }
        let m = &self.cfg.matches;
        if !m.hosts.is_empty() && !host(headers).is_some_and(|h| bulwark_api::route::host_matches(&m.hosts, &h)) {
            return false;
        }
        if !m.paths.is_empty() && !m.paths.iter().any(|p| p.trim_end_matches('/') == api.path()) {
            return false;
        }
        if let Some(globs) = &self.models
            && !globs.is_match(model)
        {
            return false;
        }
        m.headers.iter().all(|(k, v)| headers.get(k.as_str()).is_some_and(|h| h.as_bytes() == v.as_bytes()))
    }

    /// The `model` metric label: a name from the config, never raw client input.
    pub fn model_label(&self, backend: &BackendRuntime, requested: &str) -> String {
        if let Some(m) = &backend.cfg.model {
            m.clone()
        } else if self.exact_models.iter().any(|m| m == requested) {
            requested.to_owned()
        } else {
            "other".to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use bulwark_api::{CompileOptions, compile, manifest};

    use super::*;

    fn runtime(yaml: &str, shared: &Shared) -> Runtime {
        let (res, errors) = manifest::parse(yaml, "default");
        assert!(errors.is_empty(), "{errors:?}");
        let out = compile(&res, None, &CompileOptions::default());
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        Runtime::build(out.config, shared).unwrap()
    }

    const ROUTES: &str = r#"
apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: r}
spec:
  rules:
    - name: gold
      match: {models: ["gpt-*"], headers: {x-tier: gold}}
      backends: [{name: premium, url: 'http://premium/v1'}]
      circuitBreaker: {consecutiveFailures: 2}
    - name: gpt
      match: {models: ["gpt-*"], paths: [/v1/chat/completions]}
      backends: [{name: openai, url: 'http://openai/v1'}]
      rateLimit: {requestsPerMinute: 10}
    - name: claude
      match: {paths: [/v1/messages]}
      backends: [{name: claude, provider: anthropic, url: 'http://claude/v1'}]
"#;

    #[test]
    fn routes_match_on_path_model_and_headers() {
        let rt = runtime(ROUTES, &Shared::default());
        let mut gold = http::HeaderMap::new();
        gold.insert("x-tier", "gold".parse().unwrap());
        let none = http::HeaderMap::new();
        let pick = |api, model, h: &http::HeaderMap| rt.select(api, model, h).map(|r| r.cfg.id.as_str());
        assert_eq!(pick(Api::ChatCompletions, "gpt-4o", &gold), Some("default/r/gold"));
        assert_eq!(pick(Api::ChatCompletions, "gpt-4o", &none), Some("default/r/gpt"));
        assert_eq!(pick(Api::Embeddings, "gpt-4o", &none), None, "path does not match");
        assert_eq!(pick(Api::Messages, "claude-3", &none), Some("default/r/claude"));
        assert_eq!(pick(Api::ChatCompletions, "llama", &none), None);
    }

    #[test]
    fn breakers_and_limits_survive_a_reload_unless_their_settings_change() {
        let shared = Shared::default();
        let a = runtime(ROUTES, &shared);
        let b = runtime(ROUTES, &shared);
        assert!(Arc::ptr_eq(&a.routes[0].backends[0].circuit, &b.routes[0].backends[0].circuit));
        assert!(Arc::ptr_eq(a.routes[1].limiter.as_ref().unwrap(), b.routes[1].limiter.as_ref().unwrap()));
        let changed = runtime(&ROUTES.replace("requestsPerMinute: 10", "requestsPerMinute: 20"), &shared);
        assert!(!Arc::ptr_eq(a.routes[1].limiter.as_ref().unwrap(), changed.routes[1].limiter.as_ref().unwrap()));
    }

    #[test]
    fn a_config_of_another_version_is_refused() {
        let cfg = SidecarConfig { api_version: "bulwark.dev/sidecar-config/v9".into(), ..Default::default() };
        let err = Runtime::build(cfg, &Shared::default()).err().unwrap();
        assert_eq!(
            err,
            "unsupported config apiVersion \"bulwark.dev/sidecar-config/v9\"; this sidecar reads bulwark.dev/sidecar-config/v1"
        );
    }
}
