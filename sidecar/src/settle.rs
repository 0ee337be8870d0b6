//! The end of a request, settled exactly once however it ends: answered, failed, streamed to the
//! end, broken after the first byte, or abandoned by the client. Metrics, the outcome report,
//! the rate-limit settlement and the cache insert happen in `Drop`, and nowhere else.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::time::Instant;

use crate::{
    cache::{Cache, Cached, Key},
    metrics::{BackendLabels, CircuitLabels, Metrics, RequestLabels, TokenLabels},
    ratelimit::{RateLimiter, Reservation},
    replicas::InFlight,
    usage::Usage,
};

/// Whose request this is: the client's, or a mirrored copy whose answer nobody sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Client,
    Mirror,
}

/// How an answered request ended.
#[derive(Debug)]
pub struct End {
    /// The status class (`2xx`, `4xx`, `5xx`), or `cancelled` when the client went away.
    pub class: &'static str,
    /// The stream broke after its first byte (the client got an error event).
    pub broken: bool,
    pub usage: Usage,
    /// Without reported usage, whether the estimate stays charged (the backend may have spent
    /// it: a stream, a cancelled request) or nothing is (a whole answer that reports none).
    pub unknown_usage_costs_estimate: bool,
    /// The answer as sent, when it may be cached.
    pub record: Option<Bytes>,
}

impl End {
    pub fn cancelled(usage: Usage) -> Self {
        Self { class: "cancelled", broken: false, usage, unknown_usage_costs_estimate: true, record: None }
    }

    /// No backend answered; the client got an error of `class`.
    pub fn failed(class: &'static str) -> Self {
        Self { class, broken: false, usage: Usage::default(), unknown_usage_costs_estimate: false, record: None }
    }

    /// A whole answer, as the backend sent it.
    pub fn whole(status: http::StatusCode, usage: Usage, record: Option<Bytes>) -> Self {
        let class = crate::metrics::status_class(status.as_u16());
        Self { class, broken: false, usage, unknown_usage_costs_estimate: false, record }
    }
}

enum Stage {
    /// Nothing reached a backend yet, or every attempt failed: no tokens were spent.
    Local,
    /// An attempt is on its way to this backend.
    Sent(BackendLabels),
    /// The last attempt, at this backend, failed: no tokens were spent, and unless another
    /// backend answers, the client gets an error of this status class.
    Failed { labels: BackendLabels, class: &'static str },
    /// This backend answered, streamed or not; `None` until the answer ends.
    Answered { labels: BackendLabels, stream: bool, end: Option<End> },
}

pub struct Settlement {
    metrics: Arc<Metrics>,
    origin: Origin,
    started: Instant,
    reservation: Option<(Arc<RateLimiter>, Reservation)>,
    cache: Option<(Arc<Cache>, Key)>,
    stage: Stage,
    /// The replica answering: in flight until the request ends.
    replica: Option<InFlight>,
}

impl Settlement {
    pub fn new(metrics: Arc<Metrics>, origin: Origin, started: Instant) -> Self {
        Self { metrics, origin, started, reservation: None, cache: None, stage: Stage::Local, replica: None }
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Tokens charged to the client's budget up front, settled with the real usage at the end.
    pub fn reserve(&mut self, reservation: Option<(Arc<RateLimiter>, Reservation)>) {
        self.reservation = reservation;
    }

    /// Where a successful answer is cached.
    pub fn cache_in(&mut self, slot: Option<(Arc<Cache>, Key)>) {
        self.cache = slot;
    }

    /// The largest answer worth recording for the cache, when one is configured.
    pub fn cache_limit(&self) -> Option<usize> {
        self.cache.as_ref().map(|(c, _)| c.max_entry_bytes())
    }

    /// An attempt goes out to a backend.
    pub fn sent(&mut self, labels: BackendLabels) {
        self.stage = Stage::Sent(labels);
    }

    /// The attempt failed; the failure was counted where it happened.
    pub fn attempt_failed(&mut self) {
        self.stage = match std::mem::replace(&mut self.stage, Stage::Local) {
            Stage::Sent(labels) => Stage::Failed { labels, class: "5xx" },
            other => other,
        };
    }

    /// No backend answered and the client gets an error with `status`: the request counts
    /// against the backend tried last.
    pub fn gave_up(&mut self, status: http::StatusCode) {
        if let Stage::Failed { class, .. } = &mut self.stage {
            *class = crate::metrics::status_class(status.as_u16());
        }
    }

    /// The replica that answers stays counted as in flight until the request ends.
    pub fn hold(&mut self, replica: Option<InFlight>) {
        self.replica = replica;
    }

    /// The backend in flight answered: its first byte arrived after `ttfb`.
    pub fn answered(&mut self, ttfb: Duration, stream: bool) {
        let Stage::Sent(labels) = std::mem::replace(&mut self.stage, Stage::Local) else { return };
        if self.origin == Origin::Client {
            self.metrics.time_to_first_token.get_or_create(&labels).observe(ttfb.as_secs_f64());
        }
        self.metrics.outcomes.first_token(&labels.route, &labels.backend, ttfb);
        self.stage = Stage::Answered { labels, stream, end: None };
    }

    /// How the answer ended.
    pub fn end(&mut self, end: End) {
        if let Stage::Answered { end: slot, .. } = &mut self.stage {
            *slot = Some(end);
        }
    }

    fn settle_tokens(&self, tokens: u64) {
        if let Some((limiter, r)) = &self.reservation {
            limiter.settle(r, tokens);
        }
    }

    /// What the rollout analysis sees of an answer (failed attempts were counted one by one).
    fn report_outcome(&self, labels: &BackendLabels, end: &End) {
        let outcome = if end.broken { "stream" } else { end.class };
        self.metrics.outcomes.answered(&labels.route, &labels.backend, outcome, self.started.elapsed());
    }

    fn record(&self, labels: &BackendLabels, end: &End) {
        let m = &self.metrics;
        let class = if end.broken { "5xx" } else { end.class };
        if self.origin == Origin::Mirror {
            let l = RequestLabels { status_class: class, ..request_labels(labels) };
            m.mirrored.get_or_create(&l).inc();
            return;
        }
        m.requests.get_or_create(&RequestLabels { status_class: class, ..request_labels(labels) }).inc();
        m.duration.get_or_create(labels).observe(self.started.elapsed().as_secs_f64());
        for (kind, n) in [("input", end.usage.input), ("output", end.usage.output)] {
            if let Some(n) = n {
                let t = TokenLabels {
                    route: labels.route.clone(),
                    backend: labels.backend.clone(),
                    model: labels.model.clone(),
                    gen_ai_token_type: kind,
                };
                m.token_usage.get_or_create(&t).observe(n as f64);
            }
        }
        if end.broken {
            let l = CircuitLabels { route: labels.route.clone(), backend: labels.backend.clone() };
            m.stream_errors.get_or_create(&l).inc();
        }
    }
}

pub fn request_labels(l: &BackendLabels) -> RequestLabels {
    RequestLabels { route: l.route.clone(), backend: l.backend.clone(), model: l.model.clone(), status_class: "" }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        let estimate = self.reservation.as_ref().map_or(0, |(_, r)| r.tokens);
        match std::mem::replace(&mut self.stage, Stage::Local) {
            Stage::Local => self.settle_tokens(0),
            Stage::Failed { labels, class } => {
                self.record(&labels, &End::failed(class));
                self.settle_tokens(0);
            }
            // The client went away while the backend worked on it: it may have spent the tokens.
            Stage::Sent(labels) => {
                let end = End::cancelled(Usage::default());
                self.report_outcome(&labels, &end);
                self.record(&labels, &end);
                self.settle_tokens(estimate);
            }
            Stage::Answered { labels, stream, end } => {
                let end = end.unwrap_or_else(|| End::cancelled(Usage::default()));
                self.report_outcome(&labels, &end);
                self.record(&labels, &end);
                let unknown = if end.unknown_usage_costs_estimate { estimate } else { 0 };
                self.settle_tokens(end.usage.total().unwrap_or(unknown));
                if let (Some((cache, key)), Some(body)) = (self.cache.take(), end.record) {
                    cache.insert(key, Cached { body, stream, backend: labels.backend }, Instant::now());
                }
            }
        }
    }
}
