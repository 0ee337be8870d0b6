//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Fields are tracked at the granularity of object keys. Lists are atomic (owned and replaced
//! whole), unless the schema marks them `x-kubernetes-list-type: map`: their items are then
//! merged and owned one by one, by key, as `k:{"type":"Ready"}` names them in `fieldsV1`.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::error::Cause;

/// Metadata fields the server owns; they never appear in a field set.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

type Path = Vec<String>;

/// A set of fields shaped like `fieldsV1`: a node without children is owned whole (a scalar, a
/// list or an empty map); a node with children only stands for the path to them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSet(BTreeMap<String, FieldSet>);

impl FieldSet {
    /// The fields an object sets, leaving out identity and server-owned metadata.
    pub fn of_object(obj: &Value) -> Self {
        let mut set = Self::of_value(obj);
        set.0.remove("apiVersion");
        set.0.remove("kind");
        if let Some(meta) = set.0.get_mut("metadata") {
            meta.0.retain(|k, _| !SERVER_METADATA.contains(&k.as_str()));
            if meta.0.is_empty() {
                set.0.remove("metadata");
            }
        }
        set
    }

    fn of_value(value: &Value) -> Self {
        match value {
            Value::Object(map) => {
                Self(map.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), Self::of_value(v))).collect())
            }
            _ => Self::default(),
        }
    }

    /// Reads `fieldsV1`. Items of list maps (`k:`) are kept by key; entries for items of other
    /// lists (`v:`, `i:`) make their list owned whole.
    pub fn from_fields_v1(value: &Value) -> Self {
        let Value::Object(map) = value else { return Self::default() };
        Self(
            map.iter()
                .filter_map(|(key, child)| {
                    if key.starts_with("k:") {
                        return Some((key.clone(), Self::from_fields_v1(child)));
                    }
                    let name = key.strip_prefix("f:")?;
                    let other_items =
                        child.as_object().is_some_and(|c| c.keys().any(|k| k.starts_with("v:") || k.starts_with("i:")));
                    let child = if other_items { Self::default() } else { Self::from_fields_v1(child) };
                    Some((name.to_string(), child))
                })
                .collect(),
        )
    }

    pub fn to_fields_v1(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, child)| {
                    if k.starts_with("k:") {
                        // An item: `.` stands for the item itself, as the API server writes it.
                        let mut fields = child.to_fields_v1();
                        if let Value::Object(m) = &mut fields {
                            m.insert(".".into(), json!({}));
                        }
                        (k.clone(), fields)
                    } else {
                        (format!("f:{k}"), child.to_fields_v1())
                    }
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The paths of the fields owned whole.
    pub fn leaves(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.collect_leaves(&mut Vec::new(), &mut out);
        out
    }

    fn collect_leaves(&self, prefix: &mut Path, out: &mut Vec<Path>) {
        for (key, child) in &self.0 {
            prefix.push(key.clone());
            if child.0.is_empty() {
                out.push(prefix.clone());
            } else {
                child.collect_leaves(prefix, out);
            }
            prefix.pop();
        }
    }

    /// Whether `path` is in the set, lies inside a field owned whole, or leads to owned fields.
    pub fn covers(&self, path: &[String]) -> bool {
        match path.split_first() {
            None => true,
            Some((head, rest)) => self.0.get(head).is_some_and(|child| child.0.is_empty() || child.covers(rest)),
        }
    }

    pub fn insert(&mut self, path: &[String]) {
        if let Some((head, rest)) = path.split_first() {
            let child = self.0.entry(head.clone()).or_default();
            if !rest.is_empty() {
                child.insert(rest);
            }
        }
    }

    /// Gives up `path`: the field itself, what lies below it, or the whole field containing it.
    pub fn remove(&mut self, path: &[String]) {
        let Some((head, rest)) = path.split_first() else { return };
        let Some(child) = self.0.get_mut(head) else { return };
        if rest.is_empty() || child.0.is_empty() {
            self.0.remove(head);
        } else {
            child.remove(rest);
            if child.0.is_empty() {
                self.0.remove(head);
            }
        }
    }
}

/// A list whose items are keyed (`x-kubernetes-list-type: map`): where it is, and the keys.
#[derive(Clone, Debug, PartialEq)]
pub struct ListMap {
    pub path: Vec<String>,
    pub keys: Vec<String>,
}

fn lookup_mut<'v>(value: &'v mut Value, path: &[String]) -> Option<&'v mut Value> {
    path.iter().try_fold(value, |v, key| v.get_mut(key))
}

/// `k:{"type":"Ready"}`: an item's name in `fieldsV1`.
fn item_key(item: &Value, keys: &[String]) -> String {
    let fields: Map<String, Value> =
        keys.iter().map(|k| (k.clone(), item.get(k).cloned().unwrap_or(Value::Null))).collect();
    format!("k:{}", Value::Object(fields))
}

/// The order of a list map's items, by key, in each list map of `value`.
type Orders = Vec<Vec<String>>;

/// Turns each list map of `value` into an object of its items by key, so that ownership and
/// merging work item by item; returns the items' order, for [`unkeyed`].
fn keyed(value: &mut Value, maps: &[ListMap]) -> Orders {
    maps.iter()
        .map(|m| {
            let Some(slot) = lookup_mut(value, &m.path) else { return Vec::new() };
            let Value::Array(items) = slot else { return Vec::new() };
            let mut order = Vec::new();
            let mut by_key = Map::new();
            for item in items.drain(..) {
                let key = item_key(&item, &m.keys);
                order.push(key.clone());
                by_key.insert(key, item);
            }
            *slot = Value::Object(by_key);
            order
        })
        .collect()
}

/// Turns keyed list maps back into lists: items in the order of `first` (the live object),
/// then of `then` (what was applied), then any others.
fn unkeyed(value: &mut Value, maps: &[ListMap], first: &Orders, then: &Orders) {
    for (i, m) in maps.iter().enumerate() {
        let Some(slot) = lookup_mut(value, &m.path) else { continue };
        let Value::Object(by_key) = slot else { continue };
        let mut by_key = std::mem::take(by_key);
        let mut items = Vec::new();
        let order = first.get(i).into_iter().flatten().chain(then.get(i).into_iter().flatten());
        for key in order {
            if let Some(item) = by_key.remove(key) {
                items.push(item);
            }
        }
        items.extend(by_key.into_iter().map(|(_, v)| v));
        *slot = Value::Array(items);
    }
}

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    subresource: String,
    api_version: String,
    time: String,
    fields: FieldSet,
}

impl Entry {
    fn is(&self, manager: &str, operation: &str, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }
}

fn entries(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj.pointer("/metadata/managedFields").and_then(Value::as_array) else { return Vec::new() };
    let text = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    list.iter()
        .map(|e| Entry {
            manager: text(e, "manager"),
            operation: text(e, "operation"),
            subresource: text(e, "subresource"),
            api_version: text(e, "apiVersion"),
            time: text(e, "time"),
            fields: e.get("fieldsV1").map(FieldSet::from_fields_v1).unwrap_or_default(),
        })
        .collect()
}

fn set_entries(obj: &mut Value, entries: Vec<Entry>) {
    let meta = crate::meta::meta_mut(obj);
    let rendered: Vec<Value> = entries
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut entry = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": e.fields.to_fields_v1(),
            });
            if !e.subresource.is_empty() {
                entry["subresource"] = json!(e.subresource);
            }
            entry
        })
        .collect();
    if rendered.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(rendered));
    }
}

/// Who writes, and how.
pub struct Writer<'a> {
    pub manager: &'a str,
    /// `"status"` for writes to the status subresource, otherwise empty.
    pub subresource: &'a str,
    pub api_version: &'a str,
    pub now: &'a str,
    /// The type's list maps, merged item by item.
    pub maps: &'a [ListMap],
}

/// The fields an update added or changed, and those it removed.
fn diff(old: Option<&Value>, new: Option<&Value>, path: &mut Path, changed: &mut Vec<Path>, removed: &mut Vec<Path>) {
    let old = old.filter(|v| !v.is_null());
    let new = new.filter(|v| !v.is_null());
    match (old, new) {
        (Some(Value::Object(o)), Some(Value::Object(n))) if !o.is_empty() && !n.is_empty() => {
            let keys: std::collections::BTreeSet<&String> = o.keys().chain(n.keys()).collect();
            for key in keys {
                path.push(key.clone());
                diff(o.get(key), n.get(key), path, changed, removed);
                path.pop();
            }
        }
        (Some(_), None) => removed.push(path.clone()),
        (None, None) => {}
        (old, Some(new)) if old != Some(new) => match new {
            Value::Object(map) if !map.is_empty() => {
                for leaf in FieldSet::of_value(new).leaves() {
                    changed.push(path.iter().cloned().chain(leaf).collect());
                }
            }
            _ => changed.push(path.clone()),
        },
        _ => {}
    }
}

/// Records an update (create, update or non-apply patch) in `new`'s managed fields: the writer
/// takes the fields it changed from everyone else. Managed fields the client rewrote itself (as
/// kubectl does when it moves an object to server-side apply) stand as sent; an empty list
/// resets them.
pub fn track_update(old: Option<&Value>, new: &mut Value, writer: &Writer<'_>) {
    let old_managed = old.and_then(|o| o.pointer("/metadata/managedFields")).filter(|v| !v.is_null());
    let sent = new.pointer("/metadata/managedFields").filter(|v| !v.is_null()).cloned();
    let reset = sent.as_ref().and_then(Value::as_array).is_some_and(Vec::is_empty);
    match (&sent, old_managed) {
        (Some(sent), _) if !reset && Some(sent) != old_managed => return,
        (None, Some(kept)) => {
            crate::meta::meta_mut(new).insert("managedFields".into(), kept.clone());
        }
        _ => {}
    }
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.retain(|k, _| !SERVER_METADATA.contains(&k.as_str()));
        }
        if let Some(map) = v.as_object_mut() {
            map.remove("apiVersion");
            map.remove("kind");
        }
        v
    };
    let keyed_copy = |v: &Value| {
        let mut v = strip(v);
        keyed(&mut v, writer.maps);
        v
    };
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    diff(old.map(keyed_copy).as_ref(), Some(&keyed_copy(new)), &mut Vec::new(), &mut changed, &mut removed);
    if changed.is_empty() && removed.is_empty() {
        if reset {
            crate::meta::meta_mut(new).remove("managedFields");
        }
        return;
    }
    let mut entries = if reset { Vec::new() } else { old.map(entries).unwrap_or_default() };
    for entry in entries.iter_mut().filter(|e| !e.is(writer.manager, "Update", writer.subresource)) {
        for path in changed.iter().chain(&removed) {
            entry.fields.remove(path);
        }
    }
    let mine = match entries.iter().position(|e| e.is(writer.manager, "Update", writer.subresource)) {
        Some(i) => i,
        None => {
            entries.push(Entry {
                manager: writer.manager.to_string(),
                operation: "Update".into(),
                subresource: writer.subresource.to_string(),
                api_version: String::new(),
                time: String::new(),
                fields: FieldSet::default(),
            });
            entries.len() - 1
        }
    };
    let entry = &mut entries[mine];
    for path in &removed {
        entry.fields.remove(path);
    }
    for path in &changed {
        entry.fields.insert(path);
    }
    entry.api_version = writer.api_version.to_string();
    entry.time = writer.now.to_string();
    set_entries(new, entries);
}

fn lookup<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

/// Removes the field at `path`, and the maps that only held it.
fn remove_field(value: &mut Value, path: &[String]) {
    let Some((head, rest)) = path.split_first() else { return };
    let Some(map) = value.as_object_mut() else { return };
    if rest.is_empty() {
        map.remove(head);
    } else if let Some(child) = map.get_mut(head) {
        remove_field(child, rest);
        if child.as_object().is_some_and(Map::is_empty) && head != "metadata" {
            map.remove(head);
        }
    }
}

/// Merges an applied configuration: maps merge key by key; lists and scalars replace.
fn merge_applied(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(live), Value::Object(config)) => {
            for (key, value) in config {
                match (live.get_mut(key), value) {
                    (_, Value::Null) => {
                        live.remove(key);
                    }
                    (Some(existing @ Value::Object(_)), Value::Object(_)) => merge_applied(existing, value),
                    _ => {
                        live.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (target, applied) => *target = applied.clone(),
    }
}

/// Server-side apply of `config` by `writer.manager` onto `live` (or onto nothing, to create).
/// Returns the resulting object with its managed fields, or the conflicts with other managers
/// when `force` is not set.
pub fn apply(live: Option<&Value>, config: &Value, force: bool, writer: &Writer<'_>) -> Result<Value, Vec<Cause>> {
    let (mut live_keyed, mut config) = (live.cloned(), config.clone());
    let live_order = live_keyed.as_mut().map(|v| keyed(v, writer.maps)).unwrap_or_default();
    let config_order = keyed(&mut config, writer.maps);
    let (live, config) = (live_keyed.as_ref(), &config);
    let applied = FieldSet::of_object(config);
    let mut entries = live.map(entries).unwrap_or_default();
    let mine = entries.iter().position(|e| e.is(writer.manager, "Apply", writer.subresource));
    let mut conflicts: Vec<(usize, Path)> = Vec::new();
    if let Some(live) = live {
        for leaf in applied.leaves() {
            if lookup(live, &leaf) == lookup(config, &leaf) {
                continue;
            }
            for (i, entry) in entries.iter().enumerate() {
                if Some(i) != mine && entry.subresource == writer.subresource && entry.fields.covers(&leaf) {
                    conflicts.push((i, leaf.clone()));
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts
            .iter()
            .map(|(i, path)| {
                let entry = &entries[*i];
                Cause::new(
                    "FieldManagerConflict",
                    format!(".{}", path.join(".")),
                    format!("conflict with \"{}\" using {}", entry.manager, entry.api_version),
                )
            })
            .collect());
    }
    for (i, path) in &conflicts {
        entries[*i].fields.remove(path);
    }
    let mut result = live.cloned().unwrap_or_else(|| json!({}));
    if let Some(previous) = mine.map(|i| entries[i].fields.clone()) {
        for leaf in previous.leaves() {
            let kept = applied.covers(&leaf)
                || entries.iter().enumerate().any(|(i, e)| Some(i) != mine && e.fields.covers(&leaf));
            if !kept {
                remove_field(&mut result, &leaf);
            }
        }
    }
    merge_applied(&mut result, config);
    unkeyed(&mut result, writer.maps, &live_order, &config_order);
    let entry = Entry {
        manager: writer.manager.to_string(),
        operation: "Apply".into(),
        subresource: writer.subresource.to_string(),
        api_version: writer.api_version.to_string(),
        time: writer.now.to_string(),
        fields: applied,
    };
    match mine {
        Some(i) => entries[i] = entry,
        None => entries.push(entry),
    }
    set_entries(&mut result, entries);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer<'a>(manager: &'a str) -> Writer<'a> {
        Writer { manager, subresource: "", api_version: "v1", now: "2024-01-01T00:00:00Z", maps: &[] }
    }

    fn managers(obj: &Value) -> Vec<(String, String)> {
        entries(obj).into_iter().map(|e| (e.manager, e.operation)).collect()
    }

    #[test]
    fn field_sets_round_trip_through_fields_v1() {
        let set = FieldSet::of_object(&json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "a", "labels": {"x": "1"}}, "data": {"k": "v"}, "list": [1]}));
        let v1 = set.to_fields_v1();
        assert_eq!(v1, json!({"f:data": {"f:k": {}}, "f:list": {}, "f:metadata": {"f:labels": {"f:x": {}}}}));
        assert_eq!(FieldSet::from_fields_v1(&v1), set);
        assert!(set.covers(&["data".into(), "k".into()]));
        assert!(set.covers(&["list".into(), "0".into()]));
        assert!(!set.covers(&["data".into(), "other".into()]));
    }

    #[test]
    fn apply_merges_removes_dropped_fields_and_detects_conflicts() {
        let first =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"a": "1", "b": "2"}});
        let obj = apply(None, &first, false, &writer("one")).unwrap();
        assert_eq!(obj["data"], json!({"a": "1", "b": "2"}));

        let mut edited = obj.clone();
        edited["data"]["c"] = json!("3");
        track_update(Some(&obj), &mut edited, &writer("editor"));
        assert_eq!(managers(&edited), vec![("one".into(), "Apply".into()), ("editor".into(), "Update".into())]);

        let second = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"a": "1"}});
        let obj = apply(Some(&edited), &second, false, &writer("one")).unwrap();
        assert_eq!(obj["data"], json!({"a": "1", "c": "3"}));

        let rival = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"c": "4"}});
        let conflicts = apply(Some(&obj), &rival, false, &writer("two")).unwrap_err();
        assert_eq!(conflicts, vec![Cause::new("FieldManagerConflict", ".data.c", "conflict with \"editor\" using v1")]);
        let forced = apply(Some(&obj), &rival, true, &writer("two")).unwrap();
        assert_eq!(forced["data"], json!({"a": "1", "c": "4"}));
        assert_eq!(managers(&forced), vec![("one".into(), "Apply".into()), ("two".into(), "Apply".into())]);
    }

    #[test]
    fn list_map_items_are_owned_and_merged_by_key() {
        let maps = [ListMap { path: vec!["status".into(), "conditions".into()], keys: vec!["type".into()] }];
        let by = |manager| Writer { maps: &maps, subresource: "status", ..writer(manager) };
        let cond = |t: &str, s: &str| json!({"type": t, "status": s});
        let base = json!({"apiVersion": "x/v1", "kind": "R", "metadata": {"name": "a"}});
        let with = |conds: Vec<Value>| {
            let mut v = base.clone();
            v["status"] = json!({"conditions": conds});
            v
        };
        let obj =
            apply(Some(&base), &with(vec![cond("Ready", "True"), cond("Accepted", "True")]), false, &by("op")).unwrap();
        let obj = apply(Some(&obj), &with(vec![cond("Progressing", "True")]), false, &by("driver")).unwrap();
        assert_eq!(
            obj["status"]["conditions"],
            json!([cond("Ready", "True"), cond("Accepted", "True"), cond("Progressing", "True")]),
            "each writer's items stand side by side, in order"
        );
        let fields = &obj["metadata"]["managedFields"][1]["fieldsV1"];
        assert_eq!(
            fields,
            &json!({"f:status": {"f:conditions": {"k:{\"type\":\"Progressing\"}": {".": {}, "f:status": {}, "f:type": {}}}}})
        );
        // A writer that stops applying an item removes it, and only its own.
        let obj = apply(Some(&obj), &with(vec![cond("Ready", "False")]), false, &by("op")).unwrap();
        assert_eq!(obj["status"]["conditions"], json!([cond("Ready", "False"), cond("Progressing", "True")]));
        // Another writer changing an owned item is a conflict.
        let err = apply(Some(&obj), &with(vec![cond("Ready", "True")]), false, &by("driver")).unwrap_err();
        assert_eq!(err[0].field, ".status.conditions.k:{\"type\":\"Ready\"}.status");
        // A merge patch (an update) of one item takes only that item.
        let mut edited = obj.clone();
        edited["status"]["conditions"][1]["status"] = json!("False");
        track_update(Some(&obj), &mut edited, &by("kubectl"));
        let kubectl = entries(&edited).into_iter().find(|e| e.manager == "kubectl").unwrap();
        assert_eq!(
            kubectl.fields.leaves(),
            vec![vec![
                "status".to_owned(),
                "conditions".into(),
                "k:{\"type\":\"Progressing\"}".into(),
                "status".into()
            ]]
        );
    }
}
