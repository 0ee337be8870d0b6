//! `kubectl bulwark rollout status`: a rollout as a person reads it. The step and weights, how
//! long the step has held, each signal of the last analysis against its threshold, and the
//! requests in the window. Pure: a rollout and the time in, text out.

use std::fmt::Write as _;

use bulwark_api::{
    ModelRollout,
    rollout::{RolloutPhase, Signal, machine},
};
use k8s_openapi::jiff::Timestamp;

/// `1m12s` for a span of seconds.
fn span(secs: i64) -> String {
    let secs = secs.max(0);
    match (secs / 3600, (secs % 3600) / 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

fn ago(at: Option<&String>, now: Timestamp) -> Option<i64> {
    let t: Timestamp = at?.parse().ok()?;
    Some(now.duration_since(t).as_secs())
}

fn show(s: &Signal, v: f64) -> String {
    if s.name.starts_with("p95") { format!("{v:.3}s") } else { format!("{v:.3}") }
}

pub fn status(r: &ModelRollout, now: Timestamp) -> String {
    let mut out = String::new();
    let st = r.status.clone().unwrap_or_default();
    let steps = machine::steps(&r.spec);
    let name = r.metadata.name.as_deref().unwrap_or_default();
    let ns = r.metadata.namespace.as_deref().unwrap_or("default");
    let phase = st.phase.map_or("Unknown", RolloutPhase::as_str);
    let _ = writeln!(out, "Name:        {ns}/{name}");
    let _ = writeln!(
        out,
        "Route:       {} (stable {} -> canary {})",
        r.spec.route_ref.name, r.spec.stable.backend, r.spec.canary.backend
    );
    let _ = writeln!(out, "Phase:       {phase}");
    if let Some(m) = st.message.as_deref().filter(|m| !m.is_empty()) {
        let _ = writeln!(out, "Message:     {m}");
    }
    let weight = st.canary_weight.unwrap_or(0);
    let step = st.current_step.unwrap_or(0) as usize;
    let mut held = String::new();
    if let Some(secs) = ago(st.step_started_at.as_ref(), now) {
        held = format!(", for {}", span(secs));
        let pause = steps.get(step).and_then(|p| p.pause).filter(|_| st.phase.is_some_and(RolloutPhase::is_active));
        if let Some(p) = pause {
            let left = p.as_std().as_secs() as i64 - secs;
            held += &if left > 0 { format!(" of {p} ({} left)", span(left)) } else { format!(" of {p}") };
        }
    }
    let _ = writeln!(out, "Step:        {} of {}{held}", (step + 1).min(steps.len().max(1)), steps.len());
    let _ = writeln!(out, "Weights:     canary {weight}%, stable {}%", 100 - weight.min(100));
    if let Some(t) = steps.get(step).filter(|_| st.phase.is_some_and(RolloutPhase::is_active)) {
        if let Some(m) = t.mirror {
            let _ = writeln!(out, "Mirror:      {m}% of the stable's requests are copied to the canary");
        }
        if let Some((h, v)) = &t.preview {
            let _ = writeln!(out, "Preview:     requests with {h}: {v} go to the canary");
        }
    }
    let _ = writeln!(
        out,
        "Attempt:     {} of generation {}",
        st.attempt.unwrap_or(1),
        st.observed_generation.or(r.metadata.generation).unwrap_or(1)
    );
    match &st.last_analysis {
        None => {
            let _ = writeln!(out, "Analysis:    none yet (every {})", r.spec.analysis.interval);
        }
        Some(a) => {
            let when = ago(Some(&a.at), now).map_or(String::new(), |s| format!(" {} ago", span(s)));
            let _ = writeln!(
                out,
                "Analysis:    {}{when}, every {} over {}: canary {} requests, stable {} (at least {} needed)",
                a.verdict.as_str(),
                r.spec.analysis.interval,
                r.spec.analysis.window,
                a.canary_requests,
                a.stable_requests,
                r.spec.analysis.min_requests
            );
            if !a.message.is_empty() {
                let _ = writeln!(out, "             {}", a.message);
            }
            if !a.signals.is_empty() {
                let _ = writeln!(out, "  {:<24} {:>10} {:>10}  VERDICT", "SIGNAL", "VALUE", "THRESHOLD");
                for s in &a.signals {
                    let value = s.value.map_or_else(|| "-".to_owned(), |v| show(s, v));
                    let _ = writeln!(
                        out,
                        "  {:<24} {:>10} {:>10}  {}",
                        s.name,
                        value,
                        show(s, s.threshold),
                        s.verdict.as_str()
                    );
                }
            }
        }
    }
    if !st.conditions.is_empty() {
        let conds: Vec<String> =
            st.conditions.iter().map(|c| format!("{}={} ({})", c.type_, c.status, c.reason)).collect();
        let _ = writeln!(out, "Conditions:  {}", conds.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_shows_the_step_the_weights_and_each_signal_against_its_threshold() {
        let r: ModelRollout = serde_yaml::from_str(
            r#"
apiVersion: bulwark.dev/v1alpha1
kind: ModelRollout
metadata: {name: up, namespace: shop, generation: 2}
spec:
  routeRef: {name: chat}
  stable: {backend: a}
  canary: {backend: b}
  steps: [{weight: 10, pause: 1m}, {weight: 50, pause: 5m, mirror: 20}, {weight: 100}]
  analysis: {interval: 10s, window: 1m, minRequests: 20, maxP95FirstToken: 2s}
status:
  observedGeneration: 2
  phase: Progressing
  currentStep: 1
  canaryWeight: 50
  stepStartedAt: "2026-12-01T10:00:00Z"
  attempt: 1
  message: "step 2 of 3 (canary at 50%): holds 5m while analysis passes"
  lastAnalysis:
    at: "2026-12-01T10:01:10Z"
    verdict: Pass
    canaryRequests: 412
    stableRequests: 398
    signals:
      - {name: errorRate, value: 0.0121, threshold: 0.05, verdict: Pass}
      - {name: p95FirstToken, value: 0.4, threshold: 2.0, verdict: Pass}
  conditions:
    - {type: Ready, status: "True", reason: Programmed, message: ""}
    - {type: Progressing, status: "True", reason: Progressing, message: ""}
"#,
        )
        .unwrap();
        let text = status(&r, "2026-12-01T10:01:12Z".parse().unwrap());
        let want = "\
Name:        shop/up
Route:       chat (stable a -> canary b)
Phase:       Progressing
Message:     step 2 of 3 (canary at 50%): holds 5m while analysis passes
Step:        2 of 3, for 1m12s of 5m (3m48s left)
Weights:     canary 50%, stable 50%
Mirror:      20% of the stable's requests are copied to the canary
Attempt:     1 of generation 2
Analysis:    Pass 2s ago, every 10s over 1m: canary 412 requests, stable 398 (at least 20 needed)
  SIGNAL                        VALUE  THRESHOLD  VERDICT
  errorRate                     0.012      0.050  Pass
  p95FirstToken                0.400s     2.000s  Pass
Conditions:  Ready=True (Programmed), Progressing=True (Progressing)
";
        assert_eq!(text, want, "\n{text}");
    }
}
