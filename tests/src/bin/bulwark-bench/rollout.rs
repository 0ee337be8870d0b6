//! Rollout benchmarks:
//!
//! * Time to rollback: from the first failing canary request to the last canary request, over
//!   repeated runs, standalone (the sidecar drives on its own counters) and in operator mode
//!   (the operator drives on reports that sidecars send every 5 s, the default, and at most
//!   500 ms after a failure), next to the
//!   bound of `interval` + 5 s. Each run is a new generation of the rollout; the canary starts
//!   failing at a random moment of the analysis interval.
//! * The sidecar's added latency with a rollout in progress against none: two sidecar
//!   processes on one upstream, in interleaved open-loop rounds.

use std::{path::Path, time::Duration};

use bulwark_api::ModelRollout;
use bulwark_tests::{
    client::Client as TestClient,
    cluster::tls,
    harness::{Harness, temp_dir},
    mock::{Behavior, MockProvider},
    traffic::Load,
};
use http_body_util::Full;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use kube::api::{Api, Patch, PatchParams};
use rand::Rng as _;
use serde_json::Value;
use tokio::time::Instant;

use crate::control;

const RUNS: usize = 5;
const INTERVAL_S: u64 = 2;
const NS: &str = "bench";
const GAP: Duration = Duration::from_millis(5);

pub async fn bench(bin: &Path, rate: u64) -> anyhow::Result<()> {
    println!("\n== Time to rollback: first failing canary request → last canary request ({RUNS} runs each)");
    let standalone = standalone().await?;
    report("standalone (the sidecar drives)", &standalone);
    let operator = operator().await?;
    report("operator (5 s reports, failures early)", &operator);
    overhead(bin, rate).await
}

fn report(what: &str, runs: &[Duration]) {
    let mut ms: Vec<f64> = runs.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "  {what:<34} min {:6.0} ms   median {:6.0} ms   max {:6.0} ms   bound {} ms (interval {INTERVAL_S} s + 5 s): {}",
        ms[0],
        control::pct(&ms, 0.5),
        ms[ms.len() - 1],
        (INTERVAL_S + 5) * 1000,
        if ms[ms.len() - 1] <= ((INTERVAL_S + 5) * 1000) as f64 { "met" } else { "MISSED" }
    );
}

fn route(ns: &str, stable: &str, canary: &str) -> String {
    format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: chat, namespace: {ns}}}\nspec:\n  backends: [{{name: canary, url: '{canary}'}}]\n  rules:\n  - backends: [{{name: stable, url: '{stable}'}}]\n    fallback: [{{backend: stable}}]\n"
    )
}

/// Run `run`'s rollout: half the traffic to the canary, for good (a new generation each run).
fn rollout(ns: &str, run: usize) -> String {
    format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: upgrade, namespace: {ns}}}\nspec:\n  routeRef: {{name: chat}}\n  stable: {{backend: stable}}\n  canary: {{backend: canary}}\n  steps: [{{weight: 50, pause: {}s}}, {{weight: 100}}]\n  analysis: {{interval: {INTERVAL_S}s, window: 10s, minRequests: 20}}\n",
        3600 + run
    )
}

/// One run: healthy traffic for a random while, then the canary fails; how long it got requests.
async fn run_once<F, Fut>(canary: &MockProvider, phase: F) -> anyhow::Result<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while phase().await.as_deref() != Some("Progressing") {
        anyhow::ensure!(Instant::now() < deadline, "the rollout did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let healthy = rand::rng().random_range(6_000..6_000 + INTERVAL_S * 1000);
    tokio::time::sleep(Duration::from_millis(healthy)).await;
    let flipped = Instant::now();
    canary.set_default(Behavior::Status(500, None));
    while phase().await.as_deref() != Some("RolledBack") {
        anyhow::ensure!(Instant::now() < flipped + Duration::from_secs(30), "no rollback within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = canary.recorded();
    let first = calls.iter().map(|c| c.at).find(|at| *at >= flipped).unwrap_or(flipped);
    let last = calls.iter().map(|c| c.at).max().unwrap_or(first);
    canary.set_default(Behavior::Ok);
    Ok(last.saturating_duration_since(first))
}

async fn mocks() -> (MockProvider, MockProvider) {
    let at = ([127, 0, 0, 1], 0).into();
    (
        MockProvider::start_with("stable", 2, Duration::ZERO, at).await,
        MockProvider::start_with("canary", 2, Duration::ZERO, at).await,
    )
}

async fn standalone() -> anyhow::Result<Vec<Duration>> {
    let (stable, canary) = mocks().await;
    let base = route("bench", &stable.url(), &canary.url());
    let h = Harness::start("bulwark-bench-rollback", &format!("{base}---\n{}", rollout(NS, 0)), |o| {
        o.reload_interval = Duration::from_millis(100);
    })
    .await?;
    let loads: Vec<Load> = (0..3).map(|_| Load::start(h.client.clone(), &[], GAP)).collect();
    let mut runs = vec![];
    for run in 0..RUNS {
        if run > 0 {
            h.reload(&format!("{base}---\n{}", rollout(NS, run))).await?;
        }
        let phase = || async {
            let list = h.admin.get("/rollouts").await.ok()?.json();
            list[0]["phase"].as_str().map(str::to_owned)
        };
        runs.push(run_once(&canary, phase).await?);
    }
    for l in loads {
        l.stop().await;
    }
    h.sidecar.shutdown().await;
    Ok(runs)
}

async fn operator() -> anyhow::Result<Vec<Duration>> {
    let dir = temp_dir("bulwark-bench-rollback-op")?;
    let (_api, client) = control::cluster().await?;
    control::namespace(&client, NS).await?;
    let certs = tls(&dir)?;
    let op = control::operator(&client, &certs).await?;
    let (stable, canary) = mocks().await;
    let apply = |yaml: String| {
        let client = client.clone();
        async move {
            let body: Value = serde_yaml::from_str(&yaml)?;
            let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let pp = PatchParams::apply("bulwark-bench").force();
            match body["kind"].as_str() {
                Some("ModelRollout") => {
                    Api::<ModelRollout>::namespaced(client, NS).patch(&name, &pp, &Patch::Apply(&body)).await?;
                }
                _ => control::apply_route(&client, NS, &body).await?,
            }
            anyhow::Ok(())
        }
    };
    apply(route(NS, &stable.url(), &canary.url())).await?;
    let mut sidecars = vec![];
    for i in 0..2 {
        let pod = format!("bot-{i}");
        control::pod(&client, NS, &pod, "bot").await?;
        sidecars.push(control::sidecar(&client, &op, &certs, NS, &pod, &dir, Duration::from_secs(5)).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while sidecars.iter().any(|s| s.runtime.borrow().config.routes.is_empty()) {
        anyhow::ensure!(Instant::now() < deadline, "sidecars did not get their first config");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let loads: Vec<Load> = sidecars
        .iter()
        .flat_map(|s| (0..2).map(move |_| Load::start(TestClient::new(format!("http://{}", s.proxy_addr)), &[], GAP)))
        .collect();
    let rollouts: Api<ModelRollout> = Api::namespaced(client.clone(), NS);
    let mut runs = vec![];
    for run in 0..RUNS {
        apply(rollout(NS, run)).await?;
        let generation = rollouts.get("upgrade").await?.metadata.generation;
        let phase = || async {
            let r = rollouts.get("upgrade").await.ok()?;
            let s = r.status?;
            (s.observed_generation == generation).then(|| s.phase.map(|p| p.as_str().to_owned()))?
        };
        runs.push(run_once(&canary, phase).await?);
    }
    for l in loads {
        l.stop().await;
    }
    for s in sidecars {
        s.shutdown().await;
    }
    op.shutdown().await;
    Ok(runs)
}

/// Added latency of a sidecar whose route is in a rollout against one whose route is not.
async fn overhead(bin: &Path, rate: u64) -> anyhow::Result<()> {
    let up = crate::upstream(Instant::now()).await?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build(http);
    let url = format!("http://{up}/v1");
    let plain = route("default", &url, &url).replace("name: chat", "name: bench");
    // The rollout never gathers enough requests to move: it stays in progress at 50%.
    let in_progress = format!(
        "{plain}---\napiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: upgrade}}\nspec:\n  routeRef: {{name: bench}}\n  stable: {{backend: stable}}\n  canary: {{backend: canary}}\n  steps: [{{weight: 50, pause: 1h}}, {{weight: 100}}]\n  analysis: {{interval: 1s, window: 10s, minRequests: 100000000}}\n"
    );
    let (_a, without) = crate::start_sidecar(bin, &plain, &client).await?;
    let (_b, with) = crate::start_sidecar(bin, &in_progress, &client).await?;
    let direct = format!("http://{up}");
    let targets = [direct.as_str(), without.as_str(), with.as_str()];
    for t in targets {
        let _ = crate::open_loop(&client, t, rate, 1).await;
    }
    let mut samples: Vec<Vec<u64>> = vec![vec![]; 3];
    for _ in 0..10 {
        for (i, t) in targets.iter().enumerate() {
            samples[i].extend(crate::open_loop(&client, t, rate, 1).await);
        }
    }
    samples.iter_mut().for_each(|s| s.sort_unstable());
    let added = |i: usize, p: f64| crate::pct(&samples[i], p) - crate::pct(&samples[0], p);
    println!("\n== A rollout in progress: added latency over a direct call at {rate} req/s (µs)");
    println!("  no rollout                    p50 {:6.0}   p99 {:6.0}", added(1, 0.5), added(1, 0.99));
    println!("  rollout in progress (50%)     p50 {:6.0}   p99 {:6.0}", added(2, 0.5), added(2, 0.99));
    println!(
        "  difference                    p50 {:+6.0}   p99 {:+6.0}   target: no measurable difference",
        added(2, 0.5) - added(1, 0.5),
        added(2, 0.99) - added(1, 0.99)
    );
    Ok(())
}
