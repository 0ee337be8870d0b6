//! The transparent listener's sniffer: what a captured connection's first bytes are, for every
//! prefix of any bytes, as they arrive in pieces.

use bulwark_sidecar::transparent::{Sniffed, classify};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let mut seen = 0;
        for piece in bulwark_fuzz::pieces(data) {
            seen += piece.len();
            let prefix = &data[1..=seen];
            if let Some(Sniffed::Http(Some(host)) | Sniffed::Tls(Some(host))) = classify(prefix) {
                assert!(!host.is_empty(), "a decided host has a name");
                break;
            }
        }
    });
}
