//! A self-hosted backend's replicas, as the operator hands them to a sidecar: requests go by
//! load (in flight, time to first token, the queue a replica's metrics report), and a replica
//! that keeps failing is ejected while requests still succeed on the others.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bulwark_sidecar::{Options, Sidecar, Source};
use bulwark_tests::{
    client::Client,
    cluster::eventually,
    harness::temp_dir,
    mock::{Behavior, MockProvider},
};
use serde_json::json;

async fn mock(name: &str) -> MockProvider {
    MockProvider::start_with(name, 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await
}

/// A sidecar on a compiled config whose one backend has `replicas`.
async fn sidecar(replicas: &[&MockProvider], rule: &str) -> (Sidecar, Client) {
    let endpoints: Vec<String> = replicas.iter().map(|m| m.url()).collect();
    let config = format!(
        r#"apiVersion: bulwark.dev/sidecar-config/v1
routes:
  - id: team-a/chat/0
    route: team-a/chat
    backends:
      - name: llama
        provider: openai-compatible
        url: http://llama.team-a.svc:8000/v1
        replicas: {{endpoints: {}, metricsPath: /metrics}}
{rule}"#,
        serde_json::to_string(&endpoints).unwrap()
    );
    let dir = temp_dir("bulwark-replicas").unwrap();
    std::fs::write(dir.join("config.yaml"), config).unwrap();
    let mut opts = Options::new(Source::File(dir.join("config.yaml")));
    opts.listen = ([127, 0, 0, 1], 0).into();
    opts.admin = ([127, 0, 0, 1], 0).into();
    let s = Sidecar::start(opts).await.unwrap();
    let c = Client::new(format!("http://{}", s.proxy_addr));
    (s, c)
}

async fn send(c: &Client, n: usize, concurrency: usize) -> Vec<u16> {
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]});
    let mut statuses = vec![];
    for _ in 0..n / concurrency {
        let batch: Vec<_> = (0..concurrency)
            .map(|_| {
                let (c, body) = (c.clone(), body.clone());
                tokio::spawn(async move { c.post("/v1/chat/completions", &body, &[]).await.unwrap().status.as_u16() })
            })
            .collect();
        for t in batch {
            statuses.push(t.await.unwrap());
        }
    }
    statuses
}

/// The replica choice is judged on time to first token: tests that share the two cores at once
/// would slow each other's replicas. One at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until the sidecar has read `replica`'s metrics twice more, so that one read begun after
/// now has been applied.
async fn read_twice(replica: &MockProvider) {
    let from = replica.scrapes();
    let read = eventually(Duration::from_secs(10), "two more metric reads", || async {
        (replica.scrapes() >= from + 2).then_some(())
    });
    read.await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_the_replicas_by_load() {
    let _serial = SERIAL.lock().await;
    let (a, b, slow) = (mock("a").await, mock("b").await, mock("slow").await);
    slow.set_default(Behavior::Delay(Duration::from_millis(150)));
    let (s, c) = sidecar(&[&a, &b, &slow], "").await;
    let statuses = send(&c, 120, 6).await;
    assert!(statuses.iter().all(|s| *s == 200));
    let (na, nb, ns) = (a.calls(), b.calls(), slow.calls());
    assert_eq!(na + nb + ns, 120);
    assert!(ns * 100 / 120 < 15, "the slow replica gets little: a {na}, b {nb}, slow {ns}");
    assert!(na > 20 && nb > 20, "the fast ones share the rest: a {na}, b {nb}, slow {ns}");
    let m = s.metrics.encode();
    let replica_lines = m.lines().filter(|l| l.starts_with("bulwark_replica_requests_total{")).count();
    assert_eq!(replica_lines, 3, "{m}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_reports_a_long_queue_gets_nothing_new() {
    let _serial = SERIAL.lock().await;
    let (idle, queued) = (mock("idle").await, mock("queued").await);
    queued.set_waiting(50);
    let (s, c) = sidecar(&[&idle, &queued], "").await;
    // The metrics are read every second, never per request.
    read_twice(&queued).await;
    let before = queued.calls();
    send(&c, 40, 1).await;
    assert_eq!(queued.calls(), before, "50 waiting there, none here: every choice of two goes to the idle one");
    queued.set_waiting(0);
    read_twice(&queued).await;
    send(&c, 40, 1).await;
    assert!(queued.calls() > before, "its queue drained: it gets requests again");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_replica_is_avoided_ejected_and_requests_still_succeed() {
    let _serial = SERIAL.lock().await;
    let (a, b, bad) = (mock("a").await, mock("b").await, mock("bad").await);
    bad.set_default(Behavior::Status(500, None));
    let retry = "    retry: {attempts: 2, retryOn: [\"5xx\"], backoff: {base: 1ms, max: 5ms}}\n";
    let (s, c) = sidecar(&[&a, &b, &bad], retry).await;
    let statuses = send(&c, 40, 1).await;
    assert!(statuses.iter().all(|s| *s == 200), "a retry goes to another replica: {statuses:?}");
    assert!(bad.calls() <= 3, "each failure makes it costlier: {} calls", bad.calls());
    s.shutdown().await;

    // Under load the healthy replica is busy, so the failing one keeps being drawn: it is ejected.
    let (slow, bad) = (mock("slow").await, mock("bad").await);
    slow.set_default(Behavior::Delay(Duration::from_millis(40)));
    bad.set_default(Behavior::Status(500, None));
    let (s, c) = sidecar(&[&slow, &bad], retry).await;
    let statuses = send(&c, 48, 8).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let m = s.metrics.encode();
    assert!(m.contains(r#"bulwark_replica_ejections_total{route="team-a/chat",backend="llama"}"#), "{m}");
    let ejected_at = bad.calls();
    send(&c, 16, 8).await;
    assert_eq!(bad.calls(), ejected_at, "ejected: no call during its cooldown");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_loaded_picks_among_a_rules_url_backends_too() {
    let _serial = SERIAL.lock().await;
    let (fast, slow) = (mock("fast").await, mock("slow").await);
    slow.set_default(Behavior::Delay(Duration::from_millis(150)));
    let yaml = format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: chat, namespace: team-a}}\nspec:\n  rules:\n    - loadBalancing: leastLoaded\n      backends: [{{name: fast, url: '{}'}}, {{name: slow, url: '{}'}}]\n",
        fast.url(),
        slow.url()
    );
    let h = bulwark_tests::harness::Harness::start("bulwark-least-loaded", &yaml, |_| {}).await.unwrap();
    let statuses = send(&h.client, 60, 6).await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert!(slow.calls() * 100 / 60 < 20, "fast {}, slow {}", fast.calls(), slow.calls());
    h.sidecar.shutdown().await;
}
