//! Host calls that cannot panic. The SDK's trait helpers `unwrap` every host status (and
//! `get_map_value` panics on a non-UTF-8 header), so the filter goes through these instead.

use crate::logic::config::Config;
use crate::logic::estimates::{Estimates, ESTIMATES_KEY};
use crate::logic::state::{ClusterState, Layout, STATE_KEY};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};
use std::borrow::Cow;
use std::time::UNIX_EPOCH;

pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn now_nanos() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map_type: u32, return_map_data: *mut *mut u8, return_map_size: *mut usize) -> u32;
}

/// Every request header, in one host call, as the host serialised them: read them in place with
/// [`crate::logic::header_map::pairs`]. (The SDK's reader copies each name and value, and traps
/// on a name that is not UTF-8.)
pub fn request_header_map() -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: on success the host hands over a buffer of `size` bytes that it allocated through
    // this module's allocator (`proxy_on_memory_allocate`: a Vec of that capacity, forgotten);
    // the Vec takes it back, as the SDK's own reader does.
    unsafe {
        let status = proxy_get_header_map_pairs(MapType::HttpRequestHeaders as u32, &mut data, &mut size);
        if status != Status::Ok as u32 || data.is_null() {
            return Vec::new();
        }
        Vec::from_raw_parts(data, size, size)
    }
}

/// The response's `:status`, from the response headers.
pub fn response_status() -> Option<u32> {
    match hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status") {
        Ok(Some(bytes)) => std::str::from_utf8(&bytes).ok().and_then(|s| s.trim().parse().ok()),
        _ => None,
    }
}

pub fn set_request_header(name: &str, value: Option<&str>) {
    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value);
}

pub fn set_response_header(name: &str, value: Option<&str>) {
    let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value);
}

pub fn request_body(size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size).ok().flatten().unwrap_or_default()
}

/// Replaces the `size` bytes of response body this callback was given with `body`.
pub fn set_response_body(size: usize, body: &[u8]) {
    let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, size, body);
}

pub fn plugin_configuration() -> Vec<u8> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default()
}

pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

pub fn property_string(path: &[&str]) -> Option<String> {
    property(path).map(|b| String::from_utf8_lossy(&b).into_owned()).filter(|s| !s.is_empty())
}

/// Envoy encodes integer properties as 8 bytes, little-endian.
pub fn property_u64(path: &[&str]) -> Option<u64> {
    let bytes = property(path)?;
    let array: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(array))
}

pub fn send_response(status: u32, headers: &[(&str, &str)], body: &str) {
    let _ = hostcalls::send_http_response(status, headers.to_vec(), Some(body.as_bytes()));
}

pub fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name).ok()
}

pub fn increment_metric(id: u32, by: i64) {
    let _ = hostcalls::increment_metric(id, by);
}

pub fn record_metric(id: u32, value: u64) {
    let _ = hostcalls::record_metric(id, value);
}

pub fn set_tick_period_ms(ms: u64) {
    let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(ms));
}

/// Reads the cluster state shared by all workers (a snapshot: nothing is written).
pub fn read_state(layout: &Layout) -> ClusterState {
    let bytes = hostcalls::get_shared_data(STATE_KEY).ok().and_then(|(b, _)| b);
    ClusterState::from_bytes(bytes.unwrap_or_default(), layout)
}

/// Applies `change` to the shared cluster state atomically (compare-and-swap, retried when
/// another worker wrote in between) and returns what `change` returned, with how long it took
/// (µs) where it made a look-ahead plan for requests already waiting. Once written, says in
/// the log why each switch `change` decided was made (switches are rare: each costs a node
/// seconds to minutes).
pub fn update_state<R>(cfg: &Config, mut change: impl FnMut(&mut ClusterState) -> R) -> (R, Option<u64>) {
    let layout = &cfg.index.layout;
    let (result, switches, look_ahead_ns) = update(
        STATE_KEY,
        |bytes| ClusterState::from_bytes(bytes.unwrap_or_default(), layout),
        &mut |s: &mut ClusterState| {
            // The look-ahead plans for requests already waiting: only then is the clock read
            // before `change` (and again after it, where it made a plan), so the path with no
            // queue pays no host call for it. A plan made for the first request into an empty
            // queue goes untimed.
            let started = (s.queue_len() > 0).then(now_nanos);
            let result = change(s);
            let planned = s.take_looked_ahead();
            let took = started.filter(|_| planned).map(|t| now_nanos().saturating_sub(t));
            (result, s.take_switches(), took)
        },
    );
    if !switches.is_empty() {
        // For the models' names where the configuration does not list them.
        let est = read_estimates();
        for switch in switches {
            log(LogLevel::Info, &switch.describe(cfg, &est));
        }
    }
    (result, look_ahead_ns.map(|ns| ns / 1_000))
}

/// Reads the learned estimates.
pub fn read_estimates() -> Estimates {
    let bytes = hostcalls::get_shared_data(ESTIMATES_KEY).ok().and_then(|(b, _)| b);
    Estimates::decode(bytes.as_deref())
}

/// Applies `change` to the learned estimates atomically; returns the estimates written.
pub fn update_estimates(mut change: impl FnMut(&mut Estimates)) -> Estimates {
    update(ESTIMATES_KEY, |bytes| Estimates::decode(bytes.as_deref()), &mut |e: &mut Estimates| {
        change(e);
        e.clone()
    })
}

/// A value kept in shared data.
trait Shared {
    fn bytes(&self) -> Cow<'_, [u8]>;
}

impl Shared for ClusterState {
    fn bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.encode())
    }
}

impl Shared for Estimates {
    fn bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.encode())
    }
}

/// Compare-and-swap on one shared-data key.
fn update<T: Shared, R>(key: &str, decode: impl Fn(Option<Vec<u8>>) -> T, change: &mut impl FnMut(&mut T) -> R) -> R {
    const ATTEMPTS: usize = 64;
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        let (bytes, cas) = hostcalls::get_shared_data(key).unwrap_or((None, None));
        let mut value = decode(bytes);
        let result = change(&mut value);
        // The last attempt writes unconditionally: a lost update beats a lost request.
        let cas = if attempt + 1 == ATTEMPTS { None } else { cas };
        match hostcalls::set_shared_data(key, Some(&value.bytes()), cas) {
            Ok(()) => return result,
            Err(Status::CasMismatch) => last = Some(result),
            Err(status) => {
                log(LogLevel::Error, &format!("exo-lb: cannot write shared data {key}: {status:?}"));
                return result;
            }
        }
    }
    log(LogLevel::Warn, "exo-lb: shared state contended; wrote without compare-and-swap");
    match last {
        Some(result) => result,
        None => change(&mut decode(None)),
    }
}

/// A number unique to this VM among all VMs that shared this data (a counter in shared data).
pub fn allocate_vm_id() -> u64 {
    const KEY: &str = "exo-lb/vm-seq";
    for _ in 0..64 {
        let (bytes, cas) = hostcalls::get_shared_data(KEY).unwrap_or((None, None));
        let current = bytes
            .as_deref()
            .and_then(|b| b.get(..8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes);
        let next = current.wrapping_add(1);
        if hostcalls::set_shared_data(KEY, Some(&next.to_le_bytes()), cas).is_ok() {
            // Low bits from the clock: two VMs that created the counter at the same moment
            // (no CAS on a missing key) still get different ids.
            return next << 20 | (crate::logic::state::mix(now_nanos()) & 0xF_FFFF);
        }
    }
    // Shared data unusable: a random id still keeps leases apart.
    crate::logic::state::mix(now_nanos()) | 1 << 63
}

/// Makes later host calls act on stream `ctx` (from a root context's tick).
pub fn set_effective_context(ctx: u32) -> bool {
    hostcalls::set_effective_context(ctx).is_ok()
}

pub fn resume_request() {
    let _ = hostcalls::resume_http_request();
}

/// `len` bytes of the response body this callback was given, from `start`.
pub fn response_body_range(start: usize, len: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpResponseBody, start, len).ok().flatten().unwrap_or_default()
}

pub fn response_body(size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size).ok().flatten().unwrap_or_default()
}

/// Sends a GET to the node at `address` through `upstream`: with `steer`, `upstream` is the
/// node cluster and the override_host header picks the node (Envoy); without, `upstream` is the
/// node's own `ip:port` (nginx). Returns the call's token.
pub fn dispatch_get(upstream: &str, address: &str, path: &str, timeout_ms: u64, steer: bool) -> Option<u32> {
    let mut headers = vec![(":method", "GET"), (":path", path), (":authority", "exo-lb-probe")];
    if steer {
        headers.push(("x-gateway-destination-endpoint", address));
        headers.push(("x-envoy-max-retries", "0"));
    }
    dispatch(upstream, headers, timeout_ms)
}

/// Sends an HTTP call without a body. Returns the call's token.
pub fn dispatch(upstream: &str, headers: Vec<(&str, &str)>, timeout_ms: u64) -> Option<u32> {
    hostcalls::dispatch_http_call(upstream, headers, None, vec![], std::time::Duration::from_millis(timeout_ms)).ok()
}

/// The status and body of the HTTP call response being delivered (0 when the call failed).
pub fn http_call_response(body_size: usize) -> (u32, Vec<u8>) {
    let status = match hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status") {
        Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).trim().parse().unwrap_or(0),
        _ => 0,
    };
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten().unwrap_or_default();
    (status, body)
}
