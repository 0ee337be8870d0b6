//! Mutating admission webhooks, as the API server runs them on a create: every webhook of every
//! `MutatingWebhookConfiguration` whose rules take the operation and resource, and whose
//! `objectSelector` and `namespaceSelector` take the object, is sent an `AdmissionReview`
//! (`clientConfig.url` over HTTPS, trusting `caBundle`; a `service` reference cannot be
//! reached without a cluster network), and its JSON patch is applied before anything is stored.
//! A webhook that fails refuses the create with `failurePolicy: Fail` (the default) and is
//! skipped with `Ignore`.

use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::error::ApiError;

/// One webhook to call for a create.
#[derive(Debug, Clone)]
pub struct Call {
    name: String,
    url: String,
    ca: Option<Vec<u8>>,
    timeout: Duration,
    ignore_failure: bool,
}

/// The webhooks of `configurations` (the stored `MutatingWebhookConfiguration` objects) that a
/// create of `object` in resource `group/version/plural` goes through.
pub fn calls(
    configurations: &[Value],
    (group, version, plural): (&str, &str, &str),
    object: &Value,
    namespace_labels: &Value,
) -> Vec<Call> {
    let mut out = vec![];
    for configuration in configurations {
        for hook in configuration["webhooks"].as_array().into_iter().flatten() {
            let takes = hook["rules"].as_array().into_iter().flatten().any(|rule| {
                let has = |field: &str, value: &str| {
                    rule[field].as_array().into_iter().flatten().any(|v| v == value || v == "*")
                };
                has("operations", "CREATE")
                    && has("apiGroups", group)
                    && has("apiVersions", version)
                    && has("resources", plural)
            });
            if !takes
                || !selects(&hook["objectSelector"], &object["metadata"]["labels"])
                || !selects(&hook["namespaceSelector"], namespace_labels)
            {
                continue;
            }
            let config = &hook["clientConfig"];
            out.push(Call {
                name: hook["name"].as_str().unwrap_or_default().to_owned(),
                url: config["url"].as_str().unwrap_or_default().to_owned(),
                ca: config["caBundle"].as_str().and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok()),
                timeout: Duration::from_secs(hook["timeoutSeconds"].as_u64().unwrap_or(10).clamp(1, 30)),
                ignore_failure: hook["failurePolicy"] == "Ignore",
            });
        }
    }
    out
}

/// A structured label selector (`matchLabels`, `matchExpressions`); an absent one takes all.
fn selects(selector: &Value, labels: &Value) -> bool {
    let label = |key: &str| labels.get(key).and_then(Value::as_str);
    let by_labels = selector["matchLabels"].as_object().into_iter().flatten().all(|(k, v)| label(k) == v.as_str());
    let by_expressions = selector["matchExpressions"].as_array().into_iter().flatten().all(|e| {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = e["values"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        match e["operator"].as_str() {
            Some("In") => label(key).is_some_and(|v| values.contains(&v)),
            Some("NotIn") => label(key).is_none_or(|v| !values.contains(&v)),
            Some("Exists") => label(key).is_some(),
            Some("DoesNotExist") => label(key).is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// A create waiting for its webhooks.
pub struct Pending {
    pub calls: Vec<Call>,
    pub object: Value,
    /// Group, version and kind of the object.
    pub kind: (String, String, String),
    /// Its resource (plural).
    pub resource: String,
    pub namespace: String,
}

impl Pending {
    /// Sends the object through each webhook in turn; the object as the last one left it.
    pub async fn mutate(self) -> Result<Value, ApiError> {
        let Self { calls, mut object, kind, resource, namespace } = self;
        let kind = (kind.0.as_str(), kind.1.as_str(), kind.2.as_str());
        for call in &calls {
            match review(call, &object, kind, &resource, &namespace).await {
                Ok(Some(patched)) => object = patched,
                Ok(None) => {}
                Err(e) if call.ignore_failure => tracing::warn!(webhook = %call.name, "ignoring a failed webhook: {e}"),
                Err(e) => {
                    return Err(ApiError::new(
                        500,
                        "InternalError",
                        format!("Internal error occurred: failed calling webhook \"{}\": {e}", call.name),
                    ));
                }
            }
        }
        Ok(object)
    }
}

/// One call: the patched object, `None` when the webhook allowed it unchanged.
async fn review(
    call: &Call,
    object: &Value,
    (group, version, kind): (&str, &str, &str),
    resource: &str,
    namespace: &str,
) -> Result<Option<Value>, String> {
    let uid = format!("{:032x}", rand::random::<u128>());
    let request = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "operation": "CREATE",
            "namespace": namespace,
            "name": object["metadata"]["name"],
            "object": object,
            "userInfo": {"username": "system:admin"},
            "dryRun": false,
        },
    });
    let body = tokio::time::timeout(call.timeout, post(&call.url, call.ca.as_deref(), request.to_string()))
        .await
        .map_err(|_| format!("timed out after {:?}", call.timeout))??;
    let answer: Value = serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    if answer["apiVersion"] != "admission.k8s.io/v1" || answer["kind"] != "AdmissionReview" {
        return Err(format!(
            "expected response of kind AdmissionReview in admission.k8s.io/v1, got {} {}",
            answer["kind"], answer["apiVersion"]
        ));
    }
    let response = &answer["response"];
    if response["uid"] != uid.as_str() {
        return Err("the answer's response.uid does not match the request's".into());
    }
    if response["allowed"] != true {
        let message = response["status"]["message"].as_str().unwrap_or("denied");
        return Err(format!("admission webhook \"{}\" denied the request: {message}", call.name));
    }
    let Some(patch) = response["patch"].as_str() else { return Ok(None) };
    if response["patchType"] != "JSONPatch" {
        return Err("patchType must be JSONPatch".into());
    }
    let ops: Value = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| format!("the patch is not base64 JSON: {e}"))?;
    crate::patch::json_patch(object, &ops).map(Some).map_err(|e| format!("applying its patch: {e}"))
}

/// An HTTPS POST of JSON over HTTP/1.1; the answer's body.
async fn post(url: &str, ca: Option<&[u8]>, body: String) -> Result<Bytes, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("clientConfig.url {url:?}: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("clientConfig.url {url:?} must be https"));
    }
    let host = uri.host().ok_or("clientConfig.url has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.unwrap_or_default()) {
        roots.add(cert.map_err(|e| format!("caBundle: {e}"))?).map_err(|e| format!("caBundle: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::post(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_are_chosen_by_rule_and_selectors() {
        let configuration = json!({"webhooks": [
            {"name": "inject.bulwark.dev", "clientConfig": {"url": "https://localhost:9443/inject"},
             "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
             "objectSelector": {"matchLabels": {"bulwark.dev/inject": "true"}},
             "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]}]},
             "failurePolicy": "Ignore"},
            {"name": "updates-only", "clientConfig": {"url": "https://localhost:1/"},
             "rules": [{"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]},
        ]});
        let pod = |inject: &str| json!({"metadata": {"labels": {"bulwark.dev/inject": inject}}});
        let ns = |name: &str| json!({"kubernetes.io/metadata.name": name});
        let names = |object: &Value, namespace: &Value| -> Vec<String> {
            calls(std::slice::from_ref(&configuration), ("", "v1", "pods"), object, namespace)
                .into_iter()
                .map(|c| c.name)
                .collect()
        };
        assert_eq!(names(&pod("true"), &ns("shop")), ["inject.bulwark.dev"]);
        assert!(names(&pod("false"), &ns("shop")).is_empty());
        assert!(names(&pod("true"), &ns("kube-system")).is_empty());
        let c = &calls(std::slice::from_ref(&configuration), ("", "v1", "pods"), &pod("true"), &ns("a"))[0];
        assert!(c.ignore_failure);
        assert!(calls(&[configuration], ("", "v1", "configmaps"), &pod("true"), &ns("a")).is_empty());
    }
}
