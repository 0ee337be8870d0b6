//! What the fuzz targets share: a policy that redacts, and a way to cut one input into pieces.

use std::sync::Arc;

use bulwark_api::ScannerPolicySpec;
use bulwark_sidecar::scan::{PolicyRuntime, model::ModelHub};

/// Secrets and PII redacted in both directions, 32-character window.
pub fn redacting_policy() -> Arc<PolicyRuntime> {
    let spec: ScannerPolicySpec = serde_yaml::from_str(
        "input:\n- {type: secrets, action: redact}\n- {type: pii, action: redact}\n- {type: invisibleText, action: redact}\n\
         output:\n- {type: secrets, action: redact}\n- {type: pii, action: redact}\nstreaming: {windowChars: 32}",
    )
    .expect("the policy is valid");
    Arc::new(PolicyRuntime::build("fuzz", &spec, &ModelHub::default()).expect("the policy builds"))
}

/// The input after its first byte, cut into pieces whose lengths the first byte picks, so the
/// fuzzer explores how chunk boundaries fall.
pub fn pieces(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let (step, rest) = match data.split_first() {
        Some((b, rest)) => (usize::from(*b % 64) + 1, rest),
        None => (1, data),
    };
    rest.chunks(step)
}
