//! Exact-match response cache: normalized request → complete response (JSON or a recorded
//! stream), with a TTL and bounds on entries and bytes, evicting the least recently used.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use parking_lot::Mutex;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

pub type Key = [u8; 32];

#[derive(Debug, Clone)]
pub struct Cached {
    pub body: Bytes,
    pub stream: bool,
    pub backend: String,
}

#[derive(Debug)]
pub struct Cache {
    ttl: Duration,
    max_entries: usize,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Key, Entry>,
    /// Recency order: sequence number → key.
    lru: BTreeMap<u64, Key>,
    seq: u64,
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    value: Cached,
    expires: Instant,
    seq: u64,
}

impl Cache {
    pub fn new(ttl: Duration, max_entries: u64, max_bytes: u64) -> Self {
        Self {
            ttl,
            max_entries: max_entries.max(1) as usize,
            max_bytes: max_bytes.max(1) as usize,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn same_settings(&self, ttl: Duration, max_entries: u64, max_bytes: u64) -> bool {
        (self.ttl, self.max_entries as u64, self.max_bytes as u64) == (ttl, max_entries.max(1), max_bytes.max(1))
    }

    /// The largest single response worth recording.
    pub fn max_entry_bytes(&self) -> usize {
        (self.max_bytes / 4).max(1)
    }

    /// A key over the route, the API path and the body with sorted keys.
    pub fn key(route_id: &str, path: &str, body: &Map<String, Value>) -> Key {
        let mut h = Sha256::new();
        h.update(route_id.as_bytes());
        h.update([0]);
        h.update(path.as_bytes());
        h.update([0]);
        // serde_json's Map keeps keys sorted, so equal requests serialize equally.
        h.update(serde_json::to_vec(body).unwrap_or_default());
        h.finalize().into()
    }

    /// Whether the client asked not to be served from or stored in the cache.
    pub fn bypass(headers: &HeaderMap) -> bool {
        headers
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|d| matches!(d.trim().to_ascii_lowercase().as_str(), "no-cache" | "no-store")))
    }

    pub fn get(&self, key: &Key, now: Instant) -> Option<Cached> {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let entry = inner.map.get_mut(key)?;
        if entry.expires <= now {
            let seq = entry.seq;
            if let Some(e) = inner.map.remove(key) {
                inner.bytes -= e.value.body.len();
            }
            inner.lru.remove(&seq);
            return None;
        }
        inner.lru.remove(&entry.seq);
        inner.seq += 1;
        entry.seq = inner.seq;
        inner.lru.insert(inner.seq, *key);
        Some(entry.value.clone())
    }

    pub fn insert(&self, key: Key, value: Cached, now: Instant) {
        let size = value.body.len();
        if size > self.max_entry_bytes() {
            return;
        }
        let mut g = self.inner.lock();
        let inner = &mut *g;
        if let Some(old) = inner.map.remove(&key) {
            inner.lru.remove(&old.seq);
            inner.bytes -= old.value.body.len();
        }
        while inner.map.len() >= self.max_entries || inner.bytes + size > self.max_bytes {
            let Some((_, oldest)) = inner.lru.pop_first() else { break };
            if let Some(e) = inner.map.remove(&oldest) {
                inner.bytes -= e.value.body.len();
            }
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.lru.insert(seq, key);
        inner.bytes += size;
        inner.map.insert(key, Entry { value, expires: now + self.ttl, seq });
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(body: &str) -> Cached {
        Cached { body: Bytes::from(body.to_owned()), stream: false, backend: "b".into() }
    }

    fn body(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn keys_ignore_field_order_but_not_content() {
        let a = Cache::key("r", "/v1/chat/completions", &body(r#"{"model":"m","temperature":0}"#));
        let b = Cache::key("r", "/v1/chat/completions", &body(r#"{"temperature":0,"model":"m"}"#));
        let c = Cache::key("r", "/v1/chat/completions", &body(r#"{"temperature":1,"model":"m"}"#));
        let d = Cache::key("other", "/v1/chat/completions", &body(r#"{"model":"m","temperature":0}"#));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_entries_and_bytes_bound_the_cache() {
        let c = Cache::new(Duration::from_secs(10), 2, 1000);
        let now = Instant::now();
        c.insert([1; 32], val("one"), now);
        c.insert([2; 32], val("two"), now);
        assert!(c.get(&[1; 32], now).is_some(), "touch 1 so 2 is the oldest");
        c.insert([3; 32], val("three"), now);
        assert!(c.get(&[2; 32], now).is_none(), "least recently used evicted");
        assert!(c.get(&[1; 32], now).is_some() && c.get(&[3; 32], now).is_some());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(c.get(&[1; 32], Instant::now()).is_none(), "expired");

        let small = Cache::new(Duration::from_secs(10), 100, 40);
        small.insert([1; 32], val(&"x".repeat(11)), now);
        assert!(small.is_empty(), "an entry above a quarter of the budget is not kept");
        for i in 0..10u8 {
            small.insert([i; 32], val(&"x".repeat(10)), now);
        }
        assert_eq!(small.len(), 4, "40 bytes hold four 10-byte entries");
    }

    #[test]
    fn cache_control_opts_out() {
        let mut h = HeaderMap::new();
        assert!(!Cache::bypass(&h));
        h.insert("cache-control", "max-age=0, No-Store".parse().unwrap());
        assert!(Cache::bypass(&h));
    }
}
