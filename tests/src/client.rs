//! A small HTTP client for scenario tests and benchmarks: JSON in, status, headers and body
//! (or the streamed chunks and how the stream ended) out.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;

#[derive(Clone)]
pub struct Client {
    inner: HyperClient<HttpConnector, Full<Bytes>>,
    base: String,
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Debug)]
pub struct StreamReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub chunks: Vec<Bytes>,
    /// The transport error that ended the stream, if it did not end cleanly.
    pub error: Option<String>,
}

impl StreamReply {
    pub fn text(&self) -> String {
        self.chunks.iter().map(|c| String::from_utf8_lossy(c)).collect()
    }
}

impl Client {
    pub fn new(base: impl Into<String>) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let inner = HyperClient::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(http);
        Self { inner, base: base.into() }
    }

    /// An HTTP/2 (prior knowledge) client.
    pub fn h2(base: impl Into<String>) -> Self {
        let inner = HyperClient::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new());
        Self { inner, base: base.into() }
    }

    fn request(&self, method: Method, path: &str, body: Bytes, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut b = Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        if !body.is_empty() {
            b = b.header("content-type", "application/json");
        }
        b.body(Full::new(body)).unwrap_or_default()
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let resp = self.inner.request(self.request(method, path, body.into(), headers)).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    pub async fn post(&self, path: &str, json: &Value, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
        self.raw(Method::POST, path, json.to_string(), headers).await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.raw(Method::GET, path, Bytes::new(), &[]).await
    }

    /// Sends a request and reads the response body chunk by chunk, within `limit`.
    pub async fn stream(
        &self,
        path: &str,
        json: &Value,
        headers: &[(&str, &str)],
        limit: Duration,
    ) -> anyhow::Result<StreamReply> {
        let resp = self.inner.request(self.request(Method::POST, path, Bytes::from(json.to_string()), headers)).await?;
        let (parts, mut body) = resp.into_parts();
        let mut chunks = vec![];
        let mut error = None;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    error = Some("timed out".into());
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    error = Some(e.to_string());
                    break;
                }
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        chunks.push(d);
                    }
                }
            }
        }
        Ok(StreamReply { status: parts.status, headers: parts.headers, chunks, error })
    }
}
