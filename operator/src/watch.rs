//! Watches feed the index: routes, policies, rollouts, and the pods that run a sidecar (label
//! `bulwark.dev/inject=true`). Each watch relists after a gap and forgets what vanished; only a
//! change that can alter a sidecar's config wakes the compiler.

use std::{collections::BTreeSet, fmt::Debug, sync::Arc};

use bulwark_api::{LLMRoute, ModelRollout, ModelServer, ScannerPolicy, compile::ns_name, control::SIDECAR_LABEL};
use futures_util::StreamExt as _;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Pod, Secret},
};
use kube::{
    Api, Client, Resource,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;

use crate::{
    State,
    index::{Index, Kind},
};

/// A kind the index keeps.
pub trait Indexed: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    const KIND: Kind;
    /// Stores the object; true when a sidecar's config may change.
    fn store(self, ix: &mut Index) -> bool;
    fn remove(ns: &str, name: &str, ix: &mut Index);
}

impl Indexed for LLMRoute {
    const KIND: Kind = Kind::Route;
    fn store(self, ix: &mut Index) -> bool {
        ix.apply_route(self)
    }
    fn remove(ns: &str, name: &str, ix: &mut Index) {
        ix.delete_route(ns, name);
    }
}

impl Indexed for ScannerPolicy {
    const KIND: Kind = Kind::Policy;
    fn store(self, ix: &mut Index) -> bool {
        ix.apply_policy(self)
    }
    fn remove(ns: &str, name: &str, ix: &mut Index) {
        ix.delete_policy(ns, name);
    }
}

impl Indexed for ModelRollout {
    const KIND: Kind = Kind::Rollout;
    fn store(self, ix: &mut Index) -> bool {
        ix.apply_rollout(self)
    }
    fn remove(ns: &str, name: &str, ix: &mut Index) {
        ix.delete_rollout(ns, name);
    }
}

impl Indexed for Pod {
    const KIND: Kind = Kind::Pod;
    fn store(self, ix: &mut Index) -> bool {
        let (ns, name) = ns_name(&self.metadata);
        let finished =
            self.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
        if finished {
            let known = ix.pod(&ns, &name).is_some();
            ix.delete_pod(&ns, &name);
            return known;
        }
        let workload = crate::index::workload_of(&self.metadata);
        let pod = crate::index::Pod {
            service_account: self.spec.and_then(|s| s.service_account_name).unwrap_or_else(|| "default".into()),
            uid: self.metadata.uid.unwrap_or_default(),
            labels: self.metadata.labels.unwrap_or_default().into_iter().collect(),
            workload,
            applied: None,
        };
        ix.upsert_pod(&ns, &name, pod)
    }
    fn remove(ns: &str, name: &str, ix: &mut Index) {
        ix.delete_pod(ns, name);
    }
}

impl Indexed for ModelServer {
    const KIND: Kind = Kind::Server;
    fn store(self, ix: &mut Index) -> bool {
        ix.servers.apply_server(self)
    }
    fn remove(ns: &str, name: &str, ix: &mut Index) {
        ix.servers.delete_server(ns, name);
    }
}

/// A pod of a ModelServer (label `bulwark.dev/model-server`), watched apart from sidecar pods.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(transparent)]
pub struct ServerPod(pub Pod);

impl Resource for ServerPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;
    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::kind(dt)
    }
    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::group(dt)
    }
    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::version(dt)
    }
    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::plural(dt)
    }
    fn meta(&self) -> &kube::core::ObjectMeta {
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut kube::core::ObjectMeta {
        &mut self.0.metadata
    }
}

impl Indexed for ServerPod {
    const KIND: Kind = Kind::ServerPod;
    fn store(self, ix: &mut Index) -> bool {
        let (ns, name) = ns_name(&self.0.metadata);
        let pod = crate::servers::pod_state(&self.0);
        ix.servers.apply_pod(&ns, &name, pod)
    }
    fn remove(ns: &str, name: &str, ix: &mut Index) {
        ix.servers.delete_pod(ns, name);
    }
}

impl Indexed for Deployment {
    const KIND: Kind = Kind::Deployment;
    fn store(self, ix: &mut Index) -> bool {
        let (ns, name) = ns_name(&self.metadata);
        let status = self.status.unwrap_or_default();
        let d = crate::servers::state::DeploymentState {
            generation: self.metadata.generation,
            desired: self.spec.and_then(|s| s.replicas),
            ready: status.ready_replicas,
        };
        ix.servers.apply_deployment(&ns, &name, d);
        false
    }
    fn remove(ns: &str, name: &str, ix: &mut Index) {
        ix.servers.delete_deployment(ns, name);
    }
}

/// Secrets by name only: `Api<PartialObjectMeta<_>>` asks for metadata, never the data, so
/// routes can say which referenced Secret is missing.
impl Indexed for PartialObjectMeta<Secret> {
    const KIND: Kind = Kind::Secret;
    fn store(self, ix: &mut Index) -> bool {
        let (ns, name) = ns_name(&self.metadata);
        ix.apply_secret(&ns, &name)
    }
    fn remove(ns: &str, name: &str, ix: &mut Index) {
        ix.delete_secret(ns, name);
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Follows one kind until the process ends. Marks the kind synced after its first full list.
pub async fn follow<K>(client: Client, namespace: Option<String>, state: Arc<State>)
where
    K: Indexed + Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let mut config = watcher::Config::default();
    match K::KIND {
        Kind::Pod => config = config.labels(&format!("{SIDECAR_LABEL}=true")),
        Kind::ServerPod | Kind::Deployment => config = config.labels(crate::servers::build::SERVER_LABEL),
        _ => {}
    }
    let events = watcher(api::<K>(&client, namespace.as_deref()), config).default_backoff().boxed();
    consume(events, state).await;
}

async fn consume<K: Indexed>(
    mut events: futures_util::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
    state: Arc<State>,
) {
    // A (re)list is applied whole at its end, so no compile sees half old, half new objects.
    let mut relisting: Option<Vec<K>> = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(kind = K::KIND.as_str(), "watch failed, retrying: {e}");
                state.metrics.watch_errors.inc();
                continue;
            }
        };
        let changed = {
            let mut ix = state.index.lock();
            match event {
                watcher::Event::Init => {
                    relisting = Some(vec![]);
                    false
                }
                watcher::Event::InitApply(obj) => match relisting.as_mut() {
                    Some(listed) => {
                        listed.push(obj);
                        false
                    }
                    None => obj.store(&mut ix),
                },
                watcher::Event::InitDone => {
                    let listed = relisting.take().unwrap_or_default();
                    let seen: BTreeSet<(String, String)> = listed.iter().map(|o| ns_name(o.meta())).collect();
                    ix.retain(K::KIND, &seen);
                    for obj in listed {
                        obj.store(&mut ix);
                    }
                    state.synced(K::KIND);
                    // Relists are rare, and a compile that changes nothing pushes nothing.
                    true
                }
                watcher::Event::Apply(obj) => {
                    let (ns, name) = ns_name(obj.meta());
                    let changed = obj.store(&mut ix);
                    tracing::debug!(kind = K::KIND.as_str(), namespace = %ns, name = %name, changed, "applied");
                    changed
                }
                watcher::Event::Delete(obj) => {
                    let (ns, name) = ns_name(obj.meta());
                    tracing::debug!(kind = K::KIND.as_str(), namespace = %ns, name = %name, "deleted");
                    K::remove(&ns, &name, &mut ix);
                    true
                }
            }
        };
        if changed {
            state.changed();
        }
    }
}
