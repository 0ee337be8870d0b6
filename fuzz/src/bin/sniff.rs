//! The transparent listener's sniffer and the passthrough framing: what a captured connection's
//! first bytes are, for every prefix of any bytes, as they arrive in pieces; and where a
//! passed-through request's head and body end, which must not depend on how the bytes arrive.

use bulwark_sidecar::{
    passthrough::{Body, Framing, Kind, Then, request_head, response_head},
    transparent::{Sniffed, classify},
};

/// How many of `bytes` a body of `framing` takes when they come in `pieces`, or where its
/// framing breaks.
fn taken<'a>(framing: Framing, pieces: impl Iterator<Item = &'a [u8]>) -> Result<usize, usize> {
    let mut body = Body::new(framing);
    let mut used = 0;
    for piece in pieces {
        let n = body.feed(piece).map_err(|_| used)?;
        assert!(n <= piece.len(), "a body takes no more than it is given");
        used += n;
        if body.done() {
            break;
        }
        assert_eq!(n, piece.len(), "a body not done takes all it is given");
    }
    Ok(used)
}

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
        let Some(bytes) = data.get(1..) else { return };
        if let Ok(Some(head)) = request_head(bytes) {
            assert!(head.len <= bytes.len() && head.body != Framing::UntilClose, "{head:?}");
            let rest = &bytes[head.len..];
            let whole = taken(head.body, std::iter::once(rest));
            let pieced = taken(head.body, rest.chunks(usize::from(data[0] % 7) + 1));
            assert_eq!(whole.ok(), pieced.ok(), "a body ends where it ends, however it arrives");
        }
        for kind in [Kind::Plain, Kind::Head, Kind::Connect] {
            if let Ok(Some(head)) = response_head(bytes, kind) {
                assert!(head.len <= bytes.len());
                if let Then::Body(framing) = head.then {
                    let rest = &bytes[head.len..];
                    let (whole, pieced) = (taken(framing, std::iter::once(rest)), taken(framing, rest.chunks(3)));
                    assert_eq!(whole.ok(), pieced.ok());
                }
            }
        }
    });
}
