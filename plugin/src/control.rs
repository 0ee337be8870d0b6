//! The controls as status patches: each names the generation and attempt (and for a promote,
//! the step) it is meant for, so the driver acts on it once, and never on a later state. They
//! go to the status subresource, so Argo CD, which compares only `spec`, stays in sync.

use bulwark_api::{
    ModelRollout,
    rollout::{ControlRequest, RolloutPhase, machine},
};
use serde_json::{Value, json};

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
}

/// The merge patch of `status.controls` that asks for `action`, or why it makes no sense now.
pub fn patch(r: &ModelRollout, action: Action) -> Result<Value, String> {
    let name = r.metadata.name.as_deref().unwrap_or_default();
    let status = r.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or(RolloutPhase::Pending);
    let generation = r.metadata.generation.unwrap_or(1);
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
    let controls = match action {
        Action::Promote { .. } if active => {
            let last = machine::steps(&r.spec).len().saturating_sub(1) as u32;
            if request.step >= last {
                return Err(format!("rollout {name} is at its last step already"));
            }
            json!({"promote": request})
        }
        Action::Pause if active => json!({"paused": true}),
        Action::Resume if active => json!({"paused": false}),
        Action::Abort if active => json!({"abort": request}),
        Action::Retry if stopped => json!({"retry": request}),
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
    };
    Ok(json!({"status": {"controls": controls}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(status: &str) -> ModelRollout {
        serde_yaml::from_str(&format!(
            "apiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: up, namespace: a, generation: 3}}\nspec:\n  routeRef: {{name: chat}}\n  stable: {{backend: s}}\n  canary: {{backend: c}}\n  steps: [{{weight: 10}}, {{weight: 50}}, {{weight: 100}}]\nstatus: {status}\n"
        ))
        .unwrap()
    }

    #[test]
    fn each_control_names_the_state_it_is_meant_for() {
        let r = rollout("{observedGeneration: 3, phase: Paused, currentStep: 1, attempt: 2}");
        assert_eq!(
            patch(&r, Action::Promote { full: false }).unwrap(),
            json!({"status": {"controls": {"promote": {"generation": 3, "attempt": 2, "step": 1}}}})
        );
        assert_eq!(patch(&r, Action::Promote { full: true }).unwrap()["status"]["controls"]["promote"]["full"], true);
        assert_eq!(patch(&r, Action::Pause).unwrap(), json!({"status": {"controls": {"paused": true}}}));
        assert_eq!(patch(&r, Action::Resume).unwrap(), json!({"status": {"controls": {"paused": false}}}));
        assert_eq!(patch(&r, Action::Abort).unwrap()["status"]["controls"]["abort"]["attempt"], 2);
    }

    #[test]
    fn a_control_that_makes_no_sense_now_says_why() {
        let done = rollout("{observedGeneration: 3, phase: Succeeded, currentStep: 2, attempt: 1}");
        assert_eq!(
            patch(&done, Action::Abort).unwrap_err(),
            "rollout up is Succeeded; abort applies to a rollout in progress"
        );
        assert_eq!(
            patch(&done, Action::Retry).unwrap_err(),
            "rollout up is Succeeded; only a rolled back, aborted or failed rollout can be retried"
        );
        let back = rollout("{observedGeneration: 3, phase: RolledBack, currentStep: 1, attempt: 1}");
        assert_eq!(patch(&back, Action::Retry).unwrap()["status"]["controls"]["retry"]["generation"], 3);
        let stale = rollout("{observedGeneration: 2, phase: Progressing, currentStep: 1, attempt: 1}");
        assert_eq!(
            patch(&stale, Action::Pause).unwrap_err(),
            "rollout up has not started generation 3 yet; try again in a moment"
        );
        let last = rollout("{observedGeneration: 3, phase: Paused, currentStep: 2, attempt: 1}");
        assert_eq!(
            patch(&last, Action::Promote { full: false }).unwrap_err(),
            "rollout up is at its last step already"
        );
    }
}
