//! The sidecar injection webhook (port 9443, `POST /inject`): the API server sends an
//! `AdmissionReview` for each new pod labelled `bulwark.dev/inject=true`, and gets back a JSON
//! patch that adds the sidecar as a native sidecar container (an init container that keeps
//! running, so it starts before the app and stops after it) with:
//!
//! * the config stream's address and CA (in the environment, as the CA is public);
//! * a projected service-account token for the stream's audience (`/var/run/bulwark/token`), and
//!   the Secrets that the routes selecting the pod reference, under
//!   `/var/run/secrets/bulwark/<secret>/<key>` (where the compiled config reads them);
//! * the workload's ConfigMap copy (`bulwark-<workload>`, optional) as its fallback config;
//! * `OPENAI_BASE_URL` and `ANTHROPIC_BASE_URL` in each app container that does not set them
//!   (annotation `bulwark.dev/base-url-env: "false"` turns that off).
//!
//! With `bulwark.dev/proxy-mode: transparent` on the pod, an init container (`bulwark-redirect`,
//! root with NET_ADMIN and NET_RAW, run before the sidecar and then gone) installs the nat rules
//! that send the pod's outbound traffic on ports 80 and 443 to the sidecar's `--transparent`
//! port, and the sidecar, as its own uid, is not captured again. Explicit mode is the default.
//! The same annotations on the pod's Namespace are defaults for its pods, which a pod's own
//! annotation overrides (`bulwark.dev/proxy-mode: explicit` on a pod in a transparent namespace).
//!
//! A pod that already has a `bulwark-sidecar` container is left alone, so a hand-written sidecar
//! and a second admission pass change nothing. The patch only adds: fields of the pod this
//! operator does not know survive.

use std::{collections::BTreeSet, sync::Arc};

use base64::Engine as _;
use bulwark_api::control::SIDECAR_LABEL;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    State,
    distribute::{Body, reply},
    index::workload_of,
    metrics::ResultLabels,
    write::configmap_name,
};

/// The webhook's path.
pub const PATH: &str = "/inject";
/// How long a review waits for the watches' first lists (API servers give webhooks 10 s at most).
const SYNC_GRACE: std::time::Duration = std::time::Duration::from_secs(3);
/// How long a review waits for its namespace's defaults.
const NAMESPACE_READ: std::time::Duration = std::time::Duration::from_secs(2);

/// The name of the injected container.
pub const CONTAINER: &str = "bulwark-sidecar";
/// `"false"` keeps the base-URL variables out of the app containers.
pub const BASE_URL_ANNOTATION: &str = "bulwark.dev/base-url-env";
/// Where provider keys are mounted, as `CompileOptions::secrets_dir` expects.
pub const SECRETS_DIR: &str = "/var/run/secrets/bulwark";
/// Where the projected token is mounted (apart from the keys, so no Secret name can clash).
const TOKEN_DIR: &str = "/var/run/bulwark";
const COPY_DIR: &str = "/etc/bulwark/copy";
const PROXY_PORT: u16 = 15080;
const ADMIN_PORT: u16 = 15090;
/// The sidecar's listener for captured connections.
const TRANSPARENT_PORT: u16 = 15081;
/// The uid the sidecar runs as, which the capture rules skip.
const PROXY_UID: u32 = 65532;
/// `transparent` captures the pod's outbound traffic; `explicit` (the default) does not.
pub const PROXY_MODE_ANNOTATION: &str = "bulwark.dev/proxy-mode";
/// The init container that installs the capture rules.
pub const REDIRECT_CONTAINER: &str = "bulwark-redirect";
/// `"true"` on a transparent pod: TLS to routed hosts is terminated by the sidecar.
pub const INTERCEPT_ANNOTATION: &str = "bulwark.dev/intercept-tls";
/// Where the sidecar finds the namespace's interception CA, and the apps the trust bundle.
const INTERCEPT_DIR: &str = "/etc/bulwark/intercept";
const TRUST_DIR: &str = "/etc/bulwark/trust";

/// What every injected sidecar gets.
#[derive(Clone, Debug)]
pub struct Injection {
    pub image: String,
    /// The config stream as sidecars reach it, e.g. `https://bulwark-operator.bulwark-system.svc:15010`.
    pub stream_url: String,
    /// PEM of the stream's CA.
    pub ca: Option<String>,
    /// Audience of the projected token.
    pub audience: String,
    /// Pods may ask for TLS interception (`--tls-interception`): the operator keeps a CA per
    /// namespace.
    pub tls_interception: bool,
    /// The key sidecars check model signatures with (`BULWARK_MODEL_PUBLIC_KEY`).
    pub model_public_key: Option<String>,
}

/// Whether the pod runs in transparent mode, and intercepts TLS.
fn modes(meta: &Value, inj: &Injection) -> (bool, bool) {
    let transparent = meta["annotations"][PROXY_MODE_ANNOTATION].as_str() == Some("transparent");
    let intercept =
        transparent && inj.tls_interception && meta["annotations"][INTERCEPT_ANNOTATION].as_str() == Some("true");
    (transparent, intercept)
}

/// The annotations a Namespace gives its pods as defaults.
const NAMESPACE_DEFAULTS: [&str; 2] = [PROXY_MODE_ANNOTATION, INTERCEPT_ANNOTATION];

/// The namespace of the pod a review would inject, if it would inject one.
pub fn injects(review: &Value) -> Option<&str> {
    let request = &review["request"];
    let pod = &request["object"];
    let wants = request["kind"]["kind"] == "Pod"
        && request["operation"] == "CREATE"
        && pod["metadata"]["labels"][SIDECAR_LABEL].as_str() == Some("true");
    // The namespace is in the request; the pod of a ReplicaSet has none of its own yet.
    wants.then(|| pod["metadata"]["namespace"].as_str().or(request["namespace"].as_str()))?
}

/// Gives the pod under review its namespace's mode annotations where it sets none itself.
pub fn inherit(review: &mut Value, namespace_annotations: &std::collections::BTreeMap<String, String>) {
    let meta = &mut review["request"]["object"]["metadata"];
    if !meta.is_object() || !(meta["annotations"].is_object() || meta["annotations"].is_null()) {
        return;
    }
    for key in NAMESPACE_DEFAULTS {
        if let Some(v) = namespace_annotations.get(key)
            && meta["annotations"].get(key).is_none()
        {
            meta["annotations"][key] = json!(v);
        }
    }
}

/// The namespace of a pod under review that needs the interception CA.
pub fn needs_ca(review: &Value, inj: &Injection) -> Option<String> {
    let ns = injects(review)?;
    modes(&review["request"]["object"]["metadata"], inj).1.then(|| ns.to_owned())
}

/// JSON-patch operations that add `items` to the array at `path` in `spec`, or create it.
fn add_all(ops: &mut Vec<Value>, existing: Option<&Vec<Value>>, path: String, items: Vec<Value>) {
    if items.is_empty() {
        return;
    }
    match existing {
        Some(_) => ops.extend(items.into_iter().map(|v| json!({"op": "add", "path": format!("{path}/-"), "value": v}))),
        None => ops.push(json!({"op": "add", "path": path, "value": items})),
    }
}

/// Adds to every app container the variables it does not set itself.
fn add_env(ops: &mut Vec<Value>, spec: &Value, vars: &[(&str, String)]) {
    for (i, c) in spec["containers"].as_array().into_iter().flatten().enumerate() {
        let env = c["env"].as_array();
        let missing: Vec<Value> = vars
            .iter()
            .filter(|(name, _)| !env.into_iter().flatten().any(|e| e["name"].as_str() == Some(*name)))
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect();
        add_all(ops, env, format!("/spec/containers/{i}/env"), missing);
    }
}

/// The JSON patch that injects the sidecar into `pod`, given the Secrets (name, key) that the
/// routes selecting it reference; empty when there is nothing to do.
pub fn patch(pod: &Value, inj: &Injection, secrets: &BTreeSet<(String, String)>) -> Vec<Value> {
    let meta = &pod["metadata"];
    if meta["labels"][SIDECAR_LABEL].as_str() != Some("true") {
        return vec![];
    }
    let spec = &pod["spec"];
    let has_sidecar = ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec[*k].as_array())
        .flatten()
        .any(|c| c["name"].as_str() == Some(CONTAINER));
    if has_sidecar {
        return vec![];
    }
    let workload = serde_json::from_value(meta.clone()).map(|m| workload_of(&m)).unwrap_or_default();
    let mut ops = vec![];

    // The native sidecar goes first, so later init containers can already use it; in
    // transparent mode after the rules that capture the traffic it is then there to take.
    let (transparent, intercept) = modes(meta, inj);
    let mut first = vec![sidecar(inj, !secrets.is_empty(), transparent, intercept)];
    if transparent {
        first.insert(0, redirect(inj));
    }
    match spec["initContainers"].as_array() {
        Some(_) => ops.extend(
            first
                .into_iter()
                .enumerate()
                .map(|(i, c)| json!({"op": "add", "path": format!("/spec/initContainers/{i}"), "value": c})),
        ),
        None => ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": first})),
    }

    let token = json!({"serviceAccountToken": {"audience": inj.audience, "expirationSeconds": 3600, "path": "token"}});
    let mut volumes = vec![
        json!({"name": "bulwark-token", "projected": {"sources": [token]}}),
        json!({"name": "bulwark-copy", "configMap": {"name": configmap_name(&workload), "optional": true}}),
    ];
    if !secrets.is_empty() {
        let sources: Vec<Value> = group_keys(secrets)
            .into_iter()
            .map(|(name, keys)| {
                let items: Vec<Value> = keys.iter().map(|k| json!({"key": k, "path": format!("{name}/{k}")})).collect();
                // Optional: a missing Secret shows in the route's status, and must not keep the pod from starting.
                json!({"secret": {"name": name, "items": items, "optional": true}})
            })
            .collect();
        volumes.push(json!({"name": "bulwark-keys", "projected": {"sources": sources}}));
    }
    if intercept {
        let items = [json!({"key": "tls.crt", "path": "tls.crt"}), json!({"key": "tls.key", "path": "tls.key"})];
        volumes.push(
            json!({"name": "bulwark-intercept", "secret": {"secretName": crate::trust::CA_SECRET, "items": items}}),
        );
        volumes.push(json!({"name": "bulwark-trust", "configMap": {"name": crate::trust::BUNDLE_CONFIGMAP}}));
    }
    add_all(&mut ops, spec["volumes"].as_array(), "/spec/volumes".into(), volumes);
    // What the app containers get in their environment, unless they set it themselves.
    let mut vars: Vec<(&str, String)> = vec![];
    if intercept {
        // Most of these replace the system bundle rather than add to it: the bundle holds the
        // public roots too. Node adds NODE_EXTRA_CA_CERTS to its own roots.
        let bundle = format!("{TRUST_DIR}/ca-bundle.crt");
        vars.extend([
            ("SSL_CERT_FILE", bundle.clone()),
            ("REQUESTS_CA_BUNDLE", bundle.clone()),
            ("CURL_CA_BUNDLE", bundle),
            ("NODE_EXTRA_CA_CERTS", format!("{TRUST_DIR}/ca.crt")),
        ]);
        for (i, c) in spec["containers"].as_array().into_iter().flatten().enumerate() {
            let mount = json!({"name": "bulwark-trust", "mountPath": TRUST_DIR, "readOnly": true});
            add_all(&mut ops, c["volumeMounts"].as_array(), format!("/spec/containers/{i}/volumeMounts"), vec![mount]);
        }
    }

    if meta["annotations"][BASE_URL_ANNOTATION].as_str() != Some("false") {
        let base_urls = [
            ("OPENAI_BASE_URL", format!("http://127.0.0.1:{PROXY_PORT}/v1")),
            ("ANTHROPIC_BASE_URL", format!("http://127.0.0.1:{PROXY_PORT}")),
        ];
        vars.extend(base_urls);
    }
    add_env(&mut ops, spec, &vars);
    ops
}

/// Secret keys by Secret name.
fn group_keys(secrets: &BTreeSet<(String, String)>) -> Vec<(&str, Vec<&str>)> {
    let mut out: Vec<(&str, Vec<&str>)> = vec![];
    for (name, key) in secrets {
        match out.last_mut() {
            Some((n, keys)) if *n == name.as_str() => keys.push(key),
            _ => out.push((name, vec![key])),
        }
    }
    out
}

/// The init container that installs the capture rules and exits: root for the nat table, with
/// only the two capabilities that needs.
fn redirect(inj: &Injection) -> Value {
    json!({
        "name": REDIRECT_CONTAINER,
        "image": inj.image,
        "args": [
            "redirect",
            format!("--proxy-uid={PROXY_UID}"),
            format!("--redirect-port={TRANSPARENT_PORT}"),
            format!("--exclude-ports={PROXY_PORT},{ADMIN_PORT}"),
        ],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    })
}

/// The sidecar container: non-root, read-only, no capabilities; ready once it has a config.
fn sidecar(inj: &Injection, keys: bool, transparent: bool, intercept: bool) -> Value {
    let ca = inj.ca.iter().map(|ca| json!({"name": "BULWARK_OPERATOR_CA_PEM", "value": ca}));
    let key = inj.model_public_key.iter().map(|k| json!({"name": "BULWARK_MODEL_PUBLIC_KEY", "value": k}));
    let env: Vec<Value> = ca.chain(key).collect();
    let mut mounts = vec![
        json!({"name": "bulwark-token", "mountPath": TOKEN_DIR, "readOnly": true}),
        json!({"name": "bulwark-copy", "mountPath": COPY_DIR, "readOnly": true}),
    ];
    if keys {
        mounts.push(json!({"name": "bulwark-keys", "mountPath": SECRETS_DIR, "readOnly": true}));
    }
    let mut args = vec![
        format!("--operator={}", inj.stream_url),
        format!("--token-file={TOKEN_DIR}/token"),
        format!("--config={COPY_DIR}/config.yaml"),
        format!("--listen=127.0.0.1:{PROXY_PORT}"),
        format!("--admin=0.0.0.0:{ADMIN_PORT}"),
        "--log-format=json".to_owned(),
    ];
    if transparent {
        args.push(format!("--transparent={TRANSPARENT_PORT}"));
    }
    if intercept {
        args.push(format!("--intercept-ca={INTERCEPT_DIR}"));
        mounts.push(json!({"name": "bulwark-intercept", "mountPath": INTERCEPT_DIR, "readOnly": true}));
    }
    json!({
        "name": CONTAINER,
        "image": inj.image,
        "restartPolicy": "Always",
        "args": args,
        "env": env,
        "ports": [{"name": "bulwark-admin", "containerPort": ADMIN_PORT}],
        "startupProbe": {"httpGet": {"path": "/live", "port": ADMIN_PORT}, "periodSeconds": 1, "failureThreshold": 30},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": ADMIN_PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/live", "port": ADMIN_PORT}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": PROXY_UID,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    })
}

/// An answer to an `AdmissionReview`, and the pod it injected (`namespace/name`), if any.
pub struct Answer {
    pub review: Value,
    pub injected: Option<String>,
}

/// Answers an `AdmissionReview` request: always allowed (injection never blocks a pod), with
/// the patch when there is one. `secrets` gives the Secret keys for a pod's namespace and labels.
pub fn review(
    review: &Value,
    inj: &Injection,
    secrets: impl Fn(&str, &std::collections::BTreeMap<String, String>) -> BTreeSet<(String, String)>,
) -> Result<Answer, String> {
    if review["kind"] != "AdmissionReview" {
        return Err("not an AdmissionReview: kind must be AdmissionReview".into());
    }
    let request = &review["request"];
    let uid = request["uid"].as_str().ok_or("not an AdmissionReview: request.uid is missing")?;
    let mut response = json!({"uid": uid, "allowed": true});
    let mut injected = None;
    let pod = &request["object"];
    if request["kind"]["kind"] == "Pod" && request["operation"] == "CREATE" && pod.is_object() {
        let ns = pod["metadata"]["namespace"].as_str().or(request["namespace"].as_str()).unwrap_or_default();
        let labels = serde_json::from_value(pod["metadata"]["labels"].clone()).unwrap_or_default();
        let ops = patch(pod, inj, &secrets(ns, &labels));
        if !ops.is_empty() {
            let encoded = base64::engine::general_purpose::STANDARD.encode(Value::Array(ops).to_string());
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(encoded);
            let meta = &pod["metadata"];
            let name = meta["name"].as_str().or(meta["generateName"].as_str()).unwrap_or_default();
            injected = Some(format!("{ns}/{name}"));
        }
    }
    let api_version = review["apiVersion"].as_str().unwrap_or("admission.k8s.io/v1");
    let review = json!({"apiVersion": api_version, "kind": "AdmissionReview", "response": response});
    Ok(Answer { review, injected })
}

/// Serves the webhook until `shutdown`. `client` reads the namespaces' defaults, and with
/// `injection.tls_interception` keeps their interception CAs.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<State>,
    injection: Arc<Injection>,
    client: kube::Client,
    shutdown: watch::Receiver<bool>,
) {
    let roots = Arc::new(if injection.tls_interception { crate::trust::public_roots() } else { String::new() });
    crate::server::serve(listener, tls, shutdown, move |req| {
        let (state, injection, client, roots) = (state.clone(), injection.clone(), client.clone(), roots.clone());
        async move { handle(&state, &injection, &client, &roots, req).await }
    })
    .await;
}

/// The annotations of namespace `ns`; none when it cannot be read in time (the pod is then
/// injected on its own annotations, and the reason logged).
async fn namespace_annotations(client: &kube::Client, ns: &str) -> std::collections::BTreeMap<String, String> {
    let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    match tokio::time::timeout(NAMESPACE_READ, api.get_metadata(ns)).await {
        Ok(Ok(n)) => n.metadata.annotations.unwrap_or_default(),
        Ok(Err(e)) => {
            tracing::warn!(namespace = %ns, "reading the namespace's defaults: {e}; the pod's own annotations apply");
            Default::default()
        }
        Err(_) => {
            tracing::warn!(namespace = %ns, "reading the namespace's defaults timed out; the pod's own annotations apply");
            Default::default()
        }
    }
}

async fn handle(
    state: &State,
    injection: &Injection,
    client: &kube::Client,
    roots: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.method() != Method::POST || req.uri().path() != PATH {
        return reply(StatusCode::NOT_FOUND, "path: POST /inject (an AdmissionReview)");
    }
    let body = match crate::server::read_body(req.into_body(), 8 << 20, "the AdmissionReview").await {
        Ok(b) => b,
        Err((status, why)) => return reply(status, &why),
    };
    let mut body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            state.metrics.admissions.get_or_create(&ResultLabels { result: "invalid" }).inc();
            return reply(StatusCode::BAD_REQUEST, &format!("not an AdmissionReview: {e}"));
        }
    };
    // A replica that has just started is unready (and out of the Service) until every watch has
    // listed; a call that reaches it anyway waits a moment, so the keys its routes name are known.
    if crate::poll_for(SYNC_GRACE, || state.is_synced().then_some(())).await.is_none() {
        tracing::warn!("answering an admission review before every watch has listed: Secret keys may be missing");
    }
    if let Some(ns) = injects(&body).map(str::to_owned) {
        let defaults = namespace_annotations(client, &ns).await;
        inherit(&mut body, &defaults);
    }
    // An intercepting pod needs its namespace's CA and trust bundle before it starts; without
    // them it is injected transparent only, and its TLS passes through.
    let mut injection = std::borrow::Cow::Borrowed(injection);
    if let Some(ns) = needs_ca(&body, &injection)
        && let Err(e) = crate::trust::ensure(client, &ns, roots).await
    {
        tracing::warn!(namespace = %ns, "no interception CA, the pod's TLS passes through: {e:#}");
        injection.to_mut().tls_interception = false;
    }
    let answer = review(&body, &injection, |ns, labels| state.index.lock().secret_refs(ns, labels));
    let result = match &answer {
        Ok(a) if a.injected.is_some() => "injected",
        Ok(_) => "unchanged",
        Err(_) => "invalid",
    };
    state.metrics.admissions.get_or_create(&ResultLabels { result }).inc();
    match answer {
        Ok(a) => {
            if let Some(pod) = &a.injected {
                tracing::info!(pod = %pod, "sidecar injected");
            }
            let mut resp = Response::new(Full::new(Bytes::from(a.review.to_string())).boxed());
            resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            resp
        }
        Err(e) => {
            tracing::info!("refused an admission request: {e}");
            reply(StatusCode::BAD_REQUEST, &e)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn injection() -> Injection {
        Injection {
            image: "bulwark-sidecar:1".into(),
            stream_url: "https://bulwark-operator.bulwark-system.svc:15010".into(),
            ca: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
            audience: "bulwark".into(),
            tls_interception: true,
            model_public_key: None,
        }
    }

    /// A pod as a ReplicaSet of Deployment `chat` submits it: no name yet, and a field this
    /// operator's types do not know.
    fn deployment_pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "generateName": "chat-7d9c8f-", "namespace": "shop",
                "labels": {"app": "chat", "bulwark.dev/inject": "true", "pod-template-hash": "7d9c8f"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "chat-7d9c8f", "uid": "u1", "controller": true}],
            },
            "spec": {
                "initContainers": [{"name": "migrate", "image": "example/migrate"}],
                "containers": [
                    {"name": "app", "image": "example/app", "env": [{"name": "OPENAI_BASE_URL", "value": "http://mine/v1"}]},
                    {"name": "worker", "image": "example/worker"},
                ],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "someFutureField": {"kept": true},
            },
        })
    }

    fn apply(pod: &Value, ops: Vec<Value>) -> Value {
        let mut out = pod.clone();
        let p: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
        json_patch::patch(&mut out, &p).unwrap();
        out
    }

    fn secrets(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        list.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    #[test]
    fn a_labelled_pod_gets_a_native_sidecar_with_its_copy_token_and_keys() {
        let pod = deployment_pod();
        let keys = secrets(&[("openai", "api-key"), ("openai", "org"), ("anthropic", "key")]);
        let out = apply(&pod, patch(&pod, &injection(), &keys));
        // Still a valid pod, with nothing of the original lost.
        let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(out.clone()).unwrap();
        assert_eq!(out["spec"]["someFutureField"]["kept"], true);

        let spec = typed.spec.unwrap();
        let init = spec.init_containers.unwrap();
        assert_eq!(init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), [CONTAINER, "migrate"]);
        let sidecar = &init[0];
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"), "a native sidecar");
        let args = sidecar.args.clone().unwrap();
        assert!(args.contains(&"--operator=https://bulwark-operator.bulwark-system.svc:15010".to_owned()), "{args:?}");
        assert!(args.contains(&"--config=/etc/bulwark/copy/config.yaml".to_owned()), "{args:?}");
        let env = sidecar.env.clone().unwrap();
        let ca = env.iter().find(|e| e.name == "BULWARK_OPERATOR_CA_PEM").unwrap();
        assert!(ca.value.as_deref().unwrap().contains("BEGIN CERTIFICATE"));
        assert!(!env.iter().any(|e| e.name == "BULWARK_MODEL_PUBLIC_KEY"), "no key, no model signatures asked for");
        let pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA+c4Nvy+oHXjLZihwBKPQt2Ey04wIun92XRksiNSXZ/E=\n-----END PUBLIC KEY-----\n";
        let signed = Injection { model_public_key: Some(pem.into()), ..injection() };
        let out = apply(&pod, patch(&pod, &signed, &keys));
        let env = out["spec"]["initContainers"][0]["env"].as_array().unwrap().clone();
        assert!(env.iter().any(|e| e["name"] == "BULWARK_MODEL_PUBLIC_KEY" && e["value"] == pem), "{env:?}");
        let security = sidecar.security_context.clone().unwrap();
        assert_eq!((security.run_as_non_root, security.read_only_root_filesystem), (Some(true), Some(true)));

        let volumes = spec.volumes.unwrap();
        let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["data", "bulwark-token", "bulwark-copy", "bulwark-keys"]);
        let copy = volumes[2].config_map.clone().unwrap();
        assert_eq!((copy.name.as_str(), copy.optional), ("bulwark-chat", Some(true)), "the Deployment's copy");
        let token = volumes[1].projected.clone().unwrap().sources.unwrap();
        assert_eq!(token[0].service_account_token.clone().unwrap().audience.as_deref(), Some("bulwark"));
        let keys = volumes[3].projected.clone().unwrap().sources.unwrap();
        let mounted: Vec<String> =
            keys.iter().flat_map(|s| s.secret.clone().unwrap().items.unwrap()).map(|i| i.path).collect();
        assert_eq!(mounted, ["anthropic/key", "openai/api-key", "openai/org"]);
        // Each volume is mounted where its flag or the compiled config looks.
        let mounts: Vec<(String, String)> =
            sidecar.volume_mounts.clone().unwrap().into_iter().map(|m| (m.name, m.mount_path)).collect();
        assert!(mounts.contains(&("bulwark-keys".into(), SECRETS_DIR.into())), "{mounts:?}");
        assert!(args.contains(&format!("--token-file={TOKEN_DIR}/token")), "{args:?}");

        // The app's own base URL is kept; the other container gets both.
        let env_of = |i: usize| -> Vec<(String, String)> {
            spec.containers[i].env.clone().unwrap().into_iter().map(|e| (e.name, e.value.unwrap_or_default())).collect()
        };
        assert_eq!(
            env_of(0),
            [
                ("OPENAI_BASE_URL".to_owned(), "http://mine/v1".to_owned()),
                ("ANTHROPIC_BASE_URL".to_owned(), "http://127.0.0.1:15080".to_owned())
            ]
        );
        assert_eq!(
            env_of(1),
            [
                ("OPENAI_BASE_URL".to_owned(), "http://127.0.0.1:15080/v1".to_owned()),
                ("ANTHROPIC_BASE_URL".to_owned(), "http://127.0.0.1:15080".to_owned())
            ]
        );
    }

    #[test]
    fn a_transparent_pod_gets_the_capture_rules_before_its_sidecar() {
        let mut pod = deployment_pod();
        pod["metadata"]["annotations"] = json!({PROXY_MODE_ANNOTATION: "transparent"});
        let out = apply(&pod, patch(&pod, &injection(), &BTreeSet::new()));
        let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(out).unwrap();
        let init = typed.spec.unwrap().init_containers.unwrap();
        let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [REDIRECT_CONTAINER, CONTAINER, "migrate"], "the rules first, then the sidecar");
        let redirect = &init[0];
        assert_eq!(redirect.restart_policy, None, "runs once and exits");
        assert_eq!(
            redirect.args.clone().unwrap(),
            ["redirect", "--proxy-uid=65532", "--redirect-port=15081", "--exclude-ports=15080,15090"]
        );
        let security = redirect.security_context.clone().unwrap();
        assert_eq!((security.run_as_user, security.run_as_non_root), (Some(0), Some(false)));
        let caps = security.capabilities.unwrap();
        assert_eq!(caps.add.unwrap(), ["NET_ADMIN", "NET_RAW"]);
        assert_eq!(caps.drop.unwrap(), ["ALL"]);
        let sidecar = &init[1];
        assert!(sidecar.args.clone().unwrap().contains(&"--transparent=15081".to_owned()));
        let sc = sidecar.security_context.clone().unwrap();
        assert_eq!((sc.run_as_user, sc.capabilities.unwrap().add), (Some(65532), None), "the uid the rules skip");

        // Explicit (the default, or said so): no rules, no capture listener.
        for mode in [None, Some("explicit")] {
            let mut pod = deployment_pod();
            if let Some(m) = mode {
                pod["metadata"]["annotations"] = json!({PROXY_MODE_ANNOTATION: m});
            }
            let out = apply(&pod, patch(&pod, &injection(), &BTreeSet::new()));
            let init = out["spec"]["initContainers"].as_array().unwrap().clone();
            assert_eq!(init.len(), 2, "{mode:?}");
            assert!(
                !init[0]["args"].as_array().unwrap().iter().any(|a| a.as_str().unwrap().starts_with("--transparent"))
            );
        }
    }

    #[test]
    fn a_namespace_default_applies_unless_the_pod_says_otherwise() {
        let review_of = |annotations: Value| {
            let mut pod = deployment_pod();
            pod["metadata"]["annotations"] = annotations;
            json!({"kind": "AdmissionReview", "request": {"uid": "u", "kind": {"kind": "Pod"},
                "operation": "CREATE", "namespace": "shop", "object": pod}})
        };
        let defaults: std::collections::BTreeMap<String, String> = [
            (PROXY_MODE_ANNOTATION.to_owned(), "transparent".to_owned()),
            (INTERCEPT_ANNOTATION.to_owned(), "true".to_owned()),
            ("other.example/x".to_owned(), "y".to_owned()),
        ]
        .into();
        let inj = Injection { tls_interception: true, ..injection() };
        let mut plain = review_of(Value::Null);
        assert_eq!(injects(&plain), Some("shop"));
        inherit(&mut plain, &defaults);
        let meta = &plain["request"]["object"]["metadata"];
        assert_eq!(modes(meta, &inj), (true, true));
        assert!(meta["annotations"].get("other.example/x").is_none(), "only the mode annotations are inherited");
        assert_eq!(needs_ca(&plain, &inj).as_deref(), Some("shop"));

        // The pod's own annotation wins, each on its own.
        let mut explicit = review_of(json!({PROXY_MODE_ANNOTATION: "explicit"}));
        inherit(&mut explicit, &defaults);
        assert_eq!(modes(&explicit["request"]["object"]["metadata"], &inj), (false, false));
        assert!(needs_ca(&explicit, &inj).is_none());
        let mut no_tls = review_of(json!({INTERCEPT_ANNOTATION: "false"}));
        inherit(&mut no_tls, &defaults);
        assert_eq!(modes(&no_tls["request"]["object"]["metadata"], &inj), (true, false));

        // Unlabelled pods and updates are not the webhook's to inject.
        let mut update = review_of(Value::Null);
        update["request"]["operation"] = json!("UPDATE");
        assert!(injects(&update).is_none());
        let mut unlabelled = review_of(Value::Null);
        unlabelled["request"]["object"]["metadata"]["labels"] = json!({"app": "chat"});
        assert!(injects(&unlabelled).is_none());
    }

    #[test]
    fn an_intercepting_pod_gets_the_ca_and_its_apps_the_bundle() {
        let mut pod = deployment_pod();
        pod["metadata"]["annotations"] = json!({PROXY_MODE_ANNOTATION: "transparent", INTERCEPT_ANNOTATION: "true"});
        let out = apply(&pod, patch(&pod, &injection(), &BTreeSet::new()));
        let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(out).unwrap();
        let spec = typed.spec.unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[1];
        assert!(sidecar.args.clone().unwrap().contains(&"--intercept-ca=/etc/bulwark/intercept".to_owned()));
        let mounts: Vec<String> = sidecar.volume_mounts.clone().unwrap().into_iter().map(|m| m.name).collect();
        assert!(mounts.contains(&"bulwark-intercept".to_owned()), "{mounts:?}");
        let volumes = spec.volumes.unwrap();
        let ca = volumes.iter().find(|v| v.name == "bulwark-intercept").unwrap().secret.clone().unwrap();
        assert_eq!(ca.secret_name.as_deref(), Some("bulwark-intercept-ca"));
        let trust = volumes.iter().find(|v| v.name == "bulwark-trust").unwrap().config_map.clone().unwrap();
        assert_eq!(trust.name, "bulwark-trust-bundle");
        for c in &spec.containers {
            let env: Vec<(String, String)> =
                c.env.clone().unwrap().into_iter().map(|e| (e.name, e.value.unwrap_or_default())).collect();
            for var in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"] {
                assert!(
                    env.contains(&(var.to_owned(), "/etc/bulwark/trust/ca-bundle.crt".to_owned())),
                    "{var}: {env:?}"
                );
            }
            assert!(env.contains(&("NODE_EXTRA_CA_CERTS".to_owned(), "/etc/bulwark/trust/ca.crt".to_owned())));
            let mounts = c.volume_mounts.clone().unwrap_or_default();
            assert!(
                mounts.iter().any(|m| m.name == "bulwark-trust" && m.mount_path == "/etc/bulwark/trust"),
                "{}",
                c.name
            );
        }

        // Without transparent mode, or with interception off in the operator, nothing of it.
        let mut explicit = pod.clone();
        explicit["metadata"]["annotations"] = json!({INTERCEPT_ANNOTATION: "true"});
        let off = Injection { tls_interception: false, ..injection() };
        for (p, inj) in [(&explicit, injection()), (&pod, off)] {
            let out = apply(p, patch(p, &inj, &BTreeSet::new()));
            assert!(!out.to_string().contains("bulwark-intercept"), "{out}");
            assert!(!out.to_string().contains("SSL_CERT_FILE"));
        }
    }

    #[test]
    fn a_bare_pod_gets_the_lists_it_lacks() {
        let pod = json!({
            "metadata": {"name": "solo", "labels": {"bulwark.dev/inject": "true"}, "annotations": {BASE_URL_ANNOTATION: "false"}},
            "spec": {"containers": [{"name": "app", "image": "example/app"}]},
        });
        let out = apply(&pod, patch(&pod, &injection(), &BTreeSet::new()));
        let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(out).unwrap();
        let spec = typed.spec.unwrap();
        assert_eq!(spec.init_containers.unwrap()[0].name, CONTAINER);
        let volumes = spec.volumes.unwrap();
        assert_eq!(volumes.len(), 2, "no keys volume without keys");
        assert_eq!(volumes[1].config_map.clone().unwrap().name, "bulwark-solo");
        assert_eq!(spec.containers[0].env, None, "the annotation keeps the app's environment as it is");
    }

    #[test]
    fn nothing_changes_without_the_label_or_with_a_sidecar_already() {
        let mut pod = deployment_pod();
        assert!(!patch(&pod, &injection(), &BTreeSet::new()).is_empty());
        let injected = apply(&pod, patch(&pod, &injection(), &BTreeSet::new()));
        assert!(patch(&injected, &injection(), &BTreeSet::new()).is_empty(), "a second pass adds nothing");
        pod["metadata"]["labels"]["bulwark.dev/inject"] = json!("false");
        assert!(patch(&pod, &injection(), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn reviews_are_answered_with_a_base64_json_patch() {
        let request = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "r-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
                "namespace": "shop", "object": deployment_pod()},
        });
        let asked: std::cell::RefCell<Vec<String>> = Default::default();
        let answer = review(&request, &injection(), |ns, labels| {
            asked.borrow_mut().push(format!("{ns} {}", labels.get("app").cloned().unwrap_or_default()));
            secrets(&[("openai", "api-key")])
        })
        .unwrap();
        assert_eq!(asked.into_inner(), ["shop chat"], "the Secrets of the routes that select the pod");
        assert_eq!(answer.injected.as_deref(), Some("shop/chat-7d9c8f-"));
        let r = &answer.review["response"];
        assert_eq!(
            (r["uid"].as_str(), r["allowed"].as_bool(), r["patchType"].as_str()),
            (Some("r-1"), Some(true), Some("JSONPatch"))
        );
        let ops: Vec<Value> = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD.decode(r["patch"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
        let out = apply(&deployment_pod(), ops);
        assert_eq!(out["spec"]["volumes"][3]["projected"]["sources"][0]["secret"]["name"], "openai");

        // An update, or another kind, is allowed as it is.
        let mut update = request.clone();
        update["request"]["operation"] = json!("UPDATE");
        let answer = review(&update, &injection(), |_, _| BTreeSet::new()).unwrap();
        assert!(answer.injected.is_none() && answer.review["response"]["patch"].is_null());
        // What is not a review is refused with the reason.
        let e = review(&json!({"kind": "Pod"}), &injection(), |_, _| BTreeSet::new()).err().unwrap();
        assert!(e.contains("AdmissionReview"), "{e}");
        let e = review(&json!({"kind": "AdmissionReview", "request": {}}), &injection(), |_, _| BTreeSet::new())
            .err()
            .unwrap();
        assert!(e.contains("uid"), "{e}");
    }
}
