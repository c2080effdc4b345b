//! The end-to-end tests in one binary (one link instead of one per file; the harness runs
//! them one at a time by itself, see `e2e::serial`): each module is one area of the product,
//! through a real Envoy or nginx with simulated exo nodes.

mod access;
mod deploy;
mod errors;
mod failures;
mod hardening;
mod https;
mod inflight;
mod learning;
mod logs;
mod metrics;
mod nginx_worker;
mod reload;
mod routing;
mod scheduling;
mod security;
mod streaming;
mod websocket;
