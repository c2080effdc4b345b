//! Host-side state: what one VM sees (`VmState`, the wasmtime store data), what all VMs share
//! (`Shared`: shared data, queues, metrics, HTTP calls), and one HTTP stream (`StreamData`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Header list in wire order; keys are lower-case, as Envoy stores them.
pub type Headers = Vec<(String, String)>;

/// Level of a captured log line: the proxy-wasm levels, plus the VM's stdout/stderr and
/// diagnostics written by the host itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
    /// A line the module wrote to its WASI stdout.
    Stdout,
    /// A line the module wrote to its WASI stderr (a Rust panic message lands here).
    Stderr,
    /// A diagnostic from the host (e.g. a hostcall used outside an HTTP context).
    Host,
}

impl LogLevel {
    pub(crate) fn from_abi(level: u32) -> LogLevel {
        match level {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            _ => LogLevel::Critical,
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
            LogLevel::Critical => "critical",
            LogLevel::Stdout => "stdout",
            LogLevel::Stderr => "stderr",
            LogLevel::Host => "host",
        };
        f.write_str(s)
    }
}

/// One captured log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Worker (VM slot) index.
    pub worker: usize,
    pub level: LogLevel,
    pub message: String,
}

impl fmt::Display for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[w{} {}] {}", self.worker, self.level, self.message)
    }
}

/// Kind of a metric, as `proxy_define_metric` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone, Debug)]
pub(crate) struct MetricData {
    pub name: String,
    pub kind: MetricKind,
    pub value: i64,
    pub recorded: Vec<u64>,
}

/// An HTTP call the filter dispatched with `proxy_http_call`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCall {
    pub token: u32,
    /// Worker whose VM made the call.
    pub worker: usize,
    /// Context that was effective when the call was made (root context = 1).
    pub context_id: u32,
    /// Cluster name (`upstream` argument).
    pub upstream: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
    pub timeout_ms: u32,
    /// Host clock (ms since the epoch) when the call was made.
    pub sent_at_ms: u64,
    /// True once answered, failed or timed out (or dropped because its VM was reloaded).
    pub done: bool,
    pub(crate) generation: u64,
}

impl HttpCall {
    /// Value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

pub(crate) fn find_header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
}

#[derive(Default)]
pub(crate) struct Queue {
    pub name: String,
    pub owner_worker: usize,
    pub owner_generation: u64,
    pub items: std::collections::VecDeque<Vec<u8>>,
}

/// State shared by every VM of one host (Envoy keys it by vm_id; all our VMs have the same).
#[derive(Default)]
pub(crate) struct Shared {
    pub data: HashMap<String, (Vec<u8>, u32)>,
    pub next_cas: u32,
    pub queues: Vec<Queue>,
    pub queue_ready: Vec<(usize, u64, u32)>,
    pub metrics: Vec<MetricData>,
    pub calls: Vec<HttpCall>,
    pub next_token: u32,
    pub log_level: u32,
}

impl Shared {
    pub fn bump_cas(&mut self) -> u32 {
        self.next_cas = self.next_cas.wrapping_add(1);
        if self.next_cas == 0 {
            self.next_cas = 1;
        }
        self.next_cas
    }
}

pub(crate) type SharedRef = Arc<Mutex<Shared>>;

pub(crate) fn lock(shared: &SharedRef) -> MutexGuard<'_, Shared> {
    // A poisoned lock only means a test panicked elsewhere; the data is still usable.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The test clock, in nanoseconds since the Unix epoch; also the VM's WASI clocks (`wasi.rs`).
#[derive(Clone)]
pub(crate) struct Clock(pub Arc<AtomicU64>);

impl Clock {
    pub fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    pub fn set_ns(&self, ns: u64) {
        self.0.store(ns, Ordering::SeqCst)
    }
}

/// A local reply sent by the filter with `proxy_send_local_response`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    /// The `details` argument (Envoy's response code details).
    pub details: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub grpc_status: i32,
}

/// One direction (request or response) of an HTTP stream, with Envoy's buffering rules.
#[derive(Default, Clone, Debug)]
pub(crate) struct Direction {
    /// Headers map as the filter sees and edits it.
    pub headers: Headers,
    /// True once the headers callback ran (so the map exists for the filter).
    pub headers_present: bool,
    pub trailers: Option<Headers>,
    /// Snapshot of the headers when they were passed on (upstream for the request,
    /// downstream for the response).
    pub forwarded_headers: Option<Headers>,
    /// Body bytes held by the host because the filter paused (what body callbacks and
    /// `proxy_get_buffer_bytes` see).
    pub buffer: Vec<u8>,
    /// Body bytes passed on.
    pub forwarded_body: Vec<u8>,
    /// The last chunk (end of stream) was delivered to the filter.
    pub end_seen: bool,
    /// Headers, whole body and end of stream were passed on.
    pub complete: bool,
}

impl Direction {
    /// What Envoy does when the filter continues this direction: pass on held headers and
    /// buffered body.
    pub fn continue_iteration(&mut self) {
        if self.forwarded_headers.is_none() {
            self.forwarded_headers = Some(self.headers.clone());
        }
        self.forwarded_body.append(&mut self.buffer);
        if self.end_seen {
            self.complete = true;
        }
    }
}

/// One HTTP stream (filter context) in a VM.
#[derive(Clone, Debug, Default)]
pub(crate) struct StreamData {
    pub request: Direction,
    pub response: Direction,
    pub properties: HashMap<String, Vec<u8>>,
    pub local_response: Option<LocalResponse>,
    /// The filter reset the stream (`proxy_close_stream`).
    pub reset_by_filter: bool,
    /// The test aborted the stream (client went away).
    pub aborted: bool,
    /// on_log/on_done ran.
    pub ended: bool,
    /// on_done returned false: on_delete waits for `proxy_done`.
    pub awaiting_done: bool,
    pub done_called: bool,
    /// on_delete ran.
    pub deleted: bool,
    /// The VM that owned this stream was reloaded (or crashed) before the stream ended.
    pub orphaned: bool,
    /// The access-log phase (on_log) is running: missing maps read as empty.
    pub log_phase: bool,
}

/// Data of an answered HTTP call, readable while on_http_call_response runs.
pub(crate) struct CallResponse {
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

/// The wasmtime store data of one VM.
pub(crate) struct VmState {
    /// What the module wrote to its WASI stdout and stderr since the last [`VmState::drain_stdio`].
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The state of the VM's WASI `random_get` (deterministic: tests repeat exactly).
    pub random: u64,
    pub worker: usize,
    pub generation: u64,
    pub shared: SharedRef,
    pub clock: Clock,
    pub plugin_config: Vec<u8>,
    pub vm_config: Vec<u8>,
    pub logs: Vec<LogLine>,
    pub echo_logs: bool,
    pub root_id: u32,
    pub effective: u32,
    pub streams: BTreeMap<u32, StreamData>,
    pub root_properties: HashMap<String, Vec<u8>>,
    pub tick_period_ms: u32,
    pub next_tick_ns: Option<u64>,
    pub call_response: Option<CallResponse>,
    /// Problems that must fail the running test (unimplemented imports, ...).
    pub problems: Vec<String>,
    /// A stream got a local reply, a reset or `proxy_done`: the host has work after the call.
    pub needs_settle: bool,
    /// Calls the module made into the host (proxy-wasm and WASI imports).
    pub host_calls: u64,
    /// With `EXO_LB_FUEL_TRACE` set: the fuel used at each host call (see `Host::take_fuel_trace`).
    pub fuel_trace: Option<Vec<u64>>,
}

impl VmState {
    pub fn log(&mut self, level: LogLevel, message: String) {
        let line = LogLine { worker: self.worker, level, message };
        if self.echo_logs {
            eprintln!("{line}");
        }
        self.logs.push(line);
    }

    pub fn host_diag(&mut self, message: String) {
        self.log(LogLevel::Host, message);
    }

    /// Moves new stdout/stderr output into the log.
    pub fn drain_stdio(&mut self) {
        for level in [LogLevel::Stdout, LogLevel::Stderr] {
            let pipe = if level == LogLevel::Stdout { &mut self.stdout } else { &mut self.stderr };
            if pipe.is_empty() {
                continue;
            }
            let new = String::from_utf8_lossy(&std::mem::take(pipe)).into_owned();
            for line in new.lines().filter(|l| !l.is_empty()) {
                self.log(level, line.to_string());
            }
        }
    }

    /// The next byte of the VM's WASI random stream (a 64-bit LCG's high byte).
    pub fn next_random_byte(&mut self) -> u8 {
        self.random = self.random.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.random >> 56) as u8
    }

    pub fn stream(&mut self) -> Option<&mut StreamData> {
        self.streams.get_mut(&self.effective)
    }
}
