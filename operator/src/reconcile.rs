//! The compile loop: on each change, compile every group's config (pure, in memory), push new
//! versions to connected sidecars at once, and hand the result to the writer. Changes that
//! arrive during a compile are folded into the next one.

use std::{collections::HashMap, sync::Arc};

use bulwark_api::Rejection;
use kube::Resource as _;
use tokio::{sync::watch, time::Instant};

use crate::{
    State,
    index::{Group, Index, Kind},
};

/// The outcome of one compile.
#[derive(Debug, Default)]
pub struct Compiled {
    pub groups: Vec<Group>,
    pub rejected: Vec<Rejection>,
    /// The generation of every resource this compile saw, so a status claims to have observed
    /// only what was compiled, not a newer spec that arrived since.
    pub generations: HashMap<(Kind, String, String), Option<i64>>,
}

impl Compiled {
    fn of(index: &Index) -> Self {
        let (groups, rejected) = index.compile();
        let mut generations = HashMap::new();
        let mut seen = |kind, meta: &kube::core::ObjectMeta| {
            let (ns, name) = bulwark_api::compile::ns_name(meta);
            generations.insert((kind, ns, name), meta.generation);
        };
        index.routes().for_each(|r| seen(Kind::Route, r.meta()));
        index.policies().for_each(|p| seen(Kind::Policy, p.meta()));
        index.rollouts().for_each(|r| seen(Kind::Rollout, r.meta()));
        Self { groups, rejected, generations }
    }

    /// The generation compiled, or `None` when the resource came after this compile.
    pub fn generation(&self, kind: Kind, ns: &str, name: &str) -> Option<Option<i64>> {
        self.generations.get(&(kind, ns.to_owned(), name.to_owned())).copied()
    }
}

/// Publishes each compile on `out`; `None` until the first, so nothing acts on a half-known cluster.
pub async fn run(state: Arc<State>, out: watch::Sender<Option<Arc<Compiled>>>, mut shutdown: watch::Receiver<bool>) {
    // A compile before every watch has listed would push configs missing routes. Each watch
    // wakes the compiler when it has listed, so the last one to finish starts the first compile.
    let mut first = true;
    loop {
        tokio::select! {
            _ = state.recompile.notified() => {}
            _ = shutdown.changed() => return,
        }
        if !state.is_synced() {
            continue;
        }
        if first {
            tracing::info!("every watch has listed; compiling");
            first = false;
        }
        let since = state.take_pending();
        let started = Instant::now();
        let compiled = Compiled::of(&state.index.lock());
        let sent = state.hub.publish(&compiled.groups);
        let m = &state.metrics;
        m.reconcile_duration.observe(started.elapsed().as_secs_f64());
        m.reconciles.get_or_create(&crate::metrics::ResultLabels { result: "success" }).inc();
        m.pushes.inc_by(sent as u64);
        m.groups.set(i64::try_from(compiled.groups.len()).unwrap_or(i64::MAX));
        if let Some(since) = since
            && sent > 0
        {
            m.push_latency.observe(since.elapsed().as_secs_f64());
        }
        if sent > 0 || !compiled.rejected.is_empty() {
            tracing::debug!(
                groups = compiled.groups.len(),
                pushed = sent,
                rejected = compiled.rejected.len(),
                "compiled"
            );
        }
        {
            let index = state.index.lock();
            let mut reports = state.reports.lock();
            reports.retain_pods(|ns, pod| index.pod(ns, pod).is_some());
            reports.retain_routes(|r| r.split_once('/').is_some_and(|(ns, name)| index.has_route(ns, name)));
        }
        out.send_replace(Some(Arc::new(compiled)));
    }
}
