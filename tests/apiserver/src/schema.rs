//! Structural schemas of custom resources (`openAPIV3Schema`): pruning of unknown fields and of
//! `null`s, and validation with messages in the API server's words. Schema `default`s are not
//! applied, so objects read back as they were written.
//!
//! Validation translates the OpenAPI v3 subset CRDs use into JSON Schema draft 4 for the
//! `jsonschema` crate: `nullable` admits `null`, `x-kubernetes-int-or-string` admits integers and
//! strings, `format` is not checked, and the other `x-kubernetes-*` extensions are ignored. CEL
//! rules (`x-kubernetes-validations`) are not evaluated.

use std::fmt::Write as _;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::LocationSegment;
use serde_json::{Map, Value, json};

use crate::error::Cause;

/// A CRD version's schema, compiled.
pub struct Schema {
    raw: Value,
    validator: jsonschema::Validator,
    list_maps: Vec<crate::apply::ListMap>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema").finish_non_exhaustive()
    }
}

impl Schema {
    /// Compiles an `openAPIV3Schema`, or says why it is not a usable schema.
    pub fn compile(raw: &Value) -> Result<Self, String> {
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .should_validate_formats(false)
            .build(&to_json_schema(raw))
            .map_err(|e| e.to_string())?;
        let mut list_maps = Vec::new();
        collect_list_maps(raw, &mut Vec::new(), &mut list_maps);
        Ok(Self { raw: raw.clone(), validator, list_maps })
    }

    /// The lists the schema declares `x-kubernetes-list-type: map`, whose items server-side
    /// apply merges by key (reached through object properties).
    pub fn list_maps(&self) -> &[crate::apply::ListMap] {
        &self.list_maps
    }

    /// The schema as the CRD states it.
    pub fn raw(&self) -> &Value {
        &self.raw
    }

    /// Drops the fields the schema does not know (keeping those under
    /// `x-kubernetes-preserve-unknown-fields`) and returns their paths, such as `spec.foo`.
    pub fn prune(&self, obj: &mut Value) -> Vec<String> {
        let mut unknown = Vec::new();
        prune(&self.raw, obj, "", true, &mut unknown);
        unknown
    }

    /// Drops the `null`s of fields that are not `nullable`, as the API server does before
    /// defaulting.
    pub fn drop_nulls(&self, obj: &mut Value) {
        drop_nulls(&self.raw, obj);
    }

    /// The ways `obj` breaks the schema, as field causes.
    pub fn validate(&self, obj: &Value) -> Vec<Cause> {
        let mut causes: Vec<Cause> = Vec::new();
        for error in self.validator.iter_errors(obj) {
            let mut path = String::new();
            for segment in error.instance_path().segments() {
                match segment {
                    LocationSegment::Property(name) => push_field(&mut path, &name),
                    LocationSegment::Index(i) => {
                        let _ = write!(path, "[{i}]");
                    }
                }
            }
            let cause = describe(error.kind(), &path, error.instance());
            if !causes.contains(&cause) {
                causes.push(cause);
            }
        }
        causes
    }
}

fn push_field(path: &mut String, name: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(name);
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool) == Some(true)
}

/// The JSON Schema (draft 4) equivalent of an OpenAPI v3 structural schema.
fn to_json_schema(node: &Value) -> Value {
    let Value::Object(map) = node else { return node.clone() };
    let mut out = Map::new();
    for (key, value) in map {
        let converted = match key.as_str() {
            "properties" | "patternProperties" | "definitions" => match value {
                Value::Object(children) => {
                    Value::Object(children.iter().map(|(k, v)| (k.clone(), to_json_schema(v))).collect())
                }
                other => other.clone(),
            },
            "items" | "additionalProperties" | "not" => to_json_schema(value),
            "allOf" | "anyOf" | "oneOf" => match value {
                Value::Array(list) => list.iter().map(to_json_schema).collect(),
                other => other.clone(),
            },
            "nullable" => continue,
            extension if extension.starts_with("x-kubernetes-") => continue,
            _ => value.clone(),
        };
        out.insert(key.clone(), converted);
    }
    if flag(node, "x-kubernetes-int-or-string") {
        out.insert("type".into(), json!(["integer", "string"]));
    }
    if flag(node, "nullable") {
        if let Some(ty) = out.get_mut("type") {
            let mut types = match ty.take() {
                Value::Array(types) => types,
                single => vec![single],
            };
            types.push(json!("null"));
            *ty = Value::Array(types);
        }
        if let Some(Value::Array(options)) = out.get_mut("enum") {
            options.push(Value::Null);
        }
    }
    Value::Object(out)
}

fn prune(schema: &Value, value: &mut Value, path: &str, root: bool, unknown: &mut Vec<String>) {
    let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
    let implicit_meta = root || flag(schema, "x-kubernetes-embedded-resource");
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let mut dropped = Vec::new();
            for (key, child) in map.iter_mut() {
                if implicit_meta && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let mut child_path = path.to_string();
                push_field(&mut child_path, key);
                if let Some(child_schema) = properties.and_then(|p| p.get(key)) {
                    prune(child_schema, child, &child_path, false, unknown);
                } else if let Some(child_schema) = additional.filter(|a| a.is_object()) {
                    prune(child_schema, child, &child_path, false, unknown);
                } else if !preserve && additional != Some(&Value::Bool(true)) {
                    dropped.push(key.clone());
                    unknown.push(child_path);
                }
            }
            for key in dropped {
                map.remove(&key);
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(item_schema, item, &format!("{path}[{i}]"), false, unknown);
                }
            }
        }
        _ => {}
    }
}

fn drop_nulls(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                map.retain(|key, child| {
                    !(child.is_null() && properties.get(key).is_some_and(|p| !flag(p, "nullable")))
                });
                for (key, child) in map.iter_mut() {
                    if let Some(property) = properties.get(key) {
                        drop_nulls(property, child);
                    }
                }
            } else if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for child in map.values_mut() {
                    drop_nulls(additional, child);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    drop_nulls(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

/// The JSON type name of a value, as in `must be of type integer: "string"`.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A value as the API server quotes it in messages: strings quoted, numbers bare.
fn quote(value: &Value) -> String {
    match value {
        Value::Object(_) | Value::Array(_) => format!("\"{}\"", type_name(value)),
        other => other.to_string(),
    }
}

/// A numeric limit as the API server prints it: `10`, not `10.0`.
fn number(value: &Value) -> String {
    match value.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => value.to_string(),
    }
}

/// Turns one schema violation into a cause worded like the API server's.
fn describe(kind: &ValidationErrorKind, path: &str, instance: &Value) -> Cause {
    let shown = quote(instance);
    let invalid =
        |rule: String| Cause::new("FieldValueInvalid", path, format!("Invalid value: {shown}: {path} in body {rule}"));
    match kind {
        ValidationErrorKind::Required { property } => {
            let mut field = path.to_string();
            push_field(&mut field, property.as_str().unwrap_or_default());
            Cause::new("FieldValueRequired", field, "Required value")
        }
        ValidationErrorKind::Type { kind } => {
            let expected: Vec<String> = match kind {
                TypeKind::Single(ty) => vec![ty.to_string()],
                TypeKind::Multiple(set) => set.iter().map(|t| t.to_string()).filter(|t| t != "null").collect(),
            };
            let actual = type_name(instance);
            Cause::new(
                "FieldValueTypeInvalid",
                path,
                format!(
                    "Invalid value: \"{actual}\": {path} in body must be of type {}: \"{actual}\"",
                    expected.join("/")
                ),
            )
        }
        ValidationErrorKind::Enum { options } => {
            let supported: Vec<String> =
                options.as_array().map(|o| o.iter().filter(|v| !v.is_null()).map(quote).collect()).unwrap_or_default();
            Cause::new(
                "FieldValueNotSupported",
                path,
                format!("Unsupported value: {shown}: supported values: {}", supported.join(", ")),
            )
        }
        ValidationErrorKind::Pattern { pattern } => invalid(format!("should match '{pattern}'")),
        ValidationErrorKind::Minimum { limit } => {
            invalid(format!("should be greater than or equal to {}", number(limit)))
        }
        ValidationErrorKind::Maximum { limit } => invalid(format!("should be less than or equal to {}", number(limit))),
        ValidationErrorKind::ExclusiveMinimum { limit } => invalid(format!("should be greater than {}", number(limit))),
        ValidationErrorKind::ExclusiveMaximum { limit } => invalid(format!("should be less than {}", number(limit))),
        ValidationErrorKind::MinLength { limit } => invalid(format!("should be at least {limit} chars long")),
        ValidationErrorKind::MaxLength { limit } => {
            Cause::new("FieldValueTooLong", path, format!("Too long: may not be more than {limit} bytes"))
        }
        ValidationErrorKind::MinItems { limit } => invalid(format!("should have at least {limit} items")),
        ValidationErrorKind::MaxItems { limit } => {
            let count = instance.as_array().map_or(0, Vec::len);
            Cause::new("FieldValueTooMany", path, format!("Too many: {count}: must have at most {limit} items"))
        }
        ValidationErrorKind::MinProperties { limit } => invalid(format!("should have at least {limit} properties")),
        ValidationErrorKind::MaxProperties { limit } => invalid(format!("should have at most {limit} properties")),
        ValidationErrorKind::UniqueItems => {
            Cause::new("FieldValueDuplicate", path, format!("Duplicate value: {shown}"))
        }
        other => invalid(format!("{other:?}")),
    }
}

fn collect_list_maps(node: &Value, path: &mut Vec<String>, out: &mut Vec<crate::apply::ListMap>) {
    if node.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
        let keys = node.get("x-kubernetes-list-map-keys").and_then(Value::as_array).into_iter().flatten();
        let keys: Vec<String> = keys.filter_map(Value::as_str).map(str::to_owned).collect();
        if !keys.is_empty() {
            out.push(crate::apply::ListMap { path: path.clone(), keys });
        }
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            path.push(name.clone());
            collect_list_maps(child, path, out);
            path.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        let raw: Value = serde_yaml::from_str(
            r#"
type: object
required: [spec]
properties:
  spec:
    type: object
    required: [rules]
    properties:
      replicas: {type: integer, minimum: 1.0, default: 1}
      mode: {type: string, enum: [a, b], nullable: true}
      port: {x-kubernetes-int-or-string: true}
      free: {type: object, x-kubernetes-preserve-unknown-fields: true}
      labels: {type: object, additionalProperties: {type: string}}
      rules:
        type: array
        maxItems: 2
        items:
          type: object
          required: [name]
          properties:
            name: {type: string, maxLength: 3}
"#,
        )
        .unwrap();
        Schema::compile(&raw).unwrap()
    }

    #[test]
    fn prunes_unknown_fields_with_their_paths() {
        let mut obj = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"}, "extra": 1,
            "spec": {"rules": [{"name": "a", "weight": 2}], "free": {"any": {"thing": 1}}, "labels": {"k": "v"}}});
        assert_eq!(schema().prune(&mut obj), vec!["extra", "spec.rules[0].weight"]);
        assert_eq!(obj["spec"]["free"]["any"]["thing"], 1);
        assert!(obj["spec"]["rules"][0].get("weight").is_none());
    }

    #[test]
    fn drops_nulls_of_fields_that_are_not_nullable() {
        let mut obj = json!({"spec": {"rules": [], "replicas": null, "mode": null}});
        schema().drop_nulls(&mut obj);
        assert_eq!(obj, json!({"spec": {"rules": [], "mode": null}}));
    }

    #[test]
    fn describes_violations_like_the_api_server() {
        let s = schema();
        let messages = |obj: Value| -> Vec<String> {
            s.validate(&obj).into_iter().map(|c| format!("{}: {}", c.field, c.message)).collect()
        };
        assert_eq!(messages(json!({})), vec!["spec: Required value"]);
        assert_eq!(messages(json!({"spec": {"rules": [{}]}})), vec!["spec.rules[0].name: Required value"]);
        assert_eq!(
            messages(json!({"spec": {"rules": [], "replicas": "two"}})),
            vec![r#"spec.replicas: Invalid value: "string": spec.replicas in body must be of type integer: "string""#]
        );
        assert_eq!(
            messages(json!({"spec": {"rules": [], "mode": "c"}})),
            vec![r#"spec.mode: Unsupported value: "c": supported values: "a", "b""#]
        );
        assert_eq!(
            messages(json!({"spec": {"rules": [], "replicas": 0}})),
            vec!["spec.replicas: Invalid value: 0: spec.replicas in body should be greater than or equal to 1"]
        );
        assert_eq!(
            messages(json!({"spec": {"rules": [{"name": "long"}]}})),
            vec!["spec.rules[0].name: Too long: may not be more than 3 bytes"]
        );
        assert!(messages(json!({"spec": {"rules": [], "mode": null, "port": "http"}})).is_empty());
        assert!(!messages(json!({"spec": {"rules": [], "port": true}})).is_empty());
    }
}
