//! The user's controls of a rollout: promote (or `full`), pause, resume, abort and retry, as the
//! fields of `status.controls` they set. Each request names the generation and attempt (and for
//! a promote, the step) it is meant for, so the driver acts on it once and never on a later
//! state. Every caller (the kubectl plugin, a standalone sidecar's admin API) goes through here.

use super::{ControlRequest, Controls, ModelRolloutSpec, ModelRolloutStatus, RolloutPhase, machine};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Promote { full: bool },
    Pause,
    Resume,
    Abort,
    Retry,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Self::Promote { full: true } => "promote --full",
            Self::Promote { full: false } => "promote",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Abort => "abort",
            Self::Retry => "retry",
        }
    }

    /// `promote`, `pause`, `resume`, `abort` or `retry`.
    pub fn parse(s: &str, full: bool) -> Result<Self, String> {
        Ok(match s {
            "promote" => Self::Promote { full },
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "abort" => Self::Abort,
            "retry" => Self::Retry,
            other => return Err(format!("unknown action {other:?}; use promote, pause, resume, abort or retry")),
        })
    }
}

impl Controls {
    /// Takes the requests `newer` sets; the others stay.
    pub fn merge(&mut self, newer: Controls) {
        if newer.paused.is_some() {
            self.paused = newer.paused;
        }
        for (mine, theirs) in
            [(&mut self.promote, newer.promote), (&mut self.abort, newer.abort), (&mut self.retry, newer.retry)]
        {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
    }
}

/// The controls that ask rollout `name` (at `generation`, in state `status`) for `action`, or
/// why that makes no sense now.
pub fn request(
    name: &str,
    spec: &ModelRolloutSpec,
    generation: i64,
    status: &ModelRolloutStatus,
    action: Action,
) -> Result<Controls, String> {
    let phase = status.phase.unwrap_or(RolloutPhase::Pending);
    if status.observed_generation.is_some_and(|g| g != generation) || status.phase.is_none() {
        return Err(format!("rollout {name} has not started generation {generation} yet; try again in a moment"));
    }
    let request = ControlRequest {
        generation,
        attempt: status.attempt.unwrap_or(1),
        step: status.current_step.unwrap_or(0),
        full: matches!(action, Action::Promote { full: true }),
    };
    let active = phase.is_active();
    let stopped = matches!(phase, RolloutPhase::RolledBack | RolloutPhase::Aborted | RolloutPhase::Failed);
    let set = Controls::default();
    Ok(match action {
        Action::Promote { .. } if active => {
            let last = machine::steps(spec).len().saturating_sub(1) as u32;
            if request.step >= last {
                return Err(format!("rollout {name} is at its last step already"));
            }
            Controls { promote: Some(request), ..set }
        }
        Action::Pause if active => Controls { paused: Some(true), ..set },
        Action::Resume if active => Controls { paused: Some(false), ..set },
        Action::Abort if active => Controls { abort: Some(request), ..set },
        Action::Retry if stopped => Controls { retry: Some(request), ..set },
        Action::Retry => {
            return Err(format!(
                "rollout {name} is {}; only a rolled back, aborted or failed rollout can be retried",
                phase.as_str()
            ));
        }
        _ => {
            return Err(format!(
                "rollout {name} is {}; {} applies to a rollout in progress",
                phase.as_str(),
                action.name()
            ));
        }
    })
}
