//! One root context per VM and plugin (per Envoy worker): holds the configuration, and on its
//! ticks renews this VM's lease, resumes queued requests that were granted a node (or answers
//! those that waited too long), and runs the active health checks when it holds the prober
//! lease. It creates a stream context per request.

use crate::glue::host;
use crate::glue::metrics::Metrics;
use crate::glue::stream::{self, Stream};
use crate::logic::config::Config;
use crate::logic::metrics::model_label;
use crate::logic::outcome::{self, Ending};
use crate::logic::probe;
use crate::logic::schedule::{self, Ready};
use crate::logic::select::Route;
use crate::logic::state::LEASE_RENEW_MS;
use crate::logic::summary;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// The root id of the plugin on the status listener (same module, same VM).
pub const STATUS_ROOT_ID: &str = "exo_lb_status";
/// Tick period while this VM holds queued requests: the admission lag after a slot frees.
const QUEUE_TICK_MS: u64 = 20;

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
}

/// A request paused in the queue.
pub struct Waiting {
    pub request_id: String,
    pub model: String,
    pub since_ms: u64,
}

/// What every stream of this VM shares.
pub struct Vm {
    pub config: Config,
    pub id: u64,
    pub role: Role,
    requests: Cell<u64>,
    pub metrics: Metrics,
    /// Stream context id -> its booking.
    pub bookings: RefCell<HashMap<u32, Booking>>,
    /// Stream context id -> a request of this VM waiting in the shared queue.
    pub waiting: RefCell<HashMap<u32, Waiting>>,
}

impl Vm {
    /// A fresh random number per request (for `random_two`): clock, VM id and a counter.
    pub fn random(&self) -> u64 {
        let n = self.requests.get().wrapping_add(1);
        self.requests.set(n);
        crate::logic::select::mix(host::now_nanos() ^ self.id.rotate_left(32) ^ n)
    }

    /// Ticks fast while requests wait, slowly otherwise.
    pub fn set_tick(&self) {
        let base = self.config.probe.as_ref().map_or(LEASE_RENEW_MS, |p| p.interval_ms.min(LEASE_RENEW_MS));
        host::set_tick_period_ms(if self.waiting.borrow().is_empty() { base } else { QUEUE_TICK_MS });
    }
}

#[derive(Default)]
pub struct Root {
    vm: Option<Rc<Vm>>,
    vm_id: u64,
    next_renew_ms: u64,
    /// Active health check token -> node index.
    checks: HashMap<u32, usize>,
}

impl Root {
    /// Resumes or answers this VM's queued requests that can go on.
    fn release_ready(&self, vm: &Vm, ready: Vec<Ready>, now: u64) {
        for r in ready {
            let ctx = match &r {
                Ready::Go { ctx, .. } | Ready::Fail { ctx, .. } => *ctx,
            };
            let waiting = vm.waiting.borrow_mut().remove(&ctx);
            let switched = waiting.is_some() && host::set_effective_context(ctx);
            match (r, waiting) {
                (Ready::Go { route, .. }, Some(w)) if switched => {
                    let model = model_label(&vm.config, Some(&w.model));
                    vm.metrics.histogram(
                        "exo_lb_queue_wait_milliseconds",
                        &[("model", model)],
                        now.saturating_sub(w.since_ms),
                    );
                    stream::send_to_nodes(vm, &route, Some(&w.model));
                    vm.bookings.borrow_mut().insert(
                        ctx,
                        Booking { charged: route.nodes.first().copied(), route, started_ms: now, model: Some(w.model) },
                    );
                    host::resume_request();
                }
                (Ready::Fail { error, .. }, Some(w)) if switched => {
                    stream::send_error(vm, &error, &w.request_id);
                }
                (Ready::Go { route, .. }, _) => {
                    // The stream is gone: give the slot back.
                    let cfg = &vm.config;
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
                        vm: vm.id,
                        model: None,
                    };
                    host::update_state(|s| outcome::finish(cfg, s, &end));
                }
                (Ready::Fail { .. }, _) => {}
            }
        }
        vm.set_tick();
    }

    fn run_checks(&mut self, vm: &Vm, due: Vec<usize>) {
        let Some(probe) = &vm.config.probe else { return };
        for i in due {
            let Some(node) = vm.config.nodes.get(i) else { continue };
            match host::dispatch_get(&vm.config.cluster, &node.address, &node.probe_path, probe.timeout_ms) {
                Some(token) => {
                    self.checks.insert(token, i);
                }
                None => host::log(LogLevel::Warn, &format!("exo-lb: cannot send a health check to {}", node.name)),
            }
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let (Some(vm), Some(node)) = (self.vm.clone(), self.checks.remove(&token)) else { return };
        let (status, body) = host::http_call_response(body_size);
        let now = host::now_ms();
        let cfg = &vm.config;
        let Some(n) = cfg.nodes.get(node) else { return };
        // The previous state comes from the same compare-and-swap transaction as the update.
        let was_down = host::update_state(|s| {
            let was_down = s.health(&n.name).probe_down;
            probe::record_check(cfg, s, node, status, &body, now);
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
        let role = match host::property_string(&["plugin_root_id"]).as_deref() {
            Some(STATUS_ROOT_ID) => Role::Status,
            _ => Role::Balancer,
        };
        match Config::parse(&host::plugin_configuration()) {
            Ok(config) => {
                host::log(
                    LogLevel::Info,
                    &format!(
                        "exo-lb: configured {} node(s), policy {:?}, role {:?}, vm {}",
                        config.nodes.len(),
                        config.policy,
                        role,
                        self.vm_id
                    ),
                );
                if role == Role::Balancer {
                    let names: Vec<String> = config.nodes.iter().map(|n| n.name.clone()).collect();
                    host::update_state(|s| s.retain_nodes(&names.iter().map(String::as_str).collect::<Vec<_>>()));
                }
                let vm = Rc::new(Vm {
                    config,
                    id: self.vm_id,
                    role,
                    requests: Cell::new(0),
                    metrics: Metrics::default(),
                    bookings: RefCell::new(HashMap::new()),
                    waiting: RefCell::new(HashMap::new()),
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
        if !renew && !has_waiting {
            return;
        }
        if renew {
            self.next_renew_ms = now
                .saturating_add(LEASE_RENEW_MS.min(vm.config.probe.as_ref().map_or(LEASE_RENEW_MS, |p| p.interval_ms)));
        }
        let (cfg, id) = (&vm.config, vm.id);
        let (reclaimed, ready, due) = host::update_state(|s| {
            let reclaimed = if renew { s.renew_and_prune(id, now) } else { 0 };
            schedule::schedule(cfg, s, now);
            let ready = schedule::take_ready(cfg, s, id, now);
            let due = if renew { probe::due_checks(cfg, s, id, now) } else { Vec::new() };
            (reclaimed, ready, due)
        });
        if reclaimed > 0 {
            host::log(
                LogLevel::Warn,
                &format!("exo-lb: reclaimed {reclaimed} in-flight request(s) held by a VM that stopped"),
            );
            vm.metrics.add("exo_lb_reclaimed_inflight_total", &[], u64::from(reclaimed));
        }
        self.release_ready(&vm, ready, now);
        self.run_checks(&vm, due);
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
    let state = host::read_state();
    for (i, node) in cfg.nodes.iter().enumerate() {
        let labels = [("node", node.name.as_str())];
        vm.metrics.gauge("exo_lb_node_up", &labels, u64::from(summary::node_is_up(cfg, &state, i, now)));
        vm.metrics.gauge("exo_lb_node_inflight", &labels, u64::from(state.inflight(&node.name, now)));
    }
    let (depth, oldest) = schedule::queue_depth(&state, now);
    vm.metrics.gauge("exo_lb_queue_depth", &[], u64::try_from(depth).unwrap_or(u64::MAX));
    vm.metrics.gauge("exo_lb_queue_oldest_wait_milliseconds", &[], oldest);
}
