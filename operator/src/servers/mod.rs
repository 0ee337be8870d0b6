//! Self-hosted model servers, on the leader: each ModelServer's children (`build`) applied by
//! server-side apply, owned by it (garbage-collected with it) and applied again when they drift;
//! its status from its Deployment and pods (`state`): replicas, the Service URL and the
//! conditions `Accepted`, `Ready` and `Scheduled` (`InsufficientGPU` when no node has the GPUs).

pub mod build;
pub mod state;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use bulwark_api::{
    ModelServer,
    compile::ns_name,
    rollout::RolloutPhase,
    server::{Engine, ModelServerStatus},
    status::Condition,
};
use k8s_openapi::{
    api::{apps::v1::Deployment, autoscaling::v2::HorizontalPodAutoscaler, core::v1::Pod},
    jiff::{Timestamp, Unit},
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use serde::Serialize;
use tokio::sync::watch;

use crate::{FIELD_MANAGER, State, index::Index, write::apply_status};

use self::{
    build::{Children, Options},
    state::{DeploymentState, ServerPod},
};

/// How often every server's children are applied again, whatever the watches said.
const RESYNC: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(500);

/// What the operator was told about the cluster's autoscaling.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// KEDA is installed: ScaledObjects may be written.
    pub keda: bool,
    /// The Prometheus KEDA triggers query when a ModelServer names none.
    pub prometheus_address: Option<String>,
}

/// A pod as the index keeps it: ready at an IP, or waiting for a node and why.
pub fn pod_state(pod: &Pod) -> ServerPod {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let server = labels.get(build::SERVER_LABEL).cloned().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let condition = |t: &str| status.conditions.iter().flatten().find(|c| c.type_ == t).cloned();
    let ready = condition("Ready").is_some_and(|c| c.status == "True") && pod.metadata.deletion_timestamp.is_none();
    let unschedulable = condition("PodScheduled")
        .filter(|c| c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
        .map(|c| c.message.unwrap_or_default());
    ServerPod { server, ip: status.pod_ip.filter(|_| ready), unschedulable }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
    now: &str,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|p| p.type_ == type_ && p.status == status)
        .and_then(|p| p.last_transition_time.clone())
        .unwrap_or_else(|| now.to_owned());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Some(since),
    }
}

/// What a server's status says, from what it runs now. `invalid` is why it cannot run.
pub fn status<'a>(
    ms: &ModelServer,
    invalid: Option<&str>,
    deployment: Option<DeploymentState>,
    pods: impl Iterator<Item = &'a ServerPod>,
    now: &str,
) -> ModelServerStatus {
    let (ns, name) = ns_name(&ms.metadata);
    let generation = ms.metadata.generation;
    let previous = ms.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let c = |t: &str, ok: bool, reason: &str, message: String| {
        condition(t, ok, reason, message, generation, &previous, now)
    };
    let accepted = match invalid {
        Some(why) => c("Accepted", false, "Invalid", why.to_owned()),
        None => c("Accepted", true, "Accepted", "the model server is valid".into()),
    };
    let desired = deployment.and_then(|d| d.desired).unwrap_or(if ms.spec.autoscaling.is_some() { 1 } else { 0 });
    let ready = deployment.and_then(|d| d.ready).unwrap_or(0);
    let ready_condition = if invalid.is_some() {
        c("Ready", false, "NotRunning", "not run until it is valid".into())
    } else if ready > 0 {
        c("Ready", true, "Serving", format!("{ready} of {desired} replicas ready"))
    } else if deployment.is_some() && desired == 0 {
        c("Ready", false, "ScaledToZero", "no replica runs; the autoscaler starts one when load comes".into())
    } else {
        c(
            "Ready",
            false,
            "NoReplicaReady",
            format!("0 of {desired} replicas ready (loading the model, or not scheduled)"),
        )
    };
    let waiting: Vec<String> = pods.filter_map(|p| p.unschedulable.clone()).collect();
    let scheduled = match waiting.first() {
        None => c("Scheduled", true, "Scheduled", "every replica has a node".into()),
        Some(why) => {
            let gpu = build::gpu_resource(&ms.spec);
            let about_gpu = why.contains("nvidia.com/") || (gpu.is_some() && why.contains("affinity"));
            match (gpu, about_gpu) {
                (Some((resource, count)), true) => {
                    let g = ms.spec.gpu.clone().unwrap_or_default();
                    let products =
                        if g.products.is_empty() { String::new() } else { format!(" ({})", g.products.join(" or ")) };
                    let memory = g.min_memory_gib.map_or(String::new(), |m| format!(" with at least {m} GiB each"));
                    let message = format!(
                        "{} replica(s) wait: no node offers {count} {resource}{products}{memory}; the scheduler says: {why}",
                        waiting.len()
                    );
                    c("Scheduled", false, "InsufficientGPU", message)
                }
                _ => c("Scheduled", false, "Unschedulable", format!("{} replica(s) wait: {why}", waiting.len())),
            }
        }
    };
    ModelServerStatus {
        observed_generation: generation,
        replicas: deployment.map(|_| desired),
        ready_replicas: deployment.map(|_| ready),
        url: Some(ms.spec.service_url(&ns, &name)),
        conditions: vec![accepted, ready_condition, scheduled],
    }
}

/// Servers whose autoscalers must not scale down: the stables of rollouts in progress.
fn held(index: &Index) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for r in index.rollouts() {
        let active = r.status.as_ref().and_then(|s| s.phase).is_some_and(RolloutPhase::is_active);
        let (ns, _) = ns_name(&r.metadata);
        let Some(route) = index.route(&ns, &r.spec.route_ref.name).filter(|_| active) else { continue };
        let stable = route.spec.all_backends().find(|b| b.name == r.spec.stable.backend);
        if let Some(server) = stable.and_then(|b| b.model_server_ref.as_ref()) {
            out.insert((ns, server.name.clone()));
        }
    }
    out
}

/// The ModelServer each self-hosted backend names, for `bulwark_model_server_requests`:
/// `(namespace/route, backend)` to the server's name.
fn server_backends(index: &Index) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for route in index.routes() {
        let (ns, name) = ns_name(&route.metadata);
        for b in route.spec.all_backends() {
            if let Some(server) = &b.model_server_ref {
                out.insert((format!("{ns}/{name}"), b.name.clone()), server.name.clone());
            }
        }
    }
    out
}

/// One server's desired state, worked out under the index lock.
struct Plan {
    ms: ModelServer,
    invalid: Option<String>,
    children: Option<Children>,
    status: ModelServerStatus,
}

/// What the servers task remembers between ticks.
#[derive(Default)]
struct Memory {
    /// A hash of the children last applied, per server.
    applied: HashMap<(String, String), u64>,
    statuses: HashMap<(String, String), ModelServerStatus>,
    /// Servers whose children failed to apply: how many times in a row, and when to try again.
    failing: HashMap<(String, String), (u32, tokio::time::Instant)>,
    last_resync: Option<tokio::time::Instant>,
}

/// How long to wait after the `failures`-th failed apply in a row: 1 s, doubling up to a minute.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

fn hash(c: &Children) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&(&c.deployment, &c.service, &c.pdb, &c.hpa, &c.scaled_object))
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

fn plans(state: &State, settings: &Settings, now: &str) -> (Vec<Plan>, BTreeSet<(String, String)>) {
    let mut index = state.index.lock();
    let held = held(&index);
    let drifted = index.servers.take_drifted();
    let plans = index
        .servers
        .all()
        // A server being deleted keeps what it runs until the garbage collector takes it.
        .filter(|ms| ms.metadata.deletion_timestamp.is_none())
        .map(|ms| {
            let (ns, name) = ns_name(&ms.metadata);
            let mut errors = bulwark_api::validate::model_server(&name, &ms.spec);
            let wants_keda = ms.spec.autoscaling.as_ref().is_some_and(|a| a.engine == Engine::Keda);
            if wants_keda && !settings.keda {
                errors.push(bulwark_api::validate::FieldError {
                    path: "spec.autoscaling.engine".into(),
                    message: "keda needs KEDA: install it and run the operator with --keda (chart: keda.enabled=true)"
                        .into(),
                });
            }
            let keda = ms.spec.autoscaling.as_ref().filter(|a| a.engine == Engine::Keda);
            if keda.is_some_and(|a| a.prometheus_address.is_none()) && settings.prometheus_address.is_none() {
                errors.push(bulwark_api::validate::FieldError {
                    path: "spec.autoscaling.prometheusAddress".into(),
                    message: "keda's triggers query Prometheus: name it here, or run the operator with \
                              --prometheus-address (chart: keda.prometheusAddress)"
                        .into(),
                });
            }
            let invalid = (!errors.is_empty()).then(|| bulwark_api::validate::join(&errors));
            let opts = Options {
                prometheus_address: settings.prometheus_address.clone(),
                hold_scale_down: held.contains(&(ns.clone(), name.clone())),
            };
            let children = invalid.is_none().then(|| build::children(ms, &opts));
            let deployment = index.servers.deployment(&ns, &name);
            let status = status(ms, invalid.as_deref(), deployment, index.servers.pods_of(&ns, &name), now);
            Plan { ms: ms.clone(), invalid, children, status }
        })
        .collect();
    (plans, drifted)
}

/// Applies every server's children (when they changed, drifted, or at a resync) and status.
pub async fn run(state: Arc<State>, client: Client, settings: Settings, mut shutdown: watch::Receiver<bool>) {
    let mut memory = Memory::default();
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        if state.is_synced() {
            let backends = server_backends(&state.index.lock());
            state.reports.lock().servers = backends;
        }
        if !state.is_leader() || !state.is_synced() {
            memory = Memory::default();
            continue;
        }
        let now = Timestamp::now().round(Unit::Second).unwrap_or_default().to_string();
        let resync = memory.last_resync.is_none_or(|t| t.elapsed() >= RESYNC);
        if resync {
            memory.applied.clear();
            memory.last_resync = Some(tokio::time::Instant::now());
        }
        let (plans, drifted) = plans(&state, &settings, &now);
        let live: BTreeSet<(String, String)> = plans.iter().map(|p| ns_name(&p.ms.metadata)).collect();
        memory.applied.retain(|k, _| live.contains(k));
        memory.statuses.retain(|k, _| live.contains(k));
        memory.failing.retain(|k, _| live.contains(k));
        for plan in plans {
            if !state.is_leader() {
                break;
            }
            let key = ns_name(&plan.ms.metadata);
            if let Some(children) = &plan.children {
                let h = hash(children);
                let due = memory.failing.get(&key).is_none_or(|(_, at)| tokio::time::Instant::now() >= *at);
                if due && (memory.applied.get(&key) != Some(&h) || drifted.contains(&key)) {
                    match apply_children(&client, &key.0, &key.1, children, settings.keda).await {
                        Ok(()) => {
                            state.metrics.write("ModelServerChildren", true);
                            memory.applied.insert(key.clone(), h);
                            memory.failing.remove(&key);
                        }
                        Err(e) => {
                            state.metrics.write("ModelServerChildren", false);
                            let failures = memory.failing.get(&key).map_or(1, |(n, _)| n + 1);
                            let wait = backoff(failures);
                            tracing::warn!(namespace = %key.0, server = %key.1, retry_in = ?wait, "applying what the model server runs: {e}");
                            memory.failing.insert(key.clone(), (failures, tokio::time::Instant::now() + wait));
                        }
                    }
                }
            } else if let Some(why) = &plan.invalid {
                tracing::debug!(namespace = %key.0, server = %key.1, "not run: {why}");
            }
            if memory.statuses.get(&key) != Some(&plan.status) {
                let fields = serde_json::to_value(&plan.status).unwrap_or_default();
                match apply_status::<ModelServer>(&client, &key.0, &key.1, FIELD_MANAGER, fields).await {
                    Ok(()) => {
                        state.metrics.write("status", true);
                        memory.statuses.insert(key, plan.status);
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        state.metrics.write("status", false);
                        tracing::warn!(namespace = %key.0, server = %key.1, "writing the model server's status: {e}");
                    }
                }
            }
        }
    }
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> kube::Result<()>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj)).await.map(|_| ())
}

/// Deletes an object that is no longer wanted (another autoscaler engine, or none).
async fn remove<K>(api: Api<K>, name: &str) -> kube::Result<()>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

fn scaled_objects(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk_with_plural(&gvk, "scaledobjects"))
}

/// The manager that keeps the replica count while an autoscaler takes it over.
const HANDOVER_MANAGER: &str = "bulwark-operator-handover";

/// Before the operator stops writing `replicas` (an autoscaler now owns the count), hands the
/// field to another manager at its live value: dropping it from an apply that owned it alone
/// would reset the Deployment to one replica. A Deployment at zero that an HPA takes over is
/// raised to the HPA's minimum, since an HPA does not scale up from zero.
async fn hand_over_replicas(client: &Client, ns: &str, c: &Children) -> kube::Result<()> {
    let name = c.deployment.metadata.name.clone().unwrap_or_default();
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let Some(live) = api.get_opt(&name).await? else { return Ok(()) };
    let ours = live.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some(FIELD_MANAGER)
            && m.operation.as_deref() == Some("Apply")
            && m.fields_v1.as_ref().is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
    });
    let replicas = live.spec.and_then(|s| s.replicas);
    let hpa_min = c.hpa.as_ref().and_then(|h| h.spec.as_ref()).map(|s| s.min_replicas.unwrap_or(1).max(1));
    let keep = match (replicas, hpa_min) {
        (Some(0), Some(min)) => min,
        (Some(n), _) => n,
        (None, _) => return Ok(()),
    };
    if !ours && replicas == Some(keep) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": keep},
    });
    api.patch(&name, &PatchParams::apply(HANDOVER_MANAGER).force(), &Patch::Apply(&patch)).await.map(|_| ())
}

async fn apply_children(client: &Client, ns: &str, name: &str, c: &Children, keda: bool) -> kube::Result<()> {
    if c.deployment.spec.as_ref().is_some_and(|s| s.replicas.is_none()) {
        hand_over_replicas(client, ns, c).await?;
    }
    apply(client, ns, &c.deployment).await?;
    apply(client, ns, &c.service).await?;
    apply(client, ns, &c.pdb).await?;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
    match &c.hpa {
        Some(hpa) => apply(client, ns, hpa).await?,
        None => remove(hpas, name).await?,
    }
    match &c.scaled_object {
        Some(so) => {
            let so: DynamicObject = serde_json::from_value(so.clone()).map_err(kube::Error::SerdeError)?;
            let pp = PatchParams::apply(FIELD_MANAGER).force();
            scaled_objects(client, ns).patch(name, &pp, &Patch::Apply(&so)).await?;
        }
        None if keda => remove(scaled_objects(client, ns), name).await?,
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn server(spec: &str) -> ModelServer {
        serde_yaml::from_str(&format!(
            "apiVersion: bulwark.dev/v1alpha1\nkind: ModelServer\nmetadata: {{name: llama, namespace: team-a, generation: 2}}\nspec:\n  image: vllm/vllm-openai:v0.11.0\n{spec}"
        ))
        .unwrap()
    }

    fn brief(s: &ModelServerStatus) -> Vec<(String, String, String)> {
        s.conditions.iter().map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone())).collect()
    }

    #[test]
    fn a_failing_apply_backs_off_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn status_says_how_many_serve_and_what_no_node_offers() {
        let gpu = server("  gpu: {count: 2, products: [NVIDIA-H100-80GB-HBM3], minMemoryGiB: 40}\n  replicas: 2\n");
        let d = DeploymentState { generation: Some(1), desired: Some(2), ready: Some(1) };
        let waiting = ServerPod {
            server: "llama".into(),
            ip: None,
            unschedulable: Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into()),
        };
        let s = status(&gpu, None, Some(d), [waiting].iter(), "t0");
        let t = |x: &str| x.to_owned();
        assert_eq!(
            brief(&s),
            [
                (t("Accepted"), t("True"), t("Accepted")),
                (t("Ready"), t("True"), t("Serving")),
                (t("Scheduled"), t("False"), t("InsufficientGPU"))
            ]
        );
        assert_eq!(
            s.conditions[2].message,
            "1 replica(s) wait: no node offers 2 nvidia.com/gpu (NVIDIA-H100-80GB-HBM3) with at least 40 GiB each; the scheduler says: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
        );
        assert_eq!((s.replicas, s.ready_replicas, s.observed_generation), (Some(2), Some(1), Some(2)));
        assert_eq!(s.url.as_deref(), Some("http://llama.team-a.svc:8000/v1"));

        let none = status(&gpu, None, None, std::iter::empty(), "t0");
        assert_eq!(brief(&none)[1], (t("Ready"), t("False"), t("NoReplicaReady")));
        let zero = server("  autoscaling: {engine: keda, minReplicas: 0, maxReplicas: 2, target: 4}\n");
        let scaled_down = DeploymentState { generation: Some(3), desired: Some(0), ready: None };
        assert_eq!(brief(&status(&zero, None, Some(scaled_down), std::iter::empty(), "t0"))[1].2, "ScaledToZero");
        let invalid = status(&gpu, Some("spec.gpu.count: must be at least 1"), None, std::iter::empty(), "t0");
        assert_eq!(brief(&invalid)[0], (t("Accepted"), t("False"), t("Invalid")));
        let cpu = server("");
        let elsewhere = ServerPod {
            server: "llama".into(),
            ip: None,
            unschedulable: Some("0/3 nodes are available: 3 Insufficient memory.".into()),
        };
        assert_eq!(brief(&status(&cpu, None, None, [elsewhere].iter(), "t0"))[2].2, "Unschedulable");
    }
}
