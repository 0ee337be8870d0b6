//! The rollout state machine, pure: the spec, the status as last written, the time, the user's
//! controls and (when one was due) an analysis go in; the next status comes out, with the
//! transition worth an Event. Both drivers call it: the operator's leader and a standalone
//! sidecar. It owns the driver's fields of the status and never touches the others.

use k8s_openapi::jiff::{SignedDuration, Timestamp, Unit};

use super::{
    AnalysisResult, ControlRequest, Controls, ModelRolloutSpec, ModelRolloutStatus, RolloutPhase, Strategy, Verdict,
};
use crate::Duration;

/// A step as the machine runs it; a blueGreen rollout is a preview step and a switch.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub weight: u32,
    pub pause: Option<Duration>,
    pub mirror: Option<u32>,
    /// Requests carrying this header and value go to the canary.
    pub preview: Option<(String, String)>,
}

pub fn steps(spec: &ModelRolloutSpec) -> Vec<Planned> {
    match spec.strategy {
        Strategy::Canary => spec
            .steps
            .iter()
            .map(|s| Planned { weight: s.weight.min(100), pause: s.pause, mirror: s.mirror, preview: None })
            .collect(),
        Strategy::BlueGreen => {
            let p = spec.preview.clone().unwrap_or_default();
            vec![
                Planned { weight: 0, pause: p.pause, mirror: p.mirror, preview: Some((p.header, p.value)) },
                Planned { weight: 100, pause: None, mirror: None, preview: None },
            ]
        }
    }
}

/// What the sidecars do for a rollout in this state: the canary's share, and while the
/// rollout runs, its step's mirror and preview.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Traffic {
    pub canary_weight: u32,
    pub mirror: Option<u32>,
    pub preview: Option<(String, String)>,
}

pub fn traffic(spec: &ModelRolloutSpec, status: Option<&ModelRolloutStatus>) -> Traffic {
    let Some(s) = status else { return Traffic::default() };
    let canary_weight = s.canary_weight.unwrap_or(0).min(100);
    let step = s
        .phase
        .filter(|p| p.is_active())
        .and_then(|_| steps(spec).into_iter().nth(s.current_step.unwrap_or(0) as usize));
    match step {
        Some(step) => Traffic { canary_weight, mirror: step.mirror.filter(|m| *m > 0), preview: step.preview },
        None => Traffic { canary_weight, ..Traffic::default() },
    }
}

/// A change worth an Event: a new phase, or a new step.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub phase: RolloutPhase,
    /// `Started`, `StepAdvanced`, `Promoted`, `Paused`, `Resumed`, `Succeeded`, `RolledBack`,
    /// `Aborted`, `Failed`, `Retried`.
    pub reason: &'static str,
    pub message: String,
}

/// What the driver knows at one tick.
#[derive(Clone, Debug)]
pub struct Tick<'a> {
    pub now: Timestamp,
    pub generation: i64,
    pub controls: Option<&'a Controls>,
    /// Present when an analysis was due (see [`analysis_due`]) and ran.
    pub analysis: Option<AnalysisResult>,
}

/// RFC 3339 with milliseconds, as the status stores times.
pub fn stamp(t: Timestamp) -> String {
    t.round(Unit::Millisecond).unwrap_or(t).to_string()
}

fn parse(s: Option<&String>) -> Option<Timestamp> {
    s.and_then(|s| s.parse().ok())
}

/// The status of `generation`: the one written, when it is this generation's; otherwise a
/// fresh start at the first step. After a restart or a failover the driver resumes here, in
/// the same step, with the same start time and failure count.
pub fn resume(
    spec: &ModelRolloutSpec,
    generation: i64,
    status: Option<&ModelRolloutStatus>,
    now: Timestamp,
) -> (ModelRolloutStatus, Option<Transition>) {
    match status {
        Some(s) if s.observed_generation == Some(generation) && s.phase.is_some_and(|p| p != RolloutPhase::Pending) => {
            (driver_fields(s), None)
        }
        _ => start(spec, generation, 1, now, "Started"),
    }
}

/// The fields the driver owns, and nothing else.
pub fn driver_fields(s: &ModelRolloutStatus) -> ModelRolloutStatus {
    ModelRolloutStatus {
        observed_generation: s.observed_generation,
        phase: s.phase,
        current_step: s.current_step,
        canary_weight: s.canary_weight,
        step_started_at: s.step_started_at.clone(),
        started_at: s.started_at.clone(),
        attempt: s.attempt,
        failed_analyses: s.failed_analyses,
        message: s.message.clone(),
        last_analysis: s.last_analysis.clone(),
        ..ModelRolloutStatus::default()
    }
}

/// The status of a rollout that cannot run (invalid, or its route or backends are missing).
pub fn pending(generation: i64, why: &str) -> ModelRolloutStatus {
    ModelRolloutStatus {
        observed_generation: Some(generation),
        phase: Some(RolloutPhase::Pending),
        canary_weight: Some(0),
        message: Some(why.to_owned()),
        ..ModelRolloutStatus::default()
    }
}

fn start(
    spec: &ModelRolloutSpec,
    generation: i64,
    attempt: u32,
    now: Timestamp,
    reason: &'static str,
) -> (ModelRolloutStatus, Option<Transition>) {
    let mut s = ModelRolloutStatus {
        observed_generation: Some(generation),
        phase: Some(RolloutPhase::Progressing),
        attempt: Some(attempt),
        started_at: Some(stamp(now)),
        failed_analyses: Some(0),
        ..ModelRolloutStatus::default()
    };
    let plan = steps(spec);
    go_to(&mut s, &plan, 0, now);
    settle_phase(&mut s, &plan, false);
    let phase = s.phase.unwrap_or(RolloutPhase::Progressing);
    let reason = if phase == RolloutPhase::Succeeded { "Succeeded" } else { reason };
    let message = s.message.clone().unwrap_or_default();
    (s, Some(Transition { phase, reason, message }))
}

/// Whether an analysis is due: the rollout runs, and `interval` has passed since the last
/// analysis of this attempt (or since it began: the first one waits for an interval of data).
pub fn analysis_due(spec: &ModelRolloutSpec, s: &ModelRolloutStatus, now: Timestamp) -> bool {
    if !s.phase.is_some_and(RolloutPhase::is_active) {
        return false;
    }
    let started = parse(s.started_at.as_ref());
    let last = s.last_analysis.as_ref().and_then(|a| a.at.parse::<Timestamp>().ok());
    match last.max(started) {
        Some(t) => now >= add(t, spec.analysis.interval),
        None => true,
    }
}

/// Where the analysis window starts: `window` ago, but never before this attempt began, so a
/// retry or a new generation is not judged on what happened before it.
pub fn window_start(spec: &ModelRolloutSpec, s: &ModelRolloutStatus, now: Timestamp) -> Timestamp {
    let from = sub(now, spec.analysis.window);
    parse(s.started_at.as_ref()).map_or(from, |started| from.max(started))
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d.as_std()).unwrap_or(SignedDuration::MAX)).unwrap_or(Timestamp::MAX)
}

fn sub(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_sub(SignedDuration::try_from(d.as_std()).unwrap_or(SignedDuration::MAX)).unwrap_or(Timestamp::MIN)
}

/// One step of the machine.
pub fn advance(
    spec: &ModelRolloutSpec,
    prev: &ModelRolloutStatus,
    tick: Tick<'_>,
) -> (ModelRolloutStatus, Option<Transition>) {
    let plan = steps(spec);
    let mut s = driver_fields(prev);
    let phase = s.phase.unwrap_or(RolloutPhase::Pending);
    let attempt = s.attempt.unwrap_or(1);
    let now = tick.now;
    let controls = tick.controls.cloned().unwrap_or_default();
    let meant = |r: &Option<ControlRequest>| {
        r.as_ref().filter(|r| r.generation == tick.generation && r.attempt == attempt).cloned()
    };

    if !phase.is_active() {
        let stopped = matches!(phase, RolloutPhase::RolledBack | RolloutPhase::Aborted | RolloutPhase::Failed);
        if stopped && meant(&controls.retry).is_some() {
            return start(spec, tick.generation, attempt + 1, now, "Retried");
        }
        return (s, None);
    }
    let at = step_name(&s, &plan);
    if meant(&controls.abort).is_some() {
        let message = format!("aborted at {at}; the canary gets no traffic until a retry or a new spec");
        return stop(s, RolloutPhase::Aborted, "Aborted", message);
    }
    if let Some(a) = tick.analysis {
        let verdict = a.verdict;
        let summary = a.message.clone();
        let requests = a.canary_requests;
        s.last_analysis = Some(a);
        let failed = s.failed_analyses.unwrap_or(0);
        match verdict {
            Verdict::Pass => s.failed_analyses = Some(0),
            Verdict::Inconclusive => {}
            Verdict::Fail | Verdict::Error => {
                let failed = failed + 1;
                s.failed_analyses = Some(failed);
                if failed >= spec.analysis.failure_limit.max(1) {
                    return if verdict == Verdict::Fail {
                        let message = format!("rolled back at {at}: {summary} over {requests} canary requests");
                        stop(s, RolloutPhase::RolledBack, "RolledBack", message)
                    } else {
                        let message = format!("failed at {at}: the signals could not be read: {summary}");
                        stop(s, RolloutPhase::Failed, "Failed", message)
                    };
                }
            }
        }
    }

    let current = (s.current_step.unwrap_or(0) as usize).min(plan.len().saturating_sub(1));
    let paused_by_user = controls.paused == Some(true);
    let mut reason = None;
    let Some(step) = plan.get(current) else { return (s, None) };
    if let Some(p) = meant(&controls.promote).filter(|p| p.step as usize == current) {
        let target = if p.full { plan.len().saturating_sub(1) } else { current + 1 };
        go_to(&mut s, &plan, target, now);
        reason = Some("Promoted");
    } else if !paused_by_user && holds_until_passed(step, &s, now) {
        go_to(&mut s, &plan, current + 1, now);
        reason = Some("StepAdvanced");
    }
    settle_phase(&mut s, &plan, paused_by_user);
    let new_phase = s.phase.unwrap_or(phase);
    let reason = match (new_phase, reason) {
        (RolloutPhase::Succeeded, _) => Some("Succeeded"),
        (_, Some(r)) => Some(r),
        (RolloutPhase::Paused, None) if phase != RolloutPhase::Paused => Some("Paused"),
        (RolloutPhase::Progressing, None) if phase == RolloutPhase::Paused => Some("Resumed"),
        _ => None,
    };
    let transition =
        reason.map(|reason| Transition { phase: new_phase, reason, message: s.message.clone().unwrap_or_default() });
    (s, transition)
}

/// The step's pause is over and an analysis since the step began passed.
fn holds_until_passed(step: &Planned, s: &ModelRolloutStatus, now: Timestamp) -> bool {
    let (Some(pause), Some(started)) = (step.pause, parse(s.step_started_at.as_ref())) else { return false };
    let passed_since = s.last_analysis.as_ref().filter(|a| a.verdict == Verdict::Pass).and_then(|a| a.at.parse().ok());
    // Strictly after: the analysis that ended the step before has the same time as this start.
    now >= add(started, pause) && passed_since.is_some_and(|t: Timestamp| t > started)
}

fn go_to(s: &mut ModelRolloutStatus, plan: &[Planned], step: usize, now: Timestamp) {
    let step = step.min(plan.len().saturating_sub(1));
    s.current_step = Some(step as u32);
    s.canary_weight = Some(plan.get(step).map_or(0, |p| p.weight));
    s.step_started_at = Some(stamp(now));
}

/// The phase and message of a running rollout after its step is settled.
fn settle_phase(s: &mut ModelRolloutStatus, plan: &[Planned], paused_by_user: bool) {
    let current = s.current_step.unwrap_or(0) as usize;
    let at = step_name(s, plan);
    let weight = s.canary_weight.unwrap_or(0);
    let Some(step) = plan.get(current) else { return };
    let (phase, message) = if current + 1 >= plan.len() {
        (RolloutPhase::Succeeded, format!("all {} steps done: the canary serves {weight}%", plan.len()))
    } else if paused_by_user {
        (RolloutPhase::Paused, format!("paused at {at}; resume to continue (analysis goes on)"))
    } else if step.pause.is_none() {
        (RolloutPhase::Paused, format!("{at}: waiting for a promote (analysis goes on)"))
    } else {
        let pause = step.pause.map(|p| p.to_string()).unwrap_or_default();
        let waiting = s.last_analysis.as_ref().filter(|a| a.verdict != Verdict::Pass).map(|a| a.message.clone());
        let message = match waiting.filter(|m| !m.is_empty()) {
            Some(why) => format!("{at}: holds {pause} while analysis passes; last analysis: {why}"),
            None => format!("{at}: holds {pause} while analysis passes"),
        };
        (RolloutPhase::Progressing, message)
    };
    s.phase = Some(phase);
    s.message = Some(message);
}

/// `step 2 of 4 (canary at 25%)`, or for blueGreen `the preview` / `the switch`.
fn step_name(s: &ModelRolloutStatus, plan: &[Planned]) -> String {
    let current = s.current_step.unwrap_or(0) as usize;
    let weight = s.canary_weight.unwrap_or(0);
    match plan.get(current).and_then(|p| p.preview.as_ref()) {
        Some((header, value)) => format!("the preview (requests with {header}: {value} go to the canary)"),
        None => format!("step {} of {} (canary at {weight}%)", current + 1, plan.len()),
    }
}

fn stop(
    mut s: ModelRolloutStatus,
    phase: RolloutPhase,
    reason: &'static str,
    message: String,
) -> (ModelRolloutStatus, Option<Transition>) {
    s.phase = Some(phase);
    s.canary_weight = Some(0);
    s.message = Some(message.clone());
    (s, Some(Transition { phase, reason, message }))
}

/// The driver's condition, `Progressing`: True while steps run or hold, False once the
/// rollout ended, with the phase as its reason and the status message.
pub fn condition(s: &ModelRolloutStatus) -> (&'static str, &'static str, String) {
    let phase = s.phase.unwrap_or(RolloutPhase::Pending);
    let status = if phase.is_active() { "True" } else { "False" };
    (status, phase.as_str(), s.message.clone().unwrap_or_default())
}
