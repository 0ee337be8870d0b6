//! An AdmissionReview as the injection webhook decodes it, with a namespace's defaults.

use std::collections::BTreeSet;

use bulwark_operator::inject::{self, Injection};

fn main() {
    let injection = Injection {
        image: "bulwark-sidecar:fuzz".into(),
        stream_url: "https://bulwark-operator.bulwark-system.svc:15010".into(),
        ca: None,
        audience: "bulwark".into(),
        tls_interception: true,
        model_public_key: Some("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA+c4Nvy+oHXjLZihwBKPQt2Ey04wIun92XRksiNSXZ/E=\n-----END PUBLIC KEY-----\n".into()),
    };
    let defaults = [(inject::PROXY_MODE_ANNOTATION.to_owned(), "transparent".to_owned())].into();
    afl::fuzz!(|data: &[u8]| {
        let Ok(mut review) = serde_json::from_slice::<serde_json::Value>(data) else { return };
        if inject::injects(&review).is_some() {
            inject::inherit(&mut review, &defaults);
        }
        let _ = inject::needs_ca(&review, &injection);
        let keys: BTreeSet<(String, String)> = [("openai".to_owned(), "api-key".to_owned())].into();
        let _ = inject::review(&review, &injection, |_, _| keys.clone());
    });
}
