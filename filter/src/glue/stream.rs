//! One stream context per HTTP request.

use crate::glue::host;
use crate::glue::platform::{
    Answered, Responder, Resume, RELAY_BODY_HEADER, RELAY_DESTINATION, RELAY_RETRY_AFTER_HEADER, RELAY_STATUS_HEADER,
    TIMER_HEADER,
};
use crate::glue::root::{Booking, Role, Vm, Waiting};
use crate::logic::config::{HashOn, Policy};
use crate::logic::errors::LbError;
use crate::logic::escape::LogSafe;
use crate::logic::estimates::Arrived;
use crate::logic::header_map;
use crate::logic::metrics::{model_label, status_class};
use crate::logic::outcome::{self, Ending, Verdict};
use crate::logic::request::{self, RequestKind};
use crate::logic::schedule::{self, Admission, Arrival, QueueFailure, Ready};
use crate::logic::select::{self, Route, RouteInput};
use crate::logic::state::model_key;
use crate::logic::stream_end;
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
/// The largest error body relayed through the status listener (a request header).
const MAX_RELAYED_BODY: usize = 4096;
/// How often a queued request looks again where it waits on its own timer (nginx).
const QUEUE_POLL_MS: u64 = 20;

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

/// A queued request that was granted `route`: routes the current request (context `ctx`)
/// there and books it. The caller makes it go on.
pub fn go_from_queue(vm: &Vm, ctx: u32, route: Route, w: Waiting, now: u64) {
    let model = model_label(&vm.config, Some(&w.model));
    vm.metrics.histogram("exo_lb_queue_wait_milliseconds", &[("model", model)], now.saturating_sub(w.since_ms));
    send_to_nodes(vm, &route, Some(&w.model));
    let charged = route.nodes.first().copied();
    vm.bookings.borrow_mut().insert(ctx, Booking::new(route, charged, now, Some(w.model), w.stream));
}

/// Answers the current request with the load balancer's own error. `body_read`: the request body
/// was read (nginx cannot answer then: the reply is relayed, see `platform`). Returns what a
/// stream callback returns after it: the relayed request goes on through nginx, a reply pauses.
pub fn send_error(vm: &Vm, error: &LbError, request_id: &str, body_read: bool) -> Action {
    let body = error.body(request_id);
    let retry_after = error.retry_after().map(|s| s.to_string());
    vm.metrics.count("exo_lb_local_replies_total", &[("code", error.code())]);
    if body_read && vm.platform.relays_late_replies() {
        host::set_request_header(DESTINATION_HEADER, Some(RELAY_DESTINATION));
        host::set_request_header(RELAY_STATUS_HEADER, Some(&error.status().to_string()));
        host::set_request_header(RELAY_BODY_HEADER, Some(&body));
        host::set_request_header(RELAY_RETRY_AFTER_HEADER, retry_after.as_deref());
        return Action::Continue;
    }
    send_json_error(error.status(), retry_after.as_deref(), &body);
    Action::Pause
}

/// A JSON error reply, with `retry-after` when given.
fn send_json_error(status: u32, retry_after: Option<&str>, body: &str) {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(r) = retry_after {
        headers.push(("retry-after", r));
    }
    host::send_response(status, &headers, body);
}

pub struct Stream {
    vm: Option<Rc<Vm>>,
    ctx: u32,
    kind: RequestKind,
    request_id: String,
    /// The request headers this filter looks at, read once.
    headers: RequestHeaders,
    /// The request was answered or routed; later callbacks leave it alone.
    decided: bool,
    finished: bool,
    /// A 404 from a node: its body may say the model is not running there.
    watch_not_running: Option<(usize, String)>,
    /// The token of this request's queue timer, while it runs (nginx).
    timer: Option<u32>,
    /// The body callback ran: the request body was read.
    body_read: bool,
    /// The proxy's own error page is being replaced by this JSON body (nginx).
    error_page: Option<String>,
}

/// The request headers the filter uses, from one read of the header map.
#[derive(Default)]
struct RequestHeaders {
    method: String,
    path: String,
    content_length: Option<u64>,
    /// The `hash_on` header's value, when the policy hashes on a header.
    hash_header: Option<String>,
    /// Who sent the request, for fairness between clients: a hash of its API key, else of the
    /// client address Envoy appended to `x-forwarded-for` (0: unknown).
    client: u64,
    /// Internal headers a client sent, to be removed.
    spoofed: Vec<&'static str>,
    /// The request carries the timer header (see `platform`).
    timer: bool,
    /// A `transfer-encoding` header: a body of unknown length follows.
    transfer_encoding: bool,
    /// A reply relayed to the status listener (see `platform`): status, body, Retry-After.
    relay_status: Option<u32>,
    relay_body: Option<String>,
    relay_retry_after: Option<String>,
}

impl Stream {
    pub fn new(vm: Option<Rc<Vm>>, ctx: u32) -> Stream {
        Stream {
            vm,
            ctx,
            kind: RequestKind::Passthrough,
            request_id: String::new(),
            headers: RequestHeaders::default(),
            decided: false,
            finished: false,
            watch_not_running: None,
            timer: None,
            body_read: false,
            error_page: None,
        }
    }

    fn reply_error(&mut self, vm: &Vm, error: &LbError) -> Action {
        self.decided = true;
        send_error(vm, error, &self.request_id, self.body_read)
    }

    /// nginx: when no node answered (nginx's own 502/504 HTML page), the page becomes the same
    /// OpenAI-style JSON that Envoy's local_reply_config gives (the body is replaced as it
    /// passes, see `on_http_response_body`).
    fn rewrite_proxy_error(&mut self, vm: &Vm, status: Option<u32>) {
        if !vm.platform.rewrites_proxy_errors() {
            return;
        }
        let error = match status {
            Some(502) => LbError::NoNodeAnswered { timeout: false },
            Some(504) => LbError::NoNodeAnswered { timeout: true },
            _ => return,
        };
        if vm.platform.responder(status) != Responder::Proxy {
            return;
        }
        host::set_response_header("content-type", Some("application/json"));
        host::set_response_header("content-length", None);
        self.error_page = Some(error.body(&self.request_id));
    }

    /// On the status listener: answers a reply the balancer relayed (see `platform`). Only an
    /// error status with a body is answered; the listener is local, so nothing else sends these.
    fn answer_relayed(&mut self, vm: &Vm) -> Option<Action> {
        if !vm.platform.relays_late_replies() {
            return None;
        }
        let status = self.headers.relay_status.filter(|s| (400..600).contains(s))?;
        let body = self.headers.relay_body.take().filter(|b| b.len() <= MAX_RELAYED_BODY)?;
        let retry_after = self.headers.relay_retry_after.take().filter(|r| r.bytes().all(|b| b.is_ascii_digit()));
        self.decided = true;
        send_json_error(status, retry_after.as_deref().filter(|r| !r.is_empty()), &body);
        Some(Action::Pause)
    }

    fn reply_json(&mut self, status: u32, body: &str) -> Action {
        self.decided = true;
        host::send_response(status, &[("content-type", "application/json"), ("cache-control", "no-store")], body);
        Action::Pause
    }

    /// Reads every request header once (one host call instead of one per header).
    fn read_headers(&mut self, vm: Option<&Vm>) {
        let hash_header = match vm.map(|vm| &vm.config.hash_on) {
            Some(HashOn::Header(name)) => Some(name.as_str()),
            _ => None,
        };
        let platform = vm.map(|vm| vm.platform);
        let (id_header, xff) = platform.map_or((true, true), |p| (p.request_id_header(), p.appends_forwarded_for()));
        let lower_names = platform.is_none_or(|p| !p.lowers_header_names());
        let mut map = host::request_header_map();
        for (name, value) in header_map::pairs(&map) {
            // Header names are case-insensitive: Envoy gives them in lower case, nginx as the
            // client wrote them (`Content-Length`).
            if lower_names {
                if let Some(name) = map.get_mut(name.clone()) {
                    name.make_ascii_lowercase();
                }
            }
            // A name that is not UTF-8 is no header this filter knows.
            let (Some(Ok(name)), Some(value)) = (map.get(name).map(std::str::from_utf8), map.get(value)) else {
                continue;
            };
            // Only the values kept are copied (one that is not UTF-8, lossily).
            let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
            match name {
                ":method" => self.headers.method = text(value),
                ":path" => self.headers.path = text(value),
                "x-request-id" if id_header => self.request_id = text(value),
                "content-length" => {
                    self.headers.content_length = std::str::from_utf8(value).ok().and_then(|v| v.trim().parse().ok())
                }
                DESTINATION_HEADER => self.headers.spoofed.push(DESTINATION_HEADER),
                MAX_RETRIES_HEADER => self.headers.spoofed.push(MAX_RETRIES_HEADER),
                MODEL_HEADER => self.headers.spoofed.push(MODEL_HEADER),
                "authorization" | "x-api-key" => {
                    self.headers.client = select::hash_key(&String::from_utf8_lossy(value))
                }
                "x-forwarded-for" if xff && self.headers.client == 0 => {
                    // The last entry is the peer Envoy saw (it appends it).
                    let xff = String::from_utf8_lossy(value);
                    self.headers.client = select::hash_key(xff.rsplit(',').next().unwrap_or_default().trim());
                }
                TIMER_HEADER => self.headers.timer = true,
                "transfer-encoding" => self.headers.transfer_encoding = true,
                RELAY_STATUS_HEADER => {
                    self.headers.spoofed.push(RELAY_STATUS_HEADER);
                    self.headers.relay_status = std::str::from_utf8(value).ok().and_then(|v| v.trim().parse().ok());
                }
                RELAY_BODY_HEADER => {
                    self.headers.spoofed.push(RELAY_BODY_HEADER);
                    self.headers.relay_body = Some(text(value));
                }
                RELAY_RETRY_AFTER_HEADER => {
                    self.headers.spoofed.push(RELAY_RETRY_AFTER_HEADER);
                    self.headers.relay_retry_after = Some(text(value));
                }
                other if Some(other) == hash_header => self.headers.hash_header = Some(text(value)),
                _ => {}
            }
        }
        if let Some(p) = platform {
            if let Some(id) = p.request_id() {
                self.request_id = id;
            }
            if self.headers.client == 0 {
                if let Some(addr) = p.client_address() {
                    self.headers.client = select::hash_key(strip_port(&addr));
                }
            }
        }
    }

    fn hash_key(&self, vm: &Vm) -> Option<u64> {
        match &vm.config.hash_on {
            HashOn::ClientIp => host::property_string(&["source", "address"]).map(|a| select::hash_key(strip_port(&a))),
            HashOn::Header(_) => self.headers.hash_header.as_deref().filter(|v| !v.is_empty()).map(select::hash_key),
        }
    }

    /// Only the `hash` policy needs a key: others skip the property read.
    fn hash_key_if_needed(&self, vm: &Vm) -> Option<u64> {
        if vm.config.policy == Policy::Hash {
            self.hash_key(vm)
        } else {
            None
        }
    }

    /// Sends the request to `route`; `holds_slot` when it took a slot on the first node.
    fn book(&mut self, vm: &Vm, route: Route, model: Option<String>, now: u64, stream: bool, holds_slot: bool) {
        send_to_nodes(vm, &route, model.as_deref());
        let charged = if holds_slot { route.nodes.first().copied() } else { None };
        vm.bookings.borrow_mut().insert(self.ctx, Booking::new(route, charged, now, model, stream));
        self.decided = true;
    }

    /// Requests that are not generations (web UI, other paths): no cap, no queue.
    fn route_passthrough(&mut self, vm: &Vm) -> Action {
        let now = host::now_ms();
        let input = RouteInput {
            model: None,
            hash_key: self.hash_key_if_needed(vm),
            now_ms: now,
            vm: vm.id,
            random: vm.random(),
        };
        let cfg = &vm.config;
        match vm.update_state(|state| select::route(cfg, state, &input)) {
            Ok(route) => {
                // Not a generation: it holds no slot.
                self.book(vm, route, None, now, false, false);
                Action::Continue
            }
            Err(why) => self.reply_error(vm, &why.error(cfg, None)),
        }
    }

    /// Generations: a node with a free slot now, or a place in the queue.
    fn route_inference(&mut self, vm: &Vm, body_size: usize) -> Action {
        let req = match request::parse_body(&host::request_body(body_size)) {
            Ok(req) => req,
            Err(error) => return self.reply_error(vm, &error),
        };
        let now = host::now_ms();
        let arrival = Arrival {
            vm: vm.id,
            ctx: self.ctx,
            model: &req.model,
            model_key: model_key(&req.model),
            hash_key: self.hash_key_if_needed(vm),
            random: vm.random(),
            now_ms: now,
            client: self.headers.client,
            max_tokens: req.max_tokens,
            stream: req.stream,
        };
        let cfg = &vm.config;
        vm.refresh_estimates(now);
        let admission = {
            let est = vm.estimates.borrow();
            vm.update_state(|state| schedule::admit(cfg, state, &est, &arrival))
        };
        if matches!(admission, Admission::Granted(_) | Admission::Queued) {
            vm.add_arrival(Arrived { model: arrival.model_key, at_ms: now });
        }
        match admission {
            Admission::Granted(route) => {
                self.book(vm, route, Some(req.model), now, req.stream, true);
                if let Some(b) = vm.bookings.borrow_mut().get_mut(&self.ctx) {
                    b.max_tokens = req.max_tokens;
                }
                Action::Continue
            }
            Admission::Queued => {
                self.decided = true;
                vm.metrics.count("exo_lb_queued_total", &[("model", model_label(cfg, Some(&req.model)))]);
                vm.waiting.borrow_mut().insert(
                    self.ctx,
                    Waiting {
                        request_id: self.request_id.clone(),
                        model: req.model,
                        stream: req.stream,
                        since_ms: now,
                    },
                );
                vm.set_tick();
                if vm.platform.resume() == Resume::RequestTimer {
                    self.wait_on_timer(vm, now);
                }
                Action::Pause
            }
            Admission::Rejected(error) => self.reply_error(vm, &error),
        }
    }

    /// Starts (again) the timer of this queued request; a request that cannot have one leaves
    /// the queue with an error rather than wait for ever.
    fn wait_on_timer(&mut self, vm: &Vm, now: u64) {
        self.timer = vm.platform.start_timer(QUEUE_POLL_MS);
        if self.timer.is_some() {
            return;
        }
        host::log(LogLevel::Error, "exo-lb: cannot start a queued request's timer; answering 503");
        if let Some(w) = vm.waiting.borrow_mut().remove(&self.ctx) {
            let (cfg, id, ctx) = (&vm.config, vm.id, self.ctx);
            let est = vm.estimates.borrow();
            vm.update_state(|state| schedule::withdraw(cfg, state, &est, id, ctx, now));
            drop(est);
            let error = QueueFailure::Unavailable { retry_after_s: 1 }.error(&w.model);
            let _ = send_error(vm, &error, &self.request_id, self.body_read);
        }
    }

    /// The queue timer expired: go on if a node was granted, fail if the wait is over, else
    /// wait again.
    fn on_timer(&mut self, vm: &Vm) {
        let now = host::now_ms();
        vm.poll_queue(now);
        let ready = vm.ready.borrow_mut().remove(&self.ctx);
        let waiting = vm.waiting.borrow_mut().remove(&self.ctx);
        match (ready, waiting) {
            // No further call pending: the host goes on with the request by itself.
            (Some(Ready::Go { route, .. }), Some(w)) => go_from_queue(vm, self.ctx, route, w, now),
            (Some(Ready::Fail { failure, .. }), Some(w)) => {
                // A timer's callback: the request goes on (or not) by itself.
                let _ = send_error(vm, &failure.error(&w.model), &self.request_id, self.body_read);
            }
            (Some(Ready::Go { route, .. }), None) => vm.give_back(&route, now),
            (Some(Ready::Fail { .. }), None) | (None, None) => {}
            (None, Some(w)) => {
                vm.waiting.borrow_mut().insert(self.ctx, w);
                self.wait_on_timer(vm, now);
            }
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
        // A node granted to it while it was still waiting for its timer (nginx).
        if let Some(Ready::Go { route, .. }) = vm.ready.borrow_mut().remove(&self.ctx) {
            vm.give_back(&route, now);
        }
        if vm.waiting.borrow_mut().remove(&self.ctx).is_some() {
            // The client left while queued: out of the queue at once, no slot taken.
            let (id, ctx) = (vm.id, self.ctx);
            let est = vm.estimates.borrow();
            vm.update_state(|state| schedule::withdraw(cfg, state, &est, id, ctx, now));
            drop(est);
            vm.set_tick();
            return;
        }
        let Some(booking) = vm.bookings.borrow_mut().remove(&self.ctx) else { return };
        // The node that answered is known from the response headers, when there were any.
        let answered = booking.served.map(|node| Answered {
            status: booking.status,
            first_tried: booking.route.nodes.first() == Some(&node),
            complete: booking.complete,
        });
        let upstream = vm.platform.upstream(answered);
        let served = booking.served.or_else(|| upstream.address.as_deref().and_then(|a| cfg.node_by_address(a)));
        // nginx: a node that closed a stream early looks like a clean end; its last bytes tell.
        let cut = !vm.platform.reports_cut_streams()
            && booking.stream
            && (200..300).contains(&upstream.status)
            && served.is_some()
            && !stream_end::finished(&booking.tail);
        let end = Ending {
            route: &booking.route.nodes,
            probing: booking.route.probing,
            charged: booking.charged,
            attempts: upstream.attempts,
            served,
            status: upstream.status,
            flags: upstream.flags | if cut { outcome::flags::UPSTREAM_REMOTE_RESET } else { 0 },
            started_ms: booking.started_ms,
            now_ms: now,
            vm: vm.id,
            model: booking.model.as_deref(),
            switched: booking.route.switched,
            cold: booking.route.cold,
            first_byte_ms: booking.first_byte_ms.filter(|_| booking.stream),
            chunks: Some(booking.chunks).filter(|_| booking.stream),
            max_tokens: booking.max_tokens,
        };
        let finished = {
            let est = vm.estimates.borrow();
            vm.update_state(|state| outcome::finish(cfg, state, &est, &end))
        };
        if let Some(sample) = finished.sample {
            vm.add_sample(sample);
            vm.refresh_estimates(now);
        }
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
        for (i, verdict) in finished.verdicts {
            if let (Verdict::Failure(reason), Some(node)) = (verdict, cfg.nodes.get(i)) {
                vm.metrics.count("exo_lb_node_failures_total", &[("node", &node.name), ("reason", reason.as_str())]);
                host::log(
                    LogLevel::Warn,
                    &format!(
                        "exo-lb: node {} ({}) failed: {} [request {}]",
                        node.name,
                        node.address,
                        reason.as_str(),
                        LogSafe(&self.request_id)
                    ),
                );
            }
        }
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, _num_headers: usize, _body_size: usize, _num_trailers: usize) {
        if self.timer != Some(token) {
            return;
        }
        self.timer = None;
        if let Some(vm) = self.vm.clone() {
            self.on_timer(&vm);
        }
    }

    fn on_done(&mut self) -> bool {
        self.finish();
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.read_headers(self.vm.clone().as_deref());
        // A client never chooses the node.
        for name in std::mem::take(&mut self.headers.spoofed) {
            host::set_request_header(name, None);
        }
        let Some(vm) = self.vm.clone() else {
            self.decided = true;
            host::send_response(503, &[("content-type", "text/plain")], "exo-lb has no valid configuration\n");
            return Action::Pause;
        };
        let (method, path) = (std::mem::take(&mut self.headers.method), std::mem::take(&mut self.headers.path));
        if vm.platform.is_timer_request(&path, self.headers.timer) {
            // A queued request's timer: waits for a body that never comes (see `platform`).
            self.decided = true;
            return Action::Continue;
        }
        if vm.platform.request_role(vm.role) == Role::Status {
            if let Some(action) = self.answer_relayed(&vm) {
                return action;
            }
            let now = host::now_ms();
            let layout = &vm.config.index.layout;
            return match path.split('?').next() {
                Some("/status") => {
                    let body = summary::status(&vm.config, &host::read_state(layout), &host::read_estimates(), now);
                    self.reply_json(200, &body)
                }
                Some("/healthcheck") => {
                    let (status, body) = summary::healthcheck(&vm.config, &host::read_state(layout), now);
                    self.reply_json(status, &body)
                }
                _ => self.reply_json(404, r#"{"error":"not found: try /status or /healthcheck"}"#),
            };
        }
        self.kind = request::classify(&method, &path, &vm.config);
        let layout = &vm.config.index.layout;
        match self.kind {
            RequestKind::Healthcheck => {
                let (status, body) = summary::healthcheck(&vm.config, &host::read_state(layout), host::now_ms());
                self.reply_json(status, &body)
            }
            RequestKind::ModelList => {
                match summary::model_list(&vm.config, &host::read_state(layout), host::now_ms()) {
                    Some(body) => self.reply_json(200, &body),
                    None => self.route_passthrough(&vm),
                }
            }
            RequestKind::Inference => {
                // No body: the stream ends here, or it says its length is 0, or (nginx) it has
                // neither a length nor a transfer-encoding.
                let no_length = self.headers.content_length.is_none() && !self.headers.transfer_encoding;
                if end_of_stream
                    || self.headers.content_length == Some(0)
                    || (no_length && vm.platform.skips_empty_bodies())
                {
                    return self.reply_error(&vm, &LbError::InvalidJson("the body is empty".to_string()));
                }
                if self.headers.content_length.is_some_and(|len| len > vm.config.max_body_bytes) {
                    return self.reply_error(&vm, &LbError::RequestTooLarge { limit: vm.config.max_body_bytes });
                }
                // Wait for the body: it names the model.
                vm.platform.await_body()
            }
            RequestKind::Passthrough => self.route_passthrough(&vm),
            RequestKind::Refused => self.reply_error(&vm, &request::refusal(&method, &path)),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.body_read = true;
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
        self.body_read = true;
        // A body followed by trailers never reports end_of_stream to the body callback.
        if self.decided || self.kind != RequestKind::Inference {
            return Action::Continue;
        }
        let Some(vm) = self.vm.clone() else { return Action::Continue };
        let size = host::request_body(usize::MAX).len();
        self.route_inference(&vm, size)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(vm) = self.vm.clone() else { return Action::Continue };
        let mut bookings = vm.bookings.borrow_mut();
        let booking = bookings.get_mut(&self.ctx);
        // The status is read once, and only when something here looks at it.
        if booking.is_none() && !vm.platform.rewrites_proxy_errors() {
            return Action::Continue;
        }
        let status = host::response_status();
        self.rewrite_proxy_error(&vm, status);
        let Some(booking) = booking else { return Action::Continue };
        let address = match vm.platform.responder(status) {
            Responder::Node(address) => address,
            Responder::Proxy => {
                // The proxy's own reply (no node answered): nothing to attribute.
                host::set_response_header(NODE_HEADER, None);
                return Action::Continue;
            }
        };
        let cfg = &vm.config;
        let served = address.as_deref().and_then(|a| cfg.node_by_address(a));
        booking.served = served;
        booking.status = status;
        booking.complete = end_of_stream;
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
                    LogSafe(&self.request_id),
                    address.as_deref().unwrap_or("(unknown)"),
                    booking.route.nodes.iter().filter_map(|&i| cfg.nodes.get(i)).map(|n| n.address.as_str()).collect::<Vec<_>>()
                ),
            );
        }
        if let (Some(node), Some(model)) = (served, booking.model.as_ref()) {
            if status == Some(404) {
                self.watch_not_running = Some((node, model.clone()));
            }
        }
        // After a failover the slot belongs to the node that really serves.
        if let (Some(from), Some(to)) = (booking.charged, served) {
            if from != to {
                let (now, id) = (host::now_ms(), vm.id);
                vm.update_state(|state| {
                    state.release(id, from);
                    state.acquire(id, to, now);
                });
                booking.charged = served;
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.error_page.is_some() {
            // The first chunk becomes the JSON, any later one nothing.
            let body = self.error_page.as_mut().map(std::mem::take).unwrap_or_default();
            host::set_response_body(body_size, body.as_bytes());
            return Action::Continue;
        }
        // What a streamed reply's pace tells the scheduler: when its first token came, and
        // about how many tokens (one body chunk each) followed.
        if let Some(vm) = self.vm.as_ref() {
            let mut switch_over = None;
            if let Some(b) = vm.bookings.borrow_mut().get_mut(&self.ctx) {
                b.complete |= end_of_stream;
                if b.stream && body_size > 0 {
                    // Newer exo opens a stream with `: keep-alive` (and repeats it while the
                    // request waits or the model loads): the first token is the first chunk
                    // that is not only comments.
                    if b.first_byte_ms.is_none() {
                        // A longer chunk is not read: it carries a token.
                        let comments = body_size <= stream_end::COMMENT_CHUNK_BYTES
                            && stream_end::only_comments(&host::response_body_range(0, body_size));
                        if !comments {
                            b.first_byte_ms = Some(host::now_ms());
                            switch_over = b.route.nodes.first().copied().filter(|_| b.route.switched || b.route.cold);
                        }
                    }
                    if b.first_byte_ms.is_some() {
                        b.chunks = b.chunks.saturating_add(1);
                    }
                    if !vm.platform.reports_cut_streams() {
                        let keep = body_size.min(stream_end::TAIL_BYTES);
                        stream_end::keep_tail(
                            &mut b.tail,
                            &host::response_body_range(body_size.saturating_sub(keep), keep),
                        );
                    }
                }
            }
            // The node's model is loaded: the scheduler stops counting its switch as under way.
            if let Some(node) = switch_over {
                let now = host::now_ms();
                vm.update_state(|state| state.end_switch(node, now));
            }
        }
        // Never pause a response body: SSE must flow. Only a node's 404 is looked at.
        if let (Some((node, model)), Some(vm)) = (self.watch_not_running.take(), self.vm.clone()) {
            if outcome::says_not_running(&host::response_body(body_size.min(4096))) {
                if let Some(n) = vm.config.nodes.get(node) {
                    host::log(
                        LogLevel::Warn,
                        &format!("exo-lb: node {} is not running model {}", n.name, LogSafe(&model)),
                    );
                    let (cfg, now) = (&vm.config, host::now_ms());
                    vm.update_state(|state| outcome::mark_not_running(cfg, state, node, &model, now));
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
