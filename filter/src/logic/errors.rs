//! The errors the load balancer itself answers, in OpenAI's JSON shape.

use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LbError {
    /// The body is not a JSON object.
    InvalidJson(String),
    /// No non-empty string `model`.
    MissingModel,
    /// A `model` longer than any model id can be.
    InvalidModel { limit: usize },
    /// No configured node serves the model.
    ModelNotFound { model: String, served: Vec<String> },
    /// The body is larger than `max_body_bytes`.
    RequestTooLarge { limit: u64 },
    /// Every node for the model is out or drained.
    NoAvailableNode { model: Option<String>, retry_after_s: u64 },
    /// Every node for the model is busy and the queue is full.
    QueueFull { model: String, retry_after_s: u64 },
    /// The request waited in the queue past `queue.timeout`.
    QueueTimeout { model: String, waited_s: u64 },
    /// The request waited `waited_s`, no node has its model loaded, and no switch could be
    /// over before it has waited `queue.timeout`: the soonest in `start_in_s`.
    TooLate { model: String, waited_s: u64, start_in_s: u64 },
    /// Not on the allow-list of what reaches the nodes (node administration, or the web UI
    /// with `web_ui` off). `path` is already cut to a bounded length.
    PathNotAllowed { method: String, path: String },
    /// The proxy answered by itself because no node did (nginx's own 502/504; Envoy's are
    /// rewritten by its local_reply_config to the same JSON). `timeout`: the node was reached
    /// but did not answer in time.
    NoNodeAnswered { timeout: bool },
}

impl LbError {
    pub fn status(&self) -> u32 {
        match self {
            LbError::InvalidJson(_) | LbError::MissingModel | LbError::InvalidModel { .. } => 400,
            LbError::ModelNotFound { .. } => 404,
            LbError::RequestTooLarge { .. } => 413,
            LbError::NoAvailableNode { .. } | LbError::QueueTimeout { .. } | LbError::TooLate { .. } => 503,
            LbError::QueueFull { .. } => 429,
            LbError::PathNotAllowed { .. } => 403,
            LbError::NoNodeAnswered { timeout: false } => 502,
            LbError::NoNodeAnswered { timeout: true } => 504,
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            LbError::NoAvailableNode { .. }
            | LbError::QueueTimeout { .. }
            | LbError::TooLate { .. }
            | LbError::NoNodeAnswered { .. } => "server_error",
            LbError::QueueFull { .. } => "rate_limit_error",
            _ => "invalid_request_error",
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            LbError::InvalidJson(_) => "invalid_json",
            LbError::MissingModel => "missing_model",
            LbError::InvalidModel { .. } => "invalid_model",
            LbError::ModelNotFound { .. } => "model_not_found",
            LbError::RequestTooLarge { .. } => "request_too_large",
            LbError::NoAvailableNode { .. } => "no_available_node",
            LbError::QueueFull { .. } => "queue_full",
            LbError::QueueTimeout { .. } | LbError::TooLate { .. } => "queue_timeout",
            LbError::PathNotAllowed { .. } => "path_not_allowed",
            LbError::NoNodeAnswered { timeout: false } => "upstream_error",
            LbError::NoNodeAnswered { timeout: true } => "upstream_timeout",
        }
    }

    pub fn message(&self) -> String {
        match self {
            LbError::InvalidJson(detail) => format!("The request body is not valid JSON: {detail}"),
            LbError::MissingModel => "The request body has no \"model\" string naming the model to run.".to_string(),
            LbError::InvalidModel { limit } => {
                format!("The \"model\" is longer than {limit} bytes; no model id is that long.")
            }
            LbError::ModelNotFound { model, served } => {
                let list = if served.is_empty() { "(none)".to_string() } else { served.join(", ") };
                format!("The model '{model}' is not served by any node. Served models: {list}.")
            }
            LbError::RequestTooLarge { limit } => {
                format!("The request body is larger than the limit of {limit} bytes.")
            }
            LbError::NoAvailableNode { model: Some(model), retry_after_s } => {
                format!("Every node serving '{model}' is unavailable (failing or drained). Retry in {retry_after_s} s.")
            }
            LbError::NoAvailableNode { model: None, retry_after_s } => {
                format!("Every node is unavailable (failing or drained). Retry in {retry_after_s} s.")
            }
            LbError::QueueFull { model, retry_after_s } => {
                format!("Every node serving '{model}' is busy and the queue is full. Retry in {retry_after_s} s.")
            }
            LbError::QueueTimeout { model, waited_s } => {
                format!("No node serving '{model}' became free within {waited_s} s (queue timeout).")
            }
            LbError::TooLate { model, waited_s, start_in_s } => format!(
                "No node serving '{model}' has it loaded, and loading it would take until after the queue \
                 timeout: the request waited {waited_s} s and the soonest a node could start it is in {start_in_s} s."
            ),
            LbError::PathNotAllowed { method, path } => format!(
                "{method} {path} is not forwarded to the nodes: only the OpenAI API (/v1/...) and, if enabled, \
                 the web UI are. Node administration must be listed in the balancer's admin_paths."
            ),
            LbError::NoNodeAnswered { timeout: false } => "No node could serve the request.".to_string(),
            LbError::NoNodeAnswered { timeout: true } => "The node did not answer in time.".to_string(),
        }
    }

    /// Extra response headers besides `content-type`.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            LbError::NoAvailableNode { retry_after_s, .. } | LbError::QueueFull { retry_after_s, .. } => {
                Some(*retry_after_s)
            }
            _ => None,
        }
    }

    /// The JSON body: `{"error": {"message", "type", "code", "request_id"}}`.
    pub fn body(&self, request_id: &str) -> String {
        json!({
            "error": {
                "message": self.message(),
                "type": self.error_type(),
                "code": self.code(),
                "request_id": request_id,
            }
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let e = LbError::ModelNotFound { model: "x".into(), served: vec!["a".into(), "b".into()] };
        let v: serde_json::Value = serde_json::from_str(&e.body("rid-1")).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["request_id"], "rid-1");
        assert!(v["error"]["message"].as_str().unwrap().contains("a, b"));
        assert_eq!(e.status(), 404);
        let busy = LbError::NoAvailableNode { model: Some("m".into()), retry_after_s: 7 };
        assert_eq!((busy.status(), busy.retry_after(), busy.error_type()), (503, Some(7), "server_error"));
        let full = LbError::QueueFull { model: "m".into(), retry_after_s: 3 };
        assert_eq!(
            (full.status(), full.retry_after(), full.error_type(), full.code()),
            (429, Some(3), "rate_limit_error", "queue_full")
        );
        let down = LbError::NoNodeAnswered { timeout: false };
        assert_eq!((down.status(), down.error_type(), down.code()), (502, "server_error", "upstream_error"));
        let silent = LbError::NoNodeAnswered { timeout: true };
        assert_eq!((silent.status(), silent.code()), (504, "upstream_timeout"));
        let late = LbError::QueueTimeout { model: "m".into(), waited_s: 300 };
        assert_eq!(
            (late.status(), late.retry_after(), late.error_type(), late.code()),
            (503, None, "server_error", "queue_timeout")
        );
        let too_late = LbError::TooLate { model: "m".into(), waited_s: 200, start_in_s: 175 };
        assert_eq!((too_late.status(), too_late.retry_after(), too_late.code()), (503, None, "queue_timeout"));
        assert!(too_late.message().contains("waited 200 s") && too_late.message().contains("in 175 s"));
    }

    #[test]
    fn request_id_is_escaped() {
        let v: serde_json::Value = serde_json::from_str(&LbError::MissingModel.body("a\"b\\c")).unwrap();
        assert_eq!(v["error"]["request_id"], "a\"b\\c");
    }
}
