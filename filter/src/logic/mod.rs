//! Everything the filter decides, with no proxy-wasm calls: the glue feeds these functions
//! with what Envoy tells it and applies what they return.

pub mod config;
pub mod discover;
pub mod duration;
pub mod errors;
pub mod escape;
pub mod estimates;
pub mod header_map;
pub mod health;
pub mod lookahead;
pub mod metrics;
pub mod outcome;
pub mod probe;
pub mod request;
pub mod schedule;
pub mod select;
pub mod state;
pub mod stream_end;
pub mod summary;
