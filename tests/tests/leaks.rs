//! Secrets never leak: credentials planted in a file, the environment and a Kubernetes Secret,
//! and secrets in prompts and in clients' own keys, with debug logging on. Every path is
//! driven (success, retries, fallback, upstream errors, bad requests, streams, reloads good and
//! bad, reports, `/config`, `/metrics`, statuses, Events, ConfigMaps) and no planted value may
//! appear in any log, answer, status or object, while the providers did get the keys.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bulwark_tests::{
    client::Client,
    cluster::{Cluster, Proc, bin, eventually, free_port},
    harness::temp_dir,
    mock::{Behavior, MockProvider},
};
use serde_json::json;

const FILE_KEY: &str = "sk-planted-file-4f1d9a7c2e8b";
const ENV_KEY: &str = "sk-planted-env-93b2c6d1a0f7";
const SECRET_KEY: &str = "sk-planted-secret-5e7a1c3b9d2f";
const CLIENT_KEY: &str = "sk-planted-client-0c8e2a4f6b1d";
const PROMPT_SECRET: &str = "ghp_PlantedPromptToken0123456789abcdefAB";

/// Fails naming where a planted value showed up.
fn assert_clean(place: &str, text: &str) {
    for planted in [FILE_KEY, ENV_KEY, SECRET_KEY, CLIENT_KEY, PROMPT_SECRET] {
        assert!(!text.contains(planted), "{planted} leaked into {place}:\n{text}");
    }
}

fn route(primary: &MockProvider, fallback: &MockProvider, key_file: &std::path::Path, weight: u32) -> String {
    format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: ScannerPolicy\nmetadata: {{name: guard}}\nspec:\n  input:\n  - {{type: secrets, action: redact}}\n  - {{type: pii, action: audit}}\n  output:\n  - {{type: secrets, action: redact}}\n---\n\
         apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: chat}}\nspec:\n  backends:\n  - {{name: backup, url: '{}', credentials: {{env: BULWARK_PLANTED_KEY}}}}\n  rules:\n  - match: {{models: [\"gpt-*\"]}}\n    backends: [{{name: primary, url: '{}', weight: {weight}, credentials: {{file: '{}'}}}}]\n    fallback: [{{backend: backup}}]\n    retry: {{attempts: 2, backoff: {{base: 10ms, max: 20ms}}, retryOn: [\"5xx\"]}}\n    scannerPolicyRef: {{name: guard}}\n",
        fallback.url(),
        primary.url(),
        key_file.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_planted_credential_leaks_from_the_sidecar() {
    let (primary, backup) = (MockProvider::start().await, MockProvider::start().await);
    let dir = temp_dir("bulwark-leaks").unwrap();
    let key_file = dir.join("openai-key");
    std::fs::write(&key_file, format!("{FILE_KEY}\n")).unwrap();
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("chat.yaml"), route(&primary, &backup, &key_file, 100)).unwrap();
    let (listen, admin) = (free_port().unwrap(), free_port().unwrap());
    let args: Vec<String> = vec![
        format!("--manifests={}", manifests.display()),
        format!("--listen=127.0.0.1:{listen}"),
        format!("--admin=127.0.0.1:{admin}"),
        "--reload-interval=100ms".into(),
    ];
    let env = [("BULWARK_LOG", "debug"), ("BULWARK_PLANTED_KEY", ENV_KEY)];
    let sidecar = Proc::spawn(&dir, "sidecar", &bin("bulwark-sidecar").unwrap(), &args, &env).unwrap();
    let (llm, adm) =
        (Client::new(format!("http://127.0.0.1:{listen}")), Client::new(format!("http://127.0.0.1:{admin}")));
    eventually(Duration::from_secs(10), "the sidecar to be ready", || async {
        adm.get("/ready").await.ok().filter(|r| r.status == 200)
    })
    .await
    .unwrap();

    let chat = |stream: bool| json!({"model": "gpt-4", "stream": stream, "messages": [{"role": "user", "content": format!("deploy with {PROMPT_SECRET} and mail ann@example.com")}]});
    let client_auth = format!("Bearer {CLIENT_KEY}");
    let headers = [("authorization", client_auth.as_str())];
    let answers = std::cell::RefCell::new(String::new());
    let keep = |r: bulwark_tests::client::Reply| {
        answers.borrow_mut().push_str(&format!("{} {:?} {}\n", r.status, r.headers, r.text()));
        r.status
    };
    // Served by the primary; then its 500s are retried and the request falls back; its 401 is
    // passed to the client as it is; a bad request and a stream.
    assert_eq!(keep(llm.post("/v1/chat/completions", &chat(false), &headers).await.unwrap()), 200);
    primary.set_default(Behavior::Status(500, None));
    assert_eq!(keep(llm.post("/v1/chat/completions", &chat(false), &headers).await.unwrap()), 200);
    primary.set_default(Behavior::Ok);
    primary.script([Behavior::Status(401, None)]);
    keep(llm.post("/v1/chat/completions", &chat(false), &headers).await.unwrap());
    assert_eq!(
        keep(
            llm.post("/v1/chat/completions", &json!({"model": "gpt-4", "messages": [{"content": 5}]}), &headers)
                .await
                .unwrap()
        ),
        400
    );
    let streamed = llm.stream("/v1/chat/completions", &chat(true), &headers, Duration::from_secs(10)).await.unwrap();
    answers.borrow_mut().push_str(&streamed.text());
    // A good reload, then a bad one (the error is logged, the last good config keeps serving).
    std::fs::write(manifests.join("chat.yaml"), route(&primary, &backup, &key_file, 90)).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::write(
        manifests.join("broken.yaml"),
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {name: broken}\nspec: {rules: [{backends: []}]}\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(keep(llm.post("/v1/chat/completions", &chat(false), &headers).await.unwrap()), 200);
    for path in ["/config", "/metrics", "/rollouts", "/ready", "/live"] {
        keep(adm.get(path).await.unwrap());
    }

    // The providers got the keys, and the prompt's secret redacted.
    let auth = |m: &MockProvider| -> Vec<String> {
        m.recorded().iter().filter_map(|r| r.headers.get("authorization")?.to_str().ok().map(str::to_owned)).collect()
    };
    assert!(auth(&primary).iter().all(|a| a == &format!("Bearer {FILE_KEY}")) && !auth(&primary).is_empty());
    assert!(auth(&backup).contains(&format!("Bearer {ENV_KEY}")), "the fallback used the key from the environment");
    assert!(primary.recorded().iter().all(|r| !r.body.to_string().contains(PROMPT_SECRET)));

    let config = adm.get("/config").await.unwrap().text();
    assert!(
        config.contains("BULWARK_PLANTED_KEY") && config.contains("openai-key"),
        "the config says where keys are: {config}"
    );
    drop(sidecar);
    let log = std::fs::read_to_string(dir.join("sidecar.log")).unwrap();
    assert!(log.contains("DEBUG") || log.contains("debug"), "debug logging was on");
    assert!(log.contains("broken"), "the bad reload was logged");
    assert_clean("the sidecar's log", &log);
    assert_clean("the answers and admin endpoints", &answers.borrow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_planted_secret_leaks_from_the_operator() {
    let Some(c) = Cluster::start("bulwark-leaks-operator").await.unwrap() else { return };
    let ns = "shop";
    c.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: bot-1, namespace: {ns}, labels: {{app: bot, bulwark.dev/inject: \"true\"}}}}\nspec:\n  serviceAccountName: default\n  containers: [{{name: app, image: example/app}}]\n"
    ))
    .unwrap();
    c.kubectl(&["create", "secret", "generic", "openai", "-n", ns, &format!("--from-literal=api-key={SECRET_KEY}")])
        .unwrap();
    // Where the pod would have the Secret mounted.
    let secrets = c.dir.join("secrets");
    std::fs::create_dir_all(secrets.join("openai")).unwrap();
    std::fs::write(secrets.join("openai/api-key"), SECRET_KEY).unwrap();
    let mock = MockProvider::start().await;
    let stream = free_port().unwrap();
    let secrets_dir = format!("--secrets-dir={}", secrets.display());
    let op = c.operator("op-1", stream, &[&secrets_dir]).unwrap();
    c.apply(&format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: chat, namespace: {ns}}}\nspec:\n  workloadSelector: {{matchLabels: {{app: bot}}}}\n  rules: [{{backends: [{{name: openai, url: '{}', credentials: {{secretKeyRef: {{name: openai, key: api-key}}}}}}]}}]\n",
        mock.url()
    ))
    .unwrap();
    let sidecar = c.sidecar(ns, "bot-1", stream, &["--namespace=shop", "--labels=app=bot"]).unwrap();
    let llm = Client::new(format!("http://127.0.0.1:{}", sidecar.listen));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let client_auth = format!("Bearer {CLIENT_KEY}");
    eventually(Duration::from_secs(15), "the sidecar to serve the route", || async {
        llm.post("/v1/chat/completions", &body, &[("authorization", &client_auth)])
            .await
            .ok()
            .filter(|r| r.status == 200)
    })
    .await
    .unwrap();
    mock.script([Behavior::Status(503, None)]);
    let _ = llm.post("/v1/chat/completions", &body, &[]).await.unwrap();
    assert!(
        mock.recorded()
            .iter()
            .any(|r| r.headers.get("authorization").is_some_and(|a| a == format!("Bearer {SECRET_KEY}").as_str()))
    );
    // Reports reach the operator; statuses are written.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = Client::new(format!("http://127.0.0.1:{}", op.metrics)).get("/metrics").await.unwrap().text();
    assert_clean("the operator's /metrics", &metrics);
    for what in ["llmroutes", "configmaps", "events", "events.events.k8s.io", "pods"] {
        assert_clean(&format!("{what} in the cluster"), &c.kubectl(&["get", what, "-A", "-o", "yaml"]).unwrap());
    }
    let sidecar_config =
        Client::new(format!("http://127.0.0.1:{}", sidecar.admin)).get("/config").await.unwrap().text();
    assert_clean("the sidecar's /config", &sidecar_config);
    drop(sidecar);
    drop(op);
    for log in ["op-1.log", "sidecar-bot-1.log"] {
        let text = std::fs::read_to_string(c.dir.join(log)).unwrap();
        assert!(!text.is_empty());
        assert_clean(log, &text);
    }
}
