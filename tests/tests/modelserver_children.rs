//! What the operator runs for ModelServers, checked by outside oracles: every child of every
//! GPU variant and autoscaler against the Kubernetes schemas (kubernetes-validate --strict) and
//! KEDA's ScaledObjects against KEDA's published schema (npm @kubernetes-models/keda).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use bulwark_api::ModelServer;
use bulwark_operator::servers::build::{Options, children};
use bulwark_tests::{cluster::repo, harness::temp_dir};

const VARIANTS: &[&str] = &[
    "",
    "  replicas: 3\n",
    "  gpu: {count: 2, products: [NVIDIA-H100-80GB-HBM3, NVIDIA-A100-SXM4-80GB], minMemoryGiB: 40}\n  autoscaling: {minReplicas: 2, maxReplicas: 6, metric: queueDepth, target: 8}\n",
    "  gpu: {mig: 1g.10gb}\n  autoscaling: {maxReplicas: 4, metric: kvCacheUsage, target: 0.8, scaleDownStabilization: 5m}\n",
    "  gpu: {products: [L4]}\n  autoscaling: {maxReplicas: 3, metric: gpuUtilization, target: 70}\n",
    "  gpu: {}\n  autoscaling: {engine: keda, minReplicas: 0, maxReplicas: 8, metric: inflightRequests, target: 16, activationTarget: 1, prometheusAddress: 'http://prometheus.monitoring:9090'}\n",
    r#"  command: [python3, -m, vllm.entrypoints.openai.api_server]
  args: [--model, /models/llama, --port, "8000"]
  imagePullPolicy: IfNotPresent
  imagePullSecrets: [{name: registry}]
  gpu: {count: 1, products: [NVIDIA-L40S]}
  resources: {requests: {cpu: "8", memory: 48Gi}, limits: {memory: 48Gi}}
  env:
    - {name: VLLM_LOGGING_LEVEL, value: INFO}
    - name: HF_TOKEN
      valueFrom: {secretKeyRef: {name: hf, key: token}}
  envFrom: [{configMapRef: {name: vllm-settings}}]
  volumes:
    - name: cache
      persistentVolumeClaim: {claimName: model-cache}
  volumeMounts: [{name: cache, mountPath: /models}]
  nodeSelector: {pool: gpu}
  tolerations: [{key: dedicated, operator: Equal, value: llm, effect: NoSchedule}]
  affinity:
    nodeAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 50
          preference: {matchExpressions: [{key: topology.kubernetes.io/zone, operator: In, values: [a]}]}
  serviceAccountName: vllm
  securityContext: {runAsNonRoot: true, runAsUser: 1000, allowPrivilegeEscalation: false}
  shmSize: 8Gi
  maxUnavailable: 2
"#,
];

fn server(i: usize, spec: &str) -> ModelServer {
    serde_yaml::from_str(&format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: ModelServer\nmetadata: {{name: llama-{i}, namespace: team-a, uid: u-{i}}}\nspec:\n  image: vllm/vllm-openai:v0.11.0\n{spec}"
    ))
    .unwrap()
}

fn tool(path: std::path::PathBuf, what: &str) -> Option<std::path::PathBuf> {
    if path.exists() {
        return Some(path);
    }
    let required = std::env::var("BULWARK_REQUIRE_KUBECTL").is_ok_and(|v| v == "1");
    assert!(!required, "{what} is missing at {}: run make venv tools", path.display());
    eprintln!("skipped: no {what} at {}", path.display());
    None
}

#[test]
fn every_child_of_every_variant_is_valid_for_kubernetes_and_keda() {
    let Some(validate) = tool(repo().join(".venv/bin/kubernetes-validate"), "kubernetes-validate") else { return };
    let Some(npm) = tool(repo().join(".tools/npm/node_modules/@kubernetes-models/keda"), "@kubernetes-models/keda")
    else {
        return;
    };
    let dir = temp_dir("bulwark-children").unwrap();
    let (mut core, mut keda) = (String::new(), String::new());
    let (mut scaled, mut hpas) = (0, 0);
    for (i, spec) in VARIANTS.iter().enumerate() {
        let ms = server(i, spec);
        let name = ms.metadata.name.clone().unwrap_or_default();
        assert!(bulwark_api::validate::model_server(&name, &ms.spec).is_empty(), "variant {i} is valid");
        let opts = Options { hold_scale_down: i % 2 == 0, ..Options::default() };
        let c = children(&ms, &opts);
        for doc in [
            serde_yaml::to_string(&c.deployment).unwrap(),
            serde_yaml::to_string(&c.service).unwrap(),
            serde_yaml::to_string(&c.pdb).unwrap(),
        ]
        .into_iter()
        .chain(c.hpa.iter().map(|h| serde_yaml::to_string(h).unwrap()))
        {
            hpas += usize::from(doc.contains("kind: HorizontalPodAutoscaler"));
            core += &format!("---\n{doc}");
        }
        if let Some(so) = &c.scaled_object {
            keda += &format!("---\n{}", serde_yaml::to_string(so).unwrap());
            scaled += 1;
        }
    }
    std::fs::write(dir.join("core.yaml"), &core).unwrap();
    std::fs::write(dir.join("keda.yaml"), &keda).unwrap();
    let out = Command::new(&validate).args(["-k", "1.32", "--strict"]).arg(dir.join("core.yaml")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.lines().any(|l| !l.starts_with("INFO")), "{text}\n{core}");
    let passed = text.lines().filter(|l| l.contains(" passed for resource ")).count();
    assert_eq!((passed, hpas), (VARIANTS.len() * 3 + 3, 3), "every object checked:\n{text}");
    let out = Command::new("node")
        .arg(repo().join("scripts/validate-crs.js"))
        .arg(dir.join("keda.yaml"))
        .env("NODE_PATH", npm.parent().unwrap().parent().unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{keda}");
    assert!(text.contains(&format!("{scaled} objects valid")), "{text}");
}
