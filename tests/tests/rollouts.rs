//! Standalone rollouts end to end: the `bulwark-sidecar` binary on a directory holding a route
//! and a ModelRollout, mock providers as the stable and the canary, traffic from a client, and
//! everything observed from outside: `x-bulwark-backend`, `GET /rollouts` and `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bulwark_tests::{
    client::Client,
    cluster::{Proc, bin, eventually, free_port},
    harness::temp_dir,
    mock::{Behavior, MockProvider},
    traffic::{Load, Seen, share},
};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The rollouts share two cores with each other: one at a time keeps the timings honest.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn route(stable: &MockProvider, canary: &MockProvider) -> String {
    format!(
        r#"apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {{name: chat, namespace: team-a}}
spec:
  backends: [{{name: canary, url: "{}"}}]
  rules:
    - backends: [{{name: stable, url: "{}"}}]
      fallback: [{{backend: stable}}]
"#,
        canary.url(),
        stable.url()
    )
}

fn rollout(spec: &str) -> String {
    format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: upgrade, namespace: team-a}}\nspec:\n  routeRef: {{name: chat}}\n  stable: {{backend: stable}}\n  canary: {{backend: canary}}\n{spec}"
    )
}

/// Between one client request and the next.
const GAP: Duration = Duration::from_millis(10);

const ANALYSIS: &str = "  analysis: {interval: 1s, window: 4s, minRequests: 5}\n";

struct Sidecar {
    proc: Proc,
    client: Client,
    admin: Client,
}

impl Sidecar {
    fn start(dir: &std::path::Path, state: &std::path::Path) -> Self {
        let (listen, admin) = (free_port().unwrap(), free_port().unwrap());
        let args = [
            format!("--manifests={}", dir.join("manifests").display()),
            format!("--state-dir={}", state.display()),
            format!("--listen=127.0.0.1:{listen}"),
            format!("--admin=127.0.0.1:{admin}"),
            "--reload-interval=100ms".into(),
        ];
        let proc = Proc::spawn(dir, "sidecar", &bin("bulwark-sidecar").unwrap(), &args, &[]).unwrap();
        let client = Client::new(format!("http://127.0.0.1:{listen}"));
        let admin = Client::new(format!("http://127.0.0.1:{admin}"));
        Self { proc, client, admin }
    }

    async fn ready(&self) {
        let ready = eventually(Duration::from_secs(10), "the sidecar to be ready", || async {
            self.admin.get("/ready").await.ok().filter(|r| r.status == 200)
        });
        ready.await.unwrap_or_else(|e| panic!("{e}\n{}", self.proc.output()));
    }

    async fn rollout(&self) -> Value {
        let list = self.admin.get("/rollouts").await.unwrap().json();
        list.as_array().and_then(|l| l.first()).cloned().unwrap_or(Value::Null)
    }

    /// Waits until the rollout is in `phase` (and, if given, at `step`).
    async fn reaches(&self, phase: &str, step: Option<u64>, limit: Duration) -> Value {
        let what = format!("phase {phase} at step {step:?}");
        let found = eventually(limit, &what, || async {
            let r = self.rollout().await;
            (r["phase"] == phase && step.is_none_or(|s| r["currentStep"] == s)).then_some(r)
        });
        match found.await {
            Ok(r) => r,
            Err(e) => panic!("{e}: {}\n{}", self.rollout().await, self.proc.output()),
        }
    }

    async fn post(&self, path: &str) -> (u16, String) {
        let r = self.admin.post(path, &json!({}), &[]).await.unwrap();
        (r.status.as_u16(), r.text())
    }
}

struct Setup {
    dir: std::path::PathBuf,
    state: std::path::PathBuf,
    stable: MockProvider,
    canary: MockProvider,
}

async fn setup(name: &str, rollout_spec: &str) -> Setup {
    let dir = temp_dir(name).unwrap();
    let state = dir.join("state");
    let stable = MockProvider::start_with("stable", 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    let canary = MockProvider::start_with("canary", 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    std::fs::write(dir.join("manifests/route.yaml"), route(&stable, &canary)).unwrap();
    std::fs::write(dir.join("manifests/rollout.yaml"), rollout(rollout_spec)).unwrap();
    Setup { dir, state, stable, canary }
}

/// The backend is drawn by weight per request: `backend`'s share of `seen` is within 4.5
/// standard deviations of `weight` (a false alarm in about one run in 150,000).
fn near(seen: &[Seen], backend: &str, weight: f64, what: &str) {
    let n = seen.len() as f64;
    assert!(n >= 30.0, "{what}: only {n} answers");
    let bound = 4.5 * (weight * (1.0 - weight) / n).sqrt();
    let got = share(seen, backend);
    assert!((got - weight).abs() <= bound, "{what}: {got:.3} of {n} answers, {weight} ± {bound:.3}");
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_completes_its_steps() {
    let _serial = SERIAL.lock().await;
    let steps = "  steps: [{weight: 30, pause: 2s}, {weight: 60, pause: 2s}, {weight: 100}]\n";
    let s = setup("bulwark-rollout-healthy", &format!("{steps}{ANALYSIS}")).await;
    let sidecar = Sidecar::start(&s.dir, &s.state);
    sidecar.ready().await;
    let first = sidecar.rollout().await;
    assert_eq!((first["namespace"].as_str(), first["name"].as_str()), (Some("team-a"), Some("upgrade")));
    assert_eq!((first["phase"].as_str(), first["canaryWeight"].as_u64()), (Some("Progressing"), Some(30)));
    let load = Load::start(sidecar.client.clone(), &[], GAP);
    let t0 = Instant::now();
    sidecar.reaches("Progressing", Some(1), Duration::from_secs(15)).await;
    let step0 = load.since(t0);
    let t1 = Instant::now();
    let done = sidecar.reaches("Succeeded", Some(2), Duration::from_secs(15)).await;
    let step1 = load.since(t1);
    let t2 = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = load.stop().await;
    let after: Vec<Seen> = seen.iter().filter(|(at, ..)| *at > t2).cloned().collect();
    assert!(seen.iter().all(|(_, status, _)| *status == 200));
    near(&step0, "canary", 0.3, "step 1 at 30%");
    near(&step1, "canary", 0.6, "step 2 at 60%");
    assert!(!after.is_empty());
    assert_eq!(share(&after, "canary"), 1.0, "the last step: all traffic to the canary: {after:?}");
    assert_eq!(done["canaryWeight"], 100);
    assert_eq!(done["lastAnalysis"]["verdict"], "Pass");
    assert!(done["lastAnalysis"]["canaryRequests"].as_u64().unwrap() >= 5);
    let m = sidecar.admin.get("/metrics").await.unwrap().text();
    assert_eq!(metric(&m, r#"bulwark_rollout_canary_weight{rollout="team-a/upgrade"}"#), Some(100.0), "{m}");
    assert_eq!(metric(&m, r#"bulwark_rollout_phase{rollout="team-a/upgrade",phase="Succeeded"}"#), Some(1.0));
    assert_eq!(metric(&m, r#"bulwark_rollout_phase{rollout="team-a/upgrade",phase="Progressing"}"#), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_starts_failing_at_step_two_is_rolled_back_within_the_bound() {
    let _serial = SERIAL.lock().await;
    let steps = "  steps: [{weight: 30, pause: 2s}, {weight: 50, pause: 60s}, {weight: 100}]\n";
    let s = setup("bulwark-rollout-failing", &format!("{steps}{ANALYSIS}")).await;
    let sidecar = Sidecar::start(&s.dir, &s.state);
    sidecar.ready().await;
    let load = Load::start(sidecar.client.clone(), &[], GAP);
    sidecar.reaches("Progressing", Some(1), Duration::from_secs(15)).await;
    let flipped = Instant::now();
    s.canary.set_default(Behavior::Status(500, None));
    let rolled_back = sidecar.reaches("RolledBack", Some(1), Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = load.since(Instant::now() - Duration::from_millis(500));
    let seen = load.stop().await;
    assert_eq!(rolled_back["canaryWeight"], 0);
    let message = rolled_back["message"].as_str().unwrap();
    assert!(message.starts_with("rolled back at step 2 of 3 (canary at 50%): errorRate "), "{message}");
    assert!(message.contains(" > 0.050 over "), "the signal, its value and the threshold: {message}");
    let failed: Vec<_> =
        rolled_back["lastAnalysis"]["signals"].as_array().unwrap().iter().filter(|s| s["verdict"] == "Fail").collect();
    assert_eq!(failed[0]["name"], "errorRate");
    // The bound: from the first failing canary request to the last canary request.
    let calls = s.canary.recorded();
    let first_failing = calls.iter().map(|c| c.at).find(|at| *at >= flipped).unwrap();
    let last = calls.iter().map(|c| c.at).max().unwrap();
    let took = last.duration_since(first_failing);
    assert!(took <= Duration::from_secs(1 + 5), "rolled back {took:?} after the first failing request");
    eprintln!("time to rollback: {took:?} (bound: interval 1 s + 5 s)");
    assert!(after.iter().all(|(_, status, b)| *status == 200 && b == "stable"), "after the rollback: stable only");
    assert!(seen.iter().all(|(_, status, _)| *status == 200), "the fallback kept every client request whole");
    let still = sidecar.reaches("RolledBack", Some(1), Duration::from_secs(1)).await;
    assert_eq!(still["canaryWeight"], 0, "it stays rolled back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_canary_is_judged_on_copies_no_client_sees() {
    let _serial = SERIAL.lock().await;
    let steps = "  steps: [{weight: 0, mirror: 100, pause: 2s}, {weight: 100}]\n";
    let s = setup("bulwark-rollout-mirror", &format!("{steps}{ANALYSIS}")).await;
    s.canary.set_default(Behavior::Status(503, None));
    let sidecar = Sidecar::start(&s.dir, &s.state);
    sidecar.ready().await;
    let load = Load::start(sidecar.client.clone(), &[], GAP);
    let rolled_back = sidecar.reaches("RolledBack", Some(0), Duration::from_secs(10)).await;
    let seen = load.stop().await;
    assert!(seen.iter().all(|(_, status, b)| *status == 200 && b == "stable"), "no client saw the canary");
    assert!(s.canary.calls() >= 5, "the canary got copies: {}", s.canary.calls());
    assert!(rolled_back["lastAnalysis"]["canaryRequests"].as_u64().unwrap() >= 5);
    let m = sidecar.admin.get("/metrics").await.unwrap().text();
    assert!(
        metric(&m, r#"bulwark_mirrored_requests_total{route="team-a/chat",backend="canary""#).unwrap_or(0.0) >= 5.0,
        "{m}"
    );

    // A healthy canary behind a mirror goes on to take the traffic.
    let s = setup("bulwark-rollout-mirror-ok", &format!("{steps}{ANALYSIS}")).await;
    let sidecar = Sidecar::start(&s.dir, &s.state);
    sidecar.ready().await;
    let load = Load::start(sidecar.client.clone(), &[], GAP);
    let t0 = Instant::now();
    sidecar.reaches("Succeeded", Some(1), Duration::from_secs(15)).await;
    let during = load.since(t0);
    let mirrored_calls = s.canary.calls();
    load.stop().await;
    assert!(mirrored_calls >= 5);
    let served_by_canary = during.iter().filter(|(_, _, b)| b == "canary").count();
    assert!(served_by_canary < during.len(), "the stable answered during the mirror step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_previews_by_header_then_switches_at_once() {
    let _serial = SERIAL.lock().await;
    let spec = format!("  strategy: blueGreen\n  preview: {{pause: 2s}}\n{ANALYSIS}");
    let s = setup("bulwark-rollout-bluegreen", &spec).await;
    let sidecar = Sidecar::start(&s.dir, &s.state);
    sidecar.ready().await;
    let users = Load::start(sidecar.client.clone(), &[], GAP);
    let testers = Load::start(sidecar.client.clone(), &[("x-bulwark-preview", "true")], GAP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(share(&users.since(Instant::now() - Duration::from_secs(10)), "stable"), 1.0, "users see the stable");
    assert_eq!(
        share(&testers.since(Instant::now() - Duration::from_secs(10)), "canary"),
        1.0,
        "previews see the canary"
    );
    sidecar.reaches("Succeeded", Some(1), Duration::from_secs(15)).await;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = users.stop().await.into_iter().filter(|(at, ..)| *at > t).collect::<Vec<_>>();
    testers.stop().await;
    // The status says Succeeded once the config that switches serves: every user request sent
    // after it reaches the canary.
    assert!(!after.is_empty());
    assert_eq!(share(&after, "canary"), 1.0, "switched at once: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_waits_for_a_promote_and_a_restart_resumes_where_it_was() {
    let _serial = SERIAL.lock().await;
    let s = setup("bulwark-rollout-controls", &format!("  steps: [{{weight: 20}}, {{weight: 100}}]\n{ANALYSIS}")).await;
    let mut sidecar = Sidecar::start(&s.dir, &s.state);
    sidecar.ready().await;
    let paused = sidecar.reaches("Paused", Some(0), Duration::from_secs(5)).await;
    assert_eq!(paused["message"], "step 1 of 2 (canary at 20%): waiting for a promote (analysis goes on)");
    assert_eq!(sidecar.post("/rollouts/team-a/upgrade/pause").await.0, 200);
    sidecar.proc.terminate().unwrap();
    let sidecar = Sidecar::start(&s.dir, &s.state);
    sidecar.ready().await;
    let resumed = sidecar.rollout().await;
    assert_eq!(resumed["phase"], "Paused");
    assert_eq!(resumed["startedAt"], paused["startedAt"], "the same attempt, not a new start");
    assert_eq!(resumed["stepStartedAt"], paused["stepStartedAt"]);
    assert_eq!(resumed["controls"]["paused"], true, "a pause outlives a restart");
    assert_eq!(
        sidecar.post("/rollouts/team-a/upgrade/retry").await,
        (
            400,
            "rollout team-a/upgrade is Paused; only a rolled back, aborted or failed rollout can be retried\n"
                .to_owned()
        )
    );
    assert_eq!(sidecar.post("/rollouts/team-a/upgrade/resume").await.0, 200);
    assert_eq!(sidecar.post("/rollouts/team-a/nope/promote").await, (400, "no rollout team-a/nope\n".to_owned()));
    assert_eq!(sidecar.post("/rollouts/team-a/upgrade/jump").await.0, 400);
    assert_eq!(sidecar.post("/rollouts/team-a/upgrade/promote").await.0, 200);
    let done = sidecar.reaches("Succeeded", Some(1), Duration::from_secs(5)).await;
    assert_eq!(done["canaryWeight"], 100);
    // A changed spec is a new generation: it starts over.
    let file = s.dir.join("manifests/rollout.yaml");
    let changed = std::fs::read_to_string(&file).unwrap().replace("weight: 20", "weight: 10");
    std::fs::write(&file, changed).unwrap();
    let again = sidecar.reaches("Paused", Some(0), Duration::from_secs(5)).await;
    assert_eq!((again["canaryWeight"].as_u64(), again["generation"].as_u64()), (Some(10), Some(2)));
    let _ = s.stable.calls();
}

#[tokio::test]
async fn a_standalone_sidecar_refuses_signals_it_cannot_read() {
    let spec = "  steps: [{weight: 10}]\n  analysis:\n    prometheus: {address: 'http://prometheus:9090', queries: {errorRate: 'x'}}\n";
    let yaml = format!("{}---\n{}", route_yaml_for_refusal(), rollout(spec));
    let err = bulwark_tests::harness::Harness::start("bulwark-rollout-prometheus", &yaml, |_| {}).await.err().unwrap();
    assert!(
        err.to_string().contains(
            "ModelRollout team-a/upgrade: spec.analysis.prometheus is read by the operator; a standalone sidecar judges the canary on its own counters, so remove it here"
        ),
        "{err}"
    );
}

fn route_yaml_for_refusal() -> String {
    "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {name: chat, namespace: team-a}\nspec:\n  backends: [{name: canary, url: 'http://127.0.0.1:9/v1'}]\n  rules: [{backends: [{name: stable, url: 'http://127.0.0.1:9/v1'}]}]\n".to_owned()
}
