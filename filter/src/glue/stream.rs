//! One stream context per HTTP request.

use crate::glue::host;
use crate::glue::root::{Booking, Role, Vm, Waiting};
use crate::logic::config::HashOn;
use crate::logic::errors::LbError;
use crate::logic::metrics::{model_label, status_class};
use crate::logic::outcome::{self, flags, Ending, Verdict};
use crate::logic::request::{self, RequestKind};
use crate::logic::schedule::{self, Admission, Arrival};
use crate::logic::select::{self, Route, RouteInput};
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

/// Tells Envoy where to send the current request.
pub fn send_to_nodes(vm: &Vm, route: &Route, model: Option<&str>) {
    let cfg = &vm.config;
    if let (true, Some(node)) = (route.switched, route.nodes.first().and_then(|&i| cfg.nodes.get(i))) {
        vm.metrics.count("exo_lb_model_switches_total", &[("node", &node.name)]);
    }
    let endpoints: Vec<&str> =
        route.nodes.iter().filter_map(|&i| cfg.nodes.get(i)).map(|n| n.address.as_str()).collect();
    host::set_request_header(DESTINATION_HEADER, Some(&endpoints.join(",")));
    host::set_request_header(MAX_RETRIES_HEADER, Some(&endpoints.len().saturating_sub(1).to_string()));
    if let Some(m) = model {
        host::set_request_header(MODEL_HEADER, Some(&header_safe(m)));
    }
}

/// Answers the current request with the load balancer's own error.
pub fn send_error(vm: &Vm, error: &LbError, request_id: &str) {
    let body = error.body(request_id);
    let retry_after = error.retry_after().map(|s| s.to_string());
    let mut headers = vec![("content-type", "application/json")];
    if let Some(r) = retry_after.as_deref() {
        headers.push(("retry-after", r));
    }
    vm.metrics.count("exo_lb_local_replies_total", &[("code", error.code())]);
    host::send_response(error.status(), &headers, &body);
}

pub struct Stream {
    vm: Option<Rc<Vm>>,
    ctx: u32,
    kind: RequestKind,
    request_id: String,
    /// The request was answered or routed; later callbacks leave it alone.
    decided: bool,
    finished: bool,
    /// A 404 from a node: its body may say the model is not running there.
    watch_not_running: Option<(usize, String)>,
}

impl Stream {
    pub fn new(vm: Option<Rc<Vm>>, ctx: u32) -> Stream {
        Stream {
            vm,
            ctx,
            kind: RequestKind::Passthrough,
            request_id: String::new(),
            decided: false,
            finished: false,
            watch_not_running: None,
        }
    }

    fn reply_error(&mut self, vm: &Vm, error: &LbError) -> Action {
        self.decided = true;
        send_error(vm, error, &self.request_id);
        Action::Pause
    }

    fn reply_json(&mut self, status: u32, body: &str) -> Action {
        self.decided = true;
        host::send_response(status, &[("content-type", "application/json"), ("cache-control", "no-store")], body);
        Action::Pause
    }

    fn hash_key(vm: &Vm) -> Option<String> {
        match &vm.config.hash_on {
            HashOn::ClientIp => host::property_string(&["source", "address"]).map(|a| strip_port(&a).to_string()),
            HashOn::Header(name) => host::request_header(name).filter(|v| !v.is_empty()),
        }
    }

    /// Sends the request to `route`; `holds_slot` when it took a slot on the first node.
    fn book(&mut self, vm: &Vm, route: Route, model: Option<String>, now: u64, holds_slot: bool) {
        send_to_nodes(vm, &route, model.as_deref());
        let charged = if holds_slot { route.nodes.first().copied() } else { None };
        vm.bookings.borrow_mut().insert(self.ctx, Booking { charged, route, started_ms: now, model });
        self.decided = true;
    }

    /// Requests that are not generations (web UI, other paths): no cap, no queue.
    fn route_passthrough(&mut self, vm: &Vm) -> Action {
        let hash_key = Self::hash_key(vm);
        let now = host::now_ms();
        let input =
            RouteInput { model: None, hash_key: hash_key.as_deref(), now_ms: now, vm: vm.id, random: vm.random() };
        let cfg = &vm.config;
        match host::update_state(|state| select::route(cfg, state, &input)) {
            Ok(route) => {
                // Not a generation: it holds no slot.
                self.book(vm, route, None, now, false);
                Action::Continue
            }
            Err(error) => self.reply_error(vm, &error),
        }
    }

    /// Generations: a node with a free slot now, or a place in the queue.
    fn route_inference(&mut self, vm: &Vm, body_size: usize) -> Action {
        let req = match request::parse_body(&host::request_body(body_size)) {
            Ok(req) => req,
            Err(error) => return self.reply_error(vm, &error),
        };
        let hash_key = Self::hash_key(vm);
        let now = host::now_ms();
        let arrival = Arrival {
            vm: vm.id,
            ctx: self.ctx,
            model: &req.model,
            hash_key: hash_key.as_deref(),
            random: vm.random(),
            now_ms: now,
        };
        let cfg = &vm.config;
        match host::update_state(|state| schedule::admit(cfg, state, &arrival)) {
            Admission::Granted(route) => {
                self.book(vm, route, Some(req.model), now, true);
                Action::Continue
            }
            Admission::Queued => {
                self.decided = true;
                vm.metrics.count("exo_lb_queued_total", &[("model", model_label(cfg, Some(&req.model)))]);
                vm.waiting
                    .borrow_mut()
                    .insert(self.ctx, Waiting { request_id: self.request_id.clone(), model: req.model, since_ms: now });
                vm.set_tick();
                Action::Pause
            }
            Admission::Rejected(error) => self.reply_error(vm, &error),
        }
    }

    /// Gives back the booking (or the place in the queue) and records what the request says
    /// about the nodes it tried. Runs once, from whichever of `on_done` / `on_log` comes first.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let Some(vm) = self.vm.clone() else { return };
        let cfg = &vm.config;
        let now = host::now_ms();
        if vm.waiting.borrow_mut().remove(&self.ctx).is_some() {
            // The client left while queued: out of the queue at once, no slot taken.
            let (id, ctx) = (vm.id, self.ctx);
            host::update_state(|state| schedule::withdraw(cfg, state, id, ctx, now));
            vm.set_tick();
            return;
        }
        let Some(booking) = vm.bookings.borrow_mut().remove(&self.ctx) else { return };
        let served = host::property_string(&["upstream", "address"]).and_then(|a| cfg.node_by_address(&a));
        let end = Ending {
            route: &booking.route.nodes,
            probing: booking.route.probing,
            charged: booking.charged,
            attempts: host::property_u64(&["upstream", "request_attempt_count"]).unwrap_or(0),
            served,
            status: host::property_u64(&["response", "code"]).map_or(0, |c| u32::try_from(c).unwrap_or(0)),
            flags: host::property_u64(&["response", "flags"]).unwrap_or(0),
            started_ms: booking.started_ms,
            now_ms: now,
            vm: vm.id,
            model: booking.model.as_deref(),
        };
        let verdicts = host::update_state(|state| outcome::finish(cfg, state, &end));
        let model = model_label(cfg, booking.model.as_deref());
        let server = served.or_else(|| (end.attempts > 0).then_some(booking.charged).flatten());
        if let Some(node) = server.and_then(|i| cfg.nodes.get(i)) {
            let labels = [("node", node.name.as_str()), ("model", model)];
            let status = [("node", node.name.as_str()), ("model", model), ("status", status_class(end.status))];
            vm.metrics.count("exo_lb_requests_total", &status);
            vm.metrics.histogram(
                "exo_lb_request_duration_milliseconds",
                &labels,
                now.saturating_sub(booking.started_ms),
            );
        }
        for (i, verdict) in verdicts {
            if let (Verdict::Failure(reason), Some(node)) = (verdict, cfg.nodes.get(i)) {
                vm.metrics.count("exo_lb_node_failures_total", &[("node", &node.name), ("reason", reason.as_str())]);
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
            self.decided = true;
            host::send_response(503, &[("content-type", "text/plain")], "exo-lb has no valid configuration\n");
            return Action::Pause;
        };
        let method = host::request_header(":method").unwrap_or_default();
        let path = host::request_header(":path").unwrap_or_default();
        if vm.role == Role::Status {
            let now = host::now_ms();
            return match path.split('?').next() {
                Some("/status") => self.reply_json(200, &summary::status(&vm.config, &host::read_state(), now)),
                Some("/healthcheck") => {
                    let (status, body) = summary::healthcheck(&vm.config, &host::read_state(), now);
                    self.reply_json(status, &body)
                }
                _ => self.reply_json(404, r#"{"error":"not found: try /status or /healthcheck"}"#),
            };
        }
        self.kind = request::classify(&method, &path, &vm.config);
        match self.kind {
            RequestKind::Healthcheck => {
                let (status, body) = summary::healthcheck(&vm.config, &host::read_state(), host::now_ms());
                self.reply_json(status, &body)
            }
            RequestKind::ModelList => match summary::model_list(&vm.config, &host::read_state(), host::now_ms()) {
                Some(body) => self.reply_json(200, &body),
                None => self.route_passthrough(&vm),
            },
            RequestKind::Inference => {
                if end_of_stream {
                    return self.reply_error(&vm, &LbError::InvalidJson("the body is empty".to_string()));
                }
                let declared = host::request_header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
                if declared.is_some_and(|len| len > vm.config.max_body_bytes) {
                    return self.reply_error(&vm, &LbError::RequestTooLarge { limit: vm.config.max_body_bytes });
                }
                // Wait for the body: it names the model.
                Action::Pause
            }
            RequestKind::Passthrough => self.route_passthrough(&vm),
            RequestKind::Refused => self.reply_error(&vm, &request::refusal(&method, &path)),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.kind != RequestKind::Inference {
            return Action::Continue;
        }
        if self.decided {
            // Queued requests stay paused (their body is kept) until a tick resumes them.
            return if self.vm.as_ref().is_some_and(|vm| vm.waiting.borrow().contains_key(&self.ctx)) {
                Action::Pause
            } else {
                Action::Continue
            };
        }
        let Some(vm) = self.vm.clone() else { return Action::Continue };
        if u64::try_from(body_size).unwrap_or(u64::MAX) > vm.config.max_body_bytes {
            return self.reply_error(&vm, &LbError::RequestTooLarge { limit: vm.config.max_body_bytes });
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
        let Some(vm) = self.vm.clone() else { return Action::Continue };
        let size = host::request_body(usize::MAX).len();
        self.route_inference(&vm, size)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(vm) = self.vm.clone() else { return Action::Continue };
        let mut bookings = vm.bookings.borrow_mut();
        let Some(booking) = bookings.get_mut(&self.ctx) else { return Action::Continue };
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
            Some(node) => {
                host::set_response_header(NODE_HEADER, Some(&node.name));
                let labels = [("node", node.name.as_str()), ("model", model_label(cfg, booking.model.as_deref()))];
                let ttfb = host::now_ms().saturating_sub(booking.started_ms);
                vm.metrics.histogram("exo_lb_time_to_first_byte_milliseconds", &labels, ttfb);
            }
            None => host::set_response_header(NODE_HEADER, None),
        }
        if served.is_none_or(|s| !booking.route.nodes.contains(&s)) {
            vm.metrics.count("exo_lb_upstream_mismatch_total", &[]);
            host::log(
                LogLevel::Warn,
                &format!(
                    "exo-lb: request {} was served by {} which is not among the chosen nodes {:?}; check that the cluster's endpoints match the filter's node addresses",
                    self.request_id,
                    address.as_deref().unwrap_or("(unknown)"),
                    booking.route.nodes.iter().filter_map(|&i| cfg.nodes.get(i)).map(|n| n.address.as_str()).collect::<Vec<_>>()
                ),
            );
        }
        if let (Some(node), Some(model)) = (served, booking.model.as_ref()) {
            if host::property_u64(&["response", "code"]) == Some(404) {
                self.watch_not_running = Some((node, model.clone()));
            }
        }
        // After a failover the slot belongs to the node that really serves.
        if booking.charged.is_some() && served.is_some() && served != booking.charged {
            let (from, to) = (booking.charged.and_then(|i| cfg.nodes.get(i)), served.and_then(|i| cfg.nodes.get(i)));
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

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        // Never pause a response body: SSE must flow. Only a node's 404 is looked at.
        if let (Some((node, model)), Some(vm)) = (self.watch_not_running.take(), self.vm.clone()) {
            if outcome::says_not_running(&host::response_body(body_size.min(4096))) {
                if let Some(n) = vm.config.nodes.get(node) {
                    host::log(LogLevel::Warn, &format!("exo-lb: node {} is not running model {model}", n.name));
                    let (cfg, now) = (&vm.config, host::now_ms());
                    host::update_state(|state| outcome::mark_not_running(cfg, state, node, &model, now));
                }
            }
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
    model.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(128).collect()
}
