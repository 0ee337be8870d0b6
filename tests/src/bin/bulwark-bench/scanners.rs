//! Scanner benchmarks: cost per KB of each deterministic scanner, prompt-injection latency on one
//! thread and throughput with dynamic batching against one-at-a-time, and the latency a full
//! policy adds through the sidecar, each against its baseline in the same run.

use std::{path::Path, sync::Arc, time::Duration};

use bulwark_api::ScannerPolicySpec;
use bulwark_sidecar::{
    metrics::Metrics,
    scan::{
        self, Ctx, Direction, PolicyRuntime,
        injection::{Head, Injection},
        model::{ModelHub, ModelSettings, Output},
    },
};
use bulwark_tests::cluster::free_port;
use tokio::time::Instant;

/// About 1 KB of prompt with a little of everything the scanners look for.
fn prompt_kb() -> String {
    let base = "Hi team, please review the deployment notes below before Friday. The staging database lives at \
                10.20.30.40 and the on-call engineer is reachable at oncall@example.com or +1 415 555 0132. \
                Remember that the migration must not touch the billing tables, and that customer data stays in \
                the EU region. The new feature flag is called checkout-v2 and should stay off until QA signs off. \
                Logs from last night show a spike of 502 errors between 02:00 and 02:15 UTC, probably the cache \
                warming job. Could you also summarise the open incidents and suggest which ones we can close? ";
    let mut s = String::new();
    while s.len() < 1024 {
        s.push_str(base);
    }
    s.truncate(1024);
    s
}

fn policy(yaml: &str, hub: &ModelHub) -> PolicyRuntime {
    let spec: ScannerPolicySpec = serde_yaml::from_str(yaml).unwrap_or_default();
    PolicyRuntime::build("bench", &spec, hub).unwrap_or_else(|e| {
        eprintln!("policy: {e}");
        std::process::exit(1)
    })
}

fn per_kb(p: &PolicyRuntime, text: &str, metrics: &Metrics) -> f64 {
    let iters = 2000;
    let ctx = Ctx { metrics, route: "bench", backend: None, mirrored: false };
    let started = Instant::now();
    for _ in 0..iters {
        let mut t = text.to_owned();
        let _ = scan::run(p, Direction::Input, &mut [&mut t], &ctx);
    }
    started.elapsed().as_secs_f64() * 1e3 / iters as f64 / (text.len() as f64 / 1024.0)
}

fn settings() -> Option<ModelSettings> {
    let dir = std::env::var_os("BULWARK_MODELS_DIR")?;
    Some(ModelSettings { models_dir: Some(dir.into()), onnxruntime: None, threads: 1, public_key: None })
}

pub async fn bench(bin: &Path) -> anyhow::Result<()> {
    let hub = ModelHub::default();
    let metrics = Metrics::new();
    let text = prompt_kb();
    println!("\nscanners, ms per KB of prompt (one thread, {} byte prompt)", text.len());
    let mut deterministic = 0.0;
    for (name, yaml, counts) in [
        ("regex", "input: [{type: regex, patterns: ['(?i)project[- ]falcon', '\\\\bcheckout-v[0-9]+\\\\b']}]", true),
        ("secrets", "input: [{type: secrets, action: redact}]", true),
        ("pii", "input: [{type: pii, action: redact}]", true),
        ("invisibleText", "input: [{type: invisibleText}]", true),
        ("banSubstrings", "input: [{type: banSubstrings, substrings: [falcon, BEGIN PRIVATE KEY]}]", false),
        ("tokenLimit", "input: [{type: tokenLimit, maxTokens: 100, encoding: o200k_base, action: audit}]", false),
        ("language", "input: [{type: language, languages: [en]}]", false),
    ] {
        let ms = per_kb(&policy(yaml, &hub), &text, &metrics);
        if counts {
            deterministic += ms;
        }
        println!("  {name:<14} {ms:>8.4}");
    }
    let together = policy(
        "input: [{type: regex, patterns: ['(?i)project[- ]falcon']}, {type: secrets, action: redact}, {type: pii, action: redact}, {type: invisibleText}]",
        &hub,
    );
    let all = per_kb(&together, &text, &metrics);
    println!(
        "  regex+secrets+pii+invisibleText in one policy: {all:.4} ms/KB (sum of the four alone {deterministic:.4})   target: < 0.1 ms/KB"
    );

    let Some(settings) = settings() else {
        println!("\nmodel scanners: skipped (BULWARK_MODELS_DIR and ORT_DYLIB_PATH are set by `make bench`)");
        return Ok(());
    };
    let hub = Arc::new(ModelHub::new(settings));
    let Some(dir) = hub.default_encoder_dir() else { return Ok(()) };
    let encoder = hub.get(&dir, None, Some(Output::Embedding)).map_err(anyhow::Error::msg)?;
    let head = Arc::new(Head::bundled().map_err(anyhow::Error::msg)?);
    let injection = Arc::new(Injection::Bundled { encoder: encoder.clone(), head });
    // About 128 tokens.
    let prompt = "Please summarise the following customer message and suggest a polite reply. The customer writes \
                  that their order arrived two days late, the box was damaged, and one of the three items was \
                  missing. They would like either a refund for the missing item or a replacement shipped with \
                  express delivery, and they ask whether the damaged packaging affects the warranty of the other \
                  two items. Keep the reply short and friendly.";
    for _ in 0..5 {
        injection.score(prompt).await.map_err(anyhow::Error::msg)?;
    }
    let mut lat = vec![];
    let started = Instant::now();
    for _ in 0..100 {
        let t = Instant::now();
        injection.score(prompt).await.map_err(anyhow::Error::msg)?;
        lat.push(t.elapsed());
    }
    let sequential = 100.0 / started.elapsed().as_secs_f64();
    lat.sort();
    let mut raw = vec![];
    for _ in 0..30 {
        let t = Instant::now();
        encoder.infer(prompt.to_owned()).await.map_err(anyhow::Error::msg)?;
        raw.push(t.elapsed());
    }
    raw.sort();
    println!("\npromptInjection (bundled head, int8 MiniLM, ~128 tokens, one inference thread)");
    println!("  the encoder alone on the whole prompt: p50 {:.2} ms (this CPU has AVX2, no AVX-512/VNNI)", ms(raw[15]));
    println!(
        "  the scanner (sentence chunks, n-gram gate, encoder where needed): p50 {:.2} ms, p99 {:.2} ms one at a time ({sequential:.0}/s)   target: p50 < 10 ms",
        ms(lat[50]),
        ms(lat[98])
    );
    let started = Instant::now();
    let mut tasks = vec![];
    for _ in 0..32 {
        let inj = injection.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let _ = inj.score(prompt).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let batched = 320.0 / started.elapsed().as_secs_f64();
    println!("  32 concurrent callers, dynamic batching: {batched:.0}/s = {:.2}x one at a time", batched / sequential);
    let benign: Vec<String> = std::fs::read_to_string("models/data/benign_eval.txt")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    if !benign.is_empty() {
        let mut lat = vec![];
        for _ in 0..3 {
            for p in &benign {
                let t = Instant::now();
                injection.score(p).await.map_err(anyhow::Error::msg)?;
                lat.push(t.elapsed());
            }
        }
        lat.sort();
        let at = |q: f64| ms(lat[((lat.len() - 1) as f64 * q) as usize]);
        println!(
            "  {} hand-written benign prompts, n-gram gate in front of the encoder: p50 {:.3} ms, p90 {:.2} ms, p99 {:.2} ms",
            benign.len(),
            at(0.5),
            at(0.9),
            at(0.99)
        );
    }

    policy_overhead(bin).await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Latency of the same request through a route without a policy and one with the full default
/// policy, through one sidecar process, interleaved.
async fn policy_overhead(bin: &Path) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::{
        client::legacy::{Client, connect::HttpConnector},
        rt::TokioExecutor,
    };
    let mock = bulwark_tests::mock::MockProvider::start().await;
    let dir = std::env::temp_dir().join(format!("bulwark-bench-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("p.yaml"),
        format!(
            "apiVersion: bulwark.dev/v1alpha1\nkind: ScannerPolicy\nmetadata: {{name: full}}\nspec:\n  input:\n  - {{type: invisibleText, action: redact}}\n  - {{type: secrets, action: redact}}\n  - {{type: pii, action: redact, restoreInResponse: true}}\n  - {{type: tokenLimit, maxTokens: 8192}}\n  - {{type: promptInjection}}\n  output:\n  - {{type: secrets, action: redact}}\n---\napiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: r}}\nspec:\n  rules:\n  - match: {{models: [plain]}}\n    backends: [{{name: m, url: '{}'}}]\n  - match: {{models: [guarded]}}\n    backends: [{{name: m, url: '{}'}}]\n    scannerPolicyRef: {{name: full}}\n",
            mock.url(),
            mock.url()
        ),
    )?;
    let (port, admin) = (free_port()?, free_port()?);
    let child = std::process::Command::new(bin.join("bulwark-sidecar"))
        .args(["--manifests", &dir.display().to_string(), "--listen", &port.to_string(), "--admin", &admin.to_string()])
        .env("BULWARK_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let _guard = super::Proc(child);
    let client: Client<HttpConnector, Full<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    super::wait_ready(&client, &format!("http://127.0.0.1:{admin}/ready")).await?;
    let body = |model: &str| {
        format!(
            "{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Summarise the open incidents for the on-call engineer at oncall@example.com and suggest which ones we can close this week.\"}}]}}"
        )
    };
    let mut samples = [vec![], vec![]];
    for round in 0..400 {
        let which = round % 2;
        let req = http::Request::post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body(if which == 0 { "plain" } else { "guarded" }))))?;
        let t = Instant::now();
        let resp = client.request(req).await?;
        anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
        let _ = resp.into_body().collect().await?;
        samples[which].push(t.elapsed());
    }
    for s in &mut samples {
        s.sort();
    }
    let p = |s: &Vec<Duration>, q: f64| ms(s[((s.len() - 1) as f64 * q) as usize]);
    println!(
        "\nfull default policy through the sidecar (invisibleText, secrets, pii, tokenLimit, promptInjection; output secrets)"
    );
    println!("  no policy      p50 {:>6.2} ms  p99 {:>6.2} ms", p(&samples[0], 0.5), p(&samples[0], 0.99));
    println!("  full policy    p50 {:>6.2} ms  p99 {:>6.2} ms", p(&samples[1], 0.5), p(&samples[1], 0.99));
    println!(
        "  added          p50 {:>6.2} ms  p99 {:>6.2} ms",
        p(&samples[1], 0.5) - p(&samples[0], 0.5),
        p(&samples[1], 0.99) - p(&samples[0], 0.99)
    );
    Ok(())
}
