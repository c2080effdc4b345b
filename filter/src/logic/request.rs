//! What kind of request this is, and what an inference request's body asks for.

use crate::logic::errors::LbError;
use serde::Deserialize;

/// The OpenAI inference paths whose JSON body names the model.
pub const INFERENCE_PATHS: [&str; 4] =
    ["/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/embeddings"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A POST to an inference path: buffer the body, route by its model.
    Inference,
    /// The balancer's own health endpoint.
    Healthcheck,
    /// `GET /v1/models`, answered from the configuration.
    ModelList,
    /// Anything else (web UI, websockets, other API paths): routed at the headers stage.
    Passthrough,
}

pub fn classify(method: &str, path: &str, healthcheck_path: &str) -> RequestKind {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let is_get = method == "GET" || method == "HEAD";
    if is_get && path == healthcheck_path {
        RequestKind::Healthcheck
    } else if is_get && (path == "/v1/models" || path == "/models") {
        RequestKind::ModelList
    } else if method == "POST" && INFERENCE_PATHS.contains(&path) {
        RequestKind::Inference
    } else {
        RequestKind::Passthrough
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceRequest {
    pub model: String,
    pub stream: bool,
}

/// Only the fields routing needs; serde skips the rest (still checking that it is JSON).
#[derive(Deserialize)]
struct BodyHead {
    model: Option<serde_json::Value>,
    stream: Option<serde_json::Value>,
}

/// Reads `model` and `stream` from a complete request body.
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
        Some(serde_json::Value::String(m)) if !m.trim().is_empty() => m,
        _ => return Err(LbError::MissingModel),
    };
    let stream = matches!(head.stream, Some(serde_json::Value::Bool(true)));
    Ok(InferenceRequest { model, stream })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        let hc = "/healthcheck";
        assert_eq!(classify("POST", "/v1/chat/completions", hc), RequestKind::Inference);
        assert_eq!(classify("POST", "/v1/chat/completions?x=1", hc), RequestKind::Inference);
        assert_eq!(classify("POST", "/chat/completions", hc), RequestKind::Inference);
        assert_eq!(classify("POST", "/v1/embeddings", hc), RequestKind::Inference);
        assert_eq!(classify("GET", "/v1/chat/completions", hc), RequestKind::Passthrough);
        assert_eq!(classify("GET", "/healthcheck", hc), RequestKind::Healthcheck);
        assert_eq!(classify("POST", "/healthcheck", hc), RequestKind::Passthrough);
        assert_eq!(classify("GET", "/v1/models", hc), RequestKind::ModelList);
        assert_eq!(classify("GET", "/", hc), RequestKind::Passthrough);
        assert_eq!(classify("GET", "/ws", hc), RequestKind::Passthrough);
    }

    #[test]
    fn parses_model_and_stream() {
        let r = parse_body(br#"{"model":"m1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r, InferenceRequest { model: "m1".into(), stream: true });
        let r = parse_body(br#" {"messages":[], "model":"m2"} "#).unwrap();
        assert_eq!(r, InferenceRequest { model: "m2".into(), stream: false });
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
