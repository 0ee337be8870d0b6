//! The request path as a short sequence of stages over one snapshot of the config: read →
//! route → rate limit → input scanners → cache → failover (retries and fallback, committing at
//! the first byte) → respond (output scanners, streamed or whole). Errors are values until
//! `handle`, the one place that turns them into responses; what happens when the request ends
//! happens once, in its `Settlement`.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::{sync::watch, time::Instant};

use crate::{
    balance,
    body::ProxyBody,
    cache::{Cache, Cached, Key},
    error::ProxyError,
    failover::{self, CommittedBody},
    metrics::{CacheLabels, ErrorLabels, Metrics, RouteLabels},
    mirror,
    ratelimit::{RateLimiter, Reservation},
    request::{self, Api, Limits, LlmRequest},
    runtime::{BackendRuntime, RouteRuntime, Runtime},
    scan::{self, Direction, Restore, stream::OutputGuard},
    settle::{End, Origin, Settlement},
    stream::Relay,
    upstream::Client,
    usage,
};

pub struct AppState {
    pub runtime: watch::Receiver<Arc<Runtime>>,
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Mirrored copies in flight, bounded so a slow canary never piles them up.
    pub mirrors: Arc<tokio::sync::Semaphore>,
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

async fn serve(state: &Arc<AppState>, req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
    let started = Instant::now();
    // One snapshot of the config for the whole request: reloads never tear a request.
    let rt = state.runtime.borrow().clone();
    let (parts, body) = req.into_parts();
    let mut req = request::read(&parts.method, parts.uri.path(), parts.headers, body, &state.limits).await?;
    if req.api == Api::Models {
        return Ok(models(&rt));
    }
    let route = select(&rt, &req)?;
    let mut end = Settlement::new(state.metrics.clone(), Origin::Client, started);
    end.reserve(admit(state, route, &req, started)?);
    // Input scanners run before the cache: a cached answer never bypasses a policy.
    let restore = scan_input(state, route, &mut req).await?;
    let cache = cache_slot(route, &req, &restore);
    if let Some(hit) = lookup(state, route, cache.as_ref(), started) {
        return Ok(cached_response(hit, &route.cfg.route));
    }
    let cache_tag = cache.is_some().then_some("miss");
    end.cache_in(cache);
    let plan = balance::plan(route, req.api, started, &mut rand::rng());
    mirror::maybe(state, route, &req, plan.first());
    let (backend, mut committed) = failover::call(state, route, &req, &plan, &mut end).await?;
    end.hold(committed.in_flight.take());
    end.answered(committed.ttfb, matches!(committed.body, CommittedBody::Stream { .. }));
    let mut resp = match committed.body {
        CommittedBody::Full(body) => {
            let answer = Answer { status: committed.status, body, restore: &restore, origin: Origin::Client };
            respond_full(state, route, &backend, req.api, answer, end).await
        }
        CommittedBody::Stream { first, rest } => {
            let relay = relay(state, route, &backend, req.api, first, rest, restore, end);
            let mut resp = Response::new(ProxyBody::Stream(Box::new(relay)));
            resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
    };
    *resp.status_mut() = committed.status;
    copy_headers(&committed.headers, resp.headers_mut());
    tag(resp.headers_mut(), &route.cfg.route, &backend.cfg.name, cache_tag);
    Ok(resp)
}

/// The first route (most specific first) that takes the request.
fn select<'a>(rt: &'a Runtime, req: &LlmRequest) -> Result<&'a Arc<RouteRuntime>, ProxyError> {
    rt.select(req.api, &req.model, &req.headers).ok_or_else(|| {
        ProxyError::new(
            StatusCode::NOT_FOUND,
            "route_not_found",
            format!("no route takes model {:?} on {}; check the LLMRoute match rules", req.model, req.api.path()),
        )
    })
}

/// Where this request's answer would be cached: not when the client bypasses the cache, nor
/// when the answer is restored with this request's personal data.
fn cache_slot(route: &RouteRuntime, req: &LlmRequest, restore: &Restore) -> Option<(Arc<Cache>, Key)> {
    let c = route.cache.as_ref().filter(|_| !Cache::bypass(&req.headers) && restore.is_empty())?;
    Some((c.clone(), Cache::key(&route.cfg.id, req.api.path(), &req.body)))
}

fn lookup(state: &AppState, route: &RouteRuntime, slot: Option<&(Arc<Cache>, Key)>, now: Instant) -> Option<Cached> {
    let (c, key) = slot?;
    let hit = c.get(key, now);
    let result = if hit.is_some() { "hit" } else { "miss" };
    state.metrics.cache.get_or_create(&CacheLabels { route: route.cfg.route.clone(), result }).inc();
    hit
}

/// A whole answer and what output scanning needs to know about its request.
pub struct Answer<'a> {
    pub status: StatusCode,
    pub body: Bytes,
    pub restore: &'a Restore,
    /// A mirrored copy's answer is judged but counted only as the backend's output blocks.
    pub origin: Origin,
}

/// A complete answer: output scanners, then the response; `end` settles it.
async fn respond_full(
    state: &AppState,
    route: &RouteRuntime,
    backend: &BackendRuntime,
    api: Api,
    answer: Answer<'_>,
    mut end: Settlement,
) -> Response<ProxyBody> {
    let (body, blocked) = judge_full(state, route, backend, api, &answer).await;
    let usage = if answer.status.is_success() { usage::from_json(&body) } else { usage::Usage::default() };
    let cacheable = answer.status.is_success() && blocked.is_none();
    let record = cacheable.then(|| body.clone());
    end.end(End::whole(answer.status, usage, record));
    let mut resp = Response::new(ProxyBody::full(body));
    if let Some(b) = blocked
        && let Ok(v) = HeaderValue::from_str(&format!("{}/{}", b.policy, b.scanner))
    {
        resp.headers_mut().insert("x-bulwark-blocked", v);
    }
    resp
}

/// The output scanners of the route's policy over a whole successful answer, if it has any.
pub async fn judge_full(
    state: &AppState,
    route: &RouteRuntime,
    backend: &BackendRuntime,
    api: Api,
    answer: &Answer<'_>,
) -> (Bytes, Option<scan::Blocked>) {
    match &route.policy {
        Some(policy) if answer.status.is_success() && (!policy.output.is_empty() || !answer.restore.is_empty()) => {
            scan_output(state, route, backend, policy, api, answer).await
        }
        _ => (answer.body.clone(), None),
    }
}

/// A stream relayed as it arrives, through the output guard when the policy scans output.
#[allow(clippy::too_many_arguments)]
pub fn relay(
    state: &AppState,
    route: &RouteRuntime,
    backend: &BackendRuntime,
    api: Api,
    first: Bytes,
    rest: Incoming,
    restore: Restore,
    end: Settlement,
) -> Relay {
    let mirrored = end.origin() == Origin::Mirror;
    let relay = Relay::new(first, rest, api.flavor(), route.cfg.timeouts.idle.as_std(), end);
    match &route.policy {
        Some(policy) if !policy.output.is_empty() || !restore.is_empty() => {
            let guard = OutputGuard::new(
                policy.clone(),
                restore,
                api.flavor(),
                state.metrics.clone(),
                route.cfg.route.clone(),
                backend.cfg.name.clone(),
            );
            relay.with_guard(if mirrored { guard.mirrored() } else { guard })
        }
        _ => relay,
    }
}

/// Runs the route's input scanners; rewrites the body when they redact.
async fn scan_input(state: &AppState, route: &RouteRuntime, req: &mut LlmRequest) -> Result<Restore, ProxyError> {
    let Some(policy) = route.policy.as_ref().filter(|p| !p.input.is_empty()) else { return Ok(Restore::default()) };
    if let Some((path, kind)) = crate::shape::unscannable(req.api, &req.body) {
        let message = format!(
            "`{path}` is a `{kind}` part, whose text the input scanners of this route's policy cannot read; send its text as a text part"
        );
        return Err(ProxyError::bad_request("unscannable_content", message).with_param(path));
    }
    let ctx = scan::Ctx { metrics: &state.metrics, route: &route.cfg.route, backend: None, mirrored: false };
    let arguments = scan::text::ToolArguments::parse(req.api, &mut req.body);
    let (sources, mut texts): (Vec<_>, Vec<_>) = scan::text::request_slots(req.api, &mut req.body).into_iter().unzip();
    let scanned = scan::run_async(policy, Direction::Input, &mut texts, Some(&sources), &ctx).await;
    arguments.put_back(req.api, &mut req.body);
    match scanned {
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
    backend: &BackendRuntime,
    policy: &scan::PolicyRuntime,
    api: Api,
    answer: &Answer<'_>,
) -> (Bytes, Option<scan::Blocked>) {
    let (body, restore, origin) = (answer.body.clone(), answer.restore, answer.origin);
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else { return (body, None) };
    let ctx = scan::Ctx {
        metrics: &state.metrics,
        route: &route.cfg.route,
        backend: Some(&backend.cfg.name),
        mirrored: origin == Origin::Mirror,
    };
    let arguments = v.as_object_mut().map(|o| scan::text::ToolArguments::parse(api, o)).unwrap_or_default();
    let mut texts = scan::text::response_texts(api, &mut v);
    let blocked = match scan::run_async(policy, Direction::Output, &mut texts, None, &ctx).await {
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
    if let Some(o) = v.as_object_mut() {
        arguments.put_back(api, o);
    }
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

/// Takes the request's share of the route's rate limit, or refuses it with `retry-after`.
fn admit(
    state: &AppState,
    route: &RouteRuntime,
    req: &LlmRequest,
    now: Instant,
) -> Result<Option<(Arc<RateLimiter>, Reservation)>, ProxyError> {
    let Some(limiter) = &route.limiter else { return Ok(None) };
    let estimate = (req.prompt_chars() as u64).div_ceil(4) + req.max_output_tokens().unwrap_or(0);
    match limiter.acquire(limiter.key(&req.headers), estimate, now) {
        Ok(r) => Ok(Some((limiter.clone(), r))),
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
