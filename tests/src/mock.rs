//! A scriptable mock LLM provider speaking the OpenAI and Anthropic APIs, streamed and not.
//! Each call takes the next scripted behaviour (or the one an `x-mock` header names): status
//! codes with retry-after, delays, broken, truncated and stalled streams. Calls are recorded.

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc};

#[derive(Clone, Debug, PartialEq)]
pub enum Behavior {
    Ok,
    /// Answer with this status and an error body, with `retry-after` seconds if given.
    Status(u16, Option<u64>),
    /// Wait before sending the response head.
    Delay(Duration),
    /// Stream this many chunks, then break the connection.
    BreakAfter(usize),
    /// Stream this many chunks, then end cleanly without the end marker.
    TruncateAfter(usize),
    /// Stream this many chunks, then send nothing more (a whole answer: its head, then nothing).
    StallAfter(usize),
    /// Close the connection without any response.
    Drop,
}

impl Behavior {
    /// Parses the `x-mock` header: `ok`, `status:503`, `status:429:2`, `delay:200`, `break:3`,
    /// `truncate:3`, `stall:3`, `drop` (times in milliseconds).
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split(':');
        let kind = parts.next()?;
        let n = |p: Option<&str>| p.and_then(|v| v.parse::<u64>().ok());
        let (a, b) = (parts.next(), parts.next());
        Some(match kind {
            "ok" => Self::Ok,
            "status" => Self::Status(n(a)? as u16, n(b)),
            "delay" => Self::Delay(Duration::from_millis(n(a)?)),
            "break" => Self::BreakAfter(n(a)? as usize),
            "truncate" => Self::TruncateAfter(n(a)? as usize),
            "stall" => Self::StallAfter(n(a)? as usize),
            "drop" => Self::Drop,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Recorded {
    /// When the call arrived.
    pub at: tokio::time::Instant,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

pub struct MockState {
    script: Mutex<VecDeque<Behavior>>,
    /// What a call does when neither the script nor an `x-mock` header says.
    default: Mutex<Behavior>,
    calls: AtomicUsize,
    /// Requests being answered now, and the queue `/metrics` reports, as vLLM's names them.
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
    /// Reads of `/metrics`.
    scrapes: AtomicUsize,
    recorded: Mutex<Vec<Recorded>>,
    /// Whether calls are recorded (off for long runs, where the record would grow without end).
    record: AtomicBool,
    /// Content chunks per streamed response.
    pub chunks: usize,
    pub chunk_delay: Duration,
    pub name: String,
}

#[derive(Clone)]
pub struct MockProvider {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
}

impl MockProvider {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> Self {
        Self::start_with("mock", 5, Duration::ZERO, "127.0.0.1:0".parse().unwrap_or(([127, 0, 0, 1], 0).into())).await
    }

    pub async fn start_with(name: &str, chunks: usize, chunk_delay: Duration, addr: SocketAddr) -> Self {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => panic_free_exit(&format!("mock provider cannot bind {addr}: {e}")),
        };
        let addr = listener.local_addr().unwrap_or(addr);
        let state = Arc::new(MockState {
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(Behavior::Ok),
            calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            scrapes: AtomicUsize::new(0),
            recorded: Mutex::new(vec![]),
            record: AtomicBool::new(true),
            chunks,
            chunk_delay,
            name: name.to_owned(),
        });
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(serve(st, req).await) }
                    });
                    let _ = Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Self { addr, state }
    }

    /// Base URL as a backend names it: `http://127.0.0.1:PORT/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues behaviours for the next calls, in order.
    pub fn script(&self, behaviors: impl IntoIterator<Item = Behavior>) {
        self.state.script.lock().extend(behaviors);
    }

    /// What every later call does unless scripted otherwise (a canary that starts failing).
    pub fn set_default(&self, behavior: Behavior) {
        *self.state.default.lock() = behavior;
    }

    /// The queue depth `/metrics` reports (`vllm:num_requests_waiting`).
    pub fn set_waiting(&self, n: usize) {
        self.state.waiting.store(n, Ordering::SeqCst);
    }

    /// Reads of `/metrics` so far.
    pub fn scrapes(&self) -> usize {
        self.state.scrapes.load(Ordering::SeqCst)
    }

    /// Calls of the LLM API (not `/metrics`).
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Stops (or resumes) recording calls; they are still counted.
    pub fn set_recording(&self, on: bool) {
        self.state.record.store(on, Ordering::SeqCst);
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.state.recorded.lock().clone()
    }
}

fn panic_free_exit(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(1)
}

/// A body fed from a channel; an `Err` item breaks the connection.
pub struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

type MockBody = http_body_util::Either<http_body_util::Full<Bytes>, ChannelBody>;

fn full(status: StatusCode, body: Value) -> Response<MockBody> {
    let mut r = Response::new(http_body_util::Either::Left(http_body_util::Full::new(Bytes::from(body.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

async fn serve(st: Arc<MockState>, req: Request<Incoming>) -> Response<MockBody> {
    if req.uri().path() == "/metrics" {
        st.scrapes.fetch_add(1, Ordering::SeqCst);
        let text = format!(
            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"mock\"}} {}\nvllm:num_requests_waiting{{model_name=\"mock\"}} {}\n",
            st.in_flight.load(Ordering::SeqCst),
            st.waiting.load(Ordering::SeqCst)
        );
        let mut r = Response::new(http_body_util::Either::Left(http_body_util::Full::new(Bytes::from(text))));
        r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4"));
        return r;
    }
    st.in_flight.fetch_add(1, Ordering::SeqCst);
    let r = answer(&st, req).await;
    st.in_flight.fetch_sub(1, Ordering::SeqCst);
    r
}

async fn answer(st: &Arc<MockState>, req: Request<Incoming>) -> Response<MockBody> {
    let st = st.clone();
    let n = st.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let path = req.uri().path().to_owned();
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let at = tokio::time::Instant::now();
    if st.record.load(Ordering::Relaxed) {
        st.recorded.lock().push(Recorded {
            at,
            path: path.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    }
    let behavior = parts
        .headers
        .get("x-mock")
        .and_then(|v| v.to_str().ok())
        .and_then(Behavior::parse)
        .or_else(|| st.script.lock().pop_front())
        .unwrap_or_else(|| st.default.lock().clone());
    let anthropic = path.ends_with("/messages");
    match behavior {
        Behavior::Status(code, retry_after) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r =
                full(status, json!({"error": {"message": format!("mock {code}"), "type": "mock_error", "code": code}}));
            if let Some(s) = retry_after {
                r.headers_mut().insert(header::RETRY_AFTER, s.into());
            }
            return r;
        }
        Behavior::Delay(d) => tokio::time::sleep(d).await,
        Behavior::Drop => {
            // A body that errors at once makes the server drop the connection.
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Err(std::io::Error::other("dropped")));
            let mut r = Response::new(http_body_util::Either::Right(ChannelBody(rx)));
            r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            return r;
        }
        _ => {}
    }
    if path == "/v1/models" {
        return full(
            StatusCode::OK,
            json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}]}),
        );
    }
    let model = body.get("model").and_then(Value::as_str).unwrap_or("mock-model").to_owned();
    let prompt_tokens = count_words(&body);
    // A last message starting with `echo: ` is answered with the rest, in 5-character chunks.
    let words: Vec<String> = match echo_text(&body) {
        Some(text) => text.chars().collect::<Vec<_>>().chunks(5).map(|c| c.iter().collect()).collect(),
        None => (0..st.chunks).map(|i| format!("w{i} ")).collect(),
    };
    let chunks = words.len();
    let text: String = words.concat();
    let id = format!("{}-{n}", st.name);
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if path.ends_with("/embeddings") {
        return full(
            StatusCode::OK,
            json!({"object": "list", "model": model, "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                   "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}),
        );
    }
    if !stream {
        if let Behavior::StallAfter(_) = behavior {
            // The head goes out; the body never comes (until the client gives up).
            let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
            tokio::spawn(async move { tx.closed().await });
            let mut r = Response::new(http_body_util::Either::Right(ChannelBody(rx)));
            r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            return r;
        }
        let usage_oa = json!({"prompt_tokens": prompt_tokens, "completion_tokens": chunks, "total_tokens": prompt_tokens + chunks});
        return full(
            StatusCode::OK,
            if anthropic {
                json!({"id": id, "type": "message", "role": "assistant", "model": model,
                       "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
                       "usage": {"input_tokens": prompt_tokens, "output_tokens": chunks}})
            } else if path.ends_with("/chat/completions") {
                json!({"id": id, "object": "chat.completion", "created": 0, "model": model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                       "usage": usage_oa})
            } else {
                json!({"id": id, "object": "text_completion", "created": 0, "model": model,
                       "choices": [{"index": 0, "text": text, "finish_reason": "stop"}], "usage": usage_oa})
            },
        );
    }
    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let (tx, rx) = mpsc::channel(16);
    let chunk_delay = st.chunk_delay;
    tokio::spawn(async move {
        let send = |b: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(Bytes::from(b))).await.is_ok() }
        };
        let events = sse_events(anthropic, &id, &model, &words, prompt_tokens, include_usage);
        // The content events sit between a fixed head (1 for Anthropic's two, 0 for OpenAI) and tail.
        let head = if anthropic { 2 } else { 0 };
        for (i, ev) in events.into_iter().enumerate() {
            let content_index = i.checked_sub(head);
            let limit = match &behavior {
                Behavior::BreakAfter(k) | Behavior::TruncateAfter(k) | Behavior::StallAfter(k) => Some(*k),
                _ => None,
            };
            if let (Some(k), Some(ci)) = (limit, content_index)
                && ci >= k.min(chunks)
            {
                match behavior {
                    Behavior::BreakAfter(_) => {
                        // Let what was sent reach the wire before the connection breaks.
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        let _ = tx.send(Err(std::io::Error::other("mock broke the stream"))).await;
                    }
                    Behavior::StallAfter(_) => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    _ => {}
                }
                return;
            }
            if !chunk_delay.is_zero() && i > 0 {
                tokio::time::sleep(chunk_delay).await;
            }
            if !send(ev).await {
                return;
            }
        }
    });
    let mut r = Response::new(http_body_util::Either::Right(ChannelBody(rx)));
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    r
}

fn sse_events(
    anthropic: bool,
    id: &str,
    model: &str,
    words: &[String],
    prompt: usize,
    include_usage: bool,
) -> Vec<String> {
    let mut out = vec![];
    let data = |v: Value| format!("data: {v}\n\n");
    if anthropic {
        let ev = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
        out.push(ev("message_start", json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": prompt, "output_tokens": 1}}})));
        out.push(ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ));
        for w in words {
            out.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
            ));
        }
        out.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
        out.push(ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": words.len()}})));
        out.push(ev("message_stop", json!({"type": "message_stop"})));
    } else {
        for w in words {
            out.push(data(json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": w}, "finish_reason": null}]})));
        }
        out.push(data(json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})));
        if include_usage {
            out.push(data(json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
                                 "usage": {"prompt_tokens": prompt, "completion_tokens": words.len(), "total_tokens": prompt + words.len()}})));
        }
        out.push("data: [DONE]\n\n".into());
    }
    out
}

fn echo_text(body: &Value) -> Option<String> {
    let last = body.get("messages")?.as_array()?.last()?;
    let content = match last.get("content")? {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p.get("text")?.as_str()).collect::<Vec<_>>().join(""),
        _ => return None,
    };
    content.strip_prefix("echo: ").map(str::to_owned)
}

fn count_words(body: &Value) -> usize {
    fn walk(v: &Value) -> usize {
        match v {
            Value::String(s) => s.split_whitespace().count(),
            Value::Array(a) => a.iter().map(walk).sum(),
            Value::Object(o) => o.iter().filter(|(k, _)| *k == "content" || *k == "text").map(|(_, v)| walk(v)).sum(),
            _ => 0,
        }
    }
    ["messages", "prompt", "input"].iter().filter_map(|k| body.get(*k)).map(walk).sum::<usize>().max(1)
}
