#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! End to end without a cluster: the test API server, real kubectl, the operator binary and
//! sidecar processes, with mock providers upstream.

use std::time::Duration;

use tokio::time::Instant;

use bulwark_tests::{
    client::Client,
    cluster::{Cluster, SidecarProc, eventually, free_port},
    mock::MockProvider,
};
use serde_json::{Value, json};

const NS: &str = "shop";

fn pods(names: &[&str]) -> String {
    let mut out = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n");
    for name in names {
        out += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{app: bot, bulwark.dev/inject: \"true\"}}\nspec:\n  serviceAccountName: default\n  containers: [{{name: app, image: example/app}}]\n"
        );
    }
    out
}

fn route(a: &str, b: &str, weight_a: u32, weight_b: u32) -> String {
    format!(
        r#"apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {{name: chat, namespace: {NS}}}
spec:
  workloadSelector: {{matchLabels: {{app: bot}}}}
  rules:
    - backends:
        - {{name: a, provider: openai-compatible, url: "{a}/v1", weight: {weight_a}}}
        - {{name: b, provider: openai-compatible, url: "{b}/v1", weight: {weight_b}}}
"#
    )
}

async fn config_of(s: &SidecarProc) -> Option<Value> {
    let reply = Client::new(format!("http://127.0.0.1:{}", s.admin)).get("/config").await.ok()?;
    Some(reply.json())
}

async fn version_of(s: &SidecarProc) -> Option<String> {
    config_of(s).await.and_then(|c| c["version"].as_str().map(str::to_owned))
}

async fn chat(s: &SidecarProc) -> anyhow::Result<(u16, Option<String>)> {
    let client = Client::new(format!("http://127.0.0.1:{}", s.listen));
    let body = json!({"model": "small", "messages": [{"role": "user", "content": "hi"}]});
    let reply = client.post("/v1/chat/completions", &body, &[]).await?;
    Ok((reply.status.as_u16(), reply.header("x-bulwark-backend").map(str::to_owned)))
}

/// Waits until every sidecar runs the same non-empty version that differs from `old`.
async fn converged(sidecars: &[SidecarProc], old: &str, limit: Duration) -> anyhow::Result<String> {
    eventually(limit, "every sidecar to apply the new config", || async {
        let mut versions = vec![];
        for s in sidecars {
            versions.push(version_of(s).await?);
        }
        let first = versions[0].clone();
        (!first.is_empty() && first != old && versions.iter().all(|v| *v == first)).then_some(first)
    })
    .await
}

fn condition(c: &Cluster, what: &str, type_: &str) -> String {
    let path = format!(
        "{{.status.conditions[?(@.type==\"{type_}\")].status}}/{{.status.conditions[?(@.type==\"{type_}\")].reason}}"
    );
    c.get(NS, what, &path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_programs_sidecars_and_they_survive_it() -> anyhow::Result<()> {
    let Some(c) = Cluster::start("bulwark-operator-e2e").await? else { return Ok(()) };
    let a = MockProvider::start_with("a", 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    let b = MockProvider::start_with("b", 2, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    c.apply(&pods(&["bot-1", "bot-2", "bot-3"]))?;
    let stream = free_port()?;
    let mut op = c.operator("op-1", stream, &[])?;
    let sidecars: Vec<SidecarProc> =
        ["bot-1", "bot-2", "bot-3"].iter().map(|p| c.sidecar(NS, p, op.stream, &[])).collect::<Result<_, _>>()?;

    // A new route reaches every sidecar, and traffic follows it.
    c.apply(&route(&a.url(), &b.url(), 100, 0))?;
    let v1 = converged(&sidecars, "", Duration::from_secs(20)).await.map_err(|e| {
        anyhow::anyhow!("{e}\noperator log:\n{}\nsidecar log:\n{}", op.proc.output(), sidecars[0].proc.output())
    })?;
    for s in &sidecars {
        assert_eq!(chat(s).await?, (200, Some("a".to_owned())));
    }

    // Status: accepted, refs resolved, programmed into all three sidecars.
    eventually(Duration::from_secs(10), "Ready=True/Programmed", || async {
        (condition(&c, "llmroute/chat", "Ready") == "True/Programmed").then_some(())
    })
    .await?;
    assert_eq!(condition(&c, "llmroute/chat", "Accepted"), "True/Accepted");
    assert_eq!(c.get(NS, "llmroute/chat", "{.status.sidecars.total}/{.status.sidecars.upToDate}")?, "3/3");
    assert_eq!(
        c.get(NS, "llmroute/chat", "{.status.observedGeneration}")?,
        c.get(NS, "llmroute/chat", "{.metadata.generation}")?
    );
    // The ConfigMap copy, owned by the route.
    let cms = c.kubectl(&[
        "get",
        "configmaps",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/managed-by=bulwark-operator",
        "-o",
        "json",
    ])?;
    let cms: Value = serde_json::from_str(&cms)?;
    let cm = &cms["items"][0];
    assert_eq!(cm["metadata"]["annotations"]["bulwark.dev/config-version"], v1.as_str());
    assert_eq!(cm["metadata"]["ownerReferences"][0]["kind"], "LLMRoute");
    assert!(cm["data"]["config.yaml"].as_str().unwrap().contains("shop/chat"));
    assert!(cm["data"]["ca.crt"].as_str().unwrap().contains("BEGIN CERTIFICATE"));

    // Shift the weights: time until every sidecar runs it.
    let started = Instant::now();
    c.apply(&route(&a.url(), &b.url(), 0, 100))?;
    let v2 = converged(&sidecars, &v1, Duration::from_secs(10)).await?;
    println!("weight change applied by all 3 sidecars {:?} after kubectl apply returned", started.elapsed());
    for s in &sidecars {
        assert_eq!(chat(s).await?, (200, Some("b".to_owned())));
    }

    // An invalid route is refused with its reason; the others keep serving.
    c.apply(&format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: broken, namespace: {NS}}}\nspec:\n  rules: [{{backends: [{{name: z, url: 'http://127.0.0.1:9/v1', weight: 0}}]}}]\n"
    ))?;
    eventually(Duration::from_secs(10), "Accepted=False/Invalid on the broken route", || async {
        (condition(&c, "llmroute/broken", "Accepted") == "False/Invalid").then_some(())
    })
    .await?;
    let message = c.get(NS, "llmroute/broken", "{.status.conditions[?(@.type==\"Accepted\")].message}")?;
    assert!(message.contains("weights are 0"), "{message}");
    assert_eq!(version_of(&sidecars[0]).await.unwrap(), v2, "the broken route changed nothing");
    assert_eq!(chat(&sidecars[0]).await?.0, 200);
    let events = c.kubectl(&["get", "events.events.k8s.io", "-n", NS, "-o", "json"])?;
    assert!(events.contains("Invalid") && events.contains("broken"), "a Warning event names the problem: {events}");

    // The operator dies: sidecars keep serving their last config.
    op.proc.kill();
    for s in &sidecars {
        assert_eq!(chat(s).await?, (200, Some("b".to_owned())));
    }
    // It comes back (same address, as behind its Service): the sidecars reconnect, and the next
    // change reaches them once the dead replica's lease has run out.
    let op = c.operator("op-2", stream, &[])?;
    let metrics = Client::new(format!("http://127.0.0.1:{}", op.metrics));
    eventually(Duration::from_secs(15), "3 sidecars connected to the new operator", || async {
        let text = metrics.get("/metrics").await.ok()?.text();
        text.contains("bulwark_operator_connected_sidecars 3").then_some(())
    })
    .await?;
    c.apply(&route(&a.url(), &b.url(), 50, 50))?;
    let v3 = converged(&sidecars, &v2, Duration::from_secs(10)).await?;

    // Deleting the route removes it from every config and its ConfigMap goes.
    c.kubectl(&["delete", "llmroute", "chat", "-n", NS])?;
    converged(&sidecars, &v3, Duration::from_secs(10)).await?;
    assert!(config_of(&sidecars[0]).await.unwrap()["routes"].as_array().unwrap().is_empty());
    assert_eq!(chat(&sidecars[0]).await?.0, 404, "no route takes the request any more");
    // Once the new operator holds the lease (the dead one's runs out after 2 s), it deletes the
    // copies of groups that no longer exist.
    eventually(Duration::from_secs(15), "the route's ConfigMap copies to go", || async {
        let out = c.kubectl(&["get", "configmaps", "-n", NS, "-o", "json"]).ok()?;
        (out.contains("bulwark-operator") && !out.contains("shop/chat")).then_some(())
    })
    .await?;
    let _ = v3;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_operator_takes_over_within_the_lease_duration() -> anyhow::Result<()> {
    let Some(c) = Cluster::start("bulwark-leader-e2e").await? else { return Ok(()) };
    let mut ops = [c.operator("op-a", free_port()?, &[])?, c.operator("op-b", free_port()?, &[])?];
    let lease = || c.get("bulwark-system", "lease/bulwark-operator", "{.spec.holderIdentity}").unwrap_or_default();
    let holder = eventually(Duration::from_secs(10), "a lease holder", || async {
        let h = lease();
        (!h.is_empty()).then_some(h)
    })
    .await?;
    c.apply(&format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: r, namespace: {NS}}}\nspec:\n  rules: [{{backends: [{{name: x, url: 'http://127.0.0.1:9/v1'}}]}}]\n"
    ))?;
    eventually(Duration::from_secs(10), "status from the leader", || async {
        (condition(&c, "llmroute/r", "Accepted") == "True/Accepted").then_some(())
    })
    .await?;
    let leader = ops.iter().position(|o| o.proc.name == holder).unwrap();
    ops[leader].proc.kill();
    let killed = Instant::now();
    c.apply(&format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: r, namespace: {NS}}}\nspec:\n  rules: [{{backends: [{{name: x, url: 'http://127.0.0.1:9/v1', weight: 0}}]}}]\n"
    ))?;
    eventually(Duration::from_secs(10), "the standby to write status", || async {
        (condition(&c, "llmroute/r", "Accepted") == "False/Invalid").then_some(())
    })
    .await?;
    println!("standby wrote status {:?} after the leader died (lease 2 s)", killed.elapsed());
    assert_ne!(lease(), holder);
    Ok(())
}
