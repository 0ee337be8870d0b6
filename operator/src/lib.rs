//! Bulwark's control plane. The data flow: `watch` feeds the `index`; `reconcile` compiles one
//! config per group of pods and hands it to `distribute` (the config stream to sidecars) at once
//! and to `write` (ConfigMaps, status, Events; leader only, see `leader`). Sidecars prove who
//! they are through `auth` and send outcome reports that `reports` aggregates; on the leader,
//! `rollouts` drives every ModelRollout on them and feeds its weights back to the compiler.
//! `health` serves `/metrics`, `/healthz` and `/readyz`.

pub mod auth;
pub mod distribute;
pub mod health;
pub mod index;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod prometheus;
pub mod reconcile;
pub mod reports;
pub mod rollouts;
pub mod server;
pub mod servers;
pub mod status;
pub mod tls;
pub mod trust;
pub mod watch;
pub mod write;

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use parking_lot::Mutex;
use tokio::{sync::Notify, time::Instant};

use crate::index::{Index, Kind};

/// Routes, policies, rollouts, sidecar pods, Secret names, model servers, their pods and their
/// Deployments.
const WATCHES: usize = 8;

/// The field manager of every write, so server-side apply knows what the operator owns.
pub const FIELD_MANAGER: &str = "bulwark-operator";

/// What the operator's tasks share.
pub struct State {
    pub index: Mutex<Index>,
    pub hub: distribute::Hub,
    pub metrics: metrics::Metrics,
    pub reports: Arc<Mutex<reports::Aggregator>>,
    /// Wakes the compiler.
    pub recompile: Notify,
    /// Wakes the status writer (a sidecar reported a new version).
    pub restatus: Notify,
    /// When the oldest change not yet pushed was seen.
    pending_since: Mutex<Option<Instant>>,
    synced: Mutex<BTreeSet<Kind>>,
    /// How many watches must list before a compile sees the whole cluster.
    watches: usize,
    pub leader: AtomicBool,
}

impl State {
    /// State for `watches` watches (`WATCHES`, one fewer without the Secret watch).
    pub fn new(index: Index, watches: usize) -> Self {
        let reports = Arc::new(Mutex::default());
        let metrics = metrics::Metrics::new();
        metrics.registry.lock().register_collector(Box::new(reports::TotalsCollector(reports.clone())));
        Self {
            index: Mutex::new(index),
            hub: distribute::Hub::default(),
            metrics,
            reports,
            recompile: Notify::new(),
            restatus: Notify::new(),
            pending_since: Mutex::new(None),
            synced: Mutex::default(),
            watches,
            leader: AtomicBool::new(false),
        }
    }

    /// Something a sidecar's config depends on changed.
    pub fn changed(&self) {
        self.pending_since.lock().get_or_insert_with(Instant::now);
        self.recompile.notify_one();
    }

    /// When the changes about to be compiled were first seen.
    pub fn take_pending(&self) -> Option<Instant> {
        self.pending_since.lock().take()
    }

    /// A watch finished a full list (it then wakes the compiler).
    pub fn synced(&self, kind: Kind) {
        self.synced.lock().insert(kind);
    }

    /// Every watch has listed once, so a compile sees the whole cluster.
    pub fn is_synced(&self) -> bool {
        self.synced.lock().len() == self.watches
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }
}

/// How an operator process runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch this namespace only; `None` watches every namespace.
    pub namespace: Option<String>,
    /// Watch Secrets' names, to report routes whose credentials name a missing one.
    pub watch_secrets: bool,
    pub stream_listen: std::net::SocketAddr,
    pub metrics_listen: std::net::SocketAddr,
    /// Certificate and key (PEM) of the config stream; plain HTTP/2 without them.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// CA (PEM) copied into each ConfigMap for sidecars to trust.
    pub tls_ca: Option<std::path::PathBuf>,
    pub token_audience: String,
    pub compile: bulwark_api::CompileOptions,
    /// `None` runs without leader election (always the leader).
    pub leader: Option<leader::Settings>,
    pub identity: String,
    pub resync: std::time::Duration,
    /// The sidecar injection webhook; `None` serves none.
    pub webhook: Option<Webhook>,
    /// What model servers may use: KEDA, and the Prometheus it queries.
    pub servers: servers::Settings,
}

/// Where the injection webhook listens and what it injects.
#[derive(Clone, Debug)]
pub struct Webhook {
    pub listen: std::net::SocketAddr,
    /// The sidecar image.
    pub image: String,
    /// The config stream's address as sidecars reach it (its Service).
    pub stream_url: String,
    /// Pods may ask for TLS interception; the operator keeps a CA per namespace.
    pub tls_interception: bool,
    /// The key injected sidecars check model directories' signatures with (PEM).
    pub model_public_key: Option<String>,
}

/// Asks `check` every 50 ms until it answers or `limit` has passed (then `None`): for what the
/// watches are about to learn, such as a pod that has just started or a first full list.
pub async fn poll_for<T>(limit: std::time::Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A running operator.
pub struct Operator {
    pub state: Arc<State>,
    pub stream_addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    pub webhook_addr: Option<std::net::SocketAddr>,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// The watches run until aborted; the other tasks end on `shutdown`.
    watches: Vec<tokio::task::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Operator {
    /// Binds both listeners and starts watching, compiling, serving and (when leading) writing.
    pub async fn start(client: kube::Client, s: Settings) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let index = Index::new(s.compile.clone());
        let (index, watches) = if s.watch_secrets { (index.checking_secrets(), WATCHES) } else { (index, WATCHES - 1) };
        let state = Arc::new(State::new(index, watches));
        let tls = s.tls.as_ref().map(|(cert, key)| tls::server_config(cert, key)).transpose()?;
        let ca = s
            .tls_ca
            .as_ref()
            .map(|p| std::fs::read_to_string(p).with_context(|| p.display().to_string()))
            .transpose()?;
        let stream = tokio::net::TcpListener::bind(s.stream_listen)
            .await
            .with_context(|| format!("binding {}", s.stream_listen))?;
        let health = tokio::net::TcpListener::bind(s.metrics_listen)
            .await
            .with_context(|| format!("binding {}", s.metrics_listen))?;
        let (stream_addr, metrics_addr) = (stream.local_addr()?, health.local_addr()?);
        let webhook = match &s.webhook {
            Some(w) => {
                let listener =
                    tokio::net::TcpListener::bind(w.listen).await.with_context(|| format!("binding {}", w.listen))?;
                let injection = inject::Injection {
                    image: w.image.clone(),
                    stream_url: w.stream_url.clone(),
                    ca: ca.clone(),
                    audience: s.token_audience.clone(),
                    tls_interception: w.tls_interception,
                    model_public_key: w.model_public_key.clone(),
                };
                Some((listener, Arc::new(injection)))
            }
            None => None,
        };
        let webhook_addr = webhook.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let (compiled_tx, compiled_rx) = tokio::sync::watch::channel(None);
        let auth = Arc::new(auth::Authenticator::new(client.clone(), s.token_audience.clone()));
        let ns = s.namespace.clone();
        let mut watches = vec![
            tokio::spawn(watch::follow::<bulwark_api::LLMRoute>(client.clone(), ns.clone(), state.clone())),
            tokio::spawn(watch::follow::<bulwark_api::ScannerPolicy>(client.clone(), ns.clone(), state.clone())),
            tokio::spawn(watch::follow::<bulwark_api::ModelRollout>(client.clone(), ns.clone(), state.clone())),
            tokio::spawn(watch::follow::<k8s_openapi::api::core::v1::Pod>(client.clone(), ns.clone(), state.clone())),
            tokio::spawn(watch::follow::<bulwark_api::ModelServer>(client.clone(), ns.clone(), state.clone())),
            tokio::spawn(watch::follow::<watch::ServerPod>(client.clone(), ns.clone(), state.clone())),
            tokio::spawn(watch::follow::<k8s_openapi::api::apps::v1::Deployment>(
                client.clone(),
                ns.clone(),
                state.clone(),
            )),
        ];
        if s.watch_secrets {
            type SecretNames = kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Secret>;
            watches.push(tokio::spawn(watch::follow::<SecretNames>(client.clone(), ns, state.clone())));
        }
        let mut tasks = vec![
            tokio::spawn(reconcile::run(state.clone(), compiled_tx, rx.clone())),
            tokio::spawn(distribute::serve(stream, tls.clone(), state.clone(), auth, rx.clone())),
            tokio::spawn(health::serve(health, state.clone(), rx.clone())),
        ];
        if let Some((listener, injection)) = webhook {
            if injection.tls_interception {
                tasks.push(tokio::spawn(trust::renew(state.clone(), client.clone(), s.namespace.clone(), rx.clone())));
            }
            tasks.push(tokio::spawn(inject::serve(
                listener,
                tls,
                state.clone(),
                injection,
                client.clone(),
                rx.clone(),
            )));
        }
        let writer = write::Writer::new(client.clone(), state.clone(), s.namespace.clone(), ca, &s.identity);
        tasks.push(tokio::spawn(servers::run(state.clone(), client.clone(), s.servers.clone(), rx.clone())));
        let driver = rollouts::run(state.clone(), client.clone(), compiled_rx.clone(), s.identity.clone(), rx.clone());
        tasks.push(tokio::spawn(driver));
        tasks.push(tokio::spawn(write::run(writer, compiled_rx, s.resync, rx.clone())));
        match s.leader.clone() {
            Some(l) => tasks.push(tokio::spawn(leader::run(client, l, state.clone(), rx))),
            None => {
                state.leader.store(true, Ordering::SeqCst);
                state.metrics.leader.set(1);
            }
        }
        tracing::info!(%stream_addr, %metrics_addr, webhook = ?webhook_addr, "operator serving");
        Ok(Self { state, stream_addr, metrics_addr, webhook_addr, shutdown, watches, tasks })
    }

    /// Stops serving, releases the lease, and waits for the tasks that end on shutdown.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.watches.iter().for_each(|t| t.abort());
        for t in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), t).await;
        }
        for t in self.watches {
            let _ = t.await;
        }
    }
}
