//! The proxy-wasm layer: reads what the host (Envoy or nginx, see `platform`) knows, asks [`crate::logic`], writes the answer back.
//! Kept thin on purpose; decisions belong in `logic`.

mod host;
mod id_map;
mod metrics;
mod platform;
mod root;
mod stream;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::Root::default()) });
}}
