//! The per-namespace CA of TLS interception (`--tls-interception`): the Secret
//! `bulwark-intercept-ca` (type `kubernetes.io/tls`) that sidecars mint certificates with, and
//! the ConfigMap `bulwark-trust-bundle` that apps trust: `ca.crt` (the CA, and the one it
//! replaced while that one is still valid) and `ca-bundle.crt` (the public roots the operator
//! trusts, then `ca.crt`). Created when the first intercepting pod of a namespace is admitted;
//! the leader renews a CA that has less than a quarter of its life left.

use std::collections::BTreeMap;

use anyhow::Context as _;
use base64::Engine as _;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

pub const CA_SECRET: &str = "bulwark-intercept-ca";
pub const BUNDLE_CONFIGMAP: &str = "bulwark-trust-bundle";
/// Marks the Secrets this operator made, so the leader finds them to renew.
pub const CA_LABEL: &str = "bulwark.dev/intercept-ca";
/// When the CA in the Secret expires (RFC 3339), so renewal needs no certificate parsing.
pub const NOT_AFTER: &str = "bulwark.dev/not-after";
const FIELD_MANAGER: &str = "bulwark-operator-trust";
/// How long a CA is valid.
const VALIDITY: SignedDuration = SignedDuration::from_hours(24 * 365);

/// A CA: its certificate and key (PEM) and when it expires.
#[derive(Clone, Debug)]
pub struct Ca {
    pub cert: String,
    pub key: String,
    pub not_after: Timestamp,
}

/// A new CA for a namespace's interception.
pub fn mint(ns: &str, now: Timestamp) -> anyhow::Result<Ca> {
    let mut params = CertificateParams::new(vec![])?;
    params.distinguished_name.push(DnType::OrganizationName, "bulwark");
    params.distinguished_name.push(DnType::CommonName, format!("bulwark interception CA {ns}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let not_after = now + VALIDITY;
    params.not_before = time::OffsetDateTime::from_unix_timestamp(now.as_second() - 3600)?;
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after.as_second())?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Ca { cert: cert.pem(), key: key.serialize_pem(), not_after })
}

/// Whether a CA expiring at `not_after` is due for renewal: less than a quarter of its life left.
pub fn due(not_after: Timestamp, now: Timestamp) -> bool {
    now.duration_until(not_after) < VALIDITY / 4
}

/// The public roots the operator trusts, as PEM.
pub fn public_roots() -> String {
    let found = rustls_native_certs::load_native_certs();
    let mut out = String::new();
    for der in found.certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

fn text(s: &Secret, key: &str) -> Option<String> {
    s.data.as_ref()?.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// Makes sure the namespace has a valid CA and the bundle that trusts it; renews a CA that is
/// due, keeping the one it replaces in the bundle while that is still valid. Replicas that
/// race agree on one CA: a new one is created, or replaces the version read, only if nothing
/// was written in between, and the loser takes the winner's.
pub async fn ensure(client: &Client, ns: &str, roots: &str) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut attempts = 0;
    let (ca, previous) = loop {
        attempts += 1;
        match current_or_renewed(&secrets, ns).await {
            Err(e) if attempts < 3 && matches!(e.downcast_ref(), Some(kube::Error::Api(s)) if s.code == 409) => {
                tracing::debug!(namespace = ns, "the interception CA was written meanwhile: reading it again");
            }
            other => break other.context("writing the interception CA")?,
        }
    };
    let trusted = format!("{}{}", ca.cert, previous.unwrap_or_default());
    let bundle = ConfigMap {
        metadata: ObjectMeta { name: Some(BUNDLE_CONFIGMAP.into()), ..ObjectMeta::default() },
        data: Some(BTreeMap::from([
            ("ca.crt".to_owned(), trusted.clone()),
            ("ca-bundle.crt".to_owned(), format!("{roots}{trusted}")),
        ])),
        ..ConfigMap::default()
    };
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    maps.patch(BUNDLE_CONFIGMAP, &pp, &Patch::Apply(&bundle)).await.context("writing the trust bundle")?;
    Ok(())
}

/// The namespace's CA and the one it replaced, minting one if it has none or it is due: a 409
/// means another writer got there first.
async fn current_or_renewed(secrets: &Api<Secret>, ns: &str) -> anyhow::Result<(Ca, Option<String>)> {
    let now = Timestamp::now();
    let live = secrets.get_opt(CA_SECRET).await?;
    let current = live.as_ref().and_then(|s| {
        let not_after: Timestamp = s.metadata.annotations.as_ref()?.get(NOT_AFTER)?.parse().ok()?;
        Some(Ca { cert: text(s, "tls.crt")?, key: text(s, "tls.key")?, not_after })
    });
    if let Some(ca) = current.as_ref().filter(|ca| !due(ca.not_after, now)) {
        return Ok((ca.clone(), live.as_ref().and_then(|s| text(s, "previous.crt"))));
    }
    let ca = mint(ns, now)?;
    let previous = current.filter(|o| o.not_after > now).map(|o| o.cert);
    let mut data = BTreeMap::from([
        ("tls.crt".to_owned(), ByteString(ca.cert.clone().into_bytes())),
        ("tls.key".to_owned(), ByteString(ca.key.clone().into_bytes())),
    ]);
    if let Some(p) = &previous {
        data.insert("previous.crt".to_owned(), ByteString(p.clone().into_bytes()));
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.into()),
            labels: Some(BTreeMap::from([(CA_LABEL.to_owned(), "true".to_owned())])),
            annotations: Some(BTreeMap::from([(NOT_AFTER.to_owned(), ca.not_after.to_string())])),
            resource_version: live.as_ref().and_then(|s| s.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    };
    let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
    match live {
        None => secrets.create(&pp, &secret).await?,
        Some(_) => secrets.replace(CA_SECRET, &pp, &secret).await?,
    };
    tracing::info!(namespace = ns, not_after = %ca.not_after, "interception CA minted");
    Ok((ca, previous))
}

/// On the leader: renews the CAs this operator made, hourly.
pub async fn renew(
    state: std::sync::Arc<crate::State>,
    client: Client,
    ns: Option<String>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let roots = public_roots();
    let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !state.is_leader() {
            continue;
        }
        let api: Api<Secret> = match &ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let list = match api.list_metadata(&ListParams::default().labels(&format!("{CA_LABEL}=true"))).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("listing interception CAs: {e}");
                continue;
            }
        };
        for s in list.items {
            let Some(ns) = s.metadata.namespace else { continue };
            if let Err(e) = ensure(&client, &ns, &roots).await {
                tracing::warn!(namespace = %ns, "renewing the interception CA: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_ca_is_renewed_in_its_last_quarter() {
        let now: Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
        let ca = mint("team-a", now).unwrap();
        assert!(ca.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(ca.key.contains("PRIVATE KEY"));
        assert!(!due(ca.not_after, now));
        assert!(!due(ca.not_after, now + SignedDuration::from_hours(24 * 270)));
        assert!(due(ca.not_after, now + SignedDuration::from_hours(24 * 280)));
    }

    #[test]
    fn public_roots_are_pem() {
        let roots = public_roots();
        assert_eq!(
            roots.matches("-----BEGIN CERTIFICATE-----").count(),
            roots.matches("-----END CERTIFICATE-----").count()
        );
    }
}
