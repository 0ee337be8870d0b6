//! The admin listener: `/metrics` (Prometheus text), `/ready`, `/live`, and `/config` (the
//! applied config and its version; it holds no secret values, only where keys are read).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};

use crate::{body::ProxyBody, metrics::Metrics, runtime::Runtime};

pub struct AdminState {
    pub runtime: tokio::sync::watch::Receiver<Arc<Runtime>>,
    pub metrics: Arc<Metrics>,
}

pub async fn handle<B>(state: Arc<AdminState>, req: Request<B>) -> Response<ProxyBody> {
    let (status, content_type, body): (StatusCode, &'static str, Bytes) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", state.metrics.encode().into()),
        "/live" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/ready" => {
            let rt = state.runtime.borrow().clone();
            if rt.config.version.is_empty() {
                (StatusCode::SERVICE_UNAVAILABLE, "text/plain", Bytes::from_static(b"no config yet\n"))
            } else {
                (StatusCode::OK, "text/plain", Bytes::from(format!("ready {}\n", rt.config.version)))
            }
        }
        "/config" => {
            let rt = state.runtime.borrow().clone();
            let body = serde_json::to_vec_pretty(&*rt.config).unwrap_or_default();
            (StatusCode::OK, "application/json", body.into())
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"admin paths: /metrics /ready /live /config\n")),
    };
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
