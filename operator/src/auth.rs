//! Who is calling: a sidecar sends its pod's projected service-account token (audience
//! `bulwark`); a TokenReview tells the service account and the pod it is bound to. Answers are
//! cached briefly, by a hash of the token, so reports every few seconds cost no API call.

use std::{collections::HashMap, time::Duration};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// The pod a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    pub pod_uid: Option<String>,
}

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const GOOD_FOR: Duration = Duration::from_secs(60);
const BAD_FOR: Duration = Duration::from_secs(5);
const MAX_CACHED: usize = 20_000;

type Cached = (Result<Identity, String>, Instant);

pub struct Authenticator {
    client: Client,
    audience: String,
    /// Answers by token hash, each good until its instant.
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    /// Bounds concurrent TokenReviews, so made-up tokens cannot flood the API server.
    reviews: tokio::sync::Semaphore,
}

impl Authenticator {
    pub fn new(client: Client, audience: String) -> Self {
        Self { client, audience, cache: Mutex::default(), reviews: tokio::sync::Semaphore::new(8) }
    }

    /// The identity behind a bearer token, or why it is refused.
    pub async fn review(&self, token: &str) -> Result<Identity, String> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((answer, until)) = self.cache.lock().get(&key)
            && Instant::now() < *until
        {
            return answer.clone();
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![self.audience.clone()]) },
            ..TokenReview::default()
        };
        let _permit = self.reviews.acquire().await.map_err(|e| e.to_string())?;
        let answer = match Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await {
            Ok(r) => identity(&r, &self.audience),
            // The API server is unreachable: refuse, but don't remember it.
            Err(e) => return Err(format!("token review failed: {e}")),
        };
        let ttl = if answer.is_ok() { GOOD_FOR } else { BAD_FOR };
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (answer.clone(), Instant::now() + ttl));
        answer
    }
}

/// Reads a TokenReview's answer: only pod-bound service-account tokens for our audience pass.
pub fn identity(review: &TokenReview, audience: &str) -> Result<Identity, String> {
    let status = review.status.as_ref().ok_or("the token review has no status")?;
    if status.authenticated != Some(true) {
        return Err(format!("token not authenticated: {}", status.error.as_deref().unwrap_or("no reason given")));
    }
    if !status.audiences.as_ref().is_some_and(|a| a.iter().any(|x| x == audience)) {
        return Err(format!("token is not for audience {audience:?}"));
    }
    let user = status.user.as_ref().ok_or("the token review names no user")?;
    let username = user.username.as_deref().unwrap_or_default();
    let mut parts = username.strip_prefix("system:serviceaccount:").unwrap_or_default().splitn(2, ':');
    let (Some(namespace), Some(sa)) = (parts.next().filter(|s| !s.is_empty()), parts.next()) else {
        return Err(format!("{username:?} is not a service account"));
    };
    let extra = |k: &str| user.extra.as_ref().and_then(|e| e.get(k)).and_then(|v| v.first()).cloned();
    let pod = extra(POD_NAME).ok_or("the token is not bound to a pod; mount a projected service-account token")?;
    Ok(Identity { namespace: namespace.into(), service_account: sa.into(), pod, pod_uid: extra(POD_UID) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(json: serde_json::Value) -> TokenReview {
        serde_json::from_value(serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}, "status": json})).unwrap()
    }

    #[test]
    fn only_pod_bound_service_account_tokens_for_our_audience_pass() {
        let ok = review(serde_json::json!({
            "authenticated": true, "audiences": ["bulwark"],
            "user": {"username": "system:serviceaccount:shop:bot", "extra": {POD_NAME: ["bot-1"], POD_UID: ["u1"]}}
        }));
        assert_eq!(
            identity(&ok, "bulwark"),
            Ok(Identity {
                namespace: "shop".into(),
                service_account: "bot".into(),
                pod: "bot-1".into(),
                pod_uid: Some("u1".into())
            })
        );
        assert!(identity(&ok, "other").unwrap_err().contains("audience"));
        let unbound = review(
            serde_json::json!({"authenticated": true, "audiences": ["bulwark"], "user": {"username": "system:serviceaccount:shop:bot"}}),
        );
        assert!(identity(&unbound, "bulwark").unwrap_err().contains("not bound to a pod"));
        let human =
            review(serde_json::json!({"authenticated": true, "audiences": ["bulwark"], "user": {"username": "alice"}}));
        assert!(identity(&human, "bulwark").unwrap_err().contains("not a service account"));
        let bad = review(serde_json::json!({"authenticated": false, "error": "expired"}));
        assert_eq!(identity(&bad, "bulwark"), Err("token not authenticated: expired".into()));
    }
}
