//! The config stream on port 15010: sidecars open `GET /v1/config` and get their group's config
//! at once and every new version as soon as it is compiled; `POST /v1/report` takes their
//! outcome reports. HTTPS (rustls, HTTP/2 or HTTP/1.1) when a certificate is given.
//!
//! The hub keeps one watch channel per pod, so a push is one clone of a shared buffer per
//! connected sidecar, and a sidecar that reconnects gets the current version first.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    sync::Arc,
    time::Duration,
};

use bulwark_api::control::{REPORT_PATH, Report, STREAM_PATH};
use bytes::Bytes;
use futures_util::stream;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame as BodyFrame, Incoming};
use parking_lot::Mutex;
use tokio::{net::TcpListener, sync::watch};
use tracing::Instrument as _;

use crate::{State, auth::Authenticator, index::Group};

/// One config, serialised once for every sidecar of its group.
#[derive(Debug)]
pub struct Frame {
    pub version: String,
    pub line: Bytes,
    /// The backends of each route of the config: the only ones its sidecars may report on.
    pub backends: HashMap<String, HashSet<String>>,
}

impl Frame {
    fn of(config: &bulwark_api::SidecarConfig) -> Self {
        let mut line = serde_json::to_vec(config).unwrap_or_default();
        line.push(b'\n');
        let mut backends: HashMap<String, HashSet<String>> = HashMap::new();
        for r in &config.routes {
            backends
                .entry(r.route.clone())
                .or_default()
                .extend(r.backends.iter().chain(&r.fallback).map(|b| b.name.clone()));
        }
        Self { version: config.version.clone(), line: line.into(), backends }
    }
}

type Slot = watch::Sender<Option<Arc<Frame>>>;

#[derive(Default)]
pub struct Hub {
    pods: Mutex<HashMap<(String, String), Slot>>,
}

impl Hub {
    /// The pod's config channel; `None` until its group is compiled.
    pub fn subscribe(&self, ns: &str, pod: &str) -> watch::Receiver<Option<Arc<Frame>>> {
        let mut pods = self.pods.lock();
        pods.entry((ns.to_owned(), pod.to_owned())).or_insert_with(|| watch::channel(None).0).subscribe()
    }

    /// Hands each pod its group's config; returns how many pods got a new version. Pods in no
    /// group lose their channel, which ends their streams.
    pub fn publish(&self, groups: &[Group]) -> usize {
        let mut sent = 0;
        let mut pods = self.pods.lock();
        let mut live = HashSet::new();
        for g in groups {
            let mut frame: Option<Arc<Frame>> = None;
            for pod in &g.pods {
                let key = (g.namespace.clone(), pod.clone());
                let slot = pods.entry(key.clone()).or_insert_with(|| watch::channel(None).0);
                live.insert(key);
                let stale = slot.borrow().as_ref().is_none_or(|f| f.version != g.config.version);
                if stale {
                    let f = frame.get_or_insert_with(|| Arc::new(Frame::of(&g.config)));
                    slot.send_replace(Some(f.clone()));
                    if slot.receiver_count() > 0 {
                        sent += 1;
                    }
                }
            }
        }
        // Keep channels of sidecars whose pod is indexed but not compiled into a group yet.
        pods.retain(|k, slot| live.contains(k) || (slot.borrow().is_none() && slot.receiver_count() > 0));
        sent
    }

    /// The config a pod was last handed.
    pub fn current(&self, ns: &str, pod: &str) -> Option<Arc<Frame>> {
        self.pods.lock().get(&(ns.to_owned(), pod.to_owned())).and_then(|s| s.borrow().clone())
    }
}

struct Ctx {
    state: Arc<State>,
    auth: Arc<Authenticator>,
    /// Ends open config streams at shutdown, so connections drain at once.
    shutdown: watch::Receiver<bool>,
}

/// Serves the config stream until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<State>,
    auth: Arc<Authenticator>,
    shutdown: watch::Receiver<bool>,
) {
    let ctx = Arc::new(Ctx { state, auth, shutdown: shutdown.clone() });
    crate::server::serve(listener, tls, shutdown, move |req| {
        let ctx = ctx.clone();
        async move { handle(&ctx, req).await }
    })
    .await;
}

pub type Body = BoxBody<Bytes, Infallible>;

pub fn reply(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": status.as_u16(), "message": message}}).to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

async fn handle(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    let route = (req.method().clone(), req.uri().path().to_owned());
    if !matches!((&route.0, route.1.as_str()), (&Method::GET, STREAM_PATH) | (&Method::POST, REPORT_PATH)) {
        return reply(StatusCode::NOT_FOUND, "paths: GET /v1/config, POST /v1/report");
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    if token.is_empty() {
        return reply(StatusCode::UNAUTHORIZED, "send the pod's projected service-account token as a bearer token");
    }
    let who = match ctx.auth.review(&token).await {
        Ok(who) => who,
        Err(e) => {
            tracing::info!("refused a sidecar: {e}");
            return reply(StatusCode::UNAUTHORIZED, &e);
        }
    };
    let span = tracing::info_span!("sidecar", namespace = %who.namespace, pod = %who.pod);
    serve_pod(ctx, who, route.0, req).instrument(span).await
}

/// A request from a sidecar whose token named its pod.
async fn serve_pod(ctx: &Ctx, who: crate::auth::Identity, method: Method, req: Request<Incoming>) -> Response<Body> {
    // A sidecar may connect before the pod watch has seen its pod (a new pod, or an operator
    // that just started): give the watch a moment before refusing.
    let lookup =
        || ctx.state.index.lock().pod(&who.namespace, &who.pod).map(|p| (p.service_account.clone(), p.uid.clone()));
    match crate::poll_for(POD_GRACE, lookup).await {
        None => {
            let msg = format!(
                "pod {}/{} is not known as a sidecar pod (label bulwark.dev/inject=true) yet",
                who.namespace, who.pod
            );
            tracing::info!("refused: {msg}");
            return reply(StatusCode::FORBIDDEN, &msg);
        }
        Some((sa, uid))
            if sa != who.service_account || who.pod_uid.as_ref().is_some_and(|u| !uid.is_empty() && *u != uid) =>
        {
            let msg = "the token belongs to another pod or service account";
            tracing::info!("refused: {msg}");
            return reply(StatusCode::FORBIDDEN, msg);
        }
        Some(_) => {}
    }
    if method == Method::GET {
        return config_stream(ctx, &who.namespace, &who.pod);
    }
    let body = match crate::server::read_body(req.into_body(), 4 << 20, "the report").await {
        Ok(b) => b,
        Err((status, why)) => return reply(status, &why),
    };
    let mut report: Report = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return reply(StatusCode::BAD_REQUEST, &format!("not a report: {e}")),
    };
    let version = report.version.clone();
    // Only outcomes of the routes and backends this pod was given count.
    let given = ctx.state.hub.current(&who.namespace, &who.pod);
    let allowed = |route: &str, backend: Option<&str>| {
        let backends = given.as_ref().and_then(|f| f.backends.get(route));
        backends.is_some_and(|b| backend.is_none_or(|x| b.contains(x)))
    };
    report.backends.retain(|b| allowed(&b.route, Some(&b.backend)));
    report.routes.retain(|r| allowed(&r.route, None));
    ctx.state.reports.lock().ingest(&who.namespace, &who.pod, report);
    ctx.state.metrics.reports.inc();
    if ctx.state.index.lock().report(&who.namespace, &who.pod, &version) {
        ctx.state.restatus.notify_one();
    }
    reply(StatusCode::OK, "ok")
}

const KEEPALIVE: Duration = Duration::from_secs(15);
/// How long a request from a pod the index does not know yet waits for it.
const POD_GRACE: Duration = Duration::from_secs(5);

/// Counts open streams for the connected-sidecars gauge, and logs each stream's end.
struct Connected(Arc<State>, tracing::Span);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.metrics.connected.dec();
        self.1.in_scope(|| tracing::debug!("sidecar disconnected"));
    }
}

fn config_stream(ctx: &Ctx, ns: &str, pod: &str) -> Response<Body> {
    let rx = ctx.state.hub.subscribe(ns, pod);
    ctx.state.metrics.connected.inc();
    tracing::debug!("sidecar connected");
    let guard = Connected(ctx.state.clone(), tracing::Span::current());
    let stop = ctx.shutdown.clone();
    let frames = stream::unfold((rx, true, guard, stop), |(mut rx, first, guard, mut stop)| async move {
        let current = if first { rx.borrow_and_update().clone() } else { None };
        if let Some(f) = current {
            return Some((Ok(BodyFrame::data(f.line.clone())), (rx, false, guard, stop)));
        }
        loop {
            tokio::select! {
                _ = stop.changed() => return None,
                changed = rx.changed() => {
                    changed.ok()?;
                    let next = rx.borrow_and_update().clone();
                    if let Some(f) = next {
                        return Some((Ok(BodyFrame::data(f.line.clone())), (rx, false, guard, stop)));
                    }
                }
                _ = tokio::time::sleep(KEEPALIVE) => {
                    return Some((Ok(BodyFrame::data(Bytes::from_static(b"\n"))), (rx, false, guard, stop)));
                }
            }
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
    resp.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    resp
}
