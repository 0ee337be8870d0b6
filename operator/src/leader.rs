//! Leader election with a `coordination.k8s.io/v1` Lease. Every replica watches and serves the
//! config stream; only the holder of the lease writes (ConfigMaps, status, Events).
//!
//! The leader labels its pod `bulwark.dev/leader=true`, and the config stream's Service selects
//! it: sidecars report to the replica that writes their status.
//!
//! The holder renews every third of the lease duration. Another replica takes over when it has
//! seen the same lease record unchanged for a whole duration (judged on its own clock, as
//! client-go does, so clock skew between nodes does not matter). Updates carry the
//! resourceVersion they read, so two replicas can never both win.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams, entry::Entry},
};
use serde_json::json;
use tokio::{sync::watch, time::Instant};

use crate::State;

#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    /// This replica's pod, labelled while it leads; `None` outside a pod.
    pub pod: Option<String>,
}

/// The label on the leading replica's pod, which the config stream's Service selects.
pub const LEADER_LABEL: &str = "bulwark.dev/leader";

/// What this replica last saw of the lease, and when it saw it change.
struct Observed {
    record: (Option<String>, Option<MicroTime>),
    at: Instant,
}

/// Competes for the lease until `shutdown`; then releases it if held.
pub async fn run(client: Client, settings: Settings, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let retry = settings.duration / 3;
    let mut observed: Option<Observed> = None;
    let mut renewed: Option<Instant> = None;
    loop {
        // A renewal that hangs must not keep this replica leading past its lease.
        let attempt = tokio::time::timeout(retry, try_acquire(&api, &settings, &mut observed))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in {retry:?}")));
        let held = match attempt {
            Ok(held) => {
                renewed = held.then(Instant::now);
                held
            }
            Err(e) => {
                tracing::warn!(lease = %settings.name, "lease: {e:#}");
                renewed.is_some_and(|at| at.elapsed() < settings.duration * 2 / 3)
            }
        };
        if set_leader(&state, held, &settings) {
            label(&client, &settings, held).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = shutdown.changed() => break,
        }
    }
    if state.is_leader() {
        set_leader(&state, false, &settings);
        label(&client, &settings, false).await;
        release(&api, &settings).await;
    }
}

/// True when leadership changed.
fn set_leader(state: &State, held: bool, settings: &Settings) -> bool {
    let was = state.leader.swap(held, std::sync::atomic::Ordering::SeqCst);
    if was != held {
        state.metrics.leader.set(i64::from(held));
        if held {
            tracing::info!(identity = %settings.identity, lease = %settings.name, "became the leader");
            state.restatus.notify_one();
            state.changed();
        } else {
            tracing::warn!(identity = %settings.identity, lease = %settings.name, "no longer the leader");
        }
    }
    was != held
}

/// Marks the leader's own pod `bulwark.dev/leader=true` (and no other), so that the config
/// stream's Service sends every sidecar to the replica that writes their status.
async fn label(client: &Client, s: &Settings, leading: bool) {
    let Some(me) = &s.pod else { return };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &s.namespace);
    let set = |value: Option<&str>| json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    let mut targets = vec![(me.clone(), leading.then_some("true"))];
    if leading {
        let others = pods.list(&ListParams::default().labels(&format!("{LEADER_LABEL}=true"))).await;
        for p in others.map(|l| l.items).unwrap_or_default() {
            let name = p.metadata.name.unwrap_or_default();
            if name != *me {
                targets.push((name, None));
            }
        }
    }
    for (name, value) in targets {
        if let Err(e) = pods.patch(&name, &PatchParams::default(), &Patch::Merge(set(value))).await {
            tracing::warn!(pod = %name, "setting the {LEADER_LABEL} label: {e}");
        }
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

async fn try_acquire(api: &Api<Lease>, s: &Settings, observed: &mut Option<Observed>) -> anyhow::Result<bool> {
    let seconds = i32::try_from(s.duration.as_secs()).unwrap_or(15).max(1);
    match api.entry(&s.name).await? {
        Entry::Vacant(v) => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(s.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(s.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            match v.insert(lease).commit(&PostParams::default()).await {
                Ok(()) => Ok(true),
                Err(kube::api::entry::CommitError::Save(kube::Error::Api(e))) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
        Entry::Occupied(mut o) => {
            let spec = o.get().spec.clone().unwrap_or_default();
            let record = (spec.holder_identity.clone(), spec.renew_time.clone());
            let mine = spec.holder_identity.as_deref() == Some(s.identity.as_str());
            let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
            match observed.as_ref() {
                Some(seen) if seen.record == record => {}
                _ => *observed = Some(Observed { record, at: Instant::now() }),
            }
            let duration =
                Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(seconds)).unwrap_or(15));
            let expired = observed.as_ref().is_some_and(|seen| seen.at.elapsed() >= duration);
            if !(mine || free || expired) {
                return Ok(false);
            }
            o.get_mut().spec = Some(LeaseSpec {
                holder_identity: Some(s.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: if mine { spec.acquire_time.clone() } else { Some(now()) },
                renew_time: Some(now()),
                lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
                ..spec
            });
            match o.commit(&PostParams::default()).await {
                Ok(()) => {
                    if !mine {
                        tracing::info!(identity = %s.identity, "took over the lease");
                    }
                    *observed = None;
                    Ok(true)
                }
                Err(kube::api::entry::CommitError::Save(kube::Error::Api(e))) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Gives the lease up at shutdown so another replica takes over at once.
async fn release(api: &Api<Lease>, s: &Settings) {
    let Ok(Entry::Occupied(mut o)) = api.entry(&s.name).await else { return };
    if o.get().spec.as_ref().and_then(|x| x.holder_identity.as_deref()) != Some(s.identity.as_str()) {
        return;
    }
    if let Some(spec) = o.get_mut().spec.as_mut() {
        spec.holder_identity = None;
        spec.renew_time = None;
    }
    if let Err(e) = o.commit(&PostParams::default()).await {
        tracing::warn!("releasing the lease: {e}");
    }
}
