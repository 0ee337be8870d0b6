//! Port 8080: `/metrics`, `/healthz` (the process serves), `/readyz` (every watch has listed
//! once and the config stream is listening).

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::watch};

use crate::State;

pub async fn serve(listener: TcpListener, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let state = state.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let state = state.clone();
            async move {
                let (status, ctype, body) = match req.uri().path() {
                    "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", state.metrics.encode()),
                    "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
                    "/readyz" if state.is_synced() => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
                    "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "watches not synced yet\n".to_owned()),
                    _ => (StatusCode::NOT_FOUND, "text/plain", "paths: /metrics /healthz /readyz\n".to_owned()),
                };
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
                Ok::<_, Infallible>(resp)
            }
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}
