//! Writes: create, update, the patch formats and server-side apply, all through one admission
//! path (status subresource rules, pruning and strict field validation, schema validation,
//! managed fields, generation, finalizers).

use serde_json::{Value, json};

use crate::api::{ApiRequest, Reply, State, versioned};
use crate::apply::{self, Writer};
use crate::error::{ApiError, Cause};
use crate::meta;
use crate::patch::{json_patch, merge_patch, strategic_merge_patch};
use crate::resources::{self, ResourceType, Subresource};

const MERGE_PATCH: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
const STRATEGIC_MERGE_PATCH: &str = "application/strategic-merge-patch+json";
const APPLY_PATCH: &str = "application/apply-patch+yaml";

/// Metadata only the server sets; writes cannot change it.
const SERVER_METADATA: &[&str] =
    &["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"];

/// What to do with fields the schema does not know (`fieldValidation`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

/// The query options of a write.
struct WriteOptions {
    dry_run: bool,
    validation: FieldValidation,
    /// `fieldManager`, as given.
    field_manager: Option<String>,
    /// The manager of updates that name none: the client's user agent up to the first `/`.
    default_manager: String,
    force: bool,
}

impl WriteOptions {
    /// The options of the server's own writes.
    fn internal() -> Self {
        Self {
            dry_run: false,
            validation: FieldValidation::Strict,
            field_manager: None,
            default_manager: env!("CARGO_PKG_NAME").to_string(),
            force: false,
        }
    }
}

/// A write to one resource type in one namespace (empty for cluster-scoped types).
pub struct Write<'a> {
    rt: &'a ResourceType,
    namespace: &'a str,
    /// The request targets the status subresource.
    status: bool,
    opts: WriteOptions,
}

impl<'a> Write<'a> {
    /// The write a request asks for, with its `dryRun`, `fieldValidation`, `fieldManager` and
    /// `force` options.
    pub fn new(rt: &'a ResourceType, namespace: &'a str, status: bool, req: &ApiRequest) -> Result<Self, ApiError> {
        let dry_run = match req.query.get("dryRun") {
            None | Some("") => false,
            Some("All") => true,
            Some(other) => return Err(ApiError::bad_request(format!("Invalid dryRun value: {other}"))),
        };
        let validation = match req.query.get("fieldValidation") {
            None | Some("" | "Warn") => FieldValidation::Warn,
            Some("Strict") => FieldValidation::Strict,
            Some("Ignore") => FieldValidation::Ignore,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "Invalid fieldValidation value: {other}; it must be one of Ignore, Warn or Strict"
                )));
            }
        };
        let field_manager = req.query.get("fieldManager").filter(|m| !m.is_empty()).map(str::to_string);
        let default_manager = req.user_agent.split('/').next().unwrap_or("").chars().take(128).collect();
        let force = req.query.flag("force");
        let opts = WriteOptions { dry_run, validation, field_manager, default_manager, force };
        Ok(Self { rt, namespace, status, opts })
    }

    fn manager(&self) -> &str {
        self.opts.field_manager.as_deref().unwrap_or(&self.opts.default_manager)
    }

    fn writer<'w>(&'w self, api_version: &'w str, now: &'w str) -> Writer<'w> {
        let maps = self.rt.schema.as_ref().map_or(&[][..], |s| s.list_maps());
        Writer { manager: self.manager(), subresource: if self.status { "status" } else { "" }, api_version, now, maps }
    }
}

/// The outcome of a write.
pub struct Written {
    pub object: Value,
    pub created: bool,
    pub warnings: Vec<String>,
}

impl Written {
    pub fn reply(self, rt: &ResourceType, code: u16) -> Reply {
        Reply::Json { code, body: versioned(rt, self.object), warnings: self.warnings }
    }
}

/// Checks the body's type, namespace and name against the request, filling in what is missing.
fn identify(w: &Write<'_>, name: Option<&str>, obj: &mut Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    let rt = w.rt;
    let fields = meta::object_mut(obj);
    match fields.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            fields.insert("apiVersion".into(), json!(rt.api_version()));
        }
        Some(v) if v != rt.api_version() && v.split('/').next() != Some(rt.group.as_str()) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                rt.api_version()
            )));
        }
        Some(_) => {}
    }
    match fields.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            fields.insert("kind".into(), json!(rt.kind));
        }
        Some(kind) if kind != rt.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({kind}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        Some(_) => {}
    }
    let metadata = meta::meta_mut(obj);
    if rt.namespaced {
        match metadata.get("namespace").and_then(Value::as_str) {
            None | Some("") => {
                metadata.insert("namespace".into(), json!(w.namespace));
            }
            Some(ns) if ns != w.namespace => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            Some(_) => {}
        }
    } else {
        metadata.remove("namespace");
    }
    if let Some(name) = name {
        match metadata.get("name").and_then(Value::as_str) {
            None | Some("") => {
                metadata.insert("name".into(), json!(name));
            }
            Some(other) if other != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({other}) does not match the name on the URL ({name})"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// `old` with the status of `new`: what a write to the status subresource may change.
fn status_only(old: &Value, new: &Value) -> Value {
    let mut out = old.clone();
    let fields = meta::object_mut(&mut out);
    match new.get("status") {
        Some(status) => fields.insert("status".into(), status.clone()),
        None => fields.remove("status"),
    };
    for key in ["managedFields", "resourceVersion"] {
        if let Some(value) = new.pointer(&format!("/metadata/{key}")) {
            meta::meta_mut(&mut out).insert(key.into(), value.clone());
        }
    }
    out
}

/// `obj` without what changes on every write without changing the object.
fn comparable(obj: &Value) -> Value {
    let mut obj = obj.clone();
    let metadata = meta::meta_mut(&mut obj);
    metadata.remove("resourceVersion");
    if let Some(Value::Array(entries)) = metadata.get_mut("managedFields") {
        for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
            entry.remove("time");
        }
    }
    obj
}

/// Whether the desired state changed: anything but metadata and, where it is a subresource, status.
fn spec_changed(rt: &ResourceType, old: &Value, new: &Value) -> bool {
    let strip = |obj: &Value| {
        let mut obj = obj.clone();
        let fields = meta::object_mut(&mut obj);
        fields.remove("metadata");
        if rt.has(Subresource::Status) {
            fields.remove("status");
        }
        obj
    };
    strip(old) != strip(new)
}

/// The status the API server maintains for a CRD: names accepted, established.
fn crd_status(crd: &Value, old: Option<&Value>) -> Value {
    let names = crd.pointer("/spec/names").cloned().unwrap_or_else(|| json!({}));
    let old_status = old.and_then(|o| o.get("status"));
    let mut stored: Vec<Value> =
        old_status.and_then(|s| s.get("storedVersions")).and_then(Value::as_array).cloned().unwrap_or_default();
    let storage = crd.pointer("/spec/versions").and_then(Value::as_array).and_then(|versions| {
        versions.iter().find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))?.get("name").cloned()
    });
    if let Some(storage) = storage.filter(|s| !stored.contains(s)) {
        stored.push(storage);
    }
    let conditions = match old_status.and_then(|s| s.get("conditions")) {
        Some(conditions) => conditions.clone(),
        None => {
            let now = meta::now();
            json!([
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
            ])
        }
    };
    json!({"conditions": conditions, "acceptedNames": names, "storedVersions": stored})
}

/// Fields the server maintains on some built-in kinds.
fn server_fields(rt: &ResourceType, obj: &mut Value, old: Option<&Value>) {
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "namespaces") => {
            let name = meta::name(obj).to_string();
            let labels = meta::object_mut(meta::meta_mut(obj).entry("labels").or_insert(Value::Null));
            labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            if old.is_none() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            let phase = if meta::is_deleting(obj) { "Terminating" } else { "Active" };
            obj["status"] = json!({"phase": phase});
        }
        ("", "pods") if old.is_none() => {
            obj["status"] = json!({"phase": "Pending"});
        }
        ("", "secrets") if meta::str_at(obj, "/type").is_empty() => {
            obj["type"] = json!("Opaque");
        }
        ("", "services") if old.is_none() => {
            let spec = meta::object_mut(meta::object_mut(obj).entry("spec").or_insert(Value::Null));
            spec.entry("type").or_insert_with(|| json!("ClusterIP"));
            spec.entry("sessionAffinity").or_insert_with(|| json!("None"));
            if spec.get("type") != Some(&json!("ExternalName")) && !spec.contains_key("clusterIP") {
                let [a, b]: [u8; 2] = rand::random();
                let ip = format!("10.96.{a}.{}", b.max(1));
                spec.insert("clusterIP".into(), json!(ip));
                spec.insert("clusterIPs".into(), json!([ip]));
            }
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            obj["status"] = crd_status(obj, old);
        }
        _ => {}
    }
}

/// Prunes and checks `obj` against the type's rules; unknown fields become warnings or, with
/// `fieldValidation=Strict`, an error.
fn admit(w: &Write<'_>, obj: &mut Value, warnings: &mut Vec<String>) -> Result<(), ApiError> {
    let rt = w.rt;
    let mut unknown = meta::prune_unknown_metadata(obj);
    if let Some(schema) = &rt.schema {
        unknown.extend(schema.prune(obj));
    }
    let unknown: Vec<String> = unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
    match w.opts.validation {
        FieldValidation::Strict if !unknown.is_empty() => {
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
                unknown.join(", "),
                kind = rt.kind,
                version = rt.version,
            )));
        }
        FieldValidation::Warn => warnings.extend(unknown),
        _ => {}
    }
    if let Some(schema) = &rt.schema {
        schema.drop_nulls(obj);
    }
    let name = meta::name(obj);
    let mut causes = Vec::new();
    let name_error = if rt.plural == "namespaces" { meta::label_error(name) } else { meta::subdomain_error(name) };
    if let Some(why) = name_error {
        causes.push(Cause::new("FieldValueInvalid", "metadata.name", format!("Invalid value: \"{name}\": {why}")));
    }
    if let Some(schema) = &rt.schema {
        causes.extend(schema.validate(obj));
    }
    if rt.group == "apiextensions.k8s.io" {
        causes.extend(resources::crd_types(obj).err().unwrap_or_default());
    }
    if causes.is_empty() { Ok(()) } else { Err(ApiError::invalid(rt, name, causes)) }
}

impl State {
    /// Creates the namespace if it does not exist yet.
    pub fn ensure_namespace(&mut self, namespace: &str) -> Result<(), ApiError> {
        let Some(rt) = self.registry.find("", "v1", "namespaces") else { return Ok(()) };
        if self.store.get(&rt.storage(), "", namespace).is_some() {
            return Ok(());
        }
        let write = Write { rt: &rt, namespace: "", status: false, opts: WriteOptions::internal() };
        self.create(&write, json!({"metadata": {"name": namespace}}), true).map(|_| ())
    }

    /// Creates the `default` service account of a new namespace, as the service account
    /// controller does.
    fn create_default_service_account(&mut self, namespace: &str) -> Result<(), ApiError> {
        let Some(rt) = self.registry.find("", "v1", "serviceaccounts") else { return Ok(()) };
        let write = Write { rt: &rt, namespace, status: false, opts: WriteOptions::internal() };
        self.create(&write, json!({"metadata": {"name": "default"}}), true).map(|_| ())
    }

    /// Installs a CRD given at startup.
    pub fn preload_crd(&mut self, crd: Value) -> Result<(), ApiError> {
        let rt = self
            .registry
            .find("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            .ok_or_else(ApiError::path_not_found)?;
        let write = Write { rt: &rt, namespace: "", status: false, opts: WriteOptions::internal() };
        self.create(&write, crd, true).map(|_| ())
    }

    /// Creates an object (`POST`, or apply of a missing object). `track` records the creator in
    /// the managed fields; apply has done so already.
    pub fn create(&mut self, w: &Write<'_>, mut obj: Value, track: bool) -> Result<Written, ApiError> {
        identify(w, None, &mut obj)?;
        let rt = w.rt;
        let storage = rt.storage();
        let metadata = meta::meta_mut(&mut obj);
        let prefix = metadata.get("generateName").and_then(Value::as_str).unwrap_or("").to_string();
        if metadata.get("name").and_then(Value::as_str).unwrap_or("").is_empty() && !prefix.is_empty() {
            let name = (0..16)
                .map(|_| meta::generated_name(&prefix))
                .find(|name| self.store.get(&storage, w.namespace, name).is_none())
                .unwrap_or_else(|| meta::generated_name(&prefix));
            metadata.insert("name".into(), json!(name));
        }
        let name = metadata.get("name").and_then(Value::as_str).unwrap_or("").to_string();
        if name.is_empty() {
            return Err(ApiError::invalid(
                rt,
                "",
                vec![Cause::new(
                    "FieldValueRequired",
                    "metadata.name",
                    "Required value: name or generateName is required",
                )],
            ));
        }
        if self.store.get(&storage, w.namespace, &name).is_some() {
            return Err(ApiError::already_exists(rt, &name));
        }
        for key in SERVER_METADATA.iter().chain(&["resourceVersion"]) {
            metadata.remove(*key);
        }
        metadata.insert("uid".into(), json!(meta::new_uid()));
        metadata.insert("creationTimestamp".into(), json!(meta::now()));
        if rt.tracks_generation {
            metadata.insert("generation".into(), json!(1));
        }
        if rt.has(Subresource::Status) {
            meta::object_mut(&mut obj).remove("status");
        }
        server_fields(rt, &mut obj, None);
        let mut warnings = Vec::new();
        admit(w, &mut obj, &mut warnings)?;
        if track {
            let (api_version, now) = (rt.api_version(), meta::now());
            apply::track_update(None, &mut obj, &w.writer(&api_version, &now));
        }
        if w.opts.dry_run {
            return Ok(Written { object: obj, created: true, warnings });
        }
        if rt.namespaced {
            self.ensure_namespace(w.namespace)?;
        }
        let object = self.store.insert(&storage, obj);
        if rt.group.is_empty() && rt.plural == "namespaces" {
            self.create_default_service_account(&name)?;
        }
        self.sync_crds();
        Ok(Written { object, created: true, warnings })
    }

    /// Replaces an object (`PUT`).
    pub fn update(&mut self, w: &Write<'_>, name: &str, mut obj: Value) -> Result<Written, ApiError> {
        identify(w, Some(name), &mut obj)?;
        let old = self.existing(w, name)?;
        self.commit(w, old, obj, true)
    }

    fn existing(&self, w: &Write<'_>, name: &str) -> Result<Value, ApiError> {
        self.store.get(&w.rt.storage(), w.namespace, name).cloned().ok_or_else(|| ApiError::not_found(w.rt, name))
    }

    /// Patches an object in any of the patch formats; apply creates a missing object.
    pub fn patch(&mut self, w: &Write<'_>, name: &str, content_type: &str, body: &[u8]) -> Result<Written, ApiError> {
        let accepted: &[&str] = if w.rt.crd.is_some() {
            &[JSON_PATCH, MERGE_PATCH, APPLY_PATCH]
        } else {
            &[JSON_PATCH, MERGE_PATCH, APPLY_PATCH, STRATEGIC_MERGE_PATCH]
        };
        if !accepted.contains(&content_type) {
            return Err(ApiError::unsupported_media_type(content_type, accepted));
        }
        if content_type == APPLY_PATCH {
            return self.apply(w, name, body);
        }
        let patch: Value =
            serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
        let old = self.existing(w, name)?;
        let mut new = match content_type {
            JSON_PATCH => json_patch(&old, &patch).map_err(|e| ApiError::new(422, "Invalid", e))?,
            MERGE_PATCH => {
                let mut new = old.clone();
                merge_patch(&mut new, &patch);
                new
            }
            _ => {
                let mut new = old.clone();
                strategic_merge_patch(&mut new, &patch);
                new
            }
        };
        identify(w, Some(name), &mut new)?;
        self.commit(w, old, new, true)
    }

    /// Server-side apply (`application/apply-patch+yaml`).
    fn apply(&mut self, w: &Write<'_>, name: &str, body: &[u8]) -> Result<Written, ApiError> {
        let Some(manager) = w.opts.field_manager.as_deref() else {
            return Err(ApiError::bad_request(
                "PATCH, application/apply-patch+yaml: fieldManager is required for apply requests",
            ));
        };
        let mut config: Value =
            serde_yaml::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        identify(w, Some(name), &mut config)?;
        let fields = meta::object_mut(&mut config);
        if w.status {
            fields.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"));
            if let Some(metadata) = fields.get_mut("metadata").and_then(Value::as_object_mut) {
                metadata.retain(|k, _| k == "name" || k == "namespace");
            }
        } else if w.rt.has(Subresource::Status) {
            fields.remove("status");
        }
        let old = self.store.get(&w.rt.storage(), w.namespace, name).cloned();
        if w.status && old.is_none() {
            return Err(ApiError::not_found(w.rt, name));
        }
        let (api_version, now) = (w.rt.api_version(), meta::now());
        let writer = Writer { manager, ..w.writer(&api_version, &now) };
        let merged = apply::apply(old.as_ref(), &config, w.opts.force, &writer)
            .map_err(|conflicts| ApiError::apply_conflicts(w.rt, name, conflicts))?;
        match old {
            None => self.create(w, merged, false),
            Some(old) => self.commit(w, old, merged, false),
        }
    }

    /// Stores `new` in place of `old` after the update rules: optimistic concurrency, status
    /// subresource separation, admission, managed fields, generation and finalizers. A write that
    /// changes nothing returns `old` untouched.
    fn commit(&mut self, w: &Write<'_>, old: Value, mut new: Value, track: bool) -> Result<Written, ApiError> {
        let rt = w.rt;
        let name = meta::name(&old).to_string();
        let sent_version = meta::resource_version(&new);
        if !sent_version.is_empty() && sent_version != meta::resource_version(&old) {
            return Err(ApiError::stale(rt, &name));
        }
        if w.status {
            new = status_only(&old, &new);
        } else if rt.has(Subresource::Status) {
            let fields = meta::object_mut(&mut new);
            match old.get("status") {
                Some(status) => fields.insert("status".into(), status.clone()),
                None => fields.remove("status"),
            };
        }
        let metadata = meta::meta_mut(&mut new);
        for key in SERVER_METADATA {
            match old.pointer(&format!("/metadata/{key}")) {
                Some(value) => metadata.insert(key.to_string(), value.clone()),
                None => metadata.remove(*key),
            };
        }
        metadata.insert("resourceVersion".into(), json!(meta::resource_version(&old)));
        server_fields(rt, &mut new, Some(&old));
        let mut warnings = Vec::new();
        admit(w, &mut new, &mut warnings)?;
        if track {
            let (api_version, now) = (rt.api_version(), meta::now());
            apply::track_update(Some(&old), &mut new, &w.writer(&api_version, &now));
        }
        if comparable(&old) == comparable(&new) {
            return Ok(Written { object: old, created: false, warnings });
        }
        if rt.tracks_generation && spec_changed(rt, &old, &new) {
            let generation = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0) + 1;
            meta::meta_mut(&mut new).insert("generation".into(), json!(generation));
        }
        if meta::is_deleting(&old) {
            let before = meta::finalizers(&old);
            let added: Vec<&str> = meta::finalizers(&new).into_iter().filter(|f| !before.contains(f)).collect();
            if !added.is_empty() {
                return Err(ApiError::invalid(
                    rt,
                    &name,
                    vec![Cause::new(
                        "FieldValueForbidden",
                        "metadata.finalizers",
                        format!(
                            "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
                        ),
                    )],
                ));
            }
        }
        if w.opts.dry_run {
            return Ok(Written { object: new, created: false, warnings });
        }
        let storage = rt.storage();
        let object = if meta::is_deleting(&new) && meta::finalizers(&new).is_empty() {
            self.store.finalize(&storage, new)
        } else {
            self.store.replace(&storage, new)
        };
        self.sync_crds();
        Ok(Written { object, created: false, warnings })
    }
}
