//! The accept loop of the operator's HTTPS listeners (the config stream and the injection
//! webhook): rustls when a certificate is given, HTTP/2 or HTTP/1.1, and a graceful drain of
//! open connections at shutdown.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::watch};

use crate::distribute::Body;

/// Time a client has to send its request's headers, and to finish the TLS handshake.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a client has to send a request's body.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads a request body of at most `limit` bytes within `BODY_TIMEOUT`: the body, or the
/// status (413, 408, 400) and why, naming `what`.
pub async fn read_body(body: Incoming, limit: usize, what: &str) -> Result<bytes::Bytes, (http::StatusCode, String)> {
    use http_body_util::BodyExt as _;
    match tokio::time::timeout(BODY_TIMEOUT, http_body_util::Limited::new(body, limit).collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err((http::StatusCode::PAYLOAD_TOO_LARGE, format!("{what} is larger than {limit} bytes")))
        }
        Ok(Err(e)) => Err((http::StatusCode::BAD_REQUEST, format!("reading {what}: {e}"))),
        Err(_) => Err((
            http::StatusCode::REQUEST_TIMEOUT,
            format!("{what} did not arrive within {}s", BODY_TIMEOUT.as_secs()),
        )),
    }
}

/// Serves `handler` on `listener` until `shutdown`, then gives open connections 5 s to end.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let handler = handler.clone();
        let svc = hyper::service::service_fn(move |req| {
            let reply = handler(req);
            async move { Ok::<_, Infallible>(reply.await) }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Headers that never finish (slowloris) end the connection; so does a header list
        // larger than any sidecar or API server sends.
        builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .max_header_list_size(64 << 10);
        match &acceptor {
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    let conn = builder.serve_connection(TokioIo::new(tls), svc).into_owned();
                    let _ = watcher.watch(conn).await;
                });
            }
            None => {
                let conn = builder.serve_connection(TokioIo::new(tcp), svc).into_owned();
                let fut = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = fut.await;
                });
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}
