//! Retries and fallback: tries the plan's backends in order, retrying each per the route's
//! policy, until one commits (its response head, and for a stream its first chunk, arrived).
//! Before that point nothing reached the client, so failing over is invisible to it.

use std::{sync::Arc, time::Duration};

use bulwark_api::route::RetryPolicy;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, timeout_at};

use crate::{
    error::ProxyError,
    metrics::{BackendLabels, CircuitLabels, ReplicaLabels},
    proxy::AppState,
    replicas::InFlight,
    request::LlmRequest,
    retry::{self, Failure},
    runtime::{BackendRuntime, RouteRuntime},
    settle::Settlement,
    upstream,
};

/// Largest upstream response body read into memory (non-streamed responses).
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Largest upstream error body kept to pass on.
const MAX_ERROR_BYTES: usize = 1 << 20;

/// A backend's answer, once it can no longer be failed over.
pub struct Committed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub ttfb: Duration,
    pub body: CommittedBody,
    /// The replica answering, counted as in flight until the request ends.
    pub in_flight: Option<InFlight>,
}

pub enum CommittedBody {
    Full(Bytes),
    Stream { first: Bytes, rest: Incoming },
}

/// The labels of an attempt of `backend` on `route` for `req`.
pub fn labels(route: &RouteRuntime, backend: &BackendRuntime, req: &LlmRequest) -> BackendLabels {
    BackendLabels {
        route: route.cfg.route.clone(),
        backend: backend.cfg.name.clone(),
        model: route.model_label(backend, &req.model),
    }
}

/// Tries `plan` in order, retrying each backend per policy, until one commits. `end` always
/// knows which backend is in flight, so a request abandoned meanwhile is counted against it.
pub async fn call(
    state: &AppState,
    route: &RouteRuntime,
    req: &LlmRequest,
    plan: &[Arc<BackendRuntime>],
    end: &mut Settlement,
) -> Result<(Arc<BackendRuntime>, Committed), ProxyError> {
    let t = &route.cfg.timeouts;
    let deadline = end.started() + t.request.as_std();
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
        let mut failed_at = None;
        loop {
            let now = Instant::now();
            if !backend.circuit.try_acquire(now) {
                failures.push((backend.cfg.name.clone(), tries, Failure::CircuitOpen));
                break;
            }
            tries += 1;
            let first_deadline = deadline.min(now + t.first_token.as_std());
            end.sent(self::labels(route, backend, req));
            match attempt(state, &route.cfg.route, backend, req, first_deadline, deadline, &mut failed_at).await {
                Ok(c) => {
                    if let Some(s) = backend.circuit.success() {
                        state.metrics.circuit_state.get_or_create(&labels).set(s.gauge());
                    }
                    return Ok((backend.clone(), c));
                }
                Err(f) => {
                    end.attempt_failed();
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
    let error = give_up(&route.cfg.route, failures, Instant::now() >= deadline);
    end.gave_up(error.status);
    Err(error)
}

/// One try on one backend, at the replica its load picks: sends, waits for the head and (for
/// streams) the first chunk. The replica learns how it went (time to first token, or a failure
/// that counts towards its ejection); the answer holds it as in flight until the request ends.
/// `failed_at` is the replica of the attempt before (a retry avoids it), and becomes this one's
/// when it fails.
pub async fn attempt(
    state: &AppState,
    route: &str,
    backend: &BackendRuntime,
    req: &LlmRequest,
    first_deadline: Instant,
    deadline: Instant,
    failed_at: &mut Option<String>,
) -> Result<Committed, Failure> {
    let Some(endpoint) = backend.endpoint(Instant::now(), failed_at.as_deref()) else {
        return Err(Failure::Connect("the backend has no replica to call".into()));
    };
    let in_flight = endpoint.start();
    if backend.endpoints.len() > 1 {
        let l = ReplicaLabels {
            route: route.to_owned(),
            backend: backend.cfg.name.clone(),
            endpoint: endpoint.url.clone(),
        };
        state.metrics.replica_requests.get_or_create(&l).inc();
    }
    let result = attempt_at(state, backend, &endpoint.url, req, first_deadline, deadline).await;
    match &result {
        // A 4xx is the request's fault: it says nothing of the replica.
        Ok(c) if c.status.is_success() => endpoint.answered(c.ttfb),
        Err(f) if f.is_backend_fault() => {
            *failed_at = Some(endpoint.url.clone());
            if endpoint.failed(Instant::now()) {
                tracing::warn!(backend = %backend.cfg.name, endpoint = %endpoint.url, "replica ejected after failing in a row");
                let l = CircuitLabels { route: route.to_owned(), backend: backend.cfg.name.clone() };
                state.metrics.replica_ejections.get_or_create(&l).inc();
            }
        }
        Ok(_) | Err(_) => {}
    }
    result.map(|mut c| {
        c.in_flight = Some(in_flight);
        c
    })
}

async fn attempt_at(
    state: &AppState,
    backend: &BackendRuntime,
    base: &str,
    req: &LlmRequest,
    first_deadline: Instant,
    deadline: Instant,
) -> Result<Committed, Failure> {
    let sent = Instant::now();
    let upstream_req = upstream::build(backend, base, req, sent)?;
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
                            in_flight: None,
                        });
                    }
                }
            }
        }
    }
    let ttfb = sent.elapsed();
    let bytes = whole_body(body, first_deadline, deadline).await?;
    Ok(Committed { status, headers: parts.headers, ttfb, body: CommittedBody::Full(bytes), in_flight: None })
}

/// A whole answer's body: its first byte by `first_deadline` (a head sent early does not stop
/// that clock), all of it by `deadline`, at most [`MAX_RESPONSE_BYTES`].
async fn whole_body(body: Incoming, first_deadline: Instant, deadline: Instant) -> Result<Bytes, Failure> {
    let mut body = Limited::new(body, MAX_RESPONSE_BYTES);
    let mut out = BytesMut::new();
    let mut until = first_deadline;
    loop {
        match timeout_at(until, body.frame()).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(None) => return Ok(out.freeze()),
            Ok(Some(Err(e))) => return Err(Failure::Reset(e.to_string())),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    out.extend_from_slice(&data);
                    until = deadline;
                }
            }
        }
    }
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
