//! The `ScannerPolicy` resource: guardrail scanners on prompts and responses.
//! Types, defaults and schema only; per-scanner field checks live in `validate.rs`.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Duration, status::Condition};

/// Scanners a route runs on requests (`input`) and responses (`output`), streamed ones included.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "bulwark.dev",
    version = "v1alpha1",
    kind = "ScannerPolicy",
    namespaced,
    status = "ScannerPolicyStatus",
    category = "bulwark",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScannerPolicySpec {
    /// Stop at the first blocking verdict and cancel the scanners still running.
    #[serde(default = "yes")]
    pub fail_fast: bool,
    /// What a scanner that errs or times out means for the request.
    #[serde(default)]
    pub on_scanner_error: OnScannerError,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub input: Vec<Scanner>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub output: Vec<Scanner>,
    #[serde(default)]
    pub streaming: Streaming,
}

fn yes() -> bool {
    true
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum OnScannerError {
    #[default]
    FailClosed,
    FailOpen,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Streaming {
    /// Characters of a streamed response held back so a match split across chunks is caught.
    #[serde(default = "default_window")]
    #[schemars(range(min = 16, max = 65536))]
    pub window_chars: u32,
}

impl Default for Streaming {
    fn default() -> Self {
        Self { window_chars: default_window() }
    }
}

fn default_window() -> u32 {
    256
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum ScannerType {
    PromptInjection,
    BanTopics,
    Secrets,
    Pii,
    InvisibleText,
    TokenLimit,
    Regex,
    BanSubstrings,
    Language,
    Json,
    /// An external guardrail service, called over HTTP (see `webhook`).
    Webhook,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    #[default]
    Block,
    Redact,
    /// Log and count only.
    Audit,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    #[default]
    Enforce,
    /// Evaluate and report what `action` would have done, without doing it.
    Audit,
}

/// One scanner. Which of the optional fields apply depends on `type`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.sampling) || (self.sampling > 0.0 && self.sampling <= 1.0)").message("sampling must be in (0, 1]"))]
pub struct Scanner {
    #[serde(rename = "type")]
    pub type_: ScannerType,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub mode: Mode,
    /// Score at or above which a model-based scanner fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Fraction of requests scanned, in (0, 1]. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// `pii`: entity kinds (email, phone, creditCard, iban, ssn, ipAddress).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entities: Vec<String>,
    /// `pii`: put the original values back into the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_in_response: Option<bool>,
    /// `tokenLimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// `tokenLimit`: `cl100k_base` or `o200k_base`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// `regex`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    /// `banSubstrings`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub substrings: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_sensitive: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub word_boundary: Option<bool>,
    /// `banTopics`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// `language`: ISO 639-1 codes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub languages: Vec<String>,
    /// `json`: a JSON Schema the output must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub schema: Option<serde_json::Value>,
    /// Model-based scanners: bring your own ONNX export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelRef>,
    /// `webhook`: the service to call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
    /// Input `promptInjection`: which texts are scored, by where they come from. Default `[user,
    /// tool, document]`: what users type and what tools and retrieval bring in, the untrusted
    /// input of agent traffic; system prompts and earlier assistant turns are the app's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<Source>,
    /// Input `promptInjection`: a threshold per source, for those that should have their own
    /// (a lower one for tool results and documents); the others use `threshold`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub source_thresholds: std::collections::BTreeMap<Source, f64>,
}

/// An external guardrail service. It is POSTed the texts as JSON and answers pass, redact (with
/// the texts rewritten) or block (with a reason); see the README for the contract.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Webhook {
    /// `http://` or `https://` URL of the service.
    pub url: String,
    /// Time allowed per attempt, waiting for a free slot included. Default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Further attempts after a connection failure, a timeout, a 429 or a 5xx. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Calls in flight at once from one sidecar; more wait for a slot. Default 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// What a failed call means; default: the policy's `onScannerError`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<OnScannerError>,
    /// A token sent as `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<crate::route::Credentials>,
    /// A client certificate for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientCertificate>,
    /// CA (PEM file) that signed the service's certificate, besides the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// A client certificate and its key: a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`), or
/// files (standalone use).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientCertificate {
    /// A TLS Secret in the policy's namespace, mounted into the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

/// Where a text in a request comes from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// System (and developer) prompts.
    System,
    /// What the user sent: user messages, a completion's prompt, embeddings input.
    User,
    /// Earlier assistant turns: their text and the tool calls the model made.
    Assistant,
    /// Tool results: OpenAI `tool` messages, Anthropic `tool_result` blocks.
    Tool,
    /// Documents and retrieved content: Anthropic `document` and `search_result` blocks.
    Document,
}

impl Source {
    /// What `sources` means when it is not set.
    pub const UNTRUSTED: [Self; 3] = [Self::User, Self::Tool, Self::Document];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
            Self::Document => "document",
        }
    }
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelRef {
    /// Directory with `model.onnx` and `tokenizer.json`.
    pub path: String,
    /// Expected sha256 of `model.onnx`, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The ed25519 key the directory's manifest must be signed with (`manifest.sig`): a PEM
    /// `PUBLIC KEY`, or the 32 raw bytes in base64. Default: the sidecar's `--model-public-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScannerPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Sidecars whose routes use this policy, and how many run the current config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<crate::route::SidecarCounts>,
}

/// The DER prefix of an ed25519 `SubjectPublicKeyInfo`, before the 32 key bytes.
const ED25519_SPKI: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// An ed25519 public key that signs model manifests, from a PEM `PUBLIC KEY` (as `openssl pkey
/// -pubout` writes it) or the 32 raw bytes in base64.
pub fn model_key(text: &str) -> Result<[u8; 32], String> {
    use base64::Engine as _;
    let text = text.trim();
    let body: String = match text.strip_prefix("-----BEGIN PUBLIC KEY-----") {
        Some(rest) => rest
            .split("-----END PUBLIC KEY-----")
            .next()
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
        None => text.to_owned(),
    };
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("not a PEM public key or base64: {e}"))?;
    let raw = match der.len() {
        32 => der.as_slice(),
        44 if der[..12] == ED25519_SPKI => &der[12..],
        _ => return Err("not an ed25519 public key".into()),
    };
    raw.try_into().map_err(|_| "not an ed25519 public key".to_owned())
}
