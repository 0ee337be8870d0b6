//! What the leader writes: one ConfigMap per workload, `bulwark-<workload>`, holding its group's
//! config (server-side apply, owned by the group's routes; the bootstrap and fallback copy that
//! a pod spec can name in advance), the status of every resource, and an Event whenever a
//! condition changes. Writes that would change nothing are skipped.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use bulwark_api::{LLMRoute, ModelRollout, Rejection, ScannerPolicy, route::SidecarCounts, status::Condition};
use k8s_openapi::{
    api::core::v1::ConfigMap,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::json;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::{
    FIELD_MANAGER, State,
    index::{Group, Kind},
    reconcile::Compiled,
    status::conditions,
};

/// Labels on the ConfigMaps the operator owns.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "bulwark-operator");
pub const GROUP_LABEL: &str = "bulwark.dev/group";
pub const VERSION_ANNOTATION: &str = "bulwark.dev/config-version";
pub const WORKLOAD_ANNOTATION: &str = "bulwark.dev/workload";
/// The key of the compiled config in a workload's ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";

/// The name of a workload's ConfigMap copy: `bulwark-<workload>`, or `bulwark-` and a hash of the
/// workload when that is no valid name (too long, or a label value with upper case or `_`).
pub fn configmap_name(workload: &str) -> String {
    let name = format!("bulwark-{workload}");
    let valid = name.len() <= 253
        && name.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
        });
    if valid {
        return name;
    }
    use sha2::Digest as _;
    let hex: String = sha2::Sha256::digest(workload.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("bulwark-{hex}")
}

/// Which group's config each workload's copy holds: its only group, or, while a rollout of the
/// workload changes its labels, the group with most of its pods (the first such group on a tie).
fn copies(groups: &[Group]) -> BTreeMap<(&str, &str), &Group> {
    let mut best: BTreeMap<(&str, &str), (usize, &Group)> = BTreeMap::new();
    for g in groups {
        for (workload, &pods) in &g.workloads {
            let entry = best.entry((g.namespace.as_str(), workload.as_str())).or_insert((pods, g));
            if pods > entry.0 {
                *entry = (pods, g);
            }
        }
    }
    best.into_iter().map(|(k, (_, g))| (k, g)).collect()
}

pub struct Writer {
    client: Client,
    state: Arc<State>,
    /// PEM of the config stream's CA, copied into every ConfigMap for the sidecars to trust.
    ca: Option<String>,
    recorder: Recorder,
    /// The watched namespace, or `None` for all.
    namespace: Option<String>,
    /// The stamp of each ConfigMap as last written or listed.
    configmaps: HashMap<(String, String), String>,
    /// The status of each resource as last written.
    statuses: HashMap<(Kind, String, String), Written>,
    /// ConfigMaps named like a copy that are someone else's (looked at once per leadership).
    foreign: HashSet<(String, String)>,
}

/// A status as written: `observedGeneration`, the conditions, the sidecar counts.
type Written = (Option<i64>, Vec<Condition>, SidecarCounts);

/// What identifies a ConfigMap's content for the skip check: the config version and the owners
/// (a route deleted and recreated has a new uid, and the copy needs the new owner).
fn stamp(version: &str, owners: &[OwnerReference]) -> String {
    let uids: Vec<&str> = owners.iter().map(|o| o.uid.as_str()).collect();
    format!("{version}/{}", uids.join(","))
}

/// One resource's status as computed now, and what it said before.
struct Target {
    kind: Kind,
    namespace: String,
    name: String,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    generation: Option<i64>,
    previous: Vec<Condition>,
    sidecars: SidecarCounts,
}

impl Writer {
    pub fn new(
        client: Client,
        state: Arc<State>,
        namespace: Option<String>,
        ca: Option<String>,
        identity: &str,
    ) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(identity.to_owned()) };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            state,
            namespace,
            ca,
            configmaps: HashMap::new(),
            statuses: HashMap::new(),
            foreign: HashSet::new(),
        }
    }

    /// Starts over as a new leader: learns which ConfigMaps exist, rewrites every status.
    async fn resync(&mut self) {
        self.statuses.clear();
        self.configmaps.clear();
        self.foreign.clear();
        let api: Api<ConfigMap> = match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let lp = ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
        match api.list(&lp).await {
            Ok(list) => {
                for cm in list {
                    let version = cm.annotations().get(VERSION_ANNOTATION).cloned().unwrap_or_default();
                    let stamp = stamp(&version, cm.owner_references());
                    self.configmaps.insert((cm.namespace().unwrap_or_default(), cm.name_any()), stamp);
                }
            }
            Err(e) => tracing::warn!("listing managed ConfigMaps: {e}"),
        }
    }

    async fn configmaps(&mut self, compiled: &Compiled) {
        let mut live = HashSet::new();
        // The owners and stamp of a group's copies, worked out once for all its workloads.
        let mut of_group: HashMap<&str, (Vec<OwnerReference>, String)> = HashMap::new();
        for ((ns, workload), g) in copies(&compiled.groups) {
            let name = configmap_name(workload);
            let key = (ns.to_owned(), name.clone());
            live.insert(key.clone());
            let (owners, stamp) = of_group.entry(g.name.as_str()).or_insert_with(|| {
                let owners = self.owners(g);
                let stamp = stamp(&g.config.version, &owners);
                (owners, stamp)
            });
            if self.configmaps.get(&key) == Some(&*stamp) || !self.state.is_leader() {
                continue;
            }
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
            // A ConfigMap of that name that is not ours is never taken over (nor deleted later).
            if self.foreign.contains(&key) {
                continue;
            }
            if !self.configmaps.contains_key(&key) {
                match api.get_opt(&name).await {
                    Ok(Some(other)) if other.labels().get(MANAGED_BY.0).map(String::as_str) != Some(MANAGED_BY.1) => {
                        tracing::warn!(namespace = %ns, configmap = %name, workload, "a ConfigMap of this name exists and is not the operator's; the workload's copy is not written");
                        self.foreign.insert(key);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(namespace = %ns, configmap = %name, "reading the config copy: {e}");
                        self.state.metrics.write("ConfigMap", false);
                        continue;
                    }
                }
            }
            let cm = self.configmap(g, &name, workload, owners.clone());
            let pp = PatchParams::apply(FIELD_MANAGER).force();
            let span = tracing::info_span!("copy", namespace = %ns, configmap = %name, workload);
            let written = async {
                match api.patch(&name, &pp, &Patch::Apply(&cm)).await {
                    Ok(_) => {
                        tracing::debug!(version = %g.config.version, group = %g.name, "config copy written");
                        true
                    }
                    Err(e) => {
                        tracing::warn!("writing the config copy: {e}");
                        false
                    }
                }
            };
            let ok = written.instrument(span).await;
            self.state.metrics.write("ConfigMap", ok);
            if ok {
                self.configmaps.insert(key, stamp.clone());
            }
        }
        let gone: Vec<_> = self.configmaps.keys().filter(|k| !live.contains(*k)).cloned().collect();
        for (ns, name) in gone {
            if !self.state.is_leader() {
                return;
            }
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
            let deleted = match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                Err(e) => Err(e),
            };
            match deleted {
                Ok(()) => {
                    self.configmaps.remove(&(ns, name));
                    self.state.metrics.write("ConfigMap", true);
                }
                Err(e) => {
                    self.state.metrics.write("ConfigMap", false);
                    tracing::warn!(namespace = %ns, configmap = %name, "deleting an unused config copy: {e}");
                }
            }
        }
    }

    /// The group's routes, as owners of its ConfigMaps.
    fn owners(&self, g: &Group) -> Vec<OwnerReference> {
        let index = self.state.index.lock();
        g.routes
            .iter()
            .filter_map(|name| index.route(&g.namespace, name))
            .filter_map(|r| r.controller_owner_ref(&()))
            .map(|mut o| {
                // Owned by every route of the group; the last one deleted takes the copy with it.
                o.controller = None;
                o.block_owner_deletion = None;
                o
            })
            .collect()
    }

    /// The ConfigMap copy of a workload whose pods are in group `g`.
    fn configmap(&self, g: &Group, name: &str, workload: &str, owners: Vec<OwnerReference>) -> ConfigMap {
        let mut data = BTreeMap::new();
        data.insert(CONFIG_KEY.to_owned(), serde_yaml::to_string(&g.config).unwrap_or_default());
        if let Some(ca) = &self.ca {
            data.insert("ca.crt".to_owned(), ca.clone());
        }
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(g.namespace.clone()),
                labels: Some(
                    [(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()), (GROUP_LABEL.to_owned(), g.name.clone())]
                        .into(),
                ),
                annotations: Some(
                    [
                        (VERSION_ANNOTATION.to_owned(), g.config.version.clone()),
                        (WORKLOAD_ANNOTATION.to_owned(), workload.to_owned()),
                    ]
                    .into(),
                ),
                owner_references: (!owners.is_empty()).then_some(owners),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        }
    }

    /// Every resource the compile saw that still exists, with what its status should say.
    fn targets(&self, compiled: &Compiled) -> Vec<Target> {
        let index = self.state.index.lock();
        let mut out = vec![];
        let mut push = |kind: Kind, reference, meta: &ObjectMeta, previous: Option<&Vec<Condition>>| {
            let (namespace, name) = bulwark_api::compile::ns_name(meta);
            // A resource created since the compile is written after the next one.
            let Some(generation) = compiled.generation(kind, &namespace, &name) else { return };
            out.push(Target {
                sidecars: index.sidecars(&compiled.groups, kind, &namespace, &name),
                reference,
                generation,
                previous: previous.cloned().unwrap_or_default(),
                kind,
                namespace,
                name,
            });
        };
        for r in index.routes() {
            push(Kind::Route, r.object_ref(&()), r.meta(), r.status.as_ref().map(|s| &s.conditions));
        }
        for p in index.policies() {
            push(Kind::Policy, p.object_ref(&()), p.meta(), p.status.as_ref().map(|s| &s.conditions));
        }
        for r in index.rollouts() {
            push(Kind::Rollout, r.object_ref(&()), r.meta(), r.status.as_ref().map(|s| &s.conditions));
        }
        out
    }

    async fn statuses(&mut self, compiled: &Compiled) {
        let now =
            k8s_openapi::jiff::Timestamp::now().round(k8s_openapi::jiff::Unit::Second).unwrap_or_default().to_string();
        let rejections: HashMap<(&str, &str, &str), &Rejection> =
            compiled.rejected.iter().map(|r| ((r.kind, r.namespace.as_str(), r.name.as_str()), r)).collect();
        let mut seen = HashSet::new();
        for t in self.targets(compiled) {
            let key = (t.kind, t.namespace.clone(), t.name.clone());
            seen.insert(key.clone());
            let rejection = rejections.get(&(t.kind.as_str(), t.namespace.as_str(), t.name.as_str())).copied();
            // What this replica wrote last is newer than the watch's copy, which may lag.
            let previous = self.statuses.get(&key).map_or(&t.previous, |(_, c, _)| c).clone();
            let conds = conditions(t.generation, rejection, &t.sidecars, &previous, &now);
            let status = (t.generation, conds, t.sidecars.clone());
            if self.statuses.get(&key) == Some(&status) || !self.state.is_leader() {
                continue;
            }
            let span = tracing::info_span!("status", kind = t.kind.as_str(), namespace = %t.namespace, name = %t.name);
            if self.write_status(&t, &previous, &status).instrument(span).await {
                self.statuses.insert(key, status);
            }
        }
        self.statuses.retain(|k, _| seen.contains(k));
    }

    /// Writes one resource's status, then an Event for each changed condition; true once written.
    async fn write_status(&self, t: &Target, previous: &[Condition], status: &Written) -> bool {
        let (generation, conds, sidecars) = status;
        let (c, ns, name) = (&self.client, t.namespace.as_str(), t.name.as_str());
        let result = match t.kind {
            Kind::Route | Kind::Policy => {
                let fields = json!({"observedGeneration": generation, "conditions": conds, "sidecars": sidecars});
                match t.kind {
                    Kind::Route => apply_status::<LLMRoute>(c, ns, name, FIELD_MANAGER, fields).await,
                    _ => apply_status::<ScannerPolicy>(c, ns, name, FIELD_MANAGER, fields).await,
                }
            }
            // A rollout's observedGeneration is its driver's: the generation its steps follow.
            Kind::Rollout => {
                let fields = json!({"conditions": conds, "sidecars": sidecars});
                apply_status::<ModelRollout>(c, ns, name, FIELD_MANAGER, fields).await
            }
            Kind::Pod | Kind::Secret | Kind::Server | Kind::ServerPod | Kind::Deployment => Ok(()),
        };
        match result {
            Ok(()) => {
                tracing::debug!(generation, "status written");
                self.state.metrics.write("status", true);
                self.events(t, previous, conds).await;
                true
            }
            // Deleted meanwhile: the watch will say so.
            Err(kube::Error::Api(s)) if s.code == 404 => false,
            Err(e) => {
                self.state.metrics.write("status", false);
                tracing::warn!("writing status: {e}");
                false
            }
        }
    }

    /// An Event for each condition whose status or reason changed.
    async fn events(&self, t: &Target, previous: &[Condition], now: &[Condition]) {
        for c in now {
            let before = previous.iter().find(|p| p.type_ == c.type_);
            if before.is_some_and(|b| b.status == c.status && b.reason == c.reason) {
                continue;
            }
            // The first Ready=True of a resource no sidecar selects says nothing worth an Event.
            if before.is_none() && c.status == "True" && c.type_ != "Accepted" {
                continue;
            }
            let type_ = if c.status == "True" { EventType::Normal } else { EventType::Warning };
            let ev = Event {
                type_,
                reason: c.reason.clone(),
                note: Some(format!("{}={}: {}", c.type_, c.status, c.message).chars().take(1000).collect()),
                action: "Reconcile".into(),
                secondary: None,
            };
            let ok = self.recorder.publish(&ev, &t.reference).await;
            self.state.metrics.write("Event", ok.is_ok());
            if let Err(e) = ok {
                tracing::debug!(name = %t.name, "publishing an event: {e}");
            }
        }
    }
}

/// Applies `status` to the status subresource of `K` `ns/name` as `manager` (server-side apply,
/// forced): the fields it names are that writer's, and every other writer's fields, conditions
/// of other types among them, stay as they are.
pub async fn apply_status<K>(
    client: &Client,
    ns: &str,
    name: &str,
    manager: &str,
    status: serde_json::Value,
) -> kube::Result<()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let body = json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
    api.patch_status(name, &PatchParams::apply(manager).force(), &Patch::Apply(&body)).await.map(|_| ())
}

/// Writes while this replica leads: after each compile, when sidecars report a new version,
/// and every `resync` as a safety net (every status and ConfigMap rewritten if it drifted).
pub async fn run(
    mut writer: Writer,
    mut compiled: watch::Receiver<Option<Arc<Compiled>>>,
    resync: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut leading = false;
    let mut every = tokio::time::interval(resync);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        tokio::select! {
            r = compiled.changed() => if r.is_err() { return },
            _ = writer.state.restatus.notified() => {}
            _ = every.tick() => leading = false,
            _ = shutdown.changed() => return,
        }
        if !writer.state.is_leader() {
            leading = false;
            continue;
        }
        // Nothing is written before the first compile of a fully listed cluster.
        let Some(current) = compiled.borrow_and_update().clone() else { continue };
        if !leading {
            writer.resync().await;
            leading = true;
        }
        writer.configmaps(&current).await;
        writer.statuses(&current).await;
        // Reports arrive in bursts; batch the status writes they cause.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn group(name: &str, ns: &str, workloads: &[(&str, usize)]) -> Group {
        Group {
            namespace: ns.into(),
            name: name.into(),
            routes: vec![],
            pods: vec![],
            workloads: workloads.iter().map(|(w, n)| ((*w).to_owned(), *n)).collect(),
            config: bulwark_api::SidecarConfig::default(),
        }
    }

    #[test]
    fn each_workload_gets_one_copy_from_the_group_with_most_of_its_pods() {
        let groups = [
            group("g1", "a", &[("chat", 1), ("batch", 2)]),
            // `chat` mid-rollout: its new pods carry labels that select other routes.
            group("g2", "a", &[("chat", 3)]),
            group("g3", "b", &[("chat", 1)]),
            group("g4", "a", &[("batch", 2)]),
        ];
        let picked: Vec<_> = copies(&groups).into_iter().map(|((ns, w), g)| (ns, w, g.name.as_str())).collect();
        assert_eq!(picked, [("a", "batch", "g1"), ("a", "chat", "g2"), ("b", "chat", "g3")]);
    }

    #[test]
    fn copies_are_named_after_the_workload_within_the_name_limit() {
        assert_eq!(configmap_name("chat"), "bulwark-chat");
        assert_eq!(configmap_name("chat.v2"), "bulwark-chat.v2");
        for label in ["Chat", "chat_bot", "chat-", "chat..v2"] {
            let name = configmap_name(label);
            assert!(name.len() == "bulwark-".len() + 16 && !name.contains(label), "{label}: {name}");
        }
        let long = "w".repeat(250);
        let name = configmap_name(&long);
        assert!(name.starts_with("bulwark-") && name.len() == "bulwark-".len() + 16, "{name}");
        assert_ne!(name, configmap_name(&"v".repeat(250)));
    }
}
