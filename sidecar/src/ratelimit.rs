//! Per-route rate limits by requests and tokens per minute, one token bucket per key.
//! Tokens are reserved from an estimate before the call and settled with the real usage after.

use std::{collections::HashMap, time::Duration};

use http::HeaderMap;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

const MAX_KEYS: usize = 100_000;

#[derive(Debug)]
pub struct RateLimiter {
    rpm: Option<f64>,
    tpm: Option<f64>,
    key_header: Option<http::HeaderName>,
    buckets: Mutex<HashMap<String, Buckets>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Self {
        Self { level: capacity, at: now }
    }
    fn refill(&mut self, capacity: f64, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + secs * capacity / 60.0).min(capacity);
        self.at = now;
    }
    /// Seconds until `need` (capped at capacity) is available.
    fn wait(&self, need: f64, capacity: f64) -> f64 {
        let need = need.min(capacity);
        if self.level >= need { 0.0 } else { (need - self.level) * 60.0 / capacity }
    }
}

#[derive(Debug, Clone, Copy)]
struct Buckets {
    requests: Bucket,
    tokens: Bucket,
}

/// What a granted request holds until it is settled.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub key: String,
    pub tokens: u64,
}

impl RateLimiter {
    pub fn new(rpm: Option<u64>, tpm: Option<u64>, key_header: Option<&str>) -> Self {
        Self {
            rpm: rpm.map(|v| v as f64),
            tpm: tpm.map(|v| v as f64),
            key_header: key_header.and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn same_settings(&self, rpm: Option<u64>, tpm: Option<u64>, key_header: Option<&str>) -> bool {
        self.rpm == rpm.map(|v| v as f64)
            && self.tpm == tpm.map(|v| v as f64)
            && self.key_header.as_ref().map(|h| h.as_str()) == key_header.map(str::to_ascii_lowercase).as_deref()
    }

    /// The key a request is limited under: the configured header's value, else a hash of the
    /// client's API key, else `anonymous`.
    pub fn key(&self, headers: &HeaderMap) -> String {
        if let Some(h) = &self.key_header {
            return headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map_or_else(|| "anonymous".into(), |v| format!("h:{v}"));
        }
        let secret = headers
            .get(http::header::AUTHORIZATION)
            .or_else(|| headers.get("x-api-key"))
            .or_else(|| headers.get("api-key"))
            .map(|v| v.as_bytes());
        match secret {
            Some(s) => {
                let d = Sha256::digest(s);
                format!("k:{}", d.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>())
            }
            None => "anonymous".into(),
        }
    }

    /// Takes one request and `tokens` estimated tokens, or says how long to wait.
    pub fn acquire(&self, key: String, tokens: u64, now: Instant) -> Result<Reservation, Duration> {
        let mut map = self.buckets.lock();
        if map.len() >= MAX_KEYS && !map.contains_key(&key) {
            self.prune(&mut map, now);
        }
        let b = map.entry(key.clone()).or_insert_with(|| Buckets {
            requests: Bucket::full(self.rpm.unwrap_or(0.0), now),
            tokens: Bucket::full(self.tpm.unwrap_or(0.0), now),
        });
        let mut wait: f64 = 0.0;
        if let Some(cap) = self.rpm {
            b.requests.refill(cap, now);
            wait = wait.max(b.requests.wait(1.0, cap));
        }
        if let Some(cap) = self.tpm {
            b.tokens.refill(cap, now);
            wait = wait.max(b.tokens.wait(tokens as f64, cap));
        }
        if wait > 0.0 {
            return Err(Duration::from_secs_f64(wait));
        }
        if self.rpm.is_some() {
            b.requests.level -= 1.0;
        }
        if self.tpm.is_some() {
            b.tokens.level -= tokens as f64;
        }
        Ok(Reservation { key, tokens })
    }

    /// Corrects the token bucket once the real usage is known. The level may go below zero:
    /// a request that used more than estimated delays the next ones.
    pub fn settle(&self, r: &Reservation, actual_tokens: u64) {
        if self.tpm.is_none() {
            return;
        }
        if let Some(b) = self.buckets.lock().get_mut(&r.key) {
            b.tokens.level += r.tokens as f64 - actual_tokens as f64;
        }
    }

    fn prune(&self, map: &mut HashMap<String, Buckets>, now: Instant) {
        let (rpm, tpm) = (self.rpm, self.tpm);
        map.retain(|_, b| {
            let mut b = *b;
            let full_r = rpm.is_none_or(|c| {
                b.requests.refill(c, now);
                b.requests.level >= c
            });
            let full_t = tpm.is_none_or(|c| {
                b.tokens.refill(c, now);
                b.tokens.level >= c
            });
            !(full_r && full_t)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_refill_evenly() {
        let l = RateLimiter::new(Some(2), None, None);
        let now = Instant::now();
        assert!(l.acquire("a".into(), 0, now).is_ok());
        assert!(l.acquire("a".into(), 0, now).is_ok());
        let wait = l.acquire("a".into(), 0, now).unwrap_err();
        assert_eq!(wait.as_secs(), 30);
        assert!(l.acquire("b".into(), 0, now).is_ok(), "keys are separate");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(l.acquire("a".into(), 0, Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_reserved_then_settled() {
        let l = RateLimiter::new(None, Some(1000), None);
        let now = Instant::now();
        let r = l.acquire("a".into(), 600, now).unwrap();
        assert!(l.acquire("a".into(), 600, now).is_err(), "600 + 600 > 1000");
        l.settle(&r, 100);
        assert!(l.acquire("a".into(), 600, now).is_ok(), "only 100 were used");
        // More than the whole minute's budget is admitted when the bucket is full, then waits.
        let l = RateLimiter::new(None, Some(100), None);
        assert!(l.acquire("a".into(), 5000, now).is_ok());
        assert!(l.acquire("a".into(), 1, now).is_err());
    }

    #[test]
    fn keys_come_from_a_header_or_the_hashed_api_key() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer sk-secret".parse().unwrap());
        h.insert("x-user-id", "u1".parse().unwrap());
        let by_key = RateLimiter::new(Some(1), None, None).key(&h);
        assert!(by_key.starts_with("k:") && !by_key.contains("secret"));
        assert_eq!(RateLimiter::new(Some(1), None, Some("X-User-Id")).key(&h), "h:u1");
        assert_eq!(RateLimiter::new(Some(1), None, None).key(&HeaderMap::new()), "anonymous");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Whether what was admitted at `(time in ms, amount)` stays within a bucket of
        /// `capacity` per minute over every interval between two admissions: at most
        /// `capacity` plus what refills in the interval.
        fn within_budget(admitted: &[(u64, f64)], capacity: f64) -> Result<(), String> {
            for (i, (from, _)) in admitted.iter().enumerate() {
                let mut sum = 0.0;
                for (to, amount) in &admitted[i..] {
                    sum += amount;
                    let budget = capacity + capacity * (to - from) as f64 / 60_000.0;
                    if sum > budget + 1e-6 {
                        return Err(format!("{sum} admitted in [{from}, {to}] ms, budget {budget}"));
                    }
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

            /// However requests arrive, and whatever they estimate and then use, no interval
            /// admits more requests, or more tokens used, than the limits allow.
            #[test]
            fn a_limiter_never_admits_more_than_its_budget(
                rpm in 1u64..50,
                tpm in 100u64..5_000,
                calls in prop::collection::vec((0u64..5_000, 0u64..100, 0.0f64..=1.0, 0usize..3), 1..300),
            ) {
                let l = RateLimiter::new(Some(rpm), Some(tpm), None);
                let start = Instant::now();
                let (mut at, mut requests, mut tokens) = (0u64, vec![], vec![]);
                for (gap, estimate, used, key) in calls {
                    at += gap;
                    let now = start + Duration::from_millis(at);
                    // Keys are independent: check one of them.
                    let Ok(r) = l.acquire(format!("k{key}"), estimate.min(tpm), now) else { continue };
                    // What a request really uses is at most its estimate here; more is delayed
                    // by the negative level it leaves, a debt, not a grant.
                    let actual = (r.tokens as f64 * used) as u64;
                    l.settle(&r, actual);
                    if key == 0 {
                        requests.push((at, 1.0));
                        tokens.push((at, actual as f64));
                    }
                }
                prop_assert_eq!(within_budget(&requests, rpm as f64), Ok(()));
                prop_assert_eq!(within_budget(&tokens, tpm as f64), Ok(()));
            }
        }
    }
}
