//! Test support shared by the scenario tests and the benchmarks: the mock LLM provider, a
//! small HTTP client, and a harness that starts a sidecar in-process.

pub mod client;
pub mod harness;
pub mod mock;
