//! The soak (`make soak`; a short run is part of `make test`): steady open-loop traffic through
//! the `bulwark-sidecar` binary while its config directory changes every few seconds.
//!
//! Each good change moves the load route's weights, retries and limit, adds a route and retires
//! the one before, swaps the policy's block pattern, sets a fresh rate limit and turns the cache
//! on or off. Every fifth write is a broken file, which must be rejected while the last good
//! config keeps serving. After each write, probes check that the change took effect (or, for a
//! broken file, that it did not). Every load request must succeed, with the address it plants
//! redacted from its answer, and the sidecar's resident memory is sampled throughout.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::{task::JoinSet, time::Instant};

use crate::{
    client::{Client, Reply},
    cluster::{Proc, eventually, free_port},
    harness::temp_dir,
    mock::MockProvider,
    procfs::rss_kib,
};

/// The config file the soak rewrites.
const FILE: &str = "soak.yaml";
/// Longest wait for a change to be applied (or a broken file to be rejected).
const APPLY_LIMIT: Duration = Duration::from_secs(10);
/// Longest a load request may take.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);

pub struct Options {
    /// The `bulwark-sidecar` binary.
    pub sidecar: PathBuf,
    /// Load requests per second (open loop).
    pub rate: u64,
    pub duration: Duration,
    /// Time between config writes.
    pub change_every: Duration,
    /// The sidecar's `--reload-interval`.
    pub reload_interval: Duration,
    /// How long after the start the RSS baseline is taken (caches and pools filled by then).
    pub warmup: Duration,
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    streamed: AtomicU64,
    /// Failed requests by reason.
    failures: Mutex<BTreeMap<String, u64>>,
    /// Time from each request's scheduled send to its answer's last byte, µs.
    latency_us: Mutex<Vec<u32>>,
}

impl Tally {
    fn fail(&self, why: String) {
        *self.failures.lock().entry(why).or_default() += 1;
    }
}

/// What the config changes saw.
#[derive(Default)]
struct Ledger {
    good: u32,
    applied: u32,
    bad: u32,
    rejected: u32,
    /// The generation of the config served now.
    last_good: u32,
    /// Milliseconds from each good write to the sidecar serving it.
    apply_ms: Vec<f64>,
    problems: Vec<String>,
}

pub struct Report {
    pub seconds: f64,
    pub sent: u64,
    pub ok: u64,
    pub streamed: u64,
    pub failures: BTreeMap<String, u64>,
    pub good_changes: u32,
    pub applied: u32,
    pub bad_changes: u32,
    pub rejected: u32,
    pub change_problems: Vec<String>,
    /// Sorted.
    pub apply_ms: Vec<f64>,
    /// Sorted.
    pub latency_us: Vec<u32>,
    /// (seconds since the start, KiB).
    pub rss: Vec<(f64, u64)>,
    pub warmup: Duration,
}

impl Report {
    /// RSS when the warm-up ended, at the end, and the most seen, in KiB.
    pub fn rss_baseline(&self) -> u64 {
        let warm = self.warmup.as_secs_f64();
        self.rss.iter().find(|(t, _)| *t >= warm).or(self.rss.first()).map_or(0, |r| r.1)
    }
    pub fn rss_end(&self) -> u64 {
        self.rss.last().map_or(0, |r| r.1)
    }
    pub fn rss_max(&self) -> u64 {
        self.rss.iter().map(|r| r.1).max().unwrap_or(0)
    }
    /// End minus baseline, KiB (negative when memory was given back).
    pub fn rss_growth(&self) -> i64 {
        self.rss_end() as i64 - self.rss_baseline() as i64
    }

    /// Everything that broke a promise: failed requests, changes not applied or not rejected,
    /// RSS grown past `max_growth_kib`.
    pub fn problems(&self, max_growth_kib: u64) -> Vec<String> {
        let mut out: Vec<String> = self.failures.iter().map(|(why, n)| format!("{n} requests failed: {why}")).collect();
        out.extend(self.change_problems.iter().cloned());
        if self.sent == 0 {
            out.push("no load was sent".into());
        }
        if self.rss_growth() > max_growth_kib as i64 {
            out.push(format!(
                "RSS grew by {} KiB after the warm-up (from {} to {} KiB), more than the {max_growth_kib} KiB allowed",
                self.rss_growth(),
                self.rss_baseline(),
                self.rss_end()
            ));
        }
        out
    }

    pub fn print(&self) {
        let pct = |v: &[u32], p: f64| v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).map_or(0, |x| *x);
        let pms = |v: &[f64], p: f64| v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).map_or(0.0, |x| *x);
        let mb = |kib: u64| kib as f64 / 1024.0;
        let failed: u64 = self.failures.values().sum();
        println!(
            "soak: {:.0} s, {} requests ({:.0} req/s, {} streamed): {} ok, {failed} failed",
            self.seconds,
            self.sent,
            self.sent as f64 / self.seconds.max(1e-9),
            self.streamed,
            self.ok
        );
        for (why, n) in &self.failures {
            println!("  failed x{n}: {why}");
        }
        println!(
            "  latency p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            pct(&self.latency_us, 0.5),
            pct(&self.latency_us, 0.99),
            pct(&self.latency_us, 0.999),
            self.latency_us.last().copied().unwrap_or(0)
        );
        println!(
            "  config changes: {} good, {} applied and seen to work (write to serving: p50 {:.0} ms, max {:.0} ms); {} broken, {} rejected while the last good one served",
            self.good_changes,
            self.applied,
            pms(&self.apply_ms, 0.5),
            self.apply_ms.last().copied().unwrap_or(0.0),
            self.bad_changes,
            self.rejected
        );
        for p in &self.change_problems {
            println!("  change problem: {p}");
        }
        println!(
            "  sidecar RSS: {:.1} MB after the {:.0} s warm-up, {:.1} MB at the end ({:+.1} MB), {:.1} MB at most",
            mb(self.rss_baseline()),
            self.warmup.as_secs_f64(),
            mb(self.rss_end()),
            self.rss_growth() as f64 / 1024.0,
            mb(self.rss_max())
        );
    }
}

/// Runs the soak and reports what it saw.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let a = MockProvider::start_with("a", 4, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    let b = MockProvider::start_with("b", 4, Duration::ZERO, ([127, 0, 0, 1], 0).into()).await;
    a.set_recording(false);
    b.set_recording(false);
    let config = Config { a: a.url(), b: b.url() };
    let dir = temp_dir("bulwark-soak")?;
    write(&dir, &config.good(0))?;

    let (port, admin_port) = (free_port()?, free_port()?);
    let args: Vec<String> = [
        "--manifests",
        &dir.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin",
        &format!("127.0.0.1:{admin_port}"),
        "--reload-interval",
        &format!("{}ms", opts.reload_interval.as_millis()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sidecar =
        Proc::spawn(&dir, "sidecar", &opts.sidecar, &args, &[("BULWARK_LOG", "warn"), ("NO_COLOR", "1")])?;
    let client = Client::new(format!("http://127.0.0.1:{port}"));
    let admin = Client::new(format!("http://127.0.0.1:{admin_port}"));
    let probe = Probe { client: client.clone(), admin, log: sidecar.log.clone() };
    eventually(Duration::from_secs(20), "the sidecar to be ready", || async { probe.version().await }).await?;

    let started = Instant::now();
    let end = started + opts.duration;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(drive(client, opts.rate, tally.clone(), stop.clone()));
    let rss = Arc::new(Mutex::new(vec![]));
    let sampler = tokio::spawn(sample_rss(sidecar.pid(), started, rss.clone()));

    let mut churn = Churn { probe: &probe, dir: &dir, config: &config, ledger: Ledger::default() };
    // One change every `change_every` on a fixed schedule (a slow one delays the next, never
    // drops it), so the count depends on the duration alone. The last interval is left without
    // a change, so the end is measured on a settled config.
    let changes = (opts.duration.as_secs_f64() / opts.change_every.as_secs_f64()) as u32;
    for generation in 1..changes.saturating_sub(1) {
        tokio::time::sleep_until(started + opts.change_every * generation).await;
        if generation.is_multiple_of(5) {
            churn.broken(generation).await?;
        } else {
            churn.good(generation).await?;
        }
    }
    let mut ledger = churn.ledger;
    tokio::time::sleep_until(end.max(Instant::now() + opts.change_every)).await;
    stop.store(true, Ordering::SeqCst);
    load.await?;
    let seconds = started.elapsed().as_secs_f64();
    sampler.abort();
    if let Some(kib) = rss_kib(sidecar.pid()) {
        rss.lock().push((seconds, kib));
    } else {
        ledger.problems.push(format!("the sidecar exited during the soak:\n{}", sidecar.output()));
    }
    sidecar.terminate()?;
    let _ = std::fs::remove_dir_all(&dir);

    let mut latency_us = std::mem::take(&mut *tally.latency_us.lock());
    latency_us.sort_unstable();
    ledger.apply_ms.sort_by(f64::total_cmp);
    let failures = std::mem::take(&mut *tally.failures.lock());
    let rss = std::mem::take(&mut *rss.lock());
    Ok(Report {
        seconds,
        sent: tally.sent.load(Ordering::SeqCst),
        ok: tally.ok.load(Ordering::SeqCst),
        streamed: tally.streamed.load(Ordering::SeqCst),
        failures,
        good_changes: ledger.good,
        applied: ledger.applied,
        bad_changes: ledger.bad,
        rejected: ledger.rejected,
        change_problems: ledger.problems,
        apply_ms: ledger.apply_ms,
        latency_us,
        rss,
        warmup: opts.warmup,
    })
}

/// The config of one generation, with the two upstreams' URLs.
struct Config {
    a: String,
    b: String,
}

impl Config {
    /// Generation `g`: weights, retries and limits that move with `g`, a route `probe-G` with a
    /// budget of `probe_budget(g)` requests, the block pattern `soak-block-G`, and the cache on
    /// the load route in odd generations.
    fn good(&self, g: u32) -> String {
        let (a, b) = (&self.a, &self.b);
        let (wa, wb) = (1 + g % 4, 4 - g % 4);
        let attempts = 1 + g % 2;
        let rpm = 6_000_000 + g;
        let budget = probe_budget(g);
        let cache = if cache_on(g) { "\n    cache: {exact: {ttl: 10m, maxEntries: 2000}}" } else { "" };
        format!(
            r"apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {{name: soak}}
spec:
  rules:
  - match: {{models: [soak]}}
    backends:
    - {{name: a, provider: openai-compatible, url: '{a}', weight: {wa}}}
    - {{name: b, provider: openai-compatible, url: '{b}', weight: {wb}}}
    retry: {{attempts: {attempts}}}
    timeouts: {{request: 30s, firstToken: 10s}}
    rateLimit: {{requestsPerMinute: {rpm}}}{cache}
    scannerPolicyRef: {{name: soak-guard}}
  - match: {{models: [probe-{g}]}}
    backends: [{{name: probe, provider: openai-compatible, url: '{a}'}}]
    rateLimit: {{requestsPerMinute: {budget}}}
---
apiVersion: bulwark.dev/v1alpha1
kind: ScannerPolicy
metadata: {{name: soak-guard}}
spec:
  input:
  - {{type: regex, patterns: ['soak-block-{g}\b'], action: block}}
  output:
  - {{type: pii, entities: [email], action: redact}}
"
        )
    }

    /// A broken generation `g`: every other one is not YAML at all, the rest hold a wrong type.
    fn broken(&self, g: u32) -> String {
        let good = self.good(g);
        if g.is_multiple_of(10) {
            good.replacen("backends: [{", "backends: [{{", 1)
        } else {
            good.replace("weight: ", "weight: heavy")
        }
    }
}

fn probe_budget(g: u32) -> u32 {
    2 + g % 3
}

fn cache_on(g: u32) -> bool {
    g % 2 == 1
}

/// Writes the config the way a sync tool does: a new file renamed over the old one.
fn write(dir: &Path, yaml: &str) -> std::io::Result<()> {
    let tmp = dir.join(".soak.yaml.tmp");
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(tmp, dir.join(FILE))
}

/// Writes the config changes, one generation at a time, and checks each took effect.
struct Churn<'a> {
    probe: &'a Probe,
    dir: &'a Path,
    config: &'a Config,
    ledger: Ledger,
}

impl Churn<'_> {
    /// Writes generation `g` and checks it is served and works.
    async fn good(&mut self, g: u32) -> anyhow::Result<()> {
        let (probe, ledger) = (self.probe, &mut self.ledger);
        let last_good = std::mem::replace(&mut ledger.last_good, g);
        ledger.good += 1;
        let before = probe.version().await.unwrap_or_default();
        let written = Instant::now();
        write(self.dir, &self.config.good(g))?;
        let served =
            eventually(APPLY_LIMIT, "a new version", || async { probe.version().await.filter(|v| *v != before) }).await;
        if served.is_err() {
            ledger.problems.push(format!(
                "change {g} was not applied within {APPLY_LIMIT:?}; the sidecar logged:\n{}",
                probe.log_tail()
            ));
            return Ok(());
        }
        ledger.apply_ms.push(written.elapsed().as_secs_f64() * 1e3);
        match probe.good(g, last_good).await {
            Ok(()) => ledger.applied += 1,
            Err(e) => ledger.problems.push(format!("change {g} was served but does not work: {e}")),
        }
        Ok(())
    }

    /// Writes a broken generation `g` and checks it is rejected while the last good one serves.
    async fn broken(&mut self, g: u32) -> anyhow::Result<()> {
        let (probe, ledger) = (self.probe, &mut self.ledger);
        let last_good = ledger.last_good;
        ledger.bad += 1;
        let (before, errors) = (probe.version().await.unwrap_or_default(), probe.reload_errors().await);
        write(self.dir, &self.config.broken(g))?;
        let noticed = eventually(APPLY_LIMIT, "the broken config to be rejected", || async {
            (probe.reload_errors().await > errors).then_some(())
        })
        .await;
        if noticed.is_err() {
            ledger.problems.push(format!(
                "broken change {g} was not rejected within {APPLY_LIMIT:?}; the sidecar logged:\n{}",
                probe.log_tail()
            ));
            return Ok(());
        }
        let check = async {
            let now = probe.version().await.unwrap_or_default();
            anyhow::ensure!(now == before, "the version moved from {before} to {now}");
            probe.expect(&format!("probe-{g}"), "hi", 404).await?;
            probe.expect("soak", &format!("soak-block-{last_good}"), 400).await?;
            Ok(())
        };
        match check.await {
            Ok(()) => ledger.rejected += 1,
            Err(e) => ledger.problems.push(format!("broken change {g} was not kept out: {e}")),
        }
        Ok(())
    }
}

/// Requests that show which config the sidecar serves.
struct Probe {
    client: Client,
    admin: Client,
    /// The sidecar's log.
    log: PathBuf,
}

impl Probe {
    /// The last lines of the sidecar's log, to explain a change that went wrong.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// The version `/ready` names, once the sidecar has one.
    async fn version(&self) -> Option<String> {
        let r = self.admin.get("/ready").await.ok()?;
        r.status.is_success().then(|| r.text().trim().trim_start_matches("ready ").to_owned())
    }

    async fn reload_errors(&self) -> u64 {
        let Ok(r) = self.admin.get("/metrics").await else { return 0 };
        crate::exposition::sum(&r.text(), "bulwark_config_reloads_total", &["result=\"error\""]) as u64
    }

    async fn send(&self, model: &str, content: &str) -> anyhow::Result<Reply> {
        let body = json!({"model": model, "messages": [{"role": "user", "content": content}]});
        self.client.post("/v1/chat/completions", &body, &[("cache-control", "no-cache")]).await
    }

    async fn expect(&self, model: &str, content: &str, status: u16) -> anyhow::Result<Reply> {
        let r = self.send(model, content).await?;
        anyhow::ensure!(
            r.status.as_u16() == status,
            "{model} with {content:?} answered {} (wanted {status}): {}",
            r.status,
            r.text()
        );
        Ok(r)
    }

    /// Generation `g` is served: its route with its budget, its block pattern (and not the last
    /// one's), and the cache as it says.
    async fn good(&self, g: u32, last_good: u32) -> anyhow::Result<()> {
        let route = format!("probe-{g}");
        for _ in 0..probe_budget(g) {
            self.expect(&route, "hi", 200).await?;
        }
        self.expect(&route, "hi", 429).await?;
        if g > 1 {
            self.expect(&format!("probe-{last_good}"), "hi", 404).await?;
        }
        let blocked = self.expect("soak", &format!("soak-block-{g}"), 400).await?;
        anyhow::ensure!(blocked.header("x-bulwark-error") == Some("blocked_by_policy"), "{:?}", blocked.headers);
        if last_good != g {
            self.expect("soak", &format!("soak-block-{last_good}"), 200).await?;
        }
        let body = json!({"model": "soak", "messages": [{"role": "user", "content": format!("cache probe {g}")}]});
        let mut seen = vec![];
        for _ in 0..2 {
            let r = self.client.post("/v1/chat/completions", &body, &[]).await?;
            anyhow::ensure!(r.status.is_success(), "cache probe answered {}", r.status);
            seen.push(r.header("x-bulwark-cache").map(str::to_owned));
        }
        let want = if cache_on(g) { [Some("miss"), Some("hit")] } else { [None, None] };
        anyhow::ensure!(
            seen.iter().map(Option::as_deref).eq(want),
            "cache headers {seen:?}, wanted {want:?} (cache {})",
            if cache_on(g) { "on" } else { "off" }
        );
        Ok(())
    }
}

/// Open loop at `rate` until `stop`; then waits for the requests in flight.
async fn drive(client: Client, rate: u64, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut inflight = JoinSet::new();
    let mut i: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        while inflight.try_join_next().is_some() {}
        i += 1;
        let (client, tally) = (client.clone(), tally.clone());
        inflight.spawn(async move {
            let scheduled = Instant::now();
            tally.sent.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(REQUEST_LIMIT, one(&client, i)).await {
                Ok(Ok(streamed)) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    tally.streamed.fetch_add(u64::from(streamed), Ordering::Relaxed);
                    let us = u32::try_from(scheduled.elapsed().as_micros()).unwrap_or(u32::MAX);
                    tally.latency_us.lock().push(us);
                }
                Ok(Err(why)) => tally.fail(why),
                Err(_) => tally.fail(format!("no answer within {REQUEST_LIMIT:?}")),
            }
        });
    }
    while inflight.join_next().await.is_some() {}
}

/// Load request `i` (every tenth streamed), asking for an answer that holds an address the
/// output policy must redact. Ok(streamed) when it succeeded.
async fn one(client: &Client, i: u64) -> Result<bool, String> {
    let stream = i.is_multiple_of(10);
    let address = format!("soak-{i}@example.com");
    let body = json!({"model": "soak", "stream": stream,
                      "messages": [{"role": "user", "content": format!("echo: note {i}: write to {address} today")}]});
    let r = client.post("/v1/chat/completions", &body, &[]).await.map_err(|e| format!("transport: {e:#}"))?;
    if !r.status.is_success() {
        let code = r.header("x-bulwark-error").unwrap_or("-").to_owned();
        return Err(format!("status {} ({code})", r.status.as_u16()));
    }
    let text = r.text();
    if text.contains("@example.com") {
        return Err("the planted address reached the client".into());
    }
    if stream {
        if text.contains("event: error") || !text.trim_end().ends_with("data: [DONE]") {
            return Err("the stream did not end cleanly".into());
        }
    } else if serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.pointer("/choices/0/message/content").cloned())
        .is_none()
    {
        return Err("the answer is not a chat completion".into());
    }
    Ok(stream)
}

/// Samples the RSS of `pid` twice a second.
async fn sample_rss(pid: u32, started: Instant, out: Arc<Mutex<Vec<(f64, u64)>>>) {
    loop {
        if let Some(kib) = rss_kib(pid) {
            out.lock().push((started.elapsed().as_secs_f64(), kib));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
