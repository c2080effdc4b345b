//! A simulated exo node, as it behaves on an RK3588 board with the RKLLM NPU engine.
//!
//! The simulator speaks either API dialect of exo (see [`Dialect`]), serves one generation at a
//! time (the NPU is serial; further requests wait in FIFO order), holds one model at a time (a
//! switch costs [`SimConfig::load_time`]), paces tokens at a configured rate and can be told
//! to misbehave ([`Fault`]). Every response carries the header `x-exo-node: <name>`, and every
//! JSON reply / SSE chunk carries `"system_fingerprint": "<name>"`, so a test can tell which node
//! served a request.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use exo_sim::{SimConfig, SimNode, Fault};
//! let mut cfg = SimConfig::new("rk1", &["qwen2.5-1.5b-instruct-rkllm"]);
//! cfg.time_scale = 20.0; // everything 20x faster than a real board
//! let node = SimNode::start("127.0.0.11:0".parse().unwrap(), cfg).await?;
//! println!("node at {}", node.addr());
//! node.set_fault(Fault::Status(503));
//! let stats = node.stats();
//! assert!(stats.max_concurrent_generations <= 1);
//! node.shutdown().await; // port is free again
//! # Ok(()) }
//! ```
//!
//! `GET /ws` is a websocket echo (each text message comes back as `<name>: <message>`), standing
//! in for the web UI's websockets.
//!
//! Control endpoints (besides the exo API): `GET /_sim/stats` ([`Stats`] as JSON),
//! `POST /_sim/fault` (body `{"fault":"status:503"}` or just `"hang"`), `POST /_sim/reset-stats`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, Instant};

/// Which generation of exo's HTTP API the node speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// Older exo (aiohttp): `/healthcheck`, errors `{"detail": ..}`, 400 for an unsupported
    /// model, stream chunks with `"object":"chat.completion"` and no `data: [DONE]`; its
    /// `/metrics` carries exo-rkllama's `exo_model_info{model_id=..}` (the model loaded last)
    /// and `rkllm_model_load_duration_seconds` (its loads, the model it starts with counted as
    /// one, as a preload at boot would be).
    Old,
    /// Newer exo (FastAPI): no `/healthcheck`, `GET /state` lists the running instance (the
    /// loaded model), errors `{"error":{..}}`, 404 for a model not
    /// running here, streams open with `: keep-alive` and end with `data: [DONE]`.
    New,
}

impl FromStr for Dialect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "old" => Ok(Dialect::Old),
            "new" => Ok(Dialect::New),
            _ => Err(format!("unknown dialect {s:?} (expected old|new)")),
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::Old => "old",
            Dialect::New => "new",
        })
    }
}

/// A misbehaviour, applied to inference requests (`/v1/chat/completions`, `/chat/completions`,
/// `/v1/completions`, `/v1/embeddings`) that arrive while it is set.
///
/// Text form (CLI `--fault`, `POST /_sim/fault`): `none`, `status:503`, `hang`,
/// `die-mid-stream:5`, `slow:3`, `refuse`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Behave.
    None,
    /// Answer with this HTTP status and a dialect-shaped error body.
    Status(u16),
    /// Accept the request and never send a byte; hold it until the client goes away.
    Hang,
    /// After this many tokens, abort the connection abruptly (the client sees a truncated body
    /// and a reset, never a clean end). Non-streaming requests get headers and a cut body.
    DieMidStream(u32),
    /// Pace tokens this many times slower.
    Slow(f64),
    /// Stop listening (connects are refused) and drop all live connections. Setting any other
    /// fault through [`SimNode::set_fault`] afterwards binds the same address again.
    /// (Over HTTP this is one-way: the node cannot be reached to undo it.)
    Refuse,
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a.trim())),
            None => (s, None),
        };
        let bad =
            || format!("bad fault {s:?} (expected none|status:<code>|hang|die-mid-stream:<n>|slow:<factor>|refuse)");
        match (kind.to_ascii_lowercase().as_str(), arg) {
            ("none", None) => Ok(Fault::None),
            ("hang", None) => Ok(Fault::Hang),
            ("refuse", None) => Ok(Fault::Refuse),
            ("status", Some(a)) => match a.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => Ok(Fault::Status(c)),
                _ => Err(bad()),
            },
            ("die-mid-stream", Some(a)) => a.parse().map(Fault::DieMidStream).map_err(|_| bad()),
            ("slow", Some(a)) => match a.parse::<f64>() {
                Ok(f) if f.is_finite() && f > 0.0 => Ok(Fault::Slow(f)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::None => write!(f, "none"),
            Fault::Status(c) => write!(f, "status:{c}"),
            Fault::Hang => write!(f, "hang"),
            Fault::DieMidStream(n) => write!(f, "die-mid-stream:{n}"),
            Fault::Slow(x) => write!(f, "slow:{x}"),
            Fault::Refuse => write!(f, "refuse"),
        }
    }
}

/// A port that was free on `ip` a moment ago and that this process has not handed out before.
/// The harnesses (e2e, bench) place several listeners of one Envoy or nginx with it: the kernel
/// may give the same just-released port to two successive binds, and Envoy refuses a config
/// whose listeners share an address (a CI run failed that way).
pub fn free_port(ip: impl Into<std::net::IpAddr>) -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<(std::net::IpAddr, u16)>> = std::sync::Mutex::new(Vec::new());
    let ip = ip.into();
    for _ in 0..1000 {
        let bound = std::net::TcpListener::bind(std::net::SocketAddr::new(ip, 0));
        let port = match bound.and_then(|l| l.local_addr()) {
            Ok(addr) => addr.port(),
            Err(e) => panic!("no free port on {ip}: {e}"),
        };
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !handed_out.contains(&(ip, port)) {
            handed_out.push((ip, port));
            return port;
        }
    }
    panic!("no port on {ip} that this process has not used already")
}

/// Parses a duration such as `500ms`, `20s`, `1.5m`, `1h`; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?} (e.g. 500ms, 20s, 1m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("bad duration unit {u:?} in {s:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

/// How a simulated node behaves. Build with [`SimConfig::new`] and adjust the fields.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Node name: sent as `x-exo-node` and `system_fingerprint`.
    pub name: String,
    /// Models the node can serve; the first is loaded at start. Must not be empty.
    pub models: Vec<String>,
    pub dialect: Dialect,
    /// Decode speed (simulated seconds; divided by `time_scale`).
    pub tokens_per_second: f64,
    /// Prefill speed; prompt tokens are counted as chars/4 of the message contents / prompt.
    pub prefill_tokens_per_second: f64,
    /// Reply length when the request has no `max_tokens`.
    pub reply_tokens: u32,
    /// Cost of loading a different served model (inside the NPU lock).
    pub switch_time: Duration,
    /// Models that load in another time than `switch_time` (a 3B model loads slower than a
    /// 1.5B one).
    pub switch_time_by_model: BTreeMap<String, Duration>,
    /// Every simulated duration is divided by this (20 = twenty times faster than real).
    pub time_scale: f64,
    /// When a client goes away mid-generation, keep the NPU busy until the reply would have
    /// finished (as a real node does) instead of stopping at once.
    pub keep_generating_after_disconnect: bool,
    /// Fault in force at start.
    pub fault: Fault,
    /// Log one line per request to stderr (the binary turns this on; default off).
    pub log_requests: bool,
}

impl SimConfig {
    /// Defaults: old dialect, 16 tok/s, 60 prefill tok/s, 20-token replies, no switch cost,
    /// real time (scale 1), stop on disconnect, no fault, no request log.
    pub fn new(name: &str, models: &[&str]) -> Self {
        SimConfig {
            name: name.to_string(),
            models: models.iter().map(|m| m.to_string()).collect(),
            dialect: Dialect::Old,
            tokens_per_second: 16.0,
            prefill_tokens_per_second: 60.0,
            reply_tokens: 20,
            switch_time: Duration::ZERO,
            switch_time_by_model: BTreeMap::new(),
            time_scale: 1.0,
            keep_generating_after_disconnect: false,
            fault: Fault::None,
            log_requests: false,
        }
    }

    /// Figures of a real RK3588 board (RKLLM, w8a8): 10 tok/s decode (Qwen2.5-1.5B runs 7.8-16.7,
    /// 3B models 3.5-10), 60 tok/s prefill, 200-token replies, a 30 s model switch, older
    /// dialect, and generation goes on after a client leaves (as on a real node). Real time
    /// (scale 1); set `time_scale` to run faster.
    pub fn rk3588(name: &str, models: &[&str]) -> Self {
        SimConfig {
            tokens_per_second: 10.0,
            prefill_tokens_per_second: 60.0,
            reply_tokens: 200,
            switch_time: Duration::from_secs(30),
            keep_generating_after_disconnect: true,
            ..SimConfig::new(name, models)
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.models.is_empty() {
            return Err("at least one model is required".into());
        }
        if let Some(m) = self.switch_time_by_model.keys().find(|m| !self.models.contains(m)) {
            return Err(format!("switch time given for {m:?}, which the node does not serve"));
        }
        if HeaderValue::from_str(&self.name).is_err() || self.name.is_empty() {
            return Err(format!("node name {:?} is not a valid header value", self.name));
        }
        for (what, v) in [
            ("tokens_per_second", self.tokens_per_second),
            ("prefill_tokens_per_second", self.prefill_tokens_per_second),
            ("time_scale", self.time_scale),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{what} must be > 0, got {v}"));
            }
        }
        Ok(())
    }

    /// How long loading `model` takes (simulated time).
    pub fn load_time(&self, model: &str) -> Duration {
        self.switch_time_by_model.get(model).copied().unwrap_or(self.switch_time)
    }

    /// A simulated duration in seconds, turned into wall time.
    fn scaled(&self, secs: f64) -> Duration {
        Duration::from_secs_f64((secs / self.time_scale).max(0.0))
    }
}

/// Counters of a node, as served by `GET /_sim/stats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub name: String,
    /// Requests received, all paths except `/_sim/...`.
    pub requests_total: u64,
    pub requests_by_path: BTreeMap<String, u64>,
    /// Highest number of generations running at once (the NPU lock keeps it at most 1).
    pub max_concurrent_generations: u64,
    /// Highest number of inference requests accepted and not yet finished (waiting or
    /// generating, until the response body ends or the client goes away).
    pub max_concurrent_requests: u64,
    pub current_requests: u64,
    pub model_switches: u64,
    pub loaded_model: String,
    /// Generations that ran to the end.
    pub completed: u64,
    /// Generations stopped early (client gone, die-mid-stream) or dropped while queued.
    pub aborted: u64,
    pub tokens_generated: u64,
    /// The fault in force, in text form.
    pub fault: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Listening,
    Refusing,
    Shutdown,
}

#[derive(Default)]
struct Counters {
    requests_total: u64,
    requests_by_path: BTreeMap<String, u64>,
    max_concurrent_requests: u64,
    current_requests: u64,
    model_switches: u64,
    loaded_model: String,
    completed: u64,
    aborted: u64,
    tokens_generated: u64,
    /// Model loads since the node started, and the seconds they took (real time), as
    /// exo-rkllama's `rkllm_model_load_duration_seconds` histogram counts them. Kept by
    /// `/_sim/reset`, as a real node keeps its histogram.
    loads: u64,
    load_seconds: f64,
}

struct Node {
    cfg: SimConfig,
    fault: Mutex<Fault>,
    /// The NPU: one generation at a time, FIFO.
    npu: tokio::sync::Mutex<()>,
    counters: Mutex<Counters>,
    generations: AtomicU64,
    max_generations: AtomicU64,
    next_id: AtomicU64,
    mode: watch::Sender<Mode>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Node {
    fn fault(&self) -> Fault {
        *lock(&self.fault)
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        lock(&self.counters)
    }

    fn stats(&self) -> Stats {
        let c = self.counters();
        Stats {
            name: self.cfg.name.clone(),
            requests_total: c.requests_total,
            requests_by_path: c.requests_by_path.clone(),
            max_concurrent_generations: self.max_generations.load(Ordering::SeqCst),
            max_concurrent_requests: c.max_concurrent_requests,
            current_requests: c.current_requests,
            model_switches: c.model_switches,
            loaded_model: c.loaded_model.clone(),
            completed: c.completed,
            aborted: c.aborted,
            tokens_generated: c.tokens_generated,
            fault: self.fault().to_string(),
        }
    }

    fn set_fault(&self, f: Fault) {
        *lock(&self.fault) = f;
        self.mode.send_if_modified(|m| {
            let next = match (*m, f) {
                (Mode::Shutdown, _) => Mode::Shutdown,
                (_, Fault::Refuse) => Mode::Refusing,
                _ => Mode::Listening,
            };
            let changed = next != *m;
            *m = next;
            changed
        });
    }

    fn reset_stats(&self) {
        let mut c = self.counters();
        let current = c.current_requests;
        let loaded = std::mem::take(&mut c.loaded_model);
        *c = Counters {
            current_requests: current,
            max_concurrent_requests: current,
            loaded_model: loaded,
            loads: c.loads,
            load_seconds: c.load_seconds,
            ..Counters::default()
        };
        self.max_generations.store(self.generations.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}-{n}", self.cfg.name)
    }

    fn error(&self, status: StatusCode, message: &str, code: Option<&str>) -> Response {
        let body = match self.cfg.dialect {
            Dialect::Old => json!({ "detail": message }),
            Dialect::New => json!({ "error": {
                "message": message,
                "type": if status.is_server_error() { "server_error" } else { "invalid_request_error" },
                "param": null,
                "code": code,
            }}),
        };
        (status, Json(body)).into_response()
    }

    fn unsupported_model(&self, model: &str) -> Response {
        match self.cfg.dialect {
            Dialect::Old => self.error(StatusCode::BAD_REQUEST, &format!("Unsupported model: {model}"), None),
            Dialect::New => self.error(
                StatusCode::NOT_FOUND,
                &format!("No instance found for model {model}"),
                Some("model_not_found"),
            ),
        }
    }

    fn not_found(&self, path: &str) -> Response {
        self.error(StatusCode::NOT_FOUND, &format!("Not Found: {path} (exo node {})", self.cfg.name), None)
    }
}

/// Counts the running generation while the NPU lock is held (measures the serial property).
struct GenerationGuard<'a>(&'a Node);

impl<'a> GenerationGuard<'a> {
    fn enter(node: &'a Node) -> Self {
        let now = node.generations.fetch_add(1, Ordering::SeqCst) + 1;
        node.max_generations.fetch_max(now, Ordering::SeqCst);
        GenerationGuard(node)
    }
}

impl Drop for GenerationGuard<'_> {
    fn drop(&mut self) {
        self.0.generations.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running simulated node. Dropping it without [`SimNode::shutdown`] also stops it (in the
/// background).
pub struct SimNode {
    node: Arc<Node>,
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl SimNode {
    /// Binds `addr` (port 0 picks a free port) and serves in a tokio task.
    pub async fn start(addr: SocketAddr, cfg: SimConfig) -> std::io::Result<SimNode> {
        cfg.validate().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mode = if cfg.fault == Fault::Refuse { Mode::Refusing } else { Mode::Listening };
        let node = Arc::new(Node {
            fault: Mutex::new(cfg.fault),
            npu: tokio::sync::Mutex::new(()),
            // The first model is loaded at start, as a preload at boot would: exo-rkllama
            // counts that load like any other.
            counters: Mutex::new(Counters {
                loaded_model: cfg.models[0].clone(),
                loads: 1,
                load_seconds: cfg.load_time(&cfg.models[0]).div_f64(cfg.time_scale).as_secs_f64(),
                ..Counters::default()
            }),
            generations: AtomicU64::new(0),
            max_generations: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            mode: watch::Sender::new(mode),
            cfg,
        });
        let router = router(node.clone());
        let task = tokio::spawn(accept_loop(node.clone(), listener, addr, router));
        Ok(SimNode { node, addr, task: Some(task) })
    }

    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.node.cfg.name
    }

    /// The models the node can serve (the first was loaded at start).
    pub fn models(&self) -> &[String] {
        &self.node.cfg.models
    }

    /// A snapshot of the counters (same data as `GET /_sim/stats`).
    pub fn stats(&self) -> Stats {
        self.node.stats()
    }

    /// Zeroes the counters (same as `POST /_sim/reset-stats`).
    pub fn reset_stats(&self) {
        self.node.reset_stats()
    }

    /// Sets the fault for requests arriving from now on.
    pub fn set_fault(&self, f: Fault) {
        self.node.set_fault(f)
    }

    /// Stops listening, closes every live connection and stops running generations; when it
    /// returns, the port is free (a new `SimNode` may start on the same address).
    pub async fn shutdown(mut self) {
        self.node.mode.send_replace(Mode::Shutdown);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        self.node.mode.send_replace(Mode::Shutdown);
    }
}

async fn accept_loop(node: Arc<Node>, listener: TcpListener, addr: SocketAddr, router: Router) {
    let mut listener = Some(listener);
    let mut mode_rx = node.mode.subscribe();
    let mut conns = JoinSet::new();
    loop {
        let mode = *mode_rx.borrow_and_update();
        match mode {
            Mode::Shutdown => break,
            Mode::Refusing => {
                listener = None;
                conns.shutdown().await;
                if mode_rx.changed().await.is_err() {
                    break;
                }
            }
            Mode::Listening => {
                let l = match &listener {
                    Some(l) => l,
                    None => match TcpListener::bind(addr).await {
                        Ok(l) => listener.insert(l),
                        Err(e) => {
                            eprintln!("[exo-sim {}] cannot bind {addr}: {e}", node.cfg.name);
                            tokio::select! {
                                _ = sleep(Duration::from_millis(100)) => {}
                                r = mode_rx.changed() => if r.is_err() { break },
                            }
                            continue;
                        }
                    },
                };
                tokio::select! {
                    r = l.accept() => match r {
                        Ok((stream, _peer)) => {
                            let _ = stream.set_nodelay(true);
                            let svc = TowerToHyperService::new(router.clone());
                            conns.spawn(async move {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .with_upgrades()
                                    .await;
                            });
                        }
                        // e.g. out of file descriptors: back off a little.
                        Err(_) => sleep(Duration::from_millis(10)).await,
                    },
                    r = mode_rx.changed() => if r.is_err() { break },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

fn router(node: Arc<Node>) -> Router {
    let routes = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/healthcheck", get(healthcheck))
        .route("/state", get(cluster_state))
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .route("/ws", get(websocket))
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/fault", post(sim_fault))
        .route("/_sim/reset-stats", post(sim_reset_stats))
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(node.clone(), track))
        .with_state(node);
    // Both exo servers percent-decode the path before routing (aiohttp through yarl, FastAPI
    // through uvicorn), so `POST /v1/chat/complet%69ons` reaches the chat handler there: the
    // routes above are matched on the decoded path too.
    Router::new().fallback_service(routes).layer(middleware::map_request(decode_path))
}

async fn decode_path(mut req: Request) -> Request {
    let uri = req.uri();
    if !uri.path().contains('%') {
        return req;
    }
    let raw = uri.path().as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match (raw[i], raw.get(i + 1).copied().and_then(hex), raw.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                decoded.push(hi << 4 | lo);
                i += 3;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    // A decoded byte that cannot stand in a URI (a space, non-ASCII) leaves the path as sent.
    if let Ok(path) = String::from_utf8(decoded) {
        if let Ok(new) = format!("{path}{query}").parse() {
            *req.uri_mut() = new;
        }
    }
    req
}

// ---------------------------------------------------------------------------------------------
// Request tracking: counts, concurrency, `x-exo-node`, one log line per request.

/// Filled by inference handlers so the log line can name the model.
#[derive(Clone, Default)]
struct ModelSlot(Arc<Mutex<Option<String>>>);

impl ModelSlot {
    fn set(&self, m: &str) {
        *lock(&self.0) = Some(m.to_string());
    }
}

fn is_inference(path: &str) -> bool {
    matches!(path, "/v1/chat/completions" | "/chat/completions" | "/v1/completions" | "/v1/embeddings")
}

/// Lives from request arrival until the response body is done (or the client is gone).
struct Track {
    node: Arc<Node>,
    method: Method,
    path: String,
    inference: bool,
    start: Instant,
    status: Option<StatusCode>,
    model: ModelSlot,
    body_error: bool,
}

impl Drop for Track {
    fn drop(&mut self) {
        if self.inference {
            let mut c = self.node.counters();
            c.current_requests = c.current_requests.saturating_sub(1);
        }
        if self.node.cfg.log_requests {
            let model = lock(&self.model.0).clone().unwrap_or_else(|| "-".into());
            let status = match self.status {
                Some(s) => s.as_u16().to_string(),
                None => "- (client gone before reply)".into(),
            };
            let cut = if self.body_error { " (connection aborted)" } else { "" };
            eprintln!(
                "[exo-sim {}] {} {} model={} status={} {:.1}ms{}",
                self.node.cfg.name,
                self.method,
                self.path,
                model,
                status,
                self.start.elapsed().as_secs_f64() * 1000.0,
                cut
            );
        }
    }
}

async fn track(State(node): State<Arc<Node>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let counted = !path.starts_with("/_sim/");
    let inference = counted && is_inference(&path);
    if counted {
        let mut c = node.counters();
        c.requests_total += 1;
        *c.requests_by_path.entry(path.clone()).or_default() += 1;
        if inference {
            c.current_requests += 1;
            c.max_concurrent_requests = c.max_concurrent_requests.max(c.current_requests);
        }
    }
    let slot = ModelSlot::default();
    req.extensions_mut().insert(slot.clone());
    let mut tracker = Track {
        node: node.clone(),
        method: req.method().clone(),
        path,
        inference,
        start: Instant::now(),
        status: None,
        model: slot,
        body_error: false,
    };
    let mut resp = next.run(req).await;
    tracker.status = Some(resp.status());
    if let Ok(v) = HeaderValue::from_str(&node.cfg.name) {
        resp.headers_mut().insert("x-exo-node", v);
    }
    if resp.body().size_hint().exact().is_none() {
        // A streamed body: the request lasts until the stream ends or is dropped.
        let body = std::mem::take(resp.body_mut());
        let stream = body.into_data_stream().map(move |item| {
            // Capture the whole tracker (not just one field) so it lives as long as the body.
            let t = &mut tracker;
            if item.is_err() {
                t.body_error = true;
            }
            item
        });
        *resp.body_mut() = Body::from_stream(stream);
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// Inference.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

enum Event {
    KeepAlive,
    Token(String),
    Done { completion_tokens: u32 },
    Die,
}

struct Job {
    model: String,
    prompt_tokens: u32,
    tokens: u32,
    stream: bool,
    slow: f64,
    die_after: Option<u32>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Text of a `content` field: a string, or an array of parts with `text`.
fn content_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str).or(p.as_str()))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

fn approx_tokens(chars: usize) -> u32 {
    chars.div_ceil(4).max(1) as u32
}

/// Validates the body; on success returns (parsed body, model), else the reason for a 400.
fn parse_request(body: &Bytes) -> Result<(Value, String), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("Invalid JSON body: {e}"))?;
    if !v.is_object() {
        return Err("Request body must be a JSON object".into());
    }
    match v.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => {
            let m = m.to_string();
            Ok((v, m))
        }
        _ => Err("Missing required field: model".into()),
    }
}

/// The part common to all inference endpoints: faults, validation, model check.
async fn admit(node: &Node, slot: &ModelSlot, body: &Bytes) -> Result<(Value, String), Response> {
    let fault = node.fault();
    let parsed = parse_request(body);
    if let Ok((_, m)) = &parsed {
        slot.set(m);
    }
    match fault {
        Fault::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let reason = status.canonical_reason().unwrap_or("Error");
            return Err(node.error(status, &format!("{reason} (simulated fault on {})", node.cfg.name), None));
        }
        Fault::Hang => std::future::pending::<()>().await,
        _ => {}
    }
    let (v, model) = parsed.map_err(|msg| node.error(StatusCode::BAD_REQUEST, &msg, None))?;
    if !node.cfg.models.contains(&model) {
        return Err(node.unsupported_model(&model));
    }
    Ok((v, model))
}

async fn chat_completions(
    State(node): State<Arc<Node>>,
    Extension(slot): Extension<ModelSlot>,
    body: Bytes,
) -> Response {
    inference(node, slot, body, Kind::Chat).await
}

async fn completions(State(node): State<Arc<Node>>, Extension(slot): Extension<ModelSlot>, body: Bytes) -> Response {
    inference(node, slot, body, Kind::Completion).await
}

async fn inference(node: Arc<Node>, slot: ModelSlot, body: Bytes, kind: Kind) -> Response {
    let (v, model) = match admit(&node, &slot, &body).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let prompt_chars = match kind {
        Kind::Chat => match v.get("messages").and_then(Value::as_array) {
            Some(msgs) => {
                msgs.iter().map(|m| content_text(m.get("content").unwrap_or(&Value::Null)).chars().count()).sum()
            }
            None => return node.error(StatusCode::BAD_REQUEST, "Missing required field: messages", None),
        },
        Kind::Completion => match v.get("prompt") {
            Some(Value::Array(ps)) => ps.iter().map(|p| content_text(p).chars().count()).sum(),
            Some(p) => content_text(p).chars().count(),
            None => 0,
        },
    };
    let tokens = v
        .get("max_tokens")
        .or_else(|| v.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map(|n| n.min(u32::MAX as u64) as u32)
        .unwrap_or(node.cfg.reply_tokens);
    let fault = node.fault();
    let job = Job {
        model: model.clone(),
        prompt_tokens: approx_tokens(prompt_chars),
        tokens,
        stream: v.get("stream").and_then(Value::as_bool) == Some(true),
        slow: match fault {
            Fault::Slow(f) => f,
            _ => 1.0,
        },
        die_after: match fault {
            Fault::DieMidStream(n) => Some(n),
            _ => None,
        },
    };
    let reply = Reply {
        kind,
        dialect: node.cfg.dialect,
        id: node.new_id(match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        }),
        created: unix_now(),
        model,
        node: node.cfg.name.clone(),
        prompt_tokens: job.prompt_tokens,
    };
    let stream = job.stream;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run_generation(node.clone(), job, tx));
    if stream {
        sse_response(reply, rx)
    } else {
        collect_response(reply, rx).await
    }
}

async fn run_generation(node: Arc<Node>, job: Job, tx: mpsc::UnboundedSender<Event>) {
    let mut mode = node.mode.subscribe();
    tokio::select! {
        _ = generate(&node, job, &tx) => {}
        _ = mode.wait_for(|m| *m == Mode::Shutdown) => {}
    }
}

/// Sleeps until `until`; false if the client went away meanwhile (only watched if `watch`).
async fn pace(tx: &mpsc::UnboundedSender<Event>, until: Instant, watch: bool) -> bool {
    if watch {
        tokio::select! {
            _ = sleep_until(until) => true,
            _ = tx.closed() => false,
        }
    } else {
        sleep_until(until).await;
        true
    }
}

/// Waits until `until`, sending a keep-alive comment every `keepalive` (if set) while the client
/// is there. Returns false if the client went away and `stop_on_disconnect` is set.
async fn idle(
    tx: &mpsc::UnboundedSender<Event>,
    until: Instant,
    keepalive: Option<Duration>,
    client: &mut bool,
    stop_on_disconnect: bool,
) -> bool {
    loop {
        let next_keepalive = keepalive.filter(|_| *client).map(|every| Instant::now() + every);
        let wake = next_keepalive.map_or(until, |k| k.min(until));
        if !pace(tx, wake, *client && stop_on_disconnect).await {
            return false;
        }
        if wake >= until {
            return true;
        }
        if tx.send(Event::KeepAlive).is_err() {
            *client = false;
            if stop_on_disconnect {
                return false;
            }
        }
    }
}

async fn generate(node: &Node, job: Job, tx: &mpsc::UnboundedSender<Event>) {
    let cfg = &node.cfg;
    let keep = cfg.keep_generating_after_disconnect;
    let abort = || node.counters().aborted += 1;
    let keepalives = job.stream && cfg.dialect == Dialect::New;
    let mut client = true;
    if keepalives && tx.send(Event::KeepAlive).is_err() {
        client = false;
    }
    if !client && !keep {
        return abort();
    }

    // Wait for the NPU (FIFO), sending keep-alive comments every 10 s like newer exo.
    let keepalive_every = cfg.scaled(10.0);
    let npu = node.npu.lock();
    tokio::pin!(npu);
    let _npu = loop {
        tokio::select! {
            g = &mut npu => break g,
            _ = tx.closed(), if client && !keep => return abort(),
            _ = sleep(keepalive_every), if client && keepalives => {
                if tx.send(Event::KeepAlive).is_err() {
                    client = false;
                    if !keep {
                        return abort();
                    }
                }
            }
        }
    };
    let _gen = GenerationGuard::enter(node);

    let keepalive = keepalives.then_some(keepalive_every);
    // Load the model if another one is loaded (cannot be interrupted).
    let loaded = node.counters().loaded_model.clone();
    if loaded != job.model {
        let started = Instant::now();
        let until = started + cfg.load_time(&job.model).div_f64(cfg.time_scale);
        idle(tx, until, keepalive, &mut client, false).await;
        let mut c = node.counters();
        c.loaded_model = job.model.clone();
        c.model_switches += 1;
        c.loads += 1;
        c.load_seconds += started.elapsed().as_secs_f64();
    }

    // Prefill.
    let until = Instant::now() + cfg.scaled(job.prompt_tokens as f64 / cfg.prefill_tokens_per_second);
    if (!client && !keep) || !idle(tx, until, keepalive, &mut client, !keep).await {
        return abort();
    }
    let mut deadline = until;
    let per_token = cfg.scaled(job.slow / cfg.tokens_per_second);
    for i in 0..job.tokens {
        if job.die_after == Some(i) {
            let _ = tx.send(Event::Die);
            return abort();
        }
        deadline += per_token;
        if !pace(tx, deadline, client && !keep).await {
            return abort();
        }
        node.counters().tokens_generated += 1;
        if client && tx.send(Event::Token(format!("tok{i} "))).is_err() {
            client = false;
            if !keep {
                return abort();
            }
        }
    }
    if job.die_after.is_some() {
        let _ = tx.send(Event::Die);
        return abort();
    }
    let _ = tx.send(Event::Done { completion_tokens: job.tokens });
    node.counters().completed += 1;
}

/// Formats replies in the node's dialect.
#[derive(Clone)]
struct Reply {
    kind: Kind,
    dialect: Dialect,
    id: String,
    created: u64,
    model: String,
    node: String,
    prompt_tokens: u32,
}

impl Reply {
    fn usage(&self, completion_tokens: u32) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        let (object, choice) = match self.kind {
            Kind::Chat => (
                match self.dialect {
                    Dialect::Old => "chat.completion",
                    Dialect::New => "chat.completion.chunk",
                },
                json!({
                    "index": 0,
                    "delta": match text {
                        Some(t) => json!({ "role": "assistant", "content": t }),
                        None => json!({}),
                    },
                    "logprobs": null,
                    "finish_reason": finish,
                }),
            ),
            Kind::Completion => (
                "text_completion",
                json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish }),
            ),
        };
        self.envelope(object, choice)
    }

    /// What every reply of this request carries around its one choice.
    fn envelope(&self, object: &str, choice: Value) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.node,
            "choices": [choice],
        })
    }

    fn full(&self, text: &str, completion_tokens: u32) -> Value {
        let (object, choice) = match self.kind {
            Kind::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": { "role": "assistant", "content": text },
                    "logprobs": null,
                    "finish_reason": "stop",
                }),
            ),
            Kind::Completion => {
                ("text_completion", json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": "stop" }))
            }
        };
        let mut reply = self.envelope(object, choice);
        reply["usage"] = self.usage(completion_tokens);
        reply
    }
}

fn sse_data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn crash() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "simulated node crash mid-stream")
}

fn sse_response(reply: Reply, rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let stream = futures_util::stream::unfold(Some(rx), move |state| {
        let reply = reply.clone();
        async move {
            let mut rx = state?;
            let item = match rx.recv().await {
                Some(Event::KeepAlive) => Ok(Bytes::from_static(b": keep-alive\n\n")),
                Some(Event::Token(t)) => Ok(sse_data(&reply.chunk(Some(&t), None))),
                Some(Event::Done { .. }) => {
                    let mut last = sse_data(&reply.chunk(None, Some("stop"))).to_vec();
                    if reply.dialect == Dialect::New {
                        last.extend_from_slice(b"data: [DONE]\n\n");
                    }
                    return Some((Ok(Bytes::from(last)), None));
                }
                // Die, or the generation was stopped (shutdown): never a clean end. Pause a
                // moment first so hyper flushes the chunks already handed over.
                Some(Event::Die) | None => {
                    sleep(Duration::from_millis(20)).await;
                    return Some((Err(crash()), None));
                }
            };
            Some((item, Some(rx)))
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "text/event-stream")
        .header(CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn collect_response(reply: Reply, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::KeepAlive) => {}
            Some(Event::Token(t)) => text.push_str(&t),
            Some(Event::Done { completion_tokens }) => {
                return Json(reply.full(&text, completion_tokens)).into_response();
            }
            Some(Event::Die) | None => {
                // Headers and a cut body, then the connection is reset.
                let partial = format!("{{\"id\":\"{}\",\"object\":\"chat.compl", reply.id);
                let cut = futures_util::stream::once(async move {
                    sleep(Duration::from_millis(20)).await;
                    Err::<Bytes, _>(crash())
                });
                let body = futures_util::stream::once(async move { Ok(Bytes::from(partial)) }).chain(cut);
                return Response::builder()
                    .status(StatusCode::OK)
                    .header(CONTENT_TYPE, "application/json")
                    .body(Body::from_stream(body))
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
            }
        }
    }
}

async fn embeddings(State(node): State<Arc<Node>>, Extension(slot): Extension<ModelSlot>, body: Bytes) -> Response {
    let (v, model) = match admit(&node, &slot, &body).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let inputs: Vec<String> = match v.get("input") {
        Some(Value::Array(a)) => a.iter().map(content_text).collect(),
        Some(x) => vec![content_text(x)],
        None => return node.error(StatusCode::BAD_REQUEST, "Missing required field: input", None),
    };
    let mut prompt_tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            prompt_tokens += approx_tokens(s.chars().count());
            // A deterministic 8-dimensional "embedding" of the text (FNV-1a based).
            let mut h: u64 = 0xcbf29ce484222325;
            let emb: Vec<f64> = (0..8)
                .map(|_| {
                    for b in s.bytes().chain([0u8]) {
                        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
                    }
                    ((h >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
                })
                .collect();
            json!({ "object": "embedding", "index": i, "embedding": emb })
        })
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "system_fingerprint": node.cfg.name,
        "usage": { "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens },
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// Other endpoints.

async fn models(State(node): State<Arc<Node>>) -> Response {
    let created = unix_now();
    let data: Vec<Value> = node
        .cfg
        .models
        .iter()
        .map(|m| json!({ "id": m, "object": "model", "created": created, "owned_by": "exo" }))
        .collect();
    Json(json!({ "object": "list", "data": data, "system_fingerprint": node.cfg.name })).into_response()
}

/// Newer exo's cluster state, trimmed to what a one-board cluster shows: the instance of the
/// model the node has loaded (tagged by kind, camelCase as exo serialises it) and its runner.
/// Older exo has no such endpoint.
async fn cluster_state(State(node): State<Arc<Node>>) -> Response {
    if node.cfg.dialect == Dialect::Old {
        return node.not_found("/state");
    }
    let model = node.counters().loaded_model.clone();
    let busy = node.generations.load(Ordering::SeqCst) > 0;
    let (instance, runner, board) = ("instance-1", "runner-1", format!("node-{}", node.cfg.name));
    let status = if busy { "RunnerRunning" } else { "RunnerReady" };
    Json(json!({
        "instances": { instance: { "MlxRingInstance": {
            "instanceId": instance,
            "shardAssignments": {
                "modelId": model,
                "runnerToShard": { runner: { "PipelineShardMetadata": { "deviceRank": 0, "worldSize": 1, "startLayer": 0, "endLayer": 28, "nLayers": 28 } } },
                "nodeToRunner": { board.clone(): runner },
            },
            "hosts": [],
        } } },
        "runners": { runner: { status: {} } },
        "downloads": {},
        "tasks": {},
        "lastSeen": { board: unix_now() },
        "lastEventAppliedIdx": 0,
    }))
    .into_response()
}

async fn healthcheck(State(node): State<Arc<Node>>) -> Response {
    match node.cfg.dialect {
        Dialect::Old => Json(json!({ "status": "ok" })).into_response(),
        Dialect::New => node.not_found("/healthcheck"),
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let s = node.stats();
    let slow = match node.fault() {
        Fault::Slow(f) => f,
        _ => 1.0,
    };
    let label = format!("{{node=\"{}\"}}", label_value(&s.name));
    let tps = node.cfg.tokens_per_second / slow;
    let text = format!(
        "# HELP exo_requests_total Requests received.\n\
         # TYPE exo_requests_total counter\n\
         exo_requests_total{label} {}\n\
         # HELP exo_tokens_generated_total Tokens generated.\n\
         # TYPE exo_tokens_generated_total counter\n\
         exo_tokens_generated_total{label} {}\n\
         # HELP exo_model_switches_total Model loads after start.\n\
         # TYPE exo_model_switches_total counter\n\
         exo_model_switches_total{label} {}\n\
         # HELP exo_tokens_per_second Decode speed.\n\
         # TYPE exo_tokens_per_second gauge\n\
         exo_tokens_per_second{label} {tps}\n\
         # HELP exo_inflight_requests Inference requests waiting or generating.\n\
         # TYPE exo_inflight_requests gauge\n\
         exo_inflight_requests{label} {}\n",
        s.requests_total, s.tokens_generated, s.model_switches, s.current_requests
    );
    // exo-rkllama's own (older exo on RK3588 boards; prometheus_client's text): which model it
    // loaded last and how long its loads took.
    let text = if node.cfg.dialect == Dialect::Old {
        let (loads, load_seconds) = {
            let c = node.counters();
            (c.loads, c.load_seconds)
        };
        let escaped = label_value(&s.loaded_model);
        format!(
            "{text}# HELP exo_model_info Information about the currently loaded model\n\
             # TYPE exo_model_info gauge\n\
             exo_model_info{{layers=\"28\",model_id=\"{escaped}\",rkllm_name=\"{escaped}\"}} 1.0\n\
             # HELP rkllm_model_load_duration_seconds Time to load model on RKLLM server\n\
             # TYPE rkllm_model_load_duration_seconds histogram\n\
             rkllm_model_load_duration_seconds_bucket{{le=\"+Inf\"}} {loads}.0\n\
             rkllm_model_load_duration_seconds_count {loads}.0\n\
             rkllm_model_load_duration_seconds_sum {load_seconds}\n"
        )
    } else {
        text
    };
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// A Prometheus label value, escaped as the text format wants.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

async fn index(State(node): State<Arc<Node>>) -> Html<String> {
    let name = node.cfg.name.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    Html(format!(
        "<!doctype html>\n<html><head><title>exo</title></head>\
         <body><h1>exo web UI</h1><p>node: {name}</p></body></html>\n"
    ))
}

/// `GET /ws`: a websocket (like the web UI's) that answers each text message with
/// `<node name>: <message>`.
async fn websocket(State(node): State<Arc<Node>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            match msg {
                Message::Text(text) => {
                    let reply = format!("{}: {}", node.cfg.name, text.as_str());
                    if socket.send(Message::Text(reply.into())).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
}

async fn fallback(State(node): State<Arc<Node>>, req: Request) -> Response {
    node.not_found(req.uri().path())
}

async fn sim_stats(State(node): State<Arc<Node>>) -> Json<Stats> {
    Json(node.stats())
}

async fn sim_fault(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    let text = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::String(s)) => s,
        Ok(v) => match v.get("fault").and_then(Value::as_str) {
            Some(s) => s.to_string(),
            None => {
                return (StatusCode::BAD_REQUEST, Json(json!({ "error": "expected {\"fault\":\"...\"}" })))
                    .into_response()
            }
        },
        Err(_) => String::from_utf8_lossy(&body).trim().to_string(),
    };
    match text.parse::<Fault>() {
        Ok(f) => {
            node.set_fault(f);
            Json(json!({ "fault": f.to_string() })).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({ "error": e }))).into_response(),
    }
}

async fn sim_reset_stats(State(node): State<Arc<Node>>) -> Json<Stats> {
    node.reset_stats();
    Json(node.stats())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_print() {
        for s in ["none", "status:503", "hang", "die-mid-stream:5", "slow:3", "slow:1.5", "refuse"] {
            let f: Fault = s.parse().unwrap();
            assert_eq!(f.to_string(), s);
        }
        assert_eq!("status:503".parse::<Fault>(), Ok(Fault::Status(503)));
        assert_eq!("die-mid-stream:5".parse::<Fault>(), Ok(Fault::DieMidStream(5)));
        for bad in ["", "status", "status:99", "slow:0", "slow:-1", "boom", "hang:3"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 parsecs").is_err());
    }

    #[test]
    fn dialect_parses() {
        assert_eq!("old".parse::<Dialect>(), Ok(Dialect::Old));
        assert_eq!("NEW".parse::<Dialect>(), Ok(Dialect::New));
        assert!("mid".parse::<Dialect>().is_err());
    }

    #[test]
    fn prompt_tokens_count_chars() {
        assert_eq!(approx_tokens(0), 1);
        assert_eq!(approx_tokens(8), 2);
        assert_eq!(approx_tokens(9), 3);
        assert_eq!(content_text(&json!([{"type":"text","text":"ab"},{"text":"cd"}])), "abcd");
    }

    #[test]
    fn config_validation() {
        assert!(SimConfig::new("rk1", &["m"]).validate().is_ok());
        assert!(SimConfig::new("rk1", &[]).validate().is_err());
        let mut c = SimConfig::new("rk1", &["m"]);
        c.time_scale = 0.0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn rk3588_preset_has_real_figures() {
        let c = SimConfig::rk3588("rk1", &["m1", "m2"]);
        assert!(c.validate().is_ok());
        assert!((8.0..=17.0).contains(&c.tokens_per_second));
        assert!((50..=500).contains(&c.reply_tokens));
        assert!((20..=60).contains(&c.switch_time.as_secs()));
        assert!(c.keep_generating_after_disconnect);
        assert_eq!(c.time_scale, 1.0);
    }
}
