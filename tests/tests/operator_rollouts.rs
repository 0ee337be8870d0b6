#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Rollouts in a cluster, end to end: the test API server, real kubectl with the
//! `kubectl-bulwark` plugin, the operator binary driving a ModelRollout on the reports of two
//! sidecar processes, and mock providers as the stable and the canary.

use std::time::Duration;

use bulwark_tests::{
    client::Client,
    cluster::{Cluster, OperatorProc, SidecarProc, eventually, free_port},
    mock::{Behavior, MockProvider},
    prometheus::FakePrometheus,
    traffic::{Load, share},
};
use serde_json::Value;
use tokio::time::Instant;

const NS: &str = "shop";
const GAP: Duration = Duration::from_millis(10);

/// The two tests share the machine's two cores; run them one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pods() -> String {
    let mut out = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n");
    for name in ["bot-1", "bot-2"] {
        out += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{app: bot, bulwark.dev/inject: \"true\"}}\nspec:\n  serviceAccountName: default\n  containers: [{{name: app, image: example/app}}]\n"
        );
    }
    out
}

fn route(stable: &MockProvider, canary: &MockProvider) -> String {
    format!(
        r#"apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {{name: chat, namespace: {NS}}}
spec:
  workloadSelector: {{matchLabels: {{app: bot}}}}
  backends: [{{name: canary, provider: openai-compatible, url: "{}"}}]
  rules:
    - backends: [{{name: stable, provider: openai-compatible, url: "{}"}}]
      fallback: [{{backend: stable}}]
"#,
        canary.url(),
        stable.url()
    )
}

fn rollout(steps: &str) -> String {
    format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: upgrade, namespace: {NS}}}\nspec:\n  routeRef: {{name: chat}}\n  stable: {{backend: stable}}\n  canary: {{backend: canary}}\n  steps: {steps}\n  analysis: {{interval: 2s, window: 6s, minRequests: 10}}\n"
    )
}

struct Env {
    c: Cluster,
    stable: MockProvider,
    canary: MockProvider,
    op: OperatorProc,
    sidecars: Vec<SidecarProc>,
}

async fn start(prefix: &str) -> anyhow::Result<Option<Env>> {
    let Some(c) = Cluster::start(prefix).await? else { return Ok(None) };
    let stable = MockProvider::start_with("stable", 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    let canary = MockProvider::start_with("canary", 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    c.apply(&pods())?;
    let op = c.operator("op-1", free_port()?, &[])?;
    let sidecars =
        ["bot-1", "bot-2"].iter().map(|p| c.sidecar(NS, p, op.stream, &[])).collect::<Result<Vec<_>, _>>()?;
    c.apply(&route(&stable, &canary))?;
    let env = Env { c, stable, canary, op, sidecars };
    eventually(Duration::from_secs(20), "the route in both sidecars", || async {
        for s in &env.sidecars {
            let cfg = Client::new(format!("http://127.0.0.1:{}", s.admin)).get("/config").await.ok()?.json();
            cfg["routes"].as_array().filter(|r| !r.is_empty())?;
        }
        Some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", env.op.proc.output()))?;
    Ok(Some(env))
}

impl Env {
    fn status(&self) -> Value {
        let out = self.c.kubectl(&["get", "modelrollout", "upgrade", "-n", NS, "-o", "json"]).unwrap_or_default();
        serde_json::from_str::<Value>(&out).map(|v| v["status"].clone()).unwrap_or(Value::Null)
    }

    /// Waits until the rollout's status is in `phase` at `step`.
    async fn reaches(&self, phase: &str, step: u64, limit: Duration) -> anyhow::Result<Value> {
        let what = format!("ModelRollout phase {phase} at step {step}");
        let found = eventually(limit, &what, || async {
            let s = self.status();
            (s["phase"] == phase && s["currentStep"] == step).then_some(s)
        });
        found.await.map_err(|e| anyhow::anyhow!("{e}: {}\n{}", self.status(), self.op.proc.output()))
    }

    /// The weight of `backend` in every sidecar's config, once they all agree.
    async fn weight_everywhere(&self, backend: &str, weight: u64) -> anyhow::Result<()> {
        let what = format!("{backend} at weight {weight} in every sidecar");
        eventually(Duration::from_secs(5), &what, || async {
            for s in &self.sidecars {
                let cfg = Client::new(format!("http://127.0.0.1:{}", s.admin)).get("/config").await.ok()?.json();
                let backends = cfg["routes"][0]["backends"].as_array()?.clone();
                backends.iter().find(|b| b["name"] == backend && b["weight"] == weight)?;
            }
            Some(())
        })
        .await
    }

    fn loads(&self) -> Vec<Load> {
        self.sidecars
            .iter()
            .map(|s| Load::start(Client::new(format!("http://127.0.0.1:{}", s.listen)), &[], GAP))
            .collect()
    }

    fn kubectl_bulwark(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["bulwark", "rollout"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-n", NS]);
        self.c.kubectl(&all)
    }
}

fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == type_).cloned()).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_advance_and_roll_back_by_themselves() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(env) = start("bulwark-operator-rollouts").await? else { return Ok(()) };
    let loads = env.loads();
    env.c.apply(&rollout("[{weight: 20, pause: 3s}, {weight: 50, pause: 60s}, {weight: 100}]"))?;
    env.reaches("Progressing", 0, Duration::from_secs(10)).await?;
    env.weight_everywhere("canary", 20).await?;
    // Step 2 after the pause, on passing analyses of both sidecars' reports.
    let step2 = env.reaches("Progressing", 1, Duration::from_secs(20)).await?;
    assert_eq!(step2["canaryWeight"], 50);
    assert_eq!(step2["lastAnalysis"]["verdict"], "Pass");
    env.weight_everywhere("canary", 50).await?;

    // The canary starts failing: rolled back within the bound, and says why.
    let flipped = Instant::now();
    env.canary.set_default(Behavior::Status(500, None));
    let back = env.reaches("RolledBack", 1, Duration::from_secs(15)).await?;
    env.weight_everywhere("canary", 0).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = env.canary.recorded();
    let first_failing = calls.iter().map(|c| c.at).find(|at| *at >= flipped).unwrap();
    let last = calls.iter().map(|c| c.at).max().unwrap();
    let took = last.duration_since(first_failing);
    println!("operator mode: time to rollback {took:?} (bound: interval 2 s + 5 s)");
    assert!(took <= Duration::from_secs(2 + 5), "rolled back {took:?} after the first failing request");
    assert_eq!(back["canaryWeight"], 0);
    let progressing = condition(&back, "Progressing");
    assert_eq!((progressing["status"].as_str(), progressing["reason"].as_str()), (Some("False"), Some("RolledBack")));
    let message = progressing["message"].as_str().unwrap();
    assert!(message.contains("errorRate ") && message.contains(" > 0.050"), "{message}");
    // The status writer's conditions stand beside the driver's.
    assert_eq!(condition(&back, "Accepted")["status"], "True", "{back}");
    let events = env.c.kubectl(&["get", "events.events.k8s.io", "-n", NS, "-o", "json"])?;
    let events: Value = serde_json::from_str(&events)?;
    let rollback = events["items"].as_array().unwrap().iter().find(|e| e["reason"] == "RolledBack");
    let note = rollback.map(|e| e["note"].as_str().unwrap_or_default().to_owned()).unwrap_or_default();
    assert!(note.contains("errorRate") && note.contains("> 0.050"), "an Event names the signal: {events}");
    let before = env.canary.calls();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.canary.calls(), before, "no request reaches the canary any more");

    // Git changes the spec: a new generation starts over, and a healthy canary completes.
    env.canary.set_default(Behavior::Ok);
    env.c.apply(&rollout("[{weight: 30, pause: 3s}, {weight: 100}]"))?;
    let fresh = env.reaches("Progressing", 0, Duration::from_secs(10)).await?;
    assert_eq!((fresh["attempt"].as_u64(), fresh["observedGeneration"].as_u64()), (Some(1), Some(2)));
    let t = Instant::now();
    env.reaches("Succeeded", 1, Duration::from_secs(20)).await?;
    env.weight_everywhere("canary", 100).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut seen = vec![];
    for l in loads {
        seen.extend(l.stop().await);
    }
    assert!(seen.iter().all(|(_, status, _)| *status == 200), "clients never saw an error: the fallback held");
    let during: Vec<_> = seen.iter().filter(|(at, ..)| *at > t).cloned().collect();
    assert!(share(&during, "canary") > 0.2);
    assert!(env.stable.calls() > env.canary.calls(), "the stable served most of it");
    let metrics = Client::new(format!("http://127.0.0.1:{}", env.op.metrics)).get("/metrics").await?.text();
    for line in [
        r#"bulwark_rollout_canary_weight{namespace="shop",rollout="upgrade"} 100"#,
        r#"bulwark_rollout_phase{namespace="shop",rollout="upgrade",phase="Succeeded"} 1"#,
        r#"bulwark_rollout_rollbacks_total{namespace="shop",rollout="upgrade"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    assert!(metrics.contains(r#"bulwark_rollout_analyses_total{namespace="shop",rollout="upgrade",verdict="Pass"}"#));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_bulwark_steers_a_rollout_and_a_restarted_operator_resumes_it() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(mut env) = start("bulwark-operator-controls").await? else { return Ok(()) };
    let loads = env.loads();
    env.c.apply(&rollout("[{weight: 20}, {weight: 40, pause: 5m}, {weight: 100}]"))?;
    env.reaches("Paused", 0, Duration::from_secs(10)).await?;
    let shown = env.kubectl_bulwark(&["status", "upgrade"])?;
    assert!(shown.contains("Phase:       Paused") && shown.contains("Weights:     canary 20%, stable 80%"), "{shown}");
    assert!(shown.contains("waiting for a promote"), "{shown}");
    let generation = env.c.get(NS, "modelrollout/upgrade", "{.metadata.generation}")?;

    assert_eq!(
        env.kubectl_bulwark(&["promote", "upgrade"])?.trim(),
        "modelrollout.bulwark.dev/upgrade promote requested"
    );
    let step2 = env.reaches("Progressing", 1, Duration::from_secs(5)).await?;
    env.weight_everywhere("canary", 40).await?;

    // The operator restarts mid-step: the new one resumes the same step, started when it was.
    env.op.proc.kill();
    env.op = env.c.operator("op-2", env.op.stream, &[])?;
    eventually(Duration::from_secs(15), "a new analysis by the new operator", || async {
        let s = env.status();
        (s["lastAnalysis"]["at"] != step2["lastAnalysis"]["at"] && s["lastAnalysis"]["at"].is_string()).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", env.op.proc.output()))?;
    let resumed = env.status();
    assert_eq!((resumed["phase"].as_str(), resumed["currentStep"].as_u64()), (Some("Progressing"), Some(1)));
    assert_eq!(resumed["stepStartedAt"], step2["stepStartedAt"], "the step was not restarted");
    assert_eq!(resumed["startedAt"], step2["startedAt"]);
    env.weight_everywhere("canary", 40).await?;

    assert!(env.kubectl_bulwark(&["abort", "upgrade"])?.contains("abort requested"));
    let aborted = env.reaches("Aborted", 1, Duration::from_secs(5)).await?;
    assert_eq!(aborted["canaryWeight"], 0);
    env.weight_everywhere("canary", 0).await?;
    let refused = env.kubectl_bulwark(&["promote", "upgrade"]).unwrap_err().to_string();
    assert!(refused.contains("rollout upgrade is Aborted; promote applies to a rollout in progress"), "{refused}");
    env.kubectl_bulwark(&["retry", "upgrade"])?;
    let retried = env.reaches("Paused", 0, Duration::from_secs(5)).await?;
    assert_eq!(retried["attempt"], 2);
    env.kubectl_bulwark(&["promote", "upgrade", "--full"])?;
    env.reaches("Succeeded", 2, Duration::from_secs(5)).await?;
    env.weight_everywhere("canary", 100).await?;
    let missing = env.kubectl_bulwark(&["status", "nope"]).unwrap_err().to_string();
    assert!(missing.contains("no ModelRollout \"nope\" in namespace \"shop\""), "{missing}");

    // Every control went through the status: the spec, which Git owns, never changed.
    assert_eq!(env.c.get(NS, "modelrollout/upgrade", "{.metadata.generation}")?, generation);
    for l in loads {
        assert!(l.stop().await.iter().all(|(_, status, _)| *status == 200));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_from_prometheus_judge_the_canary_and_an_unreadable_one_fails_it() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let Some(env) = start("bulwark-operator-prometheus").await? else { return Ok(()) };
    let prom = FakePrometheus::start().await?;
    prom.set(r#"backend="canary""#, 0.01);
    prom.set(r#"backend="stable""#, 0.0);
    let loads = env.loads();
    let query = r#"sum(rate(app_errors_total{namespace="$namespace",route="$route",backend="$backend"}[$window]))"#;
    let with_prometheus = |address: &str| {
        rollout("[{weight: 20, pause: 60s}, {weight: 100}]").replace(
            "minRequests: 10}",
            &format!("minRequests: 10, prometheus: {{address: \"{address}\", queries: {{errorRate: '{query}'}}}}}}"),
        )
    };
    env.c.apply(&with_prometheus(&prom.url()))?;
    let passing = eventually(Duration::from_secs(15), "an analysis on Prometheus' numbers", || async {
        let s = env.status();
        (s["lastAnalysis"]["verdict"] == "Pass").then_some(s)
    })
    .await?;
    let error_rate = &passing["lastAnalysis"]["signals"][0];
    assert_eq!((error_rate["name"].as_str(), error_rate["value"].as_f64()), (Some("errorRate"), Some(0.01)));
    // The window never reaches back before the attempt began: the first one is its age.
    let queries = prom.queries();
    let prefix = r#"sum(rate(app_errors_total{namespace="shop",route="chat",backend="canary"}["#;
    let window = |q: &String| q.strip_prefix(prefix)?.strip_suffix("s]))")?.parse::<u64>().ok();
    let windows: Vec<u64> = queries.iter().filter_map(window).collect();
    assert!(!windows.is_empty() && windows[0] <= 3 && windows.iter().all(|w| *w <= 6), "{queries:?}");
    // The sidecars see nothing wrong; Prometheus does, and that decides.
    prom.set(r#"backend="canary""#, 0.4);
    let back = env.reaches("RolledBack", 0, Duration::from_secs(10)).await?;
    assert!(back["message"].as_str().unwrap().contains("errorRate 0.400 > 0.050"), "{back}");
    env.weight_everywhere("canary", 0).await?;

    // A Prometheus that does not answer: the signals cannot be read, and the canary gets nothing.
    let dead = format!("http://127.0.0.1:{}", free_port()?);
    env.c.apply(&with_prometheus(&dead))?;
    let failed = env.reaches("Failed", 0, Duration::from_secs(15)).await?;
    let message = failed["message"].as_str().unwrap();
    assert!(message.contains("the signals could not be read: errorRate of the canary: "), "{message}");
    assert_eq!(failed["lastAnalysis"]["verdict"], "Error");
    env.weight_everywhere("canary", 0).await?;
    for l in loads {
        l.stop().await;
    }
    Ok(())
}
