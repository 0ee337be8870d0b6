//! Output scanning of a streamed response, as it streams. Text deltas are held back on a
//! sliding window (`streaming.windowChars`) so a secret split across chunks is still caught;
//! released text is redacted and restored, then re-emitted as events of the same shape.
//!
//! The deltas scanned are the answer's text, Anthropic thinking, and tool calls' arguments
//! (OpenAI `delta.tool_calls[].function.arguments`, Anthropic `input_json_delta`). Arguments
//! are JSON arriving in pieces: each string value in them is scanned as a text of its own, with
//! its escapes decoded, and encoded again, so a redacted argument is still valid JSON.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::{
    Blocked, Ctx, Direction, Pass, PolicyRuntime, Restore,
    partial_json::{self, PartialJson, Piece},
    run_with,
};
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
    /// The part of the answer whose deltas are being scanned.
    part: Option<Delta>,
    /// Scanned text not yet released to the client.
    held: String,
    /// The text released just before `held`, as it came (at most `window` characters): what
    /// the scanners see before it.
    context: String,
    /// The last event of the part, re-used as the shape of released text.
    template: Option<Template>,
    /// The readers of tool-call arguments, by part.
    arguments: Vec<(Part, PartialJson)>,
    /// The other parts' held text, context and template, while another part streams.
    parked: Vec<Parked>,
    window: usize,
    /// The whole text, for scanners that judge a complete document at the end (bounded).
    full: Option<String>,
    /// The text released since `take_text` (of every part), for the model-based scanners.
    for_models: Option<String>,
}

/// Which part of an answer a delta adds to. The guard scans one part at a time, in the order
/// the deltas come: a delta of another part first releases all of the one before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// OpenAI's answer text (`delta.content`, or a completion's `text`), by choice.
    Text(u64),
    /// An OpenAI tool call, by choice and its index.
    ToolCall(u64, u64),
    /// An Anthropic content block, by its index.
    Block(u64),
}

/// A delta the guard scans: its part, and where its text is in the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Delta {
    part: Part,
    /// JSON pointer of the text in the event.
    slot: &'static str,
    /// Tool-call arguments, JSON, rather than text.
    json: bool,
    /// The answer's text, which whole-document scanners judge at the end (not thinking, not
    /// tool calls).
    whole: bool,
}

/// A part's state while another part's deltas come.
struct Parked {
    delta: Delta,
    held: String,
    context: String,
    template: Option<Template>,
}

/// An event to write released text into.
struct Template {
    name: Option<String>,
    event: Value,
    slot: &'static str,
}

/// Most text kept for whole-document scanners; a longer stream is judged on its start.
const MAX_FULL: usize = 4 << 20;
/// The longest event the guard holds while it waits for the event's end.
const MAX_EVENT: usize = 4 << 20;

const OPENAI_TEXT: &str = "/choices/0/delta/content";
const OPENAI_ARGUMENTS: &str = "/choices/0/delta/tool_calls/0/function/arguments";
const ANTHROPIC_ARGUMENTS: &str = "/delta/partial_json";

/// The delta an event carries, if it carries one the guard scans.
fn delta_of(flavor: Flavor, v: &Value) -> Option<Delta> {
    let text = |part, slot, whole| Some(Delta { part, slot, json: false, whole });
    match flavor {
        Flavor::OpenAi => {
            let choice = v.get("choices")?.get(0)?;
            // With `n` > 1, each choice is an answer of its own.
            let n = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let delta = choice.get("delta");
            if let Some([call]) = delta.and_then(|d| d.get("tool_calls")?.as_array()).map(Vec::as_slice)
                && call.pointer("/function/arguments").is_some_and(Value::is_string)
            {
                let part = Part::ToolCall(n, call.get("index").and_then(Value::as_u64).unwrap_or(0));
                return Some(Delta { part, slot: OPENAI_ARGUMENTS, json: true, whole: false });
            }
            if delta.and_then(|d| d.get("content")).is_some_and(Value::is_string) {
                return text(Part::Text(n), OPENAI_TEXT, true);
            }
            choice.get("text")?.as_str()?;
            text(Part::Text(n), "/choices/0/text", true)
        }
        Flavor::Anthropic => {
            if v.get("type")?.as_str()? != "content_block_delta" {
                return None;
            }
            let part = Part::Block(v.get("index").and_then(Value::as_u64).unwrap_or(0));
            let d = v.get("delta")?;
            let (slot, json, whole) = match d.get("type")?.as_str()? {
                "text_delta" => ("/delta/text", false, true),
                "thinking_delta" => ("/delta/thinking", false, false),
                "input_json_delta" => (ANTHROPIC_ARGUMENTS, true, false),
                _ => return None,
            };
            v.pointer(slot)?.as_str()?;
            Some(Delta { part, slot, json, whole })
        }
    }
}

/// Whether `v` ends `part`'s tool arguments: an OpenAI choice's finish, an Anthropic block's stop
/// or the message's end.
fn ends(flavor: Flavor, v: &Value, part: Part) -> bool {
    match (flavor, part) {
        (Flavor::OpenAi, Part::ToolCall(n, _)) => v.get("choices").and_then(|c| c.get(0)).is_some_and(|c| {
            c.get("index").and_then(Value::as_u64).unwrap_or(0) == n
                && c.get("finish_reason").is_some_and(|f| !f.is_null())
        }),
        (Flavor::Anthropic, Part::Block(i)) => match v.get("type").and_then(Value::as_str) {
            Some("content_block_stop") => v.get("index").and_then(Value::as_u64).unwrap_or(0) == i,
            Some("message_delta" | "message_stop") => true,
            _ => false,
        },
        _ => false,
    }
}

/// An OpenAI event with text and a tool call, or several tool calls, as one event each, so that
/// each delta has a single part. The event's own fields ride on the first; its finish on the last.
fn split(flavor: Flavor, v: Value) -> Vec<Value> {
    let calls = match v.pointer("/choices/0/delta/tool_calls").and_then(Value::as_array) {
        Some(calls) if flavor == Flavor::OpenAi => calls.clone(),
        _ => return vec![v],
    };
    let text = v.pointer(OPENAI_TEXT).and_then(Value::as_str).is_some_and(|t| !t.is_empty());
    if calls.len() + usize::from(text) <= 1 {
        return vec![v];
    }
    let finish = v.pointer("/choices/0/finish_reason").cloned();
    let mut first = with_delta(&v, v.pointer("/choices/0/delta").cloned().unwrap_or_default());
    let mut out = vec![];
    let mut calls = calls.into_iter();
    if let Some(delta) = first.pointer_mut("/choices/0/delta").and_then(Value::as_object_mut) {
        if text {
            delta.remove("tool_calls");
        } else {
            delta.insert("tool_calls".into(), Value::Array(calls.next().into_iter().collect()));
        }
    }
    out.push(first);
    out.extend(calls.map(|call| with_delta(&v, serde_json::json!({"tool_calls": [call]}))));
    if let (Some(last), Some(finish)) = (out.last_mut(), finish)
        && let Some(slot) = last.pointer_mut("/choices/0/finish_reason")
    {
        *slot = finish;
    }
    out
}

/// `v` with `delta` as its first choice's delta, no finish and no usage.
fn with_delta(v: &Value, delta: Value) -> Value {
    let mut ev = v.clone();
    if let Some(obj) = ev.as_object_mut() {
        obj.remove("usage");
    }
    if let Some(choice) = ev.pointer_mut("/choices/0").and_then(Value::as_object_mut) {
        choice.insert("delta".into(), delta);
        choice.insert("finish_reason".into(), Value::Null);
    }
    ev
}

/// The shape of a tool call's later pieces: its index and arguments only (its id and name went
/// out with its first piece, and must not be repeated: clients join the pieces).
fn arguments_template(flavor: Flavor, v: &Value) -> Value {
    match flavor {
        Flavor::Anthropic => v.clone(),
        Flavor::OpenAi => {
            let index = v.pointer("/choices/0/delta/tool_calls/0/index").cloned().unwrap_or(Value::from(0));
            with_delta(v, serde_json::json!({"tool_calls": [{"index": index, "function": {"arguments": ""}}]}))
        }
    }
}

fn write_event(out: &mut Vec<u8>, name: Option<&str>, event: &Value) {
    if let Some(n) = name {
        out.extend_from_slice(format!("event: {n}\n").as_bytes());
    }
    out.extend_from_slice(format!("data: {event}\n\n").as_bytes());
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
        // Span scanners need the window; restoring needs enough to put back a placeholder split
        // across chunks. Without either, text is released as it comes.
        let spans = policy.output.iter().any(|s| !s.is_model() && !s.judges_whole());
        let window =
            if spans { policy.window } else { 0 }.max(if restore.is_empty() { 0 } else { restore.longest() + 1 });
        let full = policy.output.iter().any(|s| s.judges_whole()).then(String::new);
        let for_models = policy.output.iter().any(|s| s.is_model()).then(String::new);
        Self {
            policy,
            restore,
            flavor,
            metrics,
            route,
            backend,
            mirrored: false,
            partial: vec![],
            part: None,
            held: String::new(),
            context: String::new(),
            template: None,
            arguments: vec![],
            parked: vec![],
            window,
            full,
            for_models,
        }
    }

    /// What judges this stream's text with the policy's model-based scanners, if it has any.
    pub fn judge(&self) -> Option<super::judge::StreamJudge> {
        super::judge::StreamJudge::new(
            self.policy.clone(),
            self.metrics.clone(),
            &self.route,
            &self.backend,
            self.mirrored,
        )
    }

    /// The answer text released since the last call (with a judge).
    pub fn take_text(&mut self) -> String {
        self.for_models.as_mut().map(std::mem::take).unwrap_or_default()
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
        self.cut_where(|_| true, &mut out)?;
        self.flush_all(&mut out)?;
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
        let events = serde_json::from_str::<Value>(&data).map(|v| split(self.flavor, v)).unwrap_or_default();
        if events.iter().any(|v| delta_of(self.flavor, v).is_some()) {
            for v in events {
                match delta_of(self.flavor, &v) {
                    Some(delta) => self.delta(name.clone(), v, delta, out)?,
                    None => {
                        self.cut_ended(&v, out)?;
                        self.flush_all(out)?;
                        write_event(out, name.as_deref(), &v);
                    }
                }
            }
            return Ok(());
        }
        // Anything else (role, finish, usage, block starts and stops, [DONE]): release what is
        // held first, to keep the order.
        for v in &events {
            self.cut_ended(v, out)?;
        }
        self.flush_all(out)?;
        if data == "[DONE]" || name.as_deref() == Some("message_stop") {
            // The end marker leaves only once the whole answer passed.
            self.judge_whole()?;
        }
        out.extend_from_slice(raw);
        Ok(())
    }

    /// A delta of text or of tool-call arguments.
    fn delta(&mut self, name: Option<String>, mut v: Value, delta: Delta, out: &mut Vec<u8>) -> Result<(), Blocked> {
        self.switch(delta);
        let piece = v.pointer(delta.slot).and_then(Value::as_str).unwrap_or_default().to_owned();
        if !delta.json {
            self.held.push_str(&piece);
            self.template = Some(Template { name, event: v, slot: delta.slot });
            let released = self.release(false)?;
            self.emit(&released, out);
            return Ok(());
        }
        let at = self.arguments.iter().position(|(p, _)| *p == delta.part).unwrap_or_else(|| {
            self.arguments.push((delta.part, PartialJson::default()));
            self.arguments.len() - 1
        });
        let reader = &mut self.arguments[at].1;
        let pieces = reader.feed(&piece);
        let open = reader.in_value();
        if reader.overflowed() {
            return Err(Blocked {
                policy: self.policy.name.clone(),
                scanner: "stream",
                reason: "a tool argument's key or number longer than 64 KiB cannot be scanned".into(),
            });
        }
        let mut json = String::new();
        for piece in pieces {
            match piece {
                Piece::Raw(raw) => json.push_str(&raw),
                Piece::Text(text) => self.held.push_str(&text),
                Piece::End => json.push_str(&partial_json::encode(&self.value_ended()?)),
                token => json.push_str(&self.token_ended(at, token)?),
            }
        }
        // The last delta of a choice that finishes: a key or number it leaves open goes out in it.
        if ends(self.flavor, &v, delta.part)
            && let Some(token) = self.arguments[at].1.cut()
        {
            json.push_str(&self.token_ended(at, token)?);
        }
        if open {
            json.push_str(&partial_json::encode(&self.release(false)?));
        }
        let later = arguments_template(self.flavor, &v);
        if let Some(slot) = v.pointer_mut(delta.slot) {
            *slot = Value::String(json.clone());
        }
        // A piece wholly held back leaves nothing, unless it carries more (a call's id and name).
        if !json.is_empty() || v != later {
            write_event(out, name.as_deref(), &v);
        }
        self.template = Some(Template { name, event: later, slot: delta.slot });
        Ok(())
    }

    /// A whole key or number of the tool arguments at `at` (or one the stream cut off), judged,
    /// as it goes into the arguments. A key the scanners rewrote does not take the name of a key
    /// written into its object before it.
    fn token_ended(&mut self, at: usize, token: Piece) -> Result<String, Blocked> {
        match token {
            Piece::Key(key, object) => {
                self.held.push_str(&key);
                let scanned = self.value_ended()?;
                let rewritten = scanned != key;
                Ok(partial_json::encode(&self.arguments[at].1.key_name(object, scanned, rewritten)))
            }
            Piece::Number(n) => {
                self.held.push_str(&n);
                Ok(partial_json::number(&n, &self.value_ended()?))
            }
            Piece::Raw(_) | Piece::Text(_) | Piece::End => Ok(String::new()),
        }
    }

    /// The key or number left open in the arguments of each part `v` ends (an event that is no
    /// delta: a choice's finish, a block's stop), judged and released into the part's event. An
    /// event in the middle of a block (Anthropic's `ping`) ends nothing: a token goes on across it.
    fn cut_ended(&mut self, v: &Value, out: &mut Vec<u8>) -> Result<(), Blocked> {
        let flavor = self.flavor;
        self.cut_where(|part| ends(flavor, v, part), out)
    }

    fn cut_where(&mut self, ended: impl Fn(Part) -> bool, out: &mut Vec<u8>) -> Result<(), Blocked> {
        for i in 0..self.arguments.len() {
            let part = self.arguments[i].0;
            if !ended(part) {
                continue;
            }
            let Some(token) = self.arguments[i].1.cut() else { continue };
            let slot = match self.flavor {
                Flavor::OpenAi => OPENAI_ARGUMENTS,
                Flavor::Anthropic => ANTHROPIC_ARGUMENTS,
            };
            self.switch(Delta { part, slot, json: true, whole: false });
            let fragment = self.token_ended(i, token)?;
            self.emit(&fragment, out);
        }
        Ok(())
    }

    /// A string value, key or number of tool arguments ended: all of it is judged, and the next
    /// one starts afresh.
    fn value_ended(&mut self) -> Result<String, Blocked> {
        let released = self.release(true)?;
        self.context.clear();
        if let Some(text) = &mut self.for_models {
            text.push('\n');
        }
        Ok(released)
    }

    /// Makes `to`'s part the current one: the current part is parked with what it holds (its
    /// text may go on after the other part's deltas, as choices and blocks interleave), and
    /// `to`'s own parked state, if any, resumes.
    fn switch(&mut self, to: Delta) {
        if self.part.is_some_and(|p| p.part == to.part) {
            return;
        }
        if let Some(delta) = self.part.take() {
            let (held, context) = (std::mem::take(&mut self.held), std::mem::take(&mut self.context));
            self.parked.push(Parked { delta, held, context, template: self.template.take() });
            // Parts are separate texts for the judges.
            if let Some(text) = &mut self.for_models {
                text.push('\n');
            }
        }
        if let Some(i) = self.parked.iter().position(|p| p.delta.part == to.part) {
            let p = self.parked.swap_remove(i);
            (self.held, self.context, self.template) = (p.held, p.context, p.template);
        }
        self.part = Some(to);
    }

    /// Releases all that every part holds: before an event that is no delta, and at the end.
    fn flush_all(&mut self, out: &mut Vec<u8>) -> Result<(), Blocked> {
        self.flush(out)?;
        while let Some(p) = self.parked.pop() {
            (self.part, self.held, self.context, self.template) = (Some(p.delta), p.held, p.context, p.template);
            self.flush(out)?;
        }
        Ok(())
    }

    /// Releases all that is held of the current part.
    fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), Blocked> {
        let released = self.release(true)?;
        if self.part.is_some_and(|p| p.json) {
            self.emit(&partial_json::encode(&released), out);
        } else {
            self.emit(&released, out);
        }
        Ok(())
    }

    /// Writes released text (or encoded arguments) into the part's last event.
    fn emit(&self, released: &str, out: &mut Vec<u8>) {
        if released.is_empty() {
            return;
        }
        if let Some(t) = &self.template {
            let mut ev = t.event.clone();
            if let Some(slot) = ev.pointer_mut(t.slot) {
                *slot = Value::String(released.to_owned());
            }
            write_event(out, t.name.as_deref(), &ev);
        }
    }

    /// Scans the held text; releases all of it (`all`) or all but the window, redacted and
    /// restored.
    fn release(&mut self, all: bool) -> Result<String, Blocked> {
        if self.held.is_empty() {
            return Ok(String::new());
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
            return Ok(String::new());
        }
        let released: String = self.held.drain(..cut).collect();
        // What was released, as it came, is the context of what follows.
        self.context.push_str(&came[..came.len() - self.held.len()]);
        let chars = self.context.chars().count();
        if chars > self.window {
            let from = self.context.char_indices().nth(chars - self.window).map_or(0, |(i, _)| i);
            self.context.drain(..from);
        }
        if self.part.is_some_and(|p| p.whole)
            && let Some(full) = &mut self.full
            && full.len() + released.len() <= MAX_FULL
        {
            full.push_str(&released);
        }
        // The judges read every part (answer, thinking, tool arguments), as they read a whole
        // answer, and before placeholders are restored, as in a whole answer.
        if let Some(text) = &mut self.for_models {
            text.push_str(&released);
        }
        Ok(if self.restore.is_empty() { released } else { self.restore.apply(&released) })
    }

    /// The events that end a stream whose output was blocked.
    pub fn blocked_events(&self, b: &Blocked) -> Bytes {
        let err = crate::error::ProxyError::new(http::StatusCode::BAD_REQUEST, "output_blocked", b.to_string());
        let mut out = Vec::new();
        match self.flavor {
            Flavor::OpenAi => {
                let mut stop = serde_json::json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]});
                if let Some(t) = &self.template {
                    for k in ["id", "created", "model"] {
                        if let Some(v) = t.event.get(k) {
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
            .filter_map(|v| v.pointer(OPENAI_TEXT).and_then(Value::as_str).map(str::to_owned))
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

    /// The OpenAI tool-call events of `pieces` of arguments: the first carries the id and name.
    fn openai_tool_events(calls: &[(u64, &[&str])]) -> String {
        let mut wire = String::new();
        for (index, pieces) in calls {
            for (i, piece) in pieces.iter().enumerate() {
                let mut call = serde_json::json!({"index": index, "function": {"arguments": piece}});
                if i == 0 {
                    call["id"] = format!("call_{index}").into();
                    call["type"] = "function".into();
                    call["function"]["name"] = "deploy".into();
                }
                let ev = serde_json::json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]});
                wire.push_str(&format!("data: {ev}\n\n"));
            }
        }
        wire.push_str("data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\ndata: [DONE]\n\n");
        wire
    }

    /// What a client assembles from OpenAI tool-call events: per index, ids, names, arguments.
    fn assembled_calls(bytes: &[u8]) -> Vec<(String, String, String)> {
        let mut calls: Vec<(String, String, String)> = vec![];
        for data in String::from_utf8_lossy(bytes).split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            for call in v.pointer("/choices/0/delta/tool_calls").and_then(Value::as_array).into_iter().flatten() {
                let i = usize::try_from(call["index"].as_u64().unwrap()).unwrap();
                if calls.len() <= i {
                    calls.resize(i + 1, Default::default());
                }
                let field = |p: &str| call.pointer(p).and_then(Value::as_str).unwrap_or_default().to_owned();
                calls[i].0 += &field("/id");
                calls[i].1 += &field("/function/name");
                calls[i].2 += &field("/function/arguments");
            }
        }
        calls
    }

    const SECRETS: &str = "output:\n- {type: secrets, action: redact}\nstreaming: {windowChars: 32}";

    #[test]
    fn a_secret_split_across_openai_tool_argument_chunks_is_redacted_and_the_arguments_stay_json() {
        // The key is cut inside a string, across events, and one piece hides it behind escapes.
        let pieces: &[&str] = &[
            "{\"region\": \"eu\", \"aws_key\": \"AKIA",
            "IOSFOD",
            "NN7EXAMPLE\", \"n",
            "ote\": \"say \\\"hi",
            "\\\"\"}",
        ];
        let escaped: &[&str] = &["{\"k\": \"\\u0041KIAIOSFODNN7EXAMPLE\"}"];
        let wire = openai_tool_events(&[(0, pieces), (1, escaped)]);
        for split in [1, 9, 64, 4096] {
            let mut g = guard(SECRETS, Restore::default(), Flavor::OpenAi);
            let mut out = Vec::new();
            for chunk in wire.as_bytes().chunks(split) {
                out.extend_from_slice(&g.feed(chunk).unwrap());
            }
            out.extend_from_slice(&g.finish().unwrap());
            let text = String::from_utf8_lossy(&out);
            assert!(!text.contains("IOSFOD") && !text.contains("EXAMPLE"), "chunks of {split}: {text}");
            let calls = assembled_calls(&out);
            assert_eq!((calls[0].0.as_str(), calls[0].1.as_str()), ("call_0", "deploy"), "id and name once: {text}");
            assert_eq!((calls[1].0.as_str(), calls[1].1.as_str()), ("call_1", "deploy"));
            let args: Value = serde_json::from_str(&calls[0].2).unwrap();
            assert_eq!(
                args,
                serde_json::json!({"region": "eu", "aws_key": "[REDACTED_AWS_ACCESS_KEY_ID]", "note": "say \"hi\""})
            );
            let args: Value = serde_json::from_str(&calls[1].2).unwrap();
            assert_eq!(args, serde_json::json!({"k": "[REDACTED_AWS_ACCESS_KEY_ID]"}), "escapes are decoded first");
            assert!(text.contains("\"finish_reason\":\"tool_calls\"") && text.ends_with("data: [DONE]\n\n"));
        }
    }

    #[test]
    fn keys_and_numbers_of_streamed_tool_arguments_are_scanned_whole() {
        let policy =
            "output:\n- {type: pii, entities: [creditCard], action: redact}\n- {type: secrets, action: redact}";
        let pieces: &[&str] =
            &["{\"amount\": 12", ".5, \"card\": 41111111", "11111111, \"AKIAIOSF", "ODNN7EXAMPLE\": 1}"];
        let wire = openai_tool_events(&[(0, pieces)]);
        let mut g = guard(policy, Restore::default(), Flavor::OpenAi);
        let mut out = g.feed(wire.as_bytes()).unwrap().to_vec();
        out.extend_from_slice(&g.finish().unwrap());
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("41111111") && !text.contains("IOSF"), "{text}");
        let args: Value = serde_json::from_str(&assembled_calls(&out)[0].2).unwrap();
        assert_eq!(
            args,
            serde_json::json!({"amount": 12.5, "card": "[REDACTED_CREDIT_CARD]", "[REDACTED_AWS_ACCESS_KEY_ID]": 1}),
            "{text}"
        );
    }

    #[test]
    fn streamed_keys_redacted_alike_keep_every_value() {
        // Two keys of one object redacted alike, a third in a nested object (its own names), and
        // a key written before that a rewritten one must not take.
        let pieces: &[&str] = &[
            "{\"[REDACTED_AWS_ACCESS_KEY_ID] (2)\": 0, \"AKIAIOSFODNN7EXAMPLE\": 1, \"AKIAIOSF",
            "ODNN7EXAMPL2\": 2, \"in\": {\"AKIAIOSFODNN7EXAMPL3\": 3}, \"AKIAIOSFODNN7EXAMPL4\": 4}",
        ];
        let wire = openai_tool_events(&[(0, pieces)]);
        for split in [1, 7, 4096] {
            let mut g = guard(SECRETS, Restore::default(), Flavor::OpenAi);
            let mut out = Vec::new();
            for chunk in wire.as_bytes().chunks(split) {
                out.extend_from_slice(&g.feed(chunk).unwrap());
            }
            out.extend_from_slice(&g.finish().unwrap());
            let args: Value = serde_json::from_str(&assembled_calls(&out)[0].2).unwrap();
            let key = "[REDACTED_AWS_ACCESS_KEY_ID]";
            assert_eq!(
                args,
                serde_json::json!({
                    format!("{key} (2)"): 0, key: 1, format!("{key} (3)"): 2,
                    "in": {key: 3}, format!("{key} (4)"): 4,
                }),
                "chunks of {split}"
            );
        }
    }

    #[test]
    fn a_key_or_number_the_answer_cuts_off_is_judged_and_kept() {
        let policy = "output:\n- {type: pii, entities: [creditCard], action: redact}";
        // OpenAI: the answer ran out of tokens inside a number (`finish_reason: length`).
        let wire = openai_tool_events(&[(0, &["{\"note\": \"ok\", \"card\": 411111111", "1111111"])])
            .replace("\"tool_calls\"}]}", "\"length\"}]}");
        let mut g = guard(policy, Restore::default(), Flavor::OpenAi);
        let mut out = g.feed(wire.as_bytes()).unwrap().to_vec();
        out.extend_from_slice(&g.finish().unwrap());
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("4111111"), "{text}");
        assert_eq!(assembled_calls(&out)[0].2, "{\"note\": \"ok\", \"card\": \"[REDACTED_CREDIT_CARD]\"", "{text}");
        let finish = text.find("\"length\"").unwrap();
        assert!(text.find("REDACTED").unwrap() < finish, "the rest of the arguments goes out before the finish");
        // A number left open at a finish that rides on the last delta, and a key cut off there.
        for (pieces, want) in [(["{\"n\": 12", "34"], "{\"n\": 1234"), (["{\"n\": 1, \"ke", "y"], "{\"n\": 1, \"key")] {
            let last = serde_json::json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": pieces[1]}}]}, "finish_reason": "length"}]});
            let first = openai_tool_events(&[(0, &pieces[..1])]);
            let first = &first[..first.find("data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},").unwrap()];
            let mut g = guard(policy, Restore::default(), Flavor::OpenAi);
            let mut out = g.feed(format!("{first}data: {last}\n\ndata: [DONE]\n\n").as_bytes()).unwrap().to_vec();
            out.extend_from_slice(&g.finish().unwrap());
            assert_eq!(assembled_calls(&out)[0].2, want, "{}", String::from_utf8_lossy(&out));
        }
        // Anthropic: a ping inside the number does not cut it; the block's stop does.
        let delta = |json: &str| {
            let d = serde_json::json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": json}});
            format!("event: content_block_delta\ndata: {d}\n\n")
        };
        let wire = [
            delta("{\"card\": 41111"),
            "event: ping\ndata: {\"type\": \"ping\"}\n\n".to_owned(),
            delta("11111111111"),
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n".to_owned(),
        ]
        .concat();
        let mut g = guard(policy, Restore::default(), Flavor::Anthropic);
        let mut out = g.feed(wire.as_bytes()).unwrap().to_vec();
        out.extend_from_slice(&g.finish().unwrap());
        let text = String::from_utf8_lossy(&out);
        let input: String = text
            .split("\n\n")
            .filter_map(|e| serde_json::from_str::<Value>(e.split("data: ").nth(1)?).ok())
            .filter_map(|v| v.pointer(ANTHROPIC_ARGUMENTS).and_then(Value::as_str).map(str::to_owned))
            .collect();
        assert_eq!(input, "{\"card\": \"[REDACTED_CREDIT_CARD]\"", "{text}");
        assert!(text.trim_end().ends_with("{\"type\":\"content_block_stop\",\"index\":1}"), "{text}");
        // A stream that just ends (no finish): what is open goes out when the upstream ends.
        let wire = delta("{\"card\": 4111111111111111");
        let mut g = guard(policy, Restore::default(), Flavor::Anthropic);
        let mut out = g.feed(wire.as_bytes()).unwrap().to_vec();
        out.extend_from_slice(&g.finish().unwrap());
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("[REDACTED_CREDIT_CARD]") && !text.contains("4111"), "{text}");
    }

    #[test]
    fn several_tool_calls_in_one_event_are_each_scanned() {
        let ev = serde_json::json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "calling", "tool_calls": [
            {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{\"x\": \"AKIAIOSFODNN7EXAMPLE\"}"}},
            {"index": 1, "id": "b", "function": {"name": "g", "arguments": "{\"y\": \"ok\"}"}}
        ]}, "finish_reason": "tool_calls"}]});
        let mut g = guard(SECRETS, Restore::default(), Flavor::OpenAi);
        let mut out = g.feed(format!("data: {ev}\n\n").as_bytes()).unwrap().to_vec();
        out.extend_from_slice(&g.finish().unwrap());
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("AKIAIOSFODNN7EXAMPLE"), "{text}");
        let calls = assembled_calls(&out);
        assert_eq!(calls[0], ("a".into(), "f".into(), "{\"x\": \"[REDACTED_AWS_ACCESS_KEY_ID]\"}".into()));
        assert_eq!(calls[1], ("b".into(), "g".into(), "{\"y\": \"ok\"}".into()));
        assert_eq!(text_out(&out), "calling");
        assert_eq!(text.matches("\"finish_reason\":\"tool_calls\"").count(), 1, "{text}");
    }

    #[test]
    fn choices_of_one_stream_are_scanned_apart_and_each_keeps_its_window() {
        let ev = |choice: u64, text: &str| {
            let v = serde_json::json!({"id": "c1", "choices": [{"index": choice, "delta": {"content": text}}]});
            format!("data: {v}\n\n")
        };
        let wire = [ev(0, "key AKIAIOSF"), ev(1, "an ordinary answer"), ev(0, "ODNN7EXAMPLE done"), ev(1, " goes on")]
            .concat()
            + "data: [DONE]\n\n";
        let mut g = guard(SECRETS, Restore::default(), Flavor::OpenAi);
        let mut out = g.feed(wire.as_bytes()).unwrap().to_vec();
        out.extend_from_slice(&g.finish().unwrap());
        let mut texts = [String::new(), String::new()];
        for data in String::from_utf8_lossy(&out).split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            let i = usize::try_from(v["choices"][0]["index"].as_u64().unwrap()).unwrap();
            texts[i] += v.pointer(OPENAI_TEXT).and_then(Value::as_str).unwrap_or_default();
        }
        let want = ["key [REDACTED_AWS_ACCESS_KEY_ID] done", "an ordinary answer goes on"];
        assert_eq!(texts, want.map(str::to_owned), "a key split around another choice's delta is caught");
    }

    #[test]
    fn anthropic_tool_input_and_thinking_deltas_are_scanned() {
        let ev = |index: u64, delta: Value| {
            format!(
                "event: content_block_delta\ndata: {}\n\n",
                serde_json::json!({"type": "content_block_delta", "index": index, "delta": delta})
            )
        };
        let stop = |index: u64| {
            format!("event: content_block_stop\ndata: {{\"type\":\"content_block_stop\",\"index\":{index}}}\n\n")
        };
        let wire = [
            ev(0, serde_json::json!({"type": "thinking_delta", "thinking": "the key AKIAIOSF"})),
            ev(0, serde_json::json!({"type": "thinking_delta", "thinking": "ODNN7EXAMPLE works"})),
            stop(0),
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"f\",\"input\":{}}}\n\n".to_owned(),
            ev(1, serde_json::json!({"type": "input_json_delta", "partial_json": "{\"key\": \"AKIAIOSF"})),
            ev(1, serde_json::json!({"type": "input_json_delta", "partial_json": "ODNN7EXAMPLE\"}"})),
            stop(1),
        ]
        .concat();
        let mut g = guard(SECRETS, Restore::default(), Flavor::Anthropic);
        let mut out = g.feed(wire.as_bytes()).unwrap().to_vec();
        out.extend_from_slice(&g.finish().unwrap());
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("ODNN7EXAMPLE"), "{text}");
        let (mut thinking, mut input) = (String::new(), String::new());
        for data in text.split("\n\n").filter_map(|e| e.split_once("data: ").map(|(_, d)| d)) {
            let v: Value = serde_json::from_str(data).unwrap();
            thinking += v.pointer("/delta/thinking").and_then(Value::as_str).unwrap_or_default();
            input += v.pointer("/delta/partial_json").and_then(Value::as_str).unwrap_or_default();
        }
        assert_eq!(thinking, "the key [REDACTED_AWS_ACCESS_KEY_ID] works");
        assert_eq!(
            serde_json::from_str::<Value>(&input).unwrap(),
            serde_json::json!({"key": "[REDACTED_AWS_ACCESS_KEY_ID]"})
        );
        assert!(text.trim_end().ends_with("{\"type\":\"content_block_stop\",\"index\":1}"), "{text}");
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

        /// `text` redacted by `POLICY` all at once.
        fn redacted_whole(text: &str) -> String {
            let mut whole = text.to_owned();
            let spec: ScannerPolicySpec = serde_yaml::from_str(POLICY).unwrap();
            let policy = PolicyRuntime::build("p", &spec, &super::super::super::model::ModelHub::default()).unwrap();
            let metrics = Metrics::new();
            let ctx = Ctx { metrics: &metrics, route: "r", backend: None, mirrored: false };
            run_with(&policy, Direction::Output, &mut [&mut whole], &ctx, Pass::All).unwrap();
            whole
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

                let whole = redacted_whole(&text);
                prop_assert_eq!(text_out(&out), whole);
            }

            /// The same for a tool call's arguments: a string value or key in JSON cut anywhere
            /// (inside escapes too) comes out as redacting the whole of it gives, and still valid
            /// JSON.
            #[test]
            fn streamed_tool_arguments_equal_redacting_each_whole_value(
                pieces in prop::collection::vec(piece(), 1..40),
                deltas in prop::collection::vec(0.0f64..1.0, 0..12),
            ) {
                let text = within_window(&pieces.concat());
                let json = serde_json::json!({"a": text, "n": 1, "b": ["x", text], "~": {text.as_str(): 2}}).to_string();
                let cut = cuts(&json, &deltas);
                let wire = openai_tool_events(&[(0, &cut.iter().map(String::as_str).collect::<Vec<_>>())]);
                let mut g = guard(POLICY, Restore::default(), Flavor::OpenAi);
                let mut out = g.feed(wire.as_bytes()).unwrap().to_vec();
                out.extend_from_slice(&g.finish().unwrap());

                let whole = redacted_whole(&text);
                let args: Value = serde_json::from_str(&assembled_calls(&out)[0].2).unwrap();
                prop_assert_eq!(args, serde_json::json!({"a": whole, "n": 1, "b": ["x", whole], "~": {whole.as_str(): 2}}));
            }
        }
    }
}
