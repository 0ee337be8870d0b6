//! A sidecar's outcome report as the operator decodes and aggregates it.

use bulwark_api::control::Report;
use bulwark_operator::reports::Aggregator;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(report) = serde_json::from_slice::<Report>(data) else { return };
        let mut totals = Aggregator::default();
        totals.ingest("default", "pod", report.clone());
        totals.ingest("default", "pod", report);
    });
}
