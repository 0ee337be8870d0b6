//! OpenAPI v3: the index at `/openapi/v3` and one document per group version. Custom resources
//! are described by their CRD schema; built-in kinds by a permissive object schema. Every PATCH
//! operation declares `fieldValidation`, which tells kubectl to validate on the server.

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::discovery::KUBERNETES_MINOR;
use crate::resources::{Registry, ResourceType, Subresource};

const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1";

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn query(name: &str, ty: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": ty, "uniqueItems": true}})
}

fn write_params() -> Vec<Value> {
    vec![
        query("dryRun", "string", "When present, indicates that modifications should not be persisted."),
        query("fieldManager", "string", "A name associated with the actor or entity that is making these changes."),
        query(
            "fieldValidation",
            "string",
            "How to handle unknown fields in the request: Ignore, Warn (the default) or Strict.",
        ),
    ]
}

fn list_params() -> Vec<Value> {
    [
        ("allowWatchBookmarks", "boolean"),
        ("continue", "string"),
        ("fieldSelector", "string"),
        ("labelSelector", "string"),
        ("limit", "integer"),
        ("resourceVersion", "string"),
        ("resourceVersionMatch", "string"),
        ("sendInitialEvents", "boolean"),
        ("timeoutSeconds", "integer"),
        ("watch", "boolean"),
    ]
    .iter()
    .map(|(name, ty)| query(name, ty, ""))
    .collect()
}

fn gvk(rt: &ResourceType, kind: &str) -> Value {
    json!({"group": rt.group, "version": rt.version, "kind": kind})
}

fn json_content(schema: Value, types: &[&str]) -> Value {
    Value::Object(types.iter().map(|t| (t.to_string(), json!({"schema": schema.clone()}))).collect())
}

fn operation(rt: &ResourceType, action: &str, id: &str, params: Vec<Value>, body: Option<Value>, reply: &str) -> Value {
    let mut op = json!({
        "tags": [rt.api_version()],
        "operationId": id,
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": json_content(schema_ref(reply), &["application/json", "application/yaml"])}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk(rt, &rt.kind),
    });
    if let Some(body) = body {
        op["requestBody"] = body;
    }
    op
}

/// The operations of one resource type, by path.
fn paths(rt: &ResourceType, out: &mut Map<String, Value>) {
    let prefix = if rt.group.is_empty() { "/api/v1".to_string() } else { format!("/apis/{}", rt.api_version()) };
    let scope = if rt.namespaced { format!("{prefix}/namespaces/{{namespace}}") } else { prefix.clone() };
    let id = |verb: &str| format!("{verb}{}", rt.kind);
    let name_param = json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}});
    let namespace_param = json!({"name": "namespace", "in": "path", "required": true, "schema": {"type": "string"}});
    let scope_params = if rt.namespaced { vec![namespace_param] } else { Vec::new() };
    let object_params: Vec<Value> = scope_params.iter().cloned().chain([name_param]).collect();
    let body = json!({"content": json_content(schema_ref(&rt.definition), &["application/json", "application/yaml"]), "required": true});
    let patch_body = json!({"content": json_content(
        schema_ref(&format!("{META}.Patch")),
        &["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"],
    ), "required": true});
    let mut patch_params = write_params();
    patch_params.push(query("force", "boolean", "Force is going to \"force\" Apply requests."));
    let list = format!("{}List", rt.definition);

    if rt.verbs == ["create"] {
        out.insert(
            format!("{scope}/{}", rt.plural),
            json!({"post": operation(rt, "post", &id("create"), write_params(), Some(body), &rt.definition), "parameters": scope_params}),
        );
        return;
    }
    out.insert(
        format!("{scope}/{}", rt.plural),
        json!({
            "get": operation(rt, "list", &id("list"), list_params(), None, &list),
            "post": operation(rt, "post", &id("create"), write_params(), Some(body.clone()), &rt.definition),
            "parameters": scope_params,
        }),
    );
    if rt.namespaced {
        out.insert(
            format!("{prefix}/{}", rt.plural),
            json!({"get": operation(rt, "list", &id("listAllNamespaces"), list_params(), None, &list)}),
        );
    }
    out.insert(
        format!("{scope}/{}/{{name}}", rt.plural),
        json!({
            "get": operation(rt, "get", &id("read"), Vec::new(), None, &rt.definition),
            "put": operation(rt, "put", &id("replace"), write_params(), Some(body.clone()), &rt.definition),
            "patch": operation(rt, "patch", &id("patch"), patch_params.clone(), Some(patch_body.clone()), &rt.definition),
            "delete": operation(rt, "delete", &id("delete"), vec![
                query("dryRun", "string", ""),
                query("gracePeriodSeconds", "integer", ""),
                query("propagationPolicy", "string", ""),
            ], None, &format!("{META}.Status")),
            "parameters": object_params.clone(),
        }),
    );
    if rt.has(Subresource::Status) {
        out.insert(
            format!("{scope}/{}/{{name}}/status", rt.plural),
            json!({
                "get": operation(rt, "get", &id("readStatus"), Vec::new(), None, &rt.definition),
                "put": operation(rt, "put", &id("replaceStatus"), write_params(), Some(body), &rt.definition),
                "patch": operation(rt, "patch", &id("patchStatus"), patch_params, Some(patch_body), &rt.definition),
                "parameters": object_params,
            }),
        );
    }
}

/// The component schemas of one resource type: the object and its list.
fn schemas(rt: &ResourceType, out: &mut Map<String, Value>) {
    let mut object = match &rt.schema {
        Some(schema) => schema.raw().clone(),
        None => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
    };
    let fields = crate::meta::object_mut(&mut object);
    let properties = crate::meta::object_mut(fields.entry("properties").or_insert(Value::Null));
    properties.insert("apiVersion".into(), json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
    properties.insert("kind".into(), json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
    properties.insert("metadata".into(), json!({"allOf": [schema_ref(&format!("{META}.ObjectMeta"))], "default": {}}));
    fields.insert("x-kubernetes-group-version-kind".into(), json!([gvk(rt, &rt.kind)]));
    out.insert(rt.definition.clone(), object);
    out.insert(
        format!("{}List", rt.definition),
        json!({
            "type": "object",
            "required": ["items"],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "items": {"type": "array", "items": {"allOf": [schema_ref(&rt.definition)], "default": {}}},
                "metadata": {"allOf": [schema_ref(&format!("{META}.ListMeta"))], "default": {}},
            },
            "x-kubernetes-group-version-kind": [gvk(rt, &rt.list_kind)],
        }),
    );
}

/// The apimachinery types every document refers to.
fn meta_schemas(out: &mut Map<String, Value>) {
    let string_map = json!({"type": "object", "additionalProperties": {"type": "string", "default": ""}});
    out.insert(
        format!("{META}.ObjectMeta"),
        json!({
            "type": "object",
            "description": "ObjectMeta is metadata that all persisted resources must have.",
            "properties": {
                "name": {"type": "string"},
                "generateName": {"type": "string"},
                "namespace": {"type": "string"},
                "uid": {"type": "string"},
                "resourceVersion": {"type": "string"},
                "generation": {"type": "integer", "format": "int64"},
                "creationTimestamp": {"type": "string", "format": "date-time"},
                "deletionTimestamp": {"type": "string", "format": "date-time"},
                "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
                "labels": string_map,
                "annotations": string_map,
                "finalizers": {"type": "array", "items": {"type": "string", "default": ""}},
                "ownerReferences": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "managedFields": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "selfLink": {"type": "string"},
            },
        }),
    );
    out.insert(
        format!("{META}.ListMeta"),
        json!({"type": "object", "properties": {"resourceVersion": {"type": "string"}, "continue": {"type": "string"}, "remainingItemCount": {"type": "integer"}}}),
    );
    out.insert(format!("{META}.Patch"), json!({"type": "object", "description": "Patch is provided to give a concrete name and type to the Kubernetes PATCH request body."}));
    out.insert(
        format!("{META}.Status"),
        json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true, "x-kubernetes-group-version-kind": [{"group": "", "kind": "Status", "version": "v1"}]}),
    );
}

/// The OpenAPI document of a group version (`""` for the core group), if it is served.
pub fn document(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let types = registry.in_group_version(group, version);
    if types.is_empty() {
        return None;
    }
    let (mut paths_out, mut schemas_out) = (Map::new(), Map::new());
    meta_schemas(&mut schemas_out);
    for rt in &types {
        paths(rt, &mut paths_out);
        schemas(rt, &mut schemas_out);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v1.{KUBERNETES_MINOR}.0")},
        "paths": paths_out,
        "components": {"schemas": schemas_out},
    }))
}

/// `/openapi/v3`: where each group version's document is, with a hash of its content.
pub fn index(registry: &Registry) -> Value {
    let mut group_versions = vec![(String::new(), "v1".to_string())];
    for (group, versions) in registry.groups() {
        group_versions.extend(versions.into_iter().map(|v| (group.clone(), v)));
    }
    let mut paths = Map::new();
    for (group, version) in group_versions {
        let Some(doc) = document(registry, &group, &version) else { continue };
        let path = if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") };
        let hash: String = Sha256::digest(doc.to_string()).iter().map(|b| format!("{b:02X}")).collect();
        paths.insert(path.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}));
    }
    json!({"paths": paths})
}
