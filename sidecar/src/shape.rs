//! The shape of the fields Bulwark reads in a request body: messages, their content and parts,
//! system prompts, tool calls and tools, prompts and inputs. A wrong type is a 400 that names
//! the field (`messages[2].content`), as the providers answer it, rather than a body forwarded
//! as it came or read past by the scanners. Fields Bulwark does not read, and unknown fields,
//! are not looked at. Parts of a type Bulwark does not know are valid, but cannot be scanned:
//! `unscannable` finds them, for a route whose policy scans the input to refuse.

use serde_json::{Map, Value};

use crate::{error::ProxyError, request::Api};

/// Part types whose text the scanners read, or that are media (images, audio). Files (PDFs)
/// are not among them: their text cannot be read.
const CHAT_PARTS: &[&str] = &["text", "image_url", "input_audio", "refusal"];
const ANTHROPIC_BLOCKS: &[&str] =
    &["text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking"];
/// Anthropic document sources whose text the scanners read.
const TEXT_SOURCES: &[&str] = &["text", "content"];

/// A field of the wrong type, or missing.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    pub path: String,
    pub expected: &'static str,
    /// What was there instead; `None` when the field is missing.
    pub found: Option<&'static str>,
}

impl Invalid {
    pub fn into_error(self) -> ProxyError {
        let message = match self.found {
            Some(found) => format!("`{}` must be {}, not {found}", self.path, self.expected),
            None => format!("`{}` is required: {}", self.path, self.expected),
        };
        ProxyError::bad_request("invalid_field", message).with_param(self.path)
    }
}

type Check = Result<(), Invalid>;

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong(path: &str, expected: &'static str, v: &Value) -> Invalid {
    Invalid { path: path.to_owned(), expected, found: Some(kind(v)) }
}

/// The object at `path`.
fn object<'a>(path: &str, v: &'a Value, expected: &'static str) -> Result<&'a Map<String, Value>, Invalid> {
    v.as_object().ok_or_else(|| wrong(path, expected, v))
}

/// The array at `path`.
fn array<'a>(path: &str, v: &'a Value, expected: &'static str) -> Result<&'a [Value], Invalid> {
    v.as_array().map(Vec::as_slice).ok_or_else(|| wrong(path, expected, v))
}

/// `key` of `obj`, when present and not null, must be a string.
fn opt_string(obj: &Map<String, Value>, path: &str, key: &str) -> Check {
    match obj.get(key) {
        None | Some(Value::Null | Value::String(_)) => Ok(()),
        Some(v) => Err(wrong(&format!("{path}.{key}"), "a string", v)),
    }
}

/// `key` of `obj` must be a string.
fn string(obj: &Map<String, Value>, path: &str, key: &str) -> Check {
    match obj.get(key) {
        Some(Value::String(_)) => Ok(()),
        Some(v) => Err(wrong(&format!("{path}.{key}"), "a string", v)),
        None => Err(Invalid { path: format!("{path}.{key}"), expected: "a string", found: None }),
    }
}

/// `key` of `obj`, when present and not null, must be an object.
fn opt_object(obj: &Map<String, Value>, path: &str, key: &str) -> Check {
    match obj.get(key) {
        None | Some(Value::Null | Value::Object(_)) => Ok(()),
        Some(v) => Err(wrong(&format!("{path}.{key}"), "an object", v)),
    }
}

/// Checks the fields Bulwark reads in a request of `api`.
pub fn check(api: Api, body: &Map<String, Value>) -> Result<(), ProxyError> {
    let checked = match api {
        Api::ChatCompletions => chat(body),
        Api::Messages => anthropic(body),
        Api::Completions => prompt(body, "prompt"),
        Api::Embeddings => prompt(body, "input"),
        Api::Models => Ok(()),
    };
    checked.map_err(Invalid::into_error)
}

fn chat(body: &Map<String, Value>) -> Check {
    if let Some(messages) = body.get("messages") {
        for (i, m) in array("messages", messages, "an array of messages")?.iter().enumerate() {
            let path = format!("messages[{i}]");
            let m = object(&path, m, "a message object")?;
            string(m, &path, "role")?;
            opt_string(m, &path, "name")?;
            opt_string(m, &path, "tool_call_id")?;
            match m.get("content") {
                None | Some(Value::Null | Value::String(_)) => {}
                Some(Value::Array(parts)) => {
                    for (j, p) in parts.iter().enumerate() {
                        part(&format!("{path}.content[{j}]"), p)?;
                    }
                }
                Some(v) => return Err(wrong(&format!("{path}.content"), "a string or an array of content parts", v)),
            }
            if let Some(calls) = m.get("tool_calls").filter(|v| !v.is_null()) {
                for (j, c) in array(&format!("{path}.tool_calls"), calls, "an array of tool calls")?.iter().enumerate()
                {
                    let cpath = format!("{path}.tool_calls[{j}]");
                    let c = object(&cpath, c, "a tool call object")?;
                    let fpath = format!("{cpath}.function");
                    let f = object(&fpath, c.get("function").unwrap_or(&Value::Null), "an object")?;
                    string(f, &fpath, "name")?;
                    opt_string(f, &fpath, "arguments")?;
                }
            }
        }
    }
    if let Some(tools) = body.get("tools").filter(|v| !v.is_null()) {
        for (i, t) in array("tools", tools, "an array of tools")?.iter().enumerate() {
            let path = format!("tools[{i}]");
            let t = object(&path, t, "a tool object")?;
            opt_string(t, &path, "type")?;
            if let Some(f) = t.get("function") {
                let fpath = format!("{path}.function");
                let f = object(&fpath, f, "an object")?;
                string(f, &fpath, "name")?;
                opt_string(f, &fpath, "description")?;
                opt_object(f, &fpath, "parameters")?;
            }
        }
    }
    strings(body, "stop", true)
}

/// A part of an OpenAI message's content.
fn part(path: &str, p: &Value) -> Check {
    let p = object(path, p, "a content part object")?;
    string(p, path, "type")?;
    match p.get("type").and_then(Value::as_str) {
        Some("text") => string(p, path, "text"),
        Some("refusal") => string(p, path, "refusal"),
        _ => opt_string(p, path, "text"),
    }
}

/// `key` of `body`: an array of strings, or also a single string with `or_one`.
fn strings(body: &Map<String, Value>, key: &str, or_one: bool) -> Check {
    let expected = if or_one { "a string or an array of strings" } else { "an array of strings" };
    match body.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(_)) if or_one => Ok(()),
        Some(Value::Array(items)) => match items.iter().enumerate().find(|(_, s)| !s.is_string()) {
            Some((i, v)) => Err(wrong(&format!("{key}[{i}]"), "a string", v)),
            None => Ok(()),
        },
        Some(v) => Err(wrong(key, expected, v)),
    }
}

fn anthropic(body: &Map<String, Value>) -> Check {
    match body.get("system") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(Value::Array(blocks)) => {
            for (i, b) in blocks.iter().enumerate() {
                block(&format!("system[{i}]"), b)?;
            }
        }
        Some(v) => return Err(wrong("system", "a string or an array of content blocks", v)),
    }
    if let Some(messages) = body.get("messages") {
        for (i, m) in array("messages", messages, "an array of messages")?.iter().enumerate() {
            let path = format!("messages[{i}]");
            let m = object(&path, m, "a message object")?;
            string(m, &path, "role")?;
            blocks(&format!("{path}.content"), m.get("content"), true)?;
        }
    }
    if let Some(tools) = body.get("tools").filter(|v| !v.is_null()) {
        for (i, t) in array("tools", tools, "an array of tools")?.iter().enumerate() {
            let path = format!("tools[{i}]");
            let t = object(&path, t, "a tool object")?;
            string(t, &path, "name")?;
            opt_string(t, &path, "description")?;
            opt_object(t, &path, "input_schema")?;
        }
    }
    strings(body, "stop_sequences", false)
}

/// Anthropic content: a string or an array of blocks (required in a message; optional in a
/// `tool_result`).
fn blocks(path: &str, content: Option<&Value>, required: bool) -> Check {
    match content {
        None if required => {
            Err(Invalid { path: path.to_owned(), expected: "a string or an array of content blocks", found: None })
        }
        None | Some(Value::String(_)) => Ok(()),
        Some(Value::Array(items)) => items.iter().enumerate().try_for_each(|(i, b)| block(&format!("{path}[{i}]"), b)),
        Some(v) => Err(wrong(path, "a string or an array of content blocks", v)),
    }
}

/// One Anthropic content block.
fn block(path: &str, b: &Value) -> Check {
    let obj = object(path, b, "a content block object")?;
    string(obj, path, "type")?;
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => string(obj, path, "text"),
        Some("thinking") => string(obj, path, "thinking"),
        Some("tool_use") => {
            string(obj, path, "name")?;
            match obj.get("input") {
                Some(Value::Object(_)) => Ok(()),
                Some(v) => Err(wrong(&format!("{path}.input"), "an object", v)),
                None => Err(Invalid { path: format!("{path}.input"), expected: "an object", found: None }),
            }
        }
        Some("tool_result") => {
            string(obj, path, "tool_use_id")?;
            match obj.get("content") {
                Some(Value::Null) => Ok(()),
                c => blocks(&format!("{path}.content"), c, false),
            }
        }
        Some("image" | "document") => opt_object(obj, path, "source"),
        _ => opt_string(obj, path, "text"),
    }
}

/// A completions `prompt` or an embeddings `input`: a string, or an array of strings, token
/// ids, or arrays of token ids.
fn prompt(body: &Map<String, Value>, key: &str) -> Check {
    let Some(Value::Array(items)) = body.get(key) else { return Ok(()) };
    for (i, item) in items.iter().enumerate() {
        let ok = match item {
            Value::String(_) | Value::Number(_) => true,
            Value::Array(ids) => ids.iter().all(Value::is_number),
            _ => false,
        };
        if !ok {
            return Err(wrong(&format!("{key}[{i}]"), "a string, a token id or an array of token ids", item));
        }
    }
    Ok(())
}

/// The first part (OpenAI) or block (Anthropic) of a type Bulwark does not know, which the
/// scanners cannot read: its path and type.
pub fn unscannable(api: Api, body: &Map<String, Value>) -> Option<(String, String)> {
    let known = match api {
        Api::ChatCompletions => CHAT_PARTS,
        Api::Messages => ANTHROPIC_BLOCKS,
        _ => return None,
    };
    let typed = |path: String, items: &Value, out: &mut Vec<(String, Value)>| {
        for (i, item) in items.as_array().into_iter().flatten().enumerate() {
            out.push((format!("{path}[{i}]"), item.clone()));
        }
    };
    let mut parts = vec![];
    if let Some(system) = body.get("system").filter(|_| api == Api::Messages) {
        typed("system".into(), system, &mut parts);
    }
    for (i, m) in body.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
        typed(format!("messages[{i}].content"), &m["content"], &mut parts);
    }
    while let Some((path, part)) = parts.pop() {
        let t = part["type"].as_str().unwrap_or_default();
        if !known.contains(&t) {
            return Some((path, t.to_owned()));
        }
        match t {
            "tool_result" => typed(format!("{path}.content"), &part["content"], &mut parts),
            "document" => {
                let source = part["source"]["type"].as_str().unwrap_or_default();
                if !TEXT_SOURCES.contains(&source) {
                    return Some((path, format!("document with a {source} source")));
                }
                typed(format!("{path}.source.content"), &part["source"]["content"], &mut parts);
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn message_of(api: Api, body: Value) -> Option<(String, Option<String>)> {
        check(api, body.as_object().unwrap()).err().map(|e| (e.message, e.param))
    }

    #[test]
    fn wrong_types_are_named_by_their_path() {
        let chat = |messages: Value| json!({"model": "m", "messages": messages});
        let cases = [
            (chat(json!([null])), "`messages[0]` must be a message object, not null"),
            (
                chat(json!([{"role": "user", "content": 5}])),
                "`messages[0].content` must be a string or an array of content parts, not a number",
            ),
            (chat(json!([{"content": "hi"}])), "`messages[0].role` is required: a string"),
            (
                chat(
                    json!([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": 7}]}]),
                ),
                "`messages[1].content[0].text` must be a string, not a number",
            ),
            (
                chat(json!([{"role": "user", "content": [{"text": "x"}]}])),
                "`messages[0].content[0].type` is required: a string",
            ),
            (
                chat(json!([{"role": "user", "content": ["x"]}])),
                "`messages[0].content[0]` must be a content part object, not a string",
            ),
            (
                chat(
                    json!([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}]),
                ),
                "`messages[0].tool_calls[0].function.arguments` must be a string, not an object",
            ),
            (
                json!({"model": "m", "messages": [], "tools": {"a": 1}}),
                "`tools` must be an array of tools, not an object",
            ),
            (
                json!({"model": "m", "messages": [], "tools": [{"type": "function", "function": {}}]}),
                "`tools[0].function.name` is required: a string",
            ),
            (json!({"model": "m", "messages": [], "stop": [1]}), "`stop[0]` must be a string, not a number"),
        ];
        for (body, want) in cases {
            let (message, param) = message_of(Api::ChatCompletions, body).unwrap();
            assert_eq!(message, want);
            assert_eq!(param.as_deref(), want.split('`').nth(1), "the param names the field");
        }
        let anthropic = [
            (
                json!({"messages": [{"role": "user"}]}),
                "`messages[0].content` is required: a string or an array of content blocks",
            ),
            (
                json!({"system": 5, "messages": []}),
                "`system` must be a string or an array of content blocks, not a number",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": null}]}]}]}),
                "`messages[0].content[0].content[0].text` must be a string, not null",
            ),
            (
                json!({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}]}),
                "`messages[0].content[0].input` must be an object, not a string",
            ),
            (json!({"messages": [], "tools": [{"input_schema": {}}]}), "`tools[0].name` is required: a string"),
            (
                json!({"messages": [], "stop_sequences": "x"}),
                "`stop_sequences` must be an array of strings, not a string",
            ),
            (json!({"messages": [], "stop_sequences": ["a", 1]}), "`stop_sequences[1]` must be a string, not a number"),
        ];
        for (body, want) in anthropic {
            assert_eq!(message_of(Api::Messages, body).unwrap().0, want);
        }
        let e = message_of(Api::Embeddings, json!({"input": ["a", {"b": 1}]})).unwrap();
        assert_eq!(e.0, "`input[1]` must be a string, a token id or an array of token ids, not an object");
    }

    #[test]
    fn valid_requests_and_unknown_fields_pass() {
        let chat = json!({"model": "m", "x_vendor": {"any": [1]}, "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "t"}, {"type": "image_url", "image_url": {"url": "u"}}], "x": null},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "r"}
        ], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "stop": ["\n"]});
        assert_eq!(message_of(Api::ChatCompletions, chat), None);
        let anthropic = json!({"system": [{"type": "text", "text": "s"}], "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"q": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}, {"type": "future_kind", "data": 1}]}
        ]});
        assert_eq!(message_of(Api::Messages, anthropic), None);
        assert_eq!(message_of(Api::Completions, json!({"prompt": ["a", 1, [1, 2]]})), None);
    }

    #[test]
    fn parts_of_unknown_types_are_found() {
        let chat = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "t"}, {"type": "input_text", "input_text": "secret"}]}]});
        assert_eq!(
            unscannable(Api::ChatCompletions, chat.as_object().unwrap()),
            Some(("messages[0].content[1]".into(), "input_text".into()))
        );
        let nested = json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "new_block"}]}]}]});
        assert_eq!(
            unscannable(Api::Messages, nested.as_object().unwrap()),
            Some(("messages[0].content[0].content[0]".into(), "new_block".into()))
        );
        let pdf = json!({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "base64", "data": "JVBE"}}]}]});
        assert_eq!(
            unscannable(Api::Messages, pdf.as_object().unwrap()),
            Some(("messages[0].content[0]".into(), "document with a base64 source".into()))
        );
        let file =
            json!({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "JVBE"}}]}]});
        assert_eq!(unscannable(Api::ChatCompletions, file.as_object().unwrap()).unwrap().1, "file");
        let plain = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(unscannable(Api::Messages, plain.as_object().unwrap()), None);
    }
}
