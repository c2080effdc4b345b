//! Helpers shared by the host-based tests of the real exo_lb.wasm.
//!
//! Every test module uses it through `crate::common`; not every module uses every helper.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;
use wasm_host::{Host, Outcome, Stream};

pub type R = anyhow::Result<()>;

/// Envoy's response-flag bits as `response.flags` carries them.
pub mod flags {
    pub const UT: u64 = 0x4;
    pub const UR: u64 = 0x10;
    pub const UF: u64 = 0x20;
    pub const UC: u64 = 0x40;
    pub const DC: u64 = 0x4000;
    pub const URX: u64 = 0x8000;
    pub const SI: u64 = 0x10000;
}

pub use exo_lb::logic::config::Config;
pub use exo_lb::logic::state::{ClusterState, Grant, STATE_KEY};

/// Loads the real filter on `workers` VMs; panics with the filter's log if it rejects `config`.
pub fn load(config: &str, workers: usize) -> Host {
    match Host::new(config, workers) {
        Ok(h) => h,
        Err(e) => panic!("{e:#}"),
    }
}

/// Node `i` of the test configurations: `10.0.0.<i+1>:52415`.
pub fn addr(i: usize) -> String {
    format!("10.0.0.{}:52415", i + 1)
}

/// A node entry for a configuration: `{"name": .., "address": addr(i), <extra>}`.
pub fn node(name: &str, i: usize, extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { ", " };
    format!(r#"{{"name": "{name}", "address": "{}"{sep}{extra}}}"#, addr(i))
}

/// A chat completion body asking for `model`.
pub fn chat(model: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

/// Sends a chat completion for `model` through worker `w`.
pub fn post(lb: &Host, w: usize, model: &str) -> anyhow::Result<Stream> {
    lb.worker(w)
        .request("POST", "/v1/chat/completions")
        .header("content-type", "application/json")
        .body(chat(model))
        .start()
}

/// The ranked endpoint list of a forwarded request (panics when it was not forwarded).
pub fn endpoints(s: &Stream) -> Vec<String> {
    match s.outcome() {
        Outcome::Forwarded { request_headers } => {
            let values: Vec<&String> =
                request_headers.iter().filter(|(k, _)| k == "x-gateway-destination-endpoint").map(|(_, v)| v).collect();
            assert_eq!(values.len(), 1, "exactly one destination header: {request_headers:?}");
            values[0].split(',').map(str::to_string).collect()
        }
        other => panic!("expected a forwarded request, got {other:?}"),
    }
}

/// The first ranked endpoint of a forwarded request.
pub fn first(s: &Stream) -> String {
    endpoints(s)[0].clone()
}

/// A local reply of the filter, decoded: status, `error.type`, `error.code`, `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub status: u32,
    pub kind: String,
    pub code: String,
    pub retry_after: Option<u64>,
    pub message: String,
    pub request_id: String,
}

/// Decodes the filter's OpenAI-style error reply (panics when the stream got something else).
pub fn error_reply(s: &Stream) -> ErrorReply {
    let Some(lr) = s.local_response() else { panic!("expected a local reply, got {:?}", s.outcome()) };
    let header = |name: &str| lr.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    assert_eq!(header("content-type").as_deref(), Some("application/json"), "{lr:?}");
    let v: Value = serde_json::from_slice(&lr.body).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {lr:?}"));
    let field = |k: &str| v["error"][k].as_str().unwrap_or_else(|| panic!("no error.{k} in {v}")).to_string();
    ErrorReply {
        status: lr.status,
        kind: field("type"),
        code: field("code"),
        message: field("message"),
        request_id: field("request_id"),
        retry_after: header("retry-after").map(|r| r.parse().unwrap_or_else(|_| panic!("bad retry-after {r}"))),
    }
}

/// A local reply's status and JSON body (for `/healthcheck` and `/v1/models`).
pub fn json_reply(s: &Stream) -> (u32, Value) {
    let Some(lr) = s.local_response() else { panic!("expected a local reply, got {:?}", s.outcome()) };
    let v = serde_json::from_slice(&lr.body).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {lr:?}"));
    (lr.status, v)
}

/// Completes a forwarded request: the node at `node_addr` answers `status`.
pub fn complete(s: &Stream, node_addr: &str, status: u32) -> R {
    s.upstream_address(node_addr);
    s.respond(status, &[("content-type", "application/json")], b"{}")?;
    s.finish()
}

/// Completes a forwarded request at its first ranked node with 200.
pub fn ok(s: &Stream) -> R {
    let node = first(s);
    complete(s, &node, 200)
}

/// The filter configuration the host was loaded with, parsed by the filter's own parser.
pub fn config(lb: &Host) -> Config {
    match Config::parse(&lb.plugin_config()) {
        Ok(c) => c,
        Err(e) => panic!("the test's configuration: {e}"),
    }
}

/// The index of node `name` in the host's configuration.
pub fn index(lb: &Host, name: &str) -> usize {
    match config(lb).nodes.iter().position(|n| n.name == name) {
        Some(i) => i,
        None => panic!("no node {name}"),
    }
}

/// The cluster state the workers share, decoded with the filter's own decoder (fresh before
/// any write).
pub fn state(lb: &Host) -> ClusterState {
    ClusterState::decode(lb.shared_data(STATE_KEY).map(|(bytes, _)| bytes).as_deref(), &config(lb).index.layout)
}

/// The learned estimates the workers share.
pub fn estimates(lb: &Host) -> exo_lb::logic::estimates::Estimates {
    use exo_lb::logic::estimates::{Estimates, ESTIMATES_KEY};
    Estimates::decode(lb.shared_data(ESTIMATES_KEY).map(|(bytes, _)| bytes).as_deref())
}

/// In-flight requests on node `name`, summed over the leases that are alive now.
pub fn inflight(lb: &Host, name: &str) -> u64 {
    u64::from(state(lb).inflight(index(lb, name), lb.clock_ms()))
}

/// Every in-flight count in every lease, alive or not (what a leak would leave behind).
pub fn inflight_recorded(lb: &Host) -> u64 {
    u64::from(state(lb).inflight_recorded())
}

/// Slots on node `name` granted to queued requests whose worker has not resumed them yet (a
/// grant books the slot at once; the request goes on at its worker's next tick).
pub fn granted(lb: &Host, name: &str) -> u64 {
    let i = index(lb, name);
    state(lb).waiters().filter(|w| matches!(w.grant, Some(Grant::Node { node, .. }) if node == i)).count() as u64
}

/// Number of VM leases in the shared state.
pub fn lease_count(lb: &Host) -> usize {
    state(lb).leases().len()
}

/// Requests waiting in the shared queue (granted or not).
pub fn queue_len(lb: &Host) -> usize {
    state(lb).queue_len()
}

/// Asserts that nothing is booked any more: nothing in flight in any lease, nothing queued,
/// no node held. (Leases of live workers stay: they are renewed by ticks and cost nothing.)
pub fn assert_idle(lb: &Host) {
    let st = state(lb);
    assert_eq!(inflight_recorded(lb), 0, "in-flight counts left: {st:?}");
    assert_eq!(st.queue_len(), 0, "queue not empty: {st:?}");
}

/// Failure count of node `name` in the current window.
pub fn fails(lb: &Host, name: &str) -> u64 {
    u64::from(state(lb).health(index(lb, name)).fails)
}

/// Moves the clock forward by `ms` milliseconds (firing ticks on the way).
pub fn advance_ms(lb: &Host, ms: u64) -> R {
    lb.advance(Duration::from_millis(ms))
}

/// A counter's value, 0 when it was never defined.
pub fn counter(lb: &Host, name: &str) -> i64 {
    lb.metric(name).unwrap_or(0)
}

/// A small deterministic PRNG (SplitMix64), so that randomized tests are reproducible.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}
