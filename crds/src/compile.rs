//! `compile()`: a snapshot of resources and one workload in, that workload's `SidecarConfig`
//! out. Pure and deterministic; an invalid resource is reported and left out, never fatal.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sha2::{Digest, Sha256};

use crate::{
    LLMRoute, ModelRollout, ScannerPolicy,
    config::{BackendConfig, CredentialSource, Mirror, Replicas, ResolvedTimeouts, Route, SidecarConfig},
    manifest::Resources,
    rollout::machine,
    route::{Backend, LoadBalancing, Provider, RouteMatch},
    selector,
    server::{ModelServer, ModelServerSpec},
    status::reasons,
    validate,
};

/// The pod a config is compiled for. `None` in standalone mode: every route applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// Where Secrets named by `secretKeyRef` are mounted: `<dir>/<secret>/<key>`.
    pub secrets_dir: String,
    /// Whether credentials may name the sidecar's own environment variables and files (`env`,
    /// `file`). A standalone sidecar's directory is its owner's; in a cluster, whoever may write
    /// a resource in a namespace would otherwise send the pod's variables and files (its service
    /// account token, say) to a URL of their choice, so only `secretKeyRef` is taken there.
    pub local_credentials: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self { secrets_dir: "/var/run/secrets/bulwark".into(), local_credentials: true }
    }
}

/// A resource left out of the config, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejection {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// A `status.reasons` constant: the condition reason the operator reports.
    pub reason: &'static str,
    pub message: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{} ({}): {}", self.kind, self.namespace, self.name, self.reason, self.message)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    pub config: SidecarConfig,
    pub rejected: Vec<Rejection>,
}

/// A resource's namespace (`default` when unset) and name.
pub fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_else(|| "default".into()), meta.name.clone().unwrap_or_default())
}

pub fn compile(res: &Resources, workload: Option<&Workload>, opts: &CompileOptions) -> Compiled {
    let mut rejected = vec![];
    let in_scope = |ns: &str| workload.is_none_or(|w| w.namespace == ns);

    // Policies: valid ones by namespace/name.
    let mut policies = BTreeMap::new();
    for p in sorted(&res.policies, |p: &ScannerPolicy| &p.metadata) {
        let (ns, name) = ns_name(&p.metadata);
        if !in_scope(&ns) {
            continue;
        }
        let mut errors = validate::scanner_policy(&p.spec);
        if !opts.local_credentials {
            errors.extend(validate::local_credentials_of_policy(&p.spec));
        }
        if errors.is_empty() {
            policies.insert(format!("{ns}/{name}"), p.spec.clone());
        } else {
            rejected.push(reject("ScannerPolicy", &ns, &name, reasons::INVALID, validate::join(&errors)));
        }
    }

    // Rollouts: valid ones by the route they shift; the oldest wins a tie.
    let mut rollouts: HashMap<(String, String), &ModelRollout> = HashMap::new();
    for r in sorted(&res.rollouts, |r: &ModelRollout| &r.metadata) {
        let (ns, name) = ns_name(&r.metadata);
        if !in_scope(&ns) {
            continue;
        }
        let errors = validate::model_rollout(&r.spec);
        if !errors.is_empty() {
            rejected.push(reject("ModelRollout", &ns, &name, reasons::INVALID, validate::join(&errors)));
            continue;
        }
        let key = (ns.clone(), r.spec.route_ref.name.clone());
        if let Some(first) = rollouts.get(&key) {
            let msg = format!(
                "LLMRoute {:?} is already shifted by ModelRollout {:?}; one rollout per route at a time",
                key.1,
                first.metadata.name.as_deref().unwrap_or_default()
            );
            rejected.push(reject("ModelRollout", &ns, &name, reasons::CONFLICT, msg));
        } else {
            rollouts.insert(key, r);
        }
    }

    // Model servers: valid ones by namespace/name.
    let mut servers = BTreeMap::new();
    for m in sorted(&res.servers, |m: &ModelServer| &m.metadata) {
        let (ns, name) = ns_name(&m.metadata);
        if !in_scope(&ns) {
            continue;
        }
        let errors = validate::model_server(&name, &m.spec);
        if errors.is_empty() {
            servers.insert((ns, name), &m.spec);
        } else {
            rejected.push(reject("ModelServer", &ns, &name, reasons::INVALID, validate::join(&errors)));
        }
    }

    let mut routes = vec![];
    let mut used_policies = BTreeSet::new();
    let mut taken: HashMap<(String, String), String> = HashMap::new();
    let mut rollouts_used = BTreeSet::new();
    'routes: for route in sorted(&res.routes, |r: &LLMRoute| &r.metadata) {
        let (ns, name) = ns_name(&route.metadata);
        if !in_scope(&ns) {
            continue;
        }
        if let Some(w) = workload {
            let selected = route.spec.workload_selector.as_ref().is_none_or(|s| selector::matches(s, &w.labels));
            if !selected {
                continue;
            }
        }
        let mut errors = validate::route(&route.spec);
        if !opts.local_credentials {
            errors.extend(validate::local_credentials_of_route(&route.spec));
        }
        if !errors.is_empty() {
            rejected.push(reject("LLMRoute", &ns, &name, reasons::INVALID, validate::join(&errors)));
            continue;
        }
        let mut seen_rules: HashMap<String, usize> = HashMap::new();
        for (i, rule) in route.spec.rules.iter().enumerate() {
            let key = match_key(&rule.matches);
            if let Some(first) = seen_rules.insert(key.clone(), i) {
                let msg = format!("spec.rules[{i}]: has the same match as spec.rules[{first}] and would never be used");
                rejected.push(reject("LLMRoute", &ns, &name, reasons::INVALID, msg));
                continue 'routes;
            }
            if let Some(owner) = taken.get(&(ns.clone(), key)) {
                let msg =
                    format!("spec.rules[{i}]: the same match is already routed by LLMRoute {owner:?}, which is older");
                rejected.push(reject("LLMRoute", &ns, &name, reasons::CONFLICT, msg));
                continue 'routes;
            }
            if let Some(p) = &rule.scanner_policy_ref
                && !policies.contains_key(&format!("{ns}/{}", p.name))
            {
                let msg = format!(
                    "spec.rules[{i}].scannerPolicyRef: no valid ScannerPolicy {:?} in namespace {ns:?}",
                    p.name
                );
                rejected.push(reject("LLMRoute", &ns, &name, reasons::POLICY_NOT_FOUND, msg));
                continue 'routes;
            }
        }

        let missing_server = route.spec.all_backends().find_map(|b| {
            let r = b.model_server_ref.as_ref()?;
            (!servers.contains_key(&(ns.clone(), r.name.clone()))).then(|| (b.name.clone(), r.name.clone()))
        });
        if let Some((backend, server)) = missing_server {
            let msg = format!("backend {backend:?}: no valid ModelServer {server:?} in namespace {ns:?}");
            rejected.push(reject("LLMRoute", &ns, &name, reasons::MODEL_SERVER_NOT_FOUND, msg));
            continue 'routes;
        }
        let defined: BTreeMap<&str, &Backend> = route.spec.all_backends().map(|b| (b.name.as_str(), b)).collect();
        let to_config = |b: &Backend| backend_config(b, &ns, &servers, &res.endpoints, opts);

        // A rollout sets the stable/canary split in every rule that serves the stable backend,
        // and while it runs, its step's mirror and preview.
        let rollout = rollouts.get(&(ns.clone(), name.clone())).copied();
        let mut split = None;
        if let Some(r) = rollout {
            let (_, rname) = ns_name(&r.metadata);
            let missing: Vec<_> = [&r.spec.stable.backend, &r.spec.canary.backend]
                .into_iter()
                .filter(|b| !defined.contains_key(b.as_str()))
                .collect();
            if missing.is_empty() {
                let traffic = machine::traffic(&r.spec, r.status.as_ref());
                split = Some((r.spec.stable.backend.as_str(), r.spec.canary.backend.as_str(), traffic));
            } else {
                let msg = format!("backend {:?} is not defined in LLMRoute {name:?}", missing[0]);
                rejected.push(reject("ModelRollout", &ns, &rname, reasons::BACKEND_NOT_FOUND, msg));
            }
            rollouts_used.insert((ns.clone(), rname));
        }

        for (i, rule) in route.spec.rules.iter().enumerate() {
            taken.insert((ns.clone(), match_key(&rule.matches)), name.clone());
            let mut backends: Vec<BackendConfig> = rule.backends.iter().map(to_config).collect();
            let mut mirror = None;
            let mut preview = None;
            let mut load_balancing = rule.load_balancing;
            if let Some((stable, canary, traffic)) = &split
                && backends.iter().any(|b| b.name == *stable)
                && let Some(c) = defined.get(canary)
            {
                if !backends.iter().any(|b| b.name == *canary) {
                    backends.push(to_config(c));
                }
                for b in &mut backends {
                    if b.name == *stable {
                        b.weight = 100 - traffic.canary_weight;
                    } else if b.name == *canary {
                        b.weight = traffic.canary_weight;
                    }
                }
                mirror = traffic.mirror.map(|percent| Mirror { backend: to_config(c), percent: percent.min(100) });
                preview = traffic.preview.clone().map(|header| (header, to_config(c)));
                // The rollout's split is exact, or its analysis compares the wrong shares; load
                // still picks among each backend's replicas.
                load_balancing = LoadBalancing::Weighted;
            }
            let fallback: Vec<BackendConfig> =
                rule.fallback.iter().filter_map(|f| defined.get(f.backend.as_str()).map(|b| to_config(b))).collect();
            let scanner_policy = rule.scanner_policy_ref.as_ref().map(|p| format!("{ns}/{}", p.name));
            if let Some(p) = &scanner_policy {
                used_policies.insert(p.clone());
            }
            let defaults = ResolvedTimeouts::default();
            let t = rule.timeouts.clone().unwrap_or_default();
            let id = format!("{ns}/{name}/{}", rule.name.clone().unwrap_or_else(|| i.to_string()));
            let compiled = Route {
                id,
                route: format!("{ns}/{name}"),
                matches: rule.matches.clone(),
                backends,
                load_balancing,
                fallback,
                retry: rule.retry.clone(),
                timeouts: ResolvedTimeouts {
                    request: t.request.unwrap_or(defaults.request),
                    first_token: t.first_token.unwrap_or(defaults.first_token),
                    idle: t.idle.unwrap_or(defaults.idle),
                },
                circuit_breaker: rule.circuit_breaker.clone(),
                rate_limit: rule.rate_limit.clone(),
                cache: rule.cache.as_ref().and_then(|c| c.exact.clone()),
                scanner_policy,
                mirror,
            };
            // A blueGreen preview: the same rule, for requests with the preview header, on the canary.
            if let Some(((header, value), canary)) = preview {
                let mut matches = compiled.matches.clone();
                matches.headers.insert(header, value);
                let backends = vec![BackendConfig { weight: 1, ..canary }];
                let id = format!("{}~preview", compiled.id);
                routes.push(Route { id, matches, backends, mirror: None, ..compiled.clone() });
            }
            routes.push(compiled);
        }
    }
    for (key, r) in &rollouts {
        let (_, rname) = ns_name(&r.metadata);
        if !rollouts_used.contains(&(key.0.clone(), rname.clone())) && workload.is_none() {
            let msg = format!("no valid LLMRoute {:?} in namespace {:?}", key.1, key.0);
            rejected.push(reject("ModelRollout", &key.0, &rname, reasons::ROUTE_NOT_FOUND, msg));
        }
    }
    rejected.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));

    // Most specific first; ties keep resource order (oldest first), then rule order.
    routes.sort_by_key(|r| std::cmp::Reverse(specificity(&r.matches)));
    let scanner_policies = policies
        .into_iter()
        .filter(|(k, _)| used_policies.contains(k))
        .map(|(k, mut spec)| {
            mounted_secrets(&mut spec, opts);
            (k, spec)
        })
        .collect();
    let mut config = SidecarConfig { routes, scanner_policies, ..SidecarConfig::default() };
    config.version = version_of(&config);
    Compiled { config, rejected }
}

/// Content hash of a config, ignoring its `version` field.
pub fn version_of(config: &SidecarConfig) -> String {
    let mut c = config.clone();
    c.version.clear();
    let bytes = serde_json::to_vec(&c).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn reject(kind: &'static str, ns: &str, name: &str, reason: &'static str, message: String) -> Rejection {
    Rejection { kind, namespace: ns.into(), name: name.into(), reason, message }
}

fn sorted<T>(items: &[T], meta: impl Fn(&T) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Vec<&T> {
    let mut v: Vec<&T> = items.iter().collect();
    v.sort_by(|a, b| {
        let (a, b) = (meta(a), meta(b));
        (a.creation_timestamp.as_ref().map(|t| t.0), &a.namespace, &a.name).cmp(&(
            b.creation_timestamp.as_ref().map(|t| t.0),
            &b.namespace,
            &b.name,
        ))
    });
    v
}

fn match_key(m: &RouteMatch) -> String {
    let mut paths = m.paths.clone();
    paths.sort();
    paths.dedup();
    let mut models = m.models.clone();
    models.sort();
    models.dedup();
    let mut hosts = m.hosts.clone();
    hosts.sort();
    hosts.dedup();
    serde_json::json!([paths, models, m.headers, hosts]).to_string()
}

fn specificity(m: &RouteMatch) -> (bool, bool, usize, bool, bool) {
    let exact = m.models.iter().any(|p| !p.contains(['*', '?', '[']));
    (!m.hosts.is_empty(), exact, m.headers.len(), !m.models.is_empty(), !m.paths.is_empty())
}

/// Secrets a policy's webhooks name, as the files the sidecar reads them from: a token's
/// `secretKeyRef` and a client certificate's TLS Secret (`tls.crt`, `tls.key`), under
/// `opts.secrets_dir`.
fn mounted_secrets(spec: &mut crate::policy::ScannerPolicySpec, opts: &CompileOptions) {
    for hook in spec.input.iter_mut().chain(spec.output.iter_mut()).filter_map(|s| s.webhook.as_mut()) {
        if let Some(c) = &mut hook.bearer_token
            && let Some(s) = c.secret_key_ref.take()
        {
            c.file = Some(format!("{}/{}/{}", opts.secrets_dir, s.name, s.key));
        }
        if let Some(c) = &mut hook.client_certificate
            && let Some(name) = c.secret_name.take()
        {
            c.cert_file = Some(format!("{}/{name}/tls.crt", opts.secrets_dir));
            c.key_file = Some(format!("{}/{name}/tls.key", opts.secrets_dir));
        }
    }
}

/// The ModelServers of the snapshot, by namespace and name.
type Servers<'a> = BTreeMap<(String, String), &'a ModelServerSpec>;

fn backend_config(
    b: &Backend,
    ns: &str,
    servers: &Servers<'_>,
    endpoints: &BTreeMap<(String, String), Vec<String>>,
    opts: &CompileOptions,
) -> BackendConfig {
    let credential = b.credentials.as_ref().and_then(|c| {
        if let Some(s) = &c.secret_key_ref {
            Some(CredentialSource::File { path: format!("{}/{}/{}", opts.secrets_dir, s.name, s.key) })
        } else if let Some(env) = &c.env {
            Some(CredentialSource::Env { name: env.clone() })
        } else {
            c.file.as_ref().map(|f| CredentialSource::File { path: f.clone() })
        }
    });
    // A ModelServer: its Service, and its ready replicas where they are known.
    let server = b.model_server_ref.as_ref().and_then(|r| {
        let key = (ns.to_owned(), r.name.clone());
        servers.get(&key).map(|spec| (spec, endpoints.get(&key)))
    });
    let (url, provider, replicas) = match server {
        Some((spec, ready)) => {
            let name = b.model_server_ref.as_ref().map_or("", |r| r.name.as_str());
            let replicas = ready.map(|eps| {
                let mut endpoints = eps.clone();
                endpoints.sort();
                endpoints.dedup();
                Replicas { endpoints, metrics_path: Some(spec.metrics_path.clone()) }
            });
            (spec.service_url(ns, name), Provider::OpenaiCompatible, replicas)
        }
        None => (b.url.trim_end_matches('/').to_owned(), b.provider, None),
    };
    BackendConfig {
        name: b.name.clone(),
        provider,
        url,
        model: b.model.clone(),
        weight: b.weight,
        credential,
        api_version: b.api_version.clone(),
        replicas,
    }
}
