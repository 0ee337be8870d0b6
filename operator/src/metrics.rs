//! The operator's own metrics: reconciles, pushes, writes, connected sidecars, leadership; the
//! sidecars' aggregated outcome reports are added by `reports::TotalsCollector`.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabels {
    pub namespace: String,
    pub rollout: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutPhaseLabels {
    pub namespace: String,
    pub rollout: String,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub namespace: String,
    pub rollout: String,
    pub verdict: &'static str,
}

pub struct Metrics {
    pub registry: parking_lot::Mutex<Registry>,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub push_latency: Histogram,
    pub pushes: Counter,
    pub writes: Family<WriteLabels, Counter>,
    pub connected: Gauge,
    pub reports: Counter,
    pub watch_errors: Counter,
    pub leader: Gauge,
    pub groups: Gauge,
    pub admissions: Family<ResultLabels, Counter>,
    pub rollout_canary_weight: Family<RolloutLabels, Gauge>,
    pub rollout_phase: Family<RolloutPhaseLabels, Gauge>,
    pub rollout_analyses: Family<VerdictLabels, Counter>,
    pub rollout_rollbacks: Family<RolloutLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let reconciles = Family::default();
        r.register("bulwark_operator_reconciles", "Compiles of every group's config, by result", reconciles.clone());
        let reconcile_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        r.register_with_unit(
            "bulwark_operator_reconcile_duration",
            "Time to compile every group's config",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let push_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        r.register_with_unit(
            "bulwark_operator_push_latency",
            "From a watched change to its config being handed to every connected sidecar",
            Unit::Seconds,
            push_latency.clone(),
        );
        let pushes = Counter::default();
        r.register("bulwark_operator_pushes", "Config versions sent to connected sidecars", pushes.clone());
        let writes = Family::default();
        r.register(
            "bulwark_operator_writes",
            "API writes by kind (ConfigMap, status, Event) and result",
            writes.clone(),
        );
        let connected = Gauge::default();
        r.register("bulwark_operator_connected_sidecars", "Sidecars with an open config stream", connected.clone());
        let reports = Counter::default();
        r.register("bulwark_operator_reports", "Outcome reports received from sidecars", reports.clone());
        let watch_errors = Counter::default();
        r.register(
            "bulwark_operator_watch_errors",
            "Watch failures (each is retried with backoff)",
            watch_errors.clone(),
        );
        let leader = Gauge::default();
        r.register("bulwark_operator_leader", "1 while this replica holds the leader lease", leader.clone());
        let groups = Gauge::default();
        r.register("bulwark_operator_groups", "Groups of sidecar pods that share one config", groups.clone());
        let admissions = Family::default();
        r.register(
            "bulwark_operator_admissions",
            "Pod admission reviews answered by the injection webhook: injected, unchanged, invalid",
            admissions.clone(),
        );
        let rollout_canary_weight = Family::default();
        r.register(
            "bulwark_rollout_canary_weight",
            "Percent of the route's traffic a rollout gives its canary now",
            rollout_canary_weight.clone(),
        );
        let rollout_phase = Family::default();
        r.register("bulwark_rollout_phase", "1 for the phase a rollout is in, 0 for the others", rollout_phase.clone());
        let rollout_analyses = Family::default();
        r.register(
            "bulwark_rollout_analyses",
            "Rollout analyses by verdict: Pass, Fail, Inconclusive, Error",
            rollout_analyses.clone(),
        );
        let rollout_rollbacks = Family::default();
        r.register(
            "bulwark_rollout_rollbacks",
            "Rollouts rolled back (or failed) because the canary's signals degraded",
            rollout_rollbacks.clone(),
        );
        Self {
            registry: parking_lot::Mutex::new(r),
            rollout_canary_weight,
            rollout_phase,
            rollout_analyses,
            rollout_rollbacks,
            reconciles,
            reconcile_duration,
            push_latency,
            pushes,
            writes,
            connected,
            reports,
            watch_errors,
            leader,
            groups,
            admissions,
        }
    }

    pub fn write(&self, kind: &'static str, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.writes.get_or_create(&WriteLabels { kind, result }).inc();
    }

    /// A rollout's phase and weight as its driver holds them.
    pub fn rollout(&self, ns: &str, name: &str, phase: bulwark_api::rollout::RolloutPhase, weight: u32) {
        let l = RolloutLabels { namespace: ns.to_owned(), rollout: name.to_owned() };
        self.rollout_canary_weight.get_or_create(&l).set(i64::from(weight));
        for p in bulwark_api::rollout::RolloutPhase::ALL {
            let l = RolloutPhaseLabels { namespace: ns.to_owned(), rollout: name.to_owned(), phase: p.as_str() };
            self.rollout_phase.get_or_create(&l).set(i64::from(p == phase));
        }
    }

    /// A rollout that is gone, or no longer driven here.
    pub fn forget_rollout(&self, ns: &str, name: &str) {
        self.rollout_canary_weight.remove(&RolloutLabels { namespace: ns.to_owned(), rollout: name.to_owned() });
        for p in bulwark_api::rollout::RolloutPhase::ALL {
            let l = RolloutPhaseLabels { namespace: ns.to_owned(), rollout: name.to_owned(), phase: p.as_str() };
            self.rollout_phase.remove(&l);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry.lock());
        out
    }
}
