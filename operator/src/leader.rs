//! Leader election with a `coordination.k8s.io/v1` Lease. Every replica watches and serves the
//! config stream; only the holder of the lease writes (ConfigMaps, status, Events).
//!
//! The holder renews every third of the lease duration. Another replica takes over when it has
//! seen the same lease record unchanged for a whole duration (judged on its own clock, as
//! client-go does, so clock skew between nodes does not matter). Updates carry the
//! resourceVersion they read, so two replicas can never both win.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{PostParams, entry::Entry},
};
use tokio::{sync::watch, time::Instant};

use crate::State;

#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

/// What this replica last saw of the lease, and when it saw it change.
struct Observed {
    record: (Option<String>, Option<MicroTime>),
    at: Instant,
}

/// Competes for the lease until `shutdown`; then releases it if held.
pub async fn run(client: Client, settings: Settings, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let retry = settings.duration / 3;
    let mut observed: Option<Observed> = None;
    loop {
        let held = match try_acquire(&api, &settings, &mut observed).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(lease = %settings.name, "lease: {e}");
                // Without a renewal for a whole duration, another replica may take over.
                state.is_leader() && observed.as_ref().is_some_and(|o| o.at.elapsed() < settings.duration)
            }
        };
        set_leader(&state, held, &settings);
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = shutdown.changed() => break,
        }
    }
    if state.is_leader() {
        release(&api, &settings).await;
        set_leader(&state, false, &settings);
    }
}

fn set_leader(state: &State, held: bool, settings: &Settings) {
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
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

async fn try_acquire(api: &Api<Lease>, s: &Settings, observed: &mut Option<Observed>) -> kube::Result<bool> {
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
                Err(e) => Err(kube::Error::Service(Box::new(e))),
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
                Err(e) => Err(kube::Error::Service(Box::new(e))),
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
