//! Service account tokens: `TokenRequest` (`serviceaccounts/{name}/token`) issues random opaque
//! tokens the server remembers, and `TokenReview` tells who a token belongs to.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::error::{ApiError, Cause};
use crate::meta;
use crate::resources::{GroupResource, Registry};
use crate::store::Store;

/// The audience tokens get when the request names none, and reviews check when they name none.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
const DEFAULT_EXPIRATION_SECONDS: u64 = 3600;
const MIN_EXPIRATION_SECONDS: u64 = 600;

/// What a token was issued for.
struct Issued {
    namespace: String,
    service_account: String,
    service_account_uid: String,
    audiences: Vec<String>,
    expires: Instant,
    /// The pod the token is bound to: (name, uid).
    pod: Option<(String, String)>,
    id: String,
}

/// The tokens issued so far, by the SHA-256 of the token.
#[derive(Default)]
pub struct Tokens {
    issued: HashMap<[u8; 32], Issued>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map_or_else(Vec::new, |list| list.iter().filter_map(Value::as_str).map(str::to_string).collect())
}

impl Tokens {
    /// Handles a `TokenRequest` for the service account `namespace/name`.
    pub fn request(
        &mut self,
        registry: &Registry,
        store: &Store,
        namespace: &str,
        name: &str,
        body: &Value,
    ) -> Result<Value, ApiError> {
        let find = |plural: &str| registry.find("", "v1", plural);
        let (Some(accounts), Some(pods)) = (find("serviceaccounts"), find("pods")) else {
            return Err(ApiError::path_not_found());
        };
        let account =
            store.get(&accounts.storage(), namespace, name).ok_or_else(|| ApiError::not_found(&accounts, name))?;
        let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
        let invalid = |field: &str, message: String| {
            ApiError::invalid(&accounts, name, vec![Cause::new("FieldValueInvalid", field, message)])
        };
        let seconds = match spec.get("expirationSeconds") {
            None | Some(Value::Null) => DEFAULT_EXPIRATION_SECONDS,
            Some(value) => value.as_u64().ok_or_else(|| {
                invalid("spec.expirationSeconds", format!("Invalid value: {value}: must be a positive integer"))
            })?,
        };
        if seconds < MIN_EXPIRATION_SECONDS {
            return Err(invalid(
                "spec.expirationSeconds",
                format!("Invalid value: {seconds}: may not specify a duration less than 10 minutes"),
            ));
        }
        let mut audiences = strings(spec.get("audiences"));
        if audiences.is_empty() {
            audiences.push(API_AUDIENCE.to_string());
        }
        let pod = match spec.get("boundObjectRef").filter(|r| !r.is_null()) {
            None => None,
            Some(bound) => {
                let kind = meta::str_at(bound, "/kind");
                if kind != "Pod" {
                    return Err(ApiError::invalid(
                        &accounts,
                        name,
                        vec![Cause::new(
                            "FieldValueNotSupported",
                            "spec.boundObjectRef.kind",
                            format!("Unsupported value: \"{kind}\": supported values: \"Pod\""),
                        )],
                    ));
                }
                let pod_name = meta::str_at(bound, "/name");
                let pod = store
                    .get(&pods.storage(), namespace, pod_name)
                    .ok_or_else(|| ApiError::not_found(&pods, pod_name))?;
                let wanted_uid = meta::str_at(bound, "/uid");
                if !wanted_uid.is_empty() && wanted_uid != meta::uid(pod) {
                    return Err(ApiError::conflict(
                        &pods,
                        pod_name,
                        &format!(
                            "the UID in the bound object reference ({wanted_uid}) does not match the UID in record. \
                             The object might have been deleted and then recreated"
                        ),
                    ));
                }
                Some((pod_name.to_string(), meta::uid(pod).to_string()))
            }
        };
        let token = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        self.issued.insert(
            digest(&token),
            Issued {
                namespace: namespace.to_string(),
                service_account: name.to_string(),
                service_account_uid: meta::uid(account).to_string(),
                audiences: audiences.clone(),
                expires: Instant::now() + Duration::from_secs(seconds),
                pod,
                id: meta::new_uid(),
            },
        );
        let mut spec = spec;
        spec["audiences"] = json!(audiences);
        spec["expirationSeconds"] = json!(seconds);
        Ok(json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": meta::now()},
            "spec": spec,
            "status": {
                "token": token,
                "expirationTimestamp": meta::rfc3339(SystemTime::now() + Duration::from_secs(seconds)),
            },
        }))
    }

    /// Handles a `TokenReview`: authenticated when the token was issued here, has not expired, is
    /// meant for one of the requested audiences, and its service account and pod still exist.
    pub fn review(&self, store: &Store, body: &Value) -> Value {
        let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
        let status = match self.authenticate(store, &spec) {
            Ok(status) => status,
            Err(reason) => json!({"user": {}, "error": format!("[invalid bearer token, {reason}]")}),
        };
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": Value::Null},
            "spec": spec,
            "status": status,
        })
    }

    fn authenticate(&self, store: &Store, spec: &Value) -> Result<Value, String> {
        let token = meta::str_at(spec, "/token");
        let issued = self.issued.get(&digest(token)).ok_or("token lookup failed: unknown token")?;
        if Instant::now() >= issued.expires {
            return Err("token has expired".into());
        }
        let mut wanted = strings(spec.get("audiences"));
        if wanted.is_empty() {
            wanted.push(API_AUDIENCE.to_string());
        }
        let audiences: Vec<&String> = issued.audiences.iter().filter(|a| wanted.contains(a)).collect();
        if audiences.is_empty() {
            return Err(format!(
                "token audiences {:?} is invalid for the target audiences {wanted:?}",
                issued.audiences
            ));
        }
        let (ns, sa) = (&issued.namespace, &issued.service_account);
        let account = store.get(&GroupResource::new("", "serviceaccounts"), ns, sa);
        if account.is_none_or(|a| meta::uid(a) != issued.service_account_uid) {
            return Err(format!("service account {ns}/{sa} has been deleted"));
        }
        let mut extra = json!({"authentication.kubernetes.io/credential-id": [format!("JTI={}", issued.id)]});
        if let Some((pod_name, pod_uid)) = &issued.pod {
            let pod = store.get(&GroupResource::new("", "pods"), ns, pod_name);
            if pod.is_none_or(|p| meta::uid(p) != pod_uid || meta::is_deleting(p)) {
                return Err(format!("pod {ns}/{pod_name} ({pod_uid}) has been deleted"));
            }
            extra["authentication.kubernetes.io/pod-name"] = json!([pod_name]);
            extra["authentication.kubernetes.io/pod-uid"] = json!([pod_uid]);
        }
        Ok(json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{ns}:{sa}"),
                "uid": issued.service_account_uid,
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                "extra": extra,
            },
            "audiences": audiences,
        }))
    }
}
