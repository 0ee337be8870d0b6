//! Calls to providers: the pooled HTTP/1.1 + HTTP/2 client with rustls (system roots plus an
//! optional extra CA), and how each provider kind wants its URL, headers, key and model.

use std::path::Path;

use anyhow::Context as _;
use bulwark_api::route::Provider;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, header};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::time::Instant;

use crate::{request::LlmRequest, retry::Failure, runtime::BackendRuntime};

pub type Client = HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

const ANTHROPIC_VERSION: &str = "2023-06-01";
const AZURE_API_VERSION: &str = "2024-10-21";

pub fn client(extra_ca: Option<&Path>) -> anyhow::Result<Client> {
    Ok(HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(connector(extra_ca.map(|p| Ca::File(p.to_owned())).as_ref(), false)?))
}

/// CA certificates to trust besides the system roots.
#[derive(Clone, Debug)]
pub enum Ca {
    /// A PEM file.
    File(std::path::PathBuf),
    /// PEM text, e.g. from the environment.
    Pem(String),
}

/// A rustls connector trusting the system roots plus `extra_ca`; `h2_only` speaks HTTP/2 alone
/// (ALPN on TLS, prior knowledge on plain TCP).
pub fn connector(extra_ca: Option<&Ca>, h2_only: bool) -> anyhow::Result<HttpsConnector<HttpConnector>> {
    connector_as(extra_ca, None, h2_only)
}

/// A client certificate chain and its key, PEM files.
pub struct Identity<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// `connector`, presenting `identity` to servers that ask for a client certificate.
pub fn connector_as(
    extra_ca: Option<&Ca>,
    identity: Option<Identity<'_>>,
    h2_only: bool,
) -> anyhow::Result<HttpsConnector<HttpConnector>> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(ca) = extra_ca {
        let (what, pem) = match ca {
            Ca::File(path) => (
                path.display().to_string(),
                std::fs::read(path).with_context(|| format!("reading extra CA {}", path.display()))?,
            ),
            Ca::Pem(text) => ("the CA given as PEM text".to_owned(), text.as_bytes().to_vec()),
        };
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.with_context(|| format!("parsing {what}"))?)?;
            n += 1;
        }
        anyhow::ensure!(n > 0, "{what} holds no PEM certificate");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let tls = match identity {
        None => tls.with_no_client_auth(),
        Some(id) => {
            let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let certs = rustls_pemfile::certs(&mut read(id.cert)?.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing {}", id.cert.display()))?;
            anyhow::ensure!(!certs.is_empty(), "{} holds no PEM certificate", id.cert.display());
            let key = rustls_pemfile::private_key(&mut read(id.key)?.as_slice())
                .with_context(|| format!("parsing {}", id.key.display()))?
                .with_context(|| format!("{} holds no PEM private key", id.key.display()))?;
            tls.with_client_auth_cert(certs, key).context("the client certificate and key do not go together")?
        }
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    Ok(if h2_only {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().enable_http2().wrap_connector(http)
    })
}

/// Client headers that never travel upstream.
fn dropped(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "accept-encoding"
    ) || name.as_str().starts_with("x-bulwark-")
}

fn is_credential(name: &HeaderName) -> bool {
    matches!(name.as_str(), "authorization" | "x-api-key" | "api-key")
}

/// The request for one attempt on `backend`, at `base` (its URL, or one of its replicas').
pub fn build(
    backend: &BackendRuntime,
    base: &str,
    req: &LlmRequest,
    now: Instant,
) -> Result<Request<Full<Bytes>>, Failure> {
    let cfg = &backend.cfg;
    let key = match &backend.credential {
        Some(c) => Some(c.get(now).map_err(Failure::Credentials)?),
        None => None,
    };
    let suffix = req.api.suffix();
    let uri = match cfg.provider {
        Provider::AzureOpenai => {
            let deployment = cfg.model.as_deref().unwrap_or(&req.model);
            let version = cfg.api_version.as_deref().unwrap_or(AZURE_API_VERSION);
            format!("{}/openai/deployments/{deployment}{suffix}?api-version={version}", cfg.url)
        }
        _ => format!("{base}{suffix}"),
    };
    let body = match &cfg.model {
        Some(m) if *m != req.model && cfg.provider != Provider::AzureOpenai => {
            let mut b = req.body.clone();
            b.insert("model".into(), serde_json::Value::String(m.clone()));
            Bytes::from(serde_json::to_vec(&b).unwrap_or_default())
        }
        _ => req.raw.clone(),
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len() + 3);
    let keyed = key.is_some();
    for (name, value) in &req.headers {
        let replaced = keyed && is_credential(name);
        if !replaced && !dropped(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(key) = key {
        match cfg.provider {
            Provider::Anthropic => {
                headers.insert("x-api-key", key);
            }
            Provider::AzureOpenai => {
                headers.insert("api-key", key);
            }
            Provider::Openai | Provider::OpenaiCompatible => {
                let mut v = HeaderValue::from_bytes(&[b"Bearer ", key.as_bytes()].concat())
                    .map_err(|_| Failure::Credentials("the key cannot be sent as a header".into()))?;
                v.set_sensitive(true);
                headers.insert(header::AUTHORIZATION, v);
            }
        }
    }
    if cfg.provider == Provider::Anthropic && !headers.contains_key("anthropic-version") {
        headers.insert("anthropic-version", HeaderValue::from_static(ANTHROPIC_VERSION));
    }
    if !body.is_empty() {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let mut out = Request::builder()
        .method(if body.is_empty() { http::Method::GET } else { http::Method::POST })
        .uri(&uri)
        .body(Full::new(body))
        .map_err(|e| Failure::Connect(format!("bad upstream URL {uri}: {e}")))?;
    *out.headers_mut() = headers;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bulwark_api::config::{BackendConfig, CredentialSource};
    use serde_json::json;

    use super::*;
    use crate::{circuit::Circuit, credentials::Credential, request::Api};

    fn key_file(value: &str) -> CredentialSource {
        let path = std::env::temp_dir().join(format!("bulwark-upstream-key-{}", std::process::id()));
        std::fs::write(&path, value).unwrap();
        CredentialSource::File { path: path.display().to_string() }
    }

    /// `build` at the backend's own URL.
    fn build_at(b: &BackendRuntime, req: &LlmRequest, now: Instant) -> Result<Request<Full<Bytes>>, Failure> {
        build(b, &b.cfg.url, req, now)
    }

    fn backend(provider: Provider, model: Option<&str>, key: Option<CredentialSource>) -> BackendRuntime {
        BackendRuntime {
            cfg: BackendConfig {
                name: "b".into(),
                provider,
                url: "https://api.example.com/v1".into(),
                model: model.map(Into::into),
                weight: 1,
                credential: None,
                api_version: None,
                replicas: None,
            },
            circuit: Arc::new(Circuit::new(0, std::time::Duration::from_secs(1))),
            credential: key.map(|k| Arc::new(Credential::new(k))),
            endpoints: vec![],
        }
    }

    fn request(api: Api) -> LlmRequest {
        let body = json!({"model": "asked", "messages": []});
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer client-key".parse().unwrap());
        headers.insert("x-request-id", "r1".parse().unwrap());
        headers.insert("x-bulwark-debug", "1".parse().unwrap());
        headers.insert("accept-encoding", "gzip".parse().unwrap());
        LlmRequest {
            api,
            headers,
            model: "asked".into(),
            stream: false,
            raw: Bytes::from(body.to_string()),
            body: body.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn each_provider_gets_its_url_key_header_and_model() {
        let key = || Some(key_file("sk-test\n"));
        let now = Instant::now();
        let r = build_at(&backend(Provider::Openai, Some("gpt-4o-mini"), key()), &request(Api::ChatCompletions), now)
            .unwrap();
        assert_eq!(r.uri(), "https://api.example.com/v1/chat/completions");
        assert_eq!(r.headers()["authorization"], "Bearer sk-test");
        assert_eq!(r.headers()["x-request-id"], "r1", "other headers pass through");
        assert!(!r.headers().contains_key("x-bulwark-debug") && !r.headers().contains_key("accept-encoding"));
        let body: serde_json::Value = serde_json::from_slice(
            &http_body_util::BodyExt::collect(r.into_body()).now_or_never().unwrap().unwrap().to_bytes(),
        )
        .unwrap();
        assert_eq!(body["model"], "gpt-4o-mini");

        let r = build_at(&backend(Provider::Anthropic, None, key()), &request(Api::Messages), now).unwrap();
        assert_eq!(r.uri(), "https://api.example.com/v1/messages");
        assert_eq!(
            (r.headers()["x-api-key"].to_str().unwrap(), r.headers()["anthropic-version"].to_str().unwrap()),
            ("sk-test", ANTHROPIC_VERSION)
        );
        assert!(!r.headers().contains_key("authorization"), "the client's key never reaches a keyed backend");

        let r =
            build_at(&backend(Provider::AzureOpenai, Some("prod-gpt4o"), key()), &request(Api::ChatCompletions), now)
                .unwrap();
        assert_eq!(
            r.uri(),
            "https://api.example.com/v1/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(r.headers()["api-key"], "sk-test");

        let r =
            build_at(&backend(Provider::OpenaiCompatible, None, None), &request(Api::ChatCompletions), now).unwrap();
        assert_eq!(r.headers()["authorization"], "Bearer client-key", "no backend key: the client's passes through");
    }

    #[test]
    fn a_missing_key_is_a_clear_failure_without_the_value() {
        let b =
            backend(Provider::Openai, None, Some(CredentialSource::Env { name: "BULWARK_UPSTREAM_TEST_UNSET".into() }));
        match build_at(&b, &request(Api::ChatCompletions), Instant::now()) {
            Err(Failure::Credentials(m)) => {
                assert_eq!(m, "environment variable BULWARK_UPSTREAM_TEST_UNSET is not set")
            }
            other => panic!("{other:?}"),
        }
    }

    use futures_util::FutureExt;
}
