//! The operator link: a config stream the sidecar keeps open to the operator, and outcome
//! reports sent back over the same HTTP/2 connection (protocol in `bulwark_api::control`).
//!
//! Each config that arrives is built and swapped in like a file reload; a bad one is refused and
//! the last good config keeps serving. While the stream is down the sidecar keeps serving and
//! the local copy (the ConfigMap file) is watched again; it reconnects with backoff, and the
//! operator sends the current version as soon as it does.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use bulwark_api::{
    SidecarConfig,
    control::{REPORT_PATH, STREAM_PATH},
};
use bytes::{Buf, Bytes, BytesMut};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use rand::Rng as _;
use tokio::sync::{Notify, watch};

use crate::{
    metrics::Metrics,
    runtime::{Runtime, Shared},
};

/// Where the operator is and how the sidecar proves who it is.
#[derive(Clone, Debug)]
pub struct OperatorLink {
    /// `https://bulwark-operator.bulwark-system.svc:15010`.
    pub url: String,
    /// CA that signed the operator's certificate (besides the system roots).
    pub ca: Option<crate::upstream::Ca>,
    /// The projected service-account token (audience `bulwark`); read again on each request.
    pub token_file: PathBuf,
    pub report_interval: Duration,
}

/// The shortest time between a report and one sent early because of a failure.
const EARLY_REPORT: Duration = Duration::from_millis(500);
/// A longer silence than this (the operator sends keep-alives) means the stream is dead.
const SILENCE: Duration = Duration::from_secs(45);
/// The largest config line accepted.
const MAX_LINE: usize = 64 << 20;

type H2Client = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The running link's tasks share this.
pub struct Link {
    cfg: OperatorLink,
    client: H2Client,
    /// True while the stream is open; the file source stands aside meanwhile.
    pub connected: Arc<AtomicBool>,
    applied: Notify,
}

impl Link {
    pub fn new(cfg: OperatorLink) -> anyhow::Result<Arc<Self>> {
        let connector = crate::upstream::connector(cfg.ca.as_ref(), true)?;
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .build(connector);
        url::check(&cfg.url)?;
        Ok(Arc::new(Self { cfg, client, connected: Arc::new(AtomicBool::new(false)), applied: Notify::new() }))
    }

    fn request(&self, method: http::Method, path: &str, body: Bytes) -> anyhow::Result<Request<Full<Bytes>>> {
        let path_ = self.cfg.token_file.display();
        let token = std::fs::read_to_string(&self.cfg.token_file).with_context(|| format!("reading token {path_}"))?;
        Ok(Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.cfg.url.trim_end_matches('/')))
            .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?)
    }

    /// Keeps the config stream open until `shutdown`, applying each config that arrives.
    pub async fn stream(
        self: Arc<Self>,
        shared: Arc<Shared>,
        tx: watch::Sender<Arc<Runtime>>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut failures = 0u32;
        loop {
            let outcome = tokio::select! {
                r = self.stream_once(&shared, &tx, &metrics) => r,
                _ = shutdown.changed() => return,
            };
            if self.connected.swap(false, Ordering::SeqCst) {
                failures = 0;
            }
            match outcome {
                Ok(()) => tracing::warn!(operator = %self.cfg.url, "config stream ended; reconnecting"),
                Err(e) => tracing::warn!(operator = %self.cfg.url, "config stream: {e:#}; retrying"),
            }
            failures = failures.saturating_add(1);
            let cap = Duration::from_millis(100 << failures.min(6)).min(Duration::from_secs(5));
            let wait = rand::rng().random_range(cap / 2..=cap);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn stream_once(
        &self,
        shared: &Shared,
        tx: &watch::Sender<Arc<Runtime>>,
        metrics: &Metrics,
    ) -> anyhow::Result<()> {
        let req = self.request(http::Method::GET, STREAM_PATH, Bytes::new())?;
        let resp = self.client.request(req).await.context("connecting")?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            anyhow::bail!("operator answered {status}: {}", String::from_utf8_lossy(&body).trim());
        }
        self.connected.store(true, Ordering::SeqCst);
        tracing::info!(operator = %self.cfg.url, "config stream open");
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(SILENCE, body.frame()).await {
                Err(_) => anyhow::bail!("no data for {}s", SILENCE.as_secs()),
                Ok(None) => return Ok(()),
                Ok(Some(f)) => f.context("reading the stream")?,
            };
            let Ok(data) = frame.into_data() else { continue };
            buf.extend_from_slice(&data);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line = buf.split_to(end + 1);
                let line = line.chunk().trim_ascii();
                if !line.is_empty() {
                    self.apply(line, shared, tx, metrics);
                }
            }
            anyhow::ensure!(buf.len() <= MAX_LINE, "a config line is longer than {MAX_LINE} bytes");
        }
    }

    fn apply(&self, line: &[u8], shared: &Shared, tx: &watch::Sender<Arc<Runtime>>, metrics: &Metrics) {
        let current = tx.borrow().config.version.clone();
        let built = serde_json::from_slice::<SidecarConfig>(line)
            .map_err(|e| format!("not a valid sidecar config: {e}"))
            .and_then(|c| if c.version == current { Ok(None) } else { Runtime::build(c, shared).map(Some) });
        match built {
            Ok(None) => {}
            Ok(Some(rt)) => {
                let version = rt.config.version.clone();
                metrics.set_version(&version);
                tx.send_replace(Arc::new(rt));
                metrics.reload(true);
                tracing::info!(version = %version, previous = %current, "config applied from the operator");
            }
            Err(e) => {
                metrics.reload(false);
                tracing::error!("config from the operator rejected, still serving version {current}: {e}");
            }
        }
        // Reported at once, so the operator knows the version is live without waiting a period.
        self.applied.notify_one();
    }

    /// Reports outcomes every `report_interval`, and at once after each applied config.
    pub async fn report(
        self: Arc<Self>,
        rx: watch::Receiver<Arc<Runtime>>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut interval = tokio::time::interval(self.cfg.report_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = self.applied.notified() => {}
                // A failure is reported early (a rollout judges the canary on it), at most every
                // EARLY_REPORT, so a failing backend does not turn into a stream of reports.
                _ = metrics.outcomes.failed.notified() => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(last + EARLY_REPORT) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                _ = shutdown.changed() => return,
            }
            last = tokio::time::Instant::now();
            if !self.connected.load(Ordering::SeqCst) {
                continue;
            }
            let version = rx.borrow().config.version.clone();
            let report = metrics.outcomes.report(&version);
            let sent = async {
                let body = Bytes::from(serde_json::to_vec(&report)?);
                let resp = self.client.request(self.request(http::Method::POST, REPORT_PATH, body)?).await?;
                anyhow::ensure!(resp.status().is_success(), "operator answered {}", resp.status());
                Ok(())
            };
            match sent.await {
                Ok(()) => metrics.outcomes.delivered(),
                Err(e) => tracing::debug!("report not delivered: {e:#}"),
            }
        }
    }
}

mod url {
    pub fn check(url: &str) -> anyhow::Result<()> {
        let uri: http::Uri = url.parse().map_err(|e| anyhow::anyhow!("--operator {url:?}: {e}"))?;
        anyhow::ensure!(
            matches!(uri.scheme_str(), Some("https" | "http")) && uri.host().is_some(),
            "--operator {url:?} must look like https://bulwark-operator.bulwark-system.svc:15010"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn operator_urls_are_checked() {
        assert!(super::url::check("https://op.ns.svc:15010").is_ok());
        assert!(super::url::check("op:15010").is_err());
    }
}
