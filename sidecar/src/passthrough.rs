//! Plain HTTP passed through to its original destination one request at a time.
//!
//! A captured plain-HTTP connection whose first request names a host no route takes can carry
//! later requests for other hosts: keep-alive to a server with many virtual hosts, or a forward
//! proxy that carries requests for any host. So every request head is looked at before it is
//! sent on, and the messages are framed both ways (RFC 9112 §6): the request side knows where
//! the next head starts, the response side when every request sent has been answered.
//!
//! * A later head that names a routed host is not sent on. Once the original destination has
//!   answered every request before it, that connection is closed and the client's connection,
//!   from this head on, is handed to the L7 path ([`Relayed::Routed`]).
//! * What cannot be framed for certain is not sent on either: two different `Content-Length`s,
//!   both framings at once, a `Transfer-Encoding` that does not end in `chunked`, a head the
//!   parser refuses or longer than 64 KiB, bad chunk framing, bytes that are not a request where
//!   a head should start. The requests before it are still answered; then the connection closes.
//! * A `CONNECT` or an `Upgrade` answered with a switch becomes a byte tunnel both ways, as the
//!   other protocols are.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
    sync::{mpsc, watch},
    time::Instant,
};

use crate::transparent::{SNIFF_BYTES, Sniffed, classify};

/// How much is read from either side at a time.
const READ: usize = 64 << 10;
/// Longest hex run a chunk size may have (`u64`).
const SIZE_DIGITS: u8 = 16;

/// How a message's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Every byte until the sender closes (responses only).
    UntilClose,
}

/// What a request's answer will look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plain,
    /// `HEAD`: its answer has no body.
    Head,
    /// `CONNECT`: a 2xx makes the connection a tunnel.
    Connect,
    /// A request with `Upgrade`: a 101 makes the connection a tunnel.
    Upgrade,
}

/// A complete request head: its length, and how its body and its answer are delimited.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub len: usize,
    pub kind: Kind,
    pub body: Framing,
}

/// A complete response head, and what follows it.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub then: Then,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Then {
    /// A 1xx other than 101: the final answer is still to come.
    Interim,
    /// The connection is a tunnel from here on.
    Switch,
    Body(Framing),
}

/// A message that cannot be framed for certain, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Unframed(pub &'static str);

/// A parsed head: its length, what the parse read from its first line, and its fields.
type Parsed<'b, T> = (usize, T, Vec<(&'b str, &'b [u8])>);

/// Parses a head into `headers`, with room for as many as it has.
fn parse_head<'b, T>(
    bytes: &'b [u8],
    mut parse: impl FnMut(&mut [httparse::Header<'b>], &'b [u8]) -> httparse::Result<(usize, T)>,
) -> Result<Option<Parsed<'b, T>>, Unframed> {
    let mut room = 64;
    loop {
        let mut headers = vec![httparse::EMPTY_HEADER; room];
        match parse(&mut headers, bytes) {
            Ok(httparse::Status::Complete((len, t))) => {
                let fields = headers.iter().take_while(|h| !h.name.is_empty()).map(|h| (h.name, h.value)).collect();
                return Ok(Some((len, t, fields)));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) if room < bytes.len() / 2 => room *= 8,
            Err(_) => return Err(Unframed("a head the parser refuses")),
        }
    }
}

/// The request head at the start of `bytes`: `Ok(None)` while it is incomplete.
pub fn request_head(bytes: &[u8]) -> Result<Option<RequestHead>, Unframed> {
    let parsed = parse_head(bytes, |headers, bytes| {
        let mut req = httparse::Request::new(headers);
        Ok(match req.parse(bytes)? {
            httparse::Status::Complete(n) => httparse::Status::Complete((n, req.method.unwrap_or_default().to_owned())),
            httparse::Status::Partial => httparse::Status::Partial,
        })
    })?;
    let Some((len, method, fields)) = parsed else { return Ok(None) };
    let body = match framing_fields(&fields)? {
        (Some(_), Some(_)) => return Err(Unframed("both Transfer-Encoding and Content-Length")),
        (Some(true), None) => Framing::Chunked,
        (Some(false), None) => return Err(Unframed("a request Transfer-Encoding that does not end in chunked")),
        (None, Some(0) | None) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
    };
    let kind = match method.as_str() {
        "HEAD" => Kind::Head,
        "CONNECT" => Kind::Connect,
        _ if fields.iter().any(|(name, _)| name.eq_ignore_ascii_case("upgrade")) => Kind::Upgrade,
        _ => Kind::Plain,
    };
    Ok(Some(RequestHead { len, kind, body }))
}

/// The response head at the start of `bytes`, answering a request of `kind`.
pub fn response_head(bytes: &[u8], kind: Kind) -> Result<Option<ResponseHead>, Unframed> {
    let parsed = parse_head(bytes, |headers, bytes| {
        let mut res = httparse::Response::new(headers);
        Ok(match res.parse(bytes)? {
            httparse::Status::Complete(n) => httparse::Status::Complete((n, res.code.unwrap_or_default())),
            httparse::Status::Partial => httparse::Status::Partial,
        })
    })?;
    let Some((len, status, fields)) = parsed else { return Ok(None) };
    let then = match (status, kind) {
        (101, _) => Then::Switch,
        (100..=199, _) => Then::Interim,
        (200..=299, Kind::Connect) => Then::Switch,
        (204 | 304, _) | (_, Kind::Head) => Then::Body(Framing::Empty),
        _ => Then::Body(match framing_fields(&fields)? {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) | (None, None) => Framing::UntilClose,
            (None, Some(0)) => Framing::Empty,
            (None, Some(n)) => Framing::Length(n),
        }),
    };
    Ok(Some(ResponseHead { len, then }))
}

/// A head's `Transfer-Encoding` (whether its last coding is `chunked`, and only that one is) and
/// its `Content-Length` (every value the same number).
fn framing_fields(fields: &[(&str, &[u8])]) -> Result<(Option<bool>, Option<u64>), Unframed> {
    let (mut codings, mut length) = (None::<Vec<Vec<u8>>>, None);
    for (name, value) in fields {
        if name.eq_ignore_ascii_case("transfer-encoding") {
            let list = codings.get_or_insert_default();
            list.extend(
                value.split(|&b| b == b',').map(|c| c.trim_ascii().to_ascii_lowercase()).filter(|c| !c.is_empty()),
            );
        } else if name.eq_ignore_ascii_case("content-length") {
            for v in value.split(|&b| b == b',') {
                let v = v.trim_ascii();
                let n = (!v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
                    .then(|| v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
                    .ok_or(Unframed("a Content-Length that is not a number"))?;
                if length.replace(n).is_some_and(|m| m != n) {
                    return Err(Unframed("Content-Lengths that differ"));
                }
            }
        }
    }
    let chunked = codings
        .map(|c| c.last().is_some_and(|l| l == b"chunked") && c.iter().filter(|x| *x == b"chunked").count() == 1);
    Ok((chunked, length))
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk's size, after `digits` hex digits.
    Size {
        digits: u8,
        size: u64,
    },
    /// In a chunk extension, before the size line's CR.
    Extension {
        size: u64,
    },
    /// After a size line's CR.
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
}

/// Follows one message body as its bytes go by, without keeping them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Body(Part);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

impl Body {
    pub fn new(framing: Framing) -> Self {
        Body(match framing {
            Framing::Empty | Framing::Length(0) => Part::Done,
            Framing::Length(n) => Part::Length(n),
            Framing::Chunked => Part::Chunked(Chunk::Size { digits: 0, size: 0 }),
            Framing::UntilClose => Part::UntilClose,
        })
    }

    pub fn done(&self) -> bool {
        self.0 == Part::Done
    }

    /// How many of `bytes` belong to the body; after them it may be done.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, Unframed> {
        let mut used = 0;
        while used < bytes.len() {
            let left = (bytes.len() - used) as u64;
            match &mut self.0 {
                Part::Done => break,
                Part::UntilClose => return Ok(bytes.len()),
                Part::Length(n) | Part::Chunked(Chunk::Data(n)) => {
                    let take = (*n).min(left);
                    used += take as usize;
                    *n -= take;
                    if *n == 0 {
                        self.0 =
                            if matches!(self.0, Part::Length(_)) { Part::Done } else { Part::Chunked(Chunk::DataCr) };
                    }
                }
                Part::Chunked(chunk) => {
                    let next = step(*chunk, bytes[used])?;
                    used += 1;
                    self.0 = next.map_or(Part::Done, Part::Chunked);
                }
            }
        }
        Ok(used)
    }
}

/// One byte of a chunked body's framing: where it leaves the body (`None`: at its end).
fn step(at: Chunk, b: u8) -> Result<Option<Chunk>, Unframed> {
    let bad = |why| Err(Unframed(why));
    Ok(Some(match (at, b) {
        (Chunk::Size { digits, size }, _) if b.is_ascii_hexdigit() => {
            if digits == SIZE_DIGITS {
                return bad("a chunk size too large");
            }
            let d = u64::from((b as char).to_digit(16).unwrap_or_default());
            Chunk::Size { digits: digits + 1, size: size << 4 | d }
        }
        (Chunk::Size { digits: 0, .. }, _) => return bad("a chunk size that is not hex"),
        (Chunk::Size { size, .. } | Chunk::Extension { size }, b'\r') => Chunk::SizeLf { size },
        (Chunk::Size { size, .. }, b';' | b' ' | b'\t') | (Chunk::Extension { size }, _) if b != b'\n' && b != 0 => {
            Chunk::Extension { size }
        }
        (Chunk::SizeLf { size: 0 }, b'\n') => Chunk::TrailerStart,
        (Chunk::SizeLf { size }, b'\n') => Chunk::Data(size),
        (Chunk::DataCr, b'\r') => Chunk::DataLf,
        (Chunk::DataLf, b'\n') => Chunk::Size { digits: 0, size: 0 },
        (Chunk::TrailerStart, b'\r') => Chunk::EndLf,
        (Chunk::EndLf, b'\n') => return Ok(None),
        (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
        (Chunk::TrailerStart | Chunk::Trailer, _) if b != b'\n' => Chunk::Trailer,
        (Chunk::TrailerLf, b'\n') => Chunk::TrailerStart,
        _ => return bad("bad chunk framing"),
    }))
}

/// How far the original destination has answered.
#[derive(Debug, Default, Clone, Copy)]
struct Answered {
    /// Final answers sent on to the client in full.
    done: u64,
    /// The connection became a tunnel.
    switched: bool,
    /// The answers can no longer be framed: no head may be handed over.
    lost: bool,
    /// The original destination has closed.
    ended: bool,
}

/// How a relayed connection ended.
pub enum Relayed {
    /// Both sides are done: the bytes sent each way, and why requests stopped being sent on, if
    /// a head or body could not be (`timeout`, `oversized`, `malformed`).
    Ended { up: u64, down: u64, refused: Option<&'static str> },
    /// A later request names a routed host: the client's connection from its head on.
    Routed { client: Prefixed, up: u64, down: u64 },
}

/// Relays a plain-HTTP connection between the client and its original destination, request by
/// request, until both are done or a request names a host `routed` takes. A begun head must
/// decide within `head_wait`.
pub async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    routed: impl Fn(&str) -> bool,
    head_wait: Duration,
) -> io::Result<Relayed> {
    let (kinds, pending) = mpsc::unbounded_channel();
    let (answered, progress) = watch::channel(Answered::default());
    let mut held = BytesMut::new();
    let (mut up, mut down) = (0, 0);
    let next = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let requests =
            Requests { from: &mut cr, to: &mut uw, buf: &mut held, kinds, progress, sent: 0, bytes: &mut up };
        let requests = requests.run(&routed, head_wait);
        let responses = responses(&mut ur, &mut cw, pending, &answered, &mut down);
        tokio::pin!(requests, responses);
        let (mut next, mut answers_done) = (None, false);
        loop {
            tokio::select! {
                r = &mut requests, if next.is_none() => match r? {
                    Next::Routed => break Next::Routed,
                    r => next = Some(r),
                },
                r = &mut responses, if !answers_done => {
                    r?;
                    answers_done = true;
                }
            }
            if answers_done && let Some(next) = next.take() {
                break next;
            }
        }
    };
    Ok(match next {
        Next::Routed => Relayed::Routed { client: Prefixed { first: held.freeze(), stream: client }, up, down },
        Next::Ended => Relayed::Ended { up, down, refused: None },
        Next::Refused(why) => Relayed::Ended { up, down, refused: Some(why) },
    })
}

/// Why the request side stopped.
enum Next {
    Ended,
    Routed,
    Refused(&'static str),
}

/// What is at a request boundary.
enum Head {
    End,
    Pass(RequestHead),
    Routed,
    Refused(&'static str),
}

/// The client-to-destination side.
struct Requests<'a, 'c, 'u> {
    from: &'a mut ReadHalf<'c>,
    to: &'a mut WriteHalf<'u>,
    /// Read from the client and not yet sent on.
    buf: &'a mut BytesMut,
    kinds: mpsc::UnboundedSender<Kind>,
    progress: watch::Receiver<Answered>,
    sent: u64,
    bytes: &'a mut u64,
}

impl Requests<'_, '_, '_> {
    async fn run(mut self, routed: &impl Fn(&str) -> bool, head_wait: Duration) -> io::Result<Next> {
        let next = loop {
            let head = match self.next_head(routed, head_wait).await? {
                Head::Pass(head) => head,
                Head::End => break Next::Ended,
                Head::Refused(why) => break Next::Refused(why),
                Head::Routed => {
                    let sent = self.sent;
                    let at = self.answered(|a| a.done >= sent).await;
                    if at.done >= sent && !at.lost && !at.ended {
                        return Ok(Next::Routed);
                    }
                    break if at.lost { Next::Refused("malformed") } else { Next::Ended };
                }
            };
            // Before the head goes: its answer may come back at once.
            let _ = self.kinds.send(head.kind);
            self.sent += 1;
            self.send(head.len).await?;
            let mut body = Body::new(head.body);
            while !body.done() {
                if self.buf.is_empty() && !self.fill().await? {
                    break;
                }
                match body.feed(self.buf) {
                    Ok(n) => self.send(n).await?,
                    Err(_) => return self.stop(Next::Refused("malformed")).await,
                }
            }
            if !body.done() {
                break Next::Ended;
            }
            if matches!(head.kind, Kind::Connect | Kind::Upgrade) {
                let sent = self.sent;
                if self.answered(|a| a.done >= sent).await.switched {
                    tunnel(self.from, self.to, self.buf, self.bytes).await?;
                    break Next::Ended;
                }
            }
        };
        self.stop(next).await
    }

    /// Ends the requests: the destination sees the client's end, and answers what it has.
    async fn stop(self, next: Next) -> io::Result<Next> {
        // A destination that has gone already cannot be told.
        let _ = self.to.shutdown().await;
        Ok(next)
    }

    /// Waits until `enough`, or until no more answers can come: the progress then.
    async fn answered(&mut self, enough: impl Fn(&Answered) -> bool) -> Answered {
        let at = self.progress.wait_for(|a| enough(a) || a.switched || a.lost || a.ended).await;
        at.map_or(Answered { ended: true, ..Answered::default() }, |a| *a)
    }

    /// Sends the first `n` held bytes on.
    async fn send(&mut self, n: usize) -> io::Result<()> {
        *self.bytes += forward(self.to, self.buf, n).await?;
        Ok(())
    }

    /// Reads more from the client: false at its end.
    async fn fill(&mut self) -> io::Result<bool> {
        self.buf.reserve(READ);
        Ok(self.from.read_buf(self.buf).await? > 0)
    }

    /// Reads until the next head decides, or the client ends.
    async fn next_head(&mut self, routed: &impl Fn(&str) -> bool, head_wait: Duration) -> io::Result<Head> {
        let mut deadline = None;
        loop {
            // Empty lines before a request line are allowed (RFC 9112 §2.2); they go on as they came.
            let blank = self.buf.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
            self.send(blank).await?;
            if !self.buf.is_empty() {
                let seen = &self.buf[..self.buf.len().min(SNIFF_BYTES)];
                match classify(seen) {
                    Some(Sniffed::Http(Some(host))) if routed(&host) => return Ok(Head::Routed),
                    Some(Sniffed::Http(_)) => match request_head(seen) {
                        Ok(Some(head)) => return Ok(Head::Pass(head)),
                        Ok(None) if seen.len() >= SNIFF_BYTES => return Ok(Head::Refused("oversized")),
                        Ok(None) => {}
                        Err(_) => return Ok(Head::Refused("malformed")),
                    },
                    Some(Sniffed::Oversized(_)) => return Ok(Head::Refused("oversized")),
                    Some(_) => return Ok(Head::Refused("malformed")),
                    None => {}
                }
                deadline.get_or_insert(Instant::now() + head_wait);
            }
            let more = match deadline {
                None => self.fill().await?,
                Some(at) => match tokio::time::timeout_at(at, self.fill()).await {
                    Ok(more) => more?,
                    Err(_) => return Ok(Head::Refused("timeout")),
                },
            };
            if !more {
                return Ok(Head::End);
            }
        }
    }
}

/// The destination-to-client side: each answer sent on as it comes, counted once whole.
async fn responses(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    mut kinds: mpsc::UnboundedReceiver<Kind>,
    answered: &watch::Sender<Answered>,
    bytes: &mut u64,
) -> io::Result<()> {
    let mut buf = BytesMut::new();
    let mut pending = None;
    let result = async {
        loop {
            let head = loop {
                if !buf.is_empty() {
                    // The request it answers was queued before it went: an answer no request
                    // waits for (a 408 before a close) is read as a plain one.
                    let kind = *pending.get_or_insert_with(|| kinds.try_recv().unwrap_or(Kind::Plain));
                    match response_head(&buf[..buf.len().min(SNIFF_BYTES)], kind) {
                        Ok(Some(head)) => break Some(head),
                        Ok(None) if buf.len() < SNIFF_BYTES => {}
                        _ => break None,
                    }
                }
                buf.reserve(READ);
                if from.read_buf(&mut buf).await? == 0 {
                    let n = buf.len();
                    *bytes += forward(to, &mut buf, n).await?;
                    return Ok(());
                }
            };
            let Some(head) = head else {
                // Not framed: the bytes still go on, but nothing after them is handed over.
                answered.send_modify(|a| a.lost = true);
                return tunnel(from, to, &mut buf, bytes).await;
            };
            *bytes += forward(to, &mut buf, head.len).await?;
            let framing = match head.then {
                Then::Interim => continue,
                Then::Switch => {
                    answered.send_modify(|a| a.switched = true);
                    return tunnel(from, to, &mut buf, bytes).await;
                }
                Then::Body(framing) => framing,
            };
            pending = None;
            let mut body = Body::new(framing);
            while !body.done() {
                if buf.is_empty() {
                    buf.reserve(READ);
                    if from.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                }
                match body.feed(&buf) {
                    Ok(n) => *bytes += forward(to, &mut buf, n).await?,
                    Err(_) => {
                        answered.send_modify(|a| a.lost = true);
                        return tunnel(from, to, &mut buf, bytes).await;
                    }
                }
            }
            answered.send_modify(|a| a.done += 1);
        }
    }
    .await;
    answered.send_modify(|a| a.ended = true);
    // The client sees the destination's end, as it would directly.
    let _ = to.shutdown().await;
    result
}

/// Sends the first `n` bytes of `buf` on: how many.
async fn forward(to: &mut WriteHalf<'_>, buf: &mut BytesMut, n: usize) -> io::Result<u64> {
    to.write_all(&buf[..n]).await?;
    buf.advance(n);
    Ok(n as u64)
}

/// Sends what is held, then every byte until `from` ends.
async fn tunnel(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    buf: &mut BytesMut,
    bytes: &mut u64,
) -> io::Result<()> {
    *bytes += forward(to, buf, buf.len()).await?;
    *bytes += tokio::io::copy(from, to).await?;
    Ok(())
}

/// A connection whose first bytes were read already: they are read again first.
pub struct Prefixed {
    first: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.first.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, out);
        }
        let n = out.remaining().min(this.first.len());
        out.put_slice(&this.first.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{convert::Infallible, time::Duration};

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::rt::TokioIo;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
        sync::mpsc,
    };

    use super::*;

    fn req(text: &str) -> Result<Option<RequestHead>, Unframed> {
        request_head(text.as_bytes())
    }

    fn framing(head: &str) -> Framing {
        req(head).unwrap().unwrap().body
    }

    #[test]
    fn request_heads_are_framed_as_servers_frame_them() {
        let get = "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";
        assert_eq!(req(get).unwrap(), Some(RequestHead { len: get.len(), kind: Kind::Plain, body: Framing::Empty }));
        assert_eq!(req("GET / HTTP/1.1\r\nHost: a.te").unwrap(), None, "a head still coming");
        assert_eq!(framing("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"), Framing::Length(12));
        assert_eq!(framing("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), Framing::Empty);
        assert_eq!(framing("POST / HTTP/1.1\r\nContent-Length: 4, 4\r\nContent-Length: 4\r\n\r\n"), Framing::Length(4));
        assert_eq!(framing("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"), Framing::Chunked);
        assert_eq!(
            framing("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Framing::Chunked
        );
        let kind = |head: &str| req(head).unwrap().unwrap().kind;
        assert_eq!(kind("HEAD / HTTP/1.1\r\n\r\n"), Kind::Head);
        assert_eq!(kind("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n"), Kind::Connect);
        assert_eq!(kind("GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"), Kind::Upgrade);
        // More headers than one parse has room for.
        let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
        assert_eq!(framing(&format!("POST / HTTP/1.1\r\n{many}Content-Length: 3\r\n\r\n")), Framing::Length(3));
        // Whatever a server could read another way is refused, never guessed at.
        for (head, why) in [
            ("POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n", "Content-Lengths that differ"),
            ("POST / HTTP/1.1\r\nContent-Length: 2, 3\r\n\r\n", "Content-Lengths that differ"),
            ("POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\n", "a Content-Length that is not a number"),
            (
                "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                "a Content-Length that is not a number",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both Transfer-Encoding and Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                "a request Transfer-Encoding that does not end in chunked",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
                "a request Transfer-Encoding that does not end in chunked",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "a request Transfer-Encoding that does not end in chunked",
            ),
            ("POST / HTTP/1.1\r\nContent-Length : 5\r\n\r\n", "a head the parser refuses"),
        ] {
            assert_eq!(req(head), Err(Unframed(why)), "{head:?}");
        }
    }

    #[test]
    fn response_heads_say_what_follows() {
        let then = |head: &str, kind| response_head(head.as_bytes(), kind).unwrap().unwrap().then;
        assert_eq!(then("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", Kind::Upgrade), Then::Switch);
        assert_eq!(then("HTTP/1.1 100 Continue\r\n\r\n", Kind::Plain), Then::Interim);
        assert_eq!(then("HTTP/1.1 200 Connection established\r\n\r\n", Kind::Connect), Then::Switch);
        assert_eq!(
            then("HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n", Kind::Connect),
            Then::Body(Framing::Empty)
        );
        assert_eq!(then("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Kind::Head), Then::Body(Framing::Empty));
        assert_eq!(
            then("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", Kind::Plain),
            Then::Body(Framing::Empty)
        );
        assert_eq!(then("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Kind::Plain), Then::Body(Framing::Length(5)));
        assert_eq!(
            then("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", Kind::Plain),
            Then::Body(Framing::Chunked)
        );
        assert_eq!(
            then("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", Kind::Plain),
            Then::Body(Framing::UntilClose)
        );
        assert_eq!(then("HTTP/1.0 200 OK\r\n\r\n", Kind::Plain), Then::Body(Framing::UntilClose));
        assert!(response_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", Kind::Plain).is_err());
        assert_eq!(response_head(b"HTTP/1.1 200 OK\r\n", Kind::Plain).unwrap(), None);
    }

    /// Feeds `bytes` to a body in pieces of `size`: the bytes it took.
    fn taken(framing: Framing, bytes: &[u8], size: usize) -> Result<usize, Unframed> {
        let mut body = Body::new(framing);
        let mut used = 0;
        for piece in bytes.chunks(size) {
            let n = body.feed(piece)?;
            used += n;
            if body.done() {
                return Ok(used);
            }
            assert_eq!(n, piece.len(), "a body not done takes all it is given");
        }
        Ok(used)
    }

    #[test]
    fn a_chunked_body_ends_where_its_framing_says_in_any_pieces() {
        let body = b"5;name=\"v\"\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\n";
        let next = b"GET / HTTP/1.1\r\n\r\n";
        let all = [&body[..], next].concat();
        for size in 1..=all.len() {
            assert_eq!(taken(Framing::Chunked, &all, size).ok(), Some(body.len()), "pieces of {size}");
        }
        assert_eq!(taken(Framing::Chunked, b"0\r\n\r\nrest", 3).ok(), Some(5));
        assert_eq!(taken(Framing::Length(4), b"abcdefg", 3).ok(), Some(4));
        for bad in [
            &b"zz\r\nhello\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloX",
            b"11111111111111111\r\n",
            b"\r\n",
            b"5\r\nhello\r\n0\r\nX\n",
        ] {
            assert!(taken(Framing::Chunked, bad, 1).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// A real HTTP/1.1 server (hyper, keep-alive): it answers `GET` with the host it was asked
    /// for, `/slow` after 200 ms, `HEAD` with a length and no body, an upgrade by echoing; every
    /// request it gets goes to the channel as `method host body`.
    async fn origin() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                let service = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
                        if req.headers().contains_key("upgrade") {
                            let upgrade = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(upgrade.await.unwrap());
                                let mut buf = [0u8; 1024];
                                while let Ok(n @ 1..) = io.read(&mut buf).await {
                                    io.write_all(&buf[..n]).await.unwrap();
                                }
                            });
                            let _ = seen.send(format!("UPGRADE {host}"));
                            let res = http::Response::builder()
                                .status(101)
                                .header("upgrade", "echo")
                                .header("connection", "upgrade");
                            return Ok::<_, Infallible>(res.body(Full::new(Bytes::new())).unwrap());
                        }
                        let method = req.method().to_string();
                        let slow = req.uri().path() == "/slow";
                        let body = match req.into_body().collect().await {
                            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                            Err(_) => "<cut>".to_owned(),
                        };
                        let _ = seen.send(format!("{method} {host} {body}"));
                        if slow {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        let text = format!("hello {host}");
                        Ok(http::Response::builder()
                            .header("content-length", text.len())
                            .body(Full::new(Bytes::from(text)))
                            .unwrap())
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades(),
                );
            }
        });
        (addr, rx)
    }

    /// A client connected through `relay` to the origin (`api.llm.test` is the routed host).
    async fn relayed(origin: std::net::SocketAddr) -> (TcpStream, tokio::task::JoinHandle<io::Result<Relayed>>) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(front.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = front.accept().await.unwrap();
        let upstream = TcpStream::connect(origin).await.unwrap();
        let relay = relay(accepted, upstream, |h| h == "api.llm.test", Duration::from_millis(300));
        (client, tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(10), relay).await.unwrap() }))
    }

    /// Reads until what has arrived ends with `end`.
    async fn read_until(client: &mut TcpStream, end: &str) -> String {
        let mut got = Vec::new();
        while !got.ends_with(end.as_bytes()) {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed before {end:?}: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    const ROUTED: &str = "POST /v1/chat/completions HTTP/1.1\r\nHost: api.llm.test\r\nContent-Length: 2\r\n\r\n{}";

    #[tokio::test]
    async fn a_later_request_to_a_routed_host_is_handed_over_and_never_reaches_the_destination() {
        let (origin, mut seen) = origin().await;
        let (mut client, relay) = relayed(origin).await;
        let (chunked, head) = (
            "POST /a HTTP/1.1\r\nHost: other.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "HEAD / HTTP/1.1\r\nHost: other.test\r\n\r\n",
        );
        client.write_all(chunked.as_bytes()).await.unwrap();
        read_until(&mut client, "hello other.test").await;
        client.write_all(head.as_bytes()).await.unwrap();
        read_until(&mut client, "\r\n\r\n").await;
        client.write_all(ROUTED.as_bytes()).await.unwrap();
        let Relayed::Routed { client: mut rest, up, .. } = relay.await.unwrap().unwrap() else {
            panic!("not handed over")
        };
        let mut again = vec![0u8; ROUTED.len()];
        rest.read_exact(&mut again).await.unwrap();
        assert_eq!(again, ROUTED.as_bytes(), "the routed request is read again whole");
        assert_eq!(seen.recv().await.unwrap(), "POST other.test abc");
        assert_eq!(seen.recv().await.unwrap(), "HEAD other.test ");
        assert!(seen.try_recv().is_err(), "the routed request never reached the destination");
        assert_eq!(up, (chunked.len() + head.len()) as u64, "the bytes passed on");
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_before_a_routed_one_is_handed_over() {
        let (origin, mut seen) = origin().await;
        let (mut client, relay) = relayed(origin).await;
        let pipelined = format!("GET /slow HTTP/1.1\r\nHost: other.test\r\n\r\n{ROUTED}");
        client.write_all(pipelined.as_bytes()).await.unwrap();
        let Relayed::Routed { client: mut rest, .. } = relay.await.unwrap().unwrap() else { panic!("not handed over") };
        // The slow answer went to the client in full before the hand-over.
        read_until(&mut client, "hello other.test").await;
        let mut again = vec![0u8; ROUTED.len()];
        rest.read_exact(&mut again).await.unwrap();
        assert_eq!(again, ROUTED.as_bytes());
        assert_eq!(seen.recv().await.unwrap(), "GET other.test ");
        assert!(seen.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_routed_head_inside_a_body_is_only_body() {
        let (origin, mut seen) = origin().await;
        let (mut client, relay) = relayed(origin).await;
        let smuggled =
            format!("POST / HTTP/1.1\r\nHost: other.test\r\nContent-Length: {}\r\n\r\n{ROUTED}", ROUTED.len());
        client.write_all(smuggled.as_bytes()).await.unwrap();
        read_until(&mut client, "hello other.test").await;
        client.shutdown().await.unwrap();
        let Relayed::Ended { refused: None, .. } = relay.await.unwrap().unwrap() else { panic!("not passed through") };
        assert_eq!(seen.recv().await.unwrap(), format!("POST other.test {ROUTED}"));
    }

    #[tokio::test]
    async fn what_cannot_be_framed_is_closed_after_the_answers_before_it() {
        let (origin, mut seen) = origin().await;
        for (bad, why) in [
            ("POST / HTTP/1.1\r\nHost: other.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "malformed"),
            ("POST / HTTP/1.1\r\nHost: other.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed"),
            ("SSH-2.0-OpenSSH_9.2\r\n", "malformed"),
            ("GET / HTTP/1.1\r\nHost: other.test\r\nX-Slow: ", "timeout"),
        ] {
            let (mut client, relay) = relayed(origin).await;
            client.write_all(format!("GET / HTTP/1.1\r\nHost: other.test\r\n\r\n{bad}").as_bytes()).await.unwrap();
            read_until(&mut client, "hello other.test").await;
            let Relayed::Ended { refused, .. } = relay.await.unwrap().unwrap() else { panic!("handed over") };
            assert_eq!(refused, Some(why), "{bad:?}");
            let mut rest = vec![];
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "closed after the answer");
            assert_eq!(seen.recv().await.unwrap(), "GET other.test ");
            // A chunked head goes on; its bad framing does not, so the destination sees it cut.
            if bad.contains("zz") {
                assert_eq!(seen.recv().await.unwrap(), "POST other.test <cut>");
            }
            assert!(seen.try_recv().is_err(), "{bad:?} was not sent on");
        }
    }

    #[tokio::test]
    async fn an_upgraded_connection_is_a_tunnel() {
        let (origin, mut seen) = origin().await;
        let (mut client, relay) = relayed(origin).await;
        client
            .write_all(b"GET /ws HTTP/1.1\r\nHost: other.test\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, "\r\n\r\n").await;
        // Past the switch, bytes are not requests, even when they look like one.
        client.write_all(ROUTED.as_bytes()).await.unwrap();
        assert_eq!(read_until(&mut client, "{}").await, ROUTED);
        client.shutdown().await.unwrap();
        let mut rest = vec![];
        client.read_to_end(&mut rest).await.unwrap();
        let Relayed::Ended { refused: None, .. } = relay.await.unwrap().unwrap() else { panic!("handed over") };
        assert_eq!(seen.recv().await.unwrap(), "UPGRADE other.test");
    }
}
