//! The request reader, the shape check and the text slots the scanners read, then input
//! scanning with redaction: any bytes as the body of any API.

use bulwark_sidecar::{
    request::{self, Api, Limits},
    scan::{Direction, text},
};

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
    // A panic fails the run whatever state it leaves behind.
    let state =
        std::panic::AssertUnwindSafe((rt, bulwark_fuzz::redacting_policy(), bulwark_sidecar::metrics::Metrics::new()));
    let limits = Limits::default();
    afl::fuzz!(|data: &[u8]| {
        let (rt, policy, metrics) = &*state;
        let Some((which, body)) = data.split_first() else { return };
        let api = [Api::ChatCompletions, Api::Messages, Api::Completions, Api::Embeddings][usize::from(*which % 4)];
        let read = request::read(
            &http::Method::POST,
            api.path(),
            http::HeaderMap::new(),
            http_body_util::Full::new(bytes::Bytes::copy_from_slice(body)),
            &limits,
        );
        let Ok(mut req) = rt.block_on(read) else { return };
        let _ = bulwark_sidecar::shape::unscannable(req.api, &req.body);
        let _ = req.prompt_chars();
        let arguments = text::ToolArguments::parse(req.api, &mut req.body);
        let mut texts = text::request_texts(req.api, &mut req.body);
        let ctx = bulwark_sidecar::scan::Ctx { metrics, route: "fuzz", backend: None, mirrored: false };
        let _ = bulwark_sidecar::scan::run_with(
            policy,
            Direction::Input,
            &mut texts,
            &ctx,
            bulwark_sidecar::scan::Pass::All,
        );
        arguments.put_back(req.api, &mut req.body);
        // What is forwarded must still be JSON.
        serde_json::to_vec(&req.body).expect("a request body serializes");
    });
}
