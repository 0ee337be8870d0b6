//! The in-memory index: resources and sidecar pods by namespace. Pods that select the same set
//! of routes share one compiled config (a group), so a change recompiles per group, not per pod.

use std::collections::{BTreeMap, BTreeSet};

use bulwark_api::compile::ns_name;
use bulwark_api::{
    CompileOptions, LLMRoute, ModelRollout, Rejection, Resources, ScannerPolicy, SidecarConfig, Workload, compile,
    rollout::{ModelRolloutStatus, machine},
    selector,
};
use sha2::{Digest, Sha256};

/// A sidecar-enabled pod and the config version its sidecar last reported applying.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub uid: String,
    /// The workload the pod belongs to (see [`workload_of`]); its ConfigMap copy is named after it.
    pub workload: String,
    pub applied: Option<String>,
}

/// Names the pod's workload explicitly, overriding what its owner says.
pub const WORKLOAD_LABEL: &str = "bulwark.dev/workload";

/// The workload a pod belongs to: the `bulwark.dev/workload` label if set; else the Deployment
/// behind its ReplicaSet (the ReplicaSet's name less the `pod-template-hash` suffix); else its
/// controller (StatefulSet, DaemonSet, Job, ...); else its `generateName` less the trailing `-`;
/// else the pod itself. Every replica of a workload, and its replacements, get the same name,
/// so a pod spec can mount its copy; and a pod at admission, before it has a name, gets the
/// name it will have once created.
pub fn workload_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    let labels = meta.labels.as_ref();
    if let Some(w) = labels.and_then(|l| l.get(WORKLOAD_LABEL)).filter(|w| !w.is_empty()) {
        return w.clone();
    }
    let owner = meta.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    match owner {
        Some(o) if o.kind == "ReplicaSet" => {
            let hash = labels.and_then(|l| l.get("pod-template-hash"));
            hash.and_then(|h| o.name.strip_suffix(h.as_str())?.strip_suffix('-'))
                .filter(|d| !d.is_empty())
                .unwrap_or(&o.name)
                .to_owned()
        }
        Some(o) => o.name.clone(),
        None => match meta.generate_name.as_deref().map(|g| g.trim_end_matches('-')).filter(|g| !g.is_empty()) {
            Some(base) => base.to_owned(),
            None => meta.name.clone().unwrap_or_default(),
        },
    }
}

/// The kinds the index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Route,
    Policy,
    Rollout,
    Pod,
    Secret,
    Server,
    ServerPod,
    Deployment,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Route => "LLMRoute",
            Self::Policy => "ScannerPolicy",
            Self::Rollout => "ModelRollout",
            Self::Pod => "Pod",
            Self::Secret => "Secret",
            Self::Server => "ModelServer",
            Self::ServerPod => "Pod (ModelServer)",
            Self::Deployment => "Deployment",
        }
    }
}

type Key = (String, String);

#[derive(Default)]
pub struct Index {
    routes: BTreeMap<(String, String), LLMRoute>,
    policies: BTreeMap<(String, String), ScannerPolicy>,
    rollouts: BTreeMap<(String, String), ModelRollout>,
    pods: BTreeMap<(String, String), Pod>,
    /// Names of the Secrets that exist, when they are watched; `None` checks nothing.
    secrets: Option<BTreeSet<Key>>,
    /// The rollout driver's status of the rollouts it drives (leader only): compiled in place of
    /// the watched status, which lags behind its writes.
    driven: BTreeMap<Key, ModelRolloutStatus>,
    /// Model servers, their pods and Deployments.
    pub servers: crate::servers::state::Servers,
    options: CompileOptions,
}

/// Pods that take the same routes, and their config.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub namespace: String,
    /// Stable name of the group: `bulwark-` and a hash of its namespace and routes.
    pub name: String,
    pub routes: Vec<String>,
    pub pods: Vec<String>,
    /// The workloads of the group's pods, with how many pods each has here.
    pub workloads: BTreeMap<String, usize>,
    pub config: SidecarConfig,
}

/// A namespace and the routes its pods select.
type Selection = (String, Vec<String>);
type Labels = BTreeMap<String, String>;

impl Index {
    pub fn new(options: CompileOptions) -> Self {
        Self { options, ..Self::default() }
    }

    /// Also checks that the Secrets routes reference exist (names only; never their data).
    pub fn checking_secrets(mut self) -> Self {
        self.secrets = Some(BTreeSet::new());
        self
    }

    /// True when a sidecar's config or a status may change.
    pub fn apply_secret(&mut self, ns: &str, name: &str) -> bool {
        self.secrets.as_mut().is_some_and(|s| s.insert((ns.into(), name.into())))
    }
    pub fn delete_secret(&mut self, ns: &str, name: &str) -> bool {
        self.secrets.as_mut().is_some_and(|s| s.remove(&(ns.to_owned(), name.to_owned())))
    }

    /// Routes whose backends read a key from a Secret that does not exist. The routes still go
    /// to the sidecars (calls to those backends fail until the Secret appears); their status
    /// says `ResolvedRefs=False`.
    pub fn missing_secrets(&self) -> Vec<Rejection> {
        let Some(secrets) = &self.secrets else { return vec![] };
        let mut out = vec![];
        for ((ns, name), r) in &self.routes {
            let missing: BTreeSet<String> = r
                .spec
                .all_backends()
                .filter_map(|b| b.credentials.as_ref()?.secret_key_ref.as_ref().map(|s| (b, s)))
                .filter(|(_, s)| !secrets.contains(&(ns.clone(), s.name.clone())))
                .map(|(b, s)| format!("Secret {ns}/{} (key {}, backend {})", s.name, s.key, b.name))
                .collect();
            if !missing.is_empty() {
                let list: Vec<String> = missing.into_iter().collect();
                out.push(Rejection {
                    kind: "LLMRoute",
                    namespace: ns.clone(),
                    name: name.clone(),
                    reason: bulwark_api::status::reasons::SECRET_NOT_FOUND,
                    message: format!("{} not found; calls to those backends fail until it exists", list.join(", ")),
                });
            }
        }
        out
    }

    /// The Secrets (name, key) that the routes selecting a pod with these labels reference:
    /// their backends' keys, and their policies' webhook tokens and client certificates.
    pub fn secret_refs(&self, ns: &str, labels: &Labels) -> BTreeSet<(String, String)> {
        let routes: Vec<&LLMRoute> = self.selected(ns, labels).iter().filter_map(|name| self.route(ns, name)).collect();
        let keys = routes
            .iter()
            .flat_map(|r| r.spec.all_backends())
            .filter_map(|b| b.credentials.as_ref()?.secret_key_ref.as_ref())
            .map(|s| (s.name.clone(), s.key.clone()));
        let policies = routes
            .iter()
            .flat_map(|r| r.spec.rules.iter().filter_map(|rule| rule.scanner_policy_ref.as_ref()))
            .filter_map(|p| self.policies.get(&(ns.to_owned(), p.name.clone())));
        let hooks = policies
            .flat_map(|p| p.spec.input.iter().chain(&p.spec.output))
            .filter_map(|s| s.webhook.as_ref())
            .flat_map(|w| {
                let token = w.bearer_token.as_ref().and_then(|c| c.secret_key_ref.as_ref());
                let token = token.map(|s| (s.name.clone(), s.key.clone()));
                let cert = w.client_certificate.as_ref().and_then(|c| c.secret_name.clone());
                let cert =
                    cert.into_iter().flat_map(|n| [(n.clone(), "tls.crt".to_owned()), (n, "tls.key".to_owned())]);
                token.into_iter().chain(cert)
            });
        keys.chain(hooks).collect()
    }

    /// Stores a route; true when what the sidecars get may change (not for status-only writes).
    pub fn apply_route(&mut self, r: LLMRoute) -> bool {
        let key = ns_name(&r.metadata);
        let changed = self.routes.get(&key).is_none_or(|o| o.spec != r.spec || o.metadata.uid != r.metadata.uid);
        self.routes.insert(key, r);
        changed
    }
    pub fn delete_route(&mut self, ns: &str, name: &str) {
        self.routes.remove(&(ns.into(), name.into()));
    }
    pub fn apply_policy(&mut self, p: ScannerPolicy) -> bool {
        let key = ns_name(&p.metadata);
        let changed = self.policies.get(&key).is_none_or(|o| o.spec != p.spec || o.metadata.uid != p.metadata.uid);
        self.policies.insert(key, p);
        changed
    }
    pub fn delete_policy(&mut self, ns: &str, name: &str) {
        self.policies.remove(&(ns.into(), name.into()));
    }
    pub fn apply_rollout(&mut self, r: ModelRollout) -> bool {
        let key = ns_name(&r.metadata);
        let traffic = |r: &ModelRollout| machine::traffic(&r.spec, r.status.as_ref());
        let changed = self.rollouts.get(&key).is_none_or(|o| o.spec != r.spec || traffic(o) != traffic(&r));
        self.rollouts.insert(key, r);
        changed
    }
    pub fn delete_rollout(&mut self, ns: &str, name: &str) {
        let key = (ns.to_owned(), name.to_owned());
        self.rollouts.remove(&key);
        self.driven.remove(&key);
    }

    /// The driver's status of a rollout; true when the traffic it sets changed.
    pub fn drive(&mut self, ns: &str, name: &str, status: ModelRolloutStatus) -> bool {
        let key = (ns.to_owned(), name.to_owned());
        let Some(r) = self.rollouts.get(&key) else { return false };
        let before = machine::traffic(&r.spec, self.driven.get(&key).or(r.status.as_ref()));
        let changed = before != machine::traffic(&r.spec, Some(&status));
        self.driven.insert(key, status);
        changed
    }

    /// This replica no longer drives rollouts: compile from the watched status again.
    pub fn undrive(&mut self) -> bool {
        let had = !self.driven.is_empty();
        self.driven.clear();
        had
    }
    /// Stores a bare sidecar pod (its own workload) with its labels.
    pub fn apply_pod(&mut self, ns: &str, name: &str, labels: BTreeMap<String, String>) -> bool {
        self.upsert_pod(ns, name, Pod { labels, workload: name.to_owned(), ..Pod::default() })
    }
    /// Stores a sidecar pod, keeping what its sidecar reported unless it is a new pod of the same
    /// name; true when its config or copy may change.
    pub fn upsert_pod(&mut self, ns: &str, name: &str, new: Pod) -> bool {
        let pod = self.pods.entry((ns.into(), name.into())).or_default();
        let changed = pod.labels != new.labels || pod.uid != new.uid || pod.workload != new.workload;
        let applied = if pod.uid == new.uid { pod.applied.take() } else { None };
        *pod = Pod { applied, ..new };
        changed
    }
    pub fn delete_pod(&mut self, ns: &str, name: &str) {
        self.pods.remove(&(ns.into(), name.into()));
    }

    /// Forgets every object of `kind` not in `keep` (after a full relist).
    pub fn retain(&mut self, kind: Kind, keep: &BTreeSet<Key>) {
        match kind {
            Kind::Route => self.routes.retain(|k, _| keep.contains(k)),
            Kind::Policy => self.policies.retain(|k, _| keep.contains(k)),
            Kind::Rollout => self.rollouts.retain(|k, _| keep.contains(k)),
            Kind::Pod => self.pods.retain(|k, _| keep.contains(k)),
            Kind::Secret => {
                if let Some(s) = self.secrets.as_mut() {
                    s.retain(|k| keep.contains(k));
                }
            }
            Kind::Server => self.servers.retain_servers(keep),
            Kind::ServerPod => self.servers.retain_pods(keep),
            Kind::Deployment => self.servers.retain_deployments(keep),
        }
    }

    pub fn route(&self, ns: &str, name: &str) -> Option<&LLMRoute> {
        self.routes.get(&(ns.into(), name.into()))
    }
    pub fn has_route(&self, ns: &str, name: &str) -> bool {
        self.route(ns, name).is_some()
    }

    pub fn routes(&self) -> impl Iterator<Item = &LLMRoute> {
        self.routes.values()
    }
    pub fn policies(&self) -> impl Iterator<Item = &ScannerPolicy> {
        self.policies.values()
    }
    pub fn rollouts(&self) -> impl Iterator<Item = &ModelRollout> {
        self.rollouts.values()
    }
    pub fn rollout(&self, ns: &str, name: &str) -> Option<&ModelRollout> {
        self.rollouts.get(&(ns.into(), name.into()))
    }
    /// A sidecar reported the config version it runs; true when that changed.
    pub fn report(&mut self, ns: &str, pod: &str, version: &str) -> bool {
        match self.pods.get_mut(&(ns.into(), pod.into())) {
            Some(p) if p.applied.as_deref() != Some(version) => {
                p.applied = Some(version.to_owned());
                true
            }
            _ => false,
        }
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<&Pod> {
        self.pods.get(&(ns.into(), name.into()))
    }

    /// The resources of one namespace.
    pub fn resources(&self, ns: &str) -> Resources {
        let in_ns = |k: &(String, String)| k.0 == ns;
        Resources {
            routes: self.routes.iter().filter(|(k, _)| in_ns(k)).map(|(_, v)| v.clone()).collect(),
            policies: self.policies.iter().filter(|(k, _)| in_ns(k)).map(|(_, v)| v.clone()).collect(),
            rollouts: self
                .rollouts
                .iter()
                .filter(|(k, _)| in_ns(k))
                .map(|(k, v)| {
                    let mut r = v.clone();
                    if let Some(driven) = self.driven.get(k) {
                        r.status = Some(driven.clone());
                    }
                    r
                })
                .collect(),
            servers: self.servers.in_namespace(ns).cloned().collect(),
            endpoints: self.servers.endpoints(ns),
        }
    }

    /// Names of the routes of `ns` whose workloadSelector takes a pod with these labels.
    pub fn selected(&self, ns: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        self.routes
            .iter()
            .filter(|((rns, _), r)| {
                rns == ns && r.spec.workload_selector.as_ref().is_none_or(|s| selector::matches(s, labels))
            })
            .map(|((_, name), _)| name.clone())
            .collect()
    }

    /// Every group of pods with its compiled config, and every resource left out and why.
    pub fn compile(&self) -> (Vec<Group>, Vec<Rejection>) {
        /// The pods of one group, their workloads, and the labels of the first (as all of them
        /// select the same routes, any one stands for the group in `compile`).
        struct Members {
            pods: Vec<String>,
            workloads: BTreeMap<String, usize>,
            labels: Labels,
        }
        let mut by_selection: BTreeMap<Selection, Members> = BTreeMap::new();
        for ((ns, name), pod) in &self.pods {
            let routes = self.selected(ns, &pod.labels);
            let members = by_selection.entry((ns.clone(), routes)).or_insert_with(|| Members {
                pods: vec![],
                workloads: BTreeMap::new(),
                labels: pod.labels.clone(),
            });
            members.pods.push(name.clone());
            *members.workloads.entry(pod.workload.clone()).or_default() += 1;
        }
        let mut groups = vec![];
        let mut rejected: BTreeSet<Rejection> = BTreeSet::new();
        let mut push = |r: Rejection| {
            rejected.insert(r);
        };
        for ((ns, routes), Members { pods, workloads, labels }) in by_selection {
            let res = self.resources(&ns);
            let out = compile(&res, Some(&Workload { namespace: ns.clone(), labels }), &self.options);
            out.rejected.into_iter().for_each(&mut push);
            let name = group_name(&ns, &routes);
            groups.push(Group { name, namespace: ns, routes, pods, workloads, config: out.config });
        }
        // Resources no pod selects are still validated, so their status says what is wrong.
        let server_namespaces = self.servers.all().map(|m| ns_name(&m.metadata).0);
        let namespaces: BTreeSet<String> = self
            .routes
            .keys()
            .chain(self.policies.keys())
            .chain(self.rollouts.keys())
            .map(|(ns, _)| ns.clone())
            .chain(server_namespaces)
            .collect();
        for ns in &namespaces {
            let out = compile(&self.resources(ns), None, &self.options);
            out.rejected.into_iter().filter(|r| r.reason != bulwark_api::status::reasons::CONFLICT).for_each(&mut push);
        }
        // Missing Secrets first: a real rejection of the same resource takes precedence.
        let rejected = self.missing_secrets().into_iter().chain(rejected).collect();
        (groups, rejected)
    }
}

impl Index {
    /// How many sidecars a resource reaches, and how many of them run their group's current
    /// config (as they reported it).
    pub fn sidecars(&self, groups: &[Group], kind: Kind, ns: &str, name: &str) -> bulwark_api::route::SidecarCounts {
        let route_of_rollout = (kind == Kind::Rollout)
            .then(|| self.rollouts.get(&(ns.into(), name.into())).map(|r| r.spec.route_ref.name.clone()))
            .flatten();
        let mut counts = bulwark_api::route::SidecarCounts::default();
        for g in groups.iter().filter(|g| g.namespace == ns) {
            let selects = match kind {
                Kind::Route => g.routes.iter().any(|r| r == name),
                Kind::Policy => g.config.scanner_policies.contains_key(&format!("{ns}/{name}")),
                Kind::Rollout => route_of_rollout.as_ref().is_some_and(|r| g.routes.contains(r)),
                Kind::Pod | Kind::Secret | Kind::Server | Kind::ServerPod | Kind::Deployment => false,
            };
            if !selects {
                continue;
            }
            for pod in &g.pods {
                counts.total += 1;
                if self.pod(ns, pod).and_then(|p| p.applied.as_deref()) == Some(g.config.version.as_str()) {
                    counts.up_to_date += 1;
                }
            }
        }
        counts
    }
}

fn group_name(ns: &str, routes: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(ns.as_bytes());
    for r in routes {
        h.update([0]);
        h.update(r.as_bytes());
    }
    let hex: String = h.finalize().iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("bulwark-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_route(ns: &str, name: &str, selector: Option<&str>, model: &str) -> LLMRoute {
        let sel = selector.map_or(String::new(), |s| format!("  workloadSelector: {{matchLabels: {{app: {s}}}}}\n"));
        serde_yaml::from_str(&format!(
            "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{sel}  rules: [{{match: {{models: [{model}]}}, backends: [{{name: b, url: 'http://b'}}]}}]\n"
        ))
        .unwrap()
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        [("app".to_owned(), app.to_owned())].into()
    }

    fn pod_meta(yaml: &str) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_pod_belongs_to_the_workload_that_controls_it() {
        let rs = "name: chat-7d9c8f-x2x4q\nlabels: {pod-template-hash: 7d9c8f}\nownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: chat-7d9c8f, uid: u1, controller: true}]";
        assert_eq!(workload_of(&pod_meta(rs)), "chat", "a Deployment's pod");
        let bare_rs = "name: chat-x2x4q\nownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: chat, uid: u1, controller: true}]";
        assert_eq!(workload_of(&pod_meta(bare_rs)), "chat", "a ReplicaSet of its own");
        let sts = "name: db-0\nownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: u1, controller: true}]";
        assert_eq!(workload_of(&pod_meta(sts)), "db");
        let not_controller =
            "name: lone\nownerReferences: [{apiVersion: v1, kind: ConfigMap, name: something, uid: u1}]";
        assert_eq!(workload_of(&pod_meta(not_controller)), "lone", "only a controller names the workload");
        assert_eq!(workload_of(&pod_meta("name: bare")), "bare");
        // At admission a generated name is not known yet; afterwards the same workload comes out.
        assert_eq!(workload_of(&pod_meta("generateName: job-runner-")), "job-runner");
        assert_eq!(workload_of(&pod_meta("name: job-runner-x2x4q\ngenerateName: job-runner-")), "job-runner");
        let labelled = format!(
            "name: chat-7d9c8f-x2x4q\nlabels: {{{WORKLOAD_LABEL}: assistant, pod-template-hash: 7d9c8f}}\nownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: chat-7d9c8f, uid: u1, controller: true}}]"
        );
        assert_eq!(workload_of(&pod_meta(&labelled)), "assistant", "the label wins");
    }

    #[test]
    fn a_group_counts_the_pods_of_each_workload() {
        let mut ix = Index::default();
        ix.apply_route(mk_route("a", "bots", Some("bot"), "m"));
        for (pod, workload) in [("bot-a1", "bot-a"), ("bot-a2", "bot-a"), ("bot-b1", "bot-b")] {
            ix.upsert_pod("a", pod, Pod { labels: labels("bot"), workload: workload.into(), ..Pod::default() });
        }
        let (groups, _) = ix.compile();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].workloads, [("bot-a".to_owned(), 2), ("bot-b".to_owned(), 1)].into());
        // Moving a pod to another workload is a change (its copy moves); a report is kept.
        ix.report("a", "bot-b1", "v1");
        let moved = Pod { labels: labels("bot"), workload: "bot-a".into(), ..Pod::default() };
        assert!(ix.upsert_pod("a", "bot-b1", moved.clone()));
        assert_eq!(ix.pod("a", "bot-b1").unwrap().applied.as_deref(), Some("v1"));
        assert!(!ix.upsert_pod("a", "bot-b1", moved));
        // A new pod under the old name (a new uid) has applied nothing yet.
        let new = Pod { labels: labels("bot"), workload: "bot-a".into(), uid: "u2".into(), ..Pod::default() };
        assert!(ix.upsert_pod("a", "bot-b1", new));
        assert_eq!(ix.pod("a", "bot-b1").unwrap().applied, None);
    }

    #[test]
    fn pods_that_select_the_same_routes_share_a_group() {
        let mut ix = Index::default();
        ix.apply_route(mk_route("a", "everyone", None, "m1"));
        ix.apply_route(mk_route("a", "bots", Some("bot"), "m2"));
        ix.apply_route(mk_route("b", "other-ns", None, "m3"));
        ix.apply_pod("a", "bot-1", labels("bot"));
        ix.apply_pod("a", "bot-2", labels("bot"));
        ix.apply_pod("a", "web-1", labels("web"));
        let (groups, rejected) = ix.compile();
        assert!(rejected.is_empty(), "{rejected:?}");
        let summary: Vec<_> = groups
            .iter()
            .map(|g| (g.namespace.as_str(), g.routes.clone(), g.pods.clone(), g.config.routes.len()))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", vec!["bots".to_owned(), "everyone".to_owned()], vec!["bot-1".to_owned(), "bot-2".to_owned()], 2),
                ("a", vec!["everyone".to_owned()], vec!["web-1".to_owned()], 1),
            ]
        );
        assert_ne!(groups[0].name, groups[1].name);
        assert_ne!(groups[0].config.version, groups[1].config.version);
    }

    #[test]
    fn deleting_a_route_removes_it_from_every_config() {
        let mut ix = Index::default();
        ix.apply_route(mk_route("a", "r1", None, "m1"));
        ix.apply_route(mk_route("a", "r2", None, "m2"));
        ix.apply_pod("a", "p", labels("x"));
        assert_eq!(ix.compile().0[0].config.routes.len(), 2);
        ix.delete_route("a", "r2");
        let (groups, _) = ix.compile();
        assert_eq!(groups[0].config.routes.iter().map(|r| r.route.as_str()).collect::<Vec<_>>(), ["a/r1"]);
        ix.delete_pod("a", "p");
        assert!(ix.compile().0.is_empty());
    }

    #[test]
    fn an_invalid_route_is_reported_even_when_no_pod_selects_it_and_never_breaks_others() {
        let mut ix = Index::default();
        ix.apply_route(mk_route("a", "good", None, "m1"));
        let mut bad = mk_route("a", "bad", Some("nobody"), "m2");
        bad.spec.rules[0].backends[0].url = "nope".into();
        ix.apply_route(bad);
        ix.apply_pod("a", "p", labels("x"));
        let (groups, rejected) = ix.compile();
        assert_eq!(groups[0].config.routes.len(), 1);
        assert_eq!(rejected.len(), 1);
        assert_eq!((rejected[0].name.as_str(), rejected[0].reason), ("bad", "Invalid"));
    }

    #[test]
    fn sidecar_counts_follow_reports() {
        let mut ix = Index::default();
        ix.apply_route(mk_route("a", "r", None, "m"));
        ix.apply_pod("a", "p1", labels("x"));
        ix.apply_pod("a", "p2", labels("y"));
        let (groups, _) = ix.compile();
        let counts = |ix: &Index| {
            let c = ix.sidecars(&groups, Kind::Route, "a", "r");
            (c.total, c.up_to_date)
        };
        assert_eq!(counts(&ix), (2, 0));
        ix.report("a", "p1", &groups[0].config.version);
        ix.report("a", "p2", "stale");
        assert_eq!(counts(&ix), (2, 1));
        assert_eq!(ix.sidecars(&groups, Kind::Route, "a", "other").total, 0);
    }

    #[test]
    fn missing_secrets_are_named_only_when_secrets_are_watched() {
        let mut route = mk_route("a", "r", None, "m");
        route.spec.rules[0].backends[0].credentials =
            Some(serde_yaml::from_str("secretKeyRef: {name: openai, key: api-key}").unwrap());
        let mut ix = Index::default();
        ix.apply_route(route.clone());
        assert!(ix.missing_secrets().is_empty(), "not watched: nothing to say");
        let mut ix = Index::default().checking_secrets();
        ix.apply_route(route);
        ix.apply_pod("a", "p", labels("x"));
        let (groups, rejected) = ix.compile();
        assert_eq!(groups[0].config.routes.len(), 1, "the route is still programmed");
        assert_eq!(rejected[0].reason, "SecretNotFound");
        assert!(rejected[0].message.contains("Secret a/openai (key api-key, backend b)"), "{}", rejected[0].message);
        assert!(ix.apply_secret("a", "openai"));
        assert!(ix.compile().1.is_empty());
    }

    #[test]
    fn pods_get_the_secrets_of_their_routes_backends_and_policies_webhooks() {
        let mut route = mk_route("a", "r", None, "m");
        route.spec.rules[0].backends[0].credentials =
            Some(serde_yaml::from_str("secretKeyRef: {name: openai, key: api-key}").unwrap());
        route.spec.rules[0].scanner_policy_ref = Some(serde_yaml::from_str("name: guard").unwrap());
        let policy: ScannerPolicy = serde_yaml::from_str(
            "apiVersion: bulwark.dev/v1alpha1\nkind: ScannerPolicy\nmetadata: {name: guard, namespace: a}\nspec:\n  input: [{type: webhook, webhook: {url: 'https://g', bearerToken: {secretKeyRef: {name: g, key: token}}, clientCertificate: {secretName: g-tls}}}]\n",
        )
        .unwrap();
        let mut ix = Index::default();
        ix.apply_route(route);
        ix.apply_policy(policy);
        let refs: Vec<(String, String)> = ix.secret_refs("a", &labels("x")).into_iter().collect();
        let want = [("g", "token"), ("g-tls", "tls.crt"), ("g-tls", "tls.key"), ("openai", "api-key")];
        assert_eq!(refs, want.map(|(n, k)| (n.to_owned(), k.to_owned())));
    }

    #[test]
    fn conflicts_only_count_where_both_routes_meet() {
        let mut ix = Index::default();
        ix.apply_route(mk_route("a", "one", Some("x"), "m"));
        ix.apply_route(mk_route("a", "two", Some("y"), "m"));
        ix.apply_pod("a", "px", labels("x"));
        ix.apply_pod("a", "py", labels("y"));
        assert!(ix.compile().1.is_empty(), "disjoint selectors: no conflict");
    }

    #[test]
    fn the_drivers_status_is_compiled_in_place_of_the_watched_one() {
        let mut ix = Index::default();
        let mut route = mk_route("a", "r", None, "m");
        route.spec.rules[0].backends.push(serde_yaml::from_str("{name: c, url: 'http://c'}").unwrap());
        ix.apply_route(route);
        ix.apply_pod("a", "p", labels("x"));
        let rollout: ModelRollout = serde_yaml::from_str(
            "apiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {name: up, namespace: a}\nspec: {routeRef: {name: r}, stable: {backend: b}, canary: {backend: c}, steps: [{weight: 10}, {weight: 100}]}\nstatus: {phase: Progressing, currentStep: 0, canaryWeight: 10}\n",
        )
        .unwrap();
        assert!(ix.apply_rollout(rollout.clone()));
        let weights = |ix: &Index| {
            let (groups, _) = ix.compile();
            groups[0].config.routes[0].backends.iter().map(|b| (b.name.clone(), b.weight)).collect::<Vec<_>>()
        };
        assert_eq!(weights(&ix), [("b".to_owned(), 90), ("c".to_owned(), 10)]);
        let rolled_back: ModelRolloutStatus =
            serde_yaml::from_str("{phase: RolledBack, currentStep: 0, canaryWeight: 0}").unwrap();
        assert!(ix.drive("a", "up", rolled_back.clone()), "the traffic changed");
        assert!(!ix.drive("a", "up", rolled_back), "and not again");
        assert_eq!(weights(&ix), [("b".to_owned(), 100), ("c".to_owned(), 0)], "before the watch brings it back");
        assert!(!ix.apply_rollout(rollout), "the same watched status is no change");
        assert_eq!(weights(&ix)[1].1, 0, "the driver's status still wins");
        assert!(ix.undrive());
        assert_eq!(weights(&ix)[1].1, 10, "a replica that stops driving compiles what it watches");
    }
}
