//! Guardrails: a `ScannerPolicy` compiled into scanners that judge a request's text before it
//! leaves and a response's text before it reaches the client (streams on a sliding window, in
//! `stream.rs`). Each finding is blocked, redacted or audited as the policy says.

pub mod injection;
pub mod invisible;
pub mod json;
pub mod judge;
pub mod language;
pub mod model;
pub mod partial_json;
pub mod patterns;
pub mod pii;
pub mod secrets;
pub mod stream;
pub mod text;
pub mod tokens;
pub mod topics;
pub mod webhook;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use futures_util::{StreamExt, stream::FuturesUnordered};

use bulwark_api::policy::{Action, Mode, OnScannerError, Scanner, ScannerPolicySpec, ScannerType, Source};
use sha2::{Digest, Sha256};

use crate::metrics::{Metrics, ScannerLabels, VerdictLabels};

/// Something a scanner found: a byte span of the text it was given.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub start: usize,
    pub end: usize,
    /// What was found (`email`, `aws-access-key-id`, ...): safe to show, never the text itself.
    pub kind: &'static str,
    pub score: f32,
}

impl Finding {
    pub fn span(start: usize, end: usize, kind: &'static str) -> Self {
        Self { start, end, kind, score: 1.0 }
    }
    pub fn whole(text: &str, kind: &'static str, score: f32) -> Self {
        Self { start: 0, end: text.len(), kind, score }
    }
}

pub trait Detector: Send + Sync {
    fn detect(&self, text: &str) -> Result<Vec<Finding>, String>;
    /// Judges all of a message's texts together (token counts, JSON documents).
    fn whole_request(&self) -> bool {
        false
    }
}

/// How a scanner judges text: cheaply in place, or with a model on the inference threads.
pub enum Check {
    Text(Arc<dyn Detector>),
    Injection(injection::Injection),
    Topics(topics::Topics),
    /// An external service; it runs with the model-based scanners, off the request's thread.
    Webhook(Box<webhook::Webhook>),
}

impl Check {
    fn is_model(&self) -> bool {
        !matches!(self, Self::Text(_))
    }

    /// Scores each text against its threshold: the verdict of the one furthest over it (or,
    /// when none is over, closest to it).
    async fn judge(&self, texts: &[Judged<'_>]) -> Result<Verdict, String> {
        let kind = if matches!(self, Self::Topics(_)) { "banned-topic" } else { "prompt-injection" };
        let mut worst = Verdict { score: 0.0, threshold: 1.0, source: None, kind };
        // A number (a tool argument's, say) tells a model nothing: only texts are scored.
        let number = |t: &str| t.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'));
        for t in texts.iter().filter(|t| !t.text.trim().is_empty() && !number(t.text)) {
            let score = match self {
                Self::Injection(i) => i.score(t.text).await?,
                Self::Topics(topics) => topics.score(t.text).await?,
                Self::Text(_) | Self::Webhook(_) => 0.0,
            };
            if f64::from(score) - t.threshold > f64::from(worst.score) - worst.threshold {
                worst = Verdict { score, threshold: t.threshold, source: t.source, kind };
            }
        }
        Ok(worst)
    }
}

/// A text a model-based scanner scores, with the threshold it is held to.
struct Judged<'a> {
    text: &'a str,
    threshold: f64,
    source: Option<Source>,
}

/// What a model-based scanner found, at its worst.
struct Verdict {
    score: f32,
    threshold: f64,
    /// Where the text came from, when its source has a say in how it is scored.
    source: Option<Source>,
    kind: &'static str,
}

impl Verdict {
    fn fires(&self) -> bool {
        f64::from(self.score) >= self.threshold
    }

    fn found(&self) -> String {
        let found = format!("found {} (score {:.2})", self.kind, self.score);
        match self.source {
            None => found,
            Some(Source::User) => format!("{found} in user text"),
            Some(Source::Tool) => format!("{found} in a tool result"),
            Some(Source::Document) => format!("{found} in a document"),
            Some(Source::System) => format!("{found} in the system prompt"),
            Some(Source::Assistant) => format!("{found} in an assistant turn"),
        }
    }
}

pub struct ScannerRuntime {
    pub spec: Scanner,
    pub name: &'static str,
    check: Result<Check, String>,
}

impl ScannerRuntime {
    /// Judged by a model on the inference threads, not in place.
    pub fn is_model(&self) -> bool {
        self.check.as_ref().map_or(
            matches!(self.spec.type_, ScannerType::PromptInjection | ScannerType::BanTopics | ScannerType::Webhook),
            Check::is_model,
        )
    }

    fn webhook(&self) -> Option<&webhook::Webhook> {
        match &self.check {
            Ok(Check::Webhook(w)) => Some(w),
            _ => None,
        }
    }

    /// Whether this scanner calls a service, whose failures its own `onError` may decide.
    fn is_webhook(&self) -> bool {
        self.spec.type_ == ScannerType::Webhook
    }

    /// Whether a failure of this scanner lets the text pass: a webhook's `onError`, else the
    /// policy's `onScannerError`.
    fn fails_open(&self, policy: &PolicyRuntime) -> bool {
        let own = self.spec.webhook.as_ref().and_then(|w| w.on_error);
        own.unwrap_or(policy.spec.on_scanner_error) == OnScannerError::FailOpen
    }

    /// The texts this scanner scores, and the threshold of each. An input `promptInjection`
    /// scores the texts of its `sources` (by default the untrusted ones: user, tool, document),
    /// each held to its source's threshold; every other scanner scores every text.
    fn judged<'t>(&self, texts: &'t [String], sources: Option<&[Source]>) -> Vec<Judged<'t>> {
        let by_source = sources.filter(|_| self.spec.type_ == ScannerType::PromptInjection);
        let listed: &[Source] = if self.spec.sources.is_empty() { &Source::UNTRUSTED } else { &self.spec.sources };
        texts
            .iter()
            .enumerate()
            .filter_map(|(i, text)| match by_source {
                None => Some(Judged { text, threshold: self.threshold(), source: None }),
                Some(sources) => {
                    let source = sources.get(i).copied().unwrap_or(Source::User);
                    let own = self.spec.source_thresholds.get(&source).copied();
                    listed.contains(&source).then(|| Judged {
                        text,
                        threshold: own.unwrap_or_else(|| self.threshold()),
                        source: Some(source),
                    })
                }
            })
            .collect()
    }

    /// The policy's threshold, else the calibrated one of the bundled head, else 0.5 for
    /// classifiers and 0.4 for topic similarity (cosine in the encoder's space).
    fn threshold(&self) -> f64 {
        self.spec.threshold.unwrap_or(match &self.check {
            Ok(Check::Injection(i)) => i.default_threshold(),
            Ok(Check::Topics(_)) => 0.4,
            _ => 0.5,
        })
    }

    /// Judges a whole document (JSON validity, token counts), not spans.
    pub fn judges_whole(&self) -> bool {
        matches!(&self.check, Ok(Check::Text(d)) if d.whole_request())
    }

    /// Why this scanner cannot run, if it cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.check.as_ref().err().map(String::as_str)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Input,
    Output,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Output => "output",
        }
    }
}

pub struct PolicyRuntime {
    pub name: String,
    pub spec: ScannerPolicySpec,
    pub input: Vec<ScannerRuntime>,
    pub output: Vec<ScannerRuntime>,
    pub window: usize,
}

/// Why a request or response was stopped. Names the scanner and what it found, never the text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub policy: String,
    pub scanner: &'static str,
    pub reason: String,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "blocked by ScannerPolicy {}: {} {}", self.policy, self.scanner, self.reason)
    }
}

/// Placeholders put into a request and the values they stand for, to restore in the answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restore {
    pub pairs: Vec<(String, String)>,
    /// Some text was changed by a redaction.
    pub redacted: bool,
    /// With `Pass::Spans { hold_after }`: where (in the rewritten text) the earliest match that
    /// reaches into the held tail starts. It may still grow with the next chunk, so it is
    /// neither redacted nor released yet.
    pub held_from: Option<usize>,
}

impl Restore {
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
    pub fn apply(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (placeholder, value) in &self.pairs {
            if out.contains(placeholder.as_str()) {
                out = out.replace(placeholder.as_str(), value);
            }
        }
        out
    }
    /// Longest placeholder, so a stream holds back enough to restore one split across chunks.
    pub fn longest(&self) -> usize {
        self.pairs.iter().map(|(p, _)| p.len()).max().unwrap_or(0)
    }
}

pub fn type_name(t: ScannerType) -> &'static str {
    match t {
        ScannerType::PromptInjection => "promptInjection",
        ScannerType::BanTopics => "banTopics",
        ScannerType::Secrets => "secrets",
        ScannerType::Pii => "pii",
        ScannerType::InvisibleText => "invisibleText",
        ScannerType::TokenLimit => "tokenLimit",
        ScannerType::Regex => "regex",
        ScannerType::BanSubstrings => "banSubstrings",
        ScannerType::Language => "language",
        ScannerType::Json => "json",
        ScannerType::Webhook => "webhook",
    }
}

fn check(s: &Scanner, hub: &model::ModelHub) -> Result<Check, String> {
    let text = |d: Arc<dyn Detector>| Ok(Check::Text(d));
    match s.type_ {
        ScannerType::Secrets => text(Arc::new(secrets::Secrets::new()?)),
        ScannerType::Pii => text(Arc::new(pii::Pii::new(&s.entities)?)),
        ScannerType::InvisibleText => text(Arc::new(invisible::Invisible)),
        ScannerType::Regex => text(Arc::new(patterns::Patterns::new(&s.patterns)?)),
        ScannerType::BanSubstrings => text(Arc::new(patterns::Substrings::new(
            &s.substrings,
            s.case_sensitive.unwrap_or(false),
            s.word_boundary.unwrap_or(false),
        )?)),
        ScannerType::TokenLimit => {
            text(Arc::new(tokens::TokenLimit::new(s.encoding.as_deref(), s.max_tokens.unwrap_or(u32::MAX))?))
        }
        ScannerType::Language => text(Arc::new(language::Language::new(&s.languages))),
        ScannerType::Json => text(Arc::new(json::Json::new(s.schema.as_ref())?)),
        ScannerType::Webhook => {
            let spec = s.webhook.as_ref().ok_or("a webhook scanner needs webhook.url")?;
            Ok(Check::Webhook(Box::new(webhook::Webhook::new(spec)?)))
        }
        ScannerType::PromptInjection => match &s.model {
            Some(m) => Ok(Check::Injection(injection::Injection::Classifier(own_model(hub, m, None)?))),
            None => {
                let dir = hub.default_encoder_dir().ok_or("no models directory is configured (--models-dir)")?;
                let encoder = hub.get(&dir, None, Some(model::Output::Embedding))?;
                Ok(Check::Injection(injection::Injection::Bundled {
                    encoder,
                    head: Arc::new(injection::Head::bundled()?),
                }))
            }
        },
        ScannerType::BanTopics => {
            let encoder = match &s.model {
                Some(m) => own_model(hub, m, Some(model::Output::Embedding))?,
                None => {
                    let dir = hub.default_encoder_dir().ok_or("no models directory is configured (--models-dir)")?;
                    hub.get(&dir, None, Some(model::Output::Embedding))?
                }
            };
            Ok(Check::Topics(topics::Topics::new(encoder, s.topics.clone())))
        }
    }
}

/// A policy's own model, verified with its own key, else the sidecar's.
fn own_model(
    hub: &model::ModelHub,
    m: &bulwark_api::policy::ModelRef,
    output: Option<model::Output>,
) -> Result<Arc<model::Model>, String> {
    let key = m.public_key.as_deref().map(model::ModelKey::parse).transpose()?;
    let key = key.as_ref().or(hub.settings.public_key.as_ref());
    hub.get_signed(&PathBuf::from(&m.path), m.sha256.as_deref(), key, output)
}

impl PolicyRuntime {
    /// Compiles a policy. A scanner that cannot run (a missing model) is kept as unavailable
    /// and `onScannerError` decides per request; a broken pattern fails the whole config.
    pub fn build(name: &str, spec: &ScannerPolicySpec, hub: &model::ModelHub) -> Result<Self, String> {
        let compile = |list: &[Scanner]| -> Result<Vec<ScannerRuntime>, String> {
            list.iter()
                .map(|s| {
                    let d = check(s, hub);
                    // A model or a service may come later (a file, a mounted Secret): the
                    // scanner waits, unavailable; anything else is a broken config.
                    if let Err(e) = &d
                        && !matches!(
                            s.type_,
                            ScannerType::PromptInjection | ScannerType::BanTopics | ScannerType::Webhook
                        )
                    {
                        return Err(format!("ScannerPolicy {name}: {} scanner: {e}", type_name(s.type_)));
                    }
                    if let Err(e) = &d {
                        tracing::warn!(policy = name, scanner = type_name(s.type_), "scanner unavailable: {e}");
                    }
                    Ok(ScannerRuntime { spec: s.clone(), name: type_name(s.type_), check: d })
                })
                .collect()
        };
        Ok(Self {
            name: name.to_owned(),
            input: compile(&spec.input)?,
            output: compile(&spec.output)?,
            window: spec.streaming.window_chars as usize,
            spec: spec.clone(),
        })
    }

    pub fn restores(&self) -> bool {
        self.input.iter().any(|s| s.spec.restore_in_response == Some(true) && s.spec.action == Action::Redact)
    }

    pub fn scanners(&self, d: Direction) -> &[ScannerRuntime] {
        match d {
            Direction::Input => &self.input,
            Direction::Output => &self.output,
        }
    }
}

/// Per-request context for metrics and logs.
pub struct Ctx<'a> {
    pub metrics: &'a Metrics,
    pub route: &'a str,
    /// The backend that wrote the text, for output scanning.
    pub backend: Option<&'a str>,
    /// A mirrored copy's answer: it counts only as the backend's output block, never in the
    /// route's metrics, which are about what clients saw.
    pub mirrored: bool,
}

impl Ctx<'_> {
    /// Records how long a scanner took; returns how to count its verdict.
    fn observe<'s>(
        &'s self,
        policy: &'s PolicyRuntime,
        s: &'s ScannerRuntime,
        d: Direction,
        took: Duration,
    ) -> impl Fn(&'static str) + 's {
        let labels = ScannerLabels { policy: policy.name.clone(), scanner: s.name, direction: d.as_str() };
        if !self.mirrored {
            self.metrics.scanner_duration.get_or_create(&labels).observe(took.as_secs_f64());
        }
        move |outcome| {
            if outcome == "block" {
                if let (Direction::Output, Some(backend)) = (d, self.backend) {
                    self.metrics.outcomes.output_blocked(self.route, backend);
                }
                if self.mirrored {
                    return;
                }
                self.metrics.outcomes.scanner_block(self.route);
            } else if self.mirrored {
                return;
            }
            let v = VerdictLabels { policy: policy.name.clone(), scanner: s.name, direction: d.as_str(), outcome };
            self.metrics.scanner_verdicts.get_or_create(&v).inc();
        }
    }
}

/// Runs the policy's scanners of one direction over `texts`; applies redactions in place.
/// Returns the placeholders to restore, or why the text is blocked.
pub fn run(policy: &PolicyRuntime, d: Direction, texts: &mut [&mut String], ctx: &Ctx<'_>) -> Result<Restore, Blocked> {
    run_with(policy, d, texts, ctx, Pass::All)
}

/// Which of the cheap scanners a pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Every cheap scanner: a complete request or answer.
    All,
    /// The span scanners on a stream's held text, after `context` bytes of the text released
    /// before it (so a pattern sees what precedes it, as in the whole text; matches that end
    /// there were dealt with, and a match from there into the held text is redacted from the
    /// held text's start). A match that ends after byte `hold_after` (in the tail still held
    /// back) is left for later, unredacted, as it may still grow, and so is everything after
    /// its start.
    Spans { hold_after: Option<usize>, context: usize },
    /// A stream's whole text at its end: the scanners that judge whole documents (JSON, tokens).
    Whole,
}

/// `run`, for one pass of a stream (`Pass::Spans`, `Pass::Whole`) or all of it.
pub fn run_with(
    policy: &PolicyRuntime,
    d: Direction,
    texts: &mut [&mut String],
    ctx: &Ctx<'_>,
    pass: Pass,
) -> Result<Restore, Blocked> {
    let (hold_after, context) = match pass {
        Pass::Spans { hold_after, context } => (hold_after, context),
        _ => (None, 0),
    };
    let mut redactions: Vec<Vec<(Finding, &ScannerRuntime)>> = vec![vec![]; texts.len()];
    let mut blocked: Option<Blocked> = None;
    for s in policy.scanners(d).iter().filter(|s| !s.is_model()) {
        let whole = s.judges_whole();
        if (matches!(pass, Pass::Spans { .. }) && whole) || (pass == Pass::Whole && !whole) {
            continue;
        }
        if let Some(p) = s.spec.sampling
            && rand::random::<f64>() >= p
        {
            continue;
        }
        let started = tokio::time::Instant::now();
        let mut result = scan_one(s, texts);
        if context > 0
            && let Ok(found) = &mut result
        {
            for (_, f) in found.iter_mut() {
                f.retain(|f| f.end > context);
            }
            found.retain(|(_, f)| !f.is_empty());
        }
        let verdict = ctx.observe(policy, s, d, started.elapsed());
        let findings = match result {
            Ok(f) => f,
            Err(e) => {
                verdict("error");
                if policy.spec.on_scanner_error == OnScannerError::FailClosed {
                    let b = Blocked {
                        policy: policy.name.clone(),
                        scanner: s.name,
                        reason: format!("could not run ({e}) and the policy fails closed"),
                    };
                    if policy.spec.fail_fast {
                        return Err(b);
                    }
                    blocked.get_or_insert(b);
                } else {
                    tracing::warn!(policy = %policy.name, scanner = s.name, route = ctx.route, "scanner failed open: {e}");
                }
                continue;
            }
        };
        if findings.iter().all(|(_, f)| f.is_empty()) {
            verdict("pass");
            continue;
        }
        let kinds = summarize(&findings);
        if s.spec.mode == Mode::Audit || s.spec.action == Action::Audit {
            verdict("audit");
            let hash = text_hash(texts);
            tracing::info!(policy = %policy.name, scanner = s.name, route = ctx.route, direction = d.as_str(), text_sha256 = %hash, found = %kinds, would = ?s.spec.action, "audit");
            continue;
        }
        match s.spec.action {
            Action::Block => {
                verdict("block");
                let b = Blocked { policy: policy.name.clone(), scanner: s.name, reason: format!("found {kinds}") };
                if policy.spec.fail_fast {
                    return Err(b);
                }
                blocked.get_or_insert(b);
            }
            Action::Redact => {
                verdict("redact");
                for (i, f) in findings.into_iter().filter(|(i, _)| *i != WHOLE) {
                    redactions[i].extend(f.into_iter().map(|f| (f, s)));
                }
            }
            Action::Audit => {}
        }
    }
    if let Some(b) = blocked {
        return Err(b);
    }
    let mut restore = Restore::default();
    let mut numbering: HashMap<(&'static str, String), String> = HashMap::new();
    for (text, mut found) in texts.iter_mut().zip(redactions) {
        if found.is_empty() {
            continue;
        }
        for (f, _) in &mut found {
            f.start = f.start.max(context);
        }
        found.sort_by_key(|(f, _)| (f.start, std::cmp::Reverse(f.end)));
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (f, s) in found {
            if f.start < at || f.end > text.len() {
                continue; // overlaps a span already redacted
            }
            if hold_after.is_some_and(|h| f.end > h) {
                // Where it starts in the rewritten text.
                let start = out.len() + (f.start - at);
                restore.held_from = Some(restore.held_from.map_or(start, |h| h.min(start)));
                break;
            }
            out.push_str(&text[at..f.start]);
            let original = &text[f.start..f.end];
            if s.spec.restore_in_response == Some(true) {
                let next = numbering.len() + 1;
                let placeholder = numbering
                    .entry((f.kind, original.to_owned()))
                    .or_insert_with(|| format!("[{}_{next}]", label(f.kind)))
                    .clone();
                if !restore.pairs.iter().any(|(p, _)| *p == placeholder) {
                    restore.pairs.push((placeholder.clone(), original.to_owned()));
                }
                out.push_str(&placeholder);
            } else if s.spec.type_ == ScannerType::InvisibleText {
                // Hidden characters are removed, not replaced.
            } else {
                out.push_str(&format!("[REDACTED_{}]", label(f.kind)));
            }
            at = f.end;
        }
        out.push_str(&text[at..]);
        if out != **text {
            **text = out;
            restore.redacted = true;
        }
    }
    Ok(restore)
}

/// Runs every scanner of a direction: the cheap ones first, in place (judging and redacting),
/// then the webhooks in order (each may rewrite the texts), then the model-based ones
/// concurrently on the inference threads. With `failFast`, the first block returns at once and
/// drops (cancels) the model scans still running.
///
/// `sources` says where each of `texts` comes from (a request's); an input `promptInjection`
/// scores texts by it, and webhooks are told.
pub async fn run_async(
    policy: &PolicyRuntime,
    d: Direction,
    texts: &mut [&mut String],
    sources: Option<&[Source]>,
    ctx: &Ctx<'_>,
) -> Result<Restore, Blocked> {
    let mut restore = run(policy, d, texts, ctx)?;
    let (hooks, models): (Vec<usize>, Vec<usize>) =
        policy.sampled_models(d).into_iter().partition(|&i| policy.scanners(d)[i].is_webhook());
    for i in hooks {
        restore.redacted |= run_webhook(policy, d, &policy.scanners(d)[i], texts, sources, ctx).await?;
    }
    if models.is_empty() {
        return Ok(restore);
    }
    let owned: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
    run_models(policy, d, &models, &owned, sources, ctx).await?;
    Ok(restore)
}

impl PolicyRuntime {
    /// The model-based scanners and webhooks of a direction that one request (or stream) is
    /// judged by: each scanner's `sampling` decides once.
    pub fn sampled_models(&self, d: Direction) -> Vec<usize> {
        let scanners = self.scanners(d).iter().enumerate();
        let sampled =
            scanners.filter(|(_, s)| s.is_model() && s.spec.sampling.is_none_or(|p| rand::random::<f64>() < p));
        sampled.map(|(i, _)| i).collect()
    }
}

/// Why a scanner that could not run stops the text (or `None`: it fails open, logged).
fn failed(policy: &PolicyRuntime, s: &ScannerRuntime, route: &str, e: &str) -> Option<Blocked> {
    if s.fails_open(policy) {
        tracing::warn!(policy = %policy.name, scanner = s.name, route, "scanner failed open: {e}");
        return None;
    }
    Some(Blocked {
        policy: policy.name.clone(),
        scanner: s.name,
        reason: format!("could not run ({e}) and the policy fails closed"),
    })
}

/// Asks a webhook about the texts; applies its redactions. Returns whether it rewrote any.
async fn run_webhook(
    policy: &PolicyRuntime,
    d: Direction,
    s: &ScannerRuntime,
    texts: &mut [&mut String],
    sources: Option<&[Source]>,
    ctx: &Ctx<'_>,
) -> Result<bool, Blocked> {
    let started = tokio::time::Instant::now();
    let answer = match s.webhook() {
        Some(hook) => {
            let sent: Vec<&str> = texts.iter().map(|t| t.as_str()).collect();
            hook.call(d.as_str(), &policy.name, ctx.route, &sent, sources).await
        }
        None => Err(s.unavailable().unwrap_or("unavailable").to_owned()),
    };
    let verdict = ctx.observe(policy, s, d, started.elapsed());
    let audit = s.spec.mode == Mode::Audit || s.spec.action == Action::Audit;
    match answer {
        Err(e) => {
            verdict("error");
            failed(policy, s, ctx.route, &e).map_or(Ok(false), Err)
        }
        Ok(webhook::Answer::Pass) => {
            verdict("pass");
            Ok(false)
        }
        Ok(webhook::Answer::Block { reason }) => {
            let reason = format!("said block: {}", reason.as_deref().unwrap_or("no reason given"));
            if audit {
                verdict("audit");
                tracing::info!(policy = %policy.name, scanner = s.name, route = ctx.route, "audit: {reason}");
                return Ok(false);
            }
            verdict("block");
            Err(Blocked { policy: policy.name.clone(), scanner: s.name, reason })
        }
        Ok(webhook::Answer::Redact { texts: rewritten, reason }) => {
            if audit {
                verdict("audit");
                let reason = reason.as_deref().unwrap_or("no reason given");
                tracing::info!(policy = %policy.name, scanner = s.name, route = ctx.route, "audit: would redact: {reason}");
                return Ok(false);
            }
            verdict("redact");
            let mut changed = false;
            for (text, new) in texts.iter_mut().zip(rewritten) {
                if let Some(new) = new
                    && new != **text
                {
                    **text = new;
                    changed = true;
                }
            }
            Ok(changed)
        }
    }
}

/// Runs the model-based scanners (and webhooks, judging only) `models` (indexes into the
/// direction's scanners) over `texts`, concurrently. A webhook that asks to redact a text that
/// cannot be rewritten any more (a streamed piece) blocks it.
pub async fn run_models(
    policy: &PolicyRuntime,
    d: Direction,
    models: &[usize],
    texts: &[String],
    sources: Option<&[Source]>,
    ctx: &Ctx<'_>,
) -> Result<(), Blocked> {
    let scanners = policy.scanners(d);
    let mut running: FuturesUnordered<_> = models
        .iter()
        .filter_map(|&i| scanners.get(i))
        .map(|s| async move {
            let started = tokio::time::Instant::now();
            let result = judge(policy, d, s, texts, sources, ctx).await;
            (s, result, started.elapsed())
        })
        .collect();
    let mut blocked = None;
    while let Some((s, result, took)) = running.next().await {
        let verdict = ctx.observe(policy, s, d, took);
        let b = match result {
            Err(e) => {
                verdict("error");
                match failed(policy, s, ctx.route, &e) {
                    Some(b) => b,
                    None => continue,
                }
            }
            Ok(Some(found)) => {
                if s.spec.mode == Mode::Audit || s.spec.action == Action::Audit {
                    verdict("audit");
                    tracing::info!(policy = %policy.name, scanner = s.name, route = ctx.route, "audit: {found}");
                    continue;
                }
                verdict("block");
                Blocked { policy: policy.name.clone(), scanner: s.name, reason: found }
            }
            Ok(None) => {
                verdict("pass");
                continue;
            }
        };
        if policy.spec.fail_fast {
            return Err(b);
        }
        blocked.get_or_insert(b);
    }
    blocked.map_or(Ok(()), Err)
}

/// One scanner's verdict on the texts: what it found, if it fires.
async fn judge(
    policy: &PolicyRuntime,
    d: Direction,
    s: &ScannerRuntime,
    texts: &[String],
    sources: Option<&[Source]>,
    ctx: &Ctx<'_>,
) -> Result<Option<String>, String> {
    let check = s.check.as_ref().map_err(Clone::clone)?;
    if let Check::Webhook(hook) = check {
        let sent: Vec<&str> = texts.iter().map(String::as_str).collect();
        return Ok(match hook.call(d.as_str(), &policy.name, ctx.route, &sent, sources).await? {
            webhook::Answer::Pass => None,
            webhook::Answer::Block { reason } => {
                Some(format!("said block: {}", reason.as_deref().unwrap_or("no reason given")))
            }
            webhook::Answer::Redact { .. } => {
                Some("asked to redact text that was already committed to the stream".into())
            }
        });
    }
    let limit = s.spec.timeout.map_or(Duration::from_secs(2), |t| t.as_std());
    let judged = s.judged(texts, sources);
    match tokio::time::timeout(limit, check.judge(&judged)).await {
        Ok(verdict) => verdict.map(|v| v.fires().then(|| v.found())),
        Err(_) => Err(format!("timed out after {}ms", limit.as_millis())),
    }
}

/// Findings per text index; `WHOLE` for findings about all texts together.
type Found = Vec<(usize, Vec<Finding>)>;
const WHOLE: usize = usize::MAX;

fn scan_one(s: &ScannerRuntime, texts: &[&mut String]) -> Result<Found, String> {
    let detector = match &s.check {
        Ok(Check::Text(d)) => d,
        Ok(_) => return Ok(vec![]),
        Err(e) => return Err(e.clone()),
    };
    let threshold = s.spec.threshold;
    let keep = |f: &Finding| threshold.is_none_or(|t| f64::from(f.score) >= t);
    if detector.whole_request() {
        let joined = texts.iter().map(|t| t.as_str()).collect::<Vec<_>>().join("\n");
        let f: Vec<Finding> = detector.detect(&joined)?.into_iter().filter(keep).collect();
        // Whole-text findings are judged, never redacted: report them without a span.
        return Ok(if f.is_empty() { vec![] } else { vec![(WHOLE, f)] });
    }
    let mut out = vec![];
    for (i, t) in texts.iter().enumerate() {
        let f: Vec<Finding> = detector.detect(t)?.into_iter().filter(keep).collect();
        if !f.is_empty() {
            out.push((i, f));
        }
    }
    Ok(out)
}

fn summarize(found: &Found) -> String {
    let mut kinds: Vec<&str> = found.iter().flat_map(|(_, f)| f.iter().map(|f| f.kind)).collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds.join(", ")
}

fn label(kind: &str) -> String {
    let mut out = String::with_capacity(kind.len() + 4);
    let mut prev_lower = false;
    for c in kind.chars() {
        if c == '-' {
            out.push('_');
            prev_lower = false;
        } else if c.is_uppercase() && prev_lower {
            out.push('_');
            out.push(c);
            prev_lower = false;
        } else {
            out.push(c.to_ascii_uppercase());
            prev_lower = c.is_lowercase();
        }
    }
    out
}

fn text_hash(texts: &[&mut String]) -> String {
    let mut h = Sha256::new();
    for t in texts {
        h.update(t.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> PolicyRuntime {
        let spec: ScannerPolicySpec = serde_yaml::from_str(yaml).unwrap();
        PolicyRuntime::build("team-a/guard", &spec, &model::ModelHub::default()).unwrap()
    }

    fn run_on(p: &PolicyRuntime, d: Direction, texts: &[&str]) -> (Result<Restore, Blocked>, Vec<String>) {
        let metrics = Metrics::new();
        let mut owned: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
        let mut refs: Vec<&mut String> = owned.iter_mut().collect();
        let r = run(p, d, &mut refs, &Ctx { metrics: &metrics, route: "r", backend: None, mirrored: false });
        (r, owned)
    }

    #[test]
    fn redacts_blocks_and_audits() {
        let p = policy(
            "input:\n- {type: secrets, action: redact}\n- {type: pii, entities: [email], action: redact, restoreInResponse: true}\n- {type: banSubstrings, substrings: [falcon], action: block}\n- {type: invisibleText, action: redact}\n- {type: regex, patterns: [secret-plan], action: block, mode: audit}",
        );
        let (r, texts) = run_on(
            &p,
            Direction::Input,
            &[
                "mail ann@example.com and bob@example.org, key AKIAIOSFODNN7EXAMPLE",
                "again ann@example.com\u{200B} secret-plan",
            ],
        );
        let restore = r.unwrap();
        assert_eq!(texts[0], "mail [EMAIL_1] and [EMAIL_2], key [REDACTED_AWS_ACCESS_KEY_ID]");
        assert_eq!(texts[1], "again [EMAIL_1] secret-plan", "same value, same placeholder; audit changes nothing");
        assert_eq!(restore.apply("Reply to [EMAIL_2] and [EMAIL_1]"), "Reply to bob@example.org and ann@example.com");
        let (r, _) = run_on(&p, Direction::Input, &["about Falcon"]);
        assert_eq!(r.unwrap_err().to_string(), "blocked by ScannerPolicy team-a/guard: banSubstrings found substring");
    }

    #[tokio::test]
    async fn unavailable_scanners_follow_on_scanner_error() {
        let metrics = Metrics::new();
        let ctx = Ctx { metrics: &metrics, route: "r", backend: None, mirrored: false };
        let mut text = "hello".to_owned();
        let closed = policy("input:\n- {type: promptInjection, threshold: 0.5}");
        let r = run_async(&closed, Direction::Input, &mut [&mut text], None, &ctx).await;
        assert_eq!(
            r.unwrap_err().reason,
            "could not run (no models directory is configured (--models-dir)) and the policy fails closed"
        );
        let open = policy("onScannerError: failOpen\ninput:\n- {type: promptInjection, threshold: 0.5}");
        assert!(run_async(&open, Direction::Input, &mut [&mut text], None, &ctx).await.is_ok());
        assert!(
            run(&closed, Direction::Input, &mut [&mut text], &ctx).is_ok(),
            "the in-place pass leaves models to run_async"
        );
    }

    #[test]
    fn sampling_and_whole_text_scanners() {
        let p = policy("input:\n- {type: tokenLimit, maxTokens: 4, encoding: cl100k_base}");
        assert!(run_on(&p, Direction::Input, &["one two", "three"]).0.is_ok());
        let (r, texts) = run_on(&p, Direction::Input, &["one two three", "four five six"]);
        assert_eq!(r.unwrap_err().reason, "found too-many-tokens");
        assert_eq!(texts[0], "one two three", "judged, not redacted");
        let mut blocked = 0;
        let sampled = policy("input:\n- {type: banSubstrings, substrings: [x], sampling: 0.3}");
        for _ in 0..1000 {
            blocked += usize::from(run_on(&sampled, Direction::Input, &["x"]).0.is_err());
        }
        assert!((200..400).contains(&blocked), "{blocked} of 1000 sampled at 0.3");
    }

    #[test]
    fn huge_inputs_are_scanned_to_the_end() {
        let p = policy(
            "input:\n- {type: secrets, action: redact}\n- {type: pii, action: redact}\n- {type: invisibleText, action: redact}",
        );
        let text = format!(
            "{} key AKIAIOSFODNN7EXAMPLE, mail a@b.example \u{200B}end",
            "lorem ipsum dolor sit amet ".repeat(80_000)
        );
        let (r, texts) = run_on(&p, Direction::Input, &[&text]);
        assert!(r.unwrap().redacted);
        assert!(texts[0].ends_with(" key [REDACTED_AWS_ACCESS_KEY_ID], mail [REDACTED_EMAIL] end"));
        assert_eq!(
            texts[0].len(),
            text.len() - "AKIAIOSFODNN7EXAMPLEa@b.example\u{200B}".len()
                + "[REDACTED_AWS_ACCESS_KEY_ID][REDACTED_EMAIL]".len()
        );
    }

    #[test]
    fn labels() {
        assert_eq!(label("creditCard"), "CREDIT_CARD");
        assert_eq!(label("aws-access-key-id"), "AWS_ACCESS_KEY_ID");
        assert_eq!(label("ipAddress"), "IP_ADDRESS");
    }
}
