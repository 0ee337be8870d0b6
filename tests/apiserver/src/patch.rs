//! The patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and the strategic merge
//! patch of built-in kinds.

use serde_json::{Map, Value};

/// Applies a JSON merge patch: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    let target = crate::meta::object_mut(target);
    for (key, value) in changes {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Applies a JSON patch (a list of `add`, `remove`, `replace`, `move`, `copy` and `test`
/// operations) to `doc`, all or nothing.
pub fn json_patch(doc: &Value, operations: &Value) -> Result<Value, String> {
    let operations =
        operations.as_array().ok_or("json: cannot unmarshal object into Go value of type jsonpatch.Patch")?;
    let mut doc = doc.clone();
    for op in operations {
        let field = |name: &str| op.get(name).and_then(Value::as_str);
        let path = field("path").ok_or("operation missing path")?;
        let value = || op.get("value").cloned().ok_or_else(|| format!("missing value for path {path}"));
        match field("op").unwrap_or("") {
            "add" => add(&mut doc, path, value()?)?,
            "remove" => {
                remove(&mut doc, path)?;
            }
            "replace" => {
                remove(&mut doc, path)
                    .map_err(|_| format!("replace operation does not apply: doc is missing key: {path}"))?;
                add(&mut doc, path, value()?)?;
            }
            "move" => {
                let from = field("from").ok_or("move operation missing from")?;
                let moved = remove(&mut doc, from)?;
                add(&mut doc, path, moved)?;
            }
            "copy" => {
                let from = field("from").ok_or("copy operation missing from")?;
                let copied = doc
                    .pointer(from)
                    .cloned()
                    .ok_or_else(|| format!("copy operation does not apply: doc is missing from path: {from}"))?;
                add(&mut doc, path, copied)?;
            }
            "test" => {
                let passed = match (doc.pointer(path), value()?) {
                    (None | Some(Value::Null), Value::Null) => true,
                    (actual, expected) => actual == Some(&expected),
                };
                if !passed {
                    return Err(format!("testing value {path} failed: test failed"));
                }
            }
            other => return Err(format!("Unexpected kind: {other}")),
        }
    }
    Ok(doc)
}

/// Splits a JSON pointer into its parent pointer and unescaped last token.
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let at = path.rfind('/').ok_or_else(|| format!("invalid JSON pointer: {path:?}"))?;
    Ok((&path[..at], path[at + 1..].replace("~1", "/").replace("~0", "~")))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, token) = split_pointer(path)?;
    let missing = || format!("add operation does not apply: doc is missing path: \"{path}\": missing value");
    match doc.pointer_mut(parent).ok_or_else(missing)? {
        Value::Object(map) => {
            map.insert(token, value);
        }
        Value::Array(list) => {
            let index = if token == "-" { list.len() } else { token.parse::<usize>().map_err(|_| missing())? };
            if index > list.len() {
                return Err(format!("add operation does not apply: index {index} out of bounds"));
            }
            list.insert(index, value);
        }
        _ => return Err(missing()),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, token) = split_pointer(path)?;
    let missing = || format!("remove operation does not apply: doc is missing path: \"{path}\"");
    match doc.pointer_mut(parent).ok_or_else(missing)? {
        Value::Object(map) => map.remove(&token).ok_or_else(missing),
        Value::Array(list) => match token.parse::<usize>() {
            Ok(i) if i < list.len() => Ok(list.remove(i)),
            _ => Err(missing()),
        },
        _ => Err(missing()),
    }
}

/// The merge key of the lists a strategic merge patch merges item by item, by field name.
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    let has = |key: &str| items.iter().all(|i| i.get(key).is_some());
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "secrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        "ownerReferences" => Some("uid"),
        "conditions" => Some("type"),
        "hostAliases" => Some("ip"),
        "ports" if has("containerPort") => Some("containerPort"),
        "ports" if has("port") => Some("port"),
        _ => None,
    }
}

/// Applies a strategic merge patch to a built-in object: a merge patch that also merges the
/// known keyed lists (containers by name, ...) and `finalizers` item by item, and honours the
/// `$patch`, `$retainKeys`, `$setElementOrder/` and `$deleteFromPrimitiveList/` directives.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if changes.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replacement = changes.clone();
        replacement.remove("$patch");
        *target = Value::Object(replacement);
        return;
    }
    let target = crate::meta::object_mut(target);
    for (key, value) in changes {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(gone)) = (target.get_mut(field), value.as_array()) {
                list.retain(|item| !gone.contains(item));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        match (target.get_mut(key), value) {
            (_, Value::Null) => {
                target.remove(key);
            }
            (_, Value::Object(inner)) if inner.get("$patch").and_then(Value::as_str) == Some("delete") => {
                target.remove(key);
            }
            (Some(Value::Array(live)), Value::Array(items)) if key == "finalizers" => {
                for item in items {
                    if !live.contains(item) {
                        live.push(item.clone());
                    }
                }
            }
            (Some(Value::Array(live)), Value::Array(items)) => match merge_key(key, items) {
                Some(merge_key) => merge_list(live, items, merge_key),
                None => *live = items.clone(),
            },
            (Some(live), Value::Object(_)) if live.is_object() => strategic_merge_patch(live, value),
            (_, Value::Object(_)) => {
                let mut fresh = Value::Object(Map::new());
                strategic_merge_patch(&mut fresh, value);
                target.insert(key.clone(), fresh);
            }
            (_, other) => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
    if let Some(Value::Array(retain)) = changes.get("$retainKeys") {
        target.retain(|k, _| retain.iter().any(|r| r.as_str() == Some(k)));
    }
}

fn merge_list(live: &mut Vec<Value>, items: &[Value], key: &str) {
    for item in items {
        let position = live.iter().position(|l| l.get(key) == item.get(key));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                live.remove(i);
            }
            (Some(i), false) => strategic_merge_patch(&mut live[i], item),
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                strategic_merge_patch(&mut fresh, item);
                live.push(fresh);
            }
            (None, true) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "list": [1, 2]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "list": [3], "new": {"x": 1}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "list": [3], "new": {"x": 1}}));
    }

    #[test]
    fn json_patch_operations() {
        let doc = json!({"metadata": {"labels": {"a": "1"}}, "list": [1, 2]});
        let out = json_patch(
            &doc,
            &json!([
                {"op": "test", "path": "/metadata/labels/a", "value": "1"},
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
                {"op": "replace", "path": "/list/0", "value": 9},
                {"op": "add", "path": "/list/-", "value": 3},
                {"op": "copy", "from": "/list", "path": "/copy"},
                {"op": "move", "from": "/copy", "path": "/moved"},
                {"op": "remove", "path": "/metadata/labels/a"}
            ]),
        )
        .unwrap();
        assert_eq!(out, json!({"metadata": {"labels": {"b/c": "2"}}, "list": [9, 2, 3], "moved": [9, 2, 3]}));
        let failed = json_patch(&doc, &json!([{"op": "test", "path": "/list/0", "value": 5}])).unwrap_err();
        assert_eq!(failed, "testing value /list/0 failed: test failed");
        assert!(json_patch(&doc, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        assert!(json_patch(&doc, &json!([{"op": "replace", "path": "/nope", "value": 1}])).is_err());
    }

    #[test]
    fn strategic_merge_patch_merges_keyed_lists() {
        let mut pod = json!({"metadata": {"finalizers": ["a"]}, "spec": {"containers": [
            {"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}]},
            {"name": "proxy", "image": "proxy:1"}
        ]}});
        strategic_merge_patch(
            &mut pod,
            &json!({"metadata": {"finalizers": ["b"]}, "spec": {
            "$setElementOrder/containers": [{"name": "app"}, {"name": "proxy"}],
            "containers": [
                {"name": "app", "image": "app:2", "env": [{"name": "B", "value": "2"}]},
                {"name": "proxy", "$patch": "delete"}
            ]}}),
        );
        assert_eq!(
            pod,
            json!({"metadata": {"finalizers": ["a", "b"]}, "spec": {"containers": [
                {"name": "app", "image": "app:2", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}
            ]}})
        );
    }
}
