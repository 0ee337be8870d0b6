//! The output stream guard: any bytes as an SSE stream from an OpenAI or Anthropic upstream, cut
//! into chunks anywhere, scanned and redacted as they stream.

use bulwark_sidecar::{error::Flavor, metrics::Metrics, scan::Restore, scan::stream::OutputGuard};

fn main() {
    // A panic fails the run whatever state it leaves behind.
    let state = std::panic::AssertUnwindSafe((bulwark_fuzz::redacting_policy(), std::sync::Arc::new(Metrics::new())));
    afl::fuzz!(|data: &[u8]| {
        let (policy, metrics) = &*state;
        let flavor = if data.first().is_some_and(|b| b & 0x80 != 0) { Flavor::Anthropic } else { Flavor::OpenAi };
        let mut guard =
            OutputGuard::new(policy.clone(), Restore::default(), flavor, metrics.clone(), "r".into(), "b".into());
        for piece in bulwark_fuzz::pieces(data) {
            if guard.feed(piece).is_err() {
                return;
            }
        }
        let _ = guard.finish();
    });
}
