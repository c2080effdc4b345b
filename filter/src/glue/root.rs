//! One root context per VM and plugin (per Envoy worker): holds the configuration, and on its
//! ticks renews this VM's lease, resumes queued requests that were granted a node (or answers
//! those that waited too long), and runs the active health checks when it holds the prober
//! lease. It creates a stream context per request.

use crate::glue::host;
use crate::glue::id_map::IdMap;
use crate::glue::metrics::Metrics;
use crate::glue::platform::{Platform, Resume};
use crate::glue::stream::{self, Stream};
use crate::logic::config::Config;
use crate::logic::discover;
use crate::logic::escape::LogSafe;
use crate::logic::estimates::{Arrived, Estimates, Sample, MAX_PENDING_ARRIVALS, MAX_PENDING_SAMPLES};
use crate::logic::metrics::model_label;
use crate::logic::outcome::{self, Ending};
use crate::logic::probe;
use crate::logic::schedule::{self, Ready};
use crate::logic::select::Route;
use crate::logic::state::{mix, model_key, ClusterState, LEASE_RENEW_MS};
use crate::logic::summary;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// The root id of the plugin on the status listener (same module, same VM).
pub const STATUS_ROOT_ID: &str = "exo_lb_status";
/// Tick period while this VM holds queued requests: the admission lag after a slot frees, during
/// which the node sits idle. A tick with nothing granted costs one shared-data read and write (a
/// few microseconds), so a short period is cheap, and it is only this short while requests
/// wait. At 5 ms the lag cost about 2 % of p95 at 80 % load where generations take 0.6 s
/// (`exo-lb-bench simulate`, 64 seeds); at 1 ms it is gone.
const QUEUE_TICK_MS: u64 = 1;
/// How often a VM with queued requests re-reads the shared estimates.
const ESTIMATES_REFRESH_MS: u64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The public listener: routes requests.
    Balancer,
    /// The status listener: answers the status page only.
    Status,
}

/// A request that was given a node: what it must give back when it ends.
pub struct Booking {
    pub route: Route,
    /// The node holding this request's slot (moves to the node that really served).
    pub charged: Option<usize>,
    pub started_ms: u64,
    pub model: Option<String>,
    /// The node that answered and its status (from the response headers).
    pub served: Option<usize>,
    pub status: Option<u32>,
    /// A streamed reply: when its first token came (its first body chunk that is not only
    /// server-sent-event comments), and how many body chunks came from then on.
    pub stream: bool,
    pub first_byte_ms: Option<u64>,
    pub chunks: u64,
    /// The node's reply ended (end of stream seen), rather than being cut.
    pub complete: bool,
    /// The request's `max_tokens` (bounds how long a node is held after its client left).
    pub max_tokens: Option<u64>,
    /// The last bytes of a streamed reply, where the host does not report cut streams (nginx).
    pub tail: Vec<u8>,
}

impl Booking {
    pub fn new(route: Route, charged: Option<usize>, started_ms: u64, model: Option<String>, stream: bool) -> Booking {
        Booking {
            route,
            charged,
            started_ms,
            model,
            served: None,
            status: None,
            stream,
            first_byte_ms: None,
            chunks: 0,
            complete: false,
            max_tokens: None,
            tail: Vec::new(),
        }
    }
}

/// A request paused in the queue.
pub struct Waiting {
    pub request_id: String,
    pub model: String,
    pub stream: bool,
    pub since_ms: u64,
}

/// What every stream of this VM shares.
pub struct Vm {
    pub config: Config,
    pub id: u64,
    pub role: Role,
    /// State of the per-request random numbers (seeded from the clock and the VM id).
    random: Cell<u64>,
    pub metrics: Metrics,
    /// Stream context id -> its booking.
    pub bookings: RefCell<IdMap<u32, Booking>>,
    /// Stream context id -> a request of this VM waiting in the shared queue.
    pub waiting: RefCell<IdMap<u32, Waiting>>,
    /// The shared estimates as of this VM's last tick (they change slowly; requests read this
    /// copy instead of shared data).
    pub estimates: RefCell<Estimates>,
    /// Measurements of this VM's finished requests, folded into the shared estimates on its
    /// next tick (off the request path).
    samples: RefCell<Vec<Sample>>,
    /// This VM's admitted requests since its last fold, folded in the same way.
    arrivals: RefCell<Vec<Arrived>>,
    /// The tick period last asked of the host (0: none yet).
    tick_ms: Cell<u64>,
    /// Whether the nodes' answers to what they have loaded are awaited (from the start until
    /// its first tick when `discover_loaded`, then as of its last tick): requests wait for them,
    /// so the VM ticks fast, and re-reads the shared estimates on each tick, so that what one
    /// worker hears (a node's load time too) reaches the others at once.
    discovering: Cell<bool>,
    /// When this VM last read the shared estimates.
    pub estimates_read_ms: Cell<u64>,
    /// The host, and what it can do.
    pub platform: Platform,
    /// Queued requests of this VM given a node or an error, not yet picked up by their own
    /// timer (hosts that cannot resume a request from a tick).
    pub ready: RefCell<IdMap<u32, Ready>>,
}

impl Vm {
    /// A fresh random number per request (for `random_two`), without a host call.
    pub fn random(&self) -> u64 {
        let n = self.random.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.random.set(n);
        mix(n)
    }

    /// Ticks fast while the nodes' answers to what they have loaded are awaited and while
    /// requests wait, slowly otherwise. Asks the host only when the period changes, and only once
    /// where a second set traps (nginx: there the period stays the slow one, and queued requests
    /// wait on their own timers).
    pub fn set_tick(&self) {
        let base = self.config.probe.as_ref().map_or(LEASE_RENEW_MS, |p| p.interval_ms.min(LEASE_RENEW_MS));
        let busy = !self.waiting.borrow().is_empty();
        let fast = (busy || self.discovering.get()) && self.platform.tick_adjustable();
        let period = if fast { QUEUE_TICK_MS } else { base };
        if !self.platform.tick_adjustable() && self.tick_ms.get() != 0 {
            return;
        }
        if self.tick_ms.replace(period) != period {
            host::set_tick_period_ms(period);
        }
    }

    /// Applies `change` to the shared cluster state ([`host::update_state`]) and times, in
    /// `exo_lb_look_ahead_microseconds`, a look-ahead plan it made: the state update that made
    /// it (the plan, and the rest of that scheduling pass), which is what a plan costs a worker
    /// in this host's wasm runtime (nginx-wasm's clock counts whole milliseconds).
    pub fn update_state<R>(&self, change: impl FnMut(&mut ClusterState) -> R) -> R {
        let (result, look_ahead_us) = host::update_state(&self.config, change);
        if let Some(us) = look_ahead_us {
            self.metrics.histogram("exo_lb_look_ahead_microseconds", &[], us);
        }
        result
    }

    /// Runs the scheduler for the queue now (a waiting request's timer, where the tick cannot
    /// resume requests) and keeps what it decided for this VM's requests.
    pub fn poll_queue(&self, now: u64) {
        let (cfg, id) = (&self.config, self.id);
        let ready = {
            let est = self.estimates.borrow();
            self.update_state(|s| {
                schedule::schedule(cfg, s, &est, now);
                schedule::take_ready(cfg, s, id, now)
            })
        };
        self.keep_ready(ready);
    }

    fn keep_ready(&self, ready: Vec<Ready>) {
        let mut kept = self.ready.borrow_mut();
        for r in ready {
            let ctx = match &r {
                Ready::Go { ctx, .. } | Ready::Fail { ctx, .. } => *ctx,
            };
            kept.insert(ctx, r);
        }
    }

    /// Gives back the slot of a route granted to a request that is gone.
    pub fn give_back(&self, route: &Route, now: u64) {
        let cfg = &self.config;
        let end = Ending {
            route: &route.nodes,
            probing: route.probing,
            charged: route.nodes.first().copied(),
            attempts: 0,
            served: None,
            status: 0,
            flags: 0,
            started_ms: now,
            now_ms: now,
            vm: self.id,
            model: None,
            switched: false,
            cold: false,
            first_byte_ms: None,
            chunks: None,
            max_tokens: None,
        };
        let est = self.estimates.borrow();
        self.update_state(|s| outcome::finish(cfg, s, &est, &end));
    }

    /// Keeps a finished request's measurement for the next tick.
    pub fn add_sample(&self, sample: Sample) {
        {
            let mut samples = self.samples.borrow_mut();
            if samples.len() < MAX_PENDING_SAMPLES {
                samples.push(sample);
            }
        }
        self.set_tick();
    }

    /// Keeps an admitted request's model and time for the next tick (a tick comes within a
    /// second: arrivals do not hurry it).
    pub fn add_arrival(&self, arrived: Arrived) {
        let mut arrivals = self.arrivals.borrow_mut();
        if arrivals.len() < MAX_PENDING_ARRIVALS {
            arrivals.push(arrived);
        }
    }

    /// Whether samples or arrivals wait to be folded in.
    pub fn has_pending(&self) -> bool {
        !self.samples.borrow().is_empty() || !self.arrivals.borrow().is_empty()
    }

    /// Folds this VM's measurements into the shared estimates and re-reads them when it last
    /// did over `ESTIMATES_REFRESH_MS` ago: before it admits a request and when one ends (and
    /// on its ticks). A worker with nothing queued did both only on its lease renewal, every
    /// second: its measurements reached the others that late, and it admitted on figures that
    /// old, so a request it queued before its model's first measurements reached it counted as
    /// the model's median work, not as its own `max_tokens` said (the benchmark smoke, where a
    /// second is five generations, switched a node on that). At most one shared-data write
    /// per period, however many requests pass.
    pub fn refresh_estimates(&self, now: u64) {
        if now >= self.estimates_read_ms.get().saturating_add(ESTIMATES_REFRESH_MS) {
            self.sync_estimates();
            self.estimates_read_ms.set(now);
        }
    }

    /// Folds this VM's samples and arrivals into the shared estimates and refreshes its copy.
    fn sync_estimates(&self) {
        let samples = std::mem::take(&mut *self.samples.borrow_mut());
        let arrivals = std::mem::take(&mut *self.arrivals.borrow_mut());
        let fresh = if samples.is_empty() && arrivals.is_empty() {
            host::read_estimates()
        } else {
            let index = &self.config.index;
            host::update_estimates(|e| {
                e.record(&samples, |key| index.models.contains_key(&key));
                e.record_arrivals(&arrivals);
            })
        };
        *self.estimates.borrow_mut() = fresh;
    }
}

#[derive(Default)]
pub struct Root {
    vm: Option<Rc<Vm>>,
    vm_id: u64,
    next_renew_ms: u64,
    /// Active health check token -> node index.
    checks: IdMap<u32, usize>,
    /// Token of a call asking a node what it has loaded -> node index, and where it asked.
    discoveries: IdMap<u32, (usize, discover::Source)>,
}

impl Root {
    /// Resumes or answers this VM's queued requests that can go on (or, where the tick cannot
    /// resume a request, leaves the decisions to the requests' own timers).
    fn release_ready(&self, vm: &Vm, ready: Vec<Ready>, now: u64) {
        if vm.platform.resume() == Resume::RequestTimer {
            vm.keep_ready(ready);
            return;
        }
        for r in ready {
            let ctx = match &r {
                Ready::Go { ctx, .. } | Ready::Fail { ctx, .. } => *ctx,
            };
            let waiting = vm.waiting.borrow_mut().remove(&ctx);
            let switched = waiting.is_some() && host::set_effective_context(ctx);
            match (r, waiting) {
                (Ready::Go { route, .. }, Some(w)) if switched => {
                    stream::go_from_queue(vm, ctx, route, w, now);
                    host::resume_request();
                }
                (Ready::Fail { failure, .. }, Some(w)) if switched => {
                    // Envoy (ticks resume requests only there): a reply after the body works.
                    let _ = stream::send_error(vm, &failure.error(&w.model), &w.request_id, false);
                }
                // The stream is gone: give the slot back.
                (Ready::Go { route, .. }, _) => vm.give_back(&route, now),
                (Ready::Fail { .. }, _) => {}
            }
        }
        vm.set_tick();
    }

    fn run_checks(&mut self, vm: &Vm, due: Vec<usize>) {
        let Some(probe) = &vm.config.probe else { return };
        for i in due {
            let Some(node) = vm.config.nodes.get(i) else { continue };
            match vm.platform.probe(&vm.config.cluster, &node.address, &node.probe_path, probe.timeout_ms) {
                Some(token) => {
                    self.checks.insert(token, i);
                }
                None => host::log(LogLevel::Warn, &format!("exo-lb: cannot send a health check to {}", node.name)),
            }
        }
    }

    /// Asks nodes what they have loaded (see `discover`).
    fn ask_loaded(&mut self, vm: &Vm, due: Vec<usize>) {
        let (cfg, timeout_ms) = (&vm.config, discover::ask_timeout_ms(&vm.config));
        for i in due {
            let Some(node) = cfg.nodes.get(i) else { continue };
            for source in discover::Source::ALL {
                match vm.platform.probe(&cfg.cluster, &node.address, source.path(), timeout_ms) {
                    Some(token) => {
                        self.discoveries.insert(token, (i, source));
                    }
                    // Not sent: no answer is awaited from it.
                    None => {
                        vm.update_state(|s| discover::record(cfg, s, i, source, 0, &[]));
                    }
                }
            }
        }
    }

    fn on_loaded_answer(vm: &Vm, node: usize, source: discover::Source, body_size: usize) {
        let cfg = &vm.config;
        // A body over the limit is not read whole: `record` ignores it by its length.
        let (status, body) = host::http_call_response(body_size.min(discover::MAX_BODY_BYTES + 1));
        let told = vm.update_state(|s| discover::record(cfg, s, node, source, status, &body));
        let (Some(n), Some(&key)) = (cfg.nodes.get(node), cfg.index.layout.nodes.get(node)) else { return };
        if let Some(model) = told.model {
            host::log(LogLevel::Info, &format!("exo-lb: node {} has {} loaded (it says so)", n.name, LogSafe(&model)));
        }
        if let Some(load_ms) = told.load_ms {
            let of = told.load_of.as_deref().map(model_key);
            let fresh = host::update_estimates(|e| e.report_load(key, load_ms, of, host::now_ms()));
            *vm.estimates.borrow_mut() = fresh;
            host::log(LogLevel::Info, &format!("exo-lb: node {} says its model loads take {load_ms} ms", n.name));
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(vm) = self.vm.clone() else { return };
        if let Some((node, source)) = self.discoveries.remove(&token) {
            Root::on_loaded_answer(&vm, node, source, body_size);
            return;
        }
        let Some(node) = self.checks.remove(&token) else { return };
        let (status, body) = host::http_call_response(body_size);
        let now = host::now_ms();
        let cfg = &vm.config;
        let Some(n) = cfg.nodes.get(node) else { return };
        // The previous state comes from the same compare-and-swap transaction as the update.
        let est = vm.estimates.borrow();
        let was_down = vm.update_state(|s| {
            let was_down = s.health(node).probe_down;
            probe::record_check(cfg, s, &est, node, status, &body, now);
            was_down
        });
        let ok = (200..300).contains(&status);
        if ok == was_down {
            let what = if ok { "passed: back in service" } else { "failed: out of service" };
            host::log(LogLevel::Warn, &format!("exo-lb: health check of {} {what} (status {status})", n.name));
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        self.vm_id = host::allocate_vm_id();
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        if self.vm_id == 0 {
            self.vm_id = host::allocate_vm_id();
        }
        let platform = Platform::detect();
        let role = platform.configured_role();
        match Config::parse(&host::plugin_configuration()) {
            Ok(config) => {
                host::log(
                    LogLevel::Info,
                    &format!(
                        "exo-lb: configured {} node(s), policy {:?}, role {:?}, vm {}, host {:?}",
                        config.nodes.len(),
                        config.policy,
                        role,
                        self.vm_id,
                        platform.kind
                    ),
                );
                if role == Role::Balancer {
                    // Lays the shared state out for this node list now (carrying over what it
                    // knew of the nodes that stay), rather than on the first request. It never
                    // schedules, so there is no look-ahead plan to time.
                    let _ = host::update_state(&config, |s| schedule::apply_loaded_hints(&config, s));
                    // Creates the estimates' key now if it is missing: a write to a missing key
                    // cannot compare-and-swap, and two workers folding their first requests'
                    // measurements into it at once would lose one's (their first folds come on
                    // the request path, within milliseconds of each other).
                    host::update_estimates(|_| {});
                }
                let discovers = config.discover_loaded;
                let vm = Rc::new(Vm {
                    config,
                    id: self.vm_id,
                    role,
                    random: Cell::new(host::now_nanos() ^ self.vm_id.rotate_left(32)),
                    metrics: Metrics::default(),
                    bookings: RefCell::new(IdMap::default()),
                    waiting: RefCell::new(IdMap::default()),
                    estimates: RefCell::new(host::read_estimates()),
                    samples: RefCell::new(Vec::new()),
                    arrivals: RefCell::new(Vec::new()),
                    tick_ms: Cell::new(0),
                    discovering: Cell::new(discovers),
                    estimates_read_ms: Cell::new(0),
                    platform,
                    ready: RefCell::new(IdMap::default()),
                });
                if role == Role::Balancer {
                    vm.set_tick();
                }
                self.vm = Some(vm);
                true
            }
            Err(e) => {
                host::log(LogLevel::Error, &format!("exo-lb: invalid configuration: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(vm) = self.vm.clone() else { return };
        let now = host::now_ms();
        let renew = now >= self.next_renew_ms;
        let has_waiting = !vm.waiting.borrow().is_empty();
        let discovering = vm.discovering.get();
        if !renew && !has_waiting && !discovering {
            return;
        }
        if renew {
            self.next_renew_ms = now
                .saturating_add(LEASE_RENEW_MS.min(vm.config.probe.as_ref().map_or(LEASE_RENEW_MS, |p| p.interval_ms)));
        }
        // Measurements reach the shared estimates when the request ends (`refresh_estimates`)
        // or on the next tick, and a VM with waiting requests re-reads them at least
        // every `ESTIMATES_REFRESH_MS`: the scheduler decides on current figures. While the nodes'
        // answers are awaited (and on the tick after the last), on every tick.
        let refresh = has_waiting && now >= vm.estimates_read_ms.get() + ESTIMATES_REFRESH_MS;
        if renew || discovering || vm.has_pending() || refresh {
            vm.sync_estimates();
            vm.estimates_read_ms.set(now);
            vm.set_tick();
        }
        let (cfg, id) = (&vm.config, vm.id);
        let est = vm.estimates.borrow();
        let (reclaimed, ready, due, ask, awaited) = vm.update_state(|s| {
            let reclaimed = if renew { s.renew_and_prune(id, now) } else { 0 };
            schedule::schedule(cfg, s, &est, now);
            let ready = schedule::take_ready(cfg, s, id, now);
            let due = if renew { probe::due_checks(cfg, s, id, now) } else { Vec::new() };
            let ask = if renew { discover::due(cfg, s, now) } else { Vec::new() };
            let awaited = (0..cfg.nodes.len()).any(|i| discover::awaited(cfg, s, i, now));
            (reclaimed, ready, due, ask, awaited)
        });
        drop(est);
        if vm.discovering.replace(awaited) != awaited {
            vm.set_tick();
        }
        if reclaimed > 0 {
            host::log(
                LogLevel::Warn,
                &format!("exo-lb: reclaimed {reclaimed} in-flight request(s) held by a VM that stopped"),
            );
            vm.metrics.add("exo_lb_reclaimed_inflight_total", &[], u64::from(reclaimed));
        }
        self.release_ready(&vm, ready, now);
        self.run_checks(&vm, due);
        self.ask_loaded(&vm, ask);
        if renew {
            publish_gauges(&vm, now);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Never None: the SDK panics on it. Without a configuration the stream answers 503.
        Some(Box::new(Stream::new(self.vm.clone(), context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Node and queue gauges from the shared state (every worker writes the same values).
fn publish_gauges(vm: &Vm, now: u64) {
    let cfg = &vm.config;
    let state = host::read_state(&cfg.index.layout);
    for (i, node) in cfg.nodes.iter().enumerate() {
        let labels = [("node", node.name.as_str())];
        vm.metrics.gauge("exo_lb_node_up", &labels, u64::from(summary::node_is_up(cfg, &state, i, now)));
        vm.metrics.gauge("exo_lb_node_inflight", &labels, u64::from(state.inflight(i, now)));
    }
    // What the scheduler learned, per node and model (milliseconds and microseconds: Envoy's
    // gauges are integers).
    let est = vm.estimates.borrow();
    for m in &est.models {
        let model = model_label(cfg, Some(&m.model));
        let demand = schedule::demand_nodes(cfg, &est, m.key, now);
        vm.metrics.gauge("exo_lb_model_demand_millinodes", &[("model", model)], (demand * 1_000.0) as u64);
        for (node, &key) in cfg.nodes.iter().zip(&cfg.index.layout.nodes) {
            let labels = [("node", node.name.as_str()), ("model", model)];
            if let Some(ms) = est.switch_ms(key, m.key) {
                vm.metrics.gauge("exo_lb_model_switch_milliseconds", &labels, ms);
            }
            if let Some(ms) = est.warm_first_token_ms(key, m.key) {
                vm.metrics.gauge("exo_lb_warm_first_token_milliseconds", &labels, ms);
            }
            if let Some(us) = est.per_token_us(key, m.key) {
                vm.metrics.gauge("exo_lb_token_microseconds", &labels, us);
            }
        }
    }
    // What the nodes said their model loads take (older exo's metrics).
    for (node, &key) in cfg.nodes.iter().zip(&cfg.index.layout.nodes) {
        if let Some(ms) = est.own_reported_load_ms(key) {
            vm.metrics.gauge("exo_lb_node_reported_load_milliseconds", &[("node", node.name.as_str())], ms);
        }
    }
    drop(est);
    let (depth, oldest) = schedule::queue_depth(&state, now);
    vm.metrics.gauge("exo_lb_queue_depth", &[], u64::try_from(depth).unwrap_or(u64::MAX));
    vm.metrics.gauge("exo_lb_queue_oldest_wait_milliseconds", &[], oldest);
}
