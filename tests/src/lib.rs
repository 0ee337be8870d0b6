//! Test support shared by the scenario tests and the benchmarks: the mock LLM provider and a
//! small HTTP client.

pub mod client;
pub mod mock;
