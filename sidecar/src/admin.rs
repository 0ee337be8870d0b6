//! The admin listener: `/metrics` (Prometheus text), `/ready`, `/live`, `/config` (the applied
//! config and its version; it holds no secret values, only where keys are read), and
//! `/rollouts` (the rollouts a standalone sidecar drives; `POST /rollouts/NS/NAME/ACTION`
//! promotes, pauses, resumes, aborts or retries one).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use crate::{body::ProxyBody, metrics::Metrics, rollouts::Rollouts, runtime::Runtime};

pub struct AdminState {
    pub runtime: tokio::sync::watch::Receiver<Arc<Runtime>>,
    pub metrics: Arc<Metrics>,
    /// The standalone rollout driver; `None` with a compiled config or the operator.
    pub rollouts: Option<Arc<Rollouts>>,
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
        "/rollouts" if req.method() == Method::GET => {
            let list = state.rollouts.as_ref().map(|r| r.list()).unwrap_or_default();
            (StatusCode::OK, "application/json", serde_json::to_vec_pretty(&list).unwrap_or_default().into())
        }
        path if path.starts_with("/rollouts/") && req.method() == Method::POST => control(&state, &req),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"admin paths: /metrics /ready /live /config /rollouts\n"),
        ),
    };
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// `POST /rollouts/NS/NAME/ACTION[?full=true]`: a control for a rollout the sidecar drives.
fn control<B>(state: &AdminState, req: &Request<B>) -> (StatusCode, &'static str, Bytes) {
    let parts: Vec<&str> = req.uri().path().trim_start_matches("/rollouts/").split('/').collect();
    let full = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "full=true" || p == "full"));
    let result = match (&state.rollouts, parts.as_slice()) {
        (None, _) => Err("this sidecar drives no rollouts (it runs a compiled config or the operator's)".to_owned()),
        (Some(r), [ns, name, action]) => r.control(ns, name, action, full),
        _ => Err("use POST /rollouts/NAMESPACE/NAME/ACTION".to_owned()),
    };
    match result {
        Ok(done) => (StatusCode::OK, "text/plain", Bytes::from(format!("{done}\n"))),
        Err(e) => (StatusCode::BAD_REQUEST, "text/plain", Bytes::from(format!("{e}\n"))),
    }
}
