//! What kind of request this is, and what an inference request's body asks for.
//!
//! Requests are classified on the path as the exo nodes will route it (see [`normalize_path`]),
//! and only an allow-list reaches the nodes: the OpenAI-compatible API, exo's web UI when
//! `web_ui` is on, and the paths an operator lists in `admin_paths`. Everything else (node
//! administration such as `POST /quit`, `POST /download`, `DELETE /models/<name>`) is refused.

use crate::logic::config::{Config, MAX_MODEL_BYTES};
use crate::logic::errors::LbError;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;

/// The OpenAI inference paths whose JSON body names the model.
pub const INFERENCE_PATHS: [&str; 4] =
    ["/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/embeddings"];

/// The longest path quoted back in a refusal.
const QUOTED_PATH_MAX_CHARS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A POST to an inference path: buffer the body, route by its model.
    Inference,
    /// The balancer's own health endpoint.
    Healthcheck,
    /// `GET /v1/models`, answered from the configuration.
    ModelList,
    /// Allowed and not a generation (other API reads, the web UI and its websockets, listed
    /// admin paths): routed at the headers stage.
    Passthrough,
    /// Not on the allow-list: answered 403 ([`refusal`]), never sent to a node.
    Refused,
}

/// The path as the exo nodes route it, so that a request is classified as what it will do
/// there however it is spelled: the query and fragment cut off, every `%XX` decoded once (both
/// exo servers decode the path before routing: aiohttp's yarl and FastAPI's uvicorn), runs of
/// `/` collapsed, and `.` and `..` segments resolved (RFC 3986, section 5.2.4). Case is kept:
/// both servers' routers are case-sensitive, so `/V1/Chat/Completions` is not a generation
/// there (it is not on the allow-list either, so it is refused).
///
/// Envoy normalises too (`normalize_path`, `merge_slashes` and rejecting `%2F`/`%5C` in the
/// rendered configuration); this keeps the filter right on its own.
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    let raw = raw.find(['?', '#']).and_then(|end| raw.get(..end)).unwrap_or(raw);
    // Nearly every path is normal already: nothing to decode, no empty, "." or ".." segment.
    if is_normal(raw.as_bytes()) {
        return Cow::Borrowed(raw);
    }
    let decoded = percent_decode(raw.as_bytes());
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        match segment {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut path = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        path.push('/');
        path.push_str(s);
    }
    if trailing || segments.is_empty() {
        path.push('/');
    }
    Cow::Owned(path)
}

/// Whether `path` (query cut off) is already what [`normalize_path`] makes of it: it starts
/// with `/`, has no `%`, no empty segment but a last one, and no `.` or `..` segment. One pass
/// over the bytes: this runs for every request.
fn is_normal(path: &[u8]) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    // The current segment: its length so far, and whether it is all dots.
    let (mut len, mut dots) = (0usize, true);
    for &b in path.iter().skip(1) {
        match b {
            b'%' => return false,
            b'/' => {
                if len == 0 || (dots && len <= 2) {
                    return false;
                }
                (len, dots) = (0, true);
            }
            _ => {
                len += 1;
                dots &= b == b'.';
            }
        }
    }
    !(dots && (1..=2).contains(&len))
}

fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b == b'%' {
            if let (Some(hi), Some(lo)) = (raw.get(i + 1).copied().and_then(hex), raw.get(i + 2).copied().and_then(hex))
            {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

/// Whether `path` (normalised) is one of the operator's `admin_paths`: an entry ending in `/`
/// is a prefix, any other entry an exact path.
pub fn is_admin_path(admin_paths: &[String], path: &str) -> bool {
    admin_paths.iter().any(|p| if p.ends_with('/') { path.starts_with(p.as_str()) } else { path == p })
}

/// What the request is, and whether it may reach a node at all.
pub fn classify(method: &str, path: &str, cfg: &Config) -> RequestKind {
    let path = normalize_path(path);
    let path = path.as_ref();
    let is = |name: &str| method.eq_ignore_ascii_case(name);
    let is_get = is("GET") || is("HEAD");
    // Reads that change nothing on a node: preflights included.
    let is_safe = is_get || is("OPTIONS");
    if is_get && path == cfg.healthcheck_path {
        RequestKind::Healthcheck
    } else if is_get && (path == "/v1/models" || path == "/models") {
        RequestKind::ModelList
    } else if INFERENCE_PATHS.contains(&path) {
        if is("POST") {
            RequestKind::Inference
        } else {
            // Any other method on a generation path starts nothing (the node answers 405).
            RequestKind::Passthrough
        }
    } else if allowed(path, is_safe, cfg) {
        RequestKind::Passthrough
    } else {
        RequestKind::Refused
    }
}

/// The allow-list for everything but generations, the health check and the model list: the
/// operator's `admin_paths` (any method), and reads (GET, HEAD, OPTIONS) of the API, or of any
/// path when `web_ui` is on.
fn allowed(path: &str, is_safe: bool, cfg: &Config) -> bool {
    is_admin_path(&cfg.admin_paths, path) || (is_safe && (path.starts_with("/v1/") || cfg.web_ui))
}

/// The answer to a [`RequestKind::Refused`] request.
pub fn refusal(method: &str, path: &str) -> LbError {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let mut quoted: String = path.chars().filter(|c| !c.is_control()).take(QUOTED_PATH_MAX_CHARS).collect();
    if path.chars().count() > QUOTED_PATH_MAX_CHARS {
        quoted.push_str("...");
    }
    let method: String = method.chars().filter(char::is_ascii_alphabetic).take(16).collect();
    LbError::PathNotAllowed { method, path: quoted }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceRequest {
    pub model: String,
    pub stream: bool,
    /// `max_completion_tokens`, else `max_tokens`: the longest reply the client accepts.
    pub max_tokens: Option<u64>,
}

/// Only the fields scheduling needs; serde skips the rest without building anything (still
/// checking that it is JSON).
#[derive(Deserialize)]
struct BodyHead<'a> {
    #[serde(borrow, default)]
    model: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    stream: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    max_tokens: Option<Scalar<'a>>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<Scalar<'a>>,
}

/// A JSON value reduced to what the balancer looks at: strings (borrowed from the body when
/// they have no escapes), booleans and counts; anything else is skipped.
enum Scalar<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Count(u64),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor(std::marker::PhantomData))
    }
}

struct ScalarVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ScalarVisitor<'a> {
    type Value = Scalar<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_string())))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Count(v))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    // Nested values are read as `Scalar`s again (not skipped), so that serde_json's recursion
    // limit applies to the fields the balancer reads, as it would for any JSON value.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Scalar>()?.is_some() {}
        Ok(Scalar::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, Scalar>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

/// Reads `model`, `stream` and the reply-length limit from a complete request body.
pub fn parse_body(body: &[u8]) -> Result<InferenceRequest, LbError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_none() {
        return Err(LbError::InvalidJson("the body is empty".to_string()));
    }
    if first != Some(&b'{') {
        return Err(LbError::InvalidJson("the body must be a JSON object".to_string()));
    }
    let head: BodyHead = serde_json::from_slice(body).map_err(|e| LbError::InvalidJson(e.to_string()))?;
    let model = match head.model {
        Some(Scalar::Str(m)) if !m.trim().is_empty() => m,
        _ => return Err(LbError::MissingModel),
    };
    if model.len() > MAX_MODEL_BYTES {
        return Err(LbError::InvalidModel { limit: MAX_MODEL_BYTES });
    }
    let count = |s: Option<Scalar>| match s {
        Some(Scalar::Count(n)) => Some(n),
        _ => None,
    };
    let max_tokens = count(head.max_completion_tokens).or(count(head.max_tokens));
    Ok(InferenceRequest {
        model: model.into_owned(),
        stream: matches!(head.stream, Some(Scalar::Bool(true))),
        max_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        Config::parse(format!(r#"{{"nodes":[{{"name":"a","address":"10.0.0.1:1"}}]{extra}}}"#).as_bytes()).unwrap()
    }

    #[test]
    fn classifies() {
        let c = cfg("");
        assert_eq!(classify("POST", "/v1/chat/completions", &c), RequestKind::Inference);
        assert_eq!(classify("POST", "/v1/chat/completions?x=1", &c), RequestKind::Inference);
        assert_eq!(classify("POST", "/chat/completions", &c), RequestKind::Inference);
        assert_eq!(classify("POST", "/v1/embeddings", &c), RequestKind::Inference);
        assert_eq!(classify("POST", "/v1/completions", &c), RequestKind::Inference);
        assert_eq!(classify("GET", "/v1/chat/completions", &c), RequestKind::Passthrough);
        assert_eq!(classify("GET", "/healthcheck", &c), RequestKind::Healthcheck);
        assert_eq!(classify("HEAD", "/healthcheck?x=1", &c), RequestKind::Healthcheck);
        assert_eq!(classify("GET", "/v1/models", &c), RequestKind::ModelList);
        assert_eq!(classify("GET", "/models", &c), RequestKind::ModelList);
        assert_eq!(classify("GET", "/", &c), RequestKind::Passthrough);
        assert_eq!(classify("GET", "/ws", &c), RequestKind::Passthrough);
        assert_eq!(classify("GET", "/v1/download/progress", &c), RequestKind::Passthrough);
        assert_eq!(classify("OPTIONS", "/v1/models", &c), RequestKind::Passthrough);
    }

    #[test]
    fn generations_are_recognised_however_they_are_spelled() {
        let c = cfg("");
        for path in [
            "/v1/chat/complet%69ons",
            "/v1/chat/complet%69ons?stream=1",
            "/%76%31/%63hat/completions",
            "//v1//chat///completions",
            "/v1/./chat/./completions",
            "/v1/x/../chat/completions",
            "/v1/%2e/chat/%2E%2E/chat/completions",
            "/../../v1/chat/completions",
            "/v1%2Fchat%2fcompletions",
            "/chat/x/../completions",
        ] {
            assert_eq!(classify("POST", path, &c), RequestKind::Inference, "{path}");
        }
        // Methods are compared without case, like paths by the nodes' routers: never a bypass.
        assert_eq!(classify("post", "/v1/chat/completions", &c), RequestKind::Inference);
        // Spellings the nodes do not route to a generation are not generations, and are refused.
        for path in [
            "/V1/Chat/Completions",
            "/v1/chat/completions/x",
            "/v1/chat/completions%3Fx",
            "/v1/chat/completion",
            "/chat/completions/.",
        ] {
            assert_eq!(classify("POST", path, &c), RequestKind::Refused, "{path}");
        }
    }

    #[test]
    fn the_one_pass_check_agrees_with_the_segment_rules_on_every_short_path() {
        // The rules it replaces, as written out: no `%`, no `//`, no `.` or `..` segment.
        let by_segments = |p: &str| {
            p.starts_with('/') && !p.contains('%') && !p.contains("//") && !p.split('/').any(|s| s == "." || s == "..")
        };
        let mut paths = vec![String::new()];
        for _ in 0..6 {
            let longer: Vec<String> =
                paths.iter().flat_map(|p| ['/', '.', 'a', '%'].map(|c| format!("{p}{c}"))).collect();
            paths.extend(longer);
            paths.dedup();
        }
        paths.sort();
        paths.dedup();
        assert!(paths.len() > 5_000);
        for p in &paths {
            assert_eq!(is_normal(p.as_bytes()), by_segments(p), "{p:?}");
        }
    }

    #[test]
    fn normalises_like_the_nodes_route() {
        for (raw, want) in [
            ("/", "/"),
            ("", "/"),
            ("//", "/"),
            ("/a/b/", "/a/b/"),
            ("/a/./b/../c", "/a/c"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/..%2f..%2fquit", "/quit"),
            ("/%7Euser/%41%42", "/~user/AB"),
            ("/bad%zz%4", "/bad%zz%4"),
            ("/a%00b", "/a\u{0}b"),
            ("/caf%C3%A9", "/café"),
            ("/x%ff", "/x\u{fffd}"),
            ("/p?q=/../x#f", "/p"),
            ("/%2525", "/%25"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
    }

    #[test]
    fn node_administration_is_refused() {
        let c = cfg("");
        for (method, path) in [
            ("POST", "/quit"),
            ("POST", "//quit"),
            ("POST", "/v1/../quit"),
            ("POST", "/v1/%2e%2e/quit"),
            ("POST", "/download"),
            ("DELETE", "/models/qwen2.5-3b-rkllm"),
            ("POST", "/v1/image/generations"),
            ("POST", "/healthcheck?x=1"),
            ("PUT", "/v1/models"),
            ("POST", "/instance"),
            ("DELETE", "/instance/1"),
            ("PATCH", "/"),
            ("CONNECT", "/"),
        ] {
            assert_eq!(classify(method, path, &c), RequestKind::Refused, "{method} {path}");
        }
        let e = refusal("POST", "/quit?now=1");
        assert_eq!((e.status(), e.code()), (403, "path_not_allowed"));
        assert!(e.message().contains("POST /quit") && !e.message().contains("now=1"), "{}", e.message());
        let long = refusal("POST\n", &format!("/{}\n", "x".repeat(10_000)));
        assert!(long.message().len() < 600 && !long.message().contains('\n'), "{}", long.message());
    }

    #[test]
    fn web_ui_is_an_option() {
        let off = cfg(r#","web_ui":false"#);
        assert_eq!(classify("GET", "/", &off), RequestKind::Refused);
        assert_eq!(classify("GET", "/ws", &off), RequestKind::Refused);
        assert_eq!(classify("GET", "/topology", &off), RequestKind::Refused);
        // The API stays.
        assert_eq!(classify("GET", "/v1/models", &off), RequestKind::ModelList);
        assert_eq!(classify("GET", "/v1/topology", &off), RequestKind::Passthrough);
        assert_eq!(classify("POST", "/chat/completions", &off), RequestKind::Inference);
        assert_eq!(classify("GET", "/healthcheck", &off), RequestKind::Healthcheck);
        // On (the default): reads only.
        let on = cfg("");
        assert_eq!(classify("GET", "/index.css", &on), RequestKind::Passthrough);
        assert_eq!(classify("POST", "/index.css", &on), RequestKind::Refused);
    }

    #[test]
    fn listed_admin_paths_pass() {
        let c = cfg(r#","admin_paths":["/quit","/models/"]"#);
        assert_eq!(classify("POST", "/quit", &c), RequestKind::Passthrough);
        assert_eq!(classify("POST", "/%71uit", &c), RequestKind::Passthrough);
        assert_eq!(classify("DELETE", "/models/m1", &c), RequestKind::Passthrough);
        assert_eq!(classify("POST", "/quit/x", &c), RequestKind::Refused);
        assert_eq!(classify("POST", "/download", &c), RequestKind::Refused);
        assert_eq!(classify("DELETE", "/models", &c), RequestKind::Refused);
    }

    #[test]
    fn parses_model_and_stream() {
        let r = parse_body(br#"{"model":"m1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r, InferenceRequest { model: "m1".into(), stream: true, max_tokens: None });
        let r = parse_body(br#" {"messages":[], "model":"m2"} "#).unwrap();
        assert_eq!(r, InferenceRequest { model: "m2".into(), stream: false, max_tokens: None });
        let r =
            parse_body(br#"{"model":"m\u0033","max_tokens":50,"max_completion_tokens":70,"stream":"yes"}"#).unwrap();
        assert_eq!(r, InferenceRequest { model: "m3".into(), stream: false, max_tokens: Some(70) });
        let r = parse_body(br#"{"model":"m","max_tokens":50,"max_completion_tokens":-1}"#).unwrap();
        assert_eq!(r.max_tokens, Some(50));
    }

    #[test]
    fn rejects_bad_bodies() {
        for body in [&b""[..], b"   ", b"[1]", b"\"m\"", b"{", b"{\"model\":\"m\"", b"{} x", b"\xff\xfe"] {
            assert!(matches!(parse_body(body), Err(LbError::InvalidJson(_))), "{body:?}");
        }
        for body in [
            &br#"{}"#[..],
            br#"{"model":null}"#,
            br#"{"model":1}"#,
            br#"{"model":""}"#,
            br#"{"model":["m"]}"#,
            br#"{"model":{"a":1}}"#,
        ] {
            assert_eq!(parse_body(body), Err(LbError::MissingModel), "{body:?}");
        }
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_BYTES + 1));
        assert_eq!(parse_body(long.as_bytes()), Err(LbError::InvalidModel { limit: MAX_MODEL_BYTES }));
        let longest = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_BYTES));
        assert!(parse_body(longest.as_bytes()).is_ok());
    }

    #[test]
    fn deep_nesting_never_overflows_the_stack() {
        let nested = |prefix: &[u8]| {
            let mut body = prefix.to_vec();
            body.extend(std::iter::repeat_n(b'[', 100_000));
            body.extend(std::iter::repeat_n(b']', 100_000));
            body.push(b'}');
            body
        };
        // Skipped fields are walked without recursion: the request still routes.
        assert_eq!(parse_body(&nested(b"{\"model\":\"m\",\"x\":")).map(|r| r.model), Ok("m".to_string()));
        // A nested `model` hits serde_json's recursion limit: a clean error.
        assert!(matches!(parse_body(&nested(b"{\"model\":")), Err(LbError::InvalidJson(_))));
    }
}
