//! The rollout state machine on simulated time: a driver ticks once a simulated second with the
//! outcomes the sidecars would report, and the tests read the phase, step and weight it sets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bulwark_api::{
    control::BackendOutcome,
    rollout::{
        ControlRequest, Controls, ModelRolloutSpec, ModelRolloutStatus, RolloutPhase, Verdict, analysis,
        machine::{self, Transition},
        run::Run,
        series::Series,
    },
};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use RolloutPhase::*;

fn spec(yaml: &str) -> ModelRolloutSpec {
    serde_yaml::from_str(yaml).unwrap()
}

/// Per simulated second: answered requests and errors, and the latency of each answer.
#[derive(Clone, Copy, Default)]
struct Load {
    ok: u64,
    errors: u64,
    latency: f64,
    ttft: f64,
    blocked: u64,
}

const HEALTHY: Load = Load { ok: 4, errors: 0, latency: 0.2, ttft: 0.05, blocked: 0 };
const FAILING: Load = Load { ok: 1, errors: 3, latency: 0.2, ttft: 0.05, blocked: 0 };
const IDLE: Load = Load { ok: 0, errors: 0, latency: 0.0, ttft: 0.0, blocked: 0 };

fn feed(o: &mut BackendOutcome, l: Load) {
    o.requests += l.ok + l.errors;
    if l.errors > 0 {
        *o.errors.entry("5xx".into()).or_default() += l.errors;
    }
    for _ in 0..l.ok {
        o.latency.observe(l.latency);
        o.first_token.observe(l.ttft);
    }
    o.output_blocks += l.blocked;
}

/// A driver on simulated time.
struct Sim {
    spec: ModelRolloutSpec,
    generation: i64,
    run: Run,
    now: Timestamp,
    canary: BackendOutcome,
    stable: BackendOutcome,
    controls: Controls,
    transitions: Vec<Transition>,
}

impl Sim {
    fn new(yaml: &str) -> Self {
        let spec = spec(yaml);
        let now: Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let (run, t) = Run::resume(&spec, 1, None, now);
        let mut sim = Self {
            spec,
            generation: 1,
            run,
            now,
            canary: BackendOutcome::default(),
            stable: BackendOutcome::default(),
            controls: Controls::default(),
            transitions: vec![],
        };
        sim.transitions.extend(t);
        sim
    }

    /// `secs` simulated seconds of traffic, ticking once a second.
    fn run(&mut self, secs: i64, canary: Load, stable: Load) -> &mut Self {
        for _ in 0..secs {
            self.now = self.now.checked_add(SignedDuration::from_secs(1)).unwrap();
            feed(&mut self.canary, canary);
            feed(&mut self.stable, stable);
            self.run.record(self.now, &self.canary, &self.stable);
            let t = self.run.tick(&self.spec, self.generation, self.now, Some(&self.controls));
            self.transitions.extend(t);
        }
        self
    }

    fn status(&self) -> &ModelRolloutStatus {
        &self.run.status
    }

    fn at(&self) -> (RolloutPhase, u32, u32) {
        let s = self.status();
        (s.phase.unwrap(), s.current_step.unwrap(), s.canary_weight.unwrap())
    }

    fn reasons(&self) -> Vec<&'static str> {
        self.transitions.iter().map(|t| t.reason).collect()
    }

    fn request(&self, step: u32, full: bool) -> ControlRequest {
        ControlRequest { generation: self.generation, attempt: self.status().attempt.unwrap(), step, full }
    }
}

const STEPS: &str = r#"
routeRef: {name: chat}
stable: {backend: stable}
canary: {backend: canary}
steps: [{weight: 5, pause: 30s}, {weight: 25, pause: 30s}, {weight: 100}]
analysis: {interval: 10s, window: 20s, minRequests: 20}
"#;

#[test]
fn a_healthy_canary_advances_step_by_step_and_succeeds() {
    let mut sim = Sim::new(STEPS);
    assert_eq!(sim.at(), (Progressing, 0, 5));
    sim.run(29, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 0, 5), "the step holds for its pause");
    sim.run(1, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 1, 25), "pause over and the analysis passed");
    sim.run(30, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Succeeded, 2, 100));
    assert_eq!(sim.reasons(), ["Started", "StepAdvanced", "Succeeded"]);
    assert_eq!(sim.status().message.as_deref(), Some("all 3 steps done: the canary serves 100%"));
    let before = sim.status().clone();
    sim.run(60, FAILING, HEALTHY);
    assert_eq!(sim.status(), &before, "a finished rollout is judged no more");
}

#[test]
fn without_traffic_a_step_neither_advances_nor_rolls_back() {
    let mut sim = Sim::new(STEPS);
    sim.run(600, IDLE, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 0, 5));
    let a = sim.status().last_analysis.clone().unwrap();
    assert_eq!((a.verdict, a.canary_requests), (Verdict::Inconclusive, 0));
    assert_eq!(a.message, "0 of 20 canary requests in the window");
    assert!(sim.status().message.as_deref().unwrap().ends_with("last analysis: 0 of 20 canary requests in the window"));
    // A trickle below minRequests is no verdict either, even when all of it fails.
    let mut sim = Sim::new(&STEPS.replace("minRequests: 20", "minRequests: 25"));
    sim.run(60, Load { errors: 1, ..IDLE }, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 0, 5), "{:?}", sim.status().last_analysis);
}

#[test]
fn a_failing_canary_is_rolled_back_at_once_and_stays_rolled_back() {
    let mut sim = Sim::new(STEPS);
    sim.run(30, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 1, 25));
    // Analyses run every 10 s: the one at 40 s sees the failures.
    sim.run(9, FAILING, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 1, 25));
    sim.run(1, FAILING, HEALTHY);
    assert_eq!(sim.at(), (RolledBack, 1, 0));
    let message = sim.status().message.clone().unwrap();
    assert!(
        message.starts_with("rolled back at step 2 of 3 (canary at 25%): errorRate 0.")
            && message.contains(" > 0.050 over "),
        "{message}"
    );
    let failing: Vec<_> = sim
        .status()
        .last_analysis
        .as_ref()
        .unwrap()
        .signals
        .iter()
        .filter(|s| s.verdict == Verdict::Fail)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(failing, ["errorRate"]);
    assert_eq!(sim.reasons().last(), Some(&"RolledBack"));
    sim.run(300, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (RolledBack, 1, 0), "until the spec changes or a retry");
    assert_eq!(machine::traffic(&sim.spec, Some(sim.status())).canary_weight, 0);
}

#[test]
fn failure_limit_counts_consecutive_failures_and_a_pass_resets_it() {
    let yaml = STEPS.replace("window: 20s, minRequests: 20}", "window: 10s, minRequests: 20, failureLimit: 2}");
    let mut sim = Sim::new(&yaml);
    sim.run(10, HEALTHY, HEALTHY);
    // Each analysis sees the 10 s since the last one.
    sim.run(10, Load { ok: 2, errors: 2, ..HEALTHY }, HEALTHY);
    assert_eq!((sim.at().0, sim.status().failed_analyses), (Progressing, Some(1)), "one failure is not enough");
    sim.run(10, HEALTHY, HEALTHY);
    assert_eq!(sim.status().failed_analyses, Some(0), "a pass resets the count");
    sim.run(10, FAILING, HEALTHY);
    assert_eq!((sim.at().0, sim.status().failed_analyses), (Progressing, Some(1)));
    sim.run(10, FAILING, HEALTHY);
    assert_eq!(sim.at().0, RolledBack, "two in a row");
}

#[test]
fn latency_first_token_and_block_rate_are_judged_absolutely_and_against_the_stable() {
    let cases = [
        ("maxP95Latency: 1s", Load { latency: 1.8, ..HEALTHY }, HEALTHY, "p95Latency"),
        ("maxP95FirstToken: 500ms", Load { ttft: 0.9, ..HEALTHY }, HEALTHY, "p95FirstToken"),
        ("maxBlockRate: 0.1", Load { blocked: 1, ..HEALTHY }, HEALTHY, "blockRate"),
        (
            "maxErrorRate: 1, maxErrorRateIncrease: 0.05",
            Load { ok: 2, errors: 2, ..HEALTHY },
            Load { ok: 3, errors: 1, ..HEALTHY },
            "errorRateIncrease",
        ),
        (
            "maxP95LatencyIncrease: 200ms",
            Load { latency: 0.9, ..HEALTHY },
            Load { latency: 0.4, ..HEALTHY },
            "p95LatencyIncrease",
        ),
    ];
    for (threshold, canary, stable, signal) in cases {
        let yaml = STEPS.replace("minRequests: 20}", &format!("minRequests: 20, {threshold}}}"));
        let mut sim = Sim::new(&yaml);
        sim.run(20, canary, stable);
        assert_eq!(sim.at().0, RolledBack, "{threshold}: {:?}", sim.status().last_analysis);
        let a = sim.status().last_analysis.as_ref().unwrap();
        let failing: Vec<_> =
            a.signals.iter().filter(|s| s.verdict == Verdict::Fail).map(|s| s.name.as_str()).collect();
        assert_eq!(failing, [signal], "{threshold}");
        assert!(sim.status().message.as_ref().unwrap().contains(signal), "the message names the signal");
    }
    // Relative to a stable that is just as slow: a pass.
    let yaml = STEPS.replace("minRequests: 20}", "minRequests: 20, maxP95LatencyIncrease: 200ms}");
    let mut sim = Sim::new(&yaml);
    sim.run(30, Load { latency: 0.9, ..HEALTHY }, Load { latency: 0.9, ..HEALTHY });
    assert_eq!(sim.at(), (Progressing, 1, 25));
    // A relative threshold needs stable traffic to compare with: no verdict, no promotion.
    let mut sim = Sim::new(&yaml);
    sim.run(60, HEALTHY, IDLE);
    assert_eq!(sim.at(), (Progressing, 0, 5));
    let a = sim.status().last_analysis.as_ref().unwrap();
    assert_eq!(
        (a.verdict, a.message.as_str()),
        (Verdict::Inconclusive, "p95LatencyIncrease needs 20 stable requests (0 so far)")
    );
}

#[test]
fn only_backend_faults_count_as_errors_and_429_only_when_asked() {
    let a: bulwark_api::rollout::Analysis = serde_yaml::from_str("{}").unwrap();
    let mut o = BackendOutcome { requests: 10, ..Default::default() };
    for (class, n) in [("5xx", 1), ("timeout", 1), ("connect", 1), ("reset", 1), ("stream", 1), ("4xx", 3), ("429", 2)]
    {
        o.errors.insert(class.into(), n);
    }
    assert_eq!(analysis::errors(&a, &o), 5, "4xx are the client's, 429 the provider's quota");
    let strict: bulwark_api::rollout::Analysis = serde_yaml::from_str("{count429: true}").unwrap();
    assert_eq!(analysis::errors(&strict, &o), 7);
}

#[test]
fn a_step_without_pause_waits_for_a_promote_and_stale_promotes_do_nothing() {
    let yaml = STEPS
        .replace("{weight: 25, pause: 30s}", "{weight: 25}")
        .replace("{weight: 100}", "{weight: 50, pause: 10s}, {weight: 100}");
    let mut sim = Sim::new(&yaml);
    sim.run(30, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Paused, 1, 25));
    assert_eq!(
        sim.status().message.as_deref(),
        Some("step 2 of 4 (canary at 25%): waiting for a promote (analysis goes on)")
    );
    sim.run(300, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Paused, 1, 25));
    sim.controls.promote = Some(sim.request(0, false));
    sim.run(1, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Paused, 1, 25), "a promote meant for step 0 does nothing at step 1");
    sim.controls.promote = Some(sim.request(1, false));
    sim.run(1, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 2, 50));
    sim.run(5, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 2, 50), "applied once: the same request stays in place and is stale now");
    // Analysis goes on while paused: a failing canary waiting for a promote is still rolled back.
    let mut sim = Sim::new(&yaml);
    sim.run(30, HEALTHY, HEALTHY);
    sim.run(20, FAILING, HEALTHY);
    assert_eq!(sim.at(), (RolledBack, 1, 0));
}

#[test]
fn promote_full_pause_resume_abort_and_retry() {
    let mut sim = Sim::new(STEPS);
    sim.controls.paused = Some(true);
    sim.run(60, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Paused, 0, 5), "paused: the pause elapses but the step holds");
    assert_eq!(
        sim.status().message.as_deref(),
        Some("paused at step 1 of 3 (canary at 5%); resume to continue (analysis goes on)")
    );
    sim.controls.paused = Some(false);
    sim.run(1, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 1, 25), "resumed, and the pause was over");
    sim.controls.promote = Some(sim.request(1, true));
    sim.run(1, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Succeeded, 2, 100));
    assert_eq!(sim.reasons(), ["Started", "Paused", "StepAdvanced", "Succeeded"]);

    let mut sim = Sim::new(STEPS);
    sim.run(30, HEALTHY, HEALTHY);
    sim.controls.abort = Some(sim.request(0, false));
    sim.run(1, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Aborted, 1, 0));
    sim.run(100, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Aborted, 1, 0));
    let stale = ControlRequest { attempt: 7, ..sim.request(0, false) };
    sim.controls.retry = Some(stale);
    sim.run(1, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Aborted, 1, 0), "a retry of another attempt does nothing");
    sim.controls.retry = Some(sim.request(0, false));
    sim.run(1, HEALTHY, HEALTHY);
    assert_eq!((sim.at(), sim.status().attempt), ((Progressing, 0, 5), Some(2)));
    assert_eq!(sim.reasons().last(), Some(&"Retried"));
    sim.run(10, HEALTHY, HEALTHY);
    assert_eq!(sim.at().0, Progressing, "the abort named attempt 1: it does not stop attempt 2");
}

#[test]
fn a_retry_is_judged_only_on_what_happened_after_it() {
    let mut sim = Sim::new(STEPS);
    sim.run(11, FAILING, HEALTHY);
    assert_eq!(sim.at().0, RolledBack);
    sim.controls.retry = Some(sim.request(0, false));
    sim.run(1, IDLE, HEALTHY);
    sim.run(10, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 0, 5), "the failures before the retry are outside its window");
    let a = sim.status().last_analysis.as_ref().unwrap();
    assert_eq!(a.verdict, Verdict::Pass, "{a:?}");
}

#[test]
fn a_new_generation_starts_over_and_a_restart_resumes() {
    let mut sim = Sim::new(STEPS);
    sim.run(35, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 1, 25));
    // A driver that restarts resumes from the status as written: same step, same start.
    let written = sim.status().clone();
    let (resumed, t) = Run::resume(&sim.spec, 1, Some(&written), sim.now);
    assert!(t.is_none(), "no transition: nothing changed");
    assert_eq!(resumed.status, written);
    assert!(!resumed.due(&sim.spec, sim.now), "the analysis written a few seconds ago is not repeated");
    sim.run = resumed;
    sim.run(24, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 1, 25));
    sim.run(1, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Succeeded, 2, 100), "the step was not restarted: 30 s after it began, it is done");

    let mut sim = Sim::new(STEPS);
    sim.run(35, HEALTHY, HEALTHY);
    sim.generation = 2;
    sim.run(1, HEALTHY, HEALTHY);
    let s = sim.status();
    assert_eq!((sim.at(), s.observed_generation, s.attempt), ((Progressing, 0, 5), Some(2), Some(1)));
    assert_eq!(s.started_at, Some(machine::stamp(sim.now)));
    // A status written for another generation is not resumed.
    let (fresh, t) = Run::resume(&sim.spec, 3, Some(s), sim.now);
    assert_eq!((fresh.status.observed_generation, t.map(|t| t.reason)), (Some(3), Some("Started")));
}

#[test]
fn blue_green_previews_then_switches_at_once_and_rolls_back_at_once() {
    let yaml = r#"
routeRef: {name: chat}
stable: {backend: stable}
canary: {backend: canary}
strategy: blueGreen
preview: {pause: 30s, mirror: 10}
analysis: {interval: 10s, window: 20s, minRequests: 20}
"#;
    let mut sim = Sim::new(yaml);
    assert_eq!(sim.at(), (Progressing, 0, 0));
    let t = machine::traffic(&sim.spec, Some(sim.status()));
    assert_eq!(
        (t.canary_weight, t.mirror, t.preview),
        (0, Some(10), Some(("x-bulwark-preview".into(), "true".into())))
    );
    sim.run(30, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Succeeded, 1, 100));
    let t = machine::traffic(&sim.spec, Some(sim.status()));
    assert_eq!((t.canary_weight, t.mirror, t.preview), (100, None, None));

    let mut sim = Sim::new(yaml);
    sim.run(11, FAILING, HEALTHY);
    assert_eq!(sim.at(), (RolledBack, 0, 0));
    assert!(
        sim.status()
            .message
            .as_ref()
            .unwrap()
            .starts_with("rolled back at the preview (requests with x-bulwark-preview: true go to the canary)")
    );
    assert_eq!(machine::traffic(&sim.spec, Some(sim.status())), machine::Traffic::default(), "no preview, no mirror");
}

#[test]
fn a_hand_written_weight_still_applies() {
    let spec = spec(STEPS);
    let status: ModelRolloutStatus = serde_yaml::from_str("{canaryWeight: 40}").unwrap();
    assert_eq!(machine::traffic(&spec, Some(&status)).canary_weight, 40);
    assert_eq!(machine::traffic(&spec, None).canary_weight, 0);
}

#[test]
fn a_series_reads_any_window_and_never_counts_before_its_first_sample() {
    let t0: Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
    let at = |s: i64| t0.checked_add(SignedDuration::from_secs(s)).unwrap();
    let mut series = Series::new(std::time::Duration::from_secs(60));
    let mut total = BackendOutcome { requests: 1000, ..Default::default() };
    series.record(at(0), &total);
    for s in 1..=100 {
        total.requests += 2;
        series.record(at(s), &total);
        if s == 10 {
            assert_eq!(series.since(at(-50)).requests, 20, "the 1000 before the first sample are not counted");
        }
    }
    assert_eq!(series.since(at(90)).requests, 20);
    assert!(series.len() <= 62, "old samples are pruned: {}", series.len());
    assert_eq!(series.since(at(40)).requests, 120, "the baseline of the longest window is kept");
    series.record(at(101), &total);
    assert_eq!(series.since(at(100)).requests, 0, "an unchanged count adds no sample and no requests");
}

#[test]
fn a_step_shorter_than_the_interval_waits_for_an_analysis_of_its_own() {
    let mut sim = Sim::new(&STEPS.replace("{weight: 25, pause: 30s}", "{weight: 25, pause: 1s}"));
    sim.run(30, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 1, 25), "the analysis at 30 s passed step 1");
    sim.run(9, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Progressing, 1, 25), "its pause is over, but that analysis was step 1's");
    sim.run(1, HEALTHY, HEALTHY);
    assert_eq!(sim.at(), (Succeeded, 2, 100), "the analysis at 40 s is step 2's own");
}
