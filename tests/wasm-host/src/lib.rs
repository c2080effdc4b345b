//! A proxy-wasm (ABI 0.2.1) host on wasmtime, for tests only: it loads the compiled filter
//! (`target/wasm32-wasip1/release/exo_lb.wasm`) and drives it the way Envoy does — one VM per
//! worker over one shared-data store, a clock the test controls, captured logs, scripted
//! HTTP-call answers — so tests exercise the artifact users load, deterministically.
//!
//! Build the filter first: `cargo build --release --target wasm32-wasip1 -p exo-lb`, then
//! `cargo test -p wasm-host` (set `EXO_LB_WASM=/path/x.wasm` to test another build; set
//! `WASM_HOST_LOG=1` to print every log line as it happens).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use wasm_host::{Action, Host, Outcome};
//!
//! # fn main() -> anyhow::Result<()> {
//! const CONFIG: &str = r#"{"nodes": ["10.0.0.5:52415"]}"#;
//! let lb = Host::new(CONFIG, 2)?; // = Host::load(Host::wasm_path(), CONFIG, 2)
//!
//! // A request through worker 0: on_request_headers, then on_request_body (one chunk).
//! let s = lb
//!     .worker(0)
//!     .request("POST", "/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .property_str("source.address", "10.0.0.1:4000")
//!     .body(br#"{"model":"m1","messages":[]}"#) // or .chunks([..]) to split it
//!     .start()?;
//! match s.outcome() {
//!     Outcome::Forwarded { request_headers } => { /* headers as sent upstream */ }
//!     Outcome::LocalResponse { status, body, .. } => { /* the filter answered itself */ }
//!     Outcome::Paused => { /* held by the filter (released later, e.g. by a tick) */ }
//!     Outcome::Reset => {}
//! }
//! let ranked = s.request_header("x-gateway-destination-endpoint");
//!
//! // The upstream answers: response.code = 200, upstream.address = first ranked endpoint
//! // (override it with s.property_str("upstream.address", ..) before answering).
//! let response_headers = s.upstream_response(200, &[("content-type", "text/event-stream")])?;
//! assert_eq!(s.response_body(b"data: {}\n\n", false)?, Action::Continue);
//! assert_eq!(s.response_body(b"data: [DONE]\n\n", true)?, Action::Continue);
//! s.finish()?; // on_log, on_done, on_delete
//!
//! // A client that goes away without an answer.
//! let gone = lb.worker(1).request("POST", "/v1/chat/completions").body("{}").start()?;
//! gone.abort()?;
//!
//! // Time: ticks of every VM fire in order for every period boundary crossed.
//! lb.advance(Duration::from_secs(5))?;
//! for call in lb.pending_http_calls() {
//!     lb.answer_http_call(call.token, 200, &[], b"{}")?; // or lb.fail_http_call(token)
//! }
//! assert_eq!(lb.metric("some_counter"), None);
//! assert!(!lb.logged("panicked"));
//! # Ok(()) }
//! ```
//!
//! Config validation: [`Host::try_load`] returns whether on_configure accepted the config and
//! the log lines, e.g. `assert!(!l.accepted && l.logged("max_fails"))`.
//!
//! # How the host behaves (Envoy's rules)
//! - Start: `_initialize` (or `_start`), `proxy_on_context_create(1, 0)`, `proxy_on_vm_start`,
//!   `proxy_on_configure(1, len)` with the plugin configuration as buffer type 7.
//! - Streams get context ids 2, 3, ... per VM. `start()` runs `proxy_on_context_create`,
//!   `proxy_on_request_headers(id, n, end_of_stream)` (end_of_stream only without body) and
//!   `proxy_on_request_body` per chunk. While the filter returns Pause from a body callback the
//!   host buffers: the next callback gets the cumulative size and `proxy_get_buffer_bytes(0, ..)`
//!   reads the whole buffered body. Continue (or `proxy_continue_stream` from any context made
//!   effective with `proxy_set_effective_context`, e.g. from a tick) passes held headers and
//!   buffered body on; once end of stream has gone on, the outcome is `Forwarded` with the
//!   headers as they were at that moment.
//! - `proxy_send_local_response` ends the stream with that reply: no further request/response
//!   callbacks; right after the callback that sent it, the host runs on_log, on_done and
//!   on_delete (like Envoy). `response.code` then reads as the local status.
//! - `proxy_close_stream` resets the stream (outcome `Reset`), also ended right away.
//! - Stream end (`finish`/`abort`): on_log, on_done, on_delete (on_delete waits for
//!   `proxy_done` when on_done returns false). Pending HTTP calls of a deleted context are
//!   cancelled.
//! - Header maps: keys lower-cased; `proxy_get_header_map_value` of a missing key is NotFound
//!   (the SDK's None); a map that does not exist yet (e.g. response headers before the
//!   response) is BadArgument, except during on_log where it reads as empty.
//! - Properties: per stream, set by the test (`property_str` / `property_u64`, the latter as
//!   8-byte little-endian integers like Envoy's `response.code`); paths arrive NUL-separated
//!   and are looked up dot-joined (`upstream.address`); unknown -> NotFound.
//! - Shared data: one store for all workers, CAS like Envoy (cas 0 = unconditional, a write
//!   to a missing key ignores cas, every write gets a new cas). Shared queues too.
//! - Metrics are process-wide like Envoy stats: [`Host::metric`] is the sum over workers.
//! - WASI (preview 1, `wasi.rs`): no arguments or environment, stdout/stderr into the log,
//!   deterministic random bytes, `proc_exit`; other WASI imports are stubs like the above.
//! - Clock: starts at [`DEFAULT_START_MS`]; `proxy_get_current_time_nanoseconds` and WASI's
//!   clocks both read it. HTTP calls with a timeout fail (0 headers) when the clock passes it.
//! - A trap (Rust panic, stack overflow...) becomes an `Err` carrying the trap, the panic
//!   message (the VM's stderr) and the VM's log; the VM is then marked crashed until
//!   [`Host::reload_worker`]. A call of an import the host only stubs (see
//!   [`Host::stubbed_imports`]) also fails the running operation with
//!   "unimplemented import X called". When a test panics, dropping the [`Host`] prints all logs.
//! - The compiled module is cached per process (keyed by path, mtime and size): the first
//!   `Host::load` compiles, the next ones only instantiate.

mod abi;
mod host;
mod state;
mod vm;
mod wasi;

pub use abi::{deserialize_map, serialize_map};
pub use host::{Action, Host, Loaded, Outcome, RequestBuilder, Stream, Worker, DEFAULT_START_MS};
pub use state::{Headers, HttpCall, LocalResponse, LogLevel, LogLine, MetricKind};

/// What a VM ran: the filter's per-request cost in units that do not depend on the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Wasm operations executed (wasmtime's fuel: about one per instruction).
    pub fuel: u64,
    /// Calls into the host. In Envoy each is a crossing out of V8 that costs more than most of
    /// what the filter computes (docs/benchmarks.md measured 1.1-3.0 µs each).
    pub host_calls: u64,
}

impl std::ops::Sub for Cost {
    type Output = Cost;
    fn sub(self, earlier: Cost) -> Cost {
        Cost {
            fuel: self.fuel.saturating_sub(earlier.fuel),
            host_calls: self.host_calls.saturating_sub(earlier.host_calls),
        }
    }
}
