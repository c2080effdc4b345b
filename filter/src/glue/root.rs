//! One root context per VM (per Envoy worker): holds the configuration, renews this VM's
//! lease on its ticks, and creates a stream context per request.

use crate::glue::host;
use crate::glue::stream::Stream;
use crate::logic::config::Config;
use crate::logic::state::LEASE_RENEW_MS;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::cell::Cell;
use std::rc::Rc;

/// What every stream of this VM shares.
pub struct Vm {
    pub config: Config,
    pub id: u64,
    requests: Cell<u64>,
    pub metrics: Metrics,
}

impl Vm {
    /// A fresh random number per request (for `random_two`): clock, VM id and a counter.
    pub fn random(&self) -> u64 {
        let n = self.requests.get().wrapping_add(1);
        self.requests.set(n);
        crate::logic::select::mix(host::now_nanos() ^ self.id.rotate_left(32) ^ n)
    }
}

/// Counters Envoy exports (as `wasmcustom.<name>` in its stats).
pub struct Metrics {
    /// The node that served a request was not the one the filter chose (the cluster's endpoints
    /// and the filter's node list disagree, or Envoy fell back to its own policy).
    pub upstream_mismatch: Option<u32>,
    pub node_failures: Option<u32>,
    pub local_replies: Option<u32>,
    pub reclaimed_inflight: Option<u32>,
}

impl Metrics {
    fn define() -> Metrics {
        Metrics {
            upstream_mismatch: host::define_counter("exo_lb_upstream_mismatch_total"),
            node_failures: host::define_counter("exo_lb_node_failures_total"),
            local_replies: host::define_counter("exo_lb_local_replies_total"),
            reclaimed_inflight: host::define_counter("exo_lb_reclaimed_inflight_total"),
        }
    }
}

#[derive(Default)]
pub struct Root {
    vm: Option<Rc<Vm>>,
    vm_id: u64,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        self.vm_id = host::allocate_vm_id();
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        match Config::parse(&host::plugin_configuration()) {
            Ok(config) => {
                host::log(
                    LogLevel::Info,
                    &format!(
                        "exo-lb: configured {} node(s), policy {:?}, vm {}",
                        config.nodes.len(),
                        config.policy,
                        self.vm_id
                    ),
                );
                let names: Vec<String> = config.nodes.iter().map(|n| n.name.clone()).collect();
                host::update_state(|s| {
                    s.retain_nodes(&names.iter().map(String::as_str).collect::<Vec<_>>())
                });
                self.vm = Some(Rc::new(Vm {
                    config,
                    id: self.vm_id,
                    requests: Cell::new(0),
                    metrics: Metrics::define(),
                }));
                host::set_tick_period_ms(LEASE_RENEW_MS);
                true
            }
            Err(e) => {
                host::log(
                    LogLevel::Error,
                    &format!("exo-lb: invalid configuration: {e}"),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let now = host::now_ms();
        let vm = self.vm_id;
        let reclaimed = host::update_state(|s| s.renew_and_prune(vm, now));
        if reclaimed > 0 {
            host::log(
                LogLevel::Warn,
                &format!(
                    "exo-lb: reclaimed {reclaimed} in-flight request(s) held by a VM that stopped"
                ),
            );
            if let Some(vm) = &self.vm {
                for _ in 0..reclaimed {
                    host::increment(vm.metrics.reclaimed_inflight);
                }
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Never None: the SDK panics on it. Without a configuration the stream answers 503.
        Some(Box::new(Stream::new(self.vm.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
