//! Status conditions shared by every resource, in the shape of `metav1.Condition`, so
//! kubectl, Argo CD and kstatus read them without knowing Bulwark.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted`, `ResolvedRefs`, `Ready`, ...
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word a program can act on.
    pub reason: String,
    /// What a person should know or do.
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339 time of the last change of `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

pub mod reasons {
    pub const ACCEPTED: &str = "Accepted";
    pub const INVALID: &str = "Invalid";
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    pub const BACKEND_NOT_FOUND: &str = "BackendNotFound";
    pub const POLICY_NOT_FOUND: &str = "PolicyNotFound";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const ROUTE_NOT_FOUND: &str = "RouteNotFound";
    pub const CONFLICT: &str = "Conflict";
    pub const MODEL_SERVER_NOT_FOUND: &str = "ModelServerNotFound";
}
