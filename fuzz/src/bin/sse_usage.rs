//! The usage reader of relayed streams and of complete answers: any bytes, in any chunks.

use bulwark_sidecar::usage::{SseTracker, from_json};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let mut tracker = SseTracker::default();
        for piece in bulwark_fuzz::pieces(data) {
            tracker.feed(piece);
        }
        let _ = tracker.usage.total();
        let _ = from_json(data).total();
    });
}
