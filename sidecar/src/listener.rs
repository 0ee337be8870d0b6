//! Accepts connections (HTTP/1.1 and h2c by prior knowledge) and hands each request to a
//! handler; on shutdown stops accepting and lets in-flight requests finish.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto::Builder, graceful::GracefulShutdown},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::body::ProxyBody;

/// How long in-flight requests may run after shutdown starts.
pub const DRAIN: Duration = Duration::from_secs(30);

/// The next connection, or `None` once shutdown starts.
pub async fn accept(listener: &TcpListener, shutdown: &mut watch::Receiver<bool>) -> Option<TcpStream> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => return Some(stream),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return None,
        }
    }
}

/// Most bytes of headers an HTTP/2 request may carry (HTTP/1.1 is bounded by hyper's buffer).
const MAX_HEADER_LIST: u32 = 64 << 10;

/// The connection settings of every listener: headers must arrive within `header_timeout`, and
/// are bounded in size.
pub fn builder(header_timeout: Duration) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .max_header_list_size(MAX_HEADER_LIST)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

pub async fn serve<S, F, Fut>(
    listener: TcpListener,
    state: Arc<S>,
    handler: F,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let builder = builder(header_timeout);
    let graceful = GracefulShutdown::new();
    while let Some(stream) = accept(&listener, &mut shutdown).await {
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handler(state, req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still running after {}s of shutdown were cut", DRAIN.as_secs());
    }
}
