//! Traffic for rollout tests and benchmarks: a client sending chat completions back to back,
//! recording when each request was sent, its status and the backend that served it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use serde_json::json;
use tokio::time::Instant;

use crate::client::Client;

/// One answer seen by the client: when its request was sent (so a request sent after a switch
/// is known to be routed after it), its status, and the backend that served it.
pub type Seen = (Instant, u16, String);

pub struct Load {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Sends requests with `headers` until stopped, pausing `gap` between them.
    pub fn start(client: Client, headers: &'static [(&'static str, &'static str)], gap: Duration) -> Self {
        let seen = Arc::new(Mutex::new(vec![]));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, halt) = (seen.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            while !halt.load(Ordering::SeqCst) {
                let sent = Instant::now();
                if let Ok(r) = client.post("/v1/chat/completions", &body, headers).await {
                    let backend = r.header("x-bulwark-backend").unwrap_or_default().to_owned();
                    s.lock().push((sent, r.status.as_u16(), backend));
                }
                tokio::time::sleep(gap).await;
            }
        });
        Self { seen, stop, task }
    }

    pub async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        self.seen.lock().clone()
    }

    /// The answers to requests sent after `t`.
    pub fn since(&self, t: Instant) -> Vec<Seen> {
        self.seen.lock().iter().filter(|(at, ..)| *at > t).cloned().collect()
    }
}

/// The share of `seen` that `backend` served.
pub fn share(seen: &[Seen], backend: &str) -> f64 {
    seen.iter().filter(|(_, _, b)| b == backend).count() as f64 / seen.len().max(1) as f64
}
