//! Replica choice: four replicas of a model server with four slots each, one of them four
//! times slower, under the same open-loop load through a round-robin proxy (what a Service
//! gives) and through the sidecar's load-aware choice. Time to first token and total latency,
//! p50 and p99, measured by the client in the same run.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
};
use parking_lot::Mutex;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc},
    time::Instant,
};

use crate::{ChannelBody, Proc, free_port, pct, wait_ready};

const SLOTS: usize = 4;
const CHUNKS: usize = 10;
const DECODE: Duration = Duration::from_millis(5);
const RATE: u64 = 100;
const SECONDS: u64 = 8;

/// A replica: `SLOTS` requests at once; each waits for a slot, then `prefill`, then streams.
async fn replica(prefill: Duration) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let slots = Arc::new(Slots { free: Semaphore::new(SLOTS), waiting: AtomicUsize::new(0) });
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let slots = slots.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let slots = slots.clone();
                    async move { Ok::<_, Infallible>(serve(req, slots, prefill).await) }
                });
                let _ = Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}

/// A replica's slots, and the requests waiting for one (its queue, as vLLM reports it).
struct Slots {
    free: Semaphore,
    waiting: AtomicUsize,
}

async fn serve(req: Request<Incoming>, slots: Arc<Slots>, prefill: Duration) -> Response<BoxBody<Bytes, Infallible>> {
    if req.uri().path() == "/metrics" {
        let running = SLOTS - slots.free.available_permits();
        let waiting = slots.waiting.load(Ordering::Relaxed);
        let text = format!("vllm:num_requests_running {running}\nvllm:num_requests_waiting {waiting}\n");
        return Response::new(Full::new(Bytes::from(text)).boxed());
    }
    let _ = req.into_body().collect().await;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        slots.waiting.fetch_add(1, Ordering::Relaxed);
        let slot = slots.free.acquire().await;
        slots.waiting.fetch_sub(1, Ordering::Relaxed);
        let Ok(_slot) = slot else { return };
        tokio::time::sleep(prefill).await;
        for i in 0..CHUNKS {
            let ev = format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n");
            if tx.send(Bytes::from(ev)).await.is_err() {
                return;
            }
            tokio::time::sleep(DECODE).await;
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let mut r = Response::new(ChannelBody(rx).boxed());
    r.headers_mut().insert("content-type", http::HeaderValue::from_static("text/event-stream"));
    r
}

/// A round-robin proxy over `upstreams`, as a Service in IPVS round-robin mode spreads requests.
async fn round_robin(upstreams: Vec<SocketAddr>) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).build(http);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let upstreams = Arc::new(upstreams);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let (client, next, upstreams) = (client.clone(), next.clone(), upstreams.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % upstreams.len();
                    crate::forward(client.clone(), Arc::new(format!("http://{}", upstreams[i])), req)
                });
                let _ = Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(format!("http://{addr}"))
}

/// Open loop at `RATE` for `SECONDS`: (time to first chunk, total) per request, in µs.
async fn load(client: &Client<HttpConnector, Full<Bytes>>, base: &str) -> (Vec<u64>, Vec<u64>) {
    let body = r#"{"model":"llama","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let samples = Arc::new(Mutex::new((vec![], vec![])));
    let mut iv = tokio::time::interval(Duration::from_nanos(1_000_000_000 / RATE));
    let mut tasks = vec![];
    for _ in 0..RATE * SECONDS {
        iv.tick().await;
        let (client, samples) = (client.clone(), samples.clone());
        let req = crate::request(base, body);
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let Ok(resp) = client.request(req).await else { return };
            let mut body = resp.into_body();
            let mut first = None;
            while let Some(Ok(frame)) = body.frame().await {
                if frame.data_ref().is_some_and(|d| !d.is_empty()) && first.is_none() {
                    first = Some(started.elapsed());
                }
            }
            if let Some(f) = first {
                let mut s = samples.lock();
                s.0.push(f.as_micros() as u64);
                s.1.push(started.elapsed().as_micros() as u64);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let (mut ttft, mut total) = std::mem::take(&mut *samples.lock());
    ttft.sort_unstable();
    total.sort_unstable();
    (ttft, total)
}

pub async fn bench(bin: &Path) -> anyhow::Result<()> {
    let fast = Duration::from_millis(30);
    let mut replicas = vec![];
    for prefill in [fast, fast, fast, fast * 4] {
        replicas.push(replica(prefill).await?);
    }
    let rr = round_robin(replicas.clone()).await?;
    let endpoints: Vec<String> = replicas.iter().map(|a| format!("http://{a}/v1")).collect();
    let config = format!(
        "apiVersion: bulwark.dev/sidecar-config/v1\nroutes:\n  - id: bench/llama/0\n    route: bench/llama\n    backends:\n      - name: llama\n        provider: openai-compatible\n        url: http://llama.bench.svc:8000/v1\n        replicas: {{endpoints: {}, metricsPath: /metrics}}\n",
        serde_json::to_string(&endpoints)?
    );
    let dir = bulwark_tests::harness::temp_dir("bulwark-bench-replicas")?;
    std::fs::write(dir.join("config.yaml"), config)?;
    let (port, admin) = (free_port()?, free_port()?);
    let child = std::process::Command::new(bin.join("bulwark-sidecar"))
        .args(["--config", &dir.join("config.yaml").display().to_string()])
        .args(["--listen", &port.to_string(), "--admin", &admin.to_string()])
        .env("BULWARK_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let _sidecar = Proc(child);
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build(http);
    wait_ready(&client, &format!("http://127.0.0.1:{admin}/ready")).await?;
    let sidecar = format!("http://127.0.0.1:{port}");
    println!(
        "\n== Replica choice: 4 replicas of {SLOTS} slots (prefill 30 ms, one 120 ms), {RATE} req/s streamed for {SECONDS} s"
    );
    let (rr_ttft, rr_total) = load(&client, &rr).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (lb_ttft, lb_total) = load(&client, &sidecar).await;
    // The samples are µs; `pct` divides by 1000.
    let ms = pct;
    println!("  (ms)                          TTFT p50   TTFT p99   total p50  total p99   answers");
    for (name, t, tot) in
        [("round robin (a Service)", &rr_ttft, &rr_total), ("sidecar, load-aware", &lb_ttft, &lb_total)]
    {
        println!(
            "  {name:<28} {:>9.1}  {:>9.1}  {:>9.1}  {:>9.1}  {:>8}",
            ms(t, 0.5),
            ms(t, 0.99),
            ms(tot, 0.5),
            ms(tot, 0.99),
            t.len()
        );
    }
    let lower = 100.0 * (1.0 - pct(&lb_ttft, 0.99) / pct(&rr_ttft, 0.99));
    println!("  p99 time to first token {lower:.0}% lower with the load-aware choice   target: >= 30% lower");
    Ok(())
}
