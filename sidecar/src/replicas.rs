//! Load-aware choice of where a request goes: among a self-hosted backend's replicas, and among a
//! rule's backends with `loadBalancing: leastLoaded`. Power of two choices: of two candidates
//! drawn at random (by weight, for backends), the one with the lower cost, where the cost is its
//! load (the requests this sidecar has in flight there or, where the server exposes them, the
//! requests it runs and queues for all its clients, whichever is more) weighted by an EWMA of its
//! time to first token and its KV-cache use. A replica that keeps failing is ejected
//! for a cooldown, then gets traffic again. Replicas' metrics are scraped by `scrape` at a
//! bounded rate, never per request.

use std::{
    collections::HashMap,
    sync::{
        Arc, Weak,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use parking_lot::Mutex;
use rand::Rng;
use tokio::time::Instant;

use crate::upstream::Client;

/// Consecutive failures that eject a replica.
const EJECT_AFTER: u32 = 3;
/// The first ejection; each one in a row doubles it, up to `MAX_EJECTION`.
const EJECTION: Duration = Duration::from_secs(5);
const MAX_EJECTION: Duration = Duration::from_secs(120);
/// How much the newest time to first token counts in the EWMA.
const EWMA_ALPHA: f64 = 0.3;
/// Without new answers an idle replica's EWMA fades over this long, so one that looked slow
/// once is tried again rather than left idle for good. One with requests in flight keeps it: a
/// replica that stalls must not look faster for it.
const EWMA_DECAY: Duration = Duration::from_secs(5);
/// How often replicas' metrics are read, and how long a read may take.
pub const SCRAPE_EVERY: Duration = Duration::from_secs(1);
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);
/// Scraped numbers older than this no longer count.
const SCRAPE_TTL: Duration = Duration::from_secs(5);

/// One place requests go: a replica's base URL (or a backend's URL), and what is known of its load.
#[derive(Debug)]
pub struct Endpoint {
    pub url: String,
    /// Where its Prometheus metrics are, if it serves them.
    pub metrics_url: Option<String>,
    in_flight: AtomicU64,
    /// EWMA of the time to first token, in µs; 0 until the first answer.
    ttft_us: AtomicU64,
    failures: AtomicU32,
    ejections: AtomicU32,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    ejected_until: Option<Instant>,
    scraped: Option<Scraped>,
    /// When the EWMA last took an answer.
    answered_at: Option<Instant>,
}

/// A replica's own view of its load, from its metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scraped {
    pub waiting: f64,
    pub running: f64,
    /// 0 to 1, when exposed.
    pub kv_cache: Option<f64>,
    pub at: Instant,
}

/// Counts a request in flight to an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Endpoint {
    pub fn new(url: String, metrics_url: Option<String>) -> Self {
        Self {
            url,
            metrics_url,
            in_flight: AtomicU64::new(0),
            ttft_us: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            state: Mutex::new(State::default()),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A request starts; it counts until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// It answered with success, its first byte after `ttft` (a stream's first token, or a
    /// whole answer's head): the EWMA takes it, and its failures in a row are over.
    pub fn answered(&self, ttft: Duration) {
        let us = ttft.as_micros().min(u128::from(u64::MAX)) as u64;
        let old = self.ttft_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (EWMA_ALPHA * us as f64 + (1.0 - EWMA_ALPHA) * old as f64) as u64 };
        self.ttft_us.store(new.max(1), Ordering::Relaxed);
        self.state.lock().answered_at = Some(Instant::now());
        self.failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
    }

    /// An attempt failed by the endpoint's fault; enough in a row eject it for a while. True
    /// when this failure ejected it.
    pub fn failed(&self, now: Instant) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < EJECT_AFTER {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        let times = self.ejections.fetch_add(1, Ordering::Relaxed).min(8);
        let cooldown = EJECTION.saturating_mul(1 << times).min(MAX_EJECTION);
        self.state.lock().ejected_until = Some(now + cooldown);
        true
    }

    pub fn ejected(&self, now: Instant) -> bool {
        self.state.lock().ejected_until.is_some_and(|t| now < t)
    }

    pub fn set_scraped(&self, s: Scraped) {
        self.state.lock().scraped = Some(s);
    }

    /// The cost of sending it one more request: its load (ours in flight, or all it runs and
    /// queues, whichever is more) times its time to first token, raised by a filling KV cache.
    pub fn cost(&self, now: Instant) -> f64 {
        let (scraped, answered_at) = {
            let state = self.state.lock();
            (state.scraped.filter(|s| now.saturating_duration_since(s.at) < SCRAPE_TTL), state.answered_at)
        };
        let in_flight = self.in_flight() as f64;
        let load = scraped.map_or(in_flight, |s| in_flight.max(s.running + s.waiting));
        let kv = scraped.and_then(|s| s.kv_cache).unwrap_or(0.0).clamp(0.0, 1.0);
        let fade = match answered_at {
            Some(t) if in_flight == 0.0 => {
                (-now.saturating_duration_since(t).as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp()
            }
            _ => 1.0,
        };
        let ttft = (self.ttft_us.load(Ordering::Relaxed) as f64 * fade).max(1_000.0);
        // Failures in a row (short of an ejection) make it look slow, which it may well be.
        let failing = 1.0 + f64::from(self.failures.load(Ordering::Relaxed));
        (load + 1.0) * ttft * (1.0 + 3.0 * kv * kv) * failing * failing
    }
}

/// Of `candidates`, two different ones drawn by `weight`; the one of lower `cost` (power of
/// two choices).
pub fn p2c<'a, T>(
    candidates: &[&'a T],
    weight: impl Fn(&T) -> u64,
    cost: impl Fn(&T) -> f64,
    rng: &mut impl Rng,
) -> Option<&'a T> {
    // One draw by weight among the candidates but `skip`.
    let mut draw = |skip: Option<usize>| -> Option<usize> {
        let w = |i: usize| if Some(i) == skip { 0 } else { weight(candidates[i]) };
        let total: u64 = (0..candidates.len()).map(w).sum();
        if total == 0 {
            return None;
        }
        let mut ticket = rng.random_range(0..total);
        (0..candidates.len()).find(|&i| {
            let here = w(i);
            if ticket < here {
                return true;
            }
            ticket -= here;
            false
        })
    };
    let a = draw(None)?;
    let Some(b) = draw(Some(a)) else { return Some(candidates[a]) };
    let (a, b) = (candidates[a], candidates[b]);
    Some(if cost(b) < cost(a) { b } else { a })
}

/// The replica a request goes to: the cheaper of two, among those not ejected; when all are
/// ejected, the one whose ejection ends first (a probe).
pub fn pick(endpoints: &[Arc<Endpoint>], now: Instant, rng: &mut impl Rng) -> Option<Arc<Endpoint>> {
    let live: Vec<&Arc<Endpoint>> = endpoints.iter().filter(|e| !e.ejected(now)).collect();
    if live.is_empty() {
        return endpoints.iter().min_by_key(|e| e.state.lock().ejected_until.map(Instant::into_std)).cloned();
    }
    p2c(&live, |_| 1, |e| e.cost(now), rng).cloned()
}

/// Endpoints kept across reloads by URL, so their load and history outlive a config change and
/// every rule that sends to a replica sees the same load; and the ones whose metrics are scraped.
#[derive(Default)]
pub struct Registry {
    endpoints: Mutex<HashMap<Key, Weak<Endpoint>>>,
}

/// A replica's URL and where it serves metrics.
type Key = (String, Option<String>);

impl Registry {
    /// The endpoint of `url` (serving metrics at `metrics_url`), new or the one it had.
    pub fn get(&self, url: &str, metrics_url: Option<String>) -> Arc<Endpoint> {
        let mut map = self.endpoints.lock();
        let key = (url.to_owned(), metrics_url);
        if let Some(e) = map.get(&key).and_then(Weak::upgrade) {
            return e;
        }
        let e = Arc::new(Endpoint::new(url.to_owned(), key.1.clone()));
        map.insert(key, Arc::downgrade(&e));
        e
    }

    /// The live endpoints that serve metrics; forgets the ones no config holds any more.
    fn scraped(&self) -> Vec<Arc<Endpoint>> {
        let mut map = self.endpoints.lock();
        map.retain(|_, e| e.strong_count() > 0);
        map.values().filter_map(Weak::upgrade).filter(|e| e.metrics_url.is_some()).collect()
    }
}

/// The first of `names` found in Prometheus text, its values over all label sets folded by
/// `fold` (the names are one signal as different servers, or versions, call it).
fn series(text: &str, names: &[&str], fold: fn(f64, f64) -> f64) -> Option<f64> {
    names.iter().find_map(|name| value(text, name, fold))
}

fn value(text: &str, name: &str, fold: fn(f64, f64) -> f64) -> Option<f64> {
    let mut found = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        if line[..name_end] != *name {
            continue;
        }
        // The labels may hold spaces inside quotes: the value follows the closing brace.
        let rest = &line[name_end..];
        let rest = match rest.strip_prefix('{') {
            Some(labels) => {
                let mut quoted = false;
                let mut escaped = false;
                let close = labels.char_indices().find(|&(_, c)| {
                    let end = c == '}' && !quoted;
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        quoted = !quoted;
                    }
                    end
                });
                match close {
                    Some((at, _)) => &labels[at + 1..],
                    None => continue,
                }
            }
            None => rest,
        };
        // `value [timestamp]`
        if let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite()) {
            found = Some(found.map_or(v, |f| fold(f, v)));
        }
    }
    found
}

/// Reads the load out of a server's metrics: vLLM, llama.cpp's server, TGI, SGLang.
pub fn parse(text: &str, at: Instant) -> Option<Scraped> {
    let sum = |a: f64, b: f64| a + b;
    let waiting = series(
        text,
        &["vllm:num_requests_waiting", "llamacpp:requests_deferred", "tgi_queue_size", "sglang:num_queue_reqs"],
        sum,
    );
    let running =
        series(text, &["vllm:num_requests_running", "llamacpp:requests_processing", "sglang:num_running_reqs"], sum);
    // A share: of several label sets (engines, devices), the fullest.
    let kv_cache = series(
        text,
        &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio"],
        f64::max,
    );
    (waiting.is_some() || running.is_some() || kv_cache.is_some()).then(|| Scraped {
        waiting: waiting.unwrap_or(0.0),
        running: running.unwrap_or(0.0),
        kv_cache,
        at,
    })
}

/// Reads every replica's metrics each `SCRAPE_EVERY`, until shutdown.
pub async fn scrape(
    registry: Arc<Registry>,
    client: Client,
    metrics: Arc<crate::metrics::Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(SCRAPE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        let endpoints = registry.scraped();
        let reads = endpoints.iter().map(|e| read(&client, e));
        for ok in futures_util::future::join_all(reads).await {
            let result = if ok { "success" } else { "error" };
            metrics.replica_scrapes.get_or_create(&crate::metrics::ReloadLabels { result }).inc();
        }
    }
}

/// Reads one replica's metrics; true when they were read and held its load.
async fn read(client: &Client, e: &Endpoint) -> bool {
    let Some(url) = &e.metrics_url else { return false };
    let Ok(uri) = url.parse::<http::Uri>() else { return false };
    let Ok(req) = http::Request::get(uri).body(Full::new(Bytes::new())) else { return false };
    let body = async {
        let resp = client.request(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        Limited::new(resp.into_body(), 4 << 20).collect().await.ok().map(|c| c.to_bytes())
    };
    match tokio::time::timeout(SCRAPE_TIMEOUT, body).await {
        Ok(Some(bytes)) => match parse(&String::from_utf8_lossy(&bytes), Instant::now()) {
            Some(s) => {
                e.set_scraped(s);
                true
            }
            None => false,
        },
        _ => {
            tracing::debug!(url, "replica metrics not read");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn server_metrics_are_read_as_load() {
        let vllm = "# HELP vllm:num_requests_waiting Number of requests waiting.\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"llama\"} 3.0\nvllm:num_requests_running{model_name=\"llama\"} 8.0\nvllm:kv_cache_usage_perc{model_name=\"llama\"} 0.75\n";
        let s = parse(vllm, Instant::now()).unwrap();
        assert_eq!((s.waiting, s.running, s.kv_cache), (3.0, 8.0, Some(0.75)));
        let llamacpp = "llamacpp:requests_processing 2\nllamacpp:requests_deferred 1 1700000000000\nllamacpp:kv_cache_usage_ratio 0.25\n";
        let s = parse(llamacpp, Instant::now()).unwrap();
        assert_eq!((s.waiting, s.running, s.kv_cache), (1.0, 2.0, Some(0.25)));
        assert_eq!(parse("process_cpu_seconds_total 4\n", Instant::now()), None, "no load metrics: nothing known");
        // vLLM versions that expose both names of the KV cache: one is read, not their sum.
        let both = "vllm:kv_cache_usage_perc{engine=\"0\"} 0.5\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.75\nvllm:gpu_cache_usage_perc 0.5\n";
        assert_eq!(parse(both, Instant::now()).unwrap().kv_cache, Some(0.75));
    }

    #[tokio::test(start_paused = true)]
    async fn the_cheaper_of_two_wins_and_a_failing_replica_is_ejected_then_probed() {
        let fast = Arc::new(Endpoint::new("http://fast/v1".into(), None));
        let slow = Arc::new(Endpoint::new("http://slow/v1".into(), None));
        fast.answered(Duration::from_millis(50));
        slow.answered(Duration::from_millis(800));
        let both = [fast.clone(), slow.clone()];
        let mut rng = StdRng::seed_from_u64(5);
        let now = Instant::now();
        let picks = (0..100).filter(|_| pick(&both, now, &mut rng).unwrap().url == "http://fast/v1").count();
        assert_eq!(picks, 100, "with two candidates, the cheaper is always picked");
        // Load on the fast one: 20 in flight at 50 ms costs more than 0 at 800 ms.
        let held: Vec<_> = (0..20).map(|_| fast.start()).collect();
        assert!(fast.cost(now) > slow.cost(now));
        drop(held);
        assert_eq!(fast.in_flight(), 0);
        // A queue reported by the server counts like requests in flight.
        fast.set_scraped(Scraped { waiting: 30.0, running: 8.0, kv_cache: Some(0.9), at: now });
        assert!(fast.cost(now) > slow.cost(now));
        tokio::time::advance(SCRAPE_TTL).await;
        assert!(fast.cost(Instant::now()) < slow.cost(Instant::now()), "stale numbers no longer count");
        // Idle, a slow EWMA fades so the replica is tried again; with a request in flight (one
        // that may be stalled) it does not.
        let slow_at = slow.cost(Instant::now());
        let stuck = slow.start();
        tokio::time::advance(EWMA_DECAY * 4).await;
        assert!(slow.cost(Instant::now()) >= slow_at, "in flight: no fading");
        drop(stuck);
        assert!(slow.cost(Instant::now()) < slow_at / 10.0, "idle: faded");
        slow.answered(Duration::from_millis(800));

        let now = Instant::now();
        assert!(!fast.failed(now) && !fast.failed(now));
        assert!(fast.failed(now), "the third failure in a row ejects it");
        for _ in 0..20 {
            assert_eq!(pick(&both, now, &mut rng).unwrap().url, "http://slow/v1");
        }
        tokio::time::advance(EJECTION).await;
        assert!(!fast.ejected(Instant::now()), "back after its cooldown, to be probed");
        assert!(!fast.failed(Instant::now()) && !fast.failed(Instant::now()) && fast.failed(Instant::now()));
        tokio::time::advance(EJECTION).await;
        assert!(fast.ejected(Instant::now()), "ejected again for twice as long");
        slow.failed(Instant::now());
        slow.failed(Instant::now());
        slow.failed(Instant::now());
        let probe = pick(&both, Instant::now(), &mut rng).unwrap();
        assert_eq!(probe.url, "http://fast/v1", "all ejected: the one back soonest is probed");
    }
}
