//! exo-lb: a model-aware load balancer for exo LLM nodes, as a proxy-wasm filter for Envoy.
//!
//! The crate has two halves, and the split is the architecture:
//! - [`logic`]: plain Rust, no host calls. Configuration, request parsing, node selection,
//!   failure tracking and the shared cluster state are pure types and functions, unit-tested
//!   natively and reused by `exo-lb-ctl`.
//! - `glue` (wasm32 only): the thin proxy-wasm layer that reads headers, bodies and properties
//!   from Envoy, feeds them to [`logic`], and writes the decisions back.
//!
//! The filter must never trap (a trap takes a worker's VM down), so panicking constructs are
//! denied by clippy lints in Cargo.toml, and host calls go through the SDK's `hostcalls`
//! functions that return `Result` instead of the trait helpers that unwrap.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod logic;

#[cfg(target_arch = "wasm32")]
mod glue;
