//! Where the text is in a request or a response: every message's content (strings and text
//! parts), system prompts, tool-call arguments, prompts and inputs. Yields mutable slots so
//! scanners read them and redaction writes them back in place.

use bulwark_api::policy::Source;
use serde_json::{Map, Value};

use super::partial_json::{self, PartialJson, Piece};
use crate::request::Api;

/// Text slots and where each comes from.
type Slots<'a> = Vec<(Source, &'a mut String)>;

/// Text slots of a request body, in document order.
pub fn request_texts(api: Api, body: &mut Map<String, Value>) -> Vec<&mut String> {
    request_slots(api, body).into_iter().map(|(_, t)| t).collect()
}

/// Text slots of a request body, in document order, with where each comes from.
pub fn request_slots(api: Api, body: &mut Map<String, Value>) -> Slots<'_> {
    let mut out = vec![];
    for (key, value) in body.iter_mut() {
        match (api, key.as_str()) {
            (Api::ChatCompletions | Api::Messages, "messages") => {
                for m in value.as_array_mut().into_iter().flatten() {
                    message(m, &mut out);
                }
            }
            (Api::Messages, "system") => content(Source::System, value, &mut out),
            (Api::Completions, "prompt") | (Api::Embeddings, "input") => strings(value, &mut out),
            _ => {}
        }
    }
    out
}

/// Text slots of a complete (non-streamed) response body.
pub fn response_texts(api: Api, body: &mut Value) -> Vec<&mut String> {
    let mut out = vec![];
    match api {
        Api::Messages => {
            if let Some(blocks) = body.get_mut("content") {
                content(Source::Assistant, blocks, &mut out);
            }
        }
        Api::ChatCompletions | Api::Completions => {
            for choice in body.get_mut("choices").and_then(Value::as_array_mut).into_iter().flatten() {
                let Some(obj) = choice.as_object_mut() else { continue };
                for (key, value) in obj.iter_mut() {
                    match (key.as_str(), value) {
                        ("message", m) => message(m, &mut out),
                        ("text", Value::String(s)) => out.push((Source::Assistant, s)),
                        _ => {}
                    }
                }
            }
        }
        Api::Embeddings | Api::Models => {}
    }
    out.into_iter().map(|(_, t)| t).collect()
}

/// Where a message's text comes from, by its role (an answer's message is the assistant's).
fn source_of(role: Option<&str>) -> Source {
    match role {
        Some("system" | "developer") => Source::System,
        Some("assistant") | None => Source::Assistant,
        Some("tool" | "function") => Source::Tool,
        Some(_) => Source::User,
    }
}

fn message<'a>(m: &'a mut Value, out: &mut Slots<'a>) {
    let Some(obj) = m.as_object_mut() else { return };
    let source = source_of(obj.get("role").and_then(Value::as_str));
    for (key, value) in obj.iter_mut() {
        match key.as_str() {
            "content" => content(source, value, out),
            // Parsed by `ToolArguments` to what they hold; arguments that are not JSON stay a string.
            "tool_calls" => arguments_of(value).into_iter().for_each(|args| leaves(source, args, out)),
            _ => {}
        }
    }
}

/// The `function.arguments` of a message's `tool_calls`, in order.
fn arguments_of(tool_calls: &mut Value) -> Vec<&mut Value> {
    let calls = tool_calls.as_array_mut().into_iter().flatten();
    calls.filter_map(|call| call.get_mut("function")?.get_mut("arguments")).collect()
}

/// Every tool value of a request's messages or an answer: OpenAI tool-call `arguments` (JSON in
/// a string) and Anthropic `input`s of content blocks.
fn arguments(api: Api, body: &mut Map<String, Value>) -> Vec<&mut Value> {
    match api {
        Api::ChatCompletions => {
            let messages: Vec<&mut Value> = if body.contains_key("messages") {
                body.get_mut("messages").and_then(Value::as_array_mut).into_iter().flatten().collect()
            } else {
                let choices = body.get_mut("choices").and_then(Value::as_array_mut).into_iter().flatten();
                choices.filter_map(|c| c.get_mut("message")).collect()
            };
            messages.into_iter().filter_map(|m| m.get_mut("tool_calls")).flat_map(arguments_of).collect()
        }
        Api::Messages => {
            let blocks: Vec<&mut Value> = if body.contains_key("messages") {
                let messages = body.get_mut("messages").and_then(Value::as_array_mut).into_iter().flatten();
                messages.filter_map(|m| m.get_mut("content")?.as_array_mut()).flatten().collect()
            } else {
                body.get_mut("content").and_then(Value::as_array_mut).into_iter().flatten().collect()
            };
            blocks.into_iter().filter_map(|b| b.get_mut("input")).collect()
        }
        Api::Completions | Api::Embeddings | Api::Models => vec![],
    }
}

/// Tool values, read for scanning as every text in them: OpenAI arguments are parsed from their
/// string (escapes decoded), and keys and numbers are read like string values. For that each
/// value is put in its scan form while the scanners run (objects as `[key, value]` pairs, numbers
/// as their text); `put_back` restores it, so that a redaction rewrites only what it matched:
/// a key is renamed, a number becomes a string, and the value stays valid JSON of the same
/// structure. OpenAI arguments go back to strings, the unchanged ones byte for byte. Ones that
/// serde does not take (cut off by a token limit, `NaN`, a lone surrogate) are read in pieces
/// as streamed arguments are, so their strings are scanned decoded too.
#[derive(Debug, Default)]
pub struct ToolArguments(Vec<Option<Kept>>);

#[derive(Debug)]
enum Kept {
    /// JSON: the arguments' string as it came (OpenAI), or none for a value in place (Anthropic).
    Json { raw: Option<String>, original: Value },
    /// An arguments string that is not JSON, as its pieces; the scan form holds the text of each
    /// key, string and number among them, in order.
    Loose { raw: String, pieces: Vec<Piece> },
}

impl ToolArguments {
    /// Puts the tool values of a request body (`messages`) or an answer in their scan form.
    pub fn parse(api: Api, body: &mut Map<String, Value>) -> Self {
        let parsed = arguments(api, body).into_iter().map(|slot| {
            let kept = match &mut *slot {
                Value::String(raw) => match serde_json::from_str::<Value>(raw) {
                    Ok(original) => Kept::Json { raw: Some(std::mem::take(raw)), original },
                    Err(_) => Kept::Loose { pieces: loose_pieces(raw)?, raw: std::mem::take(raw) },
                },
                other => Kept::Json { raw: None, original: std::mem::take(other) },
            };
            *slot = match &kept {
                Kept::Json { original, .. } => scan_form(original),
                Kept::Loose { pieces, .. } => {
                    Value::Array(pieces.iter().filter_map(piece_text).map(|t| Value::String(t.to_owned())).collect())
                }
            };
            Some(kept)
        });
        Self(parsed.collect())
    }

    /// Restores the tool values from their scan form.
    pub fn put_back(self, api: Api, body: &mut Map<String, Value>) {
        if self.0.iter().all(Option::is_none) {
            return;
        }
        for (slot, kept) in arguments(api, body).into_iter().zip(self.0) {
            *slot = match kept {
                None => continue,
                Some(Kept::Loose { raw, pieces }) => Value::String(from_pieces(std::mem::take(slot), &pieces, raw)),
                Some(Kept::Json { raw, original }) => {
                    let restored = from_scan_form(std::mem::take(slot), &original);
                    match raw {
                        Some(raw) if restored == original => Value::String(raw),
                        Some(_) => Value::String(restored.to_string()),
                        None => restored,
                    }
                }
            };
        }
    }
}

/// Arguments that are not JSON, read as streamed arguments are: their structure as it came, and
/// each key, string and number decoded. None when they cannot be put back whole that way (a key
/// or number too long to hold): then they are read as one text.
fn loose_pieces(raw: &str) -> Option<Vec<Piece>> {
    let mut reader = PartialJson::default();
    let mut pieces = reader.feed(raw);
    pieces.extend(reader.cut());
    if reader.overflowed() {
        return None;
    }
    // An escape cut off at the very end stays as it came.
    pieces.push(Piece::Raw(reader.take_pending()));
    Some(pieces)
}

/// The text a piece gives the scanners, if any.
fn piece_text(piece: &Piece) -> Option<&str> {
    match piece {
        Piece::Text(t) | Piece::Key(t, _) | Piece::Number(t) => Some(t),
        Piece::Raw(_) | Piece::End => None,
    }
}

/// Loose arguments as the scanners left their texts: as they came when none changed, else
/// written again from their pieces (texts encoded, a rewritten number as a string).
fn from_pieces(scanned: Value, pieces: &[Piece], raw: String) -> String {
    let Value::Array(texts) = scanned else { return raw };
    let texts: Vec<&str> = texts.iter().map(|t| t.as_str().unwrap_or_default()).collect();
    let was: Vec<&str> = pieces.iter().filter_map(piece_text).collect();
    if texts == was {
        return raw;
    }
    let mut out = String::with_capacity(raw.len());
    let mut texts = texts.into_iter();
    let mut written = partial_json::Written::default();
    for piece in pieces {
        match piece {
            Piece::Raw(r) => out.push_str(r),
            Piece::End => {}
            Piece::Text(_) => out.push_str(&partial_json::encode(texts.next().unwrap_or_default())),
            Piece::Key(was, object) => {
                let key = texts.next().unwrap_or_default();
                out.push_str(&partial_json::encode(&written.name(*object, key.to_owned(), key != was)));
            }
            Piece::Number(n) => out.push_str(&partial_json::number(n, texts.next().unwrap_or_default())),
        }
    }
    out
}

/// A JSON value with its keys and numbers as strings the scanners can rewrite.
fn scan_form(v: &Value) -> Value {
    match v {
        Value::Number(n) => Value::String(n.to_string()),
        Value::Object(fields) => Value::Array(
            fields.iter().map(|(k, v)| Value::Array(vec![Value::String(k.clone()), scan_form(v)])).collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(scan_form).collect()),
        other => other.clone(),
    }
}

/// The value `scan_form` made from `original`, as the scanners left it: an unchanged number is
/// a number again, and a key the scanners rewrote names its value (made unique among its
/// object's keys, so no value is lost).
fn from_scan_form(scanned: Value, original: &Value) -> Value {
    match (scanned, original) {
        (Value::String(s), Value::Number(n)) if s == n.to_string() => Value::Number(n.clone()),
        (Value::Array(pairs), Value::Object(fields)) => {
            let mut kept = Map::new();
            let mut renamed = vec![];
            for (pair, (was, value)) in pairs.into_iter().zip(fields) {
                let Value::Array(mut kv) = pair else { continue };
                let (Some(v), Some(Value::String(key))) = (kv.pop(), kv.pop()) else { continue };
                let v = from_scan_form(v, value);
                if key == *was {
                    kept.insert(key, v);
                } else {
                    renamed.push((key, v));
                }
            }
            // Keys left as they were keep their names; a rewritten one takes the next free name.
            for (key, v) in renamed {
                let (mut unique, mut n) = (key.clone(), 1);
                while kept.contains_key(&unique) {
                    n += 1;
                    unique = format!("{key} ({n})");
                }
                kept.insert(unique, v);
            }
            Value::Object(kept)
        }
        (Value::Array(items), Value::Array(was)) => {
            Value::Array(items.into_iter().zip(was).map(|(item, was)| from_scan_form(item, was)).collect())
        }
        (scanned, _) => scanned,
    }
}

/// A content field: a string, or an array of parts (`{type: text, text}`, refusals, thinking,
/// Anthropic `tool_result` blocks with nested content, `tool_use` inputs, text documents).
fn content<'a>(source: Source, v: &'a mut Value, out: &mut Slots<'a>) {
    match v {
        Value::String(s) => out.push((source, s)),
        Value::Array(parts) => {
            for part in parts {
                let Some(obj) = part.as_object_mut() else { continue };
                // What a tool returned, or a document, came from elsewhere than the message's author.
                let source = match obj.get("type").and_then(Value::as_str) {
                    Some("tool_result") => Source::Tool,
                    Some("document" | "search_result") => Source::Document,
                    _ => source,
                };
                for (key, value) in obj.iter_mut() {
                    match (key.as_str(), value) {
                        ("text" | "refusal" | "thinking", Value::String(s)) => out.push((source, s)),
                        ("content", nested) => content(source, nested, out),
                        ("input", input) => leaves(source, input, out),
                        ("source", Value::Object(src)) => document(src, out),
                        _ => {}
                    }
                }
            }
        }
        _ => {}
    }
}

/// An Anthropic document's source: plain text, or content blocks (a PDF or a URL is not text).
fn document<'a>(src: &'a mut serde_json::Map<String, Value>, out: &mut Slots<'a>) {
    let kind = src.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
    for (key, value) in src.iter_mut() {
        match (kind.as_str(), key.as_str(), value) {
            ("text", "data", Value::String(s)) => out.push((Source::Document, s)),
            ("content", "content", nested) => content(Source::Document, nested, out),
            _ => {}
        }
    }
}

/// Every string inside a JSON value (a tool's input; in its `ToolArguments` scan form, keys and
/// numbers too): rewriting them in place keeps the JSON valid.
fn leaves<'a>(source: Source, v: &'a mut Value, out: &mut Slots<'a>) {
    match v {
        Value::String(s) => out.push((source, s)),
        Value::Array(items) => items.iter_mut().for_each(|item| leaves(source, item, out)),
        Value::Object(fields) => fields.values_mut().for_each(|value| leaves(source, value, out)),
        _ => {}
    }
}

fn strings<'a>(v: &'a mut Value, out: &mut Slots<'a>) {
    match v {
        Value::String(s) => out.push((Source::User, s)),
        Value::Array(items) => {
            for item in items {
                if let Value::String(s) = item {
                    out.push((Source::User, s));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn finds_every_text_of_a_chat_request() {
        let mut body = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": [{"type": "text", "text": "part"}, {"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\":1}"}}]}
            ]
        });
        let texts = request_texts(Api::ChatCompletions, body.as_object_mut().unwrap());
        let got: Vec<String> = texts.into_iter().map(|s| s.clone()).collect();
        assert_eq!(got, ["sys", "part", "{\"a\":1}"], "arguments not parsed are one text");
    }

    #[test]
    fn arguments_serde_refuses_are_still_read_decoded_and_put_back_as_they_came() {
        let nan = r#"{"k": "\u0041KIAIOSFODNN7EXAMPLE", "x": NaN, "card": 4111111111111111}"#;
        let surrogate = r#"{"a": "\udc00", "b": "keep"}"#;
        let cut = r#"{"q": "weath\u00"#;
        let mut body = json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": nan}},
            {"id": "2", "type": "function", "function": {"name": "g", "arguments": surrogate}},
            {"id": "3", "type": "function", "function": {"name": "h", "arguments": cut}}
        ]}]});
        let body = body.as_object_mut().unwrap();
        let parsed = ToolArguments::parse(Api::ChatCompletions, body);
        let mut got = vec![];
        for s in request_texts(Api::ChatCompletions, body) {
            got.push(s.clone());
            if s.starts_with("AKIA") || s.starts_with("4111") {
                *s = "[REDACTED]".into();
            }
        }
        let want =
            ["k", "AKIAIOSFODNN7EXAMPLE", "x", "card", "4111111111111111", "a", "\u{FFFD}", "b", "keep", "q", "weath"];
        assert_eq!(got, want, "escapes decoded, keys and numbers read; `NaN` is structure");
        parsed.put_back(Api::ChatCompletions, body);
        let calls = &body["messages"][0]["tool_calls"];
        assert_eq!(
            calls[0]["function"]["arguments"], r#"{"k": "[REDACTED]", "x": NaN, "card": "[REDACTED]"}"#,
            "written again from its pieces"
        );
        assert_eq!(calls[1]["function"]["arguments"], surrogate, "unchanged: the bytes as they came");
        assert_eq!(calls[2]["function"]["arguments"], cut, "a cut escape too");
    }

    #[test]
    fn tool_arguments_are_read_decoded_and_written_back_as_valid_json_of_the_same_shape() {
        let args = r#"{"token": "sk\u002dlive", "note": "a\u200bb", "list": ["x", 2], "quote": "say \"hi\""}"#;
        let untouched = r#"{ "q" : "weather"  }"#;
        let mut body = json!({"messages": [
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": args}},
                {"id": "2", "type": "function", "function": {"name": "g", "arguments": untouched}},
                {"id": "3", "type": "function", "function": {"name": "h", "arguments": "{\"cut"}}
            ]}
        ]});
        let body = body.as_object_mut().unwrap();
        let parsed = ToolArguments::parse(Api::ChatCompletions, body);
        let mut got = vec![];
        for s in request_texts(Api::ChatCompletions, body) {
            got.push(s.clone());
            if s.starts_with("sk-") || s.contains('\u{200b}') {
                *s = "[REDACTED]".into();
            }
        }
        // Decoded, keys and numbers too, in key order.
        let want = ["list", "x", "2", "note", "a\u{200b}b", "quote", "say \"hi\"", "token", "sk-live", "q", "weather"];
        assert_eq!(got, [&want[..], &["cut"]].concat(), "arguments cut off are read in pieces too");
        parsed.put_back(Api::ChatCompletions, body);
        let calls = &body["messages"][0]["tool_calls"];
        let redacted: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(
            redacted,
            json!({"token": "[REDACTED]", "note": "[REDACTED]", "list": ["x", 2], "quote": "say \"hi\""})
        );
        assert_eq!(calls[1]["function"]["arguments"], untouched, "unchanged arguments keep their bytes");
        assert_eq!(calls[2]["function"]["arguments"], "{\"cut", "arguments that are not JSON stay as they came");

        let mut answer = json!({"choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"k\": \"v\"}"}}]}}]});
        let answer = answer.as_object_mut().unwrap();
        let parsed = ToolArguments::parse(Api::ChatCompletions, answer);
        let mut v = Value::Object(std::mem::take(answer));
        assert_eq!(
            response_texts(Api::ChatCompletions, &mut v).into_iter().map(|s| s.clone()).collect::<Vec<_>>(),
            ["k", "v"]
        );
        let mut back = v.as_object().unwrap().clone();
        parsed.put_back(Api::ChatCompletions, &mut back);
        assert_eq!(back["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"k\": \"v\"}");
    }

    #[test]
    fn keys_and_numbers_of_tool_values_are_read_and_a_redaction_keeps_the_rest() {
        let card = "4111111111111111";
        let args =
            format!(r#"{{"amount": 12.5, "card": {card}, "AKIAIOSFODNN7EXAMPLE": "id", "AKIAIOSFODNN7EXAMPL2": 1}}"#);
        let redact = |body: &mut Map<String, Value>, api| {
            let mut got = vec![];
            for s in request_texts(api, body) {
                got.push(s.clone());
                if s.starts_with("AKIA") || s == card {
                    *s = "[REDACTED]".into();
                }
            }
            got
        };
        let mut chat = json!({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "pay", "arguments": args}}]}]});
        let chat = chat.as_object_mut().unwrap();
        let parsed = ToolArguments::parse(Api::ChatCompletions, chat);
        let got = redact(chat, Api::ChatCompletions);
        assert!(got.contains(&card.to_owned()) && got.contains(&"AKIAIOSFODNN7EXAMPLE".to_owned()), "{got:?}");
        parsed.put_back(Api::ChatCompletions, chat);
        let back: Value =
            serde_json::from_str(chat["messages"][0]["tool_calls"][0]["function"]["arguments"].as_str().unwrap())
                .unwrap();
        assert_eq!(
            back,
            json!({"amount": 12.5, "card": "[REDACTED]", "[REDACTED]": 1, "[REDACTED] (2)": "id"}),
            "a number redacted is a string; two keys redacted alike both keep their values"
        );
        let mut clash = json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
            "function": {"name": "f", "arguments": r#"{"AKIAIOSFODNN7EXAMPLE": 1, "[REDACTED]": 2}"#}}]}]});
        let clash = clash.as_object_mut().unwrap();
        let parsed = ToolArguments::parse(Api::ChatCompletions, clash);
        redact(clash, Api::ChatCompletions);
        parsed.put_back(Api::ChatCompletions, clash);
        let back: Value =
            serde_json::from_str(clash["messages"][0]["tool_calls"][0]["function"]["arguments"].as_str().unwrap())
                .unwrap();
        assert_eq!(back, json!({"[REDACTED]": 2, "[REDACTED] (2)": 1}), "a key left as it was keeps its name");

        let mut msgs = json!({"messages": [{"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "pay", "input": {"card": 4111111111111111u64, "n": 3, "note": "x"}}]}]});
        let before = msgs.clone();
        let body = msgs.as_object_mut().unwrap();
        let parsed = ToolArguments::parse(Api::Messages, body);
        assert_eq!(redact(body, Api::Messages), ["card", card, "n", "3", "note", "x"]);
        parsed.put_back(Api::Messages, body);
        assert_eq!(msgs["messages"][0]["content"][0]["input"], json!({"card": "[REDACTED]", "n": 3, "note": "x"}));
        let mut same = before.clone();
        let body = same.as_object_mut().unwrap();
        ToolArguments::parse(Api::Messages, body).put_back(Api::Messages, body);
        assert_eq!(same, before, "what no scanner changed comes back as it was");
    }

    #[test]
    fn anthropic_system_and_tool_results_and_write_back() {
        let mut body = json!({
            "system": [{"type": "text", "text": "be nice"}],
            "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "result"}]}]}]
        });
        for s in request_texts(Api::Messages, body.as_object_mut().unwrap()) {
            *s = s.to_uppercase();
        }
        assert_eq!(body["system"][0]["text"], "BE NICE");
        assert_eq!(body["messages"][0]["content"][0]["content"][0]["text"], "RESULT");
    }

    #[test]
    fn tool_use_inputs_are_read_to_every_string_and_written_back_in_shape() {
        let mut body = json!({"messages": [{"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "deploy",
             "input": {"token": "sk-1", "env": {"keys": ["a", 7, null, {"deep": "b"}]}, "n": 3, "ok": true}}
        ]}]});
        let mut got = vec![];
        for s in request_texts(Api::Messages, body.as_object_mut().unwrap()) {
            got.push(s.clone());
            *s = "[REDACTED]".into();
        }
        got.sort();
        assert_eq!(got, ["a", "b", "sk-1"]);
        assert_eq!(
            body["messages"][0]["content"][0]["input"],
            json!({"token": "[REDACTED]", "env": {"keys": ["[REDACTED]", 7, null, {"deep": "[REDACTED]"}]}, "n": 3, "ok": true})
        );
        let mut answer = json!({"content": [{"type": "tool_use", "id": "t2", "name": "f", "input": {"q": "x"}}]});
        assert_eq!(response_texts(Api::Messages, &mut answer).len(), 1, "a tool call the model makes is output");
    }

    #[test]
    fn each_text_is_known_by_where_it_comes_from() {
        use Source::*;
        let mut chat = json!({"messages": [
            {"role": "developer", "content": "dev"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "ok", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "1", "content": "result"}
        ]});
        let got: Vec<_> = request_slots(Api::ChatCompletions, chat.as_object_mut().unwrap())
            .into_iter()
            .map(|(s, t)| (s, t.clone()))
            .collect();
        let want = [(System, "dev"), (User, "hi"), (Assistant, "ok"), (Assistant, "{}"), (Tool, "result")];
        assert_eq!(got, want.map(|(s, t)| (s, t.to_owned())));
        let mut msgs = json!({"system": "sys", "messages": [
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "tool says"}]},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}},
                {"type": "search_result", "source": "https://x", "title": "t", "content": [{"type": "text", "text": "found"}]},
                {"type": "text", "text": "question"}
            ]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"q": "call"}}]}
        ]});
        let got: Vec<_> = request_slots(Api::Messages, msgs.as_object_mut().unwrap())
            .into_iter()
            .map(|(s, t)| (s, t.clone()))
            .collect();
        let want = [
            (User, "question"),
            (Tool, "tool says"),
            (Document, "doc"),
            (Document, "found"),
            (Assistant, "call"),
            (System, "sys"),
        ];
        let mut got_sorted = got.clone();
        got_sorted.sort_by(|a, b| a.1.cmp(&b.1));
        let mut want_sorted: Vec<_> = want.map(|(s, t)| (s, t.to_owned())).into();
        want_sorted.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(got_sorted, want_sorted);
    }

    #[test]
    fn refusals_thinking_and_text_documents_are_read() {
        let mut body = json!({"messages": [{"role": "user", "content": [
            {"type": "refusal", "refusal": "no"},
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}},
            {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "inner"}]}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}
        ]}]});
        let got: Vec<String> =
            request_texts(Api::Messages, body.as_object_mut().unwrap()).into_iter().map(|s| s.clone()).collect();
        assert_eq!(got, ["no", "hmm", "doc", "inner"]);
    }

    #[test]
    fn response_texts_of_each_api() {
        let mut chat = json!({"choices": [{"message": {"role": "assistant", "content": "hi"}}]});
        assert_eq!(response_texts(Api::ChatCompletions, &mut chat).len(), 1);
        let mut msg = json!({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]});
        assert_eq!(response_texts(Api::Messages, &mut msg).len(), 2);
        let mut comp = json!({"choices": [{"text": "t"}]});
        assert_eq!(response_texts(Api::Completions, &mut comp).len(), 1);
    }
}
