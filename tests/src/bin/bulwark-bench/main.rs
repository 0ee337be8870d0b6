//! `make bench`: the sidecar's overhead, measured against baselines in the same run.
//!
//! * Added latency at a fixed 1,000 req/s (open loop), p50 and p99, of the sidecar and of a
//!   minimal hyper forwarding proxy (the floor), both over a direct call to the same upstream.
//! * Throughput per core (requests / CPU seconds of the sidecar process) and RSS under load.
//! * Streaming: added latency per chunk, from timestamps the upstream writes into each chunk.
//! * Scanners (`scanners.rs`), the control plane (`control.rs`), rollouts (`rollout.rs`) and the
//!   choice among a model server's replicas (`replicas.rs`), transparent capture
//!   (`transparent.rs`).

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use bulwark_tests::{
    cluster::free_port,
    procfs::{cpu_seconds, memory_kib},
};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
};
use parking_lot::Mutex;
use tokio::{net::TcpListener, sync::mpsc, time::Instant};

#[derive(Parser)]
#[command(name = "bulwark-bench", about = "Benchmarks the sidecar against a direct call and a minimal proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// The latency runs take twice this many rounds of one second per target, interleaved:
    /// the p99 ratio is the median over the rounds, which needs a few dozen on a noisy machine.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Requests per second of the latency runs.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Directory holding the release binaries.
    #[arg(long, default_value = "target/release")]
    bin: PathBuf,
    /// Only the proxy benchmarks (added latency, throughput, RSS, streaming).
    #[arg(long)]
    proxy_only: bool,
    /// Only the scanner benchmarks.
    #[arg(long)]
    scanners_only: bool,
    /// Only the control-plane benchmarks (config propagation, scale).
    #[arg(long)]
    control_only: bool,
    /// Only the rollout benchmarks (time to rollback, overhead of a rollout in progress).
    #[arg(long)]
    rollouts_only: bool,
    /// Only the replica-choice benchmark (round robin against the load-aware choice).
    #[arg(long)]
    replicas_only: bool,
    /// Only the transparent-capture benchmark (root: it runs in a network namespace of its own).
    #[arg(long)]
    transparent_only: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// A minimal hyper forwarding proxy: the practical floor for any proxy.
    Floor {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: String,
    },
}

const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}"#;
const REQUEST: &str = r#"{"model":"bench","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Hello there, how are you today?"}],"max_tokens":64}"#;
const STREAM_CHUNKS: usize = 300;

type Body = BoxBody<Bytes, Infallible>;

mod control;
mod replicas;
mod rollout;
mod scanners;
mod transparent;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match cli.cmd {
        Some(Cmd::Floor { listen, upstream }) => rt.block_on(floor(listen, upstream)),
        None => rt.block_on(async {
            if cli.control_only {
                return control::bench(&cli.bin).await;
            }
            if cli.rollouts_only {
                return rollout::bench(&cli.bin, cli.rate).await;
            }
            if cli.replicas_only {
                return replicas::bench(&cli.bin).await;
            }
            if cli.transparent_only {
                return transparent::bench(&cli.bin, cli.rate).await;
            }
            if !cli.scanners_only {
                bench(cli.seconds, cli.rate, &cli.bin).await?;
            }
            if cli.proxy_only {
                return Ok(());
            }
            scanners::bench(&cli.bin).await?;
            if !cli.scanners_only {
                control::bench(&cli.bin).await?;
                rollout::bench(&cli.bin, cli.rate).await?;
                replicas::bench(&cli.bin).await?;
                transparent::bench(&cli.bin, cli.rate).await?;
            }
            Ok(())
        }),
    }
}

/// The upstream: a fixed completion, or a stream whose chunks carry their send time.
pub(crate) async fn upstream(epoch: Instant) -> anyhow::Result<SocketAddr> {
    upstream_at(([127, 0, 0, 1], 0).into(), epoch).await
}

/// The same upstream at `addr`.
pub(crate) async fn upstream_at(addr: SocketAddr, epoch: Instant) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                    let streamed = memchr_contains(&body, b"\"stream\":true");
                    Ok::<_, Infallible>(if streamed { stream_response(epoch) } else { json_response() })
                });
                let _ = Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}

fn memchr_contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn json_response() -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(COMPLETION.as_bytes())).boxed());
    r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    r
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(http_body::Frame::data(b))))
    }
}

fn stream_response(epoch: Instant) -> Response<Body> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for i in 0..STREAM_CHUNKS {
            // Paced like a fast model, so every chunk crosses the proxy on its own.
            tokio::time::sleep(Duration::from_millis(1)).await;
            let sent = epoch.elapsed().as_nanos();
            let ev = format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i} @{sent}@\"}}}}]}}\n\n"
            );
            if tx.send(Bytes::from(ev)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let mut r = Response::new(ChannelBody(rx).boxed());
    r.headers_mut().insert("content-type", http::HeaderValue::from_static("text/event-stream"));
    r
}

async fn floor(listen: SocketAddr, upstream: String) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("{}", listener.local_addr()?);
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).build(http);
    let upstream = Arc::new(upstream);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                forward(client.clone(), upstream.clone(), req)
            });
            let _ = Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: Arc<String>,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, BoxError> {
    *req.uri_mut() = format!("{upstream}{}", req.uri().path()).parse()?;
    req.headers_mut().remove("host");
    Ok(client.request(req).await?)
}

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

pub(crate) async fn wait_ready(client: &Client<HttpConnector, Full<Bytes>>, url: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if let Ok(r) = client.get(url.parse()?).await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{url} did not become ready")
}

/// The bench route: retries, timeouts, a circuit breaker and a rate limit on one backend.
fn bench_route(upstream: SocketAddr) -> String {
    format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: bench}}\nspec:\n  rules:\n  - match: {{models: [\"bench*\"]}}\n    backends: [{{name: upstream, provider: openai-compatible, url: 'http://{upstream}/v1'}}]\n    retry: {{attempts: 2}}\n    timeouts: {{request: 30s, firstToken: 10s}}\n    circuitBreaker: {{consecutiveFailures: 5, cooldown: 10s}}\n    rateLimit: {{requestsPerMinute: 100000000, tokensPerMinute: 100000000000}}\n"
    )
}

/// The `bulwark-sidecar` binary on a directory holding `yaml`; its LLM API URL.
pub(crate) async fn start_sidecar(
    bin: &Path,
    yaml: &str,
    client: &Client<HttpConnector, Full<Bytes>>,
) -> anyhow::Result<(Proc, String)> {
    let dir = bulwark_tests::harness::temp_dir("bulwark-bench")?;
    std::fs::write(dir.join("bench.yaml"), yaml)?;
    let (port, admin) = (free_port()?, free_port()?);
    let child = Command::new(bin.join("bulwark-sidecar"))
        .args(["--manifests", &dir.display().to_string(), "--listen", &port.to_string(), "--admin", &admin.to_string()])
        .env("BULWARK_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let proc = Proc(child);
    wait_ready(client, &format!("http://127.0.0.1:{admin}/ready")).await?;
    Ok((proc, format!("http://127.0.0.1:{port}")))
}

async fn start_floor(bin: &Path, upstream: SocketAddr) -> anyhow::Result<(Proc, String)> {
    let port = free_port()?;
    let child = Command::new(bin.join("bulwark-bench"))
        .args(["floor", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("http://{upstream}")])
        .stdout(Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok((Proc(child), format!("http://127.0.0.1:{port}")))
}

pub(crate) fn request(base: &str, body: &'static str) -> Request<Full<Bytes>> {
    let mut r = Request::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.method_mut() = http::Method::POST;
    *r.uri_mut() = format!("{base}/v1/chat/completions").parse().unwrap_or_default();
    r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    r
}

/// Open loop: one request every 1/rate s for `secs`, each timed from its send.
pub(crate) async fn open_loop(
    client: &Client<HttpConnector, Full<Bytes>>,
    base: &str,
    rate: u64,
    secs: u64,
) -> Vec<u64> {
    open_loop_with(client, rate, secs, || request(base, REQUEST)).await
}

/// Open loop over the requests `make` builds.
pub(crate) async fn open_loop_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    rate: u64,
    secs: u64,
    make: impl Fn() -> Request<Full<Bytes>>,
) -> Vec<u64> {
    let samples = Arc::new(Mutex::new(Vec::with_capacity((rate * secs) as usize)));
    let mut iv = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity((rate * secs) as usize);
    for _ in 0..rate * secs {
        iv.tick().await;
        let (client, samples, req) = (client.clone(), samples.clone(), make());
        tasks.push(tokio::spawn(async move {
            let scheduled = Instant::now();
            if let Ok(resp) = client.request(req).await
                && resp.status().is_success()
                && resp.into_body().collect().await.is_ok()
            {
                samples.lock().push(scheduled.elapsed().as_nanos() as u64);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut v = std::mem::take(&mut *samples.lock());
    v.sort_unstable();
    v
}

pub(crate) fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Closed loop with `conns` concurrent clients for `secs`: requests completed.
async fn closed_loop(base: &str, conns: usize, secs: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = vec![];
    for _ in 0..conns {
        let base = base.to_owned();
        tasks.push(tokio::spawn(async move {
            let client: Client<HttpConnector, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build(HttpConnector::new());
            let mut n = 0u64;
            while Instant::now() < deadline {
                if let Ok(r) = client.request(request(&base, REQUEST)).await
                    && r.status().is_success()
                    && r.into_body().collect().await.is_ok()
                {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total
}

fn rss_mb(pid: u32, key: &str) -> f64 {
    memory_kib(pid, key).map_or(f64::NAN, |kb| kb as f64 / 1024.0)
}

/// Per-chunk latency (arrival − send) of one streamed response, in µs, sorted.
async fn chunk_latencies(client: &Client<HttpConnector, Full<Bytes>>, base: &str, epoch: Instant) -> Vec<u64> {
    let body = r#"{"model":"bench","stream":true,"messages":[{"role":"user","content":"stream please"}]}"#;
    let mut out = vec![];
    let Ok(resp) = client.request(request(base, body)).await else { return out };
    let mut body = resp.into_body();
    let mut pending = String::new();
    while let Some(Ok(frame)) = body.frame().await {
        let now = epoch.elapsed().as_nanos() as u64;
        if let Ok(data) = frame.into_data() {
            pending.push_str(&String::from_utf8_lossy(&data));
            while let Some(start) = pending.find('@') {
                let Some(len) = pending[start + 1..].find('@') else { break };
                if let Ok(sent) = pending[start + 1..start + 1 + len].parse::<u64>() {
                    out.push(now.saturating_sub(sent) / 1000);
                }
                pending.drain(..start + len + 2);
            }
        }
    }
    out.sort_unstable();
    out
}

async fn bench(secs: u64, rate: u64, bin: &Path) -> anyhow::Result<()> {
    let epoch = Instant::now();
    let up = upstream(epoch).await?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build(http);
    let (sidecar, sidecar_url) = start_sidecar(bin, &bench_route(up), &client).await?;
    let (_floor, floor_url) = start_floor(bin, up).await?;
    let direct_url = format!("http://{up}");
    let targets = [("direct", direct_url.as_str()), ("floor", floor_url.as_str()), ("sidecar", sidecar_url.as_str())];

    println!(
        "bulwark-bench: {rate} req/s open loop, {} interleaved rounds of 1 s per target; upstream, floor proxy and sidecar on loopback",
        2 * secs
    );
    for (_, url) in &targets {
        let _ = open_loop(&client, url, rate, 1).await; // warm-up
    }
    // Many short interleaved rounds, so a burst of machine noise falls on every target alike.
    let mut samples: Vec<Vec<u64>> = vec![vec![]; 3];
    let mut rounds: Vec<[Vec<u64>; 3]> = vec![];
    for _round in 0..2 * secs {
        let mut round: [Vec<u64>; 3] = Default::default();
        for (i, (_, url)) in targets.iter().enumerate() {
            round[i] = open_loop(&client, url, rate, 1).await;
            samples[i].extend(&round[i]);
        }
        rounds.push(round);
    }
    for s in &mut samples {
        s.sort_unstable();
    }
    let (d50, d99) = (pct(&samples[0], 0.5), pct(&samples[0], 0.99));
    println!("\nlatency at {rate} req/s (µs)      p50      p99   samples");
    for (i, (name, _)) in targets.iter().enumerate() {
        println!(
            "  {name:<28} {:>7.0}  {:>7.0}  {:>7}",
            pct(&samples[i], 0.5),
            pct(&samples[i], 0.99),
            samples[i].len()
        );
    }
    let add = |i: usize, p: f64, base: f64| pct(&samples[i], p) - base;
    let (f50, f99, s50, s99) = (add(1, 0.5, d50), add(1, 0.99, d99), add(2, 0.5, d50), add(2, 0.99, d99));
    println!("added over direct (µs)            p50      p99");
    println!("  floor (minimal hyper proxy)  {f50:>7.0}  {f99:>7.0}");
    println!("  sidecar                      {s50:>7.0}  {s99:>7.0}");
    println!(
        "  sidecar / floor              {:>6.2}x  {:>6.2}x   (all rounds pooled)",
        s50 / f50.max(1.0),
        s99 / f99.max(1.0)
    );
    // Per round, where all three met the same machine: the median of the rounds' ratios, which
    // one noisy round cannot move.
    let ratio = |p: f64| {
        let mut r: Vec<f64> = rounds
            .iter()
            .map(|t| {
                let d = pct(&t[0], p);
                (pct(&t[2], p) - d) / (pct(&t[1], p) - d).max(1.0)
            })
            .collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    println!(
        "  sidecar / floor              {:>6.2}x  {:>6.2}x   (median of {} rounds)   target p99: within 1.3x of the floor",
        ratio(0.5),
        ratio(0.99),
        rounds.len()
    );

    let conns = 32;
    let cpu0 = cpu_seconds(sidecar.pid());
    let rss_samples = Arc::new(Mutex::new(Vec::new()));
    let (pid, rs) = (sidecar.pid(), rss_samples.clone());
    let sampler = tokio::spawn(async move {
        loop {
            rs.lock().push(rss_mb(pid, "VmRSS"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = Instant::now();
    let n = closed_loop(&sidecar_url, conns, secs).await;
    let wall = started.elapsed().as_secs_f64();
    sampler.abort();
    let cpu = cpu_seconds(sidecar.pid()) - cpu0;
    let floor_started = Instant::now();
    let nf = closed_loop(&floor_url, conns, secs).await;
    let floor_wall = floor_started.elapsed().as_secs_f64();
    let rss_max = rss_samples.lock().iter().copied().fold(0.0f64, f64::max);
    println!("\nthroughput, {conns} connections, {secs}s (load generator and upstream share the 2 cores)");
    println!("  floor    {:>8.0} req/s", nf as f64 / floor_wall);
    println!(
        "  sidecar  {:>8.0} req/s using {:.2} cores -> {:.0} req/s per core   target: >= 10000 per core",
        n as f64 / wall,
        cpu / wall,
        n as f64 / cpu.max(1e-9)
    );
    println!("  sidecar RSS under load: {rss_max:.1} MB (peak {:.1} MB)   target: < 30 MB", rss_mb(pid, "VmHWM"));

    let mut per = vec![vec![]; 3];
    for _ in 0..6 {
        for (i, (_, url)) in targets.iter().enumerate() {
            per[i].extend(chunk_latencies(&client, url, epoch).await);
        }
    }
    for p in &mut per {
        p.sort_unstable();
    }
    let med = |i: usize| pct(&per[i], 0.5) * 1000.0;
    println!("\nstreaming, {STREAM_CHUNKS} chunks x 6 streams, per-chunk latency upstream -> client (µs, median)");
    println!("  direct {:>6.1}   floor {:>6.1}   sidecar {:>6.1}", med(0), med(1), med(2));
    println!(
        "  added per chunk: floor {:>5.1}  sidecar {:>5.1}  sidecar - floor {:>5.1}   target: sidecar adds < 10 µs per chunk",
        med(1) - med(0),
        med(2) - med(0),
        med(2) - med(1)
    );
    Ok(())
}
