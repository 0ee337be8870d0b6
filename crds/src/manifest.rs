//! Reads Bulwark resources out of multi-document YAML text, as `kubectl apply -f` would.
//! Text in, typed resources or precise errors out; the caller does the file I/O.

use serde::Deserialize;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::{LLMRoute, ModelRollout, ModelServer, ScannerPolicy};

pub const GROUP: &str = "bulwark.dev";
pub const API_VERSION: &str = "bulwark.dev/v1alpha1";

#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub routes: Vec<LLMRoute>,
    pub policies: Vec<ScannerPolicy>,
    pub rollouts: Vec<ModelRollout>,
    pub servers: Vec<ModelServer>,
    /// The ready replicas of each ModelServer (`namespace`, `name`) as base URLs, when known
    /// (the operator watches their pods; standalone, none: the Service URL is used).
    pub endpoints: std::collections::BTreeMap<(String, String), Vec<String>>,
}

impl Resources {
    pub fn extend(&mut self, other: Resources) {
        self.routes.extend(other.routes);
        self.policies.extend(other.policies);
        self.rollouts.extend(other.rollouts);
        self.servers.extend(other.servers);
        self.endpoints.extend(other.endpoints);
    }
    pub fn len(&self) -> usize {
        self.routes.len() + self.policies.len() + self.rollouts.len() + self.servers.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resources defined more than once (`kind namespace/name`), which an API server would
    /// never hold: in a directory of files, a mistake to report rather than pick one of.
    pub fn duplicates(&self) -> Vec<String> {
        fn names<'a>(
            kind: &'static str,
            metas: impl Iterator<Item = &'a ObjectMeta>,
            seen: &mut std::collections::BTreeMap<String, usize>,
        ) {
            for m in metas {
                let ns = m.namespace.as_deref().unwrap_or("default");
                *seen.entry(format!("{kind} {ns}/{}", m.name.as_deref().unwrap_or_default())).or_default() += 1;
            }
        }
        let mut seen = std::collections::BTreeMap::new();
        names("LLMRoute", self.routes.iter().map(|r| &r.metadata), &mut seen);
        names("ScannerPolicy", self.policies.iter().map(|r| &r.metadata), &mut seen);
        names("ModelRollout", self.rollouts.iter().map(|r| &r.metadata), &mut seen);
        names("ModelServer", self.servers.iter().map(|r| &r.metadata), &mut seen);
        seen.into_iter().filter(|(_, n)| *n > 1).map(|(k, _)| k).collect()
    }
}

/// One document that could not be read, with enough context to find it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("document {document}{}: {message}", describe(.kind, .name))]
pub struct ManifestError {
    /// 1-based position of the document in the text.
    pub document: usize,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub message: String,
}

fn describe(kind: &Option<String>, name: &Option<String>) -> String {
    match (kind, name) {
        (Some(k), Some(n)) => format!(" ({k} {n})"),
        (Some(k), None) => format!(" ({k})"),
        _ => String::new(),
    }
}

/// Parses every document. Documents of other API groups (a Secret, a Deployment) are skipped,
/// so a directory can hold a whole application's manifests.
pub fn parse(text: &str, default_namespace: &str) -> (Resources, Vec<ManifestError>) {
    let mut out = Resources::default();
    let mut errors = vec![];
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(ManifestError {
                    document,
                    kind: None,
                    name: None,
                    message: format!("not valid YAML: {e}"),
                });
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        };
        let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let kind = field("kind");
        let name = value.get("metadata").and_then(|m| m.get("name")).and_then(|v| v.as_str()).map(str::to_owned);
        let err = |message: String| ManifestError { document, kind: kind.clone(), name: name.clone(), message };
        let Some(api_version) = field("apiVersion") else {
            errors.push(err("missing apiVersion".into()));
            continue;
        };
        if api_version.split('/').next() != Some(GROUP) {
            continue;
        }
        if api_version != API_VERSION {
            errors.push(err(format!("unsupported apiVersion {api_version:?}; this version reads {API_VERSION}")));
            continue;
        }
        if name.is_none() {
            errors.push(err("metadata.name is required".into()));
            continue;
        }
        let result = match kind.as_deref() {
            Some("LLMRoute") => typed::<LLMRoute>(value.clone()).map(|mut r| {
                default_ns(&mut r.metadata, default_namespace);
                out.routes.push(r)
            }),
            Some("ScannerPolicy") => typed::<ScannerPolicy>(value.clone()).map(|mut r| {
                default_ns(&mut r.metadata, default_namespace);
                out.policies.push(r)
            }),
            Some("ModelRollout") => typed::<ModelRollout>(value.clone()).map(|mut r| {
                default_ns(&mut r.metadata, default_namespace);
                out.rollouts.push(r)
            }),
            Some("ModelServer") => typed::<ModelServer>(value.clone()).map(|mut r| {
                default_ns(&mut r.metadata, default_namespace);
                out.servers.push(r)
            }),
            Some(other) => {
                Err(format!("unknown kind {other:?}; use LLMRoute, ScannerPolicy, ModelRollout or ModelServer"))
            }
            None => Err("missing kind".into()),
        };
        if let Err(message) = result {
            errors.push(err(message));
        }
    }
    (out, errors)
}

fn typed<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." { inner } else { format!("{path}: {inner}") }
    })
}

fn default_ns(meta: &mut ObjectMeta, ns: &str) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some(ns.to_owned());
    }
}
