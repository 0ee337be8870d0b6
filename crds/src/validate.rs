//! Semantic validation of each resource on its own: what the schema cannot say.
//! Every error names the field and tells the user what to write instead.

use std::{collections::BTreeMap, fmt};

use globset::Glob;

use crate::{
    policy::{Action, ScannerPolicySpec, ScannerType},
    rollout::{ModelRolloutSpec, Strategy},
    route::{Backend, Credentials, LLMRouteSpec, Provider},
    selector,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Joins errors into one line for a condition message or a log line.
pub fn join(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), message: message.into() });
    }
}

pub const PII_ENTITIES: &[&str] = &["email", "phone", "creditCard", "iban", "ssn", "ipAddress"];
pub const TOKEN_ENCODINGS: &[&str] = &["cl100k_base", "o200k_base"];

pub fn route<'a>(spec: &'a LLMRouteSpec) -> Vec<FieldError> {
    let mut e = Errors::default();
    if let Some(sel) = &spec.workload_selector
        && let Err(msg) = selector::validate(sel)
    {
        e.add("spec.workloadSelector", msg);
    }
    if spec.rules.is_empty() {
        e.add("spec.rules", "an LLMRoute needs at least one rule");
    }
    let mut defined: BTreeMap<&str, (&Backend, String)> = BTreeMap::new();
    let mut define = |e: &mut Errors, b: &'a Backend, path: String| {
        backend(e, b, &path);
        match defined.get(b.name.as_str()) {
            Some((other, first)) if *other != b => e.add(
                format!("{path}.name"),
                format!("backend {:?} is already defined differently at {first}; give it another name", b.name),
            ),
            Some(_) => {}
            None => {
                defined.insert(&b.name, (b, path));
            }
        }
    };
    for (i, b) in spec.backends.iter().enumerate() {
        define(&mut e, b, format!("spec.backends[{i}]"));
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        let p = format!("spec.rules[{r}]");
        for (i, b) in rule.backends.iter().enumerate() {
            define(&mut e, b, format!("{p}.backends[{i}]"));
        }
        if rule.backends.is_empty() && rule.fallback.is_empty() {
            e.add(format!("{p}.backends"), "a rule needs at least one backend or fallback");
        }
        if !rule.backends.is_empty() && rule.backends.iter().all(|b| b.weight == 0) {
            e.add(format!("{p}.backends"), "all weights are 0; give at least one backend a weight above 0");
        }
        for (i, host) in rule.matches.hosts.iter().enumerate() {
            if !dns_subdomain(host.strip_prefix("*.").unwrap_or(host)) {
                e.add(
                    format!("{p}.match.hosts[{i}]"),
                    format!("{host:?} is not a lowercase host name (or *. and one), such as api.openai.com or *.openai.azure.com; no port"),
                );
            }
        }
        for (i, path) in rule.matches.paths.iter().enumerate() {
            if !path.starts_with('/') {
                e.add(
                    format!("{p}.match.paths[{i}]"),
                    format!("{path:?} must start with '/', such as /v1/chat/completions"),
                );
            }
        }
        for (i, model) in rule.matches.models.iter().enumerate() {
            if model.is_empty() {
                e.add(format!("{p}.match.models[{i}]"), "must not be empty");
            } else if let Err(err) = Glob::new(model) {
                e.add(format!("{p}.match.models[{i}]"), format!("{model:?} is not a valid glob: {}", err.kind()));
            }
        }
        for name in rule.matches.headers.keys() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                e.add(format!("{p}.match.headers"), format!("{name:?} is not a valid header name"));
            }
        }
        if let Some(retry) = &rule.retry {
            if retry.backoff.base > retry.backoff.max {
                e.add(
                    format!("{p}.retry.backoff"),
                    format!("base ({}) is longer than max ({})", retry.backoff.base, retry.backoff.max),
                );
            }
            if retry.attempts > 10 {
                e.add(format!("{p}.retry.attempts"), "at most 10 extra attempts");
            }
        }
        if let Some(t) = &rule.timeouts {
            for (name, d) in [("request", t.request), ("firstToken", t.first_token), ("idle", t.idle)] {
                if d.is_some_and(|d| d.0.is_zero()) {
                    e.add(format!("{p}.timeouts.{name}"), "must be longer than 0s");
                }
            }
            if let (Some(req), Some(first)) = (t.request, t.first_token)
                && first > req
            {
                e.add(
                    format!("{p}.timeouts.firstToken"),
                    format!("({first}) is longer than the request timeout ({req})"),
                );
            }
        }
        if let Some(cb) = &rule.circuit_breaker {
            if cb.consecutive_failures == 0 {
                e.add(format!("{p}.circuitBreaker.consecutiveFailures"), "must be at least 1");
            }
            if cb.cooldown.0.is_zero() {
                e.add(format!("{p}.circuitBreaker.cooldown"), "must be longer than 0s");
            }
        }
        if let Some(rl) = &rule.rate_limit {
            if rl.requests_per_minute.is_none() && rl.tokens_per_minute.is_none() {
                e.add(format!("{p}.rateLimit"), "a rateLimit needs requestsPerMinute or tokensPerMinute");
            }
            if rl.requests_per_minute == Some(0) || rl.tokens_per_minute == Some(0) {
                e.add(format!("{p}.rateLimit"), "limits must be at least 1; remove the field for no limit");
            }
            if let Some(h) = rl.key.as_ref().and_then(|k| k.header.as_ref())
                && http::HeaderName::from_bytes(h.as_bytes()).is_err()
            {
                e.add(format!("{p}.rateLimit.key.header"), format!("{h:?} is not a valid header name"));
            }
        }
        if let Some(exact) = rule.cache.as_ref().and_then(|c| c.exact.as_ref()) {
            if exact.ttl.0.is_zero() {
                e.add(format!("{p}.cache.exact.ttl"), "must be longer than 0s");
            }
            if exact.max_entries == 0 || exact.max_bytes == 0 {
                e.add(format!("{p}.cache.exact"), "maxEntries and maxBytes must be at least 1");
            }
        }
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        for (i, f) in rule.fallback.iter().enumerate() {
            if !defined.contains_key(f.backend.as_str()) {
                e.add(
                    format!("spec.rules[{r}].fallback[{i}].backend"),
                    format!("no backend named {:?}; define it in spec.backends or in a rule's backends", f.backend),
                );
            }
        }
    }
    e.0
}

fn backend(e: &mut Errors, b: &Backend, path: &str) {
    if b.name.is_empty() {
        e.add(format!("{path}.name"), "must not be empty");
    }
    match (&b.model_server_ref, b.url.is_empty()) {
        (Some(_), false) => e.add(path, "set url or modelServerRef, not both"),
        (Some(r), true) => {
            if r.name.is_empty() {
                e.add(format!("{path}.modelServerRef.name"), "must not be empty");
            }
            if !matches!(b.provider, Provider::Openai | Provider::OpenaiCompatible) {
                e.add(format!("{path}.provider"), "a ModelServer speaks the OpenAI API: use openai-compatible");
            }
        }
        (None, _) => match b.url.parse::<http::Uri>() {
            Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {
                if uri.query().is_some() {
                    e.add(format!("{path}.url"), "must not have a query string");
                }
            }
            _ => e.add(format!("{path}.url"), format!("{:?} is not an http:// or https:// URL", b.url)),
        },
    }
    if b.provider == Provider::AzureOpenai && b.model.is_none() {
        e.add(format!("{path}.model"), "azure-openai needs the deployment name in model");
    }
    if let Some(c) = &b.credentials {
        credentials(e, c, &format!("{path}.credentials"));
    }
}

/// Credentials of a route that name the sidecar's own environment variables or files (`env`,
/// `file`). A resource in a cluster may name only its namespace's Secrets: otherwise whoever may
/// write one would send the pod's variables and files (its service account token, say) to a URL
/// of their choice.
pub fn local_credentials_of_route(spec: &LLMRouteSpec) -> Vec<FieldError> {
    let mut e = Errors::default();
    let rules = spec.rules.iter().enumerate().flat_map(|(r, rule)| {
        rule.backends.iter().enumerate().map(move |(i, b)| (format!("spec.rules[{r}].backends[{i}]"), b))
    });
    for (path, b) in spec.backends.iter().enumerate().map(|(i, b)| (format!("spec.backends[{i}]"), b)).chain(rules) {
        local(&mut e, b.credentials.as_ref(), &format!("{path}.credentials"));
    }
    e.0
}

/// The same for a policy's webhooks: a token, or a client certificate and key, read from the
/// sidecar's environment or files (a CA file is public, and stays allowed).
pub fn local_credentials_of_policy(spec: &ScannerPolicySpec) -> Vec<FieldError> {
    let mut e = Errors::default();
    for (side, list) in [("input", &spec.input), ("output", &spec.output)] {
        for (i, s) in list.iter().enumerate() {
            let Some(w) = &s.webhook else { continue };
            let p = format!("spec.{side}[{i}].webhook");
            local(&mut e, w.bearer_token.as_ref(), &format!("{p}.bearerToken"));
            let cert = w.client_certificate.as_ref();
            let files = [
                ("clientCertificate.certFile", cert.and_then(|c| c.cert_file.as_ref())),
                ("clientCertificate.keyFile", cert.and_then(|c| c.key_file.as_ref())),
            ];
            for (field, _) in files.iter().filter(|(_, f)| f.is_some()) {
                e.add(format!("{p}.{field}"), LOCAL);
            }
        }
    }
    e.0
}

const LOCAL: &str =
    "names the sidecar's own environment or files, which a resource in a cluster may not read; name a Secret instead";

fn local(e: &mut Errors, c: Option<&Credentials>, path: &str) {
    let Some(c) = c else { return };
    for (set, field) in [(c.env.is_some(), "env"), (c.file.is_some(), "file")] {
        if set {
            e.add(format!("{path}.{field}"), LOCAL);
        }
    }
}

fn credentials(e: &mut Errors, c: &Credentials, path: &str) {
    let set = [c.secret_key_ref.is_some(), c.env.is_some(), c.file.is_some()].iter().filter(|s| **s).count();
    if set != 1 {
        e.add(path, "set exactly one of secretKeyRef, env or file");
    }
    if let Some(s) = &c.secret_key_ref {
        if s.name.is_empty() || s.key.is_empty() {
            e.add(format!("{path}.secretKeyRef"), "name and key must not be empty");
        }
        secret_name(e, &s.name, &format!("{path}.secretKeyRef.name"));
        if !s.key.is_empty() && !secret_key(&s.key) {
            e.add(
                format!("{path}.secretKeyRef.key"),
                format!("{:?} is not a Secret key: letters, digits, '-', '_' and '.' only, and not '.' or '..'", s.key),
            );
        }
    }
}

/// A Secret's name names a directory under the secrets mount: a DNS subdomain, so that it can
/// never climb out of it.
fn secret_name(e: &mut Errors, name: &str, path: &str) {
    if !name.is_empty() && !dns_subdomain(name) {
        e.add(path, format!("{name:?} is not a Secret name (a DNS subdomain: lowercase letters, digits, '-' and '.')"));
    }
}

/// A lowercase DNS subdomain (RFC 1123): labels of letters, digits and inner '-', joined by '.'.
fn dns_subdomain(name: &str) -> bool {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    name.len() <= 253 && name.split('.').all(label)
}

/// A key of a Secret's data, as Kubernetes allows them: a file name in the Secret's directory.
fn secret_key(key: &str) -> bool {
    key.len() <= 253
        && key != "."
        && key != ".."
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub fn scanner_policy(spec: &ScannerPolicySpec) -> Vec<FieldError> {
    let mut e = Errors::default();
    for (side, list) in [("input", &spec.input), ("output", &spec.output)] {
        for (i, s) in list.iter().enumerate() {
            let p = format!("spec.{side}[{i}]");
            let t = s.type_;
            let scores = matches!(t, ScannerType::PromptInjection | ScannerType::BanTopics);
            match s.threshold {
                Some(_) if !scores => {
                    e.add(format!("{p}.threshold"), format!("{t:?} does not score; remove threshold"))
                }
                Some(v) if !(0.0..=1.0).contains(&v) => e.add(format!("{p}.threshold"), "must be between 0 and 1"),
                _ => {}
            }
            if let Some(v) = s.sampling
                && !(v > 0.0 && v <= 1.0)
            {
                e.add(format!("{p}.sampling"), "must be in (0, 1]: the fraction of requests scanned");
            }
            let redacts = matches!(
                t,
                ScannerType::Secrets
                    | ScannerType::Pii
                    | ScannerType::Regex
                    | ScannerType::BanSubstrings
                    | ScannerType::InvisibleText
            );
            if s.action == Action::Redact && t == ScannerType::Webhook {
                e.add(
                    format!("{p}.action"),
                    "a webhook scanner follows the service's verdict (pass, redact or block): leave action unset, or set audit to only log it",
                );
            } else if s.action == Action::Redact && !redacts {
                e.add(format!("{p}.action"), format!("{t:?} cannot redact; use block or audit"));
            }
            match (&s.webhook, t) {
                (Some(w), ScannerType::Webhook) => webhook(&mut e, &format!("{p}.webhook"), w),
                (None, ScannerType::Webhook) => e.add(format!("{p}.webhook"), "a webhook scanner needs webhook.url"),
                (Some(_), _) => e.add(format!("{p}.webhook"), format!("{t:?} calls no webhook")),
                (None, _) => {}
            }
            if s.restore_in_response.is_some() && t != ScannerType::Pii {
                e.add(format!("{p}.restoreInResponse"), "only pii scanners restore values");
            }
            if s.restore_in_response == Some(true) && side == "output" {
                e.add(format!("{p}.restoreInResponse"), "set it on the input pii scanner");
            }
            match t {
                ScannerType::Regex => {
                    if s.patterns.is_empty() {
                        e.add(format!("{p}.patterns"), "a regex scanner needs at least one pattern");
                    }
                    for (j, pat) in s.patterns.iter().enumerate() {
                        if let Err(err) = regex::Regex::new(pat) {
                            let first = err.to_string().lines().last().unwrap_or_default().trim().to_string();
                            e.add(format!("{p}.patterns[{j}]"), format!("{pat:?} is not a valid regex: {first}"));
                        }
                    }
                }
                ScannerType::BanSubstrings if s.substrings.iter().all(String::is_empty) => {
                    e.add(format!("{p}.substrings"), "a banSubstrings scanner needs at least one substring");
                }
                ScannerType::Pii => {
                    for (j, ent) in s.entities.iter().enumerate() {
                        if !PII_ENTITIES.contains(&ent.as_str()) {
                            e.add(
                                format!("{p}.entities[{j}]"),
                                format!("unknown entity {ent:?}; use {}", PII_ENTITIES.join(", ")),
                            );
                        }
                    }
                }
                ScannerType::TokenLimit => {
                    if s.max_tokens.is_none_or(|n| n == 0) {
                        e.add(format!("{p}.maxTokens"), "a tokenLimit scanner needs maxTokens of at least 1");
                    }
                    if let Some(enc) = &s.encoding
                        && !TOKEN_ENCODINGS.contains(&enc.as_str())
                    {
                        e.add(
                            format!("{p}.encoding"),
                            format!("unknown encoding {enc:?}; use {}", TOKEN_ENCODINGS.join(" or ")),
                        );
                    }
                }
                ScannerType::BanTopics if s.topics.is_empty() => {
                    e.add(format!("{p}.topics"), "a banTopics scanner needs at least one topic");
                }
                ScannerType::Language if s.languages.is_empty() => {
                    e.add(format!("{p}.languages"), "a language scanner needs the allowed languages");
                }
                _ => {}
            }
            sources(&mut e, &p, side, s);
            if let Some(m) = &s.model {
                if !matches!(t, ScannerType::PromptInjection | ScannerType::BanTopics) {
                    e.add(format!("{p}.model"), format!("{t:?} uses no model"));
                }
                if let Some(h) = &m.sha256
                    && !(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                {
                    e.add(format!("{p}.model.sha256"), "must be 64 hex digits");
                }
                if let Some(Err(err)) = m.public_key.as_deref().map(crate::policy::model_key) {
                    e.add(format!("{p}.model.publicKey"), err);
                }
            }
        }
    }
    e.0
}

fn webhook(e: &mut Errors, p: &str, w: &crate::policy::Webhook) {
    match w.url.parse::<http::Uri>() {
        Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
        _ => e.add(format!("{p}.url"), format!("{:?} is not an http:// or https:// URL", w.url)),
    }
    if w.timeout.is_some_and(|t| t.as_std().is_zero()) {
        e.add(format!("{p}.timeout"), "must be more than 0");
    }
    if w.max_concurrency == Some(0) {
        e.add(format!("{p}.maxConcurrency"), "must be at least 1");
    }
    if let Some(c) = &w.bearer_token {
        credentials(e, c, &format!("{p}.bearerToken"));
    }
    if let Some(c) = &w.client_certificate {
        let files = (c.cert_file.is_some(), c.key_file.is_some());
        match (&c.secret_name, files) {
            (Some(name), (false, false)) if !name.is_empty() => {
                secret_name(e, name, &format!("{p}.clientCertificate.secretName"))
            }
            (None, (true, true)) => {}
            _ => e.add(format!("{p}.clientCertificate"), "set secretName, or both certFile and keyFile"),
        }
    }
}

/// `sources` and `sourceThresholds`: where the texts an input promptInjection scanner scores come
/// from, and their own thresholds.
fn sources(e: &mut Errors, p: &str, side: &str, s: &crate::policy::Scanner) {
    if s.sources.is_empty() && s.source_thresholds.is_empty() {
        return;
    }
    if s.type_ != ScannerType::PromptInjection || side != "input" {
        let field = if s.sources.is_empty() { "sourceThresholds" } else { "sources" };
        e.add(format!("{p}.{field}"), "only input promptInjection scanners score texts by their source");
        return;
    }
    let listed: &[crate::policy::Source] =
        if s.sources.is_empty() { &crate::policy::Source::UNTRUSTED } else { &s.sources };
    for (source, threshold) in &s.source_thresholds {
        let at = format!("{p}.sourceThresholds.{}", source.as_str());
        if !(0.0..=1.0).contains(threshold) {
            e.add(at, "must be between 0 and 1");
        } else if !listed.contains(source) {
            e.add(at, format!("{} is not among the sources scored; add it to sources", source.as_str()));
        }
    }
}

pub fn model_rollout(spec: &ModelRolloutSpec) -> Vec<FieldError> {
    let mut e = Errors::default();
    if spec.stable.backend == spec.canary.backend {
        e.add("spec.canary.backend", "stable and canary must be different backends");
    }
    match spec.strategy {
        Strategy::Canary if spec.steps.is_empty() => e.add("spec.steps", "a canary rollout needs at least one step"),
        Strategy::Canary if spec.preview.is_some() => {
            e.add("spec.preview", "applies to the blueGreen strategy only; use steps for a canary")
        }
        Strategy::BlueGreen if !spec.steps.is_empty() => {
            e.add("spec.steps", "a blueGreen rollout takes no steps: it previews (see preview), then switches at once")
        }
        _ => {}
    }
    if let Some(last) = spec.steps.last().filter(|s| s.pause.is_some() || s.mirror.is_some()) {
        let i = spec.steps.len() - 1;
        let field = if last.pause.is_some() { "pause" } else { "mirror" };
        e.add(
            format!("spec.steps[{i}].{field}"),
            "the last step completes the rollout at once, so it holds no pause and mirrors nothing; add a step after it",
        );
    }
    for (i, s) in spec.steps.iter().enumerate() {
        if s.weight > 100 {
            e.add(format!("spec.steps[{i}].weight"), "is a percentage: 0 to 100");
        }
        if s.mirror.is_some_and(|m| m > 100) {
            e.add(format!("spec.steps[{i}].mirror"), "is a percentage: 0 to 100");
        }
    }
    if let Some(p) = &spec.preview {
        if p.header.parse::<http::HeaderName>().is_err() {
            e.add("spec.preview.header", format!("{:?} is not a valid header name", p.header));
        }
        if p.mirror.is_some_and(|m| m > 100) {
            e.add("spec.preview.mirror", "is a percentage: 0 to 100");
        }
    }
    let a = &spec.analysis;
    let rates = [
        ("maxErrorRate", Some(a.max_error_rate)),
        ("maxErrorRateIncrease", a.max_error_rate_increase),
        ("maxBlockRate", a.max_block_rate),
        ("maxBlockRateIncrease", a.max_block_rate_increase),
    ];
    for (field, value) in rates {
        if value.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
            e.add(format!("spec.analysis.{field}"), "must be between 0 and 1");
        }
    }
    if a.interval.0.is_zero() || a.window < a.interval {
        e.add(
            "spec.analysis.window",
            format!("({}) must be at least the interval ({}), which must be above 0s", a.window, a.interval),
        );
    }
    if a.failure_limit == 0 {
        e.add("spec.analysis.failureLimit", "must be at least 1");
    }
    if let Some(p) = &a.prometheus {
        if !(p.address.starts_with("http://") || p.address.starts_with("https://"))
            || p.address.parse::<http::Uri>().is_err()
        {
            e.add("spec.analysis.prometheus.address", format!("{:?} is not an http(s) URL", p.address));
        }
        if p.queries.is_empty() {
            e.add("spec.analysis.prometheus.queries", "name at least one signal to read from Prometheus");
        }
        for (signal, query) in &p.queries {
            if !crate::rollout::PROMETHEUS_SIGNALS.contains(&signal.as_str()) {
                let known = crate::rollout::PROMETHEUS_SIGNALS.join(", ");
                e.add(format!("spec.analysis.prometheus.queries.{signal}"), format!("unknown signal; use {known}"));
            } else if query.trim().is_empty() {
                e.add(format!("spec.analysis.prometheus.queries.{signal}"), "must not be empty");
            }
        }
    }
    if a.min_requests == 0 {
        e.add("spec.analysis.minRequests", "must be at least 1: a verdict needs requests");
    }
    e.0
}

/// The semantic checks of a `ModelServer` the schema cannot express, naming the field.
/// What is wrong with a ModelServer named `name`. Its name is its Service's, hence a DNS-1035
/// label; counts are int32 in the objects it runs.
pub fn model_server(name: &str, spec: &crate::ModelServerSpec) -> Vec<FieldError> {
    let mut e = Errors::default();
    let label = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !label {
        e.add(
            "metadata.name",
            format!("{name:?} names its Service: at most 63 lowercase letters, digits and '-', starting with a letter"),
        );
    }
    let counts = [
        ("replicas", spec.replicas),
        ("maxUnavailable", Some(spec.max_unavailable)),
        ("gpu.count", spec.gpu.as_ref().map(|g| g.count)),
        ("autoscaling.maxReplicas", spec.autoscaling.as_ref().map(|a| a.max_replicas)),
    ];
    for (field, n) in counts {
        if n.is_some_and(|n| i32::try_from(n).is_err()) {
            e.add(format!("spec.{field}"), format!("must be at most {}", i32::MAX));
        }
    }
    if spec.image.trim().is_empty() {
        e.add("spec.image", "must not be empty");
    }
    if spec.port == 0 {
        e.add("spec.port", "must be a port number");
    }
    for (field, path) in [("healthPath", &spec.health_path), ("metricsPath", &spec.metrics_path)] {
        if !path.starts_with('/') {
            e.add(format!("spec.{field}"), format!("{path:?} must start with /"));
        }
    }
    let quantity =
        regex::Regex::new(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$").map(|q| q.is_match(&spec.shm_size));
    if !quantity.unwrap_or(false) {
        e.add("spec.shmSize", format!("{:?} is not a quantity like 2Gi or 512Mi", spec.shm_size));
    }
    if let Some(g) = &spec.gpu {
        if g.count == 0 {
            e.add("spec.gpu.count", "must be at least 1; remove gpu for a CPU server");
        }
        if let Some(mig) = &g.mig {
            let valid = mig.split_once('.').is_some_and(|(slices, mem)| {
                slices.strip_suffix('g').is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
                    && mem.strip_suffix("gb").is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
            });
            if !valid {
                e.add("spec.gpu.mig", format!("{mig:?} is not a MIG profile like 1g.10gb or 3g.40gb"));
            }
            if g.min_memory_gib.is_some() {
                e.add("spec.gpu.minMemoryGiB", "a MIG profile fixes the memory of its slice; remove minMemoryGiB");
            }
        }
        if g.min_memory_gib == Some(0) {
            e.add("spec.gpu.minMemoryGiB", "must be at least 1; leave it out for any memory");
        }
    }
    if spec.replicas.is_some() && spec.autoscaling.is_some() {
        e.add("spec.replicas", "an autoscaler owns the replica count: set replicas or autoscaling, not both");
    }
    if let Some(a) = &spec.autoscaling {
        use crate::server::{AutoscalingMetric, Engine};
        if a.min_replicas > a.max_replicas || a.max_replicas == 0 {
            e.add("spec.autoscaling", "minReplicas must not exceed maxReplicas, which must be at least 1");
        }
        if a.min_replicas == 0 && a.engine == Engine::Hpa {
            e.add("spec.autoscaling.minReplicas", "a HorizontalPodAutoscaler cannot scale to zero; use engine: keda");
        }
        if !(a.target.is_finite() && a.target > 0.0) {
            e.add("spec.autoscaling.target", "must be above 0");
        } else if a.metric == AutoscalingMetric::KvCacheUsage && a.target > 1.0 {
            e.add("spec.autoscaling.target", "KV-cache use is a fraction: 0 to 1");
        }
        if a.engine == Engine::Hpa && (a.prometheus_address.is_some() || a.activation_target.is_some()) {
            e.add("spec.autoscaling", "prometheusAddress and activationTarget apply to engine: keda");
        }
    }
    e.0
}
