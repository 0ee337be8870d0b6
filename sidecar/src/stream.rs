//! Relays a streamed upstream response to the client frame by frame, as it arrives. Watches
//! the SSE for usage and the end marker; passes text through the output guard when a policy
//! scans output; enforces the idle timeout; when the upstream breaks after the first byte,
//! sends an explicit error event and aborts instead of ending cleanly. However the stream
//! ends, it hands its usage and outcome to the request's settlement once.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::{
    body::BoxError,
    error::{Flavor, ProxyError},
    scan::{judge::StreamJudge, stream::OutputGuard},
    settle::{End, Settlement},
    usage::{SseTracker, Usage},
};

enum State {
    Streaming,
    /// The error event went out; once it had time to be flushed, the response is aborted.
    Aborting(Pin<Box<Sleep>>),
    Done,
}

/// Time given to the error event to reach the wire before the connection is cut.
const FLUSH_GRACE: Duration = Duration::from_millis(50);

pub struct Relay {
    first: Option<Bytes>,
    inner: Incoming,
    flavor: Flavor,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    tracker: SseTracker,
    record: Option<(Vec<u8>, usize)>,
    state: State,
    /// Settles the request when the stream ends, or when the relay is dropped before.
    end: Option<Settlement>,
    guard: Option<Box<OutputGuard>>,
    /// Holds what the guard released until the model-based scanners judged it.
    judge: Option<Box<StreamJudge>>,
    /// The upstream completed; the judge still clears what it holds.
    upstream_done: bool,
    blocked: bool,
}

impl Relay {
    /// `first` is the chunk already read when the stream was committed to a backend. The
    /// stream is recorded for the cache when `end` has a cache slot.
    pub fn new(first: Bytes, inner: Incoming, flavor: Flavor, idle: Duration, end: Settlement) -> Self {
        let record_limit = end.cache_limit();
        Self {
            first: Some(first),
            inner,
            flavor,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            tracker: SseTracker::default(),
            record: record_limit.map(|l| (Vec::new(), l)),
            state: State::Streaming,
            end: Some(end),
            guard: None,
            judge: None,
            upstream_done: false,
            blocked: false,
        }
    }

    /// Scans the streamed text with a policy's output scanners before it leaves.
    pub fn with_guard(mut self, guard: OutputGuard) -> Self {
        self.judge = guard.judge().map(Box::new);
        self.guard = Some(Box::new(guard));
        self
    }

    /// Takes an upstream chunk; returns what goes to the client now.
    fn data(&mut self, chunk: Bytes) -> Bytes {
        self.tracker.feed(&chunk);
        self.sleep.as_mut().reset(Instant::now() + self.idle);
        let out = match &mut self.guard {
            None => chunk,
            Some(g) => match g.feed(&chunk) {
                Ok(b) => match &mut self.judge {
                    Some(judge) => {
                        judge.push(&b, &g.take_text());
                        return Bytes::new();
                    }
                    None => b,
                },
                Err(blocked) => return self.blocked_by(&blocked),
            },
        };
        self.keep(&out);
        out
    }

    /// A scanner blocked the answer: the events that say so end the stream.
    fn blocked_by(&mut self, blocked: &crate::scan::Blocked) -> Bytes {
        tracing::info!("{blocked}");
        let events = self.guard.as_ref().map(|g| g.blocked_events(blocked)).unwrap_or_default();
        self.blocked = true;
        self.record = None;
        self.judge = None;
        self.state = State::Done;
        self.finish(false);
        events
    }

    fn keep(&mut self, out: &Bytes) {
        if let Some((buf, limit)) = &mut self.record {
            if buf.len() + out.len() <= *limit {
                buf.extend_from_slice(out);
            } else {
                self.record = None;
            }
        }
    }

    /// Usage as the stream reported it; without a report, the text events stand for tokens.
    fn usage(&self) -> Usage {
        let mut usage = self.tracker.usage;
        if usage.output.is_none() {
            usage.output = Some(self.tracker.content_events);
        }
        usage
    }

    /// The stream ended: completed (`broken` false) or broken after its first byte.
    fn finish(&mut self, broken: bool) {
        if let Some(mut end) = self.end.take() {
            let record = if broken || self.blocked { None } else { self.record.take().map(|(b, _)| Bytes::from(b)) };
            end.end(End { class: "2xx", broken, usage: self.usage(), unknown_usage_costs_estimate: true, record });
        }
    }

    fn fail(&mut self, code: &'static str, message: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let err = ProxyError::new(StatusCode::BAD_GATEWAY, code, message);
        let event = err.sse_event(self.flavor);
        self.finish(true);
        self.state = State::Aborting(Box::pin(tokio::time::sleep(FLUSH_GRACE)));
        Poll::Ready(Some(Ok(Frame::data(event))))
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.state {
            State::Done => return Poll::Ready(None),
            State::Aborting(ref mut grace) => {
                ready!(grace.as_mut().poll(cx));
                this.state = State::Done;
                return Poll::Ready(Some(Err("upstream stream failed after the first byte".into())));
            }
            State::Streaming => {}
        }
        if let Some(first) = this.first.take() {
            let out = this.data(first);
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
        loop {
            if matches!(this.state, State::Done) {
                return Poll::Ready(None);
            }
            if let Some(judge) = &mut this.judge {
                match judge.poll_cleared(cx) {
                    Poll::Ready(Some(Ok(cleared))) => {
                        this.keep(&cleared);
                        if cleared.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(cleared))));
                    }
                    Poll::Ready(Some(Err(blocked))) => {
                        return Poll::Ready(Some(Ok(Frame::data(this.blocked_by(&blocked)))));
                    }
                    Poll::Ready(None) if this.upstream_done => {
                        this.state = State::Done;
                        this.finish(false);
                        return Poll::Ready(None);
                    }
                    _ => {}
                }
                if this.upstream_done {
                    // Only the judgement is waited for; its task wakes this one.
                    return Poll::Pending;
                }
            }
            let Poll::Ready(next) = Pin::new(&mut this.inner).poll_frame(cx) else { break };
            match next {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let out = this.data(chunk);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => return this.fail("upstream_stream_broken", format!("the upstream stream broke: {e}")),
                None if this.tracker.finished && this.judge.is_some() => {
                    if let Some(events) = this.end_judged() {
                        return Poll::Ready(Some(Ok(Frame::data(events))));
                    }
                }
                None if this.tracker.finished => return Poll::Ready(this.end()),
                None => {
                    return this.fail(
                        "upstream_stream_truncated",
                        "the upstream ended the stream before its end marker; the response is incomplete".into(),
                    );
                }
            }
        }
        ready!(this.sleep.as_mut().poll(cx));
        let secs = this.idle.as_secs_f64();
        this.fail("upstream_idle_timeout", format!("the upstream sent nothing for {secs}s in the middle of the stream"))
    }
}

impl Relay {
    /// The upstream completed: release what the guard still holds, then end.
    fn end(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        self.state = State::Done;
        let rest = match &mut self.guard {
            Some(g) => g.finish().unwrap_or_else(|blocked| {
                self.blocked = true;
                g.blocked_events(&blocked)
            }),
            None => Bytes::new(),
        };
        self.keep(&rest);
        self.finish(false);
        (!rest.is_empty()).then(|| Ok(Frame::data(rest)))
    }
}

impl Relay {
    /// The upstream completed with a judge: the guard's last release goes to the judge, which
    /// clears it before the end. Returns the events that end a blocked stream.
    fn end_judged(&mut self) -> Option<Bytes> {
        let (Some(g), Some(judge)) = (&mut self.guard, &mut self.judge) else { return None };
        match g.finish() {
            Ok(rest) => {
                judge.push(&rest, &g.take_text());
                judge.end();
                self.upstream_done = true;
                None
            }
            Err(blocked) => Some(self.blocked_by(&blocked)),
        }
    }
}

impl Drop for Relay {
    /// The client went away before the end.
    fn drop(&mut self) {
        if let Some(mut end) = self.end.take() {
            end.end(End::cancelled(self.usage()));
        }
    }
}
