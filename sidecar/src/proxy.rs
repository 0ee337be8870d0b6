//! The request path, stage by stage: parse → route → rate limit → cache → upstream with
//! retries and fallback (committing at the first byte) → response, metrics and settlement.
//! Errors are values until `handle`, the one place that turns them into responses.

use std::{sync::Arc, time::Duration};

use bulwark_api::route::RetryPolicy;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::{
    sync::watch,
    time::{Instant, timeout_at},
};

use crate::{
    balance,
    body::ProxyBody,
    cache::{Cache, Cached},
    error::ProxyError,
    metrics::{
        BackendLabels, CacheLabels, CircuitLabels, ErrorLabels, Metrics, RequestLabels, RouteLabels, TokenLabels,
        status_class,
    },
    ratelimit::{RateLimiter, Reservation},
    request::{self, Api, Limits, LlmRequest},
    retry::{self, Failure},
    runtime::{BackendRuntime, RouteRuntime, Runtime},
    scan::{self, Direction, Restore, stream::OutputGuard},
    stream::{Relay, StreamEnd},
    upstream::{self, Client},
    usage::{self, Usage},
};

/// Largest upstream response body read into memory (non-streamed responses).
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Largest upstream error body kept to pass on.
const MAX_ERROR_BYTES: usize = 1 << 20;

pub struct AppState {
    pub runtime: watch::Receiver<Arc<Runtime>>,
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
}

/// Serves one request; never fails: every error becomes a response here.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Response<ProxyBody> {
    let flavor = request::flavor_of_path(req.uri().path());
    match serve(&state, req).await {
        Ok(resp) => resp,
        Err(e) => {
            state.metrics.errors.get_or_create(&ErrorLabels { code: e.code }).inc();
            if e.status.is_server_error() {
                tracing::warn!(status = e.status.as_u16(), code = e.code, "{}", e.message);
            } else {
                tracing::debug!(status = e.status.as_u16(), code = e.code, "{}", e.message);
            }
            e.into_response(flavor)
        }
    }
}

async fn serve(state: &AppState, req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
    let started = Instant::now();
    // One snapshot of the config for the whole request: reloads never tear a request.
    let rt = state.runtime.borrow().clone();
    let (parts, body) = req.into_parts();
    let mut req = request::read(&parts.method, parts.uri.path(), parts.headers, body, &state.limits).await?;
    if req.api == Api::Models {
        return Ok(models(&rt));
    }
    let route = rt.select(req.api, &req.model, &req.headers).ok_or_else(|| {
        ProxyError::new(
            StatusCode::NOT_FOUND,
            "route_not_found",
            format!("no route takes model {:?} on {}; check the LLMRoute match rules", req.model, req.api.path()),
        )
    })?;

    let reservation = match &route.limiter {
        Some(limiter) => Some(admit(state, route, limiter, &req, started)?),
        None => None,
    };
    let settle = |usage: &Usage, fallback_estimate: u64| {
        if let Some((limiter, r)) = &reservation {
            limiter.settle(r, usage.total().unwrap_or(fallback_estimate));
        }
    };

    // Input scanners run before the cache: a cached answer never bypasses a policy.
    let restore = match scan_input(state, route, &mut req).await {
        Ok(r) => r,
        Err(e) => {
            settle(&Usage { input: Some(0), output: Some(0) }, 0);
            return Err(e);
        }
    };
    // Answers restored with this request's personal data are not cached.
    let cache = match &route.cache {
        Some(c) if !Cache::bypass(&req.headers) && restore.is_empty() => {
            Some((c.clone(), Cache::key(&route.cfg.id, req.api.path(), &req.body)))
        }
        _ => None,
    };
    if let Some((c, key)) = &cache {
        let hit = c.get(key, started);
        let result = if hit.is_some() { "hit" } else { "miss" };
        state.metrics.cache.get_or_create(&CacheLabels { route: route.cfg.route.clone(), result }).inc();
        if let Some(hit) = hit {
            settle(&Usage { input: Some(0), output: Some(0) }, 0);
            return Ok(cached_response(hit, &route.cfg.route));
        }
    }

    let cache_tag = cache.is_some().then_some("miss");
    let (backend, committed) = match call(state, route, &req, started).await {
        Ok(ok) => ok,
        Err(e) => {
            settle(&Usage::default(), 0);
            return Err(e);
        }
    };
    let model = route.model_label(&backend, &req.model);
    let labels = BackendLabels { route: route.cfg.route.clone(), backend: backend.cfg.name.clone(), model };
    state.metrics.time_to_first_token.get_or_create(&labels).observe(committed.ttfb.as_secs_f64());
    state.metrics.outcomes.first_token(&labels.route, &labels.backend, committed.ttfb);

    match committed.body {
        CommittedBody::Full(mut body) => {
            let status = committed.status;
            let mut blocked = None;
            if status.is_success()
                && let Some(policy) = &route.policy
                && (!policy.output.is_empty() || !restore.is_empty())
            {
                (body, blocked) = scan_output(state, route, policy, req.api, body, &restore).await;
            }
            let usage = if status.is_success() { usage::from_json(&body) } else { Usage::default() };
            record(&state.metrics, &labels, status_class(status.as_u16()), started, &usage);
            state.metrics.outcomes.answered(
                &labels.route,
                &labels.backend,
                status_class(status.as_u16()),
                started.elapsed(),
            );
            settle(&usage, 0);
            if status.is_success()
                && blocked.is_none()
                && let Some((c, key)) = cache
            {
                c.insert(
                    key,
                    Cached { body: body.clone(), stream: false, backend: backend.cfg.name.clone() },
                    Instant::now(),
                );
            }
            let mut resp = Response::new(ProxyBody::full(body));
            *resp.status_mut() = status;
            copy_headers(&committed.headers, resp.headers_mut());
            if blocked.is_some() {
                resp.headers_mut().remove(header::CONTENT_LENGTH);
            }
            tag(resp.headers_mut(), &route.cfg.route, &backend.cfg.name, cache_tag);
            if let Some(b) = blocked
                && let Ok(v) = HeaderValue::from_str(&format!("{}/{}", b.policy, b.scanner))
            {
                resp.headers_mut().insert("x-bulwark-blocked", v);
            }
            Ok(resp)
        }
        CommittedBody::Stream { first, rest } => {
            let metrics = state.metrics.clone();
            let estimate = reservation.as_ref().map_or(0, |(_, r)| r.tokens);
            let reservation = reservation.clone();
            let cache_slot = cache.clone();
            let backend_name = backend.cfg.name.clone();
            let on_end = Box::new(move |end: StreamEnd| {
                let mut usage = end.tracker.usage;
                if usage.output.is_none() {
                    usage.output = Some(end.tracker.content_events);
                }
                let class = if end.error.is_some() {
                    "5xx"
                } else if end.cancelled {
                    "cancelled"
                } else {
                    "2xx"
                };
                record(&metrics, &labels, class, started, &usage);
                let outcome = if end.error.is_some() { "stream" } else { class };
                metrics.outcomes.answered(&labels.route, &labels.backend, outcome, started.elapsed());
                if end.error.is_some() {
                    let l = CircuitLabels { route: labels.route.clone(), backend: labels.backend.clone() };
                    metrics.stream_errors.get_or_create(&l).inc();
                }
                if let Some((limiter, r)) = &reservation {
                    limiter.settle(r, usage.total().unwrap_or(estimate));
                }
                if let (Some((c, key)), Some(body)) = (cache_slot, end.recorded) {
                    c.insert(key, Cached { body, stream: true, backend: backend_name }, Instant::now());
                }
            });
            let record_limit = cache.as_ref().map(|(c, _)| c.max_entry_bytes());
            let mut relay =
                Relay::new(first, rest, req.api.flavor(), route.cfg.timeouts.idle.as_std(), record_limit, on_end);
            if let Some(policy) = &route.policy
                && (!policy.output.is_empty() || !restore.is_empty())
            {
                let guard = OutputGuard::new(
                    policy.clone(),
                    restore,
                    req.api.flavor(),
                    state.metrics.clone(),
                    route.cfg.route.clone(),
                );
                relay = relay.with_guard(guard);
            }
            let mut resp = Response::new(ProxyBody::Stream(Box::new(relay)));
            copy_headers(&committed.headers, resp.headers_mut());
            resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            tag(resp.headers_mut(), &route.cfg.route, &backend.cfg.name, cache_tag);
            Ok(resp)
        }
    }
}

/// Runs the route's input scanners; rewrites the body when they redact.
async fn scan_input(state: &AppState, route: &RouteRuntime, req: &mut LlmRequest) -> Result<Restore, ProxyError> {
    let Some(policy) = route.policy.as_ref().filter(|p| !p.input.is_empty()) else { return Ok(Restore::default()) };
    let ctx = scan::Ctx { metrics: &state.metrics, route: &route.cfg.route };
    let mut texts = scan::text::request_texts(req.api, &mut req.body);
    match scan::run_async(policy, Direction::Input, &mut texts, &ctx).await {
        Ok(restore) => {
            if restore.redacted {
                req.raw = Bytes::from(serde_json::to_vec(&req.body).unwrap_or_default());
            }
            Ok(restore)
        }
        Err(blocked) => {
            tracing::info!(route = %route.cfg.route, "request {blocked}");
            Err(ProxyError::bad_request("blocked_by_policy", format!("the request was {blocked}")))
        }
    }
}

/// Runs the output scanners over a complete response and restores redacted values. A blocked
/// answer keeps its shape with its text removed and `content_filter` as the finish reason.
async fn scan_output(
    state: &AppState,
    route: &RouteRuntime,
    policy: &scan::PolicyRuntime,
    api: Api,
    body: Bytes,
    restore: &Restore,
) -> (Bytes, Option<scan::Blocked>) {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else { return (body, None) };
    let ctx = scan::Ctx { metrics: &state.metrics, route: &route.cfg.route };
    let mut texts = scan::text::response_texts(api, &mut v);
    let blocked = match scan::run_async(policy, Direction::Output, &mut texts, &ctx).await {
        Ok(_) => {
            if !restore.is_empty() {
                for t in texts {
                    *t = restore.apply(t);
                }
            }
            None
        }
        Err(b) => {
            tracing::info!(route = %route.cfg.route, "response {b}");
            content_filtered(api, &mut v);
            Some(b)
        }
    };
    (Bytes::from(serde_json::to_vec(&v).unwrap_or_default()), blocked)
}

fn content_filtered(api: Api, v: &mut serde_json::Value) {
    use serde_json::Value;
    if api == Api::Messages {
        v["content"] = Value::Array(vec![]);
        v["stop_reason"] = Value::String("refusal".into());
        return;
    }
    for choice in v.get_mut("choices").and_then(Value::as_array_mut).into_iter().flatten() {
        if let Some(m) = choice.get_mut("message") {
            m["content"] = Value::String(String::new());
            if let Some(o) = m.as_object_mut() {
                o.remove("tool_calls");
            }
        }
        if choice.get("text").is_some() {
            choice["text"] = Value::String(String::new());
        }
        choice["finish_reason"] = Value::String("content_filter".into());
    }
}

fn admit(
    state: &AppState,
    route: &RouteRuntime,
    limiter: &Arc<RateLimiter>,
    req: &LlmRequest,
    now: Instant,
) -> Result<(Arc<RateLimiter>, Reservation), ProxyError> {
    let estimate = (req.prompt_chars() as u64).div_ceil(4) + req.max_output_tokens().unwrap_or(0);
    match limiter.acquire(limiter.key(&req.headers), estimate, now) {
        Ok(r) => Ok((limiter.clone(), r)),
        Err(wait) => {
            state.metrics.rate_limited.get_or_create(&RouteLabels { route: route.cfg.route.clone() }).inc();
            let secs = wait.as_secs_f64().ceil() as u64;
            Err(ProxyError::rate_limited(
                format!("rate limit of route {} reached; retry in {secs}s", route.cfg.route),
                secs,
            ))
        }
    }
}

fn record(metrics: &Metrics, labels: &BackendLabels, class: &'static str, started: Instant, usage: &Usage) {
    let l = RequestLabels {
        route: labels.route.clone(),
        backend: labels.backend.clone(),
        model: labels.model.clone(),
        status_class: class,
    };
    metrics.requests.get_or_create(&l).inc();
    metrics.duration.get_or_create(labels).observe(started.elapsed().as_secs_f64());
    for (kind, n) in [("input", usage.input), ("output", usage.output)] {
        if let Some(n) = n {
            let t = TokenLabels {
                route: labels.route.clone(),
                backend: labels.backend.clone(),
                model: labels.model.clone(),
                gen_ai_token_type: kind,
            };
            metrics.token_usage.get_or_create(&t).observe(n as f64);
        }
    }
}

struct Committed {
    status: StatusCode,
    headers: HeaderMap,
    ttfb: Duration,
    body: CommittedBody,
}

enum CommittedBody {
    Full(Bytes),
    Stream { first: Bytes, rest: Incoming },
}

/// Tries the plan's backends in order, retrying each per policy, until one commits.
async fn call(
    state: &AppState,
    route: &RouteRuntime,
    req: &LlmRequest,
    started: Instant,
) -> Result<(Arc<BackendRuntime>, Committed), ProxyError> {
    let t = &route.cfg.timeouts;
    let deadline = started + t.request.as_std();
    let plan = balance::plan(route, req.api, started, &mut rand::rng());
    if plan.is_empty() {
        return Err(ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_backend_available",
            format!(
                "no backend of route {} can take {} now: every circuit is open or none speaks this API",
                route.cfg.route,
                req.api.path()
            ),
        ));
    }
    let policy = route.cfg.retry.clone().unwrap_or(RetryPolicy { attempts: 0, ..RetryPolicy::default() });
    let mut failures: Vec<(String, u32, Failure)> = vec![];
    for (i, backend) in plan.iter().enumerate() {
        let labels = CircuitLabels { route: route.cfg.route.clone(), backend: backend.cfg.name.clone() };
        if i > 0 {
            state.metrics.fallbacks.get_or_create(&labels).inc();
        }
        let mut tries = 0;
        loop {
            let now = Instant::now();
            if !backend.circuit.try_acquire(now) {
                failures.push((backend.cfg.name.clone(), tries, Failure::CircuitOpen));
                break;
            }
            tries += 1;
            let first_deadline = deadline.min(now + t.first_token.as_std());
            let result = attempt(state, backend, req, first_deadline, deadline).await;
            match result {
                Ok(c) => {
                    if let Some(s) = backend.circuit.success() {
                        state.metrics.circuit_state.get_or_create(&labels).set(s.gauge());
                    }
                    return Ok((backend.clone(), c));
                }
                Err(f) => {
                    state.metrics.outcomes.attempt_failed(&route.cfg.route, &backend.cfg.name, &f);
                    if f.is_backend_fault() {
                        if let Some(s) = backend.circuit.failure(Instant::now()) {
                            tracing::warn!(route = %route.cfg.route, backend = %backend.cfg.name, "circuit opened");
                            state.metrics.circuit_state.get_or_create(&labels).set(s.gauge());
                        }
                    } else {
                        backend.circuit.release();
                    }
                    tracing::info!(route = %route.cfg.route, backend = %backend.cfg.name, attempt = tries, "upstream attempt failed: {}", f.describe());
                    if tries <= policy.attempts && retry::should_retry(&policy, &f) {
                        let ra = match &f {
                            Failure::Status { retry_after, .. } => *retry_after,
                            _ => None,
                        };
                        let wait = retry::backoff(&policy, tries, ra, &mut rand::rng());
                        if Instant::now() + wait < deadline {
                            state.metrics.retries.get_or_create(&labels).inc();
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                    }
                    failures.push((backend.cfg.name.clone(), tries, f));
                    break;
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    Err(give_up(&route.cfg.route, failures, Instant::now() >= deadline))
}

/// One try on one backend: sends, waits for the head and (for streams) the first chunk.
async fn attempt(
    state: &AppState,
    backend: &BackendRuntime,
    req: &LlmRequest,
    first_deadline: Instant,
    deadline: Instant,
) -> Result<Committed, Failure> {
    let sent = Instant::now();
    let upstream_req = upstream::build(backend, req, sent)?;
    let resp = match timeout_at(first_deadline, state.client.request(upstream_req)).await {
        Err(_) => return Err(Failure::Timeout),
        Ok(Err(e)) if e.is_connect() => return Err(Failure::Connect(error_chain(&e))),
        Ok(Err(e)) => return Err(Failure::Reset(error_chain(&e))),
        Ok(Ok(r)) => r,
    };
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        // Drain the error body so the connection can go back to the pool.
        let _ = timeout_at(deadline, Limited::new(body, MAX_ERROR_BYTES).collect()).await;
        return Err(Failure::Status { status, retry_after: retry::retry_after(&parts.headers) });
    }
    let is_sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if req.stream && status.is_success() && is_sse {
        loop {
            match timeout_at(first_deadline, body.frame()).await {
                Err(_) => return Err(Failure::Timeout),
                Ok(None) => return Err(Failure::Reset("the stream ended before its first chunk".into())),
                Ok(Some(Err(e))) => return Err(Failure::Reset(error_chain(&e))),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Ok(Committed {
                            status,
                            headers: parts.headers,
                            ttfb: sent.elapsed(),
                            body: CommittedBody::Stream { first: data, rest: body },
                        });
                    }
                }
            }
        }
    }
    let ttfb = sent.elapsed();
    let bytes = match timeout_at(deadline, Limited::new(body, MAX_RESPONSE_BYTES).collect()).await {
        Err(_) => return Err(Failure::Timeout),
        Ok(Err(e)) => return Err(Failure::Reset(e.to_string())),
        Ok(Ok(c)) => c.to_bytes(),
    };
    Ok(Committed { status, headers: parts.headers, ttfb, body: CommittedBody::Full(bytes) })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The error for a request no backend could serve, naming each backend's outcome.
fn give_up(route: &str, failures: Vec<(String, u32, Failure)>, timed_out: bool) -> ProxyError {
    let summary = failures
        .iter()
        .map(|(name, tries, f)| {
            let tries = if *tries > 1 { format!(" after {tries} attempts") } else { String::new() };
            format!("{name}: {}{tries}", f.describe())
        })
        .collect::<Vec<_>>()
        .join("; ");
    let message = format!("route {route}: no backend answered: {summary}");
    let all = |p: fn(&Failure) -> bool| !failures.is_empty() && failures.iter().all(|(_, _, f)| p(f));
    if all(|f| matches!(f, Failure::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS)) {
        let wait = failures
            .iter()
            .filter_map(|(_, _, f)| match f {
                Failure::Status { retry_after, .. } => *retry_after,
                _ => None,
            })
            .max()
            .map_or(1, |d| d.as_secs_f64().ceil() as u64);
        return ProxyError {
            retry_after: Some(wait.max(1)),
            ..ProxyError::new(StatusCode::TOO_MANY_REQUESTS, "upstream_rate_limited", message)
        };
    }
    if all(|f| matches!(f, Failure::CircuitOpen)) {
        return ProxyError::new(StatusCode::SERVICE_UNAVAILABLE, "circuit_open", message);
    }
    if timed_out || failures.last().is_some_and(|(_, _, f)| matches!(f, Failure::Timeout)) {
        return ProxyError::new(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", message);
    }
    if failures.iter().all(|(_, _, f)| matches!(f, Failure::Credentials(_) | Failure::CircuitOpen)) {
        return ProxyError::new(StatusCode::INTERNAL_SERVER_ERROR, "credentials_unavailable", message);
    }
    ProxyError::new(StatusCode::BAD_GATEWAY, "upstream_unavailable", message)
}

/// Upstream response headers worth passing on to the client.
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        let n = name.as_str();
        if n == "content-type"
            || n == "x-request-id"
            || n == "request-id"
            || n.starts_with("openai-")
            || n.starts_with("anthropic-")
            || n.starts_with("x-ratelimit-")
        {
            to.append(name.clone(), value.clone());
        }
    }
}

fn tag(h: &mut HeaderMap, route: &str, backend: &str, cache: Option<&'static str>) {
    if let Ok(v) = HeaderValue::from_str(route) {
        h.insert("x-bulwark-route", v);
    }
    if let Ok(v) = HeaderValue::from_str(backend) {
        h.insert("x-bulwark-backend", v);
    }
    if let Some(c) = cache {
        h.insert("x-bulwark-cache", HeaderValue::from_static(c));
    }
}

fn cached_response(hit: Cached, route: &str) -> Response<ProxyBody> {
    let content_type = if hit.stream { "text/event-stream" } else { "application/json" };
    let mut resp = Response::new(ProxyBody::full(hit.body));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    tag(resp.headers_mut(), route, &hit.backend, Some("hit"));
    resp
}

/// `GET /v1/models`: the model names the routes take by exact name, and those backends send.
fn models(rt: &Runtime) -> Response<ProxyBody> {
    let mut names = std::collections::BTreeMap::new();
    for r in &rt.routes {
        for m in &r.exact_models {
            names.entry(m.clone()).or_insert_with(|| r.cfg.route.clone());
        }
        for b in r.backends.iter().chain(&r.fallback) {
            if let Some(m) = &b.cfg.model {
                names.entry(m.clone()).or_insert_with(|| r.cfg.route.clone());
            }
        }
    }
    let data: Vec<_> = names
        .into_iter()
        .map(|(id, route)| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": route}))
        .collect();
    let body = serde_json::json!({"object": "list", "data": data}).to_string();
    let mut resp = Response::new(ProxyBody::full(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
