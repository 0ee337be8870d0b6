//! The outcomes of one backend over time, so that any window can be read: cumulative counts
//! sampled as they change, and the difference between the newest and the one at the window's
//! start. Counts from before the first sample are never in a window (a driver that restarts
//! starts a new series and does not count old outcomes twice).

use std::collections::VecDeque;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::control::BackendOutcome;

#[derive(Clone, Debug)]
pub struct Series {
    /// Oldest first; each is the cumulative count at its time.
    samples: VecDeque<(Timestamp, BackendOutcome)>,
    /// How far back windows may reach.
    keep: SignedDuration,
}

impl Series {
    pub fn new(keep: std::time::Duration) -> Self {
        Self { samples: VecDeque::new(), keep: SignedDuration::try_from(keep).unwrap_or(SignedDuration::MAX) }
    }

    /// The cumulative count at `now`; kept only when it changed.
    pub fn record(&mut self, now: Timestamp, total: &BackendOutcome) {
        if self.samples.back().is_some_and(|(_, last)| last == total) {
            return;
        }
        self.samples.push_back((now, total.clone()));
        let cut = now.checked_sub(self.keep).unwrap_or(Timestamp::MIN);
        // Keep the newest sample at or before the cut: it is the baseline of the longest window.
        while self.samples.len() > 1 && self.samples.get(1).is_some_and(|(t, _)| *t <= cut) {
            self.samples.pop_front();
        }
    }

    /// What happened since `from`: the newest count less the last one at or before `from` (or
    /// the first sample, when the series began after `from`).
    pub fn since(&self, from: Timestamp) -> BackendOutcome {
        let Some((_, newest)) = self.samples.back() else { return BackendOutcome::default() };
        let base = self.samples.iter().rev().find(|(t, _)| *t <= from).or(self.samples.front());
        base.map_or_else(BackendOutcome::default, |(_, b)| newest.since(b))
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}
