//! Every failure of the request path becomes one `ProxyError`, turned into a response in one
//! place, in the error shape of the API the client called (OpenAI or Anthropic).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

/// The wire format a client speaks, chosen by the path it called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError {
    pub status: StatusCode,
    /// Low-cardinality code: the `code` field and the metric label.
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// The request field at fault (OpenAI's `param`), e.g. `messages[2].content`.
    pub param: Option<String>,
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status.as_u16(), self.code, self.message)
    }
}

impl std::error::Error for ProxyError {}

impl ProxyError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None, param: None }
    }
    pub fn with_param(self, param: impl Into<String>) -> Self {
        Self { param: Some(param.into()), ..self }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", message)
        }
    }

    /// OpenAI's `type` for this status.
    fn openai_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// Anthropic's error `type` for this status.
    fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            529 | 503 => "overloaded_error",
            _ => "api_error",
        }
    }

    /// The JSON error object, as a body or as the data of an SSE error event.
    pub fn json(&self, flavor: Flavor) -> serde_json::Value {
        match flavor {
            Flavor::OpenAi => serde_json::json!({
                "error": {"message": self.message, "type": self.openai_type(), "param": self.param, "code": self.code}
            }),
            Flavor::Anthropic => serde_json::json!({
                "type": "error",
                "error": {"type": self.anthropic_type(), "message": self.message}
            }),
        }
    }

    /// A complete SSE event announcing this error mid-stream.
    pub fn sse_event(&self, flavor: Flavor) -> Bytes {
        Bytes::from(format!("event: error\ndata: {}\n\n", self.json(flavor)))
    }

    pub fn into_response(self, flavor: Flavor) -> Response<ProxyBody> {
        let body = Bytes::from(self.json(flavor).to_string());
        let mut resp = Response::new(ProxyBody::full(body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert("x-bulwark-error", HeaderValue::from_static(self.code));
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_and_anthropic_shapes() {
        let e = ProxyError::bad_request("missing_model", "`model` is required");
        assert_eq!(
            e.json(Flavor::OpenAi),
            serde_json::json!({"error": {"message": "`model` is required", "type": "invalid_request_error", "param": null, "code": "missing_model"}})
        );
        assert_eq!(
            e.json(Flavor::Anthropic),
            serde_json::json!({"type": "error", "error": {"type": "invalid_request_error", "message": "`model` is required"}})
        );
        let r = ProxyError::rate_limited("slow down", 0).into_response(Flavor::OpenAi);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let sse = ProxyError::new(StatusCode::BAD_GATEWAY, "upstream_stream_broken", "x").sse_event(Flavor::OpenAi);
        assert!(sse.starts_with(b"event: error\ndata: {") && sse.ends_with(b"}\n\n"));
    }
}
