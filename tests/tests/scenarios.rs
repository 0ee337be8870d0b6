//! Scenarios through a real sidecar in-process and mock providers on ephemeral ports:
//! start the mocks, start the sidecar on a directory of YAML, send, assert.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bulwark_sidecar::Sidecar;
use bulwark_tests::{
    client::Client,
    cluster::eventually,
    exposition::sum,
    harness::{self, Harness},
    mock::{Behavior, MockProvider},
};
use serde_json::{Value, json};

/// A sidecar on a directory holding `yaml`, reloading every 50 ms, with a 64 KiB body limit.
struct Env(Harness);

impl std::ops::Deref for Env {
    type Target = Harness;
    fn deref(&self) -> &Harness {
        &self.0
    }
}

impl Env {
    async fn start(yaml: &str) -> Self {
        let h = Harness::start("bulwark-scenario", yaml, |opts| {
            opts.reload_interval = Duration::from_millis(50);
            opts.limits.max_body_bytes = 64 * 1024;
        });
        Self(h.await.expect("sidecar starts"))
    }

    async fn metrics(&self) -> String {
        self.0.metrics().await.unwrap()
    }

    async fn reload(&self, yaml: &str) -> bool {
        self.0.reload(yaml).await.unwrap()
    }

    async fn shutdown(self) {
        self.0.sidecar.shutdown().await;
    }
}

fn route(rule: &str) -> String {
    format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: chat, namespace: team-a}}\nspec:\n{rule}"
    )
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]})
}

fn chat_stream(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hello there"}]})
}

const LONG: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_chat_completion_is_proxied_with_model_rewrite_and_the_backend_key() {
    let mock = MockProvider::start().await;
    let key = std::env::temp_dir().join(format!("bulwark-key-{}", std::process::id()));
    std::fs::write(&key, "sk-from-file\n").unwrap();
    let env = Env::start(&route(&format!(
        "  rules:\n  - match: {{models: [\"gpt-*\"]}}\n    backends: [{{name: primary, url: '{}', model: served-model, credentials: {{file: '{}'}}}}]\n",
        mock.url(),
        key.display()
    )))
    .await;
    let r = env
        .client
        .post("/v1/chat/completions", &chat("gpt-4o"), &[("authorization", "Bearer client-key")])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "chat.completion");
    assert_eq!(r.header("x-bulwark-backend"), Some("primary"));
    assert_eq!(r.header("x-bulwark-route"), Some("team-a/chat"));
    let seen = &mock.recorded()[0];
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.body["model"], "served-model", "model rewritten for the backend");
    assert_eq!(seen.headers["authorization"], "Bearer sk-from-file", "the backend's key replaces the client's");
    let m = env.metrics().await;
    assert_eq!(
        sum(&m, "bulwark_requests_total", &["backend=\"primary\"", "status_class=\"2xx\"", "model=\"served-model\""]),
        1.0
    );
    assert_eq!(sum(&m, "gen_ai_client_token_usage_sum", &["gen_ai_token_type=\"output\""]), 5.0);
    assert_eq!(sum(&m, "gen_ai_client_token_usage_sum", &["gen_ai_token_type=\"input\""]), 2.0);
    assert!(m.contains("gen_ai_server_time_to_first_token_seconds_bucket"));
    assert!(!m.contains("sk-from-file"));
    let config = env.admin.get("/config").await.unwrap().text();
    assert!(
        config.contains("served-model") && !config.contains("sk-from-file"),
        "/config names where the key is, not the key"
    );
    env.shutdown().await;
}

#[tokio::test]
async fn streamed_chunks_reach_the_client_as_they_arrive() {
    let mock = MockProvider::start_with("slow", 6, Duration::from_millis(80), "127.0.0.1:0".parse().unwrap()).await;
    let env = Env::start(&route(&format!("  rules:\n  - backends: [{{name: a, url: '{}'}}]\n", mock.url()))).await;
    let started = tokio::time::Instant::now();
    let resp = env.client.stream("/v1/chat/completions", &chat_stream("m"), &[], LONG).await.unwrap();
    let total = started.elapsed();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.headers["content-type"], "text/event-stream");
    assert!(resp.error.is_none(), "{:?}", resp.error);
    assert!(resp.chunks.len() >= 6, "relayed chunk by chunk, got {} chunks", resp.chunks.len());
    assert!(resp.text().ends_with("data: [DONE]\n\n"));
    assert!(total >= Duration::from_millis(400), "the mock paced the stream");
    let m = env.metrics().await;
    assert_eq!(sum(&m, "bulwark_requests_total", &["status_class=\"2xx\""]), 1.0);
    assert_eq!(
        sum(&m, "gen_ai_client_token_usage_sum", &["gen_ai_token_type=\"output\""]),
        6.0,
        "counted from the stream"
    );
    env.shutdown().await;
}

#[tokio::test]
async fn the_first_chunk_is_not_held_back() {
    let mock = MockProvider::start_with("slow", 4, Duration::from_millis(300), "127.0.0.1:0".parse().unwrap()).await;
    let env = Env::start(&route(&format!("  rules:\n  - backends: [{{name: a, url: '{}'}}]\n", mock.url()))).await;
    // Read only the first chunk, with a deadline well below the stream's 1.2 s length.
    let resp =
        env.client.stream("/v1/chat/completions", &chat_stream("m"), &[], Duration::from_millis(500)).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.error.as_deref(), Some("timed out"));
    assert!(resp.text().contains("w0"), "the first chunk arrived before the deadline: {:?}", resp.text());
    assert!(!resp.text().contains("w3"));
    env.shutdown().await;
}

#[tokio::test]
async fn anthropic_messages_streamed_and_not() {
    let mock = MockProvider::start().await;
    let env = Env::start(&route(&format!(
        "  rules:\n  - match: {{paths: [/v1/messages]}}\n    backends: [{{name: claude, provider: anthropic, url: '{}'}}]\n",
        mock.url()
    )))
    .await;
    let body = json!({"model": "claude-x", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]});
    let r = env.client.post("/v1/messages", &body, &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["type"], "message");
    assert_eq!(mock.recorded()[0].headers["anthropic-version"], "2023-06-01");
    let mut s = body.clone();
    s["stream"] = json!(true);
    let r = env.client.stream("/v1/messages", &s, &[], LONG).await.unwrap();
    assert!(r.text().contains("event: message_stop") && r.error.is_none());
    let m = env.metrics().await;
    assert_eq!(sum(&m, "gen_ai_client_token_usage_sum", &["gen_ai_token_type=\"output\""]), 10.0, "5 + 5 from both");
    // An OpenAI path on this route has no backend that speaks it.
    let r = env.client.post("/v1/chat/completions", &chat("claude-x"), &[]).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    // Errors on the Anthropic path come in Anthropic's shape.
    let r = env.client.raw(http::Method::POST, "/v1/messages", "{", &[]).await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    env.shutdown().await;
}

#[tokio::test]
async fn retries_with_backoff_then_succeeds() {
    let mock = MockProvider::start().await;
    mock.script([Behavior::Status(503, None), Behavior::Status(500, None)]);
    let env = Env::start(&route(&format!(
        "  rules:\n  - backends: [{{name: a, url: '{}'}}]\n    retry: {{attempts: 2, backoff: {{base: 10ms, max: 50ms}}}}\n",
        mock.url()
    )))
    .await;
    let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(mock.calls(), 3);
    assert_eq!(sum(&env.metrics().await, "bulwark_retries_total", &["backend=\"a\""]), 2.0);
    env.shutdown().await;
}

fn two_backends(primary: &MockProvider, secondary: &MockProvider, extra: &str) -> String {
    route(&format!(
        "  backends: [{{name: backup, url: '{}'}}]\n  rules:\n  - backends: [{{name: primary, url: '{}'}}]\n    fallback: [{{backend: backup}}]\n{extra}",
        secondary.url(),
        primary.url()
    ))
}

#[tokio::test]
async fn falls_back_before_the_first_byte() {
    let (primary, backup) = (MockProvider::start().await, MockProvider::start().await);
    let env = Env::start(&two_backends(&primary, &backup, "    timeouts: {firstToken: 300ms}\n")).await;
    for behavior in
        [Behavior::BreakAfter(0), Behavior::Status(502, None), Behavior::Delay(Duration::from_secs(3)), Behavior::Drop]
    {
        primary.script([behavior.clone()]);
        let r = env.client.stream("/v1/chat/completions", &chat_stream("m"), &[], LONG).await.unwrap();
        assert_eq!(r.status, 200, "{behavior:?}");
        assert_eq!(r.headers["x-bulwark-backend"], "backup", "{behavior:?}");
        assert!(r.text().ends_with("data: [DONE]\n\n") && r.error.is_none(), "{behavior:?}");
    }
    assert_eq!(backup.calls(), 4);
    assert_eq!(sum(&env.metrics().await, "bulwark_fallbacks_total", &["backend=\"backup\""]), 4.0);
    env.shutdown().await;
}

#[tokio::test]
async fn a_whole_answer_whose_body_never_comes_is_cut_at_first_token() {
    let (primary, backup) = (MockProvider::start().await, MockProvider::start().await);
    let env = Env::start(&two_backends(&primary, &backup, "    timeouts: {firstToken: 300ms}\n")).await;
    primary.script([Behavior::StallAfter(0)]);
    let started = tokio::time::Instant::now();
    let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!((r.status.as_u16(), r.header("x-bulwark-backend")), (200, Some("backup")));
    assert!(started.elapsed() < Duration::from_secs(2), "a head sent early does not stop the clock");
    assert_eq!(backup.calls(), 1);
    env.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_breaks_after_the_first_byte_ends_with_an_error_event() {
    let (primary, backup) = (MockProvider::start().await, MockProvider::start().await);
    let env = Env::start(&two_backends(&primary, &backup, "    timeouts: {idle: 300ms}\n")).await;
    let cases = [
        (Behavior::BreakAfter(2), "upstream_stream_broken"),
        (Behavior::TruncateAfter(2), "upstream_stream_truncated"),
        (Behavior::StallAfter(2), "upstream_idle_timeout"),
    ];
    for (behavior, code) in cases {
        primary.script([behavior.clone()]);
        let r = env.client.stream("/v1/chat/completions", &chat_stream("m"), &[], LONG).await.unwrap();
        assert_eq!(r.status, 200, "committed at the first byte");
        let text = r.text();
        assert!(text.contains("w0") && text.contains("w1") && !text.contains("w2"), "{behavior:?}: {text}");
        assert!(!text.contains("[DONE]"), "never closed as if it succeeded");
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        assert!(last.starts_with("event: error\ndata: {\"error\":"), "{behavior:?}: {last}");
        assert!(last.contains(&format!("\"code\":\"{code}\"")), "{behavior:?}: {last}");
        assert!(r.error.is_some(), "{behavior:?}: the transport is aborted too");
    }
    assert_eq!(backup.calls(), 0, "no fallback after the first byte");
    assert_eq!(sum(&env.metrics().await, "bulwark_stream_errors_total", &[]), 3.0);
    env.shutdown().await;
}

#[tokio::test]
async fn client_errors_pass_through_and_upstream_429s_report_retry_after() {
    let (primary, backup) = (MockProvider::start().await, MockProvider::start().await);
    let env = Env::start(&two_backends(&primary, &backup, "")).await;
    primary.script([Behavior::Status(400, None)]);
    let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["message"], "mock 400", "the provider's own error");
    assert_eq!(backup.calls(), 0, "a bad request is not retried elsewhere");
    primary.script([Behavior::Status(429, Some(7))]);
    backup.script([Behavior::Status(429, Some(3))]);
    let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.json()["error"]["code"], "upstream_rate_limited");
    assert_eq!(
        r.json()["error"]["message"],
        "route team-a/chat: no backend answered: primary: status 429; backup: status 429"
    );
    env.shutdown().await;
}

#[tokio::test]
async fn the_circuit_opens_skips_the_backend_and_probes_after_the_cooldown() {
    let (primary, backup) = (MockProvider::start().await, MockProvider::start().await);
    let env =
        Env::start(&two_backends(&primary, &backup, "    circuitBreaker: {consecutiveFailures: 2, cooldown: 2s}\n"))
            .await;
    primary.script([Behavior::Status(500, None), Behavior::Status(500, None)]);
    for _ in 0..2 {
        let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
        assert_eq!(r.header("x-bulwark-backend"), Some("backup"));
    }
    // The circuit opened at the second failure, before its answer came from the backup.
    let opened = tokio::time::Instant::now();
    assert_eq!(primary.calls(), 2);
    for _ in 0..5 {
        let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
        assert_eq!(r.header("x-bulwark-backend"), Some("backup"));
    }
    assert_eq!(primary.calls(), 2, "open: the primary is not called");
    assert_eq!(sum(&env.metrics().await, "bulwark_circuit_state", &["backend=\"primary\""]), 1.0);
    assert!(opened.elapsed() < Duration::from_secs(2), "the checks above ran within the cooldown");
    tokio::time::sleep_until(opened + Duration::from_millis(2100)).await;
    let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!(r.header("x-bulwark-backend"), Some("primary"), "the probe succeeds");
    assert_eq!(sum(&env.metrics().await, "bulwark_circuit_state", &["backend=\"primary\""]), 0.0);
    env.shutdown().await;
}

#[tokio::test]
async fn weights_split_traffic_between_backends() {
    let (a, b) = (MockProvider::start().await, MockProvider::start().await);
    let env = Env::start(&route(&format!(
        "  rules:\n  - backends: [{{name: a, url: '{}', weight: 80}}, {{name: b, url: '{}', weight: 20}}]\n",
        a.url(),
        b.url()
    )))
    .await;
    for _ in 0..300 {
        assert_eq!(env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap().status, 200);
    }
    assert_eq!(a.calls() + b.calls(), 300);
    assert!((200..=280).contains(&a.calls()), "a got {} of 300", a.calls());
    env.shutdown().await;
}

#[tokio::test]
async fn rate_limits_per_key_with_retry_after() {
    let mock = MockProvider::start().await;
    let env = Env::start(&route(&format!(
        "  rules:\n  - backends: [{{name: a, url: '{}'}}]\n    rateLimit: {{requestsPerMinute: 2, key: {{header: x-user}}}}\n",
        mock.url()
    )))
    .await;
    for _ in 0..2 {
        assert_eq!(
            env.client.post("/v1/chat/completions", &chat("m"), &[("x-user", "ann")]).await.unwrap().status,
            200
        );
    }
    let r = env.client.post("/v1/chat/completions", &chat("m"), &[("x-user", "ann")]).await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("30"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(r.json()["error"]["message"], "rate limit of route team-a/chat reached; retry in 30s");
    assert_eq!(env.client.post("/v1/chat/completions", &chat("m"), &[("x-user", "bob")]).await.unwrap().status, 200);
    assert_eq!(mock.calls(), 3, "the refused request never reached the provider");
    env.shutdown().await;
}

#[tokio::test]
async fn token_rate_limits_settle_on_real_usage() {
    let mock = MockProvider::start().await;
    // Each call is estimated at 3 + 100 tokens and really uses 2 + 5.
    let env = Env::start(&route(&format!(
        "  rules:\n  - backends: [{{name: a, url: '{}'}}]\n    rateLimit: {{tokensPerMinute: 150}}\n",
        mock.url()
    )))
    .await;
    let body = json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hello there"}]});
    // A client error costs nothing: its reservation is returned whole.
    mock.script([Behavior::Status(400, None)]);
    assert_eq!(env.client.post("/v1/chat/completions", &body, &[]).await.unwrap().status, 400);
    for i in 0..5 {
        let r = env.client.post("/v1/chat/completions", &body, &[]).await.unwrap();
        assert_eq!(r.status, 200, "call {i}: reservations are returned once usage is known");
    }
    let big = json!({"model": "m", "max_tokens": 140, "messages": [{"role": "user", "content": "hello there"}]});
    let r = env.client.post("/v1/chat/completions", &big, &[]).await.unwrap();
    assert_eq!(r.status, 429, "35 of 150 used, 143 more do not fit");
    env.shutdown().await;
}

#[tokio::test]
async fn a_buffered_request_its_client_abandons_is_settled_once() {
    let mock = MockProvider::start().await;
    mock.script([Behavior::Delay(Duration::from_millis(600))]);
    // Estimated at 3 + 100 tokens: two such requests do not fit in 150.
    let env = Env::start(&route(&format!(
        "  rules:\n  - backends: [{{name: a, url: '{}'}}]\n    rateLimit: {{tokensPerMinute: 150}}\n",
        mock.url()
    )))
    .await;
    let body = json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hello there"}]});
    // The client gives up once the request reached the backend, before it answers.
    let (client, sent) = (env.client.clone(), body.clone());
    let request = tokio::spawn(async move { client.post("/v1/chat/completions", &sent, &[]).await });
    let arrived = eventually(Duration::from_secs(5), "the request at the backend", || async {
        (mock.calls() == 1).then_some(())
    });
    arrived.await.unwrap();
    assert!(!request.is_finished(), "the backend has not answered yet");
    request.abort();
    let cancelled = r#"status_class="cancelled""#;
    for _ in 0..100 {
        if sum(&env.metrics().await, "bulwark_requests_total", &[cancelled]) > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = env.metrics().await;
    assert_eq!(sum(&m, "bulwark_requests_total", &[cancelled, r#"backend="a""#]), 1.0, "{m}");
    assert_eq!(sum(&m, "bulwark_requests_total", &[]), 1.0, "counted once");
    let report = env.sidecar.metrics.outcomes.report("v");
    let a = &report.backends[0];
    assert_eq!((a.backend.as_str(), a.requests, a.error_count()), ("a", 1, 0), "sent to a, not its fault");
    assert_eq!(a.latency.count(), 0, "an answer that never completed has no latency");
    // The backend may have spent the tokens: the estimate stays charged.
    let r = env.client.post("/v1/chat/completions", &body, &[]).await.unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
    env.shutdown().await;
}

#[tokio::test]
async fn identical_requests_are_served_from_the_cache() {
    let mock = MockProvider::start().await;
    let env = Env::start(&route(&format!(
        "  rules:\n  - backends: [{{name: a, url: '{}'}}]\n    cache: {{exact: {{ttl: 1m}}}}\n",
        mock.url()
    )))
    .await;
    let first = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!(first.header("x-bulwark-cache"), Some("miss"));
    let second = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!(second.header("x-bulwark-cache"), Some("hit"));
    assert_eq!(first.body, second.body);
    assert_eq!(mock.calls(), 1);
    let skip = env.client.post("/v1/chat/completions", &chat("m"), &[("cache-control", "no-cache")]).await.unwrap();
    assert_eq!(skip.header("x-bulwark-cache"), None);
    assert_eq!(mock.calls(), 2, "cache-control: no-cache goes upstream");
    let other = env.client.post("/v1/chat/completions", &chat("other"), &[]).await.unwrap();
    assert_eq!(other.header("x-bulwark-cache"), Some("miss"));

    // A completed stream is recorded and replayed as a stream; a broken one is not kept.
    let s1 = env.client.stream("/v1/chat/completions", &chat_stream("m"), &[], LONG).await.unwrap();
    let s2 = env.client.stream("/v1/chat/completions", &chat_stream("m"), &[], LONG).await.unwrap();
    assert_eq!(s2.headers["x-bulwark-cache"], "hit");
    assert_eq!(s2.headers["content-type"], "text/event-stream");
    assert_eq!(s1.text(), s2.text());
    mock.script([Behavior::BreakAfter(1)]);
    let broken = json!({"model": "b", "stream": true, "messages": []});
    let _ = env.client.stream("/v1/chat/completions", &broken, &[], LONG).await.unwrap();
    let again = env.client.stream("/v1/chat/completions", &broken, &[], LONG).await.unwrap();
    assert_eq!(again.headers["x-bulwark-cache"], "miss");
    let m = env.metrics().await;
    assert_eq!(sum(&m, "bulwark_cache_lookups_total", &["result=\"hit\""]), 2.0);
    env.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_openai_shaped_errors() {
    let mock = MockProvider::start().await;
    let env = Env::start(&route(&format!(
        "  rules:\n  - match: {{models: [\"gpt-*\"]}}\n    backends: [{{name: a, url: '{}'}}]\n",
        mock.url()
    )))
    .await;
    let c = &env.client;
    let post = |body: &'static [u8]| c.raw(http::Method::POST, "/v1/chat/completions", body, &[]);
    let cases: Vec<(u16, &str, _)> = vec![
        (400, "invalid_json", post(b"{not json").await.unwrap()),
        (400, "missing_model", post(b"{\"messages\":[]}").await.unwrap()),
        (400, "invalid_utf8", post(b"{\"model\":\"gpt-4\",\"messages\":[\"\xc3\x28\"]}").await.unwrap()),
        (404, "route_not_found", post(b"{\"model\":\"llama\",\"messages\":[]}").await.unwrap()),
        (404, "unknown_path", c.raw(http::Method::POST, "/v1/nope", "{}", &[]).await.unwrap()),
        (405, "method_not_allowed", c.get("/v1/chat/completions").await.unwrap()),
        (
            413,
            "request_too_large",
            c.post("/v1/chat/completions", &json!({"model": "gpt-4", "messages": ["x".repeat(70_000)]}), &[])
                .await
                .unwrap(),
        ),
    ];
    for (status, code, r) in cases {
        assert_eq!(r.status, status, "{code}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["code"], code);
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(), "{}", r.text());
    }
    assert_eq!(mock.calls(), 0);
    let m = env.metrics().await;
    assert_eq!(sum(&m, "bulwark_request_errors_total", &["code=\"route_not_found\""]), 1.0);
    env.shutdown().await;
}

#[tokio::test]
async fn wrong_types_get_a_400_naming_the_field_and_unknown_fields_pass_untouched() {
    let mock = MockProvider::start().await;
    let env = Env::start(&route(&format!(
        "  rules:\n  - match: {{models: [\"gpt-*\", \"claude-*\"]}}\n    backends: [{{name: a, url: '{}'}}]\n",
        mock.url()
    )))
    .await;
    let c = &env.client;
    let bad = [
        (json!({"model": "gpt-4", "messages": [null]}), "messages[0]"),
        (json!({"model": "gpt-4", "messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
        (
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": [{"type": "text", "text": ["x"]}]}]}),
            "messages[0].content[0].text",
        ),
        (
            json!({"model": "gpt-4", "messages": [], "tools": [{"type": "function", "function": "f"}]}),
            "tools[0].function",
        ),
    ];
    for (body, param) in bad {
        let r = c.post("/v1/chat/completions", &body, &[]).await.unwrap();
        assert_eq!(r.status, 400, "{}", r.text());
        let e = &r.json()["error"];
        assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("invalid_field"), Some(param)), "{}", r.text());
        assert!(e["message"].as_str().unwrap().starts_with(&format!("`{param}` must be")), "{}", r.text());
    }
    // Anthropic's error shape for the Messages API.
    let r = c
        .post(
            "/v1/messages",
            &json!({"model": "claude-3", "max_tokens": 8, "messages": [{"role": "user", "content": {"text": "hi"}}]}),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(
        r.json()["error"]["message"],
        "`messages[0].content` must be a string or an array of content blocks, not an object"
    );
    assert_eq!(mock.calls(), 0, "nothing malformed reached the provider");

    // Unknown fields, and parts of unknown types without a policy, are forwarded as sent.
    let body = json!({"model": "gpt-4", "x_vendor": {"deep": [1, null]}, "messages": [
        {"role": "user", "content": [{"type": "input_text", "input_text": "hi"}], "x_note": 1}]});
    let r = c.post("/v1/chat/completions", &body, &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = &mock.recorded()[0].body;
    assert_eq!((&sent["x_vendor"], &sent["messages"]), (&body["x_vendor"], &body["messages"]));
    env.shutdown().await;
}

#[tokio::test]
async fn a_slow_client_body_times_out_and_nothing_hangs() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = MockProvider::start().await;
    let env = Env::start(&route(&format!("  rules:\n  - backends: [{{name: a, url: '{}'}}]\n", mock.url()))).await;
    // Claims 100 bytes, sends 10, then stops: the body read is bounded in time, the proxy answers.
    let mut s = tokio::net::TcpStream::connect(env.sidecar.proxy_addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":").await.unwrap();
    drop(s);
    // The server survives and keeps serving.
    let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!(r.status, 200);
    let mut s = tokio::net::TcpStream::connect(env.sidecar.proxy_addr).await.unwrap();
    s.write_all(b"GARBAGE\r\n\r\n").await.unwrap();
    let mut buf = vec![0; 256];
    let n = tokio::time::timeout(LONG, s.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 400"), "malformed HTTP gets a 400");
    env.shutdown().await;
}

#[tokio::test]
async fn config_reloads_live_and_a_bad_change_keeps_the_last_good_config() {
    let (a, b) = (MockProvider::start().await, MockProvider::start().await);
    let v1 = route(&format!("  rules:\n  - backends: [{{name: a, url: '{}'}}]\n", a.url()));
    let env = Env::start(&v1).await;
    // A stream in flight across a reload finishes on the config it started with.
    let slow = MockProvider::start_with("slow", 5, Duration::from_millis(60), "127.0.0.1:0".parse().unwrap()).await;
    assert!(env.reload(&route(&format!("  rules:\n  - backends: [{{name: slow, url: '{}'}}]\n", slow.url()))).await);
    let client = env.client.clone();
    let inflight =
        tokio::spawn(async move { client.stream("/v1/chat/completions", &chat_stream("m"), &[], LONG).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(env.reload(&route(&format!("  rules:\n  - backends: [{{name: b, url: '{}'}}]\n", b.url()))).await);
    let done = inflight.await.unwrap();
    assert!(done.error.is_none() && done.text().ends_with("data: [DONE]\n\n"), "in-flight stream survived the reload");
    assert_eq!(done.headers["x-bulwark-backend"], "slow");
    let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!(r.header("x-bulwark-backend"), Some("b"), "the new route took effect");

    let good_version = env.sidecar.runtime.borrow().config.version.clone();
    assert!(!env.reload(&route("  rules:\n  - backends: [{name: c, url: 'not a url'}]\n")).await, "rejected");
    assert_eq!(env.sidecar.runtime.borrow().config.version, good_version);
    let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!(r.header("x-bulwark-backend"), Some("b"), "still serving the last good config");
    let m = env.metrics().await;
    assert!(sum(&m, "bulwark_config_reloads_total", &["result=\"error\""]) >= 1.0);
    assert_eq!(sum(&m, "bulwark_config_info", &[&format!("version=\"{good_version}\"")]), 1.0);
    env.shutdown().await;
}

#[tokio::test]
async fn h2c_clients_and_admin_endpoints() {
    let mock = MockProvider::start().await;
    let env = Env::start(&route(&format!(
        "  rules:\n  - match: {{models: [gpt-4o, \"gpt-*\"]}}\n    backends: [{{name: a, url: '{}', model: gpt-4o-mini}}]\n",
        mock.url()
    )))
    .await;
    let h2 = Client::h2(format!("http://{}", env.sidecar.proxy_addr));
    let r = h2.post("/v1/chat/completions", &chat("gpt-4o"), &[]).await.unwrap();
    assert_eq!(r.status, 200);
    let models = env.client.get("/v1/models").await.unwrap().json();
    let ids: Vec<_> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, ["gpt-4o", "gpt-4o-mini"]);
    assert_eq!(env.admin.get("/live").await.unwrap().status, 200);
    let ready = env.admin.get("/ready").await.unwrap();
    assert_eq!(ready.status, 200);
    assert!(ready.text().starts_with("ready "));
    assert_eq!(env.admin.get("/nope").await.unwrap().status, 404);
    env.shutdown().await;
}

#[tokio::test]
async fn an_unreadable_key_fails_clearly_and_falls_back() {
    let (primary, backup) = (MockProvider::start().await, MockProvider::start().await);
    let yaml = route(&format!(
        "  backends: [{{name: backup, url: '{}'}}]\n  rules:\n  - backends: [{{name: primary, url: '{}', credentials: {{env: BULWARK_SCENARIO_UNSET_KEY}}}}]\n    fallback: [{{backend: backup}}]\n",
        backup.url(),
        primary.url()
    ));
    let env = Env::start(&yaml).await;
    let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!(r.header("x-bulwark-backend"), Some("backup"));
    assert_eq!(primary.calls(), 0);
    assert!(env.reload(&yaml.replace("    fallback: [{backend: backup}]\n", "")).await);
    let r = env.client.post("/v1/chat/completions", &chat("m"), &[]).await.unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(
        r.json()["error"]["message"],
        "route team-a/chat: no backend answered: primary: credentials unavailable (environment variable BULWARK_SCENARIO_UNSET_KEY is not set)"
    );
    env.shutdown().await;
}

#[tokio::test]
async fn a_bad_config_refuses_to_start_with_the_reason() {
    let dir = harness::temp_dir("bulwark-bad").unwrap();
    std::fs::write(dir.join("r.yaml"), route("  rules: [{backends: [{name: a, url: 'ftp://x'}]}]\n")).unwrap();
    let err = Sidecar::start(harness::options(&dir)).await.err().unwrap().to_string();
    assert!(
        err.contains("LLMRoute team-a/chat (Invalid): spec.rules[0].backends[0].url: \"ftp://x\" is not an http:// or https:// URL"),
        "{err}"
    );
}
