//! Server-sent events flow through unbuffered, in both exo dialects.

use e2e::{both_hosts, chat_body, Cluster, Host, NodeSpec};
use exo_sim::Dialect;
use futures_util::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};

/// Sends a streaming chat request; returns each SSE event with its arrival time.
async fn stream_events(c: &Cluster, model: &str, tokens: u32) -> (Option<String>, Vec<(Duration, String)>) {
    let start = Instant::now();
    let resp =
        c.client.post(c.envoy.url("/v1/chat/completions")).body(chat_body(model, true, tokens)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let node = resp.headers().get("x-exo-lb-node").map(|v| v.to_str().unwrap().to_string());
    let mut events = Vec::new();
    let mut pending = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        pending.push_str(&String::from_utf8_lossy(&chunk.expect("clean stream")));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            events.push((start.elapsed(), event.trim().to_string()));
        }
    }
    (node, events)
}

both_hosts!(sse_chunks_arrive_one_by_one);
async fn sse_chunks_arrive_one_by_one(host: Host) {
    let paced = NodeSpec::new("old", &["m"]).with(|s| {
        s.time_scale = 1.0;
        s.tokens_per_second = 10.0;
    });
    let c = Cluster::start_on(host, vec![paced], json!({})).await;
    let (node, events) = stream_events(&c, "m", 10).await;
    assert_eq!(node.as_deref(), Some("old"));
    // Token chunks (a last chunk carries only finish_reason).
    let data: Vec<&(Duration, String)> =
        events.iter().filter(|(_, e)| e.starts_with("data: ") && e.contains("\"content\"")).collect();
    assert_eq!(data.len(), 10, "{events:?}");
    // At 10 tokens/s the first token must reach the client ~0.9 s before the last one, not at
    // the end with it.
    let spread = data.last().unwrap().0 - data.first().unwrap().0;
    assert!(spread >= Duration::from_millis(700), "chunks were buffered: spread {spread:?}");
    for pair in data.windows(2) {
        assert!(pair[1].0 > pair[0].0 + Duration::from_millis(30), "two chunks arrived together: {pair:?}");
    }
    assert!(!events.iter().any(|(_, e)| e.contains("[DONE]")), "the old dialect has no [DONE]");
}

both_hosts!(new_dialect_stream_passes_keepalives_and_done);
async fn new_dialect_stream_passes_keepalives_and_done(host: Host) {
    let c =
        Cluster::start_on(host, vec![NodeSpec::new("new", &["m"]).with(|s| s.dialect = Dialect::New)], json!({})).await;
    let (node, events) = stream_events(&c, "m", 5).await;
    assert_eq!(node.as_deref(), Some("new"));
    assert_eq!(events.first().map(|e| e.1.as_str()), Some(": keep-alive"));
    assert_eq!(events.last().map(|e| e.1.as_str()), Some("data: [DONE]"));
    assert_eq!(
        events.iter().filter(|(_, e)| e.contains("chat.completion.chunk") && e.contains("\"content\"")).count(),
        5
    );
}
