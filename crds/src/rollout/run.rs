//! One driven rollout: its status and the outcome series of its stable and canary, ticked by a
//! driver with the cumulative outcomes it sees. The whole per-tick procedure (record, judge
//! when due, advance) lives here, so the operator and a standalone sidecar run the same code.

use k8s_openapi::jiff::Timestamp;

use super::{
    AnalysisResult, Controls, ModelRolloutSpec, ModelRolloutStatus,
    analysis::{self, Measured},
    machine::{self, Tick, Transition},
    series::Series,
};
use crate::control::BackendOutcome;

#[derive(Clone, Debug)]
pub struct Run {
    pub status: ModelRolloutStatus,
    generation: i64,
    canary: Series,
    stable: Series,
}

impl Run {
    /// Resumes `written` when it is this generation's, or starts the rollout over.
    pub fn resume(
        spec: &ModelRolloutSpec,
        generation: i64,
        written: Option<&ModelRolloutStatus>,
        now: Timestamp,
    ) -> (Self, Option<Transition>) {
        let (status, t) = machine::resume(spec, generation, written, now);
        let keep = spec.analysis.window.as_std() + spec.analysis.interval.as_std();
        (Self { status, generation, canary: Series::new(keep), stable: Series::new(keep) }, t)
    }

    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// Records the cumulative outcomes of the canary and the stable as seen now.
    pub fn record(&mut self, now: Timestamp, canary: &BackendOutcome, stable: &BackendOutcome) {
        self.canary.record(now, canary);
        self.stable.record(now, stable);
    }

    /// Whether an analysis is due now.
    pub fn due(&self, spec: &ModelRolloutSpec, now: Timestamp) -> bool {
        machine::analysis_due(spec, &self.status, now)
    }

    /// The signals of the canary and of the stable in the window ending now, from the recorded
    /// outcomes.
    pub fn measure(&self, spec: &ModelRolloutSpec, now: Timestamp) -> (Measured, Measured) {
        let from = machine::window_start(spec, &self.status, now);
        let a = &spec.analysis;
        (Measured::of(a, &self.canary.since(from)), Measured::of(a, &self.stable.since(from)))
    }

    /// The analysis of the window ending now, from the recorded outcomes.
    pub fn judge(&self, spec: &ModelRolloutSpec, now: Timestamp) -> AnalysisResult {
        let (canary, stable) = self.measure(spec, now);
        analysis::judge_measured(&spec.analysis, &canary, &stable, machine::stamp(now))
    }

    /// One tick on the recorded outcomes: judges the window when an analysis is due, then
    /// advances. A new generation starts over.
    pub fn tick(
        &mut self,
        spec: &ModelRolloutSpec,
        generation: i64,
        now: Timestamp,
        controls: Option<&Controls>,
    ) -> Option<Transition> {
        if generation != self.generation {
            let (fresh, t) = Self::resume(spec, generation, None, now);
            *self = fresh;
            return t;
        }
        let analysis = self.due(spec, now).then(|| self.judge(spec, now));
        self.apply(spec, now, controls, analysis)
    }

    /// Advances with an analysis from elsewhere (a Prometheus query), or none.
    pub fn apply(
        &mut self,
        spec: &ModelRolloutSpec,
        now: Timestamp,
        controls: Option<&Controls>,
        analysis: Option<AnalysisResult>,
    ) -> Option<Transition> {
        let tick = Tick { now, generation: self.generation, controls, analysis };
        let (status, t) = machine::advance(spec, &self.status, tick);
        self.status = status;
        t
    }
}
