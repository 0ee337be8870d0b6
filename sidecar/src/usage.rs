//! Token usage as providers report it: the `usage` object of a JSON response, or the usage
//! carried by stream events (OpenAI's final chunk, Anthropic's message_start/message_delta).

use serde_json::Value;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub input: Option<u64>,
    pub output: Option<u64>,
}

impl Usage {
    fn merge_from(&mut self, usage: &Value) {
        let get = |keys: &[&str]| keys.iter().find_map(|k| usage.get(*k).and_then(Value::as_u64));
        if let Some(v) = get(&["prompt_tokens", "input_tokens"]) {
            self.input = Some(v);
        }
        if let Some(v) = get(&["completion_tokens", "output_tokens"]) {
            self.output = Some(v);
        }
    }

    pub fn total(&self) -> Option<u64> {
        match (self.input, self.output) {
            (None, None) => None,
            (i, o) => Some(i.unwrap_or(0) + o.unwrap_or(0)),
        }
    }
}

/// Usage of a complete JSON response. Only the `usage` object is materialised.
pub fn from_json(body: &[u8]) -> Usage {
    #[derive(serde::Deserialize)]
    struct Envelope {
        usage: Option<Value>,
    }
    let mut u = Usage::default();
    if memchr::memmem::find(body, b"\"usage\"").is_none() {
        return u;
    }
    if let Ok(Envelope { usage: Some(usage) }) = serde_json::from_slice::<Envelope>(body) {
        u.merge_from(&usage);
    }
    u
}

/// Follows an SSE byte stream chunk by chunk without copying it: counts events, notices the
/// end marker, and parses only the lines that carry usage.
#[derive(Debug, Default)]
pub struct SseTracker {
    partial: Vec<u8>,
    pub usage: Usage,
    /// `data:` lines seen.
    pub data_events: u64,
    /// Events carrying generated text: the estimate of output tokens when no usage is sent.
    pub content_events: u64,
    /// `data: [DONE]` (OpenAI) or `message_stop` (Anthropic) was seen.
    pub finished: bool,
    /// The current line grew past `MAX_LINE` and is skipped to its end.
    overlong: bool,
}

/// The longest line kept across chunks; usage lines are a few hundred bytes, and a longer line
/// (an upstream that never sends a newline) is skipped rather than held without bound.
const MAX_LINE: usize = 1 << 20;

impl SseTracker {
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if !self.partial.is_empty() || self.overlong {
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    let mut line = std::mem::take(&mut self.partial);
                    line.extend_from_slice(&rest[..i]);
                    if !std::mem::take(&mut self.overlong) {
                        self.line(&line);
                    }
                    rest = &rest[i + 1..];
                }
                None => {
                    self.keep(rest);
                    return;
                }
            }
        }
        while let Some(i) = memchr::memchr(b'\n', rest) {
            self.line(&rest[..i]);
            rest = &rest[i + 1..];
        }
        if !rest.is_empty() {
            self.keep(rest);
        }
    }

    /// Holds the start of a line until its end arrives, up to `MAX_LINE`.
    fn keep(&mut self, bytes: &[u8]) {
        if self.overlong || self.partial.len() + bytes.len() > MAX_LINE {
            self.partial = Vec::new();
            self.overlong = true;
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            if line.starts_with(b"event:") && memchr::memmem::find(line, b"message_stop").is_some() {
                self.finished = true;
            }
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            self.finished = true;
            return;
        }
        self.data_events += 1;
        if has_text(data) {
            self.content_events += 1;
        }
        if memchr::memmem::find(data, b"\"usage\"").is_none() {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(data) {
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                self.usage.merge_from(u);
            }
            // Anthropic: message_start carries {"message": {"usage": ...}}.
            if let Some(u) = v.get("message").and_then(|m| m.get("usage")) {
                self.usage.merge_from(u);
            }
        }
    }
}

/// Whether an event carries non-empty generated text (OpenAI `content`/`text`, Anthropic
/// `text_delta`).
fn has_text(data: &[u8]) -> bool {
    if memchr::memmem::find(data, b"\"text_delta\"").is_some() {
        return true;
    }
    [&b"\"content\":\""[..], &b"\"text\":\""[..]]
        .iter()
        .any(|key| memchr::memmem::find(data, key).is_some_and(|i| data.get(i + key.len()).is_some_and(|c| *c != b'"')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_of_both_providers() {
        assert_eq!(
            from_json(br#"{"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#),
            Usage { input: Some(3), output: Some(5) }
        );
        assert_eq!(from_json(br#"{"usage":{"input_tokens":4,"output_tokens":6}}"#).total(), Some(10));
        assert_eq!(from_json(br#"{"id":"x"}"#), Usage::default());
    }

    #[test]
    fn stream_usage_across_chunk_boundaries() {
        let openai = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        for split in 1..openai.len() {
            let mut t = SseTracker::default();
            t.feed(&openai.as_bytes()[..split]);
            t.feed(&openai.as_bytes()[split..]);
            assert_eq!(
                (t.usage, t.data_events, t.finished),
                (Usage { input: Some(7), output: Some(2) }, 2, true),
                "split at {split}"
            );
        }
        let anthropic = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\r\n\r\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":12}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut t = SseTracker::default();
        t.feed(anthropic.as_bytes());
        assert_eq!(t.usage, Usage { input: Some(9), output: Some(12) });
        assert!(t.finished);
        let mut cut = SseTracker::default();
        cut.feed(b"data: {\"choices\":[]}\n\n");
        assert!(!cut.finished, "no end marker: a truncated stream");
    }

    #[test]
    fn a_line_without_end_is_not_held_without_bound() {
        let mut t = SseTracker::default();
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..100 {
            t.feed(&chunk);
        }
        assert!(t.partial.len() <= MAX_LINE, "held {} bytes", t.partial.len());
        t.feed(b"\ndata: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n");
        assert_eq!(t.usage.total(), Some(5), "the lines after it are read again");
        assert_eq!(t.data_events, 1, "the overlong line is skipped");
    }
}
