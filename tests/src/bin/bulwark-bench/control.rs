//! Control-plane benchmarks against the project's test API server:
//!
//! * Config propagation: from a route change written to the API to each of 100 connected
//!   sidecars (in this process, over TLS) running it; p50 and p99, against the 60–90 s a
//!   ConfigMap volume takes to refresh (kubelet sync period; not measurable without a kubelet).
//! * Scale: 1,000 routes and 1,000 sidecar pods: a full recompile of the in-memory index, and the
//!   resident memory of the `bulwark-operator` binary holding them.

use std::{path::Path, time::Duration};

use bulwark_api::LLMRoute;
use bulwark_operator::{Operator, Settings, index::Index};
use bulwark_sidecar::{Options, Sidecar, Source, control::OperatorLink};
use bulwark_test_apiserver::{ApiServer, Options as ApiOptions};
use bulwark_tests::{
    cluster::{Proc, free_port, repo, tls},
    harness::temp_dir,
    procfs::rss_kib,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::time::Instant;

const SIDECARS: usize = 100;
const CHANGES: usize = 30;

pub(crate) async fn cluster() -> anyhow::Result<(ApiServer, Client)> {
    let api =
        ApiServer::start(ApiOptions { listen: ([127, 0, 0, 1], 0).into(), crd_dirs: vec![repo().join("crds/yaml")] })
            .await?;
    let client = Client::try_from(kube::Config::new(api.url().parse()?))?;
    Ok((api, client))
}

pub(crate) async fn namespace(client: &Client, ns: &str) -> anyhow::Result<()> {
    let body: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &body).await?;
    Ok(())
}

/// A sidecar pod of Deployment `app` (through its ReplicaSet, as a cluster would create it).
pub(crate) async fn pod(client: &Client, ns: &str, name: &str, app: &str) -> anyhow::Result<()> {
    let owner = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-6c8b9"),
        "uid": format!("rs-{ns}-{app}"), "controller": true});
    let body: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app, "bulwark.dev/inject": "true", "pod-template-hash": "6c8b9"},
            "ownerReferences": [owner]},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "example/app"}]}
    }))?;
    Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), &body).await?;
    Ok(())
}

fn route(ns: &str, name: &str, app: Option<&str>, weight: u32) -> serde_json::Value {
    let mut spec = json!({"rules": [{"backends": [
        {"name": "a", "url": "http://127.0.0.1:9/v1", "weight": weight},
        {"name": "b", "url": "http://127.0.0.1:10/v1", "weight": 100 - weight}
    ]}]});
    if let Some(app) = app {
        spec["workloadSelector"] = json!({"matchLabels": {"app": app}});
    }
    json!({"apiVersion": "bulwark.dev/v1alpha1", "kind": "LLMRoute", "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

pub(crate) async fn apply_route(client: &Client, ns: &str, body: &serde_json::Value) -> anyhow::Result<()> {
    let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let pp = PatchParams::apply("bulwark-bench").force();
    Api::<LLMRoute>::namespaced(client.clone(), ns).patch(&name, &pp, &Patch::Apply(body)).await?;
    Ok(())
}

pub(crate) async fn token(client: &Client, ns: &str, pod: &str, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["bulwark"], "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod}}});
    let out: serde_json::Value = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_subresource("token", "default", &PostParams::default(), &req)
        .await?;
    let path = dir.join(format!("token-{pod}"));
    std::fs::write(&path, out["status"]["token"].as_str().unwrap_or_default())?;
    Ok(path)
}

/// The operator in this process, leading alone, its stream on TLS.
pub(crate) async fn operator(client: &Client, certs: &bulwark_tests::cluster::Tls) -> anyhow::Result<Operator> {
    let settings = Settings {
        watch_secrets: true,
        namespace: None,
        stream_listen: ([127, 0, 0, 1], 0).into(),
        metrics_listen: ([127, 0, 0, 1], 0).into(),
        tls: Some((certs.cert.clone(), certs.key.clone())),
        tls_ca: Some(certs.ca.clone()),
        token_audience: "bulwark".into(),
        compile: Default::default(),
        leader: None,
        identity: "bench".into(),
        resync: Duration::from_secs(300),
        webhook: None,
        servers: Default::default(),
    };
    Operator::start(client.clone(), settings).await
}

/// A sidecar in this process for `pod`, on the operator's stream, reporting every `report`.
pub(crate) async fn sidecar(
    client: &Client,
    op: &Operator,
    certs: &bulwark_tests::cluster::Tls,
    ns: &str,
    pod: &str,
    dir: &Path,
    report: Duration,
) -> anyhow::Result<Sidecar> {
    let mut opts = Options::new(Source::None);
    opts.listen = ([127, 0, 0, 1], 0).into();
    opts.admin = ([127, 0, 0, 1], 0).into();
    opts.operator = Some(OperatorLink {
        url: format!("https://localhost:{}", op.stream_addr.port()),
        ca: Some(bulwark_sidecar::upstream::Ca::File(certs.ca.clone())),
        token_file: token(client, ns, pod, dir).await?,
        report_interval: report,
    });
    Sidecar::start(opts).await
}

pub(crate) fn pct(sorted: &[f64], q: f64) -> f64 {
    sorted.get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or(f64::NAN)
}

pub async fn bench(bin: &Path) -> anyhow::Result<()> {
    propagation().await?;
    scale(bin).await
}

async fn propagation() -> anyhow::Result<()> {
    let dir = temp_dir("bulwark-bench-control")?;
    let (_api, client) = cluster().await?;
    namespace(&client, "bench").await?;
    for i in 0..SIDECARS {
        pod(&client, "bench", &format!("p-{i}"), "bot").await?;
    }
    let certs = tls(&dir)?;
    let op = operator(&client, &certs).await?;
    apply_route(&client, "bench", &route("bench", "chat", Some("bot"), 100)).await?;
    let mut sidecars = vec![];
    for i in 0..SIDECARS {
        let pod = format!("p-{i}");
        sidecars.push(sidecar(&client, &op, &certs, "bench", &pod, &dir, Duration::from_secs(5)).await?);
    }
    let mut rxs: Vec<_> = sidecars.iter().map(|s| s.runtime.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rxs.iter().any(|r| r.borrow().config.routes.is_empty()) {
        anyhow::ensure!(Instant::now() < deadline, "sidecars did not get their first config");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut each = vec![];
    let mut all = vec![];
    for change in 0..CHANGES {
        let old = rxs[0].borrow_and_update().config.version.clone();
        rxs.iter_mut().for_each(|r| {
            r.borrow_and_update();
        });
        let started = Instant::now();
        apply_route(&client, "bench", &route("bench", "chat", Some("bot"), (change as u32 % 99) + 1)).await?;
        let waits = rxs.iter().cloned().map(|mut rx| {
            let old = old.clone();
            tokio::spawn(async move {
                while rx.borrow_and_update().config.version == old {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
                started.elapsed()
            })
        });
        let waits: Vec<_> = waits.collect();
        let mut last = Duration::ZERO;
        for w in waits {
            let d = tokio::time::timeout(Duration::from_secs(10), w).await??;
            each.push(d.as_secs_f64() * 1e3);
            last = last.max(d);
        }
        all.push(last.as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    each.sort_by(f64::total_cmp);
    all.sort_by(f64::total_cmp);
    println!(
        "\n== Config propagation: route change written → applied by each of {SIDECARS} sidecars ({CHANGES} changes, TLS, HTTP/2)"
    );
    println!("  per sidecar:        p50 {:7.2} ms   p99 {:7.2} ms", pct(&each, 0.5), pct(&each, 0.99));
    println!("  all {SIDECARS} sidecars:    p50 {:7.2} ms   p99 {:7.2} ms", pct(&all, 0.5), pct(&all, 0.99));
    println!(
        "  vs a ConfigMap volume refresh (kubelet sync, 60 s at best): {:.0}x faster at p99 (target: p99 < 1 s, ≥ 60x)",
        60_000.0 / pct(&all, 0.99)
    );
    for s in sidecars {
        s.shutdown().await;
    }
    op.shutdown().await;
    Ok(())
}

const NAMESPACES: usize = 50;
const ROUTES: usize = 1000;
const PODS: usize = 1000;

/// Route `i` of the scale run, and its namespace: 50 namespaces of 20 routes each, most selecting
/// one app label and a fifth selecting every sidecar of the namespace.
fn scale_route(i: usize) -> (String, serde_json::Value) {
    let ns = format!("ns-{}", i % NAMESPACES);
    let app = (!(i / NAMESPACES).is_multiple_of(5)).then(|| format!("app-{}", i % 10));
    let body = route(&ns, &format!("r-{i}"), app.as_deref(), 50);
    (ns, body)
}

/// The value of one series (name and labels, exactly) in Prometheus text; 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn scale(bin: &Path) -> anyhow::Result<()> {
    // The compile alone, in memory, with 20 pods per namespace.
    let mut ix = Index::default();
    for i in 0..ROUTES {
        ix.apply_route(serde_json::from_value(scale_route(i).1)?);
    }
    for i in 0..PODS {
        let labels = [("app".to_owned(), format!("app-{}", i % 10))].into();
        ix.apply_pod(&format!("ns-{}", i % NAMESPACES), &format!("p-{i}"), labels);
    }
    let mut times = vec![];
    let mut groups = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let (g, _) = ix.compile();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        groups = g.len();
    }
    times.sort_by(f64::total_cmp);
    println!("\n== Scale: {ROUTES} routes, {PODS} sidecar pods, {NAMESPACES} namespaces ({groups} groups)");
    println!("  full recompile (in memory):       median {:7.1} ms", times[times.len() / 2]);

    // The operator binary holding them, fed by the API server.
    let (api, client) = cluster().await?;
    for n in 0..NAMESPACES {
        namespace(&client, &format!("ns-{n}")).await?;
    }
    for i in 0..ROUTES {
        let (ns, body) = scale_route(i);
        apply_route(&client, &ns, &body).await?;
    }
    for i in 0..PODS {
        pod(&client, &format!("ns-{}", i % NAMESPACES), &format!("p-{i}"), &format!("app-{}", i % 10)).await?;
    }
    let dir = temp_dir("bulwark-bench-scale")?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let metrics = free_port()?;
    let started = Instant::now();
    let op = Proc::spawn(
        &dir,
        "operator",
        &bin.join("bulwark-operator"),
        &[
            format!("--metrics-listen=127.0.0.1:{metrics}"),
            format!("--stream-listen=127.0.0.1:{}", free_port()?),
            "--leader-elect=false".into(),
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap_or_default()), ("BULWARK_LOG", "warn")],
    )?;
    let http = bulwark_tests::client::Client::new(format!("http://127.0.0.1:{metrics}"));
    let mut text = String::new();
    while sample(&text, r#"bulwark_operator_writes_total{kind="status",result="success"}"#) < ROUTES as f64 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the operator did not write every status:\n{}",
            op.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = http.get("/metrics").await.map(|r| r.text()).unwrap_or_default();
    }
    let synced = started.elapsed();
    let copies = sample(&text, r#"bulwark_operator_writes_total{kind="ConfigMap",result="success"}"#);
    let rss = rss_kib(op.pid()).unwrap_or(0);
    let sum = sample(&text, "bulwark_operator_reconcile_duration_seconds_sum");
    let count = sample(&text, "bulwark_operator_reconcile_duration_seconds_count");
    println!(
        "  operator: started → {copies} workload ConfigMaps and {ROUTES} statuses written in {:.1} s; mean compile {:.1} ms over {count} compiles",
        synced.as_secs_f64(),
        sum / count.max(1.0) * 1e3
    );
    println!("  operator RSS holding them:        {:7.1} MB (target < 100 MB)", rss as f64 / 1024.0);
    Ok(())
}
