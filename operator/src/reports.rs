//! Sidecar outcome reports, added up per route and backend across every sidecar. Reports carry
//! counters cumulative per sidecar process; the aggregator adds the difference from the same
//! process's previous report, so a lost report loses nothing and a restart starts from zero.
//! The totals are served as Prometheus metrics, and the rollout analysis reads them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use bulwark_api::control::{BackendOutcome, Histogram, LATENCY_BOUNDS, Report};
use parking_lot::Mutex;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
    registry::Unit,
};

/// The failure classes sidecars report; anything else is ignored.
const ERROR_CLASSES: [&str; 7] = ["timeout", "connect", "reset", "429", "4xx", "5xx", "stream"];

/// Totals of one backend of one route (`namespace/route`).
pub type Totals = BTreeMap<(String, String), BackendOutcome>;

#[derive(Default, Debug)]
pub struct Aggregator {
    last: HashMap<(String, String), Report>,
    pub backends: Totals,
    pub scanner_blocks: BTreeMap<String, u64>,
    /// The ModelServer each self-hosted backend names: `(namespace/route, backend)` to its name.
    pub servers: BTreeMap<(String, String), String>,
}

impl Aggregator {
    /// Adds what changed since the pod's previous report.
    pub fn ingest(&mut self, ns: &str, pod: &str, report: Report) {
        let key = (ns.to_owned(), pod.to_owned());
        let prev = self.last.get(&key).filter(|p| p.instance == report.instance);
        if prev.is_none() && report.delivered > 0 {
            // Another operator (before a restart or a failover) counted what this report holds.
            self.last.insert(key, report);
            return;
        }
        for b in &report.backends {
            // Routes are `namespace/name`; a sidecar cannot report on another namespace's routes.
            if !b.route.starts_with(&format!("{ns}/")) {
                continue;
            }
            let before = prev.and_then(|p| p.backends.iter().find(|x| x.route == b.route && x.backend == b.backend));
            let total = self.backends.entry((b.route.clone(), b.backend.clone())).or_insert_with(|| BackendOutcome {
                route: b.route.clone(),
                backend: b.backend.clone(),
                ..BackendOutcome::default()
            });
            let reset = before.is_some_and(|x| x.requests > b.requests);
            let before = before.filter(|_| !reset);
            total.requests += b.requests - before.map_or(0, |x| x.requests);
            for (class, n) in b.errors.iter().filter(|(c, _)| ERROR_CLASSES.contains(&c.as_str())) {
                let was = before.and_then(|x| x.errors.get(class)).copied().unwrap_or(0);
                *total.errors.entry(class.clone()).or_default() += n.saturating_sub(was);
            }
            let empty = Histogram::default();
            total.latency.add(&b.latency.since(before.map_or(&empty, |x| &x.latency)));
            total.first_token.add(&b.first_token.since(before.map_or(&empty, |x| &x.first_token)));
            total.output_blocks += b.output_blocks.saturating_sub(before.map_or(0, |x| x.output_blocks));
        }
        for r in report.routes.iter().filter(|r| r.route.starts_with(&format!("{ns}/"))) {
            let was = prev.and_then(|p| p.routes.iter().find(|x| x.route == r.route)).map_or(0, |x| x.scanner_blocks);
            let was = if was > r.scanner_blocks { 0 } else { was };
            *self.scanner_blocks.entry(r.route.clone()).or_default() += r.scanner_blocks - was;
        }
        self.last.insert(key, report);
    }

    /// Forgets the last reports of pods that are gone (their totals stay).
    pub fn retain_pods(&mut self, keep: impl Fn(&str, &str) -> bool) {
        self.last.retain(|(ns, pod), _| keep(ns, pod));
    }

    /// Each ModelServer's requests (`(namespace, name)`), summed over the backends that name it.
    pub fn server_requests(&self) -> BTreeMap<(&str, &str), u64> {
        let mut out = BTreeMap::new();
        for (key, server) in &self.servers {
            let Some(b) = self.backends.get(key) else { continue };
            *out.entry((split(&key.0).0, server.as_str())).or_default() += b.requests;
        }
        out
    }

    /// Forgets the totals of routes that no longer exist (`namespace/name`).
    pub fn retain_routes(&mut self, keep: impl Fn(&str) -> bool) {
        self.backends.retain(|(route, _), _| keep(route));
        self.scanner_blocks.retain(|route, _| keep(route));
    }
}

/// Serves the totals on `/metrics`.
#[derive(Debug, Clone)]
pub struct TotalsCollector(pub Arc<Mutex<Aggregator>>);

fn split(route: &str) -> (&str, &str) {
    route.split_once('/').unwrap_or(("", route))
}

impl Collector for TotalsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let agg = self.0.lock();
        let mut requests = encoder.encode_descriptor(
            "bulwark_backend_requests",
            "Upstream attempts reported by sidecars, per route and backend",
            None,
            MetricType::Counter,
        )?;
        for b in agg.backends.values() {
            let (ns, route) = split(&b.route);
            let labels = [("namespace", ns), ("route", route), ("backend", b.backend.as_str())];
            ConstCounter::new(b.requests).encode(requests.encode_family(&labels)?)?;
        }
        let mut errors = encoder.encode_descriptor(
            "bulwark_backend_errors",
            "Failed upstream attempts reported by sidecars, by class",
            None,
            MetricType::Counter,
        )?;
        for b in agg.backends.values() {
            let (ns, route) = split(&b.route);
            for (class, n) in b.errors.iter().filter(|(c, _)| ERROR_CLASSES.contains(&c.as_str())) {
                let labels = [("namespace", ns), ("route", route), ("backend", b.backend.as_str()), ("class", class)];
                ConstCounter::new(*n).encode(errors.encode_family(&labels)?)?;
            }
        }
        for (name, help, pick) in [
            (
                "bulwark_backend_latency",
                "Request to end of response, reported by sidecars",
                (|b: &BackendOutcome| &b.latency) as fn(&BackendOutcome) -> &Histogram,
            ),
            (
                "bulwark_backend_time_to_first_token",
                "Request to first byte of the answer, reported by sidecars",
                |b: &BackendOutcome| &b.first_token,
            ),
        ] {
            let mut enc = encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
            for b in agg.backends.values() {
                let (ns, route) = split(&b.route);
                let labels = [("namespace", ns), ("route", route), ("backend", b.backend.as_str())];
                let h = pick(b);
                let bounds = LATENCY_BOUNDS.iter().copied().chain([f64::INFINITY]);
                let buckets: Vec<(f64, u64)> = bounds.zip(h.counts.iter().copied()).collect();
                enc.encode_family(&labels)?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    h.sum,
                    h.count(),
                    &buckets,
                    None,
                )?;
            }
        }
        let mut blocks = encoder.encode_descriptor(
            "bulwark_route_scanner_blocks",
            "Requests and answers blocked by scanners, reported by sidecars",
            None,
            MetricType::Counter,
        )?;
        for (r, n) in &agg.scanner_blocks {
            let (ns, route) = split(r);
            ConstCounter::new(*n).encode(blocks.encode_family(&[("namespace", ns), ("route", route)])?)?;
        }
        let mut served = encoder.encode_descriptor(
            "bulwark_model_server_requests",
            "Upstream attempts reported by sidecars, per ModelServer, over every route that names it",
            None,
            MetricType::Counter,
        )?;
        for ((ns, server), n) in agg.server_requests() {
            ConstCounter::new(n).encode(served.encode_family(&[("namespace", ns), ("model_server", server)])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(instance: &str, requests: u64, errors: u64) -> Report {
        let mut b = BackendOutcome { route: "a/r".into(), backend: "x".into(), requests, ..Default::default() };
        b.errors.insert("5xx".into(), errors);
        (0..requests).for_each(|_| b.latency.observe(0.2));
        Report { instance: instance.into(), version: "v".into(), delivered: 0, backends: vec![b], routes: vec![] }
    }

    #[test]
    fn totals_add_differences_and_survive_restarts() {
        let mut agg = Aggregator::default();
        agg.ingest("a", "p1", report("i1", 10, 1));
        agg.ingest("a", "p1", report("i1", 15, 2));
        agg.ingest("a", "p2", report("j1", 5, 0));
        agg.ingest("a", "p1", report("i2", 3, 0)); // restarted
        let t = &agg.backends[&("a/r".to_owned(), "x".to_owned())];
        assert_eq!((t.requests, t.errors["5xx"], t.latency.count()), (23, 2, 23));
        agg.ingest("b", "intruder", report("k", 100, 100));
        assert_eq!(agg.backends[&("a/r".to_owned(), "x".to_owned())].requests, 23, "other namespaces' routes");
        // A sidecar that reported to an operator before this one: only what it sees from now on.
        agg.ingest("a", "p3", Report { delivered: 4, ..report("m1", 40, 40) });
        agg.ingest("a", "p3", Report { delivered: 5, ..report("m1", 42, 40) });
        assert_eq!(agg.backends[&("a/r".to_owned(), "x".to_owned())].requests, 25, "a baseline, then 2 more");
    }

    #[test]
    fn a_model_servers_requests_add_up_over_the_routes_that_name_it() {
        let agg = Arc::new(Mutex::new(Aggregator::default()));
        let mut other = report("i1", 4, 0);
        other.backends[0].route = "a/s".into();
        other.backends.push(BackendOutcome {
            route: "a/s".into(),
            backend: "openai".into(),
            requests: 9,
            ..Default::default()
        });
        agg.lock().ingest("a", "p1", report("i1", 2, 1));
        agg.lock().ingest("a", "p2", other);
        agg.lock().servers = [(("a/r", "x"), "llama"), (("a/s", "x"), "llama"), (("a/gone", "x"), "llama")]
            .into_iter()
            .map(|((r, b), s)| ((r.to_owned(), b.to_owned()), s.to_owned()))
            .collect();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(TotalsCollector(agg)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains(r#"bulwark_model_server_requests_total{namespace="a",model_server="llama"} 6"#), "{out}");
        assert_eq!(out.matches("bulwark_model_server_requests_total{").count(), 1, "{out}");
    }

    #[test]
    fn totals_are_served_as_metrics() {
        let agg = Arc::new(Mutex::new(Aggregator::default()));
        agg.lock().ingest("a", "p1", report("i1", 2, 1));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(TotalsCollector(agg)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains(r#"bulwark_backend_requests_total{namespace="a",route="r",backend="x"} 2"#), "{out}");
        assert!(!out.contains("bulwark_model_server_requests_total{"), "no backend names a server yet: {out}");
        assert!(out.contains(r#"bulwark_backend_errors_total{namespace="a",route="r",backend="x",class="5xx"} 1"#));
        assert!(
            out.contains(r#"bulwark_backend_latency_seconds_bucket{le="0.25",namespace="a",route="r",backend="x"} 2"#),
            "{out}"
        );
    }
}
