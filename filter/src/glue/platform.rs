//! Which proxy runs the filter, and the few things the glue does differently because of it.
//!
//! The same `exo_lb.wasm` runs in Envoy and in nginx with Kong's ngx_wasm_module (docs/nginx.md).
//! The decisions are the same on both (they are `logic`'s); what differs is how the glue gets at
//! a request's facts and how it makes a request go on. The root context learns the host once, at
//! start, and every difference is a method of [`Platform`]: the rest of the glue never asks
//! "is this nginx?".
//!
//! | | Envoy | nginx (ngx_wasm_module) |
//! |---|---|---|
//! | detected by | `plugin_root_id` is the configured name | `plugin_root_id` is a number (`"0"`) |
//! | waiting for the body | `Pause` in the headers callback | `Continue`: nginx reads the body anyway, a `Pause` there parks the request forever |
//! | a queued request goes on | the root tick resumes it (`set_effective_context` + `resume_http_request`) | its own timer (a `dispatch_http_call` that times out) re-decides on each expiry |
//! | tick period | changes (fast while requests wait) | set once: a second set traps |
//! | node that answered | `upstream.address` (`ip:port`) | last entry of `ngx.upstream_addr` whose headers came |
//! | attempts | `upstream.request_attempt_count` (8 bytes LE) | entries of `ngx.upstream_addr` |
//! | `response.code` | 8 bytes LE | decimal text |
//! | `response.flags` | read | never read (unsupported: logs an error per call); made up from `ngx.upstream_status` |
//! | request id | `x-request-id` (Envoy's own) | `ngx.request_id` (a client's `x-request-id` is ignored) |
//! | role (balancer or status) | `plugin_root_id` | `ngx.exo_lb_role`, per request (`set` by the rendered nginx.conf) |
//! | active checks | through the node cluster, steered by the `ip:port` header | straight to `ip:port` (nginx cannot dispatch to a cluster name) |
//! | client for fairness | the last `x-forwarded-for` entry (Envoy appends it) | `source.address` |
//! | a stream a node cut | response flags | judged by the stream's last bytes (`[DONE]` or a `finish_reason`) |
//! | a request with no body | `end_of_stream` in the headers callback | neither: no length and no transfer-encoding says so |
//! | an error decided once the body was read | `send_http_response` | relayed: routed to the status listener, whose filter answers it ([`RELAY_DESTINATION`]) |
//! | no node answered | local_reply_config's JSON | nginx's HTML 502/504 page, replaced by the filter's JSON as it passes |

use crate::glue::host;
use crate::glue::root::{Role, STATUS_ROOT_ID};
use crate::logic::outcome::flags;
use proxy_wasm::types::Action;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Envoy,
    Nginx,
}

/// How a request that waited in the queue goes on once it is granted a node (or must fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The root context's tick switches to the request and resumes it.
    FromTick,
    /// The request's own timer: it re-decides whenever the timer expires.
    RequestTimer,
}

/// Who answered a request, as seen in its response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Responder {
    /// The proxy itself (no node answered: connect failure, timeout, no route).
    Proxy,
    /// A node, at this address (`ip:port` when the host says so).
    Node(Option<String>),
}

/// What the host tells about a request's upstream when it ends, in Envoy's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstream {
    /// The node that answered (only read when asked for).
    pub address: Option<String>,
    pub attempts: u64,
    /// The response status (0: none).
    pub status: u32,
    /// Envoy's response flags (nginx: made up from its upstream variables).
    pub flags: u64,
}

/// What the response headers told about who answered (see [`Platform::upstream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub status: Option<u32>,
    /// The node that answered is the first of the request's list.
    pub first_tried: bool,
    /// The node's whole reply came (its end of stream was seen).
    pub complete: bool,
}

/// The host running this VM: one value, consulted by the glue where hosts differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Platform {
    pub kind: Kind,
}

/// Marks the requests that a waiting request's timer sends (nginx): they wait for a body that
/// never comes, so that the call times out.
pub const TIMER_HEADER: &str = "x-exo-lb-timer";
const TIMER_PATH: &str = "/.exo-lb/timer";

/// nginx: ngx_wasm_module ignores a reply the filter sends once it has read the request body
/// (the client would get nginx's HTML 502). So such a reply travels in request headers: the
/// filter routes the request to this destination (the rendered nginx.conf maps it to the status
/// listener) and the status listener's filter answers it from the headers, in its request
/// headers callback, where replies work.
pub const RELAY_DESTINATION: &str = "exo-lb-reply";
pub const RELAY_STATUS_HEADER: &str = "x-exo-lb-reply-status";
pub const RELAY_BODY_HEADER: &str = "x-exo-lb-reply-body";
pub const RELAY_RETRY_AFTER_HEADER: &str = "x-exo-lb-reply-retry-after";

impl Platform {
    /// Whether a reply decided once the request body was read must be relayed (see
    /// [`RELAY_DESTINATION`]).
    pub fn relays_late_replies(&self) -> bool {
        self.kind == Kind::Nginx
    }

    /// Whether the host tells the filter that a node cut a stream (Envoy: response flags). nginx
    /// does not: the filter judges a stream's end by its last bytes (`logic::stream_end`).
    pub fn reports_cut_streams(&self) -> bool {
        self.kind == Kind::Envoy
    }

    /// Whether a request without a body may go unannounced: no `end_of_stream` in the headers
    /// callback and no body callback at all (nginx, HTTP/1). Then a request with neither a
    /// length nor a transfer-encoding has no body.
    pub fn skips_empty_bodies(&self) -> bool {
        self.kind == Kind::Nginx
    }

    /// Whether the proxy's own error pages (no node answered) are the proxy's, to be rewritten
    /// by the filter (nginx: HTML); Envoy's local_reply_config already makes them JSON.
    pub fn rewrites_proxy_errors(&self) -> bool {
        self.kind == Kind::Nginx
    }

    /// Learns the host from a property every host has but encodes differently. Safe from a root
    /// context on both: nginx answers `plugin_root_id` with the filter's index as a number, Envoy
    /// with the configured root id (`exo_lb`, `exo_lb_status`). Never `plugin_name` (it crashes an
    /// nginx worker from a root context) nor a dotted property (nginx refuses those outside a
    /// request and logs an error).
    pub fn detect() -> Platform {
        let root_id = host::property_string(&["plugin_root_id"]);
        let kind = match root_id {
            Some(id) if id.bytes().all(|b| b.is_ascii_digit()) => Kind::Nginx,
            _ => Kind::Envoy,
        };
        Platform { kind }
    }

    /// The role of this root context, when the host can tell at configuration time.
    pub fn configured_role(&self) -> Role {
        match (self.kind, host::property_string(&["plugin_root_id"]).as_deref()) {
            (Kind::Envoy, Some(STATUS_ROOT_ID)) => Role::Status,
            // nginx: per request, see `request_role`.
            _ => Role::Balancer,
        }
    }

    /// The role a request is served in. nginx has no named root ids: the rendered nginx.conf
    /// sets `$exo_lb_role` on each server.
    pub fn request_role(&self, configured: Role) -> Role {
        match self.kind {
            Kind::Envoy => configured,
            Kind::Nginx => match host::property_string(&["ngx", "exo_lb_role"]).as_deref() {
                Some("status") => Role::Status,
                _ => Role::Balancer,
            },
        }
    }

    /// What the headers callback returns while the body, which names the model, is still to come.
    pub fn await_body(&self) -> Action {
        match self.kind {
            // Envoy delivers the body to a paused request (allow_on_headers_stop_iteration).
            Kind::Envoy => Action::Pause,
            // nginx reads the body in its content phase whatever the headers callback says, and
            // a Pause here would park the request for good.
            Kind::Nginx => Action::Continue,
        }
    }

    pub fn resume(&self) -> Resume {
        match self.kind {
            Kind::Envoy => Resume::FromTick,
            Kind::Nginx => Resume::RequestTimer,
        }
    }

    /// Whether the tick period may be changed after it was first set (nginx traps on a second
    /// `set_tick_period`).
    pub fn tick_adjustable(&self) -> bool {
        self.kind == Kind::Envoy
    }

    /// Whether the `x-request-id` request header is the proxy's own id (Envoy sets it; nginx
    /// passes on whatever a client sent).
    pub fn request_id_header(&self) -> bool {
        self.kind == Kind::Envoy
    }

    /// The request id when it is not a request header.
    pub fn request_id(&self) -> Option<String> {
        match self.kind {
            Kind::Envoy => None,
            Kind::Nginx => host::property_string(&["ngx", "request_id"]),
        }
    }

    /// Whether request header names reach the filter in lower case already.
    pub fn lowers_header_names(&self) -> bool {
        self.kind == Kind::Envoy
    }

    /// Whether the last `x-forwarded-for` entry is the client's address as the proxy saw it.
    pub fn appends_forwarded_for(&self) -> bool {
        self.kind == Kind::Envoy
    }

    /// The client's address, when `x-forwarded-for` cannot be trusted.
    pub fn client_address(&self) -> Option<String> {
        match self.kind {
            Kind::Envoy => None,
            Kind::Nginx => host::property_string(&["source", "address"]),
        }
    }

    /// Who answered, from the response headers callback; `status`: the response's.
    pub fn responder(&self, status: Option<u32>) -> Responder {
        match self.kind {
            Kind::Envoy => {
                // Envoy's own replies to a routed request are errors: a 2xx came from a node,
                // and the flags are not asked for (a host call fewer on the common path).
                let local = status.is_none_or(|s| !(200..300).contains(&s))
                    && host::property_u64(&["response", "flags"]).unwrap_or(0) & flags::LOCAL_REPLY != 0;
                if local {
                    Responder::Proxy
                } else {
                    Responder::Node(host::property_string(&["upstream", "address"]))
                }
            }
            Kind::Nginx => {
                let tried = NginxUpstream::read();
                match tried.last_answered() {
                    Some(address) => Responder::Node(Some(address.to_string())),
                    None => Responder::Proxy,
                }
            }
        }
    }

    /// What the request's upstream did, at its end. `known`: what the response headers told,
    /// when they came: the status, and the node that answered and whether it was the first
    /// tried (then there was one attempt, and the count is not asked for: each host call costs
    /// about a microsecond and a half, docs/benchmarks.md). Without them the address is read.
    /// A whole 2xx reply needs no flags: no node failed it (a connect failure or reset would
    /// have cut it short) and a client leaving after it holds no node.
    pub fn upstream(&self, known: Option<Answered>) -> Upstream {
        match self.kind {
            Kind::Envoy => Upstream {
                address: if known.is_none() { host::property_string(&["upstream", "address"]) } else { None },
                attempts: if known.is_some_and(|k| k.first_tried) {
                    1
                } else {
                    host::property_u64(&["upstream", "request_attempt_count"]).unwrap_or(0)
                },
                status: known.and_then(|k| k.status).unwrap_or_else(|| {
                    host::property_u64(&["response", "code"]).map_or(0, |c| u32::try_from(c).unwrap_or(0))
                }),
                flags: if known.is_some_and(|k| k.complete && k.status.is_some_and(|s| (200..300).contains(&s))) {
                    0
                } else {
                    host::property_u64(&["response", "flags"]).unwrap_or(0)
                },
            },
            Kind::Nginx => {
                let status =
                    host::property_string(&["response", "code"]).and_then(|c| c.trim().parse().ok()).unwrap_or(0);
                NginxUpstream::read().in_envoy_terms(status, known.is_none())
            }
        }
    }

    /// Sends an active health check to the node at `address`. Returns the call's token.
    pub fn probe(&self, cluster: &str, address: &str, path: &str, timeout_ms: u64) -> Option<u32> {
        match self.kind {
            // Through the node cluster, steered to the node by the override_host header.
            Kind::Envoy => host::dispatch_get(cluster, address, path, timeout_ms, true),
            // ngx_wasm_module cannot resolve a cluster name: straight to ip:port.
            Kind::Nginx => host::dispatch_get(address, address, path, timeout_ms, false),
        }
    }

    /// Starts the current request's timer (nginx): a call to the timer address (the rendered
    /// `$exo_lb_timer`, else this server) that declares a one-byte body and never sends it, so
    /// that it ends after `ms` with a timeout, delivered to this request's context. Returns its
    /// token.
    pub fn start_timer(&self, ms: u64) -> Option<u32> {
        if self.kind != Kind::Nginx {
            return None;
        }
        let target = host::property_string(&["ngx", "exo_lb_timer"]).filter(|t| !t.is_empty()).or_else(|| {
            let addr = host::property_string(&["ngx", "server_addr"])?;
            let port = host::property_string(&["ngx", "server_port"])?;
            Some(if addr.contains(':') { format!("[{addr}]:{port}") } else { format!("{addr}:{port}") })
        })?;
        let headers = vec![
            (":method", "POST"),
            (":path", TIMER_PATH),
            (":authority", "exo-lb-timer"),
            (TIMER_HEADER, "1"),
            ("content-length", "1"),
        ];
        host::dispatch(&target, headers, ms)
    }

    /// Whether the current request is a timer's (see [`Platform::start_timer`]).
    pub fn is_timer_request(&self, path: &str, timer_header: bool) -> bool {
        self.kind == Kind::Nginx && timer_header && path == TIMER_PATH
    }
}

/// nginx's upstream variables for the current request: one entry per attempt.
struct NginxUpstream {
    addrs: Vec<String>,
    statuses: Vec<String>,
    header_times: Vec<String>,
}

/// `"a, b : c"` -> `["a", "b", "c"]` (`" : "` separates the groups of internal redirects).
fn entries(value: Option<String>) -> Vec<String> {
    value
        .unwrap_or_default()
        .replace(" : ", ",")
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

impl NginxUpstream {
    fn read() -> NginxUpstream {
        NginxUpstream {
            addrs: entries(host::property_string(&["ngx", "upstream_addr"])),
            statuses: entries(host::property_string(&["ngx", "upstream_status"])),
            header_times: entries(host::property_string(&["ngx", "upstream_header_time"])),
        }
    }

    /// The last attempt's address, if its node sent response headers (a number as its
    /// `$upstream_header_time`; `-` when nginx never got a response).
    fn last_answered(&self) -> Option<&str> {
        let last = self.addrs.len().checked_sub(1)?;
        let answered = self.header_times.get(last).is_some_and(|t| t.parse::<f64>().is_ok());
        self.addrs.get(last).filter(|_| answered).map(String::as_str)
    }

    fn in_envoy_terms(&self, status: u32, want_address: bool) -> Upstream {
        let answered = self.last_answered();
        let last_status = self.statuses.last().map(String::as_str);
        let mut f = 0;
        if status == 499 {
            f |= flags::DOWNSTREAM_CONNECTION_TERMINATION;
        }
        if !self.addrs.is_empty() && answered.is_none() {
            // nginx answered by itself after its last attempt: no response in time, or none at all.
            f |= if last_status == Some("504") {
                flags::UPSTREAM_REQUEST_TIMEOUT
            } else {
                flags::UPSTREAM_CONNECTION_FAILURE
            };
        }
        Upstream {
            address: answered.filter(|_| want_address).map(str::to_string),
            attempts: u64::try_from(self.addrs.len()).unwrap_or(u64::MAX),
            status,
            flags: f,
        }
    }
}
