//! `bulwark-operator`: reconciles LLMRoute, ScannerPolicy and ModelRollout resources and
//! programs the sidecars. The controller is not in this release yet; until it is, sidecars run
//! standalone on the same YAML (`bulwark-sidecar --manifests DIR`).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "bulwark-operator: the controller is not in this release yet.\n\
         Run the sidecar standalone on your resources instead: bulwark-sidecar --manifests DIR"
    );
    ExitCode::from(2)
}
