//! A small HTTP client for the API server under test.

use std::path::PathBuf;
use std::time::Duration;

use bulwark_test_apiserver::{ApiServer, Options};
use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub const MERGE: &str = "application/merge-patch+json";
pub const JSON_PATCH: &str = "application/json-patch+json";
pub const STRATEGIC: &str = "application/strategic-merge-patch+json";
pub const APPLY: &str = "application/apply-patch+yaml";

/// The repository's CRD manifests.
pub fn crd_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../crds/yaml")
}

pub struct Response {
    pub code: u16,
    pub body: Value,
    pub headers: HeaderMap,
}

/// A server with the repository's CRDs, and a client for it.
pub struct Api {
    pub server: ApiServer,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// A client that speaks HTTP/2 without TLS (h2c, prior knowledge).
    pub async fn start_h2c() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(h2c: bool) -> Self {
        let options = Options { listen: "127.0.0.1:0".parse().unwrap(), crd_dirs: vec![crd_dir()] };
        let server = ApiServer::start(options).await.unwrap();
        let mut builder = Client::builder(TokioExecutor::new());
        builder.http2_only(h2c);
        Self { server, client: builder.build_http() }
    }

    async fn raw(&self, method: Method, path: &str, content_type: &str, body: Bytes) -> hyper::Response<Incoming> {
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.server.url()))
            .header("content-type", content_type)
            .header("user-agent", "api-test/1.0")
            .body(Full::new(body))
            .unwrap();
        self.client.request(request).await.unwrap()
    }

    pub async fn send(&self, method: Method, path: &str, content_type: &str, body: impl Into<Bytes>) -> Response {
        let response = self.raw(method, path, content_type, body.into()).await;
        let code = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        Response { code, body, headers }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.send(Method::GET, path, "application/json", Bytes::new()).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Response {
        self.send(Method::POST, path, "application/json", body.to_string()).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Response {
        self.send(Method::PUT, path, "application/json", body.to_string()).await
    }

    pub async fn patch(&self, path: &str, content_type: &str, body: Value) -> Response {
        self.send(Method::PATCH, path, content_type, body.to_string()).await
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.send(Method::DELETE, path, "application/json", Bytes::new()).await
    }

    /// Opens a watch; `path` includes the query.
    pub async fn watch(&self, path: &str) -> Watch {
        let response = self.raw(Method::GET, path, "application/json", Bytes::new()).await;
        assert_eq!(response.status(), 200, "watch {path}");
        Watch { body: response.into_body(), pending: Vec::new() }
    }
}

/// The events of a watch, one JSON line at a time.
pub struct Watch {
    body: Incoming,
    pending: Vec<u8>,
}

impl Watch {
    /// The next event, or `None` when the stream ends or nothing comes within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).unwrap());
            }
            let frame = tokio::time::timeout(wait, self.body.frame()).await.ok()??.unwrap();
            if let Ok(data) = frame.into_data() {
                self.pending.extend_from_slice(&data);
            }
        }
    }

    /// The next event; fails the test when none comes within five seconds.
    pub async fn next(&mut self) -> Value {
        self.next_within(Duration::from_secs(5)).await.expect("a watch event")
    }

    /// The next event's type and object name.
    pub async fn next_named(&mut self) -> (String, String) {
        let event = self.next().await;
        let kind = event["type"].as_str().unwrap().to_string();
        let name = event["object"]["metadata"]["name"].as_str().unwrap_or("").to_string();
        (kind, name)
    }
}
