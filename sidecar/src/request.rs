//! Reads and checks a client request: API by path, body size and time limits, UTF-8, JSON,
//! the fields every API needs. Produces an `LlmRequest`; knows nothing of routes or backends.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use serde_json::{Map, Value};

use crate::{
    error::{Flavor, ProxyError},
    shape::kind,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    ChatCompletions,
    Completions,
    Embeddings,
    Models,
    Messages,
}

impl Api {
    pub fn from_path(path: &str) -> Option<Self> {
        Some(match path.trim_end_matches('/') {
            "/v1/chat/completions" => Self::ChatCompletions,
            "/v1/completions" => Self::Completions,
            "/v1/embeddings" => Self::Embeddings,
            "/v1/models" => Self::Models,
            "/v1/messages" => Self::Messages,
            _ => return None,
        })
    }

    /// The path below the provider's base URL (which ends in `/v1`).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
            Self::Models => "/models",
            Self::Messages => "/messages",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Models => "/v1/models",
            Self::Messages => "/v1/messages",
        }
    }

    pub fn flavor(self) -> Flavor {
        if self == Self::Messages { Flavor::Anthropic } else { Flavor::OpenAi }
    }
}

pub fn flavor_of_path(path: &str) -> Flavor {
    Api::from_path(path).map_or(Flavor::OpenAi, Api::flavor)
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Time allowed to receive the whole request body (slow clients).
    pub body_timeout: Duration,
    /// Time allowed to receive a request's headers (slowloris).
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            body_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// A parsed LLM API request.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    pub api: Api,
    pub headers: HeaderMap,
    pub model: String,
    pub stream: bool,
    /// The JSON body as sent (an empty object for `GET /v1/models`).
    pub body: Map<String, Value>,
    pub raw: Bytes,
}

impl LlmRequest {
    /// Characters of prompt text, for estimates before the upstream reports usage.
    pub fn prompt_chars(&self) -> usize {
        fn walk(v: &Value) -> usize {
            match v {
                Value::String(s) => s.len(),
                Value::Array(a) => a.iter().map(walk).sum(),
                Value::Object(o) => o.iter().filter(|(k, _)| *k != "role" && *k != "type").map(|(_, v)| walk(v)).sum(),
                _ => 0,
            }
        }
        ["messages", "prompt", "input", "system", "tools"].iter().filter_map(|k| self.body.get(*k)).map(walk).sum()
    }

    /// Output tokens the client allows, if it says.
    pub fn max_output_tokens(&self) -> Option<u64> {
        ["max_completion_tokens", "max_tokens"].iter().find_map(|k| self.body.get(*k).and_then(Value::as_u64))
    }
}

pub async fn read<B>(
    method: &Method,
    path: &str,
    headers: HeaderMap,
    body: B,
    limits: &Limits,
) -> Result<LlmRequest, ProxyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let api = Api::from_path(path).ok_or_else(|| {
        ProxyError::new(
            StatusCode::NOT_FOUND,
            "unknown_path",
            format!("unknown path {path}; this proxy serves /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models and /v1/messages"),
        )
    })?;
    let allowed = if api == Api::Models { Method::GET } else { Method::POST };
    if method != allowed {
        return Err(ProxyError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{path} takes {allowed}, not {method}"),
        ));
    }
    if api == Api::Models {
        return Ok(LlmRequest {
            api,
            headers,
            model: String::new(),
            stream: false,
            body: Map::new(),
            raw: Bytes::new(),
        });
    }
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        && len > limits.max_body_bytes
    {
        return Err(too_large(limits));
    }
    let collected = tokio::time::timeout(limits.body_timeout, Limited::new(body, limits.max_body_bytes).collect())
        .await
        .map_err(|_| {
            ProxyError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_body_timeout",
                format!("the request body did not arrive within {}s", limits.body_timeout.as_secs()),
            )
        })?;
    let raw = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large(limits)),
        Err(e) => {
            return Err(ProxyError::bad_request("request_body_error", format!("could not read the request body: {e}")));
        }
    };
    let text = std::str::from_utf8(&raw).map_err(|e| {
        ProxyError::bad_request(
            "invalid_utf8",
            format!("the request body is not valid UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    if text.trim().is_empty() {
        return Err(ProxyError::bad_request("empty_body", "the request body is empty; send a JSON object"));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProxyError::bad_request("invalid_json", format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(body) = value else {
        return Err(ProxyError::bad_request("invalid_json", "the request body must be a JSON object"));
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None => {
            return Err(ProxyError::bad_request("missing_model", "`model` is required: name the model to call"));
        }
        Some(other) => {
            return Err(ProxyError::bad_request(
                "invalid_model",
                format!("`model` must be a string, not {}", kind(other)),
            ));
        }
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ProxyError::bad_request(
                "invalid_stream",
                format!("`stream` must be a boolean, not {}", kind(other)),
            ));
        }
    };
    if api == Api::Embeddings && stream {
        return Err(ProxyError::bad_request("invalid_stream", "embeddings cannot be streamed"));
    }
    let required = match api {
        Api::ChatCompletions | Api::Messages => Some(("messages", "an array")),
        Api::Completions => Some(("prompt", "a string or an array")),
        Api::Embeddings => Some(("input", "a string or an array")),
        Api::Models => None,
    };
    if let Some((field, what)) = required {
        match body.get(field) {
            None => return Err(ProxyError::bad_request("missing_field", format!("`{field}` is required"))),
            Some(Value::Array(_)) => {}
            Some(Value::String(_)) if field != "messages" => {}
            Some(other) => {
                return Err(ProxyError::bad_request(
                    "invalid_field",
                    format!("`{field}` must be {what}, not {}", kind(other)),
                ));
            }
        }
    }
    crate::shape::check(api, &body)?;
    for field in ["max_tokens", "max_completion_tokens"] {
        if let Some(v) = body.get(field)
            && !v.is_null()
            && v.as_u64().is_none()
        {
            return Err(ProxyError::bad_request("invalid_field", format!("`{field}` must be a non-negative integer")));
        }
    }
    Ok(LlmRequest { api, headers, model, stream, body, raw })
}

fn too_large(limits: &Limits) -> ProxyError {
    ProxyError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!("the request body is larger than the {} byte limit", limits.max_body_bytes),
    )
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;

    use super::*;

    async fn parse(path: &str, body: &'static [u8]) -> Result<LlmRequest, ProxyError> {
        read(&Method::POST, path, HeaderMap::new(), Full::new(Bytes::from_static(body)), &Limits::default()).await
    }

    #[tokio::test]
    async fn bad_requests_get_precise_errors() {
        let cases: &[(&[u8], &str, &str)] = &[
            (
                b"{",
                "invalid_json",
                "the request body is not valid JSON: EOF while parsing an object at line 1 column 1",
            ),
            (b"[1]", "invalid_json", "the request body must be a JSON object"),
            (b"", "empty_body", "the request body is empty; send a JSON object"),
            (b"{\"messages\":[]}", "missing_model", "`model` is required: name the model to call"),
            (b"{\"model\":7,\"messages\":[]}", "invalid_model", "`model` must be a string, not a number"),
            (
                b"{\"model\":\"m\",\"messages\":[],\"stream\":\"yes\"}",
                "invalid_stream",
                "`stream` must be a boolean, not a string",
            ),
            (b"{\"model\":\"m\"}", "missing_field", "`messages` is required"),
            (b"{\"model\":\"m\",\"messages\":\"hi\"}", "invalid_field", "`messages` must be an array, not a string"),
            (
                b"{\"model\":\"m\",\"messages\":[],\"max_tokens\":-1}",
                "invalid_field",
                "`max_tokens` must be a non-negative integer",
            ),
            (
                b"{\"model\":\"m\",\"messages\":[\"\xff\"]}",
                "invalid_utf8",
                "the request body is not valid UTF-8 (at byte 26)",
            ),
        ];
        for (body, code, message) in cases {
            let e = parse("/v1/chat/completions", body).await.unwrap_err();
            assert_eq!((e.status.as_u16(), e.code, e.message.as_str()), (400, *code, *message));
        }
    }

    #[tokio::test]
    async fn limits_and_paths() {
        let small = Limits { max_body_bytes: 8, ..Limits::default() };
        let e = read(
            &Method::POST,
            "/v1/chat/completions",
            HeaderMap::new(),
            Full::new(Bytes::from_static(b"{\"model\":\"abc\"}")),
            &small,
        )
        .await
        .unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (413, "request_too_large"));
        let e = parse("/v2/chat", b"{}").await.unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (404, "unknown_path"));
        let e =
            read(&Method::GET, "/v1/chat/completions", HeaderMap::new(), Full::new(Bytes::new()), &Limits::default())
                .await
                .unwrap_err();
        assert_eq!((e.status.as_u16(), e.message.as_str()), (405, "/v1/chat/completions takes POST, not GET"));
    }

    #[tokio::test]
    async fn a_good_request_keeps_its_fields() {
        let r = parse("/v1/messages", b"{\"model\":\"claude\",\"stream\":true,\"max_tokens\":64,\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}],\"x_extra\":1}")
            .await
            .unwrap();
        assert_eq!((r.api, r.model.as_str(), r.stream), (Api::Messages, "claude", true));
        assert_eq!(r.prompt_chars(), 5);
        assert_eq!(r.max_output_tokens(), Some(64));
        assert_eq!(r.body["x_extra"], 1, "unknown fields pass through");
    }
}
