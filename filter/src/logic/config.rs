//! The filter's public interface: the JSON in the plugin's `configuration`, parsed and validated
//! on load. Every error names the field it is about.

use crate::logic::duration;
use crate::logic::state::{model_key, Layout};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

/// A node that serves every model lists this (or omits `models`).
pub const ANY_MODEL: &str = "*";
/// The longest model id accepted, in bytes (in the configuration and in requests).
pub const MAX_MODEL_BYTES: usize = 256;

/// How candidates are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Fewest in-flight requests (across all workers) relative to weight.
    LeastConn,
    /// Smooth weighted round robin, as nginx does it.
    RoundRobin,
    /// Power of two random choices on in-flight requests.
    RandomTwo,
    /// Sticky: rendezvous hashing of a request key.
    Hash,
}

/// Where the `hash` policy takes its key from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    ClientIp,
    /// A request header, lower-cased.
    Header(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// `ip:port` exactly as Envoy prints the cluster endpoint (IPv6 in brackets).
    pub address: String,
    /// Model ids this node serves; empty means any model.
    pub models: Vec<String>,
    pub weight: u32,
    /// Drained: gets no new requests.
    pub down: bool,
    /// Used only when no other node for the model is available.
    pub backup: bool,
    pub max_fails: u32,
    pub fail_timeout_ms: u64,
    /// Requests the node runs at once; more wait in the balancer's queue.
    pub max_inflight: u32,
    /// Path of the active health check.
    pub probe_path: String,
    /// The model the node has loaded when the balancer starts, if the user says so (else the
    /// balancer learns it from traffic).
    pub loaded: Option<String>,
}

impl Node {
    pub fn serves_any_model(&self) -> bool {
        self.models.is_empty()
    }

    pub fn serves(&self, model: &str) -> bool {
        self.serves_any_model() || self.models.iter().any(|m| m == model)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub nodes: Vec<Node>,
    pub policy: Policy,
    pub hash_on: HashOn,
    pub fail_on_status: Vec<u16>,
    pub max_body_bytes: u64,
    pub healthcheck_path: String,
    pub queue: QueueConfig,
    /// What switching a node to another model costs: `None` ("auto", the default) learns it
    /// from traffic; a value is used until measurements exist. 0 turns warm-model affinity off.
    pub model_switch_cost_ms: Option<u64>,
    /// Switch costs measured from traffic replace `model_switch_cost` (on by default); off, the
    /// configured value is used as it is.
    pub learn_switch_cost: bool,
    /// Check each switch the scheduler's rule would make (or not make) against sampled futures
    /// and take a clearly cheaper choice instead ([`crate::logic::lookahead`]; on by default).
    pub look_ahead: bool,
    /// After a client leaves mid-generation, treat the node as busy until the generation would
    /// have ended (real exo nodes keep generating).
    pub hold_after_abort: bool,
    /// Active health checks; `None` when off.
    pub probe: Option<ProbeConfig>,
    /// Ask each node whose loaded model is not known what it has loaded (`GET /state`, which
    /// newer exo answers), so that the first requests go to nodes that have their model.
    pub discover_loaded: bool,
    /// The Envoy cluster that holds the nodes (probes are sent through it).
    pub cluster: String,
    /// Lookups derived from `nodes` once, so that requests do not search the node list.
    pub index: NodeIndex,
    /// Forward reads (GET, HEAD, OPTIONS) of any path to the nodes: exo's web UI, its assets and
    /// websockets. Off: only the OpenAI API (`/v1/...`, `/chat/completions`, `/models`) passes.
    pub web_ui: bool,
    /// Paths outside the API that may reach the nodes with any method (node administration such
    /// as `/quit`, `/download`, `/models/`): an entry ending in `/` is a prefix. Normalised on
    /// load. `exo-lb-ctl render` refuses them without API keys.
    pub admin_paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_waiting: u32,
    pub timeout_ms: u64,
    /// Waiting requests are served round robin between clients (API key, else client
    /// address), so that one client's burst cannot starve the others.
    pub fair_share: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

pub const DEFAULT_MAX_FAILS: u32 = 3;
pub const DEFAULT_FAIL_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_FAIL_ON_STATUS: [u16; 3] = [502, 503, 504];
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_HEALTHCHECK_PATH: &str = "/healthcheck";
/// Envoy's buffer limits in the shipped config are 8 MiB; a larger limit would let Envoy's own
/// plain-text 413 answer before the filter can.
pub const MAX_BODY_BYTES_LIMIT: u64 = 8 * 1024 * 1024;
pub const DEFAULT_MAX_INFLIGHT: u32 = 1;
pub const DEFAULT_QUEUE_MAX_WAITING: u32 = 64;
/// The 300 s that nginx users were given as proxy_read_timeout.
pub const DEFAULT_QUEUE_TIMEOUT_MS: u64 = 300_000;
/// `model_switch_cost` when it is `"auto"` (the default): learned from traffic.
pub const AUTO: &str = "auto";
/// Works for both exo dialects: older exo has it too, newer exo has no /healthcheck.
pub const DEFAULT_PROBE_PATH: &str = "/v1/models";
pub const DEFAULT_PROBE_INTERVAL_MS: u64 = 5_000;
pub const DEFAULT_PROBE_TIMEOUT_MS: u64 = 2_000;
pub const DEFAULT_CLUSTER: &str = "exo_nodes";
/// The nginx setup this replaces served exo's web UI at `/`: keep it, reads only.
pub const DEFAULT_WEB_UI: bool = true;
pub const MAX_ADMIN_PATHS: usize = 64;

/// A rejected configuration: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), message: message.into() }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    nodes: Vec<RawNode>,
    policy: Option<Policy>,
    hash_on: Option<String>,
    max_fails: Option<u32>,
    fail_timeout: Option<String>,
    fail_on_status: Option<Vec<u16>>,
    max_body_bytes: Option<u64>,
    healthcheck_path: Option<String>,
    max_inflight: Option<u32>,
    queue: Option<RawQueue>,
    model_switch_cost: Option<String>,
    learn_switch_cost: Option<bool>,
    look_ahead: Option<bool>,
    hold_after_abort: Option<bool>,
    probe: Option<RawProbe>,
    discover_loaded: Option<bool>,
    cluster: Option<String>,
    web_ui: Option<bool>,
    admin_paths: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    max_waiting: Option<u32>,
    timeout: Option<String>,
    fair_share: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    path: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    address: String,
    models: Option<Vec<String>>,
    weight: Option<u32>,
    down: Option<bool>,
    backup: Option<bool>,
    max_fails: Option<u32>,
    fail_timeout: Option<String>,
    max_inflight: Option<u32>,
    probe_path: Option<String>,
    loaded: Option<String>,
}

impl Config {
    /// Parses and validates the plugin configuration.
    pub fn parse(json: &[u8]) -> Result<Config, ConfigError> {
        if json.iter().all(u8::is_ascii_whitespace) {
            return Err(err("configuration", "is empty; it must be a JSON object with \"nodes\""));
        }
        if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(err("configuration", "must be a JSON object with \"nodes\""));
        }
        // Syntax first: a syntax error has no field to name.
        serde_json::from_slice::<serde::de::IgnoredAny>(json).map_err(|e| err("configuration", e.to_string()))?;
        let mut de = serde_json::Deserializer::from_slice(json);
        let raw: RawConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            // An unknown position ("?") names the closest field around it.
            let known = path.split('?').next().unwrap_or_default().trim_end_matches(['.', '[']);
            let field = if known.is_empty() || known == "." { "configuration".to_string() } else { known.to_string() };
            err(field, e.inner().to_string())
        })?;
        de.end().map_err(|e| err("configuration", e.to_string()))?;
        Self::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let max_fails = raw.max_fails.unwrap_or(DEFAULT_MAX_FAILS);
        let fail_timeout_ms = match &raw.fail_timeout {
            Some(text) => positive_duration("fail_timeout", text)?,
            None => DEFAULT_FAIL_TIMEOUT_MS,
        };
        let max_inflight = match raw.max_inflight {
            Some(n) => inflight_limit("max_inflight", n)?,
            None => DEFAULT_MAX_INFLIGHT,
        };
        let probe_path = match raw.probe.as_ref().and_then(|p| p.path.clone()) {
            Some(path) => request_path("probe.path", path)?,
            None => DEFAULT_PROBE_PATH.to_string(),
        };
        if raw.nodes.is_empty() {
            return Err(err("nodes", "is empty; list at least one node"));
        }
        let mut names = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        let mut nodes = Vec::with_capacity(raw.nodes.len());
        for (i, raw_node) in raw.nodes.into_iter().enumerate() {
            let at = |field: &str| format!("nodes[{i}].{field}");
            let name = raw_node.name.trim().to_string();
            if name.is_empty() {
                return Err(err(at("name"), "is empty"));
            }
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
                return Err(err(
                    at("name"),
                    format!("'{name}' may hold only letters, digits, '-', '_' and '.' (it appears in headers and metric names)"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(err(at("name"), format!("'{name}' is used by another node")));
            }
            let address = parse_address(&raw_node.address).map_err(|m| err(at("address"), m))?;
            if !addresses.insert(address.clone()) {
                return Err(err(at("address"), format!("'{address}' is used by another node")));
            }
            let models = match raw_node.models {
                None => Vec::new(),
                Some(list) => {
                    if list.is_empty() {
                        return Err(err(at("models"), "is empty; omit it or use [\"*\"] for any model"));
                    }
                    if list.iter().any(|m| m == ANY_MODEL) {
                        if list.len() > 1 {
                            return Err(err(at("models"), "\"*\" (any model) cannot be combined with model ids"));
                        }
                        Vec::new()
                    } else {
                        let mut seen = BTreeSet::new();
                        for (j, model) in list.iter().enumerate() {
                            if model.trim().is_empty() || model.trim() != model {
                                return Err(err(
                                    format!("nodes[{i}].models[{j}]"),
                                    format!("'{model}' is not a model id"),
                                ));
                            }
                            if model.len() > MAX_MODEL_BYTES {
                                return Err(err(
                                    format!("nodes[{i}].models[{j}]"),
                                    format!("is longer than {MAX_MODEL_BYTES} bytes"),
                                ));
                            }
                            if !seen.insert(model.as_str()) {
                                return Err(err(
                                    format!("nodes[{i}].models[{j}]"),
                                    format!("'{model}' is listed twice"),
                                ));
                            }
                        }
                        list
                    }
                }
            };
            let weight = raw_node.weight.unwrap_or(1);
            if weight == 0 {
                return Err(err(at("weight"), "must be at least 1 (use \"down\": true to drain a node)"));
            }
            if weight > 1000 {
                return Err(err(at("weight"), format!("{weight} is above the maximum of 1000")));
            }
            let node_fail_timeout_ms = match &raw_node.fail_timeout {
                Some(text) => positive_duration(&at("fail_timeout"), text)?,
                None => fail_timeout_ms,
            };
            let serves = |models: &[String], m: &str| models.is_empty() || models.iter().any(|id| id == m);
            nodes.push(Node {
                name,
                address,
                models: models.clone(),
                weight,
                down: raw_node.down.unwrap_or(false),
                backup: raw_node.backup.unwrap_or(false),
                max_fails: raw_node.max_fails.unwrap_or(max_fails),
                fail_timeout_ms: node_fail_timeout_ms,
                max_inflight: match raw_node.max_inflight {
                    Some(n) => inflight_limit(&at("max_inflight"), n)?,
                    None => max_inflight,
                },
                probe_path: match raw_node.probe_path {
                    Some(path) => request_path(&at("probe_path"), path)?,
                    None => probe_path.clone(),
                },
                loaded: match raw_node.loaded {
                    Some(model) if model.trim().is_empty() || model.len() > MAX_MODEL_BYTES => {
                        return Err(err(at("loaded"), format!("'{model}' is not a model id")));
                    }
                    Some(model) if !serves(&models, &model) => {
                        return Err(err(at("loaded"), format!("'{model}' is not among the node's models")));
                    }
                    other => other,
                },
            });
        }
        let hash_on = match raw.hash_on.as_deref() {
            None | Some("client_ip") => HashOn::ClientIp,
            Some(other) => match other.strip_prefix("header:") {
                Some(h) if is_header_name(h) => HashOn::Header(h.to_ascii_lowercase()),
                _ => {
                    return Err(err(
                        "hash_on",
                        format!("'{other}' is not \"client_ip\" or \"header:<name>\" with a valid header name"),
                    ))
                }
            },
        };
        let fail_on_status = raw.fail_on_status.unwrap_or_else(|| DEFAULT_FAIL_ON_STATUS.to_vec());
        for (i, code) in fail_on_status.iter().enumerate() {
            if !(400..=599).contains(code) {
                return Err(err(
                    format!("fail_on_status[{i}]"),
                    format!("{code} is not an HTTP error status (400-599)"),
                ));
            }
        }
        let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 || max_body_bytes > MAX_BODY_BYTES_LIMIT {
            return Err(err(
                "max_body_bytes",
                format!("{max_body_bytes} is outside 1..={MAX_BODY_BYTES_LIMIT} (Envoy's buffer limit in the shipped config)"),
            ));
        }
        let healthcheck_path = raw.healthcheck_path.unwrap_or_else(|| DEFAULT_HEALTHCHECK_PATH.to_string());
        if !healthcheck_path.starts_with('/') || healthcheck_path.contains(['?', '#', ' ']) {
            return Err(err("healthcheck_path", format!("'{healthcheck_path}' must be a path starting with '/'")));
        }
        let queue = QueueConfig {
            max_waiting: raw.queue.as_ref().and_then(|q| q.max_waiting).unwrap_or(DEFAULT_QUEUE_MAX_WAITING),
            timeout_ms: match raw.queue.as_ref().and_then(|q| q.timeout.as_deref()) {
                Some(text) => positive_duration("queue.timeout", text)?,
                None => DEFAULT_QUEUE_TIMEOUT_MS,
            },
            fair_share: raw.queue.as_ref().and_then(|q| q.fair_share).unwrap_or(true),
        };
        if queue.max_waiting > 100_000 {
            return Err(err("queue.max_waiting", format!("{} is above the maximum of 100000", queue.max_waiting)));
        }
        let model_switch_cost_ms = match raw.model_switch_cost.as_deref() {
            None | Some(AUTO) => None,
            Some(text) => Some(duration::parse_millis(text).map_err(|m| {
                err("model_switch_cost", format!("{m} (or \"{AUTO}\" to learn it from traffic, the default)"))
            })?),
        };
        let probe = match &raw.probe {
            None => None,
            Some(p) => {
                let interval_ms = match p.interval.as_deref() {
                    Some(text) => positive_duration("probe.interval", text)?,
                    None => DEFAULT_PROBE_INTERVAL_MS,
                };
                let timeout_ms = match p.timeout.as_deref() {
                    Some(text) => positive_duration("probe.timeout", text)?,
                    None => DEFAULT_PROBE_TIMEOUT_MS,
                };
                if interval_ms < 100 {
                    return Err(err("probe.interval", "must be at least 100ms"));
                }
                Some(ProbeConfig { interval_ms, timeout_ms })
            }
        };
        let cluster = raw.cluster.unwrap_or_else(|| DEFAULT_CLUSTER.to_string());
        if cluster.is_empty() {
            return Err(err("cluster", "is empty"));
        }
        let index = NodeIndex::new(&nodes);
        let admin_paths = admin_paths(raw.admin_paths.unwrap_or_default())?;
        Ok(Config {
            index,
            queue,
            model_switch_cost_ms,
            learn_switch_cost: raw.learn_switch_cost.unwrap_or(true),
            look_ahead: raw.look_ahead.unwrap_or(true),
            hold_after_abort: raw.hold_after_abort.unwrap_or(true),
            probe,
            discover_loaded: raw.discover_loaded.unwrap_or(true),
            cluster,
            web_ui: raw.web_ui.unwrap_or(DEFAULT_WEB_UI),
            admin_paths,
            nodes,
            policy: raw.policy.unwrap_or(Policy::LeastConn),
            hash_on,
            fail_on_status,
            max_body_bytes,
            healthcheck_path,
        })
    }

    /// The index of the node whose cluster endpoint is `address`.
    pub fn node_by_address(&self, address: &str) -> Option<usize> {
        self.index.by_address.get(address).copied()
    }

    /// The nodes that serve the model with [`model_key`] `model`, in configuration order.
    pub fn serving(&self, model: u64) -> &[usize] {
        self.index.models.get(&model).map_or(&self.index.any_model, |m| &m.serving)
    }

    /// A fresh shared state laid out for this node list.
    pub fn new_state(&self) -> crate::logic::state::ClusterState {
        crate::logic::state::ClusterState::new(&self.index.layout)
    }

    /// The id of a configured model, from its key.
    pub fn model_name(&self, model: u64) -> Option<&str> {
        self.index.models.get(&model).map(|m| m.id.as_str())
    }

    /// The model ids named by any node, sorted.
    pub fn model_ids(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self.nodes.iter().flat_map(|n| n.models.iter().map(String::as_str)).collect();
        set.into_iter().map(str::to_string).collect()
    }
}

/// Lookups derived from the node list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeIndex {
    /// How the shared state is laid out for this node list.
    pub layout: Layout,
    /// [`model_key`] of each configured model -> the model.
    pub models: BTreeMap<u64, ConfiguredModel>,
    /// Nodes that serve any model.
    pub any_model: Vec<usize>,
    pub by_address: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredModel {
    pub id: String,
    /// Nodes that list it or serve any model, in configuration order.
    pub serving: Vec<usize>,
}

impl NodeIndex {
    fn new(nodes: &[Node]) -> NodeIndex {
        let any_model: Vec<usize> =
            (0..nodes.len()).filter(|&i| nodes.get(i).is_some_and(Node::serves_any_model)).collect();
        let mut models: BTreeMap<u64, ConfiguredModel> = BTreeMap::new();
        for node in nodes {
            for id in &node.models {
                models.entry(model_key(id)).or_insert_with(|| ConfiguredModel {
                    id: id.clone(),
                    serving: (0..nodes.len()).filter(|&i| nodes.get(i).is_some_and(|n| n.serves(id))).collect(),
                });
            }
        }
        NodeIndex {
            layout: Layout::new(nodes.iter().map(|n| n.name.as_str())),
            models,
            any_model,
            by_address: nodes.iter().enumerate().map(|(i, n)| (n.address.clone(), i)).collect(),
        }
    }
}

fn inflight_limit(field: &str, n: u32) -> Result<u32, ConfigError> {
    if n == 0 || n > 10_000 {
        return Err(err(field, format!("{n} is outside 1..=10000 (an RK3588 node runs one generation at a time: 1)")));
    }
    Ok(n)
}

fn request_path(field: &str, path: String) -> Result<String, ConfigError> {
    if !path.starts_with('/') || path.contains(char::is_whitespace) {
        return Err(err(field, format!("'{path}' must be a path starting with '/'")));
    }
    Ok(path)
}

/// Checks `admin_paths`: each a plain, already normalised path (what requests are matched
/// against after normalisation), never `/` (that would open every path).
fn admin_paths(list: Vec<String>) -> Result<Vec<String>, ConfigError> {
    if list.len() > MAX_ADMIN_PATHS {
        return Err(err("admin_paths", format!("has {} entries; at most {MAX_ADMIN_PATHS}", list.len())));
    }
    for (i, path) in list.iter().enumerate() {
        let field = format!("admin_paths[{i}]");
        let plain = path.len() <= 256
            && path.starts_with('/')
            && path.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'%' | b'\\'));
        if !plain || crate::logic::request::normalize_path(path) != *path {
            return Err(err(
                field,
                format!(
                    "'{}' must be a plain path like \"/quit\" or \"/models/\" (no query, %, //, . or .. segments)",
                    path.escape_debug()
                ),
            ));
        }
        if path == "/" {
            return Err(err(field, "'/' would forward every path; list the administration paths you need"));
        }
    }
    Ok(list)
}

fn positive_duration(field: &str, text: &str) -> Result<u64, ConfigError> {
    match duration::parse_millis(text) {
        Ok(0) => Err(err(field, "must be longer than 0")),
        Ok(ms) => Ok(ms),
        Err(m) => Err(err(field, m)),
    }
}

/// Normalises `ip:port` to the form Envoy uses for endpoint addresses.
fn parse_address(text: &str) -> Result<String, String> {
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        format!("'{text}' is not an ip:port (Envoy matches resolved addresses, so a hostname never matches)")
    })?;
    if addr.port() == 0 {
        return Err(format!("'{text}' has port 0"));
    }
    if addr.ip().is_unspecified() {
        return Err(format!("'{text}' is an unspecified address"));
    }
    Ok(addr.to_string())
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{
      "nodes": [
        {"name": "rk1", "address": "192.168.1.101:52415", "models": ["qwen2.5-1.5b-instruct-rkllm"], "weight": 2},
        {"name": "rk2", "address": "192.168.1.102:52415", "models": ["*"], "backup": true, "max_fails": 1, "fail_timeout": "10s"},
        {"name": "rk3", "address": "[::1]:52415", "down": true, "max_inflight": 4, "probe_path": "/v1/models"}
      ],
      "policy": "hash",
      "hash_on": "header:X-Session",
      "max_fails": 5,
      "fail_timeout": "1m",
      "fail_on_status": [500, 502],
      "max_body_bytes": 2048,
      "healthcheck_path": "/health",
      "max_inflight": 2,
      "queue": {"max_waiting": 10, "timeout": "60s"},
      "model_switch_cost": "45s",
      "hold_after_abort": false,
      "probe": {"path": "/healthcheck", "interval": "1s", "timeout": "500ms"},
      "cluster": "my_nodes",
      "web_ui": false,
      "admin_paths": ["/quit", "/models/"]
    }"#;

    #[test]
    fn accepts_every_option() {
        let c = Config::parse(FULL.as_bytes()).unwrap();
        assert_eq!(c.policy, Policy::Hash);
        assert_eq!(c.hash_on, HashOn::Header("x-session".into()));
        assert_eq!(c.nodes[0].weight, 2);
        assert_eq!(c.nodes[0].max_fails, 5);
        assert_eq!(c.nodes[0].fail_timeout_ms, 60_000);
        assert!(c.nodes[1].serves_any_model() && c.nodes[1].backup);
        assert_eq!((c.nodes[1].max_fails, c.nodes[1].fail_timeout_ms), (1, 10_000));
        assert!(c.nodes[2].down && c.nodes[2].serves("anything"));
        assert_eq!(c.nodes[2].address, "[::1]:52415");
        assert_eq!(c.fail_on_status, vec![500, 502]);
        assert_eq!(c.max_body_bytes, 2048);
        assert_eq!(c.healthcheck_path, "/health");
        assert!(!c.web_ui);
        assert_eq!(c.admin_paths, ["/quit", "/models/"]);
        assert_eq!(c.model_ids(), vec!["qwen2.5-1.5b-instruct-rkllm".to_string()]);
    }

    #[test]
    fn defaults() {
        let c = Config::parse(br#"{"nodes":[{"name":"a","address":"10.0.0.1:52415"}]}"#).unwrap();
        assert_eq!(c.policy, Policy::LeastConn);
        assert_eq!(c.hash_on, HashOn::ClientIp);
        assert_eq!(c.nodes[0].max_fails, 3);
        assert_eq!(c.nodes[0].fail_timeout_ms, 30_000);
        assert_eq!(c.nodes[0].weight, 1);
        assert_eq!(c.fail_on_status, vec![502, 503, 504]);
        assert_eq!(c.max_body_bytes, 1_048_576);
        assert_eq!(c.healthcheck_path, "/healthcheck");
        assert_eq!(c.nodes[0].max_inflight, 1);
        assert_eq!(c.nodes[0].probe_path, "/v1/models");
        assert_eq!(c.queue, QueueConfig { max_waiting: 64, timeout_ms: 300_000, fair_share: true });
        assert_eq!(c.model_switch_cost_ms, None, "auto");
        assert!(c.hold_after_abort);
        assert_eq!(c.probe, None);
        assert_eq!(c.cluster, "exo_nodes");
        assert!(c.web_ui);
        assert!(c.admin_paths.is_empty());
    }

    fn rejected(json: &str) -> ConfigError {
        match Config::parse(json.as_bytes()) {
            Ok(_) => panic!("accepted: {json}"),
            Err(e) => e,
        }
    }

    #[test]
    fn names_the_bad_field() {
        let n = r#"{"name":"a","address":"10.0.0.1:1"}"#;
        let cases: Vec<(String, &str, &str)> = vec![
            ("".into(), "configuration", "empty"),
            ("[]".into(), "configuration", "JSON object"),
            (r#"{"nodes":[]}"#.into(), "nodes", "empty"),
            (format!(r#"{{"nodes":[{n}],"bogus":1}}"#), "bogus", "unknown field `bogus`"),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","colour":1}]}"#.into(),
                "nodes[0].colour",
                "unknown field `colour`",
            ),
            (r#"{"nodes":[{"name":"a","address":"x:1"}]}"#.into(), "nodes[0].address", "not an ip:port"),
            (r#"{"nodes":[{"name":"a","address":"10.0.0.1"}]}"#.into(), "nodes[0].address", "not an ip:port"),
            (r#"{"nodes":[{"name":"a","address":"10.0.0.1:0"}]}"#.into(), "nodes[0].address", "port 0"),
            (format!(r#"{{"nodes":[{n},{{"name":"a","address":"10.0.0.2:1"}}]}}"#), "nodes[1].name", "used by another"),
            (
                format!(r#"{{"nodes":[{n},{{"name":"b","address":"10.0.0.1:1"}}]}}"#),
                "nodes[1].address",
                "used by another",
            ),
            (r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","weight":0}]}"#.into(), "nodes[0].weight", "at least 1"),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","weight":-1}]}"#.into(),
                "nodes[0].weight",
                "invalid value",
            ),
            (r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","models":[]}]}"#.into(), "nodes[0].models", "empty"),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","models":["m","m"]}]}"#.into(),
                "nodes[0].models[1]",
                "twice",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","models":["*","m"]}]}"#.into(),
                "nodes[0].models",
                "cannot be combined",
            ),
            (r#"{"nodes":[{"name":"a b","address":"10.0.0.1:1"}]}"#.into(), "nodes[0].name", "may hold only"),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","fail_timeout":"3 days"}]}"#.into(),
                "nodes[0].fail_timeout",
                "unit",
            ),
            (format!(r#"{{"nodes":[{n}],"fail_timeout":"0s"}}"#), "fail_timeout", "longer than 0"),
            (format!(r#"{{"nodes":[{n}],"fail_timeout":30}}"#), "fail_timeout", "invalid type"),
            (format!(r#"{{"nodes":[{n}],"policy":"fastest"}}"#), "policy", "unknown variant"),
            (format!(r#"{{"nodes":[{n}],"hash_on":"cookie"}}"#), "hash_on", "client_ip"),
            (format!(r#"{{"nodes":[{n}],"fail_on_status":[200]}}"#), "fail_on_status[0]", "not an HTTP error"),
            (format!(r#"{{"nodes":[{n}],"max_body_bytes":0}}"#), "max_body_bytes", "outside"),
            (format!(r#"{{"nodes":[{n}],"max_body_bytes":999999999}}"#), "max_body_bytes", "outside"),
            (format!(r#"{{"nodes":[{n}],"healthcheck_path":"health"}}"#), "healthcheck_path", "starting with"),
            (format!(r#"{{"nodes":[{n}]}} trailing"#), "configuration", "trailing"),
            (format!(r#"{{"nodes":[{n}],"web_ui":"yes"}}"#), "web_ui", "invalid type"),
            (format!(r#"{{"nodes":[{n}],"admin_paths":"/quit"}}"#), "admin_paths", "invalid type"),
            (format!(r#"{{"nodes":[{n}],"admin_paths":["/quit","quit"]}}"#), "admin_paths[1]", "plain path"),
            (format!(r#"{{"nodes":[{n}],"admin_paths":["/"]}}"#), "admin_paths[0]", "every path"),
            (format!(r#"{{"nodes":[{n}],"admin_paths":["/a/../quit"]}}"#), "admin_paths[0]", "plain path"),
            (format!(r#"{{"nodes":[{n}],"admin_paths":["//quit"]}}"#), "admin_paths[0]", "plain path"),
            (format!(r#"{{"nodes":[{n}],"admin_paths":["/q%75it"]}}"#), "admin_paths[0]", "plain path"),
            (format!(r#"{{"nodes":[{n}],"admin_paths":["/quit?now"]}}"#), "admin_paths[0]", "plain path"),
            ("{".into(), "configuration", "EOF"),
            (r#"{"nodes":[{"name":"a","address":"10.0.0.1:1",}]}"#.into(), "configuration", "key must be a string"),
        ];
        for (json, field, words) in cases {
            let e = rejected(&json);
            assert_eq!(e.field, field, "{json} -> {e}");
            assert!(e.message.contains(words), "{json} -> {e} (expected '{words}')");
        }
    }
}
