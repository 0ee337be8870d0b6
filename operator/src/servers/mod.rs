//! Self-hosted model servers: `build` turns a ModelServer into what runs it.

pub mod build;
