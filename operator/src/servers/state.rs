//! What the index knows of model servers: the resources, their pods (ready at an IP, or held
//! by the scheduler and why) and their Deployments' replica counts. The ready pods are the
//! endpoints compiled into sidecar configs.

use std::collections::{BTreeMap, BTreeSet};

use bulwark_api::ModelServer;

type Key = (String, String);

/// A pod of a ModelServer, as far as routing and status care.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerPod {
    pub server: String,
    /// Set while the pod is ready and not terminating.
    pub ip: Option<String>,
    /// The scheduler's message while it cannot place the pod.
    pub unschedulable: Option<String>,
}

/// A Deployment's replica counts, as its controller reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeploymentState {
    pub generation: Option<i64>,
    /// What its spec asks for (the autoscaler's choice, when there is one).
    pub desired: Option<i32>,
    pub ready: Option<i32>,
}

#[derive(Default)]
pub struct Servers {
    servers: BTreeMap<Key, ModelServer>,
    pods: BTreeMap<Key, ServerPod>,
    deployments: BTreeMap<Key, DeploymentState>,
    /// Servers whose Deployment changed outside a status update: their children are applied
    /// again (server-side apply puts back whatever drifted, and changes nothing otherwise).
    drifted: BTreeSet<Key>,
}

impl Servers {
    /// True when what sidecars get may change (the port, or a new server).
    pub fn apply_server(&mut self, ms: ModelServer) -> bool {
        let key = bulwark_api::compile::ns_name(&ms.metadata);
        let changed = self.servers.get(&key).is_none_or(|o| o.spec != ms.spec || o.metadata.uid != ms.metadata.uid);
        self.servers.insert(key, ms);
        changed
    }

    pub fn delete_server(&mut self, ns: &str, name: &str) {
        self.servers.remove(&(ns.into(), name.into()));
    }

    pub fn server(&self, ns: &str, name: &str) -> Option<&ModelServer> {
        self.servers.get(&(ns.into(), name.into()))
    }

    pub fn all(&self) -> impl Iterator<Item = &ModelServer> {
        self.servers.values()
    }

    pub fn in_namespace<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a ModelServer> {
        self.servers.iter().filter(move |((n, _), _)| n == ns).map(|(_, s)| s)
    }

    /// True when the server's endpoints change.
    pub fn apply_pod(&mut self, ns: &str, name: &str, pod: ServerPod) -> bool {
        let key = (ns.to_owned(), name.to_owned());
        let endpoint = |p: &ServerPod| p.ip.clone().map(|ip| (p.server.clone(), ip));
        let before = self.pods.insert(key, pod.clone());
        before.as_ref().and_then(endpoint) != endpoint(&pod)
    }

    /// True when the server had it as an endpoint.
    pub fn delete_pod(&mut self, ns: &str, name: &str) -> bool {
        self.pods.remove(&(ns.to_owned(), name.to_owned())).is_some_and(|p| p.ip.is_some())
    }

    pub fn pods_of<'a>(&'a self, ns: &'a str, server: &'a str) -> impl Iterator<Item = &'a ServerPod> {
        self.pods.iter().filter(move |((n, _), p)| n == ns && p.server == server).map(|(_, p)| p)
    }

    pub fn apply_deployment(&mut self, ns: &str, name: &str, d: DeploymentState) {
        let key = (ns.to_owned(), name.to_owned());
        if self.deployments.get(&key).is_some_and(|old| old.generation != d.generation) {
            self.drifted.insert(key.clone());
        }
        self.deployments.insert(key, d);
    }

    pub fn delete_deployment(&mut self, ns: &str, name: &str) {
        let key = (ns.to_owned(), name.to_owned());
        self.deployments.remove(&key);
        // Deleted by hand while its server exists: it is made again.
        self.drifted.insert(key);
    }

    pub fn deployment(&self, ns: &str, name: &str) -> Option<DeploymentState> {
        self.deployments.get(&(ns.into(), name.into())).copied()
    }

    /// The servers to apply again, forgetting them.
    pub fn take_drifted(&mut self) -> BTreeSet<Key> {
        std::mem::take(&mut self.drifted)
    }

    /// The ready replicas of each server of `ns` as base URLs (`http://<pod IP>:<port>/v1`).
    pub fn endpoints(&self, ns: &str) -> BTreeMap<Key, Vec<String>> {
        let mut out: BTreeMap<Key, Vec<String>> = BTreeMap::new();
        for ((pns, _), pod) in self.pods.iter().filter(|((n, _), _)| n == ns) {
            let (Some(ip), Some(ms)) = (&pod.ip, self.servers.get(&(pns.clone(), pod.server.clone()))) else {
                continue;
            };
            let host = if ip.contains(':') { format!("[{ip}]") } else { ip.clone() };
            out.entry((pns.clone(), pod.server.clone()))
                .or_default()
                .push(format!("http://{host}:{}/v1", ms.spec.port));
        }
        // A server without ready pods has an empty list: sidecars then use its Service.
        out.retain(|_, v| !v.is_empty());
        out
    }

    pub fn retain_servers(&mut self, keep: &BTreeSet<Key>) {
        self.servers.retain(|k, _| keep.contains(k));
    }
    pub fn retain_pods(&mut self, keep: &BTreeSet<Key>) {
        self.pods.retain(|k, _| keep.contains(k));
    }
    pub fn retain_deployments(&mut self, keep: &BTreeSet<Key>) {
        self.deployments.retain(|k, _| keep.contains(k));
    }
}
