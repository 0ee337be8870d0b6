#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! ModelServers in a cluster, end to end: the test API server (no controllers: the test plays
//! the scheduler and the kubelet by writing pod status), real kubectl, and the operator binary.
//! The operator writes what a server runs and keeps it so, reports its status, and hands its
//! ready replicas to the sidecars, which spread requests across them.

use std::time::Duration;

use bulwark_tests::{
    client::Client,
    cluster::{Cluster, eventually, free_port},
    mock::MockProvider,
};
use serde_json::{Value, json};

const NS: &str = "team-a";

/// A stand-in for KEDA's CRD, enough for the operator to write ScaledObjects.
const KEDA_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: scaledobjects.keda.sh}
spec:
  group: keda.sh
  scope: Namespaced
  names: {plural: scaledobjects, singular: scaledobject, kind: ScaledObject, listKind: ScaledObjectList}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

fn server(port: u16, autoscaling: &str) -> String {
    format!(
        r#"apiVersion: bulwark.dev/v1alpha1
kind: ModelServer
metadata: {{name: llama, namespace: {NS}}}
spec:
  image: vllm/vllm-openai:v0.11.0
  args: [--model, meta-llama/Llama-3.1-8B-Instruct]
  port: {port}
  gpu: {{count: 2, products: [NVIDIA-H100-80GB-HBM3, NVIDIA-A100-SXM4-80GB], minMemoryGiB: 40}}
  {autoscaling}
"#
    )
}

const ROUTE: &str = r#"apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {name: chat, namespace: team-a}
spec:
  workloadSelector: {matchLabels: {app: bot}}
  rules:
    - backends: [{name: llama, modelServerRef: {name: llama}}]
"#;

fn pod(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{{labels}}}\nspec:\n  serviceAccountName: default\n  containers: [{{name: c, image: example/c}}]\n"
    )
}

fn json_of(c: &Cluster, what: &str) -> Value {
    c.kubectl(&["get", "-n", NS, what, "-o", "json"])
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

async fn until(c: &Cluster, what: &str, why: &str, test: impl Fn(&Value) -> bool) -> Value {
    let found = eventually(Duration::from_secs(15), why, || async {
        let v = json_of(c, what);
        test(&v).then_some(v)
    });
    found.await.unwrap_or_else(|e| panic!("{e}: {}", json_of(c, what)))
}

fn condition(v: &Value, type_: &str) -> (String, String, String) {
    let c = v["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or_default();
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    (s("status"), s("reason"), s("message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_model_servers_and_sidecars_spread_over_their_replicas() -> anyhow::Result<()> {
    let Some(c) = Cluster::start("bulwark-operator-servers").await? else { return Ok(()) };
    c.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"))?;
    c.apply(KEDA_CRD)?;
    // Two replicas listen at 127.0.0.2 and 127.0.0.3 on one port, like pods behind one targetPort.
    let port = free_port()?;
    let r1 = MockProvider::start_with("r1", 2, Duration::ZERO, ([127, 0, 0, 2], port).into()).await;
    let r2 = MockProvider::start_with("r2", 2, Duration::ZERO, ([127, 0, 0, 3], port).into()).await;
    c.apply(&pod("bot-1", "app: bot, bulwark.dev/inject: \"true\""))?;
    let op = c.operator("op-1", free_port()?, &["--keda", "--prometheus-address=http://prometheus.monitoring:9090"])?;
    let sidecar = c.sidecar(NS, "bot-1", op.stream, &[])?;

    // What it runs: a Deployment on the GPUs, a Service, a PDB and an HPA owning the count.
    c.apply(&server(port, "autoscaling: {minReplicas: 2, maxReplicas: 6, metric: queueDepth, target: 8}"))?;
    c.apply(ROUTE)?;
    let deploy = until(&c, "deployment/llama", "the Deployment", |v| v["spec"].is_object()).await;
    assert_eq!(deploy["metadata"]["ownerReferences"][0]["kind"], "ModelServer");
    assert!(deploy["spec"].get("replicas").is_none(), "the HPA owns the replica count: {}", deploy["spec"]);
    let pod_spec = &deploy["spec"]["template"]["spec"];
    let terms = &pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        [0]["matchExpressions"];
    assert_eq!(
        terms[0],
        json!({"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"]})
    );
    assert_eq!(terms[1], json!({"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["40959"]}));
    assert_eq!(pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"], "2");
    assert_eq!(pod_spec["tolerations"][0]["key"], "nvidia.com/gpu");
    assert_eq!(json_of(&c, "service/llama")["spec"]["ports"][0]["port"], port);
    assert_eq!(json_of(&c, "poddisruptionbudget/llama")["spec"]["maxUnavailable"], 1);
    let hpa = until(&c, "horizontalpodautoscaler/llama", "the HPA", |v| v["spec"].is_object()).await;
    assert_eq!((hpa["spec"]["minReplicas"].as_i64(), hpa["spec"]["maxReplicas"].as_i64()), (Some(2), Some(6)));

    // The autoscaler's count is left alone; a hand edit of what the operator owns is put back.
    c.kubectl(&["patch", "deployment", "llama", "-n", NS, "--type=merge", "-p", r#"{"spec":{"replicas":5}}"#])?;
    let patch = r#"[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"example/other"}]"#;
    c.kubectl(&["patch", "deployment", "llama", "-n", NS, "--type=json", "-p", patch])?;
    let restored = until(&c, "deployment/llama", "the image put back", |v| {
        v["spec"]["template"]["spec"]["containers"][0]["image"] == "vllm/vllm-openai:v0.11.0"
    })
    .await;
    assert_eq!(restored["spec"]["replicas"], 5, "the scaled count stays");

    // The scheduler cannot place a replica: the status names what no node offers.
    c.apply(&pod("llama-6c8b9-aaaaa", "bulwark.dev/model-server: llama"))?;
    let unschedulable = r#"{"status":{"phase":"Pending","conditions":[{"type":"PodScheduled","status":"False","reason":"Unschedulable","message":"0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}"#;
    c.kubectl(&[
        "patch",
        "pod",
        "llama-6c8b9-aaaaa",
        "-n",
        NS,
        "--subresource=status",
        "--type=merge",
        "-p",
        unschedulable,
    ])?;
    let ms = until(&c, "modelserver/llama", "Scheduled=False", |v| condition(v, "Scheduled").0 == "False").await;
    let (_, reason, message) = condition(&ms, "Scheduled");
    assert_eq!(reason, "InsufficientGPU");
    assert!(
        message.contains(
            "no node offers 2 nvidia.com/gpu (NVIDIA-H100-80GB-HBM3 or NVIDIA-A100-SXM4-80GB) with at least 40 GiB each"
        ),
        "{message}"
    );
    assert_eq!(condition(&ms, "Ready").1, "NoReplicaReady");
    assert_eq!(ms["status"]["url"], format!("http://llama.{NS}.svc:{port}/v1"));
    c.kubectl(&["delete", "pod", "llama-6c8b9-aaaaa", "-n", NS])?;

    // Two replicas become ready: the sidecar gets them and spreads requests over both.
    for (name, ip) in [("llama-6c8b9-bbbbb", "127.0.0.2"), ("llama-6c8b9-ccccc", "127.0.0.3")] {
        c.apply(&pod(name, "bulwark.dev/model-server: llama"))?;
        let ready = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{ip}","conditions":[{{"type":"PodScheduled","status":"True"}},{{"type":"Ready","status":"True"}}]}}}}"#
        );
        c.kubectl(&["patch", "pod", name, "-n", NS, "--subresource=status", "--type=merge", "-p", &ready])?;
    }
    c.kubectl(&[
        "patch",
        "deployment",
        "llama",
        "-n",
        NS,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"replicas":5,"readyReplicas":2}}"#,
    ])?;
    let admin = Client::new(format!("http://127.0.0.1:{}", sidecar.admin));
    let replicas = eventually(Duration::from_secs(15), "both replicas in the sidecar's config", || async {
        let cfg = admin.get("/config").await.ok()?.json();
        let eps = cfg["routes"][0]["backends"][0]["replicas"]["endpoints"].as_array()?.clone();
        (eps.len() == 2).then_some(eps)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", op.proc.output()))?;
    assert_eq!(replicas, [json!(format!("http://127.0.0.2:{port}/v1")), json!(format!("http://127.0.0.3:{port}/v1"))]);
    let client = Client::new(format!("http://127.0.0.1:{}", sidecar.listen));
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..10 {
        let batch: Vec<_> = (0..4)
            .map(|_| {
                let (client, body) = (client.clone(), body.clone());
                tokio::spawn(async move { client.post("/v1/chat/completions", &body, &[]).await.map(|r| r.status) })
            })
            .collect();
        for t in batch {
            assert_eq!(t.await??, 200);
        }
    }
    assert!(r1.calls() >= 5 && r2.calls() >= 5, "both replicas serve: {} and {}", r1.calls(), r2.calls());
    // The requests reach the operator's metrics per server: what wakes a server scaled to zero.
    let metrics = Client::new(format!("http://127.0.0.1:{}", op.metrics));
    let served = r#"bulwark_model_server_requests_total{namespace="team-a",model_server="llama"} 40"#;
    eventually(Duration::from_secs(15), "the server's requests on the operator's /metrics", || async {
        metrics.get("/metrics").await.ok().filter(|r| r.text().contains(served)).map(|_| ())
    })
    .await?;
    let ms = until(&c, "modelserver/llama", "Ready=True", |v| condition(v, "Ready").0 == "True").await;
    assert_eq!(condition(&ms, "Ready").2, "2 of 5 replicas ready");
    assert_eq!(condition(&ms, "Scheduled").0, "True");

    // The stable of a rollout in progress may scale up but never down.
    c.apply(&format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: chat, namespace: {NS}}}\nspec:\n  workloadSelector: {{matchLabels: {{app: bot}}}}\n  backends: [{{name: next, url: 'http://127.0.0.1:9/v1'}}]\n  rules:\n    - backends: [{{name: llama, modelServerRef: {{name: llama}}}}]\n---\napiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {{name: upgrade, namespace: {NS}}}\nspec:\n  routeRef: {{name: chat}}\n  stable: {{backend: llama}}\n  canary: {{backend: next}}\n  steps: [{{weight: 0}}, {{weight: 100}}]\n"
    ))?;
    until(&c, "horizontalpodautoscaler/llama", "scale-down held", |v| {
        v["spec"]["behavior"]["scaleDown"]["selectPolicy"] == "Disabled"
    })
    .await;
    c.kubectl(&["delete", "modelrollout", "upgrade", "-n", NS])?;
    until(&c, "horizontalpodautoscaler/llama", "scale-down free again", |v| {
        v["spec"].is_object() && v["spec"].get("behavior").is_none()
    })
    .await;

    // Another engine: the HPA goes, a KEDA ScaledObject takes over.
    c.apply(&server(port, "autoscaling: {engine: keda, minReplicas: 0, maxReplicas: 4, metric: inflightRequests, target: 16, activationTarget: 1}"))?;
    let so = until(&c, "scaledobject.keda.sh/llama", "the ScaledObject", |v| v["spec"].is_object()).await;
    assert_eq!(so["spec"]["triggers"][0]["metadata"]["serverAddress"], "http://prometheus.monitoring:9090");
    eventually(Duration::from_secs(10), "the HPA gone", || async {
        c.kubectl(&["get", "hpa", "llama", "-n", NS]).is_err().then_some(())
    })
    .await?;

    // Deleting the server takes everything it ran with it.
    c.kubectl(&["delete", "modelserver", "llama", "-n", NS])?;
    eventually(Duration::from_secs(10), "the children gone", || async {
        let gone = ["deployment/llama", "service/llama", "poddisruptionbudget/llama", "scaledobject.keda.sh/llama"]
            .iter()
            .all(|what| c.kubectl(&["get", "-n", NS, what]).is_err());
        gone.then_some(())
    })
    .await?;
    let route =
        until(&c, "llmroute/chat", "the route without its server", |v| condition(v, "ResolvedRefs").0 == "False").await;
    assert_eq!(condition(&route, "ResolvedRefs").1, "ModelServerNotFound");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoscaler_takes_over_the_replica_count_it_finds() -> anyhow::Result<()> {
    let Some(c) = Cluster::start("bulwark-operator-handover").await? else { return Ok(()) };
    c.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"))?;
    c.apply(KEDA_CRD)?;
    let _op = c.operator("op-1", free_port()?, &["--keda"])?;
    let port = free_port()?;
    c.apply(&server(port, "replicas: 3"))?;
    until(&c, "deployment/llama", "three replicas", |v| v["spec"]["replicas"] == 3).await;

    // The HPA takes the count as it is: dropping the field must not reset it to one.
    c.apply(&server(port, "autoscaling: {minReplicas: 2, maxReplicas: 6, metric: queueDepth, target: 8}"))?;
    until(&c, "horizontalpodautoscaler/llama", "the HPA", |v| v["spec"].is_object()).await;
    let with_owners = || {
        let text = c.kubectl(&["get", "-n", NS, "deployment/llama", "-o", "json", "--show-managed-fields"]);
        text.ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()).unwrap_or(Value::Null)
    };
    let deploy = eventually(Duration::from_secs(15), "owned by the hand-over", || async {
        let v = with_owners();
        let handed = v["metadata"]["managedFields"]
            .as_array()
            .is_some_and(|m| m.iter().any(|e| e["manager"] == "bulwark-operator-handover"));
        handed.then_some(v)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", with_owners()));
    assert_eq!(deploy["spec"]["replicas"], 3, "the count stays: {}", deploy["spec"]);
    let ours =
        deploy["metadata"]["managedFields"].as_array().unwrap().iter().find(|e| e["manager"] == "bulwark-operator");
    assert!(ours.unwrap()["fieldsV1"]["f:spec"].get("f:replicas").is_none(), "the operator no longer owns it");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(json_of(&c, "deployment/llama")["spec"]["replicas"], 3, "and is not fought over");

    // KEDA's triggers need a Prometheus: without one the server says so and runs as it was.
    c.apply(&server(port, "autoscaling: {engine: keda, minReplicas: 0, maxReplicas: 4, target: 16}"))?;
    let ms = until(&c, "modelserver/llama", "Accepted=False", |v| condition(v, "Accepted").0 == "False").await;
    assert!(condition(&ms, "Accepted").2.contains("spec.autoscaling.prometheusAddress"), "{}", ms["status"]);
    assert!(c.kubectl(&["get", "scaledobject.keda.sh", "llama", "-n", NS]).is_err(), "no ScaledObject without a query");
    assert_eq!(json_of(&c, "deployment/llama")["spec"]["replicas"], 3);
    Ok(())
}
