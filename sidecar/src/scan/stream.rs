//! Output scanning of a streamed response, as it streams. Text deltas are held back on a
//! sliding window (`streaming.windowChars`) so a secret split across chunks is still caught;
//! released text is redacted and restored, then re-emitted as events of the same shape.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::{Blocked, Ctx, Direction, Pass, PolicyRuntime, Restore, run_with};
use crate::{error::Flavor, metrics::Metrics};

pub struct OutputGuard {
    policy: Arc<PolicyRuntime>,
    restore: Restore,
    flavor: Flavor,
    metrics: Arc<Metrics>,
    route: String,
    /// The backend whose answer this is: its output blocks judge it in a rollout.
    backend: String,
    /// A mirrored copy's answer (see `Ctx::mirrored`).
    mirrored: bool,
    /// Bytes of an event not complete yet.
    partial: Vec<u8>,
    /// Scanned text not yet released to the client.
    held: String,
    /// The text released just before `held`, as it came (at most `window` characters): what
    /// the scanners see before it.
    context: String,
    /// The last content event, re-used as the shape of released text.
    template: Option<(Option<String>, Value)>,
    window: usize,
    /// The whole text, for scanners that judge a complete document at the end (bounded).
    full: Option<String>,
}

/// Most text kept for whole-document scanners; a longer stream is judged on its start.
const MAX_FULL: usize = 4 << 20;
/// The longest event the guard holds while it waits for the event's end.
const MAX_EVENT: usize = 4 << 20;

/// What a text event carries, by provider.
fn text_of(flavor: Flavor, v: &Value) -> Option<&str> {
    match flavor {
        Flavor::OpenAi => {
            let choice = v.get("choices")?.get(0)?;
            choice.get("delta").and_then(|d| d.get("content")).or_else(|| choice.get("text"))?.as_str()
        }
        Flavor::Anthropic => {
            let d = v.get("delta")?;
            (d.get("type")?.as_str()? == "text_delta").then(|| d.get("text")?.as_str())?
        }
    }
}

fn set_text(flavor: Flavor, v: &mut Value, text: &str) {
    let slot = match flavor {
        Flavor::OpenAi => v.pointer_mut("/choices/0/delta/content"),
        Flavor::Anthropic => v.pointer_mut("/delta/text"),
    };
    match slot {
        Some(s) => *s = Value::String(text.to_owned()),
        None => {
            if let Some(t) = v.pointer_mut("/choices/0/text") {
                *t = Value::String(text.to_owned());
            }
        }
    }
}

impl OutputGuard {
    /// Judges a mirrored copy's answer: only the backend's output blocks are counted.
    pub fn mirrored(mut self) -> Self {
        self.mirrored = true;
        self
    }

    pub fn new(
        policy: Arc<PolicyRuntime>,
        restore: Restore,
        flavor: Flavor,
        metrics: Arc<Metrics>,
        route: String,
        backend: String,
    ) -> Self {
        // Hold back enough to restore a placeholder split across chunks, too.
        let window = policy.window.max(restore.longest() + 1);
        let full = policy.output.iter().any(|s| s.judges_whole()).then(String::new);
        Self {
            policy,
            restore,
            flavor,
            metrics,
            route,
            backend,
            mirrored: false,
            partial: vec![],
            held: String::new(),
            context: String::new(),
            template: None,
            window,
            full,
        }
    }

    /// Takes upstream bytes; returns the bytes to send now (possibly none).
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Bytes, Blocked> {
        self.partial.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = find_event_end(&self.partial) {
            let event: Vec<u8> = self.partial.drain(..end.1).collect();
            self.event(&event[..end.0], &event, &mut out)?;
        }
        if self.partial.len() > MAX_EVENT {
            // Neither scanned nor held without bound: the stream ends here.
            self.partial = Vec::new();
            return Err(Blocked {
                policy: self.policy.name.clone(),
                scanner: "stream",
                reason: format!("an event longer than {} MiB cannot be scanned", MAX_EVENT >> 20),
            });
        }
        Ok(Bytes::from(out))
    }

    /// The upstream ended: scan and release what is held, and any trailing bytes.
    pub fn finish(&mut self) -> Result<Bytes, Blocked> {
        let mut out = Vec::new();
        self.release(true, &mut out)?;
        self.judge_whole()?;
        out.append(&mut self.partial);
        Ok(Bytes::from(out))
    }

    /// Runs the whole-document scanners once, over everything released.
    fn judge_whole(&mut self) -> Result<(), Blocked> {
        if let Some(mut full) = self.full.take() {
            let ctx = Ctx {
                metrics: &self.metrics,
                route: &self.route,
                backend: Some(&self.backend),
                mirrored: self.mirrored,
            };
            run_with(&self.policy, Direction::Output, &mut [&mut full], &ctx, Pass::Whole)?;
        }
        Ok(())
    }

    fn event(&mut self, body: &[u8], raw: &[u8], out: &mut Vec<u8>) -> Result<(), Blocked> {
        let text = String::from_utf8_lossy(body);
        let mut name = None;
        let mut data = String::new();
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        let parsed: Option<Value> = serde_json::from_str(&data).ok();
        if let Some(v) = parsed
            && let Some(t) = text_of(self.flavor, &v)
        {
            self.held.push_str(t);
            self.template = Some((name, v));
            return self.release(false, out);
        }
        // Anything else (role, tool calls, finish, usage, [DONE]): flush the text first, keep order.
        self.release(true, out)?;
        if data == "[DONE]" || name.as_deref() == Some("message_stop") {
            // The end marker leaves only once the whole answer passed.
            self.judge_whole()?;
        }
        out.extend_from_slice(raw);
        Ok(())
    }

    /// Scans the held text; releases all of it (`all`) or all but the window.
    fn release(&mut self, all: bool, out: &mut Vec<u8>) -> Result<(), Blocked> {
        if self.held.is_empty() {
            return Ok(());
        }
        let ctx =
            Ctx { metrics: &self.metrics, route: &self.route, backend: Some(&self.backend), mirrored: self.mirrored };
        // The last `keep` characters stay held: the tail a match may still grow into.
        let tail = |held: &str| {
            let chars = held.chars().count();
            let keep = if all { 0 } else { self.window.min(chars) };
            held.char_indices().nth(chars - keep).map_or(held.len(), |(i, _)| i)
        };
        let came = self.held.clone();
        let at = self.context.len();
        let mut scanned = std::mem::take(&mut self.context) + &self.held;
        let hold_after = (!all).then(|| at + tail(&self.held));
        let held_from = {
            let mut texts = [&mut scanned];
            // Whole-document scanners judge the complete answer in `judge_whole`, never a window.
            let pass = Pass::Spans { hold_after, context: at };
            run_with(&self.policy, Direction::Output, &mut texts, &ctx, pass)?.held_from.map(|h| h - at)
        };
        // Redactions leave the context and the held tail as they came.
        self.context = scanned[..at].to_owned();
        self.held = scanned.split_off(at);
        let mut cut = tail(&self.held);
        // A match still growing at the end stays held whole.
        if let Some(h) = held_from {
            cut = cut.min(h);
        }
        // Never cut a placeholder in two.
        if !all
            && let Some(open) = self.held[..cut].rfind('[')
            && !self.held[open..cut].contains(']')
        {
            cut = open;
        }
        if cut == 0 {
            return Ok(());
        }
        let released: String = self.held.drain(..cut).collect();
        // What was released, as it came, is the context of what follows.
        self.context.push_str(&came[..came.len() - self.held.len()]);
        let chars = self.context.chars().count();
        if chars > self.window {
            let from = self.context.char_indices().nth(chars - self.window).map_or(0, |(i, _)| i);
            self.context.drain(..from);
        }
        if let Some(full) = &mut self.full
            && full.len() + released.len() <= MAX_FULL
        {
            full.push_str(&released);
        }
        let released = if self.restore.is_empty() { released } else { self.restore.apply(&released) };
        if let Some((name, template)) = &self.template {
            let mut ev = template.clone();
            set_text(self.flavor, &mut ev, &released);
            if let Some(n) = name {
                out.extend_from_slice(format!("event: {n}\n").as_bytes());
            }
            out.extend_from_slice(format!("data: {ev}\n\n").as_bytes());
        }
        Ok(())
    }

    /// The events that end a stream whose output was blocked.
    pub fn blocked_events(&self, b: &Blocked) -> Bytes {
        let err = crate::error::ProxyError::new(http::StatusCode::BAD_REQUEST, "output_blocked", b.to_string());
        let mut out = Vec::new();
        match self.flavor {
            Flavor::OpenAi => {
                let mut stop = serde_json::json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]});
                if let Some((_, t)) = &self.template {
                    for k in ["id", "created", "model"] {
                        if let Some(v) = t.get(k) {
                            stop[k] = v.clone();
                        }
                    }
                }
                out.extend_from_slice(format!("data: {stop}\n\n").as_bytes());
            }
            Flavor::Anthropic => {
                let stop = serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "refusal", "stop_sequence": null}, "usage": {"output_tokens": 0}});
                out.extend_from_slice(format!("event: message_delta\ndata: {stop}\n\n").as_bytes());
            }
        }
        out.extend_from_slice(&err.sse_event(self.flavor));
        Bytes::from(out)
    }
}

/// End of the first complete event: (end of its body, end including the blank line).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| (i, i + 2));
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_api::ScannerPolicySpec;

    fn guard(yaml: &str, restore: Restore, flavor: Flavor) -> OutputGuard {
        let spec: ScannerPolicySpec = serde_yaml::from_str(yaml).unwrap();
        let policy = Arc::new(PolicyRuntime::build("p", &spec, &super::super::model::ModelHub::default()).unwrap());
        OutputGuard::new(policy, restore, flavor, Arc::new(Metrics::new()), "r".into(), "b".into())
    }

    fn openai_events(pieces: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = pieces
            .iter()
            .map(|p| {
                format!(
                    "data: {}\n\n",
                    serde_json::json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": p}}]})
                )
            })
            .collect();
        v.push(format!(
            "data: {}\n\n",
            serde_json::json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        ));
        v.push("data: [DONE]\n\n".into());
        v
    }

    fn text_out(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| text_of(Flavor::OpenAi, &v).map(str::to_owned))
            .collect()
    }

    #[test]
    fn a_secret_split_across_chunks_and_byte_boundaries_is_redacted() {
        let events = openai_events(&["Your key is AKIA", "IOSFODNN7", "EXAMPLE and more ", "text follows here."]);
        let wire: String = events.concat();
        for split in [1, 7, 50, 200] {
            let mut g = guard(
                "output:\n- {type: secrets, action: redact}\nstreaming: {windowChars: 32}",
                Restore::default(),
                Flavor::OpenAi,
            );
            let mut out = Vec::new();
            for chunk in wire.as_bytes().chunks(split) {
                out.extend_from_slice(&g.feed(chunk).unwrap());
            }
            out.extend_from_slice(&g.finish().unwrap());
            let text = text_out(&out);
            assert_eq!(
                text, "Your key is [REDACTED_AWS_ACCESS_KEY_ID] and more text follows here.",
                "chunks of {split}"
            );
            let s = String::from_utf8_lossy(&out);
            assert!(s.ends_with("data: [DONE]\n\n") && s.contains("\"finish_reason\":\"stop\""));
            assert!(!s.contains("IOSFODNN7"));
        }
    }

    #[test]
    fn a_match_that_may_still_grow_is_not_redacted_early_and_what_came_before_counts() {
        let policy = "output:\n- {type: secrets, action: redact}\n- {type: pii, entities: [email], action: redact}\nstreaming: {windowChars: 16}";
        let run = |pieces: &[&str]| {
            let mut g = guard(policy, Restore::default(), Flavor::OpenAi);
            let mut out = Vec::new();
            for e in openai_events(pieces) {
                out.extend_from_slice(&g.feed(e.as_bytes()).unwrap());
            }
            out.extend_from_slice(&g.finish().unwrap());
            text_out(&out)
        };
        // `...@mail.example` is an address already; the next delta makes it a longer one.
        assert_eq!(run(&["write to bob.smith@mail.example.", "org or call"]), "write to [REDACTED_EMAIL] or call");
        // Glued to the word before it (released long ago) the key is no key, as in the whole text.
        let long = "some text that is longer than the window, and then the";
        assert_eq!(run(&[long, "xAKIAIOSFODNN7EXAMPLE end"]), format!("{long}xAKIAIOSFODNN7EXAMPLE end"));
        assert_eq!(run(&[long, " AKIAIOSFODNN7EXAMPLE end"]), format!("{long} [REDACTED_AWS_ACCESS_KEY_ID] end"));
    }

    #[test]
    fn an_event_that_never_ends_ends_the_stream_instead_of_growing() {
        let mut g = guard("output:\n- {type: secrets, action: redact}", Restore::default(), Flavor::OpenAi);
        let chunk = vec![b'x'; 1 << 20];
        let ended = (0..8).find_map(|_| g.feed(&chunk).err()).expect("refused before 8 MiB");
        assert!(ended.reason.contains("cannot be scanned"), "{}", ended.reason);
        assert!(g.partial.is_empty());
    }

    #[test]
    fn placeholders_are_restored_even_when_split() {
        let restore =
            Restore { pairs: vec![("[EMAIL_1]".into(), "ann@example.com".into())], redacted: true, held_from: None };
        let mut g = guard("output: []", restore, Flavor::OpenAi);
        let mut out = Vec::new();
        for e in openai_events(&["Write to [EMA", "IL_1] today"]) {
            out.extend_from_slice(&g.feed(e.as_bytes()).unwrap());
        }
        assert_eq!(text_out(&out), "Write to ann@example.com today");
    }

    #[test]
    fn a_banned_output_blocks_the_stream_before_it_leaves() {
        let mut g = guard(
            "output:\n- {type: banSubstrings, substrings: [BEGIN PRIVATE KEY], action: block}",
            Restore::default(),
            Flavor::OpenAi,
        );
        let mut sent = Vec::new();
        let mut blocked = None;
        for e in openai_events(&["Here: -----BEGIN PRI", "VATE KEY-----\nMIIE"]) {
            match g.feed(e.as_bytes()) {
                Ok(b) => sent.extend_from_slice(&b),
                Err(b) => {
                    blocked = Some(b);
                    break;
                }
            }
        }
        let b = blocked.expect("blocked");
        assert!(!String::from_utf8_lossy(&sent).contains("PRI"), "nothing of it was released");
        let end = String::from_utf8_lossy(&g.blocked_events(&b)).into_owned();
        assert!(end.contains("\"finish_reason\":\"content_filter\"") && end.contains("event: error"), "{end}");
    }

    #[test]
    fn json_output_is_judged_on_the_whole_stream_at_its_end() {
        let yaml = "output:\n- {type: json, schema: {type: object, required: [ok]}}";
        let feed_all = |pieces: &[&str]| {
            let mut g = guard(yaml, Restore::default(), Flavor::OpenAi);
            let mut out = Vec::new();
            for e in openai_events(pieces) {
                out.extend_from_slice(&g.feed(e.as_bytes())?);
            }
            g.finish().map(|b| {
                out.extend_from_slice(&b);
                out
            })
        };
        assert!(feed_all(&["{\"o", "k\": tr", "ue}"]).is_ok());
        assert_eq!(feed_all(&["{\"nope\": ", "1}"]).unwrap_err().reason, "found schema-mismatch");
    }

    #[test]
    fn a_secret_at_the_very_end_is_redacted_and_released_alongside_a_json_scanner() {
        let yaml = "output:\n- {type: secrets, action: redact}\n- {type: json}\nstreaming: {windowChars: 16}";
        let mut g = guard(yaml, Restore::default(), Flavor::OpenAi);
        let mut out = Vec::new();
        for e in openai_events(&["{\"key\": \"", "AKIAIOSFODNN7EXAMPLE"]) {
            if e.contains("[DONE]") {
                // The answer is not JSON: the stream ends blocked, but the text before it went out redacted.
                assert!(g.feed(e.as_bytes()).is_err());
                break;
            }
            out.extend_from_slice(&g.feed(e.as_bytes()).unwrap());
        }
        assert_eq!(text_out(&out), "{\"key\": \"[REDACTED_AWS_ACCESS_KEY_ID]");
    }

    #[test]
    fn anthropic_text_deltas() {
        let mut g = guard(
            "output:\n- {type: pii, entities: [email], action: redact}\nstreaming: {windowChars: 16}",
            Restore::default(),
            Flavor::Anthropic,
        );
        let ev = |t: &str| {
            format!(
                "event: content_block_delta\ndata: {}\n\n",
                serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})
            )
        };
        let mut out = Vec::new();
        for e in [
            ev("mail me at bo"),
            ev("b@example.org please, thanks a lot"),
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n".to_owned(),
        ] {
            out.extend_from_slice(&g.feed(e.as_bytes()).unwrap());
        }
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("[REDACTED_EMAIL]") && !s.contains("example.org"), "{s}");
        assert!(s.trim_end().ends_with("{\"type\":\"content_block_stop\",\"index\":0}"));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Pieces of answer text: words, spaces, punctuation, multi-byte characters, and the
        /// values the policy redacts.
        fn piece() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "hello",
                " ",
                "the",
                "key",
                "\n",
                ", ",
                ".",
                "é",
                "日本",
                "[",
                "]",
                "x",
                "AKIAIOSFODNN7EXAMPLE",
                "ghp_0123456789abcdefghijklmnopqrstuvwxyzAB",
                "ann@example.com",
                "bob.smith@mail.example.org",
                "@",
                "-",
                "_",
                "9",
            ])
        }

        /// `text` cut at the given fractions, on character boundaries.
        fn cuts(text: &str, at: &[f64]) -> Vec<String> {
            let chars: Vec<char> = text.chars().collect();
            let mut points: Vec<usize> = at.iter().map(|f| (f * chars.len() as f64) as usize).collect();
            points.extend([0, chars.len()]);
            points.sort_unstable();
            points.dedup();
            points.windows(2).map(|w| chars[w[0]..w[1]].iter().collect()).collect()
        }

        /// The text with a space after every 60 characters without one: what the window
        /// promises holds for matches no longer than the window (64), and none of these
        /// patterns matches across whitespace.
        fn within_window(text: &str) -> String {
            let mut out = String::new();
            let mut run = 0;
            for c in text.chars() {
                run = if c.is_whitespace() { 0 } else { run + 1 };
                out.push(c);
                if run == 60 {
                    out.push(' ');
                    run = 0;
                }
            }
            out
        }

        const POLICY: &str = "output:\n- {type: secrets, action: redact}\n- {type: pii, entities: [email], action: redact}\nstreaming: {windowChars: 64}";

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

            /// However the answer is cut into deltas, and the deltas' bytes into reads, the
            /// client gets the text that redacting the whole answer at once gives.
            #[test]
            fn streamed_redaction_equals_redacting_the_whole_text(
                pieces in prop::collection::vec(piece(), 1..60),
                deltas in prop::collection::vec(0.0f64..1.0, 0..12),
                reads in prop::collection::vec(1usize..300, 1..8),
            ) {
                let text = within_window(&pieces.concat());
                let mut g = guard(POLICY, Restore::default(), Flavor::OpenAi);
                let wire: String = openai_events(&cuts(&text, &deltas).iter().map(String::as_str).collect::<Vec<_>>()).concat();
                let mut out = Vec::new();
                let (mut at, mut i) = (0, 0);
                while at < wire.len() {
                    let end = (at + reads[i % reads.len()]).min(wire.len());
                    out.extend_from_slice(&g.feed(&wire.as_bytes()[at..end]).unwrap());
                    (at, i) = (end, i + 1);
                }
                out.extend_from_slice(&g.finish().unwrap());

                let mut whole = text.clone();
                let spec: ScannerPolicySpec = serde_yaml::from_str(POLICY).unwrap();
                let policy = PolicyRuntime::build("p", &spec, &super::super::super::model::ModelHub::default()).unwrap();
                let metrics = Metrics::new();
                let ctx = Ctx { metrics: &metrics, route: "r", backend: None, mirrored: false };
                run_with(&policy, Direction::Output, &mut [&mut whole], &ctx, Pass::All).unwrap();
                prop_assert_eq!(text_out(&out), whole);
            }
        }
    }
}
