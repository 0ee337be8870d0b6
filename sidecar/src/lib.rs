//! Bulwark's sidecar: an LLM API proxy next to each application. The modules follow the data
//! flow: `source` → `runtime`; `listener` → `request` → route match (`runtime`) → `ratelimit`
//! → `scan` (input) → `cache` → `balance` / `circuit` / `retry` → `upstream` → `stream` (with
//! `scan::stream` on output) → `metrics`.

pub mod admin;
pub mod balance;
pub mod body;
pub mod cache;
pub mod capture;
pub mod circuit;
pub mod control;
pub mod credentials;
pub mod error;
pub mod failover;
pub mod intercept;
pub mod listener;
pub mod metrics;
pub mod mirror;
pub mod outcomes;
pub mod passthrough;
pub mod proxy;
pub mod ratelimit;
pub mod replicas;
pub mod request;
pub mod retry;
pub mod rollouts;
pub mod runtime;
pub mod scan;
pub mod settle;
pub mod shape;
pub mod source;
pub mod splice;
pub mod stream;
pub mod transparent;
pub mod upstream;
pub mod usage;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

pub use source::Source;

use crate::{
    admin::AdminState, metrics::Metrics, proxy::AppState, request::Limits, rollouts::Rollouts, runtime::Shared,
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:15080";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15090";

#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub source: Source,
    pub limits: Limits,
    pub reload_interval: Duration,
    pub upstream_ca: Option<PathBuf>,
    pub models: scan::model::ModelSettings,
    /// Take configs from the operator's stream (the source is then the fallback copy).
    pub operator: Option<control::OperatorLink>,
    /// Where the standalone rollout driver keeps its state across restarts.
    pub state_dir: Option<PathBuf>,
    /// The port of the listener for captured connections (on 127.0.0.1 and ::1).
    pub transparent: Option<u16>,
    /// The CA (`tls.crt`, `tls.key`) that mints certificates for intercepted TLS to routed hosts.
    pub intercept_ca: Option<PathBuf>,
}

impl Options {
    pub fn new(source: Source) -> Self {
        Self {
            listen: ([127, 0, 0, 1], 15080).into(),
            admin: ([127, 0, 0, 1], 15090).into(),
            source,
            limits: Limits::default(),
            reload_interval: Duration::from_secs(1),
            upstream_ca: None,
            models: scan::model::ModelSettings { threads: 1, ..Default::default() },
            operator: None,
            state_dir: None,
            transparent: None,
            intercept_ca: None,
        }
    }
}

/// The listeners for captured connections: the nat REDIRECT target is the loopback address of
/// the connection's family, so 127.0.0.1 and, where the pod has IPv6, ::1.
async fn transparent_listeners(port: u16) -> anyhow::Result<Vec<TcpListener>> {
    let v4 = TcpListener::bind(("127.0.0.1", port)).await.with_context(|| format!("binding 127.0.0.1:{port}"))?;
    let mut out = vec![v4];
    match TcpListener::bind(("::1", port)).await {
        Ok(v6) => out.push(v6),
        Err(e) => tracing::info!("no IPv6 transparent listener ([::1]:{port}: {e})"),
    }
    Ok(out)
}

/// A running sidecar.
pub struct Sidecar {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub runtime: watch::Receiver<Arc<runtime::Runtime>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sidecar {
    /// Loads the config (refusing to start on a bad one), binds both listeners and serves.
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::with_models(opts.models.clone()));
        let metrics = Arc::new(Metrics::new());
        // Standalone on a directory, the sidecar drives the rollouts in it itself.
        let rollouts = match (&opts.source, &opts.operator) {
            (Source::Manifests { .. }, None) => Some(Arc::new(Rollouts::new(opts.state_dir.clone(), metrics.clone())?)),
            _ => None,
        };
        let loaded = opts.source.read().and_then(|snapshot| {
            Ok((snapshot.fingerprint(), source::build(&opts.source, &snapshot, &shared, rollouts.as_deref())?))
        });
        let (fingerprint, initial) = match loaded {
            Ok((fp, (rt, prepared))) => {
                if let (Some(r), Some(p)) = (&rollouts, prepared) {
                    r.commit(p);
                }
                (Some(fp), rt)
            }
            // With an operator, a missing or bad local copy only means waiting for the stream.
            Err(e) if opts.operator.is_some() => {
                tracing::warn!("no usable local config copy, waiting for the operator: {e}");
                let empty = runtime::Runtime::build(bulwark_api::SidecarConfig::default(), &shared);
                (None, empty.map_err(anyhow::Error::msg)?)
            }
            Err(e) => anyhow::bail!("invalid config:\n{e}"),
        };
        metrics.set_version(&initial.config.version);
        metrics.reload(true);
        tracing::info!(version = %initial.config.version, routes = initial.routes.len(), "config loaded");
        let (tx, rx) = watch::channel(Arc::new(initial));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let proxy_listener =
            TcpListener::bind(opts.listen).await.with_context(|| format!("binding {}", opts.listen))?;
        let admin_listener = TcpListener::bind(opts.admin).await.with_context(|| format!("binding {}", opts.admin))?;
        let minter = opts.intercept_ca.as_deref().map(intercept::Minter::load).transpose()?.map(Arc::new);
        let intercept = minter.as_ref().map(intercept::Minter::server_config);
        let captured = match opts.transparent {
            Some(port) => transparent_listeners(port).await?,
            None => vec![],
        };
        let proxy_addr = proxy_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let client = upstream::client(opts.upstream_ca.as_deref())?;
        let header_timeout = opts.limits.header_timeout;
        let scraper = replicas::scrape(shared.replicas.clone(), client.clone(), metrics.clone(), shutdown_rx.clone());
        let app = Arc::new(AppState {
            runtime: rx.clone(),
            client,
            metrics: metrics.clone(),
            limits: opts.limits,
            mirrors: Arc::new(tokio::sync::Semaphore::new(mirror::MAX_IN_FLIGHT)),
        });
        let admin = Arc::new(AdminState { runtime: rx.clone(), metrics: metrics.clone(), rollouts: rollouts.clone() });
        let link = opts.operator.map(control::Link::new).transpose()?;
        let reloader = source::Reloader {
            source: opts.source,
            shared: shared.clone(),
            tx: tx.clone(),
            metrics: metrics.clone(),
            stand_aside: link.as_ref().map(|l| l.connected.clone()),
            rollouts: rollouts.clone(),
        };
        let mut tasks: Vec<JoinHandle<()>> = captured
            .into_iter()
            .map(|l| tokio::spawn(transparent::serve(l, app.clone(), intercept.clone(), shutdown_rx.clone())))
            .collect();
        tasks.extend([
            tokio::spawn(listener::serve(proxy_listener, app, proxy::handle, header_timeout, shutdown_rx.clone())),
            tokio::spawn(listener::serve(admin_listener, admin, admin::handle, header_timeout, shutdown_rx.clone())),
            tokio::spawn(reloader.run(fingerprint, opts.reload_interval, shutdown_rx.clone())),
            tokio::spawn(scraper),
        ]);
        if let Some(m) = minter {
            tasks.push(tokio::spawn(m.watch(shutdown_rx.clone())));
        }
        if let Some(r) = rollouts {
            tasks.push(tokio::spawn(rollouts::drive(r, metrics.clone(), shutdown_rx.clone())));
        }
        if let Some(link) = link {
            tasks.push(tokio::spawn(link.clone().report(rx.clone(), metrics.clone(), shutdown_rx.clone())));
            tasks.push(tokio::spawn(link.stream(shared, tx, metrics.clone(), shutdown_rx)));
        }
        tracing::info!(%proxy_addr, %admin_addr, "serving");
        Ok(Self { proxy_addr, admin_addr, metrics, runtime: rx, shutdown, tasks })
    }

    /// Stops accepting, lets in-flight requests finish (up to `listener::DRAIN`), and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
