//! The wasm-host tests in one binary (one link of wasmtime instead of one per file): each
//! module is one area of the filter's behaviour, run through the real exo_lb.wasm.

mod common;
mod config;
mod cost;
mod failures;
mod host_selftest;
mod learning;
mod real_filter_smoke;
mod robustness;
mod routing;
mod scheduling;
mod workers;
