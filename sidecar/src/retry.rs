//! Why an upstream attempt failed, whether that cause is retried, and how long to wait:
//! exponential backoff with full jitter, stretched to honour a `retry-after` within bounds.

use std::time::Duration;

use bulwark_api::route::{RetryOn, RetryPolicy};
use http::StatusCode;
use rand::Rng;

#[derive(Debug, Clone)]
pub enum Failure {
    Connect(String),
    /// No response (or no first byte) within the first-token timeout.
    Timeout,
    /// The upstream closed or broke the response before its first byte.
    Reset(String),
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
    },
    /// The backend's key could not be read; not the backend's fault.
    Credentials(String),
    CircuitOpen,
}

impl Failure {
    pub fn cause(&self) -> Option<RetryOn> {
        match self {
            Self::Connect(_) => Some(RetryOn::ConnectFailure),
            Self::Timeout => Some(RetryOn::Timeout),
            Self::Reset(_) => Some(RetryOn::Reset),
            Self::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => Some(RetryOn::TooManyRequests),
            Self::Status { status, .. } if status.is_server_error() => Some(RetryOn::ServerError),
            _ => None,
        }
    }

    /// A failure of the client's request itself (4xx other than 429): answer with it as is.
    pub fn is_client_error(&self) -> bool {
        matches!(self, Self::Status { status, .. } if status.is_client_error() && *status != StatusCode::TOO_MANY_REQUESTS)
    }

    /// Whether this counts against the backend's circuit breaker.
    pub fn is_backend_fault(&self) -> bool {
        self.cause().is_some()
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Connect(e) => format!("connect failure ({e})"),
            Self::Timeout => "no first byte in time".into(),
            Self::Reset(e) => format!("connection broke before the first byte ({e})"),
            Self::Status { status, .. } => format!("status {}", status.as_u16()),
            Self::Credentials(e) => format!("credentials unavailable ({e})"),
            Self::CircuitOpen => "circuit open".into(),
        }
    }
}

pub fn should_retry(policy: &RetryPolicy, f: &Failure) -> bool {
    f.cause().is_some_and(|c| {
        policy.retry_on.contains(&c) || (c == RetryOn::Reset && policy.retry_on.contains(&RetryOn::ConnectFailure))
    })
}

/// Wait before attempt `n` (1-based retry count): full jitter over `min(max, base * 2^(n-1))`,
/// or the upstream's `retry-after` when it asks for longer, capped at `max`.
pub fn backoff(policy: &RetryPolicy, n: u32, retry_after: Option<Duration>, rng: &mut impl Rng) -> Duration {
    let base = policy.backoff.base.as_std();
    let max = policy.backoff.max.as_std();
    let ceiling = base.saturating_mul(1u32 << n.saturating_sub(1).min(16)).min(max);
    let jittered = ceiling.mul_f64(rng.random_range(0.0..=1.0));
    match retry_after {
        Some(ra) => ra.min(max).max(jittered),
        None => jittered,
    }
}

/// Parses `retry-after` in seconds (the HTTP-date form is not used by LLM providers).
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0).map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let p: RetryPolicy = serde_json::from_str(r#"{"backoff": {"base": "100ms", "max": "1s"}}"#).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        for n in 1..8 {
            let cap = Duration::from_millis(100 * (1 << (n - 1))).min(Duration::from_secs(1));
            for _ in 0..100 {
                assert!(backoff(&p, n, None, &mut rng) <= cap);
            }
        }
        assert_eq!(
            backoff(&p, 1, Some(Duration::from_secs(30)), &mut rng),
            Duration::from_secs(1),
            "retry-after capped"
        );
        assert!(backoff(&p, 1, Some(Duration::from_millis(700)), &mut rng) >= Duration::from_millis(700));
    }

    #[test]
    fn causes_are_classified() {
        let p = RetryPolicy { retry_on: vec![RetryOn::TooManyRequests], ..RetryPolicy::default() };
        let status = |s: u16| Failure::Status { status: StatusCode::from_u16(s).unwrap(), retry_after: None };
        assert!(should_retry(&p, &status(429)));
        assert!(!should_retry(&p, &status(503)), "5xx not listed");
        assert!(!should_retry(&p, &Failure::Timeout));
        assert!(status(400).is_client_error() && !status(429).is_client_error());
        assert!(!Failure::Credentials("x".into()).is_backend_fault());
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
    }
}
