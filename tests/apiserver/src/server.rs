//! The HTTP side: the listener (HTTP/1.1 and h2c), request decoding, responses, CRD preloading,
//! and the kubeconfig that points clients here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use serde::Deserialize as _;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::Options;
use crate::api::{ApiRequest, Reply, State};
use crate::router::Query;

/// The largest request body accepted.
const MAX_BODY_BYTES: usize = 16 << 20;

type Body = BoxBody<Bytes, Infallible>;

/// A running API server. Dropping it stops it too.
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl ApiServer {
    /// Binds `opts.listen`, installs the CRDs found in `opts.crd_dirs` (files or directories of
    /// YAML files) and starts serving.
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(opts.listen).await.with_context(|| format!("binding {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let mut state = State::new(addr);
        for (file, crd) in load_crds(&opts.crd_dirs)? {
            let name = crate::meta::name(&crd).to_string();
            state.preload_crd(crd).map_err(|e| anyhow::anyhow!("{}: CRD {name}: {}", file.display(), e.message))?;
        }
        let state = Arc::new(Mutex::new(state));
        let (shutdown, stopped) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, state.clone(), stopped));
        tracing::info!(%addr, "test API server listening");
        Ok(Self { addr, state, shutdown, accept })
    }

    /// Every request served so far, as `(method, path?query)`.
    pub fn audit(&self) -> Vec<(String, String)> {
        self.state.lock().audit.clone()
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig whose current context points at this server (namespace `default`,
    /// no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let config = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: bulwark-test\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: bulwark-test\n  user: {{}}\n\
             contexts:\n\
             - name: bulwark-test\n  context:\n    cluster: bulwark-test\n    user: bulwark-test\n    namespace: default\n\
             current-context: bulwark-test\n\
             preferences: {{}}\n",
            url = self.url()
        );
        std::fs::write(path, config)
    }

    /// Forgets the watch event history, as an etcd compaction would: watches that resume from
    /// any resource version issued so far get `410 Gone`.
    pub fn compact_watch_history(&self) {
        self.state.lock().store.compact();
    }

    /// Ends every open watch, as an API server restart does: clients resume from the last
    /// resource version they saw (after [`ApiServer::compact_watch_history`], with `410 Gone`, so
    /// they must list again).
    pub fn drop_watches(&self) {
        self.state.lock().store.drop_watches();
    }

    /// Stops accepting, ends open watches and connections, and waits for the listener to close.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let _ = (&mut self.accept).await;
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.accept.abort();
    }
}

/// The CRDs in the given files and directories (`*.yaml`, `*.yml`, `*.json`), with their files.
fn load_crds(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, Value)>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .map(|entry| entry.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            entries.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json"));
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    let mut crds = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).with_context(|| format!("parsing {}", file.display()))?;
            if value.is_null() {
                continue;
            }
            let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
            if kind != "CustomResourceDefinition" {
                bail!("{}: a {kind:?} is not a CustomResourceDefinition", file.display());
            }
            crds.push((file.clone(), value));
        }
    }
    Ok(crds)
}

async fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>, mut stopped: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let stream = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Watch events are small writes: send each at once.
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    continue;
                }
            },
        };
        let (state, stopped) = (state.clone(), stopped.clone());
        let service = service_fn(move |req| serve(state.clone(), stopped.clone(), req));
        connections.spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn serve(
    state: Arc<Mutex<State>>,
    stopped: watch::Receiver<bool>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let uri = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), ToString::to_string);
    state.lock().audit.push((parts.method.to_string(), uri));
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            let error = crate::error::ApiError::bad_request(format!("reading the request body: {error}"));
            return Ok(respond(Reply::error(error), stopped));
        }
    };
    let header = |name| parts.headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok()).unwrap_or("");
    let content_type = header(CONTENT_TYPE).split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let mut request = ApiRequest {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        query: Query::parse(parts.uri.query()),
        content_type,
        user_agent: header(USER_AGENT).to_string(),
        body,
    };
    // Mutating webhooks run before the create, without holding the store.
    let admission = state.lock().admission(&request);
    if let Some(pending) = admission {
        match pending.mutate().await {
            Ok(object) => {
                request.body = Bytes::from(object.to_string());
                request.content_type = "application/json".into();
            }
            Err(error) => return Ok(respond(Reply::error(error), stopped)),
        }
    }
    let reply = state.lock().handle(&request);
    if let Reply::Json { code, .. } = &reply {
        tracing::debug!(method = %parts.method, uri = %parts.uri, code, "request");
    }
    Ok(respond(reply, stopped))
}

fn respond(reply: Reply, stopped: watch::Receiver<bool>) -> Response<Body> {
    let (code, content_type, body, warnings) = match reply {
        Reply::Json { code, body, warnings } => {
            (code, "application/json", Full::new(Bytes::from(body.to_string())).boxed(), warnings)
        }
        Reply::Text(text) => (200, "text/plain", Full::new(Bytes::from_static(text.as_bytes())).boxed(), Vec::new()),
        Reply::Watch(watch) => (200, "application/json", watch.into_body(stopped), Vec::new()),
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    for warning in warnings {
        let quoted = warning.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(value) = HeaderValue::from_str(&format!("299 - \"{quoted}\"")) {
            headers.append("warning", value);
        }
    }
    response
}
