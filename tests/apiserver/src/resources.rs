//! The served resource types: the built-in ones and those the installed CRDs define.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::error::Cause;
use crate::schema::Schema;

/// The verbs of an ordinary stored resource.
const ALL_VERBS: &[&str] = &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

/// A subresource served below an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    /// `.../{name}/status`: reads and writes only `.status`.
    Status,
    /// `serviceaccounts/{name}/token`: issues tokens (`TokenRequest`).
    Token,
}

impl Subresource {
    pub fn name(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Token => "token",
        }
    }
}

/// A group, version and resource this server serves, with what discovery says about it.
#[derive(Debug)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub verbs: &'static [&'static str],
    pub subresources: Vec<Subresource>,
    /// Whether `metadata.generation` counts changes of the desired state.
    pub tracks_generation: bool,
    /// The validation schema of a custom resource.
    pub schema: Option<Arc<Schema>>,
    /// The name of the CRD that defines this type, for custom resources.
    pub crd: Option<String>,
    /// The name of the type's schema in the OpenAPI documents.
    pub definition: String,
}

impl ResourceType {
    /// `group/version`, or just the version for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    /// `resource.group` as in error messages (`llmroutes.bulwark.dev`, `pods`).
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    /// The storage key shared by all versions of the resource.
    pub fn storage(&self) -> GroupResource {
        GroupResource { group: self.group.clone(), resource: self.plural.clone() }
    }

    pub fn has(&self, subresource: Subresource) -> bool {
        self.subresources.contains(&subresource)
    }
}

/// The key objects are stored under, independent of the version they were written with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupResource {
    pub group: String,
    pub resource: String,
}

impl GroupResource {
    pub fn new(group: &str, resource: &str) -> Self {
        Self { group: group.to_string(), resource: resource.to_string() }
    }
}

/// The built-in resource types.
fn builtins() -> Vec<ResourceType> {
    let core = |plural: &str, kind: &str, short: &[&str]| {
        builtin("", "v1", plural, kind, true, short, &format!("io.k8s.api.core.v1.{kind}"))
    };
    let with = |mut rt: ResourceType, subresources: &[Subresource], categories: &[&str]| {
        rt.subresources = subresources.to_vec();
        rt.categories = categories.iter().map(|c| c.to_string()).collect();
        rt
    };
    let mut namespaces = with(
        builtin("", "v1", "namespaces", "Namespace", false, &["ns"], "io.k8s.api.core.v1.Namespace"),
        &[Subresource::Status],
        &[],
    );
    namespaces.verbs = &["create", "delete", "get", "list", "patch", "update", "watch"];
    let mut pods = with(core("pods", "Pod", &["po"]), &[Subresource::Status], &["all"]);
    pods.tracks_generation = true;
    let mut crds = builtin(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
        "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition",
    );
    crds.subresources = vec![Subresource::Status];
    crds.tracks_generation = true;
    let mut token_reviews = builtin(
        "authentication.k8s.io",
        "v1",
        "tokenreviews",
        "TokenReview",
        false,
        &[],
        "io.k8s.api.authentication.v1.TokenReview",
    );
    token_reviews.verbs = &["create"];
    let webhooks = builtin(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        false,
        &[],
        "io.k8s.api.admissionregistration.v1.MutatingWebhookConfiguration",
    );
    // The kinds a ModelServer runs on (no controllers act on them here: tests set their status).
    let workload = |group: &str, version: &str, plural: &str, kind: &str, short: &[&str], package: &str| {
        let mut rt = with(
            builtin(group, version, plural, kind, true, short, &format!("io.k8s.api.{package}.{kind}")),
            &[Subresource::Status],
            &["all"],
        );
        rt.tracks_generation = true;
        rt
    };
    vec![
        namespaces,
        pods,
        workload("apps", "v1", "deployments", "Deployment", &["deploy"], "apps.v1"),
        workload(
            "autoscaling",
            "v2",
            "horizontalpodautoscalers",
            "HorizontalPodAutoscaler",
            &["hpa"],
            "autoscaling.v2",
        ),
        workload("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", &["pdb"], "policy.v1"),
        core("configmaps", "ConfigMap", &["cm"]),
        core("secrets", "Secret", &[]),
        with(core("services", "Service", &["svc"]), &[Subresource::Status], &["all"]),
        with(core("serviceaccounts", "ServiceAccount", &["sa"]), &[Subresource::Token], &[]),
        core("events", "Event", &["ev"]),
        builtin("events.k8s.io", "v1", "events", "Event", true, &["ev"], "io.k8s.api.events.v1.Event"),
        builtin("coordination.k8s.io", "v1", "leases", "Lease", true, &[], "io.k8s.api.coordination.v1.Lease"),
        crds,
        token_reviews,
        webhooks,
    ]
}

fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short_names: &[&str],
    definition: &str,
) -> ResourceType {
    ResourceType {
        group: group.to_string(),
        version: version.to_string(),
        plural: plural.to_string(),
        singular: kind.to_lowercase(),
        kind: kind.to_string(),
        list_kind: format!("{kind}List"),
        namespaced,
        short_names: short_names.iter().map(|s| s.to_string()).collect(),
        categories: Vec::new(),
        verbs: ALL_VERBS,
        subresources: Vec::new(),
        tracks_generation: false,
        schema: None,
        crd: None,
        definition: definition.to_string(),
    }
}

/// The resource types a `CustomResourceDefinition` defines, one per served version, or what is
/// wrong with it.
pub fn crd_types(crd: &Value) -> Result<Vec<ResourceType>, Vec<Cause>> {
    let text = |pointer: &str| crd.pointer(pointer).and_then(Value::as_str).unwrap_or("").to_string();
    let group = text("/spec/group");
    let plural = text("/spec/names/plural");
    let kind = text("/spec/names/kind");
    let scope = text("/spec/scope");
    let mut causes = Vec::new();
    for (field, value) in [("spec.group", &group), ("spec.names.plural", &plural), ("spec.names.kind", &kind)] {
        if value.is_empty() {
            causes.push(Cause::new("FieldValueRequired", field, "Required value"));
        }
    }
    if scope != "Namespaced" && scope != "Cluster" {
        causes.push(Cause::new(
            "FieldValueNotSupported",
            "spec.scope",
            format!("Unsupported value: \"{scope}\": supported values: \"Cluster\", \"Namespaced\""),
        ));
    }
    let name = text("/metadata/name");
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::new(
            "FieldValueInvalid",
            "metadata.name",
            format!("Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array).cloned().unwrap_or_default();
    if versions.iter().filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true)).count() != 1 {
        causes.push(Cause::new(
            "FieldValueInvalid",
            "spec.versions",
            "Invalid value: []: must have exactly one version marked as storage version",
        ));
    }
    let names = |pointer: &str| -> Vec<String> {
        crd.pointer(pointer)
            .and_then(Value::as_array)
            .map(|list| list.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    };
    let mut types = Vec::new();
    for (i, version) in versions.iter().enumerate() {
        let version_name = version.get("name").and_then(Value::as_str).unwrap_or("").to_string();
        let schema = match version.pointer("/schema/openAPIV3Schema") {
            None => None,
            Some(raw) => match Schema::compile(raw) {
                Ok(schema) => Some(Arc::new(schema)),
                Err(e) => {
                    causes.push(Cause::new(
                        "FieldValueInvalid",
                        format!("spec.versions[{i}].schema.openAPIV3Schema"),
                        format!("Invalid value: \"\": {e}"),
                    ));
                    None
                }
            },
        };
        if version.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let singular = text("/spec/names/singular");
        let list_kind = text("/spec/names/listKind");
        let reversed_group: Vec<&str> = group.split('.').rev().collect();
        types.push(ResourceType {
            group: group.clone(),
            version: version_name.clone(),
            plural: plural.clone(),
            singular: if singular.is_empty() { kind.to_lowercase() } else { singular },
            kind: kind.clone(),
            list_kind: if list_kind.is_empty() { format!("{kind}List") } else { list_kind },
            namespaced: scope == "Namespaced",
            short_names: names("/spec/names/shortNames"),
            categories: names("/spec/names/categories"),
            verbs: ALL_VERBS,
            subresources: if version.pointer("/subresources/status").is_some() {
                vec![Subresource::Status]
            } else {
                Vec::new()
            },
            tracks_generation: true,
            schema,
            crd: Some(name.clone()),
            definition: format!("{}.{version_name}.{kind}", reversed_group.join(".")),
        });
    }
    if causes.is_empty() { Ok(types) } else { Err(causes) }
}

/// A CRD whose types are being served, and the resource version they were built from.
struct Installed {
    resource_version: String,
    types: Vec<Arc<ResourceType>>,
}

/// Every served resource type.
pub struct Registry {
    builtins: Vec<Arc<ResourceType>>,
    crds: BTreeMap<String, Installed>,
}

impl Registry {
    pub fn new() -> Self {
        Self { builtins: builtins().into_iter().map(Arc::new).collect(), crds: BTreeMap::new() }
    }

    /// All served types, built-in ones first.
    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.builtins.iter().chain(self.crds.values().flat_map(|c| c.types.iter()))
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.all().find(|rt| rt.group == group && rt.version == version && rt.plural == plural).cloned()
    }

    /// The served API groups (without the core group) with their versions, in discovery order.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for rt in self.all().filter(|rt| !rt.group.is_empty()) {
            match groups.iter_mut().find(|(g, _)| *g == rt.group) {
                Some((_, versions)) if !versions.contains(&rt.version) => versions.push(rt.version.clone()),
                Some(_) => {}
                None => groups.push((rt.group.clone(), vec![rt.version.clone()])),
            }
        }
        groups
    }

    /// The types served in one group version.
    pub fn in_group_version(&self, group: &str, version: &str) -> Vec<Arc<ResourceType>> {
        self.all().filter(|rt| rt.group == group && rt.version == version).cloned().collect()
    }

    /// The resource version each installed CRD was built from.
    pub fn installed(&self) -> impl Iterator<Item = (&str, &str)> {
        self.crds.iter().map(|(name, c)| (name.as_str(), c.resource_version.as_str()))
    }

    pub fn install(&mut self, crd_name: &str, resource_version: &str, types: Vec<ResourceType>) {
        let types = types.into_iter().map(Arc::new).collect();
        self.crds.insert(crd_name.to_string(), Installed { resource_version: resource_version.to_string(), types });
    }

    /// Stops serving a CRD's types, returning where their objects are stored.
    pub fn uninstall(&mut self, crd_name: &str) -> Option<GroupResource> {
        let installed = self.crds.remove(crd_name)?;
        installed.types.first().map(|rt| rt.storage())
    }
}
