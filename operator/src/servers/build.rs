//! What the operator runs for a `ModelServer`, built from its spec alone: a Deployment placed by
//! NVIDIA GPU Feature Discovery labels, a Service, a PodDisruptionBudget, and an autoscaler (an
//! `autoscaling/v2` HorizontalPodAutoscaler or a KEDA ScaledObject) that owns the replica count.
//! Pure: no I/O; the controller applies what comes out.

use std::collections::BTreeMap;

use bulwark_api::{
    ModelServer,
    compile::ns_name,
    server::{Autoscaling, AutoscalingMetric, Engine, ModelServerSpec},
};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment},
        autoscaling::v2::{
            HPAScalingRules, HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec,
            MetricIdentifier, MetricSpec, MetricTarget, PodsMetricSource,
        },
        core::v1::{
            Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction,
            LocalObjectReference, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PodSpec,
            PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort,
            ServiceSpec, Toleration, TopologySpreadConstraint, Volume, VolumeMount,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::Resource as _;
use serde_json::{Value, json};

/// Pods of a ModelServer carry this label with its name.
pub const SERVER_LABEL: &str = "bulwark.dev/model-server";
/// The container that runs the server.
pub const CONTAINER: &str = "server";
/// The GPU Feature Discovery labels and the device plugin's resources.
pub const GPU_PRODUCT: &str = "nvidia.com/gpu.product";
pub const GPU_MEMORY: &str = "nvidia.com/gpu.memory";
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Settings that come from the operator, not the resource.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    /// The Prometheus KEDA triggers query when the spec names none.
    pub prometheus_address: Option<String>,
    /// The stable of a rollout in progress: its autoscaler may scale up but never down, so the
    /// traffic a rollback sends back finds the capacity it left.
    pub hold_scale_down: bool,
}

/// Everything one ModelServer runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// A KEDA `ScaledObject` (keda.sh/v1alpha1), as JSON: KEDA's types are not part of the
    /// Kubernetes API.
    pub scaled_object: Option<Value>,
}

fn selector(name: &str) -> BTreeMap<String, String> {
    [(SERVER_LABEL.to_owned(), name.to_owned())].into()
}

fn labels(name: &str) -> BTreeMap<String, String> {
    let mut l = selector(name);
    l.insert("app.kubernetes.io/name".into(), name.to_owned());
    l.insert("app.kubernetes.io/component".into(), "model-server".into());
    l.insert(crate::write::MANAGED_BY.0.into(), crate::write::MANAGED_BY.1.into());
    l
}

/// Owned by the server, for the garbage collector; not blocking its deletion, which would need
/// the right to update its finalizers.
fn owned(ms: &ModelServer) -> Vec<OwnerReference> {
    ms.controller_owner_ref(&()).into_iter().map(|o| OwnerReference { block_owner_deletion: None, ..o }).collect()
}

fn meta(ms: &ModelServer) -> ObjectMeta {
    let (ns, name) = ns_name(&ms.metadata);
    ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(ns),
        labels: Some(labels(&name)),
        owner_references: Some(owned(ms)),
        ..ObjectMeta::default()
    }
}

pub fn children(ms: &ModelServer, opts: &Options) -> Children {
    let (ns, name) = ns_name(&ms.metadata);
    let spec = &ms.spec;
    let autoscaler = spec.autoscaling.as_ref();
    Children {
        deployment: deployment(ms),
        service: service(ms),
        pdb: pdb(ms),
        hpa: autoscaler.filter(|a| a.engine == Engine::Hpa).map(|a| hpa(ms, a, opts)),
        scaled_object: autoscaler.filter(|a| a.engine == Engine::Keda).map(|a| scaled_object(ms, &ns, &name, a, opts)),
    }
}

/// The GPU resource a replica asks for, and how many.
pub fn gpu_resource(spec: &ModelServerSpec) -> Option<(String, u32)> {
    let g = spec.gpu.as_ref()?;
    let resource = match &g.mig {
        Some(profile) => format!("nvidia.com/mig-{profile}"),
        None => GPU_RESOURCE.to_owned(),
    };
    Some((resource, g.count.max(1)))
}

/// The node requirements of the GPU: its products and its memory (the label is in MiB).
fn gpu_requirements(spec: &ModelServerSpec) -> Vec<NodeSelectorRequirement> {
    let Some(g) = &spec.gpu else { return vec![] };
    let mut out = vec![];
    if !g.products.is_empty() {
        out.push(NodeSelectorRequirement {
            key: GPU_PRODUCT.into(),
            operator: "In".into(),
            values: Some(g.products.clone()),
        });
    }
    if let Some(gib) = g.min_memory_gib.filter(|_| g.mig.is_none()) {
        let mib = u64::from(gib) * 1024;
        out.push(NodeSelectorRequirement {
            key: GPU_MEMORY.into(),
            operator: "Gt".into(),
            values: Some(vec![(mib - 1).to_string()]),
        });
    }
    out
}

/// The user's affinity with the GPU's node requirements added to every required term (terms
/// are alternatives, so each must carry them).
fn affinity(spec: &ModelServerSpec) -> Option<Affinity> {
    let gpu = gpu_requirements(spec);
    let mut a = spec.affinity.clone().unwrap_or_default();
    if !gpu.is_empty() {
        let node = a.node_affinity.get_or_insert_with(NodeAffinity::default);
        let required = node
            .required_during_scheduling_ignored_during_execution
            .get_or_insert_with(|| NodeSelector { node_selector_terms: vec![] });
        if required.node_selector_terms.is_empty() {
            required.node_selector_terms.push(NodeSelectorTerm::default());
        }
        for term in &mut required.node_selector_terms {
            term.match_expressions.get_or_insert_with(Vec::new).extend(gpu.iter().cloned());
        }
    }
    (a != Affinity::default()).then_some(a)
}

fn quantity(v: impl ToString) -> Quantity {
    Quantity(v.to_string())
}

fn probe(spec: &ModelServerSpec, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(spec.health_path.clone()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

fn container(spec: &ModelServerSpec) -> Container {
    let mut resources = spec.resources.clone().unwrap_or_default();
    if let Some((gpu, n)) = gpu_resource(spec) {
        resources.limits.get_or_insert_with(BTreeMap::new).insert(gpu.clone(), quantity(n));
        resources.requests.get_or_insert_with(BTreeMap::new).insert(gpu, quantity(n));
    }
    let mut mounts = spec.volume_mounts.clone();
    mounts.push(VolumeMount { name: "dshm".into(), mount_path: "/dev/shm".into(), ..VolumeMount::default() });
    // The startup probe allows `startupTimeout` for loading the model, checking every 10 s.
    let startup = (spec.startup_timeout.as_std().as_secs().div_ceil(10)).clamp(1, i32::MAX as u64) as i32;
    Container {
        name: CONTAINER.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        command: (!spec.command.is_empty()).then(|| spec.command.clone()),
        args: (!spec.args.is_empty()).then(|| spec.args.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(spec.port),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        env: (!spec.env.is_empty()).then(|| spec.env.clone()),
        env_from: (!spec.env_from.is_empty()).then(|| spec.env_from.clone()),
        resources: (resources != ResourceRequirements::default()).then_some(resources),
        volume_mounts: Some(mounts),
        startup_probe: Some(probe(spec, 10, startup)),
        readiness_probe: Some(probe(spec, 5, 3)),
        liveness_probe: Some(probe(spec, 10, 6)),
        security_context: Some(spec.security_context.clone().unwrap_or_else(|| SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
            ..SecurityContext::default()
        })),
        ..Container::default()
    }
}

fn deployment(ms: &ModelServer) -> Deployment {
    let (_, name) = ns_name(&ms.metadata);
    let spec = &ms.spec;
    let mut volumes = spec.volumes.clone();
    volumes.push(Volume {
        name: "dshm".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(quantity(&spec.shm_size)),
        }),
        ..Volume::default()
    });
    let mut tolerations = spec.tolerations.clone();
    if spec.gpu.is_some() {
        tolerations.insert(
            0,
            Toleration {
                key: Some(GPU_RESOURCE.into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            },
        );
    }
    let spread = |key: &str| TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector { match_labels: Some(selector(&name)), ..LabelSelector::default() }),
        ..TopologySpreadConstraint::default()
    };
    let annotations: BTreeMap<String, String> = [
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), spec.port.to_string()),
        ("prometheus.io/path".to_owned(), spec.metrics_path.clone()),
    ]
    .into();
    Deployment {
        metadata: meta(ms),
        spec: Some(DeploymentSpec {
            // With an autoscaler the count is its: the operator never writes it.
            replicas: spec.autoscaling.is_none().then(|| spec.replicas.unwrap_or(1) as i32),
            selector: LabelSelector { match_labels: Some(selector(&name)), ..LabelSelector::default() },
            // A new replica must be ready (its model loaded) before an old one goes.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&name)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container(spec)],
                    volumes: Some(volumes),
                    node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
                    tolerations: (!tolerations.is_empty()).then_some(tolerations),
                    affinity: affinity(spec),
                    topology_spread_constraints: Some(vec![
                        spread("kubernetes.io/hostname"),
                        spread("topology.kubernetes.io/zone"),
                    ]),
                    service_account_name: spec.service_account_name.clone(),
                    image_pull_secrets: (!spec.image_pull_secrets.is_empty())
                        .then(|| spec.image_pull_secrets.iter().map(LocalObjectReference::from).collect()),
                    // Requests in flight get time to finish.
                    termination_grace_period_seconds: Some(60),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

fn service(ms: &ModelServer) -> Service {
    let (_, name) = ns_name(&ms.metadata);
    Service {
        metadata: meta(ms),
        spec: Some(ServiceSpec {
            selector: Some(selector(&name)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(ms.spec.port),
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn pdb(ms: &ModelServer) -> PodDisruptionBudget {
    let (_, name) = ns_name(&ms.metadata);
    PodDisruptionBudget {
        metadata: meta(ms),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(ms.spec.max_unavailable.max(1) as i32)),
            selector: Some(LabelSelector { match_labels: Some(selector(&name)), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

/// A target value as a Kubernetes quantity: whole numbers as they are, fractions in milli-units.
fn target_quantity(v: f64) -> Quantity {
    if v.fract() == 0.0 { quantity(v as i64) } else { Quantity(format!("{}m", (v * 1000.0).round() as i64)) }
}

/// The pod metric a custom metrics adapter serves for `metric` (Prometheus names with `:` as `_`).
pub fn pod_metric(metric: AutoscalingMetric) -> String {
    metric.series().replace(':', "_")
}

fn scale_down(a: &Autoscaling, opts: &Options) -> Option<HPAScalingRules> {
    let window = a.scale_down_stabilization.map(|d| d.as_std().as_secs().min(3600) as i32);
    match (opts.hold_scale_down, window) {
        (true, w) => Some(HPAScalingRules {
            select_policy: Some("Disabled".into()),
            stabilization_window_seconds: w,
            ..HPAScalingRules::default()
        }),
        (false, Some(w)) => {
            Some(HPAScalingRules { stabilization_window_seconds: Some(w), ..HPAScalingRules::default() })
        }
        (false, None) => None,
    }
}

fn hpa(ms: &ModelServer, a: &Autoscaling, opts: &Options) -> HorizontalPodAutoscaler {
    let (_, name) = ns_name(&ms.metadata);
    HorizontalPodAutoscaler {
        metadata: meta(ms),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: k8s_openapi::api::autoscaling::v2::CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name,
            },
            min_replicas: Some(a.min_replicas.max(1) as i32),
            max_replicas: a.max_replicas as i32,
            metrics: Some(vec![MetricSpec {
                type_: "Pods".into(),
                pods: Some(PodsMetricSource {
                    metric: MetricIdentifier { name: pod_metric(a.metric), selector: None },
                    target: MetricTarget {
                        type_: "AverageValue".into(),
                        average_value: Some(target_quantity(a.target)),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            behavior: scale_down(a, opts)
                .map(|rules| HorizontalPodAutoscalerBehavior { scale_down: Some(rules), scale_up: None }),
        }),
        status: None,
    }
}

/// Requests per second the sidecars sent the server, up to 1 (`bulwark_model_server_requests`,
/// from the operator's metrics).
pub fn demand_query(ns: &str, name: &str) -> String {
    format!(
        r#"clamp_max(sum(rate(bulwark_model_server_requests_total{{namespace="{ns}",model_server="{name}"}}[2m])), 1)"#
    )
}

/// The PromQL total of `metric` over the server's pods (KEDA divides it by the target).
pub fn keda_query(metric: AutoscalingMetric, ns: &str, name: &str) -> String {
    format!(r#"sum({}{{namespace="{ns}",pod=~"{name}-[a-z0-9]+-[a-z0-9]+"}})"#, metric.series())
}

fn scaled_object(ms: &ModelServer, ns: &str, name: &str, a: &Autoscaling, opts: &Options) -> Value {
    let address = a.prometheus_address.clone().or_else(|| opts.prometheus_address.clone()).unwrap_or_default();
    let mut trigger = json!({
        "type": "prometheus",
        "metadata": {
            "serverAddress": address,
            "query": keda_query(a.metric, ns, name),
            "threshold": a.target.to_string(),
        }
    });
    if let Some(activation) = a.activation_target {
        trigger["metadata"]["activationThreshold"] = json!(activation.to_string());
    }
    let mut triggers = vec![trigger];
    if a.min_replicas == 0 {
        // At zero replicas the server's own metrics are gone: what wakes it is demand, the
        // requests sidecars send it (the operator exports them). Clamped to 1, it asks for one
        // replica while requests come and never more: the load trigger scales from there.
        triggers.push(json!({
            "type": "prometheus",
            "name": "demand",
            "metadata": {
                "serverAddress": address,
                "query": demand_query(ns, name),
                "threshold": "1",
                "activationThreshold": "0",
            }
        }));
    }
    // The stable of a rollout in progress keeps a replica, whatever its minimum: KEDA scales to
    // zero on its own, past the HPA's scale-down policy.
    let min = if opts.hold_scale_down { a.min_replicas.max(1) } else { a.min_replicas };
    let mut spec = json!({
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
        "minReplicaCount": min,
        "maxReplicaCount": a.max_replicas,
        "triggers": triggers,
    });
    if let Some(rules) = scale_down(a, opts) {
        let behavior = HorizontalPodAutoscalerBehavior { scale_down: Some(rules), scale_up: None };
        spec["advanced"] = json!({"horizontalPodAutoscalerConfig": {"behavior": behavior}});
    }
    let meta = serde_json::to_value(meta(ms)).unwrap_or_default();
    json!({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": meta, "spec": spec})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn server(spec: &str) -> ModelServer {
        let mut ms: ModelServer = serde_yaml::from_str(&format!(
            "apiVersion: bulwark.dev/v1alpha1\nkind: ModelServer\nmetadata: {{name: llama, namespace: team-a, uid: u-1}}\nspec:\n  image: vllm/vllm-openai:v0.11.0\n{spec}"
        ))
        .unwrap();
        ms.metadata.generation = Some(1);
        ms
    }

    fn pod_spec(c: &Children) -> &PodSpec {
        c.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    /// Node requirements as (key, operator, values), one list per alternative term.
    type Terms = Vec<Vec<(String, String, Vec<String>)>>;
    /// A spec, the node terms it needs, and its GPU limits.
    type Case<'a> = (&'a str, Terms, Vec<(String, String)>);

    fn node_terms(c: &Children) -> Terms {
        let terms = pod_spec(c)
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref()?.required_during_scheduling_ignored_during_execution.clone())
            .map(|r| r.node_selector_terms)
            .unwrap_or_default();
        terms
            .into_iter()
            .map(|t| {
                t.match_expressions
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| (e.key, e.operator, e.values.unwrap_or_default()))
                    .collect()
            })
            .collect()
    }

    fn limits(c: &Children) -> BTreeMap<String, String> {
        let r = pod_spec(c).containers[0].resources.clone().unwrap_or_default();
        r.limits.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect()
    }

    #[test]
    fn gpus_are_asked_for_by_product_memory_count_or_mig_profile() {
        let s = |x: &str| x.to_owned();
        let cases: Vec<Case<'_>> = vec![
            ("", vec![], vec![]),
            ("  gpu: {}\n", vec![vec![]], vec![(s("nvidia.com/gpu"), s("1"))]),
            (
                "  gpu: {count: 2, products: [NVIDIA-H100-80GB-HBM3, NVIDIA-A100-SXM4-80GB], minMemoryGiB: 40}\n",
                vec![vec![
                    (s(GPU_PRODUCT), s("In"), vec![s("NVIDIA-H100-80GB-HBM3"), s("NVIDIA-A100-SXM4-80GB")]),
                    (s(GPU_MEMORY), s("Gt"), vec![s("40959")]),
                ]],
                vec![(s("nvidia.com/gpu"), s("2"))],
            ),
            (
                "  gpu: {mig: 1g.10gb, products: [NVIDIA-A100-SXM4-40GB]}\n",
                vec![vec![(s(GPU_PRODUCT), s("In"), vec![s("NVIDIA-A100-SXM4-40GB")])]],
                vec![(s("nvidia.com/mig-1g.10gb"), s("1"))],
            ),
        ];
        for (spec, terms, gpu_limits) in cases {
            let c = children(&server(spec), &Options::default());
            let mut want_terms = terms.clone();
            // A GPU without products or memory needs no node term.
            want_terms.retain(|t| !t.is_empty());
            assert_eq!(node_terms(&c), want_terms, "{spec}");
            assert_eq!(limits(&c).into_iter().collect::<Vec<_>>(), gpu_limits, "{spec}");
            let tolerations = pod_spec(&c).tolerations.clone().unwrap_or_default();
            assert_eq!(
                tolerations.iter().any(|t| t.key.as_deref() == Some(GPU_RESOURCE)),
                spec.contains("gpu"),
                "the nvidia.com/gpu taint is tolerated with a GPU: {spec}"
            );
        }
    }

    #[test]
    fn the_users_affinity_and_resources_are_merged_with_the_gpus() {
        let spec = "  gpu: {products: [L4]}\n  resources: {requests: {cpu: '4', memory: 16Gi}, limits: {memory: 16Gi}}\n  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n          - matchExpressions: [{key: pool, operator: In, values: [a]}]\n          - matchExpressions: [{key: pool, operator: In, values: [b]}]\n  tolerations: [{key: dedicated, operator: Equal, value: llm, effect: NoSchedule}]\n  nodeSelector: {cloud.google.com/gke-spot: 'true'}\n";
        let c = children(&server(spec), &Options::default());
        let terms = node_terms(&c);
        assert_eq!(terms.len(), 2, "each alternative term also needs the GPU");
        for t in &terms {
            assert_eq!(t.len(), 2);
            assert_eq!(t[1].0, GPU_PRODUCT);
        }
        assert_eq!(limits(&c).get("memory").map(String::as_str), Some("16Gi"));
        assert_eq!(limits(&c).get("nvidia.com/gpu").map(String::as_str), Some("1"));
        let p = pod_spec(&c);
        assert_eq!(p.tolerations.as_ref().unwrap().len(), 2);
        assert_eq!(p.node_selector.as_ref().unwrap()["cloud.google.com/gke-spot"], "true");
    }

    #[test]
    fn the_pod_has_shared_memory_probes_sized_for_loading_and_a_restricted_container() {
        let c = children(&server("  startupTimeout: 20m\n  port: 8080\n  healthPath: /healthz\n"), &Options::default());
        let p = pod_spec(&c);
        let shm = p.volumes.as_ref().unwrap().iter().find(|v| v.name == "dshm").unwrap();
        let ed = shm.empty_dir.as_ref().unwrap();
        assert_eq!((ed.medium.as_deref(), ed.size_limit.as_ref().map(|q| q.0.as_str())), (Some("Memory"), Some("2Gi")));
        let ctr = &p.containers[0];
        let startup = ctr.startup_probe.as_ref().unwrap();
        assert_eq!((startup.period_seconds, startup.failure_threshold), (Some(10), Some(120)), "20 minutes to load");
        assert_eq!(ctr.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/healthz"));
        assert_eq!(ctr.ports.as_ref().unwrap()[0].container_port, 8080);
        let sc = ctr.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(c.service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 8080);
        assert_eq!(c.deployment.metadata.owner_references.as_ref().unwrap()[0].kind, "ModelServer");
    }

    #[test]
    fn an_autoscaler_owns_the_replica_count() {
        let fixed = children(&server("  replicas: 3\n"), &Options::default());
        assert_eq!(fixed.deployment.spec.as_ref().unwrap().replicas, Some(3));
        assert!(fixed.hpa.is_none() && fixed.scaled_object.is_none());

        let hpa = children(
            &server("  autoscaling: {minReplicas: 2, maxReplicas: 6, metric: queueDepth, target: 8}\n"),
            &Options::default(),
        );
        assert_eq!(hpa.deployment.spec.as_ref().unwrap().replicas, None, "never written: the HPA's");
        let h = hpa.hpa.unwrap().spec.unwrap();
        assert_eq!((h.min_replicas, h.max_replicas), (Some(2), 6));
        let m = &h.metrics.unwrap()[0];
        let pods = m.pods.as_ref().unwrap();
        assert_eq!(pods.metric.name, "vllm_num_requests_waiting");
        assert_eq!(pods.target.average_value.as_ref().unwrap().0, "8");
        assert!(h.behavior.is_none());

        let kv = children(
            &server(
                "  autoscaling: {maxReplicas: 4, metric: kvCacheUsage, target: 0.8, scaleDownStabilization: 10m}\n",
            ),
            &Options { hold_scale_down: true, ..Options::default() },
        );
        let h = kv.hpa.unwrap().spec.unwrap();
        assert_eq!(h.metrics.unwrap()[0].pods.as_ref().unwrap().target.average_value.as_ref().unwrap().0, "800m");
        let down = h.behavior.unwrap().scale_down.unwrap();
        assert_eq!(
            (down.select_policy.as_deref(), down.stabilization_window_seconds),
            (Some("Disabled"), Some(600)),
            "the stable of a rollout never scales down"
        );

        let keda = children(
            &server(
                "  autoscaling: {engine: keda, minReplicas: 0, maxReplicas: 4, metric: inflightRequests, target: 16, activationTarget: 1}\n",
            ),
            &Options { prometheus_address: Some("http://prometheus.monitoring:9090".into()), ..Options::default() },
        );
        assert!(keda.hpa.is_none());
        let so = keda.scaled_object.unwrap();
        assert_eq!(so["spec"]["minReplicaCount"], 0);
        let t = &so["spec"]["triggers"][0]["metadata"];
        assert_eq!(t["serverAddress"], "http://prometheus.monitoring:9090");
        assert_eq!(
            t["query"],
            r#"sum(vllm:num_requests_running{namespace="team-a",pod=~"llama-[a-z0-9]+-[a-z0-9]+"})"#
        );
        assert_eq!((t["threshold"].as_str(), t["activationThreshold"].as_str()), (Some("16"), Some("1")));
        assert_eq!(so["metadata"]["ownerReferences"][0]["name"], "llama");
        assert_eq!(so["metadata"]["ownerReferences"][0].get("blockOwnerDeletion"), None);
        let demand = &so["spec"]["triggers"][1];
        assert_eq!(demand["name"], "demand", "at zero, demand wakes it");
        assert_eq!(
            demand["metadata"]["query"],
            r#"clamp_max(sum(rate(bulwark_model_server_requests_total{namespace="team-a",model_server="llama"}[2m])), 1)"#
        );
        assert_eq!(
            (demand["metadata"]["threshold"].as_str(), demand["metadata"]["activationThreshold"].as_str()),
            (Some("1"), Some("0"))
        );
        let held = children(
            &server("  autoscaling: {engine: keda, minReplicas: 0, maxReplicas: 4, target: 16}\n"),
            &Options { hold_scale_down: true, ..Options::default() },
        );
        assert_eq!(held.scaled_object.unwrap()["spec"]["minReplicaCount"], 1, "a held stable keeps a replica");
        let floor = children(
            &server("  autoscaling: {engine: keda, minReplicas: 2, maxReplicas: 4, target: 16}\n"),
            &Options::default(),
        );
        assert_eq!(
            floor.scaled_object.unwrap()["spec"]["triggers"].as_array().unwrap().len(),
            1,
            "no demand trigger above zero"
        );
    }
}
