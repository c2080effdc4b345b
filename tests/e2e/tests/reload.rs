//! Changing the node list while Envoy runs: streams in flight finish, new requests use the new
//! list.

use e2e::{chat_body, Cluster, NodeSpec};
use futures_util::StreamExt;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_change_without_dropping_a_stream() {
    let slow = |name: &str| NodeSpec::new(name, &["m"]).with(|s| s.time_scale = 1.0);
    let mut c = Cluster::start_dynamic(vec![slow("a"), slow("b")], json!({"model_switch_cost": "0s"})).await;
    assert_eq!(c.chat("m", false).await.node().as_deref(), Some("a"));
    // A long stream (~3 s) starts on b, the node about to be removed.
    let resp = c.client.post(c.envoy.url("/v1/chat/completions")).body(chat_body("m", true, 48)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-exo-lb-node"], "b");
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    // Replace b with c while the stream runs.
    c.change_nodes(&["a"], vec![slow("c")], json!({"model_switch_cost": "0s"})).await.expect("reload");
    // New requests use the new list only: a and c, never b.
    let replies =
        futures_util::future::join_all((0..4).map(|_| c.post("/v1/chat/completions", chat_body("m", false, 2), &[])))
            .await;
    let mut served: Vec<String> = replies.iter().map(|r| r.node().unwrap_or_default()).collect();
    served.sort();
    assert!(served.iter().all(|n| n == "a" || n == "c"), "{served:?}");
    assert!(served.iter().any(|n| n == "c"), "the new node takes traffic: {served:?}");
    // The old stream runs to its end, every token.
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.next()).await.expect("stream stalled") {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("the stream was cut by the reload")));
    }
    assert_eq!(text.matches("\"content\"").count(), 47, "{text}");
    assert_eq!(c.node("b").stats().requests_total, 1, "only the old stream went to b");
    assert_eq!(c.node("b").stats().completed, 1, "and it completed");
    assert_eq!(
        c.envoy.stat("wasmcustom.exo_lb_upstream_mismatch_total").await,
        0,
        "never served outside the filter's choice"
    );
}
