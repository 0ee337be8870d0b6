//! The controls as status patches (`bulwark_api::rollout::control` says what each sets, and
//! when it makes no sense). They go to the status subresource, so Argo CD, which compares only
//! `spec`, stays in sync.

use bulwark_api::{
    ModelRollout,
    rollout::control::{self, Action},
};
use serde_json::{Value, json};

/// The merge patch of `status.controls` that asks for `action`, or why it makes no sense now.
pub fn patch(r: &ModelRollout, action: Action) -> Result<Value, String> {
    let name = r.metadata.name.as_deref().unwrap_or_default();
    let status = r.status.clone().unwrap_or_default();
    let generation = r.metadata.generation.unwrap_or(1);
    let controls = control::request(name, &r.spec, generation, &status, action)?;
    let controls = serde_json::to_value(controls).map_err(|e| e.to_string())?;
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
            json!({"status": {"controls": {"promote": {"generation": 3, "attempt": 2, "step": 1, "full": false}}}}),
            "full is always written, so a merge patch clears an earlier promote --full"
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
