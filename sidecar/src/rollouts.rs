//! The standalone rollout driver: with `--manifests`, the sidecar drives each ModelRollout of the
//! directory itself, from its own outcome counters, with the state machine the operator uses
//! (`bulwark_api::rollout::run`). Its state is served at `GET /rollouts`, as metrics, and kept
//! in `--state-dir` across restarts. It never runs with a compiled config or the operator.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bulwark_api::{
    compile::ns_name,
    manifest::Resources,
    rollout::{
        Controls, ModelRolloutSpec, ModelRolloutStatus, RolloutPhase,
        control::{self, Action},
        machine::{self, Transition},
        run::Run,
    },
};
use k8s_openapi::jiff::Timestamp;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};

use crate::{metrics::Metrics, outcomes::Outcomes};

/// `namespace`, `name`.
type Key = (String, String);

/// How often the driver looks at the counters: well below any analysis interval.
const TICK: Duration = Duration::from_millis(200);
const STATE_FILE: &str = "rollouts.json";

#[derive(Clone, Debug)]
struct Driven {
    spec: ModelRolloutSpec,
    /// Standalone resources have no server-side generation: it counts spec changes.
    generation: i64,
    spec_hash: String,
    run: Run,
    controls: Controls,
    /// The status the serving config was compiled from. A tick that moves traffic is shown (at
    /// `GET /rollouts` and in the metrics) once the config it asks for serves, not before.
    serving: ModelRolloutStatus,
}

impl Driven {
    /// The status as the traffic shows it: the driver's, unless it moved traffic that the
    /// serving config does not carry yet.
    fn shown(&self) -> &ModelRolloutStatus {
        let now = machine::traffic(&self.spec, Some(&self.run.status));
        if now == machine::traffic(&self.spec, Some(&self.serving)) { &self.run.status } else { &self.serving }
    }
}

/// One rollout as `--state-dir` keeps it.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
struct Saved {
    namespace: String,
    name: String,
    generation: i64,
    spec_hash: String,
    status: ModelRolloutStatus,
    /// A pause (and requests not acted on yet) outlive a restart too.
    #[serde(default)]
    controls: Controls,
}

pub struct Rollouts {
    driven: Mutex<BTreeMap<Key, Driven>>,
    /// What `--state-dir` held at start, for rollouts not driven yet.
    saved: Mutex<BTreeMap<Key, Saved>>,
    state_dir: Option<PathBuf>,
    /// One save at a time: the driver and the config source both save.
    saving: Mutex<()>,
    metrics: Arc<Metrics>,
    /// Wakes the config source: a rollout moved traffic, so the config is compiled again.
    pub changed: Notify,
}

/// What one load of the directory does to the driven rollouts; committed only when the load is
/// accepted, so a refused change leaves them as they were.
pub struct Prepared {
    next: BTreeMap<Key, Driven>,
    transitions: Vec<(Key, Transition)>,
}

fn spec_hash(spec: &ModelRolloutSpec) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    Sha256::digest(&bytes).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn log(key: &Key, t: &Transition) {
    let (ns, name) = key;
    match t.phase {
        RolloutPhase::RolledBack | RolloutPhase::Aborted | RolloutPhase::Failed => {
            tracing::warn!(rollout = %format!("{ns}/{name}"), phase = t.phase.as_str(), reason = t.reason, "{}", t.message)
        }
        _ => {
            tracing::info!(rollout = %format!("{ns}/{name}"), phase = t.phase.as_str(), reason = t.reason, "{}", t.message)
        }
    }
}

impl Rollouts {
    /// A driver; with `state_dir`, what it held before a restart is resumed.
    pub fn new(state_dir: Option<PathBuf>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let mut saved = BTreeMap::new();
        if let Some(dir) = &state_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("--state-dir {}: cannot create it: {e}", dir.display()))?;
            let path = dir.join(STATE_FILE);
            match std::fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice::<Vec<Saved>>(&bytes) {
                    Ok(list) => saved = list.into_iter().map(|s| ((s.namespace.clone(), s.name.clone()), s)).collect(),
                    // The rollouts start over; the next save replaces the file.
                    Err(e) => tracing::warn!("{}: not a rollout state file, starting over: {e}", path.display()),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => anyhow::bail!("{}: {e}", path.display()),
            }
        }
        Ok(Self {
            driven: Mutex::default(),
            saved: Mutex::new(saved),
            state_dir,
            saving: Mutex::new(()),
            metrics,
            changed: Notify::new(),
        })
    }

    /// Sets each rollout's status (and generation) in `resources` to the driver's, and works
    /// out what the driver will hold once this load is accepted: a rollout it drives already
    /// goes on, a changed spec starts over, a new one resumes what `--state-dir` held or starts.
    /// A rollout that reads its signals from Prometheus cannot be driven here: the load fails.
    pub fn prepare(&self, resources: &mut Resources, now: Timestamp) -> Result<Prepared, String> {
        let unsupported: Vec<String> = resources
            .rollouts
            .iter()
            .filter(|r| r.spec.analysis.prometheus.is_some())
            .map(|r| {
                let (ns, name) = ns_name(&r.metadata);
                format!(
                    "ModelRollout {ns}/{name}: spec.analysis.prometheus is read by the operator; a standalone sidecar judges the canary on its own counters, so remove it here"
                )
            })
            .collect();
        if !unsupported.is_empty() {
            return Err(unsupported.join("\n"));
        }
        let driven = self.driven.lock();
        let saved = self.saved.lock();
        let mut next = BTreeMap::new();
        let mut transitions = vec![];
        for r in &mut resources.rollouts {
            let key = ns_name(&r.metadata);
            let hash = spec_hash(&r.spec);
            let d = match (driven.get(&key), saved.get(&key)) {
                (Some(d), _) if d.spec_hash == hash => d.clone(),
                (Some(d), _) => self.begin(&key, &r.spec, d.generation + 1, hash, None, now, &mut transitions),
                (None, Some(s)) if s.spec_hash == hash => {
                    let mut d = self.begin(&key, &r.spec, s.generation, hash, Some(&s.status), now, &mut transitions);
                    d.controls = s.controls.clone();
                    d
                }
                (None, Some(s)) => self.begin(&key, &r.spec, s.generation + 1, hash, None, now, &mut transitions),
                (None, None) => self.begin(&key, &r.spec, 1, hash, None, now, &mut transitions),
            };
            r.metadata.generation = Some(d.generation);
            r.status = Some(d.run.status.clone());
            next.insert(key, d);
        }
        Ok(Prepared { next, transitions })
    }

    #[allow(clippy::too_many_arguments)]
    fn begin(
        &self,
        key: &Key,
        spec: &ModelRolloutSpec,
        generation: i64,
        spec_hash: String,
        written: Option<&ModelRolloutStatus>,
        now: Timestamp,
        transitions: &mut Vec<(Key, Transition)>,
    ) -> Driven {
        let (run, t) = Run::resume(spec, generation, written, now);
        transitions.extend(t.map(|t| (key.clone(), t)));
        let serving = run.status.clone();
        Driven { spec: spec.clone(), generation, spec_hash, run, controls: Controls::default(), serving }
    }

    /// The load was accepted: the driver holds what it prepared.
    pub fn commit(&self, p: Prepared) {
        for (key, t) in &p.transitions {
            log(key, t);
        }
        let gone: Vec<Key> = {
            let mut driven = self.driven.lock();
            let gone = driven.keys().filter(|k| !p.next.contains_key(*k)).cloned().collect();
            let mut next = p.next;
            // A rollout that went on unchanged may have ticked since it was prepared: keep that.
            for (key, d) in next.iter_mut() {
                let compiled = d.run.status.clone();
                if let Some(current) = driven.remove(key)
                    && current.spec_hash == d.spec_hash
                    && current.generation == d.generation
                {
                    *d = current;
                }
                d.serving = compiled;
            }
            *driven = next;
            gone
        };
        self.saved.lock().clear();
        for (ns, name) in gone {
            self.metrics.forget_rollout(&format!("{ns}/{name}"));
        }
        self.publish();
        self.save();
    }

    /// One look at the counters; true when some rollout moved traffic.
    pub fn tick(&self, outcomes: &Outcomes, now: Timestamp) -> bool {
        let mut moved = false;
        let mut changed = false;
        {
            let mut driven = self.driven.lock();
            for (key, d) in driven.iter_mut() {
                let route = format!("{}/{}", key.0, d.spec.route_ref.name);
                let total = |backend: &str| outcomes.total(&route, backend).unwrap_or_default();
                d.run.record(now, &total(&d.spec.canary.backend), &total(&d.spec.stable.backend));
                let before = d.run.status.clone();
                let t = d.run.tick(&d.spec, d.generation, now, Some(&d.controls));
                if let Some(t) = &t {
                    log(key, t);
                }
                moved |= machine::traffic(&d.spec, Some(&before)) != machine::traffic(&d.spec, Some(&d.run.status));
                changed |= before != d.run.status;
            }
        }
        if changed {
            self.publish();
            self.save();
        }
        moved
    }

    /// A user's control: `promote` (with `full`), `pause`, `resume`, `abort`, `retry`.
    pub fn control(&self, ns: &str, name: &str, action: &str, full: bool) -> Result<String, String> {
        let action = Action::parse(action, full)?;
        let mut driven = self.driven.lock();
        let d = driven.get_mut(&(ns.to_owned(), name.to_owned())).ok_or_else(|| format!("no rollout {ns}/{name}"))?;
        let asked = control::request(&format!("{ns}/{name}"), &d.spec, d.generation, &d.run.status, action)?;
        d.controls.merge(asked);
        drop(driven);
        self.save();
        Ok(format!("{} requested for rollout {ns}/{name}", action.name()))
    }

    /// Every driven rollout and its state, for `GET /rollouts`.
    pub fn list(&self) -> Vec<serde_json::Value> {
        self.driven
            .lock()
            .iter()
            .map(|((ns, name), d)| {
                let mut entry = serde_json::json!({
                    "namespace": ns,
                    "name": name,
                    "route": d.spec.route_ref.name,
                    "stable": d.spec.stable.backend,
                    "canary": d.spec.canary.backend,
                    "generation": d.generation,
                    "steps": machine::steps(&d.spec).len(),
                    "controls": d.controls,
                });
                if let (Some(e), Ok(serde_json::Value::Object(status))) =
                    (entry.as_object_mut(), serde_json::to_value(d.shown()))
                {
                    e.extend(status);
                }
                entry
            })
            .collect()
    }

    /// The rollout metrics, as the driver holds them now.
    fn publish(&self) {
        for ((ns, name), d) in self.driven.lock().iter() {
            let s = d.shown();
            self.metrics.rollout(
                &format!("{ns}/{name}"),
                s.phase.unwrap_or(RolloutPhase::Pending),
                s.canary_weight.unwrap_or(0),
            );
        }
    }

    /// Writes the state to `--state-dir` (a new file renamed over the old: never half written).
    fn save(&self) {
        let Some(dir) = &self.state_dir else { return };
        let _one_at_a_time = self.saving.lock();
        let list: Vec<Saved> = self
            .driven
            .lock()
            .iter()
            .map(|((ns, name), d)| Saved {
                namespace: ns.clone(),
                name: name.clone(),
                generation: d.generation,
                spec_hash: d.spec_hash.clone(),
                status: d.run.status.clone(),
                controls: d.controls.clone(),
            })
            .collect();
        if let Err(e) = write_atomically(&dir.join(STATE_FILE), &serde_json::to_vec_pretty(&list).unwrap_or_default()) {
            tracing::warn!("rollout state not saved in {}: {e}", dir.display());
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Ticks the driver until shutdown; a tick that moves traffic wakes the config source.
pub async fn drive(rollouts: Arc<Rollouts>, metrics: Arc<Metrics>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        if rollouts.tick(&metrics.outcomes, Timestamp::now()) {
            rollouts.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLLOUT: &str = "apiVersion: bulwark.dev/v1alpha1\nkind: ModelRollout\nmetadata: {name: upgrade, namespace: team-a}\nspec:\n  routeRef: {name: chat}\n  stable: {backend: stable}\n  canary: {backend: canary}\n  steps: [{weight: 30, pause: 1s}, {weight: 100}]\n  analysis: {interval: 1s, window: 4s, minRequests: 2}\n";

    fn load(rollouts: &Rollouts, now: Timestamp) {
        let (mut resources, errors) = bulwark_api::manifest::parse(ROLLOUT, "default");
        assert!(errors.is_empty(), "{errors:?}");
        let prepared = rollouts.prepare(&mut resources, now).unwrap();
        rollouts.commit(prepared);
    }

    fn weight(rollouts: &Rollouts) -> (serde_json::Value, serde_json::Value) {
        let shown = &rollouts.list()[0];
        (shown["canaryWeight"].clone(), shown["phase"].clone())
    }

    #[test]
    fn a_step_is_shown_once_the_config_it_asks_for_serves() {
        let metrics = Arc::new(Metrics::new());
        let rollouts = Rollouts::new(None, metrics.clone()).unwrap();
        let t0 = Timestamp::now();
        load(&rollouts, t0);
        assert_eq!(weight(&rollouts), (30.into(), "Progressing".into()));
        // Healthy answers until an analysis passes and the pause is over: then traffic moves.
        let mut later = t0;
        let moved = (0..20).any(|_| {
            later += Duration::from_millis(250);
            for backend in ["canary", "stable"] {
                metrics.outcomes.answered("team-a/chat", backend, "2xx", Duration::from_millis(5));
            }
            rollouts.tick(&metrics.outcomes, later)
        });
        assert!(moved, "the step passed: {:?}", rollouts.list());
        assert_eq!(weight(&rollouts), (30.into(), "Progressing".into()), "the serving config still sends 30%");
        assert!(metrics.encode().contains(r#"bulwark_rollout_canary_weight{rollout="team-a/upgrade"} 30"#));
        load(&rollouts, later);
        assert_eq!(weight(&rollouts), (100.into(), "Succeeded".into()), "compiled again: the last step serves");
        assert!(metrics.encode().contains(r#"bulwark_rollout_canary_weight{rollout="team-a/upgrade"} 100"#));
    }
}
