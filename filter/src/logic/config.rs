//! The filter's public interface: the JSON in the plugin's `configuration`, parsed and validated
//! on load. Every error names the field it is about.

use crate::logic::duration;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;

/// A node that serves every model lists this (or omits `models`).
pub const ANY_MODEL: &str = "*";

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
}

pub const DEFAULT_MAX_FAILS: u32 = 3;
pub const DEFAULT_FAIL_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_FAIL_ON_STATUS: [u16; 3] = [502, 503, 504];
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_HEALTHCHECK_PATH: &str = "/healthcheck";
/// Envoy's buffer limits in the shipped config are 8 MiB; a larger limit would let Envoy's own
/// plain-text 413 answer before the filter can.
pub const MAX_BODY_BYTES_LIMIT: u64 = 8 * 1024 * 1024;

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
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
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
}

impl Config {
    /// Parses and validates the plugin configuration.
    pub fn parse(json: &[u8]) -> Result<Config, ConfigError> {
        if json.iter().all(u8::is_ascii_whitespace) {
            return Err(err(
                "configuration",
                "is empty; it must be a JSON object with \"nodes\"",
            ));
        }
        if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(err("configuration", "must be a JSON object with \"nodes\""));
        }
        let mut de = serde_json::Deserializer::from_slice(json);
        let raw: RawConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "configuration".to_string()
            } else {
                path
            };
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
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
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
                return Err(err(
                    at("address"),
                    format!("'{address}' is used by another node"),
                ));
            }
            let models = match raw_node.models {
                None => Vec::new(),
                Some(list) => {
                    if list.is_empty() {
                        return Err(err(
                            at("models"),
                            "is empty; omit it or use [\"*\"] for any model",
                        ));
                    }
                    if list.iter().any(|m| m == ANY_MODEL) {
                        if list.len() > 1 {
                            return Err(err(
                                at("models"),
                                "\"*\" (any model) cannot be combined with model ids",
                            ));
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
                return Err(err(
                    at("weight"),
                    "must be at least 1 (use \"down\": true to drain a node)",
                ));
            }
            if weight > 1000 {
                return Err(err(
                    at("weight"),
                    format!("{weight} is above the maximum of 1000"),
                ));
            }
            let node_fail_timeout_ms = match &raw_node.fail_timeout {
                Some(text) => positive_duration(&at("fail_timeout"), text)?,
                None => fail_timeout_ms,
            };
            nodes.push(Node {
                name,
                address,
                models,
                weight,
                down: raw_node.down.unwrap_or(false),
                backup: raw_node.backup.unwrap_or(false),
                max_fails: raw_node.max_fails.unwrap_or(max_fails),
                fail_timeout_ms: node_fail_timeout_ms,
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
        let fail_on_status = raw
            .fail_on_status
            .unwrap_or_else(|| DEFAULT_FAIL_ON_STATUS.to_vec());
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
        let healthcheck_path = raw
            .healthcheck_path
            .unwrap_or_else(|| DEFAULT_HEALTHCHECK_PATH.to_string());
        if !healthcheck_path.starts_with('/') || healthcheck_path.contains(['?', '#', ' ']) {
            return Err(err(
                "healthcheck_path",
                format!("'{healthcheck_path}' must be a path starting with '/'"),
            ));
        }
        Ok(Config {
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
        self.nodes.iter().position(|n| n.address == address)
    }

    /// The model ids named by any node, sorted.
    pub fn model_ids(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .nodes
            .iter()
            .flat_map(|n| n.models.iter().map(String::as_str))
            .collect();
        set.into_iter().map(str::to_string).collect()
    }
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
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{
      "nodes": [
        {"name": "rk1", "address": "192.168.1.101:52415", "models": ["qwen2.5-1.5b-instruct-rkllm"], "weight": 2},
        {"name": "rk2", "address": "192.168.1.102:52415", "models": ["*"], "backup": true, "max_fails": 1, "fail_timeout": "10s"},
        {"name": "rk3", "address": "[::1]:52415", "down": true}
      ],
      "policy": "hash",
      "hash_on": "header:X-Session",
      "max_fails": 5,
      "fail_timeout": "1m",
      "fail_on_status": [500, 502],
      "max_body_bytes": 2048,
      "healthcheck_path": "/health"
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
        assert_eq!(
            (c.nodes[1].max_fails, c.nodes[1].fail_timeout_ms),
            (1, 10_000)
        );
        assert!(c.nodes[2].down && c.nodes[2].serves("anything"));
        assert_eq!(c.nodes[2].address, "[::1]:52415");
        assert_eq!(c.fail_on_status, vec![500, 502]);
        assert_eq!(c.max_body_bytes, 2048);
        assert_eq!(c.healthcheck_path, "/health");
        assert_eq!(
            c.model_ids(),
            vec!["qwen2.5-1.5b-instruct-rkllm".to_string()]
        );
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
            (
                format!(r#"{{"nodes":[{n}],"bogus":1}}"#),
                "bogus",
                "unknown field `bogus`",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","colour":1}]}"#.into(),
                "nodes[0].colour",
                "unknown field `colour`",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"x:1"}]}"#.into(),
                "nodes[0].address",
                "not an ip:port",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1"}]}"#.into(),
                "nodes[0].address",
                "not an ip:port",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1:0"}]}"#.into(),
                "nodes[0].address",
                "port 0",
            ),
            (
                format!(r#"{{"nodes":[{n},{{"name":"a","address":"10.0.0.2:1"}}]}}"#),
                "nodes[1].name",
                "used by another",
            ),
            (
                format!(r#"{{"nodes":[{n},{{"name":"b","address":"10.0.0.1:1"}}]}}"#),
                "nodes[1].address",
                "used by another",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","weight":0}]}"#.into(),
                "nodes[0].weight",
                "at least 1",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","weight":-1}]}"#.into(),
                "nodes[0].weight",
                "invalid value",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","models":[]}]}"#.into(),
                "nodes[0].models",
                "empty",
            ),
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
            (
                r#"{"nodes":[{"name":"a b","address":"10.0.0.1:1"}]}"#.into(),
                "nodes[0].name",
                "may hold only",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"10.0.0.1:1","fail_timeout":"3 days"}]}"#.into(),
                "nodes[0].fail_timeout",
                "unit",
            ),
            (
                format!(r#"{{"nodes":[{n}],"fail_timeout":"0s"}}"#),
                "fail_timeout",
                "longer than 0",
            ),
            (
                format!(r#"{{"nodes":[{n}],"fail_timeout":30}}"#),
                "fail_timeout",
                "invalid type",
            ),
            (
                format!(r#"{{"nodes":[{n}],"policy":"fastest"}}"#),
                "policy",
                "unknown variant",
            ),
            (
                format!(r#"{{"nodes":[{n}],"hash_on":"cookie"}}"#),
                "hash_on",
                "client_ip",
            ),
            (
                format!(r#"{{"nodes":[{n}],"fail_on_status":[200]}}"#),
                "fail_on_status[0]",
                "not an HTTP error",
            ),
            (
                format!(r#"{{"nodes":[{n}],"max_body_bytes":0}}"#),
                "max_body_bytes",
                "outside",
            ),
            (
                format!(r#"{{"nodes":[{n}],"max_body_bytes":999999999}}"#),
                "max_body_bytes",
                "outside",
            ),
            (
                format!(r#"{{"nodes":[{n}],"healthcheck_path":"health"}}"#),
                "healthcheck_path",
                "starting with",
            ),
            (
                format!(r#"{{"nodes":[{n}]}} trailing"#),
                "configuration",
                "trailing",
            ),
        ];
        for (json, field, words) in cases {
            let e = rejected(&json);
            assert_eq!(e.field, field, "{json} -> {e}");
            assert!(
                e.message.contains(words),
                "{json} -> {e} (expected '{words}')"
            );
        }
    }
}
