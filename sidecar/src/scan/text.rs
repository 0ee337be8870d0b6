//! Where the text is in a request or a response: every message's content (strings and text
//! parts), system prompts, tool-call arguments, prompts and inputs. Yields mutable slots so
//! scanners read them and redaction writes them back in place.

use bulwark_api::policy::Source;
use serde_json::{Map, Value};

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

/// Every OpenAI tool-call `arguments` of a request's messages or an answer's choices.
fn arguments(api: Api, body: &mut Map<String, Value>) -> Vec<&mut Value> {
    if api != Api::ChatCompletions {
        return vec![];
    }
    let messages: Vec<&mut Value> = if body.contains_key("messages") {
        body.get_mut("messages").and_then(Value::as_array_mut).into_iter().flatten().collect()
    } else {
        let choices = body.get_mut("choices").and_then(Value::as_array_mut).into_iter().flatten();
        choices.filter_map(|c| c.get_mut("message")).collect()
    };
    messages.into_iter().filter_map(|m| m.get_mut("tool_calls")).flat_map(arguments_of).collect()
}

/// OpenAI tool-call arguments are JSON inside a string. For scanning they are parsed, so that
/// every string in them is read with its escapes decoded and a redaction rewrites only string
/// values, keeping the arguments valid JSON of the same shape; `put_back` turns them into
/// strings again, the unchanged ones byte for byte. Arguments that are not JSON stay a string
/// and are read as one text.
#[derive(Debug, Default)]
pub struct ToolArguments(Vec<Option<(String, Value)>>);

impl ToolArguments {
    /// Parses the arguments of a request body (`messages`) or an answer (`choices`) in place.
    pub fn parse(api: Api, body: &mut Map<String, Value>) -> Self {
        let parsed = arguments(api, body).into_iter().map(|slot| {
            let Value::String(raw) = slot else { return None };
            let value = serde_json::from_str::<Value>(raw).ok()?;
            let raw = std::mem::take(raw);
            *slot = value.clone();
            Some((raw, value))
        });
        Self(parsed.collect())
    }

    /// Writes the parsed arguments back as strings.
    pub fn put_back(self, api: Api, body: &mut Map<String, Value>) {
        if self.0.iter().all(Option::is_none) {
            return;
        }
        for (slot, kept) in arguments(api, body).into_iter().zip(self.0) {
            let Some((raw, before)) = kept else { continue };
            *slot = Value::String(if *slot == before { raw } else { slot.to_string() });
        }
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

/// Every string value inside a JSON value (a tool's input): rewriting them in place keeps the
/// JSON valid and of the same shape. Keys are names, not text the model is given.
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
        // Decoded, in key order.
        assert_eq!(got, ["x", "a\u{200b}b", "say \"hi\"", "sk-live", "weather", "{\"cut"]);
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
            ["v"]
        );
        let mut back = v.as_object().unwrap().clone();
        parsed.put_back(Api::ChatCompletions, &mut back);
        assert_eq!(back["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"k\": \"v\"}");
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
