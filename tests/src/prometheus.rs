//! A small server that speaks the Prometheus HTTP query API (`GET /api/v1/query`) for rollout
//! tests: each query is answered with the value of the first rule whose text it contains, as
//! a vector of one sample, or with no sample when no rule matches. Queries are recorded.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
};
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpListener;

#[derive(Default)]
struct Rules {
    values: Vec<(String, f64)>,
    queries: Vec<String>,
}

#[derive(Clone)]
pub struct FakePrometheus {
    pub addr: SocketAddr,
    rules: Arc<Mutex<Rules>>,
}

impl FakePrometheus {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let rules = Arc::new(Mutex::new(Rules::default()));
        let r = rules.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let r = r.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let r = r.clone();
                        async move { Ok::<_, Infallible>(answer(&r, &req)) }
                    });
                    let _ = Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Ok(Self { addr, rules })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queries containing `needle` are answered with `value` (rules set later come first).
    pub fn set(&self, needle: &str, value: f64) {
        let mut rules = self.rules.lock();
        rules.values.retain(|(n, _)| n != needle);
        rules.values.insert(0, (needle.to_owned(), value));
    }

    /// The queries asked so far.
    pub fn queries(&self) -> Vec<String> {
        self.rules.lock().queries.clone()
    }
}

fn answer(rules: &Mutex<Rules>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let query = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|p| p.strip_prefix("query="))
        .map(bulwark_test_apiserver::percent_decode)
        .unwrap_or_default();
    let body = if req.uri().path() != "/api/v1/query" || query.is_empty() {
        json!({"status": "error", "errorType": "bad_data", "error": "missing query"})
    } else {
        let mut rules = rules.lock();
        rules.queries.push(query.clone());
        let value = rules.values.iter().find(|(n, _)| query.contains(n.as_str())).map(|(_, v)| *v);
        let result = match value {
            Some(v) => json!([{"metric": {}, "value": [0, v.to_string()]}]),
            None => json!([]),
        };
        json!({"status": "success", "data": {"resultType": "vector", "result": result}})
    };
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}
