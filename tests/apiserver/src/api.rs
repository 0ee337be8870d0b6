//! The API: the server's state and the dispatch of each request to discovery, OpenAPI, or a verb
//! on a resource (reads, watches and deletes here; writes in `write`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use serde_json::{Value, json};

use crate::admission;
use crate::auth::Tokens;
use crate::error::ApiError;
use crate::meta;
use crate::resources::{GroupResource, Registry, ResourceType, Subresource};
use crate::router::{self, Query, ResourcePath, Route};
use crate::selector::{FieldSelector, LabelSelector, Selectors};
use crate::store::{Deletion, Store};
use crate::watch::{Watch, WatchParams};
use crate::write::Write;
use crate::{discovery, openapi};

/// Namespaces the API server refuses to delete.
const PROTECTED_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

/// Everything the server knows.
pub struct State {
    pub store: Store,
    pub registry: Registry,
    pub tokens: Tokens,
    /// Every request served, as `(method, path?query)`: the audit log.
    pub audit: Vec<(String, String)>,
    addr: SocketAddr,
}

/// A request, read in full.
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub query: Query,
    /// The media type of the body, lowercased, without parameters.
    pub content_type: String,
    pub user_agent: String,
    pub body: Bytes,
}

/// What to answer.
pub enum Reply {
    Json { code: u16, body: Value, warnings: Vec<String> },
    Text(&'static str),
    Watch(Watch),
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self::Json { code: 200, body, warnings: Vec::new() }
    }

    pub fn error(error: ApiError) -> Self {
        Self::Json { code: error.code, body: error.to_status(), warnings: Vec::new() }
    }
}

impl State {
    pub fn new(addr: SocketAddr) -> Self {
        let mut state =
            Self { store: Store::new(), registry: Registry::new(), tokens: Tokens::default(), audit: vec![], addr };
        for namespace in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            // The names are valid, so creating them cannot fail.
            let _ = state.ensure_namespace(namespace);
        }
        state
    }

    pub fn handle(&mut self, req: &ApiRequest) -> Reply {
        let read = |document: Option<Value>| match (&req.method, document) {
            (&Method::GET, Some(document)) => Reply::ok(document),
            (&Method::GET, None) => Reply::error(ApiError::path_not_found()),
            _ => Reply::error(ApiError::method_not_allowed()),
        };
        match router::route(&req.path) {
            Route::Version => read(Some(discovery::version())),
            Route::Health => Reply::Text("ok"),
            Route::CoreVersions => read(Some(discovery::core_versions(self.addr))),
            Route::Groups => read(Some(discovery::group_list(&self.registry))),
            Route::Group(group) => read(discovery::group(&self.registry, &group)),
            Route::Resources { group, version } => read(discovery::resource_list(&self.registry, &group, &version)),
            Route::OpenApiIndex => read(Some(openapi::index(&self.registry))),
            Route::OpenApi { group, version } => read(openapi::document(&self.registry, &group, &version)),
            Route::Resource(path) => self.resource(req, &path).unwrap_or_else(Reply::error),
            Route::NotFound => Reply::error(ApiError::path_not_found()),
        }
    }

    /// The mutating webhooks a request goes through; `None` when it is no create or no webhook
    /// takes it.
    pub fn admission(&self, req: &ApiRequest) -> Option<admission::Pending> {
        let Route::Resource(path) = router::route(&req.path) else { return None };
        if req.method != Method::POST || path.name.is_some() || path.subresource.is_some() {
            return None;
        }
        let rt = self.registry.find(&path.group, &path.version, &path.plural)?;
        let hooks = GroupResource::new("admissionregistration.k8s.io", "mutatingwebhookconfigurations");
        let configurations: Vec<Value> = self.store.list(&hooks, None).cloned().collect();
        if configurations.is_empty() {
            return None;
        }
        let object = json_body(req).ok()?;
        let ns = path.namespace.clone().unwrap_or_default();
        let ns_labels = self
            .store
            .get(&GroupResource::new("", "namespaces"), "", &ns)
            .map(|n| n["metadata"]["labels"].clone())
            .unwrap_or_else(|| json!({"kubernetes.io/metadata.name": ns}));
        let calls = admission::calls(&configurations, (&rt.group, &rt.version, &rt.plural), &object, &ns_labels);
        let kind = (rt.group.clone(), rt.version.clone(), rt.kind.clone());
        let resource = rt.plural.clone();
        (!calls.is_empty()).then_some(admission::Pending { calls, object, kind, resource, namespace: ns })
    }

    fn resource(&mut self, req: &ApiRequest, path: &ResourcePath) -> Result<Reply, ApiError> {
        let rt = self.registry.find(&path.group, &path.version, &path.plural).ok_or_else(ApiError::path_not_found)?;
        if path.namespace.is_some() && !rt.namespaced {
            return Err(ApiError::path_not_found());
        }
        let subresource = match path.subresource.as_deref() {
            None => None,
            Some(name) => {
                Some(rt.subresources.iter().copied().find(|s| s.name() == name).ok_or_else(ApiError::path_not_found)?)
            }
        };
        let namespace = path.namespace.as_deref();
        if rt.namespaced && namespace.is_none() && (path.name.is_some() || req.method != Method::GET) {
            return Err(if path.name.is_some() { ApiError::path_not_found() } else { ApiError::method_not_allowed() });
        }
        let ns = namespace.unwrap_or("");
        let allowed = |verb: &str| if rt.verbs.contains(&verb) { Ok(()) } else { Err(ApiError::method_not_allowed()) };
        let watching = path.watch || req.query.flag("watch");
        match (&req.method, path.name.as_deref(), subresource) {
            (&Method::GET, None, None) if watching => {
                allowed("watch")?;
                self.watch(rt, namespace, selectors(&req.query, None)?, &req.query)
            }
            (&Method::GET, Some(name), None) if watching => {
                allowed("watch")?;
                self.watch(rt, namespace, selectors(&req.query, Some(name))?, &req.query)
            }
            (&Method::GET, None, None) => {
                allowed("list")?;
                Ok(Reply::ok(self.list(&rt, namespace, &selectors(&req.query, None)?)))
            }
            (&Method::GET, Some(name), None | Some(Subresource::Status)) => {
                allowed("get")?;
                let obj = self.store.get(&rt.storage(), ns, name).ok_or_else(|| ApiError::not_found(&rt, name))?;
                Ok(Reply::ok(versioned(&rt, obj.clone())))
            }
            (&Method::POST, None, None) if rt.group == "authentication.k8s.io" && rt.plural == "tokenreviews" => {
                let review = self.tokens.review(&self.store, &json_body(req)?);
                Ok(Reply::Json { code: 201, body: review, warnings: Vec::new() })
            }
            (&Method::POST, None, None) => {
                allowed("create")?;
                let written = self.create(&Write::new(&rt, ns, false, req)?, json_body(req)?, true)?;
                Ok(written.reply(&rt, 201))
            }
            (&Method::POST, Some(name), Some(Subresource::Token)) => {
                let token = self.tokens.request(&self.registry, &self.store, ns, name, &json_body(req)?)?;
                Ok(Reply::Json { code: 201, body: token, warnings: Vec::new() })
            }
            (&Method::PUT, Some(name), sub @ (None | Some(Subresource::Status))) => {
                allowed("update")?;
                let written = self.update(&Write::new(&rt, ns, sub.is_some(), req)?, name, json_body(req)?)?;
                Ok(written.reply(&rt, 200))
            }
            (&Method::PATCH, Some(name), sub @ (None | Some(Subresource::Status))) => {
                allowed("patch")?;
                let write = Write::new(&rt, ns, sub.is_some(), req)?;
                let written = self.patch(&write, name, &req.content_type, &req.body)?;
                let code = if written.created { 201 } else { 200 };
                Ok(written.reply(&rt, code))
            }
            (&Method::DELETE, Some(name), None) => {
                allowed("delete")?;
                self.delete(&rt, ns, name, req)
            }
            (&Method::DELETE, None, None) => {
                allowed("deletecollection")?;
                self.delete_collection(&rt, namespace, req)
            }
            _ => Err(ApiError::method_not_allowed()),
        }
    }

    fn list(&self, rt: &ResourceType, namespace: Option<&str>, selectors: &Selectors) -> Value {
        let items: Vec<Value> = self
            .store
            .list(&rt.storage(), namespace)
            .filter(|o| selectors.matches(o))
            .map(|o| versioned(rt, o.clone()))
            .collect();
        json!({
            "kind": rt.list_kind,
            "apiVersion": rt.api_version(),
            "metadata": {"resourceVersion": self.store.resource_version().to_string()},
            "items": items,
        })
    }

    fn watch(
        &self,
        rt: Arc<ResourceType>,
        namespace: Option<&str>,
        selectors: Selectors,
        query: &Query,
    ) -> Result<Reply, ApiError> {
        let timeout = match query.get("timeoutSeconds") {
            None => None,
            Some(seconds) => Some(Duration::from_secs(seconds.parse().map_err(|_| {
                ApiError::bad_request(format!("timeoutSeconds: Invalid value: \"{seconds}\": must be a number"))
            })?)),
        };
        let params = WatchParams {
            resource_version: query.get("resourceVersion").map(str::to_string),
            allow_bookmarks: query.flag("allowWatchBookmarks"),
            timeout,
            send_initial_events: query.flag("sendInitialEvents"),
        };
        Ok(Reply::Watch(Watch::start(&self.store, rt, namespace.map(str::to_string), selectors, params)?))
    }

    fn delete(&mut self, rt: &ResourceType, namespace: &str, name: &str, req: &ApiRequest) -> Result<Reply, ApiError> {
        let options = DeleteOptions::read(req)?;
        let obj = self.store.get(&rt.storage(), namespace, name).ok_or_else(|| ApiError::not_found(rt, name))?;
        options.check_preconditions(rt, obj)?;
        if rt.group.is_empty() && rt.plural == "namespaces" && PROTECTED_NAMESPACES.contains(&name) {
            return Err(ApiError::forbidden(rt, name, "this namespace may not be deleted"));
        }
        if options.dry_run {
            return Ok(Reply::ok(versioned(rt, obj.clone())));
        }
        let uid = meta::uid(obj).to_string();
        if options.orphan {
            self.store.orphan_dependents(&uid);
        }
        let deletion = self.store.delete(&rt.storage(), namespace, name);
        self.sync_crds();
        Ok(match deletion {
            Some(Deletion::Pending(obj)) => Reply::ok(versioned(rt, obj)),
            Some(Deletion::Removed(obj)) if rt.group.is_empty() && rt.plural == "pods" => Reply::ok(versioned(rt, obj)),
            Some(Deletion::Removed(_)) | None => {
                let mut details = json!({"name": name, "kind": rt.plural, "uid": uid});
                if !rt.group.is_empty() {
                    details["group"] = json!(rt.group);
                }
                Reply::ok(
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
                )
            }
        })
    }

    fn delete_collection(
        &mut self,
        rt: &ResourceType,
        namespace: Option<&str>,
        req: &ApiRequest,
    ) -> Result<Reply, ApiError> {
        let options = DeleteOptions::read(req)?;
        let selectors = selectors(&req.query, None)?;
        let storage = rt.storage();
        let doomed: Vec<(String, String)> = self
            .store
            .list(&storage, namespace)
            .filter(|o| selectors.matches(o))
            .map(|o| (meta::namespace(o).to_string(), meta::name(o).to_string()))
            .collect();
        let mut deleted = Vec::new();
        for (ns, name) in doomed {
            if options.dry_run {
                deleted.extend(self.store.get(&storage, &ns, &name).cloned());
                continue;
            }
            if options.orphan {
                let uid = self.store.get(&storage, &ns, &name).map(|o| meta::uid(o).to_string()).unwrap_or_default();
                self.store.orphan_dependents(&uid);
            }
            match self.store.delete(&storage, &ns, &name) {
                Some(Deletion::Pending(obj) | Deletion::Removed(obj)) => deleted.push(versioned(rt, obj)),
                None => {}
            }
        }
        self.sync_crds();
        Ok(Reply::ok(json!({
            "kind": rt.list_kind,
            "apiVersion": rt.api_version(),
            "metadata": {"resourceVersion": self.store.resource_version().to_string()},
            "items": deleted,
        })))
    }

    /// Serves the types of new and changed CRDs and stops serving (and purges) those of deleted ones.
    pub fn sync_crds(&mut self) {
        let crds = GroupResource::new("apiextensions.k8s.io", "customresourcedefinitions");
        let current: Vec<Value> = self.store.list(&crds, None).cloned().collect();
        for crd in &current {
            let (name, rv) = (meta::name(crd), meta::resource_version(crd));
            if self.registry.installed().any(|(n, r)| n == name && r == rv) {
                continue;
            }
            if let Ok(types) = crate::resources::crd_types(crd) {
                self.registry.install(name, rv, types);
            }
        }
        let gone: Vec<String> = self
            .registry
            .installed()
            .filter(|(name, _)| !current.iter().any(|c| meta::name(c) == *name))
            .map(|(name, _)| name.to_string())
            .collect();
        for name in gone {
            if let Some(storage) = self.registry.uninstall(&name) {
                self.store.purge(&storage);
            }
        }
    }
}

/// `obj` as the requested version of its resource.
pub fn versioned(rt: &ResourceType, mut obj: Value) -> Value {
    meta::object_mut(&mut obj).insert("apiVersion".into(), json!(rt.api_version()));
    obj
}

/// The request body of a create or update: JSON, YAML, or the protobuf of kubectl's typed clients.
fn json_body(req: &ApiRequest) -> Result<Value, ApiError> {
    const ACCEPTED: &[&str] = &["application/json", "application/yaml", "application/vnd.kubernetes.protobuf"];
    let parsed = match req.content_type.as_str() {
        "" | "application/json" | "*/*" => serde_json::from_slice(&req.body).map_err(|e| e.to_string()),
        "application/yaml" => serde_yaml::from_slice(&req.body).map_err(|e| e.to_string()),
        "application/vnd.kubernetes.protobuf" => {
            return crate::protobuf::decode(&req.body).map_err(|e| ApiError::new(415, "UnsupportedMediaType", e));
        }
        other => return Err(ApiError::unsupported_media_type(other, ACCEPTED)),
    };
    parsed.map_err(|e| ApiError::bad_request(format!("the request body could not be decoded: {e}")))
}

fn selectors(query: &Query, name: Option<&str>) -> Result<Selectors, ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or("")).map_err(ApiError::bad_request)?;
    let mut fields = query.get("fieldSelector").unwrap_or("").to_string();
    if let Some(name) = name {
        fields =
            if fields.is_empty() { format!("metadata.name={name}") } else { format!("{fields},metadata.name={name}") };
    }
    let fields = FieldSelector::parse(&fields).map_err(ApiError::bad_request)?;
    Ok(Selectors { labels, fields })
}

/// `DeleteOptions`, from the body and the query.
struct DeleteOptions {
    dry_run: bool,
    orphan: bool,
    uid: Option<String>,
    resource_version: Option<String>,
}

impl DeleteOptions {
    fn read(req: &ApiRequest) -> Result<Self, ApiError> {
        let body: Value = if req.body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
        };
        let text = |pointer: &str| body.pointer(pointer).and_then(Value::as_str).map(str::to_string);
        let policy = text("/propagationPolicy").or_else(|| req.query.get("propagationPolicy").map(str::to_string));
        let orphan_flag =
            body.get("orphanDependents").and_then(Value::as_bool) == Some(true) || req.query.flag("orphanDependents");
        let dry_run = body.get("dryRun").and_then(Value::as_array).is_some_and(|d| d.iter().any(|v| v == "All"))
            || req.query.get("dryRun") == Some("All");
        Ok(Self {
            dry_run,
            orphan: policy.as_deref() == Some("Orphan") || orphan_flag,
            uid: text("/preconditions/uid"),
            resource_version: text("/preconditions/resourceVersion"),
        })
    }

    fn check_preconditions(&self, rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
        let checks = [
            ("UID", &self.uid, meta::uid(obj)),
            ("ResourceVersion", &self.resource_version, meta::resource_version(obj)),
        ];
        for (what, wanted, actual) in checks {
            if let Some(wanted) = wanted.as_deref().filter(|w| *w != actual) {
                return Err(ApiError::conflict(
                    rt,
                    meta::name(obj),
                    &format!("Precondition failed: {what} in precondition: {wanted}, {what} in object meta: {actual}"),
                ));
            }
        }
        Ok(())
    }
}
