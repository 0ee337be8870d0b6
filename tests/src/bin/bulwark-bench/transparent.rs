//! Transparent capture: the added latency of a captured call against the same call made
//! explicitly to the sidecar, and the throughput of a bulk transfer passed through against the
//! same transfer made directly. Root only: the benchmark re-runs itself in a network namespace
//! of its own (`unshare -n`), with the upstream at an address on its loopback and the capture
//! rules of `bulwark-sidecar redirect`; the sidecar runs as uid 1337, which they skip.

use std::{net::SocketAddr, os::unix::process::CommandExt as _, path::Path, process::Command, time::Duration};

use bulwark_tests::procfs::cpu_seconds;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::Instant,
};

use crate::{Proc, REQUEST, open_loop_with, pct, request, upstream_at, wait_ready};

/// Marks the run inside the namespace.
const INSIDE: &str = "BULWARK_BENCH_NETNS";
const UPSTREAM: [u8; 4] = [198, 51, 100, 10];
const PROXY_UID: u32 = 1337;
const BULK: usize = 512 << 20;

pub async fn bench(bin: &Path, rate: u64) -> anyhow::Result<()> {
    if std::env::var_os(INSIDE).is_none() {
        let me = std::env::current_exe()?;
        let status = Command::new("unshare")
            .args(["-n", "--"])
            .arg(me)
            .args(["--transparent-only", "--rate", &rate.to_string(), "--bin"])
            .arg(bin)
            .env(INSIDE, "1")
            .status()?;
        anyhow::ensure!(status.success(), "the transparent benchmark needs root, unshare and iptables");
        return Ok(());
    }
    run("ip", &["link", "set", "lo", "up"])?;
    run("ip", &["addr", "add", "198.51.100.10/32", "dev", "lo"])?;
    let epoch = Instant::now();
    let up = upstream_at((UPSTREAM, 80).into(), epoch).await?;
    for port in [443, 9000] {
        sink((UPSTREAM, port).into()).await?;
    }
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build(http);
    // The same upstream again at a port the rules skip, for the direct calls.
    let direct_up = upstream_at((UPSTREAM, 9001).into(), epoch).await?;
    let sidecar = sidecar(bin, up, &client).await?;
    run(
        &bin.join("bulwark-sidecar").display().to_string(),
        &["redirect", "--proxy-uid", "1337", "--redirect-port", "15081", "--exclude-ports", "15080,15090,9000,9001"],
    )?;

    let direct = || request(&format!("http://{direct_up}"), REQUEST);
    let explicit = || request("http://127.0.0.1:15080", REQUEST);
    // The app calls the provider by its name; the rules bring it to the sidecar.
    let captured = || {
        let mut r = request(&format!("http://{up}"), REQUEST);
        r.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("api.bench.test"));
        r
    };
    for make in [&direct as &dyn Fn() -> Request<Full<Bytes>>, &explicit, &captured] {
        let _ = open_loop_with(&client, rate, 1, make).await; // warm-up
    }
    let mut samples: Vec<Vec<u64>> = vec![vec![]; 3];
    for _round in 0..6 {
        samples[0].extend(open_loop_with(&client, rate, 1, direct).await);
        samples[1].extend(open_loop_with(&client, rate, 1, explicit).await);
        samples[2].extend(open_loop_with(&client, rate, 1, captured).await);
    }
    for s in &mut samples {
        s.sort_unstable();
    }
    println!("\ntransparent capture at {rate} req/s, 6 interleaved rounds (µs)   p50      p99   samples");
    for (i, name) in ["direct", "explicit (base URL to the sidecar)", "transparent (captured)"].iter().enumerate() {
        println!(
            "  {name:<38} {:>7.0}  {:>7.0}  {:>7}",
            pct(&samples[i], 0.5),
            pct(&samples[i], 0.99),
            samples[i].len()
        );
    }
    let added = |i: usize, p: f64| pct(&samples[i], p) - pct(&samples[0], p);
    println!(
        "  added over direct: explicit p50 {:.0} p99 {:.0}; transparent p50 {:.0} p99 {:.0}",
        added(1, 0.5),
        added(1, 0.99),
        added(2, 0.5),
        added(2, 0.99)
    );
    println!(
        "  transparent / explicit, total latency: p50 {:.3}x  p99 {:.3}x   target: within 10% (<= 1.10x)",
        pct(&samples[2], 0.5) / pct(&samples[1], 0.5),
        pct(&samples[2], 0.99) / pct(&samples[1], 0.99)
    );

    // Bulk transfers: bound by the CPU (client, sidecar and sink share this machine's cores),
    // then by a network (the route to the upstream shaped to LINK by the loopback's qdisc, the
    // client-to-sidecar hop left as fast as the pod's own loopback).
    let sidecar_pid = sidecar.0.id();
    for link in [None, Some(LINK)] {
        if let Some(rate) = link {
            shape(rate)?;
        }
        let (mut direct_mb, mut passed_mb, mut cpu, mut ends) = (vec![], vec![], vec![], vec![]);
        for _ in 0..3 {
            let before = cpu_seconds(std::process::id());
            direct_mb.push(bulk((UPSTREAM, 9000).into()).await?);
            ends.push((cpu_seconds(std::process::id()) - before) / (BULK as f64 / 1e9));
            let before = cpu_seconds(sidecar_pid);
            passed_mb.push(bulk((UPSTREAM, 443).into()).await?);
            cpu.push((cpu_seconds(sidecar_pid) - before) / (BULK as f64 / 1e9));
        }
        let best = |v: &[f64]| v.iter().copied().fold(0.0f64, f64::max);
        let bound = match link {
            None => "bound by 2 cores, shared by client, sidecar and sink".to_owned(),
            Some(rate) => format!("over a {rate} link"),
        };
        println!(
            "  bulk TCP, {} MiB, best of 3, {bound}: direct {:.0} MB/s, passed through {:.0} MB/s -> {:.2}x   target: >= 0.9x",
            BULK >> 20,
            best(&direct_mb),
            best(&passed_mb),
            best(&passed_mb) / best(&direct_mb)
        );
        cpu.sort_by(f64::total_cmp);
        ends.sort_by(f64::total_cmp);
        println!(
            "    CPU per GB (median of 3): the sidecar passing it through {:.0} ms; client and sink together, direct {:.0} ms",
            cpu[1] * 1e3,
            ends[1] * 1e3
        );
    }
    Ok(())
}

/// The network the bulk row is also run over.
const LINK: &str = "5gbit";

/// Shapes traffic to the upstream's address to `rate` (HTB on the loopback, which carries it in
/// the namespace); the rest of the loopback stays unshaped.
fn shape(rate: &str) -> anyhow::Result<()> {
    run("tc", &["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb"])?;
    run("tc", &["class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", rate, "burst", "4mb"])?;
    let dst = "198.51.100.10/32";
    run(
        "tc",
        &[
            "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "u32", "match", "ip", "dst", dst, "flowid",
            "1:10",
        ],
    )
}

fn run(bin: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(bin).args(args).output()?;
    anyhow::ensure!(out.status.success(), "{bin} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The sidecar as uid 1337, with a route for explicit calls and one for the captured host.
async fn sidecar(bin: &Path, up: SocketAddr, client: &Client<HttpConnector, Full<Bytes>>) -> anyhow::Result<Proc> {
    let dir = bulwark_tests::harness::temp_dir("bulwark-bench-transparent")?;
    let backend = format!("[{{name: upstream, provider: openai-compatible, url: 'http://{up}/v1'}}]");
    let yaml = format!(
        "apiVersion: bulwark.dev/v1alpha1\nkind: LLMRoute\nmetadata: {{name: bench}}\nspec:\n  rules:\n  - match: {{models: [\"bench*\"]}}\n    backends: {backend}\n  - match: {{hosts: [api.bench.test]}}\n    backends: {backend}\n"
    );
    std::fs::write(dir.join("bench.yaml"), yaml)?;
    let mut perms = std::fs::metadata(&dir)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&dir, perms)?;
    let child = Command::new(bin.join("bulwark-sidecar"))
        .args([
            "--manifests",
            &dir.display().to_string(),
            "--listen",
            "15080",
            "--admin",
            "15090",
            "--transparent",
            "15081",
        ])
        .env("BULWARK_LOG", "warn")
        .uid(PROXY_UID)
        .gid(PROXY_UID)
        .spawn()?;
    let proc = Proc(child);
    wait_ready(client, "http://127.0.0.1:15090/ready").await?;
    Ok(proc)
}

/// A server that reads everything it is sent, then closes.
async fn sink(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 << 10];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    Ok(())
}

/// Sends `BULK` bytes and waits for the server to have read them all: MB/s.
async fn bulk(addr: SocketAddr) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(addr).await?;
    let chunk = vec![0u8; 256 << 10];
    let started = Instant::now();
    let mut sent = 0;
    while sent < BULK {
        s.write_all(&chunk).await?;
        sent += chunk.len();
    }
    s.shutdown().await?;
    let mut rest = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read(&mut rest)).await;
    Ok(sent as f64 / 1e6 / started.elapsed().as_secs_f64())
}
