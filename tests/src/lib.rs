//! Test support shared by the scenario tests and the benchmarks: the mock LLM provider, a
//! small HTTP client, a harness that starts a sidecar in-process, and a cluster of the test API
//! server, kubectl and the operator and sidecar binaries for end-to-end tests.

pub mod client;
pub mod cluster;
pub mod exposition;
pub mod harness;
pub mod mock;
pub mod procfs;
pub mod prometheus;
pub mod soak;
pub mod traffic;
