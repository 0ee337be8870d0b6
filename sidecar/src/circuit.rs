//! Per-backend circuit breaker: closed → open after N failures in a row → half-open after the
//! cooldown, letting exactly one probe through → closed on its success, open again on failure.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// Value of the `bulwark_circuit_state` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
pub struct Circuit {
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    failures: u32,
    open_until: Option<Instant>,
    probe_in_flight: bool,
}

impl Circuit {
    /// `threshold == 0` disables the breaker.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self { threshold, cooldown, inner: Mutex::new(Inner { failures: 0, open_until: None, probe_in_flight: false }) }
    }

    pub fn settings(&self) -> (u32, Duration) {
        (self.threshold, self.cooldown)
    }

    pub fn state(&self, now: Instant) -> State {
        let s = self.inner.lock();
        match s.open_until {
            None => State::Closed,
            Some(t) if now < t => State::Open,
            Some(_) => State::HalfOpen,
        }
    }

    /// Whether a request may go to this backend now. In half-open, only the first caller
    /// gets through (the probe); it must report back with `success` or `failure`.
    pub fn try_acquire(&self, now: Instant) -> bool {
        let mut s = self.inner.lock();
        match s.open_until {
            None => true,
            Some(t) if now < t => false,
            Some(_) if s.probe_in_flight => false,
            Some(_) => {
                s.probe_in_flight = true;
                true
            }
        }
    }

    /// Returns the new state if it changed.
    pub fn success(&self) -> Option<State> {
        let mut s = self.inner.lock();
        let was_open = s.open_until.is_some();
        *s = Inner { failures: 0, open_until: None, probe_in_flight: false };
        was_open.then_some(State::Closed)
    }

    /// Returns the new state if it changed.
    pub fn failure(&self, now: Instant) -> Option<State> {
        if self.threshold == 0 {
            return None;
        }
        let mut s = self.inner.lock();
        s.failures = s.failures.saturating_add(1);
        let reopen = s.probe_in_flight || (s.open_until.is_none() && s.failures >= self.threshold);
        s.probe_in_flight = false;
        if reopen {
            s.open_until = Some(now + self.cooldown);
            return Some(State::Open);
        }
        None
    }

    /// The attempt ended without a verdict on the backend (cancelled, client error).
    pub fn release(&self) {
        self.inner.lock().probe_in_flight = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_cools_down_probes_and_closes() {
        let c = Circuit::new(3, Duration::from_secs(30));
        let now = Instant::now;
        assert_eq!(c.failure(now()), None);
        assert_eq!(c.failure(now()), None);
        assert!(c.try_acquire(now()));
        assert_eq!(c.failure(now()), Some(State::Open));
        assert!(!c.try_acquire(now()), "open rejects");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(c.state(now()), State::HalfOpen);
        assert!(c.try_acquire(now()), "one probe");
        assert!(!c.try_acquire(now()), "only one probe");
        assert_eq!(c.failure(now()), Some(State::Open), "failed probe reopens");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(c.try_acquire(now()));
        assert_eq!(c.success(), Some(State::Closed));
        assert!(c.try_acquire(now()) && c.try_acquire(now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count_and_zero_disables() {
        let c = Circuit::new(2, Duration::from_secs(1));
        c.failure(Instant::now());
        c.success();
        assert_eq!(c.failure(Instant::now()), None);
        let off = Circuit::new(0, Duration::from_secs(1));
        for _ in 0..100 {
            off.failure(Instant::now());
        }
        assert!(off.try_acquire(Instant::now()));
    }
}
