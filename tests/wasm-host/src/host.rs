//! The public host API: [`Host`], [`Worker`], [`RequestBuilder`] and [`Stream`].

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use crate::abi;
use crate::state::{
    find_header, lock, Clock, Headers, HttpCall, LocalResponse, LogLine, MetricKind, Shared, SharedRef, StreamData,
};
use crate::vm::{compiled, Compiled, Vm, VmParams, ROOT_ID};

/// Start of the test clock: 2025-11-24T16:00:00Z, in milliseconds since the Unix epoch.
pub const DEFAULT_START_MS: u64 = 1_764_000_000_000;

/// What a filter callback returned, as the host saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `Action::Continue` (0).
    Continue,
    /// `Action::Pause` (1: StopIteration / StopIterationAndBuffer).
    Pause,
    /// The host did not call the filter: the stream had already ended (local reply, reset,
    /// finished) or its VM was reloaded — Envoy would not call it either.
    Skipped,
}

impl Action {
    fn from_raw(raw: Option<i32>) -> Action {
        match raw {
            Some(0) => Action::Continue,
            _ => Action::Pause,
        }
    }
}

/// Where a request stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The filter holds the request (headers and/or body not yet passed upstream), or the
    /// client is still sending the body.
    Paused,
    /// Headers, whole body and end of stream went upstream. `request_headers` is the header
    /// map at the moment the headers were passed on (later edits do not reach upstream).
    Forwarded { request_headers: Headers },
    /// The filter answered with `proxy_send_local_response`.
    LocalResponse { status: u32, headers: Headers, body: Vec<u8>, details: String },
    /// The filter reset the stream (`proxy_close_stream`).
    Reset,
}

impl Outcome {
    /// Status of a local response, if this is one.
    pub fn local_status(&self) -> Option<u32> {
        match self {
            Outcome::LocalResponse { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Value of `name` in the forwarded request headers, if forwarded.
    pub fn forwarded_header(&self, name: &str) -> Option<String> {
        match self {
            Outcome::Forwarded { request_headers } => find_header(request_headers, name).map(str::to_string),
            _ => None,
        }
    }
}

type StreamKey = (usize, u64, u32);

pub(crate) struct Inner {
    compiled: Arc<Compiled>,
    path: PathBuf,
    plugin_config: Vec<u8>,
    vm_config: Vec<u8>,
    shared: SharedRef,
    clock: Clock,
    vms: Vec<Vm>,
    generations: Vec<u64>,
    next_generation: u64,
    /// Logs of VMs that were replaced by `reload_worker`.
    old_logs: Vec<LogLine>,
    /// Streams whose context was deleted (or orphaned by a reload), kept while a handle lives.
    finished: HashMap<StreamKey, StreamData>,
    echo_logs: bool,
    next_request_id: u64,
}

/// A proxy-wasm host running one VM per worker over shared data, like Envoy. See the crate
/// docs for an example. Cheap handles ([`Worker`], [`Stream`]) share it, so every method
/// takes `&self`.
pub struct Host {
    inner: Rc<RefCell<Inner>>,
}

/// Result of [`Host::try_load`].
pub struct Loaded {
    /// True when on_vm_start and on_configure returned true on every worker.
    pub accepted: bool,
    /// Everything the VMs logged while starting.
    pub logs: Vec<LogLine>,
    /// The host, usable whether or not the configuration was accepted.
    pub host: Host,
}

impl Loaded {
    /// True when some log line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.logs.iter().any(|l| l.message.contains(needle))
    }
}

impl Host {
    /// Path of the real filter, `target/wasm32-wasip1/release/exo_lb.wasm` in the workspace
    /// (`EXO_LB_WASM` overrides it). Panics with the build command when it is missing.
    pub fn wasm_path() -> PathBuf {
        if let Ok(p) = std::env::var("EXO_LB_WASM") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
        let mut candidates = vec![target.join("wasm32-wasip1/release/exo_lb.wasm")];
        candidates.push(root.join("target/wasm32-wasip1/release/exo_lb.wasm"));
        match candidates.iter().find(|p| p.exists()) {
            Some(p) => p.clone(),
            None => panic!(
                "exo_lb.wasm not found (looked at {candidates:?}).\n\
                 Build it first: cargo build --release --target wasm32-wasip1 -p exo-lb"
            ),
        }
    }

    /// Loads the real filter ([`Host::wasm_path`]) with `plugin_config` on `workers` VMs.
    pub fn new(plugin_config: &str, workers: usize) -> Result<Host> {
        Host::load(Host::wasm_path(), plugin_config, workers)
    }

    /// Loads `wasm_path` on `workers` VMs; fails (with the VM log) if the configuration is
    /// rejected.
    pub fn load(wasm_path: impl AsRef<Path>, plugin_config: &str, workers: usize) -> Result<Host> {
        let loaded = Host::try_load(wasm_path, plugin_config, workers)?;
        if !loaded.accepted {
            let logs: Vec<String> = loaded.logs.iter().map(ToString::to_string).collect();
            bail!("the filter rejected its configuration:\n{}\n--- logs ---\n{}", plugin_config, logs.join("\n"));
        }
        Ok(loaded.host)
    }

    /// Loads like [`Host::load`] but reports a rejected configuration instead of failing.
    /// Errors only for a module that cannot be loaded or that traps while starting.
    pub fn try_load(wasm_path: impl AsRef<Path>, plugin_config: &str, workers: usize) -> Result<Loaded> {
        let path = wasm_path.as_ref().to_path_buf();
        let compiled = compiled(&path)?;
        let shared: SharedRef = Arc::new(Mutex::new(Shared::default()));
        let clock = Clock(Arc::new(AtomicU64::new(DEFAULT_START_MS * 1_000_000)));
        let echo_logs = std::env::var_os("WASM_HOST_LOG").is_some();
        let mut inner = Inner {
            compiled,
            path,
            plugin_config: plugin_config.as_bytes().to_vec(),
            vm_config: Vec::new(),
            shared,
            clock,
            vms: Vec::new(),
            generations: Vec::new(),
            next_generation: 1,
            old_logs: Vec::new(),
            finished: HashMap::new(),
            echo_logs,
            next_request_id: 1,
        };
        let mut accepted = true;
        for w in 0..workers.max(1) {
            let (vm, ok) = inner.start_vm(w)?;
            accepted &= ok;
            inner.vms.push(vm);
        }
        let host = Host { inner: Rc::new(RefCell::new(inner)) };
        Ok(Loaded { accepted, logs: host.logs(), host })
    }

    /// Path of the loaded module.
    /// The plugin configuration the VMs were loaded with.
    pub fn plugin_config(&self) -> Vec<u8> {
        self.inner.borrow().plugin_config.clone()
    }

    pub fn module_path(&self) -> PathBuf {
        self.inner.borrow().path.clone()
    }

    /// How long compiling the module took (once per process; later loads reuse it).
    pub fn compile_time(&self) -> Duration {
        self.inner.borrow().compiled.compile_time
    }

    /// Imports the module declares that the host only stubs (calling one fails the test).
    pub fn stubbed_imports(&self) -> Vec<String> {
        self.inner.borrow().compiled.stubbed.clone()
    }

    /// Number of workers (VMs).
    pub fn workers(&self) -> usize {
        self.inner.borrow().vms.len()
    }

    /// Handle on worker `index` (panics when out of range).
    pub fn worker(&self, index: usize) -> Worker {
        assert!(index < self.workers(), "worker {index} does not exist");
        Worker { inner: self.inner.clone(), index }
    }

    /// Shorthand for `self.worker(0).request(method, path)`.
    pub fn request(&self, method: &str, path: &str) -> RequestBuilder {
        self.worker(0).request(method, path)
    }

    // ----- clock and ticks -----

    /// Current test time in milliseconds since the Unix epoch.
    pub fn clock_ms(&self) -> u64 {
        self.inner.borrow().clock.now_ns() / 1_000_000
    }

    /// Current test time in nanoseconds since the Unix epoch.
    pub fn clock_ns(&self) -> u64 {
        self.inner.borrow().clock.now_ns()
    }

    /// Moves the clock forward by `d`, firing (in time order) every tick period boundary of
    /// every VM and every HTTP-call timeout crossed on the way.
    pub fn advance(&self, d: Duration) -> Result<()> {
        let mut inner = self.inner.borrow_mut();
        let target = inner.clock.now_ns().saturating_add(d.as_nanos() as u64);
        inner.run_until(target)
    }

    /// Sets the clock to `ms` (since the epoch). Forward: like [`Host::advance`]. Backward:
    /// just sets it (no ticks fire until the clock passes each VM's next due tick again).
    pub fn set_time_ms(&self, ms: u64) -> Result<()> {
        let mut inner = self.inner.borrow_mut();
        let target = ms.saturating_mul(1_000_000);
        if target >= inner.clock.now_ns() {
            inner.run_until(target)
        } else {
            inner.clock.set_ns(target);
            Ok(())
        }
    }

    /// Fires `proxy_on_tick` on worker `w` now, outside of its schedule.
    pub fn tick(&self, w: usize) -> Result<()> {
        let mut inner = self.inner.borrow_mut();
        inner.vm(w)?.call("proxy_on_tick", ROOT_ID, &[ROOT_ID as i32])?;
        inner.settle()
    }

    /// Fires `proxy_on_tick` on every worker now, in worker order.
    pub fn tick_all(&self) -> Result<()> {
        for w in 0..self.workers() {
            self.tick(w)?;
        }
        Ok(())
    }

    /// With `EXO_LB_FUEL_TRACE` set: the wasm operations worker `w`'s VM had run at each of its
    /// calls into the host since the last take (what the filter's code costs between two host
    /// calls, for profiling; see tests/cost.rs).
    pub fn take_fuel_trace(&self, w: usize) -> Vec<u64> {
        let mut inner = self.inner.borrow_mut();
        inner
            .vms
            .get_mut(w)
            .and_then(|vm| vm.store.data_mut().fuel_trace.as_mut().map(std::mem::take))
            .unwrap_or_default()
    }

    /// What worker `w`'s VM has run so far (see [`crate::Cost`]); the difference of two
    /// readings is the cost of what happened in between.
    pub fn cost(&self, w: usize) -> crate::Cost {
        self.inner.borrow().vms.get(w).map_or_else(crate::Cost::default, |vm| vm.cost())
    }

    /// Tick period each worker set (0 = none).
    pub fn tick_period_ms(&self, w: usize) -> u32 {
        self.inner.borrow().vms.get(w).map_or(0, |vm| vm.store.data().tick_period_ms)
    }

    // ----- VMs -----

    /// Throws VM `w` away (crashed or not) and starts a fresh one over the same shared data,
    /// like Envoy's FAIL_RELOAD. Streams of the old VM become orphans: later calls on them are
    /// skipped. Fails if the new VM rejects the configuration.
    pub fn reload_worker(&self, w: usize) -> Result<()> {
        let mut inner = self.inner.borrow_mut();
        if w >= inner.vms.len() {
            bail!("worker {w} does not exist");
        }
        let (vm, accepted) = inner.start_vm(w)?;
        let old = std::mem::replace(&mut inner.vms[w], vm);
        let mut old_state = old.store.into_data();
        inner.old_logs.append(&mut old_state.logs);
        for (ctx, mut data) in std::mem::take(&mut old_state.streams) {
            data.orphaned = true;
            inner.finished.insert((w, old_state.generation, ctx), data);
        }
        let old_gen = old_state.generation;
        for call in lock(&inner.shared).calls.iter_mut() {
            if call.worker == w && call.generation == old_gen {
                call.done = true;
            }
        }
        if !accepted {
            let logs = inner.vms[w].report("reloaded VM rejected its configuration", &[]);
            bail!(logs);
        }
        Ok(())
    }

    /// Whether worker `w`'s VM trapped (and awaits [`Host::reload_worker`]).
    pub fn is_crashed(&self, w: usize) -> bool {
        self.inner.borrow().vms.get(w).is_some_and(|vm| vm.crashed.is_some())
    }

    // ----- logs -----

    /// Every captured log line, all workers (replaced VMs first, then by worker).
    pub fn logs(&self) -> Vec<LogLine> {
        let inner = self.inner.borrow();
        let mut out = inner.old_logs.clone();
        for vm in &inner.vms {
            out.extend(vm.store.data().logs.iter().cloned());
        }
        out
    }

    /// True when some log line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.logs().iter().any(|l| l.message.contains(needle))
    }

    /// Forgets captured logs.
    pub fn clear_logs(&self) {
        let mut inner = self.inner.borrow_mut();
        inner.old_logs.clear();
        for vm in &mut inner.vms {
            vm.store.data_mut().logs.clear();
        }
    }

    /// The logs as one text, one line each.
    pub fn logs_text(&self) -> String {
        let lines: Vec<String> = self.logs().iter().map(ToString::to_string).collect();
        lines.join("\n")
    }

    /// The value `proxy_get_log_level` reports (0 = trace, the default).
    pub fn set_log_level(&self, level: u32) {
        lock(&self.inner.borrow().shared).log_level = level;
    }

    // ----- metrics -----

    /// Value of a counter or gauge. Envoy's stats are process-wide, so every worker's
    /// increments land in the same metric: this is the sum over workers.
    pub fn metric(&self, name: &str) -> Option<i64> {
        lock(&self.inner.borrow().shared)
            .metrics
            .iter()
            .find(|m| m.name == name && m.kind != MetricKind::Histogram)
            .map(|m| m.value)
    }

    /// Values recorded in a histogram, in order (None if not defined).
    pub fn histogram(&self, name: &str) -> Option<Vec<u64>> {
        lock(&self.inner.borrow().shared)
            .metrics
            .iter()
            .find(|m| m.name == name && m.kind == MetricKind::Histogram)
            .map(|m| m.recorded.clone())
    }

    /// Every defined metric: name -> (kind, value; for histograms the number of records).
    pub fn metrics(&self) -> BTreeMap<String, (MetricKind, i64)> {
        lock(&self.inner.borrow().shared)
            .metrics
            .iter()
            .map(|m| {
                let v = match m.kind {
                    MetricKind::Histogram => m.recorded.len() as i64,
                    _ => m.value,
                };
                (m.name.clone(), (m.kind, v))
            })
            .collect()
    }

    // ----- shared data -----

    /// Shared data entry: (value, cas).
    pub fn shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.inner.borrow().shared).data.get(key).cloned()
    }

    /// All shared-data keys, sorted.
    pub fn shared_data_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = lock(&self.inner.borrow().shared).data.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Sets a shared-data entry unconditionally (bumps its cas like a filter write).
    pub fn set_shared_data(&self, key: &str, value: &[u8]) {
        let inner = self.inner.borrow();
        let mut sh = lock(&inner.shared);
        let cas = sh.bump_cas();
        sh.data.insert(key.to_string(), (value.to_vec(), cas));
    }

    // ----- HTTP calls -----

    /// Every HTTP call dispatched so far (answered ones have `done == true`).
    pub fn http_calls(&self) -> Vec<HttpCall> {
        lock(&self.inner.borrow().shared).calls.clone()
    }

    /// HTTP calls still waiting for an answer.
    pub fn pending_http_calls(&self) -> Vec<HttpCall> {
        self.http_calls().into_iter().filter(|c| !c.done).collect()
    }

    /// Answers call `token`: runs `proxy_on_http_call_response` on the VM and context that
    /// made the call, with `:status` + `headers` readable as map type 6 and `body` as buffer
    /// type 4.
    pub fn answer_http_call(&self, token: u32, status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<()> {
        let mut all = vec![(":status".to_string(), status.to_string())];
        all.extend(lower(headers));
        self.inner.borrow_mut().deliver_call(token, all, body.to_vec())
    }

    /// Fails call `token` the way Envoy reports a failed call (connection failure, reset,
    /// timeout): `proxy_on_http_call_response` with 0 headers and an empty body.
    pub fn fail_http_call(&self, token: u32) -> Result<()> {
        self.inner.borrow_mut().deliver_call(token, Vec::new(), Vec::new())
    }

    /// Root-context properties (also the fallback for stream contexts), e.g. `plugin_name`.
    pub fn set_root_property(&self, name: &str, value: &[u8]) {
        for vm in &mut self.inner.borrow_mut().vms {
            vm.store.data_mut().root_properties.insert(name.to_string(), value.to_vec());
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(inner) = self.inner.try_borrow() {
                eprintln!("--- wasm-host: logs of {} ---", inner.path.display());
                for line in &inner.old_logs {
                    eprintln!("{line}");
                }
                for vm in &inner.vms {
                    for line in &vm.store.data().logs {
                        eprintln!("{line}");
                    }
                }
            }
        }
    }
}

fn lower(headers: &[(&str, &str)]) -> Headers {
    headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect()
}

impl Inner {
    fn start_vm(&mut self, w: usize) -> Result<(Vm, bool)> {
        let generation = self.next_generation;
        self.next_generation += 1;
        if self.generations.len() <= w {
            self.generations.resize(w + 1, 0);
        }
        self.generations[w] = generation;
        let (vm, ok) = Vm::start(
            &self.compiled,
            VmParams {
                worker: w,
                generation,
                shared: self.shared.clone(),
                clock: self.clock.clone(),
                plugin_config: &self.plugin_config,
                vm_config: &self.vm_config,
                echo_logs: self.echo_logs,
            },
        )?;
        Ok((vm, ok))
    }

    fn vm(&mut self, w: usize) -> Result<&mut Vm> {
        self.vms.get_mut(w).ok_or_else(|| anyhow!("worker {w} does not exist"))
    }

    fn live(&mut self, key: StreamKey) -> Option<&mut StreamData> {
        let (w, generation, ctx) = key;
        let vm = self.vms.get_mut(w)?;
        if vm.store.data().generation != generation {
            return None;
        }
        vm.store.data_mut().streams.get_mut(&ctx)
    }

    fn data(&mut self, key: StreamKey) -> Option<&mut StreamData> {
        let (w, generation, ctx) = key;
        let is_live = self
            .vms
            .get(w)
            .is_some_and(|vm| vm.store.data().generation == generation && vm.store.data().streams.contains_key(&ctx));
        if is_live {
            self.live(key)
        } else {
            self.finished.get_mut(&key)
        }
    }

    /// True when the host must not call the filter for this stream any more.
    fn skip(&mut self, key: StreamKey) -> bool {
        match self.live(key) {
            None => true,
            Some(d) => d.ended || d.local_response.is_some() || d.reset_by_filter,
        }
    }

    /// Runs what Envoy does after a callback returns: ends streams that got a local reply or
    /// were reset, deletes streams whose on_done was deferred, delivers queue-ready events.
    fn settle(&mut self) -> Result<()> {
        for _ in 0..10_000 {
            let mut progressed = false;
            for w in 0..self.vms.len() {
                if self.vms[w].crashed.is_some() || !self.vms[w].store.data().needs_settle {
                    continue;
                }
                self.vms[w].store.data_mut().needs_settle = false;
                let generation = self.vms[w].store.data().generation;
                let streams = &self.vms[w].store.data().streams;
                let to_end: Vec<u32> = streams
                    .iter()
                    .filter(|(_, d)| !d.ended && (d.local_response.is_some() || d.reset_by_filter))
                    .map(|(id, _)| *id)
                    .collect();
                let to_delete: Vec<u32> = streams
                    .iter()
                    .filter(|(_, d)| d.awaiting_done && d.done_called && !d.deleted)
                    .map(|(id, _)| *id)
                    .collect();
                for ctx in to_end {
                    self.end_stream((w, generation, ctx))?;
                    progressed = true;
                }
                for ctx in to_delete {
                    self.delete_stream((w, generation, ctx))?;
                    progressed = true;
                }
            }
            let events = std::mem::take(&mut lock(&self.shared).queue_ready);
            for (w, generation, queue) in events {
                let deliver =
                    self.vms.get(w).is_some_and(|vm| vm.crashed.is_none() && vm.store.data().generation == generation);
                if deliver {
                    self.vm(w)?.call("proxy_on_queue_ready", ROOT_ID, &[ROOT_ID as i32, queue as i32])?;
                    progressed = true;
                }
            }
            if !progressed {
                return Ok(());
            }
        }
        bail!("wasm-host: settle() did not converge (a filter keeps re-triggering itself)")
    }

    /// on_log, on_done and (unless on_done returned false) on_delete.
    fn end_stream(&mut self, key: StreamKey) -> Result<()> {
        let (w, _, ctx) = key;
        {
            let Some(d) = self.live(key) else {
                return Ok(());
            };
            if d.ended {
                return Ok(());
            }
            d.ended = true;
            d.log_phase = true;
        }
        let logged = self.vm(w)?.call("proxy_on_log", ctx, &[ctx as i32]);
        if let Some(d) = self.live(key) {
            d.log_phase = false;
        }
        logged?;
        let done = self.vm(w)?.call("proxy_on_done", ctx, &[ctx as i32])?;
        if done == Some(0) {
            if let Some(d) = self.live(key) {
                d.awaiting_done = true;
            }
            return Ok(());
        }
        self.delete_stream(key)
    }

    fn delete_stream(&mut self, key: StreamKey) -> Result<()> {
        let (w, generation, ctx) = key;
        self.vm(w)?.call("proxy_on_delete", ctx, &[ctx as i32])?;
        for call in lock(&self.shared).calls.iter_mut() {
            if call.worker == w && call.generation == generation && call.context_id == ctx {
                call.done = true;
            }
        }
        if let Some(mut d) = self.vm(w)?.store.data_mut().streams.remove(&ctx) {
            d.deleted = true;
            self.finished.insert(key, d);
        }
        Ok(())
    }

    fn deliver_call(&mut self, token: u32, headers: Headers, body: Vec<u8>) -> Result<()> {
        let call = {
            let mut sh = lock(&self.shared);
            let Some(call) = sh.calls.iter_mut().find(|c| c.token == token) else {
                bail!("no HTTP call with token {token}");
            };
            if call.done {
                bail!("HTTP call {token} was already answered, failed or cancelled");
            }
            call.done = true;
            call.clone()
        };
        let w = call.worker;
        let current = self.vms.get(w).map(|vm| vm.store.data().generation);
        if current != Some(call.generation) {
            // Its VM was reloaded: Envoy drops the callback with the VM.
            return Ok(());
        }
        let vm = self.vm(w)?;
        let n = headers.len() as i32;
        let body_len = body.len() as i32;
        vm.store.data_mut().call_response = Some(abi::call_response(headers, body));
        let ctx = call.context_id;
        let result = vm.call("proxy_on_http_call_response", ctx, &[ctx as i32, token as i32, n, body_len, 0]);
        vm.store.data_mut().call_response = None;
        result?;
        self.settle()
    }

    /// Advances the clock to `target` (ns), firing ticks and call timeouts in time order.
    fn run_until(&mut self, target: u64) -> Result<()> {
        enum Ev {
            Tick(usize),
            Timeout(u32),
        }
        loop {
            let mut next: Option<(u64, Ev)> = None;
            for (w, vm) in self.vms.iter().enumerate() {
                if vm.crashed.is_some() {
                    continue;
                }
                if let Some(t) = vm.store.data().next_tick_ns {
                    if t <= target && next.as_ref().is_none_or(|(nt, _)| t < *nt) {
                        next = Some((t, Ev::Tick(w)));
                    }
                }
            }
            for c in lock(&self.shared).calls.iter().filter(|c| !c.done) {
                if c.timeout_ms == 0 {
                    continue;
                }
                let t = (c.sent_at_ms + c.timeout_ms as u64) * 1_000_000;
                if t <= target && next.as_ref().is_none_or(|(nt, _)| t < *nt) {
                    next = Some((t, Ev::Timeout(c.token)));
                }
            }
            let Some((t, ev)) = next else {
                break;
            };
            if t > self.clock.now_ns() {
                self.clock.set_ns(t);
            }
            match ev {
                Ev::Tick(w) => {
                    let vm = self.vm(w)?;
                    let period = vm.store.data().tick_period_ms as u64 * 1_000_000;
                    vm.store.data_mut().next_tick_ns = Some(t + period.max(1));
                    vm.call("proxy_on_tick", ROOT_ID, &[ROOT_ID as i32])?;
                    self.settle()?;
                }
                Ev::Timeout(token) => self.deliver_call(token, Vec::new(), Vec::new())?,
            }
        }
        if target > self.clock.now_ns() {
            self.clock.set_ns(target);
        }
        Ok(())
    }

    fn start_request(&mut self, w: usize, spec: RequestBuilder) -> Result<StreamKey> {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let vm = self.vm(w)?;
        let ctx = vm.next_context_id;
        vm.next_context_id += 1;
        let key = (w, vm.store.data().generation, ctx);
        let mut headers: Headers = Vec::new();
        if spec.default_headers {
            headers.push((":method".into(), spec.method.clone()));
            headers.push((":path".into(), spec.path.clone()));
            headers.push((":authority".into(), "localhost:10000".into()));
            headers.push((":scheme".into(), "http".into()));
        }
        headers.extend(spec.headers.iter().cloned());
        if spec.default_headers {
            let has = |h: &Headers, k: &str| h.iter().any(|(n, _)| n == k);
            if let Some(body) = &spec.body_whole {
                if !has(&headers, "content-length") {
                    headers.push(("content-length".into(), body.len().to_string()));
                }
            }
            if !has(&headers, "x-forwarded-proto") {
                headers.push(("x-forwarded-proto".into(), "http".into()));
            }
            if !has(&headers, "x-request-id") {
                headers.push(("x-request-id".into(), format!("00000000-0000-4000-8000-{request_id:012x}")));
            }
        }
        let mut data = StreamData { properties: spec.properties.clone(), ..Default::default() };
        data.properties.entry("source.address".into()).or_insert_with(|| b"127.0.0.1:40000".to_vec());
        let chunks = spec.chunk_list();
        let eos = chunks.is_empty() && !spec.streaming;
        data.request.headers = headers;
        data.request.headers_present = true;
        data.request.end_seen = eos;
        let n = data.request.headers.len() as i32;
        vm.store.data_mut().streams.insert(ctx, data);
        vm.call("proxy_on_context_create", ctx, &[ctx as i32, ROOT_ID as i32])?;
        let action = vm.call("proxy_on_request_headers", ctx, &[ctx as i32, n, eos as i32])?;
        if !self.skip(key) && Action::from_raw(action) == Action::Continue {
            if let Some(d) = self.live(key) {
                d.request.continue_iteration();
            }
        }
        self.settle()?;
        let count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let last = i + 1 == count && !spec.streaming;
            if self.body(key, true, chunk, last)? == Action::Skipped {
                break;
            }
        }
        Ok(key)
    }

    /// Delivers a body chunk of the request (`request = true`) or response.
    fn body(&mut self, key: StreamKey, request: bool, chunk: Vec<u8>, eos: bool) -> Result<Action> {
        if self.skip(key) {
            return Ok(Action::Skipped);
        }
        let (w, _, ctx) = key;
        let size = {
            let Some(d) = self.live(key) else {
                return Ok(Action::Skipped);
            };
            let dir = if request { &mut d.request } else { &mut d.response };
            if dir.end_seen {
                bail!("{} body after end of stream (context {ctx})", if request { "request" } else { "response" });
            }
            dir.buffer.extend_from_slice(&chunk);
            dir.end_seen = eos;
            dir.buffer.len() as i32
        };
        let export = if request { "proxy_on_request_body" } else { "proxy_on_response_body" };
        let raw = self.vm(w)?.call(export, ctx, &[ctx as i32, size, eos as i32])?;
        let action = Action::from_raw(raw);
        if !self.skip(key) && action == Action::Continue {
            if let Some(d) = self.live(key) {
                if request {
                    d.request.continue_iteration();
                } else {
                    d.response.continue_iteration();
                }
            }
        }
        self.settle()?;
        Ok(action)
    }

    fn response_headers(&mut self, key: StreamKey, status: u32, headers: Headers, eos: bool) -> Result<Action> {
        if self.skip(key) {
            return Ok(Action::Skipped);
        }
        let (w, _, ctx) = key;
        let n = {
            let Some(d) = self.live(key) else {
                return Ok(Action::Skipped);
            };
            if d.request.forwarded_headers.is_none() {
                bail!("upstream response on context {ctx} before its request headers went upstream");
            }
            if d.response.headers_present {
                bail!("second upstream response on context {ctx}");
            }
            let props = &mut d.properties;
            props.insert("response.code".into(), (status as u64).to_le_bytes().to_vec());
            props.entry("response.flags".into()).or_insert_with(|| 0u64.to_le_bytes().to_vec());
            props.entry("upstream.request_attempt_count".into()).or_insert_with(|| 1u64.to_le_bytes().to_vec());
            if !props.contains_key("upstream.address") {
                let first = d
                    .request
                    .forwarded_headers
                    .as_ref()
                    .and_then(|h| find_header(h, "x-gateway-destination-endpoint"))
                    .and_then(|v| v.split(',').next())
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty());
                if let Some(addr) = first {
                    d.properties.insert("upstream.address".into(), addr.into_bytes());
                }
            }
            let mut all = vec![(":status".to_string(), status.to_string())];
            all.extend(headers);
            d.response.headers = all;
            d.response.headers_present = true;
            d.response.end_seen = eos;
            d.response.headers.len() as i32
        };
        let raw = self.vm(w)?.call("proxy_on_response_headers", ctx, &[ctx as i32, n, eos as i32])?;
        let action = Action::from_raw(raw);
        if !self.skip(key) && action == Action::Continue {
            if let Some(d) = self.live(key) {
                d.response.continue_iteration();
            }
        }
        self.settle()?;
        Ok(action)
    }

    fn finish(&mut self, key: StreamKey, aborted: bool) -> Result<()> {
        let Some(d) = self.live(key) else {
            return Ok(());
        };
        if d.ended {
            return Ok(());
        }
        d.aborted = aborted;
        self.end_stream(key)?;
        self.settle()
    }
}

/// Handle on one worker (VM).
pub struct Worker {
    inner: Rc<RefCell<Inner>>,
    index: usize,
}

impl Worker {
    /// Index of this worker.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Starts building a request for this worker.
    pub fn request(&self, method: &str, path: &str) -> RequestBuilder {
        RequestBuilder {
            inner: self.inner.clone(),
            worker: self.index,
            method: method.to_string(),
            path: path.to_string(),
            headers: Vec::new(),
            properties: HashMap::new(),
            body_whole: None,
            body_chunks: None,
            streaming: false,
            default_headers: true,
        }
    }

    /// Log lines of this worker's current VM.
    pub fn logs(&self) -> Vec<LogLine> {
        self.inner.borrow().vms.get(self.index).map(|vm| vm.store.data().logs.clone()).unwrap_or_default()
    }

    /// Streams of this worker whose filter context is still alive (not deleted).
    pub fn live_streams(&self) -> usize {
        self.inner.borrow().vms.get(self.index).map_or(0, |vm| vm.store.data().streams.len())
    }
}

/// A request being built; [`RequestBuilder::start`] sends it through the filter.
pub struct RequestBuilder {
    inner: Rc<RefCell<Inner>>,
    worker: usize,
    method: String,
    path: String,
    headers: Headers,
    properties: HashMap<String, Vec<u8>>,
    body_whole: Option<Vec<u8>>,
    body_chunks: Option<Vec<Vec<u8>>>,
    streaming: bool,
    default_headers: bool,
}

impl RequestBuilder {
    /// Adds a request header (name lower-cased, as Envoy does).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// Adds several headers.
    pub fn headers(mut self, headers: &[(&str, &str)]) -> Self {
        self.headers.extend(lower(headers));
        self
    }

    /// Sends only the given headers: no `:method`/`:path`/`:authority`/`:scheme`,
    /// `content-length`, `x-forwarded-proto` or `x-request-id` added by the host.
    pub fn no_default_headers(mut self) -> Self {
        self.default_headers = false;
        self
    }

    /// A string property (UTF-8 bytes), e.g. `source.address` = `10.0.0.9:5555`.
    /// Defaults: `source.address` = `127.0.0.1:40000`.
    pub fn property_str(mut self, name: &str, value: &str) -> Self {
        self.properties.insert(name.to_string(), value.as_bytes().to_vec());
        self
    }

    /// An integer property, 8 bytes little-endian like Envoy's.
    pub fn property_u64(mut self, name: &str, value: u64) -> Self {
        self.properties.insert(name.to_string(), value.to_le_bytes().to_vec());
        self
    }

    /// A raw property value.
    pub fn property_bytes(mut self, name: &str, value: &[u8]) -> Self {
        self.properties.insert(name.to_string(), value.to_vec());
        self
    }

    /// The body, delivered in one chunk with end_of_stream (adds `content-length`).
    pub fn body(mut self, body: impl AsRef<[u8]>) -> Self {
        self.body_whole = Some(body.as_ref().to_vec());
        self.body_chunks = None;
        self
    }

    /// The body split into chunks, delivered one by one; the last has end_of_stream.
    /// An empty list means no body (headers carry end_of_stream).
    pub fn chunks<B: AsRef<[u8]>>(mut self, chunks: impl IntoIterator<Item = B>) -> Self {
        self.body_chunks = Some(chunks.into_iter().map(|c| c.as_ref().to_vec()).collect());
        self.body_whole = None;
        self
    }

    /// Headers without end_of_stream, and the given body chunks (if any) without it either:
    /// the test sends the rest with [`Stream::request_body`].
    pub fn streaming(mut self) -> Self {
        self.streaming = true;
        self
    }

    fn chunk_list(&self) -> Vec<Vec<u8>> {
        match (&self.body_whole, &self.body_chunks) {
            (Some(b), _) => vec![b.clone()],
            (None, Some(c)) => c.clone(),
            (None, None) => Vec::new(),
        }
    }

    /// Creates the stream context, runs on_request_headers, then on_request_body for each
    /// chunk (as long as the stream has not ended). Errors on a trap or a problem.
    pub fn start(self) -> Result<Stream> {
        let inner = self.inner.clone();
        let worker = self.worker;
        let key = inner.borrow_mut().start_request(worker, self)?;
        Ok(Stream { inner, key })
    }
}

/// One HTTP stream (request + response) through a worker's filter.
pub struct Stream {
    inner: Rc<RefCell<Inner>>,
    key: StreamKey,
}

impl Stream {
    /// Filter context id of this stream (unique per VM; the root context is 1).
    pub fn id(&self) -> u32 {
        self.key.2
    }

    /// Worker this stream runs on.
    pub fn worker(&self) -> usize {
        self.key.0
    }

    fn read<R>(&self, f: impl FnOnce(&StreamData) -> R) -> R {
        let mut inner = self.inner.borrow_mut();
        match inner.data(self.key) {
            Some(d) => f(d),
            None => f(&StreamData::default()),
        }
    }

    /// Where the request stands now.
    pub fn outcome(&self) -> Outcome {
        self.read(|d| {
            if let Some(lr) = &d.local_response {
                Outcome::LocalResponse {
                    status: lr.status,
                    headers: lr.headers.clone(),
                    body: lr.body.clone(),
                    details: lr.details.clone(),
                }
            } else if d.reset_by_filter {
                Outcome::Reset
            } else if d.request.complete {
                Outcome::Forwarded { request_headers: d.request.forwarded_headers.clone().unwrap_or_default() }
            } else {
                Outcome::Paused
            }
        })
    }

    /// The local reply, if the filter sent one.
    pub fn local_response(&self) -> Option<LocalResponse> {
        self.read(|d| d.local_response.clone())
    }

    /// A request header as the filter left it (first value).
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.read(|d| find_header(&d.request.headers, name).map(str::to_string))
    }

    /// Every value of a request header as the filter left it.
    pub fn request_header_all(&self, name: &str) -> Vec<String> {
        let name = name.to_ascii_lowercase();
        self.read(|d| d.request.headers.iter().filter(|(k, _)| *k == name).map(|(_, v)| v.clone()).collect())
    }

    /// The request header map as the filter left it.
    pub fn request_headers(&self) -> Headers {
        self.read(|d| d.request.headers.clone())
    }

    /// Request headers as passed upstream (None while held).
    pub fn forwarded_request_headers(&self) -> Option<Headers> {
        self.read(|d| d.request.forwarded_headers.clone())
    }

    /// Request body bytes passed upstream so far.
    pub fn forwarded_request_body(&self) -> Vec<u8> {
        self.read(|d| d.request.forwarded_body.clone())
    }

    /// Sends another request body chunk (after [`RequestBuilder::streaming`]).
    pub fn request_body(&self, chunk: impl AsRef<[u8]>, end_of_stream: bool) -> Result<Action> {
        self.inner.borrow_mut().body(self.key, true, chunk.as_ref().to_vec(), end_of_stream)
    }

    /// Sets a string property on this stream (e.g. `upstream.address` before a response).
    pub fn property_str(&self, name: &str, value: &str) -> &Self {
        self.property_bytes(name, value.as_bytes())
    }

    /// Sets an 8-byte little-endian integer property (`response.flags`,
    /// `upstream.request_attempt_count`, ...).
    pub fn property_u64(&self, name: &str, value: u64) -> &Self {
        self.property_bytes(name, &value.to_le_bytes())
    }

    /// Sets a raw property.
    pub fn property_bytes(&self, name: &str, value: &[u8]) -> &Self {
        if let Some(d) = self.inner.borrow_mut().data(self.key) {
            d.properties.insert(name.to_string(), value.to_vec());
        }
        self
    }

    /// Sets `upstream.address` (a string, e.g. `127.0.0.1:18101`) for the coming response.
    pub fn upstream_address(&self, address: &str) -> &Self {
        self.property_str("upstream.address", address)
    }

    /// Sets `upstream.request_attempt_count` (1 = no retry).
    pub fn attempt_count(&self, attempts: u64) -> &Self {
        self.property_u64("upstream.request_attempt_count", attempts)
    }

    /// Sets `response.flags` (Envoy's response-flag bits).
    pub fn response_flags(&self, flags: u64) -> &Self {
        self.property_u64("response.flags", flags)
    }

    /// A property as the stream has it.
    pub fn property(&self, name: &str) -> Option<Vec<u8>> {
        self.read(|d| d.properties.get(name).cloned())
    }

    /// The upstream answers with `status` and `headers` (a body follows: send it with
    /// [`Stream::response_body`]). Sets `response.code`; unless set before, also
    /// `response.flags` = 0, `upstream.request_attempt_count` = 1 and `upstream.address` =
    /// the first entry of the forwarded `x-gateway-destination-endpoint` (what Envoy's
    /// override_host does on a first attempt). Runs on_response_headers and returns the
    /// response headers as the filter left them.
    pub fn upstream_response(&self, status: u32, headers: &[(&str, &str)]) -> Result<Headers> {
        self.inner.borrow_mut().response_headers(self.key, status, lower(headers), false)?;
        Ok(self.response_headers())
    }

    /// Like [`Stream::upstream_response`] with end_of_stream on the headers (no body).
    pub fn upstream_response_headers_only(&self, status: u32, headers: &[(&str, &str)]) -> Result<Headers> {
        self.inner.borrow_mut().response_headers(self.key, status, lower(headers), true)?;
        Ok(self.response_headers())
    }

    /// Convenience: [`Stream::upstream_response`] then one [`Stream::response_body`] chunk
    /// with end_of_stream. Returns the body callback's action.
    pub fn respond(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<Action> {
        self.upstream_response(status, headers)?;
        self.response_body(body, true)
    }

    /// One response body chunk; returns what on_response_body returned (tests assert it is
    /// never `Pause`: SSE must flow).
    pub fn response_body(&self, chunk: impl AsRef<[u8]>, end_of_stream: bool) -> Result<Action> {
        self.inner.borrow_mut().body(self.key, false, chunk.as_ref().to_vec(), end_of_stream)
    }

    /// A response header as the filter left it.
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.read(|d| find_header(&d.response.headers, name).map(str::to_string))
    }

    /// The response header map as the filter left it.
    pub fn response_headers(&self) -> Headers {
        self.read(|d| d.response.headers.clone())
    }

    /// Response body bytes passed downstream so far.
    pub fn forwarded_response_body(&self) -> Vec<u8> {
        self.read(|d| d.response.forwarded_body.clone())
    }

    /// End of the stream as Envoy runs it: on_log, on_done, on_delete. A no-op if the stream
    /// already ended (e.g. after a local reply, which ends it by itself) or its VM was
    /// reloaded.
    pub fn finish(&self) -> Result<()> {
        self.inner.borrow_mut().finish(self.key, false)
    }

    /// The client went away (before or without a response): on_log, on_done, on_delete.
    /// Set `response.flags` etc. with the property setters first if the filter reads them.
    pub fn abort(&self) -> Result<()> {
        self.inner.borrow_mut().finish(self.key, true)
    }

    /// on_log/on_done ran.
    pub fn is_finished(&self) -> bool {
        self.read(|d| d.ended)
    }

    /// The stream's VM was reloaded before the stream ended: the filter will never see it
    /// again.
    pub fn is_orphaned(&self) -> bool {
        self.read(|d| d.orphaned)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.inner.try_borrow_mut() {
            inner.finished.remove(&self.key);
        }
    }
}
