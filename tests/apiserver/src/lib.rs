//! A stateful, in-memory Kubernetes API server for tests.
//!
//! It serves the built-in kinds the operator touches (namespaces, pods, configmaps, secrets,
//! services, service accounts and their tokens, events, leases, token reviews, mutating webhook
//! configurations, whose webhooks it calls on each create when they give a `url`) and
//! `CustomResourceDefinition`s, whose custom resources it then serves with schema validation,
//! the status subresource, generation tracking, finalizers, owner-reference garbage collection,
//! watches, the patch formats and server-side apply. It speaks plain HTTP/1.1 and h2c, and
//! everyone is an administrator.
//!
//! Where it differs from a real API server:
//! - Responses are JSON only (no protobuf or `Table`s; kubectl prints `NAME`/`AGE` columns then).
//!   Protobuf request bodies are understood for the kinds kubectl's `create` subcommands send.
//! - Discovery is the legacy, unaggregated form; there is no `/openapi/v2`.
//! - CRD schemas are checked and pruned, but `default`s are not applied and CEL rules
//!   (`x-kubernetes-validations`) are not evaluated. Conversion between CRD versions only
//!   rewrites `apiVersion`.
//! - Server-side apply tracks fields per object key; lists are owned and replaced whole.
//! - Lists ignore `limit` and `continue` (everything comes at once) and the `resourceVersion`
//!   to read at; watches resume from the in-memory event log of the last 10 000 changes.
//! - Mutating webhooks run on creates by POST only (not on updates, nor on creates by apply
//!   patch), reach webhooks by `url` only, and no validating webhooks are called.
//! - Garbage collection, namespace deletion and CRD deletion happen synchronously, within the
//!   request; `Foreground` propagation is treated as `Background`.
//! - Core `v1` events and `events.k8s.io/v1` events are stored separately.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use bulwark_test_apiserver::{ApiServer, Options};
//!
//! let server = ApiServer::start(Options {
//!     listen: "127.0.0.1:0".parse()?,
//!     crd_dirs: vec!["crds/yaml".into()],
//! })
//! .await?;
//! server.write_kubeconfig(std::path::Path::new("kubeconfig"))?;
//! // ... point a client at server.url() ...
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

mod admission;
mod api;
mod apply;
mod auth;
mod discovery;
mod error;
mod meta;
mod openapi;
mod patch;
mod protobuf;
mod resources;
mod router;
mod schema;
mod selector;
mod server;
mod store;
mod watch;
mod write;

pub use router::decode as percent_decode;
pub use server::ApiServer;

/// How to start an [`ApiServer`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// CRD manifests to install at startup: YAML files, or directories of them.
    pub crd_dirs: Vec<PathBuf>,
}
