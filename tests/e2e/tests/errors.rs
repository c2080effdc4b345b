//! Every error the load balancer answers, with its status and OpenAI-style JSON.

use e2e::{both_hosts, Cluster, Host, NodeSpec, Reply};
use serde_json::json;

/// The proxy's own request id: Envoy's UUID, nginx's `$request_id` (32 hex digits).
fn is_proxy_request_id(host: Host, id: &str) -> bool {
    let len = match host {
        Host::Envoy => 36,
        Host::Nginx => 32,
    };
    id.len() == len && id.chars().all(|ch| ch.is_ascii_hexdigit() || ch == '-')
}

// On nginx the errors decided once the body was read are relayed through the status listener,
// and nginx's own 502/504 pages are rewritten by the filter (docs/nginx.md): the same JSON.
both_hosts!(
    bad_requests,
    oversized_bodies_get_413_from_the_filter,
    a_chunked_body_over_the_default_limit_gets_413,
    the_proxys_own_errors_are_openai_json
);

fn assert_error(r: &Reply, status: u16, kind: &str, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    let e = &r.json()["error"];
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some(kind), Some(code)), "{}", r.body);
    assert!(!e["message"].as_str().unwrap_or_default().is_empty());
    assert!(!e["request_id"].as_str().unwrap_or_default().is_empty(), "carries the proxy's request id");
}

async fn bad_requests(host: Host) {
    let c = Cluster::start_on(
        host,
        vec![NodeSpec::new("a", &["m1"]), NodeSpec::new("b", &["m2"])],
        json!({"max_body_bytes": 4096}),
    )
    .await;
    let post = |body: &'static str| c.post("/v1/chat/completions", body, &[]);
    assert_error(&post("{\"model\": ").await, 400, "invalid_request_error", "invalid_json");
    assert_error(&post("not json").await, 400, "invalid_request_error", "invalid_json");
    assert_error(&post("").await, 400, "invalid_request_error", "invalid_json");
    assert_error(&post("{\"messages\": []}").await, 400, "invalid_request_error", "missing_model");
    assert_error(&post("{\"model\": 42}").await, 400, "invalid_request_error", "missing_model");
    let unknown = post("{\"model\": \"llama-405b\"}").await;
    assert_error(&unknown, 404, "invalid_request_error", "model_not_found");
    let msg = unknown.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("llama-405b") && msg.contains("m1, m2"), "{msg}");
    // The request id in the error is the one Envoy used: its own, never one a client sent.
    let r = c.post("/v1/chat/completions", "{}", &[("x-request-id", "my-request-17")]).await;
    let id = r.json()["error"]["request_id"].as_str().unwrap_or_default().to_string();
    assert!(is_proxy_request_id(host, &id), "{id}");
    // Nothing reached a node.
    assert_eq!(c.nodes.iter().map(|n| n.stats().requests_total).sum::<u64>(), 0);
}

async fn oversized_bodies_get_413_from_the_filter(host: Host) {
    let c = Cluster::start_on(host, vec![NodeSpec::new("a", &["m"])], json!({"max_body_bytes": 4096})).await;
    let big =
        format!("{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}", "x".repeat(10_000));
    // With a content-length...
    assert_error(
        &c.post("/v1/chat/completions", big.clone(), &[]).await,
        413,
        "invalid_request_error",
        "request_too_large",
    );
    // ...and streamed in chunks without one.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.as_bytes().chunks(1000).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    assert_error(&c.post("/v1/chat/completions", body, &[]).await, 413, "invalid_request_error", "request_too_large");
    // Well above Envoy's own buffer limit: still the filter's JSON, not Envoy's plain text.
    let huge = "x".repeat(20 * 1024 * 1024);
    let r = c.post("/v1/chat/completions", huge, &[]).await;
    assert_error(&r, 413, "invalid_request_error", "request_too_large");
    // Just under the limit is fine.
    let ok = format!(
        "{{\"model\":\"m\",\"max_tokens\":1,\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "x".repeat(4000)
    );
    assert_eq!(c.post("/v1/chat/completions", ok, &[]).await.status, 200);
    assert_eq!(c.node("a").stats().requests_total, 1);
}

/// With the default limit (1 MiB) a body sent in chunks, without a length, is only known to be
/// too large once read; on nginx the error then travels through the status listener with the
/// body (which must not be refused there).
async fn a_chunked_body_over_the_default_limit_gets_413(host: Host) {
    let c = Cluster::start_on(host, vec![NodeSpec::new("a", &["m"])], json!({})).await;
    let big =
        format!("{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}", "x".repeat(1_500_000));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.as_bytes().chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = c.post("/v1/chat/completions", body, &[]).await;
    assert_error(&r, 413, "invalid_request_error", "request_too_large");
    assert_eq!(c.node("a").stats().requests_total, 0);
}

async fn the_proxys_own_errors_are_openai_json(host: Host) {
    let mut c = Cluster::start_on(host, vec![NodeSpec::new("a", &["m"])], json!({})).await;
    c.kill("a").await;
    let r = c.post("/v1/chat/completions", e2e::chat_body("m", false, 1), &[("x-request-id", "req-down")]).await;
    // Envoy's 503 (rewritten by its local_reply_config), nginx's 502 (rewritten by the filter).
    let status = if host == Host::Envoy { 503 } else { 502 };
    assert_error(&r, status, "server_error", "upstream_error");
    let id = r.json()["error"]["request_id"].as_str().unwrap_or_default().to_string();
    assert!(is_proxy_request_id(host, &id) && id != "req-down", "the proxy's own request id: {id}");
    // The filter's own replies pass through unchanged.
    let h = c.get("/healthcheck").await;
    assert_eq!(h.status, 200, "the only node is never out: {}", h.body);
    assert_eq!(h.json()["status"], "ok");
}
