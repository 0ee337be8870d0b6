//! Failures as Kubernetes reports them: a `Status` object with a reason, a code and details.

use serde_json::{Value, json};

use crate::resources::ResourceType;

/// One field-level problem in an `Invalid` or `Conflict` status (`details.causes[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldManagerConflict`, ...
    pub reason: &'static str,
    /// The problem without the field path, such as `Required value`.
    pub message: String,
    /// The field path, such as `spec.rules[0].backends`.
    pub field: String,
}

impl Cause {
    pub fn new(reason: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { reason, message: message.into(), field: field.into() }
    }

    fn to_json(&self) -> Value {
        json!({"reason": self.reason, "message": self.message, "field": self.field})
    }
}

/// A failed request, rendered as a `Status` with `status: Failure`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Details naming an object the way the API server does: the resource in `kind`.
    fn object_details(rt: &ResourceType, name: &str) -> Value {
        let mut details = json!({"name": name, "kind": rt.plural});
        if !rt.group.is_empty() {
            details["group"] = json!(rt.group);
        }
        details
    }

    /// The path does not name anything this server serves.
    pub fn path_not_found() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource").with_details(json!({}))
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", rt.group_resource()))
            .with_details(Self::object_details(rt, name))
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", rt.group_resource()))
            .with_details(Self::object_details(rt, name))
    }

    /// An optimistic-concurrency or precondition failure on `name`.
    pub fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {} \"{name}\": {why}", rt.group_resource()),
        )
        .with_details(Self::object_details(rt, name))
    }

    /// The object was changed since the caller read it.
    pub fn stale(rt: &ResourceType, name: &str) -> Self {
        Self::conflict(
            rt,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// Server-side apply conflicts with other field managers.
    pub fn apply_conflicts(rt: &ResourceType, name: &str, causes: Vec<Cause>) -> Self {
        let message = match causes.as_slice() {
            [one] => format!("Apply failed with 1 conflict: {}: {}", one.message, one.field),
            many => {
                let lines: Vec<String> = many.iter().map(|c| format!("{}: {}", c.message, c.field)).collect();
                format!("Apply failed with {} conflicts: {}", many.len(), lines.join("\n"))
            }
        };
        let mut details = Self::object_details(rt, name);
        details["causes"] = causes.iter().map(Cause::to_json).collect();
        Self::new(409, "Conflict", message).with_details(details)
    }

    /// The object fails validation: `Kind.group "name" is invalid: field: problem`.
    pub fn invalid(rt: &ResourceType, name: &str, causes: Vec<Cause>) -> Self {
        let qualified_kind = if rt.group.is_empty() { rt.kind.clone() } else { format!("{}.{}", rt.kind, rt.group) };
        let rendered: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        let summary = match rendered.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let mut details =
            json!({"name": name, "kind": rt.kind, "causes": causes.iter().map(Cause::to_json).collect::<Vec<_>>()});
        if !rt.group.is_empty() {
            details["group"] = json!(rt.group);
        }
        Self::new(422, "Invalid", format!("{qualified_kind} \"{name}\" is invalid: {summary}")).with_details(details)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn forbidden(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::new(403, "Forbidden", format!("{} \"{name}\" is forbidden: {why}", rt.group_resource()))
            .with_details(Self::object_details(rt, name))
    }

    pub fn method_not_allowed() -> Self {
        Self::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            .with_details(json!({}))
    }

    pub fn unsupported_media_type(content_type: &str, accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type}) - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
        .with_details(json!({}))
    }

    /// The `Status` object for this error.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}
