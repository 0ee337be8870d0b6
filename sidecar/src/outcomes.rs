//! Per-backend outcome counters the sidecar reports to the operator: attempts, failures by
//! class, latency and time-to-first-token histograms, output blocks, and scanner blocks per
//! route. Counters are cumulative for the life of the process; the operator takes the
//! differences. A failure also wakes the report loop, so failures reach the operator early.

use std::{collections::HashMap, time::Duration};

use bulwark_api::control::{BackendOutcome, Report, RouteOutcome};
use parking_lot::Mutex;

use crate::retry::Failure;

pub struct Outcomes {
    instance: String,
    inner: Mutex<Inner>,
    delivered: std::sync::atomic::AtomicU64,
    /// Wakes the report loop on a backend failure, so that a failing canary is judged without
    /// waiting for the next periodic report.
    pub failed: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    backends: HashMap<(String, String), BackendOutcome>,
    blocks: HashMap<String, u64>,
}

impl Default for Outcomes {
    fn default() -> Self {
        Self {
            instance: format!("{:016x}", rand::random::<u64>()),
            inner: Mutex::default(),
            delivered: Default::default(),
            failed: tokio::sync::Notify::new(),
        }
    }
}

impl Outcomes {
    fn with(&self, route: &str, backend: &str, f: impl FnOnce(&mut BackendOutcome)) {
        let mut inner = self.inner.lock();
        let key = (route.to_owned(), backend.to_owned());
        let entry = inner.backends.entry(key).or_insert_with(|| BackendOutcome {
            route: route.to_owned(),
            backend: backend.to_owned(),
            ..BackendOutcome::default()
        });
        f(entry);
    }

    /// An attempt that got no usable answer. Attempts never sent (open circuit, unreadable
    /// key) are not the backend's outcome and are not counted.
    pub fn attempt_failed(&self, route: &str, backend: &str, failure: &Failure) {
        let class = match failure {
            Failure::Connect(_) => "connect",
            Failure::Timeout => "timeout",
            Failure::Reset(_) => "reset",
            Failure::Status { status, .. } if status.as_u16() == 429 => "429",
            Failure::Status { status, .. } if status.is_client_error() => "4xx",
            Failure::Status { .. } => "5xx",
            Failure::Credentials(_) | Failure::CircuitOpen => return,
        };
        self.with(route, backend, |o| {
            o.requests += 1;
            *o.errors.entry(class.to_owned()).or_default() += 1;
        });
        self.failed.notify_one();
    }

    /// The first byte of an answer arrived.
    pub fn first_token(&self, route: &str, backend: &str, ttft: Duration) {
        self.with(route, backend, |o| o.first_token.observe(ttft.as_secs_f64()));
    }

    /// An answered attempt ended; `class` is the status class, `stream` for a stream that
    /// broke after its first byte, or `cancelled` when the client went away (no latency then:
    /// the answer never completed).
    pub fn answered(&self, route: &str, backend: &str, class: &str, took: Duration) {
        let failed = matches!(class, "4xx" | "5xx" | "stream");
        self.with(route, backend, |o| {
            o.requests += 1;
            if failed {
                *o.errors.entry(class.to_owned()).or_default() += 1;
            }
            if class != "cancelled" {
                o.latency.observe(took.as_secs_f64());
            }
        });
        if failed {
            self.failed.notify_one();
        }
    }

    /// Output scanners blocked an answer of this backend.
    pub fn output_blocked(&self, route: &str, backend: &str) {
        self.with(route, backend, |o| o.output_blocks += 1);
    }

    pub fn scanner_block(&self, route: &str) {
        *self.inner.lock().blocks.entry(route.to_owned()).or_default() += 1;
    }

    /// What one backend of one route has seen so far.
    pub fn total(&self, route: &str, backend: &str) -> Option<BackendOutcome> {
        self.inner.lock().backends.get(&(route.to_owned(), backend.to_owned())).cloned()
    }

    /// The operator took a report.
    pub fn delivered(&self) {
        self.delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Everything counted so far, for the config version the sidecar runs.
    pub fn report(&self, version: &str) -> Report {
        let inner = self.inner.lock();
        let mut backends: Vec<BackendOutcome> = inner.backends.values().cloned().collect();
        backends.sort_by(|a, b| (&a.route, &a.backend).cmp(&(&b.route, &b.backend)));
        let mut routes: Vec<RouteOutcome> =
            inner.blocks.iter().map(|(route, n)| RouteOutcome { route: route.clone(), scanner_blocks: *n }).collect();
        routes.sort_by(|a, b| a.route.cmp(&b.route));
        Report {
            instance: self.instance.clone(),
            version: version.to_owned(),
            delivered: self.delivered.load(std::sync::atomic::Ordering::Relaxed),
            backends,
            routes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn failures_are_counted_by_class_and_skipped_attempts_not_at_all() {
        let o = Outcomes::default();
        o.attempt_failed("a/r", "b", &Failure::Timeout);
        o.attempt_failed("a/r", "b", &Failure::Status { status: StatusCode::TOO_MANY_REQUESTS, retry_after: None });
        o.attempt_failed("a/r", "b", &Failure::CircuitOpen);
        o.first_token("a/r", "b", Duration::from_millis(40));
        o.answered("a/r", "b", "2xx", Duration::from_millis(300));
        o.answered("a/r", "b", "stream", Duration::from_millis(300));
        o.scanner_block("a/r");
        let r = o.report("v1");
        assert_eq!(r.version, "v1");
        let b = &r.backends[0];
        assert_eq!((b.requests, b.error_count()), (4, 3));
        assert_eq!(b.errors.keys().map(String::as_str).collect::<Vec<_>>(), ["429", "stream", "timeout"]);
        assert_eq!((b.latency.count(), b.first_token.count()), (2, 1));
        assert_eq!(r.routes[0].scanner_blocks, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_wakes_the_report_loop_and_a_success_does_not() {
        let o = Outcomes::default();
        let woken = |o: &Outcomes| {
            let n = o.failed.notified();
            futures_util::FutureExt::now_or_never(n).is_some()
        };
        o.answered("a/r", "b", "2xx", Duration::from_millis(5));
        assert!(!woken(&o));
        o.attempt_failed("a/r", "b", &Failure::Timeout);
        assert!(woken(&o));
        o.answered("a/r", "b", "stream", Duration::from_millis(5));
        assert!(woken(&o));
    }
}
