//! The rollout driver, on the leader only: ticks every ModelRollout through the shared state
//! machine (`bulwark_api::rollout::run`) with the outcomes the sidecars report, hands each
//! change of traffic to the compiler at once (the sidecars have it within a push), applies the
//! driver's fields of the status with a field manager of its own, and publishes an Event per
//! transition. A new leader resumes every rollout from its status; it never writes `spec`.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use bulwark_api::{
    ModelRollout, Rejection,
    compile::ns_name,
    control::BackendOutcome,
    rollout::{
        AnalysisResult, ModelRolloutSpec, ModelRolloutStatus, RolloutPhase,
        analysis::{self, Measured},
        machine::{self, Transition},
        run::Run,
    },
    status::Condition,
};
use k8s_openapi::jiff::Timestamp;
use kube::{
    Client, Resource as _,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::{mpsc, watch};

use crate::{
    State,
    metrics::{RolloutLabels, VerdictLabels},
    prometheus,
    reconcile::Compiled,
    write::apply_status,
};

/// The field manager of the driver's status fields; the status writer's are `bulwark-operator`.
pub const FIELD_MANAGER: &str = "bulwark-rollouts";
/// How often rollouts are looked at: well below any analysis interval.
const TICK: Duration = Duration::from_millis(250);
/// The driver's condition type.
pub const CONDITION: &str = "Progressing";

type Key = (String, String);

struct Driven {
    /// The object driven: a rollout deleted and created again under its name starts afresh.
    uid: Option<String>,
    run: Run,
    /// The driver's fields as last applied, and their condition.
    written: Option<(ModelRolloutStatus, Condition)>,
}

/// A status to apply, and the transitions to publish once it is written.
struct Write {
    key: Key,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    status: ModelRolloutStatus,
    condition: Condition,
    transitions: Vec<Transition>,
}

pub async fn run(
    state: Arc<State>,
    client: Client,
    compiled: watch::Receiver<Option<Arc<Compiled>>>,
    identity: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(identity) };
    let recorder = Recorder::new(client.clone(), reporter);
    let mut runs: HashMap<Key, Driven> = HashMap::new();
    let prometheus = prometheus::client()
        .map_err(|e| tracing::error!("no HTTP client for Prometheus queries; such analyses will fail: {e}"))
        .ok();
    // Prometheus analyses run in tasks of their own, so a slow one never holds up the others.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Pending, AnalysisResult)>();
    let mut asking: HashSet<Key> = HashSet::new();
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !state.is_leader() {
            for (ns, name) in runs.drain().map(|(k, _)| k) {
                state.metrics.forget_rollout(&ns, &name);
            }
            if state.index.lock().undrive() {
                state.changed();
            }
            continue;
        }
        // Nothing is driven before the first compile of a fully listed cluster.
        let Some(current) = compiled.borrow().clone() else { continue };
        let (mut writes, pending) = tick(&state, &current, &mut runs, &asking, Timestamp::now());
        for p in pending {
            asking.insert(p.key.clone());
            let (client, done) = (prometheus.clone(), done_tx.clone());
            tokio::spawn(async move {
                let analysis = ask(client.as_ref(), &p).await;
                let _ = done.send((p, analysis));
            });
        }
        let mut answered = vec![];
        while let Ok((p, analysis)) = done_rx.try_recv() {
            asking.remove(&p.key);
            answered.push((p, analysis));
        }
        if !answered.is_empty() {
            writes.extend(conclude(&state, &mut runs, answered, Timestamp::now()));
        }
        for w in writes {
            // A replica that lost the lease meanwhile writes nothing more.
            if !state.is_leader() {
                break;
            }
            let written = write(&client, &state, &w).await;
            if written && let Some(d) = runs.get_mut(&w.key) {
                d.written = Some((w.status.clone(), w.condition.clone()));
            }
            // Transitions are published once, whether or not the status write went through.
            for t in &w.transitions {
                publish(&recorder, &state, &w.reference, t).await;
            }
        }
    }
}

/// An analysis whose signals come in part from Prometheus: measured on the reports under the
/// index lock, completed by queries outside it, then applied.
struct Pending {
    key: Key,
    spec: ModelRolloutSpec,
    at: Timestamp,
    /// The window as it is now: never longer than the attempt has run.
    window: std::time::Duration,
    canary: Measured,
    stable: Measured,
}

/// Completes a pending analysis with Prometheus' numbers; a query that fails makes it `Error`.
async fn ask(client: Option<&prometheus::HttpClient>, p: &Pending) -> AnalysisResult {
    let at = machine::stamp(p.at);
    let Some(client) = client else {
        return analysis::unreadable(at, "the operator has no HTTP client for Prometheus".into());
    };
    let (mut canary, mut stable) = (p.canary.clone(), p.stable.clone());
    match prometheus::measure(client, &p.spec, &p.key.0, p.window, &mut canary, &mut stable).await {
        Ok(()) => analysis::judge_measured(&p.spec.analysis, &canary, &stable, at),
        Err(why) => analysis::unreadable(at, why),
    }
}

/// One look at every rollout, under the index lock: the statuses to apply, and the analyses
/// that wait for Prometheus.
fn tick(
    state: &State,
    compiled: &Compiled,
    runs: &mut HashMap<Key, Driven>,
    asking: &HashSet<Key>,
    now: Timestamp,
) -> (Vec<Write>, Vec<Pending>) {
    let rejected: HashMap<Key, &Rejection> = compiled
        .rejected
        .iter()
        .filter(|r| r.kind == "ModelRollout")
        .map(|r| ((r.namespace.clone(), r.name.clone()), r))
        .collect();
    let (mut writes, mut pending) = (vec![], vec![]);
    let mut moved = false;
    let mut index = state.index.lock();
    let reports = state.reports.lock();
    let rollouts: Vec<ModelRollout> = index.rollouts().cloned().collect();
    runs.retain(|(ns, name), _| {
        let keep = index.rollout(ns, name).is_some();
        if !keep {
            state.metrics.forget_rollout(ns, name);
        }
        keep
    });
    for r in rollouts {
        let key = ns_name(&r.metadata);
        let generation = r.metadata.generation.unwrap_or(1);
        if let Some(why) = rejected.get(&key) {
            // It cannot run; a rollout that never started says why in its phase.
            runs.remove(&key);
            let never_started = r.status.as_ref().is_none_or(|s| s.phase.is_none());
            if never_started {
                let status = machine::pending(generation, &why.message);
                let condition = condition(&status, None, now);
                let reference = r.object_ref(&());
                writes.push(Write { key, reference, status, condition, transitions: vec![] });
            }
            continue;
        }
        let mut transitions = vec![];
        if runs.get(&key).is_some_and(|d| d.uid != r.metadata.uid) {
            runs.remove(&key);
        }
        let d = runs.entry(key.clone()).or_insert_with(|| {
            let (run, t) = Run::resume(&r.spec, generation, r.status.as_ref(), now);
            transitions.extend(t);
            Driven { uid: r.metadata.uid.clone(), run, written: None }
        });
        let route = format!("{}/{}", key.0, r.spec.route_ref.name);
        let total = |backend: &str| -> BackendOutcome {
            reports.backends.get(&(route.clone(), backend.to_owned())).cloned().unwrap_or_default()
        };
        d.run.record(now, &total(&r.spec.canary.backend), &total(&r.spec.stable.backend));
        let analysed = d.run.status.last_analysis.as_ref().map(|a| a.at.clone());
        let controls = r.status.as_ref().and_then(|s| s.controls.as_ref());
        let asks_prometheus = r.spec.analysis.prometheus.is_some() && d.run.generation() == generation;
        if asks_prometheus {
            // Judged once Prometheus answers; meanwhile time and controls still move it.
            if d.run.due(&r.spec, now) && !asking.contains(&key) {
                let (canary, stable) = d.run.measure(&r.spec, now);
                let from = machine::window_start(&r.spec, &d.run.status, now);
                let window = now.duration_since(from).unsigned_abs();
                pending.push(Pending { key: key.clone(), spec: r.spec.clone(), at: now, window, canary, stable });
            }
            transitions.extend(d.run.apply(&r.spec, now, controls, None));
        } else {
            transitions.extend(d.run.tick(&r.spec, generation, now, controls));
        }
        writes.extend(settle(state, &mut index, &r, d, transitions, analysed, now, &mut moved));
    }
    drop(reports);
    drop(index);
    if moved {
        // The new weights are compiled and pushed to every sidecar at once.
        state.changed();
    }
    (writes, pending)
}

/// Applies the analyses Prometheus answered.
fn conclude(
    state: &State,
    runs: &mut HashMap<Key, Driven>,
    answered: Vec<(Pending, AnalysisResult)>,
    now: Timestamp,
) -> Vec<Write> {
    let mut writes = vec![];
    let mut moved = false;
    let mut index = state.index.lock();
    for (p, analysis) in answered {
        let Some(r) = index.rollout(&p.key.0, &p.key.1).cloned() else { continue };
        let Some(d) = runs.get_mut(&p.key) else { continue };
        // Asked of another spec, or another generation: the new one asks again.
        if r.spec != p.spec || Some(d.run.generation()) != r.metadata.generation.or(Some(1)) {
            continue;
        }
        let analysed = d.run.status.last_analysis.as_ref().map(|a| a.at.clone());
        let controls = r.status.as_ref().and_then(|s| s.controls.as_ref());
        let transitions: Vec<Transition> = d.run.apply(&r.spec, now, controls, Some(analysis)).into_iter().collect();
        writes.extend(settle(state, &mut index, &r, d, transitions, analysed, now, &mut moved));
    }
    drop(index);
    if moved {
        state.changed();
    }
    writes
}

/// After a tick of one rollout: its metrics, its traffic handed to the index, and the status to
/// write when it changed.
#[allow(clippy::too_many_arguments)]
fn settle(
    state: &State,
    index: &mut crate::index::Index,
    r: &ModelRollout,
    d: &mut Driven,
    transitions: Vec<Transition>,
    analysed: Option<String>,
    now: Timestamp,
    moved: &mut bool,
) -> Option<Write> {
    let key = ns_name(&r.metadata);
    let status = d.run.status.clone();
    if let Some(a) = status.last_analysis.as_ref().filter(|a| Some(&a.at) != analysed.as_ref()) {
        let l = VerdictLabels { namespace: key.0.clone(), rollout: key.1.clone(), verdict: a.verdict.as_str() };
        state.metrics.rollout_analyses.get_or_create(&l).inc();
    }
    for t in &transitions {
        if matches!(t.phase, RolloutPhase::RolledBack | RolloutPhase::Failed) {
            let l = RolloutLabels { namespace: key.0.clone(), rollout: key.1.clone() };
            state.metrics.rollout_rollbacks.get_or_create(&l).inc();
        }
    }
    let phase = status.phase.unwrap_or(RolloutPhase::Pending);
    state.metrics.rollout(&key.0, &key.1, phase, status.canary_weight.unwrap_or(0));
    *moved |= index.drive(&key.0, &key.1, status.clone());
    let previous = d.written.as_ref().map(|(_, c)| c);
    let previous = previous.or_else(|| r.status.as_ref()?.conditions.iter().find(|c| c.type_ == CONDITION));
    let condition = condition(&status, previous, now);
    let unchanged = d.written.as_ref().is_some_and(|(s, c)| *s == status && *c == condition);
    if unchanged && transitions.is_empty() {
        return None;
    }
    Some(Write { key, reference: r.object_ref(&()), status, condition, transitions })
}

/// The driver's `Progressing` condition; its transition time moves only when its status does.
fn condition(s: &ModelRolloutStatus, previous: Option<&Condition>, now: Timestamp) -> Condition {
    let (status, reason, message) = machine::condition(s);
    let since = previous
        .filter(|p| p.status == status)
        .and_then(|p| p.last_transition_time.clone())
        .unwrap_or_else(|| now.round(k8s_openapi::jiff::Unit::Second).unwrap_or(now).to_string());
    Condition {
        type_: CONDITION.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: s.observed_generation,
        last_transition_time: Some(since),
    }
}

/// Applies the driver's fields; true once written.
async fn write(client: &Client, state: &State, w: &Write) -> bool {
    let mut fields = serde_json::to_value(&w.status).unwrap_or_default();
    if let Some(map) = fields.as_object_mut() {
        map.insert("conditions".into(), serde_json::json!([w.condition]));
    }
    let (ns, name) = (&w.key.0, &w.key.1);
    match apply_status::<ModelRollout>(client, ns, name, FIELD_MANAGER, fields).await {
        Ok(()) => {
            state.metrics.write("status", true);
            tracing::debug!(namespace = %ns, rollout = %name, phase = ?w.status.phase, "rollout status written");
            true
        }
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => {
            state.metrics.write("status", false);
            tracing::warn!(namespace = %ns, rollout = %name, "writing the rollout status: {e}");
            false
        }
    }
}

async fn publish(
    recorder: &Recorder,
    state: &State,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    t: &Transition,
) {
    let bad = matches!(t.phase, RolloutPhase::RolledBack | RolloutPhase::Aborted | RolloutPhase::Failed);
    let name = reference.name.as_deref().unwrap_or_default();
    if bad {
        tracing::warn!(rollout = %name, reason = t.reason, "{}", t.message);
    } else {
        tracing::info!(rollout = %name, reason = t.reason, "{}", t.message);
    }
    let ev = Event {
        type_: if bad { EventType::Warning } else { EventType::Normal },
        reason: t.reason.to_owned(),
        note: Some(t.message.chars().take(1000).collect()),
        action: "Rollout".into(),
        secondary: None,
    };
    let ok = recorder.publish(&ev, reference).await;
    state.metrics.write("Event", ok.is_ok());
    if let Err(e) = ok {
        tracing::debug!(rollout = %name, "publishing an event: {e}");
    }
}
