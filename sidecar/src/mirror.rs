//! Mirrored traffic: during a rollout step that asks for it, a copy of a share of a route's
//! requests also goes to the canary. The copy's answer is read to its end and judged (outcome
//! report, output scanners) but never sent to the client, cached, or charged to its rate limit.

use std::sync::Arc;

use http_body_util::BodyExt as _;
use rand::Rng as _;
use tokio::time::Instant;

use crate::{
    failover::{self, CommittedBody},
    metrics::{CircuitLabels, RequestLabels, status_class},
    proxy::{self, Answer, AppState},
    request::LlmRequest,
    retry::Failure,
    runtime::{BackendRuntime, RouteRuntime},
    scan::Restore,
    settle::{End, Origin, Settlement, request_labels},
    usage,
};

/// Mirrored copies in flight at most; past this, copies are skipped (and counted).
pub const MAX_IN_FLIGHT: usize = 64;

/// Sends a copy of `req` to the route's mirror backend, if the route mirrors and this request
/// falls in its share. `primary` is the backend the request itself goes to first.
pub fn maybe(
    state: &Arc<AppState>,
    route: &Arc<RouteRuntime>,
    req: &LlmRequest,
    primary: Option<&Arc<BackendRuntime>>,
) {
    let Some((backend, percent)) = &route.mirror else { return };
    if primary.is_some_and(|p| p.cfg.name == backend.cfg.name) || !backend.speaks(req.api) {
        return;
    }
    if rand::rng().random_range(0..100) >= *percent {
        return;
    }
    let labels = CircuitLabels { route: route.cfg.route.clone(), backend: backend.cfg.name.clone() };
    let Ok(permit) = state.mirrors.clone().try_acquire_owned() else {
        state.metrics.mirror_skipped.get_or_create(&labels).inc();
        return;
    };
    let (state, route, backend, req) = (state.clone(), route.clone(), backend.clone(), req.clone());
    tokio::spawn(async move {
        let _permit = permit;
        copy(&state, &route, &backend, &req).await;
    });
}

/// One mirrored attempt, settled like any request but on the mirror's own metrics.
async fn copy(state: &AppState, route: &RouteRuntime, backend: &BackendRuntime, req: &LlmRequest) {
    let started = Instant::now();
    let mut end = Settlement::new(state.metrics.clone(), Origin::Mirror, started);
    let t = &route.cfg.timeouts;
    let deadline = started + t.request.as_std();
    let first_deadline = deadline.min(started + t.first_token.as_std());
    end.sent(failover::labels(route, backend, req));
    let mut committed =
        match failover::attempt(state, &route.cfg.route, backend, req, first_deadline, deadline, &mut None).await {
            Ok(c) => c,
            Err(f) => {
                end.attempt_failed();
                state.metrics.outcomes.attempt_failed(&route.cfg.route, &backend.cfg.name, &f);
                let class = match &f {
                    Failure::Status { status, .. } => status_class(status.as_u16()),
                    _ => "error",
                };
                let l = RequestLabels { status_class: class, ..request_labels(&failover::labels(route, backend, req)) };
                state.metrics.mirrored.get_or_create(&l).inc();
                return;
            }
        };
    end.hold(committed.in_flight.take());
    end.answered(committed.ttfb, matches!(committed.body, CommittedBody::Stream { .. }));
    match committed.body {
        CommittedBody::Full(body) => {
            let restore = Restore::default();
            let answer = Answer { status: committed.status, body, restore: &restore, origin: Origin::Mirror };
            let (body, _) = proxy::judge_full(state, route, backend, req.api, &answer).await;
            let usage = if committed.status.is_success() { usage::from_json(&body) } else { Default::default() };
            end.end(End::whole(committed.status, usage, None));
        }
        CommittedBody::Stream { first, rest } => {
            let mut relay = proxy::relay(state, route, backend, req.api, first, rest, Restore::default(), end);
            // Read to the end: the relay settles the copy however the stream ends.
            while let Some(frame) = relay.frame().await {
                if frame.is_err() {
                    break;
                }
            }
        }
    }
}
