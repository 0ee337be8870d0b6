//! The listener for captured connections (`--transparent PORT`): the nat rules of `capture`
//! send a pod's outbound TCP here. Each connection's original destination is recovered
//! (`SO_ORIGINAL_DST`), its first bytes are looked at without reading them, and then:
//!
//! * plain HTTP whose `Host` a route names (`match.hosts`) is served like an explicit request
//!   (routing, scanners, metrics), to the route's backend;
//! * TLS whose SNI a route names, when the pod intercepts TLS (`--intercept-ca`), is terminated
//!   with a certificate minted for the host by the pod's CA and then served the same way (the
//!   backend's own TLS re-encrypts it);
//! * plain HTTP to other hosts is passed through to the original destination a request at a
//!   time (`passthrough`), so a later request on it that names a routed host is served here too.
//!   On a plain-HTTP connection served here, a request that names a host no route takes goes on
//!   to the original destination;
//! * everything else (TLS without interception or to other hosts, protocols that are not HTTP
//!   or where the server speaks first) is passed through byte for byte.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Mutex, watch},
    time::Instant,
};

use crate::{
    body::{BoxError, ProxyBody},
    intercept,
    listener::{self, DRAIN},
    metrics::{CaptureLabels, DirectionLabels},
    passthrough::{self, Relayed},
    proxy::{self, AppState},
};

/// How long a connection may stay silent before it is taken for a protocol whose server speaks
/// first (SMTP, MySQL) and passed through.
const SNIFF_WAIT: Duration = Duration::from_millis(300);
/// Each direction's copy buffer when no pipe can be had for a zero-copy passthrough.
const COPY_BUFFER: usize = 64 << 10;
/// How much of a connection's first bytes is looked into: a request head whose `Host` is not
/// within them is closed, not passed through (the L7 listeners take heads up to 64 KiB too).
pub const SNIFF_BYTES: usize = 64 * 1024;

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1 request head, with its `Host` (lowercase, no port).
    Http(Option<String>),
    /// A TLS ClientHello, with the host name it asks for.
    Tls(Option<String>),
    /// Anything else, or nothing yet.
    Other,
    /// An HTTP head or a ClientHello begun and not finished within the header timeout.
    Stalled(&'static str),
    /// An HTTP head with no `Host`, or a ClientHello not whole, in as much as is looked into.
    Oversized(&'static str),
}

/// Looks at a connection's first bytes: `None` while they could still become an HTTP head or a
/// ClientHello.
///
/// An HTTP head is decided on as soon as its `Host` line is complete, so neither a long head
/// (many or large headers) nor a slow one can pass a routed host's request through unguarded.
pub fn classify(bytes: &[u8]) -> Option<Sniffed> {
    if bytes.first() == Some(&0x16) {
        return match intercept::client_hello(bytes) {
            intercept::Hello::Partial if bytes.len() < SNIFF_BYTES => None,
            // Whose host cannot be read must not pass through to it.
            intercept::Hello::Partial => Some(Sniffed::Oversized("tls")),
            intercept::Hello::Complete(message) => Some(Sniffed::Tls(intercept::server_name(&message))),
            intercept::Hello::Not => Some(Sniffed::Tls(None)),
        };
    }
    let method_end = bytes.iter().position(|b| !b.is_ascii_uppercase());
    match method_end {
        // A method token, then a space: an HTTP request line (or the start of one).
        Some(0) => return Some(Sniffed::Other),
        Some(n) if bytes[n] != b' ' || n > 16 => return Some(Sniffed::Other),
        None if bytes.len() > 16 => return Some(Sniffed::Other),
        None => return None,
        Some(_) => {}
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {
            let host = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host")).and_then(|h| host_of(h.value));
            Some(Sniffed::Http(host))
        }
        // The request line is good and the head goes on, or has more headers than are parsed,
        // or a header servers may still take (a name they would skip): its Host decides.
        Ok(httparse::Status::Partial)
        | Err(httparse::Error::TooManyHeaders | httparse::Error::HeaderName | httparse::Error::HeaderValue) => {
            match host_line(bytes) {
                Some(host) => Some(Sniffed::Http(Some(host))),
                None if bytes.windows(4).any(|w| w == b"\r\n\r\n") => Some(Sniffed::Http(None)),
                None if bytes.len() >= SNIFF_BYTES => Some(Sniffed::Oversized("http")),
                None => None,
            }
        }
        // Not an HTTP/1 request line (`SET key value`, `PRI * HTTP/2.0`).
        Err(_) => Some(Sniffed::Other),
    }
}

/// The `Host` of a head's complete header lines, if one of them names it.
fn host_line(head: &[u8]) -> Option<String> {
    let mut lines = head.split(|&b| b == b'\n');
    lines.next()?;
    // The last piece has no newline after it yet: it is not a complete line.
    let mut complete = lines.collect::<Vec<_>>();
    complete.pop();
    for line in complete {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        if line[..colon].eq_ignore_ascii_case(b"host") {
            return host_of(line[colon + 1..].trim_ascii());
        }
    }
    None
}

/// A `Host` value as routes match it.
fn host_of(value: &[u8]) -> Option<String> {
    let mut map = http::HeaderMap::new();
    map.insert(http::header::HOST, http::HeaderValue::from_bytes(value).ok()?);
    crate::runtime::host(&map)
}

/// Peeks at the connection until its first bytes say what it is, or it stays silent. A silent
/// connection is given `SNIFF_WAIT`; one that has begun an HTTP head or a ClientHello is given
/// `head_wait` to finish it (the header timeout of the listeners).
async fn sniff(stream: &TcpStream, head_wait: Duration) -> Sniffed {
    let mut buf = vec![0u8; SNIFF_BYTES];
    let start = Instant::now();
    let mut deadline = start + SNIFF_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Sniffed::Other,
        };
        if let Some(s) = classify(&buf[..n]) {
            return s;
        }
        deadline = start + head_wait.max(SNIFF_WAIT);
        if Instant::now() >= deadline {
            // Cut like a slow head on the other listeners: passing it through would let a
            // client that trickles its head past the guard.
            return Sniffed::Stalled(if buf[0] == 0x16 { "tls" } else { "http" });
        }
        // The head is incomplete: wait for more of it (peek returns at once with what is there).
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Where a captured connection was going.
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = if stream.local_addr()?.is_ipv4() { sock.original_dst_v4()? } else { sock.original_dst_v6()? };
    addr.as_socket().ok_or_else(|| std::io::Error::other("the original destination is not an IP address"))
}

/// Whether any route takes requests addressed to `host`.
fn routed(state: &AppState, host: &str) -> bool {
    let rt = state.runtime.borrow();
    rt.routes.iter().any(|r| {
        let hosts = &r.cfg.matches.hosts;
        !hosts.is_empty() && bulwark_api::route::host_matches(hosts, host)
    })
}

/// Serves captured connections; with `intercept`, TLS to routed hosts is terminated.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    intercept: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = intercept.map(tokio_rustls::TlsAcceptor::from);
    let builder = Arc::new(listener::builder(state.limits.header_timeout));
    let graceful = GracefulShutdown::new();
    let own = listener.local_addr().ok();
    while let Some(stream) = listener::accept(&listener, &mut shutdown).await {
        let (state, builder, acceptor) = (state.clone(), builder.clone(), acceptor.clone());
        // Taken now: what the connection turns out to be is only known in its task.
        let graceful = graceful.watcher();
        tokio::spawn(async move {
            let local = stream.local_addr().ok();
            let dst = match original_dst(&stream) {
                // A connection made to this port itself was not captured: there is nowhere to send it.
                Ok(dst)
                    if own.is_some_and(|o| o.port() == dst.port())
                        && (dst.ip().is_loopback() || local.is_some_and(|l| l.ip() == dst.ip())) =>
                {
                    return;
                }
                Ok(dst) => dst,
                Err(e) => {
                    tracing::debug!("a connection without an original destination: {e}");
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let sniffed = sniff(&stream, state.limits.header_timeout).await;
            let (protocol, l7) = match &sniffed {
                Sniffed::Http(host) => ("http", host.as_deref().is_some_and(|h| routed(&state, h))),
                Sniffed::Tls(host) => ("tls", acceptor.is_some() && host.as_deref().is_some_and(|h| routed(&state, h))),
                Sniffed::Other => ("other", false),
                Sniffed::Stalled(protocol) => {
                    tracing::debug!(%dst, "a captured {protocol} head did not arrive within the header timeout");
                    state.metrics.captured.get_or_create(&CaptureLabels { protocol, action: "timeout" }).inc();
                    return;
                }
                Sniffed::Oversized(protocol) => {
                    tracing::debug!(%dst, "a captured {protocol} connection names no host in its first {} KiB", SNIFF_BYTES >> 10);
                    state.metrics.captured.get_or_create(&CaptureLabels { protocol, action: "oversized" }).inc();
                    return;
                }
            };
            let action = if l7 { "routed" } else { "passthrough" };
            state.metrics.captured.get_or_create(&CaptureLabels { protocol, action }).inc();
            let app = state.clone();
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(proxy::handle(app, req).await) }
            });
            // Made only for the connections served as plain HTTP.
            let plain = || {
                let (app, onward) = (state.clone(), Arc::new(Onward { dst, conn: Mutex::new(None) }));
                hyper::service::service_fn(move |req| {
                    let (app, onward) = (app.clone(), onward.clone());
                    async move { Ok::<_, Infallible>(onward.serve(app, req).await) }
                })
            };
            let ended = match (l7, protocol, &acceptor) {
                (true, "tls", Some(tls)) => match tls.accept(stream).await {
                    Ok(tls) => graceful.watch(builder.serve_connection(TokioIo::new(tls), service).into_owned()).await,
                    Err(e) => {
                        tracing::debug!("intercepted handshake failed: {e}");
                        return;
                    }
                },
                (true, _, _) => {
                    graceful.watch(builder.serve_connection(TokioIo::new(stream), plain()).into_owned()).await
                }
                (false, "http", _) => match relay(&state, stream, dst).await {
                    Some(rest) => {
                        graceful.watch(builder.serve_connection(TokioIo::new(rest), plain()).into_owned()).await
                    }
                    None => return,
                },
                _ => {
                    passthrough(&state, stream, dst).await;
                    return;
                }
            };
            if let Err(e) = ended {
                tracing::debug!("captured connection ended: {e}");
            }
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!("captured requests still running after {}s of shutdown were cut", DRAIN.as_secs());
    }
}

/// Where the requests on a plain-HTTP connection served here go: those that name a routed host to
/// the proxy, the others on to the original destination, over one connection kept for them.
struct Onward {
    dst: SocketAddr,
    conn: Mutex<Option<SendRequest<Incoming>>>,
}

impl Onward {
    async fn serve(&self, state: Arc<AppState>, req: Request<Incoming>) -> Response<Either<ProxyBody, Incoming>> {
        if crate::runtime::host(req.headers()).is_some_and(|h| routed(&state, &h)) {
            return proxy::handle(state, req).await.map(Either::Left);
        }
        match self.send(req).await {
            Ok(resp) => resp.map(Either::Right),
            Err(e) => {
                tracing::debug!(dst = %self.dst, "a request for a host no route takes could not go on: {e}");
                let mut resp =
                    Response::new(Either::Left(ProxyBody::full("the original destination did not answer\n")));
                *resp.status_mut() = StatusCode::BAD_GATEWAY;
                resp
            }
        }
    }

    async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, BoxError> {
        let mut conn = self.conn.lock().await;
        // A kept connection the destination has closed is replaced before the request goes.
        let kept = match conn.take() {
            Some(mut c) => match c.ready().await {
                Ok(()) => c,
                Err(_) => self.connect().await?,
            },
            None => self.connect().await?,
        };
        Ok(conn.insert(kept).send_request(req).await?)
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, BoxError> {
        let stream = connect(self.dst).await.ok_or("cannot connect")?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("an onward connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// Passes a plain-HTTP connection through a request at a time: the rest of it, from a request
/// that names a routed host, to be served here.
async fn relay(state: &AppState, client: TcpStream, dst: SocketAddr) -> Option<passthrough::Prefixed> {
    let upstream = connect(dst).await?;
    let relayed = passthrough::relay(client, upstream, |host| routed(state, host), state.limits.header_timeout).await;
    let count = |direction, n| state.metrics.passthrough_bytes.get_or_create(&DirectionLabels { direction }).inc_by(n);
    let action = |action| state.metrics.captured.get_or_create(&CaptureLabels { protocol: "http", action }).inc();
    match relayed {
        Ok(Relayed::Ended { up, down, refused }) => {
            count("upstream", up);
            count("downstream", down);
            if let Some(why) = refused {
                tracing::debug!(%dst, "a passed-through HTTP connection was closed at a request: {why}");
                action(why);
            }
            None
        }
        Ok(Relayed::Routed { client, up, down }) => {
            count("upstream", up);
            count("downstream", down);
            action("rerouted");
            Some(client)
        }
        Err(e) => {
            tracing::debug!(%dst, "passthrough ended: {e}");
            None
        }
    }
}

/// A connection to a captured connection's original destination.
async fn connect(dst: SocketAddr) -> Option<TcpStream> {
    match TcpStream::connect(dst).await {
        Ok(s) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Err(e) => {
            tracing::debug!(%dst, "passthrough: cannot connect: {e}");
            None
        }
    }
}

/// Copies the connection to its original destination and back, unchanged.
async fn passthrough(state: &AppState, mut client: TcpStream, dst: SocketAddr) {
    let Some(mut upstream) = connect(dst).await else { return };
    let (up, down) = match crate::splice::copy_bidirectional(&mut client, &mut upstream, COPY_BUFFER).await {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(%dst, "passthrough ended: {e}");
            return;
        }
    };
    let count = |direction, n| state.metrics.passthrough_bytes.get_or_create(&DirectionLabels { direction }).inc_by(n);
    count("upstream", up);
    count("downstream", down);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_say_what_a_connection_is() {
        let http = b"POST /v1/chat/completions HTTP/1.1\r\nHost: API.OpenAI.com:80\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(classify(http), Some(Sniffed::Http(Some("api.openai.com".into()))));
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHos"), None, "a head still coming");
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n\r\n"), Some(Sniffed::Http(None)), "no Host");
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02, 0x00]), None, "a record still coming");
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x00, 0x01, 0x01]), None, "a ClientHello going on in the next record");
        let nameless = [0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00];
        assert_eq!(classify(&nameless), Some(Sniffed::Tls(None)), "no name in it");
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x00, 0x01, 0x02]), Some(Sniffed::Tls(None)), "no ClientHello");
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(Sniffed::Other));
        assert_eq!(classify(b"\x00\x01binary"), Some(Sniffed::Other));
        assert_eq!(classify(b"HELLO world\r\n"), Some(Sniffed::Other), "a word and a space, then no HTTP");
        assert_eq!(classify(&[b'A'; 40]), Some(Sniffed::Other));
    }

    #[test]
    fn a_host_line_decides_a_long_or_slow_head() {
        let padded = |headers: &str| format!("POST /v1/chat/completions HTTP/1.1\r\n{headers}");
        let routed = Some(Sniffed::Http(Some("api.openai.com".into())));
        // More headers than a parse takes, the Host among them: still the routed host.
        let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
        assert_eq!(classify(padded(&format!("{many}Host: api.openai.com\r\n\r\n")).as_bytes()), routed);
        // A head longer than is looked into, its Host first.
        let big = padded(&format!("host: api.openai.com\r\nX-Big: {}", "b".repeat(SNIFF_BYTES)));
        assert_eq!(classify(&big.as_bytes()[..SNIFF_BYTES]), routed);
        // A slow head is decided once its Host line is whole, not before.
        assert_eq!(classify(padded("X-A: 1\r\nHost: api.open").as_bytes()), None);
        assert_eq!(classify(padded("X-A: 1\r\nHost: api.openai.com\r\n").as_bytes()), routed);
        assert_eq!(classify(padded("X-A: 1\r\nX-B: 2\r\n").as_bytes()), None, "no Host yet");
        // Long, with no Host in what is looked into: closed, never passed through unguarded.
        let hostless = padded(&format!("X-Big: {}", "b".repeat(SNIFF_BYTES)));
        assert_eq!(classify(&hostless.as_bytes()[..SNIFF_BYTES]), Some(Sniffed::Oversized("http")));
        // A ClientHello of 64 KiB and more, in records of 16 KiB.
        let mut message = vec![0x01, 0x01, 0x00, 0x00];
        message.resize(4 + 0x10000, 0);
        let mut big: Vec<u8> =
            message.chunks(0x4000).flat_map(|c| [&[0x16, 0x03, 0x01, 0x40, 0x00][..], c].concat()).collect();
        big.truncate(SNIFF_BYTES);
        assert_eq!(classify(&big), Some(Sniffed::Oversized("tls")), "a ClientHello past 64 KiB is not passed on");
        // A header name httparse refuses before the Host does not hide it.
        assert_eq!(classify(padded("X@y: 1\r\nHost: api.openai.com\r\n\r\n").as_bytes()), routed);
        assert_eq!(classify(padded("X@y: 1\r\nX-B").as_bytes()), None, "its Host may still come");
        assert_eq!(
            classify(b"SET key value\r\n"),
            Some(Sniffed::Other),
            "a command that only looks like a request line"
        );
        // A header named like Host is not one, and the body is not the head.
        assert_eq!(classify(padded("X-Host: a.test\r\n").as_bytes()), None);
        // An empty Host names nothing, whole head or not (found by the `sniff` fuzz target).
        assert_eq!(classify(b"GET / HTTP/1.0\r\nHost: \r\n\r\n"), Some(Sniffed::Http(None)));
        assert_eq!(classify(b"GET / HTTP/1.0\r\nHost: \r\nX-A"), None);
    }
}
