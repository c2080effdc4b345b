//! One stream context per HTTP request.

use crate::glue::host;
use crate::glue::root::Vm;
use crate::logic::config::HashOn;
use crate::logic::errors::LbError;
use crate::logic::outcome::{self, flags, Ending, Verdict};
use crate::logic::request::{self, RequestKind};
use crate::logic::select::{self, RouteInput};
use crate::logic::summary;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};
use std::rc::Rc;

/// The ranked endpoint list for Envoy's `override_host` load-balancing policy.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// Caps Envoy's retries to the list's length, so no attempt falls through to the cluster's
/// fallback policy (which knows nothing of models or failures).
pub const MAX_RETRIES_HEADER: &str = "x-envoy-max-retries";
/// The node that served the response.
pub const NODE_HEADER: &str = "x-exo-lb-node";
/// The requested model, for Envoy's access log.
pub const MODEL_HEADER: &str = "x-exo-lb-model";

/// A request that was given nodes: what it must give back when it ends.
struct Booking {
    route: Vec<usize>,
    probing: bool,
    /// The node holding this request's in-flight count (moves to the node that really served).
    charged: Option<usize>,
    started_ms: u64,
}

pub struct Stream {
    vm: Option<Rc<Vm>>,
    kind: RequestKind,
    request_id: String,
    booking: Option<Booking>,
    /// The request was answered or routed; later callbacks leave it alone.
    decided: bool,
    finished: bool,
}

impl Stream {
    pub fn new(vm: Option<Rc<Vm>>) -> Stream {
        Stream {
            vm,
            kind: RequestKind::Passthrough,
            request_id: String::new(),
            booking: None,
            decided: false,
            finished: false,
        }
    }

    fn reply_error(&mut self, error: &LbError) {
        self.decided = true;
        let body = error.body(&self.request_id);
        let retry_after = error.retry_after().map(|s| s.to_string());
        let mut headers = vec![("content-type", "application/json")];
        if let Some(r) = retry_after.as_deref() {
            headers.push(("retry-after", r));
        }
        if let Some(vm) = &self.vm {
            host::increment(vm.metrics.local_replies);
        }
        host::send_response(error.status(), &headers, &body);
    }

    fn reply_json(&mut self, status: u32, body: &str) {
        self.decided = true;
        host::send_response(
            status,
            &[
                ("content-type", "application/json"),
                ("cache-control", "no-store"),
            ],
            body,
        );
    }

    /// Chooses the nodes and tells Envoy, or answers the error.
    fn route(&mut self, vm: &Vm, model: Option<&str>) -> Action {
        let hash_key = match &vm.config.hash_on {
            HashOn::ClientIp => {
                host::property_string(&["source", "address"]).map(|a| strip_port(&a).to_string())
            }
            HashOn::Header(name) => host::request_header(name).filter(|v| !v.is_empty()),
        };
        let input = RouteInput {
            model,
            hash_key: hash_key.as_deref(),
            now_ms: host::now_ms(),
            vm: vm.id,
            random: vm.random(),
        };
        let cfg = &vm.config;
        match host::update_state(|state| select::route(cfg, state, &input)) {
            Ok(route) => {
                let endpoints: Vec<&str> = route
                    .nodes
                    .iter()
                    .filter_map(|&i| cfg.nodes.get(i))
                    .map(|n| n.address.as_str())
                    .collect();
                host::set_request_header(DESTINATION_HEADER, Some(&endpoints.join(",")));
                host::set_request_header(
                    MAX_RETRIES_HEADER,
                    Some(&endpoints.len().saturating_sub(1).to_string()),
                );
                if let Some(m) = model {
                    host::set_request_header(MODEL_HEADER, Some(&header_safe(m)));
                }
                self.booking = Some(Booking {
                    charged: route.nodes.first().copied(),
                    route: route.nodes,
                    probing: route.probing,
                    started_ms: input.now_ms,
                });
                self.decided = true;
                Action::Continue
            }
            Err(error) => {
                self.reply_error(&error);
                Action::Pause
            }
        }
    }

    fn route_inference(&mut self, vm: &Vm, body_size: usize) -> Action {
        match request::parse_body(&host::request_body(body_size)) {
            Ok(req) => self.route(vm, Some(&req.model)),
            Err(error) => {
                self.reply_error(&error);
                Action::Pause
            }
        }
    }

    /// Gives back the booking and records what the request says about the nodes it tried.
    /// Runs once, from whichever of `on_done` / `on_log` Envoy calls first.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let (Some(vm), Some(booking)) = (self.vm.clone(), self.booking.take()) else {
            return;
        };
        let cfg = &vm.config;
        let served =
            host::property_string(&["upstream", "address"]).and_then(|a| cfg.node_by_address(&a));
        let end = Ending {
            route: &booking.route,
            probing: booking.probing,
            charged: booking.charged,
            attempts: host::property_u64(&["upstream", "request_attempt_count"]).unwrap_or(0),
            served,
            status: host::property_u64(&["response", "code"])
                .map_or(0, |c| u32::try_from(c).unwrap_or(0)),
            flags: host::property_u64(&["response", "flags"]).unwrap_or(0),
            started_ms: booking.started_ms,
            now_ms: host::now_ms(),
            vm: vm.id,
        };
        let verdicts = host::update_state(|state| outcome::finish(cfg, state, &end));
        for (i, verdict) in verdicts {
            if let (Verdict::Failure(reason), Some(node)) = (verdict, cfg.nodes.get(i)) {
                host::increment(vm.metrics.node_failures);
                host::log(
                    LogLevel::Warn,
                    &format!(
                        "exo-lb: node {} ({}) failed: {} [request {}]",
                        node.name,
                        node.address,
                        reason.as_str(),
                        self.request_id
                    ),
                );
            }
        }
    }
}

impl Context for Stream {
    fn on_done(&mut self) -> bool {
        self.finish();
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // A client never chooses the node.
        for name in [DESTINATION_HEADER, MAX_RETRIES_HEADER, MODEL_HEADER] {
            host::set_request_header(name, None);
        }
        self.request_id = host::request_header("x-request-id").unwrap_or_default();
        let Some(vm) = self.vm.clone() else {
            host::send_response(
                503,
                &[("content-type", "text/plain")],
                "exo-lb has no valid configuration\n",
            );
            self.decided = true;
            return Action::Pause;
        };
        let method = host::request_header(":method").unwrap_or_default();
        let path = host::request_header(":path").unwrap_or_default();
        self.kind = request::classify(&method, &path, &vm.config.healthcheck_path);
        match self.kind {
            RequestKind::Healthcheck => {
                let (status, body) =
                    summary::healthcheck(&vm.config, &host::read_state(), host::now_ms());
                self.reply_json(status, &body);
                Action::Pause
            }
            RequestKind::ModelList => {
                match summary::model_list(&vm.config, &host::read_state(), host::now_ms()) {
                    Some(body) => {
                        self.reply_json(200, &body);
                        Action::Pause
                    }
                    None => self.route(&vm, None),
                }
            }
            RequestKind::Inference => {
                if end_of_stream {
                    self.reply_error(&LbError::InvalidJson("the body is empty".to_string()));
                    return Action::Pause;
                }
                let declared = host::request_header("content-length")
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if declared.is_some_and(|len| len > vm.config.max_body_bytes) {
                    self.reply_error(&LbError::RequestTooLarge {
                        limit: vm.config.max_body_bytes,
                    });
                    return Action::Pause;
                }
                // Wait for the body: it names the model.
                Action::Pause
            }
            RequestKind::Passthrough => self.route(&vm, None),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.decided || self.kind != RequestKind::Inference {
            return Action::Continue;
        }
        let Some(vm) = self.vm.clone() else {
            return Action::Continue;
        };
        if u64::try_from(body_size).unwrap_or(u64::MAX) > vm.config.max_body_bytes {
            self.reply_error(&LbError::RequestTooLarge {
                limit: vm.config.max_body_bytes,
            });
            return Action::Pause;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.route_inference(&vm, body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // A body followed by trailers never reports end_of_stream to the body callback.
        if self.decided || self.kind != RequestKind::Inference {
            return Action::Continue;
        }
        let Some(vm) = self.vm.clone() else {
            return Action::Continue;
        };
        let size = host::request_body(usize::MAX).len();
        self.route_inference(&vm, size)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (Some(vm), Some(booking)) = (self.vm.clone(), self.booking.as_mut()) else {
            return Action::Continue;
        };
        let response_flags = host::property_u64(&["response", "flags"]).unwrap_or(0);
        if response_flags & flags::LOCAL_REPLY != 0 {
            // Envoy's own reply (no node answered): nothing to attribute.
            host::set_response_header(NODE_HEADER, None);
            return Action::Continue;
        }
        let cfg = &vm.config;
        let address = host::property_string(&["upstream", "address"]);
        let served = address.as_deref().and_then(|a| cfg.node_by_address(a));
        match served.and_then(|i| cfg.nodes.get(i)) {
            Some(node) => host::set_response_header(NODE_HEADER, Some(&node.name)),
            None => host::set_response_header(NODE_HEADER, None),
        }
        if served.is_none_or(|s| !booking.route.contains(&s)) {
            host::increment(vm.metrics.upstream_mismatch);
            host::log(
                LogLevel::Warn,
                &format!(
                    "exo-lb: request {} was served by {} which is not among the chosen nodes {:?}; check that the cluster's endpoints match the filter's node addresses",
                    self.request_id,
                    address.as_deref().unwrap_or("(unknown)"),
                    booking.route.iter().filter_map(|&i| cfg.nodes.get(i)).map(|n| n.address.as_str()).collect::<Vec<_>>()
                ),
            );
        }
        // After a failover the in-flight count belongs to the node that really serves.
        if served.is_some() && served != booking.charged {
            let (from, to) = (
                booking.charged.and_then(|i| cfg.nodes.get(i)),
                served.and_then(|i| cfg.nodes.get(i)),
            );
            let (now, id) = (host::now_ms(), vm.id);
            host::update_state(|state| {
                if let Some(from) = from {
                    state.release(id, &from.name);
                }
                if let Some(to) = to {
                    state.acquire(id, &to.name, now);
                }
            });
            booking.charged = served;
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        self.finish();
    }
}

/// "10.0.0.1:5000" -> "10.0.0.1", "[::1]:5000" -> "[::1]".
fn strip_port(address: &str) -> &str {
    match address.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.is_empty() => host,
        _ => address,
    }
}

/// A model id as a header value: printable ASCII only, bounded length.
fn header_safe(model: &str) -> String {
    model
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(128)
        .collect()
}
